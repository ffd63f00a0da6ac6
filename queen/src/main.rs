//! `skep-queen`: the cluster's front door. Admits jobs, schedules them on pools, streams results.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use skep_common::auth::{self, TokenDigest};
use skep_common::daemon;
use skep_common::ratelimit::{DEFAULT_BAD_AUTH_QUOTA, DEFAULT_IDENTITY_QUOTA, Quota, RateLimits};
use skep_common::secret::{Secret, credential_path};
use skep_common::telemetry::{self, LogFormat};
use skep_queen::auth::{Role, TokenBook, TokenEntry};
use skep_queen::dispatch::{self, Dispatcher, Policy};
use skep_queen::job::Services;
use skep_queen::registry::Registry;
use skep_queen::store::StoreHandle;
use skep_queen::{grpc, store};
use tracing::info;

/// The skep queen.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// State directory: database, admin token. Created 0700 if missing.
    #[arg(long)]
    data_dir: PathBuf,
    /// Address to serve on. Port 0 picks a free port (see <data-dir>/listen.addr).
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Jobs admitted and waiting here (not yet at a pool), all models together.
    #[arg(long, default_value_t = 256)]
    max_queued: usize,
    /// Jobs admitted and not yet finished.
    #[arg(long, default_value_t = 1024)]
    max_live: usize,
    /// Jobs one caller (token) may have queued or running at once, so one tenant cannot fill
    /// the queue; a token created with `--max-jobs` has its own share.
    #[arg(long, default_value_t = 64)]
    max_jobs_per_caller: u32,
    /// Admission policy: `reserve` admits a job only if it and every job already admitted still
    /// finish by their deadlines; `edf` and `fcfs` admit without that check (for comparisons).
    #[arg(long, default_value = "reserve")]
    admission: Policy,
    /// Tail quantile of job costs that admission reserves (0.5-1.0).
    #[arg(long, default_value_t = 0.95)]
    cost_quantile: f64,
    /// Interval pools are told to heartbeat at (humantime).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Requests each caller identity may make (token bucket), e.g. 100/10s.
    #[arg(long, default_value_t = DEFAULT_IDENTITY_QUOTA)]
    rate_limit: Quota,
    /// Failed authentications a peer address may make before it is throttled, e.g. 10/1m.
    #[arg(long, default_value_t = DEFAULT_BAD_AUTH_QUOTA)]
    bad_auth_limit: Quota,
    /// Finished jobs are deleted from the database after this long (humantime, e.g. 7d).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    job_ttl: Duration,
    /// TLS on the listener: `auto` serves TLS unless the listen address is loopback.
    #[arg(long, value_enum, default_value = "auto")]
    tls: TlsMode,
    /// Extra names (DNS names or IPs) for the queen's certificate, besides `queen.skep`,
    /// `localhost` and the listen address. skep's own clients always check `queen.skep`.
    #[arg(long = "tls-name")]
    tls_names: Vec<String>,
    /// Allow `--tls off` on a non-loopback address. Bearer tokens, pool keys and prompts then
    /// cross the network in clear; without this flag the queen refuses to start so.
    #[arg(long)]
    insecure_plaintext: bool,
    /// An approver's public key file (from `skep approver init`); repeatable. Approvals signed
    /// by these keys may authorize the actions named by --require-approval.
    #[arg(long = "approver-key")]
    approver_keys: Vec<PathBuf>,
    /// Governed actions that need an approval credential: model.add, node.enroll,
    /// token.revoke_last_admin (comma-separated). See docs/APPROVALS.md.
    #[arg(long, value_delimiter = ',')]
    require_approval: Vec<String>,
    /// Most client connections open at once (default: what the open-file limit allows, at most
    /// 16384). At the cap, a connection that has not yet spoken makes room for a new one.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Time a new connection has to send its HTTP/2 preface (or TLS hello) before it is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    preface_timeout: Duration,
    /// Serve the OpenAI-compatible HTTP door here too (off by default; see docs/HTTP.md). Port 0
    /// picks a free port (see <data-dir>/http.addr). TLS with the queen's certificate, under
    /// the same --tls rule as the gRPC listener.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Budget of an HTTP request that sends neither `skep-deadline` nor
    /// `x-stainless-read-timeout` (humantime).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    http_default_deadline: Duration,
    /// Serve Prometheus metrics as `GET /metrics` (plain HTTP, no token) on this address; off
    /// by default. Port 0 picks a free port (see <data-dir>/metrics.addr). Off loopback it needs
    /// --insecure-plaintext. See docs/METRICS.md.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    #[arg(long, default_value = "pretty")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum TlsMode {
    Auto,
    On,
    Off,
}

impl TlsMode {
    fn enabled(self, listen: SocketAddr) -> bool {
        match self {
            TlsMode::On => true,
            TlsMode::Off => false,
            TlsMode::Auto => !listen.ip().is_loopback(),
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<humantime::Duration>()
        .map(Into::into)
        .map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format);
    // Actors live on the system thread; tonic and job tasks on the multi-threaded runtime.
    actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
    .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Plaintext off loopback is refused (or, with --insecure-plaintext, warned about) before
    // anything is created.
    let plaintext = !args.tls.enabled(args.listen);
    auth::check_bind(args.listen, plaintext, args.insecure_plaintext)?;
    if let Some(http) = args.http_listen {
        auth::check_bind(http, !args.tls.enabled(http), args.insecure_plaintext)?;
    }
    if let Some(addr) = args.metrics_listen {
        auth::check_bind(addr, true, args.insecure_plaintext)?;
    }
    // Before anything opens files: connections are files too.
    let conns = conn_limits(args.max_connections, args.preface_timeout);
    daemon::create_private_dir(&args.data_dir)?;
    // One queen per data dir, held for the life of the process and taken before anything writes
    // there: two would fork the audit chain and fight over the database.
    let _lock = daemon::DataDirLock::acquire(&args.data_dir)?;
    let cluster_id = skep_queen::approval::load_or_create_cluster_id(&args.data_dir)?;
    let approvals = skep_queen::approval::Approvals::configure(
        cluster_id,
        &args.approver_keys,
        &args.require_approval,
    )?;
    info!(cluster_id = %approvals.cluster_id(), "cluster id (the environment approvals name)");
    let token_path = credential_path("admin-token", &args.data_dir.join("admin.token"));
    let admin = Secret::load_or_create(&token_path)?;
    let admin_digest = TokenDigest::of(admin.expose());
    drop(admin);
    info!(file = %token_path.display(), fingerprint = %admin_digest.fingerprint(), "admin token ready");

    let tls = if !plaintext {
        let mut names = args.tls_names.clone();
        if !args.listen.ip().is_unspecified() {
            names.push(args.listen.ip().to_string());
        }
        let tls = skep_tls::QueenTls::load_or_create(&args.data_dir.join("tls"), &names)
            .context("setting up the queen's TLS certificate authority")?;
        info!(ca = %args.data_dir.join("tls").join("ca.pem").display(), ca_fingerprint = %tls.ca.fingerprint, "serving TLS");
        Some(Arc::new(tls))
    } else {
        // Off loopback only with --insecure-plaintext, warned about by `check_bind`.
        None
    };
    let store = store::start(&args.data_dir.join("queen.db")).context("opening the state store")?;
    let tokens = load_tokens(&store, admin_digest).await?;
    let audit = skep_queen::audit::start(
        &args.data_dir.join("audit"),
        &credential_path("audit-key", &args.data_dir.join("audit.key")),
        store.clone(),
    )
    .context("starting the audit log")?;
    if !(0.5..=1.0).contains(&args.cost_quantile) {
        anyhow::bail!("--cost-quantile must be between 0.5 and 1.0");
    }
    let metrics = skep_queen::metrics::Metrics::new();
    let dispatch = Dispatcher::start(
        dispatch::Config {
            policy: args.admission,
            max_live: args.max_live,
            max_queued: args.max_queued,
            quantile: args.cost_quantile,
            caller_share: args.max_jobs_per_caller,
            ..dispatch::Config::default()
        },
        store.clone(),
        audit.clone(),
        metrics.clone(),
    );
    let ca_pem = tls.as_ref().map(|t| t.ca.cert_pem.clone());
    let registry = Registry::start(args.heartbeat_interval, dispatch.clone(), ca_pem);
    dispatch.set_registry(registry.clone()).await?;
    let interrupted = store.take_interrupted().await?;
    let catalogue =
        skep_queen::catalogue::Catalogue::open(&args.data_dir.join("models"), store.clone())
            .context("opening the model catalogue")?;
    let limits = Arc::new(RateLimits::new(args.rate_limit, args.bad_auth_limit));
    let services = Services {
        dispatch,
        registry,
        store,
        tokens,
        audit: audit.clone(),
        tls,
        catalogue,
        approvals,
        metrics,
    };

    tokio::spawn(prune_jobs(services.store.clone(), args.job_ttl));
    // Jobs the previous process accepted and did not finish run again, within their original
    // deadlines, as soon as pools serving their models reconnect.
    for rec in interrupted {
        services.dispatch.resume(rec).await?;
    }

    if let Some(addr) = args.http_listen {
        start_http(&args, addr, &services, &limits, conns).await?;
    }
    if let Some(addr) = args.metrics_listen {
        start_metrics(&args.data_dir, addr, services.metrics.clone()).await?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    daemon::write_addr_file(&args.data_dir, local)?;
    info!(%local, "queen listening");
    grpc::serve(listener, services, limits, conns, daemon::shutdown_signal()).await?;
    audit.flush().await;
    info!("queen stopped");
    Ok(())
}

/// Binds the HTTP door on `addr`, writes `<data-dir>/http.addr` and serves it in the background.
async fn start_http(
    args: &Args,
    addr: SocketAddr,
    services: &Services,
    limits: &Arc<RateLimits>,
    conns: daemon::ConnLimits,
) -> anyhow::Result<()> {
    let tls = if args.tls.enabled(addr) {
        let tls = skep_queen::http::tls_config(services, &args.data_dir, addr, &args.tls_names)
            .context("setting up TLS for the HTTP door")?;
        Some(tls)
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--http-listen)"))?;
    let local = listener.local_addr()?;
    skep_queen::http::write_addr_file(&args.data_dir, local)?;
    info!(%local, tls = tls.is_some(), "HTTP door listening");
    let config = skep_queen::http::HttpConfig {
        default_deadline: args.http_default_deadline,
        tls,
        conns,
    };
    tokio::spawn(skep_queen::http::serve(
        listener,
        services.clone(),
        Arc::clone(limits),
        config,
        daemon::shutdown_signal(),
    ));
    Ok(())
}

/// Binds `--metrics-listen`, writes `<data-dir>/metrics.addr` and serves it in the background.
async fn start_metrics(
    data_dir: &std::path::Path,
    addr: SocketAddr,
    metrics: skep_queen::metrics::Metrics,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
    let local = listener.local_addr()?;
    skep_queen::metrics::write_addr_file(data_dir, local)?;
    info!(%local, "metrics listening");
    tokio::spawn(skep_queen::metrics::serve(
        listener,
        skep_queen::metrics::CONTENT_TYPE,
        move || metrics.render(),
        daemon::shutdown_signal(),
    ));
    Ok(())
}

/// Connection limits: the soft open-file limit is raised to the hard one first, and the default
/// cap fits what it allows.
fn conn_limits(max: Option<usize>, preface_timeout: Duration) -> daemon::ConnLimits {
    let fd_limit = daemon::raise_fd_limit();
    let mut conns = daemon::ConnLimits::for_fd_limit(fd_limit);
    conns.max = max.unwrap_or(conns.max).max(1);
    conns.preface_timeout = preface_timeout;
    info!(fd_limit, max_connections = conns.max, "connection limits");
    conns
}

/// The token book from the database, with the bootstrap admin token (the file in the data dir)
/// registered on first start.
async fn load_tokens(store: &StoreHandle, admin: TokenDigest) -> anyhow::Result<TokenBook> {
    let mut tokens = store.load_tokens().await?;
    if !tokens.iter().any(|t| t.digest == admin) {
        let entry = TokenEntry {
            digest: admin,
            role: Role::Admin,
            label: "bootstrap".into(),
            created_unix_ms: skep_queen::model::unix_ms(),
            expires_unix_ms: 0,
            revoked: false,
            node_id: String::new(),
            max_jobs: 0,
        };
        store.insert_token(entry.clone()).await?;
        tokens.push(entry);
    }
    Ok(TokenBook::new(tokens))
}

/// Deletes finished jobs older than `ttl`, once at start and then hourly.
async fn prune_jobs(store: StoreHandle, ttl: Duration) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        every.tick().await;
        let cutoff = skep_queen::model::unix_ms()
            .saturating_sub(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        match store.prune(cutoff).await {
            Ok(0) => {}
            Ok(n) => info!(jobs = n, "pruned finished jobs past their TTL"),
            Err(e) => tracing::warn!(error = %e, "could not prune old jobs"),
        }
    }
}
