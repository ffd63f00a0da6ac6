//! The worker's main loop: lane in, engine, lane out.
//!
//! Requests are untrusted bytes from shared memory: they are decoded from a private copy and
//! validated before use. Only a request whose MAC (over every field) verifies with this
//! incarnation's session secret, and whose `seq` is greater than that of the last request
//! accepted, runs: a scribbler can neither edit a request nor replay a captured one. A corrupt
//! lane ends the process (the pool manager restarts it on a new generation); a bad request gets
//! an error response and the loop goes on.

use std::ops::ControlFlow;
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

use crate::engine::{Engine, Finish, GenerateRequest, Sampling, Stop};

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
const CODE_INTERNAL: i32 = 13;
const CODE_UNAUTHENTICATED: i32 = 16;

/// The worker's two lanes, already opened (and their generation checked) by the caller.
pub struct ServeConfig {
    pub requests: Lane,
    pub responses: Lane,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("lane: {0}")]
    Lane(#[from] LaneError),
    #[error("the pool manager went away")]
    Orphaned,
    #[error("loading the engine: {0}")]
    Load(String),
}

/// Loads the engine with `load`, then serves jobs until the lanes die or the parent process
/// exits. Heartbeats start *before* the model loads: loading a large model takes seconds, and
/// the pool manager must not take that for a hang.
pub fn serve<E: std::fmt::Display>(
    config: ServeConfig,
    session: &Secret,
    load: impl FnOnce() -> Result<Box<dyn Engine>, E>,
) -> Result<(), ServeError> {
    let ServeConfig {
        requests,
        responses,
    } = config;
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
                    kind: Some(lane_response::Kind::Ready(LaneReady {})),
                };
                responses.push_timeout(&ready.encode_to_vec(), PUSH_WAIT)?;
                serve_loop(&requests, &responses, session, engine.as_mut(), parent)
            });
        stop.store(true, Ordering::Relaxed);
        result
    })
}

fn serve_loop(
    requests: &Lane,
    responses: &Lane,
    session: &Secret,
    engine: &mut dyn Engine,
    parent: u32,
) -> Result<(), ServeError> {
    let mut buf = Vec::new();
    // The pool manager numbers this generation's requests from 1 upwards.
    let mut last_accepted = 0u64;
    loop {
        if std::os::unix::process::parent_id() != parent {
            return Err(ServeError::Orphaned);
        }
        if !requests.pop_timeout(&mut buf, IDLE_WAIT)? {
            continue;
        }
        let reply = |r: LaneResponse| responses.push_timeout(&r.encode_to_vec(), PUSH_WAIT);
        let req = match LaneRequest::decode(buf.as_slice()) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "undecodable lane request");
                reply(error(0, CODE_INVALID_ARGUMENT, "undecodable request"))?;
                continue;
            }
        };
        let seq = req.seq;
        if !genuine(session, &req) {
            warn!(seq, "lane request without a valid session MAC; refused");
            reply(error(
                seq,
                CODE_UNAUTHENTICATED,
                "request not from this worker's pool manager",
            ))?;
            continue;
        }
        // A genuine request seen before (or older than one seen): a replay from the lane.
        if seq <= last_accepted {
            warn!(seq, last_accepted, "replayed lane request; refused");
            reply(error(
                seq,
                CODE_UNAUTHENTICATED,
                "request replayed: its seq is not newer than the last one accepted",
            ))?;
            continue;
        }
        last_accepted = seq;
        if let Some(msg) = check(&req) {
            reply(error(seq, CODE_INVALID_ARGUMENT, msg))?;
            continue;
        }
        run_job(&req, engine, requests, responses)?;
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

fn run_job(
    req: &LaneRequest,
    engine: &mut dyn Engine,
    requests: &Lane,
    responses: &Lane,
) -> Result<(), ServeError> {
    let seq = req.seq;
    let deadline = req.deadline_mono_ns;
    let push = |r: LaneResponse| responses.push_timeout(&r.encode_to_vec(), PUSH_WAIT);
    if monotonic_ns() >= deadline {
        push(error(
            seq,
            CODE_DEADLINE_EXCEEDED,
            "deadline passed before the worker started",
        ))?;
        return Ok(());
    }
    let started = Instant::now();
    let mut first_token = None;
    let mut index = 0u32;
    let mut lane_err = None;
    // Between steps that emit nothing (the chunks of a long prompt pass): the same deadline and
    // cancel checks as before a token leaves.
    let mut between = || {
        if monotonic_ns() >= deadline {
            return ControlFlow::Break(Stop::DeadlineExceeded);
        }
        if requests.cancel_requested() == seq {
            return ControlFlow::Break(Stop::Cancelled);
        }
        ControlFlow::Continue(())
    };
    let result = engine.generate_checked(
        &GenerateRequest {
            prompt: req.prompt.clone(),
            max_tokens: req.max_tokens,
            deadline: Some(started + Duration::from_nanos(deadline.saturating_sub(monotonic_ns()))),
            sampling: sampling(req),
        },
        &mut |id, text| {
            // Checked before the token leaves: no token is delivered after the deadline.
            if monotonic_ns() >= deadline {
                return ControlFlow::Break(Stop::DeadlineExceeded);
            }
            if requests.cancel_requested() == seq {
                return ControlFlow::Break(Stop::Cancelled);
            }
            first_token.get_or_insert_with(|| started.elapsed());
            let token = LaneToken {
                index,
                text: text.to_owned(),
                id,
            };
            if let Err(e) = push(LaneResponse {
                seq,
                kind: Some(lane_response::Kind::Token(token)),
            }) {
                lane_err = Some(e);
                return ControlFlow::Break(Stop::Disconnected);
            }
            index += 1;
            ControlFlow::Continue(())
        },
        &mut between,
    );
    if let Some(e) = lane_err {
        return Err(e.into());
    }
    let reply = match result {
        Ok(Finish::Complete {
            tokens,
            prompt_tokens,
        }) => LaneResponse {
            seq,
            kind: Some(lane_response::Kind::Done(LaneDone {
                tokens,
                first_token_us: micros(first_token.unwrap_or_default()),
                generation_us: micros(started.elapsed() - first_token.unwrap_or_default()),
                prompt_tokens,
            })),
        },
        Ok(Finish::Stopped {
            reason: Stop::DeadlineExceeded,
            tokens,
        }) => {
            // How long this worker kept going past the deadline (at most one token step).
            let overrun_us = monotonic_ns().saturating_sub(deadline) / 1000;
            debug!(seq, tokens, overrun_us, "stopped at deadline");
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
        Ok(Finish::Stopped {
            reason: Stop::Cancelled,
            ..
        }) => error(seq, CODE_CANCELLED, "cancelled"),
        Ok(Finish::Stopped {
            reason: Stop::Disconnected,
            ..
        }) => return Ok(()),
        Err(e) => {
            warn!(seq, error = %e, "engine failed");
            error(seq, CODE_INTERNAL, &e.to_string())
        }
    };
    push(reply)?;
    Ok(())
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
