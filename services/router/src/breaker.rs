//! Per-deployment circuit breakers.
//!
//! A breaker opens after `consecutive_failures` failures in a row, or when the failure
//! ratio over the last `window_secs` reaches `error_rate` with at least `min_calls`
//! calls. While open, the deployment is skipped. After `open_secs` one probe is let
//! through (half-open): its success closes the breaker, its failure opens it again.
//! Time is passed in, so the state machine is tested without waiting.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_proto::router::v1::BreakerState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::catalog::BreakerSpec;

#[derive(Debug)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

#[derive(Debug)]
struct Breaker {
    state: State,
    consecutive: u32,
    /// (when, failed) of recent calls, oldest first.
    window: VecDeque<(Instant, bool)>,
}

impl Breaker {
    fn new() -> Self {
        Self {
            state: State::Closed,
            consecutive: 0,
            window: VecDeque::new(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    deployment: String,
}

/// The breakers of every deployment, by deployment key.
pub struct Breakers {
    inner: Mutex<HashMap<String, Breaker>>,
    gauge: Family<BreakerLabels, Gauge>,
}

impl std::fmt::Debug for Breakers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Breakers")
    }
}

impl Breakers {
    /// Registers `crewmesh_router_breaker_open{deployment}` (1 while open or half-open).
    pub fn new(metrics: &MetricsRegistry) -> Self {
        let gauge = Family::<BreakerLabels, Gauge>::default();
        metrics.register(
            "router_breaker_open",
            "1 while the deployment's circuit breaker is open or half-open",
            gauge.clone(),
        );
        Self {
            inner: Mutex::new(HashMap::new()),
            gauge,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Breaker>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_gauge(&self, key: &str, open: bool) {
        self.gauge
            .get_or_create(&BreakerLabels {
                deployment: key.to_owned(),
            })
            .set(i64::from(open));
    }

    /// Whether a call may go to the deployment now. In half-open state only one probe
    /// is admitted until it reports.
    pub fn allow(&self, key: &str, now: Instant) -> bool {
        let mut map = self.lock();
        let Some(b) = map.get_mut(key) else {
            return true;
        };
        match b.state {
            State::Closed => true,
            State::Open { until } if now >= until => {
                b.state = State::HalfOpen {
                    probe_in_flight: true,
                };
                true
            }
            State::Open { .. } => false,
            State::HalfOpen {
                ref mut probe_in_flight,
            } => {
                if *probe_in_flight {
                    false
                } else {
                    *probe_in_flight = true;
                    true
                }
            }
        }
    }

    /// Reports the outcome of a call admitted by [`allow`](Self::allow).
    pub fn record(&self, key: &str, spec: &BreakerSpec, ok: bool, now: Instant) {
        let changed;
        {
            let mut map = self.lock();
            let b = map.entry(key.to_owned()).or_insert_with(Breaker::new);
            let window = Duration::from_secs(spec.window_secs);
            while b
                .window
                .front()
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) > window)
            {
                b.window.pop_front();
            }
            b.window.push_back((now, !ok));
            let was_open = !matches!(b.state, State::Closed);
            if ok {
                b.consecutive = 0;
                if matches!(b.state, State::HalfOpen { .. }) {
                    b.window.clear();
                }
                b.state = State::Closed;
            } else {
                b.consecutive += 1;
                let failures = b.window.iter().filter(|(_, f)| *f).count();
                let calls = b.window.len();
                let rate_trips = spec.min_calls > 0
                    && calls >= spec.min_calls as usize
                    && failures as f64 / calls as f64 >= spec.error_rate;
                let consecutive_trips =
                    spec.consecutive_failures > 0 && b.consecutive >= spec.consecutive_failures;
                if matches!(b.state, State::HalfOpen { .. }) || rate_trips || consecutive_trips {
                    b.state = State::Open {
                        until: now + Duration::from_secs(spec.open_secs),
                    };
                }
            }
            let is_open = !matches!(b.state, State::Closed);
            changed = (was_open != is_open).then_some(is_open);
        }
        if let Some(open) = changed {
            tracing::info!(deployment = %key, open, "circuit breaker changed state");
            self.set_gauge(key, open);
        }
    }

    /// A call admitted by [`allow`](Self::allow) that ended without a verdict on the
    /// deployment (e.g. the client went away): frees a half-open probe slot.
    pub fn release(&self, key: &str) {
        if let Some(b) = self.lock().get_mut(key)
            && let State::HalfOpen { probe_in_flight } = &mut b.state
        {
            *probe_in_flight = false;
        }
    }

    pub fn state(&self, key: &str, now: Instant) -> BreakerState {
        match self.lock().get(key).map(|b| &b.state) {
            None | Some(State::Closed) => BreakerState::Closed,
            Some(State::Open { until }) if now >= *until => BreakerState::HalfOpen,
            Some(State::Open { .. }) => BreakerState::Open,
            Some(State::HalfOpen { .. }) => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BreakerSpec {
        BreakerSpec {
            consecutive_failures: 3,
            error_rate: 0.5,
            min_calls: 6,
            window_secs: 10,
            open_secs: 5,
        }
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_and_closes() {
        let b = Breakers::new(&MetricsRegistry::new());
        let t0 = Instant::now();
        for _ in 0..2 {
            assert!(b.allow("d", t0));
            b.record("d", &spec(), false, t0);
        }
        assert_eq!(b.state("d", t0), BreakerState::Closed);
        b.record("d", &spec(), false, t0);
        assert_eq!(b.state("d", t0), BreakerState::Open);
        assert!(!b.allow("d", t0 + Duration::from_secs(4)));
        // After open_secs, exactly one probe.
        let t1 = t0 + Duration::from_secs(5);
        assert!(b.allow("d", t1));
        assert!(!b.allow("d", t1));
        assert_eq!(b.state("d", t1), BreakerState::HalfOpen);
        // A failed probe opens it again.
        b.record("d", &spec(), false, t1);
        assert_eq!(b.state("d", t1), BreakerState::Open);
        let t2 = t1 + Duration::from_secs(5);
        assert!(b.allow("d", t2));
        b.record("d", &spec(), true, t2);
        assert_eq!(b.state("d", t2), BreakerState::Closed);
        assert!(b.allow("d", t2));
    }

    #[test]
    fn opens_on_error_rate_over_the_window() {
        let b = Breakers::new(&MetricsRegistry::new());
        let t0 = Instant::now();
        // Alternating: never 3 in a row, but 3 of 6 failed = 50 %.
        for i in 0..5 {
            b.record("d", &spec(), i % 2 == 0, t0);
        }
        assert_eq!(b.state("d", t0), BreakerState::Closed);
        b.record("d", &spec(), false, t0);
        assert_eq!(b.state("d", t0), BreakerState::Open);
        // Old calls leave the window.
        let b = Breakers::new(&MetricsRegistry::new());
        for i in 0..5 {
            b.record("d", &spec(), i % 2 == 0, t0);
        }
        b.record("d", &spec(), false, t0 + Duration::from_secs(11));
        assert_eq!(
            b.state("d", t0 + Duration::from_secs(11)),
            BreakerState::Closed
        );
    }

    #[test]
    fn the_gauge_follows_the_state() {
        let metrics = MetricsRegistry::new();
        let b = Breakers::new(&metrics);
        let t0 = Instant::now();
        for _ in 0..3 {
            b.record("t/m/d", &spec(), false, t0);
        }
        assert!(
            metrics
                .encode()
                .contains("crewmesh_router_breaker_open{deployment=\"t/m/d\"} 1")
        );
        let t1 = t0 + Duration::from_secs(5);
        assert!(b.allow("t/m/d", t1));
        b.record("t/m/d", &spec(), true, t1);
        assert!(
            metrics
                .encode()
                .contains("crewmesh_router_breaker_open{deployment=\"t/m/d\"} 0")
        );
    }
}
