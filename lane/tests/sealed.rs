//! Sealed memfd lanes: nobody can resize them, and a hostile peer that tries leaves its creator
//! serving (no SIGBUS).

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use skep_lane::layout::HEADER_LEN;
use skep_lane::{Lane, LaneConfig, LaneError};

const CFG: LaneConfig = LaneConfig {
    capacity: 4096,
    max_entry: 1024,
};
const GEN: u64 = 11;
const TOTAL: u64 = HEADER_LEN as u64 + 4096;
const CHILD_ENV: &str = "SKEP_LANE_SEALED_CHILD";
const ROUNDS: u64 = 200;
/// Generous bounds so a broken build fails instead of hanging; never a speed assertion.
const WAIT: Duration = Duration::from_secs(30);

/// Per-test scratch directory, removed on drop (no tempfile crate in the workspace).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "skep-lane-sealed-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reopens fd `fd` of this process through /proc, as a peer holding the lane's fd can.
fn reopen(fd: i32) -> std::fs::File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{fd}"))
        .unwrap()
}

/// Every way to resize the memfd behind fd `fd`; returns what each attempt got.
fn try_resize(fd: i32) -> Vec<(&'static str, std::io::Result<()>)> {
    let file = reopen(fd);
    // Shrinking last: unsealed, the file would be left truncated.
    vec![
        ("grow", file.set_len(TOTAL * 2)),
        ("shrink by one page", file.set_len(TOTAL - 4096)),
        ("shrink to 0", file.set_len(0)),
    ]
}

#[track_caller]
fn assert_all_refused(attempts: &[(&'static str, std::io::Result<()>)]) {
    for (what, r) in attempts {
        assert!(
            matches!(r, Err(e) if e.kind() == ErrorKind::PermissionDenied),
            "{what}: expected EPERM from the seals, got {r:?}"
        );
    }
}

#[test]
fn a_sealed_lane_cannot_be_resized_or_unsealed() {
    let lane = Lane::create_sealed("skep-lane-test", CFG, GEN).unwrap();
    let fd = lane.pass_to(&mut Command::new("true"));
    assert_all_refused(&try_resize(fd));
    assert_eq!(reopen(fd).metadata().unwrap().len(), TOTAL);
    // F_SEAL_SEAL: no further seal (F_SEAL_WRITE would freeze the ring) can be added either.
    let added = rustix::fs::fcntl_add_seals(reopen(fd), rustix::fs::SealFlags::WRITE);
    assert_eq!(added, Err(rustix::io::Errno::PERM));
    // Both ends still work over the same memory.
    let peer = Lane::open_inherited(fd, GEN).unwrap();
    lane.push(b"still here").unwrap();
    let mut out = Vec::new();
    assert!(peer.try_pop(&mut out).unwrap());
    assert_eq!(out, b"still here");
}

#[test]
fn only_sealed_fds_are_accepted() {
    // Memfds without the size seals, and a plain file: any of them could be truncated by the
    // peer. (A memfd made without ALLOW_SEALING carries F_SEAL_SEAL alone.)
    use rustix::fs::{MemfdFlags, SealFlags};
    for (flags, seals) in [
        (MemfdFlags::CLOEXEC, SealFlags::empty()),
        (
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
            SealFlags::empty(),
        ),
        (
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
            SealFlags::SHRINK | SealFlags::SEAL,
        ),
    ] {
        let unsealed = rustix::fs::memfd_create("unsealed", flags).unwrap();
        rustix::fs::ftruncate(&unsealed, TOTAL).unwrap();
        if !seals.is_empty() {
            rustix::fs::fcntl_add_seals(&unsealed, seals).unwrap();
        }
        assert!(
            matches!(
                Lane::open_sealed(unsealed, GEN),
                Err(LaneError::NotSealed { .. })
            ),
            "{flags:?} {seals:?}"
        );
    }
    let scratch = Scratch::new("plain");
    let path = scratch.0.join("lane");
    Lane::create(&path, CFG, GEN).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let refused = Lane::open_sealed(OwnedFd::from(file), GEN);
    assert!(matches!(refused, Err(LaneError::NotSealed { .. })));
    assert!(Lane::open_inherited(-1, GEN).is_err());
    // The generation is still checked on a sealed lane.
    let lane = Lane::create_sealed("skep-lane-test", CFG, GEN).unwrap();
    let fd = lane.pass_to(&mut Command::new("true"));
    assert!(matches!(
        Lane::open_inherited(fd, GEN + 1),
        Err(LaneError::GenerationMismatch { .. })
    ));
}

/// Child half of the cross-process tests: a no-op unless the parent set `CHILD_ENV` to
/// `<role>:<req fd>:<resp fd>:<report file>`, role `hostile` or `bystander`.
#[test]
fn sealed_child_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(4, ':');
    let role = parts.next().unwrap().to_owned();
    let req_fd: i32 = parts.next().unwrap().parse().unwrap();
    let resp_fd: i32 = parts.next().unwrap().parse().unwrap();
    let report_path = std::path::PathBuf::from(parts.next().unwrap());
    if role == "bystander" {
        // Spawned without `pass_to`: the lanes must not have leaked into this process.
        assert!(Lane::open_inherited(req_fd, GEN).is_err());
        assert!(Lane::open_inherited(resp_fd, GEN).is_err());
        return;
    }
    // The hostile worker: it opens its lanes as a worker does, then tries to shrink and grow
    // both under the pool manager, and reports what it got before serving as usual.
    let req = Lane::open_inherited(req_fd, GEN).unwrap();
    let resp = Lane::open_inherited(resp_fd, GEN).unwrap();
    let mut report = String::new();
    for fd in [req_fd, resp_fd] {
        for (what, r) in try_resize(fd) {
            let got = match r {
                Ok(()) => "done".to_owned(),
                Err(e) => format!("{:?}", e.kind()),
            };
            report.push_str(&format!("{what}={got};"));
        }
    }
    // Reported through a file, not the lanes: were the resizes to succeed, touching the
    // mapping here would kill this process first, and the test is about the parent.
    let tmp = report_path.with_extension("tmp");
    std::fs::write(&tmp, &report).unwrap();
    std::fs::rename(&tmp, &report_path).unwrap();
    let mut buf = Vec::new();
    for _ in 0..ROUNDS {
        assert!(req.pop_timeout(&mut buf, WAIT).unwrap());
        resp.beat();
        resp.push_timeout(&buf, WAIT).unwrap();
    }
}

fn spawn_child(
    role: &str,
    req: &Lane,
    resp: &Lane,
    pass: bool,
    report: &std::path::Path,
) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    let (req_fd, resp_fd) = if pass {
        (req.pass_to(&mut cmd), resp.pass_to(&mut cmd))
    } else {
        let mut scratch = Command::new("true");
        (req.pass_to(&mut scratch), resp.pass_to(&mut scratch))
    };
    cmd.args(["--exact", "sealed_child_process", "--test-threads=1"])
        .env(
            CHILD_ENV,
            format!("{role}:{req_fd}:{resp_fd}:{}", report.display()),
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// A worker that tries to truncate (and grow) its lanes is refused by the seals, and the
/// creator keeps reading and writing both mappings. Before sealed lanes the truncate succeeded
/// and the creator's next access to the mapping died with SIGBUS.
#[test]
fn a_hostile_child_cannot_truncate_and_the_creator_keeps_serving() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let req = Lane::create_sealed("skep-lane-req", CFG, GEN).unwrap();
    let resp = Lane::create_sealed("skep-lane-resp", CFG, GEN).unwrap();
    let scratch = Scratch::new("hostile");
    let report_path = scratch.0.join("report");
    let mut child = spawn_child("hostile", &req, &resp, true, &report_path);
    let give_up = Instant::now() + WAIT;
    while !report_path.exists() {
        assert!(Instant::now() < give_up, "the child never reported");
        std::thread::sleep(Duration::from_millis(5));
    }
    let report = std::fs::read_to_string(&report_path).unwrap();
    // Before any assertion that could hide it: touch both mappings. Had a shrink gone
    // through, this is where the process would die of SIGBUS.
    req.beat();
    resp.beat();
    assert!(!report.contains("done"), "a resize went through: {report}");
    assert_eq!(report.matches("PermissionDenied").count(), 6, "{report}");
    // Every header word and ring byte is still there to read and write.
    let mut buf = Vec::new();
    for i in 0..ROUNDS {
        let p = vec![i as u8; (i as usize * 7) % 1025];
        req.push_timeout(&p, WAIT).unwrap();
        assert!(resp.pop_timeout(&mut buf, WAIT).unwrap(), "no echo {i}");
        assert_eq!(buf, p);
    }
    assert!(resp.heartbeat_age() < WAIT);
    assert!(!req.is_dead() && !resp.is_dead());
    assert!(child.wait().unwrap().success());
}

/// `pass_to` hands a lane to the one child it was given for; another child spawned meanwhile
/// inherits nothing (the memfd stays close-on-exec in the parent).
#[test]
fn only_the_child_a_lane_is_passed_to_inherits_it() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let req = Lane::create_sealed("skep-lane-req", CFG, GEN).unwrap();
    let resp = Lane::create_sealed("skep-lane-resp", CFG, GEN).unwrap();
    let scratch = Scratch::new("bystander");
    let mut child = spawn_child("bystander", &req, &resp, false, &scratch.0.join("report"));
    assert!(child.wait().unwrap().success());
}
