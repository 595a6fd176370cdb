//! `crewmesh sim faults set|get|clear`: fault settings of the simulated upstream, changed
//! while it runs (its `/_sim/faults` admin API). The upstream is the running
//! `crewmesh up`'s (from `DATA_DIR/state.json`) unless `--upstream` names another.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Map, Value, json};

use crewmesh::state::{self, State};

#[derive(Args)]
pub struct SimArgs {
    #[command(subcommand)]
    pub command: SimCommand,
}

#[derive(Subcommand)]
pub enum SimCommand {
    /// Fault settings per deployment (upstream model name), applied from the next request.
    Faults(FaultsArgs),
}

#[derive(Args)]
pub struct FaultsArgs {
    #[command(subcommand)]
    pub command: FaultsCommand,
    /// Base URL of the simulated upstream (e.g. http://127.0.0.1:8090); defaults to the
    /// running `crewmesh up`'s (from DATA_DIR/state.json).
    #[arg(long, global = true)]
    pub upstream: Option<String>,
    #[arg(long, global = true, default_value = ".crewmesh")]
    pub data_dir: PathBuf,
}

#[derive(Subcommand)]
pub enum FaultsCommand {
    /// Install (or replace) the fault settings of a model; `--model '*'` is the default
    /// for every model without its own. Flags are merged over `--json`.
    Set {
        #[arg(long)]
        model: String,
        /// The whole settings document as JSON (see docs/routing.md).
        #[arg(long)]
        json: Option<String>,
        /// Share of requests answered with --error-status (0..1).
        #[arg(long)]
        error_rate: Option<f64>,
        /// Status of those answers (400..599, default 500).
        #[arg(long)]
        error_status: Option<u16>,
        /// Share of requests answered 429 with Retry-After (0..1).
        #[arg(long)]
        rate_limit: Option<f64>,
        /// Retry-After of the 429 answers, in seconds (default 1).
        #[arg(long)]
        retry_after_s: Option<u64>,
        /// Delay before every answer: fixed:MS, uniform:MIN..MAX, normal:MEAN,STDDEV or
        /// lognormal:MEDIAN,P99 (milliseconds).
        #[arg(long)]
        latency: Option<String>,
        /// Share of requests that never get an answer (0..1).
        #[arg(long)]
        hang_rate: Option<f64>,
        /// Share of requests whose body is cut off mid-way (0..1).
        #[arg(long)]
        drop_mid_stream_rate: Option<f64>,
        /// Content chunks a cut stream sends first (default 2).
        #[arg(long)]
        drop_after_chunks: Option<u64>,
        /// Seed for reproducible draws.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Show the settings and counters of one model, or of all.
    Get {
        #[arg(long)]
        model: Option<String>,
    },
    /// Remove the settings of one model, or of all with --all.
    Clear {
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        model: Option<String>,
        #[arg(long)]
        all: bool,
    },
}

/// The simulated upstream's root URL (without `/v1`).
fn upstream_root(upstream: Option<String>, data_dir: &Path) -> anyhow::Result<String> {
    let url = match upstream {
        Some(url) => url,
        None => State::read(data_dir)
            .map(|s| s.simulated_upstream_url)
            .with_context(|| {
                format!(
                    "no simulated upstream: start one with `crewmesh up` (which writes {}) or pass --upstream URL",
                    data_dir.join(state::FILE_NAME).display()
                )
            })?,
    };
    let url = url.trim_end_matches('/');
    Ok(url.strip_suffix("/v1").unwrap_or(url).to_owned())
}

/// `fixed:50`, `uniform:10..50`, `normal:50,10`, `lognormal:20,200`.
fn latency(spec: &str) -> anyhow::Result<Value> {
    let bad = || {
        anyhow::anyhow!(
            "--latency {spec:?}: expected fixed:MS, uniform:MIN..MAX, normal:MEAN,STDDEV or lognormal:MEDIAN,P99"
        )
    };
    let (kind, args) = spec.split_once(':').ok_or_else(bad)?;
    let number = |s: &str| s.trim().parse::<f64>().map_err(|_| bad());
    let pair = |sep: &str| -> anyhow::Result<(f64, f64)> {
        let (a, b) = args.split_once(sep).ok_or_else(bad)?;
        Ok((number(a)?, number(b)?))
    };
    Ok(match kind {
        "fixed" => json!({"distribution": "fixed", "ms": number(args)?}),
        "uniform" => {
            let (min, max) = pair("..")?;
            json!({"distribution": "uniform", "min_ms": min, "max_ms": max})
        }
        "normal" => {
            let (mean, sd) = pair(",")?;
            json!({"distribution": "normal", "mean_ms": mean, "stddev_ms": sd})
        }
        "lognormal" => {
            let (median, p99) = pair(",")?;
            json!({"distribution": "lognormal", "median_ms": median, "p99_ms": p99})
        }
        _ => return Err(bad()),
    })
}

/// Percent-encodes a model name for the URL path (slashes stay: the route takes them).
fn path_segment(model: &str) -> String {
    model
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' | b'*' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn answer(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let body: Value = resp
        .json()
        .await
        .with_context(|| format!("the simulated upstream answered {status} without JSON"))?;
    if !status.is_success() {
        bail!(
            "{status}: {}{}",
            body["error"]["message"]
                .as_str()
                .unwrap_or("request failed"),
            body["error"]["param"]
                .as_str()
                .map(|p| format!(" (field {p})"))
                .unwrap_or_default()
        );
    }
    Ok(body)
}

pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let SimCommand::Faults(args) = args.command;
    let root = upstream_root(args.upstream, &args.data_dir)?;
    let http = reqwest::Client::new();
    let body = match args.command {
        FaultsCommand::Set {
            model,
            json: doc,
            error_rate,
            error_status,
            rate_limit,
            retry_after_s,
            latency: latency_spec,
            hang_rate,
            drop_mid_stream_rate,
            drop_after_chunks,
            seed,
        } => {
            let mut settings: Map<String, Value> = match doc {
                Some(doc) => serde_json::from_str(&doc).context("--json is not a JSON object")?,
                None => Map::new(),
            };
            let mut put = |key: &str, value: Option<Value>| {
                if let Some(value) = value {
                    settings.insert(key.to_owned(), value);
                }
            };
            put("error_rate", error_rate.map(Value::from));
            put("error_status", error_status.map(Value::from));
            put("hang_rate", hang_rate.map(Value::from));
            put(
                "drop_mid_stream_rate",
                drop_mid_stream_rate.map(Value::from),
            );
            put("drop_after_chunks", drop_after_chunks.map(Value::from));
            put("seed", seed.map(Value::from));
            put("latency", latency_spec.as_deref().map(latency).transpose()?);
            if rate_limit.is_some() || retry_after_s.is_some() {
                let mut limit = match settings.remove("rate_limit") {
                    Some(Value::Object(limit)) => limit,
                    _ => Map::new(),
                };
                if let Some(rate) = rate_limit {
                    limit.insert("rate".into(), rate.into());
                }
                if let Some(secs) = retry_after_s {
                    limit.insert("retry_after_s".into(), secs.into());
                }
                settings.insert("rate_limit".into(), Value::Object(limit));
            }
            let url = format!("{root}/_sim/faults/{}", path_segment(&model));
            answer(http.put(url).json(&settings).send().await?).await?
        }
        FaultsCommand::Get { model } => {
            let url = match model {
                Some(model) => format!("{root}/_sim/faults/{}", path_segment(&model)),
                None => format!("{root}/_sim/faults"),
            };
            answer(http.get(url).send().await?).await?
        }
        FaultsCommand::Clear { model, all } => {
            let url = match (model, all) {
                (_, true) => format!("{root}/_sim/faults"),
                (Some(model), false) => format!("{root}/_sim/faults/{}", path_segment(&model)),
                (None, false) => bail!("pass --model M or --all"),
            };
            answer(http.delete(url).send().await?).await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_specs() {
        assert_eq!(
            latency("fixed:50").unwrap(),
            json!({"distribution": "fixed", "ms": 50.0})
        );
        assert_eq!(
            latency("uniform:10..50").unwrap(),
            json!({"distribution": "uniform", "min_ms": 10.0, "max_ms": 50.0})
        );
        assert_eq!(
            latency("lognormal:20,200").unwrap(),
            json!({"distribution": "lognormal", "median_ms": 20.0, "p99_ms": 200.0})
        );
        assert!(latency("pareto:1").is_err());
        assert!(latency("normal:5").is_err());
    }

    #[test]
    fn upstream_root_drops_the_api_prefix() {
        let dir = Path::new("/nonexistent");
        assert_eq!(
            upstream_root(Some("http://127.0.0.1:9/v1/".into()), dir).unwrap(),
            "http://127.0.0.1:9"
        );
        assert!(upstream_root(None, dir).is_err());
        assert_eq!(path_segment("org/m 1"), "org/m%201");
    }
}
