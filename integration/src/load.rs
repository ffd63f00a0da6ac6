//! Chaos load: many synthetic jobs over several pools while one pool is SIGKILLed and restarted,
//! then an account of every job — accepted, completed, retried, failed, lost.
//!
//! "Lost" is the figure that must be zero: a job the queen accepted whose stream ended without a
//! terminal event, or that the queen's own record (`Jobs/Get`) does not show in a terminal state
//! matching what the client saw. The test (`tests/load.rs`) and the benchmark (`skep-bench`)
//! both run this.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use skep_proto::v1::jobs_client::JobsClient;
use skep_proto::v1::{GetJobRequest, JobState, SubmitRequest, job_event};
use tonic::transport::Channel;

use crate::{Cluster, PoolOpts};

/// Shape of a chaos run.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub jobs: usize,
    pub pools: usize,
    pub workers_per_pool: u16,
    /// Clients submitting at once.
    pub concurrency: usize,
    /// Budget of every job.
    pub deadline: Duration,
    /// Pool 0 is killed once this many jobs have ended, and restarted after `down_for`; `None`
    /// runs the same load without the chaos (the benchmark's baseline).
    pub kill_after: Option<usize>,
    pub down_for: Duration,
    /// The queen is SIGKILLed (and restarted at once on its data dir) each time this many jobs
    /// have ended; jobs whose streams die with it are followed through `Jobs/Get`.
    pub kill_queen_after: Vec<usize>,
}

impl LoadPlan {
    pub fn new(jobs: usize) -> LoadPlan {
        LoadPlan {
            jobs,
            pools: 3,
            workers_per_pool: 2,
            concurrency: 24,
            deadline: Duration::from_secs(20),
            kill_after: Some(jobs / 3),
            down_for: Duration::from_secs(1),
            kill_queen_after: Vec::new(),
        }
    }
}

/// What happened to one job, from the client's side.
#[derive(Debug, Clone, Default)]
struct Seen {
    id: String,
    accepted: bool,
    /// Highest attempt number in a `dispatched` event.
    attempts: u32,
    /// `Some(Ok(tokens))` for done, `Some(Err(code))` for an error; `None`: no terminal event.
    end: Option<Result<u32, tonic::Code>>,
    max_tokens: u32,
    /// The stream broke after acceptance (the queen died): the outcome is in the queen's record.
    broken: bool,
}

/// The account of a chaos run.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub offered: usize,
    pub accepted: usize,
    /// Refused at admission (not accepted, so not owed a result): code → count.
    pub rejected: BTreeMap<String, usize>,
    pub completed: usize,
    /// Accepted jobs that ran on more than one pool.
    pub retried: usize,
    /// Accepted jobs that ended with an error event: code → count.
    pub failed: BTreeMap<String, usize>,
    /// Accepted jobs without a terminal event, or whose record disagrees with their stream.
    pub lost: usize,
    /// Ids (and why) of lost jobs, for the failure message.
    pub lost_detail: Vec<String>,
    /// Accepted jobs whose stream died with a killed queen and that the restarted queen then
    /// ended (followed through `Jobs/Get`).
    pub resumed: usize,
    pub queen_kills: usize,
    /// Completed jobs that did not receive exactly the tokens they asked for.
    pub short: usize,
    pub wall: Duration,
    pub killed_at: Option<Duration>,
    pub restarted_at: Option<Duration>,
    /// All pools, the restarted one included, were registered and healthy at the end.
    pub all_pools_back: bool,
}

/// Starts a queen and `plan.pools` synthetic pools, runs the plan, and accounts for every job.
pub fn run(plan: &LoadPlan) -> LoadReport {
    let opts = PoolOpts {
        workers: plan.workers_per_pool,
        ttft: "2ms".into(),
        tps: 1000.0,
        ..PoolOpts::default()
    };
    let mut cluster = Cluster::start(opts.clone());
    for _ in 1..plan.pools {
        cluster.add_pool(opts.clone());
    }
    cluster.wait_for_nodes(plan.pools);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(drive(&mut cluster, plan))
}

async fn drive(cluster: &mut Cluster, plan: &LoadPlan) -> LoadReport {
    let client = cluster.jobs_client().await;
    let ended = Arc::new(AtomicUsize::new(0));
    // Jobs accepted and not yet ended: a queen kill is only a test of resuming work in flight
    // when there is some (on a loaded machine the queen can be slow enough that every job
    // around the kill point is still waiting for acceptance).
    let streaming = Arc::new(AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(plan.concurrency));
    let started = Instant::now();
    let submitter = {
        let (client, ended, sem) = (client.clone(), Arc::clone(&ended), Arc::clone(&sem));
        let streaming = Arc::clone(&streaming);
        let requests: Vec<_> = (0..plan.jobs)
            .map(|i| {
                let max_tokens = 4 + (i % 13) as u32;
                let req = cluster.authed(SubmitRequest {
                    model: "synthetic".into(),
                    prompt: format!("load job {i}"),
                    max_tokens,
                    deadline_ms: u64::try_from(plan.deadline.as_millis()).unwrap_or(u64::MAX),
                    ..Default::default()
                });
                (req, max_tokens)
            })
            .collect();
        let deadline = plan.deadline;
        tokio::spawn(async move {
            let mut tasks = Vec::with_capacity(requests.len());
            for (req, max_tokens) in requests {
                let permit = Arc::clone(&sem).acquire_owned().await.expect("semaphore");
                let (client, ended) = (client.clone(), Arc::clone(&ended));
                let streaming = Arc::clone(&streaming);
                tasks.push(tokio::spawn(async move {
                    let seen = one_job(client, req, max_tokens, deadline, &streaming).await;
                    ended.fetch_add(1, Ordering::SeqCst);
                    drop(permit);
                    seen
                }));
            }
            let mut all = Vec::with_capacity(tasks.len());
            for t in tasks {
                all.push(t.await.expect("job task"));
            }
            all
        })
    };

    // Chaos: kill pool 0 mid-run, keep it down a while, bring it back.
    let mut report = LoadReport::default();
    if let Some(kill_after) = plan.kill_after {
        while ended.load(Ordering::SeqCst) < kill_after && !submitter.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::task::block_in_place(|| cluster.kill_pool(0));
        report.killed_at = Some(started.elapsed());
        tokio::time::sleep(plan.down_for).await;
        tokio::task::block_in_place(|| cluster.restart_pool(0));
        report.restarted_at = Some(started.elapsed());
    }

    for at in &plan.kill_queen_after {
        while (ended.load(Ordering::SeqCst) < *at
            || streaming.load(Ordering::SeqCst) < QUEEN_KILL_IN_FLIGHT)
            && !submitter.is_finished()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::task::block_in_place(|| {
            cluster.kill_queen();
            cluster.start_queen_again();
        });
        report.queen_kills += 1;
    }

    let all = submitter.await.expect("submitter");
    report.wall = started.elapsed();
    report.all_pools_back = tokio::task::block_in_place(|| {
        let give_up = Instant::now() + crate::WAIT;
        while Instant::now() < give_up {
            if cluster.healthy_nodes() == Ok(plan.pools) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    });
    report.offered = all.len();
    account(&mut report, &all, client, cluster).await;
    report
}

/// Accepted jobs that must be in flight when the queen is killed.
const QUEEN_KILL_IN_FLIGHT: usize = 4;

async fn one_job(
    client: JobsClient<Channel>,
    req: tonic::Request<SubmitRequest>,
    max_tokens: u32,
    deadline: Duration,
    streaming: &AtomicUsize,
) -> Seen {
    let seen = follow_stream(client, req, max_tokens, deadline, streaming).await;
    if seen.accepted {
        streaming.fetch_sub(1, Ordering::SeqCst);
    }
    seen
}

async fn follow_stream(
    mut client: JobsClient<Channel>,
    mut req: tonic::Request<SubmitRequest>,
    max_tokens: u32,
    deadline: Duration,
    streaming: &AtomicUsize,
) -> Seen {
    req.set_timeout(deadline);
    let mut seen = Seen {
        max_tokens,
        ..Seen::default()
    };
    let mut stream = match client.submit(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            seen.end = Some(Err(s.code()));
            return seen;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(ev)) => {
                if seen.id.is_empty() {
                    seen.id = ev.job_id.clone();
                }
                match ev.kind {
                    Some(job_event::Kind::Accepted(_)) => {
                        if !seen.accepted {
                            streaming.fetch_add(1, Ordering::SeqCst);
                        }
                        seen.accepted = true;
                    }
                    Some(job_event::Kind::Dispatched(d)) => {
                        seen.attempts = seen.attempts.max(d.attempt);
                    }
                    Some(job_event::Kind::Done(d)) => {
                        seen.end = Some(Ok(d.tokens));
                        return seen;
                    }
                    Some(job_event::Kind::Error(e)) => {
                        seen.end = Some(Err(tonic::Code::from_i32(e.code)));
                        // The stream closes with the same status; nothing more to read.
                        return seen;
                    }
                    _ => {}
                }
            }
            // The stream ended without a terminal event: the job is lost unless the status is
            // what ended it before acceptance.
            Ok(None) => return seen,
            Err(s) => {
                if seen.accepted {
                    seen.broken = true;
                } else {
                    seen.end = Some(Err(s.code()));
                }
                return seen;
            }
        }
    }
}

async fn account(
    report: &mut LoadReport,
    all: &[Seen],
    mut client: JobsClient<Channel>,
    cluster: &Cluster,
) {
    for s in all {
        if !s.accepted {
            let code = match s.end {
                Some(Err(c)) => format!("{c:?}"),
                _ => "no answer".into(),
            };
            *report.rejected.entry(code).or_default() += 1;
            continue;
        }
        report.accepted += 1;
        if s.attempts > 1 {
            report.retried += 1;
        }
        let end = match s.end {
            Some(end) => Some(end),
            // Its queen died: the restarted one must run it to an end (or have ended it).
            None if s.broken => {
                let end = follow(&mut client, cluster, &s.id).await;
                if end.is_some() {
                    report.resumed += 1;
                }
                end
            }
            None => None,
        };
        let Some(end) = end else {
            report.lost += 1;
            report
                .lost_detail
                .push(format!("{}: no terminal event", s.id));
            continue;
        };
        match end {
            Ok(tokens) => {
                report.completed += 1;
                if tokens != s.max_tokens {
                    report.short += 1;
                }
            }
            Err(code) => *report.failed.entry(format!("{code:?}")).or_default() += 1,
        }
        // The queen's record must agree with what the client saw.
        let want = match end {
            Ok(_) => vec![JobState::Done],
            Err(tonic::Code::DeadlineExceeded) => vec![JobState::DeadlineExceeded],
            Err(tonic::Code::Cancelled) => vec![JobState::Cancelled],
            Err(_) => vec![JobState::Failed],
        };
        let req = cluster.authed(GetJobRequest {
            job_id: s.id.clone(),
        });
        let got = client.get(req).await;
        match got {
            Ok(job) if want.iter().any(|w| *w as i32 == job.get_ref().state) => {}
            Ok(job) => {
                report.lost += 1;
                report.lost_detail.push(format!(
                    "{}: client saw {end:?}, queen records state {}",
                    s.id,
                    job.get_ref().state
                ));
            }
            Err(e) => {
                report.lost += 1;
                report
                    .lost_detail
                    .push(format!("{}: no record at the queen: {e}", s.id));
            }
        }
    }
}

/// Polls `Jobs/Get` until the job has a terminal state; `None` if it never does (or has no
/// record) within the harness's patience.
async fn follow(
    client: &mut JobsClient<Channel>,
    cluster: &Cluster,
    id: &str,
) -> Option<Result<u32, tonic::Code>> {
    let give_up = Instant::now() + crate::WAIT;
    while Instant::now() < give_up {
        let req = cluster.authed(GetJobRequest {
            job_id: id.to_owned(),
        });
        if let Ok(job) = client.get(req).await {
            let j = job.into_inner();
            let state = JobState::try_from(j.state).unwrap_or(JobState::Unspecified);
            match state {
                JobState::Done => return Some(Ok(j.tokens)),
                JobState::DeadlineExceeded => return Some(Err(tonic::Code::DeadlineExceeded)),
                JobState::Cancelled => return Some(Err(tonic::Code::Cancelled)),
                JobState::Failed => return Some(Err(tonic::Code::Unavailable)),
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}
