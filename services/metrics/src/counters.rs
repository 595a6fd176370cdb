//! Prometheus counters of accepted usage, by model: tokens and cost. They count each
//! record once (replays are not counted) since this process started.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crewmesh_kit::observe::MetricsRegistry;

use crate::usage::UsageRow;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

/// `crewmesh_usage_tokens_total{model}` and `crewmesh_usage_cost_usd_total{model}`.
#[derive(Clone, Debug, Default)]
pub struct UsageCounters {
    tokens: Family<ModelLabels, Counter>,
    cost_usd: Family<ModelLabels, Counter<f64, AtomicU64>>,
}

impl UsageCounters {
    /// Creates the counters and registers them in `registry`.
    pub fn register(registry: &MetricsRegistry) -> Self {
        let counters = Self::default();
        registry.register(
            "usage_tokens",
            "Tokens of accepted usage records (total tokens), by model",
            counters.tokens.clone(),
        );
        registry.register(
            "usage_cost_usd",
            "Cost in US dollars of accepted usage records, by model",
            counters.cost_usd.clone(),
        );
        counters
    }

    pub fn observe(&self, rows: &[UsageRow]) {
        for row in rows {
            let labels = ModelLabels {
                model: row.model.clone(),
            };
            self.tokens
                .get_or_create(&labels)
                .inc_by(u64::try_from(row.total_tokens).unwrap_or(0));
            self.cost_usd.get_or_create(&labels).inc_by(row.cost_usd);
        }
    }
}
