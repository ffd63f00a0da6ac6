//! `skep-model-bench`: the GGUF engine alone, in a process of its own (so its peak RSS is the
//! engine's): load time, prompt pass and greedy generation, as one JSON line. `skep-bench` runs
//! it next to llama.cpp and a real cluster.
//!
//!   skep-model-bench NAME MODEL_PATH TOKENS PROMPT

use std::time::Instant;

use anyhow::Context;
use skep_worker::engine::gguf::{GgufEngine, GgufOptions};

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
    let args: Vec<String> = std::env::args().collect();
    let [_, name, path, tokens, prompt] = args.as_slice() else {
        anyhow::bail!("usage: skep-model-bench NAME MODEL_PATH TOKENS PROMPT");
    };
    let tokens: usize = tokens.parse().context("TOKENS")?;
    let started = Instant::now();
    let mut engine = GgufEngine::load(path.as_ref(), name, GgufOptions::default())?;
    let load = started.elapsed();
    // The text the worker would feed the model: the chat template applied when there is one.
    let rendered = engine.format_prompt(prompt)?;
    let p = engine.profile(&rendered, tokens)?;
    let line = serde_json::json!({
        "load_ms": load.as_secs_f64() * 1e3,
        "prompt_tokens": p.prompt_tokens,
        "prompt_ms": p.prompt.as_secs_f64() * 1e3,
        "gen_tokens": p.gen_tokens,
        "gen_ms": p.generation.as_secs_f64() * 1e3,
        "peak_rss_bytes": peak_rss_bytes(),
        "rendered_prompt": rendered,
        "ids": p.ids,
    });
    println!("{line}");
    Ok(())
}
