//! What the edge hardening adds per request: the same trivial JSON route served with
//! and without `edge::apply` (default settings: header limits, request timeout,
//! security headers), interleaved in one run. Prints median and p99 of each and the
//! difference of the medians.
//!
//! `cargo bench -p crewmesh-gateway --bench edge`

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::routing::get;
use crewmesh_gateway::edge::{HttpEdgeConfig, apply};
use tower::ServiceExt;

fn app() -> Router {
    Router::new().route(
        "/v1/models",
        get(|| async { axum::Json(serde_json::json!({"object": "list", "data": []})) }),
    )
}

fn request() -> Request<Body> {
    Request::builder()
        .uri("/v1/models")
        .header(
            "authorization",
            "Bearer cm_0123456789abcdef0123456789abcdef",
        )
        .header("user-agent", "bench/1.0")
        .header("accept", "application/json")
        .header("x-request-id", "0123456789")
        .body(Body::empty())
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let plain = app();
    let hardened = apply(app(), &HttpEdgeConfig::default());
    let n = 200_000;
    let (mut a, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
    rt.block_on(async {
        for i in 0..n + 10_000 {
            for (router, out) in [(&plain, &mut a), (&hardened, &mut b)] {
                let req = request();
                let t = Instant::now();
                let resp = router.clone().oneshot(req).await.unwrap();
                let _ = axum::body::to_bytes(resp.into_body(), usize::MAX).await;
                if i >= 10_000 {
                    out.push(t.elapsed());
                }
            }
        }
    });
    a.sort_unstable();
    b.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "without edge: median {:.2} us, p99 {:.2} us",
        us(percentile(&a, 0.5)),
        us(percentile(&a, 0.99))
    );
    println!(
        "with edge:    median {:.2} us, p99 {:.2} us",
        us(percentile(&b, 0.5)),
        us(percentile(&b, 0.99))
    );
    println!(
        "added:        median {:.2} us, p99 {:.2} us ({n} requests each)",
        us(percentile(&b, 0.5)) - us(percentile(&a, 0.5)),
        us(percentile(&b, 0.99)) - us(percentile(&a, 0.99))
    );
}
