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

/// Default bound on jobs admitted and not yet finished.
pub const DEFAULT_MAX_LIVE: usize = 1024;
/// Retry hint when the queen is at capacity.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Weight of the newest observation in the moving averages.
const EWMA_ALPHA: f64 = 0.2;

/// Observed speed of one model.
#[derive(Debug, Clone, Copy, Default)]
struct ModelStats {
    first_token_us: Option<f64>,
    per_token_us: Option<f64>,
}

impl ModelStats {
    fn estimate(&self, max_tokens: u32) -> Duration {
        let us = self.first_token_us.unwrap_or(0.0)
            + self.per_token_us.unwrap_or(0.0) * f64::from(max_tokens.saturating_sub(1));
        Duration::from_micros(us as u64)
    }

    fn observe(&mut self, first_token: Duration, generation: Duration, tokens: u32) {
        let ewma =
            |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + EWMA_ALPHA * (new - o)));
        self.first_token_us = ewma(self.first_token_us, first_token.as_micros() as f64);
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
            .estimate(msg.max_tokens);
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
    ) -> Result<Admitted, Error> {
        self.addr
            .send(Admit {
                id: id.to_owned(),
                model: model.to_owned(),
                max_tokens,
                budget,
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

    #[test]
    fn estimate_grows_with_tokens_and_learns() {
        let mut s = ModelStats::default();
        assert_eq!(s.estimate(100), Duration::ZERO);
        s.observe(Duration::from_millis(10), Duration::from_millis(90), 10);
        assert_eq!(s.estimate(1), Duration::from_millis(10));
        assert_eq!(s.estimate(11), Duration::from_millis(110));
        s.observe(Duration::from_millis(20), Duration::from_millis(90), 10);
        assert_eq!(s.estimate(1), Duration::from_millis(12));
    }
}
