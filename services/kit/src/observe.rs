//! Prometheus metrics of a service: the registry behind the admin `/metrics`
//! endpoint, and the per-RPC tower layer (requests by code, latency, in flight).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt};
use http::{Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

/// The metrics registry of one process, shared by every service in it. Each service
/// registers its metrics with a `service` label.
#[derive(Clone, Default)]
pub struct MetricsRegistry {
    inner: Arc<Mutex<Registry>>,
    rpc: Arc<std::sync::OnceLock<RpcFamilies>>,
}

impl std::fmt::Debug for MetricsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsRegistry")
    }
}

impl MetricsRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a metric under the `crewmesh_` prefix.
    pub fn register<M: prometheus_client::registry::Metric>(
        &self,
        name: &str,
        help: &str,
        metric: M,
    ) {
        let mut reg = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        reg.sub_registry_with_prefix("crewmesh")
            .register(name, help, metric);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let reg = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub service: &'static str,
    pub method: String,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub service: &'static str,
    pub method: String,
}

#[derive(Clone)]
struct RpcFamilies {
    requests: Family<RpcLabels, Counter>,
    duration: Family<MethodLabels, Histogram>,
    in_flight: Family<MethodLabels, Gauge>,
}

/// Per-RPC metrics of one service. The metric families are registered once per
/// registry and shared by every service of the process (told apart by the `service`
/// label), so the exposition never repeats a metric name.
#[derive(Clone)]
pub struct RpcMetrics {
    service: &'static str,
    families: RpcFamilies,
    /// Each method's series, looked up in the families once instead of three times
    /// per request (each a label set built, hashed and compared under a lock).
    methods: Arc<RwLock<HashMap<String, Arc<MethodMetrics>>>>,
}

/// The series of one method that every request touches, and the family its other
/// outcomes are counted in.
struct MethodMetrics {
    labels: MethodLabels,
    in_flight: Gauge,
    duration: Histogram,
    ok: Counter,
    requests: Family<RpcLabels, Counter>,
}

impl MethodMetrics {
    /// Counts one request that ended with `code`.
    fn count(&self, code: &'static str) {
        if code == "OK" {
            self.ok.inc();
        } else {
            self.requests
                .get_or_create(&RpcLabels {
                    service: self.labels.service,
                    method: self.labels.method.clone(),
                    code,
                })
                .inc();
        }
    }
}

/// Methods whose series are kept at hand; requests for more (only a misbehaving
/// peer calls that many distinct paths) go through the families.
const METHODS_KEPT: usize = 256;

impl RpcMetrics {
    /// The series of the method at `path`.
    fn method(&self, path: &str) -> Arc<MethodMetrics> {
        let methods = self.methods.read().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = methods.get(path) {
            return found.clone();
        }
        drop(methods);
        let labels = MethodLabels {
            service: self.service,
            method: path.to_owned(),
        };
        let families = &self.families;
        let found = Arc::new(MethodMetrics {
            in_flight: families.in_flight.get_or_create(&labels).clone(),
            duration: families.duration.get_or_create(&labels).clone(),
            ok: families
                .requests
                .get_or_create(&RpcLabels {
                    service: self.service,
                    method: path.to_owned(),
                    code: "OK",
                })
                .clone(),
            requests: families.requests.clone(),
            labels,
        });
        let mut methods = self.methods.write().unwrap_or_else(|p| p.into_inner());
        if methods.len() < METHODS_KEPT {
            methods.insert(path.to_owned(), found.clone());
        }
        found
    }

    pub fn register(registry: &MetricsRegistry, service: &'static str) -> Self {
        let families = registry
            .rpc
            .get_or_init(|| {
                let f = RpcFamilies {
                    requests: Family::default(),
                    duration: Family::new_with_constructor(|| {
                        Histogram::new([
                            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                            0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                        ])
                    }),
                    in_flight: Family::default(),
                };
                registry.register(
                    "rpc_requests",
                    "gRPC requests handled, by service, method and status code",
                    f.requests.clone(),
                );
                registry.register(
                    "rpc_duration_seconds",
                    "gRPC request latency until response headers",
                    f.duration.clone(),
                );
                registry.register(
                    "rpc_in_flight",
                    "gRPC requests in progress",
                    f.in_flight.clone(),
                );
                f
            })
            .clone();
        Self {
            service,
            families,
            methods: Arc::default(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: RpcMetrics,
}

impl RpcMetricsLayer {
    pub fn new(metrics: RpcMetrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: RpcMetrics,
}

/// gRPC status code name from the `grpc-status` header of a trailers-only response
/// (how tonic answers an error); "OK" otherwise.
fn code_name(headers: &http::HeaderMap) -> &'static str {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0);
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

impl<S, B, RB> Service<Request<B>> for RpcMetricsService<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let method = self.metrics.method(req.uri().path());
        method.in_flight.inc();
        let start = Instant::now();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        async move {
            let result = inner.call(req).await;
            method.in_flight.dec();
            method.duration.observe(start.elapsed().as_secs_f64());
            method.count(match &result {
                Ok(resp) => code_name(resp.headers()),
                Err(_) => "UNAVAILABLE",
            });
            result
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::ServiceExt;

    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[tokio::test]
    async fn requests_are_counted_by_method_and_code_and_timed() {
        let registry = MetricsRegistry::new();
        let metrics = RpcMetrics::register(&registry, "router");
        let svc =
            RpcMetricsLayer::new(metrics).layer(tower::service_fn(|req: Request<()>| async move {
                let mut resp = Response::new(());
                if req.uri().path().ends_with("/Missing") {
                    resp.headers_mut()
                        .insert("grpc-status", http::HeaderValue::from_static("5"));
                }
                Ok::<_, Infallible>(resp)
            }));
        for path in ["/p.S/Call", "/p.S/Call", "/p.S/Missing", "/p.S/Call"] {
            let req = Request::builder().uri(path).body(()).unwrap();
            svc.clone().oneshot(req).await.unwrap();
        }
        let text = registry.encode();
        let ok = r#"crewmesh_rpc_requests_total{service="router",method="/p.S/Call",code="OK"}"#;
        assert_eq!(line(&text, ok), Some(&*format!("{ok} 3")), "{text}");
        let missing = r#"crewmesh_rpc_requests_total{service="router",method="/p.S/Missing",code="NOT_FOUND"}"#;
        assert_eq!(
            line(&text, missing),
            Some(&*format!("{missing} 1")),
            "{text}"
        );
        let count = r#"crewmesh_rpc_duration_seconds_count{service="router",method="/p.S/Call"}"#;
        assert_eq!(line(&text, count), Some(&*format!("{count} 3")), "{text}");
        let in_flight = r#"crewmesh_rpc_in_flight{service="router",method="/p.S/Call"}"#;
        assert_eq!(
            line(&text, in_flight),
            Some(&*format!("{in_flight} 0")),
            "{text}"
        );
    }
}
