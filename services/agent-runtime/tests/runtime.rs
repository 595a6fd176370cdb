//! The agent runtime end to end: the real service on SQLite over real mTLS, called as
//! the gateway with a principal, executing runs through a router test double.

mod support;

use std::sync::atomic::Ordering;

use crewmesh_agent_runtime::run::{AgentSpec, Run, RunStatus, Step, StepKind};
use crewmesh_agent_runtime::store::{self, Created, SqliteRunStore};
use crewmesh_kit::clients::with_principal;
use crewmesh_kit::settings::DatabaseConfig;
use crewmesh_proto::agent::v1 as agent;
use crewmesh_proto::router::v1::Role as MsgRole;
use crewmesh_proto::types::v1::Outcome;
use support::*;
use tonic::Code;

const SUCCEEDED: i32 = agent::RunStatus::Succeeded as i32;
const FAILED: i32 = agent::RunStatus::Failed as i32;
const PENDING: i32 = agent::RunStatus::Pending as i32;

fn agents() -> Vec<((&'static str, &'static str), &'static str)> {
    vec![
        (
            ("acme", "support"),
            r#"{"model":"tenant-model","system_prompt":"answer as acme support","description":"x"}"#,
        ),
        (("_global", "shared"), r#"{"model":"global-model"}"#),
        (("_global", "support"), r#"{"model":"should-not-be-used"}"#),
        (("acme", "toolsmith"), r#"{"model":"m","tools":["search"]}"#),
    ]
}

async fn count_runs(url: &str) -> i64 {
    let store = SqliteRunStore::connect(&DatabaseConfig {
        url: url.to_owned(),
        password_file: None,
        max_connections: 1,
    })
    .await
    .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM runs")
        .fetch_one(store.pool())
        .await
        .unwrap();
    store.pool().close().await;
    n
}

#[tokio::test]
async fn inline_run_succeeds_through_the_router_as_its_owner() {
    let mesh = start_doubles(&agents()).await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::start(mesh.runtime_config(&sqlite_url(&dir), true)).await;
    let mut client = mesh.client("gateway", runtime.addr);
    let alice = principal("acme", "key:alice");

    let started = start_run(
        &mut client,
        &alice,
        inline("echo-model", "be brief", "hello"),
    )
    .await
    .unwrap();
    assert_eq!(started.status, PENDING);
    assert_eq!(started.agent, "");
    assert_eq!(started.input, "hello");
    assert_eq!(started.output, "");

    let run = wait_until_finished(&mut client, &alice, &started.id).await;
    assert_eq!(run.status, SUCCEEDED, "{run:?}");
    assert_eq!(run.id, started.id);
    assert_eq!(run.output, "echo: hello");
    assert_eq!(run.error, "");
    let usage = run.usage.unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (3, 2, 5)
    );
    assert_eq!(run.cost_usd, 0.25);
    assert_eq!(run.steps.len(), 1);
    let step = &run.steps[0];
    assert_eq!(step.index, 0);
    assert_eq!(step.kind, agent::StepKind::ModelCall as i32);
    assert_eq!(step.target, "echo-model");
    assert_eq!(step.output, "echo: hello");
    assert_eq!(step.error, "");
    assert!(step.started_at.is_some() && step.finished_at.is_some());
    assert!(run.updated_at.unwrap().seconds >= run.created_at.unwrap().seconds);

    // The router saw one call, from the runtime, on behalf of the run's owner.
    let calls = mesh.router.calls_for(&run.id);
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert_eq!(call.caller, "agent-runtime");
    assert_eq!(call.principal.as_ref(), Some(&alice));
    assert_eq!(call.model, "echo-model");
    assert_eq!(call.agent, "");
    assert_eq!(
        call.messages,
        vec![
            (MsgRole::System, "be brief".to_owned()),
            (MsgRole::User, "hello".to_owned())
        ]
    );
    assert!(call.grpc_timeout.is_some(), "the call carries a deadline");

    // Start and finish are audited for the owner.
    wait_for("two audit events", || {
        mesh.audit.events_for(&run.id).len() == 2
    })
    .await;
    let events = mesh.audit.events_for(&run.id);
    let actions: Vec<_> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, vec!["agent.run.start", "agent.run.finish"]);
    for e in &events {
        assert_eq!(e.tenant, "acme");
        assert_eq!(e.actor.as_ref().unwrap().subject, "key:alice");
        assert_eq!(
            e.actor.as_ref().unwrap().service,
            "spiffe://crewmesh.local/agent-runtime"
        );
        assert_eq!(e.resource.as_ref().unwrap().kind, "run");
        assert_eq!(e.outcome, Outcome::Success as i32);
        assert!(
            !e.details_json.contains("hello"),
            "input stays out of audit"
        );
    }

    runtime.stop().await;
}

#[tokio::test]
async fn failed_model_call_fails_the_run_with_the_router_message() {
    let mesh = start_doubles(&agents()).await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::start(mesh.runtime_config(&sqlite_url(&dir), true)).await;
    let mut client = mesh.client("gateway", runtime.addr);
    let alice = principal("acme", "key:alice");

    let started = start_run(&mut client, &alice, inline("missing", "", "hi"))
        .await
        .unwrap();
    let run = wait_until_finished(&mut client, &alice, &started.id).await;
    assert_eq!(run.status, FAILED, "{run:?}");
    assert_eq!(run.error, "unknown model `missing`");
    assert_eq!(run.output, "");
    assert_eq!(run.steps.len(), 1);
    assert_eq!(run.steps[0].error, "unknown model `missing`");
    assert!(run.steps[0].finished_at.is_some());
    // No system prompt: only the user message was sent.
    assert_eq!(
        mesh.router.calls_for(&run.id)[0].messages,
        vec![(MsgRole::User, "hi".to_owned())]
    );

    wait_for("the finish event", || {
        mesh.audit.events_for(&run.id).len() == 2
    })
    .await;
    let finish = mesh
        .audit
        .events_for(&run.id)
        .into_iter()
        .find(|e| e.action == "agent.run.finish")
        .unwrap();
    assert_eq!(finish.outcome, Outcome::Failure as i32);

    runtime.stop().await;
}

#[tokio::test]
async fn named_agents_resolve_from_the_tenant_then_global_documents() {
    let mesh = start_doubles(&agents()).await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::start(mesh.runtime_config(&sqlite_url(&dir), true)).await;
    let mut client = mesh.client("gateway", runtime.addr);
    let alice = principal("acme", "key:alice");
    let bob = principal("globex", "key:bob");

    // The tenant's own document wins over the global one of the same name.
    let started = start_run(&mut client, &alice, named("support", "where is my order"))
        .await
        .unwrap();
    assert_eq!(started.agent, "support");
    let run = wait_until_finished(&mut client, &alice, &started.id).await;
    assert_eq!(run.status, SUCCEEDED, "{run:?}");
    assert_eq!(run.output, "echo: where is my order");
    assert_eq!(run.steps[0].target, "tenant-model");
    let call = &mesh.router.calls_for(&run.id)[0];
    assert_eq!(call.model, "tenant-model");
    assert_eq!(call.agent, "support");
    assert_eq!(call.run_id, run.id);
    assert_eq!(
        call.messages,
        vec![
            (MsgRole::System, "answer as acme support".to_owned()),
            (MsgRole::User, "where is my order".to_owned())
        ]
    );

    // A name only the global scope has.
    let started = start_run(&mut client, &bob, named("shared", "hi"))
        .await
        .unwrap();
    let run = wait_until_finished(&mut client, &bob, &started.id).await;
    assert_eq!(run.status, SUCCEEDED, "{run:?}");
    assert_eq!(mesh.router.calls_for(&run.id)[0].model, "global-model");
    assert_eq!(
        mesh.router.calls_for(&run.id)[0].principal.as_ref(),
        Some(&bob)
    );

    // Another tenant's document is invisible; globex falls back to the global one.
    let started = start_run(&mut client, &bob, named("support", "hi"))
        .await
        .unwrap();
    let run = wait_until_finished(&mut client, &bob, &started.id).await;
    assert_eq!(
        mesh.router.calls_for(&run.id)[0].model,
        "should-not-be-used"
    );

    // Unknown names, and documents this runtime cannot run.
    let err = start_run(&mut client, &alice, named("nope", "hi"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "agent `nope` not found");
    let err = start_run(&mut client, &alice, named("toolsmith", "hi"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "agent `toolsmith`: tools are not supported yet"
    );

    // The lookups came from the runtime, for the caller's tenant, tenant scope first.
    let gets = mesh.config.gets.lock().unwrap().clone();
    assert!(gets.iter().all(|g| g.caller == "agent-runtime"), "{gets:?}");
    let nope: Vec<_> = gets.iter().filter(|g| g.name == "nope").collect();
    assert_eq!(nope.len(), 2, "{nope:?}");
    assert_eq!(nope[0].scope, crewmesh_proto::config::v1::Scope::Tenant);
    assert_eq!(nope[0].tenant.as_deref(), Some("acme"));
    assert_eq!(nope[1].scope, crewmesh_proto::config::v1::Scope::Global);

    runtime.stop().await;
}

#[tokio::test]
async fn named_agents_without_a_config_service_are_a_failed_precondition() {
    let mesh = start_doubles(&agents()).await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::start(mesh.runtime_config(&sqlite_url(&dir), false)).await;
    let mut client = mesh.client("gateway", runtime.addr);
    let alice = principal("acme", "key:alice");

    let err = start_run(&mut client, &alice, named("support", "hi"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().starts_with("no config service configured"),
        "{}",
        err.message()
    );
    // Inline agents still run.
    let started = start_run(&mut client, &alice, inline("m", "", "hi"))
        .await
        .unwrap();
    let run = wait_until_finished(&mut client, &alice, &started.id).await;
    assert_eq!(run.status, SUCCEEDED);
    runtime.stop().await;
}

#[tokio::test]
async fn runs_are_invisible_to_other_tenants() {
    let mesh = start_doubles(&agents()).await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::start(mesh.runtime_config(&sqlite_url(&dir), true)).await;
    let mut client = mesh.client("gateway", runtime.addr);
    let alice = principal("acme", "key:alice");
    let mallory = principal("evil", "key:mallory");

    let started = start_run(&mut client, &alice, inline("m", "", "private"))
        .await
        .unwrap();
    let err = get_run(&mut client, &mallory, &started.id)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), format!("run `{}` not found", started.id));

    // Another subject of the same tenant sees it.
    let colleague = principal("acme", "key:carol");
    let run = wait_until_finished(&mut client, &colleague, &started.id).await;
    assert_eq!(run.output, "echo: private");
    runtime.stop().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_first_run() {
    let mesh = start_doubles(&agents()).await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::start(mesh.runtime_config(&sqlite_url(&dir), true)).await;
    let mut client = mesh.client("gateway", runtime.addr);
    let alice = principal("acme", "key:alice");
    let bob = principal("globex", "key:bob");

    let mut req = inline("m", "", "once");
    req.idempotency_key = "order-42".into();
    let first = start_run(&mut client, &alice, req.clone()).await.unwrap();
    let done = wait_until_finished(&mut client, &alice, &first.id).await;
    let again = start_run(&mut client, &alice, req.clone()).await.unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(again.status, SUCCEEDED);
    assert_eq!(again.output, done.output);
    assert_eq!(mesh.router.calls_for(&first.id).len(), 1);

    // The same key in another tenant is another run.
    let other = start_run(&mut client, &bob, req).await.unwrap();
    assert_ne!(other.id, first.id);
    assert_eq!(count_runs(&sqlite_url(&dir)).await, 2);
    runtime.stop().await;
}

#[tokio::test]
async fn bad_requests_are_refused_and_write_nothing() {
    let mesh = start_doubles(&agents()).await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::start(mesh.runtime_config(&sqlite_url(&dir), true)).await;
    let mut client = mesh.client("gateway", runtime.addr);
    let alice = principal("acme", "key:alice");

    let err = start_run(&mut client, &alice, inline("", "", "hi"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "inline: model is required");

    let mut with_tools = inline("m", "", "hi");
    if let Some(agent::start_run_request::AgentRef::Inline(spec)) = &mut with_tools.agent_ref {
        spec.tools = vec!["search".into()];
    }
    let err = start_run(&mut client, &alice, with_tools)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "inline: tools are not supported yet");

    let err = start_run(
        &mut client,
        &alice,
        inline("m", &"x".repeat(32 * 1024 + 1), "hi"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "inline: system_prompt is 32769 bytes long; the limit is 32768 (32 KiB)"
    );

    let err = start_run(&mut client, &alice, inline("m", "", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "input is empty");

    let err = get_run(&mut client, &alice, "not-a-run").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // No principal: the runtime acts only for end users.
    let err = client.start_run(inline("m", "", "hi")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Later issues' RPCs say so.
    let err = client
        .cancel_run(with_principal(
            agent::CancelRunRequest {
                run_id: "x".into(),
                reason: String::new(),
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(
        err.message(),
        "crewmesh.agent.v1.AgentService/CancelRun is not implemented yet"
    );
    let err = client
        .watch_run(with_principal(agent::WatchRunRequest::default(), &alice))
        .await
        .expect_err("WatchRun is refused");
    assert_eq!(err.code(), Code::Unimplemented);

    // Only the gateway may start runs.
    let mut as_router = mesh.client("router", runtime.addr);
    let err = as_router
        .start_run(inline("m", "", "hi"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    assert_eq!(count_runs(&sqlite_url(&dir)).await, 0);
    runtime.stop().await;
}

#[tokio::test]
async fn runs_left_unfinished_by_a_previous_process_resume_at_start() {
    let mesh = start_doubles(&agents()).await;
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let alice = principal("acme", "key:alice");

    // What a crashed process left behind: one run never started, one mid-call.
    let db = store::connect(&DatabaseConfig {
        url: url.clone(),
        password_file: None,
        max_connections: 1,
    })
    .await
    .unwrap();
    let spec = AgentSpec::new("echo-model".into(), "sys".into(), vec![], 1).unwrap();
    let pending = Run::new_pending(
        alice.clone(),
        "support".into(),
        spec.clone(),
        "left pending".into(),
        String::new(),
    );
    let mut running = Run::new_pending(
        alice.clone(),
        String::new(),
        spec,
        "left running".into(),
        String::new(),
    );
    running.status = RunStatus::Running;
    running.steps = vec![Step {
        index: 0,
        kind: StepKind::ModelCall,
        target: "echo-model".into(),
        output: String::new(),
        error: String::new(),
        started_micros: running.created_micros,
        finished_micros: None,
    }];
    assert_eq!(db.create_run(&pending).await.unwrap(), Created::New);
    assert_eq!(db.create_run(&running).await.unwrap(), Created::New);
    db.close().await;

    let runtime = Runtime::start(mesh.runtime_config(&url, true)).await;
    let mut client = mesh.client("gateway", runtime.addr);
    for (run, input) in [(&pending, "left pending"), (&running, "left running")] {
        let done = wait_until_finished(&mut client, &alice, &run.id.to_string()).await;
        assert_eq!(done.status, SUCCEEDED, "{done:?}");
        assert_eq!(done.output, format!("echo: {input}"));
        assert_eq!(done.steps.len(), 1);
        assert_eq!(done.steps[0].output, format!("echo: {input}"));
        let calls = mesh.router.calls_for(&run.id.to_string());
        assert_eq!(calls.len(), 1);
        // The resumed call still acts for the owner.
        assert_eq!(calls[0].principal.as_ref(), Some(&alice));
    }
    assert_eq!(
        mesh.router.calls_for(&pending.id.to_string())[0].agent,
        "support"
    );
    runtime.stop().await;
}

#[tokio::test]
async fn shutdown_leaves_executing_runs_to_the_next_start() {
    let mesh = start_doubles(&agents()).await;
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(&dir);
    let alice = principal("acme", "key:alice");
    mesh.router.hang.store(true, Ordering::SeqCst);

    let mut config = mesh.runtime_config(&url, true);
    config.common.server.shutdown_grace_secs = 1;
    let runtime = Runtime::start(config.clone()).await;
    let mut client = mesh.client("gateway", runtime.addr);
    let started = start_run(&mut client, &alice, inline("echo-model", "", "hang"))
        .await
        .unwrap();
    wait_for("the model call", || {
        !mesh.router.calls_for(&started.id).is_empty()
    })
    .await;
    runtime.stop().await;

    // The run is stored as it was when the call began.
    let db = SqliteRunStore::connect(&DatabaseConfig {
        url: url.clone(),
        password_file: None,
        max_connections: 1,
    })
    .await
    .unwrap();
    let stored = store::RunStore::unfinished_runs(&db).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id.to_string(), started.id);
    assert_eq!(stored[0].status, RunStatus::Running);
    assert_eq!(stored[0].steps.len(), 1);
    assert_eq!(stored[0].steps[0].finished_micros, None);
    db.pool().close().await;

    // The next process finishes it.
    mesh.router.hang.store(false, Ordering::SeqCst);
    let runtime = Runtime::start(config).await;
    let mut client = mesh.client("gateway", runtime.addr);
    let run = wait_until_finished(&mut client, &alice, &started.id).await;
    assert_eq!(run.status, SUCCEEDED, "{run:?}");
    assert_eq!(run.output, "echo: hang");
    assert_eq!(mesh.router.calls_for(&started.id).len(), 2);
    runtime.stop().await;
}
