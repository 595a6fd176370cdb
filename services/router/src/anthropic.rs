//! The Anthropic Messages API, mapped to the router's types: requests (system prompt,
//! tool use and tool results, stop sequences), whole answers and the server-sent event
//! stream (`message_start`, `content_block_*`, `message_delta`, `message_stop`).
//! Anthropic has no `n`, `seed`, `logprobs` or `response_format`; they are not sent.

use std::collections::HashMap;

use crewmesh_proto::router::v1 as pb;
use crewmesh_proto::types::v1::TokenUsage;
use serde_json::{Value, json};

use crate::provider::{StreamItem, UpstreamError};

/// The `anthropic-version` header sent with every request.
pub const API_VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; this is used when the caller set none.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

fn parse_json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|_| json!({}))
}

/// The Messages request body for `upstream_model`.
pub fn request(req: &pb::CompleteRequest, upstream_model: &str, stream: bool) -> Value {
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    for m in &req.messages {
        let role = pb::Role::try_from(m.role).unwrap_or(pb::Role::User);
        let text = m.content.clone().unwrap_or_default();
        let (role, blocks) = match role {
            pb::Role::System | pb::Role::Developer => {
                system.push(text);
                continue;
            }
            pb::Role::Tool => (
                "user",
                vec![
                    json!({"type": "tool_result", "tool_use_id": m.tool_call_id, "content": text}),
                ],
            ),
            pb::Role::Assistant => {
                let mut blocks = Vec::new();
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
                for c in &m.tool_calls {
                    blocks.push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": parse_json(&c.arguments_json)}));
                }
                ("assistant", blocks)
            }
            pb::Role::User | pb::Role::Unspecified => {
                ("user", vec![json!({"type": "text", "text": text})])
            }
        };
        // Anthropic wants alternating roles: merge consecutive same-role messages.
        if let Some(last) = messages.last_mut()
            && last["role"] == role
            && let Some(content) = last["content"].as_array_mut()
        {
            content.extend(blocks);
            continue;
        }
        messages.push(json!({"role": role, "content": blocks}));
    }
    let mut body = json!({
        "model": upstream_model,
        "max_tokens": req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        "messages": messages,
    });
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    if let Some(t) = req.temperature {
        // Anthropic's range is 0..=1; OpenAI's 0..=2 is scaled.
        body["temperature"] = json!((t / 2.0).clamp(0.0, 1.0));
    }
    if let Some(p) = req.top_p {
        body["top_p"] = json!(p);
    }
    if !req.stop.is_empty() {
        body["stop_sequences"] = json!(req.stop);
    }
    if !req.tools.is_empty() {
        body["tools"] = Value::Array(
            req.tools
                .iter()
                .map(|t| {
                    let schema = if t.parameters_json.is_empty() {
                        json!({"type": "object"})
                    } else {
                        parse_json(&t.parameters_json)
                    };
                    json!({"name": t.name, "description": t.description, "input_schema": schema})
                })
                .collect(),
        );
        match req.tool_choice.as_str() {
            "" | "auto" => {}
            "none" => body["tool_choice"] = json!({"type": "none"}),
            "required" => body["tool_choice"] = json!({"type": "any"}),
            name => body["tool_choice"] = json!({"type": "tool", "name": name}),
        }
    }
    if !req.user.is_empty() {
        body["metadata"] = json!({"user_id": req.user});
    }
    if stream {
        body["stream"] = json!(true);
    }
    body
}

/// OpenAI's finish reason for an Anthropic stop reason.
pub fn finish_reason(stop_reason: &str) -> String {
    match stop_reason {
        "end_turn" | "stop_sequence" => "stop",
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        other => other,
    }
    .to_owned()
}

fn malformed(what: &str) -> UpstreamError {
    UpstreamError::Malformed(format!("anthropic answer: {what}"))
}

/// A whole Messages answer as a chat completion.
pub fn response(body: &[u8]) -> Result<pb::CompleteResponse, UpstreamError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| malformed(&e.to_string()))?;
    let content = v["content"]
        .as_array()
        .ok_or_else(|| malformed("no content array"))?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in content {
        match block["type"].as_str() {
            Some("text") => text.push_str(block["text"].as_str().unwrap_or_default()),
            Some("tool_use") => tool_calls.push(pb::ToolCall {
                id: block["id"].as_str().unwrap_or_default().to_owned(),
                name: block["name"].as_str().unwrap_or_default().to_owned(),
                arguments_json: block["input"].to_string(),
            }),
            _ => {}
        }
    }
    let prompt = v["usage"]["input_tokens"].as_u64().unwrap_or(0);
    let completion = v["usage"]["output_tokens"].as_u64().unwrap_or(0);
    Ok(pb::CompleteResponse {
        id: v["id"].as_str().unwrap_or_default().to_owned(),
        model: v["model"].as_str().unwrap_or_default().to_owned(),
        created: 0,
        choices: vec![pb::Choice {
            index: 0,
            message: Some(pb::ChatMessage {
                role: pb::Role::Assistant as i32,
                content: (!text.is_empty() || tool_calls.is_empty()).then_some(text),
                tool_calls,
                tool_call_id: String::new(),
                name: String::new(),
            }),
            finish_reason: finish_reason(v["stop_reason"].as_str().unwrap_or("end_turn")),
            logprobs_json: String::new(),
        }],
        usage: Some(TokenUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }),
        system_fingerprint: String::new(),
        call: None,
        request_id: String::new(),
    })
}

/// What a stream has told so far.
#[derive(Debug, Default)]
pub struct StreamState {
    usage: TokenUsage,
    /// Content-block index -> tool-call index.
    tools: HashMap<u64, u32>,
}

fn delta() -> pb::StreamDelta {
    pb::StreamDelta {
        index: 0,
        ..Default::default()
    }
}

/// The router's events for one Anthropic stream event.
pub fn stream_event(
    name: &str,
    data: &str,
    state: &mut StreamState,
) -> Result<Vec<StreamItem>, UpstreamError> {
    let v: Value = serde_json::from_str(data).map_err(|e| malformed(&e.to_string()))?;
    let kind = v["type"].as_str().unwrap_or(name);
    Ok(match kind {
        "message_start" => {
            let u = &v["message"]["usage"];
            state.usage.prompt_tokens = u["input_tokens"].as_u64().unwrap_or(0);
            state.usage.completion_tokens = u["output_tokens"].as_u64().unwrap_or(0);
            vec![StreamItem::Deltas(vec![pb::StreamDelta {
                role: pb::Role::Assistant as i32,
                ..delta()
            }])]
        }
        "content_block_start" => {
            let block = &v["content_block"];
            match block["type"].as_str() {
                Some("tool_use") => {
                    let index = state.tools.len() as u32;
                    state.tools.insert(v["index"].as_u64().unwrap_or(0), index);
                    vec![StreamItem::Deltas(vec![pb::StreamDelta {
                        tool_calls: vec![pb::ToolCallDelta {
                            index,
                            id: block["id"].as_str().unwrap_or_default().to_owned(),
                            name: block["name"].as_str().unwrap_or_default().to_owned(),
                            arguments_json: String::new(),
                        }],
                        ..delta()
                    }])]
                }
                Some("text") => match block["text"].as_str() {
                    Some(t) if !t.is_empty() => vec![StreamItem::Deltas(vec![pb::StreamDelta {
                        content: Some(t.to_owned()),
                        ..delta()
                    }])],
                    _ => vec![],
                },
                _ => vec![],
            }
        }
        "content_block_delta" => {
            let d = &v["delta"];
            match d["type"].as_str() {
                Some("text_delta") => vec![StreamItem::Deltas(vec![pb::StreamDelta {
                    content: Some(d["text"].as_str().unwrap_or_default().to_owned()),
                    ..delta()
                }])],
                Some("input_json_delta") => {
                    let block = v["index"].as_u64().unwrap_or(0);
                    let index = *state
                        .tools
                        .get(&block)
                        .ok_or_else(|| malformed("input_json_delta for an unknown block"))?;
                    vec![StreamItem::Deltas(vec![pb::StreamDelta {
                        tool_calls: vec![pb::ToolCallDelta {
                            index,
                            arguments_json: d["partial_json"]
                                .as_str()
                                .unwrap_or_default()
                                .to_owned(),
                            ..Default::default()
                        }],
                        ..delta()
                    }])]
                }
                _ => vec![],
            }
        }
        "message_delta" => {
            if let Some(out) = v["usage"]["output_tokens"].as_u64() {
                state.usage.completion_tokens = out;
            }
            match v["delta"]["stop_reason"].as_str() {
                Some(r) => vec![StreamItem::Deltas(vec![pb::StreamDelta {
                    finish_reason: finish_reason(r),
                    ..delta()
                }])],
                None => vec![],
            }
        }
        "message_stop" => {
            let mut u = state.usage;
            u.total_tokens = u.prompt_tokens + u.completion_tokens;
            vec![StreamItem::Usage(u), StreamItem::Done]
        }
        "error" => {
            return Err(UpstreamError::Status {
                status: 502,
                message: v["error"]["message"]
                    .as_str()
                    .unwrap_or("the upstream sent an error event")
                    .to_owned(),
                retry_after: None,
            });
        }
        // ping, content_block_stop and future event types carry nothing we need.
        _ => vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_a_tool_conversation_to_messages() {
        let req = pb::CompleteRequest {
            messages: vec![
                pb::ChatMessage {
                    role: pb::Role::System as i32,
                    content: Some("be brief".into()),
                    ..Default::default()
                },
                pb::ChatMessage {
                    role: pb::Role::User as i32,
                    content: Some("hi".into()),
                    ..Default::default()
                },
                pb::ChatMessage {
                    role: pb::Role::Assistant as i32,
                    tool_calls: vec![pb::ToolCall {
                        id: "t1".into(),
                        name: "f".into(),
                        arguments_json: r#"{"a":1}"#.into(),
                    }],
                    ..Default::default()
                },
                pb::ChatMessage {
                    role: pb::Role::Tool as i32,
                    content: Some("42".into()),
                    tool_call_id: "t1".into(),
                    ..Default::default()
                },
            ],
            tools: vec![pb::ToolDefinition {
                name: "f".into(),
                description: "d".into(),
                parameters_json: r#"{"type":"object"}"#.into(),
            }],
            tool_choice: "required".into(),
            stop: vec!["END".into()],
            ..Default::default()
        };
        let body = request(&req, "anthropic-model-x", true);
        assert_eq!(body["system"], "be brief");
        assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(body["messages"].as_array().unwrap().len(), 3);
        assert_eq!(body["messages"][1]["content"][0]["input"], json!({"a": 1}));
        assert_eq!(body["messages"][2]["content"][0]["tool_use_id"], "t1");
        assert_eq!(body["tool_choice"], json!({"type": "any"}));
        assert_eq!(body["stop_sequences"], json!(["END"]));
        assert_eq!(body["stream"], true);
    }

    #[test]
    fn maps_stream_events() {
        let mut st = StreamState::default();
        let mut ev = |name: &str, v: Value| stream_event(name, &v.to_string(), &mut st).unwrap();
        assert_eq!(
            ev(
                "message_start",
                json!({"type": "message_start", "message": {"usage": {"input_tokens": 7, "output_tokens": 1}}})
            )
            .len(),
            1
        );
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "tu", "name": "f", "input": {}}}),
        );
        let d = ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\""}}),
        );
        let StreamItem::Deltas(d) = &d[0] else {
            panic!("{d:?}")
        };
        assert_eq!(d[0].tool_calls[0].index, 0);
        assert_eq!(d[0].tool_calls[0].arguments_json, "{\"a\"");
        ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
        );
        let end = ev("message_stop", json!({"type": "message_stop"}));
        assert_eq!(
            end,
            vec![
                StreamItem::Usage(TokenUsage {
                    prompt_tokens: 7,
                    completion_tokens: 9,
                    total_tokens: 16
                }),
                StreamItem::Done
            ]
        );
    }
}
