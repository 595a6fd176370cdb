//! Checks on document bodies before anything is written: `spec_json` must be a JSON
//! object of at most [`MAX_SPEC_BYTES`] that passes its kind's strict schema and
//! semantic rules; every problem is reported with its JSON path.

use std::fmt;

use serde_json::{Map, Value};

use crate::document::DocKind;
use crate::error::ConfigServiceError;
pub use crate::schema::PROVIDER_TYPES;
use crate::schema::{Schema, check_object, schema_of};

/// Largest accepted `spec_json`, in bytes.
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;

/// One problem in a document body: where (a JSON path such as `deployments[1].weight`)
/// and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecProblem {
    pub path: String,
    pub problem: String,
}

impl fmt::Display for SpecProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.problem)
    }
}

/// Parses and checks `spec_json` for `kind`; returns the object to store.
pub fn parse_spec(
    kind: DocKind,
    spec_json: &str,
) -> Result<Map<String, Value>, ConfigServiceError> {
    if spec_json.len() > MAX_SPEC_BYTES {
        return Err(ConfigServiceError::InvalidArgument(format!(
            "spec_json is {} bytes; the limit is {MAX_SPEC_BYTES} bytes",
            spec_json.len()
        )));
    }
    let value: Value = serde_json::from_str(spec_json).map_err(|e| {
        ConfigServiceError::InvalidArgument(format!("spec_json is not valid JSON: {e}"))
    })?;
    let Value::Object(spec) = value else {
        return Err(ConfigServiceError::InvalidArgument(format!(
            "spec_json must be a JSON object, not {}",
            crate::schema::type_name(&value)
        )));
    };
    check_spec(kind, &spec)?;
    Ok(spec)
}

/// The full check of one kind: its strict schema (see [`crate::schema`]) and the
/// rules a schema cannot say (unique names, references inside the document, rollout
/// weights). Every problem is reported at once, by JSON path.
pub fn check_spec(kind: DocKind, spec: &Map<String, Value>) -> Result<(), ConfigServiceError> {
    let mut problems = Vec::new();
    match schema_of(kind) {
        Some(Schema::Object(fields)) => {
            check_object(&fields, spec, "", &mut problems);
            if problems.is_empty() {
                semantic(kind, spec, &mut problems);
            }
        }
        Some(_) => {}
        None => {
            // Flags: the evaluator's own parser, so what is accepted is what runs.
            if let Err(ps) = crewmesh_kit::flags::Flag::parse("check", spec) {
                problems.extend(ps.into_iter().map(|p| SpecProblem {
                    path: p.path,
                    problem: p.problem,
                }));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigServiceError::InvalidSpec {
            kind: kind.as_str(),
            problems,
        })
    }
}

fn strings(v: Option<&Value>) -> impl Iterator<Item = &str> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

/// Checks on a body that already matches its schema.
fn semantic(kind: DocKind, spec: &Map<String, Value>, out: &mut Vec<SpecProblem>) {
    let mut add = |path: String, problem: String| out.push(SpecProblem { path, problem });
    match kind {
        DocKind::Model => {
            let mut lists = vec![("deployments".to_owned(), &spec["deployments"])];
            if let Some(Value::Object(variants)) = spec.get("variants") {
                for (name, v) in variants {
                    lists.push((format!("variants.{name}.deployments"), &v["deployments"]));
                }
            }
            for (path, list) in lists {
                let mut names = std::collections::HashSet::new();
                for (i, d) in list.as_array().into_iter().flatten().enumerate() {
                    if let Some(name) = d.get("name").and_then(Value::as_str)
                        && !names.insert(name)
                    {
                        add(
                            format!("{path}[{i}].name"),
                            format!(
                                "{name:?} is used by an earlier deployment; names must be unique"
                            ),
                        );
                    }
                }
            }
            match (spec.contains_key("variants"), spec.contains_key("flag")) {
                (true, false) => add(
                    "flag".to_owned(),
                    "is required with variants: name the flag that chooses one".to_owned(),
                ),
                (false, true) => add(
                    "variants".to_owned(),
                    "is required with flag: the flag's values name variants".to_owned(),
                ),
                _ => {}
            }
            if let Some(retry) = spec.get("retry")
                && let (Some(base), Some(max)) = (
                    retry.get("base_ms").and_then(Value::as_i64),
                    retry.get("max_ms").and_then(Value::as_i64),
                )
                && base > max
            {
                add(
                    "retry.base_ms".to_owned(),
                    format!("must not exceed retry.max_ms ({base} > {max})"),
                );
            }
        }
        DocKind::Crew => {
            let tasks: Vec<&Value> = spec["tasks"].as_array().into_iter().flatten().collect();
            let names: Vec<&str> = tasks
                .iter()
                .map(|t| t.get("name").and_then(Value::as_str).unwrap_or_default())
                .collect();
            for (i, name) in names.iter().enumerate() {
                if names[..i].contains(name) {
                    add(
                        format!("tasks[{i}].name"),
                        format!("{name:?} is used by an earlier task; names must be unique"),
                    );
                }
            }
            for (i, t) in tasks.iter().enumerate() {
                for (j, dep) in strings(t.get("depends_on")).enumerate() {
                    if !names.contains(&dep) {
                        add(
                            format!("tasks[{i}].depends_on[{j}]"),
                            format!("{dep:?} is not a task of this crew"),
                        );
                    } else if dep == names[i] {
                        add(
                            format!("tasks[{i}].depends_on[{j}]"),
                            "a task cannot depend on itself".to_owned(),
                        );
                    }
                }
            }
            if let Some(cycle) = crew_cycle(&names, &tasks) {
                add(
                    "tasks".to_owned(),
                    format!("the dependencies form a cycle: {cycle}"),
                );
            }
        }
        DocKind::Tool => {
            let is_grpc = spec.get("type").and_then(Value::as_str) == Some("grpc");
            if is_grpc && spec.get("address").is_none() {
                add(
                    "address".to_owned(),
                    "is required for a grpc tool".to_owned(),
                );
            }
        }
        _ => {}
    }
}

/// A dependency cycle among a crew's tasks, as `a -> b -> a`.
fn crew_cycle(names: &[&str], tasks: &[&Value]) -> Option<String> {
    // 0 = unvisited, 1 = on the stack, 2 = done.
    fn visit(
        i: usize,
        names: &[&str],
        tasks: &[&Value],
        state: &mut [u8],
        stack: &mut Vec<usize>,
    ) -> Option<String> {
        state[i] = 1;
        stack.push(i);
        for dep in strings(tasks[i].get("depends_on")) {
            let Some(j) = names.iter().position(|n| *n == dep) else {
                continue;
            };
            if j == i {
                continue;
            }
            if state[j] == 1 {
                let from = stack.iter().position(|k| *k == j).unwrap_or(0);
                let mut path: Vec<&str> = stack[from..].iter().map(|k| names[*k]).collect();
                path.push(names[j]);
                return Some(path.join(" -> "));
            }
            if state[j] == 0
                && let Some(c) = visit(j, names, tasks, state, stack)
            {
                return Some(c);
            }
        }
        stack.pop();
        state[i] = 2;
        None
    }
    let mut state = vec![0u8; names.len()];
    for i in 0..names.len() {
        if state[i] == 0
            && let Some(c) = visit(i, names, tasks, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(kind: DocKind, json: &str) -> Vec<String> {
        match parse_spec(kind, json) {
            Ok(_) => Vec::new(),
            Err(ConfigServiceError::InvalidSpec { problems, .. }) => {
                problems.iter().map(ToString::to_string).collect()
            }
            Err(other) => vec![format!("other: {other}")],
        }
    }

    #[test]
    fn a_good_model_passes() {
        let spec = parse_spec(
            DocKind::Model,
            r#"{"deployments":[{"provider":"sim","model":"sim-small","weight":2},{"provider":"openai","model":"gpt-4o-mini"}],"strategy":"weighted"}"#,
        )
        .unwrap();
        assert_eq!(spec["strategy"], "weighted");
    }

    #[test]
    fn model_problems_are_all_reported_with_paths() {
        assert_eq!(
            problems(
                DocKind::Model,
                r#"{"deployments":[{"provider":"sim","model":"m","weight":1},{"provider":"sim","model":"m","weight":0},7,{"provider":3,"weight":"x"},{"provider":"","model":"m","weight":-1.5}]}"#
            ),
            vec![
                "deployments[1].weight: must be > 0",
                "deployments[2]: must be an object, not a number",
                "deployments[3].provider: must be a string, not a number",
                "deployments[3].model: is required",
                "deployments[3].weight: must be a number, not a string",
                "deployments[4].provider: must not be empty",
                "deployments[4].weight: must be > 0",
            ]
        );
        assert_eq!(
            problems(DocKind::Model, r#"{}"#),
            vec!["deployments: is required"]
        );
        assert_eq!(
            problems(DocKind::Model, r#"{"deployments":[]}"#),
            vec!["deployments: must not be empty"]
        );
        assert_eq!(
            problems(DocKind::Model, r#"{"deployments":{"provider":"x"}}"#),
            vec!["deployments: must be an array, not an object"]
        );
    }

    #[test]
    fn provider_problems_are_all_reported() {
        assert!(
            problems(
                DocKind::Provider,
                r#"{"type":"openai","base_url":"https://api.openai.com/v1"}"#
            )
            .is_empty()
        );
        assert!(
            problems(
                DocKind::Provider,
                r#"{"type":"simulated","base_url":"http://127.0.0.1:8080/v1"}"#
            )
            .is_empty()
        );
        assert_eq!(
            problems(
                DocKind::Provider,
                r#"{"type":"gemini","base_url":"ftp://x"}"#
            ),
            vec![
                r#"type: "gemini" is not allowed; use one of "openai", "anthropic", "simulated""#,
                r#"base_url: "ftp://x" is not an http or https URL (e.g. "https://api.openai.com/v1")"#,
            ]
        );
        assert_eq!(
            problems(DocKind::Provider, r#"{"base_url":"api.openai.com"}"#),
            vec![
                "type: is required",
                r#"base_url: "api.openai.com" is not an http or https URL (e.g. "https://api.openai.com/v1")"#,
            ]
        );
        assert_eq!(
            problems(DocKind::Provider, r#"{"type":1,"base_url":null}"#),
            vec![
                "type: must be a string, not a number",
                "base_url: is required"
            ]
        );
    }

    #[test]
    fn body_must_be_a_small_json_object() {
        let msg = |json: &str| match parse_spec(DocKind::Agent, json) {
            Err(ConfigServiceError::InvalidArgument(m)) => m,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(msg("[1]"), "spec_json must be a JSON object, not an array");
        assert!(msg("{").starts_with("spec_json is not valid JSON: "));
        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(MAX_SPEC_BYTES));
        assert_eq!(
            msg(&big),
            format!(
                "spec_json is {} bytes; the limit is 1048576 bytes",
                MAX_SPEC_BYTES + 8
            )
        );
    }

    #[test]
    fn unknown_fields_and_inline_secrets_are_refused() {
        assert_eq!(
            problems(
                DocKind::Provider,
                r#"{"type":"openai","base_url":"https://api.openai.com/v1","apikey":"sk-123","timeout":5}"#
            ),
            vec![
                "apikey: is not a known field (known: type, base_url, api_key, api_key_env, api_key_file, connect_timeout_ms, first_byte_timeout_ms, total_timeout_ms, description)",
                "timeout: is not a known field (known: type, base_url, api_key, api_key_env, api_key_file, connect_timeout_ms, first_byte_timeout_ms, total_timeout_ms, description)",
            ]
        );
        assert_eq!(
            problems(
                DocKind::Model,
                r#"{"deployments":[{"provider":"p","model":"m","colour":"red","input_price_per_1m":-1}],"strategy":"random"}"#
            ),
            vec![
                "deployments[0].input_price_per_1m: must be >= 0",
                "deployments[0].colour: is not a known field (known: provider, model, weight, name, priority, input_price_per_1m, output_price_per_1m, rpm, tpm, quality_tier, context_window, tags)",
                r#"strategy: "random" is not allowed; use one of "priority", "weighted-random", "weighted", "least-latency", "cost-optimised", "cost", "adaptive""#,
            ]
        );
    }

    #[test]
    fn every_kind_has_semantic_checks() {
        assert_eq!(
            problems(
                DocKind::Model,
                r#"{"deployments":[{"name":"a","provider":"p","model":"m"},{"name":"a","provider":"p","model":"n"}],"retry":{"base_ms":500,"max_ms":100}}"#
            ),
            vec![
                r#"deployments[1].name: "a" is used by an earlier deployment; names must be unique"#,
                "retry.base_ms: must not exceed retry.max_ms (500 > 100)",
            ]
        );
        assert_eq!(
            problems(
                DocKind::Crew,
                r#"{"tasks":[{"name":"a","agent":"x","depends_on":["c"]},{"name":"b","agent":"x","depends_on":["a","zz"]},{"name":"c","agent":"x","depends_on":["b"]},{"name":"a","agent":"x"}]}"#
            ),
            vec![
                r#"tasks[3].name: "a" is used by an earlier task; names must be unique"#,
                r#"tasks[1].depends_on[1]: "zz" is not a task of this crew"#,
                "tasks: the dependencies form a cycle: a -> c -> b -> a",
            ]
        );
        assert!(problems(DocKind::Crew, r#"{"tasks":[{"name":"a","agent":"x"},{"name":"b","agent":"y","depends_on":["a"]}]}"#).is_empty());
        assert_eq!(
            problems(DocKind::Tool, r#"{"type":"grpc"}"#),
            vec!["address: is required for a grpc tool"]
        );
        assert_eq!(
            problems(
                DocKind::ApiKey,
                r#"{"key_sha256":"ABC","tenant":"acme","roles":["root"],"expires_at":"tomorrow"}"#
            ),
            vec![
                "key_sha256: must be 64 lowercase hex characters (a SHA-256 digest)",
                r#"roles[0]: "root" is not allowed; use one of "admin", "operator", "developer", "viewer", "auditor""#,
                r#"expires_at: "tomorrow" is not an RFC 3339 time (e.g. "2030-01-01T00:00:00Z")"#,
            ]
        );
        let digest = "a".repeat(64);
        assert!(problems(DocKind::ApiKey, &format!(r#"{{"key_sha256":"{digest}","tenant":"acme","roles":["admin"],"expires_at":null}}"#)).is_empty());
        assert_eq!(
            problems(DocKind::Tenant, r#"{"rpm":0,"budget_usd_month":"lots"}"#),
            vec![
                "rpm: must be >= 1",
                "budget_usd_month: must be a number, not a string"
            ]
        );
        assert_eq!(
            problems(DocKind::Agent, r#"{"system_prompt":"hi","max_steps":-1}"#),
            vec!["model: is required", "max_steps: must be >= 0"]
        );
        assert_eq!(
            problems(
                DocKind::Flag,
                r#"{"variants":{"a":1,"b":2},"default_variant":"a","rollout":[{"variant":"a","weight":50},{"variant":"b","weight":40}]}"#
            ),
            vec!["rollout: weights must sum to 100 (they sum to 90)"]
        );
        assert!(
            problems(
                DocKind::Flag,
                r#"{"variants":{"a":1},"default_variant":"a"}"#
            )
            .is_empty()
        );
    }

    #[test]
    fn model_variants_are_checked_like_deployments() {
        assert!(
            problems(
                DocKind::Model,
                r#"{"deployments":[{"provider":"p","model":"m"}],"flag":"ab","variants":{"blue":{"deployments":[{"provider":"p","model":"b"}]},"green":{"deployments":[{"provider":"p","model":"g"}],"strategy":"weighted"}}}"#
            )
            .is_empty()
        );
        assert_eq!(
            problems(
                DocKind::Model,
                r#"{"deployments":[{"provider":"p","model":"m"}],"variants":{"Blue":{"deployments":[]},"g":{"deployments":[{"name":"x","provider":"p","model":"a"},{"name":"x","provider":"p","model":"b"}],"colour":1}}}"#
            ),
            vec![
                r#"variants.Blue: "Blue" is not a valid name: use a-z, 0-9, '.', '_' or '-', starting with a letter or digit"#,
                "variants.Blue.deployments: must not be empty",
                "variants.g.colour: is not a known field (known: deployments, strategy, description)",
            ]
        );
        assert_eq!(
            problems(
                DocKind::Model,
                r#"{"deployments":[{"provider":"p","model":"m"}],"variants":{"g":{"deployments":[{"name":"x","provider":"p","model":"a"},{"name":"x","provider":"p","model":"b"}]}}}"#
            ),
            vec![
                r#"variants.g.deployments[1].name: "x" is used by an earlier deployment; names must be unique"#,
                "flag: is required with variants: name the flag that chooses one",
            ]
        );
        assert_eq!(
            problems(
                DocKind::Model,
                r#"{"deployments":[{"provider":"p","model":"m"}],"flag":"ab","variants":{}}"#
            ),
            vec!["variants: must not be empty"]
        );
    }

    #[test]
    fn invalid_spec_error_lists_every_problem() {
        let err = parse_spec(DocKind::Model, r#"{"deployments":[{"model":"m"}]}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid model spec: deployments[0].provider: is required"
        );
    }
}
