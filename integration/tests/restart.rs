//! Queen restart: every accepted job reaches a terminal state; none is lost or runs on twice.

use skep_integration::{Cluster, PoolOpts, wait_until};

#[test]
fn sigkilled_queen_leaves_no_job_without_a_terminal_state() {
    // One slot at 10 tokens/s: one job runs while the other waits in the queue.
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
    let mut running = cluster.spawn_submit("60s", 200, "running at the crash");
    running.wait_for("token");
    let mut queued = cluster.spawn_submit("60s", 5, "queued at the crash");
    queued.wait_for("queued");
    let (running_id, queued_id) = (running.job_id(), queued.job_id());

    cluster.restart_queen();
    // The clients lost their streams with the queen: they fail, as unavailable or other.
    for s in [running, queued] {
        let (code, _) = s.finish();
        assert_ne!(code, Some(0));
    }
    for id in [&running_id, &queued_id] {
        let job = cluster.job(id);
        assert_eq!(job["state"], "failed", "{job}");
        assert!(
            job["error"].as_str().unwrap().contains("interrupted"),
            "{job}"
        );
    }
    assert_eq!(
        cluster.job(&done_id)["state"],
        "done",
        "finished jobs keep their state"
    );

    // The pool comes back, and its worker was freed: the interrupted job did not run on.
    cluster.wait_for_nodes(1);
    wait_until("a new job to run on the freed worker", || {
        cluster
            .submit("synthetic", "3s", 2, "after the restart")
            .status
            .code()
            == Some(0)
    });
}
