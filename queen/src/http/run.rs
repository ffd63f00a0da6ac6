//! One completion request on the HTTP door, from admission to the last byte: admit the caller,
//! parse, budget, submit through `crate::submit`, then answer whole or as server-sent events.
//!
//! A client that goes away cancels its job: the stream's pump watches its channel close, a
//! non-streaming handler is dropped, and either way the job is cancelled at once (and its event
//! channel dropped, which the dispatch actor and the pool session also treat as a cancel).

use std::convert::Infallible;
use std::net::IpAddr;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};
use skep_audit::Fields;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

use super::openai::{self, Head, Kind, StopCut};
use super::{Door, HttpError, ms};
use crate::Error;
use crate::admit;
use crate::audit::events;
use crate::auth::Role;
use crate::dispatch::DispatchHandle;
use crate::job::Event;
use crate::submit::{self, JobRequest, Submitted};

/// Server-sent events buffered between a job's pump and the connection.
const SSE_BUFFER: usize = 64;

/// Serves one `/v1/chat/completions` or `/v1/completions` request.
pub async fn complete(
    door: Door,
    peer: Option<IpAddr>,
    headers: HeaderMap,
    body: Bytes,
    kind: Kind,
) -> Response {
    let arrived = Instant::now();
    match start(&door, peer, &headers, &body, kind, arrived).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn start(
    door: &Door,
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    body: &[u8],
    kind: Kind,
    arrived: Instant,
) -> Result<Response, HttpError> {
    let who = door.admit(headers, peer)?;
    admit::require_any(&who, &[Role::Submit])?;
    let parsed = openai::parse(kind, body)
        .and_then(|p| Ok((openai::budget(headers, door.default_deadline)?, p)));
    let (budget, req) = parsed.inspect_err(|e| {
        // A decoder's message may quote the body (a prompt in the wrong field): not audited.
        let reason = match e.param.as_deref() {
            Some("body") => "request body does not decode",
            _ => e.message.as_str(),
        };
        let why = Fields::new().reason(reason);
        door.svc
            .audit
            .record(events::VALIDATION_REJECTED, &who.fingerprint, why);
    })?;
    let job = JobRequest {
        model: req.model.clone(),
        prompt: req.prompt,
        max_tokens: req.max_tokens,
        header_budget: Ok(Some(budget)),
        deadline_ms: 0,
        sampling: req.sampling,
    };
    let sub = submit::submit(&door.svc, &who, arrived, job).await?;
    let head = Head {
        kind,
        id: match kind {
            Kind::Chat => format!("chatcmpl-{}", sub.id),
            Kind::Text => format!("cmpl-{}", sub.id),
        },
        model: req.model,
        created: super::unix_secs(),
    };
    let promise = [
        ("skep-job-id", sub.id.clone()),
        (
            "skep-predicted-finish-ms",
            ms(sub.decision.predicted_finish).to_string(),
        ),
        ("skep-node", sub.decision.node.clone()),
    ];
    let cut = StopCut::new(req.stop);
    let mut r = if req.stream {
        let (tx, rx) = mpsc::channel::<Bytes>(SSE_BUFFER);
        let dispatch = door.svc.dispatch.clone();
        tokio::spawn(pump(dispatch, sub, head, cut, req.include_usage, tx));
        let body = Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, Infallible>));
        let mut r = (StatusCode::OK, body).into_response();
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    } else {
        let whole = collect(door.svc.dispatch.clone(), sub, &head, cut).await?;
        super::json(StatusCode::OK, &whole)
    };
    for (name, value) in promise {
        if let Ok(v) = HeaderValue::from_str(&value) {
            r.headers_mut().insert(name, v);
        }
    }
    Ok(r)
}

/// Cancels a job when dropped while armed: its client went away.
struct CancelOnDrop {
    dispatch: DispatchHandle,
    id: String,
    armed: bool,
}

impl CancelOnDrop {
    fn new(dispatch: DispatchHandle, id: &str) -> CancelOnDrop {
        CancelOnDrop {
            dispatch,
            id: id.to_owned(),
            armed: true,
        }
    }

    /// The job ended (or was cancelled here): nothing to do on drop.
    fn disarm(&mut self) {
        self.armed = false;
    }

    /// Ends the job now (a stop string was met): its slot is freed for others.
    async fn cancel(&mut self) {
        self.armed = false;
        let _ = self.dispatch.cancel(&self.id).await;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (dispatch, id) = (self.dispatch.clone(), std::mem::take(&mut self.id));
            debug!(job = %id, "HTTP client gone; cancelling its job");
            rt.spawn(async move {
                let _ = dispatch.cancel(&id).await;
            });
        }
    }
}

/// `finish_reason` of a job that ran to its end.
fn finish_reason(tokens: u32, max_tokens: u32) -> &'static str {
    if tokens >= max_tokens {
        "length"
    } else {
        "stop"
    }
}

/// A non-streaming answer: the whole text once the job ends.
async fn collect(
    dispatch: DispatchHandle,
    sub: Submitted,
    head: &Head,
    mut cut: StopCut,
) -> Result<Value, HttpError> {
    let mut guard = CancelOnDrop::new(dispatch, &sub.id);
    let mut events = sub.events;
    let (mut text, mut tokens, mut prompt_tokens) = (String::new(), 0u32, 0u32);
    let finish = loop {
        match events.next().await {
            Some(Event::Token { text: t, .. }) => {
                tokens += 1;
                let (out, stopped) = cut.push(&t);
                text.push_str(&out);
                if stopped {
                    guard.cancel().await;
                    break "stop";
                }
            }
            Some(Event::Restarted { .. }) => {
                text.clear();
                cut.reset();
                tokens = 0;
            }
            Some(Event::Done {
                tokens: n,
                prompt_tokens: p,
                ..
            }) => {
                guard.disarm();
                prompt_tokens = p;
                text.push_str(&cut.finish());
                break finish_reason(n, sub.max_tokens);
            }
            Some(Event::Failed { error, .. }) => {
                guard.disarm();
                return Err(error.into());
            }
            Some(_) => {}
            None => {
                guard.disarm();
                return Err(Error::Cancelled.into());
            }
        }
    };
    Ok(head.whole(&text, finish, prompt_tokens, tokens))
}

/// One SSE event.
fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Feeds a streaming answer: a chunk per token, then the finish (and usage), then `[DONE]`.
async fn pump(
    dispatch: DispatchHandle,
    sub: Submitted,
    head: Head,
    mut cut: StopCut,
    include_usage: bool,
    tx: mpsc::Sender<Bytes>,
) {
    let mut guard = CancelOnDrop::new(dispatch, &sub.id);
    let mut events = sub.events;
    let with_usage = |mut v: Value| {
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    // The role first, as OpenAI does, so clients see the answer begin.
    if tx
        .send(sse(&with_usage(head.chunk(Some(""), true, None))))
        .await
        .is_err()
    {
        return;
    }
    let (mut tokens, mut shown, mut prompt_tokens) = (0u32, false, 0u32);
    let end = loop {
        let ev = tokio::select! {
            // The client hung up: the guard cancels the job.
            () = tx.closed() => return,
            ev = events.next() => ev,
        };
        let (text, end) = match ev {
            Some(Event::Token { text, .. }) => {
                tokens += 1;
                let (out, stopped) = cut.push(&text);
                if stopped {
                    guard.cancel().await;
                }
                (out, stopped.then(|| head.chunk(None, false, Some("stop"))))
            }
            Some(Event::Restarted { attempt, .. }) if shown => {
                // What the client has cannot be taken back: end the stream, saying why.
                guard.cancel().await;
                let e = HttpError {
                    message: format!(
                        "the job failed over to another pool (attempt {attempt}) whose output \
                         differs from what was streamed; discard it and ask again"
                    ),
                    no_retry: false,
                    ..HttpError::internal()
                };
                (String::new(), Some(e.body()))
            }
            Some(Event::Restarted { .. }) => {
                cut.reset();
                tokens = 0;
                (String::new(), None)
            }
            Some(Event::Done {
                tokens: n,
                prompt_tokens: p,
                ..
            }) => {
                guard.disarm();
                prompt_tokens = p;
                let finish = finish_reason(n, sub.max_tokens);
                (cut.finish(), Some(head.chunk(None, false, Some(finish))))
            }
            Some(Event::Failed {
                error: e @ Error::DeadlineExceeded { .. },
                ..
            }) => {
                guard.disarm();
                let mut c = head.chunk(None, false, Some("length"));
                c["skep"] = json!({"stopped": "deadline", "message": e.to_string()});
                (cut.finish(), Some(c))
            }
            Some(Event::Failed { error, .. }) => {
                guard.disarm();
                (String::new(), Some(HttpError::from(error).body()))
            }
            Some(_) => (String::new(), None),
            None => {
                guard.disarm();
                (
                    String::new(),
                    Some(HttpError::from(Error::Cancelled).body()),
                )
            }
        };
        if !text.is_empty() {
            shown = true;
            let chunk = with_usage(head.chunk(Some(&text), false, None));
            if tx.send(sse(&chunk)).await.is_err() {
                return;
            }
        }
        if let Some(end) = end {
            break end;
        }
    };
    let finished = end.get("error").is_none();
    let end = if finished { with_usage(end) } else { end };
    let mut tail = vec![sse(&end)];
    if finished && include_usage {
        tail.push(sse(&head.usage_chunk(prompt_tokens, tokens)));
    }
    tail.push(Bytes::from_static(b"data: [DONE]\n\n"));
    for b in tail {
        if tx.send(b).await.is_err() {
            return;
        }
    }
}
