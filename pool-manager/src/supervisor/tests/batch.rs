//! Several jobs at once on one real (synthetic) worker process: a group of two slots sharing
//! it, its cancels, its death and its warm-up at full batch.

use super::*;

/// Every event of one session, in the order the slot threads sent them.
struct Stream {
    rx: UnboundedReceiver<(u64, Event)>,
    seen: Vec<(u64, Event)>,
}

impl Stream {
    /// Reads events until `done` holds for what was seen (bounded, so a broken build fails
    /// instead of hanging).
    #[track_caller]
    fn until(&mut self, what: &str, done: impl Fn(&[(u64, Event)]) -> bool) {
        let give_up = Instant::now() + Duration::from_secs(60);
        while !done(&self.seen) {
            match self.rx.try_recv() {
                Ok(e) => self.seen.push(e),
                Err(_) if Instant::now() > give_up => {
                    panic!("gave up waiting for {what}: {:?}", self.seen)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Position in the stream of the first event of `handle` matching `pred`.
    #[track_caller]
    fn position(&self, handle: u64, pred: impl Fn(&Event) -> bool) -> usize {
        self.seen
            .iter()
            .position(|(h, e)| *h == handle && pred(e))
            .unwrap_or_else(|| panic!("no such event of job {handle}: {:?}", self.seen))
    }

    fn terminal(&self, handle: u64) -> Option<&Event> {
        self.seen
            .iter()
            .find(|(h, e)| *h == handle && e.is_terminal())
            .map(|(_, e)| e)
    }

    fn tokens(&self, handle: u64) -> Vec<u32> {
        self.seen
            .iter()
            .filter_map(|(h, e)| match e {
                Event::Token { index, .. } if *h == handle => Some(*index),
                _ => None,
            })
            .collect()
    }
}

fn ended(handles: &'static [u64]) -> impl Fn(&[(u64, Event)]) -> bool {
    move |seen| {
        handles
            .iter()
            .all(|h| seen.iter().any(|(x, e)| x == h && e.is_terminal()))
    }
}

fn streaming(handles: &'static [u64]) -> impl Fn(&[(u64, Event)]) -> bool {
    move |seen| {
        handles.iter().all(|h| {
            seen.iter()
                .any(|(x, e)| x == h && matches!(e, Event::Token { .. }))
        })
    }
}

/// A pool of one group of two slots sharing one synthetic worker (`--batch 2`), measured.
struct Batched {
    slots: Arc<Slots>,
    speed: Arc<Speed>,
    sup: Option<Supervisor>,
    _tmp: TempLane,
}

impl Batched {
    fn start() -> Batched {
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
            program: worker_bin(),
            args: args.iter().map(|s| s.to_string()).collect(),
            lane: LaneConfig::default(),
            model: "synthetic".into(),
        });
        let slots = Slots::batched(1, 2, 2);
        assert_eq!((slots.count(), slots.groups()), (2, 1));
        let speed = Arc::new(Speed::default());
        let audit = Audit::start(&tmp.dir).unwrap();
        let sup = spawn_slots(spec, Arc::clone(&slots), Arc::clone(&speed), audit).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(speed.wait_for_figures(Duration::from_secs(60)))
            .expect("warm-up figures");
        Batched {
            slots,
            speed,
            sup: Some(sup),
            _tmp: tmp,
        }
    }

    /// The group's worker for the synthetic model: (pid, generation).
    fn worker(&self) -> (u32, u64) {
        let map = self.slots.workers(0);
        assert_eq!(map.len(), 1, "one worker per model per group: {map:?}");
        let w = map.get("synthetic").expect("the synthetic model's worker");
        (w.pid(), w.generation)
    }
}

impl Drop for Batched {
    fn drop(&mut self) {
        if let Some(sup) = self.sup.take() {
            sup.shutdown();
        }
    }
}

fn session() -> (Sink, Stream) {
    let (sink, rx) = mpsc::unbounded_channel();
    let stream = Stream {
        rx,
        seen: Vec::new(),
    };
    (sink, stream)
}

fn long(handle: u64, tokens: u32, sink: &Sink) -> QueuedJob {
    QueuedJob {
        max_tokens: tokens,
        ..job(1, handle, sink)
    }
}

#[test]
fn two_slots_of_a_group_run_their_jobs_at_once_on_one_worker() {
    let pool = Batched::start();
    let (pid, generation) = pool.worker();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    assert!(
        args.windows(2).any(|w| w == [&b"--batch"[..], b"2"]),
        "the worker is told to run two jobs at once"
    );
    let (sink, mut events) = session();
    pool.slots.enqueue(0, long(1, 20, &sink)).unwrap();
    pool.slots.enqueue(1, long(2, 20, &sink)).unwrap();
    events.until("both jobs to end", ended(&[1, 2]));
    for (handle, slot) in [(1, 0), (2, 1)] {
        match &events.seen[events.position(handle, |e| matches!(e, Event::Started { .. }))].1 {
            Event::Started {
                slot: s,
                generation: g,
                ..
            } => assert_eq!((*s, *g), (slot, generation), "job {handle}"),
            _ => unreachable!(),
        }
        assert_eq!(events.tokens(handle), (0..20).collect::<Vec<_>>());
        assert!(
            matches!(
                events.terminal(handle),
                Some(Event::Finished { tokens: 20, .. })
            ),
            "{:?}",
            events.terminal(handle)
        );
    }
    // Both streamed together: each job's first token came before the other job ended.
    let first = |h| events.position(h, |e| matches!(e, Event::Token { .. }));
    let last = |h| events.position(h, Event::is_terminal);
    assert!(
        first(1) < last(2) && first(2) < last(1),
        "{:?}",
        events.seen
    );
    assert_eq!(pool.worker(), (pid, generation), "still the same worker");
}

#[test]
fn cancelling_one_of_two_jobs_on_a_worker_leaves_the_other_whole() {
    let pool = Batched::start();
    let (_, generation) = pool.worker();
    let (sink, mut events) = session();
    pool.slots.enqueue(0, long(1, 1000, &sink)).unwrap();
    pool.slots.enqueue(1, long(2, 50, &sink)).unwrap();
    events.until("both jobs to stream", streaming(&[1, 2]));
    pool.slots.cancel(1, 1);
    events.until("both jobs to end", ended(&[1, 2]));
    match events.terminal(1) {
        Some(Event::Failed {
            error: Error::Cancelled,
            tokens,
        }) => assert!((1..1000).contains(tokens), "{tokens}"),
        other => panic!("expected CANCELLED, got {other:?}"),
    }
    assert!(
        matches!(events.terminal(2), Some(Event::Finished { tokens: 50, .. })),
        "{:?}",
        events.terminal(2)
    );
    assert_eq!(events.tokens(2), (0..50).collect::<Vec<_>>());
    // The other job was still running when the cancelled one ended.
    assert!(
        events.position(1, Event::is_terminal) < events.position(2, Event::is_terminal),
        "{:?}",
        events.seen
    );
    assert_eq!(
        pool.worker().1,
        generation,
        "a cancel does not cost the worker"
    );
    assert_eq!(pool.slots.idle(), 2);
}

#[test]
fn a_killed_worker_fails_every_job_on_it_and_a_new_generation_serves_the_next() {
    let pool = Batched::start();
    let (pid, generation) = pool.worker();
    let (sink, mut events) = session();
    pool.slots.enqueue(0, long(1, 1000, &sink)).unwrap();
    pool.slots.enqueue(1, long(2, 1000, &sink)).unwrap();
    events.until("both jobs to stream", streaming(&[1, 2]));
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    events.until("both jobs to end", ended(&[1, 2]));
    for handle in [1, 2] {
        assert!(
            matches!(
                events.terminal(handle),
                Some(Event::Failed {
                    error: Error::WorkerLost(_),
                    ..
                })
            ),
            "job {handle}: {:?}",
            events.terminal(handle)
        );
    }
    pool.slots.enqueue(0, long(3, 3, &sink)).unwrap();
    events.until("the next job to end", ended(&[3]));
    let started = events.position(3, |e| matches!(e, Event::Started { .. }));
    match &events.seen[started].1 {
        Event::Started { generation: g, .. } => assert!(*g > generation, "{g} after {generation}"),
        _ => unreachable!(),
    }
    assert!(
        matches!(events.terminal(3), Some(Event::Finished { tokens: 3, .. })),
        "{:?}",
        events.terminal(3)
    );
    assert_ne!(pool.worker().0, pid, "a new process");
}

#[test]
fn the_warm_up_at_batch_two_publishes_figures() {
    let pool = Batched::start();
    let f = pool.speed.figures().expect("published");
    // 100 tokens/s: every later token takes time, and so does the first.
    assert!(f.first_token_us > 0 && f.per_token_us > 0, "{f:?}");
    // One warm-up per slot of the group went to its one worker, and gave it back.
    let w = Arc::clone(&pool.slots.workers(0)["synthetic"]);
    assert_eq!(w.requests().last_seq(), 2, "two warm-up requests");
    assert!(!w.is_busy());
    assert_eq!(pool.slots.idle(), 2);
}
