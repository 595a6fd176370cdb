//! The model catalog: model aliases and the provider deployments behind them, built
//! from the `provider`, `model` and `flag` config documents and swapped atomically
//! whenever the config snapshot changes.
//!
//! A model may carry `variants` (named deployment sets) and a `flag` whose string
//! values name them: [`Catalog::select`] evaluates the flag in-process for each
//! request (targeting key: the request's user, else its tenant) and routes to the
//! chosen variant's deployments, so a team can A/B test models by percentage or by
//! tenant. When the flag cannot choose (missing, or a value that names no variant —
//! both refused by the config service, so only a race can cause them) the alias's
//! own `deployments` serve, with a warning in the log and a count in
//! [`VariantMetrics`].

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crewmesh_kit::config_cache::Snapshot;
use crewmesh_kit::flags::{EvaluationContext, Flag};
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::settings::{Secret, read_secret_file};
use crewmesh_proto::config::v1::Kind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;

use crate::provider::Wire;

pub const GLOBAL: &str = "_global";

/// How to reach a provider.
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub base_url: String,
    /// An inline key, encrypted in the config store; the config service sends it to
    /// the router's identity only, decrypted, as `{"value": "..."}`.
    #[serde(default)]
    pub api_key: Option<InlineKey>,
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

/// A provider's inline key as the config service shows it to the router.
#[derive(Debug, Clone, Deserialize)]
pub struct InlineKey {
    /// The decrypted key; absent when the config service could not decrypt it.
    #[serde(default)]
    pub value: Option<String>,
    /// Why the key is not shown (e.g. a wrong secrets_key_file).
    #[serde(default)]
    pub redacted: Option<String>,
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

/// One named deployment set of a model alias.
#[derive(Debug, Clone, Deserialize)]
pub struct VariantSpec {
    pub deployments: Vec<DeploymentSpec>,
    /// Default: the alias's strategy.
    #[serde(default)]
    pub strategy: Option<Strategy>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelSpec {
    pub deployments: Vec<DeploymentSpec>,
    /// Deployment sets chosen per request by `flag`.
    #[serde(default)]
    pub variants: BTreeMap<String, VariantSpec>,
    /// The flag (same tenant, else `_global`) whose values name variants.
    #[serde(default)]
    pub flag: Option<String>,
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
    /// The URL model calls are sent to (`base_url` + the API's path for `kind`), parsed
    /// once per catalog; the reason when it does not parse or `kind` is unknown.
    pub endpoint: Result<http::Uri, String>,
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

/// How an alias picks one of its variants per request.
#[derive(Debug)]
pub struct VariantSet {
    /// The flag document's name.
    pub flag_name: String,
    /// The flag, looked up from the model's owner (its tenant, else `_global`);
    /// `None` when there is no such flag.
    pub flag: Option<Arc<Flag>>,
    /// Each variant as a model of its own (same alias, the variant's deployments).
    pub models: BTreeMap<String, Arc<Model>>,
}

/// The model a request is served by.
#[derive(Debug, Clone)]
pub struct Selection {
    pub model: Arc<Model>,
    /// The variant chosen by the alias's flag, if it has variants and the flag chose.
    pub variant: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VariantLabels {
    model: String,
    /// The chosen variant, or `default` when the flag chose none.
    variant: String,
    /// `chosen`, `flag_missing` or `no_such_variant`.
    outcome: &'static str,
}

/// `crewmesh_router_model_variant_requests_total{model, variant, outcome}`: how
/// requests to aliases with variants were routed.
#[derive(Clone, Debug, Default)]
pub struct VariantMetrics {
    requests: Family<VariantLabels, Counter>,
}

impl VariantMetrics {
    pub fn register(metrics: &MetricsRegistry) -> Self {
        let m = Self::default();
        metrics.register(
            "router_model_variant_requests",
            "Requests to model aliases with variants, by the variant their flag chose (default: none, see outcome)",
            m.requests.clone(),
        );
        m
    }

    fn count(&self, model: &str, variant: &str, outcome: &'static str) {
        self.requests
            .get_or_create(&VariantLabels {
                model: model.to_owned(),
                variant: variant.to_owned(),
                outcome,
            })
            .inc();
    }
}

/// Every alias, by (tenant or `_global`, alias).
#[derive(Debug, Default)]
pub struct Catalog {
    pub revision: i64,
    models: HashMap<(String, String), Arc<Model>>,
    variants: HashMap<(String, String), VariantSet>,
    metrics: VariantMetrics,
}

/// The deployments of one deployment list; `prefix` names those without a name
/// (`<prefix>/<index>`).
fn build_deployments(
    tenant: &str,
    alias: &str,
    prefix: &str,
    specs: &[DeploymentSpec],
    providers: &HashMap<(String, String), Arc<Provider>>,
) -> Vec<Deployment> {
    let mut deployments: Vec<Deployment> = specs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let provider = providers
                .get(&(tenant.to_owned(), d.provider.clone()))
                .or_else(|| providers.get(&(GLOBAL.to_owned(), d.provider.clone())))
                .cloned()
                .ok_or_else(|| d.provider.clone());
            let name = d.name.clone().unwrap_or_else(|| format!("{prefix}/{i}"));
            Deployment {
                key: format!("{tenant}/{alias}/{name}"),
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
    deployments
}

/// The URL of a provider's chat endpoint: `base_url` and the path of its API.
pub(crate) fn endpoint(kind: &str, base_url: &str) -> Result<http::Uri, String> {
    let wire = Wire::of(kind).ok_or_else(|| format!("unsupported provider type `{kind}`"))?;
    let invalid = |why: &dyn std::fmt::Display| format!("invalid base_url `{base_url}`: {why}");
    if !["http://", "https://"].iter().any(|s| {
        base_url
            .get(..s.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(s))
    }) {
        return Err(invalid(&"it must start with http:// or https://"));
    }
    let uri: http::Uri = format!("{base_url}/{}", wire.path())
        .parse()
        .map_err(|e| invalid(&e))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(&"it has no host"));
    }
    Ok(uri)
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
                    let base_url = spec.base_url.trim_end_matches('/').to_owned();
                    providers.insert(
                        (doc.tenant.clone(), doc.name.clone()),
                        Arc::new(Provider {
                            name: doc.name.clone(),
                            endpoint: endpoint(&spec.kind, &base_url),
                            kind: spec.kind,
                            base_url,
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
        let mut flags: HashMap<(String, String), Arc<Flag>> = HashMap::new();
        for doc in snap.of_kind(Kind::Flag) {
            let parsed =
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&doc.spec_json)
                    .map_err(|e| e.to_string())
                    .and_then(|spec| {
                        Flag::parse(&doc.name, &spec).map_err(|ps| {
                            ps.iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join("; ")
                        })
                    });
            match parsed {
                Ok(flag) => {
                    flags.insert((doc.tenant.clone(), doc.name.clone()), Arc::new(flag));
                }
                Err(e) => {
                    tracing::warn!(flag = %doc.name, tenant = %doc.tenant, error = %e, "skipping flag document")
                }
            }
        }
        let mut models = HashMap::new();
        let mut variants = HashMap::new();
        for doc in snap.of_kind(Kind::Model) {
            let spec = match serde_json::from_str::<ModelSpec>(&doc.spec_json) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(model = %doc.name, tenant = %doc.tenant, error = %e, "skipping model document");
                    continue;
                }
            };
            let deployments = build_deployments(
                &doc.tenant,
                &doc.name,
                &doc.name,
                &spec.deployments,
                &providers,
            );
            let model = Model {
                alias: doc.name.clone(),
                owned_by: spec.owned_by.unwrap_or_else(|| "crewmesh".to_owned()),
                deployments,
                strategy: spec.strategy,
                fallback_models: spec.fallback_models,
                retry: spec.retry,
                breaker: spec.breaker,
                cache: spec.cache,
            };
            if let Some(flag_name) = spec.flag.filter(|_| !spec.variants.is_empty()) {
                let flag = flags
                    .get(&(doc.tenant.clone(), flag_name.clone()))
                    .or_else(|| flags.get(&(GLOBAL.to_owned(), flag_name.clone())))
                    .cloned();
                if flag.is_none() {
                    tracing::warn!(model = %doc.name, tenant = %doc.tenant, flag = %flag_name, "the model's flag does not exist; its requests use its default deployments");
                }
                let models = spec
                    .variants
                    .iter()
                    .map(|(name, v)| {
                        let mut m = model.clone();
                        m.deployments = build_deployments(
                            &doc.tenant,
                            &doc.name,
                            &format!("{}/{name}", doc.name),
                            &v.deployments,
                            &providers,
                        );
                        m.strategy = v.strategy.unwrap_or(model.strategy);
                        (name.clone(), Arc::new(m))
                    })
                    .collect();
                variants.insert(
                    (doc.tenant.clone(), doc.name.clone()),
                    VariantSet {
                        flag_name,
                        flag,
                        models,
                    },
                );
            }
            models.insert((doc.tenant.clone(), doc.name.clone()), Arc::new(model));
        }
        Self {
            revision: snap.revision,
            models,
            variants,
            metrics: VariantMetrics::default(),
        }
    }

    /// Counts variant choices in `metrics` (registered once per process).
    pub fn with_metrics(mut self, metrics: VariantMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The model that serves a request for `alias` from `tenant` on behalf of `user`
    /// (may be empty): the alias as the tenant sees it (see [`Self::resolve`]) and,
    /// when it has variants, the one its flag chooses for the context
    /// `{targetingKey: user, else tenant; tenant; model: alias; user}`.
    pub fn select(&self, tenant: &str, alias: &str, user: &str) -> Option<Selection> {
        let own = (tenant.to_owned(), alias.to_owned());
        let key = if self.models.contains_key(&own) {
            own
        } else {
            (GLOBAL.to_owned(), alias.to_owned())
        };
        let model = self.models.get(&key)?.clone();
        let Some(set) = self.variants.get(&key) else {
            return Some(Selection {
                model,
                variant: None,
            });
        };
        let Some(flag) = &set.flag else {
            self.metrics.count(alias, "default", "flag_missing");
            return Some(Selection {
                model,
                variant: None,
            });
        };
        let mut attributes = serde_json::Map::new();
        attributes.insert("tenant".into(), tenant.into());
        attributes.insert("model".into(), alias.into());
        attributes.insert("user".into(), user.into());
        let ctx = EvaluationContext {
            targeting_key: Some(if user.is_empty() { tenant } else { user }.to_owned()),
            attributes,
        };
        let evaluation = flag.evaluate(&ctx);
        let chosen = evaluation
            .value
            .as_ref()
            .and_then(serde_json::Value::as_str)
            .and_then(|v| set.models.get_key_value(v));
        match chosen {
            Some((name, m)) if evaluation.error.is_none() => {
                self.metrics.count(alias, name, "chosen");
                Some(Selection {
                    model: m.clone(),
                    variant: Some(name.clone()),
                })
            }
            _ => {
                self.metrics.count(alias, "default", "no_such_variant");
                tracing::warn!(model = %alias, %tenant, flag = %set.flag_name, value = ?evaluation.value, error = ?evaluation.error, "the model's flag chose no variant; using its default deployments");
                Some(Selection {
                    model,
                    variant: None,
                })
            }
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
    if let Some(inline) = &spec.api_key {
        match (&inline.value, &inline.redacted) {
            (Some(v), _) => return Some(Secret::new(v.clone())),
            (None, why) => {
                tracing::warn!(%provider, reason = why.as_deref().unwrap_or("not sent"), "the provider's inline api_key is not available")
            }
        }
    }
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
        assert_eq!(
            global.deployments[0]
                .provider
                .as_ref()
                .unwrap()
                .endpoint
                .as_ref()
                .unwrap()
                .to_string(),
            "http://x/v1/chat/completions"
        );
        let acme = cat.resolve("acme", "m").unwrap();
        assert_eq!(
            acme.deployments[0].provider.as_ref().unwrap_err(),
            "missing"
        );
        assert!(cat.resolve("acme", "nope").is_none());
        assert_eq!(cat.visible("acme").len(), 1);
    }

    fn ab_snapshot(flag: Option<serde_json::Value>) -> Snapshot {
        let mut snap = Snapshot::default();
        let mut docs = vec![
            doc(
                GLOBAL,
                Kind::Provider,
                "p",
                serde_json::json!({"type": "openai", "base_url": "http://x/v1"}),
            ),
            doc(
                GLOBAL,
                Kind::Model,
                "m",
                serde_json::json!({
                    "deployments": [{"provider": "p", "model": "default"}],
                    "flag": "m-ab",
                    "variants": {
                        "blue": {"deployments": [{"provider": "p", "model": "model-blue"}]},
                        "green": {"deployments": [{"provider": "p", "model": "model-green", "name": "g"}], "strategy": "weighted"},
                    },
                }),
            ),
        ];
        if let Some(f) = flag {
            docs.push(doc(GLOBAL, Kind::Flag, "m-ab", f));
        }
        for (k, d) in docs {
            snap.documents.insert(k, d);
        }
        snap
    }

    #[test]
    fn a_flag_picks_the_variant_per_targeting_key() {
        let cat = Catalog::from_snapshot(&ab_snapshot(Some(serde_json::json!({
            "variants": {"blue": "blue", "green": "green"},
            "default_variant": "blue",
            "rules": [{"when": {"attribute": "tenant", "op": "equals", "value": "acme"}, "variant": "green"}],
            "rollout": [{"variant": "blue", "weight": 50}, {"variant": "green", "weight": 50}],
        }))));
        let pick = |tenant: &str, user: &str| {
            let s = cat.select(tenant, "m", user).unwrap();
            (
                s.variant.unwrap(),
                s.model.deployments[0].upstream_model.clone(),
                s.model.deployments[0].name.clone(),
            )
        };
        // The split follows the flag's consistent bucketing of the user...
        for user in ["u1", "u2", "u3", "u4", "u5", "u6"] {
            let expected = if crewmesh_kit::flags::bucket("m-ab", user) < 5000 {
                ("blue", "model-blue", "m/blue/0")
            } else {
                ("green", "model-green", "g")
            };
            let got = pick("other", user);
            assert_eq!(
                (got.0.as_str(), got.1.as_str(), got.2.as_str()),
                expected,
                "{user}"
            );
            assert_eq!(pick("other", user), got, "same key, same variant");
        }
        // ...or of the tenant when there is no user; a tenant rule wins.
        let expected = if crewmesh_kit::flags::bucket("m-ab", "globex") < 5000 {
            "blue"
        } else {
            "green"
        };
        assert_eq!(pick("globex", "").0, expected);
        assert_eq!(pick("acme", "u1").0, "green");
        let metrics = VariantMetrics::default();
        let counting = Catalog::from_snapshot(&ab_snapshot(Some(serde_json::json!({
            "variants": {"blue": "blue"}, "default_variant": "blue",
        }))))
        .with_metrics(metrics.clone());
        counting.select("acme", "m", "u1").unwrap();
        counting.select("acme", "m", "u2").unwrap();
        assert_eq!(counted(&metrics, "blue", "chosen"), 2);
        let green = cat.select("acme", "m", "").unwrap().model;
        assert_eq!(green.strategy, Strategy::WeightedRandom);
        assert_eq!(green.deployments[0].key, "_global/m/g");
        assert_eq!(green.alias, "m");
    }

    fn counted(m: &VariantMetrics, variant: &str, outcome: &'static str) -> u64 {
        m.requests
            .get_or_create(&VariantLabels {
                model: "m".into(),
                variant: variant.into(),
                outcome,
            })
            .get()
    }

    #[test]
    fn without_its_flag_a_model_uses_its_default_deployments() {
        let metrics = VariantMetrics::default();
        let cat = Catalog::from_snapshot(&ab_snapshot(None)).with_metrics(metrics.clone());
        let s = cat.select("acme", "m", "u1").unwrap();
        assert_eq!(counted(&metrics, "default", "flag_missing"), 1);
        assert_eq!(s.variant, None);
        assert_eq!(s.model.deployments[0].upstream_model, "default");
        // A value that names no variant falls back the same way.
        let cat = Catalog::from_snapshot(&ab_snapshot(Some(serde_json::json!({
            "variants": {"x": "purple"}, "default_variant": "x",
        }))))
        .with_metrics(metrics.clone());
        let s = cat.select("acme", "m", "u1").unwrap();
        assert_eq!(s.variant, None);
        assert_eq!(counted(&metrics, "default", "no_such_variant"), 1);
        assert_eq!(s.model.deployments[0].upstream_model, "default");
        assert!(cat.select("acme", "nope", "u1").is_none());
    }

    #[test]
    fn endpoints_follow_the_provider_type() {
        assert_eq!(
            endpoint("anthropic", "https://api.example/v1")
                .unwrap()
                .to_string(),
            "https://api.example/v1/messages"
        );
        assert_eq!(
            endpoint("simulated", "http://127.0.0.1:9/v1")
                .unwrap()
                .to_string(),
            "http://127.0.0.1:9/v1/chat/completions"
        );
        assert_eq!(
            endpoint("gemini", "http://x").unwrap_err(),
            "unsupported provider type `gemini`"
        );
        assert!(
            endpoint("openai", "not a url")
                .unwrap_err()
                .starts_with("invalid base_url `not a url`")
        );
        assert_eq!(
            endpoint("openai", "api.example/v1").unwrap_err(),
            "invalid base_url `api.example/v1`: it must start with http:// or https://"
        );
        assert_eq!(
            endpoint("openai", "ftp://api.example/v1").unwrap_err(),
            "invalid base_url `ftp://api.example/v1`: it must start with http:// or https://"
        );
    }
}
