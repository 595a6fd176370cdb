//! `crewmesh config get|list|put|apply|history|rollback` and `crewmesh flags eval`:
//! config documents and flags through the gateway's `/v1/config` and OFREP routes.
//!
//! `apply -f FILE_OR_DIR` takes JSON files, each one document
//! `{"kind": "model", "name": "gpt-4o", "scope": "global", "spec": {...}}` or an array
//! of them (a directory: every `*.json` in it), and writes them all in one transaction;
//! `--dry-run` prints what would change and writes nothing.

use crate::gateway_client::{GatewayTarget, problem_error};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// Where to reach the gateway, shared by `config` and `flags`.
#[derive(Args)]
pub struct GatewayArgs {
    /// Gateway URL; defaults to the running `crewmesh up` (from DATA_DIR/state.json).
    #[arg(long, global = true)]
    pub gateway: Option<String>,
    /// An API key; defaults to CREWMESH_API_KEY, then to the running `crewmesh up`'s admin key.
    #[arg(long, global = true, env = "CREWMESH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[arg(long, global = true, default_value = ".crewmesh")]
    pub data_dir: PathBuf,
}

#[derive(Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Print one document (spec, version, who changed it).
    Get {
        kind: String,
        name: String,
        /// A `_global` document instead of the key's tenant's.
        #[arg(long)]
        global: bool,
    },
    /// List the documents of a kind.
    List {
        kind: String,
        #[arg(long)]
        global: bool,
    },
    /// Create or replace one document from a JSON file holding its spec.
    Put {
        kind: String,
        name: String,
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(long)]
        global: bool,
        /// Write only if the current version is this one.
        #[arg(long)]
        if_match: Option<i64>,
    },
    /// Write a file or a directory of documents, all or nothing.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Show what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Earlier versions of a document, newest first.
    History {
        kind: String,
        name: String,
        #[arg(long)]
        global: bool,
    },
    /// Write an earlier version again as the newest version.
    Rollback {
        kind: String,
        name: String,
        #[arg(long = "to")]
        to_version: i64,
        #[arg(long)]
        global: bool,
    },
}

#[derive(Args)]
pub struct FlagsArgs {
    #[command(subcommand)]
    pub command: FlagsCommand,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Subcommand)]
pub enum FlagsCommand {
    /// Evaluate flags (every flag without a key) for a context, through OFREP.
    Eval {
        key: Option<String>,
        #[arg(long)]
        targeting_key: Option<String>,
        /// A context attribute, `name=value` (JSON values allowed; repeatable).
        #[arg(long = "attr")]
        attrs: Vec<String>,
    },
}

struct Target {
    http: reqwest::Client,
    gateway: String,
    key: String,
}

impl Target {
    fn new(args: &GatewayArgs) -> anyhow::Result<Self> {
        let t = GatewayTarget::resolve(args.gateway.clone(), args.api_key.clone(), &args.data_dir)?;
        Ok(Self {
            http: reqwest::Client::new(),
            gateway: t.url,
            key: t.key,
        })
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<i64>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.gateway))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(v) = if_match {
            req = req.header("if-match", v.to_string());
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the gateway at {}", self.gateway))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok((status, json))
    }

    async fn ok(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<i64>,
    ) -> anyhow::Result<Value> {
        let (status, json) = self.send(method, path, body, if_match).await?;
        if !(200..300).contains(&status) {
            return Err(problem_error(status, &json));
        }
        Ok(json)
    }
}

fn scope(global: bool) -> &'static str {
    if global { "?scope=global" } else { "" }
}

fn check_segment(what: &str, s: &str) -> anyhow::Result<()> {
    if s.is_empty()
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        bail!("`{s}` is not a valid {what}");
    }
    Ok(())
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// The documents of a file or of every `*.json` file of a directory, in name order.
fn documents(path: &Path) -> anyhow::Result<Vec<Value>> {
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("cannot read {}", path.display()))?
        {
            let p = entry?.path();
            if p.extension().is_some_and(|e| e == "json") {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    let mut docs = Vec::new();
    for f in files {
        match read_json(&f)? {
            Value::Array(items) => docs.extend(items),
            one => docs.push(one),
        }
    }
    for (i, d) in docs.iter().enumerate() {
        for field in ["kind", "name"] {
            if !d[field].is_string() {
                bail!("document {i}: `{field}` is required (a string)");
            }
        }
        if !d["spec"].is_object() {
            bail!("document {i}: `spec` is required (a JSON object)");
        }
    }
    Ok(docs)
}

pub async fn run_config(args: ConfigArgs) -> anyhow::Result<()> {
    use reqwest::Method;
    let t = Target::new(&args.gateway)?;
    match args.command {
        ConfigCommand::Get { kind, name, global } => {
            check_segment("kind", &kind)?;
            check_segment("name", &name)?;
            let doc = t
                .ok(
                    Method::GET,
                    &format!("/v1/config/{kind}/{name}{}", scope(global)),
                    None,
                    None,
                )
                .await?;
            println!("{doc:#}");
        }
        ConfigCommand::List { kind, global } => {
            check_segment("kind", &kind)?;
            let mut token = String::new();
            loop {
                let sep = if global { "&" } else { "?" };
                let page = if token.is_empty() {
                    String::new()
                } else {
                    format!("{sep}page_token={token}")
                };
                let out = t
                    .ok(
                        Method::GET,
                        &format!("/v1/config/{kind}{}{page}", scope(global)),
                        None,
                        None,
                    )
                    .await?;
                for d in out["data"].as_array().into_iter().flatten() {
                    println!(
                        "{:<10} {:<32} v{:<8} {}",
                        d["tenant"].as_str().unwrap_or_default(),
                        d["name"].as_str().unwrap_or_default(),
                        d["version"],
                        d["updated_by"].as_str().unwrap_or_default()
                    );
                }
                match out["next_page_token"].as_str() {
                    Some(next) if !next.is_empty() => token = next.to_owned(),
                    _ => break,
                }
            }
        }
        ConfigCommand::Put {
            kind,
            name,
            file,
            global,
            if_match,
        } => {
            check_segment("kind", &kind)?;
            check_segment("name", &name)?;
            let spec = read_json(&file)?;
            let doc = t
                .ok(
                    Method::PUT,
                    &format!("/v1/config/{kind}/{name}{}", scope(global)),
                    Some(&spec),
                    if_match,
                )
                .await?;
            println!("{kind}/{name} written at version {}", doc["version"]);
        }
        ConfigCommand::Apply { file, dry_run } => {
            let docs = documents(&file)?;
            let mut operations = Vec::with_capacity(docs.len());
            for d in &docs {
                let (kind, name) = (
                    d["kind"].as_str().unwrap_or_default(),
                    d["name"].as_str().unwrap_or_default(),
                );
                check_segment("kind", kind)?;
                check_segment("name", name)?;
                let global = d["scope"].as_str() == Some("global");
                let (status, current) = t
                    .send(
                        Method::GET,
                        &format!("/v1/config/{kind}/{name}{}", scope(global)),
                        None,
                        None,
                    )
                    .await?;
                let change = match status {
                    404 => "create",
                    200 if current["spec"] == d["spec"] => "unchanged",
                    200 => "update",
                    _ => bail!(
                        "cannot read {kind}/{name}: {}",
                        current["detail"].as_str().unwrap_or("request failed")
                    ),
                };
                println!(
                    "{change:<9} {kind}/{name}{}",
                    if global { " (global)" } else { "" }
                );
                if change == "update" && dry_run {
                    println!("  - {}", current["spec"]);
                    println!("  + {}", d["spec"]);
                }
                if change != "unchanged" {
                    operations.push(json!({
                        "op": "put", "kind": kind, "name": name,
                        "scope": if global { "global" } else { "tenant" },
                        "spec": d["spec"],
                        "expected_version": current["version"].as_i64().unwrap_or(0),
                    }));
                }
            }
            if dry_run {
                println!("dry run: nothing written");
            } else if operations.is_empty() {
                println!("nothing to change");
            } else {
                let out = t
                    .ok(
                        Method::POST,
                        "/v1/config/apply",
                        Some(&json!({"operations": operations})),
                        None,
                    )
                    .await?;
                println!(
                    "applied {} documents at revision {}",
                    operations.len(),
                    out["revision"]
                );
            }
        }
        ConfigCommand::History { kind, name, global } => {
            check_segment("kind", &kind)?;
            check_segment("name", &name)?;
            let out = t
                .ok(
                    Method::GET,
                    &format!("/v1/config/{kind}/{name}/history{}", scope(global)),
                    None,
                    None,
                )
                .await?;
            for d in out["data"].as_array().into_iter().flatten() {
                println!(
                    "v{:<8} {:<26} {:<24} {}",
                    d["version"],
                    d["updated_at"].as_str().unwrap_or_default(),
                    d["updated_by"].as_str().unwrap_or_default(),
                    d["spec"]
                );
            }
        }
        ConfigCommand::Rollback {
            kind,
            name,
            to_version,
            global,
        } => {
            check_segment("kind", &kind)?;
            check_segment("name", &name)?;
            let doc = t
                .ok(
                    Method::POST,
                    &format!("/v1/config/{kind}/{name}/rollback{}", scope(global)),
                    Some(&json!({"to_version": to_version})),
                    None,
                )
                .await?;
            println!(
                "{kind}/{name} rolled back to version {to_version}, written as version {}",
                doc["version"]
            );
        }
    }
    Ok(())
}

pub async fn run_flags(args: FlagsArgs) -> anyhow::Result<()> {
    use reqwest::Method;
    let t = Target::new(&args.gateway)?;
    let FlagsCommand::Eval {
        key,
        targeting_key,
        attrs,
    } = args.command;
    let mut context = serde_json::Map::new();
    if let Some(k) = targeting_key {
        context.insert("targetingKey".into(), Value::String(k));
    }
    for a in attrs {
        let Some((name, value)) = a.split_once('=') else {
            bail!("--attr {a}: use name=value");
        };
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        context.insert(name.to_owned(), value);
    }
    let body = json!({"context": context});
    match key {
        Some(key) => {
            check_segment("flag key", &key)?;
            let (status, out) = t
                .send(
                    Method::POST,
                    &format!("/ofrep/v1/evaluate/flags/{key}"),
                    Some(&body),
                    None,
                )
                .await?;
            println!("{out:#}");
            if status != 200 {
                bail!("evaluation failed ({status})");
            }
        }
        None => {
            let out = t
                .ok(Method::POST, "/ofrep/v1/evaluate/flags", Some(&body), None)
                .await?;
            println!("{out:#}");
        }
    }
    Ok(())
}
