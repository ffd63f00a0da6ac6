//! The queen's side of `Pool/Execute`: calls a pool manager with its dispatch key and the
//! remaining budget, and turns the reply stream into domain events.

use std::time::Duration;

use skep_common::auth;
use skep_proto::v1::{ExecuteEvent, ExecuteRequest, execute_event};
use tokio_stream::StreamExt;
use tonic::{Code, Request, Status, Streaming};

use crate::Error;
use crate::job::NewJob;
use crate::scheduler::Target;

/// What a pool reports about a job.
#[derive(Debug)]
pub enum PoolEvent {
    Started {
        pool_us: u64,
    },
    Token {
        index: u32,
        text: String,
    },
    Finished {
        first_token: Duration,
        generation: Duration,
        tokens: u32,
    },
}

/// A running `Execute` call. Dropping it cancels the call on the pool.
pub struct PoolStream {
    node: String,
    inner: Streaming<ExecuteEvent>,
}

impl PoolStream {
    pub async fn next(&mut self) -> Option<Result<PoolEvent, Error>> {
        match self.inner.next().await? {
            Err(status) => Some(Err(pool_error(&self.node, status))),
            Ok(ExecuteEvent { kind: None }) => Some(Err(Error::Pool {
                node: self.node.clone(),
                code: Code::Internal as i32,
                message: "empty event from pool".into(),
            })),
            Ok(ExecuteEvent { kind: Some(k) }) => Some(Ok(match k {
                execute_event::Kind::Started(s) => PoolEvent::Started { pool_us: s.pool_us },
                execute_event::Kind::Token(t) => PoolEvent::Token {
                    index: t.index,
                    text: t.text,
                },
                execute_event::Kind::Finished(f) => PoolEvent::Finished {
                    first_token: Duration::from_micros(f.worker_first_token_us),
                    generation: Duration::from_micros(f.generation_us),
                    tokens: f.tokens,
                },
            })),
        }
    }
}

pub async fn execute(
    target: &Target,
    job: &NewJob,
    remaining: Duration,
) -> Result<PoolStream, Error> {
    let mut req = Request::new(ExecuteRequest {
        job_id: job.id.clone(),
        model: job.model.clone(),
        prompt: job.prompt.clone(),
        max_tokens: job.max_tokens,
    });
    // The remaining budget travels as grpc-timeout; the pool measures from its own arrival.
    req.set_timeout(remaining);
    let header = auth::bearer_header(&target.dispatch_key)?;
    req.metadata_mut().insert("authorization", header);
    let mut client = target.client.clone();
    let inner = client
        .execute(req)
        .await
        .map_err(|s| pool_error(&target.node_id, s))?
        .into_inner();
    Ok(PoolStream {
        node: target.node_id.clone(),
        inner,
    })
}

fn pool_error(node: &str, s: Status) -> Error {
    match s.code() {
        Code::Unavailable => Error::PoolUnreachable {
            node: node.to_owned(),
            message: s.message().to_owned(),
            // tonic attaches the transport error as the source; a pool's own answer has none.
            transport: std::error::Error::source(&s).is_some(),
        },
        _ => Error::Pool {
            node: node.to_owned(),
            code: s.code() as i32,
            message: s.message().to_owned(),
        },
    }
}
