//! `skep-bench memory`: what a pool's workers cost in memory when they share one model file.
//!
//!   skep-bench memory --model-path FILE [--model-path FILE ...] [--workers 1,4]
//!                     [--llama-ref PATH] [--out DIR --date YYYY-MM-DD]
//!
//! For each file it starts a real queen and a real pool of 1 worker, then of 4 (as a user
//! would: `skep-pool --workers N --engine gguf --model-path FILE`), waits until every worker
//! has loaded the model (its "worker ready" log line), runs one short job per worker, and reads
//! each worker's `/proc/<pid>/smaps_rollup` (PSS: a shared page counts `1/n` in each of the `n`
//! processes mapping it, so the sum over the workers is what the pool really costs, unlike
//! RSS, which counts shared pages in full in each) and `VmHWM` (peak RSS). It reports the
//! pool's PSS against one worker's, and one worker's load time (process start to ready) and
//! peak RSS against llama.cpp's on the same file when `--llama-ref` is given. With `--out` the
//! section replaces its namesake in the report; without, it is only printed.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use skep_integration::report::{self, Figure, Section};
use skep_integration::{Cluster, PoolOpts};
use skep_proto::v1::{SubmitRequest, job_event};

#[derive(Parser, Debug)]
#[command(name = "skep-bench memory")]
struct Args {
    /// A GGUF model file (repeat the flag for several).
    #[arg(long = "model-path", required = true)]
    model_paths: Vec<PathBuf>,
    /// Pool sizes measured, comma separated; the first is the one the others are compared to.
    #[arg(long, value_delimiter = ',', default_values_t = [1u16, 4])]
    workers: Vec<u16>,
    /// llama.cpp reference tool (`scripts/llama-cpp/build.sh` prints its path): its load time
    /// and peak RSS on the same file and threads.
    #[arg(long)]
    llama_ref: Option<PathBuf>,
    /// Where BENCHMARKS.md and benchmarks.json are updated (with `--date`).
    #[arg(long, requires = "date")]
    out: Option<PathBuf>,
    /// Date stamped on the figures (YYYY-MM-DD).
    #[arg(long, requires = "out")]
    date: Option<String>,
}

/// Longest a pool may take to have all its workers loaded.
const READY_WAIT: Duration = Duration::from_secs(300);
/// How often the pool's log is read while waiting: the resolution of the load time.
const POLL: Duration = Duration::from_millis(5);
/// Tokens of each worker's job after loading (the pool is warm and has served).
const JOB_TOKENS: u32 = 16;
const PROMPT: &str =
    "Write a short story about a lighthouse keeper who finds a message in a bottle.";
/// llama.cpp runs per file; its figures are the medians.
const LLAMA_RUNS: usize = 3;

/// One worker's memory, in bytes.
#[derive(Debug, Clone, Copy, Default)]
struct WorkerMemory {
    pid: u32,
    rss: f64,
    pss: f64,
    pss_anon: f64,
    pss_file: f64,
    pss_shmem: f64,
    peak_rss: f64,
    /// Resident pages of the model file's mappings (from smaps), and their PSS.
    model_rss: f64,
    model_pss: f64,
}

/// One pool measured.
#[derive(Debug)]
struct PoolRun {
    workers: Vec<WorkerMemory>,
    /// Process start to "worker ready" of the first worker to be ready.
    first_load_ms: f64,
    /// Pool start to the last worker ready.
    all_ready_ms: f64,
}

impl PoolRun {
    /// The workers' PSS summed.
    fn pss(&self) -> f64 {
        self.workers.iter().map(|w| w.pss).sum()
    }

    /// The pool's memory with the model file's pages counted once, whoever else maps them: the
    /// workers' PSS outside the model file, plus the largest resident part of the file in any
    /// worker. PSS alone would credit part of the file to any other process mapping it at the
    /// time (another pool, a test), and make this pool look smaller than it is.
    fn memory(&self) -> f64 {
        let outside: f64 = self.workers.iter().map(|w| w.pss - w.model_pss).sum();
        let model = self.workers.iter().map(|w| w.model_rss).fold(0.0, f64::max);
        outside + model
    }
}

/// Runs the subcommand; `args` starts with "memory".
pub fn main(args: impl Iterator<Item = OsString>) -> anyhow::Result<()> {
    let args = Args::parse_from(args);
    anyhow::ensure!(
        !args.workers.is_empty() && args.workers.iter().all(|&n| n > 0),
        "--workers needs pool sizes of at least 1"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut figures = Vec::new();
    let mut notes = vec![
        "| model | pool | worker | Rss | Pss | Pss_Anon | Pss_File | Pss_Shmem | model file Rss / Pss | peak RSS |"
            .into(),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|".into(),
    ];
    for path in &args.model_paths {
        let name = model_name(path);
        let mut runs = Vec::new();
        for &n in &args.workers {
            let run = measure_pool(&name, path, n, &rt)
                .with_context(|| format!("{name}: a pool of {n}"))?;
            for (i, w) in run.workers.iter().enumerate() {
                notes.push(format!(
                    "| {name} | {n} | {i} (pid {}) | {} | {} | {} | {} | {} | {} / {} | {} |",
                    w.pid,
                    mib(w.rss),
                    mib(w.pss),
                    mib(w.pss_anon),
                    mib(w.pss_file),
                    mib(w.pss_shmem),
                    mib(w.model_rss),
                    mib(w.model_pss),
                    mib(w.peak_rss)
                ));
            }
            notes.push(format!(
                "| {name} | {n} | all | | {} | | | | model file once: {} in all | |",
                mib(run.pss()),
                mib(run.memory())
            ));
            println!(
                "{name}: {n} worker(s): {} with the model file counted once (PSS summed: {}); \
                 first worker ready {:.0} ms after its start, all ready {:.0} ms after the \
                 pool's",
                mib(run.memory()),
                mib(run.pss()),
                run.first_load_ms,
                run.all_ready_ms
            );
            runs.push((n, run));
        }
        let (one_n, one) = &runs[0];
        for (n, run) in &runs[1..] {
            figures.push(Figure {
                name: format!("{name}_pool_of_{n}_workers_memory"),
                value: run.memory() / f64::from(1 << 20),
                unit: "MiB".into(),
                baseline: format!("pool_of_{one_n}_worker_memory"),
                baseline_value: one.memory() / f64::from(1 << 20),
            });
        }
        let llama = match &args.llama_ref {
            Some(tool) => Some(llama_load(tool, path, threads)?),
            None => None,
        };
        let worker = one.workers[0];
        let (base_rss, base_load, base) = match llama {
            Some((load_ms, rss)) => (rss / f64::from(1 << 20), load_ms, "llama_cpp"),
            None => (f64::NAN, f64::NAN, "llama_cpp_not_run"),
        };
        figures.push(Figure {
            name: format!("{name}_worker_peak_rss"),
            value: worker.peak_rss / f64::from(1 << 20),
            unit: "MiB".into(),
            baseline: format!("{base}_peak_rss"),
            baseline_value: base_rss,
        });
        figures.push(Figure {
            name: format!("{name}_worker_load_time"),
            value: one.first_load_ms,
            unit: "ms".into(),
            baseline: format!("{base}_load_time"),
            baseline_value: base_load,
        });
    }
    for f in &figures {
        println!(
            "{}: {:.1} {} ({}: {:.1}; ratio {:.2})",
            f.name,
            f.value,
            f.unit,
            f.baseline,
            f.baseline_value,
            f.ratio()
        );
    }
    for n in &notes {
        println!("{n}");
    }
    let section = Section {
        title: "Memory of a pool: weights mapped once".into(),
        method: format!(
            "For each model file, a real queen and a real pool (`skep-pool --workers N --engine \
             gguf --model-path FILE`) with N = {workers}, started as a user would. The bench \
             waits until every worker has logged \"worker ready\" (model loaded and run once), \
             runs one {JOB_TOKENS}-token job per worker, then reads each worker's \
             /proc/PID/smaps_rollup and VmHWM. PSS (proportional set size) counts a page shared \
             by n processes as 1/n in each, so the sum over a pool's workers is the memory the \
             pool costs; RSS would count the shared weights once per worker. Because PSS also \
             splits the model file's pages with any other process that maps the file at the \
             time, the pool figure counts them once itself: the workers' PSS outside the model \
             file (from /proc/PID/smaps), plus the largest resident part of the file in any one \
             worker. It is set against the same figure for the {first}-worker pool (target: 4 \
             workers ≤ 1.5×); the table gives both it and the plain PSS sum. Load time: \
             from the worker process's start (/proc/PID/stat) to its \"worker ready\" line, \
             polled every {poll} ms, for the {first}-worker pool. llama.cpp: \
             `skep_llama_ref FILE gen {JOB_TOKENS} {threads} PROMPT` ({LLAMA_RUNS} runs, \
             medians), whose load runs from opening the file to a context that has run one \
             two-token pass, as the worker's load ends with one; its peak RSS is its VmHWM \
             (targets: load ≤ 1.0×, peak RSS ≤ 1.0×).",
            workers = args
                .workers
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            first = args.workers[0],
            poll = POLL.as_millis(),
        ),
        figures,
        notes,
    };
    if let (Some(out), Some(date)) = (&args.out, &args.date) {
        report::update(out, date, &super::machine(), &[section])?;
        println!(
            "updated {}/BENCHMARKS.md and benchmarks.json",
            out.display()
        );
    }
    Ok(())
}

/// A model name the pool accepts, from the file's name.
fn model_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(48)
        .collect();
    if name.is_empty() {
        "model".into()
    } else {
        name
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / f64::from(1 << 20))
}

/// Starts a queen and a pool of `workers` on `path`, waits until all are loaded, runs a job on
/// each, and reads their memory.
fn measure_pool(
    name: &str,
    path: &Path,
    workers: u16,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<PoolRun> {
    let started = Instant::now();
    let mut cluster = Cluster::queen_only("bench-memory");
    let pool = cluster.add_pool(PoolOpts {
        workers,
        model: name.into(),
        gguf: Some(path.to_owned()),
        // The "worker ready" lines are what the bench waits for.
        rust_log: Some("info".into()),
        ..PoolOpts::default()
    });
    let log = cluster.dir.join(format!("pool{pool}.log"));
    let want = usize::from(workers);
    let mut first_load_ms = None;
    loop {
        let ready = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("worker ready")
            .count();
        if ready >= 1 && first_load_ms.is_none() {
            // The first worker to be ready is the oldest one alive with its model loaded; with
            // one worker, it is the worker.
            first_load_ms = cluster
                .worker_pids(pool)
                .iter()
                .filter_map(|&pid| age_ms(pid))
                .reduce(f64::max);
        }
        if ready >= want {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < READY_WAIT,
            "{ready} of {want} workers ready after {READY_WAIT:?} (log: {})",
            log.display()
        );
        std::thread::sleep(POLL);
    }
    let all_ready_ms = started.elapsed().as_secs_f64() * 1e3;
    cluster.wait_for_nodes(1);
    // One job per worker at once: the dispatcher spreads them over the idle slots.
    rt.block_on(async {
        let mut jobs = Vec::new();
        for _ in 0..workers {
            let (client, req) = (cluster.jobs_client().await, request(&cluster, name));
            jobs.push(tokio::spawn(job(client, req)));
        }
        for j in jobs {
            j.await??;
        }
        anyhow::Ok(())
    })?;
    let pids = cluster.worker_pids(pool);
    anyhow::ensure!(
        pids.len() == want,
        "{} workers alive, expected {want}",
        pids.len()
    );
    let workers = pids
        .iter()
        .map(|&pid| worker_memory(pid, path))
        .collect::<anyhow::Result<Vec<_>>>()?;
    drop(cluster);
    Ok(PoolRun {
        workers,
        first_load_ms: first_load_ms.context("no worker was alive when one was ready")?,
        all_ready_ms,
    })
}

/// A short job for `model`.
fn request(cluster: &Cluster, model: &str) -> tonic::Request<SubmitRequest> {
    let mut req = cluster.authed(SubmitRequest {
        model: model.into(),
        prompt: PROMPT.into(),
        max_tokens: JOB_TOKENS,
        deadline_ms: 600_000,
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(600));
    req
}

/// Runs `req` to its end.
async fn job(
    mut client: skep_proto::v1::jobs_client::JobsClient<tonic::transport::Channel>,
    req: tonic::Request<SubmitRequest>,
) -> anyhow::Result<()> {
    let mut stream = client.submit(req).await?.into_inner();
    while let Some(ev) = stream.message().await? {
        match ev.kind {
            Some(job_event::Kind::Done(_)) => return Ok(()),
            Some(job_event::Kind::Error(e)) => anyhow::bail!("job failed: {}", e.message),
            _ => {}
        }
    }
    anyhow::bail!("stream ended without a result")
}

/// How long ago process `pid` started, in ms (to the kernel's clock tick).
fn age_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces); `starttime` is field 22 of the
    // line, the 20th after the name.
    let rest = &stat[stat.rfind(')')? + 1..];
    let start_ticks: f64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((uptime - start_ticks / clock_ticks()) * 1e3)
}

/// `sysconf(_SC_CLK_TCK)`, through getconf (the workspace forbids `unsafe`); 100 on Linux.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// `pid`'s PSS breakdown (smaps_rollup), the part of it in mappings of `model` (smaps), and
/// its peak RSS (status).
fn worker_memory(pid: u32, model: &Path) -> anyhow::Result<WorkerMemory> {
    let field = |text: &str, key: &str| -> anyhow::Result<f64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("no {key} for process {pid}"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("unreadable {line:?}"))?;
        Ok(kib * 1024.0)
    };
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let (model_rss, model_pss) = model_pages(pid, model)?;
    Ok(WorkerMemory {
        pid,
        model_rss,
        model_pss,
        rss: field(&rollup, "Rss:")?,
        pss: field(&rollup, "Pss:")?,
        pss_anon: field(&rollup, "Pss_Anon:")?,
        pss_file: field(&rollup, "Pss_File:")?,
        pss_shmem: field(&rollup, "Pss_Shmem:")?,
        peak_rss: field(&status, "VmHWM:")?,
    })
}

/// Rss and Pss (bytes) of `pid`'s mappings of `model`.
fn model_pages(pid: u32, model: &Path) -> anyhow::Result<(f64, f64)> {
    let model = std::fs::canonicalize(model)?;
    let model = model.to_string_lossy();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let (mut inside, mut rss, mut pss) = (false, 0.0, 0.0);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if !first.ends_with(':') {
            // A mapping's header: range, perms, offset, device, inode, path.
            inside = line.ends_with(model.as_ref());
            continue;
        }
        let kib: f64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        match first {
            "Rss:" if inside => rss += kib * 1024.0,
            "Pss:" if inside => pss += kib * 1024.0,
            _ => {}
        }
    }
    Ok((rss, pss))
}

/// llama.cpp's load time (ms) and peak RSS (bytes) on `path`: medians of `LLAMA_RUNS` runs.
fn llama_load(tool: &Path, path: &Path, threads: usize) -> anyhow::Result<(f64, f64)> {
    let (mut load, mut rss) = (Vec::new(), Vec::new());
    for _ in 0..LLAMA_RUNS {
        let out = std::process::Command::new(tool)
            .arg(path)
            .args(["gen", &JOB_TOKENS.to_string(), &threads.to_string(), PROMPT])
            .output()
            .with_context(|| format!("running {}", tool.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "{} failed: {}",
            tool.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("no JSON line from llama.cpp")?;
        let v: serde_json::Value = serde_json::from_str(line)?;
        load.push(v["load_ms"].as_f64().context("no load_ms")?);
        rss.push(v["peak_rss_bytes"].as_f64().context("no peak_rss_bytes")?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(&mut load), median(&mut rss)))
}
