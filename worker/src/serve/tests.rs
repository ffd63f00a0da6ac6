//! The serve loop against a lane scribbler (edited fields and replayed requests never run), a
//! cancel that reaches a job still in its prompt pass, and a batched worker's several jobs.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use skep_lane::LaneConfig;

use super::*;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

use crate::engine::{EngineError, SyntheticConfig, SyntheticEngine, Work};

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
        Pool::start_with(1, || Box::new(synthetic(0.0)))
    }

    /// A worker holding up to `batch` jobs, serving with the engine `make` builds.
    fn start_with(
        batch: usize,
        make: impl FnOnce() -> Box<dyn BatchEngine> + Send + 'static,
    ) -> Pool {
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
            batch,
            prefill_chunk: 16,
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
            ready.seq == 0
                && matches!(ready.kind, Some(lane_response::Kind::Ready(ref r)) if r.batch as usize == batch),
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
        self.sign(LaneRequest {
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
            cancel_seq: 0,
        })
    }

    /// `req` with its MAC made over its fields as they are now.
    fn sign(&self, mut req: LaneRequest) -> LaneRequest {
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
            cancel_seq: req.cancel_seq,
        };
        req.mac = session::request_mac(&self.session, &fields).to_vec();
        req
    }

    /// A genuine request as `seq` that cancels the job sent as `target`.
    fn cancel(&self, seq: u64, target: u64) -> LaneRequest {
        self.sign(LaneRequest {
            seq,
            cancel_seq: target,
            ..LaneRequest::default()
        })
    }

    /// Every response until `jobs` jobs have ended, grouped by job.
    fn until_ended(&self, jobs: usize) -> (HashMap<u64, Vec<LaneResponse>>, Vec<u64>) {
        let mut by_job: HashMap<u64, Vec<LaneResponse>> = HashMap::new();
        // The order tokens arrived in, by job.
        let mut order = Vec::new();
        let mut ended = 0;
        let mut buf = Vec::new();
        while ended < jobs {
            assert!(
                self.responses.pop_timeout(&mut buf, WAIT).unwrap(),
                "the worker did not answer"
            );
            let r = LaneResponse::decode(buf.as_slice()).unwrap();
            if !matches!(r.kind, Some(lane_response::Kind::Token(_))) {
                ended += 1;
            }
            order.push(r.seq);
            by_job.entry(r.seq).or_default().push(r);
        }
        (by_job, order)
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
    let edits: [(&str, Vec<u8>); 11] = [
        ("max_tokens", edited(&second, |r| r.max_tokens = 50)),
        ("model", edited(&second, |r| r.model = "other".into())),
        ("prompt", edited(&second, |r| r.prompt.push('!'))),
        ("job_id", edited(&second, |r| r.job_id = "job-x".into())),
        ("deadline", edited(&second, |r| r.deadline_mono_ns += 1)),
        ("seq", edited(&second, |r| r.seq = 1000)),
        ("temperature", edited(&second, |r| r.temperature = 0.0)),
        ("top_p", edited(&second, |r| r.top_p = 1.0)),
        ("seed", edited(&second, |r| r.seed += 1)),
        ("cancel_seq", edited(&second, |r| r.cancel_seq = 1)),
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

/// An engine whose prompt pass never ends: each step runs a chunk of a prompt that always has
/// more, as a very long prompt would, and says when it has begun.
struct EndlessPromptPass {
    begun: Arc<AtomicBool>,
}

impl BatchEngine for EndlessPromptPass {
    fn model(&self) -> &str {
        "synthetic"
    }

    fn admit(&mut self, _id: SeqId, _req: &GenerateRequest) -> Result<u32, EngineError> {
        Ok(u32::MAX)
    }

    fn pending_prompt(&self, _id: SeqId) -> usize {
        usize::MAX
    }

    fn step(&mut self, work: &[Work], _out: &mut Vec<(SeqId, Emitted)>) -> Result<(), EngineError> {
        assert!(
            work.iter().all(|w| w.prompt_tokens <= 16),
            "more than a chunk: {work:?}"
        );
        self.begun.store(true, Ordering::Release);
        std::thread::sleep(Duration::from_millis(1));
        Ok(())
    }

    fn release(&mut self, _id: SeqId) {}
}

#[test]
fn a_cancel_reaches_a_job_still_in_its_prompt_pass() {
    let begun = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&begun);
    let pool = Pool::start_with(1, move || Box::new(EndlessPromptPass { begun: flag }));
    pool.push(&pool.request(1, 8).encode_to_vec());
    let since = std::time::Instant::now();
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

/// gRPC's RESOURCE_EXHAUSTED, as lane errors carry it.
const RESOURCE_EXHAUSTED: i32 = 8;

/// A synthetic engine: first token at once, then `tps` tokens per second (0: unpaced).
fn synthetic(tps: f64) -> SyntheticEngine {
    SyntheticEngine::new(SyntheticConfig {
        model: "synthetic".into(),
        time_to_first_token: Duration::ZERO,
        tokens_per_sec: tps,
        seed: 0,
    })
}

fn texts(rs: &[LaneResponse]) -> Vec<String> {
    rs.iter()
        .filter_map(|r| match &r.kind {
            Some(lane_response::Kind::Token(t)) => Some(t.text.clone()),
            _ => None,
        })
        .collect()
}

fn code(r: &LaneResponse) -> Option<i32> {
    match &r.kind {
        Some(lane_response::Kind::Error(e)) => Some(e.code),
        _ => None,
    }
}

#[test]
fn a_batched_worker_runs_several_jobs_at_once_each_with_its_own_stream() {
    let pool = Pool::start_with(3, || Box::new(synthetic(200.0)));
    let prompts = ["one two", "three", "four five six"];
    for (i, prompt) in prompts.iter().enumerate() {
        let mut req = pool.request(i as u64 + 1, 12);
        req.prompt = (*prompt).into();
        req.temperature = 0.0;
        let req = pool.sign(req);
        pool.push(&req.encode_to_vec());
    }
    let (by_job, order) = pool.until_ended(3);
    for (i, prompt) in prompts.iter().enumerate() {
        let seq = i as u64 + 1;
        let rs = &by_job[&seq];
        let want: Vec<String> = (0..12).map(|k| SyntheticEngine::token(prompt, k)).collect();
        assert_eq!(
            texts(rs),
            want,
            "job {seq} got another job's text or lost some"
        );
        assert!(
            matches!(&rs.last().unwrap().kind, Some(lane_response::Kind::Done(d)) if d.tokens == 12),
            "{rs:?}"
        );
    }
    // The streams overlap: some job's first token came before another job's last one, so the
    // jobs ran together, not one after the other.
    let first_of = |s: u64| order.iter().position(|&x| x == s).unwrap();
    let last_of = |s: u64| order.iter().rposition(|&x| x == s).unwrap();
    assert!(
        first_of(3) < last_of(1) && first_of(2) < last_of(1),
        "jobs ran one after the other: {order:?}"
    );
}

#[test]
fn a_cancel_request_stops_one_job_and_the_others_go_on() {
    let pool = Pool::start_with(2, || Box::new(synthetic(200.0)));
    pool.push(&pool.request(1, 400).encode_to_vec());
    pool.push(&pool.request(2, 20).encode_to_vec());
    // A forged cancel (no valid MAC) for job 2 is refused and stops nothing.
    let mut forged = pool.cancel(3, 2);
    forged.mac[0] ^= 1;
    pool.push(&forged.encode_to_vec());
    pool.push(&pool.cancel(4, 1).encode_to_vec());
    let (by_job, _) = pool.until_ended(3);
    let one = &by_job[&1];
    assert_eq!(code(one.last().unwrap()), Some(CANCELLED), "{one:?}");
    assert!(
        one.len() < 400,
        "job 1 ran to the end: {} responses",
        one.len()
    );
    assert_eq!(code(&by_job[&3][0]), Some(CODE_UNAUTHENTICATED));
    let two = &by_job[&2];
    assert_eq!(texts(two).len(), 20, "{two:?}");
    assert!(
        matches!(&two.last().unwrap().kind, Some(lane_response::Kind::Done(d)) if d.tokens == 20)
    );
}

#[test]
fn a_job_beyond_the_batch_is_refused_and_the_held_ones_finish() {
    let pool = Pool::start_with(2, || Box::new(synthetic(200.0)));
    for seq in 1..=3 {
        pool.push(&pool.request(seq, 30).encode_to_vec());
    }
    let (by_job, _) = pool.until_ended(3);
    let refused = &by_job[&3];
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(code(&refused[0]), Some(RESOURCE_EXHAUSTED));
    for seq in [1, 2] {
        assert_eq!(texts(&by_job[&seq]).len(), 30, "job {seq}");
    }
}

/// An engine whose device is lost once it holds `after` jobs: every step fails from then on.
struct LostDevice {
    admitted: usize,
    after: usize,
}

impl BatchEngine for LostDevice {
    fn model(&self) -> &str {
        "synthetic"
    }

    fn admit(&mut self, _id: SeqId, _req: &GenerateRequest) -> Result<u32, EngineError> {
        self.admitted += 1;
        Ok(1)
    }

    fn pending_prompt(&self, _id: SeqId) -> usize {
        1
    }

    fn step(
        &mut self,
        _work: &[Work],
        _out: &mut Vec<(SeqId, Emitted)>,
    ) -> Result<(), EngineError> {
        if self.admitted >= self.after {
            return Err(EngineError::Device("CUDA_ERROR_ILLEGAL_ADDRESS".into()));
        }
        std::thread::sleep(Duration::from_millis(1));
        Ok(())
    }

    fn release(&mut self, _id: SeqId) {}
}

#[test]
fn a_lost_device_fails_every_held_job_and_ends_the_worker_for_a_restart() {
    let mut pool = Pool::start_with(2, || {
        Box::new(LostDevice {
            admitted: 0,
            after: 2,
        })
    });
    pool.push(&pool.request(1, 8).encode_to_vec());
    pool.push(&pool.request(2, 8).encode_to_vec());
    let mut failed = Vec::new();
    for _ in 0..2 {
        let got = pool.responses();
        match got.as_slice() {
            [
                LaneResponse {
                    seq,
                    kind: Some(lane_response::Kind::Error(e)),
                },
            ] => {
                assert_eq!(e.code, CODE_INTERNAL, "{e:?}");
                assert!(e.message.contains("ILLEGAL_ADDRESS"), "{e:?}");
                failed.push(*seq);
            }
            other => panic!("expected one error: {other:?}"),
        }
    }
    failed.sort_unstable();
    assert_eq!(failed, [1, 2]);
    // The worker's loop ends with the device error (its process exits and the pool starts a
    // new generation), rather than serving on with a broken device.
    let ended = pool.worker.take().unwrap().join().unwrap();
    assert!(
        matches!(ended, Err(ServeError::Device(ref m)) if m.contains("ILLEGAL_ADDRESS")),
        "{ended:?}"
    );
}
