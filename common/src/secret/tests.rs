//! Tests for file-loaded secrets.
use super::*;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("skep-secret-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn generated_tokens_are_prefixed_random_and_distinct() {
    let a = Secret::generate();
    let b = Secret::generate();
    assert!(a.expose().starts_with(TOKEN_PREFIX));
    assert_eq!(a.expose().len(), TOKEN_PREFIX.len() + 64);
    assert_ne!(a.expose(), b.expose());
}

#[test]
fn written_secret_is_0600_and_reads_back() {
    let d = tmpdir("rw");
    let p = d.join("t");
    let s = Secret::generate();
    s.write_new(&p).unwrap();
    assert_eq!(
        fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(Secret::from_file(&p).unwrap().expose(), s.expose());
    assert!(matches!(s.write_new(&p), Err(SecretError::Exists { .. })));
}

#[test]
fn group_or_world_readable_file_is_refused_with_the_fix() {
    let d = tmpdir("perm");
    let p = d.join("t");
    fs::write(&p, "skep_abc").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    let err = Secret::from_file(&p).err().unwrap();
    assert!(matches!(err, SecretError::Permissions { mode: 0o644, .. }));
    assert!(err.to_string().contains("chmod 600"));
}

#[test]
fn empty_file_is_refused() {
    let d = tmpdir("empty");
    let p = d.join("t");
    fs::write(&p, "\n").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(
        Secret::from_file(&p),
        Err(SecretError::Empty { .. })
    ));
}
