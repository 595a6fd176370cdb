//! `crewmesh chat`: one chat completion through the gateway.

use crate::gateway_client::{GatewayTarget, problem_error};
use std::path::Path;

use anyhow::Context;

pub async fn run(
    prompt: &str,
    model: &str,
    gateway: Option<String>,
    api_key: Option<String>,
    data_dir: &Path,
) -> anyhow::Result<()> {
    let GatewayTarget { url: gateway, key } = GatewayTarget::resolve(gateway, api_key, data_dir)?;
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
        return Err(problem_error(status, &json));
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
