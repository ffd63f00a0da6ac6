//! Test harness: starts the real `skep-queen`, `skep-pool` (and through it `skep-worker`) binaries
//! on loopback in a private temporary directory, and drives them with the real `skep` CLI or a
//! gRPC client.
//!
//! Nothing is mocked: processes, sockets, lanes and the database are the production ones. Every
//! wait is bounded, and dropping a `Cluster` kills its processes and removes its directory.

pub mod load;
pub mod openloop;
pub mod report;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use skep_proto::v1::jobs_client::JobsClient;
use skep_proto::v1::nodes_client::NodesClient;
use skep_proto::v1::{ListNodesRequest, NodeState};
use tonic::transport::Channel;

/// Longest any harness wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// Directory holding the built binaries: `SKEP_BIN_DIR`, else the target dir of this test.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SKEP_BIN_DIR") {
        return PathBuf::from(d);
    }
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

#[track_caller]
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the binaries first (`cargo build --bins`, scripts/test.sh does)",
        p.display()
    );
    p
}

/// A fresh, empty directory for one test (under the system temp dir).
pub fn unique_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "skep-it-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create test dir");
    d
}

/// Options for a pool manager.
#[derive(Debug, Clone)]
pub struct PoolOpts {
    pub workers: u16,
    /// Jobs each worker runs at once (`--batch`): the pool has `workers × batch` slots.
    pub batch: u16,
    pub model: String,
    pub ttft: String,
    pub tps: f64,
    /// A GGUF model file: runs the real engine instead of the synthetic one.
    pub gguf: Option<PathBuf>,
    /// `RUST_LOG` for the daemons (default: inherited).
    pub rust_log: Option<String>,
    /// Run the GGUF engine on model `model` from the queen's catalogue (no local file).
    pub from_catalogue: bool,
    /// The token file the pool starts with (default: the queen's admin token).
    pub token_file: Option<PathBuf>,
    /// Extra `skep-pool` flags.
    pub extra_args: Vec<String>,
    /// Several models (`--models`) instead of `model`.
    pub models: Vec<String>,
}

impl Default for PoolOpts {
    fn default() -> Self {
        PoolOpts {
            workers: 1,
            batch: 1,
            model: "synthetic".into(),
            ttft: "5ms".into(),
            tps: 500.0,
            gguf: None,
            rust_log: None,
            from_catalogue: false,
            token_file: None,
            extra_args: Vec::new(),
            models: Vec::new(),
        }
    }
}

pub struct Pool {
    pub child: Child,
    pub dir: PathBuf,
    /// What it was started with, to start it again the same way.
    pub opts: PoolOpts,
}

/// A queen and its pools, on loopback, in a temp dir.
pub struct Cluster {
    pub dir: PathBuf,
    pub queen: Child,
    pub queen_url: String,
    pub pools: Vec<Pool>,
    /// Extra flags the queen was started with, used again on restart.
    queen_args: Vec<String>,
}

impl Cluster {
    /// Starts a queen and one pool, and waits until the pool is registered.
    #[track_caller]
    pub fn start(opts: PoolOpts) -> Cluster {
        let mut c = Cluster::queen_env("cluster", &[], opts.rust_log.as_deref());
        c.add_pool(opts);
        c.wait_for_nodes(1);
        c
    }

    /// Starts a queen with extra flags and one pool.
    #[track_caller]
    pub fn start_with(queen_args: &[&str], opts: PoolOpts) -> Cluster {
        let mut c = Cluster::queen_with("cluster", queen_args);
        c.add_pool(opts);
        c.wait_for_nodes(1);
        c
    }

    #[track_caller]
    pub fn queen_only(tag: &str) -> Cluster {
        Cluster::queen_with(tag, &[])
    }

    #[track_caller]
    pub fn queen_with(tag: &str, args: &[&str]) -> Cluster {
        Cluster::queen_env(tag, args, None)
    }

    #[track_caller]
    fn queen_env(tag: &str, args: &[&str], rust_log: Option<&str>) -> Cluster {
        let dir = unique_dir(tag);
        let qdir = dir.join("queen");
        let mut queen = Command::new(bin("skep-queen"));
        if let Some(level) = rust_log {
            queen.env("RUST_LOG", level);
        }
        let queen = queen
            .args(["--data-dir", path_str(&qdir), "--listen", "127.0.0.1:0"])
            .args(["--heartbeat-interval", "200ms"])
            // Tests make bursts of calls with one token; rate-limit tests set their own quota.
            .args(if args.contains(&"--rate-limit") {
                &[][..]
            } else {
                &["--rate-limit", "1000000/1s"][..]
            })
            .args(args)
            .stdout(Stdio::null())
            .stderr(log_file(&dir, "queen.log"))
            .spawn()
            .expect("start skep-queen");
        let addr = wait_for_file(&qdir.join("listen.addr"));
        let scheme = if args.contains(&"--tls") {
            "https"
        } else {
            "http"
        };
        Cluster {
            dir,
            queen,
            queen_url: format!("{scheme}://{addr}"),
            pools: Vec::new(),
            queen_args: args.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    /// Kills the queen (SIGKILL) and starts it again on the same data dir and port.
    #[track_caller]
    pub fn restart_queen(&mut self) {
        self.kill_queen();
        self.start_queen_again();
    }

    /// SIGKILLs the queen; `start_queen_again` brings it back.
    pub fn kill_queen(&mut self) {
        let _ = self.queen.kill();
        let _ = self.queen.wait();
    }

    /// Starts the queen on the same data dir and port after `kill_queen`.
    #[track_caller]
    pub fn start_queen_again(&mut self) {
        let qdir = self.dir.join("queen");
        let addr = self
            .queen_url
            .split_once("://")
            .map_or(self.queen_url.as_str(), |(_, a)| a)
            .to_owned();
        let _ = std::fs::remove_file(qdir.join("listen.addr"));
        self.queen = Command::new(bin("skep-queen"))
            .args(["--data-dir", path_str(&qdir), "--listen", &addr])
            .args(&self.queen_args)
            .args(["--heartbeat-interval", "200ms"])
            .args(if self.queen_args.iter().any(|a| a == "--rate-limit") {
                &[][..]
            } else {
                &["--rate-limit", "1000000/1s"][..]
            })
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir, "queen-restarted.log"))
            .spawn()
            .expect("restart skep-queen");
        wait_for_file(&qdir.join("listen.addr"));
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.join("queen").join("admin.token")
    }

    /// The queen's CA certificate (when it serves TLS).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("queen").join("tls").join("ca.pem")
    }

    #[track_caller]
    pub fn add_pool(&mut self, opts: PoolOpts) -> usize {
        let i = self.pools.len();
        let pdir = self.dir.join(format!("pool{i}"));
        let child = self.spawn_pool(i, &pdir, &opts, "");
        self.pools.push(Pool {
            child,
            dir: pdir,
            opts,
        });
        i
    }

    /// SIGKILLs pool `i` (its workers exit on their own when they see their parent gone).
    pub fn kill_pool(&mut self, i: usize) {
        let _ = self.pools[i].child.kill();
        let _ = self.pools[i].child.wait();
    }

    /// Starts pool `i` again after `kill_pool`, on its data dir: it keeps its node id and key.
    #[track_caller]
    pub fn restart_pool(&mut self, i: usize) {
        let pdir = self.pools[i].dir.clone();
        let opts = self.pools[i].opts.clone();
        let _ = std::fs::remove_file(pdir.join("listen.addr"));
        self.pools[i].child = self.spawn_pool(i, &pdir, &opts, "-restarted");
    }

    #[track_caller]
    fn spawn_pool(&self, i: usize, pdir: &Path, opts: &PoolOpts, log_tag: &str) -> Child {
        let tps = opts.tps.to_string();
        let mut pool = Command::new(bin("skep-pool"));
        if let Some(level) = &opts.rust_log {
            pool.env("RUST_LOG", level);
        }
        let child = pool
            .args(["--data-dir", path_str(pdir), "--queen", &self.queen_url])
            .args([
                "--token-file",
                path_str(opts.token_file.as_deref().unwrap_or(&self.token_file())),
                "--listen",
                "127.0.0.1:0",
            ])
            .args(&opts.extra_args)
            .args([
                "--workers",
                &opts.workers.to_string(),
                "--name",
                &format!("pool{i}"),
            ])
            // `--batch` in `extra_args` wins (clap refuses a flag given twice).
            .args(if opts.extra_args.iter().any(|a| a == "--batch") {
                Vec::new()
            } else {
                vec!["--batch".to_owned(), opts.batch.to_string()]
            })
            .args(if opts.models.is_empty() {
                vec!["--model".to_owned(), opts.model.clone()]
            } else {
                vec!["--models".to_owned(), opts.models.join(",")]
            })
            .args(match &opts.gguf {
                Some(path) => vec!["--engine", "gguf", "--model-path", path_str(path)],
                None if opts.from_catalogue => vec!["--engine", "gguf"],
                None => vec![
                    "--engine",
                    "synthetic",
                    "--synthetic-ttft",
                    &opts.ttft,
                    "--synthetic-tps",
                    &tps,
                ],
            })
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir, &format!("pool{i}{log_tag}.log")))
            .spawn()
            .expect("start skep-pool");
        wait_for_file(&pdir.join("listen.addr"));
        child
    }

    /// Waits until `n` healthy nodes are registered.
    #[track_caller]
    pub fn wait_for_nodes(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let healthy = self.healthy_nodes();
            if healthy.as_ref().is_ok_and(|h| *h >= n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} nodes never became healthy: {healthy:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many registered nodes the queen counts healthy now.
    pub fn healthy_nodes(&self) -> Result<usize, String> {
        runtime().block_on(async {
            let mut c = NodesClient::new(self.channel().await?);
            let req = self.authed(ListNodesRequest {});
            let nodes = c
                .list(req)
                .await
                .map_err(|e| e.to_string())?
                .into_inner()
                .nodes;
            Ok(nodes
                .iter()
                .filter(|n| n.state == NodeState::Healthy as i32)
                .count())
        })
    }

    pub async fn channel(&self) -> Result<Channel, String> {
        let mut endpoint =
            Channel::from_shared(self.queen_url.clone()).map_err(|e| e.to_string())?;
        if self.queen_url.starts_with("https://") {
            let ca = std::fs::read_to_string(self.ca_file()).map_err(|e| e.to_string())?;
            endpoint = endpoint
                .tls_config(skep_tls::client_config(&ca, skep_tls::QUEEN_NAME))
                .map_err(|e| e.to_string())?;
        }
        endpoint.connect().await.map_err(|e| e.to_string())
    }

    pub async fn jobs_client(&self) -> JobsClient<Channel> {
        JobsClient::new(self.channel().await.expect("connect to queen"))
    }

    /// A request carrying the admin token.
    pub fn authed<T>(&self, msg: T) -> tonic::Request<T> {
        let token = std::fs::read_to_string(self.token_file()).expect("read token");
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", token.trim()).parse().expect("header"),
        );
        req
    }

    /// A `skep` CLI command pointed at this cluster with the admin token.
    pub fn cli(&self) -> Command {
        self.cli_as(&self.token_file())
    }

    /// A `skep` CLI command pointed at this cluster with the token in `token_file`.
    pub fn cli_as(&self, token_file: &Path) -> Command {
        let mut c = Command::new(bin("skep"));
        c.arg("--queen")
            .arg(&self.queen_url)
            .arg("--token-file")
            .arg(token_file);
        if self.queen_url.starts_with("https://") {
            c.arg("--ca-file").arg(self.ca_file());
        }
        c
    }

    /// Writes `token` to a new 0600 file `name` in the cluster's directory.
    #[track_caller]
    pub fn write_token_file(&self, name: &str, token: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join(name);
        std::fs::write(&path, format!("{token}\n")).expect("write token file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }

    /// Runs `skep submit --json` and returns its output.
    pub fn submit(&self, model: &str, deadline: &str, max_tokens: u32, prompt: &str) -> Output {
        self.cli()
            .args(["submit", "--json", "--model", model, "--deadline", deadline])
            .args(["--max-tokens", &max_tokens.to_string(), prompt])
            .output()
            .expect("run skep submit")
    }

    /// `skep jobs get ID --json`, parsed.
    #[track_caller]
    pub fn job(&self, id: &str) -> serde_json::Value {
        let out = self
            .cli()
            .args(["jobs", "get", id, "--json"])
            .output()
            .expect("run skep");
        assert_eq!(
            out.status.code(),
            Some(0),
            "jobs get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("job JSON")
    }

    /// Starts `skep submit --json` in the background, reading its events as they come.
    pub fn spawn_submit(&self, deadline: &str, max_tokens: u32, prompt: &str) -> Submission {
        let mut child = self
            .cli()
            .args([
                "submit",
                "--json",
                "--model",
                "synthetic",
                "--deadline",
                deadline,
            ])
            .args(["--max-tokens", &max_tokens.to_string(), prompt])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn skep submit");
        let lines = std::io::BufRead::lines(std::io::BufReader::new(
            child.stdout.take().expect("stdout"),
        ));
        Submission {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Live `skep-worker` processes of pool `i`.
    pub fn worker_pids(&self, i: usize) -> Vec<u32> {
        children_of(self.pools[i].child.id(), "skep-worker")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &mut self.pools {
            for w in children_of(p.child.id(), "skep-worker") {
                kill(w);
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        let _ = self.queen.kill();
        let _ = self.queen.wait();
        if std::env::var_os("SKEP_KEEP_TEST_DIRS").is_none() && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A `skep submit --json` running in the background.
pub struct Submission {
    pub child: Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    /// Events read so far.
    pub seen: Vec<serde_json::Value>,
}

impl Submission {
    /// Reads events until one named `event` arrives (and returns it).
    #[track_caller]
    pub fn wait_for(&mut self, event: &str) -> serde_json::Value {
        loop {
            let line = self
                .lines
                .next()
                .unwrap_or_else(|| panic!("stream ended before a {event:?} event: {:?}", self.seen))
                .expect("read stdout");
            let v: serde_json::Value = serde_json::from_str(&line).expect("JSON event");
            self.seen.push(v.clone());
            if v["event"] == event {
                return v;
            }
        }
    }

    pub fn job_id(&self) -> String {
        self.seen
            .first()
            .and_then(|e| e["job_id"].as_str())
            .unwrap_or_default()
            .to_owned()
    }

    /// Reads the rest of the stream and waits for the exit code.
    pub fn finish(self) -> (Option<i32>, Vec<serde_json::Value>) {
        let (code, seen, _) = self.finish_with_stderr();
        (code, seen)
    }

    /// As `finish`, with what the client wrote to stderr.
    pub fn finish_with_stderr(mut self) -> (Option<i32>, Vec<serde_json::Value>, String) {
        for line in self.lines.by_ref() {
            match line.ok().and_then(|l| serde_json::from_str(&l).ok()) {
                Some(v) => self.seen.push(v),
                None => break,
            }
        }
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        let code = self.child.wait().ok().and_then(|s| s.code());
        (code, self.seen, stderr)
    }
}

/// Everything in the audit log files under `dir`, in file order.
pub fn audit_text(dir: &Path) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap_or_default())
        .collect()
}

/// Parses `skep --json` output: one JSON object per line.
#[track_caller]
pub fn events(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Pids of live processes whose parent is `ppid` and whose name is `comm`.
pub fn children_of(ppid: u32, comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Format: pid (comm) state ppid ... ; comm may hold spaces, so split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next();
        let parent = rest.next().and_then(|p| p.parse::<u32>().ok());
        if parent == Some(ppid) && comm.starts_with(name) && state != Some("Z") {
            out.push(pid);
        }
    }
    out
}

pub fn kill(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Runs `cmd` with stderr to `<dir>/<name>.log` until it exits or `limit` passes (then it is
/// killed and the status is `None`: it kept running). Returns the status and its stderr. For
/// daemons that must refuse to start.
pub fn run_bounded(
    cmd: &mut Command,
    dir: &Path,
    name: &str,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let log = dir.join(format!("{name}.log"));
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

#[track_caller]
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[track_caller]
fn wait_for_file(p: &Path) -> String {
    let mut s = String::new();
    wait_until(&format!("{}", p.display()), || {
        s = std::fs::read_to_string(p).unwrap_or_default();
        !s.is_empty()
    });
    s
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::File::create(dir.join(name))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// The SmolLM2 GGUF file the real-model tests use: `SKEP_MODEL_PATH`, else the model cache.
#[track_caller]
pub fn smollm2_path() -> PathBuf {
    match std::env::var_os("SKEP_MODEL_PATH") {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "SKEP_MODEL_PATH {} is not a file", p.display());
            p
        }
        None => model_path("smollm2-135m-instruct-q4_1.gguf", "smollm2"),
    }
}

/// A model file in the cache (`SKEP_MODEL_DIR`, default `~/.cache/skep/models`), put there by
/// `scripts/fetch-model.sh NAME` (scripts/test.sh runs it). A missing file fails the test and
/// says how to get it; it is never skipped.
#[track_caller]
pub fn model_path(file: &str, fetch_name: &str) -> PathBuf {
    let dir = std::env::var_os("SKEP_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/skep/models")
        });
    let path = dir.join(file);
    assert!(
        path.is_file(),
        "model {} is missing: run `scripts/fetch-model.sh {fetch_name}` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Fails the test, showing the command's stderr, unless it exited 0.
#[track_caller]
pub fn assert_success(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh private directory for files a test needs before its cluster starts (e.g. keys the
/// queen is started with). The caller removes it.
pub fn scratch_dir(tag: &str) -> PathBuf {
    unique_dir(tag)
}

// === HTTP door (integration/tests/http.rs) ===

impl Cluster {
    /// The base URL of the queen's HTTP door (started with `--http-listen 127.0.0.1:0`).
    #[track_caller]
    pub fn http_url(&self) -> String {
        let addr = wait_for_file(&self.dir.join("queen").join("http.addr"));
        format!("http://{}", addr.trim())
    }

    /// The admin token, read from its file, for clients that take it as a string.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.token_file())
            .expect("read the admin token")
            .trim()
            .to_owned()
    }
}

/// The Python with the pinned `openai` package, installed by scripts/install-deps.sh into
/// `.venv-openai/` at the repository root. Missing is a failure, not a skip.
#[track_caller]
pub fn openai_python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf();
    let py = root.join(".venv-openai").join("bin").join("python");
    assert!(
        py.is_file(),
        "{} is missing: run scripts/install-deps.sh (it installs the openai package there)",
        py.display()
    );
    py
}

// === Metrics and health (integration/tests/metrics.rs) ===

impl Cluster {
    /// Where the queen's `--metrics-listen 127.0.0.1:0` is bound.
    #[track_caller]
    pub fn queen_metrics_addr(&self) -> String {
        wait_for_file(&self.dir.join("queen").join("metrics.addr"))
            .trim()
            .to_owned()
    }

    /// Where pool `i`'s `--metrics-listen 127.0.0.1:0` is bound.
    #[track_caller]
    pub fn pool_metrics_addr(&self, i: usize) -> String {
        wait_for_file(&self.pools[i].dir.join("metrics.addr"))
            .trim()
            .to_owned()
    }

    /// Pool `i`'s gRPC address (`host:port`).
    #[track_caller]
    pub fn pool_addr(&self, i: usize) -> String {
        wait_for_file(&self.pools[i].dir.join("listen.addr"))
            .trim()
            .to_owned()
    }
}

/// `GET path` from `addr` over plain HTTP/1.0: the status line and the body.
#[track_caller]
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(WAIT)).expect("read timeout");
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send the request");
    let mut raw = String::new();
    conn.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}
