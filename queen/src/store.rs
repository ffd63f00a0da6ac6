//! The state store: jobs, tokens, models and audit checkpoints in one SQLite database (WAL)
//! under the data directory.
//!
//! Persistence must stay off the hot path of a job without losing anything a caller was told is
//! stored, so the store is three kinds of threads around one database file:
//!
//! - **one writer** (`writer.rs`) owns the only connection that writes. Commands queue on a
//!   bounded channel; the writer takes everything pending, runs it in one transaction and
//!   commits once (group commit), then acknowledges each command with its own result. Each
//!   command runs in a savepoint, so a failing one is undone alone while the rest commit. Audit
//!   checkpoints come through here too: a second writing connection would only contend for
//!   SQLite's single write lock.
//! - **readers** (`reader.rs`) have their own connections: WAL lets them read the last
//!   committed state while the writer works, so a `get` never waits behind a batch.
//! - **a checkpointer** folds the WAL back into the database (and fsyncs) when the writer nudges
//!   it, so the writer itself never waits on the disk.
//!
//! Durability: WAL with `synchronous=NORMAL`. A commit is in the WAL file (the OS's page cache)
//! before it is acknowledged, and WAL recovery replays it on the next open, so every
//! acknowledged write survives the queen's process dying, SIGKILL included: that is the promise
//! that jobs accepted are never lost across a queen restart. What NORMAL does not cover is the
//! machine losing power (or the kernel crashing) before the OS writes the WAL out: the last
//! transactions before such a crash can roll back. The database is never corrupted either way.
//! FULL would fsync at every commit and put the disk's latency into every job's; instead a
//! caller that needs power-loss durability asks for it per command (`Durability::Synced`: the
//! auditor's final checkpoint at shutdown), which also makes everything committed before it
//! durable.
//!
//! `StoreHandle` is the async face the rest of the queen uses; it is cheap to clone.

mod reader;
mod sql;
mod writer;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rusqlite::Connection;

use crate::Error;
use crate::auth::TokenEntry;
use crate::catalogue::ModelEntry;
use crate::model::{JobRecord, JobState, Timings};

/// Reader threads (and connections). Reads are few next to writes (a job writes three times and
/// is read when a client asks), so two keep a slow `list` from holding up a `get`.
const READERS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The transaction carrying the command failed as a whole (e.g. the commit hit an I/O
    /// error): nothing of it was stored.
    #[error("transaction not committed: {0}")]
    Batch(String),
    #[error("cannot start the store's threads: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the store has stopped")]
    Stopped,
}

/// A job the previous run of the queen left unfinished: enough to run it again.
#[derive(Debug, Clone, PartialEq)]
pub struct Interrupted {
    pub id: String,
    pub model: String,
    pub prompt: String,
    pub max_tokens: u32,
    /// How it was to be sampled, as submitted.
    pub sampling: skep_common::sampling::Sampling,
    pub caller: String,
    /// Wall-clock time the job's deadline falls at (created + budget).
    pub deadline_unix_ms: u64,
}

/// Fields that change as a job progresses.
#[derive(Debug, Clone)]
pub struct JobUpdate {
    pub id: String,
    pub state: JobState,
    pub tokens: u32,
    pub node_id: String,
    pub error: String,
    pub timings: Timings,
    pub finished_unix_ms: u64,
}

/// A row of `audit_checkpoints`: where the audit log stood, kept apart from the log itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditCheckpoint {
    /// Sequence number of the last log entry covered.
    pub seq: u64,
    /// The signed checkpoint, as JSON.
    pub checkpoint: String,
    /// Audit events dropped so far (backlog full or append failed).
    pub dropped: u64,
}

/// How far a write has gone when it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Committed to the WAL: survives the queen's process dying, not a power loss.
    Committed,
    /// Committed and fsynced, with everything committed before it: survives a power loss too.
    /// Costs a disk flush; for shutdown, not for the hot path.
    Synced,
}

/// What the writer has committed since the store started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Transactions committed.
    pub transactions: u64,
    /// Commands in those transactions (including ones that failed alone and were undone).
    pub commands: u64,
}

/// Opens (creating if needed) the database at `path` and starts the store's threads.
pub fn start(path: &Path) -> Result<StoreHandle, StoreError> {
    let conn = Connection::open(path)?;
    // WAL is a property of the database file: set once here, the other connections inherit it.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // See the module comment for what NORMAL promises and what it does not.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(sql::SCHEMA)?;
    sql::migrate(&conn)?;
    let stats = Arc::<writer::Stats>::default();
    let writer = writer::start(conn, Connection::open(path)?, Arc::clone(&stats))?;
    let readers = reader::start(path, READERS)?;
    Ok(StoreHandle {
        writer,
        readers,
        stats,
    })
}

/// Async handle to the store; cheap to clone. The store's threads stop once every handle is
/// gone and the writes already queued are committed.
#[derive(Clone)]
pub struct StoreHandle {
    writer: writer::Writer,
    readers: reader::Readers,
    stats: Arc<writer::Stats>,
}

// === impl StoreHandle ===

impl StoreHandle {
    /// Records a job (or re-records a recovered one) with what is needed to run it again.
    pub async fn insert(
        &self,
        job: JobRecord,
        prompt: &str,
        caller: &str,
        sampling: skep_common::sampling::Sampling,
    ) -> Result<(), Error> {
        let (prompt, caller) = (prompt.to_owned(), caller.to_owned());
        self.write(move |c| sql::insert(c, &job, &prompt, &caller, &sampling))
            .await
    }

    pub async fn update(&self, update: JobUpdate) -> Result<(), Error> {
        self.write(move |c| sql::update(c, &update)).await
    }

    pub async fn get(&self, id: &str) -> Result<Option<JobRecord>, Error> {
        self.get_owned(id, None).await
    }

    /// The job `id` if `caller` (a token digest, hex) submitted it; `None` means any caller
    /// (an admin). A job of another caller is `None`, exactly like a missing one.
    pub async fn get_owned(
        &self,
        id: &str,
        caller: Option<&str>,
    ) -> Result<Option<JobRecord>, Error> {
        let (id, caller) = (id.to_owned(), caller.map(str::to_owned));
        Ok(self
            .readers
            .read(move |c| sql::get(c, &id, caller.as_deref()))
            .await?)
    }

    /// At start: the jobs the previous run left queued or running, now marked queued again,
    /// oldest first, for the queen to run them again.
    pub async fn take_interrupted(&self) -> Result<Vec<Interrupted>, Error> {
        // A read and a write that must be atomic: both run as one writer command.
        self.write(sql::take_interrupted).await
    }

    /// Deletes jobs that finished before the given time; returns how many.
    pub async fn prune(&self, finished_before_unix_ms: u64) -> Result<usize, Error> {
        self.write(move |c| sql::prune(c, finished_before_unix_ms))
            .await
    }

    pub async fn insert_token(&self, token: TokenEntry) -> Result<(), Error> {
        self.write(move |c| sql::insert_token(c, &token)).await
    }

    pub async fn revoke_token(&self, digest: &skep_common::auth::TokenDigest) -> Result<(), Error> {
        let digest = digest.to_hex();
        self.write(move |c| sql::revoke_token(c, &digest)).await
    }

    pub async fn load_tokens(&self) -> Result<Vec<TokenEntry>, Error> {
        Ok(self.readers.read(sql::load_tokens).await?)
    }

    /// Marks an approval's nonce used, durably (committed before this returns); `false` if it
    /// was already used, by this run of the queen or an earlier one.
    pub async fn use_approval_nonce(
        &self,
        nonce: String,
        action: &'static str,
        expires_unix_ms: u64,
        now_unix_ms: u64,
    ) -> Result<bool, Error> {
        self.write(move |c| {
            sql::use_approval_nonce(c, &nonce, action, expires_unix_ms, now_unix_ms)
        })
        .await
    }

    pub async fn upsert_model(&self, model: ModelEntry) -> Result<(), Error> {
        self.write(move |c| sql::upsert_model(c, &model)).await
    }

    pub async fn list_models(&self) -> Result<Vec<ModelEntry>, Error> {
        Ok(self.readers.read(sql::list_models).await?)
    }

    pub async fn list(&self, limit: u32) -> Result<Vec<JobRecord>, Error> {
        self.list_owned(limit, None).await
    }

    /// The newest `limit` jobs `caller` submitted; `None` means everyone's (an admin).
    pub async fn list_owned(
        &self,
        limit: u32,
        caller: Option<&str>,
    ) -> Result<Vec<JobRecord>, Error> {
        let caller = caller.map(str::to_owned);
        Ok(self
            .readers
            .read(move |c| sql::list(c, limit, caller.as_deref()))
            .await?)
    }

    /// Stores an audit checkpoint through the writer. The command is queued before this
    /// returns, so a caller that must not wait (the auditor, between events) can drop the
    /// future or hand it to a task and the row still lands, in call order; awaiting it waits
    /// for the commit (and, with `Durability::Synced`, for the disk).
    pub fn checkpoint(
        &self,
        checkpoint: AuditCheckpoint,
        durability: Durability,
    ) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        let done = self
            .writer
            .submit(durability, move |c| sql::insert_checkpoint(c, &checkpoint));
        async move { Ok(done.await?) }
    }

    /// Transactions and commands the writer has committed so far. With group commit under
    /// load, transactions grow more slowly than commands.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            transactions: self.stats.transactions.load(Ordering::Relaxed),
            commands: self.stats.commands.load(Ordering::Relaxed),
        }
    }

    async fn write<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        Ok(self.writer.submit(Durability::Committed, f).await?)
    }
}

#[cfg(test)]
mod tests;
