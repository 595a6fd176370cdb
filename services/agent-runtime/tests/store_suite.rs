//! One test suite for the run store, run against SQLite and against a real PostgreSQL.

use std::sync::Arc;

use crewmesh_agent_runtime::AgentRuntimeError;
use crewmesh_agent_runtime::run::{AgentSpec, Run, RunId, RunStatus, Step, StepKind, TokenUsage};
use crewmesh_agent_runtime::store::{self, Created, RunStore};
use crewmesh_kit::principal::{Principal, Role, TenantId};
use crewmesh_kit::settings::DatabaseConfig;

fn principal(tenant: &str, subject: &str) -> Principal {
    Principal {
        tenant: TenantId::parse(tenant).unwrap(),
        subject: subject.to_owned(),
        roles: vec![Role::Developer, Role::Viewer],
    }
}

fn spec(model: &str) -> AgentSpec {
    AgentSpec::new(model.to_owned(), "be brief".to_owned(), vec![], 0).unwrap()
}

fn pending(tenant: &str, input: &str, key: &str) -> Run {
    Run::new_pending(
        principal(tenant, "key:abc"),
        "support-bot".to_owned(),
        spec("gpt-small"),
        input.to_owned(),
        key.to_owned(),
    )
}

fn database(url: String) -> DatabaseConfig {
    DatabaseConfig {
        url,
        password_file: None,
        max_connections: 4,
    }
}

async fn run_suite(store: Arc<dyn RunStore>) {
    create_and_read_back(&*store).await;
    reads_are_tenant_scoped(&*store).await;
    idempotency_keys_are_per_tenant(&*store).await;
    checkpoints_replace_progress_and_steps(&*store).await;
    checkpoint_of_an_unknown_run_fails(&*store).await;
    unfinished_runs_are_listed_oldest_first(&*store).await;
}

async fn create_and_read_back(store: &dyn RunStore) {
    let run = pending("acme", "hello", "");
    assert_eq!(store.create_run(&run).await.unwrap(), Created::New);
    let read = store
        .get_run(run.tenant(), run.id)
        .await
        .unwrap()
        .expect("the run just written");
    assert_eq!(read, run);
    assert_eq!(read.owner.roles, vec![Role::Developer, Role::Viewer]);
    assert_eq!(read.spec.system_prompt, "be brief");
    assert_eq!(read.status, RunStatus::Pending);
    assert!(read.steps.is_empty());

    assert_eq!(
        store.get_run(run.tenant(), RunId::new()).await.unwrap(),
        None
    );
}

async fn reads_are_tenant_scoped(store: &dyn RunStore) {
    let run = pending("tenant-a", "secret plans", "k-scope");
    assert_eq!(store.create_run(&run).await.unwrap(), Created::New);
    let other = TenantId::parse("tenant-b").unwrap();
    assert_eq!(store.get_run(&other, run.id).await.unwrap(), None);
    assert_eq!(
        store
            .find_by_idempotency_key(&other, "k-scope")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .get_run(run.tenant(), run.id)
            .await
            .unwrap()
            .unwrap()
            .input,
        "secret plans"
    );
}

async fn idempotency_keys_are_per_tenant(store: &dyn RunStore) {
    let first = pending("idem", "first", "retry-1");
    assert_eq!(store.create_run(&first).await.unwrap(), Created::New);

    // The same key in the same tenant: nothing written, the first run returned.
    let second = pending("idem", "second", "retry-1");
    match store.create_run(&second).await.unwrap() {
        Created::Existing(existing) => {
            assert_eq!(existing.id, first.id);
            assert_eq!(existing.input, "first");
        }
        Created::New => panic!("a repeated idempotency key created a second run"),
    }
    assert_eq!(
        store.get_run(second.tenant(), second.id).await.unwrap(),
        None
    );
    assert_eq!(
        store
            .find_by_idempotency_key(first.tenant(), "retry-1")
            .await
            .unwrap()
            .map(|r| r.id),
        Some(first.id)
    );

    // The same key in another tenant is another run.
    let elsewhere = pending("idem-other", "third", "retry-1");
    assert_eq!(store.create_run(&elsewhere).await.unwrap(), Created::New);

    // Runs without a key never collide.
    for input in ["a", "b"] {
        let run = pending("idem", input, "");
        assert_eq!(store.create_run(&run).await.unwrap(), Created::New);
    }
    assert_eq!(
        store
            .find_by_idempotency_key(first.tenant(), "")
            .await
            .unwrap(),
        None
    );
}

async fn checkpoints_replace_progress_and_steps(store: &dyn RunStore) {
    let mut run = pending("ckpt", "question", "");
    store.create_run(&run).await.unwrap();

    run.status = RunStatus::Running;
    run.updated_micros += 10;
    run.steps = vec![Step {
        index: 0,
        kind: StepKind::ModelCall,
        target: "gpt-small".into(),
        output: String::new(),
        error: String::new(),
        started_micros: run.updated_micros,
        finished_micros: None,
    }];
    store.checkpoint(&run).await.unwrap();
    let read = store.get_run(run.tenant(), run.id).await.unwrap().unwrap();
    assert_eq!(read, run);
    assert_eq!(read.steps[0].finished_micros, None);

    run.status = RunStatus::Succeeded;
    run.output = "answer".into();
    run.usage = TokenUsage {
        prompt_tokens: 12,
        completion_tokens: 7,
    };
    run.cost_usd = 0.125;
    run.updated_micros += 10;
    run.steps[0].output = "answer".into();
    run.steps[0].finished_micros = Some(run.updated_micros);
    run.steps.push(Step {
        index: 1,
        kind: StepKind::ToolCall,
        target: "search".into(),
        output: String::new(),
        error: "tool failed".into(),
        started_micros: run.updated_micros,
        finished_micros: Some(run.updated_micros + 1),
    });
    store.checkpoint(&run).await.unwrap();
    let read = store.get_run(run.tenant(), run.id).await.unwrap().unwrap();
    assert_eq!(read, run);
    assert_eq!(read.usage.prompt_tokens, 12);
    assert_eq!(read.cost_usd, 0.125);
    assert_eq!(read.steps.len(), 2);
    assert_eq!(read.steps[1].error, "tool failed");

    // A checkpoint with fewer steps removes the ones past its end.
    run.steps.truncate(1);
    store.checkpoint(&run).await.unwrap();
    let read = store.get_run(run.tenant(), run.id).await.unwrap().unwrap();
    assert_eq!(read.steps.len(), 1);
    assert_eq!(read, run);
}

async fn checkpoint_of_an_unknown_run_fails(store: &dyn RunStore) {
    let run = pending("ghost", "boo", "");
    match store.checkpoint(&run).await {
        Err(AgentRuntimeError::RunVanished(id)) => assert_eq!(id, run.id.to_string()),
        other => panic!("expected RunVanished, got {other:?}"),
    }
    // A checkpoint under the wrong tenant does not touch the run either.
    store.create_run(&run).await.unwrap();
    let mut forged = run.clone();
    forged.owner.tenant = TenantId::parse("intruder").unwrap();
    forged.status = RunStatus::Succeeded;
    assert!(matches!(
        store.checkpoint(&forged).await,
        Err(AgentRuntimeError::RunVanished(_))
    ));
    assert_eq!(
        store
            .get_run(run.tenant(), run.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        RunStatus::Pending
    );
}

async fn unfinished_runs_are_listed_oldest_first(store: &dyn RunStore) {
    // Earlier parts of the suite left runs behind; only the ones made here matter.
    let before: Vec<RunId> = store
        .unfinished_runs()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();

    let mut older = pending("resume", "older", "");
    older.created_micros -= 1_000_000;
    let mut running = pending("resume-b", "running", "");
    running.status = RunStatus::Running;
    running.steps = vec![Step {
        index: 0,
        kind: StepKind::ModelCall,
        target: "gpt-small".into(),
        output: String::new(),
        error: String::new(),
        started_micros: running.created_micros,
        finished_micros: None,
    }];
    let mut done = pending("resume", "done", "");
    done.status = RunStatus::Failed;
    done.error = "boom".into();
    for r in [&older, &running, &done] {
        assert_eq!(store.create_run(r).await.unwrap(), Created::New);
    }

    let unfinished: Vec<Run> = store
        .unfinished_runs()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| !before.contains(&r.id))
        .collect();
    assert_eq!(unfinished.len(), 2, "{unfinished:?}");
    assert_eq!(unfinished[0], older);
    assert_eq!(unfinished[1], running);
    assert_eq!(unfinished[1].steps.len(), 1);
    assert!(
        unfinished.iter().all(|r| r.id != done.id),
        "a finished run is not resumed"
    );
}

#[tokio::test]
async fn sqlite_store_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("nested/runs.db").display()
    );
    let store = store::connect(&database(url.clone())).await.unwrap();
    run_suite(store.clone()).await;
    store.close().await;

    // Migrations run again at every start and find nothing to do; the data stays.
    let again = store::connect(&database(url)).await.unwrap();
    assert!(!again.unfinished_runs().await.unwrap().is_empty());
    again.close().await;
}

#[tokio::test]
async fn in_memory_sqlite_store_passes_the_suite() {
    let store = store::connect(&database("sqlite::memory:".into()))
        .await
        .unwrap();
    run_suite(store).await;
}

#[tokio::test]
async fn postgres_store_passes_the_suite() {
    let url = crewmesh_testkit::postgres().create_database().await;
    let store = store::connect(&database(url.clone())).await.unwrap();
    run_suite(store.clone()).await;
    store.close().await;

    let again = store::connect(&database(url)).await.unwrap();
    assert!(!again.unfinished_runs().await.unwrap().is_empty());
    again.close().await;
}
