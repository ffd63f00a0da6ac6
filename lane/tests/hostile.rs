//! Hostile-peer tests: scribbled or arbitrary lane files must never panic, hang or overrun.
//!
//! These are also the tests `scripts/lane-valgrind.sh` runs under valgrind (our stand-in for
//! miri/ASan), so each one is bounded by iterations and wall time, and `SKEP_LANE_FAST=1`
//! shrinks them further for that slower environment.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};
use proptest::prelude::*;
use skep_lane::layout::*;
use skep_lane::{Lane, LaneConfig, LaneError};

/// Per-test scratch directory, removed on drop (no tempfile crate in the workspace).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "skep-lane-hostile-{}-{}-{}",
            std::process::id(),
            tag,
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self) -> PathBuf {
        self.0.join("lane")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Under valgrind everything runs ~50x slower; scale work down there.
fn fast() -> bool {
    std::env::var_os("SKEP_LANE_FAST").is_some()
}

const CFG: LaneConfig = LaneConfig {
    capacity: 4096,
    max_entry: 1024,
};
const GEN: u64 = 0x5EED;

/// xorshift64*: a tiny deterministic RNG so failures reproduce from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The hostile peer's view of the file: a second, independent mapping.
struct Peer {
    map: MmapRaw,
}

impl Peer {
    fn open(path: &Path) -> Peer {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        Peer {
            map: MmapOptions::new().map_raw(&file).unwrap(),
        }
    }

    /// Writes `bytes` at `off`, clipped to the mapping.
    #[allow(unsafe_code)]
    fn write(&self, off: usize, bytes: &[u8]) {
        let len = self.map.len();
        for (i, b) in bytes.iter().enumerate() {
            let at = off + i;
            if at >= len {
                break;
            }
            // SAFETY: `at < len`, so the pointer is inside the live mapping. Volatile so the
            // store really happens byte by byte, like a foreign process would do it; racing
            // with the lane's own accesses is the point of the test.
            unsafe { self.map.as_mut_ptr().add(at).write_volatile(*b) };
        }
    }

    /// One random corruption, biased toward the fields a bug would hit: indices, entry
    /// headers, and "plausible" values that pass the cheap checks.
    fn scribble(&self, rng: &mut Rng) {
        let ring = HEADER_LEN as usize;
        let cap = CFG.capacity as u64;
        match rng.below(10) {
            0 => self.write(OFF_HEAD, &rng.next().to_le_bytes()),
            1 => self.write(OFF_TAIL, &rng.next().to_le_bytes()),
            2 => {
                // Head a plausible, aligned distance ahead of some value.
                let v = (rng.below(cap * 2) & !15).to_le_bytes();
                self.write(
                    if rng.below(2) == 0 {
                        OFF_HEAD
                    } else {
                        OFF_TAIL
                    },
                    &v,
                );
            }
            3 => {
                // Entry header at an aligned ring slot with a plausible or wild length.
                let slot = ring + (rng.below(cap / 16) * 16) as usize;
                let len = match rng.below(3) {
                    0 => rng.below(u64::from(CFG.max_entry) + 1) as u32,
                    1 => rng.next() as u32,
                    _ => (cap - (slot - ring) as u64).saturating_sub(16) as u32,
                };
                let kind = [KIND_DATA, KIND_PAD, rng.next() as u32][rng.below(3) as usize];
                let generation = if rng.below(4) == 0 { rng.next() } else { GEN };
                self.write(slot, &len.to_le_bytes());
                self.write(slot + 4, &kind.to_le_bytes());
                self.write(slot + 8, &generation.to_le_bytes());
            }
            4 => self.write(OFF_FUTEX, &rng.next().to_le_bytes()),
            5 => self.write(
                rng.below(HEADER_LEN as u64) as usize,
                &rng.next().to_le_bytes(),
            ),
            _ => {
                let n = 1 + rng.below(64) as usize;
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                self.write(rng.below(self.map.len() as u64) as usize, &bytes);
            }
        }
    }
}

/// Checks the contract of one consumer/producer result under attack.
fn check_pop(r: Result<bool, LaneError>, out: &[u8]) -> bool {
    match r {
        Ok(true) => {
            assert!(out.len() <= CFG.max_entry as usize);
            true
        }
        Ok(false) => {
            assert!(out.is_empty());
            true
        }
        Err(LaneError::Corrupt(_) | LaneError::Dead) => false,
        Err(e) => panic!("unexpected error under attack: {e}"),
    }
}

/// A scribbler thread corrupts header and ring through its own mapping while this thread
/// pushes and pops. Every call must return (Ok or Err) within its time bound; no panics.
#[test]
fn concurrent_scribbler_never_panics_or_hangs() {
    let (rounds, ops, budget) = if fast() {
        (20, 500, Duration::from_secs(20))
    } else {
        (60, 3_000, Duration::from_secs(20))
    };
    let started = Instant::now();
    let mut outcomes = [0usize; 3]; // [ok pops with data, ok empty, corrupt/dead]
    for round in 0..rounds {
        if started.elapsed() > budget {
            break;
        }
        let s = Scratch::new("scribble");
        let tx = Lane::create(&s.path(), CFG, GEN).unwrap();
        let rx = Lane::open(&s.path(), GEN).unwrap();
        let peer = Peer::open(&s.path());
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let scribbles = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let scribbles2 = Arc::clone(&scribbles);
        let seed = 0x9E37_79B9_7F4A_7C15 ^ round as u64;
        let scribbler = std::thread::spawn(move || {
            let mut rng = Rng(seed | 1);
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                peer.scribble(&mut rng);
                n += 1;
                scribbles2.store(n, Ordering::Relaxed);
                // Bursty: mostly let the lane make progress between corruptions.
                if n % 4 == 0 {
                    std::thread::sleep(Duration::from_micros(rng.below(200)));
                }
            }
        });
        let mut rng = Rng(seed.rotate_left(17) | 1);
        let mut out = Vec::new();
        // Under valgrind threads run one at a time: make sure the scribbler has really started
        // before the round, and keep yielding to it, or it may never get to attack.
        let wait = Instant::now();
        while scribbles.load(Ordering::Relaxed) == 0 && wait.elapsed() < Duration::from_secs(2) {
            std::thread::yield_now();
        }
        for i in 0..ops {
            if i % 8 == 0 {
                std::thread::yield_now();
            }
            let len = rng.below(u64::from(CFG.max_entry) + 1) as usize;
            let _ = tx.push(&vec![i as u8; len]);
            let t = Instant::now();
            let r = if i % 3 == 0 {
                rx.pop_timeout(&mut out, Duration::from_millis(2))
            } else {
                rx.try_pop(&mut out)
            };
            assert!(t.elapsed() < Duration::from_secs(5), "pop hung");
            let alive = check_pop(r, &out);
            outcomes[match (alive, out.is_empty()) {
                (true, false) => 0,
                (true, true) => 1,
                (false, _) => 2,
            }] += 1;
            // Cheap header ops must not panic on garbage either.
            let _ = rx.heartbeat_age();
            let _ = rx.cancel_requested();
            if !alive {
                assert!(rx.is_dead());
                assert!(matches!(rx.try_pop(&mut out), Err(LaneError::Dead)));
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        scribbler.join().unwrap();
    }
    eprintln!(
        "scribbler outcomes: data={} empty={} corrupt/dead={}",
        outcomes[0], outcomes[1], outcomes[2]
    );
    assert!(outcomes[2] > 0, "the scribbler never tripped a check");
}

/// Deterministic variant (no threads): push some entries, corrupt a few bytes, drain. The
/// drain must terminate: each successful pop advances the tail by at least 16 bytes and head
/// is at most `capacity` ahead, so more than capacity/16 + 2 successes would be a bug.
#[test]
fn sequential_corruption_drains_in_bounded_steps() {
    let seeds: u64 = if fast() { 1_000 } else { 2_000 };
    for seed in 1..=seeds {
        let s = Scratch::new("seq");
        let tx = Lane::create(&s.path(), CFG, GEN).unwrap();
        let rx = Lane::open(&s.path(), GEN).unwrap();
        let peer = Peer::open(&s.path());
        let mut rng = Rng(seed.wrapping_mul(0x1234_5678_9ABC_DEF1) | 1);
        // Move the ring position around so wraps and pads are in play.
        for _ in 0..rng.below(8) {
            let _ = tx.push(&vec![1; rng.below(1025) as usize]);
            let _ = rx.try_pop(&mut Vec::new());
        }
        for _ in 0..rng.below(10) {
            let _ = tx.push(&vec![2; rng.below(1025) as usize]);
        }
        for _ in 0..=rng.below(3) {
            peer.scribble(&mut rng);
        }
        let mut out = Vec::new();
        let mut steps = 0u64;
        loop {
            let r = rx.try_pop(&mut out);
            match r {
                Ok(true) => {
                    assert!(out.len() <= CFG.max_entry as usize);
                    steps += 1;
                    assert!(steps <= u64::from(CFG.capacity) / 16 + 2, "seed {seed}");
                }
                Ok(false) => break,
                Err(LaneError::Corrupt(_) | LaneError::Dead) => break,
                Err(e) => panic!("seed {seed}: {e}"),
            }
        }
        // The producer facing a corrupted tail must also just return.
        match tx.push(b"after") {
            Ok(()) | Err(LaneError::Full | LaneError::Corrupt(_) | LaneError::Dead) => {}
            Err(e) => panic!("seed {seed}: {e}"),
        }
    }
}

/// Builds a lane file image with a valid header and arbitrary indices and ring contents.
fn image(
    max_entry: u32,
    head: u64,
    tail: u64,
    ring: &[u8],
    entries: &[(u32, u32, u64)],
) -> Vec<u8> {
    let mut f = vec![0u8; HEADER_LEN as usize];
    f[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC.to_le_bytes());
    f[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
    f[OFF_HEADER_LEN..OFF_HEADER_LEN + 4].copy_from_slice(&HEADER_LEN.to_le_bytes());
    f[OFF_CAPACITY..OFF_CAPACITY + 4].copy_from_slice(&4096u32.to_le_bytes());
    f[OFF_MAX_ENTRY..OFF_MAX_ENTRY + 4].copy_from_slice(&max_entry.to_le_bytes());
    f[OFF_GENERATION..OFF_GENERATION + 8].copy_from_slice(&GEN.to_le_bytes());
    f[OFF_HEAD..OFF_HEAD + 8].copy_from_slice(&head.to_le_bytes());
    f[OFF_TAIL..OFF_TAIL + 8].copy_from_slice(&tail.to_le_bytes());
    let mut r = ring.to_vec();
    r.resize(4096, 0);
    // Lay plausible-looking entry headers from the tail's slot onward.
    let mut at = (tail % 4096) as usize & !15;
    for &(len, kind, generation) in entries {
        r[at..at + 4].copy_from_slice(&len.to_le_bytes());
        r[at + 4..at + 8].copy_from_slice(&kind.to_le_bytes());
        r[at + 8..at + 16].copy_from_slice(&generation.to_le_bytes());
        at = (at + entry_size(len.min(4096)) as usize) % 4096;
    }
    f.extend_from_slice(&r);
    f
}

fn poke_and_drain(bytes: &[u8]) {
    let s = Scratch::new("arb");
    std::fs::write(s.path(), bytes).unwrap();
    if let Ok(lane) = Lane::open(&s.path(), GEN) {
        let mut out = Vec::new();
        for _ in 0..(4096 / 16 + 2) {
            match lane.try_pop(&mut out) {
                Ok(true) => assert!(out.len() <= lane.max_entry() as usize),
                Ok(false) | Err(_) => break,
            }
        }
        let _ = lane.push(&[0u8; 100]);
        let _ = lane.pop_timeout(&mut out, Duration::from_millis(1));
        let _ = lane.heartbeat_age();
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: if std::env::var_os("SKEP_LANE_FAST").is_some() { 32 } else { 256 },
        ..ProptestConfig::default()
    })]

    /// Entirely arbitrary file contents: open + pop never panic.
    #[test]
    fn arbitrary_file_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        poke_and_drain(&bytes);
    }

    /// Valid header (so open succeeds) with arbitrary indices, ring bytes and plausible
    /// entry headers: pops return Ok or Err, never panic or overrun, and terminate.
    #[test]
    fn arbitrary_ring_never_panics(
        max_entry in 1u32..=1024,
        tail in prop_oneof![Just(0u64), any::<u64>(), (0u64..8192).prop_map(|t| t & !15)],
        ahead in prop_oneof![0u64..=4096, any::<u64>()],
        ring in prop::collection::vec(any::<u8>(), 0..4096),
        entries in prop::collection::vec(
            (
                prop_oneof![0u32..=1100, any::<u32>()],
                prop_oneof![Just(KIND_DATA), Just(KIND_PAD), any::<u32>()],
                prop_oneof![3 => Just(GEN), 1 => any::<u64>()],
            ),
            0..12,
        ),
    ) {
        let head = tail.wrapping_add(ahead);
        poke_and_drain(&image(max_entry, head, tail, &ring, &entries));
    }

    /// A valid header whose geometry fields are individually damaged is rejected by open
    /// with a typed error.
    #[test]
    fn damaged_geometry_is_rejected(field in 0usize..6, value in any::<u64>()) {
        let mut f = image(1024, 0, 0, &[], &[]);
        let (off, width) = [
            (OFF_MAGIC, 8), (OFF_VERSION, 4), (OFF_HEADER_LEN, 4),
            (OFF_CAPACITY, 4), (OFF_MAX_ENTRY, 4), (OFF_GENERATION, 8),
        ][field];
        let original = f[off..off + width].to_vec();
        f[off..off + width].copy_from_slice(&value.to_le_bytes()[..width]);
        prop_assume!(f[off..off + width] != original[..]);
        let s = Scratch::new("geom");
        std::fs::write(s.path(), &f).unwrap();
        let r = Lane::open(&s.path(), GEN);
        let ok = match field {
            0 => matches!(r, Err(LaneError::BadMagic)),
            1 => matches!(r, Err(LaneError::BadVersion { .. })),
            2 => matches!(r, Err(LaneError::BadHeaderLen { .. })),
            // A different valid capacity mismatches the file size instead.
            3 => matches!(r, Err(LaneError::BadCapacity { .. } | LaneError::FileSize { .. })),
            // A different valid max_entry is, by design, accepted.
            4 => matches!(r, Err(LaneError::BadMaxEntry { .. }) | Ok(_)),
            _ => matches!(r, Err(LaneError::GenerationMismatch { .. })),
        };
        prop_assert!(ok, "field {field}: {r:?}");
    }
}
