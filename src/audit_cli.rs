//! `crewmesh audit verify|export|checkpoints|report`: the audit trail through the gateway's
//! `/v1/audit/*` (the key needs the admin or auditor role).

use crate::gateway_client::{GatewayArgs, GatewayTarget, problem_error};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Recompute the hash chain and check the signed checkpoints; exit 1 when it does not hold.
    Verify {
        /// Start at this sequence (the link into it is checked against a checkpoint when one is there).
        #[arg(long, default_value_t = 0)]
        from_sequence: u64,
        /// Print the whole answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the tenant's events, oldest first, to stdout (or --output) as JSON Lines or CSV.
    Export {
        #[arg(long, value_parser = ["jsonl", "csv"], default_value = "jsonl")]
        format: String,
        /// Inclusive start, RFC 3339.
        #[arg(long)]
        from: Option<String>,
        /// Exclusive end, RFC 3339.
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        actor: Option<String>,
        #[arg(long)]
        action: Option<String>,
        /// success, denied or failure.
        #[arg(long)]
        outcome: Option<String>,
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// List the signed checkpoints and the public key that verifies them, as JSON.
    Checkpoints,
    /// A compliance report for a period: counts by action, actor and outcome, denied access, config changes, integrity.
    Report {
        #[arg(long, value_parser = ["markdown", "json"], default_value = "markdown")]
        format: String,
        /// Inclusive start, RFC 3339.
        #[arg(long)]
        from: Option<String>,
        /// Exclusive end, RFC 3339.
        #[arg(long)]
        to: Option<String>,
    },
}

impl GatewayTarget {
    async fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<reqwest::Response> {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.url), query)
            .with_context(|| format!("`{}` is not a URL", self.url))?;
        let resp = reqwest::Client::new()
            .get(url)
            .bearer_auth(&self.key)
            .send()
            .await
            .with_context(|| format!("cannot reach the gateway at {}", self.url))?;
        let status = resp.status();
        if !status.is_success() {
            let json: serde_json::Value = resp.json().await.unwrap_or_default();
            return Err(problem_error(status, &json));
        }
        Ok(resp)
    }
}

pub async fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let t = args.gateway.target()?;
    match args.command {
        AuditCommand::Verify {
            from_sequence,
            json,
        } => {
            let r: serde_json::Value = t
                .get(
                    "/v1/audit/verify",
                    &[("from_sequence", from_sequence.to_string())],
                )
                .await?
                .json()
                .await
                .context("the gateway's answer is not JSON")?;
            let ok = r["ok"].as_bool() == Some(true);
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else if ok {
                println!(
                    "ok: {} events and {} signed checkpoints verified; head {}",
                    r["events_verified"],
                    r["checkpoints_verified"],
                    r["head_hash"].as_str().unwrap_or_default()
                );
            } else {
                let b = &r["first_broken"];
                println!(
                    "BROKEN at sequence {} (event {}): {}",
                    b["sequence"],
                    b["event_id"]
                        .as_str()
                        .filter(|s| !s.is_empty())
                        .unwrap_or("-"),
                    b["reason"].as_str().unwrap_or_default()
                );
                println!(
                    "{} events and {} checkpoints verified before it",
                    r["events_verified"], r["checkpoints_verified"]
                );
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        AuditCommand::Export {
            format,
            from,
            to,
            actor,
            action,
            outcome,
            output,
        } => {
            let mut query = vec![("format", format)];
            for (name, value) in [
                ("from", from),
                ("to", to),
                ("actor", actor),
                ("action", action),
                ("outcome", outcome),
            ] {
                if let Some(v) = value {
                    query.push((name, v));
                }
            }
            let resp = t.get("/v1/audit/export", &query).await?;
            let mut out: Box<dyn std::io::Write> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let mut resp = resp;
            while let Some(chunk) = resp
                .chunk()
                .await
                .context("the export stream broke off; the output is incomplete")?
            {
                out.write_all(&chunk)?;
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Report { format, from, to } => {
            let mut query = vec![("format", format)];
            for (name, value) in [("from", from), ("to", to)] {
                if let Some(v) = value {
                    query.push((name, v));
                }
            }
            let text = t
                .get("/v1/audit/report", &query)
                .await?
                .text()
                .await
                .context("reading the report")?;
            println!("{}", text.trim_end());
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Checkpoints => {
            let r: serde_json::Value = t
                .get("/v1/audit/checkpoints", &[("page_size", "500".to_owned())])
                .await?
                .json()
                .await
                .context("the gateway's answer is not JSON")?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
