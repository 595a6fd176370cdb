//! The model catalog: model aliases and the provider deployments behind them, built
//! from the `provider` and `model` config documents and swapped atomically whenever
//! the config snapshot changes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    /// Time allowed to open the TCP (and TLS) connection.
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    /// Time allowed from sending the request to the response headers (and, when
    /// streaming, to the first event).
    #[serde(default)]
    pub first_byte_timeout_ms: Option<u64>,
    /// Time allowed for the whole attempt, body included.
    #[serde(default)]
    pub total_timeout_ms: Option<u64>,
}

/// The timeouts of one provider; unset ones take the router's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timeouts {
    pub connect: Option<Duration>,
    pub first_byte: Option<Duration>,
    pub total: Option<Duration>,
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
    /// Requests per minute this deployment accepts (across all router replicas).
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute this deployment accepts.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Higher is better; compared with the request's `quality_tier`.
    #[serde(default)]
    pub quality_tier: u32,
    /// Largest prompt plus completion, in tokens; 0 means unknown.
    #[serde(default)]
    pub context_window: u64,
    #[serde(default)]
    pub tags: Vec<String>,
}

fn one() -> f64 {
    1.0
}

/// Retries on one deployment before falling back to the next.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(default)]
pub struct RetrySpec {
    /// Extra attempts on the same deployment after a retryable failure.
    pub max_retries: u32,
    /// The first backoff cap; doubled per retry (full jitter: a uniform wait in 0..cap).
    pub base_ms: u64,
    /// The largest backoff cap.
    pub max_ms: u64,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            max_retries: 1,
            base_ms: 100,
            max_ms: 2_000,
        }
    }
}

/// When a deployment's circuit breaker opens.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(default)]
pub struct BreakerSpec {
    /// Opens after this many failures in a row.
    pub consecutive_failures: u32,
    /// Or when the failure ratio over `window_secs` reaches this ...
    pub error_rate: f64,
    /// ... with at least this many calls in the window.
    pub min_calls: u32,
    pub window_secs: u64,
    /// How long it stays open before one half-open probe is let through.
    pub open_secs: u64,
}

impl Default for BreakerSpec {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            error_rate: 0.5,
            min_calls: 20,
            window_secs: 30,
            open_secs: 10,
        }
    }
}

/// Response caching of an alias.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
pub struct CacheSpec {
    pub ttl_secs: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// In `priority` order (ties in document order); the rest are the fallback chain.
    #[default]
    Priority,
    /// Weighted random order.
    #[serde(alias = "weighted")]
    WeightedRandom,
    /// Lowest latency (EWMA) first, with a little exploration.
    LeastLatency,
    /// Cheapest deployment that meets the requested quality tier first.
    #[serde(alias = "cost")]
    CostOptimised,
    /// Learns success rate and latency per deployment (UCB bandit).
    Adaptive,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelSpec {
    pub deployments: Vec<DeploymentSpec>,
    #[serde(default)]
    pub owned_by: Option<String>,
    #[serde(default)]
    pub strategy: Strategy,
    /// Aliases tried, in order, when every deployment of this one failed.
    #[serde(default)]
    pub fallback_models: Vec<String>,
    #[serde(default)]
    pub retry: RetrySpec,
    #[serde(default)]
    pub breaker: BreakerSpec,
    #[serde(default)]
    pub cache: Option<CacheSpec>,
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub kind: String,
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub timeouts: Timeouts,
}

#[derive(Debug, Clone)]
pub struct Deployment {
    pub name: String,
    /// Identifies the deployment across catalog reloads (breaker, limits, latency):
    /// `<tenant>/<alias>/<name>`.
    pub key: String,
    pub provider: Result<Arc<Provider>, String>,
    pub upstream_model: String,
    pub priority: i32,
    pub weight: f64,
    pub input_price_per_1m: f64,
    pub output_price_per_1m: f64,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub quality_tier: u32,
    pub context_window: u64,
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
    /// Sorted by priority (stable, so ties keep document order).
    pub deployments: Vec<Deployment>,
    pub strategy: Strategy,
    pub fallback_models: Vec<String>,
    pub retry: RetrySpec,
    pub breaker: BreakerSpec,
    pub cache: Option<CacheSpec>,
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
                            timeouts: Timeouts {
                                connect: spec.connect_timeout_ms.map(Duration::from_millis),
                                first_byte: spec.first_byte_timeout_ms.map(Duration::from_millis),
                                total: spec.total_timeout_ms.map(Duration::from_millis),
                            },
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
                    let name = d
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("{}/{}", doc.name, i));
                    Deployment {
                        key: format!("{}/{}/{}", doc.tenant, doc.name, name),
                        name,
                        provider,
                        upstream_model: d.model.clone(),
                        priority: d.priority,
                        weight: if d.weight > 0.0 { d.weight } else { 1.0 },
                        input_price_per_1m: d.input_price_per_1m,
                        output_price_per_1m: d.output_price_per_1m,
                        rpm: d.rpm,
                        tpm: d.tpm,
                        quality_tier: d.quality_tier,
                        context_window: d.context_window,
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
                    strategy: spec.strategy,
                    fallback_models: spec.fallback_models,
                    retry: spec.retry,
                    breaker: spec.breaker,
                    cache: spec.cache,
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
