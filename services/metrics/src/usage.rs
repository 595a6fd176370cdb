//! Usage records as the service keeps them: validation of submitted records and the
//! conversions to and from the wire.

use crewmesh_kit::principal::TenantId;
use crewmesh_proto::metrics::v1 as pb;
use crewmesh_proto::types::v1::{Outcome, TokenUsage};

/// Latest accepted record time: 9999-12-31T23:59:59Z, in Unix seconds.
const MAX_TIME_SECS: i64 = 253_402_300_799;

/// Why one submitted record was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordProblem {
    /// The offending field, as named in `UsageRecord` (`id`, `usage.prompt_tokens`, ...).
    pub field: &'static str,
    pub problem: String,
}

impl RecordProblem {
    fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

/// A validated usage record.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    /// Lower-case hyphenated UUID; the idempotency key.
    pub id: String,
    /// Unix time in microseconds, not before 1970.
    pub time_micros: i64,
    pub tenant: String,
    pub subject: String,
    pub model: String,
    pub deployment: String,
    pub provider: String,
    pub agent: String,
    pub run_id: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// As sent, or prompt + completion when the sender left it 0.
    pub total_tokens: i64,
    pub cost_usd: f64,
    pub latency_ms: f64,
    pub ttft_ms: f64,
    pub cache_hit: bool,
    pub retries: i64,
    pub fallbacks: i64,
    /// The `crewmesh.types.v1.Outcome` number.
    pub outcome: i32,
    pub request_id: String,
    pub simulated: bool,
}

fn tokens(field: &'static str, value: u64) -> Result<i64, RecordProblem> {
    i64::try_from(value).map_err(|_| RecordProblem::new(field, "must be at most 2^63-1"))
}

fn non_negative(field: &'static str, value: f64) -> Result<f64, RecordProblem> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(RecordProblem::new(
            field,
            format!("{value} is not a finite number >= 0"),
        ))
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl UsageRow {
    /// Checks a submitted record: the id must be a UUID, the time present (between
    /// 1970 and 9999), the tenant a tenant id, token counts representable, cost and
    /// latencies finite and non-negative, the outcome known.
    pub fn from_proto(record: pb::UsageRecord) -> Result<Self, RecordProblem> {
        let id = uuid::Uuid::parse_str(&record.id)
            .map_err(|_| {
                RecordProblem::new("id", format!("`{}` is not a UUID", truncate(&record.id)))
            })?
            .hyphenated()
            .to_string();
        let time = record
            .time
            .ok_or_else(|| RecordProblem::new("time", "missing"))?;
        if !(0..1_000_000_000).contains(&time.nanos) || !(0..=MAX_TIME_SECS).contains(&time.seconds)
        {
            return Err(RecordProblem::new(
                "time",
                "must lie between 1970-01-01 and 9999-12-31 with nanos in 0..1e9",
            ));
        }
        let time_micros = crewmesh_proto::time::to_micros(&time);
        if TenantId::parse(&record.tenant).is_err() {
            return Err(RecordProblem::new(
                "tenant",
                format!(
                    "`{}` is not a tenant id (1-63 characters of a-z, 0-9, '-' or '_', starting with a letter or digit)",
                    truncate(&record.tenant)
                ),
            ));
        }
        let usage = record.usage.unwrap_or_default();
        let prompt_tokens = tokens("usage.prompt_tokens", usage.prompt_tokens)?;
        let completion_tokens = tokens("usage.completion_tokens", usage.completion_tokens)?;
        let mut total_tokens = tokens("usage.total_tokens", usage.total_tokens)?;
        if total_tokens == 0 {
            total_tokens = prompt_tokens
                .checked_add(completion_tokens)
                .ok_or_else(|| {
                    RecordProblem::new("usage.total_tokens", "prompt + completion overflows")
                })?;
        }
        let cost_usd = non_negative("cost_usd", record.cost_usd)?;
        let latency_ms = non_negative("latency_ms", record.latency_ms)?;
        let ttft_ms = non_negative("time_to_first_token_ms", record.time_to_first_token_ms)?;
        if Outcome::try_from(record.outcome).is_err() {
            return Err(RecordProblem::new(
                "outcome",
                format!("{} is not a known outcome", record.outcome),
            ));
        }
        Ok(Self {
            id,
            time_micros,
            tenant: record.tenant,
            subject: record.subject,
            model: record.model,
            deployment: record.deployment,
            provider: record.provider,
            agent: record.agent,
            run_id: record.run_id,
            prompt_tokens,
            completion_tokens,
            total_tokens,
            cost_usd,
            latency_ms,
            ttft_ms,
            cache_hit: record.cache_hit,
            retries: i64::from(record.retries),
            fallbacks: i64::from(record.fallbacks),
            outcome: record.outcome,
            request_id: record.request_id,
            simulated: record.simulated,
        })
    }

    pub fn into_proto(self) -> pb::UsageRecord {
        let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
        pb::UsageRecord {
            id: self.id,
            time: Some(crewmesh_proto::time::from_micros(self.time_micros)),
            tenant: self.tenant,
            subject: self.subject,
            model: self.model,
            deployment: self.deployment,
            provider: self.provider,
            agent: self.agent,
            run_id: self.run_id,
            usage: Some(TokenUsage {
                prompt_tokens: unsigned(self.prompt_tokens),
                completion_tokens: unsigned(self.completion_tokens),
                total_tokens: unsigned(self.total_tokens),
            }),
            cost_usd: self.cost_usd,
            latency_ms: self.latency_ms,
            time_to_first_token_ms: self.ttft_ms,
            cache_hit: self.cache_hit,
            retries: u32::try_from(self.retries).unwrap_or(u32::MAX),
            fallbacks: u32::try_from(self.fallbacks).unwrap_or(u32::MAX),
            outcome: self.outcome,
            request_id: self.request_id,
            simulated: self.simulated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> pb::UsageRecord {
        pb::UsageRecord {
            id: "0190A5C4-0000-7000-8000-000000000001".into(),
            time: Some(crewmesh_proto::time::from_micros(1_700_000_000_123_456)),
            tenant: "acme".into(),
            subject: "key:k1".into(),
            model: "gpt".into(),
            deployment: "gpt-east".into(),
            provider: "openai".into(),
            agent: "helper".into(),
            run_id: "run-1".into(),
            usage: Some(TokenUsage {
                prompt_tokens: 10,
                completion_tokens: 5,
                total_tokens: 15,
            }),
            cost_usd: 0.25,
            latency_ms: 120.5,
            time_to_first_token_ms: 40.0,
            cache_hit: true,
            retries: 2,
            fallbacks: 1,
            outcome: Outcome::Success as i32,
            request_id: "req-1".into(),
            simulated: true,
        }
    }

    #[test]
    fn valid_records_round_trip() {
        let row = UsageRow::from_proto(record()).unwrap();
        assert_eq!(row.id, "0190a5c4-0000-7000-8000-000000000001");
        let mut expected = record();
        expected.id = row.id.clone();
        assert_eq!(row.into_proto(), expected);
    }

    #[test]
    fn total_tokens_default_to_the_sum() {
        let mut r = record();
        r.usage = Some(TokenUsage {
            prompt_tokens: 7,
            completion_tokens: 3,
            total_tokens: 0,
        });
        assert_eq!(UsageRow::from_proto(r).unwrap().total_tokens, 10);
        let mut r = record();
        r.usage = None;
        let row = UsageRow::from_proto(r).unwrap();
        assert_eq!(
            (row.prompt_tokens, row.completion_tokens, row.total_tokens),
            (0, 0, 0)
        );
    }

    #[test]
    fn validation_names_the_field() {
        type Mutation = fn(&mut pb::UsageRecord);
        let cases: Vec<(Mutation, &str)> = vec![
            (|r| r.id = "x".into(), "id"),
            (|r| r.time = None, "time"),
            (
                |r| r.time = Some(crewmesh_proto::time::from_micros(-1)),
                "time",
            ),
            (|r| r.tenant = "_global".into(), "tenant"),
            (|r| r.tenant = String::new(), "tenant"),
            (
                |r| r.usage.as_mut().unwrap().prompt_tokens = u64::MAX,
                "usage.prompt_tokens",
            ),
            (
                |r| r.usage.as_mut().unwrap().total_tokens = 1 << 63,
                "usage.total_tokens",
            ),
            (|r| r.cost_usd = -0.01, "cost_usd"),
            (|r| r.cost_usd = f64::NAN, "cost_usd"),
            (|r| r.cost_usd = f64::INFINITY, "cost_usd"),
            (|r| r.latency_ms = -1.0, "latency_ms"),
            (
                |r| r.time_to_first_token_ms = f64::NAN,
                "time_to_first_token_ms",
            ),
            (|r| r.outcome = 9, "outcome"),
        ];
        for (mutate, field) in cases {
            let mut r = record();
            mutate(&mut r);
            let err = UsageRow::from_proto(r).unwrap_err();
            assert_eq!(err.field, field, "{err:?}");
        }
    }
}
