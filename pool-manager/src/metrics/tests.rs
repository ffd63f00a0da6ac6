//! Unit tests of the pool's metrics and readiness.

use super::*;

fn sample(text: &str, head: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(head))
        .map(|v| v.trim().parse().expect("a number"))
}

#[test]
fn readiness_needs_warm_a_worker_registered_and_a_session() {
    let m = PoolMetrics::new();
    assert!(!m.readiness().serving());
    m.set_warm();
    m.set_registered(true);
    assert!(!m.readiness().serving());
    let meter = m.session("m1");
    // No worker up (none started, or all being replaced): not serving.
    assert!(!m.readiness().serving());
    m.inner.readiness.send_modify(|r| r.workers_up = 1);
    assert!(m.readiness().serving());
    m.set_registered(false);
    assert!(!m.readiness().serving());
    m.set_registered(true);
    assert!(m.readiness().serving());
    drop(meter);
    assert!(!m.readiness().serving());
    let text = m.render();
    assert_eq!(sample(&text, "skep:pool_sessions_opened_total "), Some(1.0));
    assert_eq!(sample(&text, "skep:pool_sessions_open "), Some(0.0));
    assert_eq!(sample(&text, "skep:pool_registrations_total "), Some(2.0));
}

#[test]
fn a_session_counts_its_jobs_and_tokens() {
    let m = PoolMetrics::new();
    let meter = m.session("m1");
    meter.started();
    meter.finished(7, 100, 2_000, 30_000);
    meter.started();
    meter.failed("deadline_exceeded", 3);
    let text = m.render();
    assert_eq!(
        sample(&text, "skep:pool_jobs_started_total{model=\"m1\"} "),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "skep:pool_jobs_finished_total{model=\"m1\"} "),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "skep:pool_jobs_failed_total{model=\"m1\",code=\"deadline_exceeded\"} "
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "skep:pool_generation_tokens_total{model=\"m1\"} "),
        Some(10.0)
    );
    assert!(text.ends_with("# EOF\n"));
}
