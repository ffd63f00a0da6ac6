//! Slot queues without workers: order, the 1 + K bound, cancels and session loss; then the
//! real hot path on synthetic workers, one job per worker and several at once.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;

use prost::Message;
use skep_common::secret::Secret;
use skep_common::session;
use skep_lane::Lane;
use skep_proto::v1::LaneRequest;
use tokio::sync::mpsc::{self, UnboundedReceiver};

use crate::Figures;
use crate::audit::Audit;

use super::keeper::{batch_figures, figures};
use super::requests::Requests;
use super::slot::Claim;
use super::*;

/// A request lane in a private temp dir, standing for a worker's (cancels write its cancel word
/// and push their requests into it).
struct TempLane {
    dir: PathBuf,
    requests: Arc<Requests>,
    /// A copy of the session secret, to check the MACs of what was pushed.
    secret: Secret,
}

impl TempLane {
    fn new() -> TempLane {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("skep-pool-slot-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lane = Lane::create(&dir.join("req"), LaneConfig::default(), 1).unwrap();
        let secret = Secret::generate();
        let copy = Secret::from_string(secret.expose().to_owned());
        TempLane {
            dir,
            requests: Arc::new(Requests::new(lane, secret)),
            secret: copy,
        }
    }

    fn lane(&self) -> &Lane {
        self.requests.lane()
    }

    /// The next request pushed into the lane, its MAC checked.
    fn pop_request(&self) -> Option<LaneRequest> {
        let mut buf = Vec::new();
        if !self.lane().try_pop(&mut buf).unwrap() {
            return None;
        }
        let req = LaneRequest::decode(buf.as_slice()).unwrap();
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
        assert!(
            session::verify_request(&self.secret, &fields, &req.mac),
            "a request must carry the session's MAC"
        );
        Some(req)
    }
}

impl Drop for TempLane {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn job(session: u64, handle: u64, sink: &Sink) -> QueuedJob {
    QueuedJob {
        session,
        handle,
        order: 0,
        job_id: format!("job-{session}-{handle}"),
        model: "synthetic".into(),
        prompt: "hi".into(),
        max_tokens: 4,
        sampling: Default::default(),
        deadline: Deadline::after(Duration::from_secs(60)),
        arrived: Instant::now(),
        events: sink.clone(),
    }
}

fn done() -> Event {
    Event::Finished {
        tokens: 1,
        prompt_tokens: 1,
        pool_us: 0,
        first_token_us: 0,
        generation_us: 0,
    }
}

/// Stands for a worker with its request lane.
#[derive(Debug)]
struct FakeWorker(Arc<Requests>);

impl Claim for FakeWorker {
    fn requests(&self) -> Arc<Requests> {
        Arc::clone(&self.0)
    }
}

/// `slot`'s next job, taken as on a worker within `wait`, its request sent as `seq`.
fn next(slots: &Slots, slot: usize, lane: &TempLane, seq: u64, wait: Duration) -> Next<FakeWorker> {
    let next = slots.slots[slot].next(wait, |_| Some(FakeWorker(Arc::clone(&lane.requests))));
    if let Next::Job(_, ticket, _) = &next {
        ticket.sent(seq);
    }
    next
}

/// The next job of `slot`, which must have one queued.
fn pop(slots: &Slots, slot: usize, lane: &TempLane, seq: u64) -> (QueuedJob, Arc<Ticket>) {
    match next(slots, slot, lane, seq, Duration::ZERO) {
        Next::Job(job, cancelled, _) => (job, cancelled),
        other => panic!("expected a queued job, got {other:?}"),
    }
}

/// Every event waiting on a session's sink.
fn drain(rx: &mut UnboundedReceiver<(u64, Event)>) -> Vec<(u64, Event)> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

#[test]
fn jobs_with_equal_order_keys_run_in_arrival_order() {
    let slots = Slots::new(1, 4);
    let (sink, _rx) = mpsc::unbounded_channel();
    let lane = TempLane::new();
    for handle in [5, 3, 9, 1] {
        slots.enqueue(0, job(1, handle, &sink)).unwrap();
    }
    let mut order = Vec::new();
    for seq in 1..=4 {
        let (j, _) = pop(&slots, 0, &lane, seq);
        order.push(j.handle);
        slots.slots[0].finish(&j, done());
    }
    assert_eq!(
        order,
        [5, 3, 9, 1],
        "jobs must leave in the order they arrived"
    );
    assert!(matches!(
        next(&slots, 0, &lane, 5, Duration::ZERO),
        Next::Idle
    ));
}

#[test]
fn waiting_jobs_run_smallest_order_first_and_never_preempt_the_running_one() {
    let slots = Slots::new(1, 4);
    let (sink, _rx) = mpsc::unbounded_channel();
    let lane = TempLane::new();
    let with_order = |handle, order| QueuedJob {
        order,
        ..job(1, handle, &sink)
    };
    slots.enqueue(0, with_order(1, 50)).unwrap();
    let (running, _) = pop(&slots, 0, &lane, 1);
    // Arrive: 2 (order 30), 3 (order 10), 4 (order 30, after 2), 5 (order 5).
    for (handle, order) in [(2, 30), (3, 10), (4, 30), (5, 5)] {
        slots.enqueue(0, with_order(handle, order)).unwrap();
    }
    slots.slots[0].finish(&running, done());
    let mut order = Vec::new();
    for seq in 2..=5 {
        let (j, _) = pop(&slots, 0, &lane, seq);
        order.push(j.handle);
        slots.slots[0].finish(&j, done());
    }
    assert_eq!(order, [5, 3, 2, 4], "by order key, equal keys by arrival");
}

#[test]
fn a_slot_holds_one_running_job_plus_its_credits() {
    let slots = Slots::new(2, 2);
    let (sink, _rx) = mpsc::unbounded_channel();
    let lane = TempLane::new();
    for handle in 1..=3 {
        slots.enqueue(0, job(1, handle, &sink)).unwrap();
    }
    let full = slots.enqueue(0, job(1, 4, &sink)).unwrap_err();
    assert!(
        matches!(full, Error::SlotFull { slot: 0, limit: 3 }),
        "{full:?}"
    );
    // The other slot has its own credits.
    slots.enqueue(1, job(1, 5, &sink)).unwrap();
    // Starting a job does not free a credit: the running job counts until it finishes.
    let (running, _) = pop(&slots, 0, &lane, 1);
    assert!(matches!(
        slots.enqueue(0, job(1, 4, &sink)),
        Err(Error::SlotFull { .. })
    ));
    slots.slots[0].finish(&running, done());
    slots.enqueue(0, job(1, 4, &sink)).unwrap();
}

#[test]
fn with_no_credits_a_slot_takes_only_the_running_job() {
    let slots = Slots::new(1, 0);
    let (sink, _rx) = mpsc::unbounded_channel();
    slots.enqueue(0, job(1, 1, &sink)).unwrap();
    assert!(matches!(
        slots.enqueue(0, job(1, 2, &sink)),
        Err(Error::SlotFull { limit: 1, .. })
    ));
}

#[test]
fn frames_for_missing_slots_and_reused_handles_are_refused() {
    let slots = Slots::new(2, 2);
    let (sink, _rx) = mpsc::unbounded_channel();
    assert!(matches!(
        slots.enqueue(2, job(1, 1, &sink)),
        Err(Error::NoSuchSlot { slot: 2, slots: 2 })
    ));
    assert!(matches!(
        slots.enqueue(u32::MAX, job(1, 1, &sink)),
        Err(Error::NoSuchSlot { .. })
    ));
    slots.enqueue(0, job(1, 7, &sink)).unwrap();
    assert!(matches!(
        slots.enqueue(0, job(1, 7, &sink)),
        Err(Error::DuplicateHandle(7))
    ));
    // The same handle from another session is another job.
    slots.enqueue(0, job(2, 7, &sink)).unwrap();
}

#[test]
fn cancelling_a_queued_job_removes_it_and_answers_cancelled() {
    let slots = Slots::new(1, 2);
    let (sink, mut rx) = mpsc::unbounded_channel();
    let lane = TempLane::new();
    for handle in 1..=3 {
        slots.enqueue(0, job(1, handle, &sink)).unwrap();
    }
    slots.cancel(1, 2);
    let events = drain(&mut rx);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(matches!(
        events[0],
        (
            2,
            Event::Failed {
                error: Error::Cancelled,
                tokens: 0
            }
        )
    ));
    let (a, _) = pop(&slots, 0, &lane, 1);
    slots.slots[0].finish(&a, done());
    let (b, _) = pop(&slots, 0, &lane, 2);
    assert_eq!((a.handle, b.handle), (1, 3), "job 2 must be gone");
    // Unknown handles and other sessions' handles are ignored.
    slots.cancel(1, 99);
    slots.cancel(2, 3);
    assert!(drain(&mut rx).iter().all(|(h, _)| *h == 1));
}

#[test]
fn cancelling_the_running_job_sets_the_lane_cancel_word_and_pushes_a_cancel_request() {
    let slots = Slots::new(1, 2);
    let (sink, mut rx) = mpsc::unbounded_channel();
    let lane = TempLane::new();
    slots.enqueue(0, job(1, 1, &sink)).unwrap();
    let (_running, ticket) = pop(&slots, 0, &lane, 41);
    assert_eq!(lane.lane().cancel_requested(), 0);
    slots.cancel(1, 1);
    assert_eq!(
        lane.lane().cancel_requested(),
        41,
        "the worker must see its seq"
    );
    assert!(ticket.is_cancelled());
    // A request of its own names the job, on a new seq, MACed; it runs nothing.
    let req = lane.pop_request().expect("a cancel request");
    assert_eq!((req.cancel_seq, req.seq), (41, 1), "{req:?}");
    assert!(req.prompt.is_empty() && req.max_tokens == 0, "{req:?}");
    // Cancelling again sends nothing more.
    slots.cancel(1, 1);
    assert!(lane.pop_request().is_none());
    // Its CANCELLED comes from the slot thread once the worker stops, not from the cancel.
    assert!(drain(&mut rx).is_empty());
}

#[test]
fn a_cancel_before_the_job_is_sent_goes_out_once_it_is() {
    let slots = Slots::new(1, 2);
    let (sink, _rx) = mpsc::unbounded_channel();
    let lane = TempLane::new();
    slots.enqueue(0, job(1, 1, &sink)).unwrap();
    let ticket = match slots.slots[0].next(Duration::ZERO, |_| {
        Some(FakeWorker(Arc::clone(&lane.requests)))
    }) {
        Next::Job(_, ticket, _) => ticket,
        other => panic!("expected a job, got {other:?}"),
    };
    slots.cancel(1, 1);
    assert!(ticket.is_cancelled());
    assert!(
        lane.pop_request().is_none(),
        "nothing to name before the job has a seq"
    );
    ticket.sent(7);
    let req = lane
        .pop_request()
        .expect("the cancel once the job was sent");
    assert_eq!(req.cancel_seq, 7);
    assert_eq!(lane.lane().cancel_requested(), 7);
}

#[test]
fn losing_a_session_drops_its_queued_jobs_and_cancels_its_running_one() {
    let slots = Slots::new(2, 2);
    let (sink_a, mut rx_a) = mpsc::unbounded_channel();
    let (sink_b, _rx_b) = mpsc::unbounded_channel();
    let lane = TempLane::new();
    slots.enqueue(0, job(1, 1, &sink_a)).unwrap();
    slots.enqueue(0, job(2, 1, &sink_b)).unwrap();
    slots.enqueue(0, job(1, 2, &sink_a)).unwrap();
    slots.enqueue(1, job(1, 3, &sink_a)).unwrap();
    let (running, ticket) = pop(&slots, 0, &lane, 7);
    assert_eq!(running.session, 1);

    assert_eq!(slots.cancel_session(1), 3);
    assert!(ticket.is_cancelled());
    assert_eq!(lane.lane().cancel_requested(), 7);
    // Nobody is left to tell about the queued ones.
    assert!(drain(&mut rx_a).is_empty());
    slots.slots[0].finish(&running, done());
    let (left, _) = pop(&slots, 0, &lane, 8);
    assert_eq!(
        (left.session, left.handle),
        (2, 1),
        "only session 2's job is left"
    );
    assert!(matches!(
        next(&slots, 1, &lane, 9, Duration::ZERO),
        Next::Idle
    ));
}

#[test]
fn idle_counts_slots_with_nothing_queued_or_running() {
    let slots = Slots::new(3, 2);
    let (sink, _rx) = mpsc::unbounded_channel();
    let lane = TempLane::new();
    assert_eq!(slots.idle(), 3);
    slots.enqueue(1, job(1, 1, &sink)).unwrap();
    assert_eq!(slots.idle(), 2);
    let (j, _) = pop(&slots, 1, &lane, 1);
    assert_eq!(slots.idle(), 2, "a running job keeps its slot busy");
    slots.slots[1].finish(&j, done());
    assert_eq!(slots.idle(), 3);
}

#[test]
fn a_closed_slot_refuses_jobs_and_wakes_its_thread() {
    let slots = Slots::new(1, 2);
    let (sink, _rx) = mpsc::unbounded_channel();
    let lane = TempLane::new();
    slots.close();
    assert!(matches!(
        slots.enqueue(0, job(1, 1, &sink)),
        Err(Error::ShuttingDown)
    ));
    // Would wait for a minute if close did not count as a reason to return.
    assert!(matches!(
        next(&slots, 0, &lane, 1, Duration::from_secs(60)),
        Next::Closed
    ));
}

#[test]
fn batch_figures_take_the_first_first_token_and_the_mean_per_token_time() {
    let jobs = [
        Figures {
            first_token_us: 1000,
            per_token_us: 100,
        },
        Figures {
            first_token_us: 3000,
            per_token_us: 300,
        },
    ];
    assert_eq!(
        batch_figures(&jobs),
        Some(Figures {
            first_token_us: 1000,
            per_token_us: 200
        })
    );
    assert_eq!(batch_figures(&jobs[..1]), Some(jobs[0]));
    assert_eq!(batch_figures(&[]), None);
}

#[test]
fn figures_divide_generation_time_by_the_tokens_after_the_first() {
    assert_eq!(
        figures(8, 1500, 700),
        Figures {
            first_token_us: 1500,
            per_token_us: 100
        }
    );
    // One token (or none): nothing to divide by, and no panic.
    assert_eq!(figures(1, 1500, 40).per_token_us, 40);
    assert_eq!(figures(0, 0, 0).per_token_us, 0);
}

/// A session's events sorted by handle, as a test reads them.
struct Events {
    rx: UnboundedReceiver<(u64, Event)>,
    by_handle: std::collections::HashMap<u64, VecDeque<Event>>,
}

impl Events {
    /// Waits (up to a generous limit, only so a broken build fails instead of hanging) for the
    /// next event of `handle`, keeping other handles' events for later.
    fn next(&mut self, handle: u64) -> Event {
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(e) = self
                .by_handle
                .get_mut(&handle)
                .and_then(VecDeque::pop_front)
            {
                return e;
            }
            match self.rx.try_recv() {
                Ok((h, e)) => self.by_handle.entry(h).or_default().push_back(e),
                Err(_) if Instant::now() > give_up => panic!("no event for handle {handle}"),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

/// The worker binary: `SKEP_WORKER_BIN`, else next to this test's target dir. Missing is a
/// failure, not a skip: `cargo build --bins` (scripts/test.sh does) builds it.
fn worker_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SKEP_WORKER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join("skep-worker");
    assert!(
        p.is_file(),
        "{} is missing: build the binaries first (`cargo build --bins`)",
        p.display()
    );
    p
}

/// The real hot path: slot threads, synthetic workers, the warm-up figures, jobs in order and
/// a cancel of a running job.
#[test]
fn jobs_run_on_real_workers() {
    let program = worker_bin();
    let tmp = TempLane::new();
    let args = [
        "--engine",
        "synthetic",
        "--model",
        "synthetic",
        "--synthetic-ttft",
        "5ms",
        "--synthetic-tps",
        "100",
    ];
    let spec = Arc::new(WorkerSpec {
        program,
        args: args.iter().map(|s| s.to_string()).collect(),
        lane: LaneConfig::default(),
        model: "synthetic".into(),
    });
    let slots = Slots::new(2, 2);
    let speed = Arc::new(Speed::default());
    let audit = Audit::start(&tmp.dir).unwrap();
    let sup = spawn_slots(spec, Arc::clone(&slots), Arc::clone(&speed), audit).unwrap();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let figures = rt
        .block_on(speed.wait_for_figures(Duration::from_secs(60)))
        .expect("warm-up figures");
    assert!(figures.first_token_us > 0, "{figures:?}");

    let (sink, rx) = mpsc::unbounded_channel();
    let mut rx = Events {
        rx,
        by_handle: Default::default(),
    };
    let short = |session, handle, tokens| QueuedJob {
        max_tokens: tokens,
        ..job(session, handle, &sink)
    };
    // Slot 0: two short jobs, in order; slot 1: a long one, cancelled once it streams.
    slots.enqueue(0, short(1, 1, 3)).unwrap();
    slots.enqueue(0, short(1, 2, 2)).unwrap();
    slots.enqueue(1, short(1, 3, 1000)).unwrap();
    for (handle, tokens) in [(1, 3), (2, 2)] {
        assert!(matches!(rx.next(handle), Event::Started { slot: 0, .. }));
        for i in 0..tokens {
            match rx.next(handle) {
                Event::Token { index, .. } => assert_eq!(index, i),
                other => panic!("expected token {i} of job {handle}, got {other:?}"),
            }
        }
        match rx.next(handle) {
            Event::Finished { tokens: n, .. } => assert_eq!(n, tokens),
            other => panic!("job {handle} did not finish: {other:?}"),
        }
    }
    assert!(matches!(rx.next(3), Event::Started { slot: 1, .. }));
    assert!(matches!(rx.next(3), Event::Token { .. }));
    slots.cancel(1, 3);
    let ended = loop {
        match rx.next(3) {
            Event::Token { .. } => {}
            other => break other,
        }
    };
    match ended {
        Event::Failed {
            error: Error::Cancelled,
            tokens,
        } => assert!((1..1000).contains(&tokens), "{tokens}"),
        other => panic!("expected CANCELLED, got {other:?}"),
    }
    assert_eq!(slots.idle(), 2);
    sup.shutdown();
}

/// A worker that tries to shrink and grow both its lanes before serving. Before lanes were
/// sealed memfds the truncate went through, and this process (the pool manager) died of SIGBUS
/// at its next look at the lane header.
#[test]
fn a_worker_that_truncates_its_lanes_leaves_the_pool_serving() {
    let tmp = TempLane::new();
    let log = tmp.dir.join("resize.log");
    let script = tmp.dir.join("hostile-worker");
    // The supervisor clears the environment, so the paths are written into the script.
    let text = format!(
        "#!/bin/sh\n\
         prev=\n\
         for a in \"$@\"; do\n\
           case \"$prev\" in --request-lane-fd|--response-lane-fd)\n\
             for size in +4096 -4096 0; do\n\
               if truncate -s \"$size\" \"/dev/fd/$a\" 2>>'{log}'; then echo resized >>'{log}'; fi\n\
             done;;\n\
           esac\n\
           prev=\"$a\"\n\
         done\n\
         exec '{worker}' \"$@\"\n",
        log = log.display(),
        worker = worker_bin().display(),
    );
    std::fs::write(&script, text).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let args = [
        "--engine",
        "synthetic",
        "--synthetic-ttft",
        "1ms",
        "--synthetic-tps",
        "0",
    ];
    let spec = Arc::new(WorkerSpec {
        program: script,
        args: args.iter().map(|s| s.to_string()).collect(),
        lane: LaneConfig::default(),
        model: "synthetic".into(),
    });
    let slots = Slots::new(1, 2);
    let speed = Arc::new(Speed::default());
    let audit = Audit::start(&tmp.dir).unwrap();
    let sup = spawn_slots(spec, Arc::clone(&slots), Arc::clone(&speed), audit).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The warm-up ran through both lanes after the attempts: the pool is alive and serving.
    rt.block_on(speed.wait_for_figures(Duration::from_secs(60)))
        .expect("warm-up figures");
    let attempts = std::fs::read_to_string(&log).unwrap();
    assert!(!attempts.contains("resized"), "{attempts}");
    assert_eq!(
        attempts.matches("Operation not permitted").count(),
        6,
        "every resize must hit the seals: {attempts}"
    );
    let (sink, rx) = mpsc::unbounded_channel();
    let mut rx = Events {
        rx,
        by_handle: Default::default(),
    };
    slots
        .enqueue(
            0,
            QueuedJob {
                max_tokens: 3,
                ..job(1, 1, &sink)
            },
        )
        .unwrap();
    let ended = loop {
        match rx.next(1) {
            Event::Started { generation, .. } => assert_eq!(generation, 1, "no restart"),
            Event::Token { .. } => {}
            other => break other,
        }
    };
    assert!(
        matches!(ended, Event::Finished { tokens: 3, .. }),
        "{ended:?}"
    );
    sup.shutdown();
}

#[test]
fn jobs_on_a_slot_whose_worker_cannot_start_fail_unavailable() {
    let tmp = TempLane::new();
    let spec = Arc::new(WorkerSpec {
        program: tmp.dir.join("no-such-worker"),
        args: Vec::new(),
        lane: LaneConfig::default(),
        model: "synthetic".into(),
    });
    let slots = Slots::new(1, 2);
    let speed = Arc::new(Speed::default());
    let audit = Audit::start(&tmp.dir).unwrap();
    let sup = spawn_slots(spec, Arc::clone(&slots), speed, audit).unwrap();
    let (sink, rx) = mpsc::unbounded_channel();
    let mut rx = Events {
        rx,
        by_handle: Default::default(),
    };
    slots.enqueue(0, job(1, 1, &sink)).unwrap();
    match rx.next(1) {
        Event::Failed {
            error: Error::LoadFailed { why, .. },
            tokens: 0,
        } => assert!(why.contains("could not start"), "{why}"),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    sup.shutdown();
    assert!(matches!(
        slots.enqueue(0, job(1, 2, &sink)),
        Err(Error::ShuttingDown)
    ));
}

/// The largest request validation admits, encoded as the worker's lane carries it, is exactly
/// the bound the lane is sized by, and fits the default lane.
#[test]
fn the_largest_valid_request_fits_the_lane() {
    let job_id = "j".repeat(validate::MAX_ID_LEN);
    let prompt = "p".repeat(validate::MAX_PROMPT_BYTES);
    validate::identifier("job_id", &job_id).unwrap();
    validate::prompt(&prompt).unwrap();
    let secret = Secret::generate();
    let model = "m".repeat(validate::MAX_ID_LEN);
    let fields = session::RequestFields {
        seq: u64::MAX,
        job_id: &job_id,
        model: &model,
        prompt: &prompt,
        max_tokens: u32::MAX,
        deadline_ns: u64::MAX,
        temperature: 2.0,
        top_p: 0.5,
        seed: u64::MAX,
        cancel_seq: 0,
    };
    let mac = session::request_mac(&secret, &fields);
    assert_eq!(mac.len(), validate::LANE_MAC_BYTES);
    let req = LaneRequest {
        seq: u64::MAX,
        job_id,
        model,
        prompt,
        max_tokens: u32::MAX,
        deadline_mono_ns: u64::MAX,
        mac: mac.to_vec(),
        temperature: 2.0,
        top_p: 0.5,
        seed: u64::MAX,
        cancel_seq: 0,
    };
    assert_eq!(req.encoded_len(), validate::MAX_LANE_REQUEST_BYTES);
    let cfg = LaneConfig::default();
    assert!(req.encoded_len() <= cfg.max_entry as usize);
    check_lane_config(&cfg).unwrap();
    let tmp = TempLane::new();
    assert!(tmp.lane().push(&req.encode_to_vec()).is_ok());
}

/// A pool given a lane too small for a valid request does not start its slots.
#[test]
fn a_lane_too_small_for_a_valid_request_is_refused_at_start() {
    let small = LaneConfig {
        capacity: 1 << 20,
        max_entry: 64 * 1024,
    };
    small.validate().unwrap();
    assert!(check_lane_config(&small).is_err());
    let tmp = TempLane::new();
    let spec = Arc::new(WorkerSpec {
        program: tmp.dir.join("no-such-worker"),
        args: Vec::new(),
        lane: small,
        model: "synthetic".into(),
    });
    let audit = Audit::start(&tmp.dir).unwrap();
    let refused = spawn_slots(spec, Slots::new(1, 2), Arc::new(Speed::default()), audit);
    assert!(refused.is_err());
}

mod batch;
