//! Tenant and key limits on model calls: requests per minute and tokens per minute,
//! and monthly budgets.
//!
//! Rates are token buckets per tenant and per key. Each gateway replica admits only
//! its share, `ceil(limit / N)` per minute, where N is the number of live gateway
//! replicas ([`crate::replicas`]): the sum over the replicas stays at the configured
//! limit instead of multiplying with them. Requests are counted when admitted; tokens
//! are debited after the call from its actual usage, so a tenant over its token rate
//! goes into debt and is refused until the debt is refilled. A refusal is a `429`
//! problem with `Retry-After`.
//!
//! Budgets compare the tenant's spend this calendar month (UTC), from the metrics
//! service, cached for a few seconds, with the tenant document's `budget_usd_month`;
//! once reached, model calls get a `402` problem of type `budget-exhausted`. A key may
//! have its own `budget_usd_month` (in its `apikey` document): its spend is the tenant's
//! usage records whose subject is the key (`key:<id>`, the principal every mesh service
//! records usage under), and once reached the key's model calls get a `402` problem of
//! type `key-budget-exhausted` while the tenant's other keys go on.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use crewmesh_kit::clients::with_principal;
use crewmesh_kit::config_cache::Snapshot;
use crewmesh_kit::principal::Principal;
use crewmesh_proto::config::v1::Kind;
use crewmesh_proto::metrics::v1::{GroupBy, SpendRequest, UsageFilter};
use serde::Deserialize;

use crate::AppState;
use crate::problem::Problem;

/// The limits of a tenant, from the `_global` `tenant` document named after it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct TenantPolicy {
    #[serde(default)]
    pub rpm: Option<u64>,
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub budget_usd_month: Option<f64>,
    /// How the tenant's requests are audited (`best_effort` unless set).
    #[serde(default)]
    pub audit_mode: crate::audit_trail::AuditMode,
}

/// Tenant policies by tenant id, from the `_global` `tenant` documents of a snapshot.
/// Documents that do not parse are skipped and logged.
pub fn tenant_policies(snapshot: &Snapshot) -> HashMap<String, TenantPolicy> {
    snapshot
        .of_kind(Kind::Tenant)
        .filter(|d| d.tenant == "_global")
        .filter_map(|d| match serde_json::from_str::<TenantPolicy>(&d.spec_json) {
            Ok(p) => Some((d.name.clone(), p)),
            Err(e) => {
                tracing::warn!(tenant = %d.name, error = %e, "ignoring an unusable tenant document");
                None
            }
        })
        .collect()
}

/// The limits of the caller's own credential (an API key; OIDC tokens have none).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KeyLimits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub budget_usd_month: Option<f64>,
}

/// What a request is limited by.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Subject<'a> {
    pub tenant: &'a str,
    /// The key id (or token subject) within the tenant.
    pub key: &'a str,
    pub tenant_policy: Option<&'a TenantPolicy>,
    pub key_rpm: Option<u64>,
    pub key_tpm: Option<u64>,
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    cap: f64,
    updated: Instant,
}

impl Bucket {
    fn refill(&mut self, cap: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * cap / 60.0).min(cap);
        self.cap = cap;
        self.updated = now;
    }

    /// Time until the balance reaches `need`.
    fn wait_for(&self, need: f64) -> Duration {
        let rate = self.cap / 60.0;
        Duration::from_secs_f64(((need - self.tokens) / rate).max(0.0))
    }
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub detail: String,
    pub retry_after: Duration,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let secs = self.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        let mut resp = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            format!("{}; retry in {secs}s", self.detail),
        )
        .into_response();
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert("retry-after", v);
        }
        resp
    }
}

/// The bucket of a tenant's limit (`key` None) or a key's on `unit` (`rpm`, `tpm`).
fn bucket_name(tenant: &str, key: Option<&str>, unit: &str) -> String {
    match key {
        Some(key) => format!("k/{tenant}/{key}/{unit}"),
        None => format!("t/{tenant}/{unit}"),
    }
}

/// The rate limiter of one gateway replica.
#[derive(Debug)]
pub struct Limiter {
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Live gateway replicas (at least 1).
    replicas: Arc<AtomicU64>,
}

impl Limiter {
    pub fn new(replicas: Arc<AtomicU64>) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            replicas,
        }
    }

    /// This replica's share of a per-minute limit.
    pub fn share(&self, limit: u64) -> f64 {
        let n = self.replicas.load(Ordering::Relaxed).max(1);
        limit.div_ceil(n).max(1) as f64
    }

    fn limits(s: &Subject<'_>) -> [(String, Option<u64>, &'static str); 4] {
        let tp = s.tenant_policy;
        [
            (
                bucket_name(s.tenant, None, "rpm"),
                tp.and_then(|p| p.rpm),
                "tenant requests per minute",
            ),
            (
                bucket_name(s.tenant, Some(s.key), "rpm"),
                s.key_rpm,
                "key requests per minute",
            ),
            (
                bucket_name(s.tenant, None, "tpm"),
                tp.and_then(|p| p.tpm),
                "tenant tokens per minute",
            ),
            (
                bucket_name(s.tenant, Some(s.key), "tpm"),
                s.key_tpm,
                "key tokens per minute",
            ),
        ]
    }

    /// Admits one request at `now`, or says how long to wait. A refused request takes
    /// nothing from any bucket.
    pub fn admit(&self, s: &Subject<'_>, now: Instant) -> Result<(), Refusal> {
        let tp = s.tenant_policy;
        if tp.is_none_or(|p| p.rpm.is_none() && p.tpm.is_none())
            && s.key_rpm.is_none()
            && s.key_tpm.is_none()
        {
            return Ok(()); // nothing to count
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let limits = Self::limits(s);
        let mut worst: Option<Refusal> = None;
        for (i, (name, limit, what)) in limits.iter().enumerate() {
            let Some(limit) = *limit else { continue };
            let cap = self.share(limit);
            let b = buckets.entry(name.clone()).or_insert(Bucket {
                tokens: cap,
                cap,
                updated: now,
            });
            b.refill(cap, now);
            // Requests need a whole token; tokens-per-minute only a non-negative balance.
            let need = if i < 2 { 1.0 } else { f64::MIN_POSITIVE };
            if b.tokens < need {
                let wait = b.wait_for(need);
                if worst.as_ref().is_none_or(|w| wait > w.retry_after) {
                    worst = Some(Refusal {
                        detail: format!(
                            "the {what} limit of {limit} is reached (this gateway's share: {cap})"
                        ),
                        retry_after: wait,
                    });
                }
            }
        }
        if let Some(r) = worst {
            return Err(r);
        }
        for (name, limit, _) in &limits[..2] {
            if limit.is_some()
                && let Some(b) = buckets.get_mut(name)
            {
                b.tokens -= 1.0;
            }
        }
        Ok(())
    }

    /// Debits the tokens a call used from the tenant's and key's token buckets.
    pub fn debit_tokens(&self, tenant: &str, key: &str, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.is_empty() {
            return; // no limit configured anywhere: nothing to debit
        }
        for name in [
            bucket_name(tenant, None, "tpm"),
            bucket_name(tenant, Some(key), "tpm"),
        ] {
            if let Some(b) = buckets.get_mut(&name) {
                b.tokens -= tokens as f64;
            }
        }
    }
}

/// Month-to-date spend per tenant or key, fetched from metrics and kept for `ttl`.
#[derive(Debug)]
pub struct SpendCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, f64)>>,
}

impl SpendCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, key: &str, now: Instant) -> Option<f64> {
        let e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.get(key)
            .filter(|(at, _)| now.saturating_duration_since(*at) < self.ttl)
            .map(|(_, v)| *v)
    }

    pub fn put(&self, key: &str, spend: f64, now: Instant) {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.insert(key.to_owned(), (now, spend));
    }
}

/// The first instant of the current calendar month, UTC.
pub fn month_start(now: time::OffsetDateTime) -> time::OffsetDateTime {
    now.replace_day(1)
        .unwrap_or(now)
        .replace_time(time::Time::MIDNIGHT)
}

/// The problem of an exhausted tenant budget.
pub fn budget_exhausted(whose: &str, spend: f64, budget: f64) -> Problem {
    Problem::new(
        StatusCode::PAYMENT_REQUIRED,
        "budget-exhausted",
        "Budget exhausted",
        format!(
            "the monthly budget of {whose} (${budget:.2}) is used up: ${spend:.4} spent this month"
        ),
    )
}

/// The problem of an exhausted key budget: the tenant's other keys may go on.
pub fn key_budget_exhausted(key: &str, spend: f64, budget: f64) -> Problem {
    Problem::new(
        StatusCode::PAYMENT_REQUIRED,
        "key-budget-exhausted",
        "Key budget exhausted",
        format!(
            "the monthly budget of {key} (${budget:.2}) is used up: ${spend:.4} spent this month"
        ),
    )
}

/// Month-to-date spend of the principal's tenant, or with `of_subject` of the
/// principal's own usage records only, from the cache or from metrics.
async fn spend(
    state: &AppState,
    principal: &Principal,
    of_subject: bool,
) -> Result<f64, tonic::Status> {
    let cache_key = if of_subject {
        format!("k/{}/{}", principal.tenant, principal.subject)
    } else {
        format!("t/{}", principal.tenant)
    };
    if let Some(s) = state.spend.get(&cache_key, Instant::now()) {
        return Ok(s);
    }
    let from = month_start(time::OffsetDateTime::now_utc());
    let filter = UsageFilter {
        from: Some(crewmesh_proto::prost_types::Timestamp {
            seconds: from.unix_timestamp(),
            nanos: 0,
        }),
        subject: if of_subject {
            principal.subject.clone()
        } else {
            String::new()
        },
        ..Default::default()
    };
    let mut call = with_principal(
        SpendRequest {
            filter: Some(filter),
            group_by: GroupBy::Unspecified as i32,
        },
        principal,
    );
    call.set_timeout(Duration::from_secs(2));
    let spend = state
        .metrics
        .clone()
        .spend(call)
        .await?
        .into_inner()
        .total_cost_usd;
    state.spend.put(&cache_key, spend, Instant::now());
    Ok(spend)
}

/// Admits a model call under the tenant's and key's rates and budgets, or answers the
/// refusal.
pub async fn check(
    state: &AppState,
    principal: &Principal,
    key_limits: KeyLimits,
) -> Result<(), Response> {
    let policies = state.tenant_policies.load();
    let policy = policies.get(principal.tenant.as_str());
    let subject = Subject {
        tenant: principal.tenant.as_str(),
        key: &principal.subject,
        tenant_policy: policy,
        key_rpm: key_limits.rpm,
        key_tpm: key_limits.tpm,
    };
    state
        .limiter
        .admit(&subject, Instant::now())
        .map_err(IntoResponse::into_response)?;
    if let Some(budget) = policy.and_then(|p| p.budget_usd_month) {
        match spend(state, principal, false).await {
            Ok(spend) if spend >= budget => {
                return Err(budget_exhausted(
                    &format!("tenant `{}`", principal.tenant),
                    spend,
                    budget,
                )
                .into_response());
            }
            Ok(_) => {}
            // Availability over strictness: an unreachable metrics service does not
            // stop model calls; the next check asks again.
            Err(status) => tracing::warn!(
                code = ?status.code(),
                tenant = %principal.tenant,
                "cannot read the tenant's spend; admitting without the budget check"
            ),
        }
    }
    if let Some(budget) = key_limits.budget_usd_month {
        match spend(state, principal, true).await {
            Ok(spend) if spend >= budget => {
                let key = principal
                    .subject
                    .strip_prefix("key:")
                    .unwrap_or(&principal.subject);
                return Err(
                    key_budget_exhausted(&format!("key `{key}`"), spend, budget).into_response()
                );
            }
            Ok(_) => {}
            Err(status) => tracing::warn!(
                code = ?status.code(),
                tenant = %principal.tenant,
                subject = %principal.subject,
                "cannot read the key's spend; admitting without the budget check"
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;
    use crewmesh_kit::membership::{Membership, MembershipConfig};

    fn limiter(replicas: u64) -> (Limiter, Arc<AtomicU64>) {
        let n = Arc::new(AtomicU64::new(replicas));
        (Limiter::new(n.clone()), n)
    }

    fn subject<'a>(p: &'a TenantPolicy, key_rpm: Option<u64>) -> Subject<'a> {
        Subject {
            tenant: "acme",
            key: "k1",
            tenant_policy: Some(p),
            key_rpm,
            key_tpm: None,
        }
    }

    #[test]
    fn requests_per_minute_refill_over_time() {
        let (l, _) = limiter(1);
        let p = TenantPolicy {
            rpm: Some(3),
            ..Default::default()
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            l.admit(&subject(&p, None), t0).unwrap();
        }
        let r = l.admit(&subject(&p, None), t0).unwrap_err();
        assert_eq!(
            r.detail,
            "the tenant requests per minute limit of 3 is reached (this gateway's share: 3)"
        );
        assert_eq!(r.retry_after, Duration::from_secs(20));
        assert!(
            l.admit(&subject(&p, None), t0 + Duration::from_secs(19))
                .is_err()
        );
        l.admit(&subject(&p, None), t0 + Duration::from_secs(20))
            .unwrap();
    }

    #[test]
    fn the_key_limit_applies_below_the_tenant_limit_and_refusals_take_nothing() {
        let (l, _) = limiter(1);
        let p = TenantPolicy {
            rpm: Some(100),
            ..Default::default()
        };
        let t0 = Instant::now();
        l.admit(&subject(&p, Some(1)), t0).unwrap();
        let r = l.admit(&subject(&p, Some(1)), t0).unwrap_err();
        assert!(
            r.detail
                .starts_with("the key requests per minute limit of 1"),
            "{}",
            r.detail
        );
        // Another key of the tenant is not affected, and the refusal took no tenant token.
        let other = Subject {
            key: "k2",
            ..subject(&p, Some(1))
        };
        l.admit(&other, t0).unwrap();
        let b = l.buckets.lock().unwrap();
        assert_eq!(b["t/acme/rpm"].tokens, 98.0);
    }

    #[test]
    fn replicas_share_the_limit() {
        let (l, n) = limiter(2);
        let p = TenantPolicy {
            rpm: Some(10),
            ..Default::default()
        };
        let t0 = Instant::now();
        let admitted = (0..20)
            .filter(|_| l.admit(&subject(&p, None), t0).is_ok())
            .count();
        assert_eq!(admitted, 5, "half of 10 per replica with 2 replicas");
        n.store(3, Ordering::Relaxed);
        assert_eq!(l.share(10), 4.0);
        n.store(0, Ordering::Relaxed);
        assert_eq!(l.share(10), 10.0);
    }

    #[test]
    fn tokens_are_debited_after_the_call_and_debt_refuses() {
        let (l, _) = limiter(1);
        let p = TenantPolicy {
            tpm: Some(600),
            ..Default::default()
        };
        let t0 = Instant::now();
        l.admit(&subject(&p, None), t0).unwrap();
        l.debit_tokens("acme", "k1", 900);
        let r = l.admit(&subject(&p, None), t0).unwrap_err();
        assert!(
            r.detail
                .starts_with("the tenant tokens per minute limit of 600")
        );
        // 300 tokens of debt at 10 tokens/s.
        assert_eq!(r.retry_after.as_secs(), 30);
        assert!(
            l.admit(&subject(&p, None), t0 + Duration::from_secs(29))
                .is_err()
        );
        l.admit(&subject(&p, None), t0 + Duration::from_secs(31))
            .unwrap();
    }

    #[test]
    fn refusals_are_429_with_retry_after() {
        let resp = Refusal {
            detail: "x".into(),
            retry_after: Duration::from_millis(1500),
        }
        .into_response();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "2");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
    }

    #[test]
    fn tenant_documents_become_policies() {
        use crewmesh_proto::config::v1::Document;
        let doc = |tenant: &str, name: &str, spec: &str| Document {
            tenant: tenant.into(),
            kind: Kind::Tenant as i32,
            name: name.into(),
            spec_json: spec.into(),
            ..Default::default()
        };
        let docs = [
            doc(
                "_global",
                "acme",
                r#"{"rpm": 60, "tpm": 1000, "budget_usd_month": 5.5}"#,
            ),
            // A tenant may not set its own limits.
            doc("globex", "globex", r#"{"rpm": 1000000}"#),
            doc("_global", "bad", r#"{"rpm": "many"}"#),
        ];
        let snap = Snapshot {
            revision: 1,
            documents: docs
                .into_iter()
                .map(|d| ((d.kind, d.tenant.clone(), d.name.clone()), d))
                .collect(),
        };
        let p = tenant_policies(&snap);
        assert_eq!(p.len(), 1);
        assert_eq!(
            p["acme"],
            TenantPolicy {
                rpm: Some(60),
                tpm: Some(1000),
                budget_usd_month: Some(5.5),
                ..Default::default()
            }
        );
    }

    #[test]
    fn months_start_at_midnight_on_the_first() {
        let t = time::macros::datetime!(2026-11-21 13:05:07 UTC);
        assert_eq!(
            month_start(t),
            time::macros::datetime!(2026-11-01 00:00:00 UTC)
        );
    }

    #[tokio::test]
    async fn replicas_count_each_other_share_limits_and_leave() {
        crewmesh_testkit::init_crypto();
        let etcd = crewmesh_testkit::etcd();
        let config = MembershipConfig {
            endpoints: vec![etcd.endpoint()],
            prefix: etcd.unique_prefix(),
            ttl: Duration::from_secs(3),
        };
        let (a, b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let ma = Membership::join(&config, "gateways", a.clone())
            .await
            .unwrap();
        assert_eq!(a.load(Ordering::Relaxed), 1);
        let mb = Membership::join(&config, "gateways", b.clone())
            .await
            .unwrap();
        assert_eq!(b.load(Ordering::Relaxed), 2);
        // `a` sees `b` at its next count.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while a.load(Ordering::Relaxed) != 2 {
            assert!(std::time::Instant::now() < deadline, "a never saw b");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Two replicas, each with its own limiter: together they admit the limit once.
        let policy = TenantPolicy {
            rpm: Some(10),
            ..Default::default()
        };
        let subject = Subject {
            tenant: "acme",
            key: "k1",
            tenant_policy: Some(&policy),
            key_rpm: None,
            key_tpm: None,
        };
        let now = std::time::Instant::now();
        let admitted: usize = [Limiter::new(a.clone()), Limiter::new(b.clone())]
            .iter()
            .map(|l| (0..20).filter(|_| l.admit(&subject, now).is_ok()).count())
            .sum();
        assert_eq!(admitted, 10);
        mb.leave().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while a.load(Ordering::Relaxed) != 1 {
            assert!(std::time::Instant::now() < deadline, "a never saw b leave");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ma.leave().await;
    }
}
