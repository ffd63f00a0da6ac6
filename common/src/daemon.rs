//! What every skep daemon does at start and stop: private state directories, the published
//! listen address, the data-dir lock, accepting connections, and reacting to SIGINT/SIGTERM.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

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

/// Name of the lock file in a daemon's data dir.
pub const LOCK_FILE: &str = "lock";

/// The exclusive lock a daemon holds on its data dir for its whole life: two processes writing
/// one database and one audit chain would fork the chain. The lock is `flock(2)` on
/// `<data-dir>/lock` (0600, holding the holder's PID); the kernel drops it when the process dies,
/// however it dies, so a SIGKILLed daemon can be restarted at once. Keep the value alive.
#[derive(Debug)]
#[must_use = "the data dir is unlocked as soon as this is dropped"]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "data dir {} is in use by another process (pid {}): stop it, or give this one another --data-dir",
        dir.display(),
        pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
    )]
    Held { dir: PathBuf, pid: Option<u32> },
    #[error("cannot lock data dir {}: {source}", dir.display())]
    Io { dir: PathBuf, source: io::Error },
}

// === impl DataDirLock ===

impl DataDirLock {
    /// Takes the lock on `dir` (which must exist), without waiting: if another process holds it,
    /// fails with [`LockError::Held`] naming that process. Call it before anything writes into
    /// the data dir.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io_err = |source| LockError::Io {
            dir: dir.to_owned(),
            source,
        };
        // No truncation here: the file may be the holder's, with its PID in it.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                return Err(LockError::Held {
                    dir: dir.to_owned(),
                    pid: holder_pid(&mut file),
                });
            }
            Err(e) => return Err(io_err(e.into())),
        }
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_err)?;
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        writeln!(file, "{}", std::process::id()).map_err(io_err)?;
        file.sync_data().map_err(io_err)?;
        Ok(DataDirLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The PID written by the lock's holder. It writes it just after locking, so a racing reader
/// may briefly find the file empty: retry a little.
fn holder_pid(file: &mut File) -> Option<u32> {
    for _ in 0..20 {
        let mut text = String::new();
        if file.rewind().is_ok()
            && file.read_to_string(&mut text).is_ok()
            && let Ok(pid) = text.trim().parse()
        {
            return Some(pid);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_lock_is_exclusive_and_names_its_holder() {
        let dir = std::env::temp_dir().join(format!("skep-lock-test-{}", std::process::id()));
        create_private_dir(&dir).unwrap();
        let held = DataDirLock::acquire(&dir).unwrap();
        let meta = std::fs::metadata(held.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(held.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        // flock locks belong to the open file description: a second open in this very process
        // is refused just like another process would be.
        match DataDirLock::acquire(&dir) {
            Err(e @ LockError::Held { pid: Some(pid), .. }) => {
                assert_eq!(pid, std::process::id());
                let msg = e.to_string();
                assert!(msg.contains(&pid.to_string()), "{msg}");
                assert!(msg.contains(&dir.display().to_string()), "{msg}");
            }
            other => panic!("second lock: {other:?}"),
        }
        drop(held);
        let again = DataDirLock::acquire(&dir).unwrap();
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
