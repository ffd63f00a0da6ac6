//! Real inference end to end: SmolLM2 and Gemma 3 on the GGUF engine through queen → pool →
//! worker, checked token for token against the same engine called in-process.
//!
//! Needs the models: `scripts/fetch-model.sh smollm2` and `scripts/fetch-model.sh gemma3`
//! (scripts/test.sh runs both). Without them the tests fail and say so; they are never skipped.

use std::ops::ControlFlow;

use skep_integration::{Cluster, PoolOpts, events};
use skep_worker::engine::gguf::{GgufEngine, GgufOptions};
use skep_worker::engine::{Engine, GenerateRequest};

#[test]
fn smollm2_streams_exactly_the_engines_greedy_output() {
    streams_exactly_the_engines_greedy_output(
        "smollm2",
        skep_integration::smollm2_path(),
        "What is 2+2?",
    );
}

#[test]
fn gemma3_streams_exactly_the_engines_greedy_output() {
    streams_exactly_the_engines_greedy_output(
        "gemma3",
        skep_integration::model_path("gemma-3-270m-q4_k_m.gguf", "gemma3"),
        "The capital of France is",
    );
}

fn streams_exactly_the_engines_greedy_output(model: &str, path: std::path::PathBuf, prompt: &str) {
    let max_tokens = 12;
    let mut engine = GgufEngine::load(&path, model, GgufOptions::default()).unwrap();
    let mut expected = String::new();
    engine
        .generate(
            &GenerateRequest {
                prompt: prompt.into(),
                max_tokens,
                deadline: None,
                sampling: Default::default(),
            },
            &mut |_, t| {
                expected.push_str(t);
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    drop(engine);
    assert!(!expected.trim().is_empty());

    let cluster = Cluster::start(PoolOpts {
        model: model.into(),
        gguf: Some(path),
        ..PoolOpts::default()
    });
    let out = cluster.submit(model, "300s", max_tokens, prompt);
    skep_integration::assert_success(&out);
    let evs = events(&out);
    let streamed: String = evs
        .iter()
        .filter(|e| e["event"] == "token")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, expected);
    assert_eq!(evs.last().unwrap()["event"], "done");
}
