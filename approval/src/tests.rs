//! The credential format: round trips, strict parsing, and every refusal `verify` gives.

use super::*;

const NOW: u64 = 1_800_000_000_000;
const ENV: &str = "skep-0123456789abcdef";

fn approval(key: &SigningKey, action: Action, spec: &[u8], env: &str, expires: u64) -> Approval {
    let claims = Claims::new(action, SpecHash::of(spec), env, expires).unwrap();
    Approval::sign(claims, key)
}

fn expect<'a>(action: Action, spec: &'a SpecHash) -> Expected<'a> {
    Expected {
        action,
        spec_hash: spec,
        env: ENV,
        now_unix_ms: NOW,
    }
}

#[test]
fn a_signed_approval_round_trips_and_verifies() {
    let key = SigningKey::generate().unwrap();
    let a = approval(&key, Action::ModelAdd, b"model bytes", ENV, NOW + 3_600_000);
    let text = a.to_text();
    let back = Approval::parse(&text).unwrap();
    assert_eq!(back, a);
    let spec = SpecHash::of(b"model bytes");
    assert_eq!(
        back.verify(&[key.public()], expect(Action::ModelAdd, &spec)),
        Ok(())
    );
}

#[test]
fn every_mismatch_is_refused_with_its_reason() {
    let key = SigningKey::generate().unwrap();
    let other = SigningKey::generate().unwrap();
    let spec = SpecHash::of(b"model bytes");
    let ttl = NOW + 3_600_000;
    let check = |a: Approval, want: Refusal| {
        assert_eq!(
            a.verify(&[key.public()], expect(Action::ModelAdd, &spec)),
            Err(want)
        );
    };
    check(
        approval(&other, Action::ModelAdd, b"model bytes", ENV, ttl),
        Refusal::UntrustedKey,
    );
    check(
        approval(&key, Action::NodeEnroll, b"model bytes", ENV, ttl),
        Refusal::WrongAction,
    );
    check(
        approval(&key, Action::ModelAdd, b"other bytes", ENV, ttl),
        Refusal::WrongSpecHash,
    );
    check(
        approval(&key, Action::ModelAdd, b"model bytes", "skep-other", ttl),
        Refusal::WrongEnvironment,
    );
    check(
        approval(&key, Action::ModelAdd, b"model bytes", ENV, NOW),
        Refusal::Expired,
    );
    check(
        approval(
            &key,
            Action::ModelAdd,
            b"model bytes",
            ENV,
            NOW + MAX_TTL_MS + 1,
        ),
        Refusal::TooLong,
    );
    // A field changed after signing: the signature no longer covers it.
    let mut forged = approval(&key, Action::NodeEnroll, b"model bytes", ENV, ttl);
    forged.claims.action = Action::ModelAdd;
    check(forged, Refusal::BadSignature);
    // A trusted key named on an approval another key signed.
    let mut stolen_name = approval(&other, Action::ModelAdd, b"model bytes", ENV, ttl);
    stolen_name.key = key.public();
    check(stolen_name, Refusal::BadSignature);
}

#[test]
fn the_signed_bytes_are_domain_separated_and_unambiguous() {
    let key = SigningKey::generate().unwrap();
    let a = approval(&key, Action::ModelAdd, b"x", ENV, NOW);
    let bytes = a.claims.signing_bytes();
    assert!(bytes.starts_with(SIGNING_DOMAIN));
    // A signature over the bare fields (no domain) is not an approval signature.
    let bare = key.pair.sign(&bytes[SIGNING_DOMAIN.len()..]);
    let mut text = a.to_text();
    let sig_line = format!("signature {}", hex::encode(a.signature));
    text = text.replace(
        &sig_line,
        &format!("signature {}", hex::encode(bare.as_ref())),
    );
    let spec = SpecHash::of(b"x");
    let e = Expected {
        now_unix_ms: NOW - 1,
        ..expect(Action::ModelAdd, &spec)
    };
    assert_eq!(
        Approval::parse(&text).unwrap().verify(&[key.public()], e),
        Err(Refusal::BadSignature)
    );
    // Moving bytes between adjacent fields changes the encoding (length prefixes).
    let mut c1 = a.claims.clone();
    c1.env = "ab".into();
    let mut c2 = a.claims.clone();
    c2.env = "a".into();
    assert_ne!(c1.signing_bytes(), c2.signing_bytes());
}

#[test]
fn parsing_is_strict() {
    let key = SigningKey::generate().unwrap();
    let text = approval(&key, Action::ModelAdd, b"x", ENV, NOW).to_text();
    // A bearer token, or anything else, is not an approval.
    for bad in ["", "skep_0123456789abcdef", "{\"action\":\"model.add\"}"] {
        assert!(
            matches!(Approval::parse(bad), Err(FormatError::NotAnApproval)),
            "{bad:?}"
        );
    }
    let variants = [
        text.replace("action model.add", "action model.delete"),
        text.replace("spec-hash sha256:", "spec-hash md5:"),
        text.replace("env skep-", "env skep/"),
        text.replace("expires-unix-ms ", "expires-unix-ms +"),
        text.replace("\nkey ", "\nkey  "),
        text.to_uppercase()
            .replacen("SKEP-APPROVAL-V1", APPROVAL_HEADER, 1),
        format!("{text}extra line\n"),
        text.replace("\nnonce", "\n\nnonce"),
        "x".repeat(MAX_APPROVAL_LEN + 1),
    ];
    for bad in &variants {
        assert!(Approval::parse(bad).is_err(), "accepted {bad:?}");
    }
    assert!(Approval::parse(&text).is_ok());
}

#[test]
fn key_files_round_trip_and_keep_the_secret_out_of_debug() {
    let key = SigningKey::generate().unwrap();
    let secret_text = key.to_text();
    let back = SigningKey::from_text(&secret_text).unwrap();
    assert_eq!(back.public(), key.public());
    let public = PublicKey::from_text(&key.public().to_text()).unwrap();
    assert_eq!(public, key.public());
    let seed_hex = secret_text.split(' ').nth(1).unwrap().trim().to_owned();
    assert!(!format!("{key:?}").contains(&seed_hex));
    assert!(!format!("{:?}", key.public()).contains(&seed_hex));
    // One file cannot be read as the other.
    assert!(PublicKey::from_text(&secret_text).is_err());
    assert!(SigningKey::from_text(&key.public().to_text()).is_err());
}

#[test]
fn spec_hashes_and_actions_parse_one_spelling() {
    let h = SpecHash::of(b"abc");
    assert_eq!(h.to_string().parse::<SpecHash>().unwrap(), h);
    assert!(h.to_string().to_uppercase().parse::<SpecHash>().is_err());
    assert!(hex::encode(h.0).parse::<SpecHash>().is_err());
    for a in ACTIONS {
        assert_eq!(a.as_str().parse::<Action>().unwrap(), a);
    }
    assert!("MODEL.ADD".parse::<Action>().is_err());
}
