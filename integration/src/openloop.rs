//! Open-loop load: seeded job plans, the summary `skep-load` writes, the offline EDF oracle, and per-process CPU time.
//!
//! `skep-load` sends jobs on the plan's schedule whatever the server does (open loop), so an
//! overloaded server shows up as refusals, misses and a growing backlog rather than as a slower
//! client. `skep-bench` reads its JSON summary and judges the same plan against the oracle.

use std::time::Duration;

use serde_json::Value;

/// splitmix64: small, seeded and identical on every machine, so a plan is a function of its spec.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in [lo, hi] (hi < lo is read as lo).
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// How arrivals are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arrivals {
    /// Exactly 1/rate apart.
    Fixed,
    /// Exponential gaps of mean 1/rate (a Poisson process): the bursts a real front end sees.
    Poisson,
}

/// What to send: rate, length and the distributions of deadline and length of each job.
#[derive(Debug, Clone)]
pub struct PlanSpec {
    pub rate: f64,
    pub duration: Duration,
    pub arrivals: Arrivals,
    /// Deadline of each job, uniform in [min, max] milliseconds.
    pub deadline_ms: (u64, u64),
    /// Tokens asked of each job, uniform in [min, max].
    pub max_tokens: (u32, u32),
    pub seed: u64,
}

/// One job of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedJob {
    /// When to send it, from the start of the run.
    pub arrival: Duration,
    pub deadline_ms: u64,
    pub max_tokens: u32,
}

/// The jobs a spec describes, in arrival order. Deadlines and lengths come from their own stream
/// so that fixed and Poisson arrivals of one seed ask for the same jobs.
pub fn plan(spec: &PlanSpec) -> Vec<PlannedJob> {
    let mut gaps = Rng::new(spec.seed);
    let mut shape = Rng::new(spec.seed ^ 0x5DEE_CE66_D1CE_4E5B);
    let mut out = Vec::new();
    if spec.rate <= 0.0 {
        return out;
    }
    let end = spec.duration.as_secs_f64();
    let mut t = 0.0f64;
    let mut i = 0u64;
    loop {
        let at = match spec.arrivals {
            Arrivals::Fixed => i as f64 / spec.rate,
            Arrivals::Poisson => {
                // 1 - unit() is in (0, 1], so the logarithm is finite.
                t += -(1.0 - gaps.unit()).ln() / spec.rate;
                t
            }
        };
        if at >= end {
            return out;
        }
        out.push(PlannedJob {
            arrival: Duration::from_secs_f64(at),
            deadline_ms: shape.between(spec.deadline_ms.0, spec.deadline_ms.1),
            max_tokens: shape.between(u64::from(spec.max_tokens.0), u64::from(spec.max_tokens.1))
                as u32,
        });
        i += 1;
    }
}

/// The synthetic engine's pace: first token after `ttft`, then one token every `per_token`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub ttft: Duration,
    pub per_token: Duration,
}

impl Pace {
    /// From the pool flags `--synthetic-ttft` and `--synthetic-tps` (0 = unpaced).
    pub fn synthetic(ttft: Duration, tps: f64) -> Pace {
        let per_token = if tps > 0.0 {
            Duration::from_secs_f64(1.0 / tps)
        } else {
            Duration::ZERO
        };
        Pace { ttft, per_token }
    }

    /// Engine time of one job: the first token, then `max_tokens - 1` paced ones.
    pub fn service(&self, max_tokens: u32) -> Duration {
        self.ttft + self.per_token * max_tokens.saturating_sub(1)
    }
}

/// A job as the oracle sees it, in microseconds from the start of the run.
#[derive(Debug, Clone, Copy)]
pub struct OracleJob {
    pub arrival_us: u64,
    /// Absolute: arrival + budget.
    pub deadline_us: u64,
    pub service_us: u64,
}

/// Offline EDF with exact admission: knows every job's service time (not future arrivals),
/// schedules admitted jobs earliest-deadline-first on `slots` non-preemptive slots (as skep's
/// workers are), and admits an arriving job only if, in the EDF schedule of everything admitted
/// and not yet started plus this job, every one still meets its deadline. Returns how many jobs
/// it admits; by construction each of them finishes in time, with zero overhead.
pub fn edf_oracle(jobs: &[OracleJob], slots: usize) -> usize {
    let slots = slots.max(1);
    let mut free_at = vec![0u64; slots];
    let mut pending: Vec<OracleJob> = Vec::new();
    let mut admitted = 0;
    let mut order: Vec<OracleJob> = jobs.to_vec();
    order.sort_by_key(|j| j.arrival_us);
    for job in order {
        let now = job.arrival_us;
        start_due(&mut free_at, &mut pending, now);
        let mut trial = pending.clone();
        trial.push(job);
        if edf_fits(&free_at, &trial, now) {
            pending.push(job);
            admitted += 1;
        }
    }
    admitted
}

/// Starts, in EDF order, every pending job a slot picks up before `now`; a slot that frees up
/// with nothing arrived idles until the next arrival.
fn start_due(free_at: &mut [u64], pending: &mut Vec<OracleJob>, now: u64) {
    loop {
        let Some((slot, &at)) = free_at.iter().enumerate().min_by_key(|(_, t)| **t) else {
            return;
        };
        if at > now || pending.is_empty() {
            return;
        }
        let arrived = pending
            .iter()
            .enumerate()
            .filter(|(_, j)| j.arrival_us <= at)
            .min_by_key(|(_, j)| (j.deadline_us, j.arrival_us))
            .map(|(i, _)| i);
        match arrived {
            Some(i) => {
                let j = pending.swap_remove(i);
                free_at[slot] = at.max(j.arrival_us) + j.service_us;
            }
            None => {
                let next = pending.iter().map(|j| j.arrival_us).min().unwrap_or(now);
                free_at[slot] = next;
            }
        }
    }
}

/// Whether EDF list scheduling of `jobs` (all arrived by `now`) on slots free at `free_at`
/// meets every deadline.
fn edf_fits(free_at: &[u64], jobs: &[OracleJob], now: u64) -> bool {
    let mut free: Vec<u64> = free_at.iter().map(|t| (*t).max(now)).collect();
    let mut queue = jobs.to_vec();
    queue.sort_by_key(|j| (j.deadline_us, j.arrival_us));
    for j in queue {
        let Some(slot) = (0..free.len()).min_by_key(|&s| free[s]) else {
            return false;
        };
        let end = free[slot] + j.service_us;
        if end > j.deadline_us {
            return false;
        }
        free[slot] = end;
    }
    true
}

/// utime + stime of a process, in clock ticks (`/proc/PID/stat` fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: the fields after the last ')' start at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second for `/proc` times (`sysconf(_SC_CLK_TCK)`, asked of `getconf` since
/// this workspace forbids `unsafe`); Linux reports 100 everywhere, the fallback.
pub fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// Nearest-rank percentile of unsorted values (NaN when empty).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// The figures of one `skep-load` run, read back from its JSON summary.
#[derive(Debug, Clone, Default)]
pub struct LoadSummary {
    pub planned: u64,
    pub offered_rate: f64,
    pub duration_s: f64,
    pub sent: u64,
    /// Not sent because the cap on open streams was reached.
    pub client_dropped: u64,
    pub accepted: u64,
    pub refused: u64,
    pub done: u64,
    pub done_in_time: u64,
    pub admitted_then_missed: u64,
    pub failed_after_accept: u64,
    pub lost: u64,
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    pub achieved_rate: f64,
    pub goodput: f64,
    pub send_lag_p99_us: f64,
    pub send_lag_max_us: f64,
    pub cpu_us: f64,
    pub json: Value,
}

impl LoadSummary {
    pub fn from_json(v: Value) -> LoadSummary {
        let u = |k: &str| v[k].as_u64().unwrap_or(0);
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        LoadSummary {
            planned: u("planned"),
            offered_rate: f("offered_rate"),
            duration_s: f("duration_s"),
            sent: u("sent"),
            client_dropped: u("client_dropped"),
            accepted: u("accepted"),
            refused: u("refused"),
            done: u("done"),
            done_in_time: u("done_in_time"),
            admitted_then_missed: u("admitted_then_missed"),
            failed_after_accept: u("failed_after_accept"),
            lost: u("lost"),
            latency_p50_us: v["latency_us"]["p50"].as_f64().unwrap_or(f64::NAN),
            latency_p99_us: v["latency_us"]["p99"].as_f64().unwrap_or(f64::NAN),
            achieved_rate: f("achieved_rate"),
            goodput: f("goodput"),
            send_lag_p99_us: v["send_lag_us"]["p99"].as_f64().unwrap_or(f64::NAN),
            send_lag_max_us: v["send_lag_us"]["max"].as_f64().unwrap_or(f64::NAN),
            cpu_us: f("cpu_us"),
            json: v,
        }
    }

    /// The plan as the oracle needs it, from the per-job trace (`--trace`).
    pub fn oracle_jobs(&self, pace: &Pace) -> Vec<OracleJob> {
        let Some(jobs) = self.json["jobs"].as_array() else {
            return Vec::new();
        };
        jobs.iter()
            .map(|j| {
                let arrival_us = j["arrival_us"].as_u64().unwrap_or(0);
                let budget_us = j["deadline_ms"].as_u64().unwrap_or(0) * 1000;
                let tokens = j["max_tokens"].as_u64().unwrap_or(1) as u32;
                OracleJob {
                    arrival_us,
                    deadline_us: arrival_us + budget_us,
                    service_us: pace.service(tokens).as_micros() as u64,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(arrivals: Arrivals) -> PlanSpec {
        PlanSpec {
            rate: 100.0,
            duration: Duration::from_secs(2),
            arrivals,
            deadline_ms: (50, 500),
            max_tokens: (1, 40),
            seed: 7,
        }
    }

    #[test]
    fn plans_are_seeded_and_within_bounds() {
        let a = plan(&spec(Arrivals::Poisson));
        assert_eq!(a, plan(&spec(Arrivals::Poisson)));
        let fixed = plan(&spec(Arrivals::Fixed));
        assert_eq!(fixed.len(), 200);
        for j in a.iter().chain(&fixed) {
            assert!((50..=500).contains(&j.deadline_ms));
            assert!((1..=40).contains(&j.max_tokens));
            assert!(j.arrival < Duration::from_secs(2));
        }
        // Same seed, same jobs, whatever the spacing.
        for (p, f) in a.iter().zip(&fixed) {
            assert_eq!((p.deadline_ms, p.max_tokens), (f.deadline_ms, f.max_tokens));
        }
    }

    #[test]
    fn oracle_admits_what_fits_and_refuses_the_rest() {
        let job = |arrival_us, budget_us, service_us| OracleJob {
            arrival_us,
            deadline_us: arrival_us + budget_us,
            service_us,
        };
        // One slot: two 10 ms jobs with 15 ms budgets at once; only one fits.
        assert_eq!(
            edf_oracle(&[job(0, 15_000, 10_000), job(0, 15_000, 10_000)], 1),
            1
        );
        // Two slots: both fit.
        assert_eq!(
            edf_oracle(&[job(0, 15_000, 10_000), job(0, 15_000, 10_000)], 2),
            2
        );
        // A later tight job goes before a queued loose one (EDF), and both still fit.
        let jobs = [
            job(0, 10_000, 10_000),
            job(1_000, 100_000, 10_000),
            job(2_000, 19_000, 10_000),
        ];
        assert_eq!(edf_oracle(&jobs, 1), 3);
        // A job that cannot fit alone is never admitted.
        assert_eq!(edf_oracle(&[job(0, 5_000, 10_000)], 4), 0);
        // Sequential jobs that never overlap are all admitted.
        let spaced: Vec<_> = (0..10).map(|i| job(i * 20_000, 15_000, 10_000)).collect();
        assert_eq!(edf_oracle(&spaced, 1), 10);
    }

    #[test]
    fn synthetic_service_time() {
        let pace = Pace::synthetic(Duration::from_millis(20), 200.0);
        assert_eq!(pace.service(1), Duration::from_millis(20));
        assert_eq!(pace.service(16), Duration::from_millis(95));
        let unpaced = Pace::synthetic(Duration::ZERO, 0.0);
        assert_eq!(unpaced.service(100), Duration::ZERO);
    }

    #[test]
    fn cpu_ticks_of_self() {
        assert!(cpu_ticks(std::process::id()).is_some());
        assert!(clock_ticks_per_sec() > 0);
    }
}
