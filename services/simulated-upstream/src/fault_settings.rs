//! Fault settings changed at run time, per deployment (the upstream model name a request
//! names): the admin API's strict parser, the latency distributions, the table the
//! handlers read (swapped atomically, effective on the next request) and the per-request
//! draw that decides what a request acts out.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::http::StatusCode;
use rand::SeedableRng as _;
use rand::rngs::StdRng;
use serde_json::{Map, Value, json};

use crate::error::{ApiError, Result};
use crate::faults::MAX_SLOW;

/// The settings key that applies to every model without settings of its own.
pub const ANY_MODEL: &str = "*";
/// Content chunks a dropped stream sends when `drop_after_chunks` is not given (the same
/// as the `stream-break` fault).
pub(crate) const DEFAULT_DROP_AFTER_CHUNKS: u32 = 2;
/// Largest accepted `drop_after_chunks`.
const MAX_DROP_AFTER_CHUNKS: u32 = 100_000;
/// Largest accepted `rate_limit.retry_after_s`.
const MAX_RETRY_AFTER_S: u64 = 3_600;
/// The 99th percentile of the standard normal distribution.
const Z_99: f64 = 2.326_347_874_040_841;

/// What the simulated upstream acts out for one model, as set through the admin API.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FaultSettings {
    /// Share of requests answered with `error_status`.
    pub(crate) error_rate: f64,
    /// Status of those answers (400..=599, default 500).
    pub(crate) error_status: StatusCode,
    /// Share of requests answered `429` with a `Retry-After`.
    pub(crate) rate_limit: Option<RateLimit>,
    /// Delay before every answer (faulted or not).
    pub(crate) latency: Option<Latency>,
    /// Share of requests that never get an answer.
    pub(crate) hang_rate: f64,
    /// Share of requests whose body is cut off: a stream after `drop_after_chunks`
    /// content chunks, a plain answer halfway through its JSON.
    pub(crate) drop_mid_stream_rate: f64,
    pub(crate) drop_after_chunks: u32,
    /// Seeds the draws, so a sequence of requests gets the same faults every run.
    pub(crate) seed: Option<u64>,
}

/// `429` answers with a `Retry-After` header.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RateLimit {
    pub(crate) rate: f64,
    pub(crate) retry_after_s: u64,
}

/// A delay distribution, in milliseconds; every draw is cut to `0..=30,000` ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Latency {
    Fixed { ms: f64 },
    Uniform { min_ms: f64, max_ms: f64 },
    Normal { mean_ms: f64, stddev_ms: f64 },
    LogNormal { median_ms: f64, p99_ms: f64 },
}

/// What one request acts out, drawn from the settings of its model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Draw {
    pub(crate) delay: Duration,
    pub(crate) action: Action,
}

/// The fault part of a [`Draw`]; at most one per request, checked in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Answer,
    Hang,
    RateLimit { retry_after_s: u64 },
    Error(StatusCode),
    Drop { after_chunks: u32 },
}

impl FaultSettings {
    /// Parses a `PUT /_sim/faults/{model}` body. Strict: an unknown field, a wrong type, a
    /// rate outside `[0, 1]` or a field the chosen latency distribution does not use is an
    /// error naming the field.
    pub(crate) fn parse(body: &[u8]) -> Result<Self> {
        let value: Value =
            serde_json::from_slice(body).map_err(|err| ApiError::InvalidJson(err.to_string()))?;
        let obj = object(&value, "")?;
        only_fields(
            obj,
            "",
            &[
                "error_rate",
                "error_status",
                "rate_limit",
                "latency",
                "hang_rate",
                "drop_mid_stream_rate",
                "drop_after_chunks",
                "seed",
            ],
        )?;
        let error_status = match integer(obj, "error_status", "error_status")? {
            None => StatusCode::INTERNAL_SERVER_ERROR,
            Some(code @ 400..=599) => StatusCode::from_u16(code as u16)
                .map_err(|_| ApiError::invalid_param("not a status code", "error_status"))?,
            Some(code) => {
                return Err(ApiError::invalid_param(
                    format!("'error_status' must be an HTTP error status in 400..=599, got {code}"),
                    "error_status",
                ));
            }
        };
        let rate_limit = match obj.get("rate_limit") {
            None | Some(Value::Null) => None,
            Some(value) => {
                let limit = object(value, "rate_limit")?;
                only_fields(limit, "rate_limit.", &["rate", "retry_after_s"])?;
                let retry_after_s =
                    integer(limit, "retry_after_s", "rate_limit.retry_after_s")?.unwrap_or(1);
                if retry_after_s > MAX_RETRY_AFTER_S {
                    return Err(ApiError::invalid_param(
                        format!("'rate_limit.retry_after_s' must be at most {MAX_RETRY_AFTER_S}"),
                        "rate_limit.retry_after_s",
                    ));
                }
                Some(RateLimit {
                    rate: rate(limit, "rate", "rate_limit.rate")?,
                    retry_after_s,
                })
            }
        };
        let latency = match obj.get("latency") {
            None | Some(Value::Null) => None,
            Some(value) => Some(Latency::parse(object(value, "latency")?)?),
        };
        let drop_after_chunks = match integer(obj, "drop_after_chunks", "drop_after_chunks")? {
            None => DEFAULT_DROP_AFTER_CHUNKS,
            Some(n) if n <= u64::from(MAX_DROP_AFTER_CHUNKS) => n as u32,
            Some(_) => {
                return Err(ApiError::invalid_param(
                    format!("'drop_after_chunks' must be at most {MAX_DROP_AFTER_CHUNKS}"),
                    "drop_after_chunks",
                ));
            }
        };
        Ok(Self {
            error_rate: rate(obj, "error_rate", "error_rate")?,
            error_status,
            rate_limit,
            latency,
            hang_rate: rate(obj, "hang_rate", "hang_rate")?,
            drop_mid_stream_rate: rate(obj, "drop_mid_stream_rate", "drop_mid_stream_rate")?,
            drop_after_chunks,
            seed: integer(obj, "seed", "seed")?,
        })
    }

    /// The settings as the admin API shows them: every field, defaults filled in.
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "error_rate": self.error_rate,
            "error_status": self.error_status.as_u16(),
            "rate_limit": self.rate_limit.map(|limit| json!({
                "rate": limit.rate,
                "retry_after_s": limit.retry_after_s,
            })),
            "latency": self.latency.map(|latency| latency.to_json()),
            "hang_rate": self.hang_rate,
            "drop_mid_stream_rate": self.drop_mid_stream_rate,
            "drop_after_chunks": self.drop_after_chunks,
            "seed": self.seed,
        })
    }

    /// Draws what one request acts out. Always consumes the same number of values from
    /// `rng` for given settings, so a seeded sequence is reproducible.
    pub(crate) fn draw(&self, rng: &mut impl rand::Rng) -> Draw {
        let delay = self
            .latency
            .map_or(Duration::ZERO, |latency| latency.sample(rng));
        let hang = rng.random::<f64>() < self.hang_rate;
        let limited = rng.random::<f64>() < self.rate_limit.map_or(0.0, |limit| limit.rate);
        let error = rng.random::<f64>() < self.error_rate;
        let dropped = rng.random::<f64>() < self.drop_mid_stream_rate;
        let action = if hang {
            Action::Hang
        } else if let Some(limit) = self.rate_limit.filter(|_| limited) {
            Action::RateLimit {
                retry_after_s: limit.retry_after_s,
            }
        } else if error {
            Action::Error(self.error_status)
        } else if dropped {
            Action::Drop {
                after_chunks: self.drop_after_chunks,
            }
        } else {
            Action::Answer
        };
        Draw { delay, action }
    }
}

impl Latency {
    fn parse(obj: &Map<String, Value>) -> Result<Self> {
        let distribution = match obj.get("distribution") {
            Some(Value::String(name)) => name.as_str(),
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "'latency.distribution' must be a string",
                    "latency.distribution",
                ));
            }
            None => {
                return Err(ApiError::invalid_param(
                    "missing 'latency.distribution': one of fixed, uniform, normal, lognormal",
                    "latency.distribution",
                ));
            }
        };
        let fields: &[&str] = match distribution {
            "fixed" => &["ms"],
            "uniform" => &["min_ms", "max_ms"],
            "normal" => &["mean_ms", "stddev_ms"],
            "lognormal" => &["median_ms", "p99_ms"],
            other => {
                return Err(ApiError::invalid_param(
                    format!(
                        "unknown latency distribution {other:?}; expected fixed, uniform, normal or lognormal"
                    ),
                    "latency.distribution",
                ));
            }
        };
        let mut allowed = vec!["distribution"];
        allowed.extend_from_slice(fields);
        only_fields(obj, "latency.", &allowed).map_err(|err| match err {
            ApiError::InvalidRequest { param, .. } => ApiError::InvalidRequest {
                message: format!(
                    "unknown field '{}' for the {distribution} latency distribution, which takes {}",
                    param.as_deref().unwrap_or_default(),
                    fields.join(" and ")
                ),
                param,
            },
            other => other,
        })?;
        let ms = |key: &str| -> Result<f64> {
            let path = format!("latency.{key}");
            match obj.get(key) {
                None => Err(ApiError::invalid_param(
                    format!("the {distribution} latency distribution needs '{path}'"),
                    path,
                )),
                Some(value) => millis(value, &path),
            }
        };
        let latency = match distribution {
            "fixed" => Self::Fixed { ms: ms("ms")? },
            "uniform" => {
                let (min_ms, max_ms) = (ms("min_ms")?, ms("max_ms")?);
                if min_ms > max_ms {
                    return Err(ApiError::invalid_param(
                        "'latency.min_ms' must not exceed 'latency.max_ms'",
                        "latency.min_ms",
                    ));
                }
                Self::Uniform { min_ms, max_ms }
            }
            "normal" => Self::Normal {
                mean_ms: ms("mean_ms")?,
                stddev_ms: ms("stddev_ms")?,
            },
            _ => {
                let (median_ms, p99_ms) = (ms("median_ms")?, ms("p99_ms")?);
                if median_ms <= 0.0 {
                    return Err(ApiError::invalid_param(
                        "'latency.median_ms' must be greater than 0",
                        "latency.median_ms",
                    ));
                }
                if p99_ms < median_ms {
                    return Err(ApiError::invalid_param(
                        "'latency.p99_ms' must be at least 'latency.median_ms'",
                        "latency.p99_ms",
                    ));
                }
                Self::LogNormal { median_ms, p99_ms }
            }
        };
        Ok(latency)
    }

    fn to_json(self) -> Value {
        match self {
            Self::Fixed { ms } => json!({"distribution": "fixed", "ms": ms}),
            Self::Uniform { min_ms, max_ms } => {
                json!({"distribution": "uniform", "min_ms": min_ms, "max_ms": max_ms})
            }
            Self::Normal { mean_ms, stddev_ms } => {
                json!({"distribution": "normal", "mean_ms": mean_ms, "stddev_ms": stddev_ms})
            }
            Self::LogNormal { median_ms, p99_ms } => {
                json!({"distribution": "lognormal", "median_ms": median_ms, "p99_ms": p99_ms})
            }
        }
    }

    /// One delay, cut to `0..=30 s`. Normal draws below zero become zero; the lognormal
    /// has the given median and 99th percentile.
    pub(crate) fn sample(self, rng: &mut impl rand::Rng) -> Duration {
        let ms = match self {
            Self::Fixed { ms } => ms,
            Self::Uniform { min_ms, max_ms } => min_ms + (max_ms - min_ms) * rng.random::<f64>(),
            Self::Normal { mean_ms, stddev_ms } => mean_ms + stddev_ms * standard_normal(rng),
            Self::LogNormal { median_ms, p99_ms } => {
                let sigma = (p99_ms / median_ms).ln() / Z_99;
                (median_ms.ln() + sigma * standard_normal(rng)).exp()
            }
        };
        Duration::from_secs_f64(ms.clamp(0.0, MAX_SLOW.as_secs_f64() * 1_000.0) / 1_000.0)
    }
}

/// A standard normal draw (Box-Muller); always consumes two uniforms.
fn standard_normal(rng: &mut impl rand::Rng) -> f64 {
    // 1 - u is in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn object<'a>(value: &'a Value, path: &str) -> Result<&'a Map<String, Value>> {
    match value {
        Value::Object(obj) => Ok(obj),
        _ if path.is_empty() => Err(ApiError::invalid(
            "the fault settings must be a JSON object",
        )),
        _ => Err(ApiError::invalid_param(
            format!("'{path}' must be an object"),
            path,
        )),
    }
}

fn only_fields(obj: &Map<String, Value>, prefix: &str, allowed: &[&str]) -> Result<()> {
    match obj.keys().find(|key| !allowed.contains(&key.as_str())) {
        None => Ok(()),
        Some(key) => Err(ApiError::invalid_param(
            format!(
                "unknown field '{prefix}{key}'; expected one of {}",
                allowed.join(", ")
            ),
            format!("{prefix}{key}"),
        )),
    }
}

/// A share of requests: a number in `[0, 1]`; absent or null is 0.
fn rate(obj: &Map<String, Value>, key: &str, path: &str) -> Result<f64> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(0.0),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
            _ => Err(ApiError::invalid_param(
                format!("'{path}' must be between 0 and 1, got {n}"),
                path,
            )),
        },
        Some(_) => Err(ApiError::invalid_param(
            format!("'{path}' must be a number between 0 and 1"),
            path,
        )),
    }
}

fn integer(obj: &Map<String, Value>, key: &str, path: &str) -> Result<Option<u64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            ApiError::invalid_param(
                format!("'{path}' must be a non-negative integer, got {n}"),
                path,
            )
        }),
        Some(_) => Err(ApiError::invalid_param(
            format!("'{path}' must be a non-negative integer"),
            path,
        )),
    }
}

fn millis(value: &Value, path: &str) -> Result<f64> {
    let max = MAX_SLOW.as_millis();
    match value.as_f64() {
        Some(ms) if (0.0..=MAX_SLOW.as_secs_f64() * 1_000.0).contains(&ms) => Ok(ms),
        _ => Err(ApiError::invalid_param(
            format!("'{path}' must be a number of milliseconds in 0..={max}"),
            path,
        )),
    }
}

/// The settings of one model as installed, with their random source and counters.
#[derive(Debug)]
pub(crate) struct ModelFaults {
    pub(crate) settings: FaultSettings,
    rng: Mutex<StdRng>,
    requests: AtomicU64,
    injected: AtomicU64,
}

impl ModelFaults {
    pub(crate) fn new(settings: FaultSettings) -> Self {
        let rng = match settings.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            settings,
            rng: Mutex::new(rng),
            requests: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    /// Draws for one request and counts it.
    pub(crate) fn draw(&self) -> Draw {
        let draw = {
            // A poisoned lock only means another request panicked mid-draw; the random
            // state is still usable.
            let mut rng = self
                .rng
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.settings.draw(&mut *rng)
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        if draw.action != Action::Answer {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        draw
    }

    fn to_json(&self, model: &str) -> Value {
        json!({
            "model": model,
            "settings": self.settings.to_json(),
            "requests": self.requests.load(Ordering::Relaxed),
            "faults_injected": self.injected.load(Ordering::Relaxed),
        })
    }
}

/// Fault settings of every model. Readers take a snapshot without locking; a change
/// swaps in a new map, so it applies whole, from the next request on.
#[derive(Debug)]
pub(crate) struct FaultTable {
    entries: ArcSwap<HashMap<String, Arc<ModelFaults>>>,
}

impl Default for FaultTable {
    fn default() -> Self {
        Self {
            entries: ArcSwap::from_pointee(HashMap::new()),
        }
    }
}

impl FaultTable {
    /// Installs (or replaces) the settings of `model` (`*`: every model without its own).
    /// Counters and the random sequence start afresh.
    pub(crate) fn set(&self, model: &str, settings: FaultSettings) -> Value {
        let entry = Arc::new(ModelFaults::new(settings));
        self.entries.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.insert(model.to_owned(), Arc::clone(&entry));
            next
        });
        entry.to_json(model)
    }

    /// Removes the settings of `model`; false if it had none.
    pub(crate) fn clear(&self, model: &str) -> bool {
        let mut removed = false;
        self.entries.rcu(|current| {
            let mut next = HashMap::clone(current);
            removed = next.remove(model).is_some();
            next
        });
        removed
    }

    /// Removes every setting; returns how many there were.
    pub(crate) fn clear_all(&self) -> usize {
        self.entries.swap(Arc::new(HashMap::new())).len()
    }

    /// The settings in force for `model`: its own, else the `*` ones.
    pub(crate) fn lookup(&self, model: &str) -> Option<Arc<ModelFaults>> {
        let entries = self.entries.load();
        entries
            .get(model)
            .or_else(|| entries.get(ANY_MODEL))
            .cloned()
    }

    /// One model's settings and counters as the admin API shows them.
    pub(crate) fn get(&self, model: &str) -> Option<Value> {
        self.entries
            .load()
            .get(model)
            .map(|entry| entry.to_json(model))
    }

    /// Every model's settings and counters, by model name.
    pub(crate) fn list(&self) -> Vec<Value> {
        let entries = self.entries.load();
        let sorted: BTreeMap<&String, &Arc<ModelFaults>> = entries.iter().collect();
        sorted
            .into_iter()
            .map(|(model, entry)| entry.to_json(model))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<FaultSettings> {
        FaultSettings::parse(body.to_string().as_bytes())
    }

    fn rejected_param(body: Value) -> String {
        match parse(body) {
            Err(ApiError::InvalidRequest { param, .. }) => param.expect("names a field"),
            other => panic!("expected a rejection naming a field, got {other:?}"),
        }
    }

    #[test]
    fn parses_the_full_document() {
        let settings = parse(json!({
            "error_rate": 0.2, "error_status": 503,
            "rate_limit": {"rate": 0.1, "retry_after_s": 2},
            "latency": {"distribution": "lognormal", "median_ms": 20, "p99_ms": 200},
            "hang_rate": 0.01, "drop_mid_stream_rate": 0.05, "drop_after_chunks": 3, "seed": 7
        }))
        .expect("valid");
        assert_eq!(
            settings,
            FaultSettings {
                error_rate: 0.2,
                error_status: StatusCode::SERVICE_UNAVAILABLE,
                rate_limit: Some(RateLimit {
                    rate: 0.1,
                    retry_after_s: 2
                }),
                latency: Some(Latency::LogNormal {
                    median_ms: 20.0,
                    p99_ms: 200.0
                }),
                hang_rate: 0.01,
                drop_mid_stream_rate: 0.05,
                drop_after_chunks: 3,
                seed: Some(7),
            }
        );
        assert_eq!(
            settings.to_json(),
            json!({
                "error_rate": 0.2, "error_status": 503,
                "rate_limit": {"rate": 0.1, "retry_after_s": 2},
                "latency": {"distribution": "lognormal", "median_ms": 20.0, "p99_ms": 200.0},
                "hang_rate": 0.01, "drop_mid_stream_rate": 0.05, "drop_after_chunks": 3, "seed": 7
            })
        );
    }

    #[test]
    fn empty_document_means_no_faults() {
        let settings = parse(json!({})).expect("valid");
        assert_eq!(settings.error_rate, 0.0);
        assert_eq!(settings.error_status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(settings.rate_limit, None);
        assert_eq!(settings.latency, None);
        assert_eq!(settings.drop_after_chunks, DEFAULT_DROP_AFTER_CHUNKS);
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            assert_eq!(
                settings.draw(&mut rng),
                Draw {
                    delay: Duration::ZERO,
                    action: Action::Answer
                }
            );
        }
    }

    #[test]
    fn rejections_name_the_field() {
        assert_eq!(rejected_param(json!({"eror_rate": 0.1})), "eror_rate");
        assert_eq!(rejected_param(json!({"error_rate": 1.5})), "error_rate");
        assert_eq!(rejected_param(json!({"hang_rate": -0.1})), "hang_rate");
        assert_eq!(rejected_param(json!({"hang_rate": "0.1"})), "hang_rate");
        assert_eq!(
            rejected_param(json!({"drop_mid_stream_rate": 2})),
            "drop_mid_stream_rate"
        );
        assert_eq!(rejected_param(json!({"error_status": 200})), "error_status");
        assert_eq!(rejected_param(json!({"error_status": 5.5})), "error_status");
        assert_eq!(
            rejected_param(json!({"rate_limit": {"rate": 1.01}})),
            "rate_limit.rate"
        );
        assert_eq!(
            rejected_param(json!({"rate_limit": {"rate": 0.5, "retry": 2}})),
            "rate_limit.retry"
        );
        assert_eq!(
            rejected_param(json!({"rate_limit": {"rate": 0.5, "retry_after_s": -1}})),
            "rate_limit.retry_after_s"
        );
        assert_eq!(rejected_param(json!({"rate_limit": 0.5})), "rate_limit");
        assert_eq!(
            rejected_param(json!({"latency": {"ms": 5}})),
            "latency.distribution"
        );
        assert_eq!(
            rejected_param(json!({"latency": {"distribution": "pareto", "ms": 5}})),
            "latency.distribution"
        );
        assert_eq!(
            rejected_param(json!({"latency": {"distribution": "fixed", "mean_ms": 5}})),
            "latency.mean_ms"
        );
        assert_eq!(
            rejected_param(json!({"latency": {"distribution": "uniform", "min_ms": 5}})),
            "latency.max_ms"
        );
        assert_eq!(
            rejected_param(
                json!({"latency": {"distribution": "uniform", "min_ms": 9, "max_ms": 5}})
            ),
            "latency.min_ms"
        );
        assert_eq!(
            rejected_param(
                json!({"latency": {"distribution": "lognormal", "median_ms": 50, "p99_ms": 5}})
            ),
            "latency.p99_ms"
        );
        assert_eq!(
            rejected_param(json!({"latency": {"distribution": "fixed", "ms": 40000}})),
            "latency.ms"
        );
        assert_eq!(
            rejected_param(json!({"drop_after_chunks": 1_000_000})),
            "drop_after_chunks"
        );
        assert_eq!(rejected_param(json!({"seed": -3})), "seed");
        assert!(matches!(
            FaultSettings::parse(b"[1]"),
            Err(ApiError::InvalidRequest { param: None, .. })
        ));
        assert!(matches!(
            FaultSettings::parse(b"{"),
            Err(ApiError::InvalidJson(_))
        ));
    }

    #[test]
    fn unknown_latency_field_message_lists_the_expected_ones() {
        let err = parse(json!({"latency": {"distribution": "normal", "mean_ms": 5, "ms": 1}}))
            .expect_err("rejected");
        assert_eq!(
            err.to_string(),
            "unknown field 'latency.ms' for the normal latency distribution, which takes mean_ms and stddev_ms"
        );
    }

    #[test]
    fn certain_and_impossible_rates() {
        let always = parse(json!({"error_rate": 1.0, "error_status": 502})).expect("valid");
        let never = parse(json!({"error_rate": 0.0})).expect("valid");
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..1_000 {
            assert_eq!(
                always.draw(&mut rng).action,
                Action::Error(StatusCode::BAD_GATEWAY)
            );
            assert_eq!(never.draw(&mut rng).action, Action::Answer);
        }
    }

    #[test]
    fn faults_are_checked_in_order() {
        let all = parse(json!({
            "hang_rate": 1.0, "rate_limit": {"rate": 1.0, "retry_after_s": 4},
            "error_rate": 1.0, "drop_mid_stream_rate": 1.0, "drop_after_chunks": 5
        }))
        .expect("valid");
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(all.draw(&mut rng).action, Action::Hang);
        let mut no_hang = all.clone();
        no_hang.hang_rate = 0.0;
        assert_eq!(
            no_hang.draw(&mut rng).action,
            Action::RateLimit { retry_after_s: 4 }
        );
        no_hang.rate_limit = None;
        assert_eq!(
            no_hang.draw(&mut rng).action,
            Action::Error(StatusCode::INTERNAL_SERVER_ERROR)
        );
        no_hang.error_rate = 0.0;
        assert_eq!(
            no_hang.draw(&mut rng).action,
            Action::Drop { after_chunks: 5 }
        );
    }

    #[test]
    fn seeded_draws_repeat_and_hit_the_rate() {
        let settings = parse(json!({"error_rate": 0.2, "seed": 42})).expect("valid");
        let run = || {
            let faults = ModelFaults::new(settings.clone());
            (0..10_000)
                .map(|_| faults.draw().action)
                .collect::<Vec<_>>()
        };
        let first = run();
        assert_eq!(first, run(), "the same seed gives the same sequence");
        let errors = first
            .iter()
            .filter(|action| **action != Action::Answer)
            .count();
        // 10,000 draws at 0.2: the standard deviation is 40, so +-200 is 5 sigma.
        assert!((1_800..=2_200).contains(&errors), "{errors} errors");
    }

    fn samples(latency: Latency, n: usize) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(11);
        let mut out: Vec<f64> = (0..n)
            .map(|_| latency.sample(&mut rng).as_secs_f64() * 1_000.0)
            .collect();
        out.sort_by(f64::total_cmp);
        out
    }

    fn mean(values: &[f64]) -> f64 {
        values.iter().sum::<f64>() / values.len() as f64
    }

    #[test]
    fn fixed_latency_is_exact() {
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(
            Latency::Fixed { ms: 250.0 }.sample(&mut rng),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn uniform_latency_stays_in_bounds_and_centres() {
        let values = samples(
            Latency::Uniform {
                min_ms: 10.0,
                max_ms: 30.0,
            },
            20_000,
        );
        assert!(values[0] >= 10.0 && values[values.len() - 1] <= 30.0);
        let m = mean(&values);
        assert!((19.8..=20.2).contains(&m), "mean {m}");
    }

    #[test]
    fn normal_latency_has_its_mean_and_spread() {
        let values = samples(
            Latency::Normal {
                mean_ms: 100.0,
                stddev_ms: 10.0,
            },
            20_000,
        );
        let m = mean(&values);
        let sd = (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / values.len() as f64).sqrt();
        assert!((99.7..=100.3).contains(&m), "mean {m}");
        assert!((9.7..=10.3).contains(&sd), "stddev {sd}");
        let clipped = samples(
            Latency::Normal {
                mean_ms: 1.0,
                stddev_ms: 10.0,
            },
            1_000,
        );
        assert_eq!(clipped[0], 0.0, "negative draws become zero");
    }

    #[test]
    fn lognormal_latency_has_its_median_and_p99() {
        let values = samples(
            Latency::LogNormal {
                median_ms: 20.0,
                p99_ms: 200.0,
            },
            50_000,
        );
        let median = values[values.len() / 2];
        let p99 = values[values.len() * 99 / 100];
        assert!((19.0..=21.0).contains(&median), "median {median}");
        assert!((180.0..=220.0).contains(&p99), "p99 {p99}");
    }

    #[test]
    fn long_draws_are_capped() {
        let mut rng = StdRng::seed_from_u64(5);
        let capped = (0..1_000)
            .map(|_| {
                Latency::LogNormal {
                    median_ms: 20_000.0,
                    p99_ms: 30_000.0,
                }
                .sample(&mut rng)
            })
            .max()
            .expect("samples");
        assert_eq!(capped, MAX_SLOW);
    }

    #[test]
    fn table_prefers_the_model_then_the_default() {
        let table = FaultTable::default();
        assert!(table.lookup("a").is_none());
        table.set(ANY_MODEL, parse(json!({"error_rate": 1.0})).expect("valid"));
        table.set("a", parse(json!({"hang_rate": 1.0})).expect("valid"));
        assert_eq!(table.lookup("a").expect("own").draw().action, Action::Hang);
        assert_eq!(
            table.lookup("b").expect("default").draw().action,
            Action::Error(StatusCode::INTERNAL_SERVER_ERROR)
        );
        let listed = table.list();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0]["model"], "*");
        assert_eq!(listed[0]["requests"], 1);
        assert_eq!(listed[0]["faults_injected"], 1);
        assert_eq!(listed[1]["model"], "a");
        assert!(table.clear("a"));
        assert!(!table.clear("a"));
        assert_eq!(
            table.lookup("a").expect("default now").draw().action,
            Action::Error(StatusCode::INTERNAL_SERVER_ERROR)
        );
        assert_eq!(table.clear_all(), 1);
        assert!(table.lookup("a").is_none());
        assert!(table.get("a").is_none());
    }
}
