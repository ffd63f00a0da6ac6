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

#[test]
fn lane_request_bound() {
    // seq 11 + job id 66 + model 66 + prompt 1+3+64 KiB + max_tokens 6 + deadline 11 + mac 34
    // + temperature 5 + top_p 5 + seed 11.
    assert_eq!(
        MAX_LANE_REQUEST_BYTES,
        11 + 66 + 66 + 4 + MAX_PROMPT_BYTES + 6 + 11 + 34 + 5 + 5 + 11
    );
    let id = "j".repeat(MAX_ID_LEN);
    let model = "m".repeat(MAX_ID_LEN);
    let longest = "p".repeat(MAX_PROMPT_BYTES);
    assert!(prompt(&longest).is_ok());
    assert!(lane_request(id.len(), model.len(), longest.len(), MAX_LANE_REQUEST_BYTES).is_ok());
    // A lane sized by the prompt limit alone (the old 64 KiB) cannot hold a valid request.
    assert_eq!(
        lane_request(id.len(), model.len(), longest.len(), MAX_PROMPT_BYTES),
        Err(ValidationError::LaneRequestTooLarge {
            max: MAX_PROMPT_BYTES
        })
    );
    assert!(lane_request(1, 1, 1, MAX_LANE_REQUEST_BYTES).is_ok());
    assert!(
        lane_request(
            MAX_ID_LEN,
            MAX_ID_LEN,
            MAX_PROMPT_BYTES + 1,
            MAX_LANE_REQUEST_BYTES
        )
        .is_err()
    );
}

#[test]
fn sampling_ranges() {
    use crate::sampling::Sampling;
    let ok = |temperature, top_p| Sampling {
        temperature,
        top_p,
        seed: 7,
    };
    for (t, p) in [(0.0, 0.0), (2.0, 1.0), (0.8, 0.95)] {
        assert_eq!(sampling(&ok(t, p)), Ok(()), "{t} {p}");
    }
    for t in [-0.1, 2.01, 3.0, f32::NAN, f32::INFINITY] {
        assert_eq!(
            sampling(&ok(t, 0.0)),
            Err(ValidationError::Temperature),
            "{t}"
        );
    }
    for p in [-0.1, 1.01, f32::NAN] {
        assert_eq!(sampling(&ok(0.5, p)), Err(ValidationError::TopP), "{p}");
    }
    assert!(
        ValidationError::Temperature
            .to_string()
            .contains("temperature")
    );
    assert!(ValidationError::TopP.to_string().contains("top_p"));
}
