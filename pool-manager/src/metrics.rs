//! The pool manager's Prometheus metrics and readiness: jobs, tokens and sessions counted where
//! the gRPC layer and membership see them, rendered for `--metrics-listen`'s `GET /metrics`.
//!
//! Readiness (what `grpc.health.v1.Health` answers) is SERVING only while the warm-up figures
//! are in, at least one worker is up, the pool is registered with its queen and a queen session
//! is open. Counters are atomics resolved once per session, so the event path takes no lock.
//! Labels are the pool's own model name and small fixed sets (status codes, hops); never a
//! prompt, a job id or a key. Worker restarts and lane corruptions are counted by the slot
//! threads (`supervisor`) into counters registered here. See docs/METRICS.md.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::supervisor::{Slots, WorkerCounters};
pub use skep_common::metrics_http::{ADDR_FILE, serve, write_addr_file};

/// The `Content-Type` of `PoolMetrics::render`'s output (OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets for the pool's hops: from half a millisecond to minutes.
const HOP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// The pool's metrics and readiness. Cheap to clone: clones share everything.
#[derive(Clone)]
pub struct PoolMetrics {
    inner: Arc<Inner>,
}

/// What readiness is made of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    /// The warm-up job measured the engine's figures (the workers are up and loaded).
    pub warm: bool,
    /// The last registration with the queen holds (heartbeats are acknowledged).
    pub registered: bool,
    /// Queen sessions open now.
    pub sessions: u32,
    /// Slots whose worker is up.
    pub workers_up: u32,
}

/// One open queen session: its counters for the pool's model, resolved once so each event costs
/// an atomic add and no lock. The session counts as open until this is dropped.
pub struct SessionMeter {
    metrics: PoolMetrics,
    started: Counter,
    finished: Counter,
    tokens: Counter,
    failed: Family<FailedLabels, Counter>,
    model: String,
    hop_pool: Histogram,
    hop_first_token: Histogram,
    hop_generation: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailedLabels {
    model: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HopLabels {
    model: String,
    hop: &'static str,
}

struct Inner {
    registry: Registry,
    started: Family<ModelLabels, Counter>,
    finished: Family<ModelLabels, Counter>,
    failed: Family<FailedLabels, Counter>,
    tokens: Family<ModelLabels, Counter>,
    hops: Family<HopLabels, Histogram, fn() -> Histogram>,
    sessions_opened: Counter,
    sessions_open: Gauge,
    registrations: Counter,
    registered: Gauge,
    warm: Gauge,
    slots: Gauge,
    slots_idle: Gauge,
    /// Read at render time for the slot gauges.
    slot_queues: OnceLock<Arc<Slots>>,
    /// Handed to the slot threads, which count worker replacements into them.
    workers: WorkerCounters,
    readiness: watch::Sender<Readiness>,
}

// === impl PoolMetrics ===

impl Default for PoolMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PoolMetrics {
    /// Fresh metrics, all at zero; not ready.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let started = Family::default();
        let finished = Family::default();
        let failed = Family::default();
        let tokens = Family::default();
        let hops = Family::new_with_constructor(hop_histogram as fn() -> Histogram);
        let sessions_opened = Counter::default();
        let sessions_open = Gauge::default();
        let registrations = Counter::default();
        let registered = Gauge::default();
        let warm = Gauge::default();
        let slots = Gauge::default();
        let slots_idle = Gauge::default();
        let workers = WorkerCounters::default();
        registry.register(
            "skep:pool_worker_restarts",
            "Workers replaced after they exited, hung or broke a lane",
            workers.restarts.clone(),
        );
        registry.register(
            "skep:pool_lane_corruptions",
            "Workers replaced because a lane was corrupt (each also audited as lane.corrupt)",
            workers.lane_corruptions.clone(),
        );
        registry.register(
            "skep:pool_jobs_started",
            "Jobs that entered a worker's lane",
            started.clone(),
        );
        registry.register(
            "skep:pool_jobs_finished",
            "Jobs that ran to their end on a worker",
            finished.clone(),
        );
        registry.register(
            "skep:pool_jobs_failed",
            "Jobs that ended otherwise, by the gRPC code reported to the queen (deadline_exceeded, cancelled, unavailable: worker lost or shutting down, invalid_argument/failed_precondition: refused frame, ...)",
            failed.clone(),
        );
        registry.register(
            "skep:pool_generation_tokens",
            "Tokens generated by this pool's workers, counted when each job ends",
            tokens.clone(),
        );
        registry.register(
            "skep:pool_hop_seconds",
            "Time a job spent in each hop at the pool (pool: frame to lane; worker_first_token; generation: after the first token)",
            hops.clone(),
        );
        registry.register(
            "skep:pool_sessions_opened",
            "Queen sessions opened",
            sessions_opened.clone(),
        );
        registry.register(
            "skep:pool_sessions_open",
            "Queen sessions open now",
            sessions_open.clone(),
        );
        registry.register(
            "skep:pool_registrations",
            "Successful registrations with the queen",
            registrations.clone(),
        );
        registry.register(
            "skep:pool_registered",
            "1 while the pool's registration with its queen holds",
            registered.clone(),
        );
        registry.register(
            "skep:pool_warm",
            "1 once the warm-up job has measured the engine",
            warm.clone(),
        );
        registry.register("skep:pool_slots", "Worker slots", slots.clone());
        registry.register(
            "skep:pool_slots_idle",
            "Slots with nothing running and nothing queued",
            slots_idle.clone(),
        );
        PoolMetrics {
            inner: Arc::new(Inner {
                registry,
                started,
                finished,
                failed,
                tokens,
                hops,
                sessions_opened,
                sessions_open,
                registrations,
                registered,
                warm,
                slots,
                slots_idle,
                slot_queues: OnceLock::new(),
                workers,
                readiness: watch::Sender::new(Readiness::default()),
            }),
        }
    }

    /// Reports the slot gauges from `slots` at each render, counts its worker replacements, and
    /// follows its workers in readiness (in the background; call within the runtime).
    pub fn watch_slots(&self, slots: Arc<Slots>) {
        slots.count_workers_into(self.inner.workers.clone());
        let mut up = slots.workers_up();
        let _ = self.inner.slot_queues.set(slots);
        let metrics = self.clone();
        tokio::spawn(async move {
            loop {
                let n = *up.borrow_and_update();
                metrics
                    .inner
                    .readiness
                    .send_if_modified(|r| std::mem::replace(&mut r.workers_up, n) != n);
                if up.changed().await.is_err() {
                    break;
                }
            }
        });
    }

    /// Every metric in the OpenMetrics text format (`CONTENT_TYPE`), ending in `# EOF`.
    pub fn render(&self) -> String {
        if let Some(slots) = self.inner.slot_queues.get() {
            self.inner
                .slots
                .set(i64::try_from(slots.count()).unwrap_or(i64::MAX));
            self.inner.slots_idle.set(i64::from(slots.idle()));
        }
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail; an encoder error would be a bug in a metric.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            tracing::warn!(error = %e, "could not render the metrics");
        }
        out
    }

    /// A queen session serving `model` opened; it closes when the meter is dropped.
    pub fn session(&self, model: &str) -> SessionMeter {
        self.session_opened();
        let labels = ModelLabels {
            model: model.to_owned(),
        };
        let hop = |hop| {
            self.inner.hops.get_or_create_owned(&HopLabels {
                model: model.to_owned(),
                hop,
            })
        };
        SessionMeter {
            metrics: self.clone(),
            started: self.inner.started.get_or_create_owned(&labels),
            finished: self.inner.finished.get_or_create_owned(&labels),
            tokens: self.inner.tokens.get_or_create_owned(&labels),
            failed: self.inner.failed.clone(),
            model: model.to_owned(),
            hop_pool: hop("pool"),
            hop_first_token: hop("worker_first_token"),
            hop_generation: hop("generation"),
        }
    }

    /// Readiness now.
    pub fn readiness(&self) -> Readiness {
        *self.inner.readiness.borrow()
    }

    /// Follows readiness: the receiver sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Readiness> {
        self.inner.readiness.subscribe()
    }

    /// Marks the pool warm once `speed` has the warm-up figures (in the background).
    pub fn follow_warm_up(&self, speed: Arc<crate::Speed>) {
        let metrics = self.clone();
        tokio::spawn(async move {
            while speed
                .wait_for_figures(Duration::from_secs(3600))
                .await
                .is_none()
            {}
            metrics.set_warm();
        });
    }

    /// The warm-up figures are in.
    pub fn set_warm(&self) {
        self.inner.warm.set(1);
        self.inner
            .readiness
            .send_if_modified(|r| !std::mem::replace(&mut r.warm, true));
    }

    /// Registered with the queen (`true`), or that registration ended (`false`).
    pub fn set_registered(&self, registered: bool) {
        if registered {
            self.inner.registrations.inc();
        }
        self.inner.registered.set(i64::from(registered));
        self.inner
            .readiness
            .send_if_modified(|r| std::mem::replace(&mut r.registered, registered) != registered);
    }

    fn session_opened(&self) {
        self.inner.sessions_opened.inc();
        self.inner.sessions_open.inc();
        self.inner.readiness.send_modify(|r| r.sessions += 1);
    }

    fn session_closed(&self) {
        self.inner.sessions_open.dec();
        self.inner
            .readiness
            .send_modify(|r| r.sessions = r.sessions.saturating_sub(1));
    }
}

// === impl Readiness ===

impl Readiness {
    /// Whether the pool can take jobs: warm, a worker up, registered and in session with its
    /// queen.
    pub fn serving(&self) -> bool {
        self.warm && self.workers_up > 0 && self.registered && self.sessions > 0
    }
}

// === impl SessionMeter ===

impl SessionMeter {
    /// A job entered a worker's lane.
    pub fn started(&self) {
        self.started.inc();
    }

    /// A job ran to its end: its tokens and hops.
    pub fn finished(&self, tokens: u32, pool_us: u64, first_token_us: u64, generation_us: u64) {
        self.finished.inc();
        self.tokens.inc_by(u64::from(tokens));
        self.hop_pool.observe(secs(pool_us));
        self.hop_first_token.observe(secs(first_token_us));
        self.hop_generation.observe(secs(generation_us));
    }

    /// A job ended otherwise, with this gRPC code name (a fixed set) after `tokens` tokens.
    pub fn failed(&self, code: &'static str, tokens: u32) {
        self.tokens.inc_by(u64::from(tokens));
        self.failed
            .get_or_create(&FailedLabels {
                model: self.model.clone(),
                code,
            })
            .inc();
    }
}

impl Drop for SessionMeter {
    fn drop(&mut self) {
        self.metrics.session_closed();
    }
}

fn secs(us: u64) -> f64 {
    Duration::from_micros(us).as_secs_f64()
}

fn hop_histogram() -> Histogram {
    Histogram::new(HOP_BUCKETS.iter().copied())
}

#[cfg(test)]
mod tests;
