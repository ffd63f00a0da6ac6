//! The report sections of `skep-bench batch`: figures as ratios against llama-server measured in
//! the same run, and the tables behind them.

use std::time::Duration;

use skep_integration::report::{Figure, Section};

use super::deadline::{CAPACITY_PERIODS, Deadlines};
use super::{
    Args, CHAT_PROMPT, CTX_PER_SLOT, Closed, Kind, LONG_TOKENS, URGENT_PROMPT, URGENT_TOKENS, mib,
};

/// Stream counts whose memory is compared (serving many against serving one).
const MEMORY_MANY: usize = 8;

pub fn sections(
    args: &Args,
    kinds: &[Kind],
    closed: &[(Kind, usize, Closed)],
    mixed: &[(Kind, Closed)],
    deadline: Option<&Deadlines>,
    took: Duration,
) -> Vec<Section> {
    let mut out = Vec::new();
    let find = |k: Kind, n: usize| {
        closed
            .iter()
            .find(|(kk, nn, _)| *kk == k && *nn == n)
            .map(|(_, _, c)| c)
    };
    let llama_ran = kinds.contains(&Kind::Llama);
    let base_name = |what: &str| {
        if llama_ran {
            format!("llama_server_{what}")
        } else {
            format!("llama_server_not_run_{what}")
        }
    };
    let skeps = [(Kind::SkepBatch, "batch"), (Kind::SkepWorkers, "workers")];

    // Throughput and time to first token.
    let mut figures = Vec::new();
    for &n in &args.streams {
        let base = find(Kind::Llama, n);
        for (k, tag) in skeps {
            let Some(c) = find(k, n) else { continue };
            figures.push(Figure {
                name: format!("{tag}_aggregate_tps_{n}_streams"),
                value: c.tps(),
                unit: "tok/s".into(),
                baseline: base_name(&format!("{n}_streams")),
                baseline_value: base.map_or(f64::NAN, Closed::tps),
            });
        }
    }
    let mixed_base = mixed
        .iter()
        .find(|(k, _)| *k == Kind::Llama)
        .map(|(_, c)| c);
    for (k, tag) in skeps {
        let Some((_, c)) = mixed.iter().find(|(kk, _)| *kk == k) else {
            continue;
        };
        figures.push(Figure {
            name: format!("{tag}_ttft_p99_mixed_{}_streams", args.mixed_streams),
            value: c.ttft().pct_us(99.0) / 1e3,
            unit: "ms".into(),
            baseline: base_name("ttft_p99"),
            baseline_value: mixed_base.map_or(f64::NAN, |c| c.ttft().pct_us(99.0) / 1e3),
        });
    }
    let mut notes = vec![
        "| side | streams | tok/s | TTFT p50 | TTFT p99 | jobs | tokens | errors |".into(),
        "|---|---:|---:|---:|---:|---:|---:|---:|".into(),
    ];
    let row = |k: Kind, label: &str, c: &Closed| {
        format!(
            "| {} | {label} | {:.1} | {:.0} ms | {:.0} ms | {} | {} | {} |",
            k.label(),
            c.tps(),
            c.ttft().pct_us(50.0) / 1e3,
            c.ttft().pct_us(99.0) / 1e3,
            c.outcomes.len(),
            c.tokens(),
            c.errors()
        )
    };
    for (k, n, c) in closed {
        notes.push(row(*k, &n.to_string(), c));
    }
    for (k, c) in mixed {
        notes.push(row(*k, &format!("{} mixed", args.mixed_streams), c));
    }
    notes.push(String::new());
    notes.push(first_error(
        closed
            .iter()
            .map(|(_, _, c)| c)
            .chain(mixed.iter().map(|(_, c)| c)),
    ));
    let throughput = Section {
        title: "Batching: aggregate tokens/s and time to first token".into(),
        method: format!(
            "SmolLM2 ({file}), greedy, {threads} threads on each side, everything on this machine. \
             Closed loop: N streams (N = {streams}) each run one {warm}-token warm-up job (all at \
             once), then {jobs} measured job(s) of {tokens} tokens back to back; aggregate tokens/s is every \
             generated token over the measured window (first submission to last end), and time \
             to first token is taken per job on the client's clock from submission to the first \
             token event. Sides, each started fresh for each N: `llama-server -m FILE -np N -t \
             {threads} -tb {threads} -c N×{CTX_PER_SLOT} --cont-batching` over loopback HTTP \
             (`/completion`, streamed, `cache_prompt: false`, temperature 0), sent the ids skep's \
             tokenizer and chat template make of the prompt (\"{CHAT_PROMPT}\"); skep \
             `skep-pool --workers 1 --batch N`; skep `skep-pool --workers N --batch 1` (one job per \
             worker), both through the queen's gRPC `Submit`. The bench checks that every job on \
             every side evaluated the same number of prompt tokens, and stops otherwise. Jobs \
             end at {tokens} tokens or at end of generation, alike on both sides for the same \
             greedy ids. Mixed prompt lengths: {mixed} streams, half with that prompt and half \
             with about 300 tokens of prose (as above, {jobs} measured job(s) each); target p99 TTFT ≤ 0.5× \
             llama-server's. Target for throughput: ≥ 1.0× llama-server at every N. Whole batch \
             run: {secs:.0} s.",
            file = args
                .model_path
                .file_name()
                .map_or(args.model_path.display().to_string(), |f| f
                    .to_string_lossy()
                    .into_owned()),
            threads = args.threads,
            streams = list(&args.streams),
            warm = super::WARM_TOKENS,
            jobs = args.jobs_per_stream,
            tokens = args.max_tokens,
            mixed = args.mixed_streams,
            secs = took.as_secs_f64(),
        ),
        figures,
        notes,
    };
    if !closed.is_empty() || !mixed.is_empty() {
        out.push(throughput);
    }

    // Deadline attainment.
    if let Some(deadline) = deadline {
        out.push(attainment(args, deadline, &base_name));
    }
    if !closed.is_empty() {
        out.push(memory(&find));
    }
    out
}

fn attainment(args: &Args, deadline: &Deadlines, base_name: &dyn Fn(&str) -> String) -> Section {
    let mut figures = Vec::new();
    let base_run = |load: f64| {
        deadline
            .runs
            .iter()
            .find(|r| r.kind == Kind::Llama && r.load == load)
    };
    for r in deadline.runs.iter().filter(|r| r.kind != Kind::Llama) {
        let tag = if r.kind == Kind::SkepBatch {
            "batch"
        } else {
            "workers"
        };
        let pct = (r.load * 100.0).round();
        let b = base_run(r.load);
        figures.push(Figure {
            name: format!("{tag}_deadline_attainment_{pct}pct_load"),
            value: r.attainment() * 100.0,
            unit: "%".into(),
            baseline: base_name("fcfs_attainment"),
            baseline_value: b.map_or(f64::NAN, |b| b.attainment() * 100.0),
        });
        figures.push(Figure {
            name: format!("{tag}_goodput_{pct}pct_load"),
            value: r.goodput,
            unit: "tok/s".into(),
            baseline: base_name("goodput"),
            baseline_value: b.map_or(f64::NAN, |b| b.goodput),
        });
    }
    let mut notes = vec![
        "| side | load | arrivals | in deadline | urgent in deadline | long in deadline | refused or failed early | goodput |".into(),
        "|---|---:|---:|---:|---:|---:|---:|---:|".into(),
    ];
    for r in &deadline.runs {
        notes.push(format!(
            "| {} | {:.0}% | {} | {:.1}% | {}/{} | {}/{} | {} | {:.1} tok/s |",
            r.kind.label(),
            r.load * 100.0,
            r.arrivals,
            r.attainment() * 100.0,
            r.urgent_in_time,
            r.urgent,
            r.long_in_time,
            r.arrivals - r.urgent,
            r.refused,
            r.goodput
        ));
    }
    notes.push(String::new());
    notes.push("| side | urgent job alone | long job alone |".into());
    notes.push("|---|---:|---:|".into());
    for (k, u, l) in &deadline.alone {
        notes.push(format!(
            "| {} | {:.0} ms | {:.0} ms |",
            k.label(),
            u.as_secs_f64() * 1e3,
            l.as_secs_f64() * 1e3
        ));
    }
    for r in &deadline.runs {
        if !r.errors.is_empty() {
            let list: Vec<String> = r
                .errors
                .iter()
                .map(|(e, n)| format!("{n} × `{e}`"))
                .collect();
            notes.push(String::new());
            notes.push(format!(
                "{} at {:.0}%, jobs not finished in time: {}.",
                r.kind.label(),
                r.load * 100.0,
                list.join("; ")
            ));
        }
    }
    Section {
        title: "Batching: deadline attainment under overload".into(),
        method: format!(
            "Open loop, {slots} jobs at once on each side (`-np {slots}`, `--batch {slots}`, \
             `--workers {slots}`). A mix of urgent jobs (\"{URGENT_PROMPT}\", {URGENT_TOKENS} \
             tokens, deadline {ud:.0} ms) and long jobs (about 300 tokens of prose, {LONG_TOKENS} \
             tokens, deadline {ld:.0} ms), 3 urgent then 1 long, in that order. Each side is \
             first started alone, warmed up with one job of each kind, and timed on one more of \
             each; the deadlines are {us}× and {ls}× the slowest side's times ({ua:.0} ms and \
             {la:.0} ms), so no side is set a deadline it cannot meet when idle. Capacity, \
             measured in the same run: the job rate {cap_of} sustains on this mix in a closed \
             loop of {slots} streams ({CAPACITY_PERIODS} mixes each), {cap:.2} jobs/s. Each load \
             ({loads} of it) is a seeded Poisson schedule of {secs} s, the same for every side, \
             run on one fresh start of the side warmed up with one job of each kind. Deadlines \
             are on the client's clock from submission: llama-server is FCFS and the client \
             hangs up at the deadline (a miss); skep gets the deadline with the job. Attainment: \
             the share of all arrivals finished within their deadline (refused, failed and late \
             all count as not finished); goodput: tokens of in-deadline jobs per second of the \
             schedule. Target: skep's attainment ≥ 2× llama-server's at 200 %.",
            slots = args.open_slots,
            ud = deadline.urgent_deadline.as_secs_f64() * 1e3,
            us = args.urgent_slack,
            ua = deadline.urgent_alone.as_secs_f64() * 1e3,
            ld = deadline.long_deadline.as_secs_f64() * 1e3,
            ls = args.long_slack,
            la = deadline.long_alone.as_secs_f64() * 1e3,
            cap_of = deadline.capacity_of.map_or("the baseline", Kind::label),
            cap = deadline.capacity_jobs_s,
            loads = args
                .loads
                .iter()
                .map(|l| format!("{:.0} %", l * 100.0))
                .collect::<Vec<_>>()
                .join(", "),
            secs = args.open_secs,
        ),
        figures,
        notes,
    }
}

/// Memory: many streams against one, per side.
fn memory<'a>(find: &dyn Fn(Kind, usize) -> Option<&'a Closed>) -> Section {
    let mut figures = Vec::new();
    let mut notes = vec!["| side | streams | PSS |".into(), "|---|---:|---:|".into()];
    for (k, tag) in [
        (Kind::SkepBatch, "batch"),
        (Kind::SkepWorkers, "workers"),
        (Kind::Llama, "llama_server"),
    ] {
        for n in [1, MEMORY_MANY] {
            if let Some(c) = find(k, n) {
                notes.push(format!("| {} | {n} | {} |", k.label(), mib(c.pss)));
            }
        }
        if let (Some(one), Some(many)) = (find(k, 1), find(k, MEMORY_MANY)) {
            figures.push(Figure {
                name: format!("{tag}_memory_{MEMORY_MANY}_streams"),
                value: many.pss / f64::from(1 << 20),
                unit: "MiB".into(),
                baseline: format!("{tag}_memory_1_stream"),
                baseline_value: one.pss / f64::from(1 << 20),
            });
        }
    }
    Section {
        title: "Batching: memory of many streams against one".into(),
        method: format!(
            "During the closed-loop runs above with 1 and {MEMORY_MANY} streams: the largest sum \
             of PSS (/proc/PID/smaps_rollup, a page shared by n processes counts 1/n in each) over \
             the side's processes, read every 250 ms while the measured jobs ran — for skep the \
             pool manager and its workers, for llama.cpp the server. The bench's own copy of the \
             model (used to tokenize the prompts) is dropped before any side starts. Target: \
             skep `--batch {MEMORY_MANY}` ≤ 1.3× `--batch 1`; the one-job-per-worker pool and \
             llama-server are for reference."
        ),
        figures,
        notes,
    }
}

/// The first error of the closed-loop runs, so none hides behind a count.
fn first_error<'a>(runs: impl Iterator<Item = &'a Closed>) -> String {
    let mut errors = runs.flat_map(|c| c.outcomes.iter().filter_map(|o| o.error.clone()));
    match errors.next() {
        Some(e) => format!("First error: `{e}`."),
        None => "No job failed.".into(),
    }
}

fn list(v: &[usize]) -> String {
    v.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
