//! Device selection (`--device cpu|cuda:N`): a pool asked for a GPU it cannot use refuses to
//! start with the worker's reason, never a panic; the worker's `--probe-device` answers with an
//! exit code the pool relies on. These run on the default build (no CUDA support), so the GPU
//! is refused as "not built".

use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use skep_integration::{Cluster, PoolOpts, bin};

/// A pool that refuses to start must have exited by then: the probe is one short process.
const REFUSAL: Duration = Duration::from_secs(15);

/// What the worker of a build without the `cuda` feature says (skep_cuda's `NotBuilt`).
const NOT_BUILT: &str = "this build of skep-worker has no CUDA support";

/// `skep_integration::run_bounded` with this file's refusal limit.
fn run_bounded(cmd: &mut Command, dir: &Path, name: &str) -> (Option<ExitStatus>, String) {
    skep_integration::run_bounded(cmd, dir, name, REFUSAL)
}

fn pool_command(cluster: &Cluster, pdir: &Path, device: &str) -> Command {
    let mut cmd = Command::new(bin("skep-pool"));
    cmd.args(["--data-dir", pdir.to_str().unwrap()])
        .args(["--queen", &cluster.queen_url])
        .args(["--token-file", cluster.token_file().to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--name", "gpu-pool"])
        .args(["--device", device]);
    cmd
}

fn probe(spec: &str) -> Output {
    Command::new(bin("skep-worker"))
        .args(["--probe-device", spec])
        .stdin(Stdio::null())
        .output()
        .expect("run skep-worker --probe-device")
}

#[test]
fn pool_on_an_unusable_gpu_refuses_to_start_naming_the_device_and_reason() {
    let cluster = Cluster::queen_only("device-refusal");
    let pdir = cluster.dir.join("pool-gpu");
    let started = Instant::now();
    let (status, stderr) = run_bounded(
        &mut pool_command(&cluster, &pdir, "cuda:0"),
        &cluster.dir,
        "pool-gpu",
    );
    let status = status.unwrap_or_else(|| {
        panic!("skep-pool --device cuda:0 kept running without a usable GPU; stderr:\n{stderr}")
    });
    // Exit 1 is main's error; a panic would be 101, a signal no code at all.
    assert_eq!(status.code(), Some(1), "{status}; stderr:\n{stderr}");
    assert!(started.elapsed() < REFUSAL);
    assert!(stderr.contains("cuda:0"), "names the device:\n{stderr}");
    assert!(
        stderr.contains(NOT_BUILT),
        "gives the worker's reason:\n{stderr}"
    );
    assert!(
        stderr.contains("--features skep-worker/cuda"),
        "says how to rebuild:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "no panic:\n{stderr}");
    // Refused before it served or enrolled anything.
    assert!(!pdir.join("listen.addr").exists());
    assert_eq!(cluster.healthy_nodes(), Ok(0));
    let out = cluster.cli().args(["nodes", "list"]).output().unwrap();
    skep_integration::assert_success(&out);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        !listed.contains("gpu-pool"),
        "the refused pool never enrolled:\n{listed}"
    );
}

#[test]
fn pool_on_the_cpu_passes_the_device_to_its_workers_and_serves() {
    let cluster = Cluster::start(PoolOpts {
        extra_args: vec!["--device".into(), "cpu".into()],
        ..PoolOpts::default()
    });
    let out = cluster.submit("synthetic", "10s", 3, "on the cpu");
    skep_integration::assert_success(&out);
    let pid = cluster.worker_pids(0)[0];
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("worker cmdline");
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    assert!(
        args.windows(2)
            .any(|w| w[0] == b"--device" && w[1] == b"cpu"),
        "the worker runs with --device cpu: {:?}",
        String::from_utf8_lossy(&cmdline)
    );
}

#[test]
fn worker_probe_refuses_a_gpu_without_cuda_support_with_exit_code_2() {
    let out = probe("cuda:0");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("device cuda:0"), "{stderr}");
    assert!(stderr.contains(NOT_BUILT), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout when refused");
    // "cuda" is the first GPU, and named so.
    let out = probe("cuda");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("device cuda:0"));
}

#[test]
fn worker_probe_of_the_cpu_needs_no_other_argument() {
    let out = probe("cpu");
    assert!(
        out.status.success(),
        "{}; stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "cpu\n");
}

#[test]
fn a_bogus_device_is_a_usage_error_naming_the_accepted_forms() {
    let dir = skep_integration::unique_dir("device-bogus");
    let cases: [(&str, Vec<&str>); 3] = [
        (
            "skep-pool",
            vec![
                "--data-dir",
                "x",
                "--queen",
                "http://127.0.0.1:1",
                "--token-file",
                "t",
                "--device",
                "bogus",
            ],
        ),
        (
            "skep-worker",
            vec![
                "--request-lane-fd",
                "3",
                "--response-lane-fd",
                "4",
                "--generation",
                "1",
                "--device",
                "bogus",
            ],
        ),
        ("skep-worker", vec!["--probe-device", "gpu:0"]),
    ];
    for (binary, args) in cases {
        let out = Command::new(bin(binary))
            .args(&args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // clap's usage errors exit 2.
        assert_eq!(out.status.code(), Some(2), "{binary} {args:?}: {stderr}");
        assert!(
            stderr.contains("invalid value"),
            "{binary} {args:?}: {stderr}"
        );
        for form in ["cpu", "cuda", "cuda:N"] {
            assert!(
                stderr.contains(form),
                "{binary} {args:?} names {form}: {stderr}"
            );
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "a usage error creates nothing"
    );
}
