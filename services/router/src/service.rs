//! The `RouterService` gRPC implementation: plans the deployments to try (strategy,
//! fallback aliases), runs attempts with retries, breakers, limits and the caller's
//! deadline, serves cached answers, streams, and accounts every call.

use std::collections::HashSet;
use std::sync::Arc;
#[cfg(test)]
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use crewmesh_kit::clients::{AuditClient, UsageClient};
use crewmesh_kit::principal::{Principal, require_principal, take_principal};
use crewmesh_proto::audit::v1 as audit;
use crewmesh_proto::metrics::v1 as metrics;
use crewmesh_proto::router::v1 as pb;
use crewmesh_proto::types::v1::{Outcome, TokenUsage};
use futures::StreamExt;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::breaker::Breakers;
use crate::cache::ResponseCache;
use crate::catalog::{Catalog, Deployment, Model, Provider, RetrySpec};
use crate::error::RouterError;
use crate::limits::Limits;
use crate::provider::{AttemptTimeouts, ProviderClient, StreamItem, UpstreamError, UpstreamStream};
use crate::strategy::{self, Stats};

/// Where usage records and audit events go.
#[derive(Clone, Default)]
pub(crate) struct Recorder {
    pub usage: Option<UsageClient>,
    pub audit: Option<AuditClient>,
    /// Test capture of what would be sent.
    #[cfg(test)]
    pub captured: Option<Arc<Mutex<Captured>>>,
}

#[cfg(test)]
#[derive(Default, Debug)]
pub(crate) struct Captured {
    pub usage: Vec<metrics::UsageRecord>,
    pub audit: Vec<audit::EventInput>,
}

impl Recorder {
    pub fn new(usage: Option<UsageClient>, audit: Option<AuditClient>) -> Self {
        Self {
            usage,
            audit,
            #[cfg(test)]
            captured: None,
        }
    }

    fn usage(&self, rec: metrics::UsageRecord) {
        #[cfg(test)]
        if let Some(c) = &self.captured {
            c.lock()
                .unwrap_or_else(|p| p.into_inner())
                .usage
                .push(rec.clone());
        }
        if let Some(u) = &self.usage {
            u.record(rec);
        }
    }

    fn audit(&self, ev: audit::EventInput) {
        #[cfg(test)]
        if let Some(c) = &self.captured {
            c.lock()
                .unwrap_or_else(|p| p.into_inner())
                .audit
                .push(ev.clone());
        }
        if let Some(a) = &self.audit {
            a.record(ev);
        }
    }
}

/// Everything a call needs; shared with stream forwarding tasks.
pub(crate) struct Core {
    pub catalog: Arc<ArcSwap<Catalog>>,
    pub provider: ProviderClient,
    pub recorder: Recorder,
    pub breakers: Arc<Breakers>,
    pub stats: Arc<Stats>,
    pub cache: Arc<ResponseCache>,
    pub limits: Arc<Limits>,
}

#[derive(Clone)]
pub struct RouterService {
    pub(crate) core: Arc<Core>,
}

/// Limits on what a caller may send.
const MAX_MESSAGES: usize = 4096;
const MAX_FALLBACK_MODELS: usize = 8;

fn validate(req: &pb::CompleteRequest) -> Result<(), RouterError> {
    if req.model.is_empty() {
        return Err(RouterError::InvalidRequest("model is required".into()));
    }
    if req.messages.is_empty() {
        return Err(RouterError::InvalidRequest(
            "messages must not be empty".into(),
        ));
    }
    if req.messages.len() > MAX_MESSAGES {
        return Err(RouterError::InvalidRequest(format!(
            "at most {MAX_MESSAGES} messages"
        )));
    }
    for (i, m) in req.messages.iter().enumerate() {
        if pb::Role::try_from(m.role).is_err() || m.role == pb::Role::Unspecified as i32 {
            return Err(RouterError::InvalidRequest(format!(
                "messages[{i}].role is not set"
            )));
        }
    }
    if let Some(r) = &req.routing {
        if r.fallback_models.len() > MAX_FALLBACK_MODELS {
            return Err(RouterError::InvalidRequest(format!(
                "routing.fallback_models: at most {MAX_FALLBACK_MODELS} aliases"
            )));
        }
        if pb::CacheMode::try_from(r.cache).is_err() {
            return Err(RouterError::InvalidRequest(
                "routing.cache: unknown cache mode".into(),
            ));
        }
    }
    Ok(())
}

/// The caller's deadline from the `grpc-timeout` header.
pub(crate) fn deadline_of(md: &tonic::metadata::MetadataMap) -> Option<Instant> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(d)
}

/// Rough token count of the prompt (characters / 4 plus one per message), used for
/// limits before the call and for usage when a stream broke before reporting it.
pub(crate) fn estimate_prompt_tokens(req: &pb::CompleteRequest) -> u64 {
    let chars: usize = req
        .messages
        .iter()
        .map(|m| {
            m.content.as_deref().map_or(0, str::len)
                + m.tool_calls
                    .iter()
                    .map(|c| c.name.len() + c.arguments_json.len())
                    .sum::<usize>()
        })
        .sum();
    (chars as u64).div_ceil(4) + req.messages.len() as u64
}

/// The wait before retry number `attempt` (0-based): full jitter, a uniform draw in
/// `0..=min(max, base * 2^attempt)`, and never less than the upstream's `Retry-After`.
pub(crate) fn backoff<R: Rng + ?Sized>(
    spec: &RetrySpec,
    attempt: u32,
    retry_after: Option<Duration>,
    rng: &mut R,
) -> Duration {
    let cap = spec
        .base_ms
        .saturating_mul(1u64 << attempt.min(30))
        .min(spec.max_ms);
    let jitter = Duration::from_millis(rng.random_range(0..=cap));
    jitter.max(retry_after.unwrap_or(Duration::ZERO))
}

/// One deployment to try.
#[derive(Clone)]
pub(crate) struct Candidate {
    pub model: Arc<Model>,
    pub index: usize,
}

impl Candidate {
    pub fn dep(&self) -> &Deployment {
        &self.model.deployments[self.index]
    }
}

/// What happened on the way to an answer.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    pub retries: u32,
    pub fallbacks: u32,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64
}

/// The `details_json` of a model call's audit event, serialised straight from borrowed
/// fields (alphabetical order, absent fields left out).
#[derive(Default, serde::Serialize)]
struct CallDetails<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_hit: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cost_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deployment: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fallbacks: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    simulated: Option<bool>,
}

impl Core {
    /// The deployments to try, in order: the alias's (by its strategy), then those of
    /// each fallback alias. The request's `fallback_models` replace the configured ones
    /// and must each be visible to the tenant.
    fn plan(&self, tenant: &str, req: &pb::CompleteRequest) -> Result<Vec<Candidate>, RouterError> {
        let catalog = self.catalog.load();
        let primary = catalog
            .select(tenant, &req.model, &req.user)
            .map(|s| s.model)
            .ok_or_else(|| RouterError::UnknownModel(req.model.clone()))?;
        let routing = req.routing.clone().unwrap_or_default();
        let mut models = vec![primary.clone()];
        if routing.fallback_models.is_empty() {
            for alias in &primary.fallback_models {
                match catalog.select(tenant, alias, &req.user).map(|s| s.model) {
                    Some(m) => models.push(m),
                    None => {
                        tracing::warn!(model = %primary.alias, fallback = %alias, "fallback alias is not configured for the tenant")
                    }
                }
            }
        } else {
            for alias in &routing.fallback_models {
                let m = catalog
                    .select(tenant, alias, &req.user)
                    .map(|s| s.model)
                    .ok_or_else(|| RouterError::UnknownModel(alias.clone()))?;
                models.push(m);
            }
        }
        let mut seen = HashSet::new();
        let mut rng = rand::rng();
        let mut plan = Vec::new();
        for m in models {
            if !seen.insert(m.alias.clone()) {
                continue;
            }
            for index in strategy::order(&m, &self.stats, routing.quality_tier, &mut rng) {
                plan.push(Candidate {
                    model: m.clone(),
                    index,
                });
            }
        }
        if plan.is_empty() {
            return Err(RouterError::NoEligibleDeployment {
                model: req.model.clone(),
                quality_tier: routing.quality_tier,
            });
        }
        Ok(plan)
    }

    /// Tries the plan in order: each deployment whose breaker and limits admit the call
    /// gets up to `1 + retry.max_retries` attempts (retryable failures only, with
    /// backoff, inside the deadline), then the next deployment is a fallback.
    async fn attempt_loop<T, F, Fut>(
        &self,
        plan: &[Candidate],
        deadline: Option<Instant>,
        estimated_tokens: u64,
        mut attempt: F,
    ) -> Result<(T, Candidate, Tally), (RouterError, Tally)>
    where
        F: FnMut(Arc<Provider>, Candidate, AttemptTimeouts) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let mut tally = Tally::default();
        let mut tried_any = false;
        let mut last: Option<RouterError> = None;
        for cand in plan {
            let dep = cand.dep();
            let provider = match &dep.provider {
                Ok(p) => p.clone(),
                Err(name) => {
                    last = Some(RouterError::UnknownProvider {
                        deployment: dep.name.clone(),
                        provider: name.clone(),
                    });
                    continue;
                }
            };
            if dep.context_window > 0 && estimated_tokens > dep.context_window {
                tracing::debug!(deployment = %dep.key, "prompt too long for the deployment's context window; skipping");
                last = Some(RouterError::ContextTooLong {
                    deployment: dep.name.clone(),
                    context_window: dep.context_window,
                    estimated: estimated_tokens,
                });
                continue;
            }
            if !self.breakers.allow(&dep.key, Instant::now()) {
                tracing::debug!(deployment = %dep.key, "breaker open; skipping");
                last.get_or_insert(RouterError::BreakerOpen(dep.name.clone()));
                continue;
            }
            if let Err(wait) = self.limits.acquire(dep, estimated_tokens) {
                self.breakers.release(&dep.key);
                tracing::debug!(deployment = %dep.key, "deployment at its rate limit; skipping");
                last = Some(RouterError::DeploymentLimited {
                    deployment: dep.name.clone(),
                    retry_after: wait,
                });
                continue;
            }
            if tried_any {
                tally.fallbacks += 1;
            }
            tried_any = true;
            let mut n = 0u32;
            loop {
                let remaining = match deadline {
                    Some(d) => {
                        let r = d.saturating_duration_since(Instant::now());
                        if r.is_zero() {
                            self.breakers.release(&dep.key);
                            return Err((RouterError::DeadlineExceeded, tally));
                        }
                        Some(r)
                    }
                    None => None,
                };
                let t = self.provider.defaults.for_attempt(&provider, remaining);
                let started = Instant::now();
                match attempt(provider.clone(), cand.clone(), t).await {
                    Ok(v) => {
                        self.breakers
                            .record(&dep.key, &cand.model.breaker, true, Instant::now());
                        self.stats.record(&dep.key, true, started.elapsed());
                        return Ok((v, cand.clone(), tally));
                    }
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(deployment = %dep.key, error = %e, attempt = n, "upstream attempt failed");
                        self.breakers
                            .record(&dep.key, &cand.model.breaker, false, Instant::now());
                        self.stats.record(&dep.key, false, started.elapsed());
                        let retry_after = e.retry_after();
                        let rate_limited = matches!(e, UpstreamError::Status { status: 429, .. });
                        last = Some(if rate_limited {
                            RouterError::UpstreamRateLimited(e.to_string())
                        } else {
                            RouterError::AllDeploymentsFailed {
                                model: plan[0].model.alias.clone(),
                                last: e.to_string(),
                            }
                        });
                        if n >= cand.model.retry.max_retries {
                            break;
                        }
                        let wait = backoff(&cand.model.retry, n, retry_after, &mut rand::rng());
                        if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                            break;
                        }
                        tokio::time::sleep(wait).await;
                        if !self.breakers.allow(&dep.key, Instant::now()) {
                            break;
                        }
                        n += 1;
                        tally.retries += 1;
                    }
                    Err(e) => {
                        self.breakers.release(&dep.key);
                        let err = match e {
                            UpstreamError::Unsupported(kind) => {
                                RouterError::UnsupportedProvider(kind)
                            }
                            UpstreamError::Status {
                                status, message, ..
                            } => RouterError::UpstreamRejected { status, message },
                            other => RouterError::AllDeploymentsFailed {
                                model: plan[0].model.alias.clone(),
                                last: other.to_string(),
                            },
                        };
                        return Err((err, tally));
                    }
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err((RouterError::DeadlineExceeded, tally));
        }
        Err((
            last.unwrap_or_else(|| RouterError::AllDeploymentsFailed {
                model: plan[0].model.alias.clone(),
                last: "no deployment could be tried".into(),
            }),
            tally,
        ))
    }

    fn call_info(
        cand: &Candidate,
        tally: Tally,
        usage: &TokenUsage,
        latency: Duration,
        ttft: Duration,
    ) -> pb::CallInfo {
        let dep = cand.dep();
        let provider = dep.provider.as_ref().ok();
        pb::CallInfo {
            deployment: dep.name.clone(),
            provider: provider.map(|p| p.name.clone()).unwrap_or_default(),
            upstream_model: dep.upstream_model.clone(),
            retries: tally.retries,
            fallbacks: tally.fallbacks,
            cache_hit: false,
            cost_usd: dep.cost(usage.prompt_tokens, usage.completion_tokens),
            latency_ms: latency.as_secs_f64() * 1000.0,
            time_to_first_token_ms: ttft.as_secs_f64() * 1000.0,
            simulated: provider.is_some_and(|p| p.kind == "simulated"),
        }
    }

    /// Records usage (when a deployment was reached) and an audit event, both batched
    /// and off the request path.
    #[allow(clippy::too_many_arguments)]
    fn account(
        &self,
        principal: &Principal,
        req: &pb::CompleteRequest,
        request_id: &str,
        action: &str,
        usage: Option<(&TokenUsage, &pb::CallInfo)>,
        error: Option<&str>,
    ) {
        let outcome = if error.is_none() {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        if let Some((usage, call)) = usage {
            self.recorder.usage(metrics::UsageRecord {
                tenant: principal.tenant.to_string(),
                subject: principal.subject.clone(),
                model: req.model.clone(),
                deployment: call.deployment.clone(),
                provider: call.provider.clone(),
                agent: req.agent.clone(),
                run_id: req.run_id.clone(),
                usage: Some(*usage),
                cost_usd: call.cost_usd,
                latency_ms: call.latency_ms,
                time_to_first_token_ms: call.time_to_first_token_ms,
                cache_hit: call.cache_hit,
                retries: call.retries,
                fallbacks: call.fallbacks,
                outcome: outcome as i32,
                request_id: request_id.to_owned(),
                simulated: call.simulated,
                ..Default::default()
            });
        }
        let details = match usage {
            Some((usage, call)) => CallDetails {
                cache_hit: Some(call.cache_hit),
                completion_tokens: Some(usage.completion_tokens),
                cost_usd: Some(call.cost_usd),
                deployment: Some(&call.deployment),
                error,
                fallbacks: Some(call.fallbacks),
                latency_ms: Some(call.latency_ms),
                prompt_tokens: Some(usage.prompt_tokens),
                provider: Some(&call.provider),
                retries: Some(call.retries),
                simulated: Some(call.simulated),
            },
            None => CallDetails {
                error,
                ..CallDetails::default()
            },
        };
        self.recorder.audit(audit::EventInput {
            tenant: principal.tenant.to_string(),
            actor: Some(audit::Actor {
                subject: principal.subject.clone(),
                service: String::new(),
            }),
            action: action.into(),
            resource: Some(audit::Resource {
                kind: "model".into(),
                name: req.model.clone(),
            }),
            outcome: outcome as i32,
            request_id: request_id.to_owned(),
            details_json: crewmesh_kit::clients::details_json(&details),
            ..Default::default()
        });
    }

    async fn complete(
        &self,
        principal: &Principal,
        req: &pb::CompleteRequest,
        request_id: &str,
        deadline: Option<Instant>,
    ) -> Result<pb::CompleteResponse, RouterError> {
        let plan = self.plan(principal.tenant.as_str(), req)?;
        let cache_ttl = self.cache.ttl_for(&plan[0].model, req);
        let cache_key = cache_ttl.map(|_| ResponseCache::key(principal.tenant.as_str(), req));
        if let Some(key) = &cache_key
            && let Some(mut resp) = self.cache.get(key, Instant::now())
        {
            let usage = resp.usage.unwrap_or_default();
            if let Some(call) = resp.call.as_mut() {
                call.cache_hit = true;
                call.retries = 0;
                call.fallbacks = 0;
                call.cost_usd = 0.0;
                call.latency_ms = 0.0;
                call.time_to_first_token_ms = 0.0;
            }
            let call = resp.call.clone().unwrap_or_default();
            self.account(
                principal,
                req,
                request_id,
                "model.complete",
                Some((&usage, &call)),
                None,
            );
            resp.request_id = request_id.to_owned();
            return Ok(resp);
        }
        let estimate = estimate_prompt_tokens(req) + u64::from(req.max_tokens.unwrap_or(256));
        let result = self
            .attempt_loop(&plan, deadline, estimate, |provider, cand, t| async move {
                self.provider
                    .complete(&provider, &cand.dep().upstream_model, req, t)
                    .await
            })
            .await;
        match result {
            Ok((answer, cand, tally)) => {
                let usage = answer.response.usage.unwrap_or_default();
                self.limits
                    .reconcile(cand.dep(), estimate, usage.total_tokens);
                let call = Self::call_info(&cand, tally, &usage, answer.latency, answer.latency);
                self.account(
                    principal,
                    req,
                    request_id,
                    "model.complete",
                    Some((&usage, &call)),
                    None,
                );
                let mut resp = answer.response;
                resp.model = cand.model.alias.clone();
                if resp.created == 0 {
                    resp.created = now_secs();
                }
                resp.call = Some(call);
                resp.request_id = request_id.to_owned();
                if let (Some(key), Some(ttl)) = (cache_key, cache_ttl) {
                    self.cache.put(key, resp.clone(), ttl, Instant::now());
                }
                Ok(resp)
            }
            Err((err, _tally)) => {
                self.account(
                    principal,
                    req,
                    request_id,
                    "model.complete",
                    None,
                    Some(&err.to_string()),
                );
                Err(err)
            }
        }
    }
}

type StreamTx = mpsc::Sender<Result<pb::StreamCompleteResponse, Status>>;

/// Forwards an upstream stream whose first event arrived; ends with `StreamEnd`, or
/// with `StreamError` and the usage consumed when the upstream fails or closes early.
#[allow(clippy::too_many_arguments)]
async fn forward(
    core: Arc<Core>,
    principal: Principal,
    req: pb::CompleteRequest,
    request_id: String,
    cand: Candidate,
    tally: Tally,
    first: StreamItem,
    mut upstream: UpstreamStream,
    estimate: u64,
    tx: StreamTx,
) {
    let id = format!("chatcmpl-{}", request_id.replace('-', ""));
    let model = cand.model.alias.clone();
    let created = now_secs();
    let msg = |event| pb::StreamCompleteResponse {
        id: id.clone(),
        model: model.clone(),
        created,
        event: Some(event),
    };
    let mut completion_chars = 0usize;
    let mut reported: Option<TokenUsage> = None;
    let mut next = Some(first);
    let failure: String = loop {
        let item = match next.take() {
            Some(i) => Ok(Some(i)),
            None => upstream.next().await,
        };
        match item {
            Ok(Some(StreamItem::Deltas(deltas))) => {
                for d in deltas {
                    completion_chars += d.content.as_deref().map_or(0, str::len)
                        + d.tool_calls
                            .iter()
                            .map(|t| t.name.len() + t.arguments_json.len())
                            .sum::<usize>();
                    if tx
                        .send(Ok(msg(pb::stream_complete_response::Event::Delta(d))))
                        .await
                        .is_err()
                    {
                        break_client_gone(
                            &core,
                            &principal,
                            &req,
                            &request_id,
                            &cand,
                            tally,
                            &upstream,
                            reported,
                            completion_chars,
                            estimate,
                        );
                        return;
                    }
                }
            }
            Ok(Some(StreamItem::Usage(u))) => reported = Some(u),
            Ok(Some(StreamItem::Done)) => break String::new(),
            Ok(None) => {
                break "the upstream closed the stream before it was complete".to_owned();
            }
            Err(e) => break format!("the upstream stream failed: {e}"),
        }
    };
    let usage = consumed(&req, reported, completion_chars);
    core.limits
        .reconcile(cand.dep(), estimate, usage.total_tokens);
    let call = Core::call_info(
        &cand,
        tally,
        &usage,
        upstream.started.elapsed(),
        upstream.time_to_first_event,
    );
    if failure.is_empty() {
        core.account(
            &principal,
            &req,
            &request_id,
            "model.stream",
            Some((&usage, &call)),
            None,
        );
        let _ = tx
            .send(Ok(msg(pb::stream_complete_response::Event::End(
                pb::StreamEnd {
                    usage: Some(usage),
                    call: Some(call),
                },
            ))))
            .await;
    } else {
        tracing::warn!(deployment = %cand.dep().key, error = %failure, "stream failed after it started");
        core.breakers
            .record(&cand.dep().key, &cand.model.breaker, false, Instant::now());
        core.account(
            &principal,
            &req,
            &request_id,
            "model.stream",
            Some((&usage, &call)),
            Some(&failure),
        );
        let _ = tx
            .send(Ok(msg(pb::stream_complete_response::Event::Error(
                pb::StreamError {
                    code: "UNAVAILABLE".into(),
                    message: failure,
                    usage: Some(usage),
                },
            ))))
            .await;
    }
}

/// The caller went away mid-stream: account what was consumed.
#[allow(clippy::too_many_arguments)]
fn break_client_gone(
    core: &Core,
    principal: &Principal,
    req: &pb::CompleteRequest,
    request_id: &str,
    cand: &Candidate,
    tally: Tally,
    upstream: &UpstreamStream,
    reported: Option<TokenUsage>,
    completion_chars: usize,
    estimate: u64,
) {
    let usage = consumed(req, reported, completion_chars);
    core.limits
        .reconcile(cand.dep(), estimate, usage.total_tokens);
    let call = Core::call_info(
        cand,
        tally,
        &usage,
        upstream.started.elapsed(),
        upstream.time_to_first_event,
    );
    core.account(
        principal,
        req,
        request_id,
        "model.stream",
        Some((&usage, &call)),
        Some("the caller cancelled the stream"),
    );
}

/// The usage the upstream reported, or an estimate from what was streamed.
fn consumed(
    req: &pb::CompleteRequest,
    reported: Option<TokenUsage>,
    completion_chars: usize,
) -> TokenUsage {
    reported.unwrap_or_else(|| {
        let prompt = estimate_prompt_tokens(req);
        let completion = (completion_chars as u64).div_ceil(4);
        TokenUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    })
}

fn request_id_of(req: &pb::CompleteRequest) -> String {
    if req.request_id.is_empty() {
        uuid::Uuid::now_v7().to_string()
    } else {
        req.request_id.clone()
    }
}

#[tonic::async_trait]
impl pb::router_service_server::RouterService for RouterService {
    // No span of its own: the server's per-call span (`rpc`, with the trace id) covers
    // it, and every log line below names the deployment (`<tenant>/<alias>/<name>`).
    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let (metadata, mut extensions, req) = request.into_parts();
        let principal = take_principal(&mut extensions)?;
        let deadline = deadline_of(&metadata);
        validate(&req)?;
        let request_id = request_id_of(&req);
        let resp = self
            .core
            .complete(&principal, &req, &request_id, deadline)
            .await?;
        Ok(Response::new(resp))
    }

    type StreamCompleteStream =
        futures::stream::BoxStream<'static, Result<pb::StreamCompleteResponse, Status>>;

    async fn stream_complete(
        &self,
        request: Request<pb::StreamCompleteRequest>,
    ) -> Result<Response<Self::StreamCompleteStream>, Status> {
        let (metadata, mut extensions, req) = request.into_parts();
        let principal = take_principal(&mut extensions)?;
        let deadline = deadline_of(&metadata);
        let req = req
            .request
            .ok_or_else(|| RouterError::InvalidRequest("request is required".into()))?;
        validate(&req)?;
        let request_id = request_id_of(&req);
        let core = &self.core;
        let plan = match core.plan(principal.tenant.as_str(), &req) {
            Ok(p) => p,
            Err(e) => {
                core.account(
                    &principal,
                    &req,
                    &request_id,
                    "model.stream",
                    None,
                    Some(&e.to_string()),
                );
                return Err(e.into());
            }
        };
        let estimate = estimate_prompt_tokens(&req) + u64::from(req.max_tokens.unwrap_or(256));
        let result = core
            .attempt_loop(&plan, deadline, estimate, |provider, cand, t| {
                let req = &req;
                async move {
                    core.provider
                        .open_stream(&provider, &cand.dep().upstream_model, req, t)
                        .await
                }
            })
            .await;
        match result {
            Ok(((first, upstream), cand, tally)) => {
                let (tx, rx) = mpsc::channel(64);
                tokio::spawn(forward(
                    self.core.clone(),
                    principal,
                    req,
                    request_id,
                    cand,
                    tally,
                    first,
                    upstream,
                    estimate,
                    tx,
                ));
                Ok(Response::new(ReceiverStream::new(rx).boxed()))
            }
            Err((err, _)) => {
                core.account(
                    &principal,
                    &req,
                    &request_id,
                    "model.stream",
                    None,
                    Some(&err.to_string()),
                );
                Err(err.into())
            }
        }
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let principal = require_principal(&request)?;
        let catalog = self.core.catalog.load();
        let now = Instant::now();
        let models = catalog
            .visible(principal.tenant.as_str())
            .iter()
            .map(|m| pb::ModelInfo {
                id: m.alias.clone(),
                owned_by: m.owned_by.clone(),
                deployments: m
                    .deployments
                    .iter()
                    .map(|d| pb::DeploymentInfo {
                        name: d.name.clone(),
                        provider: d
                            .provider
                            .as_ref()
                            .map(|p| p.name.clone())
                            .unwrap_or_else(|n| n.clone()),
                        upstream_model: d.upstream_model.clone(),
                        breaker: self.core.breakers.state(&d.key, now) as i32,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}
