//! `skep-model-bench`: the GGUF engine alone, in a process of its own (so its peak RSS is the
//! engine's): load time, prompt pass and greedy generation, as one JSON line. `skep-bench` runs
//! it next to llama.cpp (`scripts/llama-cpp/skep_llama_ref.cpp`, the same method) and a real
//! cluster.
//!
//!   skep-model-bench NAME MODEL_PATH TOKENS PROMPT [--raw] [--prompt-tokens K] [--past-eog]
//!                    [--reps R]
//!
//! - load: `GgufEngine::load`, which ends with a two-token pass ([BOS, BOS]); the reference runs
//!   the same two tokens inside its load.
//! - warm-up: the whole workload once, untimed; then R timed repetitions, each from an empty
//!   KV cache. Every repetition must give the warm-up's ids.
//!
//! PROMPT goes through the model's chat template unless `--raw`; `--prompt-tokens` keeps the
//! first K ids; `--past-eog` generates all TOKENS ids through end-of-generation tokens.

use std::time::Instant;

use clap::Parser;
use skep_worker::engine::gguf::{GgufEngine, GgufOptions, ProfileOpts};

#[derive(Parser, Debug)]
struct Args {
    name: String,
    path: std::path::PathBuf,
    /// Greedy ids to generate (TOKENS - 1 single-token steps are timed).
    tokens: usize,
    prompt: String,
    /// Feed PROMPT as it is, without the chat template.
    #[arg(long)]
    raw: bool,
    #[arg(long)]
    prompt_tokens: Option<usize>,
    #[arg(long)]
    past_eog: bool,
    #[arg(long, default_value_t = 1)]
    reps: usize,
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.tokens >= 1 && args.reps >= 1,
        "TOKENS and --reps must be >= 1"
    );
    let started = Instant::now();
    let mut engine = GgufEngine::load(&args.path, &args.name, GgufOptions::default())?;
    let load = started.elapsed();
    // The text the worker would feed the model: the chat template applied when there is one.
    let text = if args.raw {
        args.prompt.clone()
    } else {
        engine.format_prompt(&args.prompt)?
    };
    let opts = ProfileOpts {
        prompt_tokens: args.prompt_tokens,
        past_eog: args.past_eog,
    };
    let warm = engine.profile(&text, args.tokens, opts)?;
    let mut prompt_ms = Vec::new();
    let mut gen_ms = Vec::new();
    for rep in 1..=args.reps {
        let p = engine.profile(&text, args.tokens, opts)?;
        anyhow::ensure!(
            p.ids == warm.ids && p.prompt_ids == warm.prompt_ids,
            "repetition {rep} produced other ids than the warm-up"
        );
        prompt_ms.push(p.prompt.as_secs_f64() * 1e3);
        gen_ms.push(p.generation.as_secs_f64() * 1e3);
    }
    let line = serde_json::json!({
        "load_ms": load.as_secs_f64() * 1e3,
        "prompt_ids": warm.prompt_ids,
        "ids": warm.ids,
        "prompt_tokens": warm.prompt_tokens,
        "prompt_ms": prompt_ms,
        "gen_tokens": warm.gen_tokens,
        "gen_ms": gen_ms,
        "peak_rss_bytes": peak_rss_bytes(),
        "rendered_prompt": text,
    });
    println!("{line}");
    Ok(())
}
