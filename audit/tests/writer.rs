//! Acceptance tests for the writer: restart, rotation, crash repair, key checks and the guards
//! that keep raw prompts and tokens out of the log.

#[path = "support/fixture.rs"]
mod fixture;

use std::os::unix::fs::PermissionsExt;

use fixture::*;
use skep_audit::{
    AuditError, AuditLog, AuditOptions, Fields, FsyncPolicy, GENESIS, Verdict, events,
};

#[test]
fn first_entry_starts_from_genesis_and_seq_1() {
    let dir = TempDir::new("genesis");
    let (logdir, cp) = build_log(&dir, 1, fast());
    let line = &read_lines(&first_file(&logdir))[0];
    assert_eq!(seq_of(line), 1);
    assert_eq!(prev_of(line), GENESIS);
    assert_eq!(cp.seq, 1);
    assert_eq!(cp.head, body_hash(line));
}

#[test]
fn reopen_after_restart_continues_seq_and_chain() {
    let dir = TempDir::new("reopen");
    let logdir = dir.join("log");
    let mut log = AuditLog::open(&logdir, key(&dir), fast()).unwrap();
    for i in 0..5 {
        assert_eq!(append_realistic(&mut log, i), i + 1);
    }
    let before = log.checkpoint();
    drop(log);
    let mut log = AuditLog::open(&logdir, key(&dir), fast()).unwrap();
    assert_eq!(log.checkpoint(), before);
    for i in 5..10 {
        assert_eq!(append_realistic(&mut log, i), i + 1);
    }
    let cp = log.checkpoint();
    drop(log);
    let lines = read_lines(&first_file(&logdir));
    assert_eq!(prev_of(&lines[5]), before.head);
    let k = key(&dir);
    assert_eq!(
        intact_entries(&verdict(&[&logdir], Some(&k), Some(&cp))),
        10
    );
    // The old checkpoint still matches: the log only grew.
    assert!(verdict(&[&logdir], Some(&k), Some(&before)).is_intact());
}

#[test]
fn rotation_keeps_the_chain_verifiable() {
    let dir = TempDir::new("rotate");
    let opts = AuditOptions {
        max_file_bytes: 1200,
        fsync: FsyncPolicy::Batch(4),
    };
    let (logdir, cp) = build_log(&dir, 30, opts.clone());
    let files = skep_audit::audit_files(&logdir).unwrap();
    assert!(files.len() > 3, "{files:?}");
    for (i, f) in files.iter().enumerate() {
        assert_eq!(
            f.file_name().unwrap(),
            skep_audit::file_name(i as u64 + 1).as_str()
        );
        assert!(std::fs::metadata(f).unwrap().len() <= 1200);
        assert_eq!(
            std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // The first entry of each file chains to the last of the one before.
    for w in files.windows(2) {
        let last = read_lines(&w[0]).pop().unwrap();
        let first = read_lines(&w[1]).remove(0);
        assert_eq!(prev_of(&first), body_hash(&last));
        assert_eq!(seq_of(&first), seq_of(&last) + 1);
    }
    let k = key(&dir);
    match verdict(&[&logdir], Some(&k), Some(&cp)) {
        Verdict::Intact {
            entries, files: n, ..
        } => assert_eq!((entries, n), (30, files.len())),
        other => panic!("{other:?}"),
    }
    // Reopening continues in the newest file with the right seq.
    let mut log = AuditLog::open(&logdir, key(&dir), opts).unwrap();
    assert_eq!(append_realistic(&mut log, 30), 31);
    drop(log);
    assert_eq!(intact_entries(&verdict(&[&logdir], Some(&k), None)), 31);
}

#[test]
fn crash_right_after_rotation_resumes_from_the_previous_file() {
    let dir = TempDir::new("emptynewest");
    let (logdir, cp) = build_log(&dir, 4, fast());
    std::fs::write(logdir.join(skep_audit::file_name(2)), b"").unwrap();
    let mut log = AuditLog::open(&logdir, key(&dir), fast()).unwrap();
    assert_eq!(log.checkpoint(), cp);
    assert_eq!(append_realistic(&mut log, 4), 5);
    assert_eq!(log.current_file(), logdir.join(skep_audit::file_name(2)));
    drop(log);
    let k = key(&dir);
    assert_eq!(intact_entries(&verdict(&[&logdir], Some(&k), None)), 5);
}

#[test]
fn torn_tail_is_truncated_and_recorded_on_open() {
    let dir = TempDir::new("repair");
    let (logdir, cp) = build_log(&dir, 6, fast());
    let file = first_file(&logdir);
    let clean_len = std::fs::metadata(&file).unwrap().len();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(b"{\"v\":1,\"seq\":7,\"ts\":\"2025-");
    std::fs::write(&file, &bytes).unwrap();

    let mut log = AuditLog::open(&logdir, key(&dir), fast()).unwrap();
    assert_eq!(log.head().seq, 7, "the repair itself is entry 7");
    assert_eq!(append_realistic(&mut log, 6), 8);
    drop(log);
    let lines = read_lines(&file);
    assert_eq!(lines.len(), 8);
    let repair: serde_json::Value = serde_json::from_str(&lines[6]).unwrap();
    assert_eq!(repair["event"], events::AUDIT_TORN_TAIL);
    assert_eq!(repair["actor"], events::ACTOR_SYSTEM);
    assert_eq!(repair["fields"]["offset"], clean_len);
    assert_eq!(repair["fields"]["bytes"], 26);
    assert_eq!(prev_of(&lines[6]), cp.head);
    let k = key(&dir);
    match verdict(&[&logdir], Some(&k), Some(&cp)) {
        Verdict::Intact {
            entries, torn_tail, ..
        } => assert_eq!((entries, torn_tail), (8, None)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn open_refuses_to_extend_a_chain_signed_by_another_key() {
    let dir = TempDir::new("foreign");
    let (logdir, _) = build_log(&dir, 3, fast());
    let other = TempDir::new("foreign-key");
    match AuditLog::open(&logdir, key(&other), fast()) {
        Err(AuditError::Corrupt { .. }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened a log signed by another key"),
    }
}

#[test]
fn open_refuses_two_bad_lines_at_the_end() {
    let dir = TempDir::new("twobad");
    let (logdir, _) = build_log(&dir, 3, fast());
    let file = first_file(&logdir);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(b"garbage\nmore garbage");
    std::fs::write(&file, &bytes).unwrap();
    assert!(matches!(
        AuditLog::open(&logdir, key(&dir), fast()),
        Err(AuditError::Corrupt { .. })
    ));
}

#[test]
fn raw_prompts_tokens_and_bad_names_are_refused_without_appending() {
    let dir = TempDir::new("guards");
    let logdir = dir.join("log");
    let mut log = AuditLog::open(&logdir, key(&dir), fast()).unwrap();
    let token = skep_common::secret::Secret::generate();
    let refused = [
        log.append(
            events::JOB_SUBMITTED,
            "a3f2c1",
            Fields::new().str("prompt", "secret plans"),
        ),
        log.append(
            events::AUTH_FAILURE,
            "a3f2c1",
            Fields::new().str("header", token.expose()),
        ),
        log.append("Job Submitted", "a3f2c1", Fields::new()),
        log.append(
            events::JOB_SUBMITTED,
            "a3f2c1\n{\"forged\":1}",
            Fields::new(),
        ),
        log.append(
            events::JOB_SUBMITTED,
            "a3f2c1",
            Fields::new().str("reason", &"x".repeat(70_000)),
        ),
    ];
    assert!(refused.iter().all(Result::is_err), "{refused:?}");
    assert_eq!(log.head().seq, 0);
    let seq = log
        .append(
            events::JOB_SUBMITTED,
            &skep_common::auth::fingerprint(token.expose()),
            Fields::new().job("job-1").prompt("secret plans"),
        )
        .unwrap();
    assert_eq!(seq, 1);
    drop(log);
    let text = std::fs::read_to_string(first_file(&logdir)).unwrap();
    assert!(!text.contains("secret plans"));
    assert!(!text.contains(token.expose()));
    assert!(text.contains("prompt_sha256"));
}

#[test]
fn files_and_directory_are_private() {
    let dir = TempDir::new("perms");
    let (logdir, _) = build_log(&dir, 1, AuditOptions::default());
    assert_eq!(
        std::fs::metadata(&logdir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let f = first_file(&logdir);
    assert_eq!(
        std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn writer_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<AuditLog>();
}

#[test]
fn read_entries_yields_every_entry_in_order() {
    let dir = TempDir::new("read");
    let opts = AuditOptions {
        max_file_bytes: 1000,
        fsync: FsyncPolicy::Never,
    };
    let (logdir, _) = build_log(&dir, 12, opts);
    let seqs: Vec<u64> = skep_audit::read_entries(&[logdir])
        .unwrap()
        .map(|r| r.unwrap().2.seq)
        .collect();
    assert_eq!(seqs, (1..=12).collect::<Vec<_>>());
}
