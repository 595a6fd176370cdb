//! `state.json`: how scripts and the CLI find a running `crewmesh up`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceEndpoints {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grpc: Option<String>,
    pub admin: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub http: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pki {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub gateway_url: String,
    pub admin_api_key: String,
    pub simulated_upstream_url: String,
    pub trust_domain: String,
    pub services: BTreeMap<String, ServiceEndpoints>,
    pub pki: Pki,
    pub pid: u32,
}

pub const FILE_NAME: &str = "state.json";

impl State {
    /// Writes the file with mode 0600 (it holds the admin key).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let path = dir.join(FILE_NAME);
        let tmp = dir.join(format!("{FILE_NAME}.tmp"));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)
    }

    pub fn read(dir: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(dir.join(FILE_NAME))?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }

    pub fn remove(dir: &Path) {
        let _ = std::fs::remove_file(dir.join(FILE_NAME));
    }
}
