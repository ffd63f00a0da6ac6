//! One worker process, shared by the slots of its group: its two lanes (requests go through
//! `requests::Requests`) and the reader thread that hands each response to the job it belongs
//! to.
//!
//! A worker runs up to `batch` jobs at once on one request lane and one response lane. Each
//! slot thread running a job here registers a route for its job's `seq` and waits on it; the
//! reader pops every response, routes it by `seq` and drops the route with the job's terminal
//! response. Anything the protocol does not allow (an undecodable entry, a token for a seq that
//! runs nothing here, a second ready message) breaks the worker: its lanes are marked dead, the
//! routes close and every job on it sees the worker lost. Nothing here decides what happens next
//! (`Slots::retire` does).

use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prost::Message;
use skep_common::deadline::{Deadline, micros};
use skep_common::sampling::Sampling;
use skep_common::secret::Secret;
use skep_common::session::RequestFields;
use skep_common::validate;
use skep_lane::{Lane, LaneError, monotonic_ns};
use skep_proto::v1::{LaneResponse, lane_response};
use tracing::{debug, info, warn};

use super::requests::{Requests, Ticket};
use super::{
    CANCEL_GRACE, CODE_DEADLINE_EXCEEDED, DEADLINE_GRACE, HEARTBEAT_TIMEOUT, Launch, POLL,
    STARTUP_GRACE,
};
use crate::{Error, Event};

/// How long the reader sleeps on an empty response lane. Marking the lane dead wakes it at
/// once; this only bounds how long a lost wake-up could keep it.
const READ_WAIT: Duration = Duration::from_secs(1);

/// Locks `m`, shrugging off poison: every critical section here leaves its data consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a worker is no longer usable.
#[derive(Debug, Clone)]
pub(super) enum Death {
    Exited(std::process::ExitStatus),
    Hung(Duration),
    Lane(String),
}

impl std::fmt::Display for Death {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Death::Exited(s) => write!(f, "worker exited ({s})"),
            Death::Hung(age) => write!(f, "worker silent for {}ms", age.as_millis()),
            Death::Lane(e) => write!(f, "worker lane broken: {e}"),
        }
    }
}

/// One request as the lane needs it.
pub(super) struct LaneJob<'a> {
    pub(super) job_id: &'a str,
    pub(super) model: &'a str,
    pub(super) prompt: &'a str,
    pub(super) max_tokens: u32,
    pub(super) sampling: Sampling,
    pub(super) deadline: Deadline,
    pub(super) arrived: Instant,
}

/// What the reader shares with the worker's users.
struct Link {
    responses: Lane,
    /// Per running job's seq, where its responses go. Dropped together when the worker breaks,
    /// which is how the jobs waiting on them learn it.
    routes: Mutex<HashMap<u64, Sender<LaneResponse>>>,
    /// Its engine said it has loaded: it can take jobs.
    loaded: AtomicBool,
    /// Why the reader gave up on the lane, if it did.
    fault: OnceLock<String>,
    /// Jobs this worker was started to run at once: the pool never sends it more.
    batch: usize,
}

/// A worker process and its lanes, shared (in an `Arc`) by its group's map and every job
/// running on it.
pub(super) struct Worker {
    pub(super) group: u32,
    pub(super) generation: u64,
    pub(super) model: String,
    child: Mutex<Child>,
    requests: Arc<Requests>,
    link: Arc<Link>,
    reader: Mutex<Option<JoinHandle<()>>>,
    started: Instant,
    /// Beating (alive), maybe still loading.
    beating: AtomicBool,
    /// The keeper saw it loaded and told the model set: jobs may lease it from now on.
    serving: AtomicBool,
    /// Jobs (and warm-ups) holding a `Lease` on it: a worker with any is never unloaded.
    jobs: AtomicUsize,
    /// Set once, by whoever found it dead first.
    retired: OnceLock<Death>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("group", &self.group)
            .field("generation", &self.generation)
            .field("model", &self.model)
            .field("pid", &self.pid())
            .field("loaded", &self.is_loaded())
            .finish_non_exhaustive()
    }
}

/// A job's (or a warm-up's) claim on a shared worker: the worker counts as busy until it drops.
#[derive(Debug)]
pub(super) struct Lease(Arc<Worker>);

impl Lease {
    /// Call with the worker's group map locked (or while holding another lease on it), so the
    /// keeper never unloads a worker between being found idle and being leased.
    pub(super) fn new(worker: &Arc<Worker>) -> Lease {
        worker.jobs.fetch_add(1, Ordering::AcqRel);
        Lease(Arc::clone(worker))
    }
}

impl std::ops::Deref for Lease {
    type Target = Arc<Worker>;
    fn deref(&self) -> &Arc<Worker> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.jobs.fetch_sub(1, Ordering::AcqRel);
    }
}

// === impl Worker ===

impl Worker {
    /// Starts a worker for `model` on `group`, running up to `batch` jobs at once, with its
    /// reader thread.
    pub(super) fn start(
        launch: &Launch,
        model: &str,
        args: &[String],
        group: u32,
        batch: usize,
        generation: u64,
    ) -> Result<Worker, LaneError> {
        // Sealed memfds, not files: no peer (the worker included) can shrink them under this
        // process, which would kill it with SIGBUS, and nothing else can open them by name.
        let requests =
            Lane::create_sealed(&format!("skep-group-{group}-req"), launch.lane, generation)?;
        let responses =
            Lane::create_sealed(&format!("skep-group-{group}-resp"), launch.lane, generation)?;
        let mut command = Command::new(&launch.program);
        // Exactly these two fds reach this worker; other groups' workers never inherit them.
        let request_fd = requests.pass_to(&mut command);
        let response_fd = responses.pass_to(&mut command);
        let mut child = command
            .args(args)
            .arg("--batch")
            .arg(batch.to_string())
            .arg("--prefill-chunk")
            .arg(launch.prefill_chunk.to_string())
            .arg("--request-lane-fd")
            .arg(request_fd.to_string())
            .arg("--response-lane-fd")
            .arg(response_fd.to_string())
            .arg("--generation")
            .arg(generation.to_string())
            // The session secret goes down this pipe: never argv, env or a file.
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .env_clear()
            .envs(
                std::env::vars_os().filter(|(k, _)| k == "RUST_LOG" || k == "PATH" || k == "HOME"),
            )
            .spawn()
            .map_err(LaneError::Io)?;
        let session = Secret::generate();
        let handed_over = child.stdin.take().map(|mut stdin| {
            stdin
                .write_all(session.expose().as_bytes())
                .and_then(|_| stdin.write_all(b"\n"))
        });
        if !matches!(handed_over, Some(Ok(()))) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LaneError::Io(std::io::Error::other(
                "could not hand the session secret to the worker",
            )));
        }
        let link = Arc::new(Link {
            responses,
            routes: Mutex::new(HashMap::new()),
            loaded: AtomicBool::new(false),
            fault: OnceLock::new(),
            batch,
        });
        let reader = {
            let link = Arc::clone(&link);
            std::thread::Builder::new()
                .name(format!("group-{group}-reader"))
                .spawn(move || link.read())
        };
        let reader = match reader {
            Ok(r) => r,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LaneError::Io(e));
            }
        };
        Ok(Worker {
            group,
            generation,
            model: model.to_owned(),
            child: Mutex::new(child),
            requests: Arc::new(Requests::new(requests, session)),
            link,
            reader: Mutex::new(Some(reader)),
            started: Instant::now(),
            beating: AtomicBool::new(false),
            serving: AtomicBool::new(false),
            jobs: AtomicUsize::new(0),
            retired: OnceLock::new(),
        })
    }

    pub(super) fn pid(&self) -> u32 {
        lock(&self.child).id()
    }

    pub(super) fn requests(&self) -> &Arc<Requests> {
        &self.requests
    }

    /// Its engine has loaded, the keeper has taken note, and it has not been retired: it
    /// can take jobs.
    pub(super) fn is_loaded(&self) -> bool {
        self.serving.load(Ordering::Acquire) && self.retired.get().is_none()
    }

    /// Its engine said it loaded (the keeper may not have taken note yet), whatever happened
    /// since.
    pub(super) fn has_loaded(&self) -> bool {
        self.link.loaded.load(Ordering::Acquire)
    }

    /// The keeper took note of its load: jobs may lease it.
    pub(super) fn serve(&self) {
        self.serving.store(true, Ordering::Release);
    }

    /// Some job or warm-up holds a lease on it.
    pub(super) fn is_busy(&self) -> bool {
        self.jobs.load(Ordering::Acquire) > 0
    }

    /// Is the worker still usable? Exited, silent, corrupt or retired workers are not; nor is
    /// one that beats but has not loaded within the start-up grace.
    pub(super) fn check(&self) -> Result<(), Death> {
        if let Some(death) = self.retired.get() {
            return Err(death.clone());
        }
        if let Some(why) = self.link.fault.get() {
            return Err(Death::Lane(why.clone()));
        }
        if let Ok(Some(status)) = lock(&self.child).try_wait() {
            return Err(Death::Exited(status));
        }
        if self.requests.lane().is_dead() || self.link.responses.is_dead() {
            return Err(Death::Lane("lane marked dead".into()));
        }
        let age = self.link.responses.heartbeat_age();
        let grace_over = self.started.elapsed() > STARTUP_GRACE;
        if age < HEARTBEAT_TIMEOUT {
            self.beating.store(true, Ordering::Release);
            if grace_over && !self.link.loaded.load(Ordering::Acquire) {
                return Err(Death::Hung(self.started.elapsed()));
            }
            return Ok(());
        }
        if self.beating.load(Ordering::Acquire) || grace_over {
            return Err(Death::Hung(age));
        }
        Ok(())
    }

    /// Takes the worker out of service for `death`: its lanes are marked dead (the reader
    /// stops, every route closes, so each job on it ends) and the process is killed. True for
    /// the first caller only, who accounts for the death.
    pub(super) fn retire(&self, death: &Death) -> bool {
        if self.retired.set(death.clone()).is_err() {
            return false;
        }
        self.stop();
        true
    }

    /// Why it was retired, else why it is unusable now (a job whose route closed asks).
    fn lost(&self) -> Death {
        match self.check() {
            Err(death) => death,
            Ok(()) => Death::Lane("its response route closed".into()),
        }
    }

    fn stop(&self) {
        self.requests.lane().mark_dead();
        self.link.responses.mark_dead();
        let mut child = lock(&self.child);
        let _ = child.kill();
        let _ = child.wait();
        drop(child);
        // The reader saw the lane die; closing the routes here too means no job waits on it.
        lock(&self.link.routes).clear();
    }

    /// Runs one request on this worker as slot `slot`, handing `Started` and `Token` events to
    /// `emit` (false = the receiver is gone: the job is cancelled). Other jobs run beside it.
    /// Returns how it ended and why the worker must be replaced, if it must. Once cancelled
    /// (through `ticket`, or `stop` set) the job ends CANCELLED whatever the worker says.
    pub(super) fn run(
        &self,
        slot: u32,
        ticket: &Ticket,
        job: &LaneJob<'_>,
        stop: &AtomicBool,
        emit: &mut dyn FnMut(Event) -> bool,
    ) -> (Event, Option<Death>) {
        let remaining = u64::try_from(job.deadline.remaining().as_nanos()).unwrap_or(u64::MAX);
        let deadline_ns = monotonic_ns().saturating_add(remaining);
        let fields = RequestFields {
            seq: 0,
            job_id: job.job_id,
            model: job.model,
            prompt: job.prompt,
            max_tokens: job.max_tokens,
            deadline_ns,
            temperature: job.sampling.temperature,
            top_p: job.sampling.top_p,
            seed: job.sampling.seed,
            cancel_seq: 0,
        };
        let mut tokens = 0u32;
        let mut cancelled_at: Option<Instant> = None;
        // Every failure reads CANCELLED once the job was cancelled: that is what the queen
        // asked for, and nobody may be listening for anything else. The canceller sets the flag
        // before anything reaches the worker, so the worker's answer can arrive before this
        // loop has looked at it: read it too.
        let failed = |error: Error, tokens: u32, cancelled_at: Option<Instant>| {
            let error = if cancelled_at.is_some() || ticket.is_cancelled() {
                Error::Cancelled
            } else {
                error
            };
            Event::Failed { error, tokens }
        };
        let (tx, rx) = mpsc::channel();
        let sent = self.requests.send(fields, CANCEL_GRACE, |seq| {
            lock(&self.link.routes).insert(seq, tx);
        });
        let seq = match sent {
            Ok(seq) => seq,
            Err(LaneError::TooLarge { max, .. }) => {
                // Cannot happen while `check_lane_config` holds; refused without touching the
                // worker, which stays up.
                let max = max as usize;
                let error = Error::Invalid(validate::ValidationError::LaneRequestTooLarge { max });
                return (failed(error, 0, None), None);
            }
            Err(e) => {
                let why = e.to_string();
                return (
                    failed(Error::WorkerLost(why.clone()), 0, None),
                    Some(Death::Lane(why)),
                );
            }
        };
        ticket.sent(seq);
        let pool_us = micros(job.arrived.elapsed());
        if !emit(Event::Started {
            slot,
            generation: self.generation,
            pool_us,
        }) {
            ticket.cancel();
        }
        loop {
            if cancelled_at.is_none() && (ticket.is_cancelled() || stop.load(Ordering::Acquire)) {
                debug!(slot, seq, "job cancelled; stopping it on the worker");
                // Pushes the cancel request unless the canceller already did.
                ticket.cancel();
                cancelled_at = Some(Instant::now());
            }
            let resp = match rx.recv_timeout(POLL) {
                Ok(resp) => resp,
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(death) = self.check() {
                        let lost = Error::WorkerLost(death.to_string());
                        return (failed(lost, tokens, cancelled_at), Some(death));
                    }
                    if cancelled_at.is_some_and(|t| t.elapsed() > CANCEL_GRACE) {
                        let death = Death::Hung(CANCEL_GRACE);
                        return (failed(Error::Cancelled, tokens, cancelled_at), Some(death));
                    }
                    if job
                        .deadline
                        .exceeded_by(Instant::now())
                        .is_some_and(|d| d > DEADLINE_GRACE)
                    {
                        let death = Death::Hung(DEADLINE_GRACE);
                        let late = Error::DeadlineExceeded;
                        return (failed(late, tokens, cancelled_at), Some(death));
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let death = self.lost();
                    let lost = Error::WorkerLost(death.to_string());
                    return (failed(lost, tokens, cancelled_at), Some(death));
                }
            };
            match resp.kind {
                Some(lane_response::Kind::Token(t)) => {
                    tokens = tokens.saturating_add(1);
                    if cancelled_at.is_none()
                        && !ticket.is_cancelled()
                        && !emit(Event::Token {
                            index: t.index,
                            text: t.text,
                            id: t.id,
                        })
                    {
                        debug!(slot, seq, "session gone; cancelling the job");
                        ticket.cancel();
                    }
                }
                Some(lane_response::Kind::Done(d)) => {
                    if cancelled_at.is_some() || ticket.is_cancelled() {
                        return (failed(Error::Cancelled, d.tokens, cancelled_at), None);
                    }
                    let done = Event::Finished {
                        tokens: d.tokens,
                        prompt_tokens: d.prompt_tokens,
                        pool_us,
                        first_token_us: d.first_token_us,
                        generation_us: d.generation_us,
                    };
                    return (done, None);
                }
                Some(lane_response::Kind::Error(e)) => {
                    if e.code == CODE_DEADLINE_EXCEEDED {
                        // Kept in the log so the soak benchmark can report worker time past
                        // deadlines.
                        info!(
                            slot,
                            seq,
                            overrun_us = e.overrun_us,
                            "worker stopped at the deadline"
                        );
                    }
                    let worker = Error::Worker {
                        code: e.code,
                        message: e.message,
                    };
                    return (failed(worker, tokens, cancelled_at), None);
                }
                // The reader routes only tokens and terminals to a job.
                Some(lane_response::Kind::Ready(_)) | None => {
                    let why = "an unroutable response reached a job".to_owned();
                    let lost = Error::WorkerLost(why.clone());
                    return (failed(lost, tokens, cancelled_at), Some(Death::Lane(why)));
                }
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
        let reader = lock(&self.reader).take();
        if let Some(r) = reader {
            let _ = r.join();
        }
    }
}

// === impl Link ===

impl Link {
    /// The reader thread: routes every response until the lane dies or breaks the protocol,
    /// then closes every route so the jobs waiting on them learn the worker is gone.
    fn read(&self) {
        let mut buf = Vec::new();
        loop {
            match self.responses.pop_timeout(&mut buf, READ_WAIT) {
                Ok(true) => {
                    if let Err(why) = self.deliver(&buf) {
                        warn!(reason = %why, "worker broke the response protocol");
                        let _ = self.fault.set(why);
                        self.responses.mark_dead();
                        break;
                    }
                }
                Ok(false) if self.responses.is_dead() => break,
                Ok(false) => {}
                Err(e) => {
                    // Dead because the pool stopped it: not a fault of the worker's.
                    if !matches!(e, LaneError::Dead) {
                        let _ = self.fault.set(e.to_string());
                    }
                    break;
                }
            }
        }
        lock(&self.routes).clear();
    }

    /// Hands one response to its job. Errors say how the worker broke the protocol.
    fn deliver(&self, buf: &[u8]) -> Result<(), String> {
        let resp = LaneResponse::decode(buf).map_err(|e| format!("undecodable response: {e}"))?;
        let terminal = match &resp.kind {
            Some(lane_response::Kind::Ready(r)) => {
                if resp.seq != 0 || self.loaded.load(Ordering::Acquire) {
                    return Err("a second ready message".into());
                }
                // A worker from before batching says 0 and runs one job at a time.
                let runs = (r.batch as usize).max(1);
                if runs < self.batch {
                    return Err(format!(
                        "it runs {runs} jobs at once and was started for {}",
                        self.batch
                    ));
                }
                self.loaded.store(true, Ordering::Release);
                return Ok(());
            }
            None => return Err("empty response".into()),
            Some(lane_response::Kind::Token(_)) => false,
            Some(lane_response::Kind::Done(_) | lane_response::Kind::Error(_)) => true,
        };
        let mut routes = lock(&self.routes);
        let Some(route) = routes.get(&resp.seq) else {
            if matches!(resp.kind, Some(lane_response::Kind::Error(_))) {
                // The answer to a cancel request (or to a cancel that raced its job's end):
                // cancels have no route, and nobody waits for it.
                debug!(seq = resp.seq, "error for a seq without a job; ignored");
                return Ok(());
            }
            return Err(format!("response for seq {} which runs no job", resp.seq));
        };
        // A job that stopped listening was ended by its slot thread, which retires the worker
        // when it gives up without a terminal: nothing to do here.
        let seq = resp.seq;
        let _ = route.send(resp);
        if terminal {
            routes.remove(&seq);
        }
        Ok(())
    }
}
