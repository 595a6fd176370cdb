//! How the CLI reaches the gateway: `--gateway`/`--api-key` (or `CREWMESH_API_KEY`),
//! else the running `crewmesh up` found through `DATA_DIR/state.json`.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crewmesh::state::{self, State};

/// Where to reach the gateway: the flags shared by every command that calls it.
#[derive(clap::Args)]
pub struct GatewayArgs {
    /// Gateway URL; defaults to the running `crewmesh up` (from DATA_DIR/state.json).
    #[arg(long, global = true)]
    pub gateway: Option<String>,
    /// An API key with a role the command needs; defaults to CREWMESH_API_KEY, then to the running `crewmesh up`'s admin key.
    #[arg(long, global = true, env = "CREWMESH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[arg(long, global = true, default_value = ".crewmesh")]
    pub data_dir: PathBuf,
}

impl GatewayArgs {
    pub fn target(&self) -> anyhow::Result<GatewayTarget> {
        GatewayTarget::resolve(self.gateway.clone(), self.api_key.clone(), &self.data_dir)
    }
}

/// The gateway URL (no trailing slash) and the API key to call it with.
pub struct GatewayTarget {
    pub url: String,
    pub key: String,
}

impl GatewayTarget {
    pub fn resolve(
        gateway: Option<String>,
        api_key: Option<String>,
        data_dir: &Path,
    ) -> anyhow::Result<Self> {
        let state = State::read(data_dir).ok();
        let url = gateway
            .or_else(|| state.as_ref().map(|s| s.gateway_url.clone()))
            .with_context(|| {
                format!(
                    "no gateway: start one with `crewmesh up` (which writes {}) or pass --gateway URL",
                    data_dir.join(state::FILE_NAME).display()
                )
            })?;
        let key = api_key
            .or_else(|| state.as_ref().map(|s| s.admin_api_key.clone()))
            .context("no API key: pass --api-key or set CREWMESH_API_KEY")?;
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            key,
        })
    }
}

/// The error for a problem+json answer: its title, status and detail.
pub fn problem_error(status: impl std::fmt::Display, json: &serde_json::Value) -> anyhow::Error {
    anyhow::anyhow!(
        "{} ({status}): {}",
        json["title"].as_str().unwrap_or("request failed"),
        json["detail"].as_str().unwrap_or("no detail")
    )
}
