//! The worker's main loop: lane in, batched engine steps in deadline order, lane out.
//!
//! The worker holds up to `batch` jobs at once. Each turn of the loop takes in whatever requests
//! have arrived (blocking only while it holds no job), stops the jobs that are cancelled or past
//! their deadline, asks the step scheduler (`schedule`) which jobs advance, and runs that step:
//! one pass over the weights for every advancing job's next token or prompt chunk. So a cancel,
//! a deadline or a new urgent job takes effect within one step.
//!
//! Requests are untrusted bytes from shared memory: they are decoded from a private copy and
//! validated before use. Only a request whose MAC (over every field) verifies with this
//! incarnation's session secret, and whose `seq` is greater than that of the last request
//! accepted, runs: a scribbler can neither edit a request nor replay a captured one. A corrupt
//! lane ends the process (the pool manager restarts it on a new generation); a bad request gets
//! an error response and the loop goes on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use skep_common::deadline::micros;
use skep_common::secret::Secret;
use skep_common::{session, validate};
use skep_lane::{Lane, LaneError, monotonic_ns};
use skep_proto::v1::{
    LaneDone, LaneError as LaneErr, LaneReady, LaneRequest, LaneResponse, LaneToken, lane_response,
};
use tracing::{debug, info, warn};

use crate::engine::{BatchEngine, Emitted, EngineError, Finish, GenerateRequest, Sampling, SeqId};
use crate::schedule::{self, StepCost};

/// How long to block on an empty request lane before checking that the pool manager lives.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// How long to wait for room in the response lane before deciding the pool manager is gone.
const PUSH_WAIT: Duration = Duration::from_secs(2);
/// How often the worker proves it is alive through the response lane's heartbeat.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(100);

// gRPC status codes carried in lane errors.
const CODE_CANCELLED: i32 = 1;
const CODE_INVALID_ARGUMENT: i32 = 3;
const CODE_DEADLINE_EXCEEDED: i32 = 4;
const CODE_RESOURCE_EXHAUSTED: i32 = 8;
const CODE_INTERNAL: i32 = 13;
const CODE_UNAUTHENTICATED: i32 = 16;

/// The worker's two lanes, already opened (and their generation checked) by the caller.
pub struct ServeConfig {
    pub requests: Lane,
    pub responses: Lane,
    /// Jobs held at once (at least 1).
    pub batch: usize,
    /// Prompt tokens per step, in all (at least 1): a long prompt delays the jobs decoding
    /// beside it by at most one chunk's pass per step.
    pub prefill_chunk: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("lane: {0}")]
    Lane(#[from] LaneError),
    #[error("the pool manager went away")]
    Orphaned,
    #[error("loading the engine: {0}")]
    Load(String),
    #[error("the GPU failed: {0}")]
    Device(String),
}

/// Loads the engine with `load`, then serves jobs until the lanes die or the parent process
/// exits. Heartbeats start *before* the model loads: loading a large model takes seconds, and
/// the pool manager must not take that for a hang.
pub fn serve<E: std::fmt::Display>(
    config: ServeConfig,
    session: &Secret,
    load: impl FnOnce() -> Result<Box<dyn BatchEngine>, E>,
) -> Result<(), ServeError> {
    let ServeConfig {
        requests,
        responses,
        batch,
        prefill_chunk,
    } = config;
    let limits = Limits {
        batch: batch.max(1),
        chunk: prefill_chunk.max(1),
    };
    let generation = requests.generation();
    let parent = std::os::unix::process::parent_id();
    responses.beat();

    // Beat from a thread of its own: a long prompt can keep the engine busy for seconds, and
    // the pool manager must not mistake that for a hang. A dead process stops beating at once.
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                responses.beat();
                std::thread::sleep(HEARTBEAT_EVERY);
            }
        });
        let result = load()
            .map_err(|e| ServeError::Load(e.to_string()))
            .and_then(|mut engine| {
                info!(generation, model = engine.model(), "worker ready");
                let ready = LaneResponse {
                    seq: 0,
                    kind: Some(lane_response::Kind::Ready(LaneReady {
                        batch: u32::try_from(limits.batch).unwrap_or(u32::MAX),
                    })),
                };
                responses.push_timeout(&ready.encode_to_vec(), PUSH_WAIT)?;
                let mut worker = Worker {
                    requests: &requests,
                    responses: &responses,
                    session,
                    engine: engine.as_mut(),
                    limits,
                    active: Vec::new(),
                    cost: StepCost::new(limits.batch),
                    last_accepted: 0,
                };
                worker.run(parent)
            });
        stop.store(true, Ordering::Relaxed);
        result
    })
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    batch: usize,
    chunk: usize,
}

/// A job the worker holds.
#[derive(Debug)]
struct Active {
    seq: u64,
    deadline_ns: u64,
    max_tokens: u32,
    started: Instant,
    first_token: Option<Duration>,
    /// Texts sent so far (the next one's index).
    index: u32,
    /// A cancel request named it.
    cancelled: bool,
}

/// How a held job ends before it completes.
enum Stop {
    Cancelled,
    /// Past its deadline (how far past, in µs).
    Late(u64),
    /// The scheduler found it cannot finish in time even alone, and others wait for room.
    Hopeless,
    Failed(String),
}

struct Worker<'a> {
    requests: &'a Lane,
    responses: &'a Lane,
    session: &'a Secret,
    engine: &'a mut dyn BatchEngine,
    limits: Limits,
    active: Vec<Active>,
    cost: StepCost,
    /// The pool manager numbers this generation's requests from 1 upwards.
    last_accepted: u64,
}

impl Worker<'_> {
    fn run(&mut self, parent: u32) -> Result<(), ServeError> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            if std::os::unix::process::parent_id() != parent {
                return Err(ServeError::Orphaned);
            }
            // Block for work only while holding none; otherwise take what has arrived.
            let mut wait = if self.active.is_empty() {
                IDLE_WAIT
            } else {
                Duration::ZERO
            };
            while self.requests.pop_timeout(&mut buf, wait)? {
                wait = Duration::ZERO;
                self.take(&buf)?;
            }
            self.stop_cancelled_and_late()?;
            if self.active.is_empty() {
                continue;
            }
            self.step(&mut out)?;
        }
    }

    fn reply(&self, r: LaneResponse) -> Result<(), ServeError> {
        self.responses.push_timeout(&r.encode_to_vec(), PUSH_WAIT)?;
        Ok(())
    }

    /// One request off the lane: checked, then a cancel applied or a job taken in.
    fn take(&mut self, buf: &[u8]) -> Result<(), ServeError> {
        let req = match LaneRequest::decode(buf) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "undecodable lane request");
                return self.reply(error(0, CODE_INVALID_ARGUMENT, "undecodable request"));
            }
        };
        let seq = req.seq;
        if !genuine(self.session, &req) {
            warn!(seq, "lane request without a valid session MAC; refused");
            return self.reply(error(
                seq,
                CODE_UNAUTHENTICATED,
                "request not from this worker's pool manager",
            ));
        }
        // A genuine request seen before (or older than one seen): a replay from the lane.
        if seq <= self.last_accepted {
            warn!(
                seq,
                last_accepted = self.last_accepted,
                "replayed lane request; refused"
            );
            return self.reply(error(
                seq,
                CODE_UNAUTHENTICATED,
                "request replayed: its seq is not newer than the last one accepted",
            ));
        }
        self.last_accepted = seq;
        if req.cancel_seq != 0 {
            // A cancel for a job already over (or never seen) has nothing left to stop.
            if let Some(a) = self.active.iter_mut().find(|a| a.seq == req.cancel_seq) {
                a.cancelled = true;
            }
            return Ok(());
        }
        if let Some(msg) = check(&req) {
            return self.reply(error(seq, CODE_INVALID_ARGUMENT, msg));
        }
        if self.active.len() >= self.limits.batch {
            return self.reply(error(
                seq,
                CODE_RESOURCE_EXHAUSTED,
                &format!("this worker already runs {} jobs", self.limits.batch),
            ));
        }
        let now = monotonic_ns();
        if now >= req.deadline_mono_ns {
            return self.reply(error(
                seq,
                CODE_DEADLINE_EXCEEDED,
                "deadline passed before the worker started",
            ));
        }
        let started = Instant::now();
        let gen_req = GenerateRequest {
            prompt: req.prompt.clone(),
            max_tokens: req.max_tokens,
            deadline: Some(started + Duration::from_nanos(req.deadline_mono_ns - now)),
            sampling: sampling(&req),
        };
        if let Err(e) = self.engine.admit(seq, &gen_req) {
            warn!(seq, error = %e, "job refused by the engine");
            return self.reply(error(seq, CODE_INTERNAL, &e.to_string()));
        }
        self.active.push(Active {
            seq,
            deadline_ns: req.deadline_mono_ns,
            max_tokens: req.max_tokens,
            started,
            first_token: None,
            index: 0,
            cancelled: false,
        });
        Ok(())
    }

    /// Ends the jobs that were cancelled (by request or the lane's cancel word) or whose
    /// deadline has passed.
    fn stop_cancelled_and_late(&mut self) -> Result<(), ServeError> {
        let word = self.requests.cancel_requested();
        let now = monotonic_ns();
        let mut stops = Vec::new();
        for a in &self.active {
            if a.cancelled || word == a.seq {
                stops.push((a.seq, Stop::Cancelled));
            } else if now >= a.deadline_ns {
                stops.push((a.seq, Stop::Late((now - a.deadline_ns) / 1000)));
            }
        }
        for (seq, why) in stops {
            self.end(seq, Err(why))?;
        }
        Ok(())
    }

    /// Plans and runs one step, then hands out what it produced.
    fn step(&mut self, out: &mut Vec<(SeqId, Emitted)>) -> Result<(), ServeError> {
        let jobs: Vec<schedule::Job> = self
            .active
            .iter()
            .map(|a| schedule::Job {
                id: a.seq,
                deadline_ns: a.deadline_ns,
                pending_prompt: self.engine.pending_prompt(a.seq),
                tokens_left: a.max_tokens.saturating_sub(a.index),
            })
            .collect();
        let plan = schedule::plan(monotonic_ns(), &jobs, &self.cost, self.limits.chunk);
        for seq in plan.hopeless {
            debug!(
                seq,
                "cannot finish by its deadline even alone; stopped to make room"
            );
            self.end(seq, Err(Stop::Hopeless))?;
        }
        if plan.advance.is_empty() {
            return Ok(());
        }
        let rows = plan.advance.iter().filter(|w| w.prompt_tokens == 0).count();
        let prompt: usize = plan.advance.iter().map(|w| w.prompt_tokens).sum();
        let began = Instant::now();
        out.clear();
        if let Err(e) = self.engine.step(&plan.advance, out) {
            warn!(error = %e, jobs = plan.advance.len(), "engine step failed");
            for w in &plan.advance {
                self.end(w.id, Err(Stop::Failed(e.to_string())))?;
            }
            if let EngineError::Device(why) = e {
                // Every held job's context lived on the failed device: fail them all, then
                // exit so that the pool starts a fresh worker (a new generation) on it.
                let held: Vec<SeqId> = self.active.iter().map(|a| a.seq).collect();
                for seq in held {
                    self.end(seq, Err(Stop::Failed(format!("the GPU failed: {why}"))))?;
                }
                return Err(ServeError::Device(why));
            }
            return Ok(());
        }
        let took_us = began.elapsed().as_secs_f64() * 1e6;
        tracing::trace!(
            jobs = plan.advance.len(),
            held = jobs.len() - plan.advance.len(),
            rows,
            prompt,
            took_us,
            "step"
        );
        self.cost.observe(rows, prompt, took_us);
        for (seq, emitted) in out.drain(..) {
            // A job stopped earlier in this list (a token past its deadline) hears nothing more.
            let Some(i) = self.active.iter().position(|a| a.seq == seq) else {
                continue;
            };
            match emitted {
                Emitted::Token { id, text } => self.token(i, id, text)?,
                Emitted::Finished(finish) => self.end(seq, Ok(finish))?,
                Emitted::Failed(why) => self.end(seq, Err(Stop::Failed(why)))?,
            }
        }
        Ok(())
    }

    /// Sends one text of job `i`, unless its deadline passed or it was cancelled meanwhile:
    /// no token leaves after the deadline.
    fn token(&mut self, i: usize, id: u32, text: String) -> Result<(), ServeError> {
        let now = monotonic_ns();
        let a = &self.active[i];
        let seq = a.seq;
        if now >= a.deadline_ns {
            return self.end(seq, Err(Stop::Late((now - a.deadline_ns) / 1000)));
        }
        if a.cancelled || self.requests.cancel_requested() == seq {
            return self.end(seq, Err(Stop::Cancelled));
        }
        let a = &mut self.active[i];
        a.first_token.get_or_insert_with(|| a.started.elapsed());
        let token = LaneToken {
            index: a.index,
            text,
            id,
        };
        a.index += 1;
        self.reply(LaneResponse {
            seq,
            kind: Some(lane_response::Kind::Token(token)),
        })
    }

    /// Job `seq` is over: the engine lets it go and the pool manager hears how it ended.
    fn end(&mut self, seq: u64, how: Result<Finish, Stop>) -> Result<(), ServeError> {
        let Some(i) = self.active.iter().position(|a| a.seq == seq) else {
            return Ok(());
        };
        let a = self.active.swap_remove(i);
        self.engine.release(seq);
        let reply = match how {
            Ok(Finish::Complete {
                tokens,
                prompt_tokens,
            }) => {
                let first = a.first_token.unwrap_or_default();
                LaneResponse {
                    seq,
                    kind: Some(lane_response::Kind::Done(LaneDone {
                        tokens,
                        first_token_us: micros(first),
                        generation_us: micros(a.started.elapsed().saturating_sub(first)),
                        prompt_tokens,
                    })),
                }
            }
            // Batched engines finish only by completing; the one-job path's stops are ours.
            Ok(Finish::Stopped { tokens, reason }) => {
                warn!(seq, tokens, ?reason, "engine reported a stop of its own");
                error(seq, CODE_INTERNAL, "the engine stopped the job")
            }
            Err(Stop::Cancelled) => error(seq, CODE_CANCELLED, "cancelled"),
            Err(Stop::Late(overrun_us)) => {
                // How long this worker kept going past the deadline (at most one step).
                debug!(seq, tokens = a.index, overrun_us, "stopped at deadline");
                let mut e = error(
                    seq,
                    CODE_DEADLINE_EXCEEDED,
                    "deadline exceeded during generation",
                );
                if let Some(lane_response::Kind::Error(le)) = &mut e.kind {
                    le.overrun_us = overrun_us;
                }
                e
            }
            Err(Stop::Hopeless) => error(
                seq,
                CODE_DEADLINE_EXCEEDED,
                "cannot finish by its deadline at this worker's measured speed; stopped to make room for jobs that can",
            ),
            Err(Stop::Failed(why)) => {
                warn!(seq, error = %why, "engine failed");
                error(seq, CODE_INTERNAL, &why)
            }
        };
        self.reply(reply)
    }
}

/// Does the MAC cover this exact request? The destructuring names every field, so a field added
/// to `LaneRequest` fails to compile here until it is covered by the MAC too.
fn genuine(session: &Secret, req: &LaneRequest) -> bool {
    let LaneRequest {
        seq,
        job_id,
        model,
        prompt,
        max_tokens,
        deadline_mono_ns,
        mac,
        temperature,
        top_p,
        seed,
        cancel_seq,
    } = req;
    let fields = session::RequestFields {
        seq: *seq,
        job_id,
        model,
        prompt,
        max_tokens: *max_tokens,
        deadline_ns: *deadline_mono_ns,
        temperature: *temperature,
        top_p: *top_p,
        seed: *seed,
        cancel_seq: *cancel_seq,
    };
    session::verify_request(session, &fields, mac)
}

fn check(req: &LaneRequest) -> Option<&'static str> {
    if validate::prompt(&req.prompt).is_err() {
        return Some("invalid prompt");
    }
    if req.max_tokens == 0 || validate::max_tokens(req.max_tokens).is_err() {
        return Some("invalid max_tokens");
    }
    if validate::sampling(&sampling(req)).is_err() {
        return Some("invalid sampling (temperature or top_p out of range)");
    }
    None
}

fn sampling(req: &LaneRequest) -> Sampling {
    Sampling {
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
    }
}

fn error(seq: u64, code: i32, message: &str) -> LaneResponse {
    LaneResponse {
        seq,
        kind: Some(lane_response::Kind::Error(LaneErr {
            code,
            message: message.to_owned(),
            overrun_us: 0,
        })),
    }
}

#[cfg(test)]
mod tests;
