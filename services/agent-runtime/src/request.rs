//! Wire requests checked into domain values at the edge. Nothing past this module
//! handles an unvalidated run id, agent name or input.

use crewmesh_proto::agent::v1 as pb;
use crewmesh_proto::agent::v1::start_run_request::AgentRef as PbAgentRef;

use crate::error::AgentRuntimeError;
use crate::run::{AgentSpec, RunId};

/// The largest run input, in bytes.
pub const MAX_INPUT_BYTES: usize = 1024 * 1024;
/// The longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// The longest agent document name, in bytes.
pub const MAX_AGENT_NAME_BYTES: usize = 253;

/// The name of an `agent` config document: 1-253 characters of ASCII letters, digits,
/// `-`, `_` and `.`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentName(String);

impl AgentName {
    pub fn parse(s: &str) -> Result<Self, AgentRuntimeError> {
        if s.is_empty() {
            return Err(AgentRuntimeError::InvalidArgument(
                "agent: the agent name is empty (give an agent document name or an inline spec)"
                    .into(),
            ));
        }
        let ok = s.len() <= MAX_AGENT_NAME_BYTES
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            return Err(AgentRuntimeError::InvalidArgument(format!(
                "agent: `{}` is not a valid agent name (use 1-{MAX_AGENT_NAME_BYTES} characters of letters, digits, '-', '_' or '.')",
                s.escape_debug()
            )));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Which agent a run executes.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentRef {
    /// An `agent` config document, resolved at start.
    Named(AgentName),
    Inline(AgentSpec),
}

/// A checked `StartRunRequest`.
#[derive(Debug, Clone, PartialEq)]
pub struct StartRun {
    pub agent: AgentRef,
    pub input: String,
    /// Empty when the caller gave none.
    pub idempotency_key: String,
}

impl TryFrom<pb::StartRunRequest> for StartRun {
    type Error = AgentRuntimeError;

    fn try_from(req: pb::StartRunRequest) -> Result<Self, AgentRuntimeError> {
        let agent = match req.agent_ref {
            None => {
                return Err(AgentRuntimeError::InvalidArgument(
                    "set `agent` (the name of an agent document) or `inline` (an agent spec)"
                        .into(),
                ));
            }
            Some(PbAgentRef::Agent(name)) => AgentRef::Named(AgentName::parse(&name)?),
            Some(PbAgentRef::Inline(spec)) => AgentRef::Inline(
                AgentSpec::new(spec.model, spec.system_prompt, spec.tools, spec.max_steps)
                    .map_err(|p| AgentRuntimeError::InvalidArgument(format!("inline: {p}")))?,
            ),
        };
        if req.input.is_empty() {
            return Err(AgentRuntimeError::InvalidArgument("input is empty".into()));
        }
        if req.input.len() > MAX_INPUT_BYTES {
            return Err(AgentRuntimeError::InvalidArgument(format!(
                "input is {} bytes long; the limit is {MAX_INPUT_BYTES} (1 MiB)",
                req.input.len()
            )));
        }
        if req.input.contains('\0') {
            return Err(AgentRuntimeError::InvalidArgument(
                "input must not contain NUL characters".into(),
            ));
        }
        let key = req.idempotency_key;
        if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(AgentRuntimeError::InvalidArgument(format!(
                "idempotency_key is {} bytes long; the limit is {MAX_IDEMPOTENCY_KEY_BYTES}",
                key.len()
            )));
        }
        if key.chars().any(char::is_control) {
            return Err(AgentRuntimeError::InvalidArgument(
                "idempotency_key must not contain control characters".into(),
            ));
        }
        Ok(Self {
            agent,
            input: req.input,
            idempotency_key: key,
        })
    }
}

/// Checks the `run_id` field of a request.
pub fn parse_run_id(s: &str) -> Result<RunId, AgentRuntimeError> {
    if s.is_empty() {
        return Err(AgentRuntimeError::InvalidArgument("run_id is empty".into()));
    }
    RunId::parse(s).ok_or_else(|| {
        AgentRuntimeError::InvalidArgument(format!(
            "run_id `{}` is not a run id (expected a UUID such as 0190b5d2-8f3a-7c4e-9a1b-2c3d4e5f6a7b)",
            s.escape_debug()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(model: &str) -> Option<PbAgentRef> {
        Some(PbAgentRef::Inline(pb::AgentSpec {
            model: model.into(),
            system_prompt: String::new(),
            tools: vec![],
            max_steps: 0,
        }))
    }

    fn message(r: Result<StartRun, AgentRuntimeError>) -> String {
        match r {
            Err(AgentRuntimeError::InvalidArgument(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_well_formed_request() {
        let r = StartRun::try_from(pb::StartRunRequest {
            agent_ref: inline("m"),
            input: "hi".into(),
            idempotency_key: "k-1".into(),
        })
        .unwrap();
        assert_eq!(r.input, "hi");
        assert_eq!(r.idempotency_key, "k-1");
        match r.agent {
            AgentRef::Inline(spec) => assert_eq!(spec.model, "m"),
            other => panic!("{other:?}"),
        }
        let r = StartRun::try_from(pb::StartRunRequest {
            agent_ref: Some(PbAgentRef::Agent("support.bot-1".into())),
            input: "hi".into(),
            idempotency_key: String::new(),
        })
        .unwrap();
        assert_eq!(
            r.agent,
            AgentRef::Named(AgentName::parse("support.bot-1").unwrap())
        );
    }

    #[test]
    fn names_each_problem() {
        let base = || pb::StartRunRequest {
            agent_ref: inline("m"),
            input: "hi".into(),
            idempotency_key: String::new(),
        };
        assert_eq!(
            message(StartRun::try_from(pb::StartRunRequest {
                agent_ref: None,
                ..base()
            })),
            "set `agent` (the name of an agent document) or `inline` (an agent spec)"
        );
        assert_eq!(
            message(StartRun::try_from(pb::StartRunRequest {
                agent_ref: inline(""),
                ..base()
            })),
            "inline: model is required"
        );
        assert_eq!(
            message(StartRun::try_from(pb::StartRunRequest {
                agent_ref: Some(PbAgentRef::Inline(pb::AgentSpec {
                    model: "m".into(),
                    system_prompt: String::new(),
                    tools: vec!["search".into()],
                    max_steps: 0,
                })),
                ..base()
            })),
            "inline: tools are not supported yet"
        );
        assert_eq!(
            message(StartRun::try_from(pb::StartRunRequest {
                input: String::new(),
                ..base()
            })),
            "input is empty"
        );
        assert_eq!(
            message(StartRun::try_from(pb::StartRunRequest {
                input: "x".repeat(MAX_INPUT_BYTES + 1),
                ..base()
            })),
            "input is 1048577 bytes long; the limit is 1048576 (1 MiB)"
        );
        assert!(
            StartRun::try_from(pb::StartRunRequest {
                input: "x".repeat(MAX_INPUT_BYTES),
                ..base()
            })
            .is_ok()
        );
        assert_eq!(
            message(StartRun::try_from(pb::StartRunRequest {
                input: "a\0b".into(),
                ..base()
            })),
            "input must not contain NUL characters"
        );
        assert_eq!(
            message(StartRun::try_from(pb::StartRunRequest {
                idempotency_key: "k".repeat(257),
                ..base()
            })),
            "idempotency_key is 257 bytes long; the limit is 256"
        );
        assert_eq!(
            message(StartRun::try_from(pb::StartRunRequest {
                agent_ref: Some(PbAgentRef::Agent(String::new())),
                ..base()
            })),
            "agent: the agent name is empty (give an agent document name or an inline spec)"
        );
        assert!(
            message(StartRun::try_from(pb::StartRunRequest {
                agent_ref: Some(PbAgentRef::Agent("a/b".into())),
                ..base()
            }))
            .starts_with("agent: `a/b` is not a valid agent name")
        );
    }

    #[test]
    fn run_ids_are_checked() {
        assert!(matches!(
            parse_run_id(""),
            Err(AgentRuntimeError::InvalidArgument(m)) if m == "run_id is empty"
        ));
        assert!(parse_run_id("nope").is_err());
        let id = RunId::new();
        assert_eq!(parse_run_id(&id.to_string()).unwrap(), id);
    }
}
