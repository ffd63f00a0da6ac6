//! Behavioural tests against a model: proptest interleavings, two threads, two processes.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use skep_lane::layout::entry_size;
use skep_lane::{Lane, LaneConfig, LaneError};

/// Per-test scratch directory, removed on drop (no tempfile crate in the workspace).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "skep-lane-model-{}-{}-{}",
            std::process::id(),
            tag,
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CAP: u32 = 4096;
const MAX: u32 = 1024;

/// Deterministic payload for entry `i` of length `len`, so order and content are checkable.
fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i.wrapping_mul(31).wrapping_add(j as u64 * 7)) as u8)
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Push(usize),
    Pop,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..=MAX as usize).prop_map(Op::Push),
        1 => (MAX as usize + 1..=MAX as usize + 64).prop_map(Op::Push),
        1 => Just(Op::Push(0)),
        4 => Just(Op::Pop),
    ]
}

/// Byte-exact model of the ring: predicts `Full` exactly, including pad entries.
struct Model {
    head: u64,
    tail: u64,
    queue: VecDeque<(Vec<u8>, u64)>,
}

impl Model {
    fn push_total(&self, len: usize) -> Option<u64> {
        let need = entry_size(len as u32);
        let rem = u64::from(CAP) - self.head % u64::from(CAP);
        let total = if need <= rem { need } else { rem + need };
        (total <= u64::from(CAP) - (self.head - self.tail)).then_some(total)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random single-thread interleavings never lose, duplicate or reorder an entry, and
    /// `Full`/`TooLarge` are reported exactly when the model says so.
    #[test]
    fn interleavings_match_model(ops in prop::collection::vec(op(), 1..400)) {
        let s = Scratch::new("prop");
        let cfg = LaneConfig { capacity: CAP, max_entry: MAX };
        let tx = Lane::create(&s.path("lane"), cfg, 9).unwrap();
        let rx = Lane::open(&s.path("lane"), 9).unwrap();
        let mut m = Model { head: 0, tail: 0, queue: VecDeque::new() };
        let mut out = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Push(len) => {
                    let p = payload(i as u64, len);
                    let r = tx.push(&p);
                    if len > MAX as usize {
                        prop_assert!(matches!(r, Err(LaneError::TooLarge { .. })), "{r:?}");
                        continue;
                    }
                    match m.push_total(len) {
                        Some(total) => {
                            prop_assert!(r.is_ok(), "push {len} failed: {r:?}");
                            m.head += total;
                            m.queue.push_back((p, total));
                        }
                        None => prop_assert!(matches!(r, Err(LaneError::Full)), "{r:?}"),
                    }
                }
                Op::Pop => {
                    let got = rx.try_pop(&mut out).unwrap();
                    match m.queue.pop_front() {
                        Some((p, total)) => {
                            prop_assert!(got);
                            prop_assert_eq!(&out, &p);
                            m.tail += total;
                        }
                        None => {
                            prop_assert!(!got);
                            prop_assert!(out.is_empty());
                        }
                    }
                }
            }
        }
        while let Some((p, _)) = m.queue.pop_front() {
            prop_assert!(rx.try_pop(&mut out).unwrap());
            prop_assert_eq!(&out, &p);
        }
        prop_assert!(!rx.try_pop(&mut out).unwrap());
        prop_assert!(!tx.is_dead());
    }
}

/// A producer thread and a consumer thread on separate `Lane` handles move many entries of
/// varying size through a small ring; everything arrives once, in order, intact.
#[test]
fn two_threads_preserve_order_and_content() {
    let s = Scratch::new("threads");
    let cfg = LaneConfig {
        capacity: CAP,
        max_entry: MAX,
    };
    let tx = Lane::create(&s.path("lane"), cfg, 1).unwrap();
    let rx = Lane::open(&s.path("lane"), 1).unwrap();
    const N: u64 = 30_000;
    let size = |i: u64| ((i * 131) % (u64::from(MAX) + 1)) as usize;
    let producer = std::thread::spawn(move || {
        for i in 0..N {
            tx.push_timeout(&payload(i, size(i)), Duration::from_secs(20))
                .unwrap();
        }
    });
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..N {
        while !rx
            .pop_timeout(&mut out, Duration::from_millis(100))
            .unwrap()
        {
            assert!(Instant::now() < deadline, "stalled at entry {i}");
        }
        assert_eq!(out.len(), size(i), "entry {i}");
        assert_eq!(out, payload(i, size(i)), "entry {i}");
    }
    producer.join().unwrap();
    assert!(!rx.try_pop(&mut out).unwrap());
}

/// Same-`Lane` sharing: one `Arc<Lane>` used by both threads (push and pop are internally
/// serialised per role, so this must also work).
#[test]
fn shared_handle_across_threads() {
    let s = Scratch::new("shared");
    let lane = Arc::new(Lane::create(&s.path("lane"), LaneConfig::default(), 1).unwrap());
    let tx = Arc::clone(&lane);
    const N: u64 = 10_000;
    let producer = std::thread::spawn(move || {
        for i in 0..N {
            tx.push_timeout(&i.to_le_bytes(), Duration::from_secs(20))
                .unwrap();
        }
    });
    let mut out = Vec::new();
    for i in 0..N {
        assert!(lane.pop_timeout(&mut out, Duration::from_secs(20)).unwrap());
        assert_eq!(out, i.to_le_bytes());
    }
    producer.join().unwrap();
}

const CHILD_ENV: &str = "SKEP_LANE_ECHO_CHILD_DIR";
const ROUNDS: u64 = 2_000;
/// The child sleeps far longer than the parent waits for an echo: a wake-up lost on either
/// side leaves the parent's wait to run out, and the test fails instead of merely slowing.
const CHILD_WAIT: Duration = Duration::from_secs(120);
const PARENT_WAIT: Duration = Duration::from_secs(30);

/// Child half of `cross_process_ping_pong`: a no-op unless the parent set `CHILD_ENV`.
/// Echoes every request back on the response lane (open side = the worker's role).
#[test]
fn echo_child_process() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let req = Lane::open(&dir.join("req"), 77).unwrap();
    let resp = Lane::open(&dir.join("resp"), 77).unwrap();
    let mut buf = Vec::new();
    for _ in 0..ROUNDS {
        assert!(req.pop_timeout(&mut buf, CHILD_WAIT).unwrap());
        resp.beat();
        resp.push_timeout(&buf, Duration::from_secs(20)).unwrap();
    }
}

/// Two processes ping-pong through a request and a response lane, exercising the shared
/// (non-private) futex wake-up across address spaces.
#[test]
fn cross_process_ping_pong() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let s = Scratch::new("xproc");
    let cfg = LaneConfig::default();
    let req = Lane::create(&s.path("req"), cfg, 77).unwrap();
    let resp = Lane::create(&s.path("resp"), cfg, 77).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "echo_child_process", "--test-threads=1"])
        .env(CHILD_ENV, &s.0)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = Vec::new();
    for i in 0..ROUNDS {
        let p = payload(i, (i % 300) as usize);
        req.push_timeout(&p, Duration::from_secs(20)).unwrap();
        assert!(
            resp.pop_timeout(&mut buf, PARENT_WAIT).unwrap(),
            "no echo for round {i} (a lost wake-up?)"
        );
        assert_eq!(buf, p);
    }
    assert!(resp.heartbeat_age() < Duration::from_secs(20));
    assert!(child.wait().unwrap().success());
}
