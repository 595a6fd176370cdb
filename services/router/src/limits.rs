//! Provider limits: requests and tokens per minute per deployment.
//!
//! Each deployment has a one-minute window per router. A call reserves one request and
//! its estimated tokens (prompt estimate plus `max_tokens`) before it goes out; the
//! estimate is replaced by the real usage afterwards. At the limit the router tries the
//! next deployment, and answers `RESOURCE_EXHAUSTED` when none is left.
//!
//! With several router replicas each enforces `ceil(limit / N)`, where N is the number
//! of live replicas ([`crate::membership`]), so the sum stays at the configured limit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::catalog::Deployment;

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Window {
    start: Instant,
    requests: u64,
    tokens: u64,
}

#[derive(Debug)]
pub struct Limits {
    windows: Mutex<HashMap<String, Window>>,
    /// Live router replicas sharing the limits (at least 1).
    replicas: Arc<AtomicU64>,
}

impl Limits {
    pub fn new(replicas: Arc<AtomicU64>) -> Self {
        Self {
            windows: Mutex::new(HashMap::new()),
            replicas,
        }
    }

    /// This replica's share of a configured limit.
    pub fn share(&self, limit: u64) -> u64 {
        let n = self.replicas.load(Ordering::Relaxed).max(1);
        limit.div_ceil(n).max(1)
    }

    /// Reserves a request and `tokens` on the deployment, or says how long until its
    /// window resets.
    pub fn acquire(&self, dep: &Deployment, tokens: u64) -> Result<(), Duration> {
        self.acquire_at(dep, tokens, Instant::now())
    }

    pub fn acquire_at(&self, dep: &Deployment, tokens: u64, now: Instant) -> Result<(), Duration> {
        if dep.rpm.is_none() && dep.tpm.is_none() {
            return Ok(());
        }
        let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = map.entry(dep.key.clone()).or_insert(Window {
            start: now,
            requests: 0,
            tokens: 0,
        });
        if now.saturating_duration_since(w.start) >= WINDOW {
            *w = Window {
                start: now,
                requests: 0,
                tokens: 0,
            };
        }
        let wait = WINDOW.saturating_sub(now.saturating_duration_since(w.start));
        if let Some(rpm) = dep.rpm
            && w.requests + 1 > self.share(rpm)
        {
            return Err(wait);
        }
        if let Some(tpm) = dep.tpm
            // A window with nothing in it admits one call whatever its estimate, so a
            // large prompt is not refused forever.
            && w.requests > 0
            && w.tokens + tokens > self.share(tpm)
        {
            return Err(wait);
        }
        w.requests += 1;
        w.tokens += tokens;
        Ok(())
    }

    /// Replaces a call's estimate with what it used.
    pub fn reconcile(&self, dep: &Deployment, estimate: u64, actual: u64) {
        if dep.tpm.is_none() {
            return;
        }
        let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = map.get_mut(&dep.key) {
            w.tokens = w.tokens.saturating_sub(estimate) + actual;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(rpm: Option<u64>, tpm: Option<u64>) -> Deployment {
        Deployment {
            name: "d".into(),
            key: "t/m/d".into(),
            provider: Err("p".into()),
            upstream_model: "x".into(),
            priority: 0,
            weight: 1.0,
            input_price_per_1m: 0.0,
            output_price_per_1m: 0.0,
            rpm,
            tpm,
            quality_tier: 0,
            context_window: 0,
        }
    }

    #[test]
    fn rpm_window_resets_after_a_minute() {
        let l = Limits::new(Arc::new(AtomicU64::new(1)));
        let d = dep(Some(3), None);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.acquire_at(&d, 0, t0).is_ok());
        }
        assert_eq!(
            l.acquire_at(&d, 0, t0 + Duration::from_secs(20)),
            Err(Duration::from_secs(40))
        );
        assert!(l.acquire_at(&d, 0, t0 + WINDOW).is_ok());
    }

    #[test]
    fn tpm_reserves_the_estimate_and_reconciles() {
        let l = Limits::new(Arc::new(AtomicU64::new(1)));
        let d = dep(None, Some(1000));
        let t0 = Instant::now();
        assert!(l.acquire_at(&d, 600, t0).is_ok());
        assert!(l.acquire_at(&d, 600, t0).is_err());
        // It used 100, not 600.
        l.reconcile(&d, 600, 100);
        assert!(l.acquire_at(&d, 600, t0).is_ok());
        assert!(l.acquire_at(&d, 400, t0).is_err());
    }

    #[test]
    fn replicas_split_the_limit() {
        let n = Arc::new(AtomicU64::new(2));
        let a = Limits::new(n.clone());
        let b = Limits::new(n.clone());
        let d = dep(Some(10), None);
        let t0 = Instant::now();
        let admitted = (0..20)
            .filter(|i| {
                if i % 2 == 0 { &a } else { &b }
                    .acquire_at(&d, 0, t0)
                    .is_ok()
            })
            .count();
        assert_eq!(admitted, 10);
        n.store(3, Ordering::Relaxed);
        assert_eq!(a.share(10), 4);
    }
}
