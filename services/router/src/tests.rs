//! Router tests: the service called directly (no mTLS) against the simulated upstream,
//! small test upstreams with counted faults, and a test double of the Anthropic API.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::Request as HttpRequest;
use axum::middleware::Next;
use axum::response::IntoResponse;
use crewmesh_kit::config_cache::Snapshot;
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::principal::{Principal, Role, TenantId};
use crewmesh_proto::config::v1::{Document, Kind};
use crewmesh_proto::router::v1 as pb;
use crewmesh_proto::router::v1::router_service_server::RouterService as _;
use crewmesh_proto::types::v1::{Outcome, TokenUsage};
use futures::StreamExt;
use serde_json::{Value, json};
use tonic::{Code, Request, Status};

use crate::breaker::Breakers;
use crate::cache::ResponseCache;
use crate::catalog::{Catalog, GLOBAL};
use crate::limits::Limits;
use crate::provider::{DefaultTimeouts, ProviderClient};
use crate::service::{Captured, Core, Recorder, RouterService};
use crate::strategy::Stats;

/// A running HTTP upstream for one test; stops when dropped.
pub(crate) struct Upstream {
    pub(crate) url: String,
    count: Arc<AtomicU64>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub(crate) async fn sim() -> Upstream {
    let up =
        crewmesh_simulated_upstream::SimulatedUpstream::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
    let url = up.base_url();
    let count = up.request_count();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(up.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    Upstream {
        url,
        count,
        _stop: stop,
    }
}

/// Serves `app` on loopback until the returned sender is dropped; its base URL.
pub(crate) async fn serve(app: axum::Router) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await;
    });
    (format!("http://{addr}/v1"), stop)
}

/// The simulated upstream behind a gate that answers the first `fail_first` requests
/// with `status` (and `retry-after`, when given), then lets requests through.
async fn flaky(fail_first: u64, status: u16, retry_after: Option<&'static str>) -> Upstream {
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let gate = move |req: HttpRequest, next: Next| {
        let c = c.clone();
        async move {
            let n = c.fetch_add(1, Ordering::SeqCst);
            if n < fail_first {
                let mut resp = (
                    http::StatusCode::from_u16(status).expect("status"),
                    r#"{"error":{"message":"injected failure"}}"#,
                )
                    .into_response();
                if let Some(ra) = retry_after {
                    resp.headers_mut()
                        .insert("retry-after", http::HeaderValue::from_static(ra));
                }
                return resp;
            }
            next.run(req).await
        }
    };
    let app = crewmesh_simulated_upstream::router().layer(axum::middleware::from_fn(gate));
    let (url, stop) = serve(app).await;
    Upstream {
        url,
        count,
        _stop: stop,
    }
}

struct Fixture {
    svc: RouterService,
    captured: Arc<Mutex<Captured>>,
    metrics: MetricsRegistry,
}

fn snapshot(docs: &[(Kind, &str, &str, Value)]) -> Snapshot {
    let mut snap = Snapshot::default();
    for (kind, tenant, name, spec) in docs {
        snap.documents.insert(
            (*kind as i32, (*tenant).to_owned(), (*name).to_owned()),
            Document {
                tenant: (*tenant).to_owned(),
                kind: *kind as i32,
                name: (*name).to_owned(),
                spec_json: spec.to_string(),
                ..Default::default()
            },
        );
    }
    snap
}

fn fixture_with(docs: &[(Kind, &str, &str, Value)], replicas: Arc<AtomicU64>) -> Fixture {
    crewmesh_testkit::init_crypto();
    let metrics = MetricsRegistry::new();
    let captured = Arc::new(Mutex::new(Captured::default()));
    let mut recorder = Recorder::new(None, None);
    recorder.captured = Some(captured.clone());
    let core = Core {
        catalog: Arc::new(ArcSwap::from_pointee(Catalog::from_snapshot(&snapshot(
            docs,
        )))),
        provider: ProviderClient::new(DefaultTimeouts {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(30),
            total: Duration::from_secs(60),
        })
        .expect("client"),
        recorder,
        breakers: Arc::new(Breakers::new(&metrics)),
        stats: Arc::new(Stats::default()),
        cache: Arc::new(ResponseCache::new(100, 1 << 20)),
        limits: Arc::new(Limits::new(replicas)),
    };
    Fixture {
        svc: RouterService {
            core: Arc::new(core),
        },
        captured,
        metrics,
    }
}

fn fixture(docs: &[(Kind, &str, &str, Value)]) -> Fixture {
    fixture_with(docs, Arc::new(AtomicU64::new(1)))
}

fn provider(url: &str) -> Value {
    json!({"type": "simulated", "base_url": url})
}

fn principal(tenant: &str) -> Principal {
    Principal {
        tenant: TenantId::parse(tenant).expect("tenant"),
        subject: "key:test".into(),
        roles: vec![Role::Developer],
    }
}

fn req(model: &str, text: &str) -> pb::CompleteRequest {
    pb::CompleteRequest {
        model: model.into(),
        messages: vec![pb::ChatMessage {
            role: pb::Role::User as i32,
            content: Some(text.into()),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn with_routing(mut r: pb::CompleteRequest, routing: pb::RoutingOptions) -> pb::CompleteRequest {
    r.routing = Some(routing);
    r
}

fn as_tenant<T>(tenant: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.extensions_mut().insert(principal(tenant));
    r
}

impl Fixture {
    async fn complete(&self, r: pb::CompleteRequest) -> Result<pb::CompleteResponse, Status> {
        self.complete_as("acme", r).await
    }

    async fn complete_as(
        &self,
        tenant: &str,
        r: pb::CompleteRequest,
    ) -> Result<pb::CompleteResponse, Status> {
        self.svc
            .complete(as_tenant(tenant, r))
            .await
            .map(|r| r.into_inner())
    }

    async fn stream(
        &self,
        r: pb::CompleteRequest,
    ) -> Result<Vec<pb::StreamCompleteResponse>, Status> {
        let resp = self
            .svc
            .stream_complete(as_tenant(
                "acme",
                pb::StreamCompleteRequest { request: Some(r) },
            ))
            .await?;
        let items: Vec<_> = resp.into_inner().collect().await;
        items.into_iter().collect()
    }

    fn usage_records(&self) -> Vec<crewmesh_proto::metrics::v1::UsageRecord> {
        self.captured.lock().unwrap().usage.clone()
    }

    fn audit_events(&self) -> Vec<crewmesh_proto::audit::v1::EventInput> {
        self.captured.lock().unwrap().audit.clone()
    }
}

type Event = pb::stream_complete_response::Event;

fn text_of(events: &[pb::StreamCompleteResponse]) -> String {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Delta(d)) => d.content.clone(),
            _ => None,
        })
        .collect()
}

fn one_deployment(model: &str, url: &str) -> Vec<(Kind, &'static str, String, Value)> {
    vec![
        (Kind::Provider, GLOBAL, "sim".into(), provider(url)),
        (
            Kind::Model,
            GLOBAL,
            "m".into(),
            json!({"deployments": [{"name": "only", "provider": "sim", "model": model}], "retry": {"max_retries": 0}}),
        ),
    ]
}

fn docs<'a>(
    v: &'a [(Kind, &'static str, String, Value)],
) -> Vec<(Kind, &'static str, &'a str, Value)> {
    v.iter()
        .map(|(k, t, n, s)| (*k, *t, n.as_str(), s.clone()))
        .collect()
}

// ---- streaming -------------------------------------------------------------------

#[tokio::test]
async fn stream_maps_sse_to_deltas_and_ends_with_usage_and_call_info() {
    let up = sim().await;
    let f = fixture(&docs(&one_deployment("sim-small", &up.url)));
    let events = f.stream(req("m", "hello there")).await.expect("stream");
    assert!(matches!(
        &events[0].event,
        Some(Event::Delta(d)) if d.role == pb::Role::Assistant as i32
    ));
    assert_eq!(text_of(&events), "[simulated] echo: hello there");
    assert!(events.iter().all(|e| e.model == "m" && !e.id.is_empty()));
    let Some(Event::End(end)) = &events.last().unwrap().event else {
        panic!("the stream must end with StreamEnd: {events:?}");
    };
    // The same request unstreamed reports the same usage.
    let whole = f.complete(req("m", "hello there")).await.expect("complete");
    assert_eq!(end.usage, whole.usage);
    let call = end.call.as_ref().unwrap();
    assert_eq!(call.deployment, "only");
    assert_eq!(call.provider, "sim");
    assert!(call.simulated);
    assert_eq!((call.retries, call.fallbacks), (0, 0));
    let recs = f.usage_records();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].outcome, Outcome::Success as i32);
    assert_eq!(recs[0].usage, end.usage);
    let audit = f.audit_events();
    assert_eq!(audit[0].action, "model.stream");
    assert_eq!(audit[1].action, "model.complete");
}

#[tokio::test]
async fn a_mid_stream_break_ends_with_an_error_event_and_the_consumed_usage() {
    let up = sim().await;
    let f = fixture(&docs(&one_deployment("stream-break", &up.url)));
    let events = f.stream(req("m", "abcdefgh")).await.expect("stream opens");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.event, Some(Event::End(_)))),
        "never a clean end: {events:?}"
    );
    let Some(Event::Error(err)) = &events.last().unwrap().event else {
        panic!("the stream must end with StreamError: {events:?}");
    };
    assert_eq!(err.code, "UNAVAILABLE");
    // Two 8-character fragments arrived: 16 characters = 4 tokens; the prompt of 8
    // characters in one message is estimated at 2 + 1 tokens.
    let consumed = TokenUsage {
        prompt_tokens: 3,
        completion_tokens: 4,
        total_tokens: 7,
    };
    assert_eq!(err.usage, Some(consumed));
    assert_eq!(text_of(&events).chars().count(), 16);
    let recs = f.usage_records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].outcome, Outcome::Failure as i32);
    assert_eq!(recs[0].usage, Some(consumed));
    assert_eq!(f.audit_events()[0].outcome, Outcome::Failure as i32);
}

#[tokio::test]
async fn a_stream_fails_over_before_the_first_byte() {
    let bad = sim().await;
    let good = sim().await;
    let f = fixture(&[
        (Kind::Provider, GLOBAL, "bad", provider(&bad.url)),
        (Kind::Provider, GLOBAL, "good", provider(&good.url)),
        (
            Kind::Model,
            GLOBAL,
            "m",
            json!({"deployments": [
                {"name": "first", "provider": "bad", "model": "error-500", "priority": 1},
                {"name": "second", "provider": "good", "model": "sim-small", "priority": 2}],
              "retry": {"max_retries": 0}}),
        ),
    ]);
    let events = f.stream(req("m", "hi")).await.expect("stream");
    assert_eq!(text_of(&events), "[simulated] echo: hi");
    let Some(Event::End(end)) = &events.last().unwrap().event else {
        panic!("{events:?}")
    };
    let call = end.call.as_ref().unwrap();
    assert_eq!((call.deployment.as_str(), call.fallbacks), ("second", 1));
    assert_eq!(bad.count.load(Ordering::SeqCst), 1);
    assert_eq!(f.usage_records()[0].fallbacks, 1);
}

#[tokio::test]
async fn a_streamed_tool_call_arrives_in_fragments() {
    let up = sim().await;
    let f = fixture(&docs(&one_deployment("sim-small", &up.url)));
    let mut r = req("m", "weather in Oslo");
    r.tools = vec![pb::ToolDefinition {
        name: "get_weather".into(),
        description: String::new(),
        parameters_json: r#"{"type":"object"}"#.into(),
    }];
    let events = f.stream(r).await.expect("stream");
    let calls: Vec<&pb::ToolCallDelta> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Delta(d)) => Some(&d.tool_calls),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(calls[0].name, "get_weather");
    assert!(calls[0].id.starts_with("call_"));
    let args: String = calls.iter().map(|c| c.arguments_json.as_str()).collect();
    assert_eq!(args, r#"{"input":"weather in Oslo"}"#);
    let finish: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Delta(d)) if !d.finish_reason.is_empty() => Some(d.finish_reason.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(finish, vec!["tool_calls"]);
}

#[tokio::test]
async fn a_stream_that_cannot_start_is_a_plain_error() {
    let up = sim().await;
    let f = fixture(&docs(&one_deployment("error-400", &up.url)));
    let err = f.stream(req("m", "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = f.stream(req("nope", "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

// ---- retries, fallbacks, breakers, deadlines ----------------------------------------

fn flaky_model(url: &str, retry: Value) -> Vec<(Kind, &'static str, String, Value)> {
    vec![
        (Kind::Provider, GLOBAL, "flaky".into(), provider(url)),
        (
            Kind::Model,
            GLOBAL,
            "m".into(),
            json!({"deployments": [{"name": "d", "provider": "flaky", "model": "sim-small"}], "retry": retry}),
        ),
    ]
}

#[tokio::test]
async fn retries_retryable_failures_then_succeeds() {
    let up = flaky(2, 503, None).await;
    let f = fixture(&docs(&flaky_model(
        &up.url,
        json!({"max_retries": 2, "base_ms": 1, "max_ms": 5}),
    )));
    let resp = f
        .complete(req("m", "hi"))
        .await
        .expect("third attempt succeeds");
    let call = resp.call.unwrap();
    assert_eq!((call.retries, call.fallbacks), (2, 0));
    assert_eq!(up.count.load(Ordering::SeqCst), 3);
    assert_eq!(f.usage_records()[0].retries, 2);
}

#[tokio::test]
async fn does_not_retry_a_client_error() {
    let up = flaky(5, 400, None).await;
    let f = fixture(&docs(&flaky_model(
        &up.url,
        json!({"max_retries": 3, "base_ms": 1, "max_ms": 5}),
    )));
    let err = f.complete(req("m", "hi")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(up.count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn retry_after_beyond_the_deadline_moves_on_to_the_fallback() {
    // The 429 asks for 30 s; the caller allows 3 s: no retry on that deployment, the
    // next one answers at once.
    let limited = flaky(10, 429, Some("30")).await;
    let good = sim().await;
    let f = fixture(&[
        (Kind::Provider, GLOBAL, "limited", provider(&limited.url)),
        (Kind::Provider, GLOBAL, "good", provider(&good.url)),
        (
            Kind::Model,
            GLOBAL,
            "m",
            json!({"deployments": [
                {"name": "a", "provider": "limited", "model": "sim-small"},
                {"name": "b", "provider": "good", "model": "sim-small"}],
              "retry": {"max_retries": 3, "base_ms": 1, "max_ms": 5}}),
        ),
    ]);
    let mut r = as_tenant("acme", req("m", "hi"));
    r.metadata_mut()
        .insert("grpc-timeout", "3000m".parse().unwrap());
    let resp = f
        .svc
        .complete(r)
        .await
        .expect("fallback answers")
        .into_inner();
    let call = resp.call.unwrap();
    assert_eq!(
        (call.deployment.as_str(), call.retries, call.fallbacks),
        ("b", 0, 1)
    );
    assert_eq!(limited.count.load(Ordering::SeqCst), 1);
    // Without a deadline the 429 alone (every deployment limited) is RESOURCE_EXHAUSTED.
    let only = fixture(&docs(&flaky_model(&limited.url, json!({"max_retries": 0}))));
    let err = only.complete(req("m", "hi")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn a_hanging_upstream_ends_at_the_callers_deadline() {
    let up = sim().await;
    let f = fixture(&docs(&one_deployment("hang", &up.url)));
    let mut r = as_tenant("acme", req("m", "hi"));
    r.metadata_mut()
        .insert("grpc-timeout", "300m".parse().unwrap());
    let err = f.svc.complete(r).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
}

#[tokio::test]
async fn the_providers_first_byte_timeout_triggers_a_fallback() {
    let slow = sim().await;
    let good = sim().await;
    let f = fixture(&[
        (
            Kind::Provider,
            GLOBAL,
            "slow",
            json!({"type": "simulated", "base_url": slow.url, "first_byte_timeout_ms": 200}),
        ),
        (Kind::Provider, GLOBAL, "good", provider(&good.url)),
        (
            Kind::Model,
            GLOBAL,
            "m",
            json!({"deployments": [
                {"name": "a", "provider": "slow", "model": "slow-5000"},
                {"name": "b", "provider": "good", "model": "sim-small"}],
              "retry": {"max_retries": 0}}),
        ),
    ]);
    let resp = f.complete(req("m", "hi")).await.expect("fallback");
    assert_eq!(resp.call.unwrap().deployment, "b");
}

#[tokio::test]
async fn falls_back_to_visible_aliases_only() {
    let bad = sim().await;
    let good = sim().await;
    let f = fixture(&[
        (Kind::Provider, GLOBAL, "bad", provider(&bad.url)),
        (Kind::Provider, GLOBAL, "good", provider(&good.url)),
        (
            Kind::Model,
            GLOBAL,
            "primary",
            json!({"deployments": [{"provider": "bad", "model": "error-500"}], "retry": {"max_retries": 0}}),
        ),
        (
            Kind::Model,
            GLOBAL,
            "backup",
            json!({"deployments": [{"name": "backup-d", "provider": "good", "model": "sim-small"}]}),
        ),
        (
            Kind::Model,
            "other",
            "private",
            json!({"deployments": [{"provider": "good", "model": "sim-small"}]}),
        ),
    ]);
    let routing = |aliases: &[&str]| pb::RoutingOptions {
        fallback_models: aliases.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let resp = f
        .complete(with_routing(req("primary", "hi"), routing(&["backup"])))
        .await
        .expect("backup answers");
    assert_eq!(resp.model, "backup");
    let call = resp.call.unwrap();
    assert_eq!((call.deployment.as_str(), call.fallbacks), ("backup-d", 1));
    // Another tenant's alias cannot be named, even as a fallback.
    let err = f
        .complete(with_routing(req("primary", "hi"), routing(&["private"])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("private"), "{err:?}");
    // Without fallbacks the primary's failure is the answer.
    let err = f.complete(req("primary", "hi")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
}

#[tokio::test]
async fn configured_fallback_models_are_used() {
    let bad = sim().await;
    let good = sim().await;
    let f = fixture(&[
        (Kind::Provider, GLOBAL, "bad", provider(&bad.url)),
        (Kind::Provider, GLOBAL, "good", provider(&good.url)),
        (
            Kind::Model,
            GLOBAL,
            "primary",
            json!({"deployments": [{"provider": "bad", "model": "error-500"}], "retry": {"max_retries": 0}, "fallback_models": ["backup"]}),
        ),
        (
            Kind::Model,
            GLOBAL,
            "backup",
            json!({"deployments": [{"provider": "good", "model": "sim-small"}]}),
        ),
    ]);
    let resp = f.complete(req("primary", "hi")).await.expect("backup");
    assert_eq!(resp.model, "backup");
}

#[tokio::test]
async fn the_breaker_opens_skips_the_deployment_and_shows_in_list_models_and_metrics() {
    let bad = sim().await;
    let good = sim().await;
    let f = fixture(&[
        (Kind::Provider, GLOBAL, "bad", provider(&bad.url)),
        (Kind::Provider, GLOBAL, "good", provider(&good.url)),
        (
            Kind::Model,
            GLOBAL,
            "m",
            json!({"deployments": [
                {"name": "a", "provider": "bad", "model": "error-500"},
                {"name": "b", "provider": "good", "model": "sim-small"}],
              "retry": {"max_retries": 0},
              "breaker": {"consecutive_failures": 2, "open_secs": 3600}}),
        ),
    ]);
    for _ in 0..2 {
        let call = f.complete(req("m", "hi")).await.unwrap().call.unwrap();
        assert_eq!((call.deployment.as_str(), call.fallbacks), ("b", 1));
    }
    let call = f.complete(req("m", "hi")).await.unwrap().call.unwrap();
    // The open breaker skips `a` without calling it: no attempt, no fallback counted.
    assert_eq!((call.deployment.as_str(), call.fallbacks), ("b", 0));
    assert_eq!(bad.count.load(Ordering::SeqCst), 2);
    let models = f
        .svc
        .list_models(as_tenant("acme", pb::ListModelsRequest {}))
        .await
        .unwrap()
        .into_inner();
    let states: Vec<(String, i32)> = models.models[0]
        .deployments
        .iter()
        .map(|d| (d.name.clone(), d.breaker))
        .collect();
    assert_eq!(
        states,
        vec![
            ("a".to_owned(), pb::BreakerState::Open as i32),
            ("b".to_owned(), pb::BreakerState::Closed as i32)
        ]
    );
    assert!(
        f.metrics
            .encode()
            .contains("crewmesh_router_breaker_open{deployment=\"_global/m/a\"} 1"),
        "{}",
        f.metrics.encode()
    );
}

#[tokio::test]
async fn every_breaker_open_is_unavailable() {
    let bad = sim().await;
    let f = fixture(&[
        (Kind::Provider, GLOBAL, "bad", provider(&bad.url)),
        (
            Kind::Model,
            GLOBAL,
            "m",
            json!({"deployments": [{"name": "a", "provider": "bad", "model": "error-500"}],
              "retry": {"max_retries": 0}, "breaker": {"consecutive_failures": 1, "open_secs": 3600}}),
        ),
    ]);
    assert_eq!(
        f.complete(req("m", "x")).await.unwrap_err().code(),
        Code::Unavailable
    );
    let err = f.complete(req("m", "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("circuit breaker"), "{err:?}");
    assert_eq!(bad.count.load(Ordering::SeqCst), 1);
}

// ---- strategies through the service ---------------------------------------------------

#[tokio::test]
async fn cost_optimised_routes_to_the_cheapest_meeting_the_requested_tier() {
    let up = sim().await;
    let f = fixture(&[
        (Kind::Provider, GLOBAL, "sim", provider(&up.url)),
        (
            Kind::Model,
            GLOBAL,
            "m",
            json!({"strategy": "cost-optimised", "deployments": [
                {"name": "premium", "provider": "sim", "model": "sim-large", "input_price_per_1m": 10.0, "output_price_per_1m": 30.0, "quality_tier": 3},
                {"name": "cheap", "provider": "sim", "model": "sim-small", "input_price_per_1m": 0.1, "output_price_per_1m": 0.2, "quality_tier": 1}]}),
        ),
    ]);
    let call = f.complete(req("m", "hi")).await.unwrap().call.unwrap();
    assert_eq!(call.deployment, "cheap");
    // prompt 1 + ceil(2/4) = 2 tokens; completion ceil(len("[simulated] echo: hi")=20 / 4) = 5.
    assert!(
        (call.cost_usd - (2.0 * 0.1 + 5.0 * 0.2) / 1e6).abs() < 1e-15,
        "{call:?}"
    );
    let tiered = with_routing(
        req("m", "hi"),
        pb::RoutingOptions {
            quality_tier: 2,
            ..Default::default()
        },
    );
    assert_eq!(
        f.complete(tiered).await.unwrap().call.unwrap().deployment,
        "premium"
    );
    let impossible = with_routing(
        req("m", "hi"),
        pb::RoutingOptions {
            quality_tier: 9,
            ..Default::default()
        },
    );
    assert_eq!(
        f.complete(impossible).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
}

#[tokio::test]
async fn a_prompt_too_long_for_a_deployment_falls_back_to_a_larger_window() {
    let up = sim().await;
    let f = fixture(&[
        (Kind::Provider, GLOBAL, "sim", provider(&up.url)),
        (
            Kind::Model,
            GLOBAL,
            "m",
            json!({"deployments": [
                {"name": "small-window", "provider": "sim", "model": "sim-small", "context_window": 300, "priority": 1},
                {"name": "large-window", "provider": "sim", "model": "sim-large", "context_window": 100000, "priority": 2}]}),
        ),
    ]);
    let mut short = req("m", "hi");
    short.max_tokens = Some(100);
    let call = f.complete(short).await.unwrap().call.unwrap();
    assert_eq!(call.deployment, "small-window");
    let mut long = req("m", &"x".repeat(2000));
    long.max_tokens = Some(100);
    let call = f.complete(long.clone()).await.unwrap().call.unwrap();
    assert_eq!(
        (call.deployment.as_str(), call.fallbacks),
        ("large-window", 0)
    );
    assert_eq!(up.count.load(Ordering::SeqCst), 2);
    long.messages[0].content = Some("x".repeat(500_000));
    let err = f.complete(long).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("context window"), "{err:?}");
}

// ---- cache ---------------------------------------------------------------------------

#[tokio::test]
async fn cached_answers_skip_the_upstream_per_tenant_and_can_be_bypassed() {
    let up = sim().await;
    let f = fixture(&[
        (Kind::Provider, GLOBAL, "sim", provider(&up.url)),
        (
            Kind::Model,
            GLOBAL,
            "cached",
            json!({"deployments": [{"provider": "sim", "model": "sim-small"}], "cache": {"ttl_secs": 60}}),
        ),
        (
            Kind::Model,
            GLOBAL,
            "plain",
            json!({"deployments": [{"provider": "sim", "model": "sim-small"}]}),
        ),
    ]);
    let first = f.complete(req("cached", "hi")).await.unwrap();
    assert!(!first.call.as_ref().unwrap().cache_hit);
    let second = f.complete(req("cached", "hi")).await.unwrap();
    assert_eq!(
        up.count.load(Ordering::SeqCst),
        1,
        "the hit made no upstream call"
    );
    let call = second.call.as_ref().unwrap();
    assert!(call.cache_hit);
    assert_eq!(call.cost_usd, 0.0);
    assert_eq!(second.choices, first.choices);
    assert_eq!(second.usage, first.usage);
    let recs = f.usage_records();
    assert_eq!(
        recs.iter().map(|r| r.cache_hit).collect::<Vec<_>>(),
        vec![false, true]
    );
    // Another tenant does not see acme's entry.
    f.complete_as("globex", req("cached", "hi")).await.unwrap();
    assert_eq!(up.count.load(Ordering::SeqCst), 2);
    // Bypass per request.
    let bypass = |r| {
        with_routing(
            r,
            pb::RoutingOptions {
                cache: pb::CacheMode::Bypass as i32,
                ..Default::default()
            },
        )
    };
    let resp = f.complete(bypass(req("cached", "hi"))).await.unwrap();
    assert!(!resp.call.unwrap().cache_hit);
    assert_eq!(up.count.load(Ordering::SeqCst), 3);
    // An alias without a cache caches only on request.
    let use_cache = |r| {
        with_routing(
            r,
            pb::RoutingOptions {
                cache: pb::CacheMode::Use as i32,
                ..Default::default()
            },
        )
    };
    f.complete(req("plain", "hi")).await.unwrap();
    f.complete(req("plain", "hi")).await.unwrap();
    assert_eq!(up.count.load(Ordering::SeqCst), 5);
    f.complete(use_cache(req("plain", "yo"))).await.unwrap();
    let hit = f.complete(use_cache(req("plain", "yo"))).await.unwrap();
    assert!(hit.call.unwrap().cache_hit);
    assert_eq!(up.count.load(Ordering::SeqCst), 6);
}

// ---- limits --------------------------------------------------------------------------

fn limited_docs(url: &str) -> Vec<(Kind, &'static str, String, Value)> {
    vec![
        (Kind::Provider, GLOBAL, "sim".into(), provider(url)),
        (
            Kind::Model,
            GLOBAL,
            "m".into(),
            json!({"deployments": [
                {"name": "small", "provider": "sim", "model": "sim-small", "rpm": 4, "priority": 1},
                {"name": "spill", "provider": "sim", "model": "sim-small", "priority": 2}]}),
        ),
        (
            Kind::Model,
            GLOBAL,
            "only".into(),
            json!({"deployments": [{"name": "o", "provider": "sim", "model": "sim-small", "rpm": 2}]}),
        ),
    ]
}

#[tokio::test]
async fn at_the_rpm_limit_the_next_deployment_answers_then_resource_exhausted() {
    let up = sim().await;
    let f = fixture(&docs(&limited_docs(&up.url)));
    let mut used = Vec::new();
    for _ in 0..6 {
        used.push(
            f.complete(req("m", "hi"))
                .await
                .unwrap()
                .call
                .unwrap()
                .deployment,
        );
    }
    assert_eq!(used, ["small", "small", "small", "small", "spill", "spill"]);
    f.complete(req("only", "hi")).await.unwrap();
    f.complete(req("only", "hi")).await.unwrap();
    let err = f.complete(req("only", "hi")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("rate limit"), "{err:?}");
}

#[tokio::test]
async fn two_routers_sharing_the_replica_count_admit_the_configured_total() {
    let up = sim().await;
    let replicas = Arc::new(AtomicU64::new(2));
    let a = fixture_with(&docs(&limited_docs(&up.url)), replicas.clone());
    let b = fixture_with(&docs(&limited_docs(&up.url)), replicas);
    let mut admitted = 0;
    for i in 0..10 {
        let f = if i % 2 == 0 { &a } else { &b };
        if f.complete(req("only", "hi")).await.is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 2, "rpm 2 across two routers");
}

#[tokio::test]
async fn two_routers_counted_through_etcd_leases_keep_the_configured_limit() {
    use crewmesh_kit::membership::{Membership, MembershipConfig};
    let etcd = crewmesh_testkit::etcd();
    let config = MembershipConfig {
        endpoints: vec![etcd.endpoint()],
        prefix: etcd.unique_prefix(),
        ttl: Duration::from_secs(3),
    };
    let (na, nb) = (Arc::new(AtomicU64::new(1)), Arc::new(AtomicU64::new(1)));
    let ma = Membership::join(&config, "routers", na.clone())
        .await
        .expect("join a");
    let mb = Membership::join(&config, "routers", nb.clone())
        .await
        .expect("join b");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while ma.replicas() != 2 || mb.replicas() != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "both replicas never saw 2"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let up = sim().await;
    let a = fixture_with(&docs(&limited_docs(&up.url)), na);
    let b = fixture_with(&docs(&limited_docs(&up.url)), nb);
    let mut admitted = 0;
    for i in 0..10 {
        let f = if i % 2 == 0 { &a } else { &b };
        if f.complete(req("only", "hi")).await.is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 2, "rpm 2 across two routers");
    // When b leaves, a takes the whole limit again.
    mb.leave().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while ma.replicas() != 1 {
        assert!(std::time::Instant::now() < deadline, "a never saw b leave");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ma.leave().await;
}

// ---- Anthropic -------------------------------------------------------------------------

/// A test double of the Anthropic Messages API (not the real service): answers
/// `POST /v1/messages` with a fixed message, whole or as Anthropic's event stream, and
/// records the last request body.
async fn anthropic_double() -> (
    String,
    Arc<Mutex<Option<Value>>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let seen = Arc::new(Mutex::new(None));
    let s = seen.clone();
    let handler = move |headers: http::HeaderMap, body: axum::Json<Value>| {
        let s = s.clone();
        async move {
            assert_eq!(headers.get("x-api-key").unwrap(), "test-key");
            assert_eq!(headers.get("anthropic-version").unwrap(), "2023-06-01");
            let body = body.0;
            *s.lock().unwrap() = Some(body.clone());
            if body["stream"] == true {
                let events = [
                    (
                        "message_start",
                        json!({"type": "message_start", "message": {"id": "msg_1", "model": "anthropic-model-test", "usage": {"input_tokens": 11, "output_tokens": 1}}}),
                    ),
                    (
                        "content_block_start",
                        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                    ),
                    ("ping", json!({"type": "ping"})),
                    (
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
                    ),
                    (
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " world"}}),
                    ),
                    (
                        "content_block_stop",
                        json!({"type": "content_block_stop", "index": 0}),
                    ),
                    (
                        "message_delta",
                        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}),
                    ),
                    ("message_stop", json!({"type": "message_stop"})),
                ];
                let text: String = events
                    .iter()
                    .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
                    .collect();
                return ([("content-type", "text/event-stream")], text).into_response();
            }
            axum::Json(json!({
                "id": "msg_1", "type": "message", "role": "assistant", "model": "anthropic-model-test",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
                ],
                "stop_reason": "tool_use",
                "usage": {"input_tokens": 11, "output_tokens": 7}
            }))
            .into_response()
        }
    };
    let app = axum::Router::new().route("/v1/messages", axum::routing::post(handler));
    let (url, stop) = serve(app).await;
    (url, seen, stop)
}

fn anthropic_docs(
    url: &str,
    key_file: &std::path::Path,
) -> Vec<(Kind, &'static str, String, Value)> {
    vec![
        (
            Kind::Provider,
            GLOBAL,
            "anthropic".into(),
            json!({"type": "anthropic", "base_url": url, "api_key_file": key_file}),
        ),
        (
            Kind::Model,
            GLOBAL,
            "anthropic-alias".into(),
            json!({"deployments": [{"name": "c", "provider": "anthropic", "model": "anthropic-model-test", "input_price_per_1m": 3.0, "output_price_per_1m": 15.0}]}),
        ),
    ]
}

#[tokio::test]
async fn anthropic_messages_map_to_chat_completions() {
    let (url, seen, _stop) = anthropic_double().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "test-key\n").unwrap();
    let f = fixture(&docs(&anthropic_docs(&url, &key)));
    let mut r = req("anthropic-alias", "weather?");
    r.messages.insert(
        0,
        pb::ChatMessage {
            role: pb::Role::System as i32,
            content: Some("be brief".into()),
            ..Default::default()
        },
    );
    r.tools = vec![pb::ToolDefinition {
        name: "get_weather".into(),
        description: "weather".into(),
        parameters_json: r#"{"type":"object"}"#.into(),
    }];
    let resp = f.complete(r).await.expect("anthropic answer");
    let body = seen.lock().unwrap().clone().unwrap();
    assert_eq!(body["system"], "be brief");
    assert_eq!(body["model"], "anthropic-model-test");
    assert_eq!(body["tools"][0]["input_schema"], json!({"type": "object"}));
    let choice = &resp.choices[0];
    assert_eq!(choice.finish_reason, "tool_calls");
    let msg = choice.message.as_ref().unwrap();
    assert_eq!(msg.content.as_deref(), Some("Let me check."));
    assert_eq!(msg.tool_calls[0].id, "toolu_1");
    assert_eq!(msg.tool_calls[0].arguments_json, r#"{"city":"Oslo"}"#);
    assert_eq!(
        resp.usage,
        Some(TokenUsage {
            prompt_tokens: 11,
            completion_tokens: 7,
            total_tokens: 18
        })
    );
    let call = resp.call.unwrap();
    assert_eq!(call.provider, "anthropic");
    assert!(!call.simulated);
    assert!((call.cost_usd - (11.0 * 3.0 + 7.0 * 15.0) / 1e6).abs() < 1e-15);

    let events = f
        .stream(req("anthropic-alias", "hi"))
        .await
        .expect("stream");
    assert_eq!(text_of(&events), "Hello world");
    let Some(Event::End(end)) = &events.last().unwrap().event else {
        panic!("{events:?}")
    };
    assert_eq!(
        end.usage,
        Some(TokenUsage {
            prompt_tokens: 11,
            completion_tokens: 2,
            total_tokens: 13
        })
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.event, Some(Event::Delta(d)) if d.finish_reason == "stop"))
    );
}
