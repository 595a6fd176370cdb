//! `crewmesh up` as a user runs it: a separate process, stopped with Ctrl-C (SIGINT),
//! exporting its traces over OTLP. One request is one trace across the gateway and
//! the router.

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

use crate::harness::{stop_with_ctrl_c, up_process};

/// A minimal OTLP/gRPC trace collector that keeps (trace id, service name, span name).
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, String, String)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let trace_id: String =
                        span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    spans.push((trace_id, service.clone(), span.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_exports_one_trace_per_request_and_stops_cleanly_on_ctrl_c() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let server = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(server))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    let dir = tempfile::tempdir().unwrap();
    let (child, gateway, key) = up_process(
        dir.path(),
        &[],
        &[(
            "CREWMESH_TELEMETRY__OTLP_ENDPOINT",
            format!("http://{otlp}"),
        )],
    )
    .await;
    let state_path = dir.path().join("state.json");

    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let resp = reqwest::Client::new()
        .post(format!("{gateway}/v1/chat/completions"))
        .bearer_auth(key)
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .json(&serde_json::json!({"model": "sim-small", "messages": [{"role": "user", "content": "trace me"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Ctrl-C: drain, flush, exit 0, remove state.json.
    stop_with_ctrl_c(child).await;
    assert!(
        !state_path.exists(),
        "state.json is removed on a clean stop"
    );

    let names: HashSet<String> = collector
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _, _)| t == trace_id)
        .map(|(_, _, name)| name.clone())
        .collect();
    // The gateway's HTTP span and the router's RPC span belong to the client's trace.
    assert!(names.contains("http"), "{names:?}");
    assert!(names.contains("rpc"), "{names:?}");
}

/// The `nice` value of every thread of `pid` whose name starts with `prefix`.
#[cfg(target_os = "linux")]
fn nice_values(pid: u32, prefix: &str) -> Vec<i64> {
    let mut nice = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        if !comm.starts_with(prefix) {
            continue;
        }
        // Fields after the parenthesised name: state is field 3, nice field 19.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let field = after_name.split(' ').nth(19 - 3).unwrap();
        nice.push(field.parse().unwrap());
    }
    nice
}

/// `crewmesh up --data-plane-threads N`: the gateway, router and simulated upstream run
/// on their own threads at normal priority; config, audit, metrics and the agent
/// runtime, and the SQLite threads they start, at `nice` 10.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_bookkeeping_below_the_data_plane_priority() {
    let dir = tempfile::tempdir().unwrap();
    let (child, gateway, key) = up_process(dir.path(), &["--data-plane-threads", "3"], &[]).await;
    let resp = reqwest::Client::new()
        .post(format!("{gateway}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let pid = child.id();
    // Thread names are cut to 15 bytes: crewmesh-data-plane, crewmesh-bookkeeping.
    let data_plane = nice_values(pid, "crewmesh-data-p");
    let bookkeeping = nice_values(pid, "crewmesh-bookke");
    let sqlite = nice_values(pid, "sqlx-sqlite");
    // Its workers and blocking-pool threads carry the same name, so the count is not
    // asserted here (the runtime's worker count is, in `up`'s unit tests).
    assert!(!data_plane.is_empty());
    assert!(data_plane.iter().all(|n| *n == 0), "{data_plane:?}");
    assert!(!bookkeeping.is_empty());
    assert!(bookkeeping.iter().all(|n| *n == 10), "{bookkeeping:?}");
    assert!(!sqlite.is_empty());
    assert!(sqlite.iter().all(|n| *n == 10), "{sqlite:?}");

    stop_with_ctrl_c(child).await;
}

/// Runs `crewmesh up` with `args`, which it must refuse as a usage error (exit 2,
/// before starting anything); returns what it printed on stderr.
fn up_refuses(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_crewmesh"))
        .arg("up")
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn up_refuses_a_data_plane_without_threads() {
    let stderr = up_refuses(&["--data-plane-threads", "0"]);
    assert!(
        stderr.contains("invalid value '0' for '--data-plane-threads"),
        "{stderr}"
    );
}

/// `crewmesh up --data-plane-idle-poll`: model calls are answered with the data plane
/// polling up to a long window between them and with it not polling at all (the
/// other tests run with the default), and Ctrl-C still stops it cleanly (its pollers
/// end with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_answers_with_any_idle_polling_and_stops_cleanly() {
    for window in ["50ms", "0"] {
        up_answers_and_stops_cleanly(&["--data-plane-idle-poll", window]).await;
    }
}

async fn up_answers_and_stops_cleanly(args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (child, gateway, key) = up_process(dir.path(), args, &[]).await;
    let client = reqwest::Client::new();
    for i in 0..3 {
        let resp = client
            .post(format!("{gateway}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&serde_json::json!({"model": "sim-small", "messages": [{"role": "user", "content": format!("call {i}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    stop_with_ctrl_c(child).await;
}

#[test]
fn up_refuses_an_idle_poll_that_is_not_a_duration_or_too_long() {
    let stderr = up_refuses(&["--data-plane-idle-poll", "fast"]);
    assert!(
        stderr.contains("'--data-plane-idle-poll") && stderr.contains("not a duration"),
        "{stderr}"
    );
    let stderr = up_refuses(&["--data-plane-idle-poll", "2s"]);
    assert!(
        stderr.contains("'--data-plane-idle-poll")
            && stderr.contains("longer than the longest idle-poll window, 1s"),
        "{stderr}"
    );
}
