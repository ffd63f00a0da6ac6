//! The writer thread: the only connection that writes, committing everything pending as one
//! transaction (group commit), and the checkpointer thread that folds the WAL back into the
//! database off the writer's path.
//!
//! A commit costs the same whether it carries one command or hundreds, so under load the writer
//! takes whatever has queued while it was committing and commits it together. Each command runs
//! in its own savepoint so that one that fails is undone alone; callers are acknowledged only
//! once the transaction holding their command has committed.

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::{Durability, StoreError};

/// Most commands in one transaction: bounds how long the first command of a batch waits for the
/// last one to run, and the size of a transaction a failure would refuse.
const BATCH: usize = 512;
/// Commands waiting for the writer before their senders wait too (backpressure, bounded memory).
const QUEUE: usize = 4096;
/// Transactions between nudges to the checkpointer. Each transaction appends a few pages to the
/// WAL, so this keeps the WAL around a few hundred pages to a few MiB under load.
const CHECKPOINT_EVERY: u64 = 64;
/// SQLite's own checkpoint on commit, left only as a backstop (in pages) for when the
/// checkpointer cannot keep up: it would run on the writer, fsyncs included.
const AUTOCHECKPOINT_BACKSTOP: u32 = 10_000;

/// Least time between two scrubbing (TRUNCATE) checkpoints: each one blocks the writer while it
/// copies and fsyncs, so under load they are spread out, and the nudges between merge.
const SCRUB_SPACING: Duration = Duration::from_millis(100);
/// Pause before retrying a scrub that readers or the writer kept from finishing.
const SCRUB_RETRY: Duration = Duration::from_millis(50);
/// How long a scrubbing checkpoint waits for readers to move to the latest snapshot.
const SCRUB_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

thread_local! {
    /// Set on the writer thread by a command that removed private data (a prompt) from a row:
    /// the batch holding it ends with a scrub of the WAL.
    static SCRUB: Cell<bool> = const { Cell::new(false) };
}

/// Called by a writer command that cleared a prompt: once its batch commits, the checkpointer
/// folds the WAL into the database and truncates it, so the prompt's old page images do not
/// outlive the job in `queen.db-wal` (`secure_delete` zeroes them in the database file).
pub(super) fn scrub_after_commit() {
    SCRUB.with(|s| s.set(true));
}

/// Counts of what the writer committed; read with `StoreHandle::stats`.
#[derive(Default)]
pub(super) struct Stats {
    pub(super) transactions: AtomicU64,
    pub(super) commands: AtomicU64,
}

/// One queued write, with its typed result kept until the batch's fate is known.
trait Pending: Send {
    /// Runs the command in its own savepoint. `Err` means the surrounding transaction cannot go
    /// on (SQLite rolled it back, or the savepoint could not be undone): the whole batch fails.
    fn run(&mut self, conn: &Connection) -> Result<(), String>;
    /// Sends the caller its result: the command's own, or the batch's failure.
    fn ack(self: Box<Self>, batch: Result<(), &str>);
}

struct Typed<T, F> {
    f: Option<F>,
    result: Option<Result<T, StoreError>>,
    ack: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Pending for Typed<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send,
{
    fn run(&mut self, conn: &Connection) -> Result<(), String> {
        let Some(f) = self.f.take() else {
            return Ok(());
        };
        exec(conn, "SAVEPOINT cmd").map_err(|e| e.to_string())?;
        let result = f(conn).and_then(|v| {
            exec(conn, "RELEASE cmd")?;
            Ok(v)
        });
        let mut poisoned = Ok(());
        if let Err(e) = &result {
            if conn.is_autocommit() {
                // Some errors (I/O, full disk) make SQLite roll back the whole transaction:
                // the commands before this one are gone with it.
                poisoned = Err(format!("transaction rolled back: {e}"));
            } else if let Err(undo) =
                exec(conn, "ROLLBACK TO cmd").and_then(|()| exec(conn, "RELEASE cmd"))
            {
                // The failed command's partial writes could not be undone: committing the batch
                // would commit them.
                poisoned = Err(format!("cannot undo a failed command: {undo}"));
            }
        }
        self.result = Some(result);
        poisoned
    }

    fn ack(self: Box<Self>, batch: Result<(), &str>) {
        let result = match (self.result, batch) {
            // Its own failure stands whatever became of the batch.
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (_, Err(why)) => Err(StoreError::Batch(why.to_owned())),
            (None, Ok(())) => Err(StoreError::Batch("command was not run".to_owned())),
        };
        // The caller may have stopped waiting (the auditor does not wait): nothing to tell.
        let _ = self.ack.send(result);
    }
}

struct Command {
    pending: Box<dyn Pending>,
    durability: Durability,
}

/// The queue into the writer thread.
#[derive(Clone)]
pub(super) struct Writer {
    tx: mpsc::Sender<Command>,
}

impl Writer {
    /// Queues `f` to run on the write connection. The command is queued before this returns
    /// (unless the queue is full: then when the future is first polled), so a caller that does
    /// not await the future still has its write committed, in call order. The future resolves
    /// once the transaction holding the command has committed (and, for `Synced`, reached the
    /// disk).
    pub(super) fn submit<T, F>(
        &self,
        durability: Durability,
        f: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (ack, done) = oneshot::channel();
        let cmd = Command {
            pending: Box::new(Typed {
                f: Some(f),
                result: None,
                ack,
            }),
            durability,
        };
        let queued = match self.tx.try_send(cmd) {
            Ok(()) => Ok(None),
            Err(TrySendError::Full(cmd)) => Ok(Some((self.tx.clone(), cmd))),
            Err(TrySendError::Closed(_)) => Err(StoreError::Stopped),
        };
        async move {
            if let Some((tx, cmd)) = queued? {
                tx.send(cmd).await.map_err(|_| StoreError::Stopped)?;
            }
            done.await.map_err(|_| StoreError::Stopped)?
        }
    }

    /// Commands queued and not yet taken by the writer.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Configures the write connection and starts the writer and checkpointer threads.
pub(super) fn start(
    conn: Connection,
    checkpoint_conn: Connection,
    stats: Arc<Stats>,
) -> Result<Writer, StoreError> {
    conn.set_prepared_statement_cache_capacity(64);
    conn.pragma_update(None, "wal_autocheckpoint", AUTOCHECKPOINT_BACKSTOP)?;
    // Deleted and overwritten content (a cleared prompt) is zeroed in the pages written, not
    // left in free space.
    conn.pragma_update(None, "secure_delete", "ON")?;
    checkpoint_conn.pragma_update(None, "secure_delete", "ON")?;
    checkpoint_conn.pragma_update(None, "synchronous", "NORMAL")?;
    checkpoint_conn.busy_timeout(SCRUB_BUSY_TIMEOUT)?;
    let (tx, rx) = mpsc::channel(QUEUE);
    // One slot: nudges that arrive while a checkpoint is pending or running merge into it.
    let (nudge, nudges) = std_mpsc::sync_channel(1);
    let nudge = Nudge {
        tx: nudge,
        scrub: Arc::new(AtomicBool::new(false)),
    };
    let ckpt = nudge.clone();
    std::thread::Builder::new()
        .name("skep-store-ckpt".into())
        .spawn(move || checkpointer(&checkpoint_conn, &nudges, &ckpt))?;
    std::thread::Builder::new()
        .name("skep-store-write".into())
        .spawn(move || run(&conn, rx, &stats, &nudge))?;
    Ok(Writer { tx })
}

/// The writer's (and the checkpointer's own) way to wake the checkpointer.
#[derive(Clone)]
struct Nudge {
    tx: std_mpsc::SyncSender<()>,
    /// Set when the next checkpoint must also truncate the WAL (a prompt was cleared).
    scrub: Arc<AtomicBool>,
}

impl Nudge {
    fn checkpoint(&self) {
        // Full means a nudge is already waiting: this one adds nothing.
        let _ = self.tx.try_send(());
    }

    fn scrub(&self) {
        // Set before the nudge, so the checkpoint it wakes (or the one waiting) sees it.
        self.scrub.store(true, Ordering::Release);
        self.checkpoint();
    }
}

/// The writer loop: block for the first command, take whatever else is already queued, commit
/// it all at once, acknowledge. Ends when every `Writer` is gone and the queue is empty.
fn run(conn: &Connection, mut rx: mpsc::Receiver<Command>, stats: &Stats, nudge: &Nudge) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut since_nudge = 0;
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        SCRUB.with(|s| s.set(false));
        let outcome = commit(conn, &mut batch);
        let scrub = SCRUB.with(|s| s.replace(false));
        match &outcome {
            Ok(()) => {
                stats.transactions.fetch_add(1, Ordering::Relaxed);
                stats
                    .commands
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Err(e) => error!(error = %e, commands = batch.len(), "store batch failed"),
        }
        let outcome = outcome.as_ref().map(|_| ()).map_err(String::as_str);
        for cmd in batch.drain(..) {
            cmd.pending.ack(outcome);
        }
        since_nudge += 1;
        if scrub && outcome.is_ok() {
            since_nudge = 0;
            nudge.scrub();
        } else if since_nudge >= CHECKPOINT_EVERY {
            since_nudge = 0;
            nudge.checkpoint();
        }
    }
}

/// Runs the batch in one transaction. A failing command has already been undone in its own
/// savepoint; `Err` here means nothing in the batch was committed.
fn commit(conn: &Connection, batch: &mut [Command]) -> Result<(), String> {
    let synced = batch.iter().any(|c| c.durability == Durability::Synced);
    if synced {
        // In WAL mode, FULL fsyncs the WAL at commit; that covers every earlier transaction
        // too, since they sit before this one in the same file. Set per batch, not per
        // connection: only a shutdown flush asks for it. A PRAGMA acts when prepared, so it is
        // not a cached statement.
        conn.execute_batch("PRAGMA synchronous = FULL")
            .map_err(|e| e.to_string())?;
    }
    let result = (|| {
        exec(conn, "BEGIN IMMEDIATE").map_err(|e| e.to_string())?;
        for cmd in batch.iter_mut() {
            cmd.pending.run(conn)?;
        }
        exec(conn, "COMMIT").map_err(|e| e.to_string())
    })();
    if result.is_err()
        && !conn.is_autocommit()
        && let Err(e) = conn.execute_batch("ROLLBACK")
    {
        error!(error = %e, "store rollback failed");
    }
    if synced && let Err(e) = conn.execute_batch("PRAGMA synchronous = NORMAL") {
        // Safe (every commit synced), only slower: say so.
        warn!(error = %e, "store stays at synchronous=FULL");
    }
    result
}

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Copies committed pages from the WAL into the database file, fsyncs included, so the writer
/// never has to. PASSIVE: it neither waits for nor blocks the writer or the readers, and
/// whatever it could not copy this time, the next nudge will.
///
/// A scrub (after a batch that cleared a prompt) first copies what it can PASSIVEly, then runs
/// a TRUNCATE checkpoint, which waits briefly for readers, blocks the writer only for the rest
/// of the copy, and empties `queen.db-wal`, taking the prompt's old page images with it. Scrubs
/// are at least `SCRUB_SPACING` apart; one that could not finish is tried again.
fn checkpointer(conn: &Connection, nudges: &std_mpsc::Receiver<()>, nudge: &Nudge) {
    let mut last_scrub: Option<Instant> = None;
    while nudges.recv().is_ok() {
        if let Err(e) = checkpoint(conn, "PASSIVE") {
            warn!(error = %e, "WAL checkpoint failed; will retry");
        }
        if !nudge.scrub.swap(false, Ordering::AcqRel) {
            continue;
        }
        if let Some(wait) = last_scrub.and_then(|t| SCRUB_SPACING.checked_sub(t.elapsed())) {
            std::thread::sleep(wait);
        }
        last_scrub = Some(Instant::now());
        match checkpoint(conn, "TRUNCATE") {
            Ok(true) => {}
            outcome => {
                if let Err(e) = outcome {
                    warn!(error = %e, "WAL scrub failed; will retry");
                }
                // Busy (a reader on an old snapshot, or the writer mid-batch): try again soon.
                std::thread::sleep(SCRUB_RETRY);
                nudge.scrub();
            }
        }
    }
}

/// Runs one checkpoint in `mode`; true when it completed (SQLite reported it not busy).
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<bool> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok(r.get::<_, i64>(0)? == 0)
    })
}

#[cfg(test)]
mod scrub_tests {
    use std::time::{Duration, Instant};

    use crate::model::{JobRecord, JobState, Timings};
    use crate::store::{JobUpdate, start};

    fn holds(path: &std::path::Path, needle: &[u8]) -> bool {
        std::fs::read(path)
            .map(|b| b.windows(needle.len()).any(|w| w == needle))
            .unwrap_or(false)
    }

    /// A terminal update clears the prompt, and the checkpointer then removes its bytes from
    /// the WAL and the database file, short prompts (in the row) and long ones (overflow pages).
    #[test]
    fn a_cleared_prompt_leaves_the_database_files() {
        let dir = std::env::temp_dir().join(format!("skep-store-scrub-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("q.db");
        let marker = "okapi-prompt-7f3a9c";
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = start(&db).unwrap();
            let long = format!("{marker} ").repeat(1000);
            for (id, prompt) in [("short", marker.to_owned()), ("long", long)] {
                let job = JobRecord {
                    id: id.into(),
                    model: "m".into(),
                    state: JobState::Queued,
                    created_unix_ms: 1,
                    finished_unix_ms: 0,
                    deadline_ms: 1000,
                    max_tokens: 1,
                    tokens: 0,
                    node_id: String::new(),
                    error: String::new(),
                    timings: Timings::default(),
                };
                store
                    .insert(job, &prompt, "caller", Default::default())
                    .await
                    .unwrap();
            }
            assert!(holds(&dir.join("q.db-wal"), marker.as_bytes()));
            for id in ["short", "long"] {
                let done = JobUpdate {
                    id: id.into(),
                    state: JobState::Done,
                    tokens: 1,
                    node_id: String::new(),
                    error: String::new(),
                    timings: Timings::default(),
                    finished_unix_ms: 2,
                };
                store.update(done).await.unwrap();
            }
            let until = Instant::now() + Duration::from_secs(20);
            let files = ["q.db", "q.db-wal", "q.db-shm"];
            while files.iter().any(|f| holds(&dir.join(f), marker.as_bytes())) {
                assert!(
                    Instant::now() < until,
                    "the cleared prompt is still on disk"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
