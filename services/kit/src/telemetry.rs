//! Logs and traces. JSON logs through `tracing`, each line carrying the trace id of
//! its request; OpenTelemetry spans exported over OTLP when an endpoint is set; W3C
//! trace context extracted from and injected into HTTP and gRPC headers so that one
//! request is one trace across services.

use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use http::{HeaderMap, Request};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider as _};
use serde::Deserialize;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::trace_context::{self, TraceContext, TraceContextLayer};

/// The W3C trace context header.
const TRACEPARENT: &str = "traceparent";

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// An `EnvFilter` directive such as `info` or `info,crewmesh_router=debug`.
    #[serde(default = "default_level")]
    pub log_level: String,
    #[serde(default)]
    pub log_format: LogFormat,
    /// OTLP/gRPC collector endpoint, e.g. `http://otel-collector:4317`; no export when unset.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
}

fn default_level() -> String {
    "info".to_owned()
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_level: default_level(),
            log_format: LogFormat::Json,
            otlp_endpoint: None,
        }
    }
}

/// Keeps the tracer provider (when spans are exported) alive; flushes pending spans
/// when dropped.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = &self.provider {
            let _ = provider.shutdown();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log_level: {0}")]
    Filter(String),
    #[error("cannot set up the OTLP exporter: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Installs the global subscriber and propagator. Call once per process.
pub fn init(
    service_name: &str,
    config: &TelemetryConfig,
) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter =
        EnvFilter::try_new(&config.log_level).map_err(|e| TelemetryError::Filter(e.to_string()))?;
    // The log filter applies to log output only: request spans always get trace
    // context, so trace ids exist and propagate even with logs turned down. Only an
    // exporter needs OpenTelemetry spans; without one, spans carry just their W3C ids
    // (see `trace_context`).
    let spans = tracing_subscriber::filter::LevelFilter::INFO;
    let (provider, otel, ids) = match &config.otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(service_name.to_owned())
                        .build(),
                )
                .with_batch_exporter(exporter)
                .build();
            opentelemetry::global::set_tracer_provider(provider.clone());
            // The per-call cost of a span matters on the model path: no busy/idle
            // timing on every poll, no thread attributes, and no activation of the
            // OpenTelemetry context on enter (the trace id and propagation read the
            // span's own context).
            let otel = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("crewmesh"))
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_context_activation(false)
                .with_filter(spans);
            (Some(provider), Some(otel), None)
        }
        None => (None, None, Some(TraceContextLayer.with_filter(spans))),
    };
    let logs = match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let result = tracing_subscriber::registry()
        .with(otel)
        .with(ids)
        .with(logs.with_filter(filter))
        .try_init();
    result.map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { provider })
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(val)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, val);
        }
    }
}

/// Makes `span` a child of the W3C trace context in `headers` (if any) and records
/// its trace id in the span's `trace_id` field.
pub fn adopt_remote_parent(span: &tracing::Span, headers: &HeaderMap) {
    if span.is_disabled() {
        // No subscriber records it (tracing off): nothing to link or to show.
        return;
    }
    let trace_id = if let Some(own) = trace_context::of(span) {
        match headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse)
        {
            Some(remote) => {
                trace_context::adopt(span, remote);
                TraceId::from(remote.trace_id)
            }
            None => TraceId::from(own.trace_id),
        }
    } else {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(headers))
        });
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
        span.context().span().span_context().trace_id()
    };
    span.record("trace_id", tracing::field::display(trace_id));
}

/// The current span's trace id as 32 hex characters (all zeros when there is none).
pub fn current_trace_id() -> String {
    if let Some(cx) = trace_context::current() {
        return cx.trace_id_hex();
    }
    // Otherwise the OpenTelemetry layer holds the span's context.
    let span = tracing::Span::current();
    if span.is_disabled() {
        return TraceId::INVALID.to_string();
    }
    span.context().span().span_context().trace_id().to_string()
}

/// Writes the current span's trace context into outgoing headers.
pub fn inject_current(headers: &mut HeaderMap) {
    if let Some(cx) = trace_context::current() {
        if let Ok(v) = http::HeaderValue::try_from(cx.traceparent()) {
            headers.insert(TRACEPARENT, v);
        }
        return;
    }
    // Otherwise the OpenTelemetry layer holds the span's context.
    let span = tracing::Span::current();
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
}

/// Server side: one span per gRPC request, child of the caller's trace.
#[derive(Clone, Debug)]
pub struct GrpcTraceLayer {
    service: &'static str,
}

impl GrpcTraceLayer {
    pub fn new(service: &'static str) -> Self {
        Self { service }
    }
}

impl<S> Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace {
            inner,
            service: self.service,
        }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcTrace<S> {
    inner: S,
    service: &'static str,
}

impl<S, B> Service<Request<B>> for GrpcTrace<S>
where
    S: Service<Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let span = tracing::info_span!(
            "rpc",
            service = self.service,
            method = %req.uri().path(),
            trace_id = tracing::field::Empty,
        );
        adopt_remote_parent(&span, req.headers());
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        inner.call(req).instrument(span).boxed()
    }
}

/// Client side: injects the current trace context into every outgoing gRPC request.
#[derive(Clone, Debug)]
pub struct InjectTrace<S> {
    inner: S,
}

impl<S> InjectTrace<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> Service<Request<B>> for InjectTrace<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        inject_current(req.headers_mut());
        self.inner.call(req)
    }
}
