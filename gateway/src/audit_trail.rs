//! The gateway's audit trail: one audit event for every request, including every
//! authentication and authorisation failure, recorded through the kit's audit
//! client (spooled and batched, off the request path).
//!
//! Two middlewares cooperate. [`record`] wraps authentication: it sees every
//! response, and records one event after it (tenant, actor, action, route, outcome,
//! HTTP status, request id, trace id). [`admit`] runs after authentication and
//! authorisation, just before the handler: it tells [`record`] who the caller was,
//! and for tenants whose `audit_mode` is `fail_closed` it first makes an *intent*
//! event durable (synced to the local spool, or acknowledged by the audit service)
//! and refuses the request with a `503 audit-unavailable` problem when it cannot.
//!
//! Events never hold secret material (no key, no token, no header values) and no
//! request or response body: only the method, route, path, status, duration, the
//! permission the route needs and, for refusals, the reason.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use crewmesh_kit::clients::{AuditClient, UNAUTHENTICATED_TENANT};
use crewmesh_kit::principal::Principal;
use crewmesh_proto::audit::v1 as audit;
use crewmesh_proto::types::v1::Outcome;
use serde::Deserialize;

use crate::AppState;
use crate::extract::Authenticated;
use crate::problem::Problem;
use crate::rbac::{self, Permission};

/// How a tenant's requests are audited (`audit_mode` in its tenant document).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditMode {
    /// The event is recorded after the request, off the request path; a request
    /// never waits for the audit trail (events wait in the spool during an outage).
    #[default]
    BestEffort,
    /// Before the request is carried out, an intent event must be durable: synced to
    /// the gateway's local spool or acknowledged by the audit service. If neither is
    /// possible the request is refused (`503`, problem type `audit-unavailable`).
    FailClosed,
}

/// Longest path kept in an event.
const MAX_PATH: usize = 256;

/// The gateway's audit client (`None` without an audit peer: nothing is recorded,
/// and fail-closed tenants are refused).
#[derive(Clone)]
pub struct AuditTrail {
    client: Option<AuditClient>,
}

impl AuditTrail {
    pub fn new(client: Option<AuditClient>) -> Self {
        Self { client }
    }

    /// Waits until the recorded events are delivered (or `timeout`); what is not
    /// stays in the spool for the next start.
    pub async fn flush(&self, timeout: std::time::Duration) -> bool {
        match &self.client {
            Some(c) => c.flush(timeout).await,
            None => true,
        }
    }

    pub fn client(&self) -> Option<&AuditClient> {
        self.client.as_ref()
    }
}

/// What [`admit`] tells [`record`] through the response's extensions: the request
/// passed authentication and authorisation.
#[derive(Clone)]
struct Admitted {
    principal: Arc<Principal>,
    /// Set when the request was refused for want of a durable audit record.
    refused: Option<String>,
}

/// The audit action of a request needing `permission`: `http.` and the permission
/// with `:` as `.` (`http.models.invoke`); `http.unrouted` outside the API.
pub fn action(permission: Option<Permission>) -> String {
    match permission {
        Some(p) => {
            let mut a = String::with_capacity(5 + p.as_str().len());
            a.push_str("http.");
            a.extend(p.as_str().chars().map(|c| if c == ':' { '.' } else { c }));
            a
        }
        None => "http.unrouted".to_owned(),
    }
}

/// The outcome of a request that reached its handler.
pub fn outcome_of(status: StatusCode) -> Outcome {
    match status.as_u16() {
        401 | 403 => Outcome::Denied,
        s if s < 400 => Outcome::Success,
        _ => Outcome::Failure,
    }
}

fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The facts of a request the event is built from, taken before it runs.
struct Facts {
    method: Method,
    route: Option<String>,
    path: String,
    permission: Option<Permission>,
    request_id: String,
    trace_id: String,
}

impl Facts {
    fn of(req: &Request) -> Self {
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map(|m| m.as_str().to_owned());
        let path = truncated(req.uri().path(), MAX_PATH).to_owned();
        let permission = route
            .as_deref()
            .and_then(|r| rbac::required(req.method(), r, req.uri().path()));
        Self {
            method: req.method().clone(),
            route,
            path,
            permission,
            request_id: req
                .extensions()
                .get::<crate::RequestId>()
                .map(|id| id.0.clone())
                .unwrap_or_default(),
            trace_id: crewmesh_kit::telemetry::current_trace_id(),
        }
    }

    fn event(
        &self,
        tenant: &str,
        subject: &str,
        outcome: Outcome,
        details: Details<'_>,
    ) -> audit::EventInput {
        audit::EventInput {
            tenant: tenant.to_owned(),
            actor: Some(audit::Actor {
                subject: subject.to_owned(),
                service: String::new(),
            }),
            action: action(self.permission),
            resource: Some(audit::Resource {
                kind: "route".to_owned(),
                name: self.route.clone().unwrap_or_else(|| self.path.clone()),
            }),
            outcome: outcome as i32,
            request_id: self.request_id.clone(),
            trace_id: self.trace_id.clone(),
            details_json: crewmesh_kit::clients::details_json(&details),
            ..Default::default()
        }
    }

    fn details(&self, status: Option<StatusCode>, started: Option<Instant>) -> Details<'_> {
        Details {
            duration_us: started
                .map(|t| u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)),
            method: self.method.as_str(),
            path: &self.path,
            permission: self.permission.map(Permission::as_str),
            phase: None,
            reason: None,
            status: status.map(|s| s.as_u16()),
        }
    }
}

/// The event's `details_json`, serialised straight from borrowed fields (fields in
/// alphabetical order, absent ones left out).
#[derive(serde::Serialize)]
struct Details<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_us: Option<u64>,
    method: &'a str,
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    permission: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    phase: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
}

/// What [`crate::authorize`] leaves on a response it refused, for [`record`]: the
/// caller when its credential was valid (`None`: it was not), and why.
#[derive(Clone)]
pub(crate) struct Refused {
    pub principal: Option<Principal>,
    pub reason: String,
}

/// Records one audit event for every request, after its response (see the module
/// documentation). Sits outside authentication so that it sees refusals too.
pub(crate) async fn record(
    state: &AppState,
    req: Request,
    next: impl AsyncFnOnce(Request) -> Response,
) -> Response {
    let Some(client) = state.audit_trail.client.as_ref() else {
        return next(req).await;
    };
    let facts = Facts::of(&req);
    let started = Instant::now();
    let resp = next(req).await;
    let status = resp.status();
    let mut details = facts.details(Some(status), Some(started));
    let event = if let Some(a) = resp.extensions().get::<Admitted>() {
        let outcome = match &a.refused {
            Some(reason) => {
                details.reason = Some(reason);
                Outcome::Failure
            }
            None => outcome_of(status),
        };
        facts.event(
            a.principal.tenant.as_str(),
            &a.principal.subject,
            outcome,
            details,
        )
    } else if let Some(r) = resp.extensions().get::<Refused>() {
        // Refused by authentication, authorisation or limits: under the caller's
        // tenant when its credential was valid, else under the unauthenticated one.
        details.reason = Some(&r.reason);
        match &r.principal {
            Some(p) => facts.event(p.tenant.as_str(), &p.subject, Outcome::Denied, details),
            None => facts.event(UNAUTHENTICATED_TENANT, "", Outcome::Denied, details),
        }
    } else {
        // Outside the API's permissions: unknown paths and the open documents.
        facts.event(UNAUTHENTICATED_TENANT, "", outcome_of(status), details)
    };
    client.record(event);
    resp
}

/// The problem a fail-closed tenant's request gets when its intent event cannot be
/// made durable.
pub fn audit_unavailable(tenant: &str) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "audit-unavailable",
        "Audit unavailable",
        format!(
            "tenant `{tenant}` requires every request to be audited durably before it is carried out (audit_mode fail_closed), and the audit trail cannot take the record now; nothing was done, retry later"
        ),
    )
}

/// Runs after authorisation, before the handler: marks the request as admitted for
/// [`record`], and for fail-closed tenants makes an intent event durable first.
pub(crate) async fn admit(
    state: &AppState,
    req: Request,
    next: impl AsyncFnOnce(Request) -> Response,
) -> Response {
    let Some(Authenticated(principal)) = req.extensions().get::<Authenticated>().cloned() else {
        return next(req).await;
    };
    let routed = req
        .extensions()
        .get::<MatchedPath>()
        .and_then(|r| rbac::required(req.method(), r.as_str(), req.uri().path()));
    if routed.is_none() {
        return next(req).await;
    }
    let mode = state
        .tenant_policies
        .load()
        .get(principal.tenant.as_str())
        .map(|p| p.audit_mode)
        .unwrap_or_default();
    let mut refused = None;
    if mode == AuditMode::FailClosed {
        let facts = Facts::of(&req);
        let mut details = facts.details(None, None);
        details.phase = Some("intent");
        let event = facts.event(
            principal.tenant.as_str(),
            &principal.subject,
            Outcome::Unspecified,
            details,
        );
        let result = match &state.audit_trail.client {
            Some(client) => client.record_durable(event).await.map_err(|e| e.0),
            None => Err("no audit service is configured".to_owned()),
        };
        if let Err(reason) = result {
            tracing::error!(tenant = %principal.tenant.as_str(), %reason, "request refused: its audit record cannot be made durable");
            refused = Some(format!("audit unavailable: {reason}"));
        }
    }
    let mut resp = match &refused {
        Some(_) => audit_unavailable(principal.tenant.as_str()).into_response(),
        None => next(req).await,
    };
    resp.extensions_mut()
        .insert(Admitted { principal, refused });
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_are_valid_audit_actions() {
        assert_eq!(action(Some(Permission::ModelsInvoke)), "http.models.invoke");
        assert_eq!(action(Some(Permission::ConfigWrite)), "http.config.write");
        assert_eq!(action(None), "http.unrouted");
        for p in Permission::ALL {
            let a = action(Some(p));
            assert!(
                a.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)),
                "{a}"
            );
        }
    }

    #[test]
    fn outcomes_follow_the_status() {
        assert_eq!(outcome_of(StatusCode::OK), Outcome::Success);
        assert_eq!(outcome_of(StatusCode::NO_CONTENT), Outcome::Success);
        assert_eq!(outcome_of(StatusCode::UNAUTHORIZED), Outcome::Denied);
        assert_eq!(outcome_of(StatusCode::FORBIDDEN), Outcome::Denied);
        assert_eq!(outcome_of(StatusCode::BAD_REQUEST), Outcome::Failure);
        assert_eq!(outcome_of(StatusCode::BAD_GATEWAY), Outcome::Failure);
    }

    #[test]
    fn audit_modes_parse_and_default_to_best_effort() {
        assert_eq!(AuditMode::default(), AuditMode::BestEffort);
        let m: AuditMode = serde_json::from_str("\"fail_closed\"").unwrap();
        assert_eq!(m, AuditMode::FailClosed);
        let m: AuditMode = serde_json::from_str("\"best_effort\"").unwrap();
        assert_eq!(m, AuditMode::BestEffort);
        assert!(serde_json::from_str::<AuditMode>("\"strict\"").is_err());
    }

    #[test]
    fn long_paths_are_cut_on_a_character_boundary() {
        assert_eq!(truncated("abc", 2), "ab");
        assert_eq!(truncated("aé", 2), "a");
        assert_eq!(truncated("abc", 5), "abc");
    }

    #[test]
    fn the_refusal_problem_is_a_503_of_its_own_type() {
        let p = audit_unavailable("acme");
        assert_eq!(p.status, 503);
        assert_eq!(p.kind, "https://crewmesh.dev/problems/audit-unavailable");
        assert!(p.detail.contains("tenant `acme`"), "{}", p.detail);
    }
}
