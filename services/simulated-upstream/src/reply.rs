//! The deterministic reply logic: what the simulated model "says" for a request, how many
//! tokens it "used", and the ids it hands out. Pure functions, no I/O.

use sha2::{Digest, Sha256};

use crate::wire::{
    AssistantMessage, COMPLETION_OBJECT, ChatCompletion, ChatRequest, Choice, FinishReason,
    FunctionCall, Message, ToolCall, ToolChoice, Usage,
};

/// Fixed `created` timestamp of every reply, so replies are byte-for-byte reproducible.
pub(crate) const CREATED: u64 = 1_700_000_000;
/// `system_fingerprint` of every reply.
pub(crate) const SYSTEM_FINGERPRINT: &str = "crewmesh-simulated";
/// Longest echoed text, in characters.
pub(crate) const ECHO_LIMIT_CHARS: usize = 2_000;
/// Characters counted as one token.
const CHARS_PER_TOKEN: usize = 4;

/// What the simulated model answers, before it is shaped into choices or chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) body: ReplyBody,
    /// Usage over all `n` choices.
    pub(crate) usage: Usage,
}

/// The content of each (identical) choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReplyBody {
    Text {
        content: String,
        finish_reason: FinishReason,
    },
    ToolCall(ToolCall),
}

impl ReplyBody {
    pub(crate) fn finish_reason(&self) -> FinishReason {
        match self {
            Self::Text { finish_reason, .. } => *finish_reason,
            Self::ToolCall(_) => FinishReason::ToolCalls,
        }
    }

    /// Characters the model "generated" for one choice.
    fn generated_chars(&self) -> usize {
        match self {
            Self::Text { content, .. } => content.chars().count(),
            Self::ToolCall(call) => {
                call.function.name.chars().count() + call.function.arguments.chars().count()
            }
        }
    }
}

/// `"chatcmpl-sim-"` and the first 24 hex digits of the SHA-256 of the raw request body.
pub(crate) fn completion_id(body: &[u8]) -> String {
    format!("chatcmpl-sim-{}", hex_prefix(body, 24))
}

/// `"call_"` and the first 16 hex digits of the SHA-256 of the user text.
pub(crate) fn tool_call_id(user_text: &str) -> String {
    format!("call_{}", hex_prefix(user_text.as_bytes(), 16))
}

fn hex_prefix(data: &[u8], digits: usize) -> String {
    let mut encoded = hex::encode(Sha256::digest(data));
    encoded.truncate(digits);
    encoded
}

/// `ceil(chars / 4)`.
pub(crate) fn tokens_for_chars(chars: usize) -> u64 {
    u64::try_from(chars.div_ceil(CHARS_PER_TOKEN)).unwrap_or(u64::MAX)
}

/// `ceil(total content chars / 4) + 1 per message`, at least 1.
pub(crate) fn prompt_tokens(messages: &[Message]) -> u64 {
    let chars: usize = messages.iter().map(|m| m.text.chars().count()).sum();
    let per_message = u64::try_from(messages.len()).unwrap_or(u64::MAX);
    tokens_for_chars(chars).saturating_add(per_message).max(1)
}

/// The first `limit` characters of `text`.
pub(crate) fn truncate_chars(text: &str, limit: usize) -> &str {
    match text.char_indices().nth(limit) {
        Some((byte_index, _)) => &text[..byte_index],
        None => text,
    }
}

/// Text of the last `user` message; empty when there is none.
fn last_user_text(messages: &[Message]) -> &str {
    messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map_or("", |m| m.text.as_str())
}

/// The tool the reply calls, if it calls one.
fn chosen_tool(req: &ChatRequest) -> Option<&str> {
    let last_is_user = req.messages.last().is_some_and(|m| m.role == "user");
    if !last_is_user {
        return None;
    }
    match &req.tool_choice {
        ToolChoice::None => None,
        ToolChoice::Function(name) => Some(name),
        ToolChoice::Auto | ToolChoice::Required => req.tools.first().map(String::as_str),
    }
}

/// Cuts `content` at the earliest stop sequence, then at `max_tokens * 4` characters.
fn apply_limits(
    mut content: String,
    stop: &[String],
    max_tokens: Option<u64>,
) -> (String, FinishReason) {
    if let Some(cut) = stop.iter().filter_map(|s| content.find(s.as_str())).min() {
        content.truncate(cut);
    }
    if let Some(max_tokens) = max_tokens {
        let limit = usize::try_from(max_tokens)
            .unwrap_or(usize::MAX)
            .saturating_mul(CHARS_PER_TOKEN);
        let kept = truncate_chars(&content, limit).len();
        if kept < content.len() {
            content.truncate(kept);
            return (content, FinishReason::Length);
        }
    }
    (content, FinishReason::Stop)
}

/// The deterministic reply to `req`.
pub(crate) fn build_reply(req: &ChatRequest) -> Reply {
    let body = if let Some(name) = chosen_tool(req) {
        let user_text = last_user_text(&req.messages);
        let arguments = serde_json::json!({ "input": user_text }).to_string();
        ReplyBody::ToolCall(ToolCall {
            id: tool_call_id(user_text),
            kind: "function",
            function: FunctionCall {
                name: name.to_owned(),
                arguments,
            },
        })
    } else {
        let raw = match req.messages.last() {
            Some(last) if last.role == "tool" => format!(
                "[simulated] tool result: {}",
                truncate_chars(&last.text, ECHO_LIMIT_CHARS)
            ),
            _ => format!(
                "[simulated] echo: {}",
                truncate_chars(last_user_text(&req.messages), ECHO_LIMIT_CHARS)
            ),
        };
        let (content, finish_reason) = apply_limits(raw, &req.stop, req.max_tokens);
        ReplyBody::Text {
            content,
            finish_reason,
        }
    };
    let prompt_tokens = prompt_tokens(&req.messages);
    let completion_tokens = tokens_for_chars(body.generated_chars())
        .max(1)
        .saturating_mul(u64::from(req.n));
    Reply {
        body,
        usage: Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        },
    }
}

/// The non-streamed body: `n` identical choices.
pub(crate) fn completion(id: String, req: &ChatRequest, reply: &Reply) -> ChatCompletion {
    let message = match &reply.body {
        ReplyBody::Text { content, .. } => AssistantMessage {
            role: "assistant",
            content: Some(content.clone()),
            refusal: None,
            tool_calls: Vec::new(),
        },
        ReplyBody::ToolCall(call) => AssistantMessage {
            role: "assistant",
            content: None,
            refusal: None,
            tool_calls: vec![call.clone()],
        },
    };
    ChatCompletion {
        id,
        object: COMPLETION_OBJECT,
        created: CREATED,
        model: req.model.clone(),
        choices: (0..req.n)
            .map(|index| Choice {
                index,
                message: message.clone(),
                logprobs: None,
                finish_reason: reply.body.finish_reason(),
            })
            .collect(),
        usage: reply.usage,
        system_fingerprint: SYSTEM_FINGERPRINT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: &str) -> ChatRequest {
        ChatRequest::parse(body.as_bytes()).expect("test request is valid")
    }

    fn text_of(reply: &Reply) -> (&str, FinishReason) {
        match &reply.body {
            ReplyBody::Text {
                content,
                finish_reason,
            } => (content, *finish_reason),
            ReplyBody::ToolCall(call) => panic!("expected text, got tool call {call:?}"),
        }
    }

    #[test]
    fn ids_are_sha256_prefixes() {
        // sha256("hello") = 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824
        assert_eq!(tool_call_id("hello"), "call_2cf24dba5fb0a30e");
        assert_eq!(
            completion_id(b"hello"),
            "chatcmpl-sim-2cf24dba5fb0a30e26e83b2a"
        );
    }

    #[test]
    fn token_counting() {
        assert_eq!(tokens_for_chars(0), 0);
        assert_eq!(tokens_for_chars(1), 1);
        assert_eq!(tokens_for_chars(4), 1);
        assert_eq!(tokens_for_chars(5), 2);
        let messages = [
            Message {
                role: "system".into(),
                text: "You are helpful.".into(), // 16 chars
            },
            Message {
                role: "user".into(),
                text: "héllo".into(), // 5 chars, 6 bytes
            },
        ];
        // ceil(21 / 4) + 2
        assert_eq!(prompt_tokens(&messages), 8);
        let empty = [Message {
            role: "assistant".into(),
            text: String::new(),
        }];
        assert_eq!(prompt_tokens(&empty), 1);
    }

    #[test]
    fn echoes_the_last_user_message() {
        let reply = build_reply(&request(
            r#"{"model":"m","messages":[
                {"role":"system","content":"You are helpful."},
                {"role":"user","content":"first"},
                {"role":"assistant","content":"ok"},
                {"role":"user","content":"hello"}]}"#,
        ));
        assert_eq!(
            text_of(&reply),
            ("[simulated] echo: hello", FinishReason::Stop)
        );
        // prompt: 16 + 5 + 2 + 5 = 28 chars -> 7, + 4 messages; completion: 23 chars -> 6
        assert_eq!(
            reply.usage,
            Usage {
                prompt_tokens: 11,
                completion_tokens: 6,
                total_tokens: 17
            }
        );
    }

    #[test]
    fn echo_with_no_user_message_is_empty() {
        let reply = build_reply(&request(
            r#"{"messages":[{"role":"system","content":"s"}]}"#,
        ));
        assert_eq!(text_of(&reply).0, "[simulated] echo: ");
    }

    #[test]
    fn long_echo_is_truncated_to_2000_chars() {
        let long = "é".repeat(2_500);
        let body = serde_json::json!({"messages":[{"role":"user","content":long}]}).to_string();
        let reply = build_reply(&request(&body));
        let (content, finish) = text_of(&reply);
        assert_eq!(content.chars().count(), "[simulated] echo: ".len() + 2_000);
        assert!(content.ends_with('é'));
        assert_eq!(finish, FinishReason::Stop);
    }

    #[test]
    fn tool_result_is_echoed() {
        let reply = build_reply(&request(
            r#"{"messages":[{"role":"user","content":"hi"},
                {"role":"assistant","content":null,"tool_calls":[]},
                {"role":"tool","tool_call_id":"call_1","content":"sunny"}],
                "tools":[{"type":"function","function":{"name":"weather"}}]}"#,
        ));
        assert_eq!(
            text_of(&reply),
            ("[simulated] tool result: sunny", FinishReason::Stop)
        );
    }

    #[test]
    fn tools_produce_a_call_to_the_first_tool() {
        let reply = build_reply(&request(
            r#"{"messages":[{"role":"user","content":"hello"}],
                "tools":[{"type":"function","function":{"name":"search"}},
                         {"type":"function","function":{"name":"other"}}]}"#,
        ));
        assert_eq!(
            reply.body,
            ReplyBody::ToolCall(ToolCall {
                id: "call_2cf24dba5fb0a30e".into(),
                kind: "function",
                function: FunctionCall {
                    name: "search".into(),
                    arguments: r#"{"input":"hello"}"#.into(),
                },
            })
        );
        assert_eq!(reply.body.finish_reason(), FinishReason::ToolCalls);
        // "search" + {"input":"hello"} = 6 + 17 chars -> 6 tokens
        assert_eq!(reply.usage.completion_tokens, 6);
    }

    #[test]
    fn tool_arguments_are_valid_json_for_awkward_text() {
        let text = "quote \" backslash \\ newline \n tab \t é";
        let body = serde_json::json!({
            "messages":[{"role":"user","content":text}],
            "tools":[{"type":"function","function":{"name":"f"}}]
        })
        .to_string();
        let ReplyBody::ToolCall(call) = build_reply(&request(&body)).body else {
            panic!("expected a tool call");
        };
        let args: serde_json::Value =
            serde_json::from_str(&call.function.arguments).expect("arguments are JSON");
        assert_eq!(args, serde_json::json!({ "input": text }));
    }

    #[test]
    fn tool_choice_none_or_named_is_honoured() {
        let tools = r#""tools":[{"type":"function","function":{"name":"a"}},{"type":"function","function":{"name":"b"}}]"#;
        let none = build_reply(&request(&format!(
            r#"{{"messages":[{{"role":"user","content":"x"}}],{tools},"tool_choice":"none"}}"#
        )));
        assert_eq!(text_of(&none).0, "[simulated] echo: x");
        let named = build_reply(&request(&format!(
            r#"{{"messages":[{{"role":"user","content":"x"}}],{tools},"tool_choice":{{"type":"function","function":{{"name":"b"}}}}}}"#
        )));
        let ReplyBody::ToolCall(call) = named.body else {
            panic!("expected a tool call");
        };
        assert_eq!(call.function.name, "b");
    }

    #[test]
    fn stop_cuts_at_the_earliest_sequence() {
        let reply = build_reply(&request(
            r#"{"messages":[{"role":"user","content":"one two three"}],"stop":["three","two"]}"#,
        ));
        assert_eq!(
            text_of(&reply),
            ("[simulated] echo: one ", FinishReason::Stop)
        );
    }

    #[test]
    fn max_tokens_truncates_and_reports_length() {
        let reply = build_reply(&request(
            r#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":3}"#,
        ));
        assert_eq!(text_of(&reply), ("[simulated] ", FinishReason::Length));
        assert_eq!(reply.usage.completion_tokens, 3);
        // Exactly at the limit is not a truncation: 23 chars, 6 tokens = 24 chars.
        let fits = build_reply(&request(
            r#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":6}"#,
        ));
        assert_eq!(
            text_of(&fits),
            ("[simulated] echo: hello", FinishReason::Stop)
        );
        let zero = build_reply(&request(
            r#"{"messages":[{"role":"user","content":"hello"}],"max_completion_tokens":0}"#,
        ));
        assert_eq!(text_of(&zero), ("", FinishReason::Length));
        assert_eq!(zero.usage.completion_tokens, 1);
    }

    #[test]
    fn stop_before_the_limit_wins() {
        let reply = build_reply(&request(
            r#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":1,"stop":"sim"}"#,
        ));
        assert_eq!(text_of(&reply), ("[", FinishReason::Stop));
    }

    #[test]
    fn n_choices_are_identical_and_usage_counts_them_all() {
        let req = request(
            r#"{"model":"sim-large","messages":[{"role":"user","content":"hello"}],"n":3}"#,
        );
        let reply = build_reply(&req);
        assert_eq!(reply.usage.completion_tokens, 18);
        let completion = completion("chatcmpl-sim-x".into(), &req, &reply);
        let value = serde_json::to_value(&completion).expect("encodes");
        let choices = value["choices"].as_array().expect("choices");
        assert_eq!(choices.len(), 3);
        for (index, choice) in choices.iter().enumerate() {
            assert_eq!(choice["index"], index);
            assert_eq!(choice["message"]["content"], "[simulated] echo: hello");
        }
    }

    #[test]
    fn completion_json_is_exact() {
        let req =
            request(r#"{"model":"sim-small","messages":[{"role":"user","content":"hello"}]}"#);
        let reply = build_reply(&req);
        let json = serde_json::to_string(&completion("chatcmpl-sim-abc".into(), &req, &reply))
            .expect("encodes");
        assert_eq!(
            json,
            concat!(
                r#"{"id":"chatcmpl-sim-abc","object":"chat.completion","created":1700000000,"#,
                r#""model":"sim-small","choices":[{"index":0,"message":{"role":"assistant","#,
                r#""content":"[simulated] echo: hello","refusal":null},"logprobs":null,"#,
                r#""finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":6,"#,
                r#""total_tokens":9},"system_fingerprint":"crewmesh-simulated"}"#
            )
        );
    }

    #[test]
    fn tool_call_completion_has_null_content() {
        let req = request(
            r#"{"messages":[{"role":"user","content":"hello"}],"tools":[{"type":"function","function":{"name":"f"}}]}"#,
        );
        let reply = build_reply(&req);
        let value = serde_json::to_value(completion("id".into(), &req, &reply)).expect("encodes");
        let choice = &value["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert!(choice["message"]["content"].is_null());
        assert_eq!(
            choice["message"]["tool_calls"],
            serde_json::json!([{
                "id": "call_2cf24dba5fb0a30e",
                "type": "function",
                "function": {"name": "f", "arguments": "{\"input\":\"hello\"}"}
            }])
        );
    }
}
