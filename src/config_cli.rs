//! `crewmesh config get|list|put|delete|apply|diff|history|rollback` and
//! `crewmesh flags list|eval`: config documents and flags through the gateway's
//! `/v1/config` and OFREP routes.
//!
//! `apply -f FILE_OR_DIR` reads documents the way `kubectl apply -f` does (JSON or
//! YAML, several per file with `---` or a list, a directory recursively in path
//! order; see [`crewmesh_config::manifest`]) and writes the ones that differ from the
//! live documents in one all-or-nothing transaction; `--dry-run` has the server check
//! everything (schemas, references, versions) and writes nothing. `diff -f` prints a
//! unified diff per document and exits 1 when anything differs, like `kubectl diff`.

use crate::gateway_client::{GatewayArgs, problem_error};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use crewmesh_config::manifest::{self, ManifestDoc, ManifestScope};
use serde_json::{Value, json};

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
    /// Create or replace one document from a file holding its spec (JSON, or YAML).
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
    /// Delete one document; refused while other documents reference it.
    Delete {
        kind: String,
        name: String,
        #[arg(long)]
        global: bool,
        /// Delete only if the current version is this one.
        #[arg(long)]
        if_match: Option<i64>,
    },
    /// Write the documents of a file or directory (JSON or YAML), all or nothing.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Show what would change and have the server check it; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show how the documents of a file or directory differ from the live ones;
    /// exit code 1 when they differ, 0 when not, 2 on an error.
    Diff {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
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
    /// List the flags the key's tenant sees: its own and the global ones.
    List,
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
        let t = args.target()?;
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

/// How a document from a file compares with the live one.
enum Change {
    Create,
    Update { version: i64, live: Value },
    Unchanged,
}

/// A document from a file and what applying it would do.
struct Planned {
    doc: ManifestDoc,
    change: Change,
}

fn doc_path(doc: &ManifestDoc) -> String {
    let scope = match doc.scope {
        ManifestScope::Global => "?scope=global",
        ManifestScope::Tenant => "",
    };
    format!("/v1/config/{}/{}{scope}", doc.kind, doc.name)
}

/// Reads the documents under `path` and compares each with the live one.
async fn plan(t: &Target, path: &Path) -> anyhow::Result<Vec<Planned>> {
    let docs = manifest::load(path)?;
    if docs.is_empty() {
        bail!("{}: no documents (JSON or YAML files)", path.display());
    }
    let mut out = Vec::with_capacity(docs.len());
    for doc in docs {
        let (status, current) = t
            .send(reqwest::Method::GET, &doc_path(&doc), None, None)
            .await?;
        let spec = Value::Object(doc.spec.clone());
        let change = match status {
            404 => Change::Create,
            200 if current["spec"] == spec => Change::Unchanged,
            200 => Change::Update {
                version: current["version"].as_i64().unwrap_or(0),
                live: current["spec"].clone(),
            },
            _ => {
                return Err(problem_error(status, &current))
                    .with_context(|| format!("cannot read {}", doc.label()));
            }
        };
        out.push(Planned { doc, change });
    }
    Ok(out)
}

fn pretty(v: &Value) -> String {
    // A JSON value always serialises.
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// `config apply`: writes what changed in one transaction (or, for a dry run, has
/// the server check it).
async fn apply(t: &Target, file: &Path, dry_run: bool) -> anyhow::Result<()> {
    let planned = plan(t, file).await?;
    let mut operations = Vec::new();
    for p in &planned {
        let (word, expected) = match &p.change {
            Change::Create => ("create", 0),
            Change::Update { version, .. } => ("update", *version),
            Change::Unchanged => ("unchanged", -1),
        };
        println!("{word:<9} {}", p.doc.label());
        if expected >= 0 {
            operations.push(json!({
                "op": "put",
                "kind": p.doc.kind.as_str(),
                "name": p.doc.name,
                "scope": p.doc.scope.as_str(),
                "spec": Value::Object(p.doc.spec.clone()),
                "expected_version": expected,
            }));
        }
    }
    if operations.is_empty() {
        println!("nothing to change");
        return Ok(());
    }
    let out = t
        .ok(
            reqwest::Method::POST,
            "/v1/config/apply",
            Some(&json!({"operations": operations, "dry_run": dry_run})),
            None,
        )
        .await?;
    if dry_run {
        println!(
            "dry run: {} documents checked by the server at revision {}; nothing written",
            operations.len(),
            out["revision"]
        );
    } else {
        println!(
            "applied {} documents at revision {}",
            operations.len(),
            out["revision"]
        );
    }
    Ok(())
}

/// `config diff`: a unified diff per document; exit code 1 when anything differs.
async fn diff(t: &Target, file: &Path) -> anyhow::Result<ExitCode> {
    let planned = plan(t, file).await?;
    let mut differs = false;
    for p in &planned {
        let label = p.doc.label();
        let spec = pretty(&Value::Object(p.doc.spec.clone()));
        match &p.change {
            Change::Unchanged => println!("unchanged {label}"),
            Change::Create => {
                differs = true;
                println!("create    {label}");
                print!(
                    "{}",
                    manifest::unified_diff(
                        "",
                        &spec,
                        "/dev/null",
                        &format!("{label} ({})", p.doc.source),
                        3
                    )
                );
            }
            Change::Update { version, live } => {
                differs = true;
                println!("update    {label}");
                print!(
                    "{}",
                    manifest::unified_diff(
                        &pretty(live),
                        &spec,
                        &format!("{label} (live, version {version})"),
                        &format!("{label} ({})", p.doc.source),
                        3
                    )
                );
            }
        }
    }
    Ok(if differs {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs a `config` command; its exit code is 0 on success, except for `diff`
/// (0: no differences, 1: differences, 2: an error, which it prints itself).
pub async fn run_config(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    use reqwest::Method;
    if let ConfigCommand::Diff { file } = &args.command {
        let done = match Target::new(&args.gateway) {
            Ok(t) => diff(&t, file).await,
            Err(e) => Err(e),
        };
        return Ok(done.unwrap_or_else(|e| {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }));
    }
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
            let spec = manifest::read_value(&file)?;
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
        ConfigCommand::Delete {
            kind,
            name,
            global,
            if_match,
        } => {
            check_segment("kind", &kind)?;
            check_segment("name", &name)?;
            let out = t
                .ok(
                    Method::DELETE,
                    &format!("/v1/config/{kind}/{name}{}", scope(global)),
                    None,
                    if_match,
                )
                .await?;
            println!("{kind}/{name} deleted at revision {}", out["revision"]);
        }
        ConfigCommand::Apply { file, dry_run } => apply(&t, &file, dry_run).await?,
        ConfigCommand::Diff { .. } => {}
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
    Ok(ExitCode::SUCCESS)
}

pub async fn run_flags(args: FlagsArgs) -> anyhow::Result<()> {
    use reqwest::Method;
    let t = Target::new(&args.gateway)?;
    let (key, targeting_key, attrs) = match args.command {
        FlagsCommand::List => return list_flags(&t).await,
        FlagsCommand::Eval {
            key,
            targeting_key,
            attrs,
        } => (key, targeting_key, attrs),
    };
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

/// Every flag document of one scope (all pages).
async fn flag_documents(t: &Target, global: bool) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let mut path = format!(
            "/v1/config/flag?scope={}",
            if global { "global" } else { "tenant" }
        );
        if !token.is_empty() {
            path.push_str(&format!("&page_token={token}"));
        }
        let page = t.ok(reqwest::Method::GET, &path, None, None).await?;
        out.extend(page["data"].as_array().cloned().unwrap_or_default());
        match page["next_page_token"].as_str() {
            Some(next) if !next.is_empty() => token = next.to_owned(),
            _ => break,
        }
    }
    Ok(out)
}

/// `flags list`: the tenant's flags and the global ones it does not override.
async fn list_flags(t: &Target) -> anyhow::Result<()> {
    let tenant = flag_documents(t, false).await?;
    let global = flag_documents(t, true).await?;
    let mut rows: Vec<(String, &str, &Value)> = Vec::new();
    for d in &tenant {
        rows.push((
            d["name"].as_str().unwrap_or_default().to_owned(),
            "tenant",
            d,
        ));
    }
    for d in &global {
        let name = d["name"].as_str().unwrap_or_default().to_owned();
        let scope = if rows.iter().any(|(n, s, _)| *n == name && *s == "tenant") {
            "global (overridden)"
        } else {
            "global"
        };
        rows.push((name, scope, d));
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(b.1)));
    println!(
        "{:<32} {:<20} {:<8} {:<12} {:<8} TARGETING",
        "NAME", "SCOPE", "VERSION", "DEFAULT", "ENABLED"
    );
    for (name, scope, d) in rows {
        let spec = &d["spec"];
        let mut targeting = Vec::new();
        if let Some(rules) = spec["rules"].as_array().filter(|r| !r.is_empty()) {
            targeting.push(format!("{} rules", rules.len()));
        }
        if let Some(rollout) = spec["rollout"].as_array().filter(|r| !r.is_empty()) {
            let split: Vec<String> = rollout
                .iter()
                .map(|r| format!("{} {}%", r["variant"].as_str().unwrap_or("?"), r["weight"]))
                .collect();
            targeting.push(format!("rollout {}", split.join(" / ")));
        }
        println!(
            "{:<32} {:<20} {:<8} {:<12} {:<8} {}",
            name,
            scope,
            d["version"],
            spec["default_variant"].as_str().unwrap_or_default(),
            spec["enabled"].as_bool().unwrap_or(true),
            if targeting.is_empty() {
                "-".to_owned()
            } else {
                targeting.join(", ")
            }
        );
    }
    Ok(())
}
