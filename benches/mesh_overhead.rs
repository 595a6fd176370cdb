//! Mesh overhead of a model call: the same HTTP client sends the same chat completion
//! to the gateway (gateway -> router -> simulated upstream, over mTLS, with audit and
//! usage on) and directly to the simulated upstream, and the latency difference is the
//! overhead. Run with `cargo bench --bench mesh_overhead`.
//!
//! Phases, each measured for both targets back to back in the same process:
//! * one client, sequential requests;
//! * open-loop fixed rates (500 and 1,000 req/s by default): each request is started
//!   on its own task on a fixed schedule whatever the earlier answers do (no coordinated
//!   omission); latency is measured from its actual start, and the worst lag of a start
//!   behind its schedule is printed so a pacer that fell behind is visible.
//!
//! Environment: `BENCH_SEQUENTIAL` (requests per target, default 3000), `BENCH_RATES`
//! (comma-separated req/s, default `500,1000`), `BENCH_SECONDS` (per rate and target,
//! default 5).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crewmesh::up::{self, UpOptions};

struct Target {
    name: &'static str,
    url: String,
    key: Option<String>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const BODY: &str =
    r#"{"model":"sim-small","messages":[{"role":"user","content":"Hello, mesh overhead!"}]}"#;

async fn call(http: &reqwest::Client, t: &Target) -> bool {
    let mut req = http
        .post(&t.url)
        .header("content-type", "application/json")
        .body(BODY);
    if let Some(k) = &t.key {
        req = req.bearer_auth(k);
    }
    match req.send().await {
        Ok(r) => {
            let ok = r.status().is_success();
            ok && r.bytes().await.is_ok()
        }
        Err(_) => false,
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

struct Summary {
    p50: f64,
    p99: f64,
    throughput: f64,
    errors: usize,
    n: usize,
}

fn summarise(mut lat: Vec<Duration>, errors: usize, wall: Duration) -> Summary {
    lat.sort();
    Summary {
        p50: pct(&lat, 0.50),
        p99: pct(&lat, 0.99),
        throughput: lat.len() as f64 / wall.as_secs_f64(),
        errors,
        n: lat.len(),
    }
}

/// `n` sequential requests to each target, alternating blocks of 250 so that both see
/// the same machine conditions.
async fn sequential(
    http: &reqwest::Client,
    a: &Target,
    b: &Target,
    n: usize,
) -> (Summary, Summary) {
    let mut lat = [Vec::with_capacity(n), Vec::with_capacity(n)];
    let mut errors = [0, 0];
    let mut wall = [Duration::ZERO, Duration::ZERO];
    let mut done = 0;
    while done < n {
        let block = 250.min(n - done);
        for (k, t) in [a, b].into_iter().enumerate() {
            let start = Instant::now();
            for _ in 0..block {
                let s = Instant::now();
                if call(http, t).await {
                    lat[k].push(s.elapsed());
                } else {
                    errors[k] += 1;
                }
            }
            wall[k] += start.elapsed();
        }
        done += block;
    }
    let [la, lb] = lat;
    (
        summarise(la, errors[0], wall[0]),
        summarise(lb, errors[1], wall[1]),
    )
}

async fn fixed_rate(
    http: &reqwest::Client,
    t: Arc<Target>,
    rate: u64,
    secs: u64,
) -> (Summary, Duration) {
    let total = rate * secs;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    let mut worst_lag = Duration::ZERO;
    for i in 0..total {
        // Pace by spinning on the clock (with yields): tokio's timer has a 1 ms
        // resolution, too coarse for 1,000 req/s.
        let scheduled = start + interval * i as u32;
        while Instant::now() < scheduled {
            tokio::task::yield_now().await;
        }
        worst_lag = worst_lag.max(scheduled.elapsed());
        let http = http.clone();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let ok = call(&http, &t).await;
            (ok, sent.elapsed())
        }));
    }
    let mut lat = Vec::with_capacity(tasks.len());
    let mut errors = 0;
    for task in tasks {
        match task.await {
            Ok((true, d)) => lat.push(d),
            _ => errors += 1,
        }
    }
    (summarise(lat, errors, start.elapsed()), worst_lag)
}

fn row(phase: &str, gw: &Summary, direct: &Summary) {
    println!(
        "| {phase} | {:.3} | {:.3} | **{:+.3}** | {:.3} | {:.3} | **{:+.3}** | {:.0} / {:.0} | {} / {} |",
        gw.p50,
        direct.p50,
        gw.p50 - direct.p50,
        gw.p99,
        direct.p99,
        gw.p99 - direct.p99,
        gw.throughput,
        direct.throughput,
        gw.errors,
        direct.errors,
    );
    let _ = (gw.n, direct.n);
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir()?;
        let mesh = up::start(UpOptions::embedded(
            dir.path().to_owned(),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        ))
        .await?;
        let gateway = Arc::new(Target {
            name: "gateway",
            url: format!("{}/v1/chat/completions", mesh.state.gateway_url),
            key: Some(mesh.state.admin_api_key.clone()),
        });
        let direct = Arc::new(Target {
            name: "direct",
            url: format!("{}/chat/completions", mesh.state.simulated_upstream_url),
            key: None,
        });
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(2048)
            .tcp_nodelay(true)
            .build()?;
        for t in [&gateway, &direct] {
            anyhow::ensure!(call(&http, t).await, "{} does not answer", t.name);
            for _ in 0..500 {
                call(&http, t).await;
            }
        }
        let n = env_or("BENCH_SEQUENTIAL", 3000usize);
        let secs = env_or("BENCH_SECONDS", 5u64);
        let rates: Vec<u64> = std::env::var("BENCH_RATES")
            .unwrap_or_else(|_| "500,1000".into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        println!(
            "| phase | gateway p50 ms | direct p50 ms | overhead p50 ms | gateway p99 ms | direct p99 ms | overhead p99 ms | req/s gateway / direct | errors gateway / direct |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        let (g, d) = sequential(&http, &gateway, &direct, n).await;
        row("1 client, sequential", &g, &d);
        let mut lags = Vec::new();
        for rate in rates {
            let (d, lag_d) = fixed_rate(&http, direct.clone(), rate, secs).await;
            let (g, lag_g) = fixed_rate(&http, gateway.clone(), rate, secs).await;
            row(&format!("{rate} req/s, open loop"), &g, &d);
            lags.push(format!(
                "{rate} req/s: worst start lag {:.3} ms (gateway) / {:.3} ms (direct)",
                lag_g.as_secs_f64() * 1000.0,
                lag_d.as_secs_f64() * 1000.0
            ));
        }
        for l in lags {
            println!("{l}");
        }
        mesh.shutdown().await?;
        Ok(())
    })
}
