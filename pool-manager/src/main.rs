//! `skep-pool`: the pool manager daemon of one machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use skep_common::ratelimit::{DEFAULT_BAD_AUTH_QUOTA, Quota, RateLimits};
use skep_common::secret::Secret;
use skep_common::telemetry::{self, LogFormat};
use skep_common::{auth, daemon, validate};
use skep_lane::LaneConfig;
use skep_pool_manager::Speed;
use skep_pool_manager::audit::Audit;
use skep_pool_manager::device::{self, Device};
use skep_pool_manager::grpc::PoolService;
use skep_pool_manager::inventory;
use skep_pool_manager::membership::{self, Membership};
use skep_pool_manager::metrics::PoolMetrics;
use skep_pool_manager::models::{ModelSet, ModelSpec};
use skep_pool_manager::supervisor::{
    DEFAULT_BATCH, DEFAULT_PREFILL_CHUNK, Launch, Slots, spawn_pool,
};
use tokio::sync::watch;
use tracing::info;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum EngineKind {
    Synthetic,
    Gguf,
}

/// How long a stopping pool waits for its open streams (the queen's session among them) to end
/// before it closes them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A skep pool manager: runs jobs from the queen on this machine's workers.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// State directory (keys, audit). Created 0700 if missing.
    #[arg(long)]
    data_dir: PathBuf,
    /// The queen's gRPC URL, e.g. http://127.0.0.1:7700, or https://HOST:7700 for a queen that
    /// serves TLS (then this pool serves TLS to it too).
    #[arg(long)]
    queen: String,
    /// The queen's CA certificate (its <data-dir>/tls/ca.pem). Not needed when the token file
    /// is an enrollment token carrying the CA fingerprint, or once the CA is pinned.
    #[arg(long)]
    queen_ca: Option<PathBuf>,
    /// Address to serve the queen's Pool/Session on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// URL the queen should dial (default: http(s)://<bound listen address>).
    #[arg(long)]
    advertise: Option<String>,
    /// Token file (0600) this pool presents to the queen.
    #[arg(long)]
    token_file: PathBuf,
    /// An approval credential for `node.enroll` over the SHA-256 of this pool's --name
    /// (`skep approve node.enroll`), where the queen requires one. Used only to enroll.
    #[arg(long)]
    approval: Option<PathBuf>,
    /// Number of worker processes (per model served).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
    /// Jobs each worker process runs at once. The queen sees workers × batch slots, each
    /// predicted at the speed its worker measured with all of them busy.
    #[arg(long, default_value_t = DEFAULT_BATCH, value_parser = clap::value_parser!(u16).range(1..=64))]
    batch: u16,
    /// Prompt tokens a worker runs per step, so a long prompt stalls the jobs decoding beside
    /// it for one chunk at most.
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK, value_parser = clap::value_parser!(u32).range(1..=4096))]
    prefill_chunk: u32,
    /// Jobs each slot accepts waiting behind its running one (the credits announced to the
    /// queen at the start of every session).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=64))]
    credits_per_slot: u32,
    #[arg(long, value_enum, default_value = "synthetic")]
    engine: EngineKind,
    /// Where the workers run: cpu, cuda (the first GPU) or cuda:N. A GPU is checked at start
    /// (by the worker binary) and the pool refuses to start when it is not usable.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Models served, comma-separated: names from the queen's catalogue (fetched by content
    /// hash, like --model), or NAME=FILE for a local GGUF file; plain names for the synthetic
    /// engine. Each is loaded on demand and kept warm while the memory budget allows
    /// (docs/MODELS.md). Instead of --model/--model-path.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["model", "model_path"])]
    models: Vec<String>,
    /// Memory the warm models may take together (each model's weights once, plus every
    /// worker's own memory), e.g. 6G or 512M; 0 = no limit. Default: half of this machine's RAM.
    #[arg(long, value_parser = skep_pool_manager::models::parse_size)]
    memory_budget: Option<u64>,
    /// Model name served (default: "synthetic" for the synthetic engine, the file stem for gguf).
    #[arg(long)]
    model: Option<String>,
    /// GGUF model file for `--engine gguf`. Without it, the model named by `--model` is fetched
    /// from the queen's catalogue by content hash (see `skep model add`).
    #[arg(long)]
    model_path: Option<PathBuf>,
    /// Synthetic engine: time to first token (humantime, e.g. 20ms).
    #[arg(long, default_value = "20ms")]
    synthetic_ttft: String,
    /// Synthetic engine: tokens per second (0 = unpaced).
    #[arg(long, default_value_t = 200.0)]
    synthetic_tps: f64,
    /// Synthetic engine: another seed gives other text for the same prompt (failover tests).
    #[arg(long, default_value_t = 0)]
    synthetic_seed: u64,
    /// Synthetic engine: how long a worker takes to load its model (humantime).
    #[arg(long, default_value = "0ms")]
    synthetic_load: String,
    /// Synthetic engine: memory each worker holds as its model's weights, in MiB.
    #[arg(long, default_value_t = 0)]
    synthetic_weights_mib: u32,
    /// Name shown in `skep nodes list`.
    #[arg(long)]
    name: Option<String>,
    /// Worker binary (default: skep-worker next to this binary).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Allow a non-loopback `--listen` while the queen URL is plaintext `http://` (so this pool
    /// serves plaintext too). Keys and prompts then cross the network in clear; without this
    /// flag the pool refuses to start so.
    #[arg(long)]
    insecure_plaintext: bool,
    /// Failed authentications a source address (or one presented key) may make before it is
    /// throttled, e.g. 10/1m. The queen's own key is never throttled.
    #[arg(long, default_value_t = DEFAULT_BAD_AUTH_QUOTA)]
    bad_auth_limit: Quota,
    /// Refused calls of one source are audited once, then once per this interval with a count.
    #[arg(long, default_value = "10s", value_parser = daemon::parse_duration)]
    refusal_audit_interval: Duration,
    /// Most connections open at once (default: what the open-file limit allows, at most 16384).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Time a new connection has to send its HTTP/2 preface (or TLS hello) before it is closed.
    #[arg(long, default_value = "10s", value_parser = daemon::parse_duration)]
    preface_timeout: Duration,
    /// Serve Prometheus metrics as `GET /metrics` (plain HTTP, no token) on this address; off
    /// by default. Port 0 picks a free port (see <data-dir>/metrics.addr). Off loopback it needs
    /// --insecure-plaintext. See docs/METRICS.md.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    #[arg(long, default_value = "pretty")]
    log_format: LogFormat,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // This pool serves TLS exactly when its queen URL is https (see `membership::queen_ca`);
    // plaintext off loopback is refused unless --insecure-plaintext, before anything is created.
    let plaintext = !args.queen.starts_with("https://");
    auth::check_bind(args.listen, plaintext, args.insecure_plaintext)?;
    if let Some(addr) = args.metrics_listen {
        auth::check_bind(addr, true, args.insecure_plaintext)?;
    }
    // Before anything opens files: connections are files too.
    let fd_limit = daemon::raise_fd_limit();
    let mut conns = daemon::ConnLimits::for_fd_limit(fd_limit);
    conns.max = args.max_connections.unwrap_or(conns.max).max(1);
    conns.preface_timeout = args.preface_timeout;
    daemon::create_private_dir(&args.data_dir)?;
    // One pool manager per data dir, for the life of the process, before anything writes there:
    // two would fork the audit chain and share keys.
    let _lock = daemon::DataDirLock::acquire(&args.data_dir)?;
    let token_path = skep_common::secret::credential_path("pool-token", &args.token_file);
    // Checked now (mode, content) so a bad file fails at start, not on first enrollment.
    if !args.data_dir.join("runtime.key").exists() {
        Secret::from_file(&token_path)?;
    }

    let wanted = model_list(&args)?;
    let names: Vec<String> = wanted.iter().map(|w| w.name.clone()).collect();
    let program = match &args.worker_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("skep-worker"),
    };
    if !program.is_file() {
        bail!(
            "worker binary {} not found; build it or pass --worker-bin",
            program.display()
        );
    }
    // Before enrolling: a pool that cannot run its workers must not announce itself.
    let gpu = device::probe(&program, args.device)
        .await
        .context("refusing to start")?;
    if let Some(gpu) = &gpu {
        info!(device = %args.device, name = %gpu.name, memory_bytes = gpu.memory_bytes,
            compute_capability = %gpu.compute_capability, "workers run on a GPU");
    }

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    daemon::write_addr_file(&args.data_dir, local)?;
    let queen_ca = membership::queen_ca(
        &args.queen,
        &args.data_dir,
        args.queen_ca.as_deref(),
        &token_path,
    )
    .await?;
    let scheme = if queen_ca.is_some() { "https" } else { "http" };
    let pool_url = args
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{local}"));

    // The queen sees every worker as `batch` slots that each run one job at a time.
    let groups = usize::from(args.workers);
    let slots = groups * usize::from(args.batch);
    let work = Slots::batched(groups, usize::from(args.batch), args.credits_per_slot);
    let audit = Audit::start_with(&args.data_dir, args.refusal_audit_interval)
        .context("starting the audit log")?;
    let speed = Arc::new(Speed::default());
    let metrics = PoolMetrics::new();
    metrics.watch_slots(Arc::clone(&work));
    metrics.follow_warm_up(Arc::clone(&speed));
    if let Some(addr) = args.metrics_listen {
        start_metrics(&args.data_dir, addr, metrics.clone()).await?;
    }

    let (key_tx, key_rx) = watch::channel(None);
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("pool-{}", local.port()));
    validate::identifier("name", &name).context("--name")?;
    let member = Membership {
        queen_url: args.queen.clone(),
        bootstrap: token_path,
        data_dir: args.data_dir.clone(),
        name,
        pool_url: pool_url.clone(),
        slots,
        work: Arc::clone(&work),
        speed: Arc::clone(&speed),
        models: names.clone(),
        model_set: None,
        key: key_tx,
        queen_ca: queen_ca.clone(),
        approval: args.approval.clone(),
        metrics: metrics.clone(),
        gpu,
    };
    let mut member = member;
    let creds = member.join().await?;
    // A gguf model without a local file comes from the queen's catalogue, verified by hash,
    // before any worker starts: no worker ever loads a file the catalogue does not vouch for.
    let mut specs = Vec::with_capacity(wanted.len());
    for w in wanted {
        let path = match w.source {
            Source::Synthetic => None,
            Source::File(p) => Some(p),
            Source::Catalogue => {
                let models_dir = args.data_dir.join("models");
                let path = skep_pool_manager::provision::ensure(
                    &member,
                    &creds,
                    &w.name,
                    &models_dir,
                    &audit,
                )
                .await
                .inspect_err(|_| audit.flush(Duration::from_secs(2)))?;
                Some(path)
            }
        };
        let file_bytes = match &path {
            Some(p) => std::fs::metadata(p)
                .with_context(|| format!("model file {}", p.display()))?
                .len(),
            None => 0,
        };
        specs.push(ModelSpec {
            args: engine_args(&args, &w.name, path.as_deref()),
            name: w.name,
            file_bytes,
        });
    }
    let budget = match args.memory_budget {
        Some(b) => b,
        None => {
            (inventory::read(&[], &[], Vec::new()).memory_bytes as f64
                * skep_pool_manager::models::DEFAULT_BUDGET_SHARE) as u64
        }
    };
    // A model is warm when every group has a ready worker for it.
    let models = Arc::new(ModelSet::new(specs, budget, groups));
    member.model_set = Some(Arc::clone(&models));
    let launch = Launch {
        program,
        lane: LaneConfig::default(),
        prefill_chunk: args.prefill_chunk,
    };
    // Workers start only now, after provisioning; every model is loaded and measured once
    // while membership waits for the figures before registering.
    let supervisor = spawn_pool(
        launch,
        Arc::clone(&models),
        Arc::clone(&work),
        Arc::clone(&speed),
        audit.clone(),
    )
    .context("starting the slot threads")?;
    // The queen dials this pool over TLS when it serves TLS itself; the certificate it issues
    // names this node, so nobody else can answer in its place.
    let tls = match &queen_ca {
        Some(_) => {
            let key = skep_tls::PoolKey::generate()?;
            let (cert, ca) = member.certificate(&creds, &key).await?;
            info!(node = %creds.node_id, "serving TLS with a certificate from the queen's CA");
            Some(key.server_config(&cert, &ca))
        }
        None => None,
    };
    let membership = tokio::spawn(member.run(creds));

    let service = PoolService::new(work, Arc::clone(&models), key_rx).with_metrics(metrics.clone());
    // Only bad credentials are counted; the queen's key has no identity budget here.
    let limits = Arc::new(RateLimits::new(
        skep_common::ratelimit::DEFAULT_IDENTITY_QUOTA,
        args.bad_auth_limit,
    ));
    info!(fd_limit, max_connections = conns.max, "connection limits");
    info!(%local, %pool_url, models = %names.join(","), workers = groups, batch = args.batch, slots, budget, "pool manager listening");
    let (start_stopping, stop_serving) = tokio::sync::oneshot::channel::<()>();
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    let server = server
        // A dead queen connection must not pin a stream forever.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(service.into_server(audit, limits))
        // Probes carry no credential: health answers only SERVING / NOT_SERVING.
        .add_service(skep_pool_manager::grpc::health_server(&metrics))
        .serve_with_incoming_shutdown(daemon::incoming_with(listener, conns), async {
            let _ = stop_serving.await;
        });
    tokio::pin!(server);
    // Serve until shut down, or until the queen refuses this node for good.
    let result = tokio::select! {
        r = &mut server => r.map_err(anyhow::Error::from),
        m = membership => match m {
            Ok(Err(fatal)) => Err(fatal.into()),
            Ok(Ok(())) => Ok(()),
            Err(e) => Err(anyhow::anyhow!("membership task failed: {e}")),
        },
        () = daemon::shutdown_signal() => {
            // A graceful stop waits for open streams, and the queen's session stream stays
            // open as long as the queen lives: give requests in flight a moment, then stop.
            let _ = start_stopping.send(());
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err() {
                info!("streams still open after the shutdown grace; closing them");
            }
            Ok(())
        }
    };
    // Workers are child processes: stop them (cancelling what runs) rather than orphan them.
    tokio::task::block_in_place(|| supervisor.shutdown());
    info!("pool manager stopped");
    result
}

/// Binds `--metrics-listen`, writes `<data-dir>/metrics.addr` and serves it in the background.
async fn start_metrics(
    data_dir: &std::path::Path,
    addr: SocketAddr,
    metrics: PoolMetrics,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
    let local = listener.local_addr()?;
    skep_pool_manager::metrics::write_addr_file(data_dir, local)?;
    info!(%local, "metrics listening");
    tokio::spawn(skep_pool_manager::metrics::serve(
        listener,
        skep_pool_manager::metrics::CONTENT_TYPE,
        move || metrics.render(),
        daemon::shutdown_signal(),
    ));
    Ok(())
}

/// Where a model's weights come from.
enum Source {
    Synthetic,
    File(PathBuf),
    /// The queen's catalogue, fetched by content hash once enrolled.
    Catalogue,
}

struct Wanted {
    name: String,
    source: Source,
}

/// The models named by `--models`, or the one of `--model`/`--model-path`; names checked,
/// files resolved, duplicates refused.
fn model_list(args: &Args) -> anyhow::Result<Vec<Wanted>> {
    let synthetic = args.engine == EngineKind::Synthetic;
    let mut out: Vec<Wanted> = Vec::new();
    if args.models.is_empty() {
        let name = match (&args.model, &args.model_path) {
            (Some(m), _) => m.clone(),
            (None, Some(p)) => p
                .file_stem()
                .and_then(|s| s.to_str())
                .context("model file name is not UTF-8; pass --model")?
                .to_owned(),
            (None, None) if synthetic => "synthetic".into(),
            (None, None) => bail!(
                "--engine gguf needs --model-path FILE, or --model NAME to fetch NAME from the queen's catalogue, or --models"
            ),
        };
        let source = match (&args.model_path, synthetic) {
            (_, true) => Source::Synthetic,
            (Some(p), false) => Source::File(resolve(p)?),
            (None, false) => Source::Catalogue,
        };
        out.push(Wanted { name, source });
    } else {
        for entry in &args.models {
            let (name, file) = match entry.split_once('=') {
                Some((n, f)) => (n.trim(), Some(f.trim())),
                None => (entry.trim(), None),
            };
            let source = match (file, synthetic) {
                (Some(_), true) => {
                    bail!("--models {entry:?}: the synthetic engine takes model names, not files")
                }
                (Some(f), false) => Source::File(resolve(std::path::Path::new(f))?),
                (None, true) => Source::Synthetic,
                (None, false) => Source::Catalogue,
            };
            out.push(Wanted {
                name: name.to_owned(),
                source,
            });
        }
    }
    for (i, w) in out.iter().enumerate() {
        validate::model_name(&w.name).with_context(|| format!("model name {:?}", w.name))?;
        if out[..i].iter().any(|o| o.name == w.name) {
            bail!("--models names {:?} twice", w.name);
        }
    }
    Ok(out)
}

fn resolve(p: &std::path::Path) -> anyhow::Result<PathBuf> {
    p.canonicalize()
        .with_context(|| format!("model file {}", p.display()))
}

/// A worker's engine flags for one model (never a secret: they go through argv).
fn engine_args(args: &Args, model: &str, path: Option<&std::path::Path>) -> Vec<String> {
    let mut v = vec!["--device".to_owned(), args.device.to_string()];
    v.extend(engine_flags(args, model, path));
    v
}

fn engine_flags(args: &Args, model: &str, path: Option<&std::path::Path>) -> Vec<String> {
    match args.engine {
        EngineKind::Synthetic => vec![
            "--engine".into(),
            "synthetic".into(),
            "--model".into(),
            model.to_owned(),
            "--synthetic-ttft".into(),
            args.synthetic_ttft.clone(),
            "--synthetic-tps".into(),
            args.synthetic_tps.to_string(),
            "--synthetic-seed".into(),
            args.synthetic_seed.to_string(),
            "--synthetic-load".into(),
            args.synthetic_load.clone(),
            "--synthetic-weights-mib".into(),
            args.synthetic_weights_mib.to_string(),
        ],
        EngineKind::Gguf => {
            let mut v = vec![
                "--engine".into(),
                "gguf".into(),
                "--model".into(),
                model.to_owned(),
            ];
            if let Some(p) = path {
                v.push("--model-path".into());
                v.push(p.to_string_lossy().into_owned());
            }
            v
        }
    }
}
