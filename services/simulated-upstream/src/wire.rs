//! OpenAI chat-completions wire format: a lenient request parser that keeps only what the
//! simulation needs (and names the offending parameter when something is wrong), and the
//! response shapes the simulated upstream writes.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{ApiError, Result};

/// Model named in the reply when a request names none.
pub(crate) const DEFAULT_MODEL: &str = "sim-small";
/// Largest `n` accepted, as in the OpenAI API.
pub(crate) const MAX_CHOICES: u32 = 128;
/// `object` of a non-streamed reply.
pub(crate) const COMPLETION_OBJECT: &str = "chat.completion";
/// `object` of a streamed chunk.
pub(crate) const CHUNK_OBJECT: &str = "chat.completion.chunk";

/// The parts of a chat-completions request the simulation acts on. Unknown and ignored
/// fields (`temperature`, `seed`, `response_format`, `logprobs`, ...) are dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChatRequest {
    pub(crate) model: String,
    pub(crate) messages: Vec<Message>,
    /// Names of the declared function tools, in order.
    pub(crate) tools: Vec<String>,
    pub(crate) tool_choice: ToolChoice,
    pub(crate) stream: bool,
    /// `stream_options.include_usage`.
    pub(crate) include_usage: bool,
    pub(crate) n: u32,
    /// Non-empty stop sequences.
    pub(crate) stop: Vec<String>,
    /// `max_completion_tokens`, else `max_tokens`.
    pub(crate) max_tokens: Option<u64>,
}

/// One input message reduced to its role and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub(crate) role: String,
    /// The string content, or the `text` of every content part concatenated; empty when
    /// `content` is null or absent (an assistant message with only `tool_calls`).
    pub(crate) text: String,
}

/// `tool_choice` of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToolChoice {
    Auto,
    None,
    Required,
    /// `{"type":"function","function":{"name":...}}`; always one of the declared tools.
    Function(String),
}

impl ChatRequest {
    /// Parses and checks a request body.
    pub(crate) fn parse(body: &[u8]) -> Result<Self> {
        let value: Value =
            serde_json::from_slice(body).map_err(|err| ApiError::InvalidJson(err.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(ApiError::invalid("the request body must be a JSON object"));
        };
        let model = match obj.get("model") {
            None | Some(Value::Null) => DEFAULT_MODEL.to_owned(),
            Some(Value::String(model)) => model.clone(),
            Some(_) => return Err(ApiError::invalid_param("'model' must be a string", "model")),
        };
        let messages = parse_messages(obj.get("messages"))?;
        let tools = parse_tools(obj.get("tools"))?;
        let tool_choice = parse_tool_choice(obj.get("tool_choice"), &tools)?;
        let stream = optional_bool(&obj, "stream", "stream")?.unwrap_or(false);
        let include_usage = match obj.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(options)) => {
                optional_bool(options, "include_usage", "stream_options.include_usage")?
                    .unwrap_or(false)
            }
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "'stream_options' must be an object",
                    "stream_options",
                ));
            }
        };
        let n = match obj.get("n") {
            None | Some(Value::Null) => 1,
            Some(value) => value
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| (1..=MAX_CHOICES).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        format!("'n' must be an integer between 1 and {MAX_CHOICES}"),
                        "n",
                    )
                })?,
        };
        let stop = parse_stop(obj.get("stop"))?;
        let max_completion_tokens = optional_u64(&obj, "max_completion_tokens")?;
        let max_tokens = optional_u64(&obj, "max_tokens")?;
        Ok(Self {
            model,
            messages,
            tools,
            tool_choice,
            stream,
            include_usage,
            n,
            stop,
            max_tokens: max_completion_tokens.or(max_tokens),
        })
    }
}

fn parse_messages(value: Option<&Value>) -> Result<Vec<Message>> {
    let items = match value {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                "missing required parameter: 'messages'",
                "messages",
            ));
        }
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "'messages' must be an array of message objects",
                "messages",
            ));
        }
    };
    if items.is_empty() {
        return Err(ApiError::invalid_param(
            "'messages' must contain at least one message",
            "messages",
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(index, item)| parse_message(index, item))
        .collect()
}

fn parse_message(index: usize, value: &Value) -> Result<Message> {
    let param = format!("messages[{index}]");
    let Value::Object(message) = value else {
        return Err(ApiError::invalid_param(
            format!("'{param}' must be an object"),
            param,
        ));
    };
    let role = match message.get("role") {
        Some(Value::String(role)) => role.clone(),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                format!("missing required parameter: '{param}.role'"),
                format!("{param}.role"),
            ));
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                format!("'{param}.role' must be a string"),
                format!("{param}.role"),
            ));
        }
    };
    let text = match message.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (part_index, part) in parts.iter().enumerate() {
                let Value::Object(part) = part else {
                    return Err(ApiError::invalid_param(
                        format!("'{param}.content[{part_index}]' must be a content part object"),
                        format!("{param}.content[{part_index}]"),
                    ));
                };
                // Image, audio and file parts carry no text; the simulation skips them.
                if let Some(Value::String(part_text)) = part.get("text") {
                    text.push_str(part_text);
                }
            }
            text
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                format!("'{param}.content' must be a string or an array of content parts"),
                format!("{param}.content"),
            ));
        }
    };
    Ok(Message { role, text })
}

fn parse_tools(value: Option<&Value>) -> Result<Vec<String>> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::invalid_param("'tools' must be an array", "tools")),
    };
    items
        .iter()
        .enumerate()
        .map(|(index, tool)| {
            function_name(tool).map(str::to_owned).ok_or_else(|| {
                ApiError::invalid_param(
                    format!("missing required parameter: 'tools[{index}].function.name'"),
                    format!("tools[{index}].function.name"),
                )
            })
        })
        .collect()
}

fn function_name(value: &Value) -> Option<&str> {
    value.get("function")?.get("name")?.as_str()
}

fn parse_tool_choice(value: Option<&Value>, tools: &[String]) -> Result<ToolChoice> {
    const EXPECTED: &str = "'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\":\"function\",\"function\":{\"name\":...}}";
    match value {
        None | Some(Value::Null) => Ok(ToolChoice::Auto),
        Some(Value::String(choice)) => match choice.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "none" => Ok(ToolChoice::None),
            "required" => Ok(ToolChoice::Required),
            _ => Err(ApiError::invalid_param(EXPECTED, "tool_choice")),
        },
        Some(choice @ Value::Object(_)) => {
            let name = function_name(choice)
                .ok_or_else(|| ApiError::invalid_param(EXPECTED, "tool_choice"))?;
            if tools.iter().any(|tool| tool == name) {
                Ok(ToolChoice::Function(name.to_owned()))
            } else {
                Err(ApiError::invalid_param(
                    format!("'tool_choice' names function {name:?}, which is not in 'tools'"),
                    "tool_choice",
                ))
            }
        }
        Some(_) => Err(ApiError::invalid_param(EXPECTED, "tool_choice")),
    }
}

fn parse_stop(value: Option<&Value>) -> Result<Vec<String>> {
    let invalid =
        || ApiError::invalid_param("'stop' must be a string or an array of strings", "stop");
    let mut stop = match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(stop)) => vec![stop.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned).ok_or_else(invalid))
            .collect::<Result<Vec<_>>>()?,
        Some(_) => return Err(invalid()),
    };
    stop.retain(|sequence| !sequence.is_empty());
    Ok(stop)
}

fn optional_bool(obj: &Map<String, Value>, key: &str, param: &str) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(*value)),
        Some(_) => Err(ApiError::invalid_param(
            format!("'{param}' must be a boolean"),
            param,
        )),
    }
}

fn optional_u64(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or_else(|| {
            ApiError::invalid_param(format!("'{key}' must be a non-negative integer"), key)
        }),
    }
}

/// `finish_reason` of a choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FinishReason {
    Stop,
    Length,
    ToolCalls,
}

/// Token accounting of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    pub(crate) total_tokens: u64,
}

/// A complete tool call in a non-streamed reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ToolCall {
    pub(crate) id: String,
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) function: FunctionCall,
}

/// The function half of a tool call; `arguments` is a JSON document in a string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct FunctionCall {
    pub(crate) name: String,
    pub(crate) arguments: String,
}

/// Body of a non-streamed reply.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChatCompletion {
    pub(crate) id: String,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) choices: Vec<Choice>,
    pub(crate) usage: Usage,
    pub(crate) system_fingerprint: &'static str,
}

/// One choice of a non-streamed reply.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Choice {
    pub(crate) index: u32,
    pub(crate) message: AssistantMessage,
    /// Always null: the simulation has no log probabilities.
    pub(crate) logprobs: Option<()>,
    pub(crate) finish_reason: FinishReason,
}

/// The assistant message of a choice.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AssistantMessage {
    pub(crate) role: &'static str,
    /// Null when the reply is a tool call.
    pub(crate) content: Option<String>,
    /// Always null.
    pub(crate) refusal: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) tool_calls: Vec<ToolCall>,
}

/// One streamed chunk.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChatCompletionChunk {
    pub(crate) id: String,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) system_fingerprint: &'static str,
    pub(crate) choices: Vec<ChunkChoice>,
    /// Absent unless `stream_options.include_usage`; then null on every chunk but the
    /// last, as OpenAI does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) usage: Option<Option<Usage>>,
}

/// One choice of a streamed chunk.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChunkChoice {
    pub(crate) index: u32,
    pub(crate) delta: Delta,
    pub(crate) logprobs: Option<()>,
    pub(crate) finish_reason: Option<FinishReason>,
}

/// The incremental message of a streamed choice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) role: Option<&'static str>,
    /// `Some(None)` writes `"content":null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) content: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tool_calls: Option<Vec<ToolCallDelta>>,
}

/// One streamed piece of a tool call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ToolCallDelta {
    pub(crate) index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub(crate) kind: Option<&'static str>,
    pub(crate) function: FunctionDelta,
}

/// The function half of a streamed tool-call piece.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
    pub(crate) arguments: String,
}

/// Body of `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ModelList {
    pub(crate) object: &'static str,
    pub(crate) data: Vec<ModelCard>,
}

/// One model of `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ModelCard {
    pub(crate) id: String,
    pub(crate) object: &'static str,
    pub(crate) created: u64,
    pub(crate) owned_by: &'static str,
}

impl ModelCard {
    pub(crate) fn simulated(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            object: "model",
            created: 0,
            owned_by: "crewmesh-simulated",
        }
    }
}

/// OpenAI error body.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: ErrorDetail,
}

/// The inside of an OpenAI error body.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ErrorDetail {
    pub(crate) message: String,
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) param: Option<String>,
    pub(crate) code: Option<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ChatRequest> {
        ChatRequest::parse(body.as_bytes())
    }

    fn invalid_message(body: &str) -> (String, Option<String>) {
        match parse(body) {
            Err(ApiError::InvalidRequest { message, param }) => (message, param),
            other => panic!("expected an invalid request, got {other:?}"),
        }
    }

    #[test]
    fn minimal_request_gets_defaults() {
        let req = parse(r#"{"model":"sim-small","messages":[{"role":"user","content":"hi"}]}"#)
            .expect("valid");
        assert_eq!(
            req,
            ChatRequest {
                model: "sim-small".into(),
                messages: vec![Message {
                    role: "user".into(),
                    text: "hi".into()
                }],
                tools: vec![],
                tool_choice: ToolChoice::Auto,
                stream: false,
                include_usage: false,
                n: 1,
                stop: vec![],
                max_tokens: None,
            }
        );
    }

    #[test]
    fn full_request_with_unknown_fields_parses() {
        let req = parse(
            r#"{
                "model": "gpt-4o", "temperature": 0.2, "seed": 7, "logprobs": false,
                "response_format": {"type": "json_object"}, "something_new": [1, 2],
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "name": "ann", "content": [
                        {"type": "text", "text": "look "},
                        {"type": "image_url", "image_url": {"url": "data:,"}},
                        {"type": "text", "text": "here"}
                    ]},
                    {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "c", "content": "42"}
                ],
                "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}},
                          {"type": "function", "function": {"name": "other"}}],
                "tool_choice": {"type": "function", "function": {"name": "other"}},
                "stream": true, "stream_options": {"include_usage": true},
                "n": 3, "stop": ["END", ""], "max_tokens": 10, "max_completion_tokens": 5
            }"#,
        )
        .expect("valid");
        assert_eq!(req.model, "gpt-4o");
        let texts: Vec<_> = req.messages.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["be brief", "look here", "", "42"]);
        assert_eq!(req.tools, ["lookup", "other"]);
        assert_eq!(req.tool_choice, ToolChoice::Function("other".into()));
        assert!(req.stream);
        assert!(req.include_usage);
        assert_eq!(req.n, 3);
        assert_eq!(req.stop, ["END"]);
        assert_eq!(req.max_tokens, Some(5));
    }

    #[test]
    fn missing_model_falls_back_and_stop_string_is_accepted() {
        let req = parse(r#"{"messages":[{"role":"user","content":"x"}],"stop":"\n","max_tokens":2,"tool_choice":"none"}"#)
            .expect("valid");
        assert_eq!(req.model, DEFAULT_MODEL);
        assert_eq!(req.stop, ["\n"]);
        assert_eq!(req.max_tokens, Some(2));
        assert_eq!(req.tool_choice, ToolChoice::None);
    }

    #[test]
    fn bad_json_is_reported_as_such() {
        assert!(matches!(parse("{not json"), Err(ApiError::InvalidJson(_))));
        assert!(matches!(parse(""), Err(ApiError::InvalidJson(_))));
        let (message, param) = invalid_message("[1,2]");
        assert_eq!(message, "the request body must be a JSON object");
        assert_eq!(param, None);
    }

    #[test]
    fn missing_or_empty_messages_are_named() {
        assert_eq!(
            invalid_message(r#"{"model":"m"}"#),
            (
                "missing required parameter: 'messages'".to_owned(),
                Some("messages".to_owned())
            )
        );
        assert_eq!(
            invalid_message(r#"{"model":"m","messages":[]}"#).0,
            "'messages' must contain at least one message"
        );
        assert_eq!(
            invalid_message(r#"{"model":"m","messages":"hi"}"#).0,
            "'messages' must be an array of message objects"
        );
    }

    #[test]
    fn malformed_messages_name_their_index() {
        assert_eq!(
            invalid_message(r#"{"messages":[{"role":"user","content":"a"},{"content":"b"}]}"#),
            (
                "missing required parameter: 'messages[1].role'".to_owned(),
                Some("messages[1].role".to_owned())
            )
        );
        assert_eq!(
            invalid_message(r#"{"messages":[{"role":"user","content":5}]}"#).1,
            Some("messages[0].content".to_owned())
        );
        assert_eq!(
            invalid_message(r#"{"messages":[{"role":"user","content":["x"]}]}"#).1,
            Some("messages[0].content[0]".to_owned())
        );
        assert_eq!(
            invalid_message(r#"{"messages":[7]}"#).0,
            "'messages[0]' must be an object"
        );
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let user = r#""messages":[{"role":"user","content":"a"}]"#;
        for (extra, param) in [
            (r#""n":0"#, "n"),
            (r#""n":129"#, "n"),
            (r#""n":-1"#, "n"),
            (r#""n":1.5"#, "n"),
            (r#""stream":"yes""#, "stream"),
            (
                r#""stream_options":{"include_usage":1}"#,
                "stream_options.include_usage",
            ),
            (r#""stream_options":true"#, "stream_options"),
            (r#""stop":[1]"#, "stop"),
            (r#""max_tokens":-3"#, "max_tokens"),
            (r#""tools":{}"#, "tools"),
            (r#""tools":[{"type":"function"}]"#, "tools[0].function.name"),
            (r#""tool_choice":"sometimes""#, "tool_choice"),
            (
                r#""tools":[{"function":{"name":"a"}}],"tool_choice":{"type":"function","function":{"name":"b"}}"#,
                "tool_choice",
            ),
            (r#""model":12"#, "model"),
        ] {
            let (_, got) = invalid_message(&format!("{{{user},{extra}}}"));
            assert_eq!(got.as_deref(), Some(param), "for {extra}");
        }
    }

    #[test]
    fn chunk_usage_field_is_absent_null_or_present() {
        let chunk = |usage| ChatCompletionChunk {
            id: "i".into(),
            object: CHUNK_OBJECT,
            created: 1,
            model: "m".into(),
            system_fingerprint: "f",
            choices: vec![],
            usage,
        };
        assert!(
            !serde_json::to_string(&chunk(None))
                .expect("encodes")
                .contains("usage")
        );
        assert!(
            serde_json::to_string(&chunk(Some(None)))
                .expect("encodes")
                .ends_with(r#""usage":null}"#)
        );
    }
}
