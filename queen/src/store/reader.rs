//! Reader threads, each with its own read-only connection, so reads never queue behind the
//! writer's batches: in WAL mode a reader works on the last committed snapshot while the writer
//! appends the next transaction.
//!
//! Every read is one statement run with no transaction open, so it starts a new snapshot, which
//! holds every transaction committed before it began: a read issued after a write was
//! acknowledged sees that write.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// Reads waiting for a reader thread before their senders wait too.
const QUEUE: usize = 1024;

type Job = Box<dyn FnOnce(&Connection) + Send>;

/// The queue into the reader threads.
#[derive(Clone)]
pub(super) struct Readers {
    tx: mpsc::Sender<Job>,
}

impl Readers {
    /// Runs `f` on one of the read connections.
    pub(super) async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (ack, done) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = ack.send(f(conn));
        });
        self.tx.send(job).await.map_err(|_| StoreError::Stopped)?;
        done.await.map_err(|_| StoreError::Stopped)?
    }
}

/// Opens `threads` read connections on the database at `path` (which must already exist, in WAL
/// mode) and starts a thread for each.
pub(super) fn start(path: &Path, threads: usize) -> Result<Readers, StoreError> {
    let (tx, rx) = mpsc::channel::<Job>(QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..threads {
        let conn = Connection::open(path)?;
        // Reads only: a write here would take the write lock away from the writer.
        conn.pragma_update(None, "query_only", true)?;
        conn.set_prepared_statement_cache_capacity(32);
        let rx = Arc::clone(&rx);
        std::thread::Builder::new()
            .name(format!("skep-store-read{i}"))
            .spawn(move || serve(&conn, &rx))?;
    }
    Ok(Readers { tx })
}

fn serve(conn: &Connection, rx: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        // One thread waits on the queue at a time, the others on the lock; the lock is released
        // before the job runs, so jobs run in parallel.
        let job = match rx.lock() {
            Ok(mut rx) => rx.blocking_recv(),
            Err(_) => None,
        };
        match job {
            Some(job) => job(conn),
            // Every handle is gone.
            None => return,
        }
    }
}
