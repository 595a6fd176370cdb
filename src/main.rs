//! The `crewmesh` command: run the whole mesh in one process (`up`), run one service
//! (`serve`), and the admin tools around them.

#![forbid(unsafe_code)]

mod audit_cli;
mod chat;
mod config_cli;
mod gateway_client;
mod keys_cli;
mod sim_cli;

use crewmesh::{bench, file_config, state, up};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use crewmesh_kit::mesh::Service;
use crewmesh_kit::observe::MetricsRegistry;
use crewmesh_kit::settings::EXIT_BAD_CONFIG;
use crewmesh_kit::telemetry::{LogFormat, TelemetryConfig};

#[derive(Parser)]
#[command(
    name = "crewmesh",
    version,
    about = "crewmesh: a control plane for running LLM agents",
    long_about = "crewmesh: a control plane for running LLM agents.\n\n\
        Start here:  crewmesh up            (the whole mesh in one process, with a simulated model)\n\
        Then:        crewmesh chat \"hello\"  (a chat completion through the gateway)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run all six services and a simulated model upstream in one process, over mTLS on loopback.
    Up {
        /// Where the dev PKI, databases, admin key and state.json live.
        #[arg(long, default_value = ".crewmesh")]
        data_dir: PathBuf,
        /// Address of the gateway's HTTP API.
        #[arg(long, default_value = "127.0.0.1:8080")]
        gateway_addr: SocketAddr,
        #[arg(long, default_value = "crewmesh.local")]
        trust_domain: String,
        /// Log filter, e.g. info or debug.
        #[arg(long, default_value = "warn,crewmesh=info")]
        log_level: String,
        #[arg(long, value_enum, default_value = "pretty")]
        log_format: LogFormatArg,
        /// Threads of the data plane (gateway, router, simulated upstream). One keeps
        /// every hop of a model call on one CPU (lowest latency); more serve more
        /// requests per second. See docs/performance.md.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        data_plane_threads: u16,
        /// The longest the data plane keeps polling its sockets after its last work
        /// before its threads sleep (0: it sleeps at once). The window adapts: requests
        /// further apart than this cost no polling. Lower latency at a steady rate for a
        /// CPU. See docs/performance.md.
        #[arg(long, default_value = up::DEFAULT_DATA_PLANE_IDLE_POLL_ARG, value_parser = up::parse_idle_poll)]
        data_plane_idle_poll: std::time::Duration,
    },
    /// Run one service (distributed mode, e.g. one Kubernetes Deployment per service).
    Serve {
        /// gateway, router, agent-runtime, audit, config or metrics.
        service: Service,
        /// TOML config file; CREWMESH_<SECTION>__<FIELD> environment variables override it.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a service's config file and exit (0: valid, 64: invalid).
    CheckConfig {
        #[arg(long)]
        service: Service,
        #[arg(long)]
        config: PathBuf,
    },
    /// Print each service's identity, ports and per-RPC allow-list as JSON.
    MeshPolicy {
        #[arg(long, default_value = "crewmesh.local")]
        trust_domain: String,
    },
    /// Development certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Send one chat message through the gateway and print the answer.
    Chat {
        prompt: String,
        #[arg(long, default_value = "sim-small")]
        model: String,
        /// Gateway URL; defaults to the running `crewmesh up` (from DATA_DIR/state.json).
        #[arg(long)]
        gateway: Option<String>,
        /// API key; defaults to CREWMESH_API_KEY, then to the running `crewmesh up`'s admin key.
        #[arg(long, env = "CREWMESH_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        #[arg(long, default_value = ".crewmesh")]
        data_dir: PathBuf,
    },
    /// Create, list and revoke API keys through the gateway.
    Keys(keys_cli::KeysArgs),
    /// Verify, export and inspect the audit trail through the gateway.
    Audit(audit_cli::AuditArgs),
    /// Read and change config documents through the gateway (get, list, put, delete, apply, diff, history, rollback).
    Config(config_cli::ConfigArgs),
    /// List and evaluate feature flags through the gateway (list, eval).
    Flags(config_cli::FlagsArgs),
    /// Change the simulated upstream's fault settings while it runs (`sim faults set|get|clear`).
    Sim(sim_cli::SimArgs),
    /// Load tests; `bench gateway` measures the mesh overhead of a model call.
    Bench(bench::BenchArgs),
    /// Run only the simulated OpenAI-compatible upstream (deterministic, not a real model).
    SimulatedUpstream {
        #[arg(long, default_value = "127.0.0.1:8090")]
        addr: SocketAddr,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a CA, a certificate per service and one for the CLI.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "crewmesh.local")]
        trust_domain: String,
        /// Extra DNS names for every server certificate (repeatable).
        #[arg(long)]
        dns: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Json,
    Pretty,
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

fn env_pairs() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("CREWMESH_"))
        .collect()
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Up {
            data_dir,
            gateway_addr,
            trust_domain,
            log_level,
            log_format,
            data_plane_threads,
            data_plane_idle_poll,
        } => {
            let telemetry = TelemetryConfig {
                log_level,
                log_format: match log_format {
                    LogFormatArg::Json => LogFormat::Json,
                    LogFormatArg::Pretty => LogFormat::Pretty,
                },
                otlp_endpoint: std::env::var("CREWMESH_TELEMETRY__OTLP_ENDPOINT").ok(),
            };
            let _guard = match crewmesh_kit::telemetry::init("crewmesh", &telemetry) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG as u8);
                }
            };
            up_command(up::UpOptions {
                trust_domain,
                data_plane_threads: usize::from(data_plane_threads),
                data_plane_idle_poll,
                ..up::UpOptions::embedded(data_dir, gateway_addr)
            })
            .await
        }
        Command::Serve { service, config } => serve(service, config).await,
        Command::CheckConfig { service, config } => {
            match file_config::load(service, &config, &env_pairs()) {
                Ok(_) => {
                    println!(
                        "{}: valid config for the {service} service",
                        config.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    ExitCode::from(EXIT_BAD_CONFIG as u8)
                }
            }
        }
        Command::MeshPolicy { trust_domain } => {
            println!("{}", mesh_policy(&trust_domain));
            ExitCode::SUCCESS
        }
        Command::Certs {
            command:
                CertsCommand::Init {
                    dir,
                    trust_domain,
                    dns,
                },
        } => {
            let pki = crewmesh_kit::pki::DevPki::new(&dir);
            match pki.init(&trust_domain, &dns) {
                Ok(()) => {
                    println!(
                        "wrote a CA and certificates for {} and cli to {} (trust domain {trust_domain})",
                        Service::ALL.map(|s| s.name()).join(", "),
                        dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Chat {
            prompt,
            model,
            gateway,
            api_key,
            data_dir,
        } => match chat::run(&prompt, &model, gateway, api_key, &data_dir).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Keys(args) => match keys_cli::run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Config(args) => match config_cli::run_config(args).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Flags(args) => match config_cli::run_flags(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Audit(args) => match audit_cli::run(args).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Sim(args) => match sim_cli::run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Bench(args) => match bench::run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::SimulatedUpstream { addr } => {
            let sim = match crewmesh_simulated_upstream::SimulatedUpstream::bind(addr).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: cannot bind {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            println!(
                "simulated OpenAI-compatible upstream (not a real model) on {}",
                sim.base_url()
            );
            match sim
                .run_until_stopped(crewmesh_kit::server::shutdown_signal())
                .await
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn up_command(opts: up::UpOptions) -> ExitCode {
    let started = Instant::now();
    let data_dir = opts.data_dir.clone();
    let mut mesh = match up::start(opts).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let s = &mesh.state;
    println!(
        "crewmesh is up in {} ms: six services over mTLS on loopback, and a SIMULATED model upstream (no API key needed)\n",
        started.elapsed().as_millis()
    );
    println!("  gateway         {}", s.gateway_url);
    println!("  admin API key   {}", s.admin_api_key);
    println!(
        "  models          {} (simulated)",
        up::SIMULATED_MODELS.join(", ")
    );
    println!(
        "  state           {}",
        data_dir.join(state::FILE_NAME).display()
    );
    println!("\nTry it:\n");
    println!(
        "  curl -s {}/v1/chat/completions \\\n    -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"sim-small\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello, crewmesh!\"}}]}}'\n",
        s.gateway_url, s.admin_api_key
    );
    println!(
        "  curl -s {}/v1/usage -H 'Authorization: Bearer {}'",
        s.gateway_url, s.admin_api_key
    );
    println!(
        "  curl -s {}/v1/audit/events -H 'Authorization: Bearer {}'",
        s.gateway_url, s.admin_api_key
    );
    println!("\nPress Ctrl-C to stop.");
    let failure = tokio::select! {
        () = crewmesh_kit::server::shutdown_signal() => None,
        e = mesh.wait_for_failure() => Some(e),
    };
    if let Some(e) = failure {
        eprintln!("error: {e:#}");
        let _ = mesh.shutdown().await;
        return ExitCode::FAILURE;
    }
    eprintln!("stopping: draining in-flight requests");
    match mesh.shutdown().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(service: Service, path: PathBuf) -> ExitCode {
    let config = match file_config::load(service, &path, &env_pairs()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    let _guard = match crewmesh_kit::telemetry::init(
        &format!("crewmesh-{service}"),
        &config.common().telemetry,
    ) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    let metrics = MetricsRegistry::new();
    let shutdown = crewmesh_kit::server::shutdown_signal();
    let result: anyhow::Result<()> = async {
        use file_config::ServiceConfig as S;
        match config {
            S::Gateway(c) => {
                let app = crewmesh_gateway::Application::build(c, metrics).await?;
                tracing::info!(http = %app.http_addr(), admin = %app.admin_addr(), "gateway listening");
                app.run_until_stopped(shutdown).await?;
            }
            S::Router(c) => {
                let app = crewmesh_router::Application::build(c, metrics).await?;
                tracing::info!(grpc = %app.grpc_addr(), admin = %app.admin_addr(), "router listening");
                app.run_until_stopped(shutdown).await?;
            }
            S::AgentRuntime(c) => {
                let app = crewmesh_agent_runtime::Application::build(c, metrics).await?;
                tracing::info!(grpc = %app.grpc_addr(), admin = %app.admin_addr(), "agent runtime listening");
                app.run_until_stopped(shutdown).await?;
            }
            S::Audit(c) => {
                let app = crewmesh_audit::Application::build(c, metrics).await?;
                tracing::info!(grpc = %app.grpc_addr(), admin = %app.admin_addr(), "audit listening");
                app.run_until_stopped(shutdown).await?;
            }
            S::Config(c) => {
                let app = crewmesh_config::Application::build(c, metrics).await?;
                tracing::info!(grpc = %app.grpc_addr(), admin = %app.admin_addr(), "config listening");
                app.run_until_stopped(shutdown).await?;
            }
            S::Metrics(c) => {
                let app = crewmesh_metrics::Application::build(c, metrics).await?;
                tracing::info!(grpc = %app.grpc_addr(), admin = %app.admin_addr(), "metrics listening");
                app.run_until_stopped(shutdown).await?;
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "service failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The enforced mesh policy as JSON (deployment manifests are checked against it).
fn mesh_policy(trust_domain: &str) -> String {
    let mut services = serde_json::Map::new();
    for svc in Service::ALL {
        let rpcs: serde_json::Map<String, serde_json::Value> = svc
            .allow_list()
            .iter()
            .map(|(m, callers)| ((*m).to_owned(), serde_json::json!(callers)))
            .collect();
        let mut entry = serde_json::json!({
            "identity": format!("spiffe://{trust_domain}/{}", svc.name()),
            "admin_port": 9090,
            "rpcs": rpcs,
            "callers": svc.callers(),
            "principal_asserters": svc.principal_asserters(),
        });
        match svc.default_grpc_port() {
            Some(p) => entry["grpc_port"] = p.into(),
            None => entry["http_port"] = 8080.into(),
        }
        services.insert(svc.name().to_owned(), entry);
    }
    serde_json::to_string_pretty(&serde_json::json!({
        "trust_domain": trust_domain,
        "open_grpc_services": crewmesh_kit::mesh::OPEN_GRPC_SERVICES,
        "services": services,
    }))
    .unwrap_or_default()
}
