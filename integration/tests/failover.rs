//! Failover never splices two pools' output: a job whose pool dies mid-stream is re-run on
//! another pool, whose tokens reach the client only once they reproduce (ids and text) what the
//! client already has; otherwise the client is told `restarted` and gets the new pool's output
//! from index 0.

use skep_integration::{Cluster, PoolOpts};
use skep_worker::engine::SyntheticEngine;

const PROMPT: &str = "a story told twice";
const TOKENS: u32 = 30;

/// Runs a job on a slow pool (4 tokens/s: the job outlasts the second pool's start by seconds),
/// lets the client receive a few tokens, adds a second pool whose
/// synthetic engine uses `seed_b`, kills the first pool, and returns the job's events.
fn fail_over_to_seed(seed_b: u64) -> (Cluster, Vec<serde_json::Value>) {
    let mut cluster = Cluster::start(PoolOpts {
        tps: 4.0,
        ..PoolOpts::default()
    });
    let mut job = cluster.spawn_submit("120s", TOKENS, PROMPT);
    for _ in 0..3 {
        job.wait_for("token");
    }
    cluster.add_pool(PoolOpts {
        tps: 200.0,
        extra_args: vec!["--synthetic-seed".into(), seed_b.to_string()],
        ..PoolOpts::default()
    });
    cluster.wait_for_nodes(2);
    cluster.kill_pool(0);
    let (code, events) = job.finish();
    assert_eq!(
        code,
        Some(0),
        "the job must finish on the second pool: {events:?}"
    );
    (cluster, events)
}

fn texts(seed: u64) -> Vec<String> {
    (0..TOKENS)
        .map(|i| SyntheticEngine::seeded(PROMPT, seed, i).1)
        .collect()
}

/// The token events after the last `restarted` (or all of them), as (index, text).
fn tokens_after_restart(events: &[serde_json::Value]) -> Vec<(u64, String)> {
    let from = events
        .iter()
        .rposition(|e| e["event"] == "restarted")
        .map_or(0, |i| i + 1);
    events[from..]
        .iter()
        .filter(|e| e["event"] == "token")
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_pool_that_reproduces_the_prefix_continues_the_stream_seamlessly() {
    let (cluster, events) = fail_over_to_seed(0);
    assert!(
        !events.iter().any(|e| e["event"] == "restarted"),
        "same output, no restart: {events:?}"
    );
    let attempts: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "dispatched")
        .map(|e| e["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, [1, 2], "{events:?}");
    // Every index exactly once, in order, and the text of one uninterrupted run.
    let got = tokens_after_restart(&events);
    let want: Vec<(u64, String)> = (0u64..).zip(texts(0)).collect();
    assert_eq!(got, want);
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["tokens"], TOKENS);
    let job = cluster.job(events[0]["job_id"].as_str().unwrap());
    assert_eq!(job["state"], "done");
    assert_eq!(job["tokens"], TOKENS);
}

#[test]
fn a_pool_whose_output_differs_restarts_the_stream_visibly() {
    // Seed 7 differs from seed 0 at the first token already, so whatever the client holds when
    // the first pool dies, the new pool cannot reproduce it.
    assert_ne!(texts(0)[0], texts(7)[0]);
    let (cluster, events) = fail_over_to_seed(7);
    let restarts: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "restarted")
        .collect();
    assert_eq!(restarts.len(), 1, "{events:?}");
    assert_eq!(restarts[0]["attempt"], 2);
    assert!(
        restarts[0]["reason"]
            .as_str()
            .unwrap()
            .contains("token 0 differs"),
        "{}",
        restarts[0]
    );
    // Before the notice: the first pool's text; after it: the second pool's whole output from
    // index 0, never a mix.
    let at = events
        .iter()
        .position(|e| e["event"] == "restarted")
        .unwrap();
    let before: Vec<String> = events[..at]
        .iter()
        .filter(|e| e["event"] == "token")
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect();
    assert!(before.len() >= 3);
    assert_eq!(before, texts(0)[..before.len()]);
    let got = tokens_after_restart(&events);
    let want: Vec<(u64, String)> = (0u64..).zip(texts(7)).collect();
    assert_eq!(got, want);
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["tokens"], TOKENS);
    let job = cluster.job(events[0]["job_id"].as_str().unwrap());
    assert_eq!(job["state"], "done");
    assert_eq!(job["tokens"], TOKENS);
}
