//! Byte layout of a lane file (header field offsets, entry format, limits) shared by both peers.
//!
//! All integers are little-endian at fixed offsets. The producer-owned `head` and the
//! consumer-owned `tail` live on separate 64-byte cache lines so the two sides do not
//! false-share. The data ring (`capacity` bytes) starts at [`HEADER_LEN`].
//!
//! ```text
//! off  size field
//!   0    8  magic        b"SKEPLANE"
//!   8    4  version      1
//!  12    4  header_len   192
//!  16    4  capacity     ring bytes, power of two
//!  20    4  max_entry    largest payload, <= capacity/4
//!  24    8  generation   worker incarnation; every entry carries it too
//!  32    4  owner_pid    pid of the creator (advisory)
//!  36    4  dead         non-zero = lane is dead
//!  40    8  heartbeat_ns CLOCK_MONOTONIC ns of the last beat()
//!  48    8  cancel_seq   last cancelled request sequence
//!  56    4  futex        wake-up counter (shared futex word)
//!  60    4  waiters      non-zero while a consumer may be sleeping on `futex`
//!  64    8  head         producer cache line (64..128)
//! 128    8  tail         consumer cache line (128..192)
//! 192       data ring
//! ```
//!
//! Each entry is a 16-byte header `{ len: u32, kind: u32, generation: u64 }` followed by
//! `len` payload bytes, padded so the next entry starts on a 16-byte boundary. When an
//! entry does not fit before the end of the ring the producer writes a `KIND_PAD` entry
//! whose `len` covers exactly the rest of the ring and continues at ring offset 0.
//! Because everything is 16-byte aligned, a pad header always fits.

/// `b"SKEPLANE"` read as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SKEPLANE");
/// Layout version this build reads and writes.
pub const VERSION: u32 = 1;
/// Bytes before the data ring.
pub const HEADER_LEN: u32 = 192;
/// Smallest allowed ring capacity in bytes.
pub const MIN_CAPACITY: u32 = 4096;
/// Largest allowed ring capacity in bytes.
pub const MAX_CAPACITY: u32 = 1 << 30;

pub const OFF_MAGIC: usize = 0;
pub const OFF_VERSION: usize = 8;
pub const OFF_HEADER_LEN: usize = 12;
pub const OFF_CAPACITY: usize = 16;
pub const OFF_MAX_ENTRY: usize = 20;
pub const OFF_GENERATION: usize = 24;
pub const OFF_OWNER_PID: usize = 32;
pub const OFF_DEAD: usize = 36;
pub const OFF_HEARTBEAT: usize = 40;
pub const OFF_CANCEL: usize = 48;
pub const OFF_FUTEX: usize = 56;
pub const OFF_WAITERS: usize = 60;
pub const OFF_HEAD: usize = 64;
pub const OFF_TAIL: usize = 128;

/// Size of the per-entry header `{ len: u32, kind: u32, generation: u64 }`.
pub const ENTRY_HEADER_LEN: u32 = 16;
/// Alignment of every entry (and therefore of head and tail).
pub const ENTRY_ALIGN: u64 = 16;
/// Offsets inside an entry header.
pub const ENTRY_OFF_LEN: u64 = 0;
pub const ENTRY_OFF_KIND: u64 = 4;
pub const ENTRY_OFF_GENERATION: u64 = 8;
/// Entry kind of a payload-carrying entry. Unusual values so zeroed or scribbled memory is
/// unlikely to look valid.
pub const KIND_DATA: u32 = 0xDA7A_0001;
/// Entry kind of the filler that skips to the start of the ring.
pub const KIND_PAD: u32 = 0xDA7A_0002;

/// Ring bytes an entry with `len` payload bytes occupies (header + payload, aligned).
pub const fn entry_size(len: u32) -> u64 {
    (ENTRY_HEADER_LEN as u64 + len as u64).div_ceil(ENTRY_ALIGN) * ENTRY_ALIGN
}

// The accessors in `lane.rs` rely on these: header words are naturally aligned and inside
// the header, head/tail sit on their own cache lines, and the ring starts aligned.
const _: () = {
    assert!(OFF_WAITERS + 4 <= OFF_HEAD);
    assert!(OFF_HEAD % 64 == 0 && OFF_TAIL % 64 == 0 && OFF_TAIL - OFF_HEAD >= 64);
    assert!(OFF_TAIL + 64 == HEADER_LEN as usize);
    assert!(HEADER_LEN as u64 % ENTRY_ALIGN == 0);
    assert!(MIN_CAPACITY as u64 % ENTRY_ALIGN == 0);
    // The largest entry plus a pad always fits in an empty ring.
    assert!(entry_size(MIN_CAPACITY / 4) * 2 < MIN_CAPACITY as u64);
};
