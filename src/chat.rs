//! `crewmesh chat`: one chat completion through the gateway.

use std::path::Path;

use anyhow::{Context, bail};

use crewmesh::state::{self, State};

pub async fn run(
    prompt: &str,
    model: &str,
    gateway: Option<String>,
    api_key: Option<String>,
    data_dir: &Path,
) -> anyhow::Result<()> {
    let state = State::read(data_dir).ok();
    let gateway = gateway
        .or_else(|| state.as_ref().map(|s| s.gateway_url.clone()))
        .with_context(|| {
            format!(
                "no gateway: start one with `crewmesh up` (which writes {}) or pass --gateway URL",
                data_dir.join(state::FILE_NAME).display()
            )
        })?;
    let key = api_key
        .or_else(|| state.as_ref().map(|s| s.admin_api_key.clone()))
        .context("no API key: pass --api-key or set CREWMESH_API_KEY")?;
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
    });
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/chat/completions",
            gateway.trim_end_matches('/')
        ))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach the gateway at {gateway}"))?;
    let status = resp.status();
    let simulated = resp.headers().contains_key("x-crewmesh-simulated");
    let json: serde_json::Value = resp
        .json()
        .await
        .context("the gateway's answer is not JSON")?;
    if !status.is_success() {
        let detail = json["detail"].as_str().unwrap_or("no detail");
        bail!(
            "{} ({status}): {detail}",
            json["title"].as_str().unwrap_or("request failed")
        );
    }
    let content = json
        .pointer("/choices/0/message/content")
        .and_then(|c| c.as_str())
        .unwrap_or("");
    println!("{content}");
    if simulated {
        eprintln!("(answered by the simulated upstream, not a real model)");
    }
    Ok(())
}
