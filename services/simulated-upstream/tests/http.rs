//! Drives a real simulated upstream on 127.0.0.1:0 over raw HTTP/1.1 (the crate has no
//! HTTP client dependency), checking status lines, headers and exact bodies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crewmesh_simulated_upstream::SimulatedUpstream;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound for any single test step, so a bug cannot hang the suite.
const STEP: Duration = Duration::from_secs(10);

struct Server {
    addr: SocketAddr,
    base_url: String,
    requests: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start() -> Self {
        let upstream = SimulatedUpstream::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = upstream.local_addr();
        let base_url = upstream.base_url();
        let requests = upstream.request_count();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(upstream.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            base_url,
            requests,
            stop: Some(stop),
            task,
        }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(STEP, &mut self.task)
            .await
            .expect("drains in time")
            .expect("task")
            .expect("serve");
    }
}

#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body framing finished (chunked terminator seen, or content-length met).
    complete: bool,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("utf-8 body")
    }
}

fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body);
    raw
}

/// Reads until EOF or a connection error, keeping what arrived.
async fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = [0_u8; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return received,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

fn parse_response(raw: &[u8]) -> RawResponse {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("complete response head");
    let head = std::str::from_utf8(&raw[..head_end]).expect("ascii head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[head_end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let (body, complete) = if chunked {
        dechunk(rest)
    } else {
        let length: Option<usize> = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok());
        match length {
            Some(length) => (
                rest[..length.min(rest.len())].to_vec(),
                rest.len() >= length,
            ),
            None => (rest.to_vec(), true),
        }
    };
    RawResponse {
        status,
        headers,
        body,
        complete,
    }
}

fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (body, false);
        };
        let size_text = std::str::from_utf8(&rest[..line_end]).expect("chunk size");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("hex chunk size");
        rest = &rest[line_end + 2..];
        if size == 0 {
            return (body, true);
        }
        if rest.len() < size + 2 {
            body.extend_from_slice(&rest[..size.min(rest.len())]);
            return (body, false);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    tokio::time::timeout(STEP, async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(&request_bytes(method, path, headers, body))
            .await
            .expect("write");
        parse_response(&read_all(&mut stream).await)
    })
    .await
    .expect("response in time")
}

async fn chat(addr: SocketAddr, headers: &[(&str, &str)], body: &Value) -> RawResponse {
    send(
        addr,
        "POST",
        "/v1/chat/completions",
        headers,
        body.to_string().as_bytes(),
    )
    .await
}

/// `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<&str> {
    body.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| event.strip_prefix("data: ").expect("data event"))
        .collect()
}

#[tokio::test]
async fn models_are_listed_and_marked_simulated() {
    let server = Server::start().await;
    assert!(server.base_url.starts_with("http://127.0.0.1:"));
    assert!(server.base_url.ends_with("/v1"));
    let response = send(server.addr, "GET", "/v1/models", &[], b"").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-crewmesh-simulated"), Some("true"));
    assert_eq!(
        response.json(),
        json!({"object":"list","data":[
            {"id":"sim-small","object":"model","created":0,"owned_by":"crewmesh-simulated"},
            {"id":"sim-large","object":"model","created":0,"owned_by":"crewmesh-simulated"}
        ]})
    );
    server.shutdown().await;
}

#[tokio::test]
async fn chat_completion_is_deterministic_and_exact() {
    let server = Server::start().await;
    let body = br#"{"model":"sim-small","messages":[{"role":"user","content":"hello"}]}"#;
    let first = send(
        server.addr,
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", "Bearer anything-goes"),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-crewmesh-simulated"), Some("true"));
    assert_eq!(first.header("content-type"), Some("application/json"));
    let value = first.json();
    let id = value["id"].as_str().expect("id");
    assert!(id.starts_with("chatcmpl-sim-"));
    assert_eq!(id.len(), "chatcmpl-sim-".len() + 24);
    assert_eq!(
        value,
        json!({
            "id": id, "object": "chat.completion", "created": 1_700_000_000, "model": "sim-small",
            "choices": [{"index": 0, "message": {"role": "assistant",
                "content": "[simulated] echo: hello", "refusal": null},
                "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
            "system_fingerprint": "crewmesh-simulated"
        })
    );
    let second = send(server.addr, "POST", "/v1/chat/completions", &[], body).await;
    assert_eq!(second.body, first.body);
    assert_eq!(server.requests.load(Ordering::Relaxed), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn streamed_completion_ends_with_usage_and_done() {
    let server = Server::start().await;
    let response = chat(
        server.addr,
        &[],
        &json!({"model":"sim-large","stream":true,"stream_options":{"include_usage":true},
                "messages":[{"role":"user","content":"hi"}]}),
    )
    .await;
    assert_eq!(response.status, 200);
    assert!(response.complete);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    assert_eq!(response.header("x-crewmesh-simulated"), Some("true"));
    let events = sse_data(response.text());
    assert_eq!(events.len(), 7);
    assert_eq!(events[6], "[DONE]");
    let chunks: Vec<Value> = events[..6]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk JSON"))
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "[simulated] echo: hi");
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[5]["usage"]["total_tokens"], 7);
    assert!(chunks.iter().all(|c| c["model"] == "sim-large"));
    server.shutdown().await;
}

#[tokio::test]
async fn header_fault_wins_over_model() {
    let server = Server::start().await;
    let hello = json!({"model":"sim-small","messages":[{"role":"user","content":"x"}]});
    let failed = chat(server.addr, &[("x-sim-fault", "error-500")], &hello).await;
    assert_eq!(failed.status, 500);
    assert_eq!(failed.header("x-crewmesh-simulated"), Some("true"));
    assert_eq!(
        failed.text(),
        r#"{"error":{"message":"simulated upstream failure","type":"server_error","code":null}}"#
    );

    let by_model = json!({"model":"error-429","messages":[{"role":"user","content":"x"}]});
    let limited = chat(server.addr, &[], &by_model).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), Some("1"));

    let overridden = chat(server.addr, &[("x-sim-fault", "none")], &by_model).await;
    assert_eq!(overridden.status, 200);

    let bad = chat(server.addr, &[("x-sim-fault", "error-400")], &hello).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["type"], "invalid_request_error");

    let typo = chat(server.addr, &[("x-sim-fault", "eror-500")], &hello).await;
    assert_eq!(typo.status, 400);
    assert_eq!(server.requests.load(Ordering::Relaxed), 5);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let server = Server::start().await;
    let not_json = send(server.addr, "POST", "/v1/chat/completions", &[], b"{nope").await;
    assert_eq!(not_json.status, 400);
    assert_eq!(not_json.json()["error"]["type"], "invalid_request_error");
    assert!(
        not_json.json()["error"]["message"]
            .as_str()
            .expect("message")
            .starts_with("we could not parse the JSON body of your request")
    );

    let no_messages = chat(server.addr, &[], &json!({"model":"sim-small"})).await;
    assert_eq!(no_messages.status, 400);
    assert_eq!(
        no_messages.json(),
        json!({"error":{"message":"missing required parameter: 'messages'",
            "type":"invalid_request_error","param":"messages","code":null}})
    );

    let huge = vec![b' '; 4 * 1024 * 1024 + 1];
    let too_large = send(server.addr, "POST", "/v1/chat/completions", &[], &huge).await;
    assert_eq!(too_large.status, 413);
    assert_eq!(too_large.json()["error"]["type"], "invalid_request_error");

    let unknown = send(server.addr, "GET", "/v2/nothing", &[], b"").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.header("x-crewmesh-simulated"), Some("true"));
    assert_eq!(unknown.json()["error"]["code"], "unknown_url");
    server.shutdown().await;
}

#[tokio::test]
async fn stream_break_drops_the_connection_before_done() {
    let server = Server::start().await;
    let response = chat(
        server.addr,
        &[],
        &json!({"model":"stream-break","stream":true,
                "messages":[{"role":"user","content":"hello there"}]}),
    )
    .await;
    assert_eq!(response.status, 200);
    assert!(
        !response.complete,
        "the chunked body must not be terminated"
    );
    let events = sse_data(response.text());
    assert_eq!(events.len(), 3);
    assert!(!response.text().contains("[DONE]"));
    let content: String = events
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("chunk JSON"))
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content, "[simulated] echo");

    let unstreamed = chat(
        server.addr,
        &[("x-sim-fault", "stream-break")],
        &json!({"messages":[{"role":"user","content":"hello there"}]}),
    )
    .await;
    assert_eq!(unstreamed.status, 200);
    assert!(!unstreamed.complete);
    assert!(serde_json::from_slice::<Value>(&unstreamed.body).is_err());
    server.shutdown().await;
}

#[tokio::test]
async fn slow_waits_then_answers() {
    let server = Server::start().await;
    let started = Instant::now();
    let response = chat(
        server.addr,
        &[("x-sim-fault", "slow-150")],
        &json!({"messages":[{"role":"user","content":"x"}]}),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(response.status, 200);
    assert_eq!(
        response.json()["choices"][0]["message"]["content"],
        "[simulated] echo: x"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn hang_never_answers_and_is_released_by_shutdown() {
    let server = Server::start().await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let body = json!({"model":"hang","messages":[{"role":"user","content":"x"}]}).to_string();
    stream
        .write_all(&request_bytes(
            "POST",
            "/v1/chat/completions",
            &[],
            body.as_bytes(),
        ))
        .await
        .expect("write");

    // Wait (bounded) until the server has the request, then check that nothing arrives.
    let deadline = Instant::now() + STEP;
    while server.requests.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "request never reached the server"
        );
        tokio::task::yield_now().await;
    }
    let mut byte = [0_u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await;
    assert!(early.is_err(), "a hung request must not answer: {early:?}");

    let stop = tokio::spawn(server.shutdown());
    let response = tokio::time::timeout(STEP, read_all(&mut stream))
        .await
        .expect("released by shutdown");
    let response = parse_response(&response);
    assert_eq!(response.status, 503);
    assert_eq!(response.json()["error"]["type"], "server_error");
    tokio::time::timeout(STEP, stop)
        .await
        .expect("drained")
        .expect("shutdown task");
}

async fn put_faults(addr: SocketAddr, model: &str, settings: &Value) -> RawResponse {
    send(
        addr,
        "PUT",
        &format!("/_sim/faults/{model}"),
        &[("content-type", "application/json")],
        settings.to_string().as_bytes(),
    )
    .await
}

fn hello(model: &str) -> Value {
    json!({"model": model, "messages":[{"role":"user","content":"hello there"}]})
}

#[tokio::test]
async fn fault_settings_are_set_listed_and_cleared_at_run_time() {
    let server = Server::start().await;
    let empty = send(server.addr, "GET", "/_sim/faults", &[], b"").await;
    assert_eq!(empty.status, 200);
    assert_eq!(empty.header("x-crewmesh-simulated"), Some("true"));
    assert_eq!(
        empty.json(),
        json!({"object":"list","simulated":true,"data":[]})
    );

    let set = put_faults(
        server.addr,
        "org/flaky",
        &json!({"error_rate": 1.0, "error_status": 503}),
    )
    .await;
    assert_eq!(set.status, 200, "{}", set.text());
    assert_eq!(set.json()["model"], "org/flaky");
    assert_eq!(set.json()["settings"]["error_status"], 503);

    // Only that deployment fails, from the next request on.
    let failed = chat(server.addr, &[], &hello("org/flaky")).await;
    assert_eq!(failed.status, 503);
    assert_eq!(
        failed.json(),
        json!({"error":{"message":"simulated upstream failure","type":"server_error","code":null}})
    );
    assert_eq!(
        chat(server.addr, &[], &hello("sim-small")).await.status,
        200
    );
    // The request header still wins.
    let forced = chat(server.addr, &[("x-sim-fault", "none")], &hello("org/flaky")).await;
    assert_eq!(forced.status, 200);

    let listed = send(server.addr, "GET", "/_sim/faults", &[], b"")
        .await
        .json();
    assert_eq!(listed["data"].as_array().expect("list").len(), 1);
    assert_eq!(listed["data"][0]["model"], "org/flaky");
    assert_eq!(listed["data"][0]["requests"], 1);
    assert_eq!(listed["data"][0]["faults_injected"], 1);
    let one = send(server.addr, "GET", "/_sim/faults/org/flaky", &[], b"").await;
    assert_eq!(one.json(), listed["data"][0]);

    let cleared = send(server.addr, "DELETE", "/_sim/faults/org/flaky", &[], b"").await;
    assert_eq!(cleared.status, 200);
    assert_eq!(cleared.json(), json!({"model":"org/flaky","deleted":true}));
    assert_eq!(
        chat(server.addr, &[], &hello("org/flaky")).await.status,
        200
    );
    let again = send(server.addr, "DELETE", "/_sim/faults/org/flaky", &[], b"").await;
    assert_eq!(again.status, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn default_settings_apply_to_every_model_without_its_own() {
    let server = Server::start().await;
    let limited = json!({"rate_limit": {"rate": 1.0, "retry_after_s": 7}});
    assert_eq!(put_faults(server.addr, "*", &limited).await.status, 200);
    assert_eq!(
        put_faults(server.addr, "calm", &json!({})).await.status,
        200
    );
    let response = chat(server.addr, &[], &hello("anything")).await;
    assert_eq!(response.status, 429);
    assert_eq!(response.header("retry-after"), Some("7"));
    assert_eq!(response.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(chat(server.addr, &[], &hello("calm")).await.status, 200);

    let all = send(server.addr, "DELETE", "/_sim/faults", &[], b"").await;
    assert_eq!(all.json(), json!({"deleted": 2}));
    assert_eq!(chat(server.addr, &[], &hello("anything")).await.status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_fault_settings_are_rejected_naming_the_field() {
    let server = Server::start().await;
    for (settings, param) in [
        (json!({"error_rate": 1.2}), "error_rate"),
        (json!({"hang": 0.1}), "hang"),
        (
            json!({"latency": {"distribution": "fixed", "ms": 1, "p99_ms": 3}}),
            "latency.p99_ms",
        ),
    ] {
        let response = put_faults(server.addr, "m", &settings).await;
        assert_eq!(response.status, 400, "{settings}");
        assert_eq!(response.json()["error"]["param"], param);
    }
    let listed = send(server.addr, "GET", "/_sim/faults", &[], b"")
        .await
        .json();
    assert_eq!(listed["data"], json!([]), "nothing was installed");
    server.shutdown().await;
}

#[tokio::test]
async fn drop_mid_stream_cuts_after_the_configured_chunks() {
    let server = Server::start().await;
    let settings = json!({"drop_mid_stream_rate": 1.0, "drop_after_chunks": 1});
    assert_eq!(
        put_faults(server.addr, "dropping", &settings).await.status,
        200
    );
    let mut body = hello("dropping");
    body["stream"] = json!(true);
    let response = chat(server.addr, &[], &body).await;
    assert_eq!(response.status, 200);
    assert!(!response.complete, "the body must not be terminated");
    assert!(!response.text().contains("[DONE]"));
    // The opening chunk and one content chunk.
    assert_eq!(sse_data(response.text()).len(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn seeded_settings_give_the_same_faults_every_time() {
    let server = Server::start().await;
    let settings = json!({"error_rate": 0.5, "seed": 1234});
    let mut runs = Vec::new();
    for _ in 0..2 {
        // Setting again restarts the seeded sequence.
        assert_eq!(put_faults(server.addr, "coin", &settings).await.status, 200);
        let mut statuses = Vec::new();
        for _ in 0..20 {
            statuses.push(chat(server.addr, &[], &hello("coin")).await.status);
        }
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(
        runs[0].contains(&200) && runs[0].contains(&500),
        "{:?}",
        runs[0]
    );
    server.shutdown().await;
}
