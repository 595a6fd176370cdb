//! The checked domain model of a run: its id, its resolved agent, its status and its
//! steps, as kept in the store and shown on the wire.

use std::fmt;
use std::time::SystemTime;

use crewmesh_kit::principal::{Principal, Role, TenantId};
use crewmesh_proto::agent::v1 as pb;
use crewmesh_proto::time::from_micros;
use crewmesh_proto::types::v1::TokenUsage as PbTokenUsage;
use serde::{Deserialize, Serialize};

/// The largest system prompt an agent may have, in bytes.
pub const MAX_SYSTEM_PROMPT_BYTES: usize = 32 * 1024;
/// The longest model alias, in bytes.
pub const MAX_MODEL_BYTES: usize = 256;

/// A run id: a UUID (v7 for runs this runtime creates, so ids sort by creation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(uuid::Uuid);

impl RunId {
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    /// Parses the canonical hyphenated form.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 36 {
            return None;
        }
        uuid::Uuid::try_parse(s).ok().map(Self)
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunStatus {
    Pending,
    Running,
    WaitingApproval,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    /// The stored and wire value (the `crewmesh.agent.v1.RunStatus` number).
    pub fn code(self) -> i32 {
        self.to_proto() as i32
    }

    pub fn from_code(code: i32) -> Option<Self> {
        match pb::RunStatus::try_from(code).ok()? {
            pb::RunStatus::Unspecified => None,
            pb::RunStatus::Pending => Some(Self::Pending),
            pb::RunStatus::Running => Some(Self::Running),
            pb::RunStatus::WaitingApproval => Some(Self::WaitingApproval),
            pb::RunStatus::Succeeded => Some(Self::Succeeded),
            pb::RunStatus::Failed => Some(Self::Failed),
            pb::RunStatus::Cancelled => Some(Self::Cancelled),
        }
    }

    pub fn to_proto(self) -> pb::RunStatus {
        match self {
            Self::Pending => pb::RunStatus::Pending,
            Self::Running => pb::RunStatus::Running,
            Self::WaitingApproval => pb::RunStatus::WaitingApproval,
            Self::Succeeded => pb::RunStatus::Succeeded,
            Self::Failed => pb::RunStatus::Failed,
            Self::Cancelled => pb::RunStatus::Cancelled,
        }
    }

    /// A finished run never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// Lowercase name for logs and audit details.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::WaitingApproval => "waiting_approval",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepKind {
    ModelCall,
    ToolCall,
}

impl StepKind {
    pub fn code(self) -> i32 {
        self.to_proto() as i32
    }

    pub fn from_code(code: i32) -> Option<Self> {
        match pb::StepKind::try_from(code).ok()? {
            pb::StepKind::Unspecified => None,
            pb::StepKind::ModelCall => Some(Self::ModelCall),
            pb::StepKind::ToolCall => Some(Self::ToolCall),
        }
    }

    pub fn to_proto(self) -> pb::StepKind {
        match self {
            Self::ModelCall => pb::StepKind::ModelCall,
            Self::ToolCall => pb::StepKind::ToolCall,
        }
    }
}

/// Why an agent spec cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecProblem {
    #[error("model is required")]
    ModelMissing,
    #[error("model is {0} bytes long; the limit is {MAX_MODEL_BYTES}")]
    ModelTooLong(usize),
    #[error("model must not contain control characters")]
    ModelControl,
    #[error("system_prompt is {0} bytes long; the limit is {MAX_SYSTEM_PROMPT_BYTES} (32 KiB)")]
    SystemPromptTooLong(usize),
    #[error("system_prompt must not contain NUL characters")]
    SystemPromptNul,
    #[error("tools are not supported yet")]
    ToolsUnsupported,
    #[error("max_steps must be 0 or 1 (multi-step agents are not supported yet), got {0}")]
    MaxStepsUnsupported(u32),
}

/// A resolved, checked agent: what the run executes. Stored with the run as JSON so a
/// resumed run executes exactly what was accepted, even if its document changed since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSpec {
    pub model: String,
    #[serde(default)]
    pub system_prompt: String,
    /// Always empty in this release (tools are refused at the edge).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Upper bound on model calls; always 1 in this release.
    pub max_steps: u32,
}

impl AgentSpec {
    /// Checks the parts of a spec; `max_steps` 0 means the server default (1).
    pub fn new(
        model: String,
        system_prompt: String,
        tools: Vec<String>,
        max_steps: u32,
    ) -> Result<Self, SpecProblem> {
        if model.trim().is_empty() {
            return Err(SpecProblem::ModelMissing);
        }
        if model.len() > MAX_MODEL_BYTES {
            return Err(SpecProblem::ModelTooLong(model.len()));
        }
        if model.chars().any(char::is_control) {
            return Err(SpecProblem::ModelControl);
        }
        if system_prompt.len() > MAX_SYSTEM_PROMPT_BYTES {
            return Err(SpecProblem::SystemPromptTooLong(system_prompt.len()));
        }
        if system_prompt.contains('\0') {
            return Err(SpecProblem::SystemPromptNul);
        }
        if !tools.is_empty() {
            return Err(SpecProblem::ToolsUnsupported);
        }
        if max_steps > 1 {
            return Err(SpecProblem::MaxStepsUnsupported(max_steps));
        }
        Ok(Self {
            model,
            system_prompt,
            tools,
            max_steps: 1,
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }

    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }
}

/// Tokens a run has consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl TokenUsage {
    pub fn to_proto(self) -> PbTokenUsage {
        PbTokenUsage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.prompt_tokens.saturating_add(self.completion_tokens),
        }
    }
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub index: u32,
    pub kind: StepKind,
    /// Model alias or tool name.
    pub target: String,
    pub output: String,
    pub error: String,
    pub started_micros: i64,
    /// `None` while the step is in progress.
    pub finished_micros: Option<i64>,
}

impl Step {
    pub fn to_proto(&self) -> pb::Step {
        pb::Step {
            index: self.index,
            kind: self.kind.to_proto() as i32,
            target: self.target.clone(),
            output: self.output.clone(),
            error: self.error.clone(),
            started_at: Some(from_micros(self.started_micros)),
            finished_at: self.finished_micros.map(from_micros),
        }
    }
}

/// A run as stored: who owns it, what it runs, where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub id: RunId,
    /// The end user the run acts for; its tenant owns the run.
    pub owner: Principal,
    /// The agent document name, or empty for an inline agent.
    pub agent: String,
    pub spec: AgentSpec,
    pub status: RunStatus,
    pub input: String,
    pub output: String,
    pub error: String,
    pub usage: TokenUsage,
    pub cost_usd: f64,
    pub created_micros: i64,
    pub updated_micros: i64,
    /// Empty when the caller gave none.
    pub idempotency_key: String,
    pub steps: Vec<Step>,
}

impl Run {
    /// A new run, not yet started.
    pub fn new_pending(
        owner: Principal,
        agent: String,
        spec: AgentSpec,
        input: String,
        idempotency_key: String,
    ) -> Self {
        let now = now_micros();
        Self {
            id: RunId::new(),
            owner,
            agent,
            spec,
            status: RunStatus::Pending,
            input,
            output: String::new(),
            error: String::new(),
            usage: TokenUsage::default(),
            cost_usd: 0.0,
            created_micros: now,
            updated_micros: now,
            idempotency_key,
            steps: Vec::new(),
        }
    }

    pub fn tenant(&self) -> &TenantId {
        &self.owner.tenant
    }

    pub fn to_proto(&self) -> pb::Run {
        pb::Run {
            id: self.id.to_string(),
            agent: self.agent.clone(),
            status: self.status.to_proto() as i32,
            input: self.input.clone(),
            output: self.output.clone(),
            error: self.error.clone(),
            steps: self.steps.iter().map(Step::to_proto).collect(),
            usage: Some(self.usage.to_proto()),
            cost_usd: self.cost_usd,
            created_at: Some(from_micros(self.created_micros)),
            updated_at: Some(from_micros(self.updated_micros)),
            crew_run_id: String::new(),
        }
    }
}

/// Roles as stored: comma-separated names.
pub fn roles_to_text(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn roles_from_text(s: &str) -> Result<Vec<Role>, String> {
    s.split(',')
        .filter(|r| !r.is_empty())
        .map(|r| Role::parse(r).map_err(|e| e.to_string()))
        .collect()
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    crewmesh_proto::time::to_micros(&crewmesh_proto::time::to_timestamp(SystemTime::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_checks_each_limit() {
        let ok = AgentSpec::new("m".into(), "be brief".into(), vec![], 0).unwrap();
        assert_eq!(ok.max_steps, 1);
        assert_eq!(
            AgentSpec::new(" ".into(), String::new(), vec![], 0),
            Err(SpecProblem::ModelMissing)
        );
        assert_eq!(
            AgentSpec::new("m".into(), String::new(), vec!["search".into()], 0),
            Err(SpecProblem::ToolsUnsupported)
        );
        assert_eq!(
            AgentSpec::new("m".into(), String::new(), vec![], 2),
            Err(SpecProblem::MaxStepsUnsupported(2))
        );
        assert!(AgentSpec::new("m".into(), "x".repeat(MAX_SYSTEM_PROMPT_BYTES), vec![], 1).is_ok());
        assert_eq!(
            AgentSpec::new(
                "m".into(),
                "x".repeat(MAX_SYSTEM_PROMPT_BYTES + 1),
                vec![],
                1
            ),
            Err(SpecProblem::SystemPromptTooLong(
                MAX_SYSTEM_PROMPT_BYTES + 1
            ))
        );
        assert_eq!(
            AgentSpec::new("m\n".into(), String::new(), vec![], 1),
            Err(SpecProblem::ModelControl)
        );
        assert_eq!(
            AgentSpec::new("m".into(), "a\0b".into(), vec![], 1),
            Err(SpecProblem::SystemPromptNul)
        );
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = AgentSpec::new("gpt".into(), "sys".into(), vec![], 1).unwrap();
        assert_eq!(AgentSpec::from_json(&spec.to_json()).unwrap(), spec);
    }

    #[test]
    fn status_and_kind_codes_round_trip() {
        for s in [
            RunStatus::Pending,
            RunStatus::Running,
            RunStatus::WaitingApproval,
            RunStatus::Succeeded,
            RunStatus::Failed,
            RunStatus::Cancelled,
        ] {
            assert_eq!(RunStatus::from_code(s.code()), Some(s));
        }
        assert_eq!(RunStatus::from_code(0), None);
        assert_eq!(RunStatus::from_code(99), None);
        assert_eq!(RunStatus::Succeeded.code(), 4);
        assert_eq!(StepKind::from_code(1), Some(StepKind::ModelCall));
        assert_eq!(StepKind::from_code(0), None);
    }

    #[test]
    fn run_ids_parse_only_canonical_uuids() {
        let id = RunId::new();
        assert_eq!(RunId::parse(&id.to_string()), Some(id));
        assert_eq!(RunId::parse("not-a-uuid"), None);
        assert_eq!(RunId::parse(&id.to_string().replace('-', "")), None);
    }

    #[test]
    fn roles_round_trip_as_text() {
        let roles = vec![Role::Developer, Role::Viewer];
        assert_eq!(roles_to_text(&roles), "developer,viewer");
        assert_eq!(roles_from_text("developer,viewer").unwrap(), roles);
        assert_eq!(roles_from_text("").unwrap(), vec![]);
        assert!(roles_from_text("root").is_err());
    }
}
