//! Property tests: the verifier never panics on arbitrary bytes, and with the key and a
//! checkpoint no single-byte change to a real log goes unnoticed.

#[path = "support/fixture.rs"]
mod fixture;

use fixture::*;
use proptest::prelude::*;
use skep_audit::Verdict;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn verify_never_panics_on_arbitrary_files(
        a in proptest::collection::vec(any::<u8>(), 0..2048),
        b in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let dir = TempDir::new("fuzz-bytes");
        std::fs::write(dir.join("audit-000001.jsonl"), &a).unwrap();
        std::fs::write(dir.join("audit-000002.jsonl"), &b).unwrap();
        let k = key(&dir);
        let _ = skep_audit::verify(&[dir.path().to_owned()], Some(&k), None);
        let _ = skep_audit::verify(&[dir.path().to_owned()], None, None);
    }

    #[test]
    fn verify_never_panics_on_mangled_entries(
        cut in 0usize..4000,
        junk in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let dir = TempDir::new("fuzz-mangle");
        let (logdir, cp) = build_log(&dir, 6, fast());
        let file = first_file(&logdir);
        let mut bytes = std::fs::read(&file).unwrap();
        let at = cut.min(bytes.len());
        bytes.splice(at..at, junk);
        std::fs::write(&file, &bytes).unwrap();
        let k = key(&dir);
        let _ = skep_audit::verify(std::slice::from_ref(&logdir), Some(&k), Some(&cp));
        let _ = skep_audit::verify(&[logdir], None, Some(&cp));
    }

    #[test]
    fn any_single_byte_change_is_detected_with_key_and_checkpoint(
        pos in 0usize..100_000,
        flip in 1u8..=255,
    ) {
        let dir = TempDir::new("fuzz-flip");
        let (logdir, cp) = build_log(&dir, 5, fast());
        let file = first_file(&logdir);
        let mut bytes = std::fs::read(&file).unwrap();
        let i = pos % bytes.len();
        bytes[i] ^= flip;
        std::fs::write(&file, &bytes).unwrap();
        let k = key(&dir);
        let v = skep_audit::verify(&[logdir], Some(&k), Some(&cp));
        prop_assert!(matches!(v, Verdict::Tampered { .. }), "byte {} ^ {}: {:?}", i, flip, v);
    }
}
