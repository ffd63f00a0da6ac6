//! Daemon start-up guards: one daemon per data dir (a second would fork the audit chain), and no
//! plaintext listener off loopback unless the operator insists.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use skep_integration::{Cluster, PoolOpts, bin, wait_until};

/// How long a daemon that should refuse to start may take to exit.
const REFUSAL: Duration = Duration::from_secs(15);

/// `skep_integration::run_bounded` with this file's refusal limit.
fn run_bounded(cmd: &mut Command, dir: &Path, name: &str) -> (Option<ExitStatus>, String) {
    skep_integration::run_bounded(cmd, dir, name, REFUSAL)
}

#[track_caller]
fn assert_refused(status: Option<ExitStatus>, stderr: &str, what: &str) {
    match status {
        None => panic!("{what} kept running instead of refusing to start; stderr:\n{stderr}"),
        // Exit 1 is a start-up refusal (an error from main); a crash or a signal is not.
        Some(s) => assert_eq!(s.code(), Some(1), "{what}: {s}; stderr:\n{stderr}"),
    }
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("skep-it-daemons-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

#[test]
fn second_queen_on_a_data_dir_refuses_naming_the_holder() {
    let mut cluster = Cluster::queen_only("dup-queen");
    let qdir = cluster.dir.join("queen");
    let addr_before = std::fs::read_to_string(qdir.join("listen.addr")).unwrap();
    let audit_before = skep_integration::audit_text(&qdir.join("audit"));
    let first = cluster.queen.id();

    let (status, stderr) = run_bounded(
        Command::new(bin("skep-queen")).args([
            "--data-dir",
            qdir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ]),
        &cluster.dir,
        "queen-second",
    );
    assert_refused(status, &stderr, "a second skep-queen on the same data dir");
    assert!(
        stderr.contains(&format!("pid {first}")),
        "stderr names the holder's PID {first}:\n{stderr}"
    );
    assert!(
        stderr.contains(qdir.to_str().unwrap()),
        "stderr names the data dir:\n{stderr}"
    );
    // The lock file is private and holds the first queen's PID.
    let lock = qdir.join("lock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&lock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap().trim(),
        first.to_string()
    );

    // The first one is untouched and keeps serving.
    assert_eq!(
        std::fs::read_to_string(qdir.join("listen.addr")).unwrap(),
        addr_before
    );
    assert_eq!(
        skep_integration::audit_text(&qdir.join("audit")),
        audit_before
    );
    assert!(
        cluster.queen.try_wait().unwrap().is_none(),
        "first queen still runs"
    );
    assert_eq!(cluster.healthy_nodes(), Ok(0));
    let out = cluster.cli().args(["nodes", "list"]).output().unwrap();
    skep_integration::assert_success(&out);

    // The kernel drops the lock of a SIGKILLed queen: it starts again on the same dir at once.
    cluster.restart_queen();
    assert_eq!(cluster.healthy_nodes(), Ok(0));
}

#[test]
fn second_pool_on_a_data_dir_refuses_naming_the_holder() {
    let mut cluster = Cluster::start(PoolOpts::default());
    let pdir = cluster.pools[0].dir.clone();
    let first = cluster.pools[0].child.id();
    let addr_before = std::fs::read_to_string(pdir.join("listen.addr")).unwrap();

    let (status, stderr) = run_bounded(
        Command::new(bin("skep-pool")).args([
            "--data-dir",
            pdir.to_str().unwrap(),
            "--queen",
            &cluster.queen_url,
            "--token-file",
            cluster.token_file().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--name",
            "pool-dup",
        ]),
        &cluster.dir,
        "pool-second",
    );
    assert_refused(status, &stderr, "a second skep-pool on the same data dir");
    assert!(
        stderr.contains(&format!("pid {first}")),
        "stderr names the holder's PID {first}:\n{stderr}"
    );
    assert!(
        stderr.contains(pdir.to_str().unwrap()),
        "stderr names the data dir:\n{stderr}"
    );

    // The first pool is untouched and keeps serving jobs.
    assert_eq!(
        std::fs::read_to_string(pdir.join("listen.addr")).unwrap(),
        addr_before
    );
    assert_eq!(cluster.healthy_nodes(), Ok(1));
    let out = cluster.submit("synthetic", "10s", 2, "still served");
    skep_integration::assert_success(&out);

    // The kernel drops the lock of a SIGKILLed pool (its workers do not inherit it): it starts
    // again on the same dir at once.
    cluster.kill_pool(0);
    cluster.restart_pool(0);
    wait_until("the restarted pool to serve", || {
        let out = cluster.submit("synthetic", "10s", 2, "served after a restart");
        out.status.success()
    });
}

#[test]
fn plaintext_queen_off_loopback_needs_insecure_plaintext() {
    let dir = scratch("plain-queen");
    let qdir = dir.join("queen");
    let (status, stderr) = run_bounded(
        Command::new(bin("skep-queen")).args([
            "--data-dir",
            qdir.to_str().unwrap(),
            "--listen",
            "0.0.0.0:0",
            "--tls",
            "off",
        ]),
        &dir,
        "queen-refused",
    );
    assert_refused(status, &stderr, "skep-queen --listen 0.0.0.0:0 --tls off");
    assert!(
        stderr.contains("--insecure-plaintext"),
        "the refusal names the flag:\n{stderr}"
    );
    assert!(!qdir.exists(), "refused before creating anything");

    // With the flag it starts, and says loudly what that means.
    let log = dir.join("queen-insecure.log");
    let mut queen = Command::new(bin("skep-queen"))
        .args(["--data-dir", qdir.to_str().unwrap()])
        .args([
            "--listen",
            "0.0.0.0:0",
            "--tls",
            "off",
            "--insecure-plaintext",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut exited = None;
    wait_until("the insecure queen to listen", || {
        exited = queen.try_wait().unwrap();
        exited.is_some() || qdir.join("listen.addr").exists()
    });
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = queen.kill();
    let _ = queen.wait();
    assert!(
        exited.is_none(),
        "queen exited ({exited:?}) after {:?}:\n{stderr}",
        started.elapsed()
    );
    assert!(
        stderr.contains("WARN") && stderr.contains("in clear"),
        "a loud warning:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plaintext_pool_off_loopback_needs_insecure_plaintext() {
    let mut cluster = Cluster::queen_only("plain-pool");
    assert!(cluster.queen_url.starts_with("http://"));
    let pdir = cluster.dir.join("pool-open");
    let pool_args = |extra: &[&str]| {
        let mut c = Command::new(bin("skep-pool"));
        c.args(["--data-dir", pdir.to_str().unwrap()])
            .args(["--queen", &cluster.queen_url])
            .args(["--token-file", cluster.token_file().to_str().unwrap()])
            .args(["--listen", "0.0.0.0:0", "--name", "open-pool"])
            .args(extra);
        c
    };
    let (status, stderr) = run_bounded(&mut pool_args(&[]), &cluster.dir, "pool-refused");
    assert_refused(
        status,
        &stderr,
        "skep-pool --listen 0.0.0.0:0 with an http queen",
    );
    assert!(
        stderr.contains("--insecure-plaintext"),
        "the refusal names the flag:\n{stderr}"
    );
    assert!(!pdir.exists(), "refused before creating anything");

    // With the flag it starts (and joins the queen), warning loudly.
    let log = cluster.dir.join("pool-insecure.log");
    let mut pool = pool_args(&["--insecure-plaintext"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut exited = None;
    wait_until("the insecure pool to register", || {
        exited = pool.try_wait().unwrap();
        exited.is_some() || cluster.healthy_nodes() == Ok(1)
    });
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = pool.kill();
    let _ = pool.wait();
    assert!(exited.is_none(), "pool exited ({exited:?}):\n{stderr}");
    assert!(
        stderr.contains("WARN") && stderr.contains("in clear"),
        "a loud warning:\n{stderr}"
    );
    cluster.kill_queen();
}

/// Whether process `pid` still runs (a zombie waiting to be reaped does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let close = s.rfind(')')?;
            s[close + 1..].split_whitespace().next().map(|st| st != "Z")
        })
        .unwrap_or(false)
}

#[test]
fn a_pool_told_to_stop_stops_with_its_workers_while_the_queen_lives() {
    // The queen keeps its session stream to the pool open for as long as it lives; a graceful
    // stop that waited for every stream would never end.
    let mut cluster = Cluster::start(PoolOpts::default());
    skep_integration::assert_success(&cluster.submit("synthetic", "10s", 4, "before the stop"));
    let workers = cluster.worker_pids(0);
    assert!(!workers.is_empty(), "the pool has no worker");
    let pool = cluster.pools[0].child.id();
    let sent = Command::new("kill")
        .args(["-TERM", &pool.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let deadline = Instant::now() + REFUSAL;
    let status = loop {
        if let Some(s) = cluster.pools[0].child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the pool did not stop within {REFUSAL:?} of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status}");
    for w in workers {
        wait_until("the pool's workers to stop", || !running(w));
    }
    // The queen is still up and answers.
    assert!(running(cluster.queen.id()));
}
