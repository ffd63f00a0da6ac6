//! Tests of `skep-gguf-synth`: its files load in the GGUF engine unchanged and run
//! deterministically, the same seed writes the same bytes, and the named presets have the real
//! models' shapes and metadata.
//!
//! The named-preset checks read the real files' headers from the model cache; a missing model
//! fails them (as in gguf_smollm2.rs), it is never skipped.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};
use skep_worker::engine::gguf::{GgufEngine, GgufOptions, ProfileOpts};
use skep_worker::engine::{Engine, Finish, GenerateRequest, Sampling};
use skep_worker::synth::{Plan, Quant, Shape};

const TOOL: &str = env!("CARGO_BIN_EXE_skep-gguf-synth");

/// A directory of its own for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("skep-gguf-synth-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the tool as a user would; returns the file it wrote.
#[track_caller]
fn synth(dir: &Path, arch: &str, quant: &str, seed: u64) -> PathBuf {
    let out = dir.join(format!("{arch}-{quant}-{seed}.gguf"));
    let status = Command::new(TOOL)
        .args([
            "--arch",
            arch,
            "--quant",
            quant,
            "--seed",
            &seed.to_string(),
            "--out",
        ])
        .arg(&out)
        .status()
        .expect("run skep-gguf-synth");
    assert!(status.success(), "skep-gguf-synth {arch} {quant} failed");
    out
}

/// The size `--dry-run` announces.
#[track_caller]
fn dry_run_size(arch: &str, quant: &str) -> u64 {
    let out = Command::new(TOOL)
        .args(["--arch", arch, "--quant", quant, "--dry-run"])
        .output()
        .expect("run skep-gguf-synth --dry-run");
    assert!(out.status.success(), "dry run failed");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let last = text.lines().last().expect("a summary line");
    last.split("file size ")
        .nth(1)
        .and_then(|s| s.strip_suffix(" bytes"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no size in {last:?}"))
}

fn header(path: &Path) -> Content {
    let mut r = BufReader::new(File::open(path).expect("open model"));
    Content::read(&mut r).expect("read GGUF header")
}

/// Exactly 8 greedy ids after the chat prompt (through end-of-generation tokens).
fn greedy8(e: &mut GgufEngine) -> Vec<u32> {
    let text = e
        .format_prompt("Tell me about the quick brown fox.")
        .expect("template");
    let opts = ProfileOpts {
        past_eog: true,
        ..ProfileOpts::default()
    };
    let p = e.profile(&text, 8, opts).expect("generate");
    assert_eq!(p.ids.len(), 8);
    p.ids
}

#[track_caller]
fn check_tiny(arch: &str, quant: &str, dir: &Path) {
    let path = synth(dir, arch, quant, 7);
    assert_eq!(
        std::fs::metadata(&path).expect("written").len(),
        dry_run_size(arch, quant),
        "{arch} {quant}: --dry-run's size is the written size"
    );
    let mut e = GgufEngine::load(&path, arch, GgufOptions::default())
        .unwrap_or_else(|err| panic!("{arch} {quant} does not load: {err}"));
    // The chat template's markup is control tokens: ChatML's <|im_start|> (id 1), Gemma's BOS
    // (2) then <start_of_turn> (5).
    let ids = e.prompt_tokens("Hello there").expect("prompt").ids;
    let start: &[u32] = if arch.starts_with("gemma3") {
        &[2, 5]
    } else {
        &[1]
    };
    assert_eq!(&ids[..start.len()], start, "{arch}: {ids:?}");
    // Merged tokens exist: ordinary words are fewer tokens than characters.
    let text = "the quick brown fox jumps over the lazy dog";
    let plain = e.encode_text(text).expect("encode");
    assert!(plain.len() < text.len(), "{arch}: {} tokens", plain.len());
    assert_eq!(e.decode(&plain), text);

    let first = greedy8(&mut e);
    let second = greedy8(&mut e);
    assert_eq!(
        first, second,
        "{arch} {quant}: greedy ids differ between two jobs"
    );
    // Sampling at temperature 1 draws from the softmax of every step's logits; the sampler
    // refuses NaN weights, so 8 sampled steps succeed only if every step's logits were finite.
    let mut n = 0;
    let finish = e
        .generate(
            &GenerateRequest {
                prompt: "Tell me a story.".into(),
                max_tokens: 8,
                deadline: None,
                sampling: Sampling {
                    temperature: 1.0,
                    top_p: 0.0,
                    seed: 3,
                },
            },
            &mut |_, _| {
                n += 1;
                std::ops::ControlFlow::Continue(())
            },
        )
        .unwrap_or_else(|err| {
            panic!("{arch} {quant}: sampling failed (non-finite logits?): {err}")
        });
    assert!(matches!(finish, Finish::Complete { .. }), "{finish:?}");
}

#[test]
fn tiny_llama_loads_and_generates_deterministically_in_every_quantization() {
    let dir = TempDir::new("llama");
    for quant in ["q4_1", "q5_0", "q8_0", "q4_k", "q6_k"] {
        check_tiny("llama-tiny", quant, &dir.0);
    }
}

#[test]
fn tiny_gemma3_loads_and_generates_deterministically_in_every_quantization() {
    let dir = TempDir::new("gemma3");
    for quant in ["q4_1", "q5_0", "q8_0", "q4_k", "q6_k", "q4_k_m"] {
        check_tiny("gemma3-tiny", quant, &dir.0);
    }
}

#[test]
fn the_same_seed_writes_the_same_bytes_and_another_seed_others() {
    let dir = TempDir::new("seeds");
    for (arch, quant) in [("llama-tiny", "q4_k"), ("gemma3-tiny", "q8_0")] {
        let a = std::fs::read(synth(&dir.0, arch, quant, 1)).expect("read");
        // Written again (another name, other threads' timing): byte for byte the same.
        let again = dir.0.join("again");
        std::fs::create_dir_all(&again).expect("dir");
        let b = std::fs::read(synth(&again, arch, quant, 1)).expect("read");
        let c = std::fs::read(synth(&dir.0, arch, quant, 2)).expect("read");
        assert!(a == b, "{arch}: seed 1 twice gave different bytes");
        assert_eq!(a.len(), c.len());
        assert!(a != c, "{arch}: seeds 1 and 2 gave the same bytes");
    }
}

/// Every `{arch}.*` key and the tokenizer's shape in both the plan and the real file, equal; the
/// same tensors with the same shapes and types.
#[track_caller]
fn check_against_real(preset: &str, quant: Quant, real: &Path) {
    let plan = Plan::new(&Shape::preset(preset).expect("preset"), quant).expect("plan");
    let real = header(real);
    let ours: BTreeMap<&str, &Value> = plan.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let arch = real.metadata["general.architecture"]
        .to_string()
        .expect("arch")
        .clone();
    assert_eq!(
        format!("{:?}", ours["general.architecture"]),
        format!("{:?}", Value::String(arch.clone()))
    );
    let keys = |m: &mut dyn Iterator<Item = &str>| -> BTreeSet<String> {
        m.filter(|k| k.starts_with(&format!("{arch}.")))
            .map(str::to_string)
            .collect()
    };
    let real_keys = keys(&mut real.metadata.keys().map(String::as_str));
    assert_eq!(
        keys(&mut ours.keys().copied()),
        real_keys,
        "{preset}: architecture keys"
    );
    for k in &real_keys {
        assert_eq!(
            format!("{:?}", ours[k.as_str()]),
            format!("{:?}", real.metadata[k]),
            "{preset}: {k}"
        );
    }
    for k in [
        "general.file_type",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_space_prefix",
    ] {
        assert_eq!(
            format!("{:?}", ours[k]),
            format!("{:?}", real.metadata[k]),
            "{preset}: {k}"
        );
    }
    let vocab = |v: &Value| v.to_vec().expect("token list").len();
    assert_eq!(
        vocab(ours["tokenizer.ggml.tokens"]),
        vocab(&real.metadata["tokenizer.ggml.tokens"]),
        "{preset}: vocabulary size"
    );
    // Both files' control tokens at the ids the metadata names are the same tokens.
    let token = |v: &Value, id: &Value| {
        let id = id.to_u32().expect("id") as usize;
        v.to_vec().expect("tokens")[id]
            .to_string()
            .expect("text")
            .clone()
    };
    for k in ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"] {
        assert_eq!(
            token(ours["tokenizer.ggml.tokens"], ours[k]),
            token(&real.metadata["tokenizer.ggml.tokens"], &real.metadata[k]),
            "{preset}: {k}"
        );
    }
    if let Some(t) = real.metadata.get("tokenizer.chat_template") {
        assert_eq!(
            format!("{:?}", ours["tokenizer.chat_template"]),
            format!("{t:?}")
        );
    }
    let real_tensors: BTreeMap<&str, (Vec<usize>, GgmlDType)> = real
        .tensor_infos
        .iter()
        .map(|(k, i)| (k.as_str(), (i.shape.dims().to_vec(), i.ggml_dtype)))
        .collect();
    let our_tensors: BTreeMap<&str, (Vec<usize>, GgmlDType)> = plan
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), (t.dims.clone(), t.dtype)))
        .collect();
    assert_eq!(
        our_tensors.keys().collect::<Vec<_>>(),
        real_tensors.keys().collect::<Vec<_>>(),
        "{preset}: tensor names"
    );
    for (name, (dims, dtype)) in &real_tensors {
        let (our_dims, our_dtype) = &our_tensors[name];
        assert_eq!(our_dims, dims, "{preset}: shape of {name}");
        assert_eq!(our_dtype, dtype, "{preset}: type of {name}");
    }
}

#[test]
fn llama_135m_has_smollm2_135m_shapes_and_metadata() {
    let real = common::model_path("smollm2-135m-instruct-q4_1.gguf", "smollm2");
    // The real file is all Q4_1 matrices, f32 norms and a Q8_0 token table: every type equal.
    check_against_real("llama-135m", Quant::Q4_1, &real);
}

#[test]
fn gemma3_270m_has_gemma_3_270m_shapes_and_metadata() {
    let real = common::model_path("gemma-3-270m-q4_k_m.gguf", "gemma3");
    // The real file is llama.cpp's Q4_K_M mix, with its fallbacks on 640-wide rows: the same
    // mix here gives every tensor the real one's type.
    check_against_real("gemma3-270m", Quant::Q4KM, &real);
}

#[test]
fn llama_1b_has_llama_3_2_1b_parameter_count() {
    let plan = Plan::new(&Shape::preset("llama-1b").expect("preset"), Quant::Q4K).expect("plan");
    let params: usize = plan
        .tensors
        .iter()
        .map(|t| t.dims.iter().product::<usize>())
        .sum();
    // Llama 3.2 1B's published count, tied embeddings counted once.
    assert_eq!(params, 1_235_814_400);
    assert!(plan.tensors.iter().all(|t| t.dtype == GgmlDType::F32
        || t.dtype == GgmlDType::Q4K
        || t.name == "token_embd.weight"));
}
