//! A pool whose worker runs several jobs at once (`skep-pool --batch 4`): the queen sees four
//! slots served by one worker process, four jobs stream together on it, and cancelling one of
//! them leaves the other three whole.

use std::sync::{Arc, Mutex};

use skep_integration::{Cluster, PoolOpts, Submission, wait_until};

/// One pool of one worker running 4 jobs at once, paced at `tps` tokens per second per job.
fn batched(tps: f64) -> Cluster {
    let cluster = Cluster::start(PoolOpts {
        batch: 4,
        tps,
        ..PoolOpts::default()
    });
    wait_until("the worker process", || cluster.worker_pids(0).len() == 1);
    cluster
}

/// What happened to each job, in the order this process read it from the four streams.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Seen {
    FirstToken(usize),
    Ended(usize),
}

/// Reads job `i`'s stream on a thread of its own: its first token and its end go into `log`
/// as they are read.
fn follow(
    i: usize,
    mut job: Submission,
    log: &Arc<Mutex<Vec<Seen>>>,
) -> std::thread::JoinHandle<(Option<i32>, Vec<serde_json::Value>)> {
    let log = Arc::clone(log);
    std::thread::spawn(move || {
        job.wait_for("token");
        log.lock().unwrap().push(Seen::FirstToken(i));
        let ended = job.finish();
        log.lock().unwrap().push(Seen::Ended(i));
        ended
    })
}

#[test]
fn a_pool_with_batch_four_registers_four_slots_on_one_worker_process() {
    let cluster = batched(500.0);
    let out = cluster
        .cli()
        .args(["nodes", "list", "--json"])
        .output()
        .unwrap();
    skep_integration::assert_success(&out);
    let nodes = skep_integration::events(&out);
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["slots"], 4, "workers × batch slots: {nodes:?}");
    let pids = cluster.worker_pids(0);
    assert_eq!(pids.len(), 1, "one worker process serves the four slots");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    assert!(
        args.windows(2).any(|w| w == [&b"--batch"[..], b"4"]),
        "the worker runs four jobs at once"
    );
}

#[test]
fn four_jobs_stream_together_on_one_worker() {
    // 40 tokens at 20 tokens/s: about 2 s per job, however many run beside it.
    let cluster = batched(20.0);
    let worker = cluster.worker_pids(0);
    let log = Arc::new(Mutex::new(Vec::new()));
    let jobs: Vec<_> = (0..4)
        .map(|i| {
            follow(
                i,
                cluster.spawn_submit("60s", 40, &format!("story {i}")),
                &log,
            )
        })
        .collect();
    for (i, j) in jobs.into_iter().enumerate() {
        let (code, seen) = j.join().unwrap();
        assert_eq!(code, Some(0), "job {i}: {seen:?}");
        let done = seen.last().unwrap();
        assert_eq!(done["event"], "done", "job {i}: {seen:?}");
        assert_eq!(done["tokens"], 40, "job {i}: {seen:?}");
        let tokens = seen.iter().filter(|e| e["event"] == "token").count();
        assert_eq!(tokens, 40, "job {i}");
    }
    // Together, not in turn: every job streamed its first token before any job ended.
    let log = log.lock().unwrap().clone();
    let first_end = log
        .iter()
        .position(|s| matches!(s, Seen::Ended(_)))
        .unwrap();
    let firsts = log[..first_end]
        .iter()
        .filter(|s| matches!(s, Seen::FirstToken(_)))
        .count();
    assert_eq!(firsts, 4, "{log:?}");
    assert_eq!(cluster.worker_pids(0), worker, "on the same worker process");
}

#[test]
fn cancelling_one_of_four_running_jobs_leaves_the_others_whole() {
    // 100 tokens at 20 tokens/s: about 5 s per job, so all are mid-stream at the cancel.
    let cluster = batched(20.0);
    let worker = cluster.worker_pids(0);
    let mut jobs: Vec<Submission> = (0..4)
        .map(|i| cluster.spawn_submit("60s", 100, &format!("tale {i}")))
        .collect();
    for j in &mut jobs {
        j.wait_for("token");
    }
    let cancelled = jobs.remove(1);
    let id = cancelled.job_id();
    let out = cluster
        .cli()
        .args(["jobs", "cancel", &id])
        .output()
        .unwrap();
    skep_integration::assert_success(&out);
    let (code, seen) = cancelled.finish();
    assert_eq!(code, Some(1), "a cancelled job is not a success: {seen:?}");
    assert_eq!(seen.last().unwrap()["code"], "Cancelled", "{seen:?}");
    wait_until("the job to be recorded as cancelled", || {
        cluster.job(&id)["state"] == "cancelled"
    });
    assert!(cluster.job(&id)["tokens"].as_u64().unwrap() < 100);
    for (i, j) in jobs.into_iter().enumerate() {
        let (code, seen) = j.finish();
        assert_eq!(code, Some(0), "job {i}: {seen:?}");
        let done = seen.last().unwrap();
        assert_eq!(done["event"], "done", "job {i}: {seen:?}");
        assert_eq!(done["tokens"], 100, "job {i}: {seen:?}");
    }
    assert_eq!(
        cluster.worker_pids(0),
        worker,
        "a cancel does not cost the worker"
    );
}
