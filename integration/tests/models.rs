//! Several models on one pool: loads on demand, the memory budget's LRU eviction, and admission
//! that counts the cold-load time — real queen, real pool, real synthetic workers.
//!
//! The synthetic engine stands in for a model here: `--synthetic-load` is how long its worker
//! takes to load, `--synthetic-weights-mib` the private memory it holds as weights, which the
//! pool measures like a real model's. No test asserts on elapsed time: loads are counted in the
//! pool's audit log and refusals are checked by their status and by what reached the pool.

use std::process::Stdio;

use skep_integration::{Cluster, PoolOpts, audit_text, events, runtime, wait_until};
use skep_proto::v1::ListNodesRequest;
use skep_proto::v1::nodes_client::NodesClient;

/// A pool serving `alpha` and `beta` with one worker slot.
fn two_models(budget: &str, load: &str, extra: &[&str]) -> PoolOpts {
    let mut extra_args: Vec<String> = [
        "--memory-budget",
        budget,
        "--synthetic-load",
        load,
        "--synthetic-weights-mib",
        "64",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    extra_args.extend(extra.iter().map(|s| s.to_string()));
    PoolOpts {
        models: vec!["alpha".into(), "beta".into()],
        tps: 50.0,
        extra_args,
        ..PoolOpts::default()
    }
}

/// The pool's audit entries of `event` naming `model`.
fn audited(cluster: &Cluster, event: &str, model: &str) -> usize {
    audit_text(&cluster.pools[0].dir.join("audit"))
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == event && e["fields"]["model"] == model)
        .count()
}

/// Jobs that reached the pool ("execute" lines in its log).
fn executes(cluster: &Cluster) -> usize {
    let log = std::fs::read_to_string(cluster.dir.join("pool0.log")).unwrap_or_default();
    log.lines().filter(|l| l.contains("execute")).count()
}

/// Models the queen lists as warm on some node (from the pools' reports).
fn warm(cluster: &Cluster) -> Vec<String> {
    runtime().block_on(async {
        let mut c = NodesClient::new(cluster.channel().await.expect("channel"));
        let nodes = c
            .list(cluster.authed(ListNodesRequest {}))
            .await
            .expect("list nodes")
            .into_inner()
            .nodes;
        nodes
            .iter()
            .flat_map(|n| n.model_states.iter())
            .filter(|m| m.warm)
            .map(|m| m.model.clone())
            .collect()
    })
}

fn warm_somewhere(cluster: &Cluster, model: &str) -> bool {
    warm(cluster).iter().any(|m| m == model)
}

fn done_tokens(evs: &[serde_json::Value]) -> Option<u64> {
    evs.iter()
        .find(|e| e["event"] == "done")
        .and_then(|e| e["tokens"].as_u64())
}

#[test]
fn alternating_jobs_for_two_models_all_finish_with_one_load_per_model() {
    // No budget limit: both models stay warm once loaded.
    let cluster = Cluster::start(two_models("0", "300ms", &[]));
    for round in 0..3 {
        for model in ["alpha", "beta"] {
            let out = cluster.submit(model, "30s", 5, &format!("round {round} for {model}"));
            let evs = events(&out);
            assert_eq!(out.status.code(), Some(0), "{model}: {evs:?}");
            assert_eq!(done_tokens(&evs), Some(5), "{model}: {evs:?}");
        }
    }
    for model in ["alpha", "beta"] {
        assert_eq!(
            audited(&cluster, "model.loaded", model),
            1,
            "{model} must be loaded once (at start) and then stay warm"
        );
        assert_eq!(audited(&cluster, "model.evicted", model), 0);
    }
    assert!(warm_somewhere(&cluster, "alpha") && warm_somewhere(&cluster, "beta"));
}

#[test]
fn with_room_for_one_model_the_idle_one_is_evicted_and_never_a_busy_one() {
    // 64 MiB of weights per model: a 100 MiB budget holds one of them at a time. The pool
    // measures both at start, last named first, so `alpha` ends warm and `beta` cold.
    let cluster = Cluster::start(two_models("100M", "300ms", &[]));
    wait_until("alpha warm", || warm_somewhere(&cluster, "alpha"));
    assert!(!warm_somewhere(&cluster, "beta"));
    let evicted_at_start = audited(&cluster, "model.evicted", "beta");

    // A long alpha job holds the only warm model busy (150 tokens at 50/s: 3 s).
    let long = cluster
        .cli()
        .args(["submit", "--json", "--model", "alpha", "--deadline", "60s"])
        .args(["--max-tokens", "150", "long alpha job"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn skep submit");
    wait_until("the alpha job runs", || executes(&cluster) >= 1);

    // beta needs alpha's room: it must wait until alpha is idle, not unload it mid-job.
    let beta = cluster.submit("beta", "60s", 5, "beta after alpha");
    let beta_evs = events(&beta);
    let long = long.wait_with_output().expect("alpha job");
    let long_evs = events(&long);
    assert_eq!(long.status.code(), Some(0), "{long_evs:?}");
    assert_eq!(
        done_tokens(&long_evs),
        Some(150),
        "the busy model must never be unloaded under its job: {long_evs:?}"
    );
    assert_eq!(beta.status.code(), Some(0), "{beta_evs:?}");
    assert_eq!(done_tokens(&beta_evs), Some(5), "{beta_evs:?}");
    assert_eq!(
        audited(&cluster, "model.evicted", "alpha"),
        1,
        "alpha, idle once its job ended, is the one unloaded for beta"
    );
    assert_eq!(audited(&cluster, "model.evicted", "beta"), evicted_at_start);
    wait_until("beta warm", || warm_somewhere(&cluster, "beta"));
    assert!(!warm_somewhere(&cluster, "alpha"));
}

#[test]
fn a_deadline_that_cannot_cover_a_cold_load_is_refused_before_any_load_and_one_that_can_waits() {
    // beta is cold (no room for both) and takes 3 s to load.
    let cluster = Cluster::start(two_models("100M", "3s", &[]));
    wait_until("alpha warm", || warm_somewhere(&cluster, "alpha"));
    let loads_before = audited(&cluster, "model.loaded", "beta");
    let executed_before = executes(&cluster);

    let out = cluster.submit("beta", "1s", 5, "too soon for a cold model");
    let evs = events(&out);
    assert_eq!(out.status.code(), Some(3), "DEADLINE_EXCEEDED: {evs:?}");
    assert!(
        evs.iter().all(|e| e["event"] != "accepted"),
        "refused at admission: {evs:?}"
    );
    assert_eq!(
        executes(&cluster),
        executed_before,
        "the refused job must not reach the pool"
    );
    assert_eq!(
        audited(&cluster, "model.loaded", "beta"),
        loads_before,
        "no load may start for a refused job"
    );
    assert!(!warm_somewhere(&cluster, "beta"));

    // With room for the load, the job waits for it and finishes.
    let out = cluster.submit("beta", "30s", 5, "cold model, patient caller");
    let evs = events(&out);
    assert_eq!(out.status.code(), Some(0), "{evs:?}");
    assert_eq!(done_tokens(&evs), Some(5), "{evs:?}");
    assert_eq!(audited(&cluster, "model.loaded", "beta"), loads_before + 1);
}
