//! Throwaway: engine-level batched decode speed.
use skep_worker::engine::gguf::{GgufEngine, GgufOptions};
use skep_worker::engine::{BatchEngine, GenerateRequest, Sampling, Work};
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let mut e = GgufEngine::load(path.as_ref(), "m", GgufOptions::default()).unwrap();
    for &n in &[1usize, 2, 4, 8, 16] {
        for i in 0..n {
            let req = GenerateRequest {
                prompt: format!("Tell me a long story about bee number {i}."),
                max_tokens: 10_000,
                deadline: None,
                sampling: Sampling::default(),
            };
            e.admit(i as u64, &req).unwrap();
        }
        let mut out = Vec::new();
        // prompt
        loop {
            let work: Vec<Work> = (0..n as u64)
                .map(|id| Work {
                    id,
                    prompt_tokens: 512,
                })
                .collect();
            if (0..n as u64).all(|id| e.pending_prompt(id) == 0) {
                break;
            }
            let w: Vec<Work> = work
                .into_iter()
                .filter(|w| e.pending_prompt(w.id) > 0)
                .collect();
            e.step(&w, &mut out).unwrap();
        }
        let work: Vec<Work> = (0..n as u64)
            .map(|id| Work {
                id,
                prompt_tokens: 0,
            })
            .collect();
        for _ in 0..3 {
            e.step(&work, &mut out).unwrap();
        }
        let t = std::time::Instant::now();
        let steps = 40;
        for _ in 0..steps {
            e.step(&work, &mut out).unwrap();
        }
        let el = t.elapsed().as_secs_f64();
        println!(
            "batch {n}: step {:.2} ms, aggregate {:.1} tok/s",
            el * 1000.0 / steps as f64,
            (n * steps) as f64 / el
        );
        for i in 0..n {
            e.release(i as u64);
        }
    }
}
