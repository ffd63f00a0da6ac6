//! `skep-bench batch`: a pool serving many jobs at once, against llama.cpp's server, on one model.
//!
//!   skep-bench batch --model-path FILE [--llama-server PATH] [--streams 1,2,4,8,16]
//!                    [--jobs-per-stream 2] [--max-tokens 64] [--loads 0.8,1.2,2] [--open-secs 20]
//!                    [--out DIR --date YYYY-MM-DD]
//!
//! Three sides, each started fresh for every run and given the same jobs: `llama-server -np N
//! --cont-batching` (over loopback HTTP, its `/completion` stream), skep with one worker running
//! N jobs (`skep-pool --workers 1 --batch N`), and skep with N one-job workers (`--workers N
//! --batch 1`). Every time is taken on the bench's clock. The bench tokenizes each prompt with
//! skep's own tokenizer and chat template and sends llama-server those ids, then checks that
//! both sides evaluated that many prompt tokens: the two run the same tokens or the run fails.
//! It only reports; nothing here is asserted about speed.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use skep_integration::report::{self, Samples};
use skep_integration::{Cluster, PoolOpts};
use skep_proto::v1::jobs_client::JobsClient;
use skep_proto::v1::{SubmitRequest, job_event};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tonic::transport::Channel;

mod deadline;
mod sections;

use sections::sections;

#[derive(Parser, Debug)]
#[command(name = "skep-bench batch")]
struct Args {
    /// The GGUF model file every side serves.
    #[arg(long)]
    model_path: PathBuf,
    /// llama.cpp's `llama-server` (`scripts/llama-cpp/build.sh` installs it beside its output).
    #[arg(long)]
    llama_server: Option<PathBuf>,
    /// Concurrent closed-loop streams measured.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2, 4, 8, 16])]
    streams: Vec<usize>,
    /// Measured jobs each stream runs back to back, after one warm-up job each.
    #[arg(long, default_value_t = 2)]
    jobs_per_stream: usize,
    /// Tokens each closed-loop job asks for.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Streams of the mixed-prompt-length run (half short prompts, half long).
    #[arg(long, default_value_t = 8)]
    mixed_streams: usize,
    /// Jobs a side runs at once in the deadline runs (llama-server `-np`, skep `--batch`/`--workers`).
    #[arg(long, default_value_t = 4)]
    open_slots: usize,
    /// Offered loads of the deadline runs, as fractions of the measured capacity.
    #[arg(long, value_delimiter = ',', default_values_t = [0.8, 1.2, 2.0])]
    loads: Vec<f64>,
    /// Length of each open-loop arrival schedule, in seconds.
    #[arg(long, default_value_t = 20)]
    open_secs: u64,
    /// An urgent job's deadline, as a multiple of its time alone on llama-server.
    #[arg(long, default_value_t = 4.0)]
    urgent_slack: f64,
    /// A long job's deadline, as a multiple of its time alone on llama-server.
    #[arg(long, default_value_t = 10.0)]
    long_slack: f64,
    /// Threads of llama-server; skep's workers get theirs from RAYON_NUM_THREADS (bench.sh sets
    /// both to the same number).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Extra `skep-pool` flags for both skep sides, e.g. `--pool-arg=--prefill-chunk
    /// --pool-arg=64`.
    #[arg(long = "pool-arg", allow_hyphen_values = true)]
    pool_args: Vec<String>,
    /// Parts to run (default: all); the report gets only the sections of the parts run.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Part::Streams, Part::Mixed, Part::Deadline])]
    parts: Vec<Part>,
    /// Seed of the arrival schedule (the same schedule for every side).
    #[arg(long, default_value_t = 17)]
    seed: u64,
    /// Where BENCHMARKS.md and benchmarks.json are updated (with `--date`).
    #[arg(long, requires = "date")]
    out: Option<PathBuf>,
    /// Date stamped on the figures (YYYY-MM-DD).
    #[arg(long, requires = "out")]
    date: Option<String>,
}

/// The parts of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Closed loop at each stream count (throughput, time to first token, memory).
    Streams,
    /// Closed loop with mixed prompt lengths.
    Mixed,
    /// Open-loop deadline attainment.
    Deadline,
}

/// The closed-loop prompt: long answers, so that end-of-generation rarely cuts a job short.
const CHAT_PROMPT: &str =
    "Write a long story about a lighthouse keeper who finds a message in a bottle.";
/// An urgent job's prompt and tokens.
const URGENT_PROMPT: &str = "In one sentence, what does a lighthouse do?";
const URGENT_TOKENS: u32 = 16;
/// A long job's tokens; its prompt is `long_prompt()`.
const LONG_TOKENS: u32 = 128;
/// Urgent jobs among every `MIX_PERIOD` arrivals of the deadline runs (the rest are long).
const MIX_URGENT: usize = 3;
const MIX_PERIOD: usize = 4;
/// Context per llama-server slot: the longest prompt plus the most tokens, with room to spare.
const CTX_PER_SLOT: usize = 1024;
/// Longest a side may take to start (model loaded in every worker, server healthy).
const START_WAIT: Duration = Duration::from_secs(300);
/// Longest any closed-loop job may run before the run fails.
const JOB_LIMIT: Duration = Duration::from_secs(600);
/// How often the memory of a side is read while its streams run.
const MEMORY_EVERY: Duration = Duration::from_millis(250);
/// Tokens of each warm-up job.
const WARM_TOKENS: u32 = 8;

/// A job as every side gets it.
#[derive(Debug, Clone)]
struct JobSpec {
    /// The user's text (skep applies the chat template itself).
    prompt: String,
    /// The same text through skep's tokenizer and chat template (what llama-server is sent).
    ids: Arc<Vec<u32>>,
    max_tokens: u32,
    /// Budget from submission, on the client's clock; `None`: `JOB_LIMIT`.
    deadline: Option<Duration>,
}

/// How one job ended, on the client's clock.
#[derive(Debug, Clone, Default)]
struct Outcome {
    ttft: Option<Duration>,
    /// Submission to the last event; `None` when the job did not finish.
    done: Option<Duration>,
    tokens: u32,
    prompt_tokens: Option<u32>,
    error: Option<String>,
}

/// Which server a run measures.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Llama,
    SkepBatch,
    SkepWorkers,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Llama => "llama-server",
            Kind::SkepBatch => "skep --batch N",
            Kind::SkepWorkers => "skep --workers N",
        }
    }
}

/// A running side.
enum Server {
    Llama { child: Child, addr: SocketAddr },
    Skep(Box<SkepSide>),
}

struct SkepSide {
    cluster: Cluster,
    model: String,
    client: JobsClient<Channel>,
    bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Server::Llama { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One closed-loop run.
#[derive(Debug, Default)]
struct Closed {
    outcomes: Vec<Outcome>,
    wall: Duration,
    /// Largest PSS of the side's processes seen while the measured jobs ran, bytes.
    pss: f64,
}

impl Closed {
    fn tps(&self) -> f64 {
        self.tokens() as f64 / self.wall.as_secs_f64()
    }
    fn tokens(&self) -> u64 {
        self.outcomes.iter().map(|o| u64::from(o.tokens)).sum()
    }
    fn ttft(&self) -> Samples {
        Samples::new(self.outcomes.iter().filter_map(|o| o.ttft).collect())
    }
    fn errors(&self) -> usize {
        self.outcomes.iter().filter(|o| o.error.is_some()).count()
    }
}

/// Runs the subcommand; `args` starts with "batch".
pub fn main(args: impl Iterator<Item = OsString>) -> anyhow::Result<()> {
    let args = Args::parse_from(args);
    anyhow::ensure!(
        !args.streams.is_empty() && args.streams.iter().all(|&n| (1..=64).contains(&n)),
        "--streams needs stream counts from 1 to 64"
    );
    anyhow::ensure!(args.jobs_per_stream >= 1, "--jobs-per-stream must be >= 1");
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let prompts = Prompts::new(&args.model_path)?;
    let mut kinds = Vec::new();
    if args.llama_server.is_some() {
        kinds.push(Kind::Llama);
    }
    kinds.extend([Kind::SkepBatch, Kind::SkepWorkers]);
    let ctx = Ctx {
        args: &args,
        rt: &rt,
    };

    // 1. Closed loop at each stream count, and the mixed-prompt-length run.
    let chat = prompts.job(CHAT_PROMPT, args.max_tokens);
    let mut closed: Vec<(Kind, usize, Closed)> = Vec::new();
    let streams_counts = if args.parts.contains(&Part::Streams) {
        args.streams.clone()
    } else {
        Vec::new()
    };
    for &n in &streams_counts {
        let streams = vec![vec![chat.clone(); args.jobs_per_stream]; n];
        for &k in &kinds {
            let run = ctx
                .closed_run(k, n, &streams)
                .with_context(|| format!("{} with {n} streams", k.label()))?;
            println!(
                "{:<18} {n:>2} streams: {:7.1} tok/s, TTFT p50 {:7.1} ms p99 {:7.1} ms, PSS {}, {} errors",
                k.label(),
                run.tps(),
                run.ttft().pct_us(50.0) / 1e3,
                run.ttft().pct_us(99.0) / 1e3,
                mib(run.pss),
                run.errors()
            );
            closed.push((k, n, run));
        }
    }
    let long = prompts.job(&long_prompt(), args.max_tokens);
    let mixed_streams: Vec<Vec<JobSpec>> = (0..args.mixed_streams)
        .map(|i| {
            let j = if i % 2 == 0 { &chat } else { &long };
            vec![j.clone(); args.jobs_per_stream]
        })
        .collect();
    let mut mixed = Vec::new();
    let mixed_kinds = if args.parts.contains(&Part::Mixed) {
        kinds.clone()
    } else {
        Vec::new()
    };
    for &k in &mixed_kinds {
        let run = ctx
            .closed_run(k, args.mixed_streams, &mixed_streams)
            .with_context(|| format!("{}: mixed prompt lengths", k.label()))?;
        println!(
            "{:<18} mixed {} streams: TTFT p50 {:.1} ms p99 {:.1} ms",
            k.label(),
            args.mixed_streams,
            run.ttft().pct_us(50.0) / 1e3,
            run.ttft().pct_us(99.0) / 1e3
        );
        mixed.push((k, run));
    }

    // 2. Deadline attainment under open-loop arrivals.
    let deadline = if args.parts.contains(&Part::Deadline) {
        Some(ctx.deadline_runs(&kinds, &prompts)?)
    } else {
        None
    };

    let took = started.elapsed();
    let sections = sections(&args, &kinds, &closed, &mixed, deadline.as_ref(), took);
    for s in &sections {
        for f in &s.figures {
            println!(
                "{}: {:.2} {} ({}: {:.2}; ratio {:.2})",
                f.name,
                f.value,
                f.unit,
                f.baseline,
                f.baseline_value,
                f.ratio()
            );
        }
        for n in &s.notes {
            println!("{n}");
        }
    }
    println!("batch section took {:.0} s", took.as_secs_f64());
    if let (Some(out), Some(date)) = (&args.out, &args.date) {
        report::update(out, date, &super::machine(), &sections)?;
        println!(
            "updated {}/BENCHMARKS.md and benchmarks.json",
            out.display()
        );
    }
    Ok(())
}

/// The long prompt: the first part of the models section's prose.
fn long_prompt() -> String {
    let text = include_str!("long_prompt.txt");
    // About 300 tokens of prose: long enough that its prompt pass dwarfs a short one's.
    let end = text.char_indices().nth(1400).map_or(text.len(), |(i, _)| i);
    text[..end].to_owned()
}

/// Tokenizes prompts with skep's tokenizer and chat template (the model loaded once, then dropped
/// before any side runs, so the bench maps no model pages during a memory reading).
struct Prompts {
    ids: std::collections::HashMap<String, Arc<Vec<u32>>>,
}

impl Prompts {
    fn new(path: &Path) -> anyhow::Result<Prompts> {
        use skep_worker::engine::gguf::{GgufEngine, GgufOptions};
        let engine = GgufEngine::load(path, "bench", GgufOptions::default())?;
        let mut ids = std::collections::HashMap::new();
        for p in [
            CHAT_PROMPT.to_owned(),
            URGENT_PROMPT.to_owned(),
            long_prompt(),
        ] {
            let t = engine.prompt_tokens(&p)?;
            ids.insert(p, Arc::new(t.ids));
        }
        Ok(Prompts { ids })
    }

    fn job(&self, prompt: &str, max_tokens: u32) -> JobSpec {
        JobSpec {
            prompt: prompt.to_owned(),
            ids: self.ids.get(prompt).cloned().unwrap_or_default(),
            max_tokens,
            deadline: None,
        }
    }
}

/// What every run needs.
struct Ctx<'a> {
    args: &'a Args,
    rt: &'a tokio::runtime::Runtime,
}

impl Ctx<'_> {
    /// Starts side `kind` for `n` jobs at once.
    fn start(&self, kind: Kind, n: usize) -> anyhow::Result<Server> {
        match kind {
            Kind::Llama => {
                let bin = self
                    .args
                    .llama_server
                    .as_ref()
                    .context("no --llama-server")?;
                start_llama(bin, &self.args.model_path, n, self.args.threads)
            }
            Kind::SkepBatch => self.start_skep(1, n),
            Kind::SkepWorkers => self.start_skep(n, 1),
        }
    }

    fn start_skep(&self, workers: usize, batch: usize) -> anyhow::Result<Server> {
        let model = "bench-model".to_owned();
        let mut cluster = Cluster::queen_only("bench-batch");
        let pool = cluster.add_pool(PoolOpts {
            workers: u16::try_from(workers)?,
            batch: u16::try_from(batch)?,
            model: model.clone(),
            gguf: Some(self.args.model_path.clone()),
            // The "worker ready" lines are what the bench waits for.
            rust_log: Some("info".into()),
            extra_args: self.args.pool_args.clone(),
            ..PoolOpts::default()
        });
        let log = cluster.dir.join(format!("pool{pool}.log"));
        let t = Instant::now();
        loop {
            let ready = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("worker ready")
                .count();
            if ready >= workers {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < START_WAIT,
                "{ready} of {workers} workers ready after {START_WAIT:?} (log: {})",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        cluster.wait_for_nodes(1);
        let bearer = cluster
            .authed(())
            .metadata()
            .get("authorization")
            .context("no authorization header")?
            .clone();
        let client = self.rt.block_on(cluster.jobs_client());
        Ok(Server::Skep(Box::new(SkepSide {
            cluster,
            model,
            client,
            bearer,
        })))
    }

    /// `streams[i]` run back to back on stream i, all streams at once, after one warm-up job per
    /// stream (also all at once).
    fn closed_run(&self, kind: Kind, n: usize, streams: &[Vec<JobSpec>]) -> anyhow::Result<Closed> {
        let server = Arc::new(self.start(kind, n)?);
        let pids = server.pids();
        let run = self.rt.block_on(async {
            let warm: Vec<JobSpec> = streams
                .iter()
                .map(|s| JobSpec {
                    max_tokens: WARM_TOKENS,
                    ..s[0].clone()
                })
                .collect();
            let tasks: Vec<_> = warm
                .into_iter()
                .map(|j| {
                    let s = Arc::clone(&server);
                    tokio::spawn(async move { s.run(&j).await })
                })
                .collect();
            for t in tasks {
                let o = t.await?;
                anyhow::ensure!(o.error.is_none(), "warm-up job failed: {:?}", o.error);
            }
            let stop = Arc::new(AtomicBool::new(false));
            let sampler = {
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut most: f64 = 0.0;
                    while !stop.load(Ordering::Relaxed) {
                        most = most.max(pids.iter().map(|&p| pss(p)).sum());
                        tokio::time::sleep(MEMORY_EVERY).await;
                    }
                    most
                })
            };
            let t = Instant::now();
            let tasks: Vec<_> = streams
                .iter()
                .cloned()
                .map(|jobs| {
                    let s = Arc::clone(&server);
                    tokio::spawn(async move {
                        let mut out = Vec::new();
                        for j in &jobs {
                            out.push(s.run(j).await);
                        }
                        out
                    })
                })
                .collect();
            let mut outcomes = Vec::new();
            for task in tasks {
                outcomes.extend(task.await?);
            }
            let wall = t.elapsed();
            stop.store(true, Ordering::Relaxed);
            let pss = sampler.await?;
            anyhow::Ok(Closed {
                outcomes,
                wall,
                pss,
            })
        })?;
        check_prompt_tokens(&run.outcomes, streams.iter().flatten())?;
        drop_server(server);
        Ok(run)
    }
}

/// Fails unless every finished job evaluated as many prompt tokens as skep's tokenizer made:
/// otherwise the sides did not run the same work.
fn check_prompt_tokens<'a>(
    outcomes: &[Outcome],
    jobs: impl Iterator<Item = &'a JobSpec>,
) -> anyhow::Result<()> {
    for (o, j) in outcomes.iter().zip(jobs) {
        if o.done.is_none() {
            continue;
        }
        let p = o
            .prompt_tokens
            .context("a finished job did not say how many prompt tokens it evaluated")?;
        anyhow::ensure!(
            p as usize == j.ids.len(),
            "a job evaluated {p} prompt tokens where skep's tokenizer made {}; the sides did \
             not run the same tokens",
            j.ids.len()
        );
    }
    Ok(())
}

/// Drops a side outside the runtime (a cluster's drop blocks).
fn drop_server(server: Arc<Server>) {
    match Arc::try_unwrap(server) {
        Ok(s) => drop(s),
        Err(_) => eprintln!("bench: a side is still referenced; it stops at exit"),
    }
}

// === impl Server ===

impl Server {
    /// The processes whose memory is the side's: llama-server; or the pool manager and its
    /// workers.
    fn pids(&self) -> Vec<u32> {
        match self {
            Server::Llama { child, .. } => vec![child.id()],
            Server::Skep(s) => {
                let mut v = vec![s.cluster.pools[0].child.id()];
                v.extend(s.cluster.worker_pids(0));
                v
            }
        }
    }

    /// Runs one job to its end or its deadline (the client gives up then).
    async fn run(&self, job: &JobSpec) -> Outcome {
        let limit = job.deadline.unwrap_or(JOB_LIMIT);
        let t = Instant::now();
        let first = std::sync::Mutex::new(None);
        let fut = async {
            match self {
                Server::Llama { addr, .. } => llama_job(*addr, job, t, &first).await,
                Server::Skep(s) => s.job(job, limit, t, &first).await,
            }
        };
        let mut out = match tokio::time::timeout(limit, fut).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => Outcome {
                error: Some(format!("{e:#}")),
                ..Outcome::default()
            },
            Err(_) => Outcome {
                error: Some("deadline passed on the client".into()),
                ..Outcome::default()
            },
        };
        out.ttft = *first.lock().unwrap_or_else(|e| e.into_inner());
        if out.error.is_none() && t.elapsed() > limit {
            out.error = Some("finished after its deadline".into());
            out.done = None;
        }
        out
    }
}

impl SkepSide {
    async fn job(
        &self,
        job: &JobSpec,
        limit: Duration,
        t: Instant,
        first: &std::sync::Mutex<Option<Duration>>,
    ) -> anyhow::Result<Outcome> {
        let mut req = tonic::Request::new(SubmitRequest {
            model: self.model.clone(),
            prompt: job.prompt.clone(),
            max_tokens: job.max_tokens,
            deadline_ms: u64::try_from(limit.as_millis())?,
            ..Default::default()
        });
        req.metadata_mut()
            .insert("authorization", self.bearer.clone());
        req.set_timeout(limit);
        let mut client = self.client.clone();
        let mut stream = client.submit(req).await?.into_inner();
        while let Some(ev) = stream.message().await? {
            match ev.kind {
                Some(job_event::Kind::Token(_)) => {
                    let mut f = first.lock().unwrap_or_else(|e| e.into_inner());
                    f.get_or_insert(t.elapsed());
                }
                Some(job_event::Kind::Done(d)) => {
                    return Ok(Outcome {
                        done: Some(t.elapsed()),
                        tokens: d.tokens,
                        prompt_tokens: Some(d.prompt_tokens),
                        ..Outcome::default()
                    });
                }
                Some(job_event::Kind::Error(e)) => anyhow::bail!("job failed: {}", e.message),
                _ => {}
            }
        }
        anyhow::bail!("stream ended without a result")
    }
}

/// Starts `llama-server` on a free loopback port and waits until it answers `/health`.
fn start_llama(bin: &Path, model: &Path, slots: usize, threads: usize) -> anyhow::Result<Server> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let log = std::env::temp_dir().join(format!("skep-bench-llama-server-{port}.log"));
    let child = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(["-np", &slots.to_string()])
        .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
        .args(["-c", &(slots * CTX_PER_SLOT).to_string()])
        .args(["--cont-batching", "--host", "127.0.0.1"])
        .args(["--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut server = Server::Llama { child, addr };
    let t = Instant::now();
    loop {
        if health_ok(addr) {
            return Ok(server);
        }
        if let Server::Llama { child, .. } = &mut server
            && let Some(status) = child.try_wait()?
        {
            anyhow::bail!("llama-server exited ({status}); see {}", log.display());
        }
        anyhow::ensure!(
            t.elapsed() < START_WAIT,
            "llama-server not healthy after {START_WAIT:?}; see {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether llama-server answers `GET /health` with 200 (it answers 503 while loading).
fn health_ok(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(conn, "GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").is_err() {
        return false;
    }
    let mut raw = String::new();
    let _ = conn.read_to_string(&mut raw);
    raw.lines()
        .next()
        .is_some_and(|l| l.split_whitespace().nth(1) == Some("200"))
}

/// One job on llama-server: `POST /completion` with the prompt's ids, streamed as server-sent
/// events; the first content event is the first token, the event with `"stop": true` the end.
async fn llama_job(
    addr: SocketAddr,
    job: &JobSpec,
    t: Instant,
    first: &std::sync::Mutex<Option<Duration>>,
) -> anyhow::Result<Outcome> {
    let body = serde_json::json!({
        "prompt": *job.ids,
        "n_predict": job.max_tokens,
        "stream": true,
        "cache_prompt": false,
        "temperature": 0.0,
        "top_k": 1,
    })
    .to_string();
    let conn = tokio::net::TcpStream::connect(addr).await?;
    conn.set_nodelay(true)?;
    let mut conn = BufReader::new(conn);
    let head = format!(
        "POST /completion HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.get_mut().write_all(head.as_bytes()).await?;
    conn.get_mut().write_all(body.as_bytes()).await?;
    let mut line = String::new();
    conn.read_line(&mut line).await?;
    anyhow::ensure!(
        line.split_whitespace().nth(1) == Some("200"),
        "llama-server answered {}",
        line.trim()
    );
    let mut chunked = false;
    loop {
        line.clear();
        anyhow::ensure!(conn.read_line(&mut line).await? > 0, "headers cut short");
        if line.trim().is_empty() {
            break;
        }
        let l = line.to_ascii_lowercase();
        chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
    }
    // Server-sent events, possibly split across HTTP chunks: whole events end with a blank line.
    let mut events = Vec::<u8>::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if chunked {
            line.clear();
            anyhow::ensure!(conn.read_line(&mut line).await? > 0, "stream cut short");
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            if size == 0 {
                anyhow::bail!("stream ended without a final event");
            }
            buf.resize(size + 2, 0);
            conn.read_exact(&mut buf).await?;
            buf.truncate(size);
        } else {
            buf.resize(4096, 0);
            let n = conn.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "stream ended without a final event");
            buf.truncate(n);
        }
        events.extend_from_slice(&buf);
        while let Some(end) = events.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = events.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let Some(data) = text.trim().strip_prefix("data: ") else {
                continue;
            };
            let v: serde_json::Value =
                serde_json::from_str(data).with_context(|| format!("bad event {data:?}"))?;
            if let Some(e) = v.get("error") {
                anyhow::bail!("llama-server: {e}");
            }
            if v["stop"].as_bool() == Some(true) {
                let n = |k: &str| v[k].as_u64().and_then(|x| u32::try_from(x).ok());
                return Ok(Outcome {
                    done: Some(t.elapsed()),
                    tokens: n("tokens_predicted").unwrap_or(0),
                    prompt_tokens: n("tokens_evaluated"),
                    ..Outcome::default()
                });
            }
            let mut f = first.lock().unwrap_or_else(|e| e.into_inner());
            f.get_or_insert(t.elapsed());
        }
    }
}

/// PSS of process `pid` in bytes (0 when it is gone).
fn pss(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("Pss:"))?;
            l.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib * 1024.0)
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / f64::from(1 << 20))
}
