//! Worker supervision: one slot per worker process, each with a request and a response lane.
//!
//! A slot owns its worker outright (process handle and both lanes); no other task touches them.
//! Jobs reach a slot through a shared bounded channel. A worker that exits, stops beating or
//! corrupts a lane is killed and replaced by a fresh process on a new generation, whose lanes
//! reject anything the old incarnation wrote.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io::Write;

use prost::Message;
use skep_common::deadline::micros;
use skep_common::secret::Secret;
use skep_common::session;
use skep_lane::{Lane, LaneConfig, LaneError, monotonic_ns};
use skep_proto::v1::{
    ExecuteEvent, LaneRequest, LaneResponse, WorkerFinished, WorkerStarted, WorkerToken,
    execute_event, lane_response,
};
use tracing::{debug, error, info, warn};

use crate::audit::{Audit, events};
use crate::{Error, Job, Speed};
use skep_audit::Fields;

/// gRPC status code DEADLINE_EXCEEDED, as carried in lane errors.
const CODE_DEADLINE_EXCEEDED: i32 = 4;
/// How often an idle slot checks that its worker still lives.
const HEALTH_EVERY: Duration = Duration::from_millis(250);
/// A worker whose heartbeat is older than this is considered hung.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time a new worker gets to load its model before it must beat.
const STARTUP_GRACE: Duration = Duration::from_secs(120);
/// How long a worker gets to acknowledge a cancel before it is killed.
const CANCEL_GRACE: Duration = Duration::from_secs(2);
/// How far past the deadline a worker may stay silent before it is killed.
const DEADLINE_GRACE: Duration = Duration::from_secs(1);
/// Pause between failed worker starts.
const RESTART_BACKOFF: Duration = Duration::from_millis(500);
/// How long a response read blocks before liveness is re-checked.
const POLL: Duration = Duration::from_millis(20);

/// How to start a worker process. Engine flags only: secrets never go through argv.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub lane_dir: PathBuf,
    pub lane: LaneConfig,
}

/// Starts `count` slots that take jobs from `jobs` until it closes.
pub fn spawn_slots(
    spec: Arc<WorkerSpec>,
    count: usize,
    jobs: async_channel::Receiver<Job>,
    speed: Arc<Speed>,
    audit: Audit,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..count as u32)
        .map(|slot| {
            let task = slot_task(
                slot,
                Arc::clone(&spec),
                jobs.clone(),
                Arc::clone(&speed),
                audit.clone(),
            );
            tokio::spawn(task)
        })
        .collect()
}

struct Worker {
    /// This incarnation's lane session secret; the worker runs only requests MACed with it.
    session: Secret,
    slot: u32,
    generation: u64,
    child: Child,
    requests: Lane,
    responses: Lane,
    started: Instant,
    ready: bool,
    seq: u64,
}

/// Why a worker is no longer usable.
#[derive(Debug)]
enum Death {
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

async fn slot_task(
    slot: u32,
    spec: Arc<WorkerSpec>,
    jobs: async_channel::Receiver<Job>,
    speed: Arc<Speed>,
    audit: Audit,
) {
    let mut generation = 0u64;
    let mut worker: Option<Worker> = None;
    loop {
        let Some(mut w) = worker.take() else {
            generation += 1;
            match Worker::start(&spec, slot, generation) {
                Ok(w) => {
                    info!(slot, generation, pid = w.child.id(), "worker started");
                    worker = Some(w);
                }
                Err(e) => {
                    error!(slot, generation, error = %e, "cannot start worker");
                    tokio::time::sleep(RESTART_BACKOFF).await;
                }
            }
            continue;
        };
        tokio::select! {
            job = jobs.recv() => {
                let Ok(job) = job else { break };
                let speed = Arc::clone(&speed);
                let joined = tokio::task::spawn_blocking(move || {
                    let outcome = run_job(&mut w, job, &speed);
                    (w, outcome)
                })
                .await;
                match joined {
                    Ok((w, None)) => worker = Some(w),
                    Ok((w, Some(death))) => {
                        if let Death::Lane(why) = &death {
                            let fields = Fields::new()
                                .num("slot", u64::from(slot))
                                .num("generation", w.generation)
                                .reason(why);
                            audit.record(events::LANE_CORRUPT, events::ACTOR_SYSTEM, fields);
                        }
                        warn!(slot, generation = w.generation, reason = %death, "restarting worker");
                        drop(w);
                    }
                    Err(e) => error!(slot, error = %e, "slot job task failed"),
                }
            }
            _ = tokio::time::sleep(HEALTH_EVERY) => {
                match w.check() {
                    Ok(()) => worker = Some(w),
                    Err(death) => warn!(slot, generation = w.generation, reason = %death, "restarting worker"),
                }
            }
        }
    }
}

// === impl Worker ===

impl Worker {
    fn start(spec: &WorkerSpec, slot: u32, generation: u64) -> Result<Worker, LaneError> {
        let req_path = spec.lane_dir.join(format!("slot-{slot}.req"));
        let resp_path = spec.lane_dir.join(format!("slot-{slot}.resp"));
        let requests = Lane::create(&req_path, spec.lane, generation)?;
        let responses = Lane::create(&resp_path, spec.lane, generation)?;
        let child = Command::new(&spec.program)
            .args(&spec.args)
            .arg("--request-lane")
            .arg(&req_path)
            .arg("--response-lane")
            .arg(&resp_path)
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
        let mut child = child;
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
        Ok(Worker {
            session,
            slot,
            generation,
            child,
            requests,
            responses,
            started: Instant::now(),
            ready: false,
            seq: 0,
        })
    }

    /// Is the worker still usable? Exited, silent or corrupt workers are not.
    fn check(&mut self) -> Result<(), Death> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(Death::Exited(status));
        }
        if self.requests.is_dead() || self.responses.is_dead() {
            return Err(Death::Lane("lane marked dead".into()));
        }
        let age = self.responses.heartbeat_age();
        if age < HEARTBEAT_TIMEOUT {
            self.ready = true;
            return Ok(());
        }
        if self.ready || self.started.elapsed() > STARTUP_GRACE {
            return Err(Death::Hung(age));
        }
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.requests.mark_dead();
        self.responses.mark_dead();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one job on the worker, forwarding its events. Returns why the worker must be replaced,
/// or `None` if it can take the next job.
fn run_job(w: &mut Worker, job: Job, speed: &Speed) -> Option<Death> {
    let Job {
        request,
        deadline,
        arrived,
        events,
        permit: _permit,
    } = job;
    let fail = |e: Error| {
        let _ = events.blocking_send(Err(e.into()));
    };
    if deadline.is_expired() {
        fail(Error::LateArrival);
        return None;
    }
    w.seq += 1;
    let seq = w.seq;
    let remaining = u64::try_from(deadline.remaining().as_nanos()).unwrap_or(u64::MAX);
    let deadline_ns = monotonic_ns().saturating_add(remaining);
    let mac = session::request_mac(
        &w.session,
        seq,
        &request.job_id,
        deadline_ns,
        &request.prompt,
    );
    let lane_req = LaneRequest {
        seq,
        job_id: request.job_id,
        model: request.model,
        prompt: request.prompt,
        max_tokens: request.max_tokens,
        deadline_mono_ns: deadline_ns,
        mac: mac.to_vec(),
    };
    if let Err(e) = w
        .requests
        .push_timeout(&lane_req.encode_to_vec(), CANCEL_GRACE)
    {
        fail(Error::WorkerLost(e.to_string()));
        return Some(Death::Lane(e.to_string()));
    }
    let pool_us = micros(arrived.elapsed());
    let send = |kind| {
        events
            .blocking_send(Ok(ExecuteEvent { kind: Some(kind) }))
            .is_ok()
    };
    let mut cancelled_at = None;
    if !send(execute_event::Kind::Started(WorkerStarted {
        slot: w.slot,
        generation: w.generation,
        pool_us,
    })) {
        w.requests.request_cancel(seq);
        cancelled_at = Some(Instant::now());
    }
    let mut buf = Vec::new();
    loop {
        match w.responses.pop_timeout(&mut buf, POLL) {
            Ok(true) => {}
            Ok(false) => {
                if let Err(death) = w.check() {
                    fail(Error::WorkerLost(death.to_string()));
                    return Some(death);
                }
                if cancelled_at.is_some_and(|t| t.elapsed() > CANCEL_GRACE) {
                    return Some(Death::Hung(CANCEL_GRACE));
                }
                if deadline
                    .exceeded_by(Instant::now())
                    .is_some_and(|d| d > DEADLINE_GRACE)
                {
                    fail(Error::DeadlineExceeded);
                    return Some(Death::Hung(DEADLINE_GRACE));
                }
                continue;
            }
            Err(e) => {
                fail(Error::WorkerLost(e.to_string()));
                return Some(Death::Lane(e.to_string()));
            }
        }
        let resp = match LaneResponse::decode(buf.as_slice()) {
            Ok(r) if r.seq == seq => r,
            Ok(r) => {
                let why = format!("response for job seq {} while running {seq}", r.seq);
                fail(Error::WorkerLost(why.clone()));
                return Some(Death::Lane(why));
            }
            Err(e) => {
                fail(Error::WorkerLost(format!("undecodable response: {e}")));
                return Some(Death::Lane(e.to_string()));
            }
        };
        match resp.kind {
            Some(lane_response::Kind::Token(t)) => {
                if cancelled_at.is_none()
                    && !send(execute_event::Kind::Token(WorkerToken {
                        index: t.index,
                        text: t.text,
                    }))
                {
                    // The queen hung up (cancel, deadline or client gone): stop the worker.
                    debug!(seq, "caller gone; cancelling worker");
                    w.requests.request_cancel(seq);
                    cancelled_at = Some(Instant::now());
                }
            }
            Some(lane_response::Kind::Done(d)) => {
                speed.observe_first_token(d.first_token_us);
                send(execute_event::Kind::Finished(WorkerFinished {
                    tokens: d.tokens,
                    pool_us,
                    worker_first_token_us: d.first_token_us,
                    generation_us: d.generation_us,
                }));
                return None;
            }
            Some(lane_response::Kind::Error(e)) => {
                if e.code == CODE_DEADLINE_EXCEEDED {
                    // Kept in the log so the soak benchmark can report worker time past deadlines.
                    info!(
                        slot = w.slot,
                        seq,
                        overrun_us = e.overrun_us,
                        "worker stopped at the deadline"
                    );
                }
                fail(Error::Worker {
                    code: e.code,
                    message: e.message,
                });
                return None;
            }
            None => {
                fail(Error::WorkerLost("empty response".into()));
                return Some(Death::Lane("empty response".into()));
            }
        }
    }
}
