//! Shared-memory single-producer/single-consumer lanes between a pool manager and one worker.
//!
//! A lane is a ring of variable-length entries inside shared memory. The pool manager creates
//! it in a sealed memfd ([`Lane::create_sealed`]) and hands the fd to the worker
//! ([`Lane::pass_to`]), which opens it ([`Lane::open_inherited`]). The seals fix its size, so
//! no peer can shrink the mapping under the other and kill it with SIGBUS. Lanes in named files
//! ([`Lane::create`], [`Lane::open`]) remain for tests and tools. Each worker has two lanes:
//! requests (pool -> worker) and responses (worker -> pool).
//!
//! # Threat model
//!
//! The peer is *untrusted*: a buggy, crashed or stale peer may leave any byte of the
//! mapping in any state, at any time, concurrently with our own accesses. Every value that
//! the peer can write (head/tail indices, entry lengths, kinds, generations) is read exactly
//! once into a local and bounds-checked before it is used; a violation marks the lane dead
//! and is reported as [`LaneError::Corrupt`]. The geometry (capacity, max entry, generation)
//! is validated once at open and then only our private copy is used. See `docs/LANES.md`.
//!
//! # Why this crate needs `unsafe`
//!
//! Sharing memory with another process cannot be expressed in safe Rust: the mapping is
//! mutated behind the compiler's back, so it must never be viewed through `&[u8]`/`&T`
//! (that would assert immutability we cannot guarantee). Instead the crate keeps only a raw
//! pointer (`memmap2::MmapRaw`) and touches it through
//! * `AtomicU64::from_ptr`/`AtomicU32::from_ptr` for header words and entry headers
//!   (atomics are the one kind of reference that tolerates concurrent mutation), and
//! * `ptr::copy_nonoverlapping` to move payload bytes between the mapping and private
//!   buffers,
//!
//! plus three `libc` calls (`futex`, `clock_gettime`, and `fcntl` in the `pre_exec` hook that
//! lets one child inherit a lane's fd). `unsafe_code` is denied crate-wide; the
//! handful of functions that need it opt in with `#[allow(unsafe_code)]` and carry a
//! `// SAFETY:` comment. Every such function is sound for *any* argument value (offsets are
//! masked or checked inside it), so soundness never depends on peer-controlled data.
#![deny(unsafe_code)]

#[cfg(target_endian = "big")]
compile_error!(
    "skep-lane's on-disk layout is little-endian and is only implemented for little-endian hosts"
);

mod error;
mod lane;
pub mod layout;
mod sys;

pub use error::LaneError;
pub use lane::{DEFAULT_CAPACITY, DEFAULT_MAX_ENTRY, Lane, LaneConfig};
pub use sys::monotonic_ns;
