//! Shared fixture for the audit integration tests: temp dirs, keys, realistic logs built through
//! real appends, and byte-level surgery on their lines (what an attacker with file access does).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use skep_audit::{
    AuditKey, AuditLog, AuditOptions, Checkpoint, Fields, FsyncPolicy, TamperKind, Verdict, events,
};

/// A directory removed when the test ends.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "skep-audit-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The key at `dir/key`, created on first use; call again for a second handle on the same key.
pub fn key(dir: &TempDir) -> AuditKey {
    AuditKey::load_or_create(&dir.join("key")).unwrap()
}

pub fn fast() -> AuditOptions {
    AuditOptions {
        max_file_bytes: u64::MAX,
        fsync: FsyncPolicy::Never,
    }
}

/// Appends the `i`-th of a cycle of realistic events.
pub fn append_realistic(log: &mut AuditLog, i: u64) -> u64 {
    let fp = format!("{:06x}", 0xa3f2c1 + (i % 3));
    let job = format!("job-{i:04}");
    let (event, actor, fields) = match i % 8 {
        0 => (
            events::TOKEN_CREATED,
            events::ACTOR_SYSTEM.to_owned(),
            Fields::new()
                .token(&format!("skep_{:064x}", i))
                .str("role", "client"),
        ),
        1 => (
            events::JOB_SUBMITTED,
            fp,
            Fields::new()
                .job(&job)
                .model("tiny-llama")
                .prompt("Write a haiku about bees")
                .num("max_tokens", 64),
        ),
        2 => (
            events::JOB_COMPLETED,
            "node:gpu-01".to_owned(),
            Fields::new().job(&job).node("gpu-01").num("tokens", 17),
        ),
        3 => (
            events::AUTH_FAILURE,
            "unknown".to_owned(),
            Fields::new().reason("invalid token"),
        ),
        4 => (
            events::JOB_REJECTED,
            fp,
            Fields::new().job(&job).reason("capacity"),
        ),
        5 => (
            events::NODE_ENROLLED,
            "node:gpu-02".to_owned(),
            Fields::new().node("gpu-02").num("slots", 4),
        ),
        6 => (
            events::JOB_DEADLINE_EXCEEDED,
            fp,
            Fields::new().job(&job).num("budget_ms", 1500),
        ),
        _ => (
            events::RATELIMIT_EXCEEDED,
            fp,
            Fields::new().num("limit_per_s", 10),
        ),
    };
    log.append(event, &actor, fields).unwrap()
}

/// A log of `n` realistic entries in `dir/log`; returns the log directory and final checkpoint.
pub fn build_log(dir: &TempDir, n: u64, opts: AuditOptions) -> (PathBuf, Checkpoint) {
    let logdir = dir.join("log");
    let mut log = AuditLog::open(&logdir, key(dir), opts).unwrap();
    for i in 0..n {
        append_realistic(&mut log, i);
    }
    (logdir, log.checkpoint())
}

pub fn first_file(logdir: &Path) -> PathBuf {
    skep_audit::audit_files(logdir).unwrap().remove(0)
}

/// The file's lines without their `\n` (all lines are assumed terminated).
pub fn read_lines(path: &Path) -> Vec<String> {
    let s = std::fs::read_to_string(path).unwrap();
    s.lines().map(str::to_owned).collect()
}

pub fn write_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(path, s).unwrap();
}

/// Hash of a line as the chain computes it (body = line minus the mac field). No key needed:
/// this is exactly what an attacker can compute.
pub fn body_hash(line: &str) -> String {
    let cut = line.len() - 74;
    let body = format!("{}}}", &line[..cut]);
    hex::encode(Sha256::digest(body.as_bytes()))
}

pub fn seq_of(line: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["seq"].as_u64().unwrap()
}

pub fn prev_of(line: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["prev"].as_str().unwrap().to_owned()
}

pub fn set_seq(line: &str, seq: u64) -> String {
    line.replacen(
        &format!("\"seq\":{},", seq_of(line)),
        &format!("\"seq\":{seq},"),
        1,
    )
}

pub fn set_prev(line: &str, prev: &str) -> String {
    line.replacen(
        &format!("\"prev\":\"{}\"", prev_of(line)),
        &format!("\"prev\":\"{prev}\""),
        1,
    )
}

/// Recomputes every `prev` from index `from` on, as an attacker without the key would after an
/// edit, so the hash chain alone looks whole again.
pub fn rechain(lines: &mut [String], from: usize) {
    for i in from.max(1)..lines.len() {
        let h = body_hash(&lines[i - 1]);
        lines[i] = set_prev(&lines[i], &h);
    }
}

pub fn verdict(paths: &[&Path], key: Option<&AuditKey>, cp: Option<&Checkpoint>) -> Verdict {
    let paths: Vec<PathBuf> = paths.iter().map(|p| p.to_path_buf()).collect();
    skep_audit::verify(&paths, key, cp)
}

/// `(seq, kind)` of a tampered verdict; panics with the verdict otherwise.
pub fn tampered(v: &Verdict) -> (u64, TamperKind) {
    match v {
        Verdict::Tampered { seq, kind, .. } => (*seq, *kind),
        other => panic!("expected tampered, got {other:?}"),
    }
}

pub fn intact_entries(v: &Verdict) -> u64 {
    match v {
        Verdict::Intact { entries, .. } => *entries,
        other => panic!("expected intact, got {other:?}"),
    }
}
