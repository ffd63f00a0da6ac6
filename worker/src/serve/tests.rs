//! The serve loop against a lane scribbler (edited fields and replayed requests never run), and
//! a cancel that reaches a job still in its prompt pass.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use skep_lane::LaneConfig;

use super::*;
use crate::engine::{SyntheticConfig, SyntheticEngine};

const GEN: u64 = 3;
/// Bounds a broken build's wait for a response; never a speed assertion.
const WAIT: Duration = Duration::from_secs(30);

/// The pool manager's side of a worker serving in a thread: it knows the session secret.
struct Pool {
    session: Secret,
    requests: Lane,
    responses: Lane,
    worker: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
}

impl Pool {
    fn start() -> Pool {
        Pool::start_with(|| {
            Box::new(SyntheticEngine::new(SyntheticConfig {
                model: "synthetic".into(),
                time_to_first_token: Duration::ZERO,
                tokens_per_sec: 0.0,
                seed: 0,
            }))
        })
    }

    /// A worker serving with the engine `make` builds.
    fn start_with(make: impl FnOnce() -> Box<dyn Engine> + Send + 'static) -> Pool {
        let session = Secret::generate();
        let requests = Lane::create_sealed("req", LaneConfig::default(), GEN).unwrap();
        let responses = Lane::create_sealed("resp", LaneConfig::default(), GEN).unwrap();
        let peer = |lane: &Lane| {
            let fd = lane.as_fd().try_clone_to_owned().unwrap();
            Lane::open_sealed(fd, GEN).unwrap()
        };
        let config = ServeConfig {
            requests: peer(&requests),
            responses: peer(&responses),
        };
        let worker_secret = Secret::from_string(session.expose().to_owned());
        let worker =
            std::thread::spawn(move || serve(config, &worker_secret, || Ok::<_, String>(make())));
        // The worker says once that its engine is loaded, before any request.
        let mut buf = Vec::new();
        assert!(
            responses.pop_timeout(&mut buf, WAIT).unwrap(),
            "the worker never said it was ready"
        );
        let ready = LaneResponse::decode(buf.as_slice()).unwrap();
        assert!(
            ready.seq == 0 && matches!(ready.kind, Some(lane_response::Kind::Ready(_))),
            "{ready:?}"
        );
        Pool {
            session,
            requests,
            responses,
            worker: Some(worker),
        }
    }

    /// A genuine request as the pool manager builds it, MAC included.
    fn request(&self, seq: u64, max_tokens: u32) -> LaneRequest {
        let mut req = LaneRequest {
            seq,
            job_id: format!("job-{seq}"),
            model: "synthetic".into(),
            prompt: "hello".into(),
            max_tokens,
            deadline_mono_ns: monotonic_ns() + 60_000_000_000,
            mac: Vec::new(),
            temperature: 0.5,
            top_p: 0.9,
            seed: 7,
        };
        let fields = session::RequestFields {
            seq: req.seq,
            job_id: &req.job_id,
            model: &req.model,
            prompt: &req.prompt,
            max_tokens: req.max_tokens,
            deadline_ns: req.deadline_mono_ns,
            temperature: req.temperature,
            top_p: req.top_p,
            seed: req.seed,
        };
        req.mac = session::request_mac(&self.session, &fields).to_vec();
        req
    }

    /// Writes raw bytes into the request lane, as anything holding the lane can.
    fn push(&self, bytes: &[u8]) {
        self.requests.push_timeout(bytes, WAIT).unwrap();
    }

    /// The responses to one request, up to its terminal one.
    fn responses(&self) -> Vec<LaneResponse> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        loop {
            assert!(
                self.responses.pop_timeout(&mut buf, WAIT).unwrap(),
                "the worker did not answer"
            );
            let r = LaneResponse::decode(buf.as_slice()).unwrap();
            let terminal = !matches!(r.kind, Some(lane_response::Kind::Token(_)));
            out.push(r);
            if terminal {
                return out;
            }
        }
    }

    #[track_caller]
    fn assert_runs(&self, seq: u64, tokens: u32) {
        let got = self.responses();
        assert_eq!(got.len() as u32, tokens + 1, "{got:?}");
        assert!(got.iter().all(|r| r.seq == seq), "{got:?}");
        assert!(
            matches!(got.last().unwrap().kind, Some(lane_response::Kind::Done(ref d)) if d.tokens == tokens && d.prompt_tokens == 1),
            "{got:?}"
        );
    }

    /// The request was refused as not genuine: one error, no token, nothing run.
    #[track_caller]
    fn assert_refused(&self, what: &str, seq: u64) {
        let got = self.responses();
        match got.as_slice() {
            [
                LaneResponse {
                    seq: s,
                    kind: Some(lane_response::Kind::Error(e)),
                },
            ] => {
                assert_eq!(*s, seq, "{what}");
                assert_eq!(e.code, CODE_UNAUTHENTICATED, "{what}: {e:?}");
            }
            other => panic!("{what}: the worker ran it: {other:?}"),
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A dead lane ends the worker's loop.
        self.requests.mark_dead();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// A scribbler: it cannot MAC, but it can change any field of a request in the lane.
fn edited(req: &LaneRequest, edit: impl FnOnce(&mut LaneRequest)) -> Vec<u8> {
    let mut req = req.clone();
    edit(&mut req);
    req.encode_to_vec()
}

#[test]
fn edited_fields_and_replayed_requests_never_run() {
    let pool = Pool::start();
    let first = pool.request(1, 2).encode_to_vec();
    pool.push(&first);
    pool.assert_runs(1, 2);

    // Replaying the captured request, byte for byte: a valid MAC, an old seq.
    pool.push(&first);
    pool.assert_refused("replay of seq 1", 1);

    // Each field of a fresh genuine request, edited in the lane.
    let second = pool.request(2, 2);
    let edits: [(&str, Vec<u8>); 10] = [
        ("max_tokens", edited(&second, |r| r.max_tokens = 50)),
        ("model", edited(&second, |r| r.model = "other".into())),
        ("prompt", edited(&second, |r| r.prompt.push('!'))),
        ("job_id", edited(&second, |r| r.job_id = "job-x".into())),
        ("deadline", edited(&second, |r| r.deadline_mono_ns += 1)),
        ("seq", edited(&second, |r| r.seq = 1000)),
        ("temperature", edited(&second, |r| r.temperature = 0.0)),
        ("top_p", edited(&second, |r| r.top_p = 1.0)),
        ("seed", edited(&second, |r| r.seed += 1)),
        ("mac", edited(&second, |r| r.mac[0] ^= 1)),
    ];
    for (field, bytes) in &edits {
        let seq = LaneRequest::decode(bytes.as_slice()).unwrap().seq;
        pool.push(bytes);
        pool.assert_refused(field, seq);
    }

    // None of the forgeries moved the replay window (not even the one claiming seq 1000):
    // the genuine seq 2 still runs, once.
    let second = second.encode_to_vec();
    pool.push(&second);
    pool.assert_runs(2, 2);
    pool.push(&second);
    pool.assert_refused("replay of seq 2", 2);
    // An older seq, freshly MACed, is as stale as a replay; a newer one (gaps are normal) runs.
    let older = pool.request(1, 1).encode_to_vec();
    pool.push(&older);
    pool.assert_refused("seq 1 after seq 2", 1);
    let later = pool.request(10, 1).encode_to_vec();
    pool.push(&later);
    pool.assert_runs(10, 1);
}

/// An engine whose prompt pass never ends by itself: it only asks `between`, as the GGUF engine
/// does between prompt chunks, and says when it has begun.
struct EndlessPromptPass {
    begun: Arc<AtomicBool>,
}

impl Engine for EndlessPromptPass {
    fn model(&self) -> &str {
        "synthetic"
    }

    fn generate_checked(
        &mut self,
        _req: &GenerateRequest,
        _emit: &mut dyn FnMut(u32, &str) -> ControlFlow<Stop>,
        between: &mut dyn FnMut() -> ControlFlow<Stop>,
    ) -> Result<Finish, crate::engine::EngineError> {
        self.begun.store(true, Ordering::Release);
        let started = Instant::now();
        // Bounded so that a worker that never passes on the cancel fails the test, not hangs it.
        while started.elapsed() < WAIT {
            if let ControlFlow::Break(reason) = between() {
                return Ok(Finish::Stopped { tokens: 0, reason });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(Finish::Complete {
            tokens: 0,
            prompt_tokens: 1,
        })
    }
}

#[test]
fn a_cancel_reaches_a_job_still_in_its_prompt_pass() {
    let begun = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&begun);
    let pool = Pool::start_with(move || Box::new(EndlessPromptPass { begun: flag }));
    pool.push(&pool.request(1, 8).encode_to_vec());
    let since = Instant::now();
    while !begun.load(Ordering::Acquire) {
        assert!(since.elapsed() < WAIT, "the job never began");
        std::thread::sleep(Duration::from_millis(1));
    }
    pool.requests.request_cancel(1);
    let got = pool.responses();
    assert_eq!(got.len(), 1, "no token: {got:?}");
    assert!(
        matches!(&got[0].kind, Some(lane_response::Kind::Error(e)) if e.code == CANCELLED),
        "{got:?}"
    );
}

/// gRPC's CANCELLED, as lane errors carry it.
const CANCELLED: i32 = 1;
