//! Hygiene at the edges of what is valid (issue 18): a finished job's prompt does not stay on
//! the queen's disk, and the largest valid prompt runs without costing a worker.

use std::path::Path;

use skep_common::validate::MAX_PROMPT_BYTES;
use skep_integration::{Cluster, PoolOpts, assert_success, events, wait_until};

/// Whether `needle` occurs anywhere in the file at `path` (a missing file holds nothing).
fn file_contains(path: &Path, needle: &[u8]) -> bool {
    std::fs::read(path)
        .map(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        .unwrap_or(false)
}

/// The queen's database files that hold the prompt's bytes.
fn files_holding(queen_dir: &Path, needle: &[u8]) -> Vec<String> {
    ["queen.db", "queen.db-wal", "queen.db-shm"]
        .into_iter()
        .filter(|f| file_contains(&queen_dir.join(f), needle))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_finished_prompt_leaves_no_trace_in_the_queen_database() {
    let cluster = Cluster::start(PoolOpts::default());
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let marker = format!("zebra-prompt-{nonce:x}-{}", std::process::id());
    // A short prompt lives in its row's cell; a long one spills into overflow pages, which are
    // freed (not rewritten) when the prompt is cleared.
    let long = format!("{marker} ").repeat(12 * 1024 / (marker.len() + 1));
    let mut jobs = Vec::new();
    for prompt in [marker.clone(), long] {
        let out = cluster.submit("synthetic", "30s", 4, &prompt);
        assert_success(&out);
        let evs = events(&out);
        assert_eq!(evs.last().unwrap()["event"], "done", "{evs:?}");
        let job_id = evs[0]["job_id"].as_str().unwrap().to_owned();
        assert_eq!(cluster.job(&job_id)["state"], "done");
        jobs.push(job_id);
    }

    let queen_dir = cluster.dir.join("queen");
    let needle = marker.as_bytes();
    let mut left = Vec::new();
    wait_until(
        "the finished prompt to leave the queen's database files",
        || {
            let now = files_holding(&queen_dir, needle);
            if now != left {
                eprintln!("prompt found in {now:?}");
                left = now;
            }
            left.is_empty()
        },
    );
    // The jobs themselves are still there, only without their prompts.
    for job_id in &jobs {
        assert_eq!(cluster.job(job_id)["state"], "done");
    }
}

#[test]
fn a_prompt_of_exactly_the_limit_runs_without_losing_the_worker() {
    let cluster = Cluster::start(PoolOpts::default());
    let mut before = Vec::new();
    wait_until("the pool's worker", || {
        before = cluster.worker_pids(0);
        !before.is_empty()
    });
    let prompt = "a".repeat(MAX_PROMPT_BYTES);
    let out = cluster.submit("synthetic", "30s", 4, &prompt);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}\nstdout: {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let evs = events(&out);
    assert_eq!(evs.last().unwrap()["event"], "done", "{evs:?}");
    // Once, on the first attempt: no worker was lost on the way.
    let dispatched = evs.iter().filter(|e| e["event"] == "dispatched").count();
    assert!(dispatched <= 1, "{evs:?}");
    assert_eq!(cluster.worker_pids(0), before, "the worker was restarted");
}

#[test]
fn a_prompt_one_byte_over_the_limit_is_invalid_argument() {
    let cluster = Cluster::start(PoolOpts::default());
    let before = cluster.worker_pids(0);
    let prompt = "a".repeat(MAX_PROMPT_BYTES + 1);
    let out = cluster.submit("synthetic", "30s", 4, &prompt);
    assert_eq!(
        out.status.code(),
        Some(2),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("prompt"), "{stderr}");
    assert!(!stderr.contains(&prompt[..64]), "the prompt was echoed");
    if !before.is_empty() {
        assert_eq!(cluster.worker_pids(0), before);
    }
}
