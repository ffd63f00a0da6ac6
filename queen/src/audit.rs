//! The queen's audit trail: an actor on its own thread that appends events to the hash-chained
//! log (`skep-audit`) and stores checkpoints in the database, apart from the log.
//!
//! Recording never blocks a request: events go through a bounded mailbox with `try_send`, and
//! an event that does not fit is counted and reported (log line and next checkpoint), never
//! dropped silently. Prompts and tokens never reach this module raw: callers pass `Fields`
//! built with `prompt()` (length + hash) and fingerprints.
//!
//! Checkpoints go to the database through the store's single writer (`StoreHandle::checkpoint`)
//! rather than a connection of their own, which would contend with the store for SQLite's one
//! write lock. Between events the auditor queues a checkpoint and moves on; only `flush` (and
//! stopping) asks for it to be on disk, and only `flush` waits for that.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix::prelude::*;
use skep_audit::{AuditKey, AuditLog, AuditOptions, Fields, FsyncPolicy};
use tracing::{error, warn};

use crate::store::{AuditCheckpoint, Durability, StoreHandle};

/// Events waiting to be written before new ones are counted as dropped.
const MAILBOX: usize = 4096;
/// Entries between checkpoints (and fsyncs).
const CHECKPOINT_EVERY: u64 = 32;

pub use skep_audit::events;

/// An approval credential was refused; `reason` says which check failed (the caller is not told).
pub const APPROVAL_REFUSED: &str = "approval.refused";
/// An approval credential was accepted and its nonce recorded as used.
pub const APPROVAL_USED: &str = "approval.used";

pub struct Auditor {
    log: AuditLog,
    store: StoreHandle,
    since_checkpoint: u64,
    dropped: Arc<AtomicU64>,
}

// A plain actor on a dedicated arbiter thread (not a SyncArbiter): its file writes block only
// that thread, and unlike a SyncContext it has a mailbox whose bound we choose.
impl Actor for Auditor {
    type Context = Context<Self>;

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        // The command is queued before `checkpoint` returns, so it is committed even if the
        // arbiter stops before the spawned task runs.
        actix::spawn(self.checkpoint(Durability::Synced));
        Running::Stop
    }
}

impl Auditor {
    /// Syncs the log and queues its checkpoint on the store's writer. The returned future
    /// waits for the commit and logs a failure; dropping it (or spawning it) does not unqueue
    /// the checkpoint.
    fn checkpoint(&mut self, durability: Durability) -> impl Future<Output = ()> + 'static {
        if let Err(e) = self.log.sync() {
            error!(error = %e, "audit fsync failed");
        }
        let cp = self.log.checkpoint();
        let row = AuditCheckpoint {
            seq: cp.seq,
            checkpoint: cp.to_json(),
            dropped: self.dropped.load(Ordering::Relaxed),
        };
        let stored = self.store.checkpoint(row, durability);
        self.since_checkpoint = 0;
        async move {
            if let Err(e) = stored.await {
                error!(error = %e, "cannot store audit checkpoint");
            }
        }
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
            // Not waited for here: the next event should not queue behind a commit.
            actix::spawn(self.checkpoint(Durability::Committed));
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

impl Handler<Flush> for Auditor {
    // The reply waits for the checkpoint to reach the disk; the actor meanwhile goes on with
    // its mailbox.
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Flush, _: &mut Self::Context) -> Self::Result {
        Box::pin(self.checkpoint(Durability::Synced))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditStartError {
    #[error("audit log: {0}")]
    Log(#[from] skep_audit::AuditError),
}

/// Opens the log under `dir` with the key at `key_file` (created 0600 if missing) and starts the
/// auditor. Checkpoints go to the `audit_checkpoints` table through `store`'s writer.
pub fn start(
    dir: &Path,
    key_file: &Path,
    store: StoreHandle,
) -> Result<AuditHandle, AuditStartError> {
    let key = AuditKey::load_or_create(key_file)?;
    let log = AuditLog::open(
        dir,
        key,
        AuditOptions {
            fsync: FsyncPolicy::Batch(CHECKPOINT_EVERY as u32),
            ..AuditOptions::default()
        },
    )?;
    let dropped = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&dropped);
    let auditor = Auditor {
        log,
        store,
        since_checkpoint: 0,
        dropped: counter,
    };
    // The mailbox gets its bound before the address exists: set in `started`, it would apply
    // only once the actor runs, and events recorded before that would meet the default bound
    // (16) and be dropped.
    let (tx, rx) = actix::dev::channel::channel(MAILBOX);
    Arbiter::new().spawn_fn(move || {
        actix::spawn(Context::with_receiver(rx).into_future(auditor));
    });
    Ok(AuditHandle {
        addr: Addr::new(tx),
        dropped,
    })
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

    /// Writes a checkpoint now (e.g. before shutdown), waiting for the backlog ahead of it and
    /// until the checkpoint, and every database write before it, is on disk.
    pub async fn flush(&self) {
        let _ = self.addr.send(Flush).await;
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_land_in_the_database_through_the_store() {
        let dir = std::env::temp_dir().join(format!("skep-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("q.db");
        let sys = actix::System::new();
        sys.block_on(async {
            let store = crate::store::start(&db).unwrap();
            let audit = start(&dir.join("audit"), &dir.join("audit.key"), store.clone()).unwrap();
            // One checkpoint falls due at the 32nd entry; flush adds the last one.
            for i in 0..40 {
                audit.record("test.event", "tester", Fields::new().num("i", i));
            }
            audit.flush().await;
            assert_eq!(audit.dropped(), 0);
            // Flush returned: both rows are committed (the first was queued before the
            // second). Read while `audit` lives, so the auditor's stopping checkpoint cannot
            // add a third.
            let conn = rusqlite::Connection::open(&db).unwrap();
            let rows: Vec<(u64, String, u64)> = conn
                .prepare("SELECT seq, checkpoint, dropped FROM audit_checkpoints ORDER BY rowid")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let seqs: Vec<u64> = rows.iter().map(|r| r.0).collect();
            assert_eq!(seqs, vec![32, 40]);
            for (seq, json, dropped) in rows {
                let cp = skep_audit::Checkpoint::from_json(&json).unwrap();
                assert_eq!((cp.seq, dropped), (seq, 0));
            }
        });
        let _ = std::fs::remove_dir_all(&dir);
    }
}
