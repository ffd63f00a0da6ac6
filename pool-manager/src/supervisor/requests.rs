//! A worker's request lane as its users share it: the rising `seq` every request claims under
//! one lock, the MAC over every field, and the cancels (`Ticket`) of the jobs sent on it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prost::Message;
use skep_common::secret::Secret;
use skep_common::session::{self, RequestFields};
use skep_lane::{Lane, LaneError};
use skep_proto::v1::LaneRequest;
use tracing::debug;

/// How long a cancel request may wait for room in the request lane. Cancels are pushed from a
/// session's task, which must not stall on a stuck worker; the cancel word is set regardless,
/// and a worker that does not stop within `CANCEL_GRACE` is killed.
const CANCEL_PUSH_TIMEOUT: Duration = Duration::from_millis(50);

/// Locks `m`, shrugging off poison: every critical section here leaves its data consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A worker's request lane and what every request on it needs.
pub(super) struct Requests {
    lane: Lane,
    /// This incarnation's lane session secret; the worker runs only requests MACed with it.
    session: Secret,
    /// The last seq claimed. Held from claiming a seq until its request is in the lane: the
    /// worker refuses a seq not above the last one it accepted, so requests from several
    /// threads must enter the lane in seq order.
    last_seq: Mutex<u64>,
}

impl std::fmt::Debug for Requests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requests")
            .field("generation", &self.lane.generation())
            .finish_non_exhaustive()
    }
}

// === impl Requests ===

impl Requests {
    pub(super) fn new(lane: Lane, session: Secret) -> Requests {
        Requests {
            lane,
            session,
            last_seq: Mutex::new(0),
        }
    }

    pub(super) fn lane(&self) -> &Lane {
        &self.lane
    }

    /// The last seq claimed on this lane.
    #[cfg(test)]
    pub(super) fn last_seq(&self) -> u64 {
        *lock(&self.last_seq)
    }

    /// Sends `fields` (its `seq` and MAC filled in here) on the next seq; `before(seq)` runs
    /// under the same lock, before the push, so whatever it registers exists before any answer
    /// can. A request too large for the lane is refused before a seq is spent.
    pub(super) fn send(
        &self,
        mut fields: RequestFields<'_>,
        timeout: Duration,
        before: impl FnOnce(u64),
    ) -> Result<u64, LaneError> {
        let mut last = lock(&self.last_seq);
        fields.seq = *last + 1;
        let mac = session::request_mac(&self.session, &fields);
        let entry = LaneRequest {
            seq: fields.seq,
            job_id: fields.job_id.to_owned(),
            model: fields.model.to_owned(),
            prompt: fields.prompt.to_owned(),
            max_tokens: fields.max_tokens,
            deadline_mono_ns: fields.deadline_ns,
            mac: mac.to_vec(),
            temperature: fields.temperature,
            top_p: fields.top_p,
            seed: fields.seed,
            cancel_seq: fields.cancel_seq,
        }
        .encode_to_vec();
        let max = self.lane.max_entry();
        if entry.len() > max as usize {
            return Err(LaneError::TooLarge {
                len: entry.len(),
                max,
            });
        }
        // Spent even if the push fails: a worker whose lane refuses a push is replaced.
        *last = fields.seq;
        before(fields.seq);
        self.lane.push_timeout(&entry, timeout)?;
        Ok(fields.seq)
    }

    /// Asks the worker to stop the job it runs as `target`: the header's cancel word (which
    /// names the last cancel only) and a cancel request of its own (which names each).
    pub(super) fn cancel(&self, target: u64) -> Result<(), LaneError> {
        self.lane.request_cancel(target);
        let fields = RequestFields {
            seq: 0,
            job_id: "",
            model: "",
            prompt: "",
            max_tokens: 0,
            deadline_ns: 0,
            temperature: 0.0,
            top_p: 0.0,
            seed: 0,
            cancel_seq: target,
        };
        self.send(fields, CANCEL_PUSH_TIMEOUT, |_| {}).map(|_| ())
    }
}

/// One job's link to the worker it runs on, shared by the slot thread running it and by
/// whoever cancels it (a session, the pool closing). Exactly one of them pushes the cancel
/// request, once the job's own request is in the lane.
#[derive(Debug)]
pub(super) struct Ticket {
    requests: Arc<Requests>,
    /// The job's seq once its request is in the lane (0 before).
    seq: AtomicU64,
    cancelled: AtomicBool,
    cancel_sent: AtomicBool,
}

// === impl Ticket ===

impl Ticket {
    pub(super) fn new(requests: Arc<Requests>) -> Ticket {
        Ticket {
            requests,
            seq: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            cancel_sent: AtomicBool::new(false),
        }
    }

    /// Stops the job: at once if its request is in the lane, else as soon as it is.
    pub(super) fn cancel(&self) {
        // SeqCst here and in `sent`: whichever of the two stores comes second sees the other,
        // so a cancel racing the job's send is never lost.
        self.cancelled.store(true, Ordering::SeqCst);
        self.send_cancel();
    }

    pub(super) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// The job's request entered the lane as `seq`.
    pub(super) fn sent(&self, seq: u64) {
        self.seq.store(seq, Ordering::SeqCst);
        if self.cancelled.load(Ordering::SeqCst) {
            self.send_cancel();
        }
    }

    fn send_cancel(&self) {
        let seq = self.seq.load(Ordering::SeqCst);
        if seq == 0 || self.cancel_sent.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.requests.cancel(seq) {
            // The cancel word is set; the slot thread kills a worker that ignores it.
            debug!(seq, error = %e, "cancel request not pushed");
        }
    }
}
