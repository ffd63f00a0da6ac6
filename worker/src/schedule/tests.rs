//! The step scheduler on a simulated clock: deadline order, preemption, chunked prompts, stops.

use std::collections::HashMap;

use super::*;

const MS: u64 = 1_000_000;

fn job(id: SeqId, deadline_ms: u64, pending_prompt: usize, tokens_left: u32) -> Job {
    Job {
        id,
        deadline_ns: deadline_ms * MS,
        pending_prompt,
        tokens_left,
    }
}

/// How a simulated run went.
#[derive(Debug, Default)]
struct Run {
    /// Finish time (ns) of each job that produced all its tokens.
    finished: HashMap<SeqId, u64>,
    stopped: Vec<SeqId>,
    /// Per job, the times its tokens came out.
    token_times: HashMap<SeqId, Vec<u64>>,
    /// Prompt tokens run in each step.
    prompt_per_step: Vec<usize>,
}

/// Runs `jobs` to the end, every step as `choose` plans it, each step taking what `cost`
/// predicts (the simulated machine is the model).
fn simulate(
    mut jobs: Vec<Job>,
    cost: &StepCost,
    chunk: usize,
    choose: impl Fn(u64, &[Job]) -> Plan,
) -> Run {
    let mut now = 0u64;
    let mut run = Run::default();
    for _ in 0..100_000 {
        if jobs.is_empty() {
            return run;
        }
        let p = choose(now, &jobs);
        jobs.retain(|j| !p.hopeless.contains(&j.id));
        run.stopped.extend(&p.hopeless);
        if p.advance.is_empty() {
            continue;
        }
        let rows = p.advance.iter().filter(|w| w.prompt_tokens == 0).count();
        let prompt: usize = p.advance.iter().map(|w| w.prompt_tokens).sum();
        assert!(
            prompt <= chunk,
            "a step ran {prompt} prompt tokens, chunk {chunk}"
        );
        run.prompt_per_step.push(prompt);
        now += (cost.estimate(rows, prompt) * 1000.0) as u64;
        for w in &p.advance {
            let j = jobs.iter_mut().find(|j| j.id == w.id).expect("planned job");
            if j.pending_prompt > 0 {
                j.pending_prompt -= w.prompt_tokens.min(j.pending_prompt);
                if j.pending_prompt > 0 {
                    continue;
                }
            }
            j.tokens_left -= 1;
            run.token_times.entry(j.id).or_default().push(now);
            if j.tokens_left == 0 {
                run.finished.insert(j.id, now);
            }
        }
        jobs.retain(|j| j.tokens_left > 0);
    }
    panic!("the simulation did not end");
}

/// Every job in every step: what a batch without deadline order does.
fn everyone(_now: u64, jobs: &[Job], chunk: usize) -> Plan {
    let mut budget = chunk;
    Plan {
        advance: jobs
            .iter()
            .filter_map(|j| {
                if j.pending_prompt == 0 {
                    return Some(Work {
                        id: j.id,
                        prompt_tokens: 0,
                    });
                }
                let take = j.pending_prompt.min(budget);
                budget -= take;
                (take > 0).then_some(Work {
                    id: j.id,
                    prompt_tokens: take,
                })
            })
            .collect(),
        hopeless: Vec::new(),
    }
}

fn met(run: &Run, jobs: &[Job]) -> Vec<SeqId> {
    jobs.iter()
        .filter(|j| run.finished.get(&j.id).is_some_and(|&t| t <= j.deadline_ns))
        .map(|j| j.id)
        .collect()
}

#[test]
fn with_mixed_deadlines_slack_jobs_wait_so_the_urgent_one_meets_its_deadline() {
    // A decode step costs 10 ms + 5 ms per job. All four together: 30 ms a step, and the urgent
    // job's 10 tokens take 300 ms, past its 250 ms deadline; alone or with one other it fits.
    let cost = StepCost::linear(4, 10_000.0, 5_000.0, 100.0);
    let jobs = vec![
        job(1, 10_000, 0, 40),
        job(2, 250, 0, 10),
        job(3, 10_000, 0, 40),
        job(4, 10_000, 0, 40),
    ];
    let naive = simulate(jobs.clone(), &cost, 64, |now, js| everyone(now, js, 64));
    assert!(
        !met(&naive, &jobs).contains(&2),
        "the scenario must need preemption: {:?}",
        naive.finished
    );
    let run = simulate(jobs.clone(), &cost, 64, |now, js| plan(now, js, &cost, 64));
    assert_eq!(met(&run, &jobs), vec![1, 2, 3, 4], "{:?}", run.finished);
    assert!(run.stopped.is_empty());
    // No job with slack got a token while the urgent job was still short of time: until the
    // urgent job finished, fewer than all four advanced in some steps.
    let urgent_done = run.finished[&2];
    let slack_tokens_before: usize = [1, 3, 4]
        .iter()
        .map(|id| {
            run.token_times[id]
                .iter()
                .filter(|&&t| t <= urgent_done)
                .count()
        })
        .sum();
    assert!(
        slack_tokens_before < 3 * run.token_times[&2].len(),
        "the slack jobs were not held back"
    );
}

#[test]
fn the_first_plan_advances_the_urgent_job_and_holds_back_the_most_slack() {
    let cost = StepCost::linear(4, 10_000.0, 5_000.0, 100.0);
    let jobs = [
        job(1, 9_000, 0, 40),
        job(2, 250, 0, 10),
        job(3, 10_000, 0, 40),
        job(4, 8_000, 0, 40),
    ];
    let p = plan(0, &jobs, &cost, 64);
    let ids: Vec<_> = p.advance.iter().map(|w| w.id).collect();
    // 2 is most urgent: its 10 tokens should take at most half its 250 ms. All four make 30 ms
    // steps (300 ms); the most slack wait in turn — 3, then 1, then 4 — and alone it takes
    // 150 ms, the best it can get.
    assert_eq!(ids, vec![2]);
    // With a looser deadline, dropping 3 alone is enough: 3 rows, 25 ms steps, 250 ms of 500.
    let mut looser = jobs.clone();
    looser[1].deadline_ns = 500 * MS;
    let p = plan(0, &looser, &cost, 64);
    let ids: Vec<_> = p.advance.iter().map(|w| w.id).collect();
    assert_eq!(ids, vec![2, 4, 1]);
}

#[test]
fn chunked_prompts_bound_a_decoding_jobs_stall_to_one_chunk() {
    // A 2000-token prompt arrives while a job decodes; chunks of 64 prompt tokens per step.
    let cost = StepCost::linear(2, 10_000.0, 1_000.0, 500.0);
    let jobs = vec![job(1, 60_000, 0, 100), job(2, 60_000, 2000, 10)];
    let run = simulate(jobs.clone(), &cost, 64, |now, js| plan(now, js, &cost, 64));
    assert_eq!(met(&run, &jobs), vec![1, 2]);
    let bound = (cost.estimate(1, 64) * 1000.0) as u64;
    let times = &run.token_times[&1];
    let gaps = times.windows(2).map(|w| w[1] - w[0]);
    assert!(
        gaps.clone().all(|g| g <= bound),
        "a gap between tokens exceeded one step with a full chunk ({bound} ns): {:?}",
        gaps.max()
    );
    assert!(run.prompt_per_step.iter().all(|&p| p <= 64));
    // The whole prompt ran, in chunks, while job 1 decoded.
    assert!(run.prompt_per_step.iter().filter(|&&p| p > 0).count() >= 2000 / 64);
}

#[test]
fn a_long_prompt_waits_while_an_urgent_job_decodes() {
    // A step of one decoding row costs 12 ms; with a 128-token chunk, 230 ms more. The urgent
    // job's 15 tokens beside the chunks would take 3.6 s of its 500 ms; the long job, with 29 s
    // for its 330-token prompt and 128 tokens, can wait.
    let cost = StepCost::linear(4, 10_000.0, 2_000.0, 1_800.0);
    let jobs = [job(1, 500, 0, 15), job(2, 29_000, 330, 128)];
    let p = plan(0, &jobs, &cost, 128);
    assert_eq!(
        p.advance,
        vec![Work {
            id: 1,
            prompt_tokens: 0
        }]
    );
    // Run to the end: both meet their deadlines, the urgent one within half its time.
    let run = simulate(jobs.to_vec(), &cost, 128, |now, js| {
        plan(now, js, &cost, 128)
    });
    assert_eq!(met(&run, &jobs), vec![1, 2]);
    assert!(run.finished[&1] <= 250 * MS, "{:?}", run.finished);
}

#[test]
fn the_prompt_chunk_goes_to_the_most_urgent_prompt_first() {
    let cost = StepCost::linear(4, 1_000.0, 100.0, 10.0);
    let jobs = [
        job(1, 5_000, 300, 4),
        job(2, 1_000, 300, 4),
        job(3, 9_000, 0, 4),
    ];
    let p = plan(0, &jobs, &cost, 128);
    assert_eq!(
        p.advance,
        vec![
            Work {
                id: 2,
                prompt_tokens: 128
            },
            Work {
                id: 3,
                prompt_tokens: 0
            },
        ],
        "job 1 waits for the next chunk"
    );
}

#[test]
fn a_job_that_cannot_finish_even_alone_is_stopped_when_it_shares_the_worker() {
    // 20 tokens at >= 11 ms each cannot fit in 100 ms.
    let cost = StepCost::linear(2, 10_000.0, 1_000.0, 100.0);
    let jobs = [job(1, 100, 0, 20), job(2, 10_000, 0, 20)];
    let p = plan(0, &jobs, &cost, 64);
    assert_eq!(p.hopeless, vec![1]);
    assert_eq!(p.advance.iter().map(|w| w.id).collect::<Vec<_>>(), vec![2]);
    // Alone it runs on (its partial output still streams, and it delays nobody).
    let p = plan(0, &jobs[..1], &cost, 64);
    assert!(p.hopeless.is_empty());
    assert_eq!(p.advance.len(), 1);
    // A job whose deadline has already passed is stopped too.
    let p = plan(
        200 * MS,
        &[job(1, 150, 0, 1), job(2, 10_000, 0, 1)],
        &cost,
        64,
    );
    assert_eq!(p.hopeless, vec![1]);
}

#[test]
fn before_any_step_is_measured_nothing_is_stopped_or_held_back() {
    let cost = StepCost::new(4);
    let jobs = [job(1, 1, 0, 1000), job(2, 2, 50, 1000)];
    let p = plan(0, &jobs, &cost, 64);
    assert!(p.hopeless.is_empty());
    assert_eq!(p.advance.len(), 2);
}

#[test]
fn the_cost_model_learns_decode_steps_per_batch_size_and_prompt_tokens() {
    let mut c = StepCost::new(8);
    c.observe(1, 0, 10_000.0);
    c.observe(4, 0, 16_000.0);
    assert_eq!(c.estimate(1, 0), 10_000.0);
    assert_eq!(c.estimate(4, 0), 16_000.0);
    // Unseen sizes cost what the nearest smaller seen one did.
    assert_eq!(c.estimate(3, 0), 10_000.0);
    assert_eq!(c.estimate(8, 0), 16_000.0);
    // A step with one decode row and 100 prompt tokens that took 30 ms: 0.2 ms per token.
    c.observe(1, 100, 30_000.0);
    assert!((c.estimate(1, 100) - 30_000.0).abs() < 1e-6);
    assert!((c.estimate(0, 10) - 2_000.0).abs() < 1e-6);
    // Later observations move the mean.
    c.observe(1, 0, 20_000.0);
    assert!(c.estimate(1, 0) > 10_000.0 && c.estimate(1, 0) < 20_000.0);
}
