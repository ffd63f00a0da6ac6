//! Conversions between the queen's domain types and the `skep.v1` wire types.

use skep_proto::v1 as pb;

use crate::job::Event;
use crate::model::{JobRecord, JobState, Timings, micros};
use crate::registry::{NodeHealth, NodeInfo};

pub fn timings(t: &Timings) -> pb::Timings {
    pb::Timings {
        admission_us: t.admission_us,
        queue_wait_us: t.queue_wait_us,
        dispatch_us: t.dispatch_us,
        pool_us: t.pool_us,
        worker_first_token_us: t.worker_first_token_us,
        generation_us: t.generation_us,
        total_us: t.total_us,
    }
}

pub fn job_state(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Done => pb::JobState::Done,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
        JobState::DeadlineExceeded => pb::JobState::DeadlineExceeded,
    }
}

pub fn job(j: JobRecord) -> pb::Job {
    pb::Job {
        id: j.id,
        model: j.model,
        state: job_state(j.state) as i32,
        created_unix_ms: j.created_unix_ms,
        finished_unix_ms: j.finished_unix_ms,
        deadline_ms: j.deadline_ms,
        max_tokens: j.max_tokens,
        tokens: j.tokens,
        node_id: j.node_id,
        error: j.error,
        timings: Some(timings(&j.timings)),
    }
}

pub fn node(n: NodeInfo, running: u32) -> pb::Node {
    pb::Node {
        id: n.id,
        name: n.name,
        pool_url: n.pool_url,
        slots: n.slots,
        free_slots: n.free_slots,
        models: n.models,
        state: match n.health {
            NodeHealth::Healthy => pb::NodeState::Healthy,
            NodeHealth::Suspect => pb::NodeState::Suspect,
            NodeHealth::Dead => pb::NodeState::Dead,
        } as i32,
        last_heartbeat_ms_ago: micros(n.last_heartbeat) / 1000,
        running,
        inventory: n.inventory,
        model_states: n
            .model_states
            .into_iter()
            .map(|m| pb::ModelState {
                model: m.model,
                warm: m.warm,
                loading: m.loading,
                load_us: m.load_us,
                footprint_bytes: m.footprint_bytes,
            })
            .collect(),
        memory_budget_bytes: n.memory_budget,
    }
}

/// One domain event becomes one or two stream items: a failure is an `error` event followed by
/// the matching status, so both event-reading and status-reading clients see it.
pub fn event(job_id: &str, ev: Event) -> Vec<Result<pb::JobEvent, tonic::Status>> {
    use pb::job_event::Kind;
    let wrap = |kind| {
        Ok(pb::JobEvent {
            job_id: job_id.to_owned(),
            kind: Some(kind),
        })
    };
    match ev {
        Event::Accepted {
            budget,
            estimate,
            node_id,
        } => vec![wrap(Kind::Accepted(pb::Accepted {
            deadline_ms: micros(budget) / 1000,
            estimate_ms: micros(estimate) / 1000,
            predicted_finish_ms: micros(estimate) / 1000,
            node_id,
        }))],
        Event::Queued {
            position,
            predicted_start,
        } => vec![wrap(Kind::Queued(pb::Queued {
            position: u32::try_from(position).unwrap_or(u32::MAX),
            predicted_start_ms: micros(predicted_start) / 1000,
        }))],
        Event::Dispatched { node_id, attempt } => {
            vec![wrap(Kind::Dispatched(pb::Dispatched { node_id, attempt }))]
        }
        Event::Token { index, text } => vec![wrap(Kind::Token(pb::Token { index, text }))],
        Event::Restarted {
            attempt,
            node_id,
            reason,
        } => vec![wrap(Kind::Restarted(pb::Restarted {
            attempt,
            node_id,
            reason,
        }))],
        Event::Done {
            tokens,
            prompt_tokens,
            timings: t,
        } => {
            vec![wrap(Kind::Done(pb::Done {
                tokens,
                prompt_tokens,
                timings: Some(timings(&t)),
            }))]
        }
        Event::Failed { error, timings: t } => {
            let status = tonic::Status::from(error);
            vec![
                wrap(Kind::Error(pb::JobError {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                    timings: Some(timings(&t)),
                })),
                Err(status),
            ]
        }
    }
}
