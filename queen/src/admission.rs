//! Admission: decides at once whether a job can be taken, and tracks the jobs that were.
//!
//! It refuses work that cannot finish before its deadline (from observed time-to-first-token and
//! per-token time of the model) and work beyond the queen's capacity. It owns each live job's
//! cancel token, so `Jobs/Cancel` reaches a job wherever it is.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::scheduler::Load;

/// Default bound on jobs admitted and not yet finished.
pub const DEFAULT_MAX_LIVE: usize = 1024;
/// Retry hint when the queen is at capacity.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Weight of the newest observation in the moving averages.
const EWMA_ALPHA: f64 = 0.2;

/// Observed speed of one model. Unknown figures count as zero: until a model has run once,
/// admission is optimistic and the per-hop deadline checks are the safety net.
#[derive(Debug, Clone, Copy, Default)]
struct ModelStats {
    first_token_us: Option<f64>,
    per_token_us: Option<f64>,
    /// Whole service time of recent jobs (first token + generation), for queue waits.
    job_us: Option<f64>,
}

impl ModelStats {
    /// When a job asking for `max_tokens` would finish, given the load ahead of it.
    fn estimate(&self, max_tokens: u32, load: Load) -> Duration {
        let own = self.first_token_us.unwrap_or(0.0)
            + self.per_token_us.unwrap_or(0.0) * f64::from(max_tokens.saturating_sub(1));
        // Jobs before ours: the running ones and those queued with earlier deadlines. With S
        // slots, ours starts after ceil((before - S + 1) / S) job-lengths, or at once.
        let before = load.running as usize + load.ahead;
        let slots = load.slots.max(1) as usize;
        let waves = if before < slots {
            0
        } else {
            (before - slots) / slots + 1
        };
        let wait = waves as f64 * self.job_us.unwrap_or(0.0);
        Duration::from_micros((own + wait) as u64)
    }

    fn observe(&mut self, first_token: Duration, generation: Duration, tokens: u32) {
        let ewma =
            |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + EWMA_ALPHA * (new - o)));
        self.first_token_us = ewma(self.first_token_us, first_token.as_micros() as f64);
        self.job_us = ewma(self.job_us, (first_token + generation).as_micros() as f64);
        if tokens > 1 {
            let per = generation.as_micros() as f64 / f64::from(tokens - 1);
            self.per_token_us = ewma(self.per_token_us, per);
        }
    }
}

struct Live {
    cancel: CancellationToken,
}

pub struct Admission {
    live: HashMap<String, Live>,
    stats: HashMap<String, ModelStats>,
    max_live: usize,
}

impl Actor for Admission {
    type Context = Context<Self>;
}

impl Admission {
    pub fn start(max_live: usize) -> AdmissionHandle {
        let addr = Admission {
            live: HashMap::new(),
            stats: HashMap::new(),
            max_live,
        }
        .start();
        AdmissionHandle { addr }
    }
}

/// An admitted job's handle on its own cancellation, and the estimate it was admitted with.
pub struct Admitted {
    pub estimate: Duration,
    pub cancel: CancellationToken,
}

#[derive(Message)]
#[rtype(result = "Result<Admitted, Error>")]
struct Admit {
    id: String,
    model: String,
    max_tokens: u32,
    budget: Duration,
    load: Load,
}

impl Handler<Admit> for Admission {
    type Result = Result<Admitted, Error>;
    fn handle(&mut self, msg: Admit, _: &mut Self::Context) -> Self::Result {
        if self.live.len() >= self.max_live {
            return Err(Error::QueueFull {
                retry_after: RETRY_AFTER,
            });
        }
        let estimate = self
            .stats
            .get(&msg.model)
            .copied()
            .unwrap_or_default()
            .estimate(msg.max_tokens, msg.load);
        if estimate > msg.budget {
            return Err(Error::Infeasible {
                budget: msg.budget,
                estimate,
            });
        }
        let cancel = CancellationToken::new();
        self.live.insert(
            msg.id,
            Live {
                cancel: cancel.clone(),
            },
        );
        Ok(Admitted { estimate, cancel })
    }
}

/// What a finished job teaches admission about its model's speed.
#[derive(Debug, Clone, Copy)]
pub struct Observed {
    pub first_token: Duration,
    pub generation: Duration,
    pub tokens: u32,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Finished {
    id: String,
    model: String,
    observed: Option<Observed>,
}

impl Handler<Finished> for Admission {
    type Result = ();
    fn handle(&mut self, msg: Finished, _: &mut Self::Context) {
        self.live.remove(&msg.id);
        if let Some(o) = msg.observed {
            self.stats
                .entry(msg.model)
                .or_default()
                .observe(o.first_token, o.generation, o.tokens);
        }
    }
}

#[derive(Message)]
#[rtype(result = "bool")]
struct Cancel {
    id: String,
}

impl Handler<Cancel> for Admission {
    type Result = bool;
    fn handle(&mut self, msg: Cancel, _: &mut Self::Context) -> bool {
        match self.live.get(&msg.id) {
            Some(l) => {
                l.cancel.cancel();
                true
            }
            None => false,
        }
    }
}

/// Async handle to admission.
#[derive(Clone)]
pub struct AdmissionHandle {
    addr: Addr<Admission>,
}

// === impl AdmissionHandle ===

impl AdmissionHandle {
    pub async fn admit(
        &self,
        id: &str,
        model: &str,
        max_tokens: u32,
        budget: Duration,
        load: Load,
    ) -> Result<Admitted, Error> {
        self.addr
            .send(Admit {
                id: id.to_owned(),
                model: model.to_owned(),
                max_tokens,
                budget,
                load,
            })
            .await?
    }

    pub async fn finished(
        &self,
        id: &str,
        model: &str,
        observed: Option<Observed>,
    ) -> Result<(), Error> {
        Ok(self
            .addr
            .send(Finished {
                id: id.to_owned(),
                model: model.to_owned(),
                observed,
            })
            .await?)
    }

    /// True if the job was live and has been told to stop.
    pub async fn cancel(&self, id: &str) -> Result<bool, Error> {
        Ok(self.addr.send(Cancel { id: id.to_owned() }).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Load = Load {
        ahead: 0,
        slots: 1,
        running: 0,
    };

    #[test]
    fn unknown_model_is_estimated_optimistically() {
        assert_eq!(ModelStats::default().estimate(100, IDLE), Duration::ZERO);
    }

    #[test]
    fn estimate_grows_with_tokens_and_learns() {
        let mut s = ModelStats::default();
        s.observe(Duration::from_millis(10), Duration::from_millis(90), 10);
        assert_eq!(s.estimate(1, IDLE), Duration::from_millis(10));
        assert_eq!(s.estimate(11, IDLE), Duration::from_millis(110));
        s.observe(Duration::from_millis(20), Duration::from_millis(90), 10);
        assert_eq!(s.estimate(1, IDLE), Duration::from_millis(12));
    }

    #[test]
    fn estimate_counts_the_queue_ahead_in_waves_of_slots() {
        let mut s = ModelStats::default();
        // Each job: 10ms to first token + 90ms generation = 100ms.
        s.observe(Duration::from_millis(10), Duration::from_millis(90), 10);
        let own = s.estimate(10, IDLE);
        assert_eq!(own, Duration::from_millis(100));
        let load = |ahead, slots, running| Load {
            ahead,
            slots,
            running,
        };
        // A free slot: no wait.
        assert_eq!(s.estimate(10, load(0, 2, 1)), own);
        // All slots busy: one wave.
        assert_eq!(
            s.estimate(10, load(0, 2, 2)),
            own + Duration::from_millis(100)
        );
        // Two busy + two queued ahead on two slots: two waves.
        assert_eq!(
            s.estimate(10, load(2, 2, 2)),
            own + Duration::from_millis(200)
        );
        // No slot at all counts as one, never a division by zero.
        assert_eq!(
            s.estimate(10, load(1, 0, 0)),
            own + Duration::from_millis(100)
        );
    }

    #[test]
    fn admission_refuses_infeasible_and_over_capacity() {
        let sys = actix::System::new();
        sys.block_on(async {
            let h = Admission::start(1);
            let budget = Duration::from_millis(50);
            h.finished(
                "warm",
                "m",
                Some(Observed {
                    first_token: Duration::from_millis(10),
                    generation: Duration::from_millis(90),
                    tokens: 10,
                }),
            )
            .await
            .unwrap();
            let err = h.admit("a", "m", 10, budget, IDLE).await.err().unwrap();
            assert!(matches!(err, Error::Infeasible { .. }), "{err}");
            h.admit("b", "m", 1, budget, IDLE).await.unwrap();
            let err = h.admit("c", "m", 1, budget, IDLE).await.err().unwrap();
            assert!(matches!(err, Error::QueueFull { .. }), "{err}");
            assert!(h.cancel("b").await.unwrap());
            h.finished("b", "m", None).await.unwrap();
            assert!(!h.cancel("b").await.unwrap());
            h.admit("c", "m", 1, budget, IDLE).await.unwrap();
        });
    }
}
