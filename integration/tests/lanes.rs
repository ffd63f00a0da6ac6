//! End-to-end lane failure tests: a worker killed mid-stream, and a lane overwritten mid-stream,
//! each fail the job cleanly while the pool manager keeps serving on a fresh worker generation.

use std::io::{BufRead, BufReader, Lines, Seek, SeekFrom, Write};
use std::process::{Child, ChildStdout, Stdio};

use skep_integration::{Cluster, PoolOpts, events, wait_until};

/// Starts a slow job and returns once its first token has arrived.
fn start_slow_job(cluster: &Cluster) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = cluster
        .cli()
        .args([
            "submit",
            "--json",
            "--model",
            "synthetic",
            "--deadline",
            "30s",
        ])
        .args(["--max-tokens", "200", "a long story"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains("\"token\"") {
            return (child, lines);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("stream ended before any token");
}

#[track_caller]
fn assert_failed_unavailable(mut child: Child, lines: Lines<BufReader<ChildStdout>>) {
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(6),
        "job must fail as unavailable: {rest:?}"
    );
    let last: serde_json::Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    assert_eq!(last["event"], "error");
}

#[track_caller]
fn assert_serves_on_new_worker(cluster: &Cluster, old: u32) {
    wait_until("a replacement worker", || {
        let pids = cluster.worker_pids(0);
        pids.len() == 1 && pids[0] != old
    });
    let out = cluster.submit("synthetic", "30s", 5, "next job");
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(events(&out).last().unwrap()["event"], "done");
    let log = std::fs::read_to_string(cluster.dir.join("pool0.log")).unwrap();
    assert!(
        log.contains("generation=2"),
        "the new worker must run on generation 2"
    );
}

#[test]
fn worker_sigkilled_mid_stream_fails_job_and_pool_restarts_it() {
    let cluster = Cluster::start(PoolOpts {
        tps: 10.0,
        ..PoolOpts::default()
    });
    wait_until("a worker process", || cluster.worker_pids(0).len() == 1);
    let old = cluster.worker_pids(0)[0];
    let (child, lines) = start_slow_job(&cluster);
    skep_integration::kill(old);
    assert_failed_unavailable(child, lines);
    assert_serves_on_new_worker(&cluster, old);
}

#[test]
fn overwritten_lane_header_fails_job_and_pool_restarts_worker() {
    let cluster = Cluster::start(PoolOpts {
        tps: 10.0,
        ..PoolOpts::default()
    });
    wait_until("a worker process", || cluster.worker_pids(0).len() == 1);
    let old = cluster.worker_pids(0)[0];
    let (child, lines) = start_slow_job(&cluster);
    // Scribble over the response lane's header (magic, sizes, indices) while tokens flow.
    let lane = cluster.pools[0].dir.join("lanes").join("slot-0.resp");
    let mut f = std::fs::OpenOptions::new().write(true).open(&lane).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let garbage: Vec<u8> = (0..192u32)
        .map(|i| (i.wrapping_mul(151) ^ 0xA5) as u8)
        .collect();
    f.write_all(&garbage).unwrap();
    f.sync_all().unwrap();
    assert_failed_unavailable(child, lines);
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
