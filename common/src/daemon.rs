//! What every skep daemon does at start and stop: private state directories, the published
//! listen address, the data-dir lock, the open-file limit, accepting connections (under a cap,
//! with preface and idle timeouts and back-off on accept errors), and reacting to SIGINT/SIGTERM.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use rustix::fs::{FlockOperation, flock};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

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

/// Raises the soft limit on open files to the hard limit and returns the limit now in force: a
/// daemon's connections are files, and the usual soft default (1024) is far below what the
/// kernel allows.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let raised = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Parses a daemon flag's duration (humantime: `10s`, `1m`, `250ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<humantime::Duration>()
        .map(Into::into)
        .map_err(|e| e.to_string())
}

/// Bytes a new connection must send before `preface_timeout`: the HTTP/2 client preface is 24
/// bytes (a TLS ClientHello is longer), so a client that speaks at all sends this many at once.
pub const PREFACE_BYTES: usize = 24;
/// Files kept free for everything but connections (database, audit, lanes, outgoing calls).
const RESERVED_FDS: u64 = 256;
/// Most connections by default, whatever the file limit.
const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// Back-off after an accept error that is not about one connection (EMFILE and the like).
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Stands for "no idle timeout" (a year; tokio's timer cannot sleep forever).
const NO_IDLE_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// Accept errors about one connection tried again at once, at most this many per poll.
const MAX_RETRIES_PER_POLL: usize = 64;

/// What a daemon's listener admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Most connections open at once. At the cap a new connection replaces the oldest one that
    /// has not yet sent `PREFACE_BYTES`; with none such, the new one is closed at once.
    pub max: usize,
    /// Time a new connection has to send its first `PREFACE_BYTES` bytes.
    pub preface_timeout: Duration,
    /// Longest a connection may send nothing at all once it has sent its preface. The daemons
    /// ping every client every 10 s (HTTP/2 keepalive) and every live client answers, so only a
    /// dead or stalled peer (a TLS handshake left half-done, say) stays silent this long. `None`
    /// for a server that does not ping: there silence is no sign of death.
    pub idle_timeout: Option<Duration>,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max: DEFAULT_MAX_CONNECTIONS,
            preface_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(60)),
        }
    }
}

impl ConnLimits {
    /// The default limits for a process allowed `fd_limit` open files (`raise_fd_limit`).
    pub fn for_fd_limit(fd_limit: u64) -> ConnLimits {
        let fit = fd_limit.saturating_sub(RESERVED_FDS).max(16);
        ConnLimits {
            max: usize::try_from(fit)
                .unwrap_or(usize::MAX)
                .min(DEFAULT_MAX_CONNECTIONS),
            ..ConnLimits::default()
        }
    }
}

/// Accepted connections, admitted under `ConnLimits`, with Nagle's algorithm off (tokens are
/// small writes that must leave at once: with Nagle and delayed ACKs a streamed token can wait
/// ~40ms). Accept errors never reach the server: per-connection ones are retried at once, the
/// others (a full file table) back off, so the accept loop cannot spin.
///
/// This one has the default cap and preface timeout but no idle timeout, for servers that do
/// not ping their clients (the daemons use `incoming_with`).
pub fn incoming(listener: TcpListener) -> Incoming {
    incoming_with(
        listener,
        ConnLimits {
            idle_timeout: None,
            ..ConnLimits::default()
        },
    )
}

/// `incoming` with explicit limits.
pub fn incoming_with(listener: TcpListener, limits: ConnLimits) -> Incoming {
    Incoming::new(listener, limits)
}

/// Something connections are accepted from: a `TcpListener`, or a stand-in in tests.
pub trait Accept {
    type Io;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Io>>;
}

impl Accept for TcpListener {
    type Io = TcpStream;
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<TcpStream>> {
        TcpListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
}

/// The stream of admitted connections (see `incoming`).
pub struct Incoming<A: Accept = TcpListener> {
    accept: A,
    gate: Arc<Gate>,
    backoff: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

// === impl Incoming ===

impl<A: Accept> Incoming<A> {
    pub fn new(accept: A, limits: ConnLimits) -> Incoming<A> {
        Incoming {
            accept,
            gate: Arc::new(Gate {
                limits,
                state: Mutex::new(GateState::default()),
            }),
            backoff: ACCEPT_BACKOFF_MIN,
            sleep: None,
        }
    }

    /// Connections open now (admitted and not yet closed).
    pub fn open(&self) -> usize {
        self.gate.state.lock().map_or(0, |s| s.open)
    }

    /// The next accepted IO, after any back-off; accept errors are handled here.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<A::Io> {
        for _ in 0..MAX_RETRIES_PER_POLL {
            if let Some(sleep) = &mut self.sleep {
                ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
            }
            match ready!(self.accept.poll_accept(cx)) {
                Ok(io) => {
                    self.backoff = ACCEPT_BACKOFF_MIN;
                    return Poll::Ready(io);
                }
                Err(e) if per_connection(&e) => continue,
                Err(e) => {
                    // The first error of a run is worth a line; the repeats only wait longer.
                    if self.backoff == ACCEPT_BACKOFF_MIN {
                        tracing::warn!(error = %e, "accept failed; backing off");
                    }
                    self.sleep = Some(Box::pin(tokio::time::sleep(self.backoff)));
                    self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
        // Many failed connections in a row: let the rest of the runtime run first.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// An accept error about one connection (it went away before we took it), not about us.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

impl Stream for Incoming<TcpListener> {
    type Item = io::Result<Conn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let io = ready!(this.poll_io(cx));
            let _ = io.set_nodelay(true);
            // Refused: dropped, so closed at once rather than left in the backlog.
            if let Some(conn) = Conn::admit(io, &this.gate) {
                return Poll::Ready(Some(Ok(conn)));
            }
        }
    }
}

/// The connection table behind an `Incoming`.
struct Gate {
    limits: ConnLimits,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    open: usize,
    next_id: u64,
    /// Connections that have not yet sent `PREFACE_BYTES`, oldest first, each with the sender
    /// that closes it.
    unproven: BTreeMap<u64, oneshot::Sender<()>>,
    /// Connections closed at the cap since the last warning.
    refused: u64,
}

/// An accepted connection: closed by the server when it stays silent too long, or when it is the
/// oldest one still without a preface while the table is full. Releases its place on drop.
pub struct Conn {
    io: TcpStream,
    gate: Arc<Gate>,
    id: u64,
    received: usize,
    deadline: Pin<Box<Sleep>>,
    /// Fires when the gate closes this connection for a newer one; `None` once proven.
    evicted: Option<oneshot::Receiver<()>>,
}

// === impl Conn ===

impl Conn {
    fn admit(io: TcpStream, gate: &Arc<Gate>) -> Option<Conn> {
        let mut state = gate.state.lock().ok()?;
        if state.open >= gate.limits.max {
            // Room is made only by a connection that has not said anything yet: whoever has
            // spoken is a client, and a slow handshake must not cost a working client its place.
            match state.unproven.pop_first() {
                Some((_, evict)) => {
                    let _ = evict.send(());
                }
                None => {
                    state.refused += 1;
                    if state.refused.is_power_of_two() {
                        tracing::warn!(
                            max = gate.limits.max,
                            refused = state.refused,
                            "connection table full; closing new connections"
                        );
                    }
                    return None;
                }
            }
        }
        state.open += 1;
        state.next_id += 1;
        let id = state.next_id;
        let (tx, rx) = oneshot::channel();
        state.unproven.insert(id, tx);
        drop(state);
        Some(Conn {
            io,
            gate: Arc::clone(gate),
            id,
            received: 0,
            deadline: Box::pin(tokio::time::sleep(gate.limits.preface_timeout)),
            evicted: Some(rx),
        })
    }

    /// Why the server closes this connection now, if it does.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if let Some(rx) = &mut self.evicted
            && let Poll::Ready(r) = Pin::new(rx).poll(cx)
        {
            self.evicted = None;
            if r.is_ok() {
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "closed without a preface to make room for a new connection",
                ));
            }
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let why = if self.received < PREFACE_BYTES {
                "no preface in time"
            } else {
                "idle too long"
            };
            return Some(io::Error::new(io::ErrorKind::TimedOut, why));
        }
        None
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Ok(mut state) = self.gate.state.lock() {
            state.open = state.open.saturating_sub(1);
            state.unproven.remove(&self.id);
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    if this.received < PREFACE_BYTES {
                        this.received = this.received.saturating_add(n);
                        if this.received >= PREFACE_BYTES {
                            this.evicted = None;
                            if let Ok(mut state) = this.gate.state.lock() {
                                state.unproven.remove(&this.id);
                            }
                        }
                    }
                    // Before the preface, its deadline stands; after, silence is measured
                    // from the last byte.
                    if this.received >= PREFACE_BYTES {
                        // No idle timeout: a deadline far beyond any connection's life.
                        let idle = this.gate.limits.idle_timeout.unwrap_or(NO_IDLE_TIMEOUT);
                        let next = tokio::time::Instant::now() + idle;
                        this.deadline.as_mut().reset(next);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_closed(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for Conn {
    // The plain TCP info, so `Request::remote_addr` keeps working (TLS wraps it as usual).
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
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
mod tests;
