//! Executes runs in background tasks: one model call through the router, with a
//! checkpoint after every state change, so that a run interrupted by a crash or a
//! shutdown is resumed from the store by the next process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crewmesh_kit::clients::{AuditClient, MeshChannel, with_principal};
use crewmesh_proto::audit::v1 as audit;
use crewmesh_proto::router::v1 as router;
use crewmesh_proto::router::v1::router_service_client::RouterServiceClient;
use crewmesh_proto::types::v1::Outcome;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::error::{AgentRuntimeError, Result};
use crate::run::{Run, RunStatus, Step, StepKind, TokenUsage, now_micros};
use crate::store::RunStore;

/// How long one model call may take.
pub const MODEL_CALL_DEADLINE: Duration = Duration::from_secs(120);
/// Attempts at writing one checkpoint before the task gives up (the run then stays
/// as last checkpointed and resumes at the next start).
const CHECKPOINT_ATTEMPTS: u32 = 5;
/// The longest error message kept with a run or step.
const MAX_ERROR_BYTES: usize = 4096;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

/// Run metrics on the admin `/metrics` endpoint.
#[derive(Clone, Default)]
pub struct RunMetrics {
    finished: Family<StatusLabels, Counter>,
    resumed: Counter,
    in_flight: Gauge,
}

impl RunMetrics {
    pub fn register(registry: &crewmesh_kit::observe::MetricsRegistry) -> Self {
        let m = Self::default();
        registry.register(
            "agent_runs_finished",
            "Agent runs that reached a final status, by status",
            m.finished.clone(),
        );
        registry.register(
            "agent_runs_resumed",
            "Agent runs resumed at start-up after a previous process left them unfinished",
            m.resumed.clone(),
        );
        registry.register(
            "agent_runs_in_flight",
            "Agent runs executing in this process",
            m.in_flight.clone(),
        );
        m
    }
}

struct Tasks {
    set: JoinSet<()>,
    /// Set at shutdown: no new run starts executing.
    closed: bool,
}

/// Runs agent runs in the background.
pub struct Executor {
    store: Arc<dyn RunStore>,
    router: RouterServiceClient<MeshChannel>,
    audit: Option<AuditClient>,
    metrics: RunMetrics,
    tasks: Mutex<Tasks>,
}

/// What a successful model call gave.
struct ModelAnswer {
    content: String,
    usage: TokenUsage,
    cost_usd: f64,
}

impl Executor {
    pub fn new(
        store: Arc<dyn RunStore>,
        router: RouterServiceClient<MeshChannel>,
        audit: Option<AuditClient>,
        metrics: RunMetrics,
    ) -> Self {
        Self {
            store,
            router,
            audit,
            metrics,
            tasks: Mutex::new(Tasks {
                set: JoinSet::new(),
                closed: false,
            }),
        }
    }

    /// Starts executing `run` in the background. After shutdown began, the run is
    /// left as stored and resumes at the next start.
    pub fn launch(self: &Arc<Self>, run: Run) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if tasks.closed {
            tracing::info!(run_id = %run.id, "shutting down: the run resumes at the next start");
            return;
        }
        while let Some(done) = tasks.set.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "a run task ended abnormally");
            }
        }
        let me = self.clone();
        let span = tracing::info_span!("run", run_id = %run.id, tenant = %run.owner.tenant);
        tasks.set.spawn(
            async move {
                me.metrics.in_flight.inc();
                me.execute(run).await;
                me.metrics.in_flight.dec();
            }
            .instrument(span),
        );
    }

    /// Resumes runs a previous process left PENDING or RUNNING; returns how many.
    pub async fn resume_unfinished(self: &Arc<Self>) -> Result<usize> {
        let runs = self.store.unfinished_runs().await?;
        let n = runs.len();
        for run in runs {
            tracing::info!(run_id = %run.id, status = run.status.as_str(), "resuming run");
            self.metrics.resumed.inc();
            self.launch(run);
        }
        Ok(n)
    }

    /// Stops starting runs and waits up to `grace` for the executing ones. Runs still
    /// executing then are stopped between checkpoints: they stay as last stored and
    /// resume at the next start. Returns how many were stopped.
    pub async fn drain(&self, grace: Duration) -> usize {
        let mut set = {
            let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            tasks.closed = true;
            std::mem::take(&mut tasks.set)
        };
        let waited =
            tokio::time::timeout(grace, async { while set.join_next().await.is_some() {} }).await;
        if waited.is_ok() {
            return 0;
        }
        let stopped = set.len();
        set.shutdown().await;
        self.metrics.in_flight.set(0);
        tracing::warn!(
            runs = stopped,
            "grace period elapsed: unfinished runs stay in the store and resume at the next start"
        );
        stopped
    }

    async fn execute(&self, mut run: Run) {
        if let Err(e) = self.drive(&mut run).await {
            tracing::error!(
                error = %e,
                status = run.status.as_str(),
                "cannot checkpoint the run: it resumes from its last checkpoint at the next start"
            );
        }
    }

    /// Takes the run from its stored state to a final one.
    async fn drive(&self, run: &mut Run) -> Result<()> {
        if run.status.is_terminal() {
            return Ok(());
        }
        if run.status != RunStatus::Running {
            run.status = RunStatus::Running;
            run.updated_micros = now_micros();
            self.checkpoint(run).await?;
        }

        // A one-step agent: its only step is the model call. A resumed run redoes it.
        let started = now_micros();
        run.steps = vec![Step {
            index: 0,
            kind: StepKind::ModelCall,
            target: run.spec.model.clone(),
            output: String::new(),
            error: String::new(),
            started_micros: started,
            finished_micros: None,
        }];
        run.updated_micros = started;
        self.checkpoint(run).await?;

        let outcome = self.call_model(run).await;
        let finished = now_micros();
        let step = &mut run.steps[0];
        step.finished_micros = Some(finished);
        match outcome {
            Ok(answer) => {
                step.output = answer.content.clone();
                run.output = answer.content;
                run.usage = answer.usage;
                run.cost_usd = answer.cost_usd;
                run.error.clear();
                run.status = RunStatus::Succeeded;
            }
            Err(message) => {
                step.error = message.clone();
                run.error = message;
                run.status = RunStatus::Failed;
            }
        }
        run.updated_micros = finished;
        self.checkpoint(run).await?;
        self.metrics
            .finished
            .get_or_create(&StatusLabels {
                status: run.status.as_str(),
            })
            .inc();
        tracing::info!(status = run.status.as_str(), "run finished");
        self.record_finish(run);
        Ok(())
    }

    /// Persists the run, retrying transient database failures with backoff.
    async fn checkpoint(&self, run: &Run) -> Result<()> {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match self.store.checkpoint(run).await {
                Ok(()) => return Ok(()),
                Err(e @ AgentRuntimeError::RunVanished(_)) => return Err(e),
                Err(e) if attempt >= CHECKPOINT_ATTEMPTS => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "checkpoint failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
            }
        }
    }

    /// The model call, as the run's owner. Failures become the message the run shows.
    async fn call_model(&self, run: &Run) -> std::result::Result<ModelAnswer, String> {
        let mut messages = Vec::with_capacity(2);
        if !run.spec.system_prompt.is_empty() {
            messages.push(router::ChatMessage {
                role: router::Role::System as i32,
                content: Some(run.spec.system_prompt.clone()),
                ..Default::default()
            });
        }
        messages.push(router::ChatMessage {
            role: router::Role::User as i32,
            content: Some(run.input.clone()),
            ..Default::default()
        });
        let mut request = with_principal(
            router::CompleteRequest {
                model: run.spec.model.clone(),
                messages,
                agent: run.agent.clone(),
                run_id: run.id.to_string(),
                ..Default::default()
            },
            &run.owner,
        );
        request.set_timeout(MODEL_CALL_DEADLINE);
        let mut client = self.router.clone();
        let answer = match tokio::time::timeout(MODEL_CALL_DEADLINE, client.complete(request)).await
        {
            Err(_) => {
                return Err(format!(
                    "the model call did not finish within {} s",
                    MODEL_CALL_DEADLINE.as_secs()
                ));
            }
            Ok(Err(status)) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "model call failed");
                return Err(failure_message(&status));
            }
            Ok(Ok(answer)) => answer.into_inner(),
        };
        let Some(choice) = answer.choices.first() else {
            return Err("the model answered with no choices".to_owned());
        };
        let content = choice
            .message
            .as_ref()
            .and_then(|m| m.content.clone())
            .unwrap_or_default();
        let usage = answer.usage.unwrap_or_default();
        let cost = answer.call.map_or(0.0, |c| c.cost_usd);
        Ok(ModelAnswer {
            content: storable(content),
            usage: TokenUsage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
            },
            cost_usd: if cost.is_finite() && cost >= 0.0 {
                cost
            } else {
                0.0
            },
        })
    }

    fn record_finish(&self, run: &Run) {
        let Some(audit) = &self.audit else { return };
        let outcome = if run.status == RunStatus::Succeeded {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        let mut details = serde_json::json!({
            "agent": run.agent,
            "model": run.spec.model,
            "status": run.status.as_str(),
            "prompt_tokens": run.usage.prompt_tokens,
            "completion_tokens": run.usage.completion_tokens,
            "cost_usd": run.cost_usd,
        });
        if !run.error.is_empty() {
            details["error"] = serde_json::Value::String(run.error.clone());
        }
        audit.record(run_event(run, "agent.run.finish", outcome, details));
    }
}

/// An audit event about a run, acted by its owner.
pub fn run_event(
    run: &Run,
    action: &str,
    outcome: Outcome,
    details: serde_json::Value,
) -> audit::EventInput {
    audit::EventInput {
        tenant: run.owner.tenant.as_str().to_owned(),
        actor: Some(audit::Actor {
            subject: run.owner.subject.clone(),
            service: String::new(),
        }),
        action: action.to_owned(),
        resource: Some(audit::Resource {
            kind: "run".to_owned(),
            name: run.id.to_string(),
        }),
        outcome: outcome as i32,
        details_json: details.to_string(),
        ..Default::default()
    }
}

/// The message a failed model call leaves on the run: the status message the router
/// chose for callers (it never carries internal details), or the code's meaning.
fn failure_message(status: &tonic::Status) -> String {
    let message = status.message().trim();
    if message.is_empty() {
        format!("the model call failed: {}", status.code().description())
    } else {
        bounded(storable(message.to_owned()))
    }
}

/// Text as the store can keep it: no NUL characters (PostgreSQL refuses them) and
/// error messages of bounded length.
fn storable(mut s: String) -> String {
    if s.contains('\0') {
        s = s.replace('\0', "\u{FFFD}");
    }
    s
}

fn bounded(mut s: String) -> String {
    if s.len() > MAX_ERROR_BYTES {
        let mut cut = MAX_ERROR_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_messages_come_from_the_status() {
        assert_eq!(
            failure_message(&tonic::Status::not_found("unknown model `x`")),
            "unknown model `x`"
        );
        assert_eq!(
            failure_message(&tonic::Status::unavailable("")),
            "the model call failed: The service is currently unavailable"
        );
        assert_eq!(storable("a\0b".into()), "a\u{FFFD}b");
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = bounded(long);
        assert!(cut.len() <= MAX_ERROR_BYTES && cut.len() >= MAX_ERROR_BYTES - 1);
    }
}
