//! Tests for bearer parsing, digests and the bind policy.
use super::*;

#[test]
fn accepts_exact_bearer_token68() {
    for ok in [
        "Bearer abc",
        "Bearer skep_0123abcd",
        "Bearer a-b.c_d~e+f/g==",
        "Bearer x=",
    ] {
        assert!(parse_bearer(ok.as_bytes()).is_ok(), "{ok:?} should parse");
    }
    assert_eq!(parse_bearer(b"Bearer tok").unwrap(), "tok");
}

#[test]
fn rejects_everything_else() {
    let long = format!("Bearer {}", "a".repeat(MAX_AUTHORIZATION_LEN));
    let cases: &[&[u8]] = &[
        b"",
        b"Bearer",
        b"Bearer ",
        b"bearer abc",
        b"Basic abc",
        b"Bearer  abc",
        b"Bearer abc ",
        b" Bearer abc",
        b"Bearer a\tb",
        b"Bearer a\x00b",
        b"Bearer a\r\nX-Injected: 1",
        b"Bearer \x1b[31mred",
        b"Bearer ===",
        b"Bearer a=b",
        "Bearer caf\u{e9}".as_bytes(),
        long.as_bytes(),
    ];
    for bad in cases {
        assert_eq!(parse_bearer(bad), Err(AuthError::Malformed), "{bad:?}");
    }
}

#[test]
fn digest_compare_and_fingerprint() {
    let a = TokenDigest::of("skep_a");
    assert!(a.ct_eq(&TokenDigest::of("skep_a")));
    assert!(!a.ct_eq(&TokenDigest::of("skep_b")));
    let fp = a.fingerprint();
    assert_eq!(fp.len(), 6);
    assert!(fp.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(!format!("{a:?}").contains(&a.to_hex()));
    // Multi-byte input must not panic (the system in the seeds sliced strings and did).
    assert_eq!(fingerprint("日本語トークン").len(), 6);
}

#[test]
fn find_digest_finds_the_match_only() {
    let known = [TokenDigest::of("one"), TokenDigest::of("two")];
    let found = find_digest(&TokenDigest::of("two"), known.iter().zip(["1", "2"]));
    assert_eq!(found, Some("2"));
    assert_eq!(
        find_digest(&TokenDigest::of("three"), known.iter().zip([1, 2])),
        None
    );
}

#[test]
fn missing_header_is_missing() {
    assert_eq!(bearer_digest(&MetadataMap::new()), Err(AuthError::Missing));
}

#[test]
fn bind_policy() {
    let (lo4, lo6) = ("127.0.0.1:1".parse().unwrap(), "[::1]:1".parse().unwrap());
    let (any4, any6) = ("0.0.0.0:1".parse().unwrap(), "[::]:1".parse().unwrap());
    let lan = "10.1.2.3:7700".parse().unwrap();
    // Loopback: plaintext is fine, with or without the flag, and is not "exposed".
    assert_eq!(check_bind(lo4, true, false), Ok(false));
    assert_eq!(check_bind(lo6, true, false), Ok(false));
    for addr in [lo4, lo6, any4, any6, lan] {
        // TLS: any address.
        assert_eq!(check_bind(addr, false, false), Ok(false));
    }
    for addr in [any4, any6, lan] {
        // Plaintext off loopback: refused, naming the escape hatch...
        let err = check_bind(addr, true, false).unwrap_err();
        assert_eq!(err, AuthError::InsecureBind(addr));
        assert!(err.to_string().contains("--insecure-plaintext"), "{err}");
        // ...unless the operator insists, and then it is reported as exposed (warned).
        assert_eq!(check_bind(addr, true, true), Ok(true));
    }
}
