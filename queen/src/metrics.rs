//! The queen's Prometheus metrics: admission, deadlines, latencies and per-hop timings, named as
//! vLLM names them under the prefix `skep:`, rendered for `GET /metrics`.
//!
//! Everything is counted by the dispatch actor at the points where a job is admitted, refused,
//! sent to a pool, put back in the queue, and ended (with its `Timings`); nothing here is on the
//! per-token path. Label values are bounded: models and nodes are validated identifiers, and
//! past `MAX_MODELS` / `MAX_NODES` distinct values the rest are counted as `other`. No label ever
//! holds a prompt, a token, a caller or a job id. See docs/METRICS.md.

mod series;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use self::series::{
    FinishedLabels, HopLabels, ModelLabels, ModelNodeLabels, ReasonLabels, StageLabels,
    hop_histogram, itl_histogram, request_histogram, ttft_histogram,
};
use crate::model::Timings;
pub use skep_common::metrics_http::{ADDR_FILE, serve, write_addr_file};

/// The `Content-Type` of `Metrics::render`'s output (the OpenMetrics text format, which
/// Prometheus scrapes natively and which is a superset of its classic text format).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Distinct `model` label values kept; later ones are counted as `other`.
pub const MAX_MODELS: usize = 64;
/// Distinct `node` label values kept; later ones are counted as `other`.
pub const MAX_NODES: usize = 256;
/// The label value standing for every model or node past the caps.
pub const OTHER: &str = "other";

/// The queen's metrics. Cheap to clone: every clone shares one registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

/// Why admission refused a job (`admission_rejected_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No slot can finish it by its deadline without making another job late.
    Infeasible,
    /// No pool serves the model.
    NoPool,
    /// The queen is full.
    QueueFull,
    /// The caller already holds its share of live jobs.
    CallerShare,
}

/// How a job ended, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Done,
    /// Ended `deadline_exceeded`.
    Missed,
    Cancelled,
    Failed,
}

/// One job's end, as the dispatch actor saw it.
#[derive(Debug, Clone, Copy)]
pub struct JobEnd<'a> {
    pub model: &'a str,
    /// The node it was running on when it ended, if it was at a pool then.
    pub running_on: Option<&'a str>,
    /// The last node it was placed on (empty if none).
    pub node: &'a str,
    /// Whether it ever reached a pool.
    pub sent: bool,
    pub finish: Finish,
    /// Tokens its client received.
    pub tokens: u32,
    pub max_tokens: u32,
    /// Tokens the prompt was, as the worker's engine counted them; 0 unless the job finished
    /// (the count comes with the pool's `Finished` report).
    pub prompt_tokens: u32,
    pub budget: Duration,
    pub timings: &'a Timings,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

struct Inner {
    registry: Registry,
    running: Family<ModelNodeLabels, Gauge>,
    waiting: Family<ModelLabels, Gauge>,
    prompt_tokens: Family<ModelNodeLabels, Counter>,
    generation_tokens: Family<ModelNodeLabels, Counter>,
    success: Family<FinishedLabels, Counter>,
    failed: Family<ModelLabels, Counter>,
    ttft: Histograms<ModelLabels>,
    itl: Histograms<ModelLabels>,
    e2e: Histograms<ModelLabels>,
    queue_time: Histograms<ModelLabels>,
    deadline_met: Family<ModelLabels, Counter>,
    deadline_missed: Family<StageLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    /// `rejected` summed over models, by `Rejection::ALL` index, for the status page.
    rejected_by_reason: [AtomicU64; Rejection::ALL.len()],
    slack: Histograms<ModelLabels>,
    hops: Histograms<HopLabels>,
    /// Label values seen so far, to cap cardinality. Touched only by the dispatch actor's
    /// transitions (one thread), never per token.
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    models: HashSet<String>,
    nodes: HashSet<String>,
}

// === impl Metrics ===

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, all at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let running = Family::default();
        let waiting = Family::default();
        let prompt_tokens = Family::default();
        let generation_tokens = Family::default();
        let success = Family::default();
        let failed = Family::default();
        let ttft = Family::new_with_constructor(ttft_histogram as fn() -> Histogram);
        let itl = Family::new_with_constructor(itl_histogram as fn() -> Histogram);
        let e2e = Family::new_with_constructor(request_histogram as fn() -> Histogram);
        let queue_time = Family::new_with_constructor(request_histogram as fn() -> Histogram);
        let deadline_met = Family::default();
        let deadline_missed = Family::default();
        let rejected = Family::default();
        let slack = Family::new_with_constructor(hop_histogram as fn() -> Histogram);
        let hops = Family::new_with_constructor(hop_histogram as fn() -> Histogram);
        // Names are given whole (with the colon); prometheus-client writes them as they are and
        // adds `_total` to counters.
        let started = Gauge::<i64>::default();
        started.set(i64::try_from(crate::model::unix_ms() / 1000).unwrap_or(i64::MAX));
        // Always present, so even a fresh queen's exposition has a family.
        registry.register(
            "skep:queen_start_time_seconds",
            "When this queen process started (Unix time)",
            started,
        );
        registry.register(
            "skep:num_requests_running",
            "Jobs at a pool (sent and not yet ended)",
            running.clone(),
        );
        registry.register(
            "skep:num_requests_waiting",
            "Jobs admitted and waiting at the queen (queued or parked)",
            waiting.clone(),
        );
        registry.register(
            "skep:prompt_tokens",
            "Prompt tokens of finished jobs, as the worker's engine counted them",
            prompt_tokens.clone(),
        );
        registry.register(
            "skep:generation_tokens",
            "Tokens delivered to clients, counted when each job ends",
            generation_tokens.clone(),
        );
        registry.register(
            "skep:request_success",
            "Jobs that ended without error, by finished_reason (stop, length, deadline, abort)",
            success.clone(),
        );
        registry.register(
            "skep:request_failed",
            "Jobs that ended failed (pool error, or out of failover attempts)",
            failed.clone(),
        );
        registry.register(
            "skep:time_to_first_token_seconds",
            "Time from arrival at the queen to the first token (sum of the hops up to it)",
            ttft.clone(),
        );
        registry.register(
            "skep:inter_token_latency_seconds",
            "Time between tokens (each job contributes its mean gap once per gap)",
            itl.clone(),
        );
        registry.register(
            "skep:e2e_request_latency_seconds",
            "Time from arrival at the queen to the job's end",
            e2e.clone(),
        );
        registry.register(
            "skep:request_queue_time_seconds",
            "Time a job waited at the queen between admission and its first dispatch",
            queue_time.clone(),
        );
        registry.register(
            "skep:deadline_met",
            "Jobs that finished by their deadline",
            deadline_met.clone(),
        );
        registry.register(
            "skep:deadline_missed",
            "Admitted jobs that ended deadline_exceeded, by stage (queue: never reached a pool; pool: at or after a pool)",
            deadline_missed.clone(),
        );
        registry.register(
            "skep:admission_rejected",
            "Jobs refused at admission, by reason (infeasible, no_pool, queue_full, caller_share)",
            rejected.clone(),
        );
        registry.register(
            "skep:deadline_slack_seconds",
            "Time left before the deadline when a job finished in time",
            slack.clone(),
        );
        registry.register(
            "skep:hop_seconds",
            "Time a job spent in each hop (admission, queue_wait, dispatch, pool, worker_first_token, generation)",
            hops.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                running,
                waiting,
                prompt_tokens,
                generation_tokens,
                success,
                failed,
                ttft,
                itl,
                e2e,
                queue_time,
                deadline_met,
                deadline_missed,
                rejected,
                rejected_by_reason: Default::default(),
                slack,
                hops,
                seen: Mutex::default(),
            }),
        }
    }

    /// Every metric in the OpenMetrics text format (`CONTENT_TYPE`), ending in `# EOF`.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail; an encoder error would be a bug in a metric.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            tracing::warn!(error = %e, "could not render the metrics");
        }
        out
    }

    /// A job was admitted: it waits at the queen until it is sent.
    pub fn admitted(&self, model: &str) {
        let model = self.model(model, true);
        self.inner
            .waiting
            .get_or_create(&ModelLabels { model })
            .inc();
    }

    /// Admission refused a job.
    pub fn rejected(&self, model: &str, why: Rejection) {
        // Only an infeasible job's model is known to be served; another refused job's model may
        // be anything valid, and does not earn a label of its own.
        let model = self.model(model, why == Rejection::Infeasible);
        let reason = why.as_str();
        self.inner
            .rejected
            .get_or_create(&ReasonLabels { model, reason })
            .inc();
        self.inner.rejected_by_reason[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Admission refusals since the queen started, by reason, over every model (the status
    /// page's view of `admission_rejected_total`).
    pub fn rejections(&self) -> [(&'static str, u64); Rejection::ALL.len()] {
        Rejection::ALL.map(|r| {
            let n = self.inner.rejected_by_reason[r as usize].load(Ordering::Relaxed);
            (r.as_str(), n)
        })
    }

    /// A job was sent to `to`: from waiting here, or (`from`) from another pool it was on.
    pub fn sent(&self, model: &str, from: Option<&str>, to: &str) {
        let model = self.model(model, true);
        match from {
            Some(old) => self.running(&model, old).dec(),
            None => self
                .inner
                .waiting
                .get_or_create(&ModelLabels {
                    model: model.clone(),
                })
                .dec(),
        };
        self.running(&model, to).inc();
    }

    /// A job that was on `node` is waiting at the queen again (its pool failed; it fails over).
    pub fn requeued(&self, model: &str, node: &str) {
        let model = self.model(model, true);
        self.running(&model, node).dec();
        self.inner
            .waiting
            .get_or_create(&ModelLabels { model })
            .inc();
    }

    /// A job ended: everything it measured.
    pub fn ended(&self, end: &JobEnd<'_>) {
        let model = self.model(end.model, true);
        match end.running_on {
            Some(node) => self.running(&model, node).dec(),
            None => self
                .inner
                .waiting
                .get_or_create(&ModelLabels {
                    model: model.clone(),
                })
                .dec(),
        };
        let by_model = ModelLabels {
            model: model.clone(),
        };
        if end.sent && !end.node.is_empty() {
            let node = self.node(end.node);
            let labels = ModelNodeLabels {
                model: model.clone(),
                node,
            };
            self.inner
                .prompt_tokens
                .get_or_create(&labels)
                .inc_by(u64::from(end.prompt_tokens));
            self.inner
                .generation_tokens
                .get_or_create(&labels)
                .inc_by(u64::from(end.tokens));
        }
        let finished_reason = match end.finish {
            Finish::Done if end.tokens >= end.max_tokens => Some("length"),
            Finish::Done => Some("stop"),
            Finish::Missed => Some("deadline"),
            Finish::Cancelled => Some("abort"),
            Finish::Failed => None,
        };
        match finished_reason {
            Some(finished_reason) => self.inner.success.get_or_create(&FinishedLabels {
                model: model.clone(),
                finished_reason,
            }),
            None => self.inner.failed.get_or_create(&by_model),
        }
        .inc();
        let t = end.timings;
        let total = Duration::from_micros(t.total_us);
        self.inner
            .e2e
            .get_or_create(&by_model)
            .observe(total.as_secs_f64());
        match end.finish {
            Finish::Done => {
                self.inner.deadline_met.get_or_create(&by_model).inc();
                let slack = end.budget.saturating_sub(total);
                self.inner
                    .slack
                    .get_or_create(&by_model)
                    .observe(slack.as_secs_f64());
            }
            Finish::Missed => {
                let stage = if end.sent { "pool" } else { "queue" };
                self.inner
                    .deadline_missed
                    .get_or_create(&StageLabels {
                        model: model.clone(),
                        stage,
                    })
                    .inc();
            }
            Finish::Cancelled | Finish::Failed => {}
        }
        if !end.sent {
            return;
        }
        self.inner
            .queue_time
            .get_or_create(&by_model)
            .observe(secs(t.queue_wait_us));
        if end.tokens > 0 && t.worker_first_token_us > 0 {
            let ttft = t.admission_us + t.queue_wait_us + t.dispatch_us + t.pool_us;
            self.inner
                .ttft
                .get_or_create(&by_model)
                .observe(secs(ttft + t.worker_first_token_us));
        }
        if end.tokens > 1 && t.generation_us > 0 {
            // One observation per gap, each the job's mean gap: count and sum are exact, only
            // the spread across buckets is smoothed.
            let gaps = end.tokens - 1;
            let mean = secs(t.generation_us) / f64::from(gaps);
            let itl = self.inner.itl.get_or_create(&by_model);
            for _ in 0..gaps {
                itl.observe(mean);
            }
        }
        for (hop, us) in [
            ("admission", t.admission_us),
            ("queue_wait", t.queue_wait_us),
            ("dispatch", t.dispatch_us),
            ("pool", t.pool_us),
            ("worker_first_token", t.worker_first_token_us),
            ("generation", t.generation_us),
        ] {
            self.inner
                .hops
                .get_or_create(&HopLabels {
                    model: model.clone(),
                    hop,
                })
                .observe(secs(us));
        }
    }

    fn running(&self, model: &str, node: &str) -> Gauge {
        let node = self.node(node);
        self.inner.running.get_or_create_owned(&ModelNodeLabels {
            model: model.to_owned(),
            node,
        })
    }

    /// `model` as a label value: itself while under the cap (`learn`: may take a new place),
    /// else `other`.
    fn model(&self, model: &str, learn: bool) -> String {
        let mut seen = self.seen();
        capped(&mut seen.models, model, MAX_MODELS, learn)
    }

    fn node(&self, node: &str) -> String {
        let mut seen = self.seen();
        capped(&mut seen.nodes, node, MAX_NODES, true)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        // Each update is one insert: a poisoned set is still consistent.
        self.inner
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Rejection {
    /// Every reason, in declaration order (each one's index is its discriminant).
    pub const ALL: [Rejection; 4] = [
        Rejection::Infeasible,
        Rejection::NoPool,
        Rejection::QueueFull,
        Rejection::CallerShare,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Infeasible => "infeasible",
            Rejection::NoPool => "no_pool",
            Rejection::QueueFull => "queue_full",
            Rejection::CallerShare => "caller_share",
        }
    }
}

fn capped(seen: &mut HashSet<String>, value: &str, cap: usize, learn: bool) -> String {
    if seen.contains(value) {
        return value.to_owned();
    }
    if learn && seen.len() < cap {
        seen.insert(value.to_owned());
        return value.to_owned();
    }
    OTHER.to_owned()
}

fn secs(us: u64) -> f64 {
    Duration::from_micros(us).as_secs_f64()
}

#[cfg(test)]
mod tests;
