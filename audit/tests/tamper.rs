//! Acceptance tests for the verifier: a log built through real appends, then each kind of
//! tampering applied to the file bytes, each detected with the right kind and first bad seq.

#[path = "support/fixture.rs"]
mod fixture;

use fixture::*;
use skep_audit::{AuditKey, AuditLog, AuditOptions, FsyncPolicy, TamperKind, Verdict};

const N: u64 = 20;

/// A one-file log of `N` entries: (temp dir, log file, checkpoint).
fn log() -> (TempDir, std::path::PathBuf, skep_audit::Checkpoint) {
    let dir = TempDir::new("tamper");
    let (logdir, cp) = build_log(&dir, N, fast());
    let file = first_file(&logdir);
    (dir, file, cp)
}

#[test]
fn untouched_log_is_intact_with_and_without_key() {
    let (dir, file, cp) = log();
    let k = key(&dir);
    let v = verdict(&[&file], Some(&k), Some(&cp));
    match &v {
        Verdict::Intact {
            entries,
            files,
            head,
            authenticated,
            checkpoint_matched,
            torn_tail,
        } => {
            assert_eq!((*entries, *files), (N, 1));
            assert_eq!(head.seq, N);
            assert_eq!(head.hash, cp.head);
            assert!(*authenticated && *checkpoint_matched);
            assert!(torn_tail.is_none());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(v.exit_code(), 0);
    assert_eq!(intact_entries(&verdict(&[&file], None, None)), N);
    // A directory stands for its files.
    assert_eq!(
        intact_entries(&verdict(&[file.parent().unwrap()], Some(&k), Some(&cp))),
        N
    );
}

#[test]
fn edited_field_is_edited_at_that_seq() {
    let (dir, file, cp) = log();
    let mut lines = read_lines(&file);
    assert!(lines[9].contains("job-"), "{}", lines[9]);
    lines[9] = lines[9].replacen("job-", "jab-", 1);
    write_lines(&file, &lines);
    let k = key(&dir);
    let v = verdict(&[&file], Some(&k), Some(&cp));
    assert_eq!(tampered(&v), (10, TamperKind::Edited), "{v:?}");
    assert_eq!(v.exit_code(), 1);
    if let Verdict::Tampered { line, .. } = v {
        assert_eq!(line, 10);
    }
    // Without the key the successor's `prev` gives it away, and names the same entry.
    assert_eq!(
        tampered(&verdict(&[&file], None, None)),
        (10, TamperKind::Edited)
    );
}

#[test]
fn edited_and_rechained_is_caught_by_the_mac() {
    let (dir, file, cp) = log();
    let mut lines = read_lines(&file);
    lines[4] = lines[4].replacen("\"ts\":\"2", "\"ts\":\"1", 1);
    rechain(&mut lines, 5);
    write_lines(&file, &lines);
    let k = key(&dir);
    assert_eq!(
        tampered(&verdict(&[&file], Some(&k), None)),
        (5, TamperKind::Edited)
    );
    // Keyless, a full rechain is only visible against the checkpoint.
    assert!(verdict(&[&file], None, None).is_intact());
    assert_eq!(
        tampered(&verdict(&[&file], None, Some(&cp))),
        (N, TamperKind::Edited)
    );
}

#[test]
fn damaged_mac_alone_is_bad_mac() {
    let (dir, file, _) = log();
    let mut lines = read_lines(&file);
    let l = &lines[6];
    let i = l.len() - 3;
    let c = if &l[i..i + 1] == "0" { "1" } else { "0" };
    lines[6] = format!("{}{c}{}", &l[..i], &l[i + 1..]);
    write_lines(&file, &lines);
    let k = key(&dir);
    assert_eq!(
        tampered(&verdict(&[&file], Some(&k), None)),
        (7, TamperKind::BadMac)
    );
    // The content is untouched, so the chain alone has nothing to say.
    assert!(verdict(&[&file], None, None).is_intact());
}

#[test]
fn deleted_middle_line_is_deleted() {
    let (dir, file, cp) = log();
    let mut lines = read_lines(&file);
    lines.remove(7);
    write_lines(&file, &lines);
    let k = key(&dir);
    assert_eq!(
        tampered(&verdict(&[&file], Some(&k), Some(&cp))),
        (8, TamperKind::Deleted)
    );
    assert_eq!(
        tampered(&verdict(&[&file], None, None)),
        (8, TamperKind::Deleted)
    );
}

#[test]
fn swapped_lines_are_reordered() {
    let (dir, file, _) = log();
    let mut lines = read_lines(&file);
    lines.swap(11, 12);
    write_lines(&file, &lines);
    let k = key(&dir);
    assert_eq!(
        tampered(&verdict(&[&file], Some(&k), None)),
        (12, TamperKind::Reordered)
    );
    assert_eq!(
        tampered(&verdict(&[&file], None, None)),
        (12, TamperKind::Reordered)
    );
}

/// A forged entry 11 that chains onto 10 (anyone can compute the hash) with a made-up MAC.
fn forged_after_10(lines: &[String]) -> String {
    let f = lines[9].replacen("\"actor\":\"", "\"actor\":\"f", 1);
    let f = set_prev(&set_seq(&f, 11), &body_hash(&lines[9]));
    format!("{}{}\"}}", &f[..f.len() - 66], "ab".repeat(32))
}

#[test]
fn forged_insert_is_inserted() {
    let (dir, file, _) = log();
    let mut lines = read_lines(&file);
    let forged = forged_after_10(&lines);
    lines.insert(10, forged);
    write_lines(&file, &lines);
    let k = key(&dir);
    let v = verdict(&[&file], Some(&k), None);
    assert_eq!(tampered(&v), (11, TamperKind::Inserted), "{v:?}");
    // Keyless the forgery itself passes, but the real 11 then duplicates it.
    assert_eq!(
        tampered(&verdict(&[&file], None, None)),
        (11, TamperKind::Inserted)
    );
}

#[test]
fn replayed_old_line_is_inserted() {
    let (dir, file, _) = log();
    let mut lines = read_lines(&file);
    let old = lines[4].clone();
    lines.insert(10, old);
    write_lines(&file, &lines);
    let k = key(&dir);
    assert_eq!(
        tampered(&verdict(&[&file], Some(&k), None)),
        (5, TamperKind::Inserted)
    );
    assert_eq!(
        tampered(&verdict(&[&file], None, None)),
        (5, TamperKind::Inserted)
    );
}

#[test]
fn cut_tail_is_truncated_against_the_checkpoint() {
    let (dir, file, cp) = log();
    let mut lines = read_lines(&file);
    lines.truncate(17);
    write_lines(&file, &lines);
    let k = key(&dir);
    let v = verdict(&[&file], Some(&k), Some(&cp));
    assert_eq!(tampered(&v), (18, TamperKind::Truncated), "{v:?}");
    assert_eq!(
        tampered(&verdict(&[&file], None, Some(&cp))),
        (18, TamperKind::Truncated)
    );
    // Without a checkpoint a clean cut is indistinguishable from a shorter log (documented).
    assert_eq!(intact_entries(&verdict(&[&file], Some(&k), None)), 17);
}

#[test]
fn rewound_counter_is_counter_regression() {
    let (dir, file, _) = log();
    let mut lines = read_lines(&file);
    for (i, line) in lines.iter_mut().enumerate().skip(12) {
        *line = set_seq(line, i as u64 - 2);
    }
    rechain(&mut lines, 13);
    write_lines(&file, &lines);
    let k = key(&dir);
    assert_eq!(
        tampered(&verdict(&[&file], Some(&k), None)),
        (13, TamperKind::CounterRegression)
    );
    assert_eq!(
        tampered(&verdict(&[&file], None, None)),
        (13, TamperKind::CounterRegression)
    );
}

#[test]
fn chain_restarted_from_genesis_mid_log_is_counter_regression() {
    let (dir, file, _) = log();
    let other = TempDir::new("restart");
    std::fs::copy(dir.join("key"), other.join("key")).unwrap();
    let (otherlog, _) = build_log(&other, 3, fast());
    let mut lines = read_lines(&file);
    lines.extend(read_lines(&first_file(&otherlog)));
    write_lines(&file, &lines);
    let k = key(&dir);
    assert_eq!(
        tampered(&verdict(&[&file], Some(&k), None)),
        (N + 1, TamperKind::CounterRegression)
    );
}

/// Two logs rotated identically, so their files cover the same sequence numbers.
fn rotated_pair(
    same_key: bool,
) -> (
    TempDir,
    TempDir,
    Vec<std::path::PathBuf>,
    Vec<std::path::PathBuf>,
) {
    let opts = AuditOptions {
        max_file_bytes: 1500,
        fsync: FsyncPolicy::Never,
    };
    let a = TempDir::new("splice-a");
    let b = TempDir::new("splice-b");
    if same_key {
        key(&a);
        std::fs::copy(a.join("key"), b.join("key")).unwrap();
    }
    let (la, _) = build_log(&a, N, opts.clone());
    // Entries are stamped to the millisecond: with the same key, two logs built within the same
    // milliseconds are byte-identical, and a "splice" of identical files is no tampering at all.
    // A pause makes every entry of `b` later than every entry of `a`.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let (lb, _) = build_log(&b, N, opts);
    let fa = skep_audit::audit_files(&la).unwrap();
    let fb = skep_audit::audit_files(&lb).unwrap();
    assert!(fa.len() >= 3, "{fa:?}");
    assert_eq!(fa.len(), fb.len());
    (a, b, fa, fb)
}

#[test]
fn files_spliced_from_another_log_are_spliced() {
    for same_key in [true, false] {
        let (a, _b, fa, fb) = rotated_pair(same_key);
        let first_of_second = seq_of(&read_lines(&fa[1])[0]);
        assert_eq!(first_of_second, seq_of(&read_lines(&fb[1])[0]));
        let spliced = [fa[0].as_path(), fb[1].as_path(), fb[2].as_path()];
        let k = key(&a);
        let v = verdict(&spliced, Some(&k), None);
        assert_eq!(
            tampered(&v),
            (first_of_second, TamperKind::Spliced),
            "{v:?}"
        );
        if let Verdict::Tampered { file, line, .. } = &v {
            assert_eq!((file, *line), (&fb[1], 1));
        }
        assert_eq!(
            tampered(&verdict(&spliced, None, None)),
            (first_of_second, TamperKind::Spliced)
        );
    }
}

#[test]
fn missing_middle_file_is_deleted() {
    let (a, _b, fa, _) = rotated_pair(true);
    let first_missing = seq_of(&read_lines(&fa[1])[0]);
    let k = key(&a);
    let v = verdict(&[fa[0].as_path(), fa[2].as_path()], Some(&k), None);
    assert_eq!(tampered(&v), (first_missing, TamperKind::Deleted), "{v:?}");
}

#[test]
fn torn_final_line_is_reported_not_tampered() {
    let (dir, file, _) = log();
    let lines = read_lines(&file);
    let mut bytes = std::fs::read(&file).unwrap();
    // A crash mid-write: half of a would-be next line, no newline.
    bytes.extend_from_slice(&lines[3].as_bytes()[..40]);
    std::fs::write(&file, &bytes).unwrap();
    let k = key(&dir);
    match verdict(&[&file], Some(&k), None) {
        Verdict::Intact {
            entries, torn_tail, ..
        } => {
            assert_eq!(entries, N);
            let t = torn_tail.expect("torn tail reported");
            assert_eq!((t.line, t.bytes), (N + 1, 40));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn zero_filled_final_line_is_torn_but_in_the_middle_is_edited() {
    let (dir, file, _) = log();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(&[0u8; 512]);
    bytes.push(b'\n');
    std::fs::write(&file, &bytes).unwrap();
    let k = key(&dir);
    assert_eq!(intact_entries(&verdict(&[&file], Some(&k), None)), N);

    let mut lines = read_lines(&file);
    lines.pop();
    lines.insert(5, "{\"not\":\"an entry\"}".into());
    write_lines(&file, &lines);
    assert_eq!(
        tampered(&verdict(&[&file], Some(&k), None)),
        (6, TamperKind::Edited)
    );
}

#[test]
fn edited_last_entry_needs_the_key_or_the_checkpoint() {
    let (dir, file, cp) = log();
    let mut lines = read_lines(&file);
    let last = lines.len() - 1;
    lines[last] = lines[last].replacen("\"ts\":\"2", "\"ts\":\"1", 1);
    write_lines(&file, &lines);
    let k = key(&dir);
    assert_eq!(
        tampered(&verdict(&[&file], Some(&k), None)),
        (N, TamperKind::Edited)
    );
    assert_eq!(
        tampered(&verdict(&[&file], None, Some(&cp))),
        (N, TamperKind::Edited)
    );
    assert!(verdict(&[&file], None, None).is_intact());
}

#[test]
fn unverifiable_inputs_are_inconclusive() {
    let (dir, file, cp) = log();
    let other = TempDir::new("otherkey");
    let wrong = key(&other);
    let v = verdict(&[&file], Some(&wrong), None);
    assert!(matches!(v, Verdict::Inconclusive { .. }), "{v:?}");
    assert_eq!(v.exit_code(), 2);
    // A checkpoint signed by another key is not evidence.
    let k = key(&dir);
    let mut forged = cp.clone();
    forged.seq += 5;
    assert!(matches!(
        verdict(&[&file], Some(&k), Some(&forged)),
        Verdict::Inconclusive { .. }
    ));
    assert!(matches!(
        verdict(&[&dir.join("nope.jsonl")], Some(&k), None),
        Verdict::Inconclusive { .. }
    ));
    let empty = TempDir::new("empty");
    assert!(matches!(
        verdict(&[empty.path()], Some(&k), None),
        Verdict::Inconclusive { .. }
    ));
    assert!(AuditKey::from_file(&other.join("missing-key")).is_err());
}

#[test]
fn verdict_serializes_to_one_json_object() {
    let (dir, file, _) = log();
    let mut lines = read_lines(&file);
    lines.remove(3);
    write_lines(&file, &lines);
    let k = key(&dir);
    let v = verdict(&[&file], Some(&k), None);
    let j: serde_json::Value = serde_json::to_value(&v).unwrap();
    assert_eq!(j["verdict"], "tampered");
    assert_eq!(j["kind"], "deleted");
    assert_eq!(j["seq"], 4);
}

#[test]
fn appending_after_a_tamper_still_fails_verification() {
    // The writer resumes from the last line; an edit before it stays visible.
    let (dir, file, _) = log();
    let mut lines = read_lines(&file);
    lines[2] = lines[2].replacen("\"ts\":\"2", "\"ts\":\"1", 1);
    write_lines(&file, &lines);
    let mut log = AuditLog::open(file.parent().unwrap(), key(&dir), fast()).unwrap();
    append_realistic(&mut log, 99);
    drop(log);
    let k = key(&dir);
    assert_eq!(
        tampered(&verdict(&[&file], Some(&k), None)),
        (3, TamperKind::Edited)
    );
}
