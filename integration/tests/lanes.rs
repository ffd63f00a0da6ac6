//! End-to-end lane failure tests: a worker killed mid-stream, and a lane overwritten mid-stream,
//! each fail the job cleanly while the pool manager keeps serving on a fresh worker generation;
//! a lane truncated mid-stream is refused by its seals and the job goes on.
//!
//! Lanes are sealed memfds with no path: these tests reach one the way any process allowed to
//! inspect the worker could, through `/proc/<worker pid>/fd/<n>`, which opens the same memory.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};

use skep_integration::{Cluster, PoolOpts, Submission, events, wait_until};

/// A cluster whose single worker runs slowly (10 tokens/s), and that worker's pid.
fn slow_cluster() -> (Cluster, u32) {
    let cluster = Cluster::start(PoolOpts {
        tps: 10.0,
        ..PoolOpts::default()
    });
    wait_until("a worker process", || cluster.worker_pids(0).len() == 1);
    let pid = cluster.worker_pids(0)[0];
    (cluster, pid)
}

/// Starts a slow job and returns once its first token has arrived. 200 tokens at 10 tokens/s
/// is 20 s of work; the deadline leaves room for the queen's cautious estimate of a pool whose
/// figures are still warm-up figures (×1.5), so the job is admitted on a slow machine too.
fn start_slow_job(cluster: &Cluster) -> Submission {
    let mut job = cluster.spawn_submit("120s", 200, "a long story");
    job.wait_for("token");
    job
}

/// Opens worker `pid`'s lane named by `flag` (`--request-lane-fd` or `--response-lane-fd` on its
/// command line) through /proc, for writing.
#[track_caller]
fn open_lane(pid: u32, flag: &str) -> File {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let at = args
        .iter()
        .position(|a| *a == flag.as_bytes())
        .unwrap_or_else(|| panic!("worker {pid} has no {flag}"));
    let fd = std::str::from_utf8(args[at + 1]).unwrap();
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/fd/{fd}"))
        .unwrap()
}

#[track_caller]
fn assert_failed_unavailable(job: Submission) {
    let (code, seen) = job.finish();
    assert_eq!(code, Some(6), "job must fail as unavailable: {seen:?}");
    assert_eq!(seen.last().unwrap()["event"], "error");
}

#[track_caller]
fn assert_serves_on_new_worker(cluster: &Cluster, old: u32) {
    wait_until("a replacement worker", || {
        let pids = cluster.worker_pids(0);
        pids.len() == 1 && pids[0] != old
    });
    let out = cluster.submit("synthetic", "30s", 5, "next job");
    skep_integration::assert_success(&out);
    assert_eq!(events(&out).last().unwrap()["event"], "done");
    let log = std::fs::read_to_string(cluster.dir.join("pool0.log")).unwrap();
    assert!(
        log.contains("generation=2"),
        "the new worker must run on generation 2"
    );
}

#[test]
fn worker_sigkilled_mid_stream_fails_job_and_pool_restarts_it() {
    let (cluster, old) = slow_cluster();
    let job = start_slow_job(&cluster);
    skep_integration::kill(old);
    assert_failed_unavailable(job);
    assert_serves_on_new_worker(&cluster, old);
}

#[test]
fn overwritten_lane_header_fails_job_and_pool_restarts_worker() {
    let (cluster, old) = slow_cluster();
    let job = start_slow_job(&cluster);
    // Scribble over the response lane's header (magic, sizes, indices) while tokens flow.
    let mut f = open_lane(old, "--response-lane-fd");
    f.seek(SeekFrom::Start(0)).unwrap();
    let garbage: Vec<u8> = (0..192u32)
        .map(|i| (i.wrapping_mul(151) ^ 0xA5) as u8)
        .collect();
    f.write_all(&garbage).unwrap();
    f.sync_all().unwrap();
    assert_failed_unavailable(job);
    assert_serves_on_new_worker(&cluster, old);
    // The pool manager's own audit log records the corruption, and verifies.
    let audit_dir = cluster.pools[0].dir.join("audit");
    wait_until("a lane.corrupt audit entry", || {
        skep_integration::audit_text(&audit_dir).contains("lane.corrupt")
    });
    let out = std::process::Command::new(skep_integration::bin("skep"))
        .args(["audit", "verify", "--key-file"])
        .arg(cluster.pools[0].dir.join("audit.key"))
        .arg(&audit_dir)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A peer that truncates (or grows) the worker's lanes mid-stream: the seals refuse it, the
/// pool manager is not killed by SIGBUS, and the running job finishes on the same worker.
#[test]
fn truncating_a_lane_mid_stream_is_refused_and_the_job_finishes() {
    let (cluster, worker) = slow_cluster();
    // 20 tokens at 10 tokens/s: about 2 s of streaming to truncate under.
    let mut job = cluster.spawn_submit("120s", 20, "a short story");
    job.wait_for("token");
    for flag in ["--response-lane-fd", "--request-lane-fd"] {
        let lane = open_lane(worker, flag);
        let size = lane.metadata().unwrap().len();
        for to in [0, size / 2, size + 4096] {
            let err = lane
                .set_len(to)
                .expect_err("a sealed lane must not change size");
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::PermissionDenied,
                "{flag} to {to}"
            );
        }
        assert_eq!(lane.metadata().unwrap().len(), size);
    }
    let (code, seen) = job.finish();
    assert_eq!(code, Some(0), "the job must finish: {seen:?}");
    assert_eq!(seen.last().unwrap()["event"], "done");
    // Same worker, same generation: nothing was corrupted, nothing restarted.
    assert_eq!(cluster.worker_pids(0), [worker]);
    let out = cluster.submit("synthetic", "30s", 3, "next job");
    skep_integration::assert_success(&out);
    let audit = skep_integration::audit_text(&cluster.pools[0].dir.join("audit"));
    assert!(!audit.contains("lane.corrupt"), "{audit}");
}
