//! The `Lane` type: creating/opening a lane file and the SPSC push/pop protocol over it.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::LaneError;
use crate::layout::*;
use crate::sys::{futex_wait, futex_wake, monotonic_ns};

/// How many times `pop_timeout` polls before it sleeps on the futex (a few µs of spinning;
/// cheaper than a syscall round trip when the producer is active).
const SPIN_POLLS: u32 = 100;
/// Longest nap between retries in `push_timeout` (no futex for free space: the consumer
/// never wakes the producer, so the producer backs off instead).
const MAX_PUSH_BACKOFF: Duration = Duration::from_millis(1);

/// Geometry of a lane, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneConfig {
    /// Ring size in bytes: a power of two in `MIN_CAPACITY..=MAX_CAPACITY`.
    pub capacity: u32,
    /// Largest payload in bytes: `1..=capacity/4`.
    pub max_entry: u32,
}

/// Ring size of `LaneConfig::default()`.
pub const DEFAULT_CAPACITY: u32 = 1 << 20;
/// Largest payload of `LaneConfig::default()`: a maximal prompt (64 KiB) plus 4 KiB for the
/// rest of a request (ids, model name, integers, MAC). The pool manager checks at compile time
/// and at start that the largest request its validation admits fits (`skep_common::validate::
/// MAX_LANE_REQUEST_BYTES`); this crate knows nothing of requests.
pub const DEFAULT_MAX_ENTRY: u32 = 64 * 1024 + 4096;

impl Default for LaneConfig {
    fn default() -> Self {
        LaneConfig {
            capacity: DEFAULT_CAPACITY,
            max_entry: DEFAULT_MAX_ENTRY,
        }
    }
}

impl LaneConfig {
    /// Checks the bounds documented on the fields. `open` applies the same check to the
    /// geometry it reads from the file.
    pub fn validate(&self) -> Result<(), LaneError> {
        let c = self.capacity;
        if !c.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&c) {
            return Err(LaneError::BadCapacity { found: c });
        }
        if self.max_entry == 0 || self.max_entry > c / 4 {
            return Err(LaneError::BadMaxEntry {
                found: self.max_entry,
            });
        }
        Ok(())
    }
}

/// Our private position in the ring (producer: head, consumer: tail). `None` until first
/// use, then read once from the mapping; afterwards the private copy is authoritative and
/// the mapping's copy is only compared against it to detect peer scribbling.
#[derive(Default)]
struct Cursor {
    pos: Option<u64>,
}

/// One end of a shared-memory SPSC lane. The same type serves both roles: the producer
/// calls [`Lane::push`], the consumer calls [`Lane::try_pop`]/[`Lane::pop_timeout`].
///
/// `Lane` is `Send + Sync`. Pushes are serialised by an internal mutex, as are pops, so
/// sharing a `Lane` between threads is sound; the protocol is still single-producer /
/// single-consumer *across processes*.
pub struct Lane {
    /// Raw mapping; never turned into a `&[u8]` (the peer mutates it concurrently).
    map: MmapRaw,
    /// The file or memfd behind the mapping, kept open so a sealed lane can be handed to a
    /// worker (`Lane::pass_to`) and its seals checked.
    fd: OwnedFd,
    /// Validated geometry, private copies: never re-read from the mapping.
    capacity: u64,
    mask: u64,
    max_entry: u32,
    generation: u64,
    /// Sticky local dead flag: once set, a peer clearing the shared flag cannot revive us.
    dead: AtomicBool,
    producer: Mutex<Cursor>,
    consumer: Mutex<Cursor>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("capacity", &self.capacity)
            .field("max_entry", &self.max_entry)
            .field("generation", &self.generation)
            .field("dead", &self.dead.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Header words addressed by the accessors; the offsets are constants inside the header.
#[derive(Clone, Copy)]
enum H64 {
    Magic,
    Generation,
    Heartbeat,
    Cancel,
    Head,
    Tail,
}

#[derive(Clone, Copy)]
enum H32 {
    Version,
    HeaderLen,
    Capacity,
    MaxEntry,
    OwnerPid,
    Dead,
    Futex,
    Waiters,
}

impl H64 {
    const fn off(self) -> usize {
        match self {
            H64::Magic => OFF_MAGIC,
            H64::Generation => OFF_GENERATION,
            H64::Heartbeat => OFF_HEARTBEAT,
            H64::Cancel => OFF_CANCEL,
            H64::Head => OFF_HEAD,
            H64::Tail => OFF_TAIL,
        }
    }
}

impl H32 {
    const fn off(self) -> usize {
        match self {
            H32::Version => OFF_VERSION,
            H32::HeaderLen => OFF_HEADER_LEN,
            H32::Capacity => OFF_CAPACITY,
            H32::MaxEntry => OFF_MAX_ENTRY,
            H32::OwnerPid => OFF_OWNER_PID,
            H32::Dead => OFF_DEAD,
            H32::Futex => OFF_FUTEX,
            H32::Waiters => OFF_WAITERS,
        }
    }
}

fn lock(m: &Mutex<Cursor>) -> MutexGuard<'_, Cursor> {
    // Nothing panics while holding these locks, but never turn poison into a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn u32_at(buf: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[off..off + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(b)
}

/// Sibling temp name for `create`: the file is fully built there and then renamed over
/// `path`, so a peer never sees a half-written header and a worker still mapping an old
/// file keeps its (old) inode instead of getting SIGBUS from a truncate.
fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "lane path has no file name"))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}.tmp", std::process::id()));
    Ok(path.with_file_name(tmp))
}

impl Lane {
    /// Creates (or replaces) the lane file at `path` with mode 0600, writes a fresh header
    /// and an empty ring, and returns the creator's end.
    ///
    /// The file is built under a temporary sibling name and atomically renamed into place.
    pub fn create(path: &Path, cfg: LaneConfig, generation: u64) -> Result<Lane, LaneError> {
        cfg.validate()?;
        let total = u64::from(HEADER_LEN) + u64::from(cfg.capacity);
        let tmp = temp_path(path)?;
        // A stale temp from a crashed earlier run with our pid; ignore "not found".
        let _ = fs::remove_file(&tmp);
        let built = (|| -> Result<Lane, LaneError> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            // `mode` is filtered by the umask, which can only remove bits; set it exactly anyway.
            file.set_permissions(Permissions::from_mode(0o600))?;
            file.set_len(total)?;
            let map = MmapOptions::new().len(total as usize).map_raw(&file)?;
            let lane = Lane::from_map(map, cfg, generation, file.into());
            lane.init_header();
            fs::rename(&tmp, path)?;
            Ok(lane)
        })();
        if built.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        built
    }

    /// Opens an existing lane file and validates its header: magic, version, header
    /// length, capacity, max entry, file size and generation, each with its own error.
    pub fn open(path: &Path, expected_generation: u64) -> Result<Lane, LaneError> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Lane::open_file(file, expected_generation)
    }

    /// `open` on an already opened file or memfd; the lane keeps `file` open.
    fn open_file(file: File, expected_generation: u64) -> Result<Lane, LaneError> {
        let meta = file.metadata()?;
        if !meta.is_file() {
            // A FIFO or device would block or misbehave under read/mmap.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "lane path is not a regular file",
            )
            .into());
        }
        let found_len = meta.len();
        if found_len < u64::from(HEADER_LEN) {
            return Err(LaneError::FileSize {
                expected: u64::from(HEADER_LEN),
                found: found_len,
            });
        }
        // Parse the header from a private copy: validation cannot be raced by the peer,
        // and after this only the validated values are used.
        // Positional read: the file offset is shared with whoever else holds this description.
        let mut hdr = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut hdr, 0)?;
        if u64_at(&hdr, OFF_MAGIC) != MAGIC {
            return Err(LaneError::BadMagic);
        }
        let version = u32_at(&hdr, OFF_VERSION);
        if version != VERSION {
            return Err(LaneError::BadVersion { found: version });
        }
        let header_len = u32_at(&hdr, OFF_HEADER_LEN);
        if header_len != HEADER_LEN {
            return Err(LaneError::BadHeaderLen { found: header_len });
        }
        let cfg = LaneConfig {
            capacity: u32_at(&hdr, OFF_CAPACITY),
            max_entry: u32_at(&hdr, OFF_MAX_ENTRY),
        };
        cfg.validate()?;
        let expected_len = u64::from(HEADER_LEN) + u64::from(cfg.capacity);
        if found_len != expected_len {
            return Err(LaneError::FileSize {
                expected: expected_len,
                found: found_len,
            });
        }
        let generation = u64_at(&hdr, OFF_GENERATION);
        if generation != expected_generation {
            return Err(LaneError::GenerationMismatch {
                expected: expected_generation,
                found: generation,
            });
        }
        let map = MmapOptions::new()
            .len(expected_len as usize)
            .map_raw(&file)?;
        if map.len() as u64 != expected_len {
            return Err(LaneError::FileSize {
                expected: expected_len,
                found: map.len() as u64,
            });
        }
        Ok(Lane::from_map(map, cfg, generation, file.into()))
    }

    /// `map` must be exactly `HEADER_LEN + cfg.capacity` bytes and `cfg` validated; the
    /// accessors' soundness relies on it. `fd` is the file or memfd behind `map`.
    fn from_map(map: MmapRaw, cfg: LaneConfig, generation: u64, fd: OwnedFd) -> Lane {
        debug_assert_eq!(
            map.len() as u64,
            u64::from(HEADER_LEN) + u64::from(cfg.capacity)
        );
        Lane {
            map,
            fd,
            capacity: u64::from(cfg.capacity),
            mask: u64::from(cfg.capacity) - 1,
            max_entry: cfg.max_entry,
            generation,
            dead: AtomicBool::new(false),
            producer: Mutex::new(Cursor::default()),
            consumer: Mutex::new(Cursor::default()),
        }
    }

    fn init_header(&self) {
        self.h32(H32::Version).store(VERSION, Ordering::Relaxed);
        self.h32(H32::HeaderLen)
            .store(HEADER_LEN, Ordering::Relaxed);
        self.h32(H32::Capacity)
            .store(self.capacity as u32, Ordering::Relaxed);
        self.h32(H32::MaxEntry)
            .store(self.max_entry, Ordering::Relaxed);
        self.h64(H64::Generation)
            .store(self.generation, Ordering::Relaxed);
        self.h32(H32::OwnerPid)
            .store(std::process::id(), Ordering::Relaxed);
        self.h32(H32::Dead).store(0, Ordering::Relaxed);
        self.h64(H64::Heartbeat)
            .store(monotonic_ns(), Ordering::Relaxed);
        self.h64(H64::Cancel).store(0, Ordering::Relaxed);
        self.h32(H32::Futex).store(0, Ordering::Relaxed);
        self.h32(H32::Waiters).store(0, Ordering::Relaxed);
        self.h64(H64::Head).store(0, Ordering::Relaxed);
        self.h64(H64::Tail).store(0, Ordering::Relaxed);
        // Magic last: a reader that sees it sees a complete header.
        self.h64(H64::Magic).store(MAGIC, Ordering::Release);
    }

    // ---- raw accessors: the only code that touches the mapping ----

    #[allow(unsafe_code)]
    fn h64(&self, field: H64) -> &AtomicU64 {
        // SAFETY: every H64 offset is a multiple of 8 and ends inside the header (checked
        // by the const asserts in layout.rs); the mapping is page aligned and at least
        // HEADER_LEN bytes and lives as long as `self`. An atomic may alias memory that
        // other processes mutate concurrently, which is exactly the situation here.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(field.off()).cast()) }
    }

    #[allow(unsafe_code)]
    fn h32(&self, field: H32) -> &AtomicU32 {
        // SAFETY: as in `h64`; every H32 offset is a multiple of 4 inside the header.
        unsafe { AtomicU32::from_ptr(self.map.as_mut_ptr().add(field.off()).cast()) }
    }

    /// Pointer to ring byte `pos & mask` rounded down to `align`: always in bounds and
    /// aligned whatever `pos` is, because the ring is `capacity` (a power of two >= 4096)
    /// bytes starting at the 16-aligned `HEADER_LEN` of a mapping of exactly that size.
    fn ring_ptr(&self, pos: u64, align: u64) -> *mut u8 {
        let off = (pos & self.mask & !(align - 1)) as usize;
        self.map
            .as_mut_ptr()
            .wrapping_add(HEADER_LEN as usize + off)
    }

    #[allow(unsafe_code)]
    fn ring_u32(&self, pos: u64) -> &AtomicU32 {
        // SAFETY: `ring_ptr` yields a 4-aligned pointer with at least 4 bytes of ring after
        // it (capacity is a multiple of 16), inside the live mapping; see `h64` on aliasing.
        unsafe { AtomicU32::from_ptr(self.ring_ptr(pos, 4).cast()) }
    }

    #[allow(unsafe_code)]
    fn ring_u64(&self, pos: u64) -> &AtomicU64 {
        // SAFETY: as `ring_u32`, with 8-byte alignment and size.
        unsafe { AtomicU64::from_ptr(self.ring_ptr(pos, 8).cast()) }
    }

    /// Copies `len` bytes at ring offset `off` (no wrapping) into `out`, replacing its
    /// contents. Returns false, copying nothing, if the span leaves the ring.
    #[allow(unsafe_code)]
    fn copy_out(&self, off: u64, len: usize, out: &mut Vec<u8>) -> bool {
        out.clear();
        // `off == capacity` is legal for an empty payload in the ring's last slot.
        let in_ring = (len as u64)
            .checked_add(off)
            .is_some_and(|end| end <= self.capacity);
        if !in_ring {
            return false;
        }
        if len == 0 {
            return true;
        }
        out.reserve(len);
        let src = self.ring_ptr(off, 1);
        // SAFETY: `src..src+len` lies inside the ring (checked above; len > 0 so off <
        // capacity and the masking in `ring_ptr` is the identity) of the live mapping;
        // `out` has capacity for `len` bytes and is private, so the ranges cannot overlap.
        // The peer may be writing the source concurrently; we treat whatever we read as
        // opaque bytes (u8 has no invalid values) and never re-read the mapping for them.
        unsafe {
            std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), len);
            out.set_len(len);
        }
        true
    }

    /// Copies `data` into the ring at offset `off` (no wrapping). Returns false, writing
    /// nothing, if the span leaves the ring.
    #[allow(unsafe_code)]
    fn copy_in(&self, off: u64, data: &[u8]) -> bool {
        let in_ring = (data.len() as u64)
            .checked_add(off)
            .is_some_and(|end| end <= self.capacity);
        if !in_ring {
            return false;
        }
        if data.is_empty() {
            return true;
        }
        let dst = self.ring_ptr(off, 1);
        // SAFETY: `dst..dst+len` lies inside the ring of the live, writable mapping (checked
        // above; len > 0 so off < capacity and `ring_ptr` does not mask it); `data` is
        // private memory, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        true
    }

    // ---- state ----

    /// Generation this lane was created/opened with (private copy, not re-read).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Largest payload `push` accepts (private copy, not re-read).
    pub fn max_entry(&self) -> u32 {
        self.max_entry
    }

    /// Ring capacity in bytes (private copy, not re-read).
    pub fn capacity(&self) -> u32 {
        self.capacity as u32
    }

    /// Pid recorded by the creator. Peer-written and advisory only.
    pub fn owner_pid(&self) -> u32 {
        self.h32(H32::OwnerPid).load(Ordering::Relaxed)
    }

    /// Marks the lane dead for both peers and wakes any waiter. Irreversible.
    pub fn mark_dead(&self) {
        self.dead.store(true, Ordering::Release);
        self.h32(H32::Dead).store(1, Ordering::Release);
        self.wake();
    }

    /// True once either side marked the lane dead or corruption was detected.
    pub fn is_dead(&self) -> bool {
        if self.dead.load(Ordering::Acquire) {
            return true;
        }
        if self.h32(H32::Dead).load(Ordering::Acquire) != 0 {
            self.dead.store(true, Ordering::Release);
            return true;
        }
        false
    }

    /// Wakes anything sleeping in `pop_timeout` on this lane, in any process.
    pub fn wake(&self) {
        let word = self.h32(H32::Futex);
        word.fetch_add(1, Ordering::Release);
        futex_wake(word);
    }

    /// Records "now" as the heartbeat.
    pub fn beat(&self) {
        self.h64(H64::Heartbeat)
            .store(monotonic_ns(), Ordering::Release);
    }

    /// Time since the last `beat`. A garbage heartbeat yields a huge age (value in the
    /// past) or zero (value in the future); it never panics.
    pub fn heartbeat_age(&self) -> Duration {
        let hb = self.h64(H64::Heartbeat).load(Ordering::Acquire);
        Duration::from_nanos(monotonic_ns().saturating_sub(hb))
    }

    /// Publishes the newest cancelled request sequence (pool side).
    pub fn request_cancel(&self, seq: u64) {
        self.h64(H64::Cancel).store(seq, Ordering::Release);
    }

    /// Latest sequence passed to `request_cancel` (worker side). Peer-written: treat as a hint.
    pub fn cancel_requested(&self) -> u64 {
        self.h64(H64::Cancel).load(Ordering::Acquire)
    }

    fn check_alive(&self) -> Result<(), LaneError> {
        if self.is_dead() {
            Err(LaneError::Dead)
        } else {
            Ok(())
        }
    }

    /// Marks the lane dead and returns the error describing why.
    fn corrupt(&self, what: &'static str) -> LaneError {
        self.mark_dead();
        LaneError::Corrupt(what)
    }

    fn write_entry_header(&self, pos: u64, len: u32, kind: u32) {
        self.ring_u32(pos.wrapping_add(ENTRY_OFF_LEN))
            .store(len, Ordering::Relaxed);
        self.ring_u32(pos.wrapping_add(ENTRY_OFF_KIND))
            .store(kind, Ordering::Relaxed);
        self.ring_u64(pos.wrapping_add(ENTRY_OFF_GENERATION))
            .store(self.generation, Ordering::Relaxed);
    }

    // ---- producer ----

    /// Appends one entry. `Err(Full)` if there is no room right now, `Err(TooLarge)` if
    /// `payload` exceeds `max_entry`. Wakes a consumer sleeping in `pop_timeout`.
    pub fn push(&self, payload: &[u8]) -> Result<(), LaneError> {
        self.check_alive()?;
        if payload.len() > self.max_entry as usize {
            return Err(LaneError::TooLarge {
                len: payload.len(),
                max: self.max_entry,
            });
        }
        let len = payload.len() as u32; // <= max_entry, fits
        let mut cur = lock(&self.producer);
        let shared_head = self.h64(H64::Head).load(Ordering::Relaxed);
        let head = match cur.pos {
            // Only we write head; any other value means the peer scribbled on it.
            Some(h) if h != shared_head => return Err(self.corrupt("head index changed by peer")),
            Some(h) => h,
            None if shared_head % ENTRY_ALIGN != 0 => {
                return Err(self.corrupt("misaligned head index"));
            }
            None => shared_head,
        };
        // Peer-controlled: read once, then validated.
        let tail = self.h64(H64::Tail).load(Ordering::Acquire);
        let used = head.wrapping_sub(tail);
        if used > self.capacity || tail % ENTRY_ALIGN != 0 {
            return Err(self.corrupt("tail index out of range"));
        }
        let free = self.capacity - used;
        let need = entry_size(len);
        let off = head & self.mask;
        let rem = self.capacity - off; // >= 16: both are 16-aligned and off < capacity
        let (total, pad) = if need <= rem {
            (need, false)
        } else {
            (rem + need, true)
        };
        if total > free {
            return Err(LaneError::Full);
        }
        let mut at = head;
        if pad {
            self.write_entry_header(at, (rem - u64::from(ENTRY_HEADER_LEN)) as u32, KIND_PAD);
            at = at.wrapping_add(rem);
        }
        self.write_entry_header(at, len, KIND_DATA);
        if !self.copy_in((at & self.mask) + u64::from(ENTRY_HEADER_LEN), payload) {
            // Unreachable by construction (need <= capacity/4 + 32 and entries never cross
            // the ring end); kept so a logic slip cannot become an out-of-bounds write.
            return Err(self.corrupt("internal: entry does not fit ring"));
        }
        let new_head = head.wrapping_add(total);
        // Release: the entry bytes above are visible before the consumer sees new head.
        self.h64(H64::Head).store(new_head, Ordering::Release);
        cur.pos = Some(new_head);
        drop(cur);
        self.notify_consumer();
        Ok(())
    }

    /// Like `push`, but while the lane is full retries (spin, then short naps) until
    /// `timeout` elapses; then `Err(Full)`.
    pub fn push_timeout(&self, payload: &[u8], timeout: Duration) -> Result<(), LaneError> {
        let start = Instant::now();
        let mut nap = Duration::from_micros(1);
        let mut attempt = 0u32;
        loop {
            match self.push(payload) {
                Err(LaneError::Full) => {}
                other => return other,
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                return Err(LaneError::Full);
            }
            attempt += 1;
            if attempt < 64 {
                std::hint::spin_loop();
            } else if attempt < 128 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(nap.min(timeout - elapsed));
                nap = (nap * 2).min(MAX_PUSH_BACKOFF);
            }
        }
    }

    /// Dekker-style hand-off with `pop_timeout`: we publish head then check `waiters`; the
    /// consumer sets `waiters` then re-checks head. The SeqCst fences guarantee at least one
    /// side sees the other's store, so a wake-up is never lost.
    fn notify_consumer(&self) {
        fence(Ordering::SeqCst);
        if self.h32(H32::Waiters).load(Ordering::Relaxed) != 0 {
            self.wake();
        }
    }

    // ---- consumer ----

    /// Copies the next payload into `out` (cleared first). `Ok(false)` if the lane is empty.
    pub fn try_pop(&self, out: &mut Vec<u8>) -> Result<bool, LaneError> {
        out.clear();
        self.check_alive()?;
        let mut cur = lock(&self.consumer);
        let shared_tail = self.h64(H64::Tail).load(Ordering::Relaxed);
        let mut tail = match cur.pos {
            Some(t) if t != shared_tail => return Err(self.corrupt("tail index changed by peer")),
            Some(t) => t,
            None if shared_tail % ENTRY_ALIGN != 0 => {
                return Err(self.corrupt("misaligned tail index"));
            }
            None => shared_tail,
        };
        // At most a pad followed by a data entry; bounded so corruption cannot loop us.
        for _ in 0..2 {
            // Peer-controlled: read once, then validated.
            let head = self.h64(H64::Head).load(Ordering::Acquire);
            let avail = head.wrapping_sub(tail);
            if avail > self.capacity || head % ENTRY_ALIGN != 0 {
                return Err(self.corrupt("head index out of range"));
            }
            if avail == 0 {
                return Ok(false);
            }
            let hdr_len = u64::from(ENTRY_HEADER_LEN);
            if avail < hdr_len {
                return Err(self.corrupt("partial entry header"));
            }
            let off = tail & self.mask;
            let rem = self.capacity - off;
            let len = self
                .ring_u32(tail.wrapping_add(ENTRY_OFF_LEN))
                .load(Ordering::Relaxed);
            let kind = self
                .ring_u32(tail.wrapping_add(ENTRY_OFF_KIND))
                .load(Ordering::Relaxed);
            let generation = self
                .ring_u64(tail.wrapping_add(ENTRY_OFF_GENERATION))
                .load(Ordering::Relaxed);
            if generation != self.generation {
                return Err(self.corrupt("stale generation"));
            }
            match kind {
                KIND_PAD => {
                    // A pad always runs exactly to the ring end, never starts at 0 (an
                    // entry always fits an empty ring), and was published with the entry.
                    if off == 0 || u64::from(len) != rem - hdr_len || rem > avail {
                        return Err(self.corrupt("inconsistent pad entry"));
                    }
                    tail = tail.wrapping_add(rem);
                    self.h64(H64::Tail).store(tail, Ordering::Release);
                    cur.pos = Some(tail);
                }
                KIND_DATA => {
                    if len > self.max_entry {
                        return Err(self.corrupt("entry length exceeds max_entry"));
                    }
                    let need = entry_size(len);
                    if need > rem {
                        return Err(self.corrupt("entry crosses ring end"));
                    }
                    if need > avail {
                        return Err(self.corrupt("entry extends past head"));
                    }
                    if !self.copy_out(off + hdr_len, len as usize, out) {
                        return Err(self.corrupt("entry outside ring"));
                    }
                    tail = tail.wrapping_add(need);
                    // Release: we are done reading the slot before the producer may reuse it.
                    self.h64(H64::Tail).store(tail, Ordering::Release);
                    cur.pos = Some(tail);
                    return Ok(true);
                }
                _ => return Err(self.corrupt("unknown entry kind")),
            }
        }
        Err(self.corrupt("pad entry followed by pad entry"))
    }

    /// Waits up to `timeout` for an entry: polls briefly, then sleeps on the shared futex.
    /// `Ok(false)` on timeout. `mark_dead`/`wake` from either process interrupt the sleep.
    pub fn pop_timeout(&self, out: &mut Vec<u8>, timeout: Duration) -> Result<bool, LaneError> {
        let start = Instant::now();
        for _ in 0..SPIN_POLLS {
            if self.try_pop(out)? {
                return Ok(true);
            }
            if start.elapsed() >= timeout {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
        let futex = self.h32(H32::Futex);
        let waiters = self.h32(H32::Waiters);
        let result = loop {
            let seq = futex.load(Ordering::Acquire);
            waiters.store(1, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            match self.try_pop(out) {
                Ok(false) => {}
                other => break other,
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                break Ok(false);
            }
            // The futex word changing (a push, wake or peer scribble) ends the sleep early;
            // the loop re-checks, so spurious wake-ups only cost a retry before the deadline.
            // The sleep is bounded by the caller's timeout and nothing shorter: a shorter cap
            // would hide a lost wake-up as mere latency, here and in the tests.
            futex_wait(futex, seq, timeout - elapsed);
        };
        waiters.store(0, Ordering::Relaxed);
        result
    }
}

mod sealed;
#[cfg(test)]
mod tests;
