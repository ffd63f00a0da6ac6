//! The queen's audit trail: an actor on its own thread that appends events to the hash-chained
//! log (`skep-audit`) and stores checkpoints in the database, apart from the log.
//!
//! Recording never blocks a request: events go through a bounded mailbox with `try_send`, and
//! an event that does not fit is counted and reported (log line and next checkpoint), never
//! dropped silently. Prompts and tokens never reach this module raw: callers pass `Fields`
//! built with `prompt()` (length + hash) and fingerprints.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix::prelude::*;
use rusqlite::{Connection, params};
use skep_audit::{AuditKey, AuditLog, AuditOptions, Fields, FsyncPolicy};
use tracing::{error, warn};

/// Events waiting to be written before new ones are counted as dropped.
const MAILBOX: usize = 4096;
/// Entries between checkpoints (and fsyncs).
const CHECKPOINT_EVERY: u64 = 32;

pub use skep_audit::events;

pub struct Auditor {
    log: AuditLog,
    db: Connection,
    since_checkpoint: u64,
    dropped: Arc<AtomicU64>,
}

// A plain actor on a dedicated arbiter thread (not a SyncArbiter): its file writes block only
// that thread, and unlike a SyncContext it has a mailbox whose bound we choose.
impl Actor for Auditor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.checkpoint();
        Running::Stop
    }
}

impl Auditor {
    fn checkpoint(&mut self) {
        if let Err(e) = self.log.sync() {
            error!(error = %e, "audit fsync failed");
        }
        let cp = self.log.checkpoint();
        let dropped = self.dropped.load(Ordering::Relaxed);
        let r = self.db.execute(
            "INSERT INTO audit_checkpoints (seq, checkpoint, dropped) VALUES (?1, ?2, ?3)",
            params![cp.seq, cp.to_json().to_string(), dropped],
        );
        if let Err(e) = r {
            error!(error = %e, "cannot store audit checkpoint");
        }
        self.since_checkpoint = 0;
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Record {
    event: &'static str,
    actor: String,
    fields: Fields,
}

impl Handler<Record> for Auditor {
    type Result = ();
    fn handle(&mut self, r: Record, _: &mut Self::Context) {
        if let Err(e) = self.log.append(r.event, &r.actor, r.fields) {
            error!(event = r.event, error = %e, "audit append failed");
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.since_checkpoint += 1;
        if self.since_checkpoint >= CHECKPOINT_EVERY {
            self.checkpoint();
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

impl Handler<Flush> for Auditor {
    type Result = ();
    fn handle(&mut self, _: Flush, _: &mut Self::Context) {
        self.checkpoint();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditStartError {
    #[error("audit log: {0}")]
    Log(#[from] skep_audit::AuditError),
    #[error("audit checkpoints: {0}")]
    Db(#[from] rusqlite::Error),
}

/// Opens the log under `dir` with the key at `key_file` (created 0600 if missing) and starts the
/// auditor. Checkpoints go to the `audit_checkpoints` table of `db_path`.
pub fn start(dir: &Path, key_file: &Path, db_path: &Path) -> Result<AuditHandle, AuditStartError> {
    let key = AuditKey::load_or_create(key_file)?;
    let log = AuditLog::open(
        dir,
        key,
        AuditOptions {
            fsync: FsyncPolicy::Batch(CHECKPOINT_EVERY as u32),
            ..AuditOptions::default()
        },
    )?;
    let db = Connection::open(db_path)?;
    db.busy_timeout(std::time::Duration::from_secs(5))?;
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS audit_checkpoints (
            seq INTEGER NOT NULL, checkpoint TEXT NOT NULL, dropped INTEGER NOT NULL,
            created DATETIME DEFAULT CURRENT_TIMESTAMP)",
    )?;
    let dropped = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&dropped);
    let auditor = Auditor {
        log,
        db,
        since_checkpoint: 0,
        dropped: counter,
    };
    let addr = Auditor::start_in_arbiter(&Arbiter::new().handle(), move |_| auditor);
    Ok(AuditHandle { addr, dropped })
}

/// Cheap to clone; records events without waiting.
#[derive(Clone)]
pub struct AuditHandle {
    addr: Addr<Auditor>,
    dropped: Arc<AtomicU64>,
}

// === impl AuditHandle ===

impl AuditHandle {
    pub fn record(&self, event: &'static str, actor: &str, fields: Fields) {
        let msg = Record {
            event,
            actor: actor.to_owned(),
            fields,
        };
        if self.addr.try_send(msg).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            warn!(
                event,
                dropped_total = n,
                "audit event dropped: auditor backlog full"
            );
        }
    }

    /// Writes a checkpoint now (e.g. before shutdown), waiting for the backlog ahead of it.
    pub async fn flush(&self) {
        let _ = self.addr.send(Flush).await;
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
