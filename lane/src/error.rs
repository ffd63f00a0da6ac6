//! The lane error type: every way creating, opening or using a lane can fail.

use crate::layout::{HEADER_LEN, MAX_CAPACITY, MIN_CAPACITY, VERSION};

/// Errors from lane operations. Header errors come from [`crate::Lane::open`]; `Corrupt` and
/// `Dead` mean the lane is unusable and must be re-created.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    #[error("lane file I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "not a skep lane file (bad magic): wrong path, or its creator has not finished writing it"
    )]
    BadMagic,
    #[error(
        "lane file has layout version {found} but this build speaks version {VERSION}: run the pool manager and worker from the same build"
    )]
    BadVersion { found: u32 },
    #[error(
        "lane header length is {found} but this build expects {HEADER_LEN}: run the pool manager and worker from the same build"
    )]
    BadHeaderLen { found: u32 },
    #[error(
        "lane capacity {found} is invalid: it must be a power of two between {MIN_CAPACITY} and {MAX_CAPACITY} bytes"
    )]
    BadCapacity { found: u32 },
    #[error("lane max_entry {found} is invalid: it must be between 1 and capacity/4 bytes")]
    BadMaxEntry { found: u32 },
    #[error(
        "lane file is {found} bytes but its header implies {expected}: it was truncated, resized or is not fully created"
    )]
    FileSize { expected: u64, found: u64 },
    #[error(
        "lane fd is not sealed against resizing (seals {found:#x}): only a lane from Lane::create_sealed can be handed between processes, because a peer could shrink any other and crash the process mapping it"
    )]
    NotSealed { found: u32 },
    #[error(
        "lane belongs to generation {found} but generation {expected} was expected: it is left over from another worker incarnation; re-create it"
    )]
    GenerationMismatch { expected: u64, found: u64 },
    #[error(
        "payload of {len} bytes exceeds this lane's max_entry of {max} bytes: split the message or create the lane with a larger max_entry"
    )]
    TooLarge { len: usize, max: u32 },
    #[error("lane is full: the consumer is not keeping up; retry later or use push_timeout")]
    Full,
    #[error(
        "lane corrupted ({0}); it is now marked dead: restart the peer and create a fresh lane"
    )]
    Corrupt(&'static str),
    #[error(
        "lane is dead (shut down, or a peer marked it dead or corrupted it): create a fresh lane"
    )]
    Dead,
}
