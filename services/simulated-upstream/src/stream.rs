//! Streaming (`"stream": true`): the `chat.completion.chunk` sequence of a reply and its
//! server-sent-event encoding. Pure functions; `routes` turns the events into a body.

use bytes::Bytes;

use crate::reply::{CREATED, Reply, ReplyBody, SYSTEM_FINGERPRINT};
use crate::wire::{
    CHUNK_OBJECT, ChatCompletionChunk, ChatRequest, ChunkChoice, Delta, FunctionDelta,
    ToolCallDelta,
};

/// Characters of content (or tool-call arguments) per chunk.
pub(crate) const PIECE_CHARS: usize = 8;
/// The event that ends a complete stream.
pub(crate) const DONE_EVENT: &[u8] = b"data: [DONE]\n\n";
/// Content fragments a `stream-break` sends before the connection drops.
pub(crate) const FRAGMENTS_BEFORE_BREAK: usize = 2;

/// Splits `text` into pieces of [`PIECE_CHARS`] characters (the last may be shorter).
pub(crate) fn pieces(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(PIECE_CHARS)
        .map(|piece| piece.iter().collect())
        .collect()
}

/// The chunks of a streamed reply, in order: an opening chunk per choice, the fragments
/// (each one for every choice), a closing chunk per choice with the finish reason, and,
/// with `include_usage`, a usage chunk with no choices. `[DONE]` is not a chunk; see
/// [`encode`].
pub(crate) fn chunks(id: &str, req: &ChatRequest, reply: &Reply) -> Vec<ChatCompletionChunk> {
    let usage_slot = req.include_usage.then_some(None);
    let chunk = |choices: Vec<ChunkChoice>| ChatCompletionChunk {
        id: id.to_owned(),
        object: CHUNK_OBJECT,
        created: CREATED,
        model: req.model.clone(),
        system_fingerprint: SYSTEM_FINGERPRINT,
        choices,
        usage: usage_slot,
    };
    let each_choice = |delta: &Delta, finish_reason| -> Vec<ChatCompletionChunk> {
        (0..req.n)
            .map(|index| {
                chunk(vec![ChunkChoice {
                    index,
                    delta: delta.clone(),
                    logprobs: None,
                    finish_reason,
                }])
            })
            .collect()
    };

    let (opening, fragments) = match &reply.body {
        ReplyBody::Text { content, .. } => (
            Delta {
                role: Some("assistant"),
                content: Some(Some(String::new())),
                tool_calls: None,
            },
            pieces(content)
                .into_iter()
                .map(|piece| Delta {
                    content: Some(Some(piece)),
                    ..Delta::default()
                })
                .collect::<Vec<_>>(),
        ),
        ReplyBody::ToolCall(call) => (
            Delta {
                role: Some("assistant"),
                content: Some(None),
                tool_calls: Some(vec![ToolCallDelta {
                    index: 0,
                    id: Some(call.id.clone()),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: Some(call.function.name.clone()),
                        arguments: String::new(),
                    },
                }]),
            },
            pieces(&call.function.arguments)
                .into_iter()
                .map(|piece| Delta {
                    tool_calls: Some(vec![ToolCallDelta {
                        index: 0,
                        id: None,
                        kind: None,
                        function: FunctionDelta {
                            name: None,
                            arguments: piece,
                        },
                    }]),
                    ..Delta::default()
                })
                .collect(),
        ),
    };

    let mut out = each_choice(&opening, None);
    for fragment in &fragments {
        out.extend(each_choice(fragment, None));
    }
    out.extend(each_choice(
        &Delta::default(),
        Some(reply.body.finish_reason()),
    ));
    if req.include_usage {
        let mut usage_chunk = chunk(Vec::new());
        usage_chunk.usage = Some(Some(reply.usage));
        out.push(usage_chunk);
    }
    out
}

/// Whether a chunk carries a content or argument fragment (not the opening or closing).
fn carries_fragment(chunk: &ChatCompletionChunk) -> bool {
    chunk.choices.iter().any(|choice| {
        let delta = &choice.delta;
        delta.role.is_none()
            && (matches!(&delta.content, Some(Some(text)) if !text.is_empty())
                || delta
                    .tool_calls
                    .iter()
                    .flatten()
                    .any(|call| !call.function.arguments.is_empty()))
    })
}

/// How many leading chunks a broken stream sends: up to and including fragment number
/// `fragments` (0: only the opening chunk), and never the closing chunk.
pub(crate) fn break_point(chunks: &[ChatCompletionChunk], fragments_before: usize) -> usize {
    if fragments_before == 0 {
        return chunks
            .iter()
            .position(|chunk| {
                carries_fragment(chunk)
                    || chunk.choices.is_empty()
                    || chunk.choices.iter().any(|c| c.finish_reason.is_some())
            })
            .unwrap_or(chunks.len());
    }
    let mut fragments = 0;
    for (position, chunk) in chunks.iter().enumerate() {
        if chunk.choices.iter().any(|c| c.finish_reason.is_some()) || chunk.choices.is_empty() {
            return position;
        }
        if carries_fragment(chunk) {
            fragments += 1;
            if fragments == fragments_before {
                return position + 1;
            }
        }
    }
    chunks.len()
}

/// One chunk as a server-sent event: `data: <json>\n\n`.
pub(crate) fn encode(chunk: &ChatCompletionChunk) -> Result<Bytes, serde_json::Error> {
    let mut event = b"data: ".to_vec();
    serde_json::to_writer(&mut event, chunk)?;
    event.extend_from_slice(b"\n\n");
    Ok(event.into())
}

/// Every event of a complete stream, `[DONE]` included.
pub(crate) fn events(chunks: &[ChatCompletionChunk]) -> Result<Vec<Bytes>, serde_json::Error> {
    let mut events = chunks.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
    events.push(Bytes::from_static(DONE_EVENT));
    Ok(events)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::reply::build_reply;

    fn stream_of(body: &str) -> Vec<ChatCompletionChunk> {
        let req = ChatRequest::parse(body.as_bytes()).expect("valid");
        let reply = build_reply(&req);
        chunks("chatcmpl-sim-t", &req, &reply)
    }

    fn as_json(chunks: &[ChatCompletionChunk]) -> Vec<Value> {
        chunks
            .iter()
            .map(|c| serde_json::to_value(c).expect("encodes"))
            .collect()
    }

    #[test]
    fn pieces_are_eight_chars() {
        assert_eq!(
            pieces("[simulated] echo: hi"),
            ["[simulat", "ed] echo", ": hi"]
        );
        assert_eq!(pieces("ééééééééé"), ["éééééééé", "é"]);
        assert!(pieces("").is_empty());
    }

    #[test]
    fn text_stream_sequence_is_exact() {
        let chunks = stream_of(
            r#"{"model":"sim-small","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        let deltas: Vec<Value> = as_json(&chunks)
            .into_iter()
            .map(|c| json!([c["choices"][0]["delta"], c["choices"][0]["finish_reason"]]))
            .collect();
        assert_eq!(
            deltas,
            [
                json!([{"role":"assistant","content":""}, null]),
                json!([{"content":"[simulat"}, null]),
                json!([{"content":"ed] echo"}, null]),
                json!([{"content":": hi"}, null]),
                json!([{}, "stop"]),
            ]
        );
        let first = serde_json::to_string(&chunks[0]).expect("encodes");
        assert_eq!(
            first,
            concat!(
                r#"{"id":"chatcmpl-sim-t","object":"chat.completion.chunk","created":1700000000,"#,
                r#""model":"sim-small","system_fingerprint":"crewmesh-simulated","choices":[{"index":0,"#,
                r#""delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#
            )
        );
    }

    #[test]
    fn usage_chunk_comes_last_when_asked() {
        let chunks = as_json(&stream_of(
            r#"{"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#,
        ));
        assert_eq!(chunks.len(), 6);
        for chunk in &chunks[..5] {
            assert!(chunk["usage"].is_null());
            assert!(chunk.as_object().expect("object").contains_key("usage"));
        }
        assert_eq!(chunks[5]["choices"], json!([]));
        assert_eq!(
            chunks[5]["usage"],
            json!({"prompt_tokens":2,"completion_tokens":5,"total_tokens":7})
        );
    }

    #[test]
    fn tool_call_streams_like_openai() {
        let chunks = as_json(&stream_of(
            r#"{"stream":true,"messages":[{"role":"user","content":"hello"}],
                "tools":[{"type":"function","function":{"name":"search"}}]}"#,
        ));
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role":"assistant","content":null,"tool_calls":[{
                "index":0,"id":"call_2cf24dba5fb0a30e","type":"function",
                "function":{"name":"search","arguments":""}}]})
        );
        let arguments: String = chunks[1..chunks.len() - 1]
            .iter()
            .map(|c| {
                let call = &c["choices"][0]["delta"]["tool_calls"][0];
                assert_eq!(call["index"], 0);
                assert!(call.get("id").is_none());
                call["function"]["arguments"]
                    .as_str()
                    .expect("fragment")
                    .to_owned()
            })
            .collect();
        assert_eq!(arguments, r#"{"input":"hello"}"#);
        assert_eq!(chunks.len(), 5); // opening, 3 fragments of a 17-char string, closing
        let last = &chunks[4]["choices"][0];
        assert_eq!(last["delta"], json!({}));
        assert_eq!(last["finish_reason"], "tool_calls");
    }

    #[test]
    fn n_choices_each_get_every_chunk() {
        let chunks = as_json(&stream_of(
            r#"{"stream":true,"n":2,"messages":[{"role":"user","content":"hi"}]}"#,
        ));
        let indices: Vec<u64> = chunks
            .iter()
            .map(|c| c["choices"][0]["index"].as_u64().expect("index"))
            .collect();
        assert_eq!(indices, [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn max_tokens_shows_in_the_closing_chunk() {
        let chunks = as_json(&stream_of(
            r#"{"stream":true,"max_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#,
        ));
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "[sim");
        assert_eq!(chunks[2]["choices"][0]["finish_reason"], "length");
    }

    #[test]
    fn break_point_stops_after_two_fragments() {
        let long = stream_of(r#"{"stream":true,"messages":[{"role":"user","content":"hi"}]}"#);
        assert_eq!(break_point(&long, FRAGMENTS_BEFORE_BREAK), 3);
        assert_eq!(break_point(&long, 0), 1);
        assert_eq!(break_point(&long, 1), 2);
        // "[simulated] echo: hi" has three fragments; the closing chunk is never sent.
        assert_eq!(break_point(&long, 50), 4);
        let short = stream_of(
            r#"{"stream":true,"max_tokens":1,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert_eq!(break_point(&short, FRAGMENTS_BEFORE_BREAK), 2);
        let tool = stream_of(
            r#"{"stream":true,"messages":[{"role":"user","content":"hello"}],"tools":[{"function":{"name":"f"}}]}"#,
        );
        assert_eq!(break_point(&tool, FRAGMENTS_BEFORE_BREAK), 3);
    }

    #[test]
    fn events_are_sse_framed_and_end_with_done() {
        let chunks = stream_of(r#"{"stream":true,"messages":[{"role":"user","content":"hi"}]}"#);
        let events = events(&chunks).expect("encodes");
        assert_eq!(events.len(), chunks.len() + 1);
        for event in &events {
            assert!(event.starts_with(b"data: "));
            assert!(event.ends_with(b"\n\n"));
        }
        assert_eq!(events[1].as_ref(), br#"data: {"id":"chatcmpl-sim-t","object":"chat.completion.chunk","created":1700000000,"model":"sim-small","system_fingerprint":"crewmesh-simulated","choices":[{"index":0,"delta":{"content":"[simulat"},"logprobs":null,"finish_reason":null}]}

"#);
        assert_eq!(events.last().map(Bytes::as_ref), Some(DONE_EVENT));
    }
}
