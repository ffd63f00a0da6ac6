//! `skep-bench`: measures skep against baselines taken in the same run and writes the report.
//!
//! Run through `scripts/bench.sh` (release build); `--only a,b` runs some sections and replaces
//! just those in the report. Sections:
//! - `round-trip`: a 1-token synthetic job client → queen → pool → worker → back, against a bare
//!   tonic unary echo and a bare two-hop tonic streaming relay on loopback.
//! - `lanes`, `constant-time`, `audit`: SHM lanes, token comparison, audit log appends.
//! - `deadline-soak`: thousands of jobs with mixed deadlines from closed-loop clients against a
//!   small pool; outcome shares, late completions (must be 0) and admission overhead.
//! - `chaos`: thousands of jobs over three pools while one is SIGKILLed and restarted, against
//!   the same load without the kill; accepted, completed, retried, lost (must be 0).
//! - `models`: load time, peak RSS, prompt and generation speed of SmolLM2 and Gemma 3, skep end
//!   to end vs the engine alone vs llama.cpp, and the engine next to `llama-bench` pp512 / tg128
//!   (see `models.rs`).
//! - `throughput`, `paced`, `soak-oracle`, `admission-time`: open-loop load from `skep-load`
//!   (see `load_sections.rs`).
//!
//! `skep-bench memory --model-path FILE` is a subcommand of its own: the PSS of a pool of 1 and
//! of 4 workers on one model file (see `memory.rs`). So is `skep-bench batch --model-path FILE`:
//! many jobs at once against llama.cpp's server (see `batch.rs`).

mod batch;
mod load_sections;
mod memory;
mod models;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use skep_integration::report::{self, Figure, Samples, Section};
use skep_integration::{Cluster, PoolOpts};
use skep_proto::v1::echo_client::EchoClient;
use skep_proto::v1::echo_server::{Echo, EchoServer};
use skep_proto::v1::stream_echo_client::StreamEchoClient;
use skep_proto::v1::stream_echo_server::{StreamEcho, StreamEchoServer};
use skep_proto::v1::{EchoMessage, SubmitRequest, job_event};
use tonic::{Request, Response, Status};

#[derive(Parser, Debug)]
struct Args {
    /// Where BENCHMARKS.md and benchmarks.json go.
    #[arg(long, default_value = "docs")]
    out: PathBuf,
    /// Date stamped on every figure (YYYY-MM-DD).
    #[arg(long)]
    date: String,
    /// Round trips per measurement.
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    /// Jobs in the deadline soak.
    #[arg(long, default_value_t = 3000)]
    soak_jobs: usize,
    /// Jobs in each run of the chaos load.
    #[arg(long, default_value_t = 5000)]
    load_jobs: usize,
    /// llama.cpp reference tool (`scripts/llama-cpp/build.sh` prints its path).
    #[arg(long, requires = "llama_bench")]
    llama_ref: Option<PathBuf>,
    /// llama.cpp's `llama-bench` from the same build (installed beside the reference tool).
    #[arg(long, requires = "llama_ref")]
    llama_bench: Option<PathBuf>,
    /// Sections to run, comma separated (default: all). A partial run replaces only its own
    /// sections of the report and keeps the others.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Bench>,
    #[command(flatten)]
    open: load_sections::OpenLoopArgs,
}

/// The sections of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Bench {
    RoundTrip,
    Lanes,
    ConstantTime,
    Audit,
    DeadlineSoak,
    Chaos,
    Models,
    Throughput,
    Paced,
    SoakOracle,
    AdmissionTime,
}

/// Warm-up calls before every round-trip measurement, skep's and the baselines' alike.
const WARM_UP: usize = 200;

struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, req: Request<EchoMessage>) -> Result<Response<EchoMessage>, Status> {
        Ok(Response::new(req.into_inner()))
    }
}

fn main() -> anyhow::Result<()> {
    // `skep-bench memory ...`: a subcommand with its own flags (memory.rs).
    if std::env::args_os().nth(1).is_some_and(|a| a == "memory") {
        return memory::main(std::env::args_os().skip(1));
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "batch") {
        return batch::main(std::env::args_os().skip(1));
    }
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let machine = machine();
    let want = |b: Bench| args.only.is_empty() || args.only.contains(&b);
    let mut sections = Vec::new();
    let mut job_p50_us = None;
    if want(Bench::RoundTrip) {
        let (section, p50) = rt.block_on(round_trip(args.iterations))?;
        sections.push(section);
        job_p50_us = Some(p50);
    }
    if want(Bench::Lanes) {
        sections.push(lanes(20_000)?);
    }
    if want(Bench::ConstantTime) {
        sections.push(constant_time(200_000));
    }
    if want(Bench::Audit) {
        sections.push(audit_append(20_000, job_p50_us)?);
    }
    if want(Bench::DeadlineSoak) {
        sections.push(rt.block_on(deadline_soak(args.soak_jobs))?);
    }
    if want(Bench::Chaos) {
        sections.push(chaos_load(args.load_jobs));
    }
    if want(Bench::Models) {
        let llama = args
            .llama_ref
            .clone()
            .zip(args.llama_bench.clone())
            .map(|(reference, bench)| models::Llama { reference, bench });
        sections.extend(models::models(llama.as_ref(), &rt)?);
    }
    if want(Bench::Throughput) {
        sections.push(load_sections::throughput(&args.open)?);
    }
    if want(Bench::Paced) {
        sections.push(load_sections::paced(&args.open)?);
    }
    if want(Bench::SoakOracle) {
        sections.push(load_sections::soak_oracle(&args.open)?);
    }
    if want(Bench::AdmissionTime) {
        sections.push(rt.block_on(load_sections::admission_time(args.iterations))?);
    }
    if args.only.is_empty() {
        report::write(&args.out, &args.date, &machine, &sections)?;
    } else {
        report::update(&args.out, &args.date, &machine, &sections)?;
    }
    println!(
        "wrote {}/BENCHMARKS.md and benchmarks.json",
        args.out.display()
    );
    Ok(())
}

/// Why the round trip is above its target, from a profile of this build (see ARCHITECTURE.md for
/// the path): stated with the figures so the gap is never silent.
const ROUND_TRIP_GAP: &str = "Where the time goes: a 1-token job crosses four processes and about \
    ten thread hand-offs (client → queen tokio worker → dispatch actor (actix thread) → session \
    task → pool session reader → slot thread → worker (futex) → slot thread → pool frame writer → \
    queen session task → dispatch actor → store writer thread → client), each a futex wake-up on \
    two shared cores, plus the terminal state's SQLite commit, which by design comes before \
    `done`. The echo and the relay cross one process and no thread hand-off of their own.";

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

async fn echo_baseline(n: usize) -> anyhow::Result<Samples> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService))
            .serve_with_incoming(skep_common::daemon::incoming(listener)),
    );
    let mut client = EchoClient::connect(format!("http://{addr}")).await?;
    let msg = || EchoMessage {
        payload: vec![b'x'; 8],
    };
    for _ in 0..WARM_UP {
        let back = client.echo(msg()).await?.into_inner();
        anyhow::ensure!(back == msg(), "echo answered {back:?}");
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let back = client.echo(msg()).await?.into_inner();
        anyhow::ensure!(back.payload.len() == 8, "echo answered {back:?}");
        v.push(t.elapsed());
    }
    Ok(Samples::new(v))
}

async fn skep_round_trips(cluster: &Cluster, n: usize) -> anyhow::Result<Samples> {
    let client = cluster.jobs_client().await;
    // The header is built once: reading the token file per call would be timed with the job.
    let bearer: tonic::metadata::MetadataValue<_> = cluster
        .authed(())
        .metadata()
        .get("authorization")
        .context("no authorization header")?
        .clone();
    let one = |client: &skep_proto::v1::jobs_client::JobsClient<_>| {
        let mut req = Request::new(SubmitRequest {
            model: "synthetic".into(),
            prompt: "ping".into(),
            max_tokens: 1,
            deadline_ms: 10_000,
            ..Default::default()
        });
        req.metadata_mut().insert("authorization", bearer.clone());
        req.set_timeout(Duration::from_secs(10));
        let mut client = Clone::clone(client);
        async move {
            let mut s = client.submit(req).await?.into_inner();
            while let Some(ev) = s.message().await? {
                if let Some(job_event::Kind::Done(d)) = ev.kind {
                    // The same work as the baselines: one answer, checked.
                    if d.tokens != 1 {
                        return Err(Status::internal(format!("{} tokens, not 1", d.tokens)));
                    }
                    return Ok::<_, Status>(());
                }
            }
            Err(Status::internal("stream ended without done"))
        }
    };
    for _ in 0..WARM_UP {
        one(&client).await?;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        one(&client).await?;
        v.push(t.elapsed());
    }
    Ok(Samples::new(v))
}

/// The backend of the two-hop baseline: one message back, on a server stream.
struct StreamBackend;

type EchoStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<EchoMessage, Status>> + Send>>;

#[tonic::async_trait]
impl StreamEcho for StreamBackend {
    type StreamStream = EchoStream;

    async fn stream(
        &self,
        req: Request<EchoMessage>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(
            req.into_inner()
        )))))
    }
}

/// The relay of the two-hop baseline: calls the backend over one connection and forwards its
/// stream as it comes, as the queen forwards a pool's.
struct StreamRelay {
    backend: StreamEchoClient<tonic::transport::Channel>,
}

#[tonic::async_trait]
impl StreamEcho for StreamRelay {
    type StreamStream = EchoStream;

    async fn stream(
        &self,
        req: Request<EchoMessage>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut backend = self.backend.clone();
        let upstream = backend.stream(req.into_inner()).await?.into_inner();
        Ok(Response::new(Box::pin(upstream)))
    }
}

/// client → relay → backend, one server-streaming call of one 8-byte message each, sequential
/// on one connection, timed until the message arrives (as skep's is until `done`).
async fn relay_baseline(n: usize) -> anyhow::Result<Samples> {
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(StreamEchoServer::new(StreamBackend))
            .serve_with_incoming(skep_common::daemon::incoming(backend)),
    );
    let upstream = tonic::transport::Endpoint::from_shared(format!("http://{backend_addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let relay_addr = relay.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(StreamEchoServer::new(StreamRelay {
                backend: StreamEchoClient::new(upstream),
            }))
            .serve_with_incoming(skep_common::daemon::incoming(relay)),
    );
    let client = StreamEchoClient::connect(format!("http://{relay_addr}")).await?;
    let payload = vec![b'x'; 8];
    let one = |client: &StreamEchoClient<tonic::transport::Channel>| {
        let mut client = client.clone();
        let msg = EchoMessage {
            payload: payload.clone(),
        };
        let want = payload.clone();
        async move {
            let mut s = client.stream(msg).await?.into_inner();
            match s.message().await? {
                Some(m) if m.payload == want => Ok(()),
                other => Err(anyhow::anyhow!("relay answered {other:?}")),
            }
        }
    };
    for _ in 0..WARM_UP {
        one(&client).await?;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        one(&client).await?;
        v.push(t.elapsed());
    }
    Ok(Samples::new(v))
}

async fn round_trip(n: usize) -> anyhow::Result<(Section, f64)> {
    // The cluster is up (idle) while the baselines run, so all three share the machine's load.
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start(PoolOpts {
            workers: 1,
            ttft: "0ms".into(),
            tps: 0.0,
            ..PoolOpts::default()
        })
    })
    .await?;
    let echo = echo_baseline(n).await.context("echo baseline")?;
    let relay = relay_baseline(n).await.context("relay baseline")?;
    let skep = skep_round_trips(&cluster, n)
        .await
        .context("skep round trips")?;
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    let fig = |name: &str, p: f64, base: &str, b: &Samples| Figure {
        name: name.into(),
        value: skep.pct_us(p),
        unit: "µs".into(),
        baseline: base.into(),
        baseline_value: b.pct_us(p),
    };
    let job_p50_us = skep.pct_us(50.0);
    let target = if skep.pct_us(50.0) <= 3.0 * echo.pct_us(50.0) {
        "met"
    } else {
        "**not met**"
    };
    let section = Section {
        title: "Round trip of a 1-token job".into(),
        method: format!(
            "{n} sequential 1-token jobs on the synthetic engine (unpaced: no time to first token, \
             no token pace) through the real binaries: client → queen (auth, admission, \
             persistence, scheduling) → pool manager (auth, SHM request lane) → worker → SHM \
             response lane → back, timed from Submit to the `done` event. Baselines, in the same \
             run with the cluster up and idle, same client shape (one connection, sequential \
             calls, {WARM_UP} warm-up calls each): a bare tonic unary echo (8-byte payload), and \
             a bare two-hop tonic streaming relay (client → relay → backend, the backend's \
             server stream of one 8-byte message forwarded by the relay as it comes, timed until \
             the message arrives; relay and backend in the bench process). Every answer is \
             checked (1 token; the payload back). Target: p50 ≤ 3× the echo ({target})."
        ),
        notes: vec![ROUND_TRIP_GAP.into()],
        figures: vec![
            fig(
                "job_round_trip_1_token_p50",
                50.0,
                "tonic_unary_echo_p50",
                &echo,
            ),
            fig(
                "job_round_trip_1_token_p99",
                99.0,
                "tonic_unary_echo_p99",
                &echo,
            ),
            fig(
                "job_round_trip_1_token_p50",
                50.0,
                "tonic_two_hop_stream_relay_p50",
                &relay,
            ),
            fig(
                "job_round_trip_1_token_p99",
                99.0,
                "tonic_two_hop_stream_relay_p99",
                &relay,
            ),
        ],
    };
    Ok((section, job_p50_us))
}

/// Ping-pong between two threads over a pair of SHM lanes, a Unix socket pair and loopback TCP,
/// for 64 B and 4 KiB entries.
fn lanes(n: usize) -> anyhow::Result<Section> {
    let mut figures = Vec::new();
    for size in [64usize, 4096] {
        let lane = lane_ping_pong(n, size)?;
        let (a, b) = std::os::unix::net::UnixStream::pair()?;
        let unix = stream_ping_pong(n, size, a, b)?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let a = std::net::TcpStream::connect(listener.local_addr()?)?;
        let (b, _) = listener.accept()?;
        a.set_nodelay(true)?;
        b.set_nodelay(true)?;
        let tcp = stream_ping_pong(n, size, a, b)?;
        let label = if size == 64 { "64B" } else { "4KiB" };
        for (p, tag) in [(50.0, "p50"), (99.0, "p99")] {
            for (base, name) in [(&unix, "unix_socket"), (&tcp, "loopback_tcp")] {
                figures.push(Figure {
                    name: format!("lane_round_trip_{label}_{tag}"),
                    value: lane.pct_us(p),
                    unit: "µs".into(),
                    baseline: format!("{name}_round_trip_{label}_{tag}"),
                    baseline_value: base.pct_us(p),
                });
            }
        }
    }
    Ok(Section {
        title: "SHM lane round trip".into(),
        method: format!(
            "{n} round trips of one entry between two threads, after 1000 warm-up trips: pushed \
             into a request lane, popped and pushed back through a response lane (bounded spin, \
             then futex wait). Baselines, same machine and run: the same ping-pong over a Unix \
             socket pair and over loopback TCP (`TCP_NODELAY`). With only 2 cores shared with the \
             rest of the machine, a waiting side that has to sleep dominates the tail."
        ),
        figures,
        notes: vec![],
    })
}

fn lane_ping_pong(n: usize, size: usize) -> anyhow::Result<Samples> {
    use skep_lane::{Lane, LaneConfig};
    let dir = std::env::temp_dir().join(format!("skep-bench-lanes-{}-{size}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg = LaneConfig::default();
    let req = Lane::create(&dir.join("req"), cfg, 1)?;
    let resp = Lane::create(&dir.join("resp"), cfg, 1)?;
    let (req_w, resp_w) = (
        Lane::open(&dir.join("req"), 1)?,
        Lane::open(&dir.join("resp"), 1)?,
    );
    let total = n + 1000;
    let echo = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut buf = Vec::new();
        for _ in 0..total {
            while !req_w.pop_timeout(&mut buf, Duration::from_millis(100))? {}
            resp_w.push_timeout(&buf, Duration::from_secs(1))?;
        }
        Ok(())
    });
    let payload = vec![7u8; size];
    let mut buf = Vec::new();
    let mut samples = Vec::with_capacity(n);
    for i in 0..total {
        let t = Instant::now();
        req.push_timeout(&payload, Duration::from_secs(1))?;
        while !resp.pop_timeout(&mut buf, Duration::from_millis(100))? {}
        if i >= 1000 {
            samples.push(t.elapsed());
        }
    }
    echo.join()
        .map_err(|_| anyhow::anyhow!("lane echo thread panicked"))??;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Samples::new(samples))
}

fn stream_ping_pong<S>(n: usize, size: usize, mut a: S, mut b: S) -> anyhow::Result<Samples>
where
    S: std::io::Read + std::io::Write + Send + 'static,
{
    let total = n + 1000;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut m = vec![0u8; size];
        for _ in 0..total {
            b.read_exact(&mut m)?;
            b.write_all(&m)?;
        }
        Ok(())
    });
    let payload = vec![7u8; size];
    let mut m = vec![0u8; size];
    let mut samples = Vec::with_capacity(n);
    for i in 0..total {
        let t = Instant::now();
        a.write_all(&payload)?;
        a.read_exact(&mut m)?;
        if i >= 1000 {
            samples.push(t.elapsed());
        }
    }
    echo.join()
        .map_err(|_| anyhow::anyhow!("socket echo thread panicked"))??;
    Ok(Samples::new(samples))
}

/// Audit append throughput against a plain line append, and what it adds to a job.
fn audit_append(n: usize, job_p50_us: Option<f64>) -> anyhow::Result<Section> {
    use skep_audit::{AuditKey, AuditLog, AuditOptions, Fields, FsyncPolicy};
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("skep-bench-audit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let key = AuditKey::load_or_create(&dir.join("key"))?;
    let opts = AuditOptions {
        fsync: FsyncPolicy::Never,
        ..AuditOptions::default()
    };
    let mut log = AuditLog::open(&dir.join("log"), key, opts)?;
    let fields = || {
        Fields::new()
            .job("6f1c2a9e-0000-4000-8000-000000000000")
            .model("smollm2")
            .num("tokens", 42)
    };
    let t = Instant::now();
    for _ in 0..n {
        log.append("job.completed", "a1b2c3", fields())?;
    }
    let audit_s = t.elapsed().as_secs_f64();
    let mut plain = std::io::BufWriter::new(std::fs::File::create(dir.join("plain.jsonl"))?);
    let line = serde_json::json!({"event": "job.completed", "actor": "a1b2c3", "fields": fields().into_map()}).to_string();
    let t = Instant::now();
    for _ in 0..n {
        plain.write_all(line.as_bytes())?;
        plain.write_all(b"\n")?;
        plain.flush()?;
    }
    let plain_s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    let per_event_us = audit_s * 1e6 / n as f64;
    let mut figures = vec![Figure {
        name: "audit_append_throughput".into(),
        value: n as f64 / audit_s,
        unit: "events/s".into(),
        baseline: "plain_line_append_throughput".into(),
        baseline_value: n as f64 / plain_s,
    }];
    // Only against a round trip measured in this run; a partial run without it leaves it out.
    if let Some(job_p50_us) = job_p50_us {
        figures.push(Figure {
            name: "audit_cost_per_job".into(),
            value: 3.0 * per_event_us,
            unit: "µs".into(),
            baseline: "job_round_trip_1_token_p50".into(),
            baseline_value: job_p50_us,
        });
    }
    Ok(Section {
        title: "Audit log".into(),
        method: format!(
            "{n} `job.completed` entries appended to the hash-chained, HMAC-signed audit log \
             (fsync policy `Never`, as fsyncs are batched with checkpoints in the queen), against \
             appending the same JSON line to a plain file with a flush per line, in the same run. \
             A job writes 3 audit entries (submitted, dispatched, completed); their cost is \
             compared with the 1-token job round trip measured in the same run (when it is run)."
        ),
        figures,
        notes: vec![],
    })
}

/// How one soak job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    InTime,
    Late,
    RejectedEarly,
    ExceededInFlight,
    Other,
}

struct SoakResult {
    outcome: Outcome,
    admission_us: Option<u64>,
    /// For failures outside the expected kinds: the status, to report them.
    detail: Option<String>,
}

async fn soak_job(
    client: skep_proto::v1::jobs_client::JobsClient<tonic::transport::Channel>,
    mut req: Request<SubmitRequest>,
    budget: Duration,
) -> SoakResult {
    req.set_timeout(budget);
    let mut client = client;
    let mut accepted = false;
    let mut stream = match client.submit(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => return soak_err(&s, accepted),
    };
    loop {
        match stream.message().await {
            Ok(Some(ev)) => match ev.kind {
                Some(job_event::Kind::Accepted(_)) => accepted = true,
                Some(job_event::Kind::Done(d)) => {
                    let t = d.timings.unwrap_or_default();
                    // Judged on the queen's clock: total time from arrival vs the budget.
                    let outcome = if Duration::from_micros(t.total_us) <= budget {
                        Outcome::InTime
                    } else {
                        Outcome::Late
                    };
                    return SoakResult {
                        outcome,
                        admission_us: Some(t.admission_us),
                        detail: None,
                    };
                }
                _ => {}
            },
            Ok(None) => {
                return SoakResult {
                    outcome: Outcome::Other,
                    admission_us: None,
                    detail: Some("stream ended without a result".into()),
                };
            }
            Err(s) => return soak_err(&s, accepted),
        }
    }
}

fn soak_err(s: &Status, accepted: bool) -> SoakResult {
    use tonic::Code;
    let outcome = match (s.code(), accepted) {
        (Code::DeadlineExceeded | Code::ResourceExhausted, false) => Outcome::RejectedEarly,
        (Code::DeadlineExceeded, true) => Outcome::ExceededInFlight,
        _ => Outcome::Other,
    };
    let detail = (outcome == Outcome::Other).then(|| format!("{:?}: {}", s.code(), s.message()));
    SoakResult {
        outcome,
        admission_us: None,
        detail,
    }
}

async fn deadline_soak(n: usize) -> anyhow::Result<Section> {
    const CONCURRENCY: usize = 16;
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start(PoolOpts {
            workers: 2,
            ttft: "2ms".into(),
            tps: 500.0,
            ..PoolOpts::default()
        })
    })
    .await?;
    let client = cluster.jobs_client().await;
    // A fixed pseudo-random mix (xorshift), so every run offers the same load.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let jobs: Vec<(u32, Duration)> = (0..n)
        .map(|_| {
            let tokens = 1 + (next() % 40) as u32;
            let budget = Duration::from_millis(10 + next() % 390);
            (tokens, budget)
        })
        .collect();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::with_capacity(n);
    let started = Instant::now();
    for (tokens, budget) in jobs {
        let permit = std::sync::Arc::clone(&sem).acquire_owned().await?;
        let req = cluster.authed(SubmitRequest {
            model: "synthetic".into(),
            prompt: format!("soak {tokens}"),
            max_tokens: tokens,
            deadline_ms: budget.as_millis() as u64,
            ..Default::default()
        });
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let r = soak_job(client, req, budget).await;
            drop(permit);
            r
        }));
    }
    let mut results = Vec::with_capacity(n);
    for t in tasks {
        results.push(t.await?);
    }
    let wall = started.elapsed();
    // Each worker stop at a deadline is logged by the pool with how far past it the worker ran.
    let pool_log = std::fs::read_to_string(cluster.dir.join("pool0.log")).unwrap_or_default();
    let overruns: Vec<Duration> = pool_log
        .lines()
        .filter(|l| l.contains("worker stopped at the deadline"))
        .filter_map(|l| {
            l.split("overrun_us=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .map(Duration::from_micros)
        .collect();
    let overrun_max = overruns.iter().max().copied().unwrap_or_default();
    let overrun_count = overruns.len();
    let overruns = Samples::new(overruns);
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    let count = |o| results.iter().filter(|r| r.outcome == o).count();
    let share = |c: usize| 100.0 * c as f64 / n as f64;
    let admission = Samples::new(
        results
            .iter()
            .filter_map(|r| r.admission_us)
            .map(Duration::from_micros)
            .collect(),
    );
    let echo = echo_baseline(2000).await?;
    let (in_time, late, early, flight, other) = (
        count(Outcome::InTime),
        count(Outcome::Late),
        count(Outcome::RejectedEarly),
        count(Outcome::ExceededInFlight),
        count(Outcome::Other),
    );
    Ok(Section {
        title: "Deadline soak".into(),
        method: format!(
            "{n} synthetic jobs (1–40 tokens, deadlines 10–400ms, fixed pseudo-random mix) from \
             {CONCURRENCY} concurrent clients against one pool of 2 workers (2ms to first token, \
             500 tokens/s). Outcomes are judged on the queen's clock (its per-hop timings against \
             the job's budget). Admission overhead is the queen's `admission_us` (arrival to \
             admitted, including auth, validation and the dispatch core's decision), compared with a \
             bare tonic unary echo round trip measured in the same run. Wall time: {:.1}s.",
            wall.as_secs_f64()
        ),
        figures: vec![
            Figure {
                name: "worker_time_past_deadline_p99".into(),
                value: if overruns.is_empty() {
                    0.0
                } else {
                    overruns.pct_us(99.0)
                },
                unit: "µs".into(),
                baseline: "synthetic_token_interval".into(),
                baseline_value: 2000.0,
            },
            Figure {
                name: "admission_overhead_p50".into(),
                value: admission.pct_us(50.0),
                unit: "µs".into(),
                baseline: "tonic_unary_echo_p50".into(),
                baseline_value: echo.pct_us(50.0),
            },
            Figure {
                name: "admission_overhead_p99".into(),
                value: admission.pct_us(99.0),
                unit: "µs".into(),
                baseline: "tonic_unary_echo_p99".into(),
                baseline_value: echo.pct_us(99.0),
            },
        ],
        notes: vec![
            "| outcome | jobs | share |".into(),
            "|---|---:|---:|".into(),
            format!("| finished in time | {in_time} | {:.1}% |", share(in_time)),
            format!(
                "| rejected early (infeasible or queue full) | {early} | {:.1}% |",
                share(early)
            ),
            format!(
                "| deadline exceeded in flight (stopped at the deadline) | {flight} | {:.1}% |",
                share(flight)
            ),
            format!(
                "| **late completions (must be 0)** | {late} | {:.1}% |",
                share(late)
            ),
            format!("| other failures | {other} | {:.1}% |", share(other)),
            String::new(),
            other_details(&results),
            String::new(),
            format!(
                "Worker time past a deadline: {overrun_count} worker stops at a deadline logged by \
                 the pool, longest {}µs. The worker checks the deadline before every token and the \
                 synthetic engine never waits past it, so what remains is wake-up latency on a \
                 loaded machine; a real model's token step cannot be interrupted, so there the \
                 bound is one token.",
                overrun_max.as_micros()
            ),
        ],
    })
}

/// The distinct "other" failures of a soak, with counts, so none hides behind a percentage.
fn other_details(results: &[SoakResult]) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for d in results.iter().filter_map(|r| r.detail.as_deref()) {
        *counts.entry(d.to_owned()).or_insert(0usize) += 1;
    }
    if counts.is_empty() {
        return "No other failures.".into();
    }
    let list: Vec<String> = counts.iter().map(|(d, n)| format!("{n} × `{d}`")).collect();
    format!("Other failures: {}.", list.join("; "))
}

/// Welch's t statistic between two samples (dudect's leakage test).
fn welch_t(a: &[f64], b: &[f64]) -> f64 {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let var =
        |v: &[f64], m: f64| v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() as f64 - 1.0);
    let (ma, mb) = (mean(a), mean(b));
    let (va, vb) = (var(a, ma), var(b, mb));
    (ma - mb) / (va / a.len() as f64 + vb / b.len() as f64).sqrt()
}

/// dudect-style check that comparing token digests does not leak where they differ: time many
/// comparisons against an early mismatch and a late mismatch, interleaved at random, and compute
/// |t| between the two classes; a naive `==` on the raw token strings is the control.
fn constant_time(n: usize) -> Section {
    use skep_common::auth::TokenDigest;
    use std::hint::black_box;
    const BATCH: usize = 32;
    let secret = format!("skep_{}", "a".repeat(64));
    let mut early = secret.clone().into_bytes();
    early[5] = b'b';
    let mut late = secret.clone().into_bytes();
    let last = late.len() - 1;
    late[last] = b'b';
    let (early, late) = (
        String::from_utf8(early).unwrap_or_default(),
        String::from_utf8(late).unwrap_or_default(),
    );
    let known = TokenDigest::of(&secret);
    // Digests that differ from the known one in their first and in their last byte.
    let mut d_early = known.to_hex().into_bytes();
    d_early[0] = if d_early[0] == b'0' { b'1' } else { b'0' };
    let mut d_late = known.to_hex().into_bytes();
    let l = d_late.len() - 1;
    d_late[l] = if d_late[l] == b'0' { b'1' } else { b'0' };
    let parse = |v: Vec<u8>| {
        String::from_utf8(v)
            .ok()
            .and_then(|h| TokenDigest::from_hex(&h))
    };
    let (Some(d_early), Some(d_late)) = (parse(d_early), parse(d_late)) else {
        return Section {
            title: "Constant-time token comparison".into(),
            method: "could not build inputs".into(),
            ..Section::default()
        };
    };
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut coin = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x & 1 == 1
    };
    let mut measure = |f: &dyn Fn(bool) -> bool| {
        let (mut a, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..2 * n {
            let class = coin();
            let t = Instant::now();
            for _ in 0..BATCH {
                black_box(f(black_box(class)));
            }
            let ns = t.elapsed().as_nanos() as f64;
            if class { a.push(ns) } else { b.push(ns) }
        }
        // dudect crops the slowest measurements (interrupts, migrations) before testing.
        let crop = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.truncate(v.len() * 95 / 100);
        };
        crop(&mut a);
        crop(&mut b);
        welch_t(&a, &b).abs()
    };
    // Both candidates sit side by side and are picked by index, so the two classes run the same
    // instructions on the same cache lines and differ only in where the mismatch is.
    let digests = [d_late, d_early];
    let strings = [late.as_str(), early.as_str()];
    let ct = measure(&|class| known.ct_eq(&digests[usize::from(class)]));
    let naive = measure(&|class| secret == strings[usize::from(class)]);
    Section {
        title: "Constant-time token comparison".into(),
        method: format!(
            "dudect-style leakage test: {n} measurements per class (each {BATCH} comparisons, \
             `black_box`ed, release build), classes interleaved at random, slowest 5% cropped, \
             Welch's |t| between an early mismatch (first byte differs) and a late mismatch (last \
             byte differs). skep compares SHA-256 digests with `subtle::ConstantTimeEq` \
             (`TokenDigest::ct_eq`); the control is a naive `==` on the raw token strings, in the \
             same run. |t| above ~4.5 is dudect's threshold for a timing leak. A short run on a \
             shared machine is indicative, not proof."
        ),
        figures: vec![Figure {
            name: "token_compare_ct_abs_t".into(),
            value: ct,
            unit: "|t|".into(),
            baseline: "naive_string_eq_abs_t".into(),
            baseline_value: naive,
        }],
        notes: vec![],
    }
}

/// The chaos load, and the same load without the kill as its baseline.
fn chaos_load(n: usize) -> Section {
    use skep_integration::load::{self, LoadPlan, LoadReport};
    let chaos_plan = LoadPlan::new(n);
    let calm_plan = LoadPlan {
        kill_after: None,
        ..chaos_plan.clone()
    };
    let calm = load::run(&calm_plan);
    let chaos = load::run(&chaos_plan);
    let rate = |r: &LoadReport| r.completed as f64 / r.wall.as_secs_f64();
    let codes = |m: &std::collections::BTreeMap<String, usize>| {
        if m.is_empty() {
            "none".to_owned()
        } else {
            m.iter()
                .map(|(c, n)| format!("{n} {c}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let row = |label: &str, r: &LoadReport| {
        format!(
            "| {label} | {} | {} | {} | {} | {} | {} | **{}** | {:.1}s |",
            r.offered,
            r.accepted,
            codes(&r.rejected),
            r.completed,
            r.retried,
            codes(&r.failed),
            r.lost,
            r.wall.as_secs_f64()
        )
    };
    let secs = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
    let p = &chaos_plan;
    Section {
        title: "Chaos load".into(),
        method: format!(
            "{n} synthetic jobs (4–16 tokens, {}s deadline) from {} concurrent clients over {} \
             pools of {} workers (2ms to first token, 1000 tokens/s). In the chaos run pool 0 is \
             SIGKILLed once a third of the jobs have ended (at {:.1}s) and started again {:.1}s \
             later on the same data dir (it rejoins with its node id and key). The baseline is \
             the same load without the kill, in the same run. A job is *lost* when the queen \
             accepted it and its stream ended without a terminal event, or when the queen's \
             record (`Jobs/Get`) disagrees with what the stream said; every accepted job is \
             checked. *Retried*: jobs that ran on more than one pool (the stream showed \
             attempt ≥ 2) — those running on the killed pool, and those dispatched to it in the \
             moment before a failed connection marked it suspect (it takes work again after its \
             next heartbeat).",
            p.deadline.as_secs(),
            p.concurrency,
            p.pools,
            p.workers_per_pool,
            secs(chaos.killed_at),
            p.down_for.as_secs_f64(),
        ),
        figures: vec![
            Figure {
                name: "chaos_load_throughput".into(),
                value: rate(&chaos),
                unit: "jobs/s".into(),
                baseline: "same_load_without_kill".into(),
                baseline_value: rate(&calm),
            },
            Figure {
                name: "chaos_load_lost_jobs".into(),
                value: chaos.lost as f64,
                unit: "jobs".into(),
                baseline: "jobs_accepted".into(),
                baseline_value: chaos.accepted as f64,
            },
        ],
        notes: vec![
            "| run | offered | accepted | rejected at admission | completed | retried | failed | lost | wall |".into(),
            "|---|---:|---:|---|---:|---:|---|---:|---:|".into(),
            row("without kill (baseline)", &calm),
            row("pool 0 killed and restarted", &chaos),
            String::new(),
            format!(
                "Restarted pool back and healthy at the end: {}. Completed jobs that did not get \
                 every token they asked for: {}.",
                if chaos.all_pools_back { "yes" } else { "**no**" },
                chaos.short
            ),
        ],
    }
}
