//! Thin OS wrappers: the system-wide monotonic clock and shared (non-private) futex wait/wake.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Nanoseconds of `CLOCK_MONOTONIC`. The clock is system-wide, so values written by one
/// process (heartbeats) are comparable with values read by another on the same host.
#[allow(unsafe_code)]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec owned by this frame; clock_gettime only
    // writes into it. CLOCK_MONOTONIC is always supported on the targets we build for.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Sleeps while `*word == expected`, at most `timeout`. Spurious returns are allowed; the
/// caller re-checks its condition. Uses plain `FUTEX_WAIT` (not `_PRIVATE`) so the kernel
/// keys the wait on the shared file page and a wake from the other process reaches us.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, 4-byte-aligned atomic for the duration of the call; the
    // kernel only reads it. `ts` outlives the call. The extra arguments are ignored for
    // FUTEX_WAIT. Errors (EAGAIN, ETIMEDOUT, EINTR) all mean "re-check", so they are ignored.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every thread (in any process) waiting on `word`.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a live, aligned atomic; FUTEX_WAKE does not access user memory
    // beyond using the address as a key. The return value (number woken) is not needed.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Portable fallback: poll in short naps so waiting still terminates and sees new data.
#[cfg(not(target_os = "linux"))]
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    if word.load(std::sync::atomic::Ordering::Acquire) == expected {
        std::thread::sleep(timeout.min(Duration::from_micros(100)));
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn futex_wake(_word: &AtomicU32) {}
