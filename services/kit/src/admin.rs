//! The admin HTTP port: `/healthz` (the process is alive), `/readyz` (it can serve;
//! with reasons when not) and `/metrics` (Prometheus text). Plain HTTP, so kubelet
//! probes and Prometheus can reach it without a client certificate.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::observe::MetricsRegistry;

/// Named readiness conditions. A service is ready when every condition is.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<String, Result<(), String>>>>,
    /// Details of conditions that are met but degraded (e.g. stale config).
    notes: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_ready(&self, name: &str) {
        self.notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.set(name, Ok(()));
    }

    /// The condition is met but degraded: ready, with `note` shown instead of "ok".
    pub fn set_ready_noting(&self, name: &str, note: impl Into<String>) {
        self.notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), note.into());
        self.set(name, Ok(()));
    }

    pub fn set_not_ready(&self, name: &str, reason: impl Into<String>) {
        self.set(name, Err(reason.into()));
    }

    fn set(&self, name: &str, state: Result<(), String>) {
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        checks.insert(name.to_owned(), state);
    }

    pub fn is_ready(&self) -> bool {
        let checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        checks.values().all(Result::is_ok)
    }

    /// `{"ready": bool, "checks": {"name": "ok" | "<reason>"}}`
    pub fn report(&self) -> serde_json::Value {
        let notes = self.notes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        let ready = checks.values().all(Result::is_ok);
        let details: serde_json::Map<String, serde_json::Value> = checks
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    Ok(()) => notes.get(k).cloned().unwrap_or_else(|| "ok".to_owned()),
                    Err(reason) => reason.clone(),
                };
                (k.clone(), serde_json::Value::String(s))
            })
            .collect();
        serde_json::json!({ "ready": ready, "checks": details })
    }
}

#[derive(Clone)]
struct AdminState {
    readiness: Readiness,
    metrics: MetricsRegistry,
}

/// The admin router; services may merge extra routes into it.
pub fn router(readiness: Readiness, metrics: MetricsRegistry) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { readiness, metrics })
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let code = if s.readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(s.readiness.report())).into_response()
}

async fn metrics_text(State(s): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}
