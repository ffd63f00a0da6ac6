//! Prometheus metrics and gRPC health of the queen and the pools, end to end.
//!
//! The daemons run with `--metrics-listen 127.0.0.1:0`; every scrape is parsed by a strict
//! OpenMetrics parser, and the tests check that counters moved by exactly what the jobs did.
//! Health is probed with the generated `grpc.health.v1` client and no token. No test asserts on
//! elapsed time.

use std::time::Duration;

use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};
use skep_integration::{Cluster, PoolOpts, events, http_get, runtime, wait_until};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

const METRICS: &str = "--metrics-listen";
const LOOPBACK: &str = "127.0.0.1:0";

/// 20 tokens/s (50ms a token), with its own metrics endpoint.
fn slow_pool() -> PoolOpts {
    PoolOpts {
        tps: 20.0,
        extra_args: vec![METRICS.into(), LOOPBACK.into()],
        ..PoolOpts::default()
    }
}

/// `GET /metrics` from `addr`, parsed.
#[track_caller]
fn scrape(addr: &str) -> Exposition {
    let (status, body) = http_get(addr, "/metrics");
    assert!(status.contains(" 200 "), "{status}: {body}");
    openmetrics_parser::openmetrics::parse_openmetrics(&body)
        .unwrap_or_else(|e| panic!("the exposition does not parse: {e:?}\n{body}"))
}

/// The sum of `family`'s samples whose labels include `labels` (counters, gauges: their values;
/// histograms: their counts); 0 when there are none.
fn value(exp: &Exposition, family: &str, labels: &[(&str, &str)]) -> f64 {
    let Some(f) = exp.families.get(family) else {
        return 0.0;
    };
    f.iter_samples()
        .filter(|s| {
            let set = s.get_labelset().expect("a family's sample has label names");
            labels
                .iter()
                .all(|(k, v)| set.get_label_value(k) == Some(*v))
        })
        .map(|s| match &s.value {
            OpenMetricsValue::Counter(c) => c.value.as_f64(),
            OpenMetricsValue::Gauge(g) | OpenMetricsValue::Unknown(g) => g.as_f64(),
            OpenMetricsValue::Histogram(h) => h.count.unwrap_or(0) as f64,
            other => panic!("{family}: unexpected value {other:?}"),
        })
        .sum()
}

/// How much `family{labels}` grew from `before` to `after`.
fn delta(before: &Exposition, after: &Exposition, family: &str, labels: &[(&str, &str)]) -> f64 {
    value(after, family, labels) - value(before, family, labels)
}

const MODEL: (&str, &str) = ("model", "synthetic");

#[test]
fn counters_move_by_what_the_jobs_did() {
    let cluster = Cluster::start_with(&[METRICS, LOOPBACK], slow_pool());
    let queen = cluster.queen_metrics_addr();
    let pool = cluster.pool_metrics_addr(0);
    let q0 = scrape(&queen);
    let p0 = scrape(&pool);

    // One job done (5 tokens: it stops at max_tokens).
    let done = cluster.submit("synthetic", "10s", 5, "warm up");
    skep_integration::assert_success(&done);
    let tokens = events(&done)
        .iter()
        .filter(|e| e["event"] == "token")
        .count() as f64;
    assert_eq!(tokens, 5.0);
    // One refused as infeasible: 200 tokens at 50ms each cannot fit in 2s.
    let refused = cluster.submit("synthetic", "2s", 200, "too much");
    assert_eq!(refused.status.code(), Some(3), "{:?}", events(&refused));

    let q1 = scrape(&queen);
    let d = |family: &str, labels: &[(&str, &str)]| delta(&q0, &q1, family, labels);
    assert_eq!(d("skep:request_success", &[MODEL]), 1.0);
    assert_eq!(
        d(
            "skep:request_success",
            &[MODEL, ("finished_reason", "length")]
        ),
        1.0
    );
    assert_eq!(d("skep:deadline_met", &[MODEL]), 1.0);
    assert_eq!(d("skep:deadline_missed", &[]), 0.0);
    assert_eq!(
        d(
            "skep:admission_rejected",
            &[MODEL, ("reason", "infeasible")]
        ),
        1.0
    );
    assert_eq!(d("skep:admission_rejected", &[]), 1.0);
    assert_eq!(d("skep:generation_tokens", &[MODEL]), tokens);
    // Prompt tokens as the worker counted them: the synthetic engine's words, "warm up" is 2.
    assert_eq!(d("skep:prompt_tokens", &[MODEL]), 2.0);
    for histogram in [
        "skep:e2e_request_latency_seconds",
        "skep:time_to_first_token_seconds",
        "skep:request_queue_time_seconds",
        "skep:deadline_slack_seconds",
    ] {
        assert_eq!(d(histogram, &[MODEL]), 1.0, "{histogram}");
    }
    // One observation per gap between tokens.
    assert_eq!(
        d("skep:inter_token_latency_seconds", &[MODEL]),
        tokens - 1.0
    );
    for hop in [
        "admission",
        "queue_wait",
        "dispatch",
        "pool",
        "worker_first_token",
        "generation",
    ] {
        assert_eq!(d("skep:hop_seconds", &[MODEL, ("hop", hop)]), 1.0, "{hop}");
    }
    // Nothing is left running or waiting.
    assert_eq!(value(&q1, "skep:num_requests_running", &[]), 0.0);
    assert_eq!(value(&q1, "skep:num_requests_waiting", &[]), 0.0);

    let p1 = scrape(&pool);
    let d = |family: &str, labels: &[(&str, &str)]| delta(&p0, &p1, family, labels);
    // The refused job never reached the pool.
    assert_eq!(d("skep:pool_jobs_started", &[MODEL]), 1.0);
    assert_eq!(d("skep:pool_jobs_finished", &[MODEL]), 1.0);
    assert_eq!(d("skep:pool_jobs_failed", &[]), 0.0);
    assert_eq!(d("skep:pool_generation_tokens", &[MODEL]), tokens);
    assert_eq!(d("skep:pool_hop_seconds", &[MODEL, ("hop", "pool")]), 1.0);
    assert_eq!(value(&p1, "skep:pool_sessions_open", &[]), 1.0);
    assert_eq!(value(&p1, "skep:pool_registered", &[]), 1.0);
    assert_eq!(value(&p1, "skep:pool_warm", &[]), 1.0);
    assert_eq!(value(&p1, "skep:pool_slots", &[]), 1.0);

    // Nothing else is served there, and nothing secret: no token, no prompt.
    let (status, _) = http_get(&queen, "/");
    assert!(status.contains(" 404 "), "{status}");
    let token = cluster.admin_token();
    for addr in [&queen, &pool] {
        let (_, body) = http_get(addr, "/metrics");
        assert!(!body.contains(&token), "a token in the metrics");
        assert!(!body.contains("warm up"), "a prompt in the metrics");
    }
}

#[test]
fn a_deadline_missed_at_the_pool_is_counted_by_stage() {
    // Without the reservation check (`edf`) the late job is admitted, and the pool stops it at
    // its deadline.
    let cluster = Cluster::start_with(&["--admission", "edf", METRICS, LOOPBACK], slow_pool());
    let queen = cluster.queen_metrics_addr();
    let pool = cluster.pool_metrics_addr(0);
    let q0 = scrape(&queen);
    let p0 = scrape(&pool);
    let late = cluster.submit("synthetic", "1s", 100, "late");
    assert_eq!(late.status.code(), Some(3), "{:?}", events(&late));
    let q1 = scrape(&queen);
    assert_eq!(
        delta(
            &q0,
            &q1,
            "skep:deadline_missed",
            &[MODEL, ("stage", "pool")]
        ),
        1.0
    );
    assert_eq!(delta(&q0, &q1, "skep:deadline_missed", &[]), 1.0);
    assert_eq!(delta(&q0, &q1, "skep:deadline_met", &[]), 0.0);
    assert_eq!(
        delta(
            &q0,
            &q1,
            "skep:request_success",
            &[MODEL, ("finished_reason", "deadline")]
        ),
        1.0
    );
    assert_eq!(value(&q1, "skep:num_requests_running", &[]), 0.0);
    // The pool reported it failed; by the time the queen ended it, the pool had counted it.
    let p1 = scrape(&pool);
    assert_eq!(delta(&p0, &p1, "skep:pool_jobs_failed", &[MODEL]), 1.0);
    assert_eq!(delta(&p0, &p1, "skep:pool_jobs_finished", &[]), 0.0);
}

/// The overall status (`""`) from the health service at `addr`, without a token.
fn health(addr: &str, service: &str) -> Result<ServingStatus, tonic::Status> {
    runtime().block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("URL")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        Ok(match reply.status {
            1 => ServingStatus::Serving,
            2 => ServingStatus::NotServing,
            _ => ServingStatus::Unknown,
        })
    })
}

#[test]
fn health_follows_warm_up_registration_and_the_queen() {
    let mut cluster = Cluster::queen_only("health");
    let queen = cluster
        .queen_url
        .strip_prefix("http://")
        .expect("a plaintext queen on loopback")
        .to_owned();
    // The queen is SERVING, to a probe without a token; it names no services.
    assert_eq!(health(&queen, "").unwrap(), ServingStatus::Serving);
    let named = health(&queen, "skep.v1.Jobs").unwrap_err();
    assert_eq!(named.code(), tonic::Code::NotFound);

    // A pool whose warm-up cannot finish during the test (its first token takes 600 s) is
    // NOT_SERVING, however long the probe takes to arrive.
    cluster.add_pool(PoolOpts {
        ttft: "600s".into(),
        ..PoolOpts::default()
    });
    let cold = cluster.pool_addr(0);
    let mut first = None;
    wait_until("the cold pool's first health answer", || {
        first = health(&cold, "").ok();
        first.is_some()
    });
    assert_eq!(first, Some(ServingStatus::NotServing));
    cluster.kill_pool(0);
    // A pool that warms up, registers and opens its session: SERVING.
    cluster.add_pool(PoolOpts::default());
    let pool = cluster.pool_addr(1);
    wait_until("the pool to serve", || {
        health(&pool, "").ok() == Some(ServingStatus::Serving)
    });
    cluster.wait_for_nodes(1);
    // Without its queen it has no session: NOT_SERVING again.
    cluster.kill_queen();
    wait_until("the pool to stop serving", || {
        health(&pool, "").ok() == Some(ServingStatus::NotServing)
    });
}

#[test]
fn a_worker_replaced_after_a_crash_is_counted_and_health_follows_it() {
    let cluster = Cluster::start(PoolOpts {
        extra_args: vec![METRICS.into(), LOOPBACK.into()],
        ..PoolOpts::default()
    });
    let metrics = cluster.pool_metrics_addr(0);
    let pool = cluster.pool_addr(0);
    wait_until("the pool to serve", || {
        health(&pool, "").ok() == Some(ServingStatus::Serving)
    });
    let before = scrape(&metrics);
    assert_eq!(value(&before, "skep:pool_worker_restarts", &[]), 0.0);
    let old = cluster.worker_pids(0)[0];
    skep_integration::kill(old);
    // The slot thread notices, replaces the worker and counts it; no lane was corrupt.
    wait_until("the restart to be counted", || {
        value(&scrape(&metrics), "skep:pool_worker_restarts", &[]) == 1.0
    });
    assert_eq!(
        value(&scrape(&metrics), "skep:pool_lane_corruptions", &[]),
        0.0
    );
    // The new worker comes up and the pool serves again.
    wait_until("a new worker", || {
        let pids = cluster.worker_pids(0);
        pids.len() == 1 && pids[0] != old
    });
    wait_until("the pool to serve again", || {
        health(&pool, "").ok() == Some(ServingStatus::Serving)
    });
    skep_integration::assert_success(&cluster.submit("synthetic", "10s", 2, "after"));
}
