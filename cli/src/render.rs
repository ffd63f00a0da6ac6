//! How jobs, nodes and events are printed: human text or one JSON object per line.

use std::time::Duration;

use serde_json::{Value, json};
use skep_proto::v1::{Job, JobEvent, JobState, Node, NodeState, Timings, TokenInfo, job_event};
use tonic::Status;

fn timings_json(t: &Timings) -> Value {
    json!({
        "admission_us": t.admission_us,
        "queue_wait_us": t.queue_wait_us,
        "dispatch_us": t.dispatch_us,
        "pool_us": t.pool_us,
        "worker_first_token_us": t.worker_first_token_us,
        "generation_us": t.generation_us,
        "total_us": t.total_us,
    })
}

fn ms(us: u64) -> String {
    format!("{:.1}ms", us as f64 / 1000.0)
}

fn timings_text(t: &Timings) -> String {
    format!(
        "admission {}, queue {}, dispatch {}, pool {}, worker first token {}, generation {}, total {}",
        ms(t.admission_us),
        ms(t.queue_wait_us),
        ms(t.dispatch_us),
        ms(t.pool_us),
        ms(t.worker_first_token_us),
        ms(t.generation_us),
        ms(t.total_us)
    )
}

pub fn done_line(tokens: u32, t: Timings, wall: Duration) -> String {
    format!(
        "done: {tokens} tokens in {}ms ({})",
        wall.as_millis(),
        timings_text(&t)
    )
}

fn state_name(s: i32) -> &'static str {
    match JobState::try_from(s).unwrap_or(JobState::Unspecified) {
        JobState::Unspecified => "unknown",
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Done => "done",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::DeadlineExceeded => "deadline_exceeded",
    }
}

pub fn job(j: &Job, json: bool) {
    let t = j.timings.unwrap_or_default();
    if json {
        let v = json!({
            "id": j.id,
            "model": j.model,
            "state": state_name(j.state),
            "created_unix_ms": j.created_unix_ms,
            "finished_unix_ms": j.finished_unix_ms,
            "deadline_ms": j.deadline_ms,
            "max_tokens": j.max_tokens,
            "tokens": j.tokens,
            "node_id": j.node_id,
            "error": j.error,
            "timings": timings_json(&t),
        });
        println!("{v}");
    } else {
        println!(
            "{}  {}  {}  tokens={}  node={}",
            j.id,
            j.model,
            state_name(j.state),
            j.tokens,
            j.node_id
        );
        println!("    {}", timings_text(&t));
        if !j.error.is_empty() {
            println!("    error: {}", j.error);
        }
    }
}

fn node_state(s: i32) -> &'static str {
    match NodeState::try_from(s).unwrap_or(NodeState::Unspecified) {
        NodeState::Unspecified => "unknown",
        NodeState::Healthy => "healthy",
        NodeState::Suspect => "suspect",
        NodeState::Dead => "dead",
    }
}

pub fn nodes(nodes: &[Node], json: bool) {
    for n in nodes {
        if json {
            let v = json!({
                "id": n.id,
                "name": n.name,
                "pool_url": n.pool_url,
                "slots": n.slots,
                "free_slots": n.free_slots,
                "running": n.running,
                "models": n.models,
                "state": node_state(n.state),
                "last_heartbeat_ms_ago": n.last_heartbeat_ms_ago,
                "inventory": n.inventory.as_ref().map(|i| json!({
                    "cpus": i.cpus,
                    "memory_bytes": i.memory_bytes,
                    "load1": i.load1,
                    "gpus": i.gpus.iter().map(|g| json!({
                        "name": g.name,
                        "memory_bytes": g.memory_bytes,
                        "compute_capability": g.compute_capability,
                        "in_use": g.in_use,
                    })).collect::<Vec<_>>(),
                    "models_loaded": i.models_loaded,
                    "models_held": i.models_held,
                })),
            });
            println!("{v}");
        } else {
            println!(
                "{}  {}  {}  {}  slots={} running={}  models={}  last heartbeat {}ms ago",
                n.id,
                n.name,
                n.pool_url,
                node_state(n.state),
                n.slots,
                n.running,
                n.models.join(","),
                n.last_heartbeat_ms_ago
            );
        }
    }
}

pub fn tokens(tokens: &[TokenInfo], json: bool) {
    for t in tokens {
        if json {
            let v = json!({
                "fingerprint": t.fingerprint,
                "role": t.role,
                "label": t.label,
                "created_unix_ms": t.created_unix_ms,
                "expires_unix_ms": t.expires_unix_ms,
                "revoked": t.revoked,
                "max_jobs": t.max_jobs,
            });
            println!("{v}");
        } else {
            let expiry = match t.expires_unix_ms {
                0 => "never expires".to_owned(),
                ms => format!("expires at unix ms {ms}"),
            };
            let state = if t.revoked { "revoked" } else { "active" };
            let share = match t.max_jobs {
                0 => String::new(),
                n => format!("  max {n} jobs"),
            };
            println!(
                "{}  {}  {}  {}  {}{share}",
                t.fingerprint, t.role, t.label, state, expiry
            );
        }
    }
}

pub fn event_json(ev: &JobEvent) {
    use job_event::Kind;
    let v = match &ev.kind {
        Some(Kind::Accepted(a)) => {
            json!({"event": "accepted", "job_id": ev.job_id, "deadline_ms": a.deadline_ms, "estimate_ms": a.estimate_ms, "predicted_finish_ms": a.predicted_finish_ms, "node_id": a.node_id})
        }
        Some(Kind::Queued(q)) => {
            json!({"event": "queued", "job_id": ev.job_id, "position": q.position, "predicted_start_ms": q.predicted_start_ms})
        }
        Some(Kind::Dispatched(d)) => {
            json!({"event": "dispatched", "job_id": ev.job_id, "node_id": d.node_id, "attempt": d.attempt})
        }
        Some(Kind::Token(t)) => {
            json!({"event": "token", "job_id": ev.job_id, "index": t.index, "text": t.text})
        }
        Some(Kind::Restarted(r)) => {
            json!({"event": "restarted", "job_id": ev.job_id, "attempt": r.attempt, "node_id": r.node_id, "reason": r.reason})
        }
        Some(Kind::Done(d)) => {
            json!({"event": "done", "job_id": ev.job_id, "tokens": d.tokens, "prompt_tokens": d.prompt_tokens, "timings": timings_json(&d.timings.unwrap_or_default())})
        }
        Some(Kind::Error(e)) => {
            json!({"event": "error", "job_id": ev.job_id, "code": format!("{:?}", tonic::Code::from(e.code)), "grpc_code": e.code, "message": e.message, "timings": timings_json(&e.timings.unwrap_or_default())})
        }
        None => return,
    };
    println!("{v}");
}

pub fn status_json(s: &Status) {
    println!(
        "{}",
        json!({"event": "error", "code": format!("{:?}", s.code()), "grpc_code": s.code() as i32, "message": s.message()})
    );
}
