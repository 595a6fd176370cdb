//! `POST /v1/chat/completions` with `stream: true`: the router's `StreamComplete` as
//! OpenAI-style server-sent events (`data: {chat.completion.chunk}`, then
//! `data: [DONE]`). A stream that fails after it started ends with an explicit
//! `data: {"error": {...}}` event and no `[DONE]`, never with a silent clean end.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use crewmesh_kit::principal::Principal;
use crewmesh_proto::router::v1 as pb;
use crewmesh_proto::router::v1::stream_complete_response::Event;
use crewmesh_proto::types::v1::TokenUsage;
use futures::{Stream, StreamExt};
use serde_json::{Value, json};

use crate::AppState;
use crate::problem::Problem;

/// Whether `stream_options.include_usage` asks for a final usage chunk.
pub fn include_usage(options: Option<&Value>) -> bool {
    options
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn role_name(role: i32) -> Option<&'static str> {
    match pb::Role::try_from(role).ok()? {
        pb::Role::System => Some("system"),
        pb::Role::User => Some("user"),
        pb::Role::Assistant => Some("assistant"),
        pb::Role::Tool => Some("tool"),
        pb::Role::Developer => Some("developer"),
        pb::Role::Unspecified => None,
    }
}

fn usage_json(u: &TokenUsage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    })
}

/// The head of every chunk of a stream.
#[derive(Debug, Clone)]
struct ChunkHead {
    id: String,
    model: String,
    created: i64,
}

impl ChunkHead {
    fn of(msg: &pb::StreamCompleteResponse) -> Self {
        Self {
            id: msg.id.clone(),
            model: msg.model.clone(),
            created: msg.created,
        }
    }

    fn chunk(&self, choices: Value, include_usage: bool, usage: Option<Value>) -> Value {
        let mut c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        c
    }
}

/// One `chat.completion.chunk` for a router delta.
fn delta_chunk(head: &ChunkHead, d: &pb::StreamDelta, include_usage: bool) -> Value {
    let mut delta = serde_json::Map::new();
    if let Some(role) = role_name(d.role) {
        delta.insert("role".into(), role.into());
    }
    if let Some(content) = &d.content {
        delta.insert("content".into(), content.clone().into());
    }
    if !d.tool_calls.is_empty() {
        let calls: Vec<Value> = d
            .tool_calls
            .iter()
            .map(|t| {
                let mut call = json!({"index": t.index});
                if !t.id.is_empty() {
                    call["id"] = t.id.clone().into();
                    call["type"] = "function".into();
                }
                let mut function = serde_json::Map::new();
                if !t.name.is_empty() {
                    function.insert("name".into(), t.name.clone().into());
                }
                function.insert("arguments".into(), t.arguments_json.clone().into());
                call["function"] = Value::Object(function);
                call
            })
            .collect();
        delta.insert("tool_calls".into(), calls.into());
    }
    let finish = (!d.finish_reason.is_empty()).then(|| d.finish_reason.clone());
    head.chunk(
        json!([{
            "index": d.index,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish,
        }]),
        include_usage,
        None,
    )
}

/// The error event that ends a failed stream.
fn error_event(code: &str, message: &str, usage: Option<&TokenUsage>) -> Value {
    let mut e = json!({
        "error": {
            "message": message,
            "type": "api_error",
            "code": code,
        }
    });
    if let Some(u) = usage {
        e["usage"] = usage_json(u);
    }
    e
}

fn sse(v: &Value) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    // Serialising a Value cannot fail.
    let _ = serde_json::to_writer(&mut out, v);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

const DONE: &[u8] = b"data: [DONE]\n\n";

/// Turns the router's messages into SSE frames. The stream always ends with either
/// `[DONE]` (after the router's end message) or an error event.
fn frames(
    first: pb::StreamCompleteResponse,
    rest: impl Stream<Item = Result<pb::StreamCompleteResponse, tonic::Status>> + Send + 'static,
    include_usage: bool,
    on_usage: impl Fn(&TokenUsage) + Send + Sync + 'static,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let on_usage = std::sync::Arc::new(on_usage);
    let head = ChunkHead::of(&first);
    let input = futures::stream::once(async move { Ok(first) }).chain(rest);
    // State: (input, finished).
    futures::stream::unfold(
        (Box::pin(input), false, head),
        move |(mut input, finished, head)| {
            let on_usage = on_usage.clone();
            async move {
            if finished {
                return None;
            }
            let frame = match input.next().await {
                Some(Ok(msg)) => match &msg.event {
                    Some(Event::Delta(d)) => {
                        return Some((sse(&delta_chunk(&head, d, include_usage)), (input, false, head)));
                    }
                    Some(Event::End(end)) => {
                        on_usage(&end.usage.unwrap_or_default());
                        let mut out = Vec::new();
                        if include_usage {
                            let u = end.usage.unwrap_or_default();
                            out.extend_from_slice(&sse(&head.chunk(
                                json!([]),
                                true,
                                Some(usage_json(&u)),
                            )));
                        }
                        out.extend_from_slice(DONE);
                        Bytes::from(out)
                    }
                    Some(Event::Error(e)) => {
                        if let Some(u) = &e.usage {
                            on_usage(u);
                        }
                        tracing::warn!(code = %e.code, message = %e.message, "model stream failed after it started");
                        sse(&error_event(&e.code, &e.message, e.usage.as_ref()))
                    }
                    None => {
                        return Some((Bytes::new(), (input, false, head)));
                    }
                },
                Some(Err(status)) => {
                    tracing::warn!(code = ?status.code(), "model stream broke after it started");
                    sse(&error_event(
                        code_name(status.code()),
                        &format!("the model stream broke: {}", status.message()),
                        None,
                    ))
                }
                None => {
                    tracing::warn!("model stream ended without its final message");
                    sse(&error_event(
                        "UNAVAILABLE",
                        "the model stream ended before it was complete",
                        None,
                    ))
                }
            };
            Some((frame, (input, true, head)))
            }
        },
    )
    .filter(|b| futures::future::ready(!b.is_empty()))
}

/// Serves one streamed chat completion. Errors before the first message are
/// ordinary problem answers; after it, they are error events in the stream.
pub async fn completions(
    state: &AppState,
    principal: &Principal,
    req: pb::CompleteRequest,
    include_usage: bool,
) -> Result<Response, Problem> {
    let mut call = crewmesh_kit::clients::with_principal(
        pb::StreamCompleteRequest { request: Some(req) },
        principal,
    );
    call.set_timeout(state.upstream_timeout);
    let mut stream = state
        .router
        .clone()
        .stream_complete(call)
        .await?
        .into_inner();
    let first = match stream.message().await? {
        Some(m) => m,
        None => {
            return Err(Problem::from_status(&tonic::Status::unavailable(
                "the model stream ended before it started",
            )));
        }
    };
    if let Some(Event::Error(e)) = &first.event {
        // Failed before any delta: answer as a plain problem.
        let code = tonic::Code::from_i32(code_number(&e.code));
        return Err(Problem::from_status(&tonic::Status::new(
            code,
            e.message.clone(),
        )));
    }
    let limiter = state.limiter.clone();
    let (tenant, subject) = (principal.tenant.clone(), principal.subject.clone());
    let on_usage = move |u: &TokenUsage| {
        limiter.debit_tokens(tenant.as_str(), &subject, u.total_tokens);
    };
    let body = frames(first, stream, include_usage, on_usage).map(Ok::<_, Infallible>);
    let mut resp = Response::new(Body::from_stream(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// gRPC status code names, by number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of a gRPC code, e.g. `UNAVAILABLE`.
fn code_name(code: tonic::Code) -> &'static str {
    usize::try_from(code as i32)
        .ok()
        .and_then(|i| CODE_NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// The gRPC code number of a code name such as `UNAVAILABLE` (UNKNOWN if unknown).
fn code_number(name: &str) -> i32 {
    CODE_NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .and_then(|i| i32::try_from(i).ok())
        .filter(|i| *i != 0)
        .unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(event: Event) -> pb::StreamCompleteResponse {
        pb::StreamCompleteResponse {
            id: "chatcmpl-1".into(),
            model: "sim-small".into(),
            created: 7,
            event: Some(event),
        }
    }

    fn delta(content: &str, role: bool) -> Event {
        Event::Delta(pb::StreamDelta {
            index: 0,
            role: if role { pb::Role::Assistant as i32 } else { 0 },
            content: Some(content.into()),
            tool_calls: vec![],
            finish_reason: String::new(),
        })
    }

    async fn collect(
        items: Vec<Result<pb::StreamCompleteResponse, tonic::Status>>,
        include_usage: bool,
    ) -> String {
        let mut it = items.into_iter();
        let first = it.next().unwrap().unwrap();
        let frames: Vec<Bytes> = frames(first, futures::stream::iter(it), include_usage, |_| {})
            .collect()
            .await;
        frames
            .iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_complete_stream_ends_with_usage_and_done() {
        let usage = TokenUsage {
            prompt_tokens: 3,
            completion_tokens: 2,
            total_tokens: 5,
        };
        let out = collect(
            vec![
                Ok(msg(delta("Hel", true))),
                Ok(msg(delta("lo", false))),
                Ok(msg(Event::End(pb::StreamEnd {
                    usage: Some(usage),
                    call: None,
                }))),
            ],
            true,
        )
        .await;
        let events: Vec<&str> = out.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 4, "{out}");
        let first: Value = serde_json::from_str(events[0].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(
            first,
            json!({
                "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
                "model": "sim-small", "system_fingerprint": null, "usage": null,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"},
                             "logprobs": null, "finish_reason": null}]
            })
        );
        let last: Value = serde_json::from_str(events[2].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(
            last["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
        );
        assert_eq!(events[3], "data: [DONE]");
    }

    #[tokio::test]
    async fn without_include_usage_there_is_no_usage_field() {
        let out = collect(
            vec![
                Ok(msg(delta("x", true))),
                Ok(msg(Event::End(pb::StreamEnd::default()))),
            ],
            false,
        )
        .await;
        assert!(!out.contains("usage"), "{out}");
        assert!(out.ends_with("data: [DONE]\n\n"));
    }

    #[tokio::test]
    async fn a_failure_after_the_start_is_an_error_event_not_a_clean_end() {
        let out = collect(
            vec![
                Ok(msg(delta("x", true))),
                Ok(msg(Event::Error(pb::StreamError {
                    code: "UNAVAILABLE".into(),
                    message: "upstream dropped the connection".into(),
                    usage: Some(TokenUsage {
                        prompt_tokens: 3,
                        completion_tokens: 1,
                        total_tokens: 4,
                    }),
                }))),
                Ok(msg(delta("never sent", false))),
            ],
            false,
        )
        .await;
        assert!(!out.contains("[DONE]"), "{out}");
        assert!(!out.contains("never sent"), "{out}");
        let last = out.trim_end().rsplit("\n\n").next().unwrap();
        let v: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["error"]["code"], "UNAVAILABLE");
        assert_eq!(v["error"]["message"], "upstream dropped the connection");
        assert_eq!(v["usage"]["completion_tokens"], 1);

        // The router connection breaking, or the stream ending without an end message.
        for tail in [
            vec![Err(tonic::Status::unavailable("connection reset"))],
            vec![],
        ] {
            let mut items = vec![Ok(msg(delta("x", true)))];
            items.extend(tail);
            let out = collect(items, false).await;
            assert!(!out.contains("[DONE]"), "{out}");
            assert!(out.contains("\"error\""), "{out}");
            assert_eq!(out.matches("data: ").count(), 2, "{out}");
        }
    }

    #[test]
    fn tool_call_deltas_look_like_openai() {
        let head = ChunkHead {
            id: "c".into(),
            model: "m".into(),
            created: 1,
        };
        let d = pb::StreamDelta {
            index: 0,
            role: 0,
            content: None,
            tool_calls: vec![pb::ToolCallDelta {
                index: 0,
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments_json: "{\"ci".into(),
            }],
            finish_reason: String::new(),
        };
        assert_eq!(
            delta_chunk(&head, &d, false)["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": "{\"ci"}}]})
        );
    }

    #[test]
    fn code_names_map_to_numbers() {
        assert_eq!(code_number("UNAVAILABLE"), 14);
        assert_eq!(code_number("resource_exhausted"), 8);
        assert_eq!(code_number("nonsense"), 2);
        assert_eq!(code_number("OK"), 2);
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(tonic::Code::Unauthenticated), "UNAUTHENTICATED");
    }
}
