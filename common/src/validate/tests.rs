//! Tests for input validation, including hostile inputs.
use super::*;
use proptest::prelude::*;

#[test]
fn identifiers() {
    for ok in ["smollm2", "gemma3-270m", "a.b_c-d", "x"] {
        assert_eq!(identifier("model", ok), Ok(()), "{ok}");
    }
    let long = "a".repeat(MAX_ID_LEN + 1);
    let bad = [
        ("", "empty"),
        ("../etc/passwd", "chars"),
        ("a..b", "traversal"),
        ("a b", "chars"),
        ("a;rm -rf", "chars"),
        ("$(id)", "chars"),
        ("a\0b", "chars"),
        ("\x1b[31m", "chars"),
        ("a\r\nb", "chars"),
        (".hidden", "chars"),
        ("-rf", "chars"),
        (long.as_str(), "long"),
        ("modèle", "chars"),
    ];
    for (s, why) in bad {
        let e = identifier("model", s).unwrap_err();
        assert!(
            !e.to_string().contains(s) || s.is_empty(),
            "message echoes input for {why}"
        );
    }
}

#[test]
fn prompts() {
    assert!(prompt("hello").is_ok());
    assert_eq!(prompt(""), Err(ValidationError::Empty { field: "prompt" }));
    assert_eq!(prompt("a\0b"), Err(ValidationError::Nul));
    let huge = "x".repeat(10 * 1024 * 1024);
    assert!(matches!(
        prompt(&huge),
        Err(ValidationError::TooLong { .. })
    ));
}

#[test]
fn token_counts() {
    assert_eq!(max_tokens(0), Ok(DEFAULT_MAX_TOKENS));
    assert_eq!(max_tokens(1), Ok(1));
    assert_eq!(max_tokens(MAX_TOKENS), Ok(MAX_TOKENS));
    assert_eq!(max_tokens(MAX_TOKENS + 1), Err(ValidationError::MaxTokens));
    assert_eq!(max_tokens(u32::MAX), Err(ValidationError::MaxTokens));
}

proptest! {
    #[test]
    fn validators_never_panic(s in ".*") {
        let _ = identifier("x", &s);
        let _ = prompt(&s);
    }
}
