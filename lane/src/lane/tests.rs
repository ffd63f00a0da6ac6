//! Unit tests for `Lane`: header validation, full/empty, sizes, wrap-around, generations.

use super::*;
use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

/// Per-test scratch directory, removed on drop (no tempfile crate in the workspace).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "skep-lane-unit-{}-{}-{}",
            std::process::id(),
            tag,
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self) -> PathBuf {
        self.0.join("lane")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const SMALL: LaneConfig = LaneConfig {
    capacity: 4096,
    max_entry: 1024,
};

fn poke(path: &Path, off: u64, bytes: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(bytes).unwrap();
}

fn pop(lane: &Lane) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    lane.try_pop(&mut out).unwrap().then_some(out)
}

#[test]
fn lane_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Lane>();
}

#[test]
fn default_config_is_valid() {
    let cfg = LaneConfig::default();
    assert_eq!(cfg.capacity, 1 << 20);
    assert_eq!(cfg.max_entry, 64 * 1024 + 4096);
    cfg.validate().unwrap();
}

#[test]
fn create_rejects_bad_config() {
    let s = Scratch::new("badcfg");
    for capacity in [0, 2048, 4095, 5000, (1 << 30) + 1, u32::MAX] {
        let cfg = LaneConfig {
            capacity,
            max_entry: 16,
        };
        assert!(matches!(
            Lane::create(&s.path(), cfg, 1),
            Err(LaneError::BadCapacity { found }) if found == capacity
        ));
    }
    for max_entry in [0, 1025, u32::MAX] {
        let cfg = LaneConfig {
            capacity: 4096,
            max_entry,
        };
        assert!(matches!(
            Lane::create(&s.path(), cfg, 1),
            Err(LaneError::BadMaxEntry { found }) if found == max_entry
        ));
    }
    assert!(!s.path().exists());
}

#[test]
fn create_open_round_trip() {
    let s = Scratch::new("roundtrip");
    let a = Lane::create(&s.path(), SMALL, 42).unwrap();
    let b = Lane::open(&s.path(), 42).unwrap();
    assert_eq!(b.generation(), 42);
    assert_eq!(b.max_entry(), 1024);
    assert_eq!(b.capacity(), 4096);
    assert_eq!(b.owner_pid(), std::process::id());
    let meta = fs::metadata(s.path()).unwrap();
    assert_eq!(meta.len(), u64::from(HEADER_LEN) + 4096);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    a.push(b"hello").unwrap();
    a.push(b"").unwrap();
    assert_eq!(pop(&b).as_deref(), Some(&b"hello"[..]));
    assert_eq!(pop(&b).as_deref(), Some(&b""[..]));
    assert_eq!(pop(&b), None);

    // And the other direction over the same file.
    b.push(b"back").unwrap();
    assert_eq!(pop(&a).as_deref(), Some(&b"back"[..]));
    // No temp file left behind.
    assert_eq!(fs::read_dir(&s.0).unwrap().count(), 1);
}

#[test]
fn create_replaces_existing_file_and_tightens_mode() {
    let s = Scratch::new("replace");
    fs::write(s.path(), b"junk").unwrap();
    fs::set_permissions(s.path(), Permissions::from_mode(0o666)).unwrap();
    let _a = Lane::create(&s.path(), SMALL, 1).unwrap();
    let meta = fs::metadata(s.path()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    Lane::open(&s.path(), 1).unwrap();
}

#[test]
fn open_missing_file_is_io_error() {
    let s = Scratch::new("missing");
    assert!(matches!(Lane::open(&s.path(), 1), Err(LaneError::Io(_))));
}

#[test]
fn open_rejects_bad_magic() {
    let s = Scratch::new("magic");
    Lane::create(&s.path(), SMALL, 1).unwrap();
    poke(&s.path(), OFF_MAGIC as u64, b"SKEPLANX");
    assert!(matches!(Lane::open(&s.path(), 1), Err(LaneError::BadMagic)));
}

#[test]
fn open_rejects_bad_version() {
    let s = Scratch::new("version");
    Lane::create(&s.path(), SMALL, 1).unwrap();
    poke(&s.path(), OFF_VERSION as u64, &2u32.to_le_bytes());
    assert!(matches!(
        Lane::open(&s.path(), 1),
        Err(LaneError::BadVersion { found: 2 })
    ));
}

#[test]
fn open_rejects_bad_header_len() {
    let s = Scratch::new("hdrlen");
    Lane::create(&s.path(), SMALL, 1).unwrap();
    poke(&s.path(), OFF_HEADER_LEN as u64, &64u32.to_le_bytes());
    assert!(matches!(
        Lane::open(&s.path(), 1),
        Err(LaneError::BadHeaderLen { found: 64 })
    ));
}

#[test]
fn open_rejects_bad_capacity() {
    let s = Scratch::new("cap");
    for bad in [0u32, 4095, 6000, 2048, 1 << 31] {
        Lane::create(&s.path(), SMALL, 1).unwrap();
        poke(&s.path(), OFF_CAPACITY as u64, &bad.to_le_bytes());
        assert!(
            matches!(Lane::open(&s.path(), 1), Err(LaneError::BadCapacity { found }) if found == bad),
            "capacity {bad}"
        );
    }
}

#[test]
fn open_rejects_bad_max_entry() {
    let s = Scratch::new("maxentry");
    for bad in [0u32, 1025, u32::MAX] {
        Lane::create(&s.path(), SMALL, 1).unwrap();
        poke(&s.path(), OFF_MAX_ENTRY as u64, &bad.to_le_bytes());
        assert!(
            matches!(Lane::open(&s.path(), 1), Err(LaneError::BadMaxEntry { found }) if found == bad),
            "max_entry {bad}"
        );
    }
}

#[test]
fn open_rejects_wrong_file_size() {
    let s = Scratch::new("size");
    Lane::create(&s.path(), SMALL, 1).unwrap();
    let want = u64::from(HEADER_LEN) + 4096;
    // Capacity field claims more than the file holds.
    poke(&s.path(), OFF_CAPACITY as u64, &8192u32.to_le_bytes());
    assert!(matches!(
        Lane::open(&s.path(), 1),
        Err(LaneError::FileSize { expected, found }) if expected == u64::from(HEADER_LEN) + 8192 && found == want
    ));
    // File grown / truncated behind the header's back.
    Lane::create(&s.path(), SMALL, 1).unwrap();
    OpenOptions::new()
        .write(true)
        .open(s.path())
        .unwrap()
        .set_len(want + 1)
        .unwrap();
    assert!(matches!(
        Lane::open(&s.path(), 1),
        Err(LaneError::FileSize { expected, found }) if expected == want && found == want + 1
    ));
    // Too short for even a header.
    fs::write(s.path(), b"SKEPLANE").unwrap();
    assert!(matches!(
        Lane::open(&s.path(), 1),
        Err(LaneError::FileSize { expected, found: 8 }) if expected == u64::from(HEADER_LEN)
    ));
    fs::write(s.path(), b"").unwrap();
    assert!(matches!(
        Lane::open(&s.path(), 1),
        Err(LaneError::FileSize { found: 0, .. })
    ));
}

#[test]
fn open_rejects_generation_mismatch() {
    let s = Scratch::new("gen");
    Lane::create(&s.path(), SMALL, 7).unwrap();
    assert!(matches!(
        Lane::open(&s.path(), 8),
        Err(LaneError::GenerationMismatch {
            expected: 8,
            found: 7
        })
    ));
}

#[test]
fn open_rejects_non_regular_file() {
    let s = Scratch::new("dir");
    fs::create_dir(s.path()).unwrap();
    assert!(matches!(Lane::open(&s.path(), 1), Err(LaneError::Io(_))));
}

#[test]
fn too_large_is_rejected_without_killing_the_lane() {
    let s = Scratch::new("toolarge");
    let lane = Lane::create(&s.path(), SMALL, 1).unwrap();
    assert!(matches!(
        lane.push(&[0u8; 1025]),
        Err(LaneError::TooLarge {
            len: 1025,
            max: 1024
        })
    ));
    lane.push(&[7u8; 1024]).unwrap();
    assert_eq!(pop(&lane).unwrap(), vec![7u8; 1024]);
    assert!(!lane.is_dead());
}

#[test]
fn full_then_drain() {
    let s = Scratch::new("full");
    let lane = Lane::create(&s.path(), SMALL, 1).unwrap();
    // 48-byte payload -> 64-byte entry -> exactly 64 fit in 4096.
    let mut n = 0u32;
    loop {
        match lane.push(&[n as u8; 48]) {
            Ok(()) => n += 1,
            Err(LaneError::Full) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(n, 64);
    assert!(matches!(lane.push(b""), Err(LaneError::Full)));
    assert!(matches!(
        lane.push_timeout(b"x", Duration::from_millis(5)),
        Err(LaneError::Full)
    ));
    for i in 0..n {
        assert_eq!(pop(&lane).unwrap(), vec![i as u8; 48]);
    }
    assert_eq!(pop(&lane), None);
    lane.push(b"again").unwrap();
    assert_eq!(pop(&lane).as_deref(), Some(&b"again"[..]));
}

#[test]
fn empty_lane_pops_nothing_and_clears_out() {
    let s = Scratch::new("empty");
    let lane = Lane::create(&s.path(), SMALL, 1).unwrap();
    let mut out = vec![1, 2, 3];
    assert!(!lane.try_pop(&mut out).unwrap());
    assert!(out.is_empty());
    let t = Instant::now();
    assert!(
        !lane
            .pop_timeout(&mut out, Duration::from_millis(20))
            .unwrap()
    );
    assert!(t.elapsed() >= Duration::from_millis(20));
    assert!(!lane.pop_timeout(&mut out, Duration::ZERO).unwrap());
}

#[test]
fn wrap_around_with_many_sizes() {
    let s = Scratch::new("wrap");
    let lane = Lane::create(&s.path(), SMALL, 3).unwrap();
    let reader = Lane::open(&s.path(), 3).unwrap();
    let mut expected = std::collections::VecDeque::new();
    let mut out = Vec::new();
    let mut pushed_bytes = 0u64;
    let mut k = 0usize;
    // Sizes cycle through every residue mod 16 and the extremes; the ring wraps many times.
    for round in 0..20_000usize {
        let len = match round % 7 {
            0 => 0,
            1 => 1024,
            _ => (round * 37) % 1025,
        };
        let payload: Vec<u8> = (0..len).map(|i| (i + k) as u8).collect();
        match lane.push(&payload) {
            Ok(()) => {
                expected.push_back(payload);
                pushed_bytes += len as u64;
                k += 1;
            }
            Err(LaneError::Full) => {
                // Drain a few to make room.
                for _ in 0..3 {
                    if reader.try_pop(&mut out).unwrap() {
                        assert_eq!(Some(&out), expected.pop_front().as_ref());
                    }
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    while reader.try_pop(&mut out).unwrap() {
        assert_eq!(Some(&out), expected.pop_front().as_ref());
    }
    assert!(expected.is_empty());
    assert!(
        pushed_bytes > 20 * 4096,
        "ring should have wrapped many times"
    );
}

#[test]
fn max_entry_fits_at_every_offset() {
    let s = Scratch::new("maxoff");
    let lane = Lane::create(&s.path(), SMALL, 1).unwrap();
    // Shift the ring position by 16 bytes each round, then push/pop a max-size entry.
    for shift in 0..(4096 / 16) {
        let _ = shift;
        lane.push(b"").unwrap();
        assert_eq!(pop(&lane).unwrap(), b"");
        let big = vec![0xAB; 1024];
        lane.push(&big).unwrap();
        assert_eq!(pop(&lane).unwrap(), big);
    }
}

#[test]
fn entry_with_other_generation_is_corrupt() {
    let s = Scratch::new("stale");
    let lane = Lane::create(&s.path(), SMALL, 5).unwrap();
    lane.push(b"abc").unwrap();
    // Entry header at ring offset 0: generation at +8.
    poke(
        &s.path(),
        u64::from(HEADER_LEN) + ENTRY_OFF_GENERATION,
        &4u64.to_le_bytes(),
    );
    let reader = Lane::open(&s.path(), 5).unwrap();
    let mut out = Vec::new();
    assert!(matches!(
        reader.try_pop(&mut out),
        Err(LaneError::Corrupt("stale generation"))
    ));
    assert!(reader.is_dead());
    assert!(lane.is_dead(), "corruption is published to the peer");
    assert!(matches!(reader.try_pop(&mut out), Err(LaneError::Dead)));
    assert!(matches!(lane.push(b"x"), Err(LaneError::Dead)));
}

#[test]
fn oversized_entry_len_is_corrupt() {
    let s = Scratch::new("badlen");
    let lane = Lane::create(&s.path(), SMALL, 5).unwrap();
    lane.push(b"abc").unwrap();
    poke(&s.path(), u64::from(HEADER_LEN), &2000u32.to_le_bytes());
    let mut out = Vec::new();
    assert!(matches!(lane.try_pop(&mut out), Err(LaneError::Corrupt(_))));
}

#[test]
fn entry_len_past_head_is_corrupt() {
    let s = Scratch::new("pasthead");
    let lane = Lane::create(&s.path(), SMALL, 5).unwrap();
    lane.push(b"abc").unwrap();
    poke(&s.path(), u64::from(HEADER_LEN), &100u32.to_le_bytes());
    let mut out = Vec::new();
    assert!(matches!(
        lane.try_pop(&mut out),
        Err(LaneError::Corrupt("entry extends past head"))
    ));
}

#[test]
fn head_out_of_range_is_corrupt() {
    let s = Scratch::new("head");
    let lane = Lane::create(&s.path(), SMALL, 5).unwrap();
    poke(&s.path(), OFF_HEAD as u64, &(8192u64).to_le_bytes());
    let mut out = Vec::new();
    assert!(matches!(
        lane.try_pop(&mut out),
        Err(LaneError::Corrupt("head index out of range"))
    ));
}

#[test]
fn tail_near_u64_max_does_not_overflow() {
    let s = Scratch::new("tailmax");
    let lane = Lane::create(&s.path(), SMALL, 5).unwrap();
    let t = u64::MAX - 15;
    poke(&s.path(), OFF_TAIL as u64, &t.to_le_bytes());
    poke(
        &s.path(),
        OFF_HEAD as u64,
        &t.wrapping_add(64).to_le_bytes(),
    );
    let mut out = Vec::new();
    // Garbage entry at the masked offset: some Corrupt error, no panic.
    assert!(matches!(lane.try_pop(&mut out), Err(LaneError::Corrupt(_))));
}

#[test]
fn indices_wrapping_past_u64_max_still_work() {
    let s = Scratch::new("u64wrap");
    // Start both indices just below 2^64 so the producer and consumer cross the wrap.
    let lane = Lane::create(&s.path(), SMALL, 5).unwrap();
    let start = u64::MAX - 4095;
    poke(&s.path(), OFF_HEAD as u64, &start.to_le_bytes());
    poke(&s.path(), OFF_TAIL as u64, &start.to_le_bytes());
    for i in 0..500u32 {
        let p = vec![i as u8; (i as usize * 13) % 1025];
        lane.push(&p).unwrap();
        assert_eq!(pop(&lane).unwrap(), p);
    }
}

#[test]
fn peer_moving_our_index_is_detected() {
    let s = Scratch::new("ourindex");
    let lane = Lane::create(&s.path(), SMALL, 5).unwrap();
    lane.push(b"a").unwrap();
    poke(&s.path(), OFF_HEAD as u64, &0u64.to_le_bytes());
    assert!(matches!(
        lane.push(b"b"),
        Err(LaneError::Corrupt("head index changed by peer"))
    ));
}

#[test]
fn mark_dead_is_sticky_and_shared() {
    let s = Scratch::new("dead");
    let a = Lane::create(&s.path(), SMALL, 1).unwrap();
    let b = Lane::open(&s.path(), 1).unwrap();
    assert!(!a.is_dead() && !b.is_dead());
    b.mark_dead();
    assert!(a.is_dead());
    assert!(matches!(a.push(b"x"), Err(LaneError::Dead)));
    let mut out = Vec::new();
    assert!(matches!(b.try_pop(&mut out), Err(LaneError::Dead)));
    assert!(matches!(
        b.pop_timeout(&mut out, Duration::from_millis(1)),
        Err(LaneError::Dead)
    ));
    // A peer clearing the shared flag cannot revive a lane we have seen dead.
    poke(&s.path(), OFF_DEAD as u64, &0u32.to_le_bytes());
    assert!(a.is_dead() && b.is_dead());
}

#[test]
fn heartbeat_and_cancel() {
    let s = Scratch::new("beat");
    let a = Lane::create(&s.path(), SMALL, 1).unwrap();
    let b = Lane::open(&s.path(), 1).unwrap();
    b.beat();
    assert!(a.heartbeat_age() < Duration::from_secs(5));
    poke(&s.path(), OFF_HEARTBEAT as u64, &u64::MAX.to_le_bytes());
    assert_eq!(a.heartbeat_age(), Duration::ZERO);
    poke(&s.path(), OFF_HEARTBEAT as u64, &0u64.to_le_bytes());
    assert!(a.heartbeat_age() > Duration::ZERO);
    assert_eq!(b.cancel_requested(), 0);
    a.request_cancel(99);
    assert_eq!(b.cancel_requested(), 99);
    assert!(monotonic_ns() > 0);
}

/// How long a consumer in the wake-up tests may sleep: far longer than the tests wait for it
/// (`WAKE_BOUND`), so a consumer that returns at all within the bound was woken, and a lost
/// wake-up fails the test instead of being hidden by a timeout.
const SLEEP_FOR: Duration = Duration::from_secs(120);
/// How long a wake-up test waits for the consumer before failing. Not a speed assertion: a
/// woken consumer returns in microseconds, and a lost wake-up never returns before `SLEEP_FOR`.
const WAKE_BOUND: Duration = Duration::from_secs(30);

/// Starts `f` on a consumer thread and returns the channel its result arrives on.
fn consumer<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> std::sync::mpsc::Receiver<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// Waits (bounded) until a consumer of `lane` has announced that it is about to sleep on the
/// futex: from then on only a wake-up, not its polling, can bring it back before `SLEEP_FOR`.
#[track_caller]
fn wait_for_sleeper(lane: &Lane) {
    let give_up = Instant::now() + WAKE_BOUND;
    while lane.h32(H32::Waiters).load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < give_up, "the consumer never went to sleep");
        std::thread::yield_now();
    }
}

#[test]
fn pop_timeout_is_woken_by_push_from_other_thread() {
    let s = Scratch::new("wake");
    let tx = Lane::create(&s.path(), SMALL, 1).unwrap();
    let rx = Arc::new(Lane::open(&s.path(), 1).unwrap());
    let rx2 = Arc::clone(&rx);
    let done = consumer(move || {
        let mut out = Vec::new();
        let got = rx2.pop_timeout(&mut out, SLEEP_FOR).unwrap();
        (got, out)
    });
    wait_for_sleeper(&tx);
    let before = tx.h32(H32::Futex).load(Ordering::SeqCst);
    tx.push(b"ping").unwrap();
    // The push saw the sleeper and bumped the futex word: that is the wake-up.
    assert_ne!(tx.h32(H32::Futex).load(Ordering::SeqCst), before);
    let (got, out) = done
        .recv_timeout(WAKE_BOUND)
        .expect("the push did not wake the sleeping consumer (lost wake-up)");
    assert!(got);
    assert_eq!(out, b"ping");
    assert_eq!(
        tx.h32(H32::Waiters).load(Ordering::SeqCst),
        0,
        "a woken consumer clears its waiter flag"
    );
}

#[test]
fn push_without_a_sleeper_leaves_the_futex_word_alone() {
    let s = Scratch::new("nowake");
    let lane = Lane::create(&s.path(), SMALL, 1).unwrap();
    let before = lane.h32(H32::Futex).load(Ordering::SeqCst);
    lane.push(b"x").unwrap();
    assert_eq!(lane.h32(H32::Futex).load(Ordering::SeqCst), before);
}

#[test]
fn wake_and_mark_dead_interrupt_a_sleeping_consumer() {
    let s = Scratch::new("shutdown");
    let tx = Lane::create(&s.path(), SMALL, 1).unwrap();
    let rx = Arc::new(Lane::open(&s.path(), 1).unwrap());
    let rx2 = Arc::clone(&rx);
    let done = consumer(move || {
        let mut out = Vec::new();
        rx2.pop_timeout(&mut out, SLEEP_FOR)
            .map_err(|e| e.to_string())
    });
    wait_for_sleeper(&tx);
    // A spurious wake: the consumer re-checks, finds nothing and sleeps again.
    tx.wake();
    assert!(
        done.recv_timeout(Duration::from_millis(50)).is_err(),
        "a bare wake must not end the wait"
    );
    wait_for_sleeper(&tx);
    tx.mark_dead();
    let r = done
        .recv_timeout(WAKE_BOUND)
        .expect("mark_dead did not wake the sleeping consumer (lost wake-up)");
    assert!(r.unwrap_err().contains("dead"));
}

#[test]
fn error_messages_are_actionable() {
    let msgs = [
        LaneError::BadMagic.to_string(),
        LaneError::Full.to_string(),
        LaneError::Corrupt("x").to_string(),
        LaneError::TooLarge { len: 5, max: 4 }.to_string(),
    ];
    for m in msgs {
        assert!(m.len() > 20, "{m}");
    }
}
