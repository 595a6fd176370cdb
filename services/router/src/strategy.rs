//! Routing strategies: the order in which an alias's deployments are tried.
//!
//! Every strategy returns all eligible deployments (those meeting the requested
//! quality tier), best first; the rest of the list is the fallback chain. Randomness
//! comes from the caller's RNG, so tests seed it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;

use crate::catalog::{Model, Strategy};

/// Weight of the newest sample in the latency EWMA.
const EWMA_ALPHA: f64 = 0.2;
/// Share of least-latency requests that try a random deployment first.
pub const EXPLORATION: f64 = 0.05;

/// What the router has observed of one deployment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeploymentStats {
    /// EWMA of successful call latency, in milliseconds.
    pub ewma_ms: Option<f64>,
    pub successes: u64,
    pub failures: u64,
}

/// Observations of every deployment, by deployment key.
#[derive(Debug, Default)]
pub struct Stats {
    inner: Mutex<HashMap<String, DeploymentStats>>,
}

impl Stats {
    pub fn record(&self, key: &str, ok: bool, latency: Duration) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.entry(key.to_owned()).or_default();
        if ok {
            s.successes += 1;
            let ms = latency.as_secs_f64() * 1000.0;
            s.ewma_ms = Some(match s.ewma_ms {
                None => ms,
                Some(prev) => prev + EWMA_ALPHA * (ms - prev),
            });
        } else {
            s.failures += 1;
        }
    }

    pub fn get(&self, key: &str) -> DeploymentStats {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
            .unwrap_or_default()
    }
}

/// The deployments of `model` to try, as indices into `model.deployments`, best first.
pub fn order<R: Rng + ?Sized>(
    model: &Model,
    stats: &Stats,
    min_quality_tier: u32,
    rng: &mut R,
) -> Vec<usize> {
    let mut eligible: Vec<usize> = (0..model.deployments.len())
        .filter(|&i| model.deployments[i].quality_tier >= min_quality_tier)
        .collect();
    let deps = &model.deployments;
    match model.strategy {
        Strategy::Priority => eligible,
        Strategy::WeightedRandom => {
            let mut out = Vec::with_capacity(eligible.len());
            while !eligible.is_empty() {
                let total: f64 = eligible.iter().map(|&i| deps[i].weight).sum();
                let mut x = rng.random::<f64>() * total;
                let mut pick = eligible.len() - 1;
                for (k, &i) in eligible.iter().enumerate() {
                    if x < deps[i].weight {
                        pick = k;
                        break;
                    }
                    x -= deps[i].weight;
                }
                out.push(eligible.remove(pick));
            }
            out
        }
        Strategy::LeastLatency => {
            // Unmeasured deployments sort first (0 ms), so each gets measured.
            let lat = |i: usize| stats.get(&deps[i].key).ewma_ms.unwrap_or(0.0);
            eligible.sort_by(|&a, &b| lat(a).total_cmp(&lat(b)));
            if eligible.len() > 1 && rng.random::<f64>() < EXPLORATION {
                let k = rng.random_range(0..eligible.len());
                let explore = eligible.remove(k);
                eligible.insert(0, explore);
            }
            eligible
        }
        Strategy::CostOptimised => {
            let price = |i: usize| deps[i].input_price_per_1m + deps[i].output_price_per_1m;
            // Stable: equal prices keep priority order.
            eligible.sort_by(|&a, &b| price(a).total_cmp(&price(b)));
            eligible
        }
        Strategy::Adaptive => {
            let all: Vec<DeploymentStats> =
                eligible.iter().map(|&i| stats.get(&deps[i].key)).collect();
            let n_total: u64 = all.iter().map(|s| s.successes + s.failures).sum();
            let best_ms = all
                .iter()
                .filter_map(|s| s.ewma_ms)
                .fold(f64::INFINITY, f64::min);
            let score = |s: &DeploymentStats| {
                let n = s.successes + s.failures;
                if n == 0 {
                    return f64::INFINITY;
                }
                let success = s.successes as f64 / n as f64;
                let speed = match s.ewma_ms {
                    Some(ms) if ms > 0.0 && best_ms.is_finite() => (best_ms / ms).min(1.0),
                    _ => 1.0,
                };
                // UCB1: the observed reward plus an exploration bonus that shrinks
                // as the deployment is used.
                success * speed + (2.0 * (n_total.max(1) as f64).ln() / n as f64).sqrt()
            };
            let mut scored: Vec<(usize, f64)> = eligible
                .iter()
                .zip(&all)
                .map(|(&i, s)| (i, score(s)))
                .collect();
            scored.sort_by(|a, b| b.1.total_cmp(&a.1));
            scored.into_iter().map(|(i, _)| i).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{BreakerSpec, Deployment, RetrySpec};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn dep(name: &str, weight: f64, price: f64, tier: u32) -> Deployment {
        Deployment {
            name: name.into(),
            key: format!("t/m/{name}"),
            provider: Err("p".into()),
            upstream_model: name.into(),
            priority: 0,
            weight,
            input_price_per_1m: price,
            output_price_per_1m: price,
            rpm: None,
            tpm: None,
            quality_tier: tier,
            context_window: 0,
        }
    }

    fn model(strategy: Strategy, deployments: Vec<Deployment>) -> Model {
        Model {
            alias: "m".into(),
            owned_by: "x".into(),
            deployments,
            strategy,
            fallback_models: vec![],
            retry: RetrySpec::default(),
            breaker: BreakerSpec::default(),
            cache: None,
        }
    }

    fn three(strategy: Strategy) -> Model {
        model(
            strategy,
            vec![
                dep("a", 1.0, 5.0, 3),
                dep("b", 3.0, 1.0, 1),
                dep("c", 6.0, 2.0, 2),
            ],
        )
    }

    #[test]
    fn priority_keeps_configured_order_and_tier_narrows() {
        let m = three(Strategy::Priority);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(order(&m, &Stats::default(), 0, &mut rng), vec![0, 1, 2]);
        assert_eq!(order(&m, &Stats::default(), 2, &mut rng), vec![0, 2]);
        assert!(order(&m, &Stats::default(), 9, &mut rng).is_empty());
    }

    #[test]
    fn weighted_random_follows_the_weights() {
        let m = three(Strategy::WeightedRandom);
        let mut rng = StdRng::seed_from_u64(7);
        let mut first = [0u32; 3];
        for _ in 0..10_000 {
            let o = order(&m, &Stats::default(), 0, &mut rng);
            assert_eq!(o.len(), 3);
            first[o[0]] += 1;
        }
        // Weights 1:3:6 of 10,000 draws; a seeded RNG makes the counts exact.
        assert!((900..1100).contains(&first[0]), "{first:?}");
        assert!((2800..3200).contains(&first[1]), "{first:?}");
        assert!((5800..6200).contains(&first[2]), "{first:?}");
    }

    #[test]
    fn least_latency_prefers_the_fastest_and_sometimes_explores() {
        let m = three(Strategy::LeastLatency);
        let stats = Stats::default();
        stats.record("t/m/a", true, Duration::from_millis(50));
        stats.record("t/m/b", true, Duration::from_millis(10));
        stats.record("t/m/c", true, Duration::from_millis(30));
        let mut rng = StdRng::seed_from_u64(3);
        let mut fastest_first = 0;
        for _ in 0..1000 {
            let o = order(&m, &stats, 0, &mut rng);
            if o == vec![1, 2, 0] {
                fastest_first += 1;
            }
        }
        assert!((930..1000).contains(&fastest_first), "{fastest_first}");
        // The EWMA moves towards new samples.
        stats.record("t/m/b", true, Duration::from_millis(110));
        assert_eq!(stats.get("t/m/b").ewma_ms, Some(30.0));
    }

    #[test]
    fn cost_optimised_takes_the_cheapest_meeting_the_tier() {
        let m = three(Strategy::CostOptimised);
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(order(&m, &Stats::default(), 0, &mut rng), vec![1, 2, 0]);
        assert_eq!(order(&m, &Stats::default(), 2, &mut rng), vec![2, 0]);
        assert_eq!(order(&m, &Stats::default(), 3, &mut rng), vec![0]);
    }

    #[test]
    fn adaptive_explores_then_shifts_to_the_reliable_one() {
        let m = three(Strategy::Adaptive);
        let stats = Stats::default();
        let mut rng = StdRng::seed_from_u64(1);
        // Nothing observed: everything ties at infinity, order is stable.
        assert_eq!(order(&m, &stats, 0, &mut rng), vec![0, 1, 2]);
        for _ in 0..50 {
            stats.record("t/m/a", false, Duration::ZERO);
            stats.record("t/m/b", true, Duration::from_millis(20));
            stats.record("t/m/c", true, Duration::from_millis(40));
        }
        assert_eq!(order(&m, &stats, 0, &mut rng), vec![1, 2, 0]);
    }
}
