//! The queen's side of `Pool/Session`: one long-lived stream per pool that carries every job.
//!
//! A session task owns the stream and a routing table from job handle to the job's client
//! stream. Tokens go straight from the pool's frames to the clients (no actor on the per-token
//! path; progress is published through the job's `Progress` cell for the core's predictions);
//! a job's start and end, and the session's own life, are reported to the dispatch actor.
//! Dropping the actor's link, revoking the node or the pool closing the stream ends the session;
//! whatever jobs it still carried are reported lost so they fail over.

use std::collections::HashMap;
use std::time::Instant;

use skep_common::auth;
use skep_common::deadline::micros;
use skep_proto::v1::{CancelFrame, JobFrame, PoolEvent, QueenFrame, pool_event, queen_frame};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Request;
use tracing::{debug, warn};

use crate::dispatch::actor::{AttemptTimings, Ended, ModelsChanged, SessionLost, SessionReady};
use crate::dispatch::core::Report;
use crate::dispatch::{Delivered, DispatchHandle, Route, SessionCmd, Target};
use crate::job::Event;

/// One job in flight on this session.
struct InFlight {
    route: Route,
    /// The client no longer gets this job's events (cancelled, late or gone).
    muted: bool,
    /// Tokens seen from the pool in this attempt.
    seen: u32,
    started: Option<Instant>,
    pool_us: u64,
    /// Set while a failover attempt is re-running what the client already has: the tokens it
    /// reproduced so far (id, text), held back. `None` once it has passed the client's prefix
    /// (or on a first attempt).
    replay: Option<Vec<(u32, String)>>,
}

impl InFlight {
    fn new(route: Route) -> InFlight {
        let replay = (!route.delivered.is_empty()).then(Vec::new);
        InFlight {
            route,
            muted: false,
            seen: 0,
            started: None,
            pool_us: 0,
            replay,
        }
    }
}

/// Runs one session until it ends, then tells the dispatch actor.
pub async fn run(
    target: Target,
    generation: u64,
    cmds: mpsc::UnboundedReceiver<SessionCmd>,
    dispatch: DispatchHandle,
) {
    let node = target.node_id.clone();
    let reason = match session(&target, generation, cmds, &dispatch).await {
        Ok(()) => "closed".to_owned(),
        Err(e) => e,
    };
    dispatch
        .session_lost(SessionLost {
            node,
            generation,
            reason,
        })
        .await;
}

async fn session(
    target: &Target,
    generation: u64,
    mut cmds: mpsc::UnboundedReceiver<SessionCmd>,
    dispatch: &DispatchHandle,
) -> Result<(), String> {
    let node = target.node_id.clone();
    let (out, out_rx) = mpsc::unbounded_channel::<QueenFrame>();
    let mut req = Request::new(UnboundedReceiverStream::new(out_rx));
    let header = auth::bearer_header(&target.dispatch_key).map_err(|e| e.to_string())?;
    req.metadata_mut().insert("authorization", header);
    let mut client = target.client.clone();
    let mut inbound = tokio::select! {
        r = client.session(req) => r.map_err(|s| format!("cannot open a session: {}", s.message()))?.into_inner(),
        _ = target.gone.cancelled() => return Ok(()),
    };
    let mut jobs: HashMap<u64, InFlight> = HashMap::new();
    let result = loop {
        tokio::select! {
            biased;
            _ = target.gone.cancelled() => break Ok(()),
            cmd = cmds.recv() => match cmd {
                None => break Ok(()),
                Some(SessionCmd::Job { attempt, route }) => {
                    let frame = JobFrame {
                        handle: attempt.handle,
                        job_id: attempt.job_id,
                        model: attempt.model,
                        prompt: attempt.prompt.to_string(),
                        max_tokens: attempt.max_tokens,
                        budget_us: micros(route.deadline.saturating_duration_since(Instant::now())),
                        slot: attempt.slot,
                        order: attempt.order,
                        temperature: attempt.sampling.temperature,
                        top_p: attempt.sampling.top_p,
                        seed: attempt.sampling.seed,
                        evict: attempt.evict,
                    };
                    let _ = route.events.try_send(Event::Dispatched {
                        node_id: node.clone(),
                        attempt: route.attempt,
                    });
                    jobs.insert(attempt.handle, InFlight::new(*route));
                    if out.send(QueenFrame { kind: Some(queen_frame::Kind::Job(frame)) }).is_err() {
                        break Err("session stream closed".into());
                    }
                }
                Some(SessionCmd::Cancel { handle }) => {
                    if let Some(j) = jobs.get_mut(&handle) {
                        j.muted = true;
                    }
                    let _ = out.send(QueenFrame { kind: Some(queen_frame::Kind::Cancel(CancelFrame { handle })) });
                }
            },
            frame = inbound.next() => match frame {
                None => break Err("the pool closed the session".into()),
                Some(Err(s)) => break Err(format!("session failed: {}", s.message())),
                Some(Ok(frame)) => {
                    for ev in frame.events {
                        handle_event(&node, generation, ev, &mut jobs, dispatch).await;
                    }
                }
            },
        }
    };
    // Whatever this session still carried will not finish here.
    let why = match &result {
        Ok(()) => "the session to the pool closed".to_owned(),
        Err(e) => e.clone(),
    };
    for (key, _) in jobs.drain() {
        dispatch
            .ended(Ended {
                node: node.clone(),
                generation,
                key,
                report: Report::Lost {
                    message: why.clone(),
                },
                timings: None,
            })
            .await;
    }
    result
}

async fn handle_event(
    node: &str,
    generation: u64,
    ev: PoolEvent,
    jobs: &mut HashMap<u64, InFlight>,
    dispatch: &DispatchHandle,
) {
    let Some(kind) = ev.kind else {
        return;
    };
    // Session-level events (handle 0) name no job.
    match kind {
        pool_event::Kind::Credit(c) => {
            dispatch
                .session_ready(SessionReady {
                    node: node.to_owned(),
                    generation,
                    slots: c.slots,
                    credits: c.per_slot,
                })
                .await;
            return;
        }
        pool_event::Kind::Models(m) => {
            match super::nodes::checked_model_states(&m.states, m.memory_budget_bytes) {
                Ok(models) => {
                    // An empty event: the pool reports no states (its models count as warm).
                    let models = models.unwrap_or_default();
                    dispatch
                        .models_changed(ModelsChanged {
                            node: node.to_owned(),
                            generation,
                            models,
                        })
                        .await;
                }
                Err(e) => warn!(node, error = %e.message(), "ignoring an invalid models event"),
            }
            return;
        }
        _ => {}
    }
    let Some(job) = jobs.get_mut(&ev.handle) else {
        debug!(
            node,
            handle = ev.handle,
            "event for a job this session does not carry"
        );
        return;
    };
    let now = Instant::now();
    let at = micros(now.saturating_duration_since(job.route.epoch));
    match kind {
        pool_event::Kind::Credit(_) | pool_event::Kind::Models(_) => {}
        pool_event::Kind::Started(s) => {
            job.route.progress.started(at);
            job.started = Some(now);
            job.pool_us = s.pool_us;
        }
        pool_event::Kind::Token(t) => {
            job.route.progress.token(at);
            job.seen += 1;
            // No token reaches a client after its deadline; the pool reports the miss.
            if job.muted || now > job.route.deadline {
                job.muted = true;
                return;
            }
            // After a failover the new pool starts over: what the client has is passed over
            // only if this pool reproduces it, token for token; otherwise the client is told.
            if let Some(replay) = job.replay.as_mut() {
                let position = u32::try_from(replay.len()).unwrap_or(u32::MAX);
                match job.route.delivered.matches(position, t.id, &t.text) {
                    Some(true) if t.index == position => {
                        replay.push((t.id, t.text));
                        return;
                    }
                    None => job.replay = None,
                    Some(_) => {
                        let reason = format!(
                            "token {position} differs from the one sent before the failover"
                        );
                        if !restart(node, job, reason, dispatch).await {
                            return;
                        }
                    }
                }
            }
            deliver(job, t.id, t.index, t.text, dispatch).await;
        }
        pool_event::Kind::Finished(f) => {
            let mut job = jobs.remove(&ev.handle).expect("present above");
            if let Some(replay) = &job.replay
                && !job.muted
            {
                // Ended short of what the client has: the client's longer text is not this
                // attempt's output.
                let reason = format!(
                    "the new attempt ended after {} tokens, before reproducing the {} sent",
                    replay.len(),
                    job.route.delivered.len()
                );
                restart(node, &mut job, reason, dispatch).await;
            }
            let timings = AttemptTimings {
                prompt_tokens: f.prompt_tokens,
                ..attempt_timings(&job, f.pool_us, f.worker_first_token_us, f.generation_us)
            };
            dispatch
                .ended(Ended {
                    node: node.to_owned(),
                    generation,
                    key: job.route.key,
                    report: Report::Finished {
                        worker_first_token_us: f.worker_first_token_us,
                        generation_us: f.generation_us,
                        tokens: f.tokens,
                    },
                    timings: Some(timings),
                })
                .await;
        }
        pool_event::Kind::Failed(f) => {
            let job = jobs.remove(&ev.handle).expect("present above");
            let timings = attempt_timings(&job, job.pool_us, 0, 0);
            dispatch
                .ended(Ended {
                    node: node.to_owned(),
                    generation,
                    key: job.route.key,
                    report: Report::Failed {
                        code: f.code,
                        message: f.message,
                    },
                    timings: Some(timings),
                })
                .await;
        }
    }
}

/// Passes one token to the job's client and records it as delivered.
async fn deliver(job: &mut InFlight, id: u32, index: u32, text: String, dispatch: &DispatchHandle) {
    let digest = Delivered::digest(&text);
    match job.route.events.try_send(Event::Token { index, text }) {
        Ok(()) => job.route.delivered.push(id, digest),
        Err(mpsc::error::TrySendError::Closed(_)) => {
            job.muted = true;
            dispatch.client_gone(job.route.key).await;
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            // The channel holds a whole job's tokens (twice, for a restart); a full one means a
            // client that stopped reading. Stop the job rather than the session.
            warn!(job = %job.route.job_id, "client is not reading its stream; cancelling");
            job.muted = true;
            dispatch.client_gone(job.route.key).await;
        }
    }
}

/// A failover attempt diverged from what the client has: the client is told to discard it,
/// then gets this attempt's output from index 0 (the tokens held back so far first). False if
/// the client can no longer be reached.
async fn restart(
    node: &str,
    job: &mut InFlight,
    reason: String,
    dispatch: &DispatchHandle,
) -> bool {
    let held = job.replay.take().unwrap_or_default();
    warn!(job = %job.route.job_id, node, %reason, "failover output differs; restarting the client's stream");
    job.route.delivered.clear();
    let notice = Event::Restarted {
        attempt: job.route.attempt,
        node_id: node.to_owned(),
        reason,
    };
    if job.route.events.try_send(notice).is_err() {
        job.muted = true;
        dispatch.client_gone(job.route.key).await;
        return false;
    }
    for (index, (id, text)) in (0u32..).zip(held) {
        deliver(job, id, index, text, dispatch).await;
        if job.muted {
            return false;
        }
    }
    true
}

fn attempt_timings(
    job: &InFlight,
    pool_us: u64,
    first_token_us: u64,
    generation_us: u64,
) -> AttemptTimings {
    let to_start = job.started.map_or(0, |s| {
        micros(s.saturating_duration_since(job.route.sent_at))
    });
    AttemptTimings {
        dispatch_us: to_start.saturating_sub(pool_us),
        pool_us,
        worker_first_token_us: first_token_us,
        generation_us,
        prompt_tokens: 0,
    }
}
