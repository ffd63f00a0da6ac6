//! Sealed lanes: a lane in an anonymous memfd whose size can never change, handed to the worker
//! as an inherited file descriptor.
//!
//! Why: a lane in a named file can be truncated by anything that can open that file, the peer
//! included, and from then on every access to the mapping raises SIGBUS and kills the process
//! that maps it. A memfd sealed with `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL` keeps its size
//! for good, whoever holds it (seals belong to the inode and can never be removed), and it has no
//! name in the file system to open.
//!
//! What it does not stop: the peer can still write any bytes into the mapping, or punch holes
//! that read back as zeros. The protocol's checks in `lane.rs` handle arbitrary bytes.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use memmap2::MmapOptions;
use rustix::fs::{MemfdFlags, SealFlags};

use super::{Lane, LaneConfig};
use crate::error::LaneError;
use crate::layout::HEADER_LEN;

/// The seals every shared lane carries: its size is fixed and no seal can be added or lifted.
/// `F_SEAL_WRITE` is deliberately absent: both peers write the ring.
fn required_seals() -> SealFlags {
    SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL
}

/// Refuses an fd that is not a memfd carrying every required seal.
fn check_seals(fd: impl AsFd) -> Result<(), LaneError> {
    // EINVAL here means "not a sealable file" (a regular file, a pipe): report it as unsealed.
    let found = rustix::fs::fcntl_get_seals(fd).unwrap_or(SealFlags::empty());
    if found.contains(required_seals()) {
        Ok(())
    } else {
        Err(LaneError::NotSealed {
            found: found.bits(),
        })
    }
}

// === impl Lane ===

impl Lane {
    /// Creates a lane in a new memfd named `name` (visible only in `/proc/*/fd` links), sized
    /// and then sealed so that nobody, this process included, can resize it. The memfd is
    /// close-on-exec; [`Lane::pass_to`] hands it to exactly one child.
    pub fn create_sealed(name: &str, cfg: LaneConfig, generation: u64) -> Result<Lane, LaneError> {
        cfg.validate()?;
        let total = u64::from(HEADER_LEN) + u64::from(cfg.capacity);
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(std::io::Error::from)?;
        rustix::fs::ftruncate(&fd, total).map_err(std::io::Error::from)?;
        rustix::fs::fcntl_add_seals(&fd, required_seals()).map_err(std::io::Error::from)?;
        // The kernel never drops a seal, but a kernel without sealing would have failed above;
        // check anyway, since the whole point is that this holds.
        check_seals(&fd)?;
        let file = File::from(fd);
        let map = MmapOptions::new().len(total as usize).map_raw(&file)?;
        let lane = Lane::from_map(map, cfg, generation, file.into());
        lane.init_header();
        Ok(lane)
    }

    /// Opens the peer's end of a sealed lane from `fd`, which must carry every seal
    /// `create_sealed` sets (else [`LaneError::NotSealed`]); then validates it as `open` does.
    pub fn open_sealed(fd: OwnedFd, expected_generation: u64) -> Result<Lane, LaneError> {
        check_seals(&fd)?;
        Lane::open_file(File::from(fd), expected_generation)
    }

    /// Opens a sealed lane from fd number `fd`, inherited from the parent (the worker's side of
    /// [`Lane::pass_to`]). The fd is reopened through `/proc/self/fd`, which reaches the same
    /// memfd without claiming ownership of a raw fd number; the inherited fd itself stays open.
    pub fn open_inherited(fd: i32, expected_generation: u64) -> Result<Lane, LaneError> {
        if fd < 0 {
            let why = "a lane fd number cannot be negative";
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, why).into());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{fd}"))?;
        Lane::open_sealed(file.into(), expected_generation)
    }

    /// Arranges for the child spawned by `cmd` to inherit this lane's fd, and returns the fd
    /// number to name on the child's command line (fd numbers are not secrets). Only that child
    /// inherits it: the fd stays close-on-exec here, and the flag is cleared in the forked
    /// child alone, so workers spawned concurrently for other slots never see it. Spawn `cmd`
    /// while this lane is alive.
    #[allow(unsafe_code)]
    pub fn pass_to(&self, cmd: &mut Command) -> i32 {
        let raw = self.fd.as_raw_fd();
        // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe
        // calls are allowed: it captures one integer, allocates nothing and makes one fcntl(2)
        // call. If `raw` were no longer open, fcntl fails with EBADF and the spawn fails; no
        // memory is touched either way.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(raw, libc::F_SETFD, 0) == -1 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
        }
        raw
    }
}

/// The file or memfd behind the mapping (to dup it for a peer in the same process, or stat it).
impl AsFd for Lane {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
