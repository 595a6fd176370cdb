//! The schema of every document kind, written once and used twice: to check a body
//! strictly (unknown fields rejected, every problem reported with its JSON path) and
//! to publish it as JSON Schema (draft 2020-12) for editors, in `docs/schemas/` and
//! at `GET /v1/config/schemas/{kind}`.
//!
//! Flags are checked by the kit's evaluator itself ([`crewmesh_kit::flags::Flag::parse`]),
//! so the flag a service evaluates is exactly the flag that was accepted.

use serde_json::{Map, Value, json};

use crate::document::DocKind;
use crate::spec::SpecProblem;

/// Provider `type`s the router can talk to.
pub const PROVIDER_TYPES: &[&str] = &["openai", "anthropic", "simulated"];
/// Routing strategies of a model alias (with their accepted aliases).
pub const STRATEGIES: &[&str] = &[
    "priority",
    "weighted-random",
    "weighted",
    "least-latency",
    "cost-optimised",
    "cost",
    "adaptive",
];
/// Roles an API key can carry.
pub const ROLES: &[&str] = &["admin", "operator", "developer", "viewer", "auditor"];

/// A string format checked beyond its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    HttpUrl,
    /// 64 lowercase hex characters.
    Sha256Hex,
    Rfc3339,
    /// An environment variable name.
    EnvName,
}

/// One node of a schema.
#[derive(Debug, Clone)]
pub enum Schema {
    Str {
        non_empty: bool,
        one_of: Option<&'static [&'static str]>,
        format: Option<Format>,
    },
    Int {
        min: i64,
    },
    Num {
        min: f64,
        exclusive: bool,
        max: Option<f64>,
    },
    Bool,
    Array {
        items: Box<Schema>,
        non_empty: bool,
    },
    Object(Vec<Field>),
    /// An object whose keys are names (`[a-z0-9._-]`, starting with a letter or digit)
    /// and whose values all match one schema.
    Map {
        values: Box<Schema>,
        non_empty: bool,
    },
    /// Any JSON value (checked elsewhere or free-form).
    Any,
    /// A string or null.
    NullableStr(Box<Schema>),
}

/// A field of an object schema.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: &'static str,
    pub schema: Schema,
    pub required: bool,
    pub description: &'static str,
}

fn req(name: &'static str, schema: Schema, description: &'static str) -> Field {
    Field {
        name,
        schema,
        required: true,
        description,
    }
}

fn opt(name: &'static str, schema: Schema, description: &'static str) -> Field {
    Field {
        name,
        schema,
        required: false,
        description,
    }
}

fn string() -> Schema {
    Schema::Str {
        non_empty: true,
        one_of: None,
        format: None,
    }
}

fn text() -> Schema {
    Schema::Str {
        non_empty: false,
        one_of: None,
        format: None,
    }
}

fn one_of(values: &'static [&'static str]) -> Schema {
    Schema::Str {
        non_empty: true,
        one_of: Some(values),
        format: None,
    }
}

fn formatted(format: Format) -> Schema {
    Schema::Str {
        non_empty: true,
        one_of: None,
        format: Some(format),
    }
}

fn count(min: i64) -> Schema {
    Schema::Int { min }
}

fn non_negative() -> Schema {
    Schema::Num {
        min: 0.0,
        exclusive: false,
        max: None,
    }
}

fn list(items: Schema) -> Schema {
    Schema::Array {
        items: Box::new(items),
        non_empty: false,
    }
}

fn description() -> Field {
    opt("description", text(), "Free text for operators.")
}

/// The deployments of a model alias (or of one of its variants).
fn deployments() -> Schema {
    Schema::Array {
        items: Box::new(Schema::Object(vec![
            req("provider", string(), "Name of a provider document."),
            req("model", string(), "The upstream's model name."),
            opt(
                "weight",
                Schema::Num {
                    min: 0.0,
                    exclusive: true,
                    max: None,
                },
                "Share of traffic for weighted strategies (default 1).",
            ),
            opt(
                "name",
                string(),
                "Deployment name, unique in its deployment list (default <alias>/<index>, or <alias>/<variant>/<index> in a variant).",
            ),
            opt(
                "priority",
                Schema::Int {
                    min: i64::from(i32::MIN),
                },
                "Lower is tried first by the priority strategy.",
            ),
            opt(
                "input_price_per_1m",
                non_negative(),
                "USD per million prompt tokens.",
            ),
            opt(
                "output_price_per_1m",
                non_negative(),
                "USD per million completion tokens.",
            ),
            opt(
                "rpm",
                count(1),
                "Requests per minute this deployment accepts.",
            ),
            opt(
                "tpm",
                count(1),
                "Tokens per minute this deployment accepts.",
            ),
            opt(
                "quality_tier",
                count(0),
                "Higher is better, for cost-optimised routing.",
            ),
            opt(
                "context_window",
                count(0),
                "Largest prompt+completion in tokens.",
            ),
            opt("tags", list(string()), "Free labels."),
        ])),
        non_empty: true,
    }
}

/// The schema of a kind (`None` for `flag`, checked by the flag evaluator).
pub fn schema_of(kind: DocKind) -> Option<Schema> {
    Some(match kind {
        DocKind::Provider => Schema::Object(vec![
            req(
                "type",
                one_of(PROVIDER_TYPES),
                "The wire protocol of the upstream.",
            ),
            req(
                "base_url",
                formatted(Format::HttpUrl),
                "The upstream's base URL, e.g. https://api.openai.com/v1.",
            ),
            opt(
                "api_key",
                Schema::Any,
                "Inline API key, {\"inline\": \"<secret>\"}: only when the config service has a secrets_key_file; stored encrypted (envelope, AES-256-GCM), never returned.",
            ),
            opt(
                "api_key_env",
                formatted(Format::EnvName),
                "Environment variable holding the API key (a reference: the key itself is never stored).",
            ),
            opt(
                "api_key_file",
                string(),
                "File holding the API key (a reference: the key itself is never stored).",
            ),
            opt("connect_timeout_ms", count(1), "Connect timeout."),
            opt(
                "first_byte_timeout_ms",
                count(1),
                "Time to the first response byte.",
            ),
            opt("total_timeout_ms", count(1), "Whole-call timeout."),
            description(),
        ]),
        DocKind::Model => Schema::Object(vec![
            req(
                "deployments",
                deployments(),
                "Where the alias can be served, tried per the strategy.",
            ),
            opt("owned_by", string(), "Shown in /v1/models."),
            opt(
                "strategy",
                one_of(STRATEGIES),
                "How a deployment is chosen (default priority).",
            ),
            opt(
                "fallback_models",
                list(string()),
                "Aliases tried when every deployment fails.",
            ),
            opt(
                "variants",
                Schema::Map {
                    values: Box::new(Schema::Object(vec![
                        req(
                            "deployments",
                            deployments(),
                            "The deployments of this variant.",
                        ),
                        opt(
                            "strategy",
                            one_of(STRATEGIES),
                            "How a deployment is chosen (default: the alias's strategy).",
                        ),
                        description(),
                    ])),
                    non_empty: true,
                },
                "Named deployment sets, one chosen per request by `flag` (A/B tests by percentage or tenant); `deployments` serve when the flag cannot choose.",
            ),
            opt(
                "flag",
                string(),
                "Name of a flag (same tenant, else _global) whose string values name variants; evaluated per request with targetingKey = the request's user, else its tenant, and the attributes tenant, model and user. Required with variants.",
            ),
            opt(
                "retry",
                Schema::Object(vec![
                    opt("max_retries", count(0), "Retries after the first attempt."),
                    opt("base_ms", count(0), "First backoff."),
                    opt("max_ms", count(0), "Largest backoff."),
                ]),
                "Retries inside the request deadline.",
            ),
            opt(
                "breaker",
                Schema::Object(vec![
                    opt(
                        "consecutive_failures",
                        count(0),
                        "Failures in a row that open the breaker.",
                    ),
                    opt(
                        "error_rate",
                        Schema::Num {
                            min: 0.0,
                            exclusive: false,
                            max: Some(1.0),
                        },
                        "Error rate that opens the breaker.",
                    ),
                    opt(
                        "min_calls",
                        count(0),
                        "Calls in the window before the rate counts.",
                    ),
                    opt("window_secs", count(1), "Window of the error rate."),
                    opt(
                        "open_secs",
                        count(1),
                        "How long an open breaker stays open.",
                    ),
                ]),
                "Circuit breaker per deployment.",
            ),
            opt(
                "cache",
                Schema::Object(vec![req(
                    "ttl_secs",
                    count(1),
                    "How long a cached response is served.",
                )]),
                "Response cache for identical requests.",
            ),
            description(),
        ]),
        DocKind::Agent => Schema::Object(vec![
            req("model", string(), "The model alias the agent calls."),
            opt("system_prompt", text(), "The system message."),
            opt(
                "tools",
                list(string()),
                "Names of tool documents the agent may call.",
            ),
            opt(
                "max_steps",
                count(0),
                "Upper bound on model calls (0: the server default).",
            ),
            description(),
        ]),
        DocKind::Crew => Schema::Object(vec![
            req(
                "tasks",
                Schema::Array {
                    items: Box::new(Schema::Object(vec![
                        req("name", string(), "Unique in the crew."),
                        req("agent", string(), "Name of an agent document."),
                        opt("prompt", text(), "What the task asks of its agent."),
                        opt("depends_on", list(string()), "Tasks that finish first."),
                    ])),
                    non_empty: true,
                },
                "The tasks, a directed acyclic graph.",
            ),
            description(),
        ]),
        DocKind::Tool => Schema::Object(vec![
            req(
                "type",
                one_of(&["grpc", "builtin"]),
                "A remote crewmesh.tools.v1.ToolService, or a built-in tool.",
            ),
            opt("address", string(), "host:port of a grpc tool."),
            opt("timeout_ms", count(1), "Deadline of one call."),
            opt(
                "input_schema",
                Schema::Any,
                "JSON Schema of the tool's input.",
            ),
            description(),
        ]),
        DocKind::Tenant => Schema::Object(vec![
            opt("display_name", string(), "Human-readable name."),
            opt("rpm", count(1), "Requests per minute for the whole tenant."),
            opt("tpm", count(1), "Tokens per minute for the whole tenant."),
            opt(
                "budget_usd_month",
                non_negative(),
                "Spend limit per calendar month.",
            ),
            opt("max_concurrent_runs", count(1), "Agent runs at once."),
            opt(
                "allowed_models",
                list(string()),
                "Model aliases the tenant may call (absent: all).",
            ),
            opt(
                "audit_mode",
                one_of(&["best_effort", "fail_closed"]),
                "best_effort (default): requests are audited after the fact, never waiting for the audit trail; fail_closed: a request is carried out only once its audit record is durable, else refused with 503 audit-unavailable.",
            ),
            description(),
        ]),
        DocKind::ApiKey => Schema::Object(vec![
            req(
                "key_sha256",
                formatted(Format::Sha256Hex),
                "Lowercase hex SHA-256 of the key: the key itself is never stored.",
            ),
            req("tenant", string(), "The tenant the key acts for."),
            req(
                "roles",
                Schema::Array {
                    items: Box::new(one_of(ROLES)),
                    non_empty: true,
                },
                "Roles of the key's principal.",
            ),
            opt(
                "expires_at",
                Schema::NullableStr(Box::new(formatted(Format::Rfc3339))),
                "RFC 3339 expiry, or null.",
            ),
            opt("rpm", count(1), "Requests per minute."),
            opt("tpm", count(1), "Tokens per minute."),
            opt(
                "budget_usd_month",
                non_negative(),
                "Spend limit of this key per calendar month (UTC), besides the tenant's.",
            ),
            description(),
            opt(
                "created_at",
                formatted(Format::Rfc3339),
                "When the key was issued.",
            ),
            opt("created_by", string(), "Who issued the key."),
        ]),
        DocKind::Flag => return None,
    })
}

/// Checks `value` against `schema`, adding every problem under `path`.
pub fn check(schema: &Schema, value: &Value, path: &str, out: &mut Vec<SpecProblem>) {
    let mut add = |problem: String| {
        out.push(SpecProblem {
            path: path.to_owned(),
            problem,
        });
    };
    match (schema, value) {
        (Schema::Any, _) => {}
        (Schema::NullableStr(_), Value::Null) => {}
        (Schema::NullableStr(inner), v) => check(inner, v, path, out),
        (
            Schema::Str {
                non_empty,
                one_of,
                format,
            },
            Value::String(s),
        ) => {
            if *non_empty && s.is_empty() {
                add("must not be empty".to_owned());
            } else if let Some(allowed) = one_of
                && !allowed.contains(&s.as_str())
            {
                add(format!(
                    "{s:?} is not allowed; use one of {}",
                    allowed
                        .iter()
                        .map(|a| format!("{a:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            } else if let Some(f) = format
                && let Err(why) = check_format(*f, s)
            {
                add(why);
            }
        }
        (Schema::Int { min }, Value::Number(n)) => match n.as_i64() {
            Some(i) if i >= *min => {}
            Some(_) => add(format!("must be >= {min}")),
            None => add("must be a whole number".to_owned()),
        },
        (
            Schema::Num {
                min,
                exclusive,
                max,
            },
            Value::Number(n),
        ) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if *exclusive && x <= *min {
                add(format!("must be > {min}"));
            } else if !*exclusive && x < *min {
                add(format!("must be >= {min}"));
            } else if let Some(m) = max
                && x > *m
            {
                add(format!("must be <= {m}"));
            }
        }
        (Schema::Bool, Value::Bool(_)) => {}
        (Schema::Array { items, non_empty }, Value::Array(vs)) => {
            if *non_empty && vs.is_empty() {
                add("must not be empty".to_owned());
            }
            for (i, v) in vs.iter().enumerate() {
                check(items, v, &format!("{path}[{i}]"), out);
            }
        }
        (Schema::Object(fields), Value::Object(obj)) => check_object(fields, obj, path, out),
        (Schema::Map { values, non_empty }, Value::Object(obj)) => {
            if *non_empty && obj.is_empty() {
                add("must not be empty".to_owned());
            }
            for (k, v) in obj {
                let at = format!("{path}.{k}");
                if !is_map_key(k) {
                    out.push(SpecProblem {
                        path: at.clone(),
                        problem: format!(
                            "{k:?} is not a valid name: use a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
                        ),
                    });
                }
                check(values, v, &at, out);
            }
        }
        (schema, v) => add(format!(
            "must be {}, not {}",
            expected(schema),
            type_name(v)
        )),
    }
}

/// Checks an object's fields in declaration order, then reports unknown fields.
pub fn check_object(
    fields: &[Field],
    obj: &Map<String, Value>,
    path: &str,
    out: &mut Vec<SpecProblem>,
) {
    let join = |name: &str| {
        if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        }
    };
    for f in fields {
        match obj.get(f.name) {
            None | Some(Value::Null) if f.required => out.push(SpecProblem {
                path: join(f.name),
                problem: "is required".to_owned(),
            }),
            None => {}
            Some(Value::Null) if !matches!(f.schema, Schema::NullableStr(_) | Schema::Any) => {
                out.push(SpecProblem {
                    path: join(f.name),
                    problem: format!(
                        "must be {}, not null (leave the field out instead)",
                        expected(&f.schema)
                    ),
                });
            }
            Some(v) => check(&f.schema, v, &join(f.name), out),
        }
    }
    for k in obj.keys() {
        if !fields.iter().any(|f| f.name == k) {
            out.push(SpecProblem {
                path: join(k),
                problem: format!(
                    "is not a known field (known: {})",
                    fields.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
                ),
            });
        }
    }
}

fn check_format(format: Format, s: &str) -> Result<(), String> {
    match format {
        Format::HttpUrl => {
            let ok = s.parse::<http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.host().is_some_and(|h| !h.is_empty())
            });
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "{s:?} is not an http or https URL (e.g. \"https://api.openai.com/v1\")"
                ))
            }
        }
        Format::Sha256Hex => {
            if s.len() == 64
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                Ok(())
            } else {
                Err("must be 64 lowercase hex characters (a SHA-256 digest)".to_owned())
            }
        }
        Format::Rfc3339 => {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map(|_| ())
                .map_err(|_| {
                    format!("{s:?} is not an RFC 3339 time (e.g. \"2030-01-01T00:00:00Z\")")
                })
        }
        Format::EnvName => {
            let ok = s
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if ok {
                Ok(())
            } else {
                Err(format!("{s:?} is not an environment variable name"))
            }
        }
    }
}

/// A key of a [`Schema::Map`].
fn is_map_key(k: &str) -> bool {
    k.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && k.len() <= 64
        && k.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
}

fn expected(schema: &Schema) -> &'static str {
    match schema {
        Schema::Str { .. } | Schema::NullableStr(_) => "a string",
        Schema::Int { .. } => "a whole number",
        Schema::Num { .. } => "a number",
        Schema::Bool => "a boolean",
        Schema::Array { .. } => "an array",
        Schema::Object(_) | Schema::Map { .. } => "an object",
        Schema::Any => "any value",
    }
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn to_json_schema(schema: &Schema) -> Value {
    match schema {
        Schema::Str {
            non_empty,
            one_of,
            format,
        } => {
            let mut o = json!({"type": "string"});
            if *non_empty {
                o["minLength"] = json!(1);
            }
            if let Some(vs) = one_of {
                o["enum"] = json!(vs);
            }
            match format {
                Some(Format::HttpUrl) => o["format"] = json!("uri"),
                Some(Format::Rfc3339) => o["format"] = json!("date-time"),
                Some(Format::Sha256Hex) => o["pattern"] = json!("^[0-9a-f]{64}$"),
                Some(Format::EnvName) => o["pattern"] = json!("^[A-Za-z_][A-Za-z0-9_]*$"),
                None => {}
            }
            o
        }
        Schema::NullableStr(inner) => json!({"anyOf": [to_json_schema(inner), {"type": "null"}]}),
        Schema::Int { min } => json!({"type": "integer", "minimum": min}),
        Schema::Num {
            min,
            exclusive,
            max,
        } => {
            let mut o = json!({"type": "number"});
            if *exclusive {
                o["exclusiveMinimum"] = json!(min);
            } else {
                o["minimum"] = json!(min);
            }
            if let Some(m) = max {
                o["maximum"] = json!(m);
            }
            o
        }
        Schema::Bool => json!({"type": "boolean"}),
        Schema::Array { items, non_empty } => {
            let mut o = json!({"type": "array", "items": to_json_schema(items)});
            if *non_empty {
                o["minItems"] = json!(1);
            }
            o
        }
        Schema::Object(fields) => {
            let mut props = Map::new();
            for f in fields {
                let mut p = to_json_schema(&f.schema);
                if let Value::Object(o) = &mut p {
                    o.insert("description".into(), json!(f.description));
                }
                props.insert(f.name.to_owned(), p);
            }
            let required: Vec<&str> = fields
                .iter()
                .filter(|f| f.required)
                .map(|f| f.name)
                .collect();
            json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
        }
        Schema::Map { values, non_empty } => {
            let mut o = json!({
                "type": "object",
                "propertyNames": {"pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"},
                "additionalProperties": to_json_schema(values),
            });
            if *non_empty {
                o["minProperties"] = json!(1);
            }
            o
        }
        Schema::Any => json!({}),
    }
}

fn flag_json_schema() -> Value {
    let variant_list = json!({
        "type": "array", "minItems": 1,
        "items": {"type": "object", "additionalProperties": false, "required": ["variant", "weight"],
                  "properties": {"variant": {"type": "string"}, "weight": {"type": "integer", "minimum": 0, "maximum": 100}}},
        "description": "Fractional rollout by consistent hashing of the targeting key; weights sum to 100."
    });
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["variants", "default_variant"],
        "properties": {
            "enabled": {"type": "boolean", "description": "A disabled flag evaluates to its default variant with reason DISABLED."},
            "variants": {"type": "object", "minProperties": 1,
                         "additionalProperties": {"type": ["boolean", "string", "number", "object"]},
                         "description": "Variant name to value; all values of one type."},
            "default_variant": {"type": "string", "description": "The variant when no rule matches and there is no rollout."},
            "rules": {"type": "array", "description": "Tried in order; the first match decides.",
                      "items": {"type": "object", "additionalProperties": false, "required": ["when"],
                                "properties": {"when": {"$ref": "#/$defs/condition"}, "variant": {"type": "string"}, "rollout": variant_list.clone()}}},
            "rollout": variant_list,
            "description": {"type": "string"}
        },
        "$defs": {
            "condition": {"oneOf": [
                {"type": "object", "additionalProperties": false, "required": ["all"], "properties": {"all": {"type": "array", "items": {"$ref": "#/$defs/condition"}}}},
                {"type": "object", "additionalProperties": false, "required": ["any"], "properties": {"any": {"type": "array", "items": {"$ref": "#/$defs/condition"}}}},
                {"type": "object", "additionalProperties": false, "required": ["not"], "properties": {"not": {"$ref": "#/$defs/condition"}}},
                {"type": "object", "additionalProperties": false, "required": ["attribute", "op", "value"],
                 "properties": {"attribute": {"type": "string", "minLength": 1},
                                "op": {"enum": ["equals", "not_equals", "in", "not_in", "starts_with", "ends_with", "gt", "gte", "lt", "lte",
                                                "semver_eq", "semver_gt", "semver_gte", "semver_lt", "semver_lte"]},
                                "value": {}}}
            ]}
        }
    })
}

/// The JSON Schema (draft 2020-12) of a kind's document body.
pub fn json_schema(kind: DocKind) -> Value {
    let mut schema = match schema_of(kind) {
        Some(s) => to_json_schema(&s),
        None => flag_json_schema(),
    };
    if let Value::Object(o) = &mut schema {
        o.insert(
            "$schema".into(),
            json!("https://json-schema.org/draft/2020-12/schema"),
        );
        o.insert(
            "$id".into(),
            json!(format!("urn:crewmesh:config:v1:{}", kind.as_str())),
        );
        o.insert(
            "title".into(),
            json!(format!("crewmesh {} document", kind.as_str())),
        );
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published files match what the code checks: regenerate them with
    /// `CREWMESH_WRITE_SCHEMAS=1 cargo test -p crewmesh-config schemas`.
    #[test]
    fn published_schemas_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/schemas");
        for kind in DocKind::ALL {
            let text = serde_json::to_string_pretty(&json_schema(kind)).unwrap() + "\n";
            let path = dir.join(format!("{}.json", kind.as_str()));
            if std::env::var_os("CREWMESH_WRITE_SCHEMAS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &text).unwrap();
            }
            let published = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (regenerate the schemas)", path.display()));
            assert_eq!(
                published,
                text,
                "{} is stale (regenerate the schemas)",
                path.display()
            );
        }
    }
}
