//! `skep-load`: an open-loop load generator for `Jobs/Submit`, in a process of its own, writing a JSON summary (and optionally every job).
//!
//! Jobs leave on a fixed schedule (fixed spacing or Poisson, seeded) whatever the server does:
//! a completion never gates a send, so an overloaded queen cannot slow the offered load down. If
//! the sender itself falls behind its schedule, it says by how much (`send_lag_us`). Outcomes are
//! judged on this process's clock: a job is in time when its `done` event arrives before its send
//! time plus its deadline.
//!
//!   skep-load --queen URL --token-file FILE --rate 1000 --duration 10s --max-tokens 1 \
//!       --deadline 2s --out summary.json

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde_json::json;
use skep_integration::openloop::{self, Arrivals, PlanSpec, PlannedJob};
use skep_proto::v1::jobs_client::JobsClient;
use skep_proto::v1::{SubmitRequest, job_event};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug)]
struct Args {
    /// The queen's URL (http://HOST:PORT, or https with --ca-file).
    #[arg(long)]
    queen: String,
    /// File holding a submit (or admin) token.
    #[arg(long)]
    token_file: PathBuf,
    /// The queen's CA certificate, for an https URL.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Jobs per second offered.
    #[arg(long)]
    rate: f64,
    /// How long to offer load (humantime, e.g. 60s).
    #[arg(long, value_parser = humantime_duration)]
    duration: Duration,
    /// Arrival spacing.
    #[arg(long, value_enum, default_value = "fixed")]
    arrivals: Arrivals,
    /// Tokens asked of each job (the lower end when --max-tokens-max is set).
    #[arg(long, default_value_t = 1)]
    max_tokens: u32,
    /// Upper end of a uniform max_tokens distribution (seeded).
    #[arg(long)]
    max_tokens_max: Option<u32>,
    /// Deadline of each job (the lower end when --deadline-max is set).
    #[arg(long, value_parser = humantime_duration, default_value = "2s")]
    deadline: Duration,
    /// Upper end of a uniform deadline distribution (seeded).
    #[arg(long, value_parser = humantime_duration)]
    deadline_max: Option<Duration>,
    /// Seed of the arrival gaps, deadlines and lengths.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Most streams open at once; a job due when the cap is reached is not sent and is counted
    /// as `client_dropped` (waiting would make the load closed-loop).
    #[arg(long, default_value_t = 100_000)]
    concurrency: usize,
    /// HTTP/2 connections the jobs are spread over, round robin.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value = "synthetic")]
    model: String,
    /// How long past its deadline to wait for an accepted job's terminal event before calling it
    /// lost.
    #[arg(long, value_parser = humantime_duration, default_value = "5s")]
    grace: Duration,
    /// Where the JSON summary goes.
    #[arg(long)]
    out: PathBuf,
    /// Also write every job (arrival, deadline, max_tokens, outcome, finish) under "jobs".
    #[arg(long)]
    trace: bool,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// How one job ended, on this process's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Not sent: the cap on open streams was reached at its send time.
    ClientDropped,
    /// Refused before acceptance, with this gRPC code.
    Refused(tonic::Code),
    Done,
    /// Accepted, then ended with this code (an error event or the stream's status).
    FailedAfterAccept(tonic::Code),
    /// Accepted, and no terminal event or status arrived by the deadline plus the grace.
    Lost,
}

#[derive(Debug, Clone)]
struct Record {
    job: PlannedJob,
    /// Send time, from the start of the schedule.
    sent_us: u64,
    /// Send to the first answer (accepted event, or the refusal).
    first_answer_us: Option<u64>,
    accepted: bool,
    outcome: Outcome,
    /// When the terminal event or status arrived, from the start of the schedule.
    finish_us: Option<u64>,
    /// Done before send time + deadline.
    in_time: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    let spec = PlanSpec {
        rate: args.rate,
        duration: args.duration,
        arrivals: args.arrivals,
        deadline_ms: (
            args.deadline.as_millis() as u64,
            args.deadline_max.unwrap_or(args.deadline).as_millis() as u64,
        ),
        max_tokens: (
            args.max_tokens,
            args.max_tokens_max.unwrap_or(args.max_tokens),
        ),
        seed: args.seed,
    };
    let plan = openloop::plan(&spec);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("read {}", args.token_file.display()))?;
    let bearer: MetadataValue<_> = format!("Bearer {}", token.trim())
        .parse()
        .context("token is not a valid header value")?;
    let (records, cpu_us, wall) = rt.block_on(drive(&args, &plan, bearer))?;
    let summary = summarize(&args, &spec, &records, cpu_us, wall);
    let text = serde_json::to_string(&summary)?;
    std::fs::write(&args.out, text + "\n")
        .with_context(|| format!("write {}", args.out.display()))?;
    let mut brief = summary;
    if let Some(o) = brief.as_object_mut() {
        o.remove("jobs");
    }
    println!("{brief}");
    Ok(())
}

async fn connect(args: &Args) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(args.queen.clone())?.tcp_nodelay(true);
    if let Some(ca) = &args.ca_file {
        let ca = std::fs::read_to_string(ca)?;
        endpoint = endpoint.tls_config(skep_tls::client_config(&ca, skep_tls::QUEEN_NAME))?;
    }
    Ok(endpoint.connect().await?)
}

async fn drive(
    args: &Args,
    plan: &[PlannedJob],
    bearer: MetadataValue<tonic::metadata::Ascii>,
) -> anyhow::Result<(Vec<Record>, f64, Duration)> {
    let mut clients = Vec::with_capacity(args.connections.max(1));
    for _ in 0..args.connections.max(1) {
        clients.push(JobsClient::new(connect(args).await.context("connect")?));
    }
    let open = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let ticks = openloop::clock_ticks_per_sec() as f64;
    let cpu_before = openloop::cpu_ticks(std::process::id()).unwrap_or(0);
    // A short lead so the first sends are not already late while the loop starts.
    let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut tasks = Vec::with_capacity(plan.len());
    for (i, job) in plan.iter().enumerate() {
        let due = t0 + job.arrival;
        tokio::time::sleep_until(due).await;
        let sent_us = (tokio::time::Instant::now() - t0).as_micros() as u64;
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            tasks.push(tokio::spawn(std::future::ready(Record {
                job: *job,
                sent_us,
                first_answer_us: None,
                accepted: false,
                outcome: Outcome::ClientDropped,
                finish_us: None,
                in_time: false,
            })));
            continue;
        };
        let mut req = tonic::Request::new(SubmitRequest {
            model: args.model.clone(),
            prompt: format!("load {} {i}", args.seed),
            max_tokens: job.max_tokens,
            deadline_ms: job.deadline_ms,
            ..Default::default()
        });
        let deadline = Duration::from_millis(job.deadline_ms);
        req.set_timeout(deadline);
        req.metadata_mut().insert("authorization", bearer.clone());
        let client = clients[i % clients.len()].clone();
        let (job, grace) = (*job, args.grace);
        tasks.push(tokio::spawn(async move {
            let sent = tokio::time::Instant::now();
            let r = one_job(client, req, job, sent, t0, sent_us, grace).await;
            drop(permit);
            r
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        records.push(t.await?);
    }
    let wall = tokio::time::Instant::now() - t0;
    let cpu_after = openloop::cpu_ticks(std::process::id()).unwrap_or(0);
    let cpu_us = cpu_after.saturating_sub(cpu_before) as f64 * 1e6 / ticks;
    Ok((records, cpu_us, wall))
}

async fn one_job(
    mut client: JobsClient<Channel>,
    req: tonic::Request<SubmitRequest>,
    job: PlannedJob,
    sent: tokio::time::Instant,
    t0: tokio::time::Instant,
    sent_us: u64,
    grace: Duration,
) -> Record {
    let deadline = Duration::from_millis(job.deadline_ms);
    let mut r = Record {
        job,
        sent_us,
        first_answer_us: None,
        accepted: false,
        outcome: Outcome::Lost,
        finish_us: None,
        in_time: false,
    };
    let since_t0 = |t: tokio::time::Instant| (t - t0).as_micros() as u64;
    let ended = tokio::time::timeout(deadline + grace, async {
        let mut stream = match client.submit(req).await {
            Ok(s) => s.into_inner(),
            Err(s) => return Some(Outcome::Refused(s.code())),
        };
        loop {
            match stream.message().await {
                Ok(Some(ev)) => match ev.kind {
                    Some(job_event::Kind::Accepted(_)) => {
                        r.accepted = true;
                        r.first_answer_us = Some(sent.elapsed().as_micros() as u64);
                    }
                    Some(job_event::Kind::Done(_)) => return Some(Outcome::Done),
                    Some(job_event::Kind::Error(e)) => {
                        let code = tonic::Code::from_i32(e.code);
                        return Some(if r.accepted {
                            Outcome::FailedAfterAccept(code)
                        } else {
                            Outcome::Refused(code)
                        });
                    }
                    _ => {}
                },
                // The stream closed without a terminal event: lost once accepted.
                Ok(None) if r.accepted => return None,
                Ok(None) => return Some(Outcome::Refused(tonic::Code::Unknown)),
                Err(s) if r.accepted => return Some(Outcome::FailedAfterAccept(s.code())),
                Err(s) => return Some(Outcome::Refused(s.code())),
            }
        }
    })
    .await;
    let now = tokio::time::Instant::now();
    match ended {
        Ok(Some(outcome)) => {
            if r.first_answer_us.is_none() {
                r.first_answer_us = Some((now - sent).as_micros() as u64);
            }
            r.in_time = outcome == Outcome::Done && now - sent <= deadline;
            r.finish_us = Some(since_t0(now));
            r.outcome = outcome;
        }
        // No terminal event or status: lost if accepted, else never answered at all.
        Ok(None) | Err(_) => {
            r.outcome = if r.accepted {
                Outcome::Lost
            } else {
                Outcome::Refused(tonic::Code::Unknown)
            };
        }
    }
    r
}

fn pct_json(v: &[f64]) -> serde_json::Value {
    json!({
        "p50": openloop::percentile(v, 50.0),
        "p99": openloop::percentile(v, 99.0),
        "max": v.iter().copied().fold(f64::NAN, f64::max),
        "n": v.len(),
    })
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
}

fn summarize(
    args: &Args,
    spec: &PlanSpec,
    records: &[Record],
    cpu_us: f64,
    wall: Duration,
) -> serde_json::Value {
    let count = |f: &dyn Fn(&Record) -> bool| records.iter().filter(|r| f(r)).count() as u64;
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    for r in records {
        match r.outcome {
            Outcome::Refused(c) => *refused.entry(code_name(c)).or_default() += 1,
            Outcome::FailedAfterAccept(c) => *failed.entry(code_name(c)).or_default() += 1,
            _ => {}
        }
    }
    let done = count(&|r| r.outcome == Outcome::Done);
    let done_in_time = count(&|r| r.outcome == Outcome::Done && r.in_time);
    // Admitted, then missed on this clock: done late, or stopped at the deadline after acceptance.
    let admitted_then_missed = count(&|r| {
        r.accepted
            && ((r.outcome == Outcome::Done && !r.in_time)
                || r.outcome == Outcome::FailedAfterAccept(tonic::Code::DeadlineExceeded))
    });
    let latency: Vec<f64> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Done)
        .filter_map(|r| Some((r.finish_us? - r.sent_us) as f64))
        .collect();
    let first_answer_refused: Vec<f64> = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Refused(_)))
        .filter_map(|r| r.first_answer_us.map(|u| u as f64))
        .collect();
    let first_answer_accepted: Vec<f64> = records
        .iter()
        .filter(|r| r.accepted)
        .filter_map(|r| r.first_answer_us.map(|u| u as f64))
        .collect();
    let lag: Vec<f64> = records
        .iter()
        .map(|r| r.sent_us.saturating_sub(r.job.arrival.as_micros() as u64) as f64)
        .collect();
    let duration_s = spec.duration.as_secs_f64();
    let last_done_s = records
        .iter()
        .filter(|r| r.outcome == Outcome::Done)
        .filter_map(|r| r.finish_us)
        .max()
        .map_or(0.0, |u| u as f64 / 1e6);
    // Completions over the window they took: a server that falls behind stretches the window.
    let achieved_rate = done as f64 / duration_s.max(last_done_s).max(f64::MIN_POSITIVE);
    let mut out = json!({
        "queen": args.queen,
        "model": args.model,
        "arrivals": format!("{:?}", spec.arrivals).to_lowercase(),
        "seed": spec.seed,
        "deadline_ms": [spec.deadline_ms.0, spec.deadline_ms.1],
        "max_tokens": [spec.max_tokens.0, spec.max_tokens.1],
        "connections": args.connections,
        "concurrency": args.concurrency,
        "planned": records.len(),
        "offered_rate": args.rate,
        "duration_s": duration_s,
        "wall_s": wall.as_secs_f64(),
        "sent": count(&|r| r.outcome != Outcome::ClientDropped),
        "client_dropped": count(&|r| r.outcome == Outcome::ClientDropped),
        "send_lag_us": pct_json(&lag),
        "sent_over_1ms_late": lag.iter().filter(|l| **l > 1000.0).count(),
        "accepted": count(&|r| r.accepted),
        "refused": count(&|r| matches!(r.outcome, Outcome::Refused(_))),
        "refused_by_code": refused,
        "done": done,
        "done_in_time": done_in_time,
        "admitted_then_missed": admitted_then_missed,
        "failed_after_accept": count(&|r| matches!(r.outcome, Outcome::FailedAfterAccept(_))),
        "failed_after_accept_by_code": failed,
        "lost": count(&|r| r.outcome == Outcome::Lost),
        "latency_us": pct_json(&latency),
        "first_answer_refused_us": pct_json(&first_answer_refused),
        "first_answer_accepted_us": pct_json(&first_answer_accepted),
        "achieved_rate": achieved_rate,
        "goodput": done_in_time as f64 / duration_s,
        "cpu_us": cpu_us,
    });
    if args.trace {
        let jobs: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                let (outcome, code) = match r.outcome {
                    Outcome::ClientDropped => ("client_dropped", None),
                    Outcome::Refused(c) => ("refused", Some(code_name(c))),
                    Outcome::Done => ("done", None),
                    Outcome::FailedAfterAccept(tonic::Code::DeadlineExceeded) => {
                        ("deadline_exceeded", None)
                    }
                    Outcome::FailedAfterAccept(c) => ("failed", Some(code_name(c))),
                    Outcome::Lost => ("lost", None),
                };
                json!({
                    "arrival_us": r.job.arrival.as_micros() as u64,
                    "sent_us": r.sent_us,
                    "deadline_ms": r.job.deadline_ms,
                    "max_tokens": r.job.max_tokens,
                    "accepted": r.accepted,
                    "outcome": outcome,
                    "code": code,
                    "finish_us": r.finish_us,
                    "in_time": r.in_time,
                })
            })
            .collect();
        out["jobs"] = serde_json::Value::Array(jobs);
    }
    out
}
