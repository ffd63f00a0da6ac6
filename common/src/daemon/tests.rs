//! The data-dir lock, the open-file limit, and the accept loop: its back-off on accept errors,
//! its connection cap, and the preface and idle timeouts, against real loopback sockets.

use super::*;

/// Accepts nothing: every call fails with `EMFILE`, like a listener whose process is out of
/// file descriptors.
struct FullFileTable {
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl Accept for FullFileTable {
    type Io = ();
    fn poll_accept(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Poll::Ready(Err(io::Error::from_raw_os_error(libc::EMFILE)))
    }
}

#[tokio::test]
async fn accept_errors_back_off_instead_of_spinning() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut incoming = Incoming::new(
        FullFileTable {
            calls: Arc::clone(&calls),
        },
        ConnLimits::default(),
    );
    // Drive the accept loop for one second. Backing off (10ms, 20ms, ... up to 1s) it tries
    // about 7 times; retrying at once it would try hundreds of thousands of times. A slow
    // machine only lowers the count.
    let drive = std::future::poll_fn(|cx| {
        let _ = incoming.poll_io(cx);
        Poll::<()>::Pending
    });
    tokio::select! {
        () = tokio::time::sleep(Duration::from_secs(1)) => {}
        () = drive => {}
    }
    let n = calls.load(std::sync::atomic::Ordering::Relaxed);
    assert!((1..=20).contains(&n), "{n} accept calls in one second");
}

/// A daemon-side listener under `limits`, serving nothing: it only accepts and holds
/// connections the way a server does (reading until the connection ends).
async fn holding_server(limits: ConnLimits) -> (std::net::SocketAddr, Arc<Gate>) {
    use tokio::io::AsyncReadExt;
    use tokio_stream::StreamExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = incoming_with(listener, limits);
    let gate = Arc::clone(&incoming.gate);
    tokio::spawn(async move {
        while let Some(Ok(mut conn)) = incoming.next().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    (addr, gate)
}

/// Reads until the server closes the connection (EOF or reset); false if it stays open for
/// `within`.
async fn closed_by_server(conn: &mut TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(within, conn.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn silent_connections_are_closed_and_make_room_at_the_cap() {
    use tokio::io::AsyncWriteExt;
    let limits = ConnLimits {
        max: 4,
        preface_timeout: Duration::from_millis(300),
        idle_timeout: Some(Duration::from_secs(30)),
    };
    let (addr, gate) = holding_server(limits).await;
    // A client that speaks at once keeps its place (until idle_timeout).
    let mut talker = TcpStream::connect(addr).await.unwrap();
    talker.write_all(&[b'x'; PREFACE_BYTES]).await.unwrap();
    // Six that never send a byte: the table holds four, so the oldest silent ones are
    // closed as the newer ones arrive.
    let mut silent = Vec::new();
    for _ in 0..6 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    for (i, conn) in silent.iter_mut().take(3).enumerate() {
        assert!(
            closed_by_server(conn, Duration::from_secs(5)).await,
            "silent connection {i} was not closed to make room"
        );
    }
    // The rest are closed by the preface timeout.
    for (i, conn) in silent.iter_mut().enumerate().skip(3) {
        assert!(
            closed_by_server(conn, Duration::from_secs(10)).await,
            "silent connection {i} outlived its preface timeout"
        );
    }
    // The talker was never the one to go.
    assert!(!closed_by_server(&mut talker, Duration::from_millis(100)).await);
    // Only the talker holds a place.
    wait_for_open(&gate, 1).await;
}

#[tokio::test]
async fn a_client_that_goes_silent_after_its_preface_is_closed() {
    use tokio::io::AsyncWriteExt;
    let limits = ConnLimits {
        max: 4,
        preface_timeout: Duration::from_secs(30),
        idle_timeout: Some(Duration::from_millis(300)),
    };
    let (addr, gate) = holding_server(limits).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(&[b'x'; PREFACE_BYTES]).await.unwrap();
    assert!(
        closed_by_server(&mut client, Duration::from_secs(10)).await,
        "a silent client outlived the idle timeout"
    );
    wait_for_open(&gate, 0).await;
}

/// Polls until the gate counts `n` open connections (the server drops a closed one soon
/// after the client sees it close); fails after ten seconds.
async fn wait_for_open(gate: &Gate, n: usize) {
    for _ in 0..1000 {
        if gate.state.lock().unwrap().open == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("open connections never reached {n}");
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // Start below the hard limit, as a daemon started from a login shell does (lowering the
    // soft limit needs no privilege; 1024 leaves the other tests plenty).
    let hard = getrlimit(Resource::Nofile).maximum;
    if hard.is_none_or(|h| h > 1024) {
        let low = Rlimit {
            current: Some(1024),
            maximum: hard,
        };
        setrlimit(Resource::Nofile, low).unwrap();
        assert_eq!(getrlimit(Resource::Nofile).current, Some(1024));
    }
    let now = raise_fd_limit();
    let lim = getrlimit(Resource::Nofile);
    assert_eq!(lim.current, lim.maximum);
    assert_eq!(now, lim.current.unwrap_or(u64::MAX));
    let conns = ConnLimits::for_fd_limit(now);
    assert!(conns.max >= 16 && conns.max <= DEFAULT_MAX_CONNECTIONS);
    assert_eq!(
        ConnLimits::for_fd_limit(1024).max,
        768,
        "room kept for other files"
    );
}

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
