//! Resolves the agent a run executes: an inline spec as given, or an `agent` config
//! document read from the config service, the caller's tenant first, then the shared
//! (`_global`) documents.

use crewmesh_kit::clients::{MeshChannel, with_principal};
use crewmesh_kit::principal::Principal;
use crewmesh_kit::status::{ErrorClass, class_of_code};
use crewmesh_proto::config::v1 as config;
use crewmesh_proto::config::v1::config_service_client::ConfigServiceClient;
use serde::Deserialize;
use tonic::Code;

use crate::error::{AgentRuntimeError, Result};
use crate::request::{AgentName, AgentRef};
use crate::run::AgentSpec;

/// How long a config lookup may take before StartRun gives up.
const CONFIG_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The fields of an `agent` document this runtime reads; others are ignored.
#[derive(Debug, Deserialize)]
struct AgentDocument {
    #[serde(default)]
    model: String,
    #[serde(default)]
    system_prompt: String,
    #[serde(default)]
    tools: Vec<String>,
    #[serde(default)]
    max_steps: u32,
}

/// Reads agent documents; `None` when no config service is configured.
#[derive(Clone)]
pub struct AgentResolver {
    config: Option<ConfigServiceClient<MeshChannel>>,
}

impl AgentResolver {
    pub fn new(config: Option<ConfigServiceClient<MeshChannel>>) -> Self {
        Self { config }
    }

    /// The agent name to record with the run (empty for inline agents) and its spec.
    pub async fn resolve(
        &self,
        principal: &Principal,
        agent: AgentRef,
    ) -> Result<(String, AgentSpec)> {
        match agent {
            AgentRef::Inline(spec) => Ok((String::new(), spec)),
            AgentRef::Named(name) => {
                let doc = self.fetch(principal, &name).await?;
                let spec = parse_document(&name, &doc.spec_json)?;
                Ok((name.as_str().to_owned(), spec))
            }
        }
    }

    #[tracing::instrument(skip(self, principal), fields(tenant = %principal.tenant))]
    async fn fetch(&self, principal: &Principal, name: &AgentName) -> Result<config::Document> {
        let client = self
            .config
            .clone()
            .ok_or(AgentRuntimeError::NoConfigService)?;
        for scope in [config::Scope::Tenant, config::Scope::Global] {
            let mut client = client.clone();
            let mut req = with_principal(
                config::GetRequest {
                    scope: scope as i32,
                    kind: config::Kind::Agent as i32,
                    name: name.as_str().to_owned(),
                },
                principal,
            );
            req.set_timeout(CONFIG_DEADLINE);
            let answer = tokio::time::timeout(CONFIG_DEADLINE, client.get(req))
                .await
                .unwrap_or_else(|_| {
                    Err(tonic::Status::deadline_exceeded(
                        "the config service did not answer in time",
                    ))
                });
            match answer {
                Ok(resp) => {
                    if let Some(doc) = resp.into_inner().document {
                        return Ok(doc);
                    }
                }
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => return Err(config_error(status)),
            }
        }
        Err(AgentRuntimeError::AgentNotFound(name.as_str().to_owned()))
    }
}

/// Errors the caller can act on keep their class and message; a refusal of the
/// runtime itself or an internal failure is the mesh's problem, logged and hidden.
fn config_error(status: tonic::Status) -> AgentRuntimeError {
    match class_of_code(status.code()) {
        ErrorClass::PermissionDenied | ErrorClass::Unauthenticated | ErrorClass::Internal => {
            AgentRuntimeError::ConfigInternal(status)
        }
        class => AgentRuntimeError::Config {
            class,
            message: status.message().to_owned(),
        },
    }
}

fn parse_document(name: &AgentName, spec_json: &str) -> Result<AgentSpec> {
    let unusable = |problem: String| AgentRuntimeError::UnusableAgent {
        name: name.as_str().to_owned(),
        problem,
    };
    let doc: AgentDocument = serde_json::from_str(spec_json)
        .map_err(|e| unusable(format!("its spec is not a valid agent document: {e}")))?;
    AgentSpec::new(doc.model, doc.system_prompt, doc.tools, doc.max_steps)
        .map_err(|p| unusable(p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> AgentName {
        AgentName::parse("bot").unwrap()
    }

    #[test]
    fn documents_need_a_model_and_may_omit_the_rest() {
        let spec = parse_document(&name(), r#"{"model":"m","description":"ignored"}"#).unwrap();
        assert_eq!(spec.model, "m");
        assert_eq!(spec.system_prompt, "");
        assert_eq!(spec.max_steps, 1);

        let spec = parse_document(&name(), r#"{"model":"m","system_prompt":"be brief"}"#).unwrap();
        assert_eq!(spec.system_prompt, "be brief");

        let err = parse_document(&name(), r#"{"system_prompt":"x"}"#).unwrap_err();
        assert_eq!(err.to_string(), "agent `bot`: model is required");

        let err = parse_document(&name(), r#"{"model":"m","tools":["t"]}"#).unwrap_err();
        assert_eq!(err.to_string(), "agent `bot`: tools are not supported yet");

        let err = parse_document(&name(), "[1]").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("agent `bot`: its spec is not a valid agent document"),
            "{err}"
        );
    }

    #[test]
    fn config_refusals_are_hidden_and_others_kept() {
        assert!(matches!(
            config_error(tonic::Status::permission_denied("no")),
            AgentRuntimeError::ConfigInternal(_)
        ));
        match config_error(tonic::Status::unavailable("etcd down")) {
            AgentRuntimeError::Config { class, message } => {
                assert_eq!(class, ErrorClass::Unavailable);
                assert_eq!(message, "etcd down");
            }
            other => panic!("{other:?}"),
        }
    }
}
