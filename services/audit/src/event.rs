//! Audit events as the chain holds them: validation of submitted events, redaction
//! of secrets in their details, the canonical encoding that is hashed, and the
//! linking of each event to the one before it.

use crewmesh_kit::principal::TenantId;
use crewmesh_proto::audit::v1 as pb;
use crewmesh_proto::types::v1::Outcome;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The chain every event is appended to.
pub const DEFAULT_CHAIN: &str = "main";

/// The tenant of events that belong to no tenant (actions a service takes by itself).
pub const SYSTEM_TENANT: &str = "_system";

/// The owner of shared (global) resources, such as `_global` config documents.
pub const GLOBAL_TENANT: &str = "_global";

/// The tenant of events about requests whose caller could not be authenticated.
pub const UNAUTHENTICATED_TENANT: &str = crewmesh_kit::clients::UNAUTHENTICATED_TENANT;

/// `prev_hash` of the first event of a chain: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The version of the canonical encoding, the first element of [`canonical_bytes`].
pub const ENCODING_VERSION: u32 = 1;

/// What replaces the value of a secret-looking key in event details.
pub const REDACTED: &str = "[REDACTED]";

/// Lower-case fragments of detail keys whose values are secrets.
const SECRET_KEY_FRAGMENTS: [&str; 7] = [
    "api_key",
    "apikey",
    "authorization",
    "password",
    "secret",
    "token",
    "private_key",
];

/// Longest accepted action name.
pub const MAX_ACTION_LEN: usize = 128;

/// Why one submitted event was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventProblem {
    /// The offending field, as named in `EventInput` (`id`, `tenant`, `action`, ...).
    pub field: &'static str,
    pub problem: String,
}

impl EventProblem {
    fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

/// A validated event, not yet placed in a chain. Its details are redacted and in
/// canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Lower-case hyphenated UUID.
    pub id: String,
    pub time_micros: i64,
    /// A tenant id or [`SYSTEM_TENANT`].
    pub tenant: String,
    pub actor_subject: String,
    pub actor_service: String,
    pub action: String,
    pub resource_kind: String,
    pub resource_name: String,
    pub outcome: i32,
    pub request_id: String,
    pub trace_id: String,
    /// Canonical JSON of the redacted details, or empty.
    pub details_json: String,
}

impl NewEvent {
    /// Checks a submitted event and converts it: the id must be a UUID, the tenant a
    /// tenant id, `_system`, `_global` or `_unauthenticated`, the action 1-128 characters of `[a-z0-9._-]`, the
    /// details empty or a JSON object, the time present and the outcome known.
    pub fn from_input(input: pb::EventInput) -> Result<Self, EventProblem> {
        let id = uuid::Uuid::parse_str(&input.id)
            .map_err(|_| {
                EventProblem::new("id", format!("`{}` is not a UUID", truncate(&input.id)))
            })?
            .hyphenated()
            .to_string();
        if input.tenant != SYSTEM_TENANT
            && input.tenant != GLOBAL_TENANT
            && input.tenant != UNAUTHENTICATED_TENANT
            && TenantId::parse(&input.tenant).is_err()
        {
            return Err(EventProblem::new(
                "tenant",
                format!(
                    "`{}` is not a tenant id (1-63 characters of a-z, 0-9, '-' or '_', starting with a letter or digit) nor `{SYSTEM_TENANT}`, `{GLOBAL_TENANT}` or `{UNAUTHENTICATED_TENANT}`",
                    truncate(&input.tenant)
                ),
            ));
        }
        if !is_valid_action(&input.action) {
            return Err(EventProblem::new(
                "action",
                format!(
                    "`{}` is not an action: use 1-{MAX_ACTION_LEN} characters of a-z, 0-9, '.', '_' or '-'",
                    truncate(&input.action)
                ),
            ));
        }
        let time = input
            .time
            .ok_or_else(|| EventProblem::new("time", "missing"))?;
        if !(0..1_000_000_000).contains(&time.nanos) {
            return Err(EventProblem::new(
                "time",
                "nanos must be between 0 and 999,999,999",
            ));
        }
        let time_micros = crewmesh_proto::time::to_micros(&time);
        if Outcome::try_from(input.outcome).is_err() {
            return Err(EventProblem::new(
                "outcome",
                format!("{} is not a known outcome", input.outcome),
            ));
        }
        let details_json = if input.details_json.trim().is_empty() {
            String::new()
        } else {
            let mut value: Value = serde_json::from_str(&input.details_json)
                .map_err(|e| EventProblem::new("details_json", format!("not JSON: {e}")))?;
            if !value.is_object() {
                return Err(EventProblem::new(
                    "details_json",
                    "must be a JSON object (or empty)",
                ));
            }
            redact(&mut value);
            canonical_json(&value)
        };
        let actor = input.actor.unwrap_or_default();
        let resource = input.resource.unwrap_or_default();
        Ok(Self {
            id,
            time_micros,
            tenant: input.tenant,
            actor_subject: actor.subject,
            actor_service: actor.service,
            action: input.action,
            resource_kind: resource.kind,
            resource_name: resource.name,
            outcome: input.outcome,
            request_id: input.request_id,
            trace_id: input.trace_id,
            details_json,
        })
    }

    /// Places the event at `sequence` of `chain` after an event whose hash is
    /// `prev_hash`, and computes its hash.
    pub fn seal(self, chain: &str, sequence: i64, prev_hash: &str) -> EventRecord {
        let mut record = EventRecord {
            id: self.id,
            chain: chain.to_owned(),
            sequence,
            time_micros: self.time_micros,
            tenant: self.tenant,
            actor_subject: self.actor_subject,
            actor_service: self.actor_service,
            action: self.action,
            resource_kind: self.resource_kind,
            resource_name: self.resource_name,
            outcome: self.outcome,
            request_id: self.request_id,
            trace_id: self.trace_id,
            details_json: self.details_json,
            prev_hash: prev_hash.to_owned(),
            hash: String::new(),
        };
        record.hash = event_hash(&record);
        record
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn is_valid_action(action: &str) -> bool {
    (1..=MAX_ACTION_LEN).contains(&action.len())
        && action.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
        })
}

/// An event in a chain, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub id: String,
    pub chain: String,
    /// 1 for the first event of a chain, then consecutive.
    pub sequence: i64,
    /// Unix time in microseconds.
    pub time_micros: i64,
    pub tenant: String,
    pub actor_subject: String,
    pub actor_service: String,
    pub action: String,
    pub resource_kind: String,
    pub resource_name: String,
    /// The `crewmesh.types.v1.Outcome` number.
    pub outcome: i32,
    pub request_id: String,
    pub trace_id: String,
    /// Canonical JSON of the redacted details (see [`canonical_json`]), or empty.
    pub details_json: String,
    /// Lower-case hex SHA-256 of the previous event, [`GENESIS_HASH`] for the first.
    pub prev_hash: String,
    /// Lower-case hex SHA-256 of [`canonical_bytes`] of this event.
    pub hash: String,
}

impl EventRecord {
    pub fn into_proto(self) -> pb::Event {
        pb::Event {
            id: self.id,
            chain: self.chain,
            sequence: u64::try_from(self.sequence).unwrap_or(0),
            time: Some(crewmesh_proto::time::from_micros(self.time_micros)),
            tenant: self.tenant,
            actor: Some(pb::Actor {
                subject: self.actor_subject,
                service: self.actor_service,
            }),
            action: self.action,
            resource: Some(pb::Resource {
                kind: self.resource_kind,
                name: self.resource_name,
            }),
            outcome: self.outcome,
            request_id: self.request_id,
            trace_id: self.trace_id,
            details_json: self.details_json,
            prev_hash: self.prev_hash,
            hash: self.hash,
        }
    }
}

/// The bytes whose SHA-256 is an event's hash.
///
/// They are the UTF-8 bytes of a JSON array without any whitespace, holding these
/// sixteen elements in this order:
///
/// | # | element | JSON type |
/// |---|---|---|
/// | 1 | encoding version, [`ENCODING_VERSION`] (`1`) | number |
/// | 2 | `chain` | string |
/// | 3 | `sequence` | number |
/// | 4 | `id` (lower-case hyphenated UUID) | string |
/// | 5 | `time` as Unix microseconds | number |
/// | 6 | `tenant` | string |
/// | 7 | `actor.subject` | string |
/// | 8 | `actor.service` | string |
/// | 9 | `action` | string |
/// | 10 | `resource.kind` | string |
/// | 11 | `resource.name` | string |
/// | 12 | `outcome` as its enum number | number |
/// | 13 | `request_id` | string |
/// | 14 | `trace_id` | string |
/// | 15 | `details_json`: the canonical JSON text of the details, or `""` | string |
/// | 16 | `prev_hash` | string |
///
/// Numbers are written as decimal integers (a leading `-` when negative, no leading
/// zeros, no exponent). Strings are written between double quotes with exactly these
/// escapes: `"` as `\"`, `\` as `\\`, U+0008 as `\b`, U+000C as `\f`, U+000A as `\n`,
/// U+000D as `\r`, U+0009 as `\t`, and every other character below U+0020 as `\u00XX`
/// with two lower-case hex digits. Every other character, `/` and non-ASCII included,
/// is written as its UTF-8 bytes.
///
/// Element 15 is the details text as the chain stores it (the `details_json` of the
/// stored event, returned by `Query`), embedded as a JSON string. Append stores
/// details in canonical form (see [`canonical_json`]), so a verifier uses the stored
/// text as is and never needs to re-format JSON.
///
/// For example, the first event of chain `main` with id
/// `0190a5c4-0000-7000-8000-000000000001`, time 1700000000000000, tenant `acme`, actor
/// `key:k1` via `spiffe://crewmesh.local/gateway`, action `config.put`, resource
/// `model`/`gpt`, outcome 1, request id `req-1`, trace id `t1` and details
/// `{"after":1,"before":null}` encodes as
///
/// ```text
/// [1,"main",1,"0190a5c4-0000-7000-8000-000000000001",1700000000000000,"acme","key:k1","spiffe://crewmesh.local/gateway","config.put","model","gpt",1,"req-1","t1","{\"after\":1,\"before\":null}","0000000000000000000000000000000000000000000000000000000000000000"]
/// ```
///
/// The `hash` is the lower-case hex SHA-256 of these bytes, and it is the `prev_hash`
/// of the next event in the chain. The record's own `hash` field is not encoded.
pub fn canonical_bytes(event: &EventRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(320 + event.details_json.len());
    out.push(b'[');
    write_int(&mut out, i64::from(ENCODING_VERSION));
    out.push(b',');
    write_json_string(&mut out, &event.chain);
    out.push(b',');
    write_int(&mut out, event.sequence);
    out.push(b',');
    write_json_string(&mut out, &event.id);
    out.push(b',');
    write_int(&mut out, event.time_micros);
    for s in [
        &event.tenant,
        &event.actor_subject,
        &event.actor_service,
        &event.action,
        &event.resource_kind,
        &event.resource_name,
    ] {
        out.push(b',');
        write_json_string(&mut out, s);
    }
    out.push(b',');
    write_int(&mut out, i64::from(event.outcome));
    for s in [
        &event.request_id,
        &event.trace_id,
        &event.details_json,
        &event.prev_hash,
    ] {
        out.push(b',');
        write_json_string(&mut out, s);
    }
    out.push(b']');
    out
}

/// Writes a decimal integer without allocating.
pub(crate) fn write_int(out: &mut Vec<u8>, n: i64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&buf[i..]);
}

/// Lower-case hex SHA-256 of [`canonical_bytes`].
pub fn event_hash(event: &EventRecord) -> String {
    hex::encode(Sha256::digest(canonical_bytes(event)))
}

/// Whether `hash` is the lower-case hex SHA-256 of [`canonical_bytes`] of `event`
/// (without allocating the hex text).
pub fn hash_matches(event: &EventRecord, hash: &str) -> bool {
    let mut hex_buf = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(canonical_bytes(event)), &mut hex_buf).is_ok()
        && hex_buf.as_slice() == hash.as_bytes()
}

/// Writes `s` as a JSON string with the escapes documented on [`canonical_bytes`].
pub(crate) fn write_json_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            0x08 => Some(b"\\b"),
            0x0c => Some(b"\\f"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0x00..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match escape {
            Some(e) => out.extend_from_slice(e),
            None => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The canonical JSON text of a value: RFC 8785 (JSON Canonicalization Scheme), with
/// one difference: integers that fit in 64 bits are written exactly.
///
/// - No whitespace.
/// - Object members sorted by key, comparing keys as sequences of UTF-16 code units,
///   at every depth; array order kept.
/// - Strings escaped as documented on [`canonical_bytes`].
/// - Integers that fit in `i64` or `u64`: decimal digits, `-` when negative. Every
///   other number is an IEEE-754 double written as ECMAScript's
///   `Number.prototype.toString` writes it: the shortest digits that read back to the
///   same double, in plain notation when 1e-7 <= |x| < 1e21 (`0.25`, `1`, `123.5`,
///   `0.000001`), otherwise as `d.ddde+N` / `d.ddde-N` (`1e+21`, `1.5e-7`); `-0` is
///   written `0`.
/// - `null`, `true` and `false` as themselves.
pub fn canonical_json(value: &Value) -> String {
    let mut out = Vec::new();
    write_canonical(&mut out, value);
    // Only whole UTF-8 strings and ASCII are written.
    String::from_utf8(out).unwrap_or_default()
}

fn write_canonical(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_json_string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_string(out, k);
                out.push(b':');
                write_canonical(out, v);
            }
            out.push(b'}');
        }
    }
}

fn write_number(out: &mut Vec<u8>, n: &serde_json::Number) {
    if let Some(i) = n.as_i64() {
        out.extend_from_slice(i.to_string().as_bytes());
    } else if let Some(u) = n.as_u64() {
        out.extend_from_slice(u.to_string().as_bytes());
    } else if let Some(f) = n.as_f64() {
        write_es_number(out, f);
    } else {
        // Not reachable without serde_json's arbitrary precision; keep its text.
        out.extend_from_slice(n.to_string().as_bytes());
    }
}

/// ECMAScript `Number.prototype.toString` of a finite double.
fn write_es_number(out: &mut Vec<u8>, x: f64) {
    if x == 0.0 || !x.is_finite() {
        out.push(b'0');
        return;
    }
    if x < 0.0 {
        out.push(b'-');
    }
    // Rust's `{:e}` writes the shortest round-tripping digits: `d.ddde<exp>`.
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    let k = digits.len() as i64;
    // x = 0.digits * 10^n
    let n = exp.parse::<i64>().unwrap_or(0) + 1;
    if k <= n && n <= 21 {
        out.extend_from_slice(&digits);
        out.extend(std::iter::repeat_n(b'0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.extend_from_slice(&digits[..n as usize]);
        out.push(b'.');
        out.extend_from_slice(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', (-n) as usize));
        out.extend_from_slice(&digits);
    } else {
        out.push(digits[0]);
        if k > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if n - 1 < 0 { b'-' } else { b'+' });
        out.extend_from_slice((n - 1).abs().to_string().as_bytes());
    }
}

/// True when a details key names a secret: its lower-case form, with `-` read as
/// `_`, contains `api_key`, `apikey`, `authorization`, `password`, `secret`, `token`
/// or `private_key`.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_lowercase().replace('-', "_");
    // Token *counts* (`prompt_tokens`, `max_tokens`) are metadata, not credentials.
    if key == "tokens" || key.ends_with("_tokens") {
        return false;
    }
    SECRET_KEY_FRAGMENTS.iter().any(|f| key.contains(f))
}

/// Replaces the value of every secret-looking key (see [`is_secret_key`]), at any
/// depth, with `"[REDACTED]"`.
pub fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if is_secret_key(k) {
                    *v = Value::String(REDACTED.to_owned());
                } else {
                    redact(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input() -> pb::EventInput {
        pb::EventInput {
            id: "0190A5C4-0000-7000-8000-000000000001".into(),
            time: Some(crewmesh_proto::time::from_micros(1_700_000_000_000_000)),
            tenant: "acme".into(),
            actor: Some(pb::Actor {
                subject: "key:k1".into(),
                service: "spiffe://crewmesh.local/gateway".into(),
            }),
            action: "config.put".into(),
            resource: Some(pb::Resource {
                kind: "model".into(),
                name: "gpt".into(),
            }),
            outcome: Outcome::Success as i32,
            request_id: "req-1".into(),
            trace_id: "t1".into(),
            details_json: "{ \"before\": null, \"after\": 1 }".into(),
        }
    }

    #[test]
    fn canonical_encoding_is_the_documented_one() {
        let record = NewEvent::from_input(input())
            .unwrap()
            .seal(DEFAULT_CHAIN, 1, GENESIS_HASH);
        let expected = r#"[1,"main",1,"0190a5c4-0000-7000-8000-000000000001",1700000000000000,"acme","key:k1","spiffe://crewmesh.local/gateway","config.put","model","gpt",1,"req-1","t1","{\"after\":1,\"before\":null}","0000000000000000000000000000000000000000000000000000000000000000"]"#;
        assert_eq!(
            String::from_utf8(canonical_bytes(&record)).unwrap(),
            expected
        );
        assert_eq!(
            record.hash,
            hex::encode(Sha256::digest(expected.as_bytes()))
        );
    }

    #[test]
    fn integers_are_written_in_decimal() {
        for n in [0, 1, -1, 9, 10, 1_700_000_000_000_000, i64::MAX, i64::MIN] {
            let mut out = Vec::new();
            write_int(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), n.to_string());
        }
    }

    #[test]
    fn hash_is_pinned() {
        // A change to this value breaks every existing chain: bump ENCODING_VERSION.
        let record = NewEvent::from_input(input())
            .unwrap()
            .seal(DEFAULT_CHAIN, 1, GENESIS_HASH);
        assert_eq!(record.hash, PINNED_HASH);
        assert_eq!(event_hash(&record), PINNED_HASH);
    }

    const PINNED_HASH: &str = "8584999fefcf3838aef6b5de06bd3684bfab8b2213fbfe15fe88b166478a61e3";

    #[test]
    fn every_field_is_covered_by_the_hash() {
        let base = NewEvent::from_input(input())
            .unwrap()
            .seal(DEFAULT_CHAIN, 7, GENESIS_HASH);
        let mutations: Vec<fn(&mut EventRecord)> = vec![
            |e| e.id = "0190a5c4-0000-7000-8000-000000000002".into(),
            |e| e.chain = "other".into(),
            |e| e.sequence += 1,
            |e| e.time_micros += 1,
            |e| e.tenant = "acme2".into(),
            |e| e.actor_subject = "key:k2".into(),
            |e| e.actor_service = "x".into(),
            |e| e.action = "config.delete".into(),
            |e| e.resource_kind = "flag".into(),
            |e| e.resource_name = "gpt2".into(),
            |e| e.outcome = 2,
            |e| e.request_id = "req-2".into(),
            |e| e.trace_id = "t2".into(),
            |e| e.details_json = "{\"after\":2,\"before\":null}".into(),
            |e| e.prev_hash = "1".repeat(64),
        ];
        for (i, mutate) in mutations.into_iter().enumerate() {
            let mut changed = base.clone();
            mutate(&mut changed);
            assert_ne!(event_hash(&changed), base.hash, "mutation {i}");
        }
    }

    #[test]
    fn strings_are_escaped_as_documented() {
        let mut out = Vec::new();
        write_json_string(&mut out, "a\"b\\c\u{8}\u{c}\n\r\t\u{1}\u{1f}/é\u{7f}");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\"a\\\"b\\\\c\\b\\f\\n\\r\\t\\u0001\\u001f/é\u{7f}\""
        );
        // The same as serde_json writes strings.
        let s = "x\u{0}y\"z\u{1b}";
        let mut ours = Vec::new();
        write_json_string(&mut ours, s);
        assert_eq!(ours, serde_json::to_vec(s).unwrap());
    }

    #[test]
    fn canonical_json_sorts_keys_recursively_and_is_stable() {
        let v =
            json!({"b": [ {"z": 1, "a": 2.5} ], "a": {"d": true, "c": null}, "é": "x", "B": 1e300});
        let text = canonical_json(&v);
        assert_eq!(
            text,
            r#"{"B":1e+300,"a":{"c":null,"d":true},"b":[{"a":2.5,"z":1}],"é":"x"}"#
        );
        let again: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(canonical_json(&again), text);
    }

    #[test]
    fn keys_sort_by_utf16_code_units() {
        // U+FF61 sorts before U+1F600 by UTF-8 bytes, after it by UTF-16 units.
        let v = json!({"\u{ff61}": 1, "\u{1f600}": 2, "z": 3});
        assert_eq!(
            canonical_json(&v),
            "{\"z\":3,\"\u{1f600}\":2,\"\u{ff61}\":1}"
        );
    }

    #[test]
    fn numbers_are_written_as_ecmascript_does() {
        let cases = [
            ("1.0", "1"),
            ("-0.0", "0"),
            ("0.1", "0.1"),
            ("123.456", "123.456"),
            ("1e20", "100000000000000000000"),
            ("1e21", "1e+21"),
            ("1.5e300", "1.5e+300"),
            ("0.000001", "0.000001"),
            ("1e-7", "1e-7"),
            ("-2.5e-9", "-2.5e-9"),
            ("5e-324", "5e-324"),
            ("100000000000000000000000", "1e+23"),
            ("18446744073709551615", "18446744073709551615"),
            ("-9223372036854775808", "-9223372036854775808"),
            ("42", "42"),
        ];
        for (input, expected) in cases {
            let v: Value = serde_json::from_str(input).unwrap();
            let text = canonical_json(&v);
            assert_eq!(text, expected, "{input}");
            let again: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(canonical_json(&again), text, "{input} is not stable");
        }
    }

    #[test]
    fn secrets_are_redacted_at_any_depth() {
        let mut i = input();
        i.details_json = json!({
            "Authorization": "Bearer x",
            "nested": {"API_KEY": "k", "list": [{"db_password": "p", "ok": 1}], "x-api-key": {"deep": 1}},
            "access_token": 5,
            "client_secret": "s",
            "private_key": "pk",
            "apikey": "a",
            "model": "gpt",
            "prompt_tokens": 12,
        })
        .to_string();
        let e = NewEvent::from_input(i).unwrap();
        assert_eq!(
            e.details_json,
            r#"{"Authorization":"[REDACTED]","access_token":"[REDACTED]","apikey":"[REDACTED]","client_secret":"[REDACTED]","model":"gpt","nested":{"API_KEY":"[REDACTED]","list":[{"db_password":"[REDACTED]","ok":1}],"x-api-key":"[REDACTED]"},"private_key":"[REDACTED]","prompt_tokens":12}"#
        );
        assert!(!e.details_json.contains("Bearer"));
    }

    #[test]
    fn validation_names_the_field() {
        type Mutation = fn(&mut pb::EventInput);
        let cases: Vec<(Mutation, &str)> = vec![
            (|i| i.id = "nope".into(), "id"),
            (|i| i.id = String::new(), "id"),
            (|i| i.tenant = String::new(), "tenant"),
            (|i| i.tenant = "Acme".into(), "tenant"),
            (|i| i.tenant = "_other".into(), "tenant"),
            (|i| i.action = String::new(), "action"),
            (|i| i.action = "Config.Put".into(), "action"),
            (|i| i.action = "a".repeat(129), "action"),
            (|i| i.action = "config put".into(), "action"),
            (|i| i.details_json = "[1]".into(), "details_json"),
            (|i| i.details_json = "{".into(), "details_json"),
            (|i| i.details_json = "\"x\"".into(), "details_json"),
            (|i| i.time = None, "time"),
            (|i| i.outcome = 42, "outcome"),
        ];
        for (mutate, field) in cases {
            let mut i = input();
            mutate(&mut i);
            let err = NewEvent::from_input(i).unwrap_err();
            assert_eq!(err.field, field, "{err:?}");
        }
        let mut ok = input();
        ok.tenant = SYSTEM_TENANT.into();
        ok.action = "a".repeat(128);
        ok.details_json = String::new();
        ok.actor = None;
        ok.resource = None;
        let e = NewEvent::from_input(ok).unwrap();
        assert_eq!(e.details_json, "");
        assert_eq!(e.id, "0190a5c4-0000-7000-8000-000000000001");
    }

    #[test]
    fn sealing_links_events() {
        let first = NewEvent::from_input(input())
            .unwrap()
            .seal(DEFAULT_CHAIN, 1, GENESIS_HASH);
        let mut second_input = input();
        second_input.id = "0190a5c4-0000-7000-8000-000000000002".into();
        let second =
            NewEvent::from_input(second_input)
                .unwrap()
                .seal(DEFAULT_CHAIN, 2, &first.hash);
        assert_eq!(second.prev_hash, first.hash);
        assert_eq!(second.hash, event_hash(&second));
        assert_eq!(second.hash.len(), 64);
    }
}
