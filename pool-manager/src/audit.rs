//! The pool manager's audit trail: refused callers and lane corruption, appended to its own
//! hash-chained log (`skep-audit`) by a dedicated thread.
//!
//! Events go through a bounded channel with `try_send`: recording never blocks a request, and an
//! event that does not fit is counted and logged, never dropped silently. Refused callers are
//! coalesced before the channel (`refused`): one entry when a source starts being refused, then
//! one per interval carrying the count, so a flood of refused calls neither grows the log per
//! call nor fills the backlog that `lane.corrupt` events need. Checkpoints are written
//! apart from the log, to `audit.checkpoint` in the data dir, so deleting the newest entries is
//! detected by `skep audit verify --checkpoint`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use skep_audit::{AuditKey, AuditLog, AuditOptions, Fields, FsyncPolicy};
use skep_common::ratelimit::{Coalescer, DEFAULT_REFUSAL_INTERVAL, Summary};
use tracing::{error, warn};

pub use skep_audit::events;

/// Events waiting to be written.
const BACKLOG: usize = 1024;
/// Entries between checkpoints (and fsyncs).
const CHECKPOINT_EVERY: u32 = 32;

struct Record {
    event: &'static str,
    actor: String,
    fields: Fields,
}

enum Msg {
    Event(Record),
    /// Write a checkpoint (fsync included) and answer: what `flush` waits for.
    Flush(SyncSender<()>),
}

/// Refusals coalesced per source address (`None`: unknown).
type Refusals = Coalescer<Option<IpAddr>>;

/// Cheap to clone; records events without waiting.
#[derive(Clone)]
pub struct Audit {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
    refusals: Arc<Refusals>,
}

impl Audit {
    /// Opens the log in `<data_dir>/audit` with the key `<data_dir>/audit.key` (created 0600)
    /// and starts the writer thread.
    pub fn start(data_dir: &Path) -> Result<Audit, skep_audit::AuditError> {
        Audit::start_with(data_dir, DEFAULT_REFUSAL_INTERVAL)
    }

    /// `start`, coalescing refused callers over `refusal_interval`.
    pub fn start_with(
        data_dir: &Path,
        refusal_interval: Duration,
    ) -> Result<Audit, skep_audit::AuditError> {
        let key = AuditKey::load_or_create(&data_dir.join("audit.key"))?;
        let opts = AuditOptions {
            fsync: FsyncPolicy::Batch(CHECKPOINT_EVERY),
            ..AuditOptions::default()
        };
        let log = AuditLog::open(&data_dir.join("audit"), key, opts)?;
        let (tx, rx) = sync_channel::<Msg>(BACKLOG);
        let checkpoint_file = data_dir.join("audit.checkpoint");
        let refusals = Arc::new(Coalescer::new(refusal_interval));
        let summaries = Arc::clone(&refusals);
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || writer(log, rx, checkpoint_file, &summaries))
            .map_err(|source| skep_audit::AuditError::Io {
                path: data_dir.to_owned(),
                source,
            })?;
        Ok(Audit {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
            refusals,
        })
    }

    /// A refused caller from `peer`: recorded at once if this source was quiet, else counted
    /// into the summary its window ends with.
    pub fn refused(&self, peer: Option<IpAddr>, actor: &str, reason: &str) {
        if self.refusals.note(peer, Instant::now(), actor, reason) {
            let mut fields = Fields::new().reason(reason).num("count", 1);
            if let Some(ip) = peer {
                fields = fields.str("peer", &ip.to_string());
            }
            self.record(events::AUTH_FAILURE, actor, fields);
        }
    }

    pub fn record(&self, event: &'static str, actor: &str, fields: Fields) {
        let r = Record {
            event,
            actor: actor.to_owned(),
            fields,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(Msg::Event(r))
        {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            warn!(
                event,
                dropped_total = n,
                "audit event dropped: writer backlog full"
            );
        }
    }
}

impl Audit {
    /// Waits (at most `timeout`) until every event recorded so far is on disk: before the
    /// process exits on an error it has just audited.
    pub fn flush(&self, timeout: std::time::Duration) {
        let (ack, done) = sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(timeout);
        }
    }
}

fn writer(
    mut log: AuditLog,
    rx: std::sync::mpsc::Receiver<Msg>,
    checkpoint_file: PathBuf,
    refusals: &Refusals,
) {
    let mut since = 0;
    let tick = refusals.interval().min(Duration::from_secs(1));
    // Ends when every `Audit` handle is gone.
    loop {
        let msg = rx.recv_timeout(tick);
        for s in refusals.due(Instant::now()) {
            append(&mut log, summary(s));
            since += 1;
        }
        let msg = match msg {
            Ok(msg) => msg,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let r = match msg {
            Msg::Event(r) => r,
            Msg::Flush(ack) => {
                checkpoint(&mut log, &checkpoint_file);
                since = 0;
                let _ = ack.send(());
                continue;
            }
        };
        if !append(&mut log, r) {
            continue;
        }
        since += 1;
        if since >= CHECKPOINT_EVERY {
            checkpoint(&mut log, &checkpoint_file);
            since = 0;
        }
    }
    for s in refusals.drain() {
        append(&mut log, summary(s));
    }
    checkpoint(&mut log, &checkpoint_file);
}

fn append(log: &mut AuditLog, r: Record) -> bool {
    match log.append(r.event, &r.actor, r.fields) {
        Ok(_) => true,
        Err(e) => {
            error!(event = r.event, error = %e, "audit append failed");
            false
        }
    }
}

/// One entry for `count` refusals of one source over one interval.
fn summary(s: Summary<Option<IpAddr>>) -> Record {
    let mut fields = Fields::new()
        .reason(&format!("repeated: {}", s.reason))
        .num("count", s.count)
        .num(
            "window_ms",
            u64::try_from(s.over.as_millis()).unwrap_or(u64::MAX),
        );
    if let Some(Some(ip)) = s.source {
        fields = fields.str("peer", &ip.to_string());
    }
    Record {
        event: events::AUTH_FAILURE,
        actor: s.actor,
        fields,
    }
}

fn checkpoint(log: &mut AuditLog, file: &Path) {
    if let Err(e) = log.sync() {
        error!(error = %e, "audit fsync failed");
    }
    let tmp = file.with_extension("tmp");
    let written =
        std::fs::write(&tmp, log.checkpoint().to_json()).and_then(|_| std::fs::rename(&tmp, file));
    if let Err(e) = written {
        error!(error = %e, "cannot write audit checkpoint");
    }
}
