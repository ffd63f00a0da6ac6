//! What every skep daemon does at start and stop: private state directories, the published
//! listen address, accepting connections, and reacting to SIGINT/SIGTERM.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt, wrappers::TcpListenerStream};

/// Creates `dir` (and parents) and makes it 0700: it holds keys and lanes.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Writes the bound address to `<dir>/listen.addr` atomically, so scripts and tests can use
/// port 0 and still find the daemon.
pub fn write_addr_file(dir: &Path, addr: SocketAddr) -> io::Result<()> {
    let tmp = dir.join("listen.addr.tmp");
    std::fs::write(&tmp, addr.to_string())?;
    std::fs::rename(tmp, dir.join("listen.addr"))
}

/// Accepted connections with Nagle's algorithm off: tokens are small writes that must leave at
/// once (with Nagle and delayed ACKs a streamed token can wait ~40ms).
pub fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
