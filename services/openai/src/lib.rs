//! The OpenAI chat-completions wire format (what clients send to the gateway and what
//! OpenAI-compatible providers answer) and its mapping to and from the router's gRPC
//! contract. The gateway uses it at the edge, the router's OpenAI-compatible provider
//! client on the way out, so both speak exactly the same dialect.

#![forbid(unsafe_code)]

use crewmesh_proto::router::v1 as pb;
use crewmesh_proto::types::v1::TokenUsage;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A chat completion request. Unknown fields are ignored, as OpenAI SDKs may send
/// parameters newer than this version knows.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Content {
    /// The text of the content; non-text parts are skipped.
    pub fn text(&self) -> String {
        match self {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => parts.iter().filter_map(|p| p.text.as_deref()).collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_type() -> String {
    "function".to_owned()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ChatResponse {
    pub id: String,
    #[serde(default = "completion_object")]
    pub object: String,
    #[serde(default)]
    pub created: i64,
    pub model: String,
    pub choices: Vec<Choice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

fn completion_object() -> String {
    "chat.completion".to_owned()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Choice {
    pub index: u32,
    pub message: Message,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default)]
    pub logprobs: Option<Value>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// A problem with a client's request, naming the parameter.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{param}: {message}")]
pub struct WireError {
    pub param: String,
    pub message: String,
}

fn wire_err(param: impl Into<String>, message: impl Into<String>) -> WireError {
    WireError {
        param: param.into(),
        message: message.into(),
    }
}

fn role_from_wire(role: &str, index: usize) -> Result<pb::Role, WireError> {
    Ok(match role {
        "system" => pb::Role::System,
        "developer" => pb::Role::Developer,
        "user" => pb::Role::User,
        "assistant" => pb::Role::Assistant,
        "tool" => pb::Role::Tool,
        other => {
            return Err(wire_err(
                format!("messages[{index}].role"),
                format!("unknown role `{other}`; use system, developer, user, assistant or tool"),
            ));
        }
    })
}

fn role_to_wire(role: i32) -> &'static str {
    match pb::Role::try_from(role).unwrap_or(pb::Role::Assistant) {
        pb::Role::System => "system",
        pb::Role::Developer => "developer",
        pb::Role::User => "user",
        pb::Role::Tool => "tool",
        pb::Role::Assistant | pb::Role::Unspecified => "assistant",
    }
}

/// Checks a client's request and converts it to the router's message.
pub fn request_to_proto(req: &ChatRequest) -> Result<pb::CompleteRequest, WireError> {
    if req.model.trim().is_empty() {
        return Err(wire_err("model", "is required"));
    }
    if req.messages.is_empty() {
        return Err(wire_err("messages", "must contain at least one message"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let role = role_from_wire(&m.role, i)?;
        let tool_calls = m
            .tool_calls
            .iter()
            .flatten()
            .map(|c| pb::ToolCall {
                id: c.id.clone(),
                name: c.function.name.clone(),
                arguments_json: c.function.arguments.clone(),
            })
            .collect::<Vec<_>>();
        if role == pb::Role::Tool && m.tool_call_id.as_deref().unwrap_or("").is_empty() {
            return Err(wire_err(
                format!("messages[{i}].tool_call_id"),
                "is required for tool messages",
            ));
        }
        if m.content.is_none() && tool_calls.is_empty() {
            return Err(wire_err(
                format!("messages[{i}].content"),
                "is required unless the message has tool_calls",
            ));
        }
        messages.push(pb::ChatMessage {
            role: role as i32,
            content: m.content.as_ref().map(Content::text),
            tool_calls,
            tool_call_id: m.tool_call_id.clone().unwrap_or_default(),
            name: m.name.clone().unwrap_or_default(),
        });
    }
    let mut tools = Vec::with_capacity(req.tools.len());
    for (i, t) in req.tools.iter().enumerate() {
        if t.kind != "function" {
            return Err(wire_err(
                format!("tools[{i}].type"),
                "only `function` tools are supported",
            ));
        }
        if t.function.name.is_empty() {
            return Err(wire_err(format!("tools[{i}].function.name"), "is required"));
        }
        tools.push(pb::ToolDefinition {
            name: t.function.name.clone(),
            description: t.function.description.clone().unwrap_or_default(),
            parameters_json: t
                .function
                .parameters
                .as_ref()
                .map(Value::to_string)
                .unwrap_or_default(),
        });
    }
    let tool_choice = match &req.tool_choice {
        None => String::new(),
        Some(Value::String(s)) if matches!(s.as_str(), "auto" | "none" | "required") => s.clone(),
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) => name.to_owned(),
            None => {
                return Err(wire_err(
                    "tool_choice",
                    "use \"auto\", \"none\", \"required\" or {\"type\":\"function\",\"function\":{\"name\":...}}",
                ));
            }
        },
    };
    let n = req.n.unwrap_or(1);
    if !(1..=128).contains(&n) {
        return Err(wire_err("n", "must be between 1 and 128"));
    }
    if let Some(t) = req.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(wire_err("temperature", "must be between 0 and 2"));
    }
    if let Some(p) = req.top_p
        && !(0.0..=1.0).contains(&p)
    {
        return Err(wire_err("top_p", "must be between 0 and 1"));
    }
    let stop = match &req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
        Some(Stop::Many(_)) => return Err(wire_err("stop", "at most 4 stop sequences")),
    };
    Ok(pb::CompleteRequest {
        model: req.model.clone(),
        messages,
        tools,
        tool_choice,
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        n,
        stop,
        seed: req.seed,
        response_format_json: req
            .response_format
            .as_ref()
            .map(Value::to_string)
            .unwrap_or_default(),
        logprobs: req.logprobs.unwrap_or(false),
        top_logprobs: req.top_logprobs,
        routing: None,
        user: req.user.clone().unwrap_or_default(),
        request_id: String::new(),
        agent: String::new(),
        run_id: String::new(),
    })
}

fn message_to_wire(m: &pb::ChatMessage) -> Message {
    let tool_calls: Vec<ToolCall> = m
        .tool_calls
        .iter()
        .map(|c| ToolCall {
            id: c.id.clone(),
            kind: function_type(),
            function: FunctionCall {
                name: c.name.clone(),
                arguments: c.arguments_json.clone(),
            },
        })
        .collect();
    Message {
        role: role_to_wire(m.role).to_owned(),
        content: m.content.clone().map(Content::Text),
        tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
        tool_call_id: (!m.tool_call_id.is_empty()).then(|| m.tool_call_id.clone()),
        name: (!m.name.is_empty()).then(|| m.name.clone()),
    }
}

/// Builds the request sent to an OpenAI-compatible provider for `upstream_model`.
pub fn request_from_proto(req: &pb::CompleteRequest, upstream_model: &str) -> ChatRequest {
    let parse = |s: &str| {
        (!s.is_empty())
            .then(|| serde_json::from_str(s).ok())
            .flatten()
    };
    ChatRequest {
        model: upstream_model.to_owned(),
        messages: req.messages.iter().map(message_to_wire).collect(),
        tools: req
            .tools
            .iter()
            .map(|t| Tool {
                kind: function_type(),
                function: FunctionDef {
                    name: t.name.clone(),
                    description: (!t.description.is_empty()).then(|| t.description.clone()),
                    parameters: parse(&t.parameters_json),
                },
            })
            .collect(),
        tool_choice: match req.tool_choice.as_str() {
            "" => None,
            "auto" | "none" | "required" => Some(Value::String(req.tool_choice.clone())),
            name => Some(serde_json::json!({"type": "function", "function": {"name": name}})),
        },
        max_tokens: req.max_tokens,
        max_completion_tokens: None,
        temperature: req.temperature,
        top_p: req.top_p,
        n: (req.n > 1).then_some(req.n),
        stop: match req.stop.len() {
            0 => None,
            _ => Some(Stop::Many(req.stop.clone())),
        },
        seed: req.seed,
        response_format: parse(&req.response_format_json),
        logprobs: req.logprobs.then_some(true),
        top_logprobs: req.top_logprobs,
        user: (!req.user.is_empty()).then(|| req.user.clone()),
        stream: None,
        stream_options: None,
    }
}

/// Converts a provider's answer into the router's message (call info is added by
/// the router).
pub fn response_to_proto(resp: ChatResponse) -> Result<pb::CompleteResponse, WireError> {
    let mut choices = Vec::with_capacity(resp.choices.len());
    for (i, c) in resp.choices.into_iter().enumerate() {
        let role = role_from_wire(&c.message.role, i).unwrap_or(pb::Role::Assistant);
        choices.push(pb::Choice {
            index: c.index,
            message: Some(pb::ChatMessage {
                role: role as i32,
                content: c.message.content.as_ref().map(Content::text),
                tool_calls: c
                    .message
                    .tool_calls
                    .unwrap_or_default()
                    .into_iter()
                    .map(|t| pb::ToolCall {
                        id: t.id,
                        name: t.function.name,
                        arguments_json: t.function.arguments,
                    })
                    .collect(),
                tool_call_id: String::new(),
                name: String::new(),
            }),
            finish_reason: c.finish_reason.unwrap_or_default(),
            logprobs_json: c
                .logprobs
                .filter(|v| !v.is_null())
                .map(|v| v.to_string())
                .unwrap_or_default(),
        });
    }
    if choices.is_empty() {
        return Err(wire_err("choices", "the provider returned no choices"));
    }
    let usage = resp.usage.unwrap_or_default();
    Ok(pb::CompleteResponse {
        id: resp.id,
        model: resp.model,
        created: resp.created,
        choices,
        usage: Some(TokenUsage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens,
        }),
        system_fingerprint: resp.system_fingerprint.unwrap_or_default(),
        call: None,
        request_id: String::new(),
    })
}

/// Builds the answer to a client from the router's response.
pub fn response_from_proto(resp: &pb::CompleteResponse) -> ChatResponse {
    let usage = resp.usage.unwrap_or_default();
    ChatResponse {
        id: resp.id.clone(),
        object: completion_object(),
        created: resp.created,
        model: resp.model.clone(),
        choices: resp
            .choices
            .iter()
            .map(|c| Choice {
                index: c.index,
                message: c.message.as_ref().map(message_to_wire).unwrap_or_default(),
                finish_reason: Some(c.finish_reason.clone()).filter(|s| !s.is_empty()),
                logprobs: serde_json::from_str(&c.logprobs_json).ok(),
            })
            .collect(),
        usage: Some(Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens,
        }),
        system_fingerprint: Some(resp.system_fingerprint.clone()).filter(|s| !s.is_empty()),
    }
}

/// One `chat.completion.chunk` of an OpenAI-compatible SSE stream.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ChatChunk {
    #[serde(default)]
    pub id: String,
    #[serde(default = "chunk_object")]
    pub object: String,
    #[serde(default)]
    pub created: i64,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    /// Present on the last chunk when `stream_options.include_usage` was asked for.
    #[serde(default)]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
}

fn chunk_object() -> String {
    "chat.completion.chunk".to_owned()
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ChunkChoice {
    #[serde(default)]
    pub index: u32,
    #[serde(default)]
    pub delta: ChunkDelta,
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ChunkDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallChunk>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ToolCallChunk {
    #[serde(default)]
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionChunk>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
pub struct FunctionChunk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// The router's deltas of one provider chunk (a usage-only chunk gives none).
pub fn chunk_to_proto(chunk: &ChatChunk) -> Vec<pb::StreamDelta> {
    chunk
        .choices
        .iter()
        .map(|c| pb::StreamDelta {
            index: c.index,
            role: c
                .delta
                .role
                .as_deref()
                .and_then(|r| role_from_wire(r, 0).ok())
                .map(|r| r as i32)
                .unwrap_or(pb::Role::Unspecified as i32),
            content: c.delta.content.clone(),
            tool_calls: c
                .delta
                .tool_calls
                .iter()
                .flatten()
                .map(|t| pb::ToolCallDelta {
                    index: t.index,
                    id: t.id.clone().unwrap_or_default(),
                    name: t
                        .function
                        .as_ref()
                        .and_then(|f| f.name.clone())
                        .unwrap_or_default(),
                    arguments_json: t
                        .function
                        .as_ref()
                        .and_then(|f| f.arguments.clone())
                        .unwrap_or_default(),
                })
                .collect(),
            finish_reason: c.finish_reason.clone().unwrap_or_default(),
        })
        .collect()
}

/// The chunk a client receives for one router delta.
pub fn chunk_from_proto(id: &str, model: &str, created: i64, delta: &pb::StreamDelta) -> ChatChunk {
    let role =
        (delta.role != pb::Role::Unspecified as i32).then(|| role_to_wire(delta.role).to_owned());
    let tool_calls: Vec<ToolCallChunk> = delta
        .tool_calls
        .iter()
        .map(|t| ToolCallChunk {
            index: t.index,
            id: (!t.id.is_empty()).then(|| t.id.clone()),
            kind: (!t.id.is_empty()).then(function_type),
            function: Some(FunctionChunk {
                name: (!t.name.is_empty()).then(|| t.name.clone()),
                arguments: Some(t.arguments_json.clone()),
            }),
        })
        .collect();
    ChatChunk {
        id: id.to_owned(),
        object: chunk_object(),
        created,
        model: model.to_owned(),
        choices: vec![ChunkChoice {
            index: delta.index,
            delta: ChunkDelta {
                role,
                content: delta.content.clone(),
                tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
            },
            finish_reason: (!delta.finish_reason.is_empty()).then(|| delta.finish_reason.clone()),
            logprobs: None,
        }],
        usage: None,
        system_fingerprint: None,
    }
}

/// Builds the streaming request sent to an OpenAI-compatible provider: as
/// [`request_from_proto`], with `stream` and `stream_options.include_usage` set.
pub fn stream_request_from_proto(req: &pb::CompleteRequest, upstream_model: &str) -> ChatRequest {
    let mut out = request_from_proto(req, upstream_model);
    out.stream = Some(true);
    out.stream_options = Some(serde_json::json!({"include_usage": true}));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> ChatRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn round_trips_a_tool_conversation() {
        let req = parse(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "!"}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}
            ],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "stop": "END",
            "some_future_param": true
        }));
        let pb = request_to_proto(&req).unwrap();
        assert_eq!(pb.messages[1].content.as_deref(), Some("hi!"));
        assert_eq!(pb.messages[2].tool_calls[0].name, "f");
        assert_eq!(pb.tool_choice, "f");
        assert_eq!(pb.stop, vec!["END".to_owned()]);
        let out = request_from_proto(&pb, "upstream-x");
        assert_eq!(out.model, "upstream-x");
        assert_eq!(out.messages[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(
            out.tools[0].function.parameters,
            Some(serde_json::json!({"type": "object"}))
        );
        assert_eq!(
            out.tool_choice,
            Some(serde_json::json!({"type": "function", "function": {"name": "f"}}))
        );
    }

    #[test]
    fn names_the_bad_parameter() {
        let bad = |v| request_to_proto(&parse(v)).unwrap_err().param;
        assert_eq!(
            bad(serde_json::json!({"model": "", "messages": []})),
            "model"
        );
        assert_eq!(
            bad(serde_json::json!({"model": "m", "messages": []})),
            "messages"
        );
        assert_eq!(
            bad(
                serde_json::json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]})
            ),
            "messages[0].role"
        );
        assert_eq!(
            bad(serde_json::json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]})),
            "messages[0].tool_call_id"
        );
        assert_eq!(
            bad(
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0})
            ),
            "n"
        );
        assert_eq!(
            bad(
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3.5})
            ),
            "temperature"
        );
    }

    #[test]
    fn provider_response_maps_to_client_response() {
        let resp: ChatResponse = serde_json::from_value(serde_json::json!({
            "id": "x", "object": "chat.completion", "created": 1, "model": "up",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        }))
        .unwrap();
        let pb = response_to_proto(resp).unwrap();
        assert_eq!(pb.usage.unwrap().total_tokens, 5);
        let back = response_from_proto(&pb);
        assert_eq!(
            back.choices[0].message.content,
            Some(Content::Text("hello".into()))
        );
        assert_eq!(back.choices[0].finish_reason.as_deref(), Some("stop"));
        assert_eq!(back.usage.unwrap().prompt_tokens, 3);
    }

    #[test]
    fn stream_chunks_map_both_ways() {
        let chunk: ChatChunk = serde_json::from_value(serde_json::json!({
            "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up",
            "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]},
                "finish_reason": null}],
            "usage": null
        }))
        .unwrap();
        let deltas = chunk_to_proto(&chunk);
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].role, pb::Role::Assistant as i32);
        assert_eq!(deltas[0].tool_calls[0].id, "call_1");
        assert_eq!(deltas[0].tool_calls[0].name, "f");
        let back = chunk_from_proto("x", "alias", 7, &deltas[0]);
        assert_eq!(back.choices[0].delta.role.as_deref(), Some("assistant"));
        let calls = back.choices[0].delta.tool_calls.as_ref().unwrap();
        assert_eq!(calls[0].kind.as_deref(), Some("function"));
        assert_eq!(
            calls[0].function.as_ref().unwrap().name.as_deref(),
            Some("f")
        );
        let usage_only: ChatChunk = serde_json::from_value(serde_json::json!({
            "id": "c", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
        }))
        .unwrap();
        assert!(chunk_to_proto(&usage_only).is_empty());
        assert_eq!(usage_only.usage.unwrap().total_tokens, 5);
        let req = stream_request_from_proto(&pb::CompleteRequest::default(), "m");
        assert_eq!(req.stream, Some(true));
    }
}
