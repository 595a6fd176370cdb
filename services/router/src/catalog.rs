//! The model catalog: model aliases and the provider deployments behind them, built
//! from the `provider` and `model` config documents and swapped atomically whenever
//! the config snapshot changes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crewmesh_kit::config_cache::Snapshot;
use crewmesh_kit::settings::{Secret, read_secret_file};
use crewmesh_proto::config::v1::Kind;
use serde::Deserialize;

pub const GLOBAL: &str = "_global";

/// How to reach a provider.
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub base_url: String,
    /// Name of an environment variable holding the API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Path of a file holding the API key.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DeploymentSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub provider: String,
    pub model: String,
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(default)]
    pub priority: i32,
    /// USD per million prompt tokens.
    #[serde(default)]
    pub input_price_per_1m: f64,
    /// USD per million completion tokens.
    #[serde(default)]
    pub output_price_per_1m: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelSpec {
    pub deployments: Vec<DeploymentSpec>,
    #[serde(default)]
    pub owned_by: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub kind: String,
    pub base_url: String,
    pub api_key: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct Deployment {
    pub name: String,
    pub provider: Result<Arc<Provider>, String>,
    pub upstream_model: String,
    pub priority: i32,
    pub input_price_per_1m: f64,
    pub output_price_per_1m: f64,
}

impl Deployment {
    /// Cost in USD of a call with these token counts.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.input_price_per_1m
            + completion_tokens as f64 * self.output_price_per_1m)
            / 1_000_000.0
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub alias: String,
    pub owned_by: String,
    /// In the order they are tried.
    pub deployments: Vec<Deployment>,
}

/// Every alias, by (tenant or `_global`, alias).
#[derive(Debug, Default)]
pub struct Catalog {
    pub revision: i64,
    models: HashMap<(String, String), Arc<Model>>,
}

impl Catalog {
    /// Builds the catalog. Documents that do not parse are skipped with a warning (the
    /// config service validates them on write, so this only guards against drift).
    pub fn from_snapshot(snap: &Snapshot) -> Self {
        let mut providers: HashMap<(String, String), Arc<Provider>> = HashMap::new();
        for doc in snap.of_kind(Kind::Provider) {
            match serde_json::from_str::<ProviderSpec>(&doc.spec_json) {
                Ok(spec) => {
                    let api_key = resolve_key(&doc.name, &spec);
                    providers.insert(
                        (doc.tenant.clone(), doc.name.clone()),
                        Arc::new(Provider {
                            name: doc.name.clone(),
                            kind: spec.kind,
                            base_url: spec.base_url.trim_end_matches('/').to_owned(),
                            api_key,
                        }),
                    );
                }
                Err(e) => {
                    tracing::warn!(provider = %doc.name, tenant = %doc.tenant, error = %e, "skipping provider document")
                }
            }
        }
        let mut models = HashMap::new();
        for doc in snap.of_kind(Kind::Model) {
            let spec = match serde_json::from_str::<ModelSpec>(&doc.spec_json) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(model = %doc.name, tenant = %doc.tenant, error = %e, "skipping model document");
                    continue;
                }
            };
            let mut deployments: Vec<Deployment> = spec
                .deployments
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let provider = providers
                        .get(&(doc.tenant.clone(), d.provider.clone()))
                        .or_else(|| providers.get(&(GLOBAL.to_owned(), d.provider.clone())))
                        .cloned()
                        .ok_or_else(|| d.provider.clone());
                    Deployment {
                        name: d
                            .name
                            .clone()
                            .unwrap_or_else(|| format!("{}/{}", doc.name, i)),
                        provider,
                        upstream_model: d.model.clone(),
                        priority: d.priority,
                        input_price_per_1m: d.input_price_per_1m,
                        output_price_per_1m: d.output_price_per_1m,
                    }
                })
                .collect();
            deployments.sort_by_key(|d| d.priority);
            models.insert(
                (doc.tenant.clone(), doc.name.clone()),
                Arc::new(Model {
                    alias: doc.name.clone(),
                    owned_by: spec.owned_by.unwrap_or_else(|| "crewmesh".to_owned()),
                    deployments,
                }),
            );
        }
        Self {
            revision: snap.revision,
            models,
        }
    }

    /// The alias as the tenant sees it: its own document first, then the global one.
    pub fn resolve(&self, tenant: &str, alias: &str) -> Option<Arc<Model>> {
        self.models
            .get(&(tenant.to_owned(), alias.to_owned()))
            .or_else(|| self.models.get(&(GLOBAL.to_owned(), alias.to_owned())))
            .cloned()
    }

    /// Every alias visible to the tenant, sorted.
    pub fn visible(&self, tenant: &str) -> Vec<Arc<Model>> {
        let mut by_alias: HashMap<&str, Arc<Model>> = HashMap::new();
        for ((t, alias), m) in &self.models {
            if t == GLOBAL {
                by_alias.entry(alias.as_str()).or_insert_with(|| m.clone());
            }
        }
        for ((t, alias), m) in &self.models {
            if t == tenant {
                by_alias.insert(alias.as_str(), m.clone());
            }
        }
        let mut v: Vec<_> = by_alias.into_values().collect();
        v.sort_by(|a, b| a.alias.cmp(&b.alias));
        v
    }
}

fn resolve_key(provider: &str, spec: &ProviderSpec) -> Option<Secret> {
    if let Some(path) = &spec.api_key_file {
        match read_secret_file(path) {
            Ok(s) => return Some(s),
            Err(e) => {
                tracing::warn!(%provider, error = %e, "cannot read the provider's api_key_file")
            }
        }
    }
    if let Some(var) = &spec.api_key_env {
        // Credentials are referenced by name in config and resolved here, so they
        // never pass through the config store.
        match std::env::var(var) {
            Ok(v) => return Some(Secret::new(v)),
            Err(_) => {
                tracing::warn!(%provider, env = %var, "the provider's api_key_env is not set")
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crewmesh_proto::config::v1::Document;

    fn doc(
        tenant: &str,
        kind: Kind,
        name: &str,
        spec: serde_json::Value,
    ) -> ((i32, String, String), Document) {
        (
            (kind as i32, tenant.into(), name.into()),
            Document {
                tenant: tenant.into(),
                kind: kind as i32,
                name: name.into(),
                spec_json: spec.to_string(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn tenant_documents_shadow_global_ones() {
        let mut snap = Snapshot::default();
        for (k, d) in [
            doc(
                GLOBAL,
                Kind::Provider,
                "p",
                serde_json::json!({"type": "openai", "base_url": "http://x/v1/"}),
            ),
            doc(
                GLOBAL,
                Kind::Model,
                "m",
                serde_json::json!({"deployments": [
                {"provider": "p", "model": "b", "priority": 2, "input_price_per_1m": 1.0, "output_price_per_1m": 2.0},
                {"provider": "p", "model": "a", "priority": 1}]}),
            ),
            doc(
                "acme",
                Kind::Model,
                "m",
                serde_json::json!({"deployments": [{"provider": "missing", "model": "z"}]}),
            ),
        ] {
            snap.documents.insert(k, d);
        }
        let cat = Catalog::from_snapshot(&snap);
        let global = cat.resolve("other", "m").unwrap();
        assert_eq!(global.deployments[0].upstream_model, "a");
        assert_eq!(global.deployments[1].cost(1_000_000, 500_000), 2.0);
        assert_eq!(
            global.deployments[0].provider.as_ref().unwrap().base_url,
            "http://x/v1"
        );
        let acme = cat.resolve("acme", "m").unwrap();
        assert_eq!(
            acme.deployments[0].provider.as_ref().unwrap_err(),
            "missing"
        );
        assert!(cat.resolve("acme", "nope").is_none());
        assert_eq!(cat.visible("acme").len(), 1);
    }
}
