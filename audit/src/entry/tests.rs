//! Tests for the canonical entry form and the `Fields` guards.
use super::*;

fn line_for(fields: &Map<String, Value>) -> (Vec<u8>, String) {
    encode(
        7,
        "2025-10-10T16:48:05.123Z",
        "job.submitted",
        "a3f2c1",
        fields,
        "0123456789abcdef",
        GENESIS,
        sha256_hex,
    )
    .unwrap()
}

#[test]
fn encoded_line_parses_back_to_the_same_body_and_hash() {
    let fields = Fields::new().job("job-1").prompt("hello").into_map();
    let (line, hash) = line_for(&fields);
    assert_eq!(line.last(), Some(&b'\n'));
    let p = parse(&line[..line.len() - 1]).unwrap();
    assert_eq!(p.hash, hash);
    assert_eq!(p.entry.seq, 7);
    assert_eq!(p.entry.fields, fields);
    // The MAC (here: a stand-in hash) is over exactly the body the parser recovers.
    assert_eq!(p.entry.mac, sha256_hex(&p.body));
    assert!(p.body.starts_with(b"{\"v\":1,\"seq\":7,\"ts\":"));
}

#[test]
fn body_field_order_is_fixed() {
    let (line, _) = line_for(&Map::new());
    let s = String::from_utf8(line).unwrap();
    let order = [
        "\"v\"",
        "\"seq\"",
        "\"ts\"",
        "\"event\"",
        "\"actor\"",
        "\"fields\"",
        "\"kid\"",
        "\"prev\"",
        "\"mac\"",
    ];
    let pos: Vec<usize> = order.iter().map(|k| s.find(k).unwrap()).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{s}");
}

#[test]
fn parse_refuses_extra_fields_and_wrong_shapes() {
    let (line, _) = line_for(&Map::new());
    let line = &line[..line.len() - 1];
    let s = std::str::from_utf8(line).unwrap();
    assert!(parse(s.replacen("{\"v\":1,", "{\"v\":1,\"x\":1,", 1).as_bytes()).is_err());
    assert!(parse(s.replacen("\"v\":1", "\"v\":2", 1).as_bytes()).is_err());
    assert!(parse(&line[..line.len() - 1]).is_err());
    assert!(parse(b"").is_err());
    assert!(parse(b"{}").is_err());
}

#[test]
fn prompt_is_recorded_as_length_and_hash_only() {
    let (len, sha) = prompt_fields("abc");
    assert_eq!(len, 3);
    assert_eq!(
        sha,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let f = Fields::new().prompt("abc").into_map();
    assert_eq!(f["prompt_len"], 3);
    assert!(!serde_json::to_string(&f).unwrap().contains("\"abc\""));
}

#[test]
fn token_is_recorded_as_fingerprint() {
    let tok = format!("skep_{}", "ab".repeat(32));
    let f = Fields::new().token(&tok).into_map();
    assert_eq!(f["token_fp"].as_str().unwrap().len(), 6);
    check_fields(&f).unwrap();
}

#[test]
fn raw_tokens_and_secret_field_names_are_refused() {
    let tok = format!("skep_{}", "ab".repeat(32));
    let bad = [
        Fields::new().str("note", &format!("bearer {tok}")),
        Fields::new().value("nested", serde_json::json!({"a": [tok.clone()]})),
        Fields::new().str("prompt", "hello"),
        Fields::new().str("Token", "x"),
        Fields::new().str(&tok, "x"),
    ];
    for f in bad {
        assert!(
            matches!(
                check_fields(&f.clone().into_map()),
                Err(AuditError::Sensitive { .. })
            ),
            "{f:?}"
        );
    }
    check_fields(&Fields::new().str("model", "skep_tiny").into_map()).unwrap();
}

#[test]
fn event_and_actor_charsets() {
    check_event("job.deadline_exceeded").unwrap();
    assert!(check_event("").is_err());
    assert!(check_event("Job.Submitted").is_err());
    assert!(check_event("job\nsubmitted").is_err());
    check_actor("a3f2c1").unwrap();
    check_actor("node:gpu-01").unwrap();
    assert!(check_actor("").is_err());
    assert!(check_actor("a b").is_err());
    assert!(check_actor(&"a".repeat(129)).is_err());
}

#[test]
fn oversized_entries_are_refused() {
    let f = Fields::new()
        .str("reason", &"x".repeat(MAX_LINE_BYTES))
        .into_map();
    let r = encode(
        1,
        "t",
        "e",
        "a",
        &f,
        "0123456789abcdef",
        GENESIS,
        sha256_hex,
    );
    assert!(matches!(r, Err(AuditError::TooLarge { .. })));
}
