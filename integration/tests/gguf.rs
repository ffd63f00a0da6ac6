//! Real inference end to end: SmolLM2 on the GGUF engine through queen → pool → worker, checked
//! token for token against the same engine called in-process.
//!
//! Needs the model: `scripts/fetch-model.sh smollm2` (scripts/test.sh runs it and exports
//! SKEP_MODEL_PATH). Without it the test fails and says so; it is never skipped.

use std::ops::ControlFlow;

use skep_integration::{Cluster, PoolOpts, events};
use skep_worker::engine::gguf::{GgufEngine, GgufOptions};
use skep_worker::engine::{Engine, GenerateRequest};

#[test]
fn smollm2_streams_exactly_the_engines_greedy_output() {
    let path = skep_integration::smollm2_path();
    let prompt = "What is 2+2?";
    let max_tokens = 12;

    let mut engine = GgufEngine::load(&path, "smollm2", GgufOptions::default()).unwrap();
    let mut expected = String::new();
    engine
        .generate(
            &GenerateRequest {
                prompt: prompt.into(),
                max_tokens,
                deadline: None,
            },
            &mut |t| {
                expected.push_str(t);
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    drop(engine);
    assert!(!expected.trim().is_empty());

    let cluster = Cluster::start(PoolOpts {
        model: "smollm2".into(),
        gguf: Some(path),
        ..PoolOpts::default()
    });
    let out = cluster.submit("smollm2", "300s", max_tokens, prompt);
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
