//! Flag evaluation cost, in-process: a static flag, and a flag with targeting rules
//! (and/or/not, `in`, semver) and a percentage rollout. Run with
//! `cargo bench -p crewmesh-config --bench flags`; prints the median and p99 of the
//! per-evaluation time over batches.

use std::hint::black_box;
use std::time::Instant;

use crewmesh_kit::flags::{EvaluationContext, Flag};
use serde_json::json;

const BATCH: usize = 10_000;
const BATCHES: usize = 300;

fn measure(name: &str, flag: &Flag, contexts: &[EvaluationContext]) {
    let mut per_eval_ns = Vec::with_capacity(BATCHES);
    // Warm up.
    for c in contexts.iter().cycle().take(BATCH) {
        black_box(flag.evaluate_index(black_box(c)).ok());
    }
    for _ in 0..BATCHES {
        let start = Instant::now();
        for c in contexts.iter().cycle().take(BATCH) {
            black_box(flag.evaluate_index(black_box(c)).ok());
        }
        per_eval_ns.push(start.elapsed().as_nanos() as f64 / BATCH as f64);
    }
    per_eval_ns.sort_by(f64::total_cmp);
    let median = per_eval_ns[BATCHES / 2];
    let p99 = per_eval_ns[BATCHES * 99 / 100];
    println!("{name:<40} median {median:>7.1} ns/eval   p99 {p99:>7.1} ns/eval");
}

fn main() {
    let simple = Flag::parse(
        "simple",
        json!({"variants": {"on": true, "off": false}, "default_variant": "on"})
            .as_object()
            .unwrap(),
    )
    .unwrap();
    let targeted = Flag::parse(
        "checkout-v2",
        json!({
            "variants": {"a": "model-a", "b": "model-b", "c": "model-c"},
            "default_variant": "a",
            "rules": [
                {"when": {"attribute": "tenant", "op": "in", "value": ["acme", "globex", "initech"]}, "variant": "b"},
                {"when": {"all": [
                    {"attribute": "app_version", "op": "semver_gte", "value": "2.1.0"},
                    {"not": {"attribute": "email", "op": "ends_with", "value": "@test.example"}},
                    {"any": [{"attribute": "plan", "op": "equals", "value": "pro"},
                             {"attribute": "seats", "op": "gt", "value": 10}]}
                ]}, "rollout": [{"variant": "c", "weight": 20}, {"variant": "a", "weight": 80}]}
            ],
            "rollout": [{"variant": "b", "weight": 10}, {"variant": "a", "weight": 90}]
        })
        .as_object()
        .unwrap(),
    )
    .unwrap();
    let contexts: Vec<EvaluationContext> = (0..1024)
        .map(|i| EvaluationContext {
            targeting_key: Some(format!("user-{i}")),
            attributes: json!({
                "tenant": if i % 7 == 0 { "acme" } else { "umbrella" },
                "app_version": if i % 2 == 0 { "2.3.1" } else { "1.9.0" },
                "email": format!("user{i}@corp.example"),
                "plan": if i % 3 == 0 { "pro" } else { "free" },
                "seats": i % 20,
            })
            .as_object()
            .cloned()
            .unwrap(),
        })
        .collect();
    measure("static flag", &simple, &contexts);
    measure("targeting rules + rollout", &targeted, &contexts);
}
