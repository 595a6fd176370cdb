//! `crewmesh bench gateway` runs end to end (in-process mesh, with `crewmesh up`'s
//! defaults, the data plane's idle polling included) and prints a parseable JSON
//! report. Only counts are checked, never timings.

use std::process::Command;

use serde_json::Value;

#[test]
fn bench_gateway_prints_a_json_report() {
    let out = Command::new(env!("CARGO_BIN_EXE_crewmesh"))
        .args([
            "bench",
            "gateway",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "--rates",
            "50",
            "--json",
        ])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(report["upstream"], "simulated");
    assert_eq!(report["mesh"], "in-process");
    assert_eq!(report["data_plane_idle_poll_ms"], 2.0);
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    let names: Vec<&str> = scenarios
        .iter()
        .map(|s| s["scenario"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["1 client, sequential", "50 req/s, open loop"]);
    assert_eq!(scenarios[1]["rate_rps"], 50);
    for scenario in scenarios {
        for target in ["direct", "gateway"] {
            let stats = &scenario[target];
            assert!(stats["requests"].as_u64() > Some(0), "{scenario}");
            assert_eq!(stats["errors"], 0, "{scenario}");
            assert!(stats["p99_ms"].is_number(), "{scenario}");
        }
        assert!(scenario["overhead"]["p50_ms"].is_number(), "{scenario}");
    }
    // The steal time of the open-loop slices, where the kernel counts it; never in the
    // sequential scenario.
    if cfg!(target_os = "linux") {
        for target in ["direct", "gateway"] {
            assert!(scenarios[1][target]["steal_ms"].as_f64() >= Some(0.0));
            assert!(scenarios[0][target].get("steal_ms").is_none());
        }
    }
    // 50 req/s for 1 s per target: exactly 50 scheduled sends each.
    assert_eq!(scenarios[1]["direct"]["requests"], 50);
    assert_eq!(scenarios[1]["gateway"]["requests"], 50);
}
