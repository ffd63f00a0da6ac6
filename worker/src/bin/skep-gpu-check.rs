//! `skep-gpu-check`: the GPU backend's check on a machine with a GPU (scripts/gpu-check.sh).
//!
//! Writes synthetic models in real shapes (`skep_worker::synth`), runs the CPU engine and the
//! GPU engine on the same prompt ids and compares their logits and greedy ids, then measures the
//! GPU's prompt and decode speed on the 1B shape against the CPU engine on the same machine.
//! Figures go to `<out>/gpu-check.json` and a readable summary to stdout.

use std::fmt::Write as _;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use serde_json::json;
use skep_cuda::device::DeviceSpec;
use skep_worker::engine::gguf::{GgufEngine, GgufOptions, Trace, argmax, top_two_gap};
use skep_worker::synth::{Plan, Quant, Shape};

/// Logits within this of the CPU engine's count as equal; a greedy pick must match where the
/// CPU's top two are further apart than this. The CPU quantizes activations to 8 bits for its
/// products (as llama.cpp does) and the GPU keeps them in f32, so the two round differently.
const TOLERANCE: f32 = 0.25;
/// Greedy steps compared.
const STEPS: usize = 32;
/// Prompt and generation sizes of the speed run (llama-bench's pp512 and tg128).
const SPEED_PROMPT: usize = 512;
const SPEED_STEPS: usize = 128;

#[derive(Parser, Debug)]
struct Args {
    /// Folder for the synthetic models and gpu-check.json.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "cuda:0")]
    device: DeviceSpec,
    /// Cases as arch:quant (presets of skep-gguf-synth).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "llama-135m:q8_0,llama-135m:q4_1,llama-135m:q5_0,gemma3-270m:q6_k,llama-1b:q4_k_m"
    )]
    cases: Vec<String>,
    /// The case whose speed is measured.
    #[arg(long, default_value = "llama-1b:q4_k_m")]
    speed: String,
    /// Threads of the CPU engine and of the model writer.
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let info = skep_cuda::device::probe(&args.device)
        .context("the GPU")?
        .context("--device must name a CUDA device")?;
    let mut report = String::new();
    writeln!(
        report,
        "device {} ({} MiB, compute {}.{}), tolerance {TOLERANCE} logits",
        info.name,
        info.memory_bytes >> 20,
        info.compute_capability.0,
        info.compute_capability.1
    )?;
    let mut cases = Vec::new();
    let mut all_pass = true;
    for case in &args.cases {
        let path = synth(&args.out, case, threads)?;
        let c = compare(&path, &args.device, case)?;
        writeln!(
            report,
            "{case}: max |logit diff| {:.4} (max |logit| {:.2}), greedy ids equal at {}/{} decided steps, {}",
            c["max_abs_diff"].as_f64().unwrap_or(f64::NAN),
            c["max_abs_logit"].as_f64().unwrap_or(f64::NAN),
            c["greedy_equal"],
            c["greedy_decided"],
            if c["pass"] == true { "PASS" } else { "FAIL" }
        )?;
        all_pass &= c["pass"] == true;
        cases.push(c);
    }
    let path = synth(&args.out, &args.speed, threads)?;
    let speed = speed(&path, &args.device, &args.speed)?;
    writeln!(report, "{}", speed["summary"].as_str().unwrap_or_default())?;
    let out = json!({
        "device": info.name,
        "memory_bytes": info.memory_bytes,
        "compute_capability": format!("{}.{}", info.compute_capability.0, info.compute_capability.1),
        "tolerance_logits": TOLERANCE,
        "cases": cases,
        "speed": speed,
        "pass": all_pass,
    });
    std::fs::write(
        args.out.join("gpu-check.json"),
        serde_json::to_string_pretty(&out)?,
    )?;
    print!("{report}");
    if !all_pass {
        anyhow::bail!("the GPU engine disagrees with the CPU engine (see above)");
    }
    Ok(())
}

/// Writes (once) the synthetic model of `case` ("arch:quant") and returns its path.
fn synth(dir: &Path, case: &str, threads: usize) -> anyhow::Result<PathBuf> {
    let (arch, quant) = case
        .split_once(':')
        .with_context(|| format!("{case}: expected arch:quant"))?;
    let path = dir.join(format!("{arch}-{quant}.gguf"));
    if path.exists() {
        return Ok(path);
    }
    let shape = Shape::preset(arch)?;
    let plan = Plan::new(&shape, quant.parse::<Quant>()?)?;
    let started = Instant::now();
    let tmp = path.with_extension("part");
    let mut f = BufWriter::new(File::create(&tmp)?);
    plan.write(0, threads, &mut f)?;
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    eprintln!("wrote {} in {:.1?}", path.display(), started.elapsed());
    Ok(path)
}

fn load(path: &Path, device: &DeviceSpec, chunk: usize) -> anyhow::Result<GgufEngine> {
    let opts = GgufOptions {
        device: *device,
        prefill_chunk: chunk,
        ..GgufOptions::default()
    };
    GgufEngine::load(path, "check", opts).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Fixed prompt ids, the same for both engines (any ids below the vocabulary are valid).
fn prompt_ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + 13) % vocab.max(1)) as u32)
        .collect()
}

fn compare(path: &Path, device: &DeviceSpec, case: &str) -> anyhow::Result<serde_json::Value> {
    let mut cpu = load(path, &DeviceSpec::Cpu, 64)?;
    let vocab = cpu.vocab_size();
    let ids = prompt_ids(48, vocab);
    let want = cpu
        .trace(&ids, STEPS, None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    drop(cpu);
    let mut gpu = load(path, device, 64)?;
    let got = gpu
        .trace(&ids, STEPS, Some(&want.ids))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(judge(case, &want, &got))
}

fn judge(case: &str, want: &Trace, got: &Trace) -> serde_json::Value {
    let (mut max_diff, mut max_logit) = (0f32, 0f32);
    let (mut decided, mut equal) = (0, 0);
    for (w, g) in want.logits.iter().zip(&got.logits) {
        for (a, b) in w.iter().zip(g) {
            max_diff = max_diff.max((a - b).abs());
            max_logit = max_logit.max(a.abs());
        }
        if top_two_gap(w) > TOLERANCE {
            decided += 1;
            equal += usize::from(argmax(w) == argmax(g));
        }
    }
    let same_len = want.logits.len() == got.logits.len();
    json!({
        "case": case,
        "steps": want.logits.len(),
        "max_abs_diff": max_diff,
        "max_abs_logit": max_logit,
        "greedy_decided": decided,
        "greedy_equal": equal,
        "pass": same_len && max_diff <= TOLERANCE && equal == decided,
    })
}

fn speed(path: &Path, device: &DeviceSpec, case: &str) -> anyhow::Result<serde_json::Value> {
    let mut gpu = load(path, device, SPEED_PROMPT)?;
    let ids = prompt_ids(SPEED_PROMPT, gpu.vocab_size());
    // Once untimed (the driver's first launches, the caches' first allocation), then timed.
    gpu.trace(&ids[..64], 4, None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let g = gpu
        .trace(&ids, SPEED_STEPS, None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let weight_bytes = gpu.gpu_weight_bytes().unwrap_or(0) as f64;
    drop(gpu);
    let mut cpu = load(path, &DeviceSpec::Cpu, SPEED_PROMPT)?;
    cpu.trace(&ids[..64], 1, None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let c = cpu
        .trace(&ids, 8, None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let secs = |d: std::time::Duration| d.as_secs_f64().max(1e-9);
    let gpu_prompt = SPEED_PROMPT as f64 / secs(g.prompt_time);
    let gpu_decode = SPEED_STEPS as f64 / secs(g.steps_time);
    let cpu_prompt = SPEED_PROMPT as f64 / secs(c.prompt_time);
    let cpu_decode = 8.0 / secs(c.steps_time);
    let bandwidth = weight_bytes * gpu_decode;
    let summary = format!(
        "{case}: GPU prompt {gpu_prompt:.0} tok/s ({:.1}x the CPU engine's {cpu_prompt:.1}), decode {gpu_decode:.1} tok/s (CPU {cpu_decode:.1}); weights {:.0} MiB read per token = {:.0} GB/s",
        gpu_prompt / cpu_prompt,
        weight_bytes / 1048576.0,
        bandwidth / 1e9
    );
    Ok(json!({
        "case": case,
        "prompt_tokens": SPEED_PROMPT,
        "decode_tokens": SPEED_STEPS,
        "gpu_prompt_tok_s": gpu_prompt,
        "gpu_decode_tok_s": gpu_decode,
        "cpu_prompt_tok_s": cpu_prompt,
        "cpu_decode_tok_s": cpu_decode,
        "prompt_ratio": gpu_prompt / cpu_prompt,
        "weight_bytes": weight_bytes,
        "decode_bandwidth_bytes_s": bandwidth,
        "summary": summary,
    }))
}
