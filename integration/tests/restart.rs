//! Queen restart: every accepted job reaches a terminal state; none is lost or runs twice to
//! completion. Jobs the dead queen had queued or running are run again by the new one, within
//! their original deadlines.

use skep_integration::{Cluster, PoolOpts, audit_text, wait_until};

/// Polls `skep jobs get` until the job has a terminal state, and returns it.
#[track_caller]
fn terminal(cluster: &Cluster, id: &str) -> serde_json::Value {
    let mut job = serde_json::Value::Null;
    wait_until(&format!("job {id} to end"), || {
        job = cluster.job(id);
        !matches!(job["state"].as_str(), Some("queued" | "running"))
    });
    job
}

#[test]
fn sigkilled_queen_resumes_its_jobs_within_their_deadlines() {
    // One slot at 10 tokens/s: one job runs while the others wait in the queue.
    let mut cluster = Cluster::start(PoolOpts {
        tps: 10.0,
        ..PoolOpts::default()
    });
    let done = cluster.submit("synthetic", "10s", 2, "finished before the crash");
    assert_eq!(done.status.code(), Some(0));
    let done_id = skep_integration::events(&done)[0]["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut running = cluster.spawn_submit("60s", 20, "running at the crash");
    running.wait_for("token");
    let mut queued = cluster.spawn_submit("60s", 5, "queued at the crash");
    queued.wait_for("queued");
    // Its deadline passes while the queen is down: it must end as a deadline miss, not run.
    let mut doomed = cluster.spawn_submit("5s", 2, "expires while the queen is down");
    doomed.wait_for("queued");
    let ids = [running.job_id(), queued.job_id(), doomed.job_id()];

    cluster.kill_queen();
    // The clients lost their streams with the queen: they fail, and say how to follow the job.
    for s in [running, queued, doomed] {
        let id = s.job_id();
        let (code, _, stderr) = s.finish_with_stderr();
        assert_ne!(code, Some(0));
        assert!(
            stderr.contains(&format!("skep jobs get {id}")),
            "the client should point at the job: {stderr}"
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(5500));
    cluster.start_queen_again();

    let [running_id, queued_id, doomed_id] = &ids;
    for id in [running_id, queued_id] {
        let job = terminal(&cluster, id);
        assert_eq!(job["state"], "done", "{job}");
    }
    let doomed = terminal(&cluster, doomed_id);
    assert_eq!(doomed["state"], "deadline_exceeded", "{doomed}");
    assert_eq!(doomed["tokens"], 0, "{doomed}");
    assert_eq!(
        cluster.job(&done_id)["state"],
        "done",
        "finished jobs keep their state"
    );

    // Exactly one completion each, across both queen processes, and every resumption audited.
    let audit_dir = cluster.dir.join("queen").join("audit");
    let mut lines: Vec<serde_json::Value> = Vec::new();
    let count = |lines: &[serde_json::Value], event: &str, id: &str| {
        lines
            .iter()
            .filter(|e| e["event"] == event && e["fields"]["job_id"] == id)
            .count()
    };
    wait_until("the audit log to record the last completion", || {
        lines = audit_text(&audit_dir)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        count(&lines, "job.completed", queued_id) > 0
            && count(&lines, "job.deadline_exceeded", doomed_id) > 0
    });
    let count = |event: &str, id: &str| count(&lines, event, id);
    for id in [&done_id, running_id, queued_id] {
        assert_eq!(count("job.completed", id), 1, "job {id} completed once");
    }
    for id in &ids {
        assert_eq!(count("job.resumed", id), 1, "job {id} resumed once");
    }
    assert_eq!(count("job.completed", doomed_id), 0);

    // The pool is back and its worker free: new work runs.
    cluster.wait_for_nodes(1);
    let after = cluster.submit("synthetic", "5s", 2, "after the restart");
    assert_eq!(after.status.code(), Some(0));
}
