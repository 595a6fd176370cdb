//! `crewmesh keys create|list|revoke`: API keys through the gateway's `/v1/keys`.

use crate::gateway_client::{GatewayArgs, problem_error};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// Act on another tenant's keys (needs an admin of tenant `default`).
    #[arg(long, global = true)]
    pub tenant: Option<String>,
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it (it is shown only this once).
    Create {
        /// A role of the key (repeatable): admin, operator, developer, auditor or viewer.
        #[arg(long = "role", default_value = "developer")]
        roles: Vec<String>,
        #[arg(long)]
        description: Option<String>,
        /// Days until the key expires; without it the key does not expire.
        #[arg(long)]
        expires_in_days: Option<u32>,
        /// Requests per minute allowed to this key.
        #[arg(long)]
        rpm: Option<u64>,
        /// Tokens per minute allowed to this key.
        #[arg(long)]
        tpm: Option<u64>,
        /// Spend allowed to this key per calendar month (UTC), in US dollars.
        #[arg(long = "budget-usd")]
        budget_usd: Option<f64>,
        /// Print the whole answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the keys (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id; it stops working at once.
    Revoke { id: String },
}

async fn answer(resp: reqwest::Response) -> anyhow::Result<serde_json::Value> {
    let status = resp.status();
    let json: serde_json::Value = resp
        .json()
        .await
        .context("the gateway's answer is not JSON")?;
    if !status.is_success() {
        return Err(problem_error(status, &json));
    }
    Ok(json)
}

pub async fn run(args: KeysArgs) -> anyhow::Result<()> {
    let t = args.gateway.target()?;
    let http = reqwest::Client::new();
    let tenant_query = match args.tenant.as_deref() {
        Some(t)
            if t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            format!("?tenant={t}")
        }
        Some(t) => bail!("`{t}` is not a tenant id (use a-z, 0-9, '-' or '_')"),
        None => String::new(),
    };
    let unreachable = || format!("cannot reach the gateway at {}", t.url);
    match args.command {
        KeysCommand::Create {
            roles,
            description,
            expires_in_days,
            rpm,
            tpm,
            budget_usd,
            json,
        } => {
            let body = serde_json::json!({
                "roles": roles,
                "description": description,
                "expires_in_days": expires_in_days,
                "rpm": rpm,
                "tpm": tpm,
                "budget_usd_month": budget_usd,
                "tenant": args.tenant,
            });
            let resp = http
                .post(format!("{}/v1/keys", t.url))
                .bearer_auth(&t.key)
                .json(&body)
                .send()
                .await
                .with_context(unreachable)?;
            let out = answer(resp).await?;
            if json {
                println!("{out:#}");
            } else {
                println!("{}", out["key"].as_str().unwrap_or_default());
                eprintln!(
                    "created key {} in tenant {} with roles {} (store it now: it is not shown again)",
                    out["id"].as_str().unwrap_or_default(),
                    out["tenant"].as_str().unwrap_or_default(),
                    out["roles"]
                );
            }
        }
        KeysCommand::List { json } => {
            let resp = http
                .get(format!("{}/v1/keys{tenant_query}", t.url))
                .bearer_auth(&t.key)
                .send()
                .await
                .with_context(unreachable)?;
            let out = answer(resp).await?;
            if json {
                println!("{out:#}");
            } else {
                println!(
                    "{:<22} {:<12} {:<28} {:<22} DESCRIPTION",
                    "ID", "TENANT", "ROLES", "EXPIRES"
                );
                for k in out["data"].as_array().into_iter().flatten() {
                    let roles = k["roles"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(",");
                    let expires = match (k["expires_at"].as_str(), k["expired"].as_bool()) {
                        (Some(t), Some(true)) => format!("{t} (expired)"),
                        (Some(t), _) => t.to_owned(),
                        (None, _) => "never".to_owned(),
                    };
                    println!(
                        "{:<22} {:<12} {:<28} {:<22} {}",
                        k["id"].as_str().unwrap_or_default(),
                        k["tenant"].as_str().unwrap_or_default(),
                        roles,
                        expires,
                        k["description"].as_str().unwrap_or_default()
                    );
                }
            }
        }
        KeysCommand::Revoke { id } => {
            let resp = http
                .delete(format!("{}/v1/keys/{id}{tenant_query}", t.url))
                .bearer_auth(&t.key)
                .send()
                .await
                .with_context(unreachable)?;
            let out = answer(resp).await?;
            println!(
                "revoked key {} in tenant {}",
                out["id"].as_str().unwrap_or_default(),
                out["tenant"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}
