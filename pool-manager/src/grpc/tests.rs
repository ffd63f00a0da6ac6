//! Frame validation, refusal codes, event conversion and the outbound batching, without workers
//! (and, but for the one test that sends bytes that do not decode, without tonic transport).

use std::time::Duration;

use futures_util::StreamExt;
use tonic::Code;

use super::*;
use crate::models::ModelSpec;

fn frame() -> JobFrame {
    JobFrame {
        handle: 1,
        job_id: "job-1".into(),
        model: "synthetic".into(),
        prompt: "hello".into(),
        max_tokens: 8,
        budget_us: 5_000_000,
        slot: 0,
        order: 0,
        temperature: 0.0,
        top_p: 0.0,
        seed: 0,
        evict: Vec::new(),
    }
}

fn models() -> Vec<String> {
    vec!["synthetic".into()]
}

fn model_set() -> Arc<ModelSet> {
    let spec = ModelSpec {
        name: "synthetic".into(),
        args: Vec::new(),
        file_bytes: 0,
    };
    Arc::new(ModelSet::new(vec![spec], 0, 2))
}

/// The gRPC code a frame is refused with, or `None` if accepted.
fn refusal(f: JobFrame, first_token: Duration) -> Option<Code> {
    check_frame(&f, Instant::now(), 2, &models(), first_token)
        .err()
        .map(|e| status::code(&e))
}

#[test]
fn a_valid_frame_gets_its_budget_from_its_arrival() {
    let arrived = Instant::now();
    let deadline = check_frame(&frame(), arrived, 2, &models(), Duration::ZERO).unwrap();
    assert_eq!(
        deadline.instant(),
        arrived + Duration::from_micros(5_000_000)
    );
}

#[test]
fn a_huge_budget_is_capped_not_overflowed() {
    let f = JobFrame {
        budget_us: u64::MAX,
        ..frame()
    };
    let arrived = Instant::now();
    let deadline = check_frame(&f, arrived, 2, &models(), Duration::ZERO).unwrap();
    assert_eq!(
        deadline.instant(),
        arrived + skep_common::deadline::MAX_BUDGET
    );
}

#[test]
fn bad_frames_are_refused_with_the_matching_code() {
    let none = Duration::ZERO;
    let cases: Vec<(&str, JobFrame, Code)> = vec![
        (
            "reserved handle",
            JobFrame {
                handle: 0,
                ..frame()
            },
            Code::InvalidArgument,
        ),
        (
            "bad job id",
            JobFrame {
                job_id: "../x".into(),
                ..frame()
            },
            Code::InvalidArgument,
        ),
        (
            "empty job id",
            JobFrame {
                job_id: String::new(),
                ..frame()
            },
            Code::InvalidArgument,
        ),
        (
            "bad model name",
            JobFrame {
                model: "a b".into(),
                ..frame()
            },
            Code::InvalidArgument,
        ),
        (
            "empty prompt",
            JobFrame {
                prompt: String::new(),
                ..frame()
            },
            Code::InvalidArgument,
        ),
        (
            "NUL in prompt",
            JobFrame {
                prompt: "a\0b".into(),
                ..frame()
            },
            Code::InvalidArgument,
        ),
        (
            "oversized prompt",
            JobFrame {
                prompt: "x".repeat(validate::MAX_PROMPT_BYTES + 1),
                ..frame()
            },
            Code::InvalidArgument,
        ),
        (
            "zero max_tokens",
            JobFrame {
                max_tokens: 0,
                ..frame()
            },
            Code::InvalidArgument,
        ),
        (
            "temperature out of range",
            JobFrame {
                temperature: 2.5,
                ..frame()
            },
            Code::InvalidArgument,
        ),
        (
            "top_p out of range",
            JobFrame {
                top_p: f32::NAN,
                ..frame()
            },
            Code::InvalidArgument,
        ),
        (
            "too many tokens",
            JobFrame {
                max_tokens: validate::MAX_TOKENS + 1,
                ..frame()
            },
            Code::InvalidArgument,
        ),
        (
            "missing slot",
            JobFrame { slot: 2, ..frame() },
            Code::InvalidArgument,
        ),
        (
            "model not served",
            JobFrame {
                model: "llama".into(),
                ..frame()
            },
            Code::NotFound,
        ),
        (
            "no budget",
            JobFrame {
                budget_us: 0,
                ..frame()
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, f, code) in cases {
        assert_eq!(refusal(f, none), Some(code), "{what}");
    }
    assert_eq!(refusal(frame(), none), None);
}

#[test]
fn a_budget_shorter_than_the_first_token_is_refused_deadline_exceeded() {
    // Workers take about an hour to say anything; five seconds cannot be enough.
    let slow = Duration::from_secs(3600);
    assert_eq!(refusal(frame(), slow), Some(Code::DeadlineExceeded));
}

fn failed(error: Error) -> JobFailed {
    match pool_event((9, Event::Failed { error, tokens: 3 })) {
        PoolEvent {
            handle: 9,
            kind: Some(pool_event::Kind::Failed(f)),
        } => f,
        other => panic!("not a JobFailed: {other:?}"),
    }
}

#[test]
fn failures_carry_grpc_codes_as_numbers() {
    let full = failed(Error::SlotFull { slot: 0, limit: 3 });
    assert_eq!((full.code, full.tokens), (8, 3));
    assert_eq!(failed(Error::Cancelled).code, 1);
    assert_eq!(failed(Error::LateArrival).code, 4);
    assert_eq!(failed(Error::UnknownModel("m".into())).code, 5);
    assert_eq!(failed(Error::ShuttingDown).code, 14);
    let lost = failed(Error::WorkerLost("worker exited".into()));
    assert_eq!(lost.code, 14);
    assert!(lost.message.contains("restarted"), "{}", lost.message);
    // A worker's own status passes through untouched.
    let worker = failed(Error::Worker {
        code: 4,
        message: "deadline exceeded during generation".into(),
    });
    assert_eq!(worker.code, 4);
    assert_eq!(worker.message, "deadline exceeded during generation");
}

#[test]
fn job_events_keep_their_handle_and_fields() {
    let started = pool_event((
        4,
        Event::Started {
            slot: 1,
            generation: 2,
            pool_us: 30,
        },
    ));
    assert_eq!(started.handle, 4);
    assert_eq!(
        started.kind,
        Some(pool_event::Kind::Started(WorkerStarted {
            slot: 1,
            generation: 2,
            pool_us: 30
        }))
    );
    let finished = pool_event((
        4,
        Event::Finished {
            tokens: 5,
            prompt_tokens: 3,
            pool_us: 30,
            first_token_us: 700,
            generation_us: 900,
        },
    ));
    assert_eq!(
        finished.kind,
        Some(pool_event::Kind::Finished(WorkerFinished {
            tokens: 5,
            prompt_tokens: 3,
            pool_us: 30,
            worker_first_token_us: 700,
            generation_us: 900,
        }))
    );
}

fn token(handle: u64, index: u32) -> (u64, Event) {
    (
        handle,
        Event::Token {
            index,
            text: format!("t{index}"),
            id: index,
        },
    )
}

#[tokio::test]
async fn events_ready_together_travel_in_one_frame() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    tx.send(token(1, 0)).unwrap();
    tx.send(token(2, 0)).unwrap();
    tx.send(token(1, 1)).unwrap();
    let frame = next_frame(&mut rx).await.unwrap();
    let got: Vec<u64> = frame.events.iter().map(|e| e.handle).collect();
    assert_eq!(got, [1, 2, 1], "one frame, in the order sent");
    tx.send(token(1, 2)).unwrap();
    assert_eq!(next_frame(&mut rx).await.unwrap().events.len(), 1);
    drop(tx);
    assert!(next_frame(&mut rx).await.is_none());
}

#[tokio::test]
async fn a_frame_holds_at_most_max_batch_events() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    for i in 0..(MAX_BATCH + 10) as u32 {
        tx.send(token(1, i)).unwrap();
    }
    assert_eq!(next_frame(&mut rx).await.unwrap().events.len(), MAX_BATCH);
    assert_eq!(next_frame(&mut rx).await.unwrap().events.len(), 10);
}

fn credit() -> PoolEvent {
    PoolEvent {
        handle: 0,
        kind: Some(pool_event::Kind::Credit(Credit {
            slots: 2,
            per_slot: 2,
        })),
    }
}

#[tokio::test]
async fn the_outbound_stream_opens_with_credit_and_closes_on_a_key_change() {
    let (tx, rx) = mpsc::unbounded_channel();
    let (close_tx, close_rx) = oneshot::channel();
    tx.send(token(3, 0)).unwrap();
    let models = model_set();
    let mut out = Box::pin(outbound(credit(), Arc::clone(&models), rx, close_rx));
    let first = out.next().await.unwrap().unwrap();
    assert_eq!(
        first.events,
        [credit(), models_event(&models)],
        "the credit comes first, with the models' state"
    );
    let second = out.next().await.unwrap().unwrap();
    assert_eq!(second.events[0].handle, 3);
    close_tx.send(Close::KeyChanged).unwrap();
    let status = out.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(out.next().await.is_none());
    drop(tx);
}

#[tokio::test]
async fn the_outbound_stream_ends_quietly_when_the_queen_is_gone() {
    let (_tx, rx) = mpsc::unbounded_channel();
    let (close_tx, close_rx) = oneshot::channel();
    let mut out = Box::pin(outbound(credit(), model_set(), rx, close_rx));
    out.next().await.unwrap().unwrap();
    close_tx.send(Close::QueenGone).unwrap();
    assert!(out.next().await.is_none());
}

fn session(slots: &Arc<Slots>) -> (Session, mpsc::UnboundedReceiver<(u64, Event)>) {
    let (events, rx) = mpsc::unbounded_channel();
    let s = Session {
        id: 1,
        slots: Arc::clone(slots),
        models: model_set(),
        names: models(),
        events,
        audit: None,
    };
    (s, rx)
}

/// A request with one `authorization` header per value.
fn with_bearers(values: &[&str]) -> Request<()> {
    let mut req = Request::new(());
    for v in values {
        req.metadata_mut()
            .append("authorization", format!("Bearer {v}").parse().unwrap());
    }
    req
}

#[test]
fn two_authorization_headers_are_refused_even_when_one_is_the_key() {
    let dispatch_key = "skep_the_queens_dispatch_key";
    let (_tx, key) = watch::channel(Some(TokenDigest::of(dispatch_key)));
    authorize(&key, &with_bearers(&[dispatch_key])).expect("the key alone is accepted");
    for pair in [
        [dispatch_key, "skep_someone_else"],
        ["skep_someone_else", dispatch_key],
        [dispatch_key, dispatch_key],
    ] {
        let err = authorize(&key, &with_bearers(&pair)).expect_err("two headers accepted");
        assert_eq!(status::code(&err), Code::Unauthenticated, "{pair:?}");
    }
}

fn job_frame(handle: u64, slot: u32) -> QueenFrame {
    QueenFrame {
        kind: Some(queen_frame::Kind::Job(JobFrame {
            handle,
            slot,
            ..frame()
        })),
    }
}

/// Each refusal the session answered: (handle, gRPC code).
fn refusals(rx: &mut mpsc::UnboundedReceiver<(u64, Event)>) -> Vec<(u64, i32)> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .map(|e| match pool_event(e) {
            PoolEvent {
                handle,
                kind: Some(pool_event::Kind::Failed(f)),
            } => (handle, f.code),
            other => panic!("unexpected event {other:?}"),
        })
        .collect()
}

#[test]
fn a_frame_beyond_the_slots_credits_is_answered_resource_exhausted() {
    let slots = Slots::new(2, 2);
    let (s, mut rx) = session(&slots);
    for handle in 1..=3 {
        s.on_frame(job_frame(handle, 0), Instant::now());
    }
    assert_eq!(refusals(&mut rx), [], "1 running + 2 credits fit");
    s.on_frame(job_frame(4, 0), Instant::now());
    s.on_frame(job_frame(5, 1), Instant::now());
    assert_eq!(refusals(&mut rx), [(4, 8)]);
    assert_eq!(slots.idle(), 0);
}

#[test]
fn refused_frames_and_cancels_are_answered_on_the_session() {
    let slots = Slots::new(1, 2);
    let (s, mut rx) = session(&slots);
    s.on_frame(job_frame(1, 7), Instant::now());
    s.on_frame(job_frame(2, 0), Instant::now());
    s.on_frame(
        QueenFrame {
            kind: Some(queen_frame::Kind::Cancel(skep_proto::v1::CancelFrame {
                handle: 2,
            })),
        },
        Instant::now(),
    );
    // An empty frame and a cancel for an unknown handle are ignored, not fatal.
    s.on_frame(QueenFrame { kind: None }, Instant::now());
    s.on_frame(
        QueenFrame {
            kind: Some(queen_frame::Kind::Cancel(skep_proto::v1::CancelFrame {
                handle: 99,
            })),
        },
        Instant::now(),
    );
    assert_eq!(refusals(&mut rx), [(1, 3), (2, 1)]);
    assert_eq!(slots.idle(), 1, "the cancelled job left its slot");
}

#[test]
fn a_maximal_job_is_admitted_and_one_byte_more_is_refused() {
    use prost::Message as _;
    let longest = JobFrame {
        job_id: "j".repeat(validate::MAX_ID_LEN),
        prompt: "p".repeat(validate::MAX_PROMPT_BYTES),
        ..frame()
    };
    assert!(longest.encoded_len() + 8 <= MAX_MESSAGE);
    assert_eq!(refusal(longest.clone(), Duration::ZERO), None);
    let over = JobFrame {
        prompt: "p".repeat(validate::MAX_PROMPT_BYTES + 1),
        ..longest
    };
    assert_eq!(refusal(over, Duration::ZERO), Some(Code::InvalidArgument));
}

/// Sends raw bytes as session frames and ignores what comes back: no typed client can send a
/// frame that does not decode.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        prost::bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, Status> {
        let n = prost::bytes::Buf::remaining(buf);
        prost::bytes::Buf::advance(buf, n);
        Ok(Some(()))
    }
}

#[tokio::test]
async fn a_session_frame_that_does_not_decode_is_invalid_argument_and_audited() {
    use skep_common::ratelimit::{DEFAULT_BAD_AUTH_QUOTA, DEFAULT_IDENTITY_QUOTA};
    let dir = std::env::temp_dir().join(format!("skep-pool-decode-{}", std::process::id()));
    skep_common::daemon::create_private_dir(&dir).unwrap();
    let audit = Audit::start(&dir).unwrap();
    let dispatch_key = "skep_the_queens_dispatch_key";
    let (_tx, key) = watch::channel(Some(TokenDigest::of(dispatch_key)));
    let service = PoolService::new(Slots::new(1, 2), model_set(), key);
    let limits = Arc::new(RateLimits::new(
        DEFAULT_IDENTITY_QUOTA,
        DEFAULT_BAD_AUTH_QUOTA,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server(audit.clone(), limits))
            .serve_with_incoming(skep_common::daemon::incoming(listener)),
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    // QueenFrame { job: JobFrame { job_id: <0xff 0xfe> } }: invalid UTF-8 in a string field.
    let frame = vec![0x0a, 0x04, 0x12, 0x02, 0xff, 0xfe];
    let mut req = Request::new(tokio_stream::iter(vec![frame]));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {dispatch_key}").parse().unwrap(),
    );
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/skep.v1.Pool/Session");
    let mut events = grpc
        .streaming(req, path, RawCodec)
        .await
        .expect("the session opens")
        .into_inner();
    // The credit frame comes first, then the verdict on the bad frame.
    let status = loop {
        match events.message().await {
            Ok(Some(())) => continue,
            Ok(None) => panic!("the session ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    audit.flush(Duration::from_secs(5));
    let text: String = std::fs::read_dir(dir.join("audit"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        text.contains("validation.rejected") && text.contains("frame does not decode"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
