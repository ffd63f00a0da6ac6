//! `skep-worker`: runs one engine behind a pair of shared-memory lanes. Started by `skep-pool`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use skep_common::secret::Secret;
use skep_common::telemetry::{self, LogFormat};
use skep_cuda::device::{self, DeviceSpec};
use skep_lane::Lane;
use skep_worker::engine::gguf::{GgufEngine, GgufOptions};
use skep_worker::engine::{BatchEngine, SyntheticConfig, SyntheticEngine};
use skep_worker::{ServeConfig, serve};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EngineKind {
    Synthetic,
    Gguf,
}

/// A skep worker. It is started by a pool manager, never by hand.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Inherited fd of the request lane (a sealed memfd the pool manager created).
    #[arg(long, required_unless_present = "probe_device")]
    request_lane_fd: Option<i32>,
    /// Inherited fd of the response lane.
    #[arg(long, required_unless_present = "probe_device")]
    response_lane_fd: Option<i32>,
    #[arg(long, required_unless_present = "probe_device")]
    generation: Option<u64>,
    /// Where the engine runs: cpu, cuda (the first GPU) or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Only check that a device is usable and print what it is (one line), then exit: 0 when
    /// it is, 2 with the reason on stderr when not. Needs no other argument.
    #[arg(long, value_name = "DEVICE", exclusive = true)]
    probe_device: Option<DeviceSpec>,
    #[arg(long, value_enum, default_value = "synthetic")]
    engine: EngineKind,
    /// Name of the model served.
    #[arg(long, default_value = "synthetic")]
    model: String,
    /// GGUF file for `--engine gguf`.
    #[arg(long)]
    model_path: Option<PathBuf>,
    /// Synthetic engine: time to first token.
    #[arg(long, default_value = "20ms", value_parser = humantime_duration)]
    synthetic_ttft: Duration,
    /// Synthetic engine: tokens per second after the first (0 = unpaced).
    #[arg(long, default_value_t = 200.0)]
    synthetic_tps: f64,
    /// Synthetic engine: 0 makes the text depend on the prompt only; another seed gives other
    /// text (as a machine whose kernels round differently would).
    #[arg(long, default_value_t = 0)]
    synthetic_seed: u64,
    /// Synthetic engine: time its "model" takes to load (tests of loading and eviction).
    #[arg(long, default_value = "0ms", value_parser = humantime_duration)]
    synthetic_load: Duration,
    /// Synthetic engine: MiB of private memory held as its "weights" (tests of the memory
    /// budget: the pool measures it like a real model's).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=65536))]
    synthetic_weights_mib: u32,
    /// Jobs run at once, batched into one pass per step (the pool manager sends at most this
    /// many).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    batch: u16,
    /// Prompt tokens per step, in all: bounds how long a long prompt delays the jobs
    /// generating beside it.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65536))]
    prefill_chunk: u32,
    #[arg(long, default_value = "pretty")]
    log_format: LogFormat,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    s.parse::<humantime::Duration>()
        .map(Into::into)
        .map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(spec) = args.probe_device {
        std::process::exit(probe_device(spec));
    }
    telemetry::init(args.log_format);
    // clap requires all three unless --probe-device, which has returned above.
    let (Some(request_fd), Some(response_fd), Some(generation)) =
        (args.request_lane_fd, args.response_lane_fd, args.generation)
    else {
        anyhow::bail!("--request-lane-fd, --response-lane-fd and --generation are required");
    };
    let session = read_session()?;
    // Opened before the model loads, so heartbeats start at once. `open_inherited` refuses a
    // lane that is not sealed against resizing, or that belongs to another generation.
    let config = ServeConfig {
        requests: Lane::open_inherited(request_fd, generation)
            .context("opening the request lane")?,
        responses: Lane::open_inherited(response_fd, generation)
            .context("opening the response lane")?,
        batch: usize::from(args.batch),
        prefill_chunk: args.prefill_chunk as usize,
    };
    let load = || -> anyhow::Result<Box<dyn BatchEngine>> {
        Ok(match args.engine {
            EngineKind::Synthetic => {
                if !args.device.is_cpu() {
                    // The GPU's own reason comes first: tests of the refusal use this engine.
                    device::probe(&args.device)
                        .with_context(|| format!("device {}", args.device))?;
                    anyhow::bail!(
                        "device {}: the synthetic engine runs on the CPU only; use --device cpu",
                        args.device
                    );
                }
                std::thread::sleep(args.synthetic_load);
                hold_weights(args.synthetic_weights_mib);
                Box::new(SyntheticEngine::new(SyntheticConfig {
                    model: args.model.clone(),
                    time_to_first_token: args.synthetic_ttft,
                    tokens_per_sec: args.synthetic_tps,
                    seed: args.synthetic_seed,
                }))
            }
            EngineKind::Gguf => load_gguf(&args)?,
        })
    };
    // `{:#}` keeps the whole cause chain (which file, what was wrong with it).
    serve(config, &session, || load().map_err(|e| format!("{e:#}"))).context("worker stopped")
}

fn load_gguf(args: &Args) -> anyhow::Result<Box<dyn BatchEngine>> {
    let path = args
        .model_path
        .as_ref()
        .context("--engine gguf needs --model-path")?;
    let opts = GgufOptions {
        prefill_chunk: args.prefill_chunk as usize,
        device: args.device,
        ..GgufOptions::default()
    };
    let engine = GgufEngine::load(path, &args.model, opts)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok(Box::new(engine))
}

/// `--probe-device`: one line on stdout and 0 when the device is usable, the reason on stderr
/// and 2 when not (the pool manager runs this before it enrolls).
fn probe_device(spec: DeviceSpec) -> i32 {
    match device::probe(&spec) {
        Ok(None) => {
            println!("cpu");
            0
        }
        Ok(Some(gpu)) => {
            println!("{}", gpu.to_line());
            0
        }
        Err(e) => {
            eprintln!("device {spec}: {e}");
            2
        }
    }
}

/// Holds `mib` MiB of touched private memory for the life of the process, as a loaded model's
/// weights would be.
fn hold_weights(mib: u32) {
    if mib == 0 {
        return;
    }
    let weights = vec![1u8; (mib as usize) << 20];
    // Kept until exit, like a model's weights; never read.
    std::mem::forget(std::hint::black_box(weights));
}

/// The lane session secret, handed over by the pool manager on stdin (never argv or env).
fn read_session() -> anyhow::Result<Secret> {
    use std::io::Read;
    let mut line = String::new();
    std::io::stdin()
        .take(4096)
        .read_to_string(&mut line)
        .context("reading the session secret from stdin")?;
    let secret = line.trim();
    if secret.is_empty() {
        anyhow::bail!(
            "no session secret on stdin: skep-worker is started by skep-pool, not by hand"
        );
    }
    Ok(Secret::from_string(secret.to_owned()))
}
