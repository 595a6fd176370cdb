//! `Export`: a tenant's matching events, oldest first, as JSON Lines or CSV, read
//! from the store a page at a time and streamed chunk by chunk.
//!
//! Both formats carry every field of the canonical encoding under its stored name
//! (`details_json` as text, `time_micros` and `outcome` as numbers), so each
//! exported event's hash can be recomputed from the export alone.

use futures::Stream;

use crate::error::{AuditError, Result};
use crate::event::EventRecord;
use crate::store::{AuditStore, EventQuery};

/// Events read (and sent as one chunk) per round trip.
pub const EXPORT_PAGE: u32 = 1000;

/// The CSV columns, in order.
pub const CSV_COLUMNS: [&str; 16] = [
    "id",
    "chain",
    "sequence",
    "time_micros",
    "tenant",
    "actor_subject",
    "actor_service",
    "action",
    "resource_kind",
    "resource_name",
    "outcome",
    "request_id",
    "trace_id",
    "details_json",
    "prev_hash",
    "hash",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

impl TryFrom<i32> for ExportFormat {
    type Error = AuditError;

    fn try_from(value: i32) -> Result<Self> {
        use crewmesh_proto::audit::v1::ExportFormat as Wire;
        match Wire::try_from(value) {
            Ok(Wire::Unspecified | Wire::Jsonl) => Ok(Self::Jsonl),
            Ok(Wire::Csv) => Ok(Self::Csv),
            Err(_) => Err(AuditError::InvalidFilter(format!(
                "format {value} is not one of EXPORT_FORMAT_JSONL (1), EXPORT_FORMAT_CSV (2)"
            ))),
        }
    }
}

/// One JSON object of an export line (without the newline).
pub fn jsonl_line(e: &EventRecord) -> String {
    serde_json::json!({
        "id": e.id,
        "chain": e.chain,
        "sequence": e.sequence,
        "time_micros": e.time_micros,
        "tenant": e.tenant,
        "actor_subject": e.actor_subject,
        "actor_service": e.actor_service,
        "action": e.action,
        "resource_kind": e.resource_kind,
        "resource_name": e.resource_name,
        "outcome": e.outcome,
        "request_id": e.request_id,
        "trace_id": e.trace_id,
        "details_json": e.details_json,
        "prev_hash": e.prev_hash,
        "hash": e.hash,
    })
    .to_string()
}

/// A CSV field per RFC 4180: quoted (with `"` doubled) when it holds a comma, a
/// quote, CR or LF.
fn csv_field(out: &mut String, field: &str) {
    if field.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&field.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(field);
    }
}

/// One CSV record, CRLF-terminated.
pub fn csv_line(e: &EventRecord) -> String {
    let sequence = e.sequence.to_string();
    let time = e.time_micros.to_string();
    let outcome = e.outcome.to_string();
    let fields: [&str; 16] = [
        &e.id,
        &e.chain,
        &sequence,
        &time,
        &e.tenant,
        &e.actor_subject,
        &e.actor_service,
        &e.action,
        &e.resource_kind,
        &e.resource_name,
        &outcome,
        &e.request_id,
        &e.trace_id,
        &e.details_json,
        &e.prev_hash,
        &e.hash,
    ];
    let mut out = String::with_capacity(400);
    for (i, f) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        csv_field(&mut out, f);
    }
    out.push_str("\r\n");
    out
}

/// The export as a stream of chunks; `query` must be ascending.
pub fn export_stream<S: AuditStore>(
    store: S,
    query: EventQuery,
    format: ExportFormat,
) -> impl Stream<Item = Result<Vec<u8>>> + Send + 'static {
    struct State<S> {
        store: S,
        query: EventQuery,
        header_sent: bool,
        done: bool,
    }
    let state = State {
        store,
        query,
        header_sent: format == ExportFormat::Jsonl,
        done: false,
    };
    futures::stream::unfold(state, move |mut st| async move {
        if !st.header_sent {
            st.header_sent = true;
            let mut header = CSV_COLUMNS.join(",");
            header.push_str("\r\n");
            return Some((Ok(header.into_bytes()), st));
        }
        if st.done {
            return None;
        }
        let page = match st.store.query(&st.query).await {
            Ok(page) => page,
            Err(e) => {
                st.done = true;
                return Some((Err(e), st));
            }
        };
        if page.len() < st.query.limit as usize {
            st.done = true;
        }
        let last = page.last()?.sequence;
        st.query.after_sequence = Some(last);
        let mut chunk = String::with_capacity(page.len() * 400);
        for e in &page {
            match format {
                ExportFormat::Jsonl => {
                    chunk.push_str(&jsonl_line(e));
                    chunk.push('\n');
                }
                ExportFormat::Csv => chunk.push_str(&csv_line(e)),
            }
        }
        Some((Ok(chunk.into_bytes()), st))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> EventRecord {
        crate::event::NewEvent::from_input(crewmesh_proto::audit::v1::EventInput {
            id: "0190a5c4-0000-7000-8000-000000000001".into(),
            time: Some(crewmesh_proto::time::from_micros(5)),
            tenant: "acme".into(),
            action: "config.put".into(),
            details_json: r#"{"a": "x,\"y\"\n"}"#.into(),
            ..Default::default()
        })
        .unwrap()
        .seal("main", 1, crate::event::GENESIS_HASH)
    }

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let line = csv_line(&record());
        assert_eq!(
            line,
            format!(
                "0190a5c4-0000-7000-8000-000000000001,main,1,5,acme,,,config.put,,,0,,,\"{{\"\"a\"\":\"\"x,\\\"\"y\\\"\"\\n\"\"}}\",{},{}\r\n",
                crate::event::GENESIS_HASH,
                record().hash
            )
        );
    }

    #[test]
    fn jsonl_round_trips_to_the_same_hash() {
        let e = record();
        let v: serde_json::Value = serde_json::from_str(&jsonl_line(&e)).unwrap();
        let back = EventRecord {
            id: v["id"].as_str().unwrap().into(),
            chain: v["chain"].as_str().unwrap().into(),
            sequence: v["sequence"].as_i64().unwrap(),
            time_micros: v["time_micros"].as_i64().unwrap(),
            tenant: v["tenant"].as_str().unwrap().into(),
            actor_subject: v["actor_subject"].as_str().unwrap().into(),
            actor_service: v["actor_service"].as_str().unwrap().into(),
            action: v["action"].as_str().unwrap().into(),
            resource_kind: v["resource_kind"].as_str().unwrap().into(),
            resource_name: v["resource_name"].as_str().unwrap().into(),
            outcome: v["outcome"].as_i64().unwrap() as i32,
            request_id: v["request_id"].as_str().unwrap().into(),
            trace_id: v["trace_id"].as_str().unwrap().into(),
            details_json: v["details_json"].as_str().unwrap().into(),
            prev_hash: v["prev_hash"].as_str().unwrap().into(),
            hash: v["hash"].as_str().unwrap().into(),
        };
        assert_eq!(crate::event::event_hash(&back), e.hash);
        assert_eq!(back, e);
    }
}
