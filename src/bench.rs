//! `crewmesh bench gateway`: the mesh overhead of a model call — latency through the
//! gateway (gateway -> router -> simulated upstream, over mTLS, audit and usage on) minus
//! latency straight to the simulated upstream, measured side by side in one run.
//!
//! Scenarios, each run for both targets:
//! * **1 client, sequential**: one request at a time, alternating gateway and direct
//!   request by request, latency from the send to the last body byte;
//! * **open loop at a fixed rate** (500 and 1,000 req/s by default): sends are scheduled
//!   on a fixed clock by a pacer thread and each runs on its own task whatever the earlier
//!   ones do, and latency is measured *from the scheduled send time*, so a slow answer or a
//!   pacer that falls behind shows in the figures instead of silently lowering the offered
//!   load (no coordinated omission). The targets alternate in one-second slices (the
//!   answers of a slice are awaited before the next starts), so both see the same machine
//!   conditions; the CPU time a hypervisor took from the machine during each target's
//!   slices is reported beside them ([`steal`]).
//!
//! One HTTP/1.1 client with a keep-alive connection pool sends the same chat completion
//! to both targets. By default the mesh is started in this process exactly like
//! `crewmesh up` (a temporary data directory, removed afterwards); `--url`, `--key` and
//! `--upstream-url` measure a running gateway instead. The load generator runs on its own
//! single-threaded runtime, separate from the mesh's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::up::{self, UpOptions};

mod steal;

/// Length of one slice of an open-loop scenario (targets alternate slice by slice).
const SLICE: Duration = Duration::from_secs(1);
/// A request that has not answered by then counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Mesh overhead of a model call: gateway latency minus direct upstream latency.
    Gateway(GatewayArgs),
}

#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// A running gateway to measure (e.g. http://127.0.0.1:8080); without it the mesh is
    /// started in this process like `crewmesh up`.
    #[arg(long, requires = "upstream_url")]
    pub url: Option<String>,
    /// API key for --url.
    #[arg(long, env = "CREWMESH_API_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// The simulated upstream behind --url, for the direct baseline (e.g. http://127.0.0.1:8090/v1).
    #[arg(long)]
    pub upstream_url: Option<String>,
    /// Model alias to call (the direct baseline sends the same body to the upstream).
    #[arg(long, default_value = "sim-small")]
    pub model: String,
    /// Measured time per scenario and target, e.g. 5s or 500ms.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Sequential requests to both targets before measuring.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Open-loop rates in requests per second, comma-separated.
    #[arg(long, default_value = "500,1000", value_delimiter = ',')]
    pub rates: Vec<u32>,
    /// Threads of the in-process mesh's data plane (as `crewmesh up --data-plane-threads`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub data_plane_threads: u16,
    /// Idle polling of the in-process mesh's data plane (as `crewmesh up
    /// --data-plane-idle-poll`, and with its default); 0: off.
    #[arg(long, default_value = up::DEFAULT_DATA_PLANE_IDLE_POLL_ARG, value_parser = up::parse_idle_poll)]
    pub data_plane_idle_poll: Duration,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl GatewayArgs {
    /// The defaults of the command: an in-process mesh, 5 s per scenario and target,
    /// 2 s of warm-up, 500 and 1,000 req/s.
    pub fn in_process() -> Self {
        Self {
            url: None,
            key: None,
            upstream_url: None,
            model: "sim-small".to_owned(),
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(2),
            rates: vec![500, 1000],
            data_plane_threads: 1,
            data_plane_idle_poll: up::DEFAULT_DATA_PLANE_IDLE_POLL,
            json: false,
        }
    }
}

/// `5s`, `500ms`, `200us`, `1.5s`, `2m` or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 5s or 500ms"))?;
    let secs = match unit {
        "us" => value / 1_000_000.0,
        "ms" => value / 1_000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use us, ms, s or m)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{text:?} is not a valid duration"))
}

/// Latency and throughput of one target in one scenario; times in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub requests: usize,
    pub errors: usize,
    pub throughput_rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Open loop only: 99th percentile of how late sends started after their scheduled
    /// time (pacer and scheduler lag; it is part of the latency figures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_lag_p99_ms: Option<f64>,
    /// Open loop only, where the kernel reports it: CPU time the hypervisor took from
    /// this machine's CPUs while this target was measured (`steal` in `/proc/stat`, in
    /// clock ticks of 10 ms on most kernels). Stalls it causes are in the latencies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steal_ms: Option<f64>,
}

/// Gateway minus direct, per percentile, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Overhead {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub scenario: String,
    /// Offered rate of an open-loop scenario; none for the sequential one.
    pub rate_rps: Option<u32>,
    pub direct: Stats,
    pub gateway: Stats,
    pub overhead: Overhead,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What answered the model calls: always the simulated upstream's echo.
    pub upstream: &'static str,
    /// `in-process` (started like `crewmesh up`, audit and usage on) or `external`.
    pub mesh: &'static str,
    pub model: String,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub cores: usize,
    /// The in-process data plane's longest idle-poll window in ms (0: off); `None` for an
    /// external mesh, whose setting the benchmark cannot see.
    pub data_plane_idle_poll_ms: Option<f64>,
    pub scenarios: Vec<Scenario>,
}

/// One target of the measurement.
#[derive(Debug, Clone)]
struct Target {
    url: String,
    key: Option<String>,
}

/// What one target's requests in one scenario gave.
#[derive(Debug, Default)]
struct Samples {
    latencies: Vec<Duration>,
    errors: usize,
    /// Time the target was being measured (sum of its slices or of its requests).
    wall: Duration,
    start_lags: Vec<Duration>,
    /// Open loop: steal time during the target's slices, if the kernel reports it.
    steal: Option<Duration>,
}

impl Samples {
    fn stats(mut self, open_loop: bool) -> Stats {
        self.latencies.sort_unstable();
        self.start_lags.sort_unstable();
        let ms = |d: Option<&Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1_000.0);
        Stats {
            requests: self.latencies.len() + self.errors,
            errors: self.errors,
            throughput_rps: if self.wall.is_zero() {
                0.0
            } else {
                self.latencies.len() as f64 / self.wall.as_secs_f64()
            },
            p50_ms: ms(percentile(&self.latencies, 0.50)),
            p90_ms: ms(percentile(&self.latencies, 0.90)),
            p99_ms: ms(percentile(&self.latencies, 0.99)),
            max_ms: ms(self.latencies.last()),
            start_lag_p99_ms: open_loop.then(|| ms(percentile(&self.start_lags, 0.99))),
            steal_ms: self
                .steal
                .filter(|_| open_loop)
                .map(|d| d.as_secs_f64() * 1_000.0),
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Option<&Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1)
}

fn overhead(gateway: &Stats, direct: &Stats) -> Overhead {
    Overhead {
        p50_ms: gateway.p50_ms - direct.p50_ms,
        p90_ms: gateway.p90_ms - direct.p90_ms,
        p99_ms: gateway.p99_ms - direct.p99_ms,
        max_ms: gateway.max_ms - direct.max_ms,
    }
}

/// Runs the command: measures, then prints a table or JSON.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let BenchCommand::Gateway(args) = args.command;
    let json = args.json;
    let report = run_gateway(args).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// Measures the mesh overhead as configured (starting and stopping an in-process mesh
/// unless `--url` is given).
pub async fn run_gateway(args: GatewayArgs) -> anyhow::Result<Report> {
    ensure!(!args.duration.is_zero(), "--duration must be more than 0");
    ensure!(
        args.rates.iter().all(|r| *r > 0),
        "--rates must be positive"
    );
    match args.url.clone() {
        Some(url) => {
            let upstream = args
                .upstream_url
                .clone()
                .context("--url needs --upstream-url for the direct baseline")?;
            let key = args
                .key
                .clone()
                .context("--url needs --key (or CREWMESH_API_KEY)")?;
            measure(args, &url, Some(key), &upstream, "external").await
        }
        None => {
            // The telemetry of `crewmesh up --log-level warn`: every request gets its
            // spans and W3C trace id (which its audit events carry), and only warnings
            // are logged, so the figures do not include writing an access log line.
            let _telemetry = crewmesh_kit::telemetry::init(
                "crewmesh",
                &crewmesh_kit::telemetry::TelemetryConfig {
                    log_level: "warn".to_owned(),
                    ..Default::default()
                },
            );
            let dir = scratch_dir()?;
            let idle_poll = args.data_plane_idle_poll;
            let mesh = up::start(UpOptions {
                data_plane_threads: usize::from(args.data_plane_threads),
                data_plane_idle_poll: idle_poll,
                ..UpOptions::embedded(dir.clone(), SocketAddr::from(([127, 0, 0, 1], 0)))
            })
            .await
            .context("starting the mesh")?;
            let (url, key, upstream) = (
                mesh.state.gateway_url.clone(),
                mesh.state.admin_api_key.clone(),
                mesh.state.simulated_upstream_url.clone(),
            );
            let report = measure(args, &url, Some(key), &upstream, "in-process").await;
            let stopped = mesh.shutdown().await;
            let _ = std::fs::remove_dir_all(&dir);
            let mut report = report?;
            stopped.context("stopping the mesh")?;
            report.data_plane_idle_poll_ms = Some(idle_poll.as_secs_f64() * 1e3);
            Ok(report)
        }
    }
}

/// A fresh directory for the in-process mesh's state.
fn scratch_dir() -> anyhow::Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let dir =
        std::env::temp_dir().join(format!("crewmesh-bench-{}-{nanos:09}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn api_base(url: &str) -> String {
    let url = url.trim_end_matches('/');
    if url.ends_with("/v1") {
        url.to_owned()
    } else {
        format!("{url}/v1")
    }
}

/// Runs the scenarios on a load-generator runtime of its own.
async fn measure(
    args: GatewayArgs,
    gateway_url: &str,
    key: Option<String>,
    upstream_url: &str,
    mesh: &'static str,
) -> anyhow::Result<Report> {
    let gateway = Target {
        url: format!("{}/chat/completions", api_base(gateway_url)),
        key,
    };
    let direct = Target {
        url: format!("{}/chat/completions", api_base(upstream_url)),
        key: None,
    };
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the load generator's runtime")?;
        runtime.block_on(scenarios(args, gateway, direct, mesh))
    })
    .await
    .context("the load generator failed")?
}

struct Load {
    http: reqwest::Client,
    body: String,
}

impl Load {
    async fn call(&self, target: &Target) -> bool {
        let mut request = self
            .http
            .post(&target.url)
            .header("content-type", "application/json")
            .body(self.body.clone());
        if let Some(key) = &target.key {
            request = request.bearer_auth(key);
        }
        match request.send().await {
            Ok(resp) => resp.status().is_success() && resp.bytes().await.is_ok(),
            Err(_) => false,
        }
    }
}

async fn scenarios(
    args: GatewayArgs,
    gateway: Target,
    direct: Target,
    mesh: &'static str,
) -> anyhow::Result<Report> {
    let http = reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let body = serde_json::json!({
        "model": args.model,
        "messages": [{"role": "user", "content": "Hello, mesh overhead!"}],
    });
    let load = Arc::new(Load {
        http,
        body: body.to_string(),
    });
    for (name, target) in [("gateway", &gateway), ("simulated upstream", &direct)] {
        if !load.call(target).await {
            bail!(
                "the {name} at {} does not answer a chat completion",
                target.url
            );
        }
    }
    if !args.warmup.is_zero() {
        let _ = sequential(&load, [&direct, &gateway], args.warmup).await;
    }

    let mut out = Vec::new();
    let [d, g] = sequential(&load, [&direct, &gateway], args.duration).await;
    out.push(scenario(
        "1 client, sequential".to_owned(),
        None,
        d,
        g,
        false,
    ));
    for rate in &args.rates {
        let [d, g] = open_loop(&load, [&direct, &gateway], *rate, args.duration).await;
        out.push(scenario(
            format!("{rate} req/s, open loop"),
            Some(*rate),
            d,
            g,
            true,
        ));
    }
    Ok(Report {
        upstream: "simulated",
        mesh,
        model: args.model,
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        data_plane_idle_poll_ms: None,
        scenarios: out,
    })
}

fn scenario(
    name: String,
    rate_rps: Option<u32>,
    direct: Samples,
    gateway: Samples,
    open_loop: bool,
) -> Scenario {
    let (direct, gateway) = (direct.stats(open_loop), gateway.stats(open_loop));
    Scenario {
        scenario: name,
        rate_rps,
        overhead: overhead(&gateway, &direct),
        direct,
        gateway,
    }
}

/// One request at a time, alternating between the targets, until each has been measured
/// for `duration`.
async fn sequential(load: &Load, targets: [&Target; 2], duration: Duration) -> [Samples; 2] {
    let mut samples = [Samples::default(), Samples::default()];
    let started = Instant::now();
    while started.elapsed() < duration * 2 {
        for (target, samples) in targets.iter().zip(samples.iter_mut()) {
            let sent = Instant::now();
            let ok = load.call(target).await;
            let took = sent.elapsed();
            samples.wall += took;
            if ok {
                samples.latencies.push(took);
            } else {
                samples.errors += 1;
            }
        }
    }
    samples
}

/// Open loop at `rate` req/s: one-second slices alternating between the targets until
/// each has had `duration` of offered load.
async fn open_loop(
    load: &Arc<Load>,
    targets: [&Target; 2],
    rate: u32,
    duration: Duration,
) -> [Samples; 2] {
    let mut samples = [Samples::default(), Samples::default()];
    let mut remaining = duration;
    while !remaining.is_zero() {
        let slice = remaining.min(SLICE);
        remaining -= slice;
        for (target, samples) in targets.iter().zip(samples.iter_mut()) {
            let stolen_before = steal::total();
            run_slice(load, target, rate, slice, samples).await;
            if let (Some(before), Some(after)) = (stolen_before, steal::total()) {
                let stolen = after.saturating_sub(before);
                samples.steal = Some(samples.steal.unwrap_or_default() + stolen);
            }
        }
    }
    samples
}

/// Sends `rate x slice` requests on a fixed schedule and waits for all of them.
async fn run_slice(
    load: &Arc<Load>,
    target: &Target,
    rate: u32,
    slice: Duration,
    out: &mut Samples,
) {
    let count = (f64::from(rate) * slice.as_secs_f64()).round().max(1.0) as u64;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let handle = tokio::runtime::Handle::current();
    let (load, target) = (Arc::clone(load), target.clone());
    let start = Instant::now() + Duration::from_millis(1);
    // The pacer is a thread of its own: it sleeps until each scheduled time (the OS
    // timer is finer than the runtime's 1 ms) and spawns the request onto the runtime.
    let pacer = tokio::task::spawn_blocking(move || {
        let target = Arc::new(target);
        (0..count)
            .map(|i| {
                let scheduled = start + interval.mul_f64(i as f64);
                let now = Instant::now();
                if scheduled > now {
                    std::thread::sleep(scheduled - now);
                }
                let (load, target) = (Arc::clone(&load), Arc::clone(&target));
                handle.spawn(async move {
                    let lag = scheduled.elapsed();
                    let ok = load.call(&target).await;
                    (ok, scheduled.elapsed(), lag)
                })
            })
            .collect::<Vec<_>>()
    });
    let tasks = match pacer.await {
        Ok(tasks) => tasks,
        Err(_) => {
            out.errors += count as usize;
            return;
        }
    };
    for task in tasks {
        match task.await {
            Ok((true, latency, lag)) => {
                out.latencies.push(latency);
                out.start_lags.push(lag);
            }
            Ok((false, _, lag)) => {
                out.errors += 1;
                out.start_lags.push(lag);
            }
            Err(_) => out.errors += 1,
        }
    }
    out.wall += start.elapsed();
}

/// The report as a Markdown table.
pub fn table(report: &Report) -> String {
    let idle_poll = match report.data_plane_idle_poll_ms {
        Some(ms) if ms > 0.0 => format!(", data plane idle poll up to {ms} ms"),
        Some(_) => ", data plane idle poll off".to_owned(),
        None => String::new(),
    };
    let mut out = format!(
        "mesh overhead of a model call ({} mesh{idle_poll}, {} upstream, model {}, {} cores; {:.1} s per scenario and target)\n\n",
        report.mesh, report.upstream, report.model, report.cores, report.duration_s
    );
    out.push_str(
        "| scenario | target | requests | errors | req/s | p50 ms | p90 ms | p99 ms | max ms |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for s in &report.scenarios {
        for (name, stats) in [("direct", &s.direct), ("gateway", &s.gateway)] {
            out.push_str(&format!(
                "| {} | {name} | {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
                s.scenario,
                stats.requests,
                stats.errors,
                stats.throughput_rps,
                stats.p50_ms,
                stats.p90_ms,
                stats.p99_ms,
                stats.max_ms
            ));
        }
        let o = &s.overhead;
        out.push_str(&format!(
            "| {} | **overhead** | | | | **{:+.3}** | {:+.3} | **{:+.3}** | {:+.3} |\n",
            s.scenario, o.p50_ms, o.p90_ms, o.p99_ms, o.max_ms
        ));
    }
    out.push('\n');
    for (what, field, decimals) in [
        (
            "p99 start lag behind the schedule (included in the latencies)",
            (|s: &Stats| s.start_lag_p99_ms) as fn(&Stats) -> Option<f64>,
            3,
        ),
        (
            "steal (CPU time a hypervisor took from this machine; its stalls are in the latencies) while each target was measured",
            |s: &Stats| s.steal_ms,
            0,
        ),
    ] {
        let per_scenario: Vec<String> = report
            .scenarios
            .iter()
            .filter_map(|s| {
                Some(format!(
                    "{}: {:.decimals$} ms direct / {:.decimals$} ms gateway",
                    s.scenario,
                    field(&s.direct)?,
                    field(&s.gateway)?
                ))
            })
            .collect();
        if !per_scenario.is_empty() {
            out.push_str(&format!("{what}: {}\n", per_scenario.join("; ")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_defaults_are_the_in_process_ones() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: GatewayArgs,
        }
        let (parsed, defaults) = (Cli::parse_from(["bench"]).args, GatewayArgs::in_process());
        assert_eq!(parsed.data_plane_idle_poll, defaults.data_plane_idle_poll);
        assert_eq!(parsed.rates, defaults.rates);
        assert_eq!(parsed.duration, defaults.duration);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("200us"), Ok(Duration::from_micros(200)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1_500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 0.50), Some(&Duration::from_millis(50)));
        assert_eq!(percentile(&values, 0.99), Some(&Duration::from_millis(99)));
        assert_eq!(percentile(&values, 1.0), Some(&Duration::from_millis(100)));
        assert_eq!(
            percentile(&values[..1], 0.99),
            Some(&Duration::from_millis(1))
        );
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn stats_and_overhead() {
        let samples = |ms: &[u64]| Samples {
            latencies: ms.iter().copied().map(Duration::from_millis).collect(),
            errors: 1,
            wall: Duration::from_secs(2),
            start_lags: vec![Duration::from_millis(1)],
            steal: Some(Duration::from_millis(20)),
        };
        let direct = samples(&[1, 2, 3, 4]).stats(true);
        let gateway = samples(&[2, 4, 6, 8]).stats(true);
        assert_eq!(direct.requests, 5);
        assert_eq!(direct.errors, 1);
        assert_eq!(direct.throughput_rps, 2.0);
        assert_eq!(direct.start_lag_p99_ms, Some(1.0));
        assert_eq!(direct.steal_ms, Some(20.0));
        let o = overhead(&gateway, &direct);
        assert_eq!((o.p50_ms, o.p99_ms, o.max_ms), (2.0, 4.0, 4.0));
        let sequential = samples(&[1]).stats(false);
        assert_eq!(
            (sequential.start_lag_p99_ms, sequential.steal_ms),
            (None, None)
        );
    }

    #[test]
    fn the_table_gives_start_lag_and_steal_per_open_loop_scenario() {
        let samples = |open_loop: bool| {
            Samples {
                latencies: vec![Duration::from_millis(2)],
                errors: 0,
                wall: Duration::from_secs(1),
                start_lags: vec![Duration::from_micros(250)],
                steal: Some(Duration::from_millis(30)),
            }
            .stats(open_loop)
        };
        let scenario = |name: &str, open_loop: bool| Scenario {
            scenario: name.to_owned(),
            rate_rps: open_loop.then_some(1_000),
            overhead: overhead(&samples(open_loop), &samples(open_loop)),
            direct: samples(open_loop),
            gateway: samples(open_loop),
        };
        let report = Report {
            upstream: "simulated",
            mesh: "external",
            model: "sim-small".to_owned(),
            duration_s: 1.0,
            warmup_s: 0.0,
            cores: 2,
            data_plane_idle_poll_ms: None,
            scenarios: vec![scenario("seq", false), scenario("1000 req/s", true)],
        };
        let table = table(&report);
        assert!(
            table.contains(
                "p99 start lag behind the schedule (included in the latencies): \
                 1000 req/s: 0.250 ms direct / 0.250 ms gateway\n"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "while each target was measured: 1000 req/s: 30 ms direct / 30 ms gateway\n"
            ),
            "{table}"
        );
        assert!(!table.contains("seq:"), "{table}");
    }

    #[test]
    fn api_base_adds_v1_once() {
        assert_eq!(api_base("http://h:1"), "http://h:1/v1");
        assert_eq!(api_base("http://h:1/v1/"), "http://h:1/v1");
    }
}
