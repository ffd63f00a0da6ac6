//! `skep-queen`: the cluster's front door. Admits jobs, schedules them on pools, streams results.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use skep_common::auth::{self, TokenDigest};
use skep_common::secret::{Secret, credential_path};
use skep_common::telemetry::{self, LogFormat};
use skep_queen::admission::{Admission, DEFAULT_MAX_LIVE};
use skep_queen::auth::{Authenticator, Role};
use skep_queen::job::Services;
use skep_queen::registry::Registry;
use skep_queen::scheduler::{DEFAULT_MAX_QUEUED, Scheduler};
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
    /// Jobs that may wait for a slot, all models together.
    #[arg(long, default_value_t = DEFAULT_MAX_QUEUED)]
    max_queued: usize,
    /// Jobs admitted and not yet finished.
    #[arg(long, default_value_t = DEFAULT_MAX_LIVE)]
    max_live: usize,
    /// Interval pools are told to heartbeat at (humantime).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    #[arg(long, default_value = "pretty")]
    log_format: LogFormat,
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
    create_private_dir(&args.data_dir)?;
    let token_path = credential_path("admin-token", &args.data_dir.join("admin.token"));
    let admin = Secret::load_or_create(&token_path)?;
    let admin_digest = TokenDigest::of(admin.expose());
    drop(admin);
    info!(file = %token_path.display(), fingerprint = %admin_digest.fingerprint(), "admin token ready");
    let authenticator = Authenticator::new(vec![(admin_digest, Role::Admin)]);
    // Every RPC is authenticated, so the bind policy is satisfied; keep the check wired anyway.
    auth::check_bind(args.listen, true)?;

    let store = store::start(&args.data_dir.join("queen.db")).context("opening the state store")?;
    let scheduler = Scheduler::start(args.max_queued);
    let registry = Registry::start(args.heartbeat_interval, scheduler.clone());
    let admission = Admission::start(args.max_live);
    let services = Services {
        admission,
        scheduler,
        registry,
        store,
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    write_addr_file(&args.data_dir, local)?;
    info!(%local, "queen listening");
    grpc::serve(listener, services, authenticator, shutdown_signal()).await?;
    info!("queen stopped");
    Ok(())
}

fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

fn write_addr_file(dir: &std::path::Path, addr: SocketAddr) -> anyhow::Result<()> {
    let tmp = dir.join("listen.addr.tmp");
    std::fs::write(&tmp, addr.to_string())?;
    std::fs::rename(tmp, dir.join("listen.addr"))?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("shutting down");
}
