//! Tests for deadline arithmetic.
use super::*;

#[test]
fn parses_every_unit() {
    let cases = [
        ("2H", Duration::from_secs(7200)),
        ("3M", Duration::from_secs(180)),
        ("4S", Duration::from_secs(4)),
        ("5m", Duration::from_millis(5)),
        ("6u", Duration::from_micros(6)),
        ("7n", Duration::from_nanos(7)),
        ("99999999S", Duration::from_secs(99_999_999)),
        ("0m", Duration::ZERO),
    ];
    for (s, d) in cases {
        assert_eq!(parse_grpc_timeout(s), Ok(d), "{s}");
    }
}

#[test]
fn rejects_malformed_timeouts() {
    for s in [
        "",
        "S",
        "1",
        "123456789S",
        "1s",
        "1 S",
        "-1S",
        "1.5S",
        "1SS",
        "１S",
        "1é",
    ] {
        assert!(parse_grpc_timeout(s).is_err(), "{s:?} should be rejected");
    }
}

#[test]
fn encode_round_trips_without_growing() {
    for d in [
        Duration::from_nanos(1),
        Duration::from_millis(1500),
        Duration::from_secs(30),
        Duration::from_secs(3 * 86400),
        Duration::MAX,
    ] {
        let s = encode_grpc_timeout(d);
        let back = parse_grpc_timeout(&s).unwrap();
        assert!(back <= d, "{d:?} -> {s} -> {back:?}");
    }
    assert_eq!(encode_grpc_timeout(Duration::from_secs(30)), "30000000u");
}

#[test]
fn budget_takes_the_smaller_and_refuses_none_or_zero() {
    let s = Duration::from_secs;
    assert_eq!(budget(Some(s(5)), 3000), Ok(s(3)));
    assert_eq!(budget(Some(s(2)), 3000), Ok(s(2)));
    assert_eq!(budget(None, 1000), Ok(s(1)));
    assert_eq!(budget(Some(s(1)), 0), Ok(s(1)));
    assert_eq!(budget(None, 0), Err(DeadlineError::Missing));
    assert_eq!(budget(Some(Duration::ZERO), 0), Err(DeadlineError::Zero));
    assert_eq!(budget(None, u64::MAX), Ok(MAX_BUDGET));
}

#[test]
fn deadline_remaining_and_exceeded() {
    let start = Instant::now();
    let d = Deadline::from_start(start, Duration::from_millis(100));
    assert!(d.remaining() <= Duration::from_millis(100));
    assert_eq!(d.exceeded_by(start), None);
    assert_eq!(
        d.exceeded_by(start + Duration::from_millis(150)),
        Some(Duration::from_millis(50))
    );
    let past = Deadline::from_start(start, Duration::ZERO);
    assert!(past.is_expired());
    assert_eq!(past.remaining(), Duration::ZERO);
}
