//! Deadline-aware admission, EDF scheduling and cancellation, end to end.
//!
//! No test asserts on elapsed time. Where speed matters, the bound used is a hard one: a paced
//! synthetic worker cannot emit tokens faster than its pace, and a busy single slot cannot start
//! a second job whose deadline is shorter than the first job's remaining work.

use skep_integration::{Cluster, PoolOpts, events};

/// 20 tokens/s: 50ms per token.
fn slow() -> PoolOpts {
    PoolOpts {
        tps: 20.0,
        ..PoolOpts::default()
    }
}

fn error_message(evs: &[serde_json::Value]) -> String {
    evs.iter()
        .rev()
        .find(|e| e["event"] == "error")
        .and_then(|e| e["message"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn executes(cluster: &Cluster) -> usize {
    let log = std::fs::read_to_string(cluster.dir.join("pool0.log")).unwrap_or_default();
    log.lines().filter(|l| l.contains("execute")).count()
}

#[test]
fn infeasible_job_is_rejected_at_admission_without_reaching_a_pool() {
    let cluster = Cluster::start(slow());
    // One job teaches the queen this model's speed.
    let warm = cluster.submit("synthetic", "10s", 5, "warm up");
    assert_eq!(warm.status.code(), Some(0));
    assert_eq!(executes(&cluster), 1);
    // 200 tokens at 50ms each cannot fit in 2s.
    let out = cluster.submit("synthetic", "2s", 200, "too much");
    assert_eq!(out.status.code(), Some(3));
    let evs = events(&out);
    assert!(
        evs.iter().all(|e| e["event"] != "accepted"),
        "must be refused before acceptance"
    );
    assert!(
        error_message(&evs).contains("cannot finish in time"),
        "{evs:?}"
    );
    assert_eq!(
        executes(&cluster),
        1,
        "the refused job must not reach a pool"
    );
}

#[test]
fn a_fresh_cluster_refuses_an_infeasible_first_job_before_any_pool_sees_it() {
    // The default synthetic pace, 200 tokens/s, and no job run yet: the queen judges the first
    // job with the figures the pool measured at warm-up, never with an estimate of zero.
    let cluster = Cluster::start(PoolOpts {
        tps: 200.0,
        ..PoolOpts::default()
    });
    let out = cluster.submit("synthetic", "200ms", 8000, "cold start");
    assert_eq!(out.status.code(), Some(3), "{:?}", events(&out));
    let evs = events(&out);
    assert!(
        evs.iter().all(|e| e["event"] != "accepted"),
        "must be refused before acceptance: {evs:?}"
    );
    assert!(
        error_message(&evs).contains("cannot finish in time"),
        "{evs:?}"
    );
    assert_eq!(executes(&cluster), 0, "no pool may see the refused job");
    // The same pool runs a job that fits.
    skep_integration::assert_success(&cluster.submit("synthetic", "10s", 8, "fits"));
    assert_eq!(executes(&cluster), 1);
}

#[test]
fn late_job_stops_within_one_token_and_frees_the_worker() {
    // Admission by reservation would refuse this job outright; without it (`edf`), the job is
    // admitted and the pool and worker must stop it at its deadline.
    let cluster = Cluster::start_with(&["--admission", "edf"], slow());
    let out = cluster.submit("synthetic", "1s", 100, "late");
    assert_eq!(out.status.code(), Some(3));
    let evs = events(&out);
    let tokens = evs.iter().filter(|e| e["event"] == "token").count();
    // 1s at 50ms/token after a 5ms first token: at most 20 tokens can exist before the deadline.
    assert!(
        (1..=21).contains(&tokens),
        "{tokens} tokens for a 1s deadline at 20 tokens/s"
    );
    let id = evs[0]["job_id"].as_str().unwrap();
    let job = cluster.job(id);
    assert_eq!(job["state"], "deadline_exceeded");
    assert!(
        job["error"].as_str().unwrap().contains("exceeded by"),
        "{job}"
    );
    // Had the worker gone on with the remaining ~4s of tokens, this 3s job could not finish.
    let next = cluster.submit("synthetic", "3s", 2, "next");
    skep_integration::assert_success(&next);
}

#[test]
fn full_queue_is_rejected_with_exit_4_and_a_retry_hint() {
    // No credit at the pool: a job that waits, waits at the queen, where the queue is bounded.
    let cluster = Cluster::start_with(
        &["--max-queued", "1"],
        PoolOpts {
            tps: 10.0,
            extra_args: vec!["--credits-per-slot".into(), "0".into()],
            ..PoolOpts::default()
        },
    );
    let mut running = cluster.spawn_submit("60s", 100, "running");
    running.wait_for("token");
    let mut queued = cluster.spawn_submit("60s", 2, "queued");
    queued.wait_for("queued");
    let out = cluster
        .cli()
        .args([
            "submit",
            "--model",
            "synthetic",
            "--deadline",
            "60s",
            "--max-tokens",
            "2",
            "no room",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("queue is full") && stderr.contains("retry after"),
        "{stderr}"
    );
}

#[test]
fn waiting_jobs_run_earliest_deadline_first() {
    let cluster = Cluster::start(PoolOpts {
        tps: 10.0,
        ..PoolOpts::default()
    });
    let mut first = cluster.spawn_submit("60s", 15, "occupies the only slot");
    first.wait_for("token");
    // Submitted in the opposite order of their deadlines.
    let mut later = cluster.spawn_submit("50s", 2, "later deadline");
    later.wait_for("queued");
    let mut sooner = cluster.spawn_submit("40s", 2, "sooner deadline");
    sooner.wait_for("queued");
    let (later_id, sooner_id) = (later.job_id(), sooner.job_id());
    for s in [first, later, sooner] {
        assert_eq!(s.finish().0, Some(0));
    }
    let (l, s) = (cluster.job(&later_id), cluster.job(&sooner_id));
    assert!(
        s["finished_unix_ms"].as_u64() < l["finished_unix_ms"].as_u64(),
        "EDF: the sooner deadline must finish first: sooner={s} later={l}"
    );
}

#[test]
fn cancel_stops_the_job_and_frees_the_worker() {
    let cluster = Cluster::start(PoolOpts {
        tps: 10.0,
        ..PoolOpts::default()
    });
    let mut job = cluster.spawn_submit("60s", 200, "cancel me");
    job.wait_for("token");
    let id = job.job_id();
    let out = cluster
        .cli()
        .args(["jobs", "cancel", &id])
        .output()
        .unwrap();
    skep_integration::assert_success(&out);
    let (code, evs) = job.finish();
    assert_eq!(code, Some(1), "a cancelled job is not a success: {evs:?}");
    assert_eq!(evs.last().unwrap()["code"], "Cancelled");
    let rec = cluster.job(&id);
    assert_eq!(rec["state"], "cancelled");
    assert!(rec["tokens"].as_u64().unwrap() < 200);
    // 200 tokens at 10/s would hold the only slot for 20s; the next job needs it now.
    let next = cluster.submit("synthetic", "3s", 2, "next");
    skep_integration::assert_success(&next);
}

#[test]
fn client_disconnect_cancels_the_job_and_frees_the_worker() {
    let cluster = Cluster::start(PoolOpts {
        tps: 10.0,
        ..PoolOpts::default()
    });
    let mut job = cluster.spawn_submit("60s", 200, "walk away");
    job.wait_for("token");
    let id = job.job_id();
    job.child.kill().unwrap();
    let _ = job.child.wait();
    skep_integration::wait_until("the job to be recorded as cancelled", || {
        cluster.job(&id)["state"] == "cancelled"
    });
    let next = cluster.submit("synthetic", "3s", 2, "next");
    skep_integration::assert_success(&next);
}
