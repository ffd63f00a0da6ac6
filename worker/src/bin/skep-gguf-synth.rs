//! `skep-gguf-synth`: writes a GGUF model with seeded random weights in a real architecture's
//! shapes, for checks on machines a real model file cannot reach (see `skep_worker::synth`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use skep_worker::synth::{PRESETS, Plan, Quant, Shape};

#[derive(Debug, Parser)]
#[command(
    about = "Write a GGUF model with seeded random weights in a real architecture's shapes",
    after_help = "Presets: llama-tiny, llama-135m (SmolLM2-135M), llama-1b (Llama 3.2 1B), \
                  gemma3-tiny, gemma3-270m (Gemma 3 270M)."
)]
struct Args {
    /// Shape preset: llama-tiny, llama-135m, llama-1b, gemma3-tiny, gemma3-270m.
    #[arg(long)]
    arch: String,
    /// Type of the weight matrices: q4_1, q5_0, q8_0, q4_k, q6_k, or q4_k_m (llama.cpp's mix).
    /// Norms are f32, the token table Q8_0; as in llama.cpp, a k-quant on rows that are not
    /// whole 256-value blocks falls back to q5_0 (q4_k) or q8_0 (q6_k).
    #[arg(long)]
    quant: String,
    /// Seed of the weights: the same preset, quantization and seed give the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the file (required unless --dry-run).
    #[arg(long, required_unless_present = "dry_run")]
    out: Option<PathBuf>,
    /// Print the tensors, their shapes and types, and the file size; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Threads drawing and quantizing weights (default: all cores). Does not change the bytes.
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let shape = Shape::preset(&args.arch).with_context(|| format!("presets: {PRESETS:?}"))?;
    let quant: Quant = args.quant.parse()?;
    let plan = Plan::new(&shape, quant)?;
    if args.dry_run {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{shape:?}")?;
        for t in &plan.tensors {
            writeln!(
                out,
                "{:<32} {:<14} {:?} {} bytes",
                t.name,
                format!("{:?}", t.dims),
                t.dtype,
                t.bytes()
            )?;
        }
        writeln!(
            out,
            "{} tensors, {} metadata keys, file size {} bytes",
            plan.tensors.len(),
            plan.metadata.len(),
            plan.file_size()
        )?;
        return Ok(());
    }
    let path = args.out.context("--out is required")?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let started = Instant::now();
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::new(file);
    plan.write(args.seed, threads, &mut w)
        .with_context(|| format!("writing {}", path.display()))?;
    w.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all().map(|()| f))
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "wrote {} ({} bytes, {} {} seed {}) in {:.1?}",
        path.display(),
        plan.file_size(),
        args.arch,
        args.quant,
        args.seed,
        started.elapsed()
    );
    Ok(())
}
