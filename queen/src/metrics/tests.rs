//! Unit tests of the queen's metrics: what each transition moves, and what the text says.

use std::time::Duration;

use super::*;

/// The value of the sample named `name` with exactly these labels (in order), if present.
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let head = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&head))
        .map(|v| v.trim().parse().expect("a number"))
}

fn timings() -> Timings {
    Timings {
        admission_us: 100,
        queue_wait_us: 2_000,
        dispatch_us: 300,
        pool_us: 400,
        worker_first_token_us: 20_000,
        generation_us: 45_000,
        total_us: 70_000,
    }
}

fn end<'a>(t: &'a Timings, finish: Finish, running_on: Option<&'a str>) -> JobEnd<'a> {
    JobEnd {
        model: "m1",
        running_on,
        node: "n1",
        sent: running_on.is_some(),
        finish,
        tokens: 10,
        max_tokens: 16,
        prompt_tokens: 5,
        budget: Duration::from_secs(1),
        timings: t,
    }
}

#[test]
fn names_carry_the_colon_prefix_and_the_text_ends_in_eof() {
    let m = Metrics::new();
    m.admitted("m1");
    let text = m.render();
    assert!(
        text.contains("# TYPE skep:num_requests_waiting gauge"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(
        sample(&text, "skep:num_requests_waiting", "model=\"m1\""),
        Some(1.0)
    );
}

#[test]
fn a_job_moves_from_waiting_to_running_to_done() {
    let m = Metrics::new();
    let t = timings();
    m.admitted("m1");
    m.sent("m1", None, "n1");
    let text = m.render();
    assert_eq!(
        sample(&text, "skep:num_requests_waiting", "model=\"m1\""),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "skep:num_requests_running",
            "model=\"m1\",node=\"n1\""
        ),
        Some(1.0)
    );
    m.ended(&end(&t, Finish::Done, Some("n1")));
    let text = m.render();
    let mn = "model=\"m1\",node=\"n1\"";
    assert_eq!(sample(&text, "skep:num_requests_running", mn), Some(0.0));
    assert_eq!(
        sample(&text, "skep:generation_tokens_total", mn),
        Some(10.0)
    );
    assert_eq!(sample(&text, "skep:prompt_tokens_total", mn), Some(5.0));
    assert_eq!(
        sample(
            &text,
            "skep:request_success_total",
            "model=\"m1\",finished_reason=\"stop\""
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "skep:deadline_met_total", "model=\"m1\""),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "skep:inter_token_latency_seconds_count",
            "model=\"m1\""
        ),
        Some(9.0)
    );
    let itl_sum = sample(
        &text,
        "skep:inter_token_latency_seconds_sum",
        "model=\"m1\"",
    )
    .unwrap();
    assert!((itl_sum - 0.045).abs() < 1e-9, "{itl_sum}");
    assert_eq!(
        sample(&text, "skep:hop_seconds_count", "model=\"m1\",hop=\"pool\""),
        Some(1.0)
    );
    let slack = sample(&text, "skep:deadline_slack_seconds_sum", "model=\"m1\"").unwrap();
    assert!((slack - 0.93).abs() < 1e-9, "{slack}");
}

#[test]
fn a_failover_goes_back_to_waiting_and_a_queue_miss_is_staged() {
    let m = Metrics::new();
    let t = Timings::default();
    m.admitted("m1");
    m.sent("m1", None, "n1");
    m.requeued("m1", "n1");
    m.ended(&end(&t, Finish::Missed, None));
    let text = m.render();
    assert_eq!(
        sample(&text, "skep:num_requests_waiting", "model=\"m1\""),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "skep:num_requests_running",
            "model=\"m1\",node=\"n1\""
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "skep:deadline_missed_total",
            "model=\"m1\",stage=\"queue\""
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "skep:request_success_total",
            "model=\"m1\",finished_reason=\"deadline\""
        ),
        Some(1.0)
    );
}

#[test]
fn rejections_are_counted_by_reason_and_unknown_models_are_not_labels() {
    let m = Metrics::new();
    m.rejected("m1", Rejection::Infeasible);
    m.rejected("nobody-serves-this", Rejection::NoPool);
    let text = m.render();
    assert_eq!(
        sample(
            &text,
            "skep:admission_rejected_total",
            "model=\"m1\",reason=\"infeasible\""
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "skep:admission_rejected_total",
            "model=\"other\",reason=\"no_pool\""
        ),
        Some(1.0)
    );
    assert!(!text.contains("nobody-serves-this"), "{text}");
}

#[test]
fn label_values_are_capped() {
    let m = Metrics::new();
    for i in 0..MAX_MODELS + 5 {
        m.admitted(&format!("model-{i}"));
    }
    let text = m.render();
    let series = text
        .lines()
        .filter(|l| l.starts_with("skep:num_requests_waiting{"))
        .count();
    assert_eq!(series, MAX_MODELS + 1, "{text}");
    assert_eq!(
        sample(&text, "skep:num_requests_waiting", "model=\"other\""),
        Some(5.0)
    );
}
