//! Checks on document bodies before anything is written: `spec_json` must be a JSON
//! object of at most [`MAX_SPEC_BYTES`], and the kinds the mesh reads first (`model`,
//! `provider`) get a structural check that reports every problem with its JSON path.

use std::fmt;

use serde_json::{Map, Value};

use crate::document::DocKind;
use crate::error::ConfigServiceError;

/// Largest accepted `spec_json`, in bytes.
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;

/// Provider `type`s the router can talk to.
pub const PROVIDER_TYPES: &[&str] = &["openai", "anthropic", "simulated"];

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
            type_name(&value)
        )));
    };
    check_spec(kind, &spec)?;
    Ok(spec)
}

/// The structural check of one kind; every problem is reported at once.
pub fn check_spec(kind: DocKind, spec: &Map<String, Value>) -> Result<(), ConfigServiceError> {
    let mut problems = Checker::default();
    match kind {
        DocKind::Model => check_model(spec, &mut problems),
        DocKind::Provider => check_provider(spec, &mut problems),
        // Full schemas for the other kinds come with schema validation.
        DocKind::Agent
        | DocKind::Crew
        | DocKind::Tool
        | DocKind::Tenant
        | DocKind::ApiKey
        | DocKind::Flag => {}
    }
    if problems.0.is_empty() {
        Ok(())
    } else {
        Err(ConfigServiceError::InvalidSpec {
            kind: kind.as_str(),
            problems: problems.0,
        })
    }
}

#[derive(Default)]
struct Checker(Vec<SpecProblem>);

impl Checker {
    fn add(&mut self, path: impl Into<String>, problem: impl Into<String>) {
        self.0.push(SpecProblem {
            path: path.into(),
            problem: problem.into(),
        });
    }

    /// A required, non-empty string field.
    fn string<'a>(
        &mut self,
        obj: &'a Map<String, Value>,
        field: &str,
        path: &str,
    ) -> Option<&'a str> {
        match obj.get(field) {
            None | Some(Value::Null) => {
                self.add(path, "is required");
                None
            }
            Some(Value::String(s)) if s.is_empty() => {
                self.add(path, "must not be empty");
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                self.add(path, format!("must be a string, not {}", type_name(other)));
                None
            }
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_model(spec: &Map<String, Value>, p: &mut Checker) {
    let deployments = match spec.get("deployments") {
        None | Some(Value::Null) => {
            p.add("deployments", "is required");
            return;
        }
        Some(Value::Array(items)) => items,
        Some(other) => {
            p.add(
                "deployments",
                format!("must be an array, not {}", type_name(other)),
            );
            return;
        }
    };
    if deployments.is_empty() {
        p.add("deployments", "must not be empty");
    }
    for (i, item) in deployments.iter().enumerate() {
        let path = format!("deployments[{i}]");
        let Value::Object(d) = item else {
            p.add(&path, format!("must be an object, not {}", type_name(item)));
            continue;
        };
        p.string(d, "provider", &format!("{path}.provider"));
        p.string(d, "model", &format!("{path}.model"));
        match d.get("weight") {
            None => {}
            Some(Value::Number(n)) if n.as_f64().is_some_and(|w| w > 0.0 && w.is_finite()) => {}
            Some(Value::Number(_)) => p.add(format!("{path}.weight"), "must be > 0"),
            Some(other) => p.add(
                format!("{path}.weight"),
                format!("must be a number, not {}", type_name(other)),
            ),
        }
    }
}

fn check_provider(spec: &Map<String, Value>, p: &mut Checker) {
    if let Some(t) = p.string(spec, "type", "type")
        && !PROVIDER_TYPES.contains(&t)
    {
        p.add(
            "type",
            format!(
                "{t:?} is not a provider type; use one of {}",
                PROVIDER_TYPES
                    .iter()
                    .map(|t| format!("{t:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    if let Some(url) = p.string(spec, "base_url", "base_url")
        && !is_http_url(url)
    {
        p.add(
            "base_url",
            format!("{url:?} is not an http or https URL (e.g. \"https://api.openai.com/v1\")"),
        );
    }
}

fn is_http_url(s: &str) -> bool {
    let Ok(uri) = s.parse::<http::Uri>() else {
        return false;
    };
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let host_ok = uri.host().is_some_and(|h| !h.is_empty());
    scheme_ok && host_ok
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
                r#"type: "gemini" is not a provider type; use one of "openai", "anthropic", "simulated""#,
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
        // Kinds without a structural check only need an object.
        assert!(parse_spec(DocKind::Flag, r#"{"anything":[1,2]}"#).is_ok());
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
