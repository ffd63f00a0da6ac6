//! End-to-end tests of the walking skeleton: real queen, pool manager, workers and CLI.

use skep_integration::{Cluster, PoolOpts, events, runtime};
use skep_proto::v1::{GetJobRequest, ListNodesRequest, SubmitRequest};
use skep_worker::engine::SyntheticEngine;
use tonic::Code;

#[test]
fn job_streams_every_token_in_order_and_ends_done() {
    let cluster = Cluster::start(PoolOpts::default());
    let prompt = "Tell me about bees";
    let out = cluster.submit("synthetic", "30s", 20, prompt);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let evs = events(&out);
    assert_eq!(evs[0]["event"], "accepted");
    let tokens: Vec<_> = evs.iter().filter(|e| e["event"] == "token").collect();
    assert_eq!(tokens.len(), 20);
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(t["index"], i as u64, "tokens out of order");
        assert_eq!(t["text"], SyntheticEngine::token(prompt, i as u32));
    }
    let last = evs.last().unwrap();
    assert_eq!(last["event"], "done");
    assert_eq!(last["tokens"], 20);

    // The job is persisted with its final state and per-hop timings.
    let id = evs[0]["job_id"].as_str().unwrap();
    let got = cluster
        .cli()
        .args(["jobs", "get", id, "--json"])
        .output()
        .unwrap();
    assert_eq!(got.status.code(), Some(0));
    let job: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(job["state"], "done");
    assert_eq!(job["tokens"], 20);
    assert!(job["timings"]["total_us"].as_u64().unwrap() > 0);
    assert!(job["timings"]["worker_first_token_us"].as_u64().unwrap() > 0);
}

#[test]
fn job_longer_than_its_deadline_ends_deadline_exceeded_with_exit_3() {
    // 20 tokens/s: 100 tokens need ~5s, far more than the 600ms deadline. Admission by
    // reservation would refuse it at once (tests/deadlines.rs); without it (`edf`) the job runs
    // and every hop must stop it at the deadline.
    let cluster = Cluster::start_with(
        &["--admission", "edf"],
        PoolOpts {
            tps: 20.0,
            ..PoolOpts::default()
        },
    );
    let out = cluster.submit("synthetic", "600ms", 100, "slow job");
    assert_eq!(
        out.status.code(),
        Some(3),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let evs = events(&out);
    let last = evs.last().unwrap();
    assert_eq!(last["event"], "error");
    assert_eq!(last["grpc_code"], Code::DeadlineExceeded as i32);
    let tokens = evs.iter().filter(|e| e["event"] == "token").count();
    assert!(
        tokens > 0 && tokens < 100,
        "expected a partial stream, got {tokens} tokens"
    );

    let id = evs[0]["job_id"].as_str().unwrap();
    let rt = runtime();
    let job = rt
        .block_on(async {
            cluster
                .jobs_client()
                .await
                .get(cluster.authed(GetJobRequest { job_id: id.into() }))
                .await
        })
        .unwrap()
        .into_inner();
    assert_eq!(job.state, skep_proto::v1::JobState::DeadlineExceeded as i32);
}

#[test]
fn wrong_or_missing_token_is_unauthenticated_with_exit_5() {
    let cluster = Cluster::start(PoolOpts::default());
    let bad = cluster.write_token_file(
        "bad.token",
        "skep_0000000000000000000000000000000000000000000000000000000000000000",
    );
    let out = cluster
        .cli_as(&bad)
        .args(["submit", "--model", "synthetic", "--deadline", "5s", "hi"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(5),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid token"));

    // Every RPC refuses a call without a token, not only Submit.
    let rt = runtime();
    rt.block_on(async {
        let ch = cluster.channel().await.unwrap();
        let mut jobs = skep_proto::v1::jobs_client::JobsClient::new(ch.clone());
        let mut req = tonic::Request::new(SubmitRequest {
            model: "synthetic".into(),
            prompt: "hi".into(),
            max_tokens: 1,
            deadline_ms: 5000,
            ..Default::default()
        });
        req.set_timeout(std::time::Duration::from_secs(5));
        let Err(err) = jobs.submit(req).await else {
            panic!("a call without a token must be refused")
        };
        assert_eq!(err.code(), Code::Unauthenticated);
        let err = jobs
            .get(GetJobRequest { job_id: "x".into() })
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), Code::Unauthenticated);
        let mut nodes = skep_proto::v1::nodes_client::NodesClient::new(ch);
        let err = nodes.list(ListNodesRequest {}).await.err().unwrap();
        assert_eq!(err.code(), Code::Unauthenticated);
    });
}

#[test]
fn unknown_model_is_unavailable_with_exit_6() {
    let cluster = Cluster::start(PoolOpts::default());
    let out = cluster.submit("no-such-model", "5s", 5, "hi");
    assert_eq!(
        out.status.code(),
        Some(6),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn invalid_arguments_exit_2() {
    let cluster = Cluster::start(PoolOpts::default());
    let out = cluster.submit("../etc/passwd", "5s", 5, "hi");
    assert_eq!(out.status.code(), Some(2));
    let out = cluster.submit("synthetic", "5s", u32::MAX, "hi");
    assert_eq!(out.status.code(), Some(2));
    let out = cluster
        .cli()
        .args(["submit", "--model", "m", "--deadline", "soon", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn sampling_travels_to_the_worker_and_prompt_tokens_come_back() {
    let cluster = Cluster::start(PoolOpts::default());
    let prompt = "a seeded hive";
    let run = |extra: &[&str]| {
        cluster
            .cli()
            .args([
                "submit",
                "--json",
                "--model",
                "synthetic",
                "--deadline",
                "30s",
            ])
            .args(["--max-tokens", "6"])
            .args(extra)
            .arg(prompt)
            .output()
            .expect("run skep submit")
    };
    let text = |out: &std::process::Output| {
        skep_integration::assert_success(out);
        let evs = events(out);
        let done = evs.last().expect("events").clone();
        assert_eq!(done["event"], "done", "{evs:?}");
        // The synthetic engine counts the prompt's words.
        assert_eq!(done["prompt_tokens"], 3, "{evs:?}");
        evs.iter()
            .filter(|e| e["event"] == "token")
            .map(|e| e["text"].as_str().unwrap_or_default().to_owned())
            .collect::<String>()
    };
    let seeded = ["--temperature", "0.8", "--top-p", "0.9", "--seed", "42"];
    let a = text(&run(&seeded));
    let b = text(&run(&seeded));
    let other = text(&run(&["--temperature", "0.8", "--seed", "43"]));
    let greedy = text(&run(&["--seed", "42"]));
    let want = |seed| -> String {
        let s = skep_worker::engine::Sampling {
            temperature: 0.8,
            top_p: 0.9,
            seed,
        };
        (0..6)
            .map(|i| SyntheticEngine::sampled(prompt, 0, &s, i).1)
            .collect()
    };
    assert_eq!(a, b, "same seed, same text");
    assert_eq!(a, want(42));
    assert_eq!(other, want(43));
    assert_ne!(a, other, "another seed, other text");
    let expected: String = (0..6).map(|i| SyntheticEngine::token(prompt, i)).collect();
    assert_eq!(
        greedy, expected,
        "temperature 0 is greedy whatever the seed"
    );
    // Out of range: the queen refuses it (INVALID_ARGUMENT, exit 2), naming the field.
    for (flag, value, field) in [
        ("--temperature", "3", "temperature"),
        ("--top-p", "1.5", "top_p"),
    ] {
        let out = run(&[flag, value]);
        assert_eq!(out.status.code(), Some(2), "{field}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{field}: {err}");
    }
}

#[test]
fn nodes_report_their_inventory_in_heartbeats() {
    let cluster = Cluster::start(PoolOpts::default());
    skep_integration::wait_until("an inventory in nodes list", || {
        let out = cluster
            .cli()
            .args(["nodes", "list", "--json"])
            .output()
            .unwrap();
        let node: serde_json::Value =
            serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap_or_default())
                .unwrap_or_default();
        node["inventory"]["cpus"].as_u64().is_some_and(|c| c >= 1)
            && node["inventory"]["memory_bytes"]
                .as_u64()
                .is_some_and(|m| m > 0)
            && node["inventory"]["models_loaded"][0] == "synthetic"
    });
}

#[test]
fn the_prompt_can_come_from_stdin_or_a_file() {
    use std::io::Write;
    let cluster = Cluster::start(PoolOpts::default());
    let prompt = "notes piped in\nacross two lines";
    let expect = |out: &std::process::Output| {
        skep_integration::assert_success(out);
        let text: String = events(out)
            .iter()
            .filter(|e| e["event"] == "token")
            .map(|e| e["text"].as_str().unwrap().to_owned())
            .collect();
        let want: String = (0..4).map(|i| SyntheticEngine::token(prompt, i)).collect();
        assert_eq!(text, want, "the job ran on another prompt");
    };
    let mut child = cluster
        .cli()
        .args([
            "submit",
            "--json",
            "--model",
            "synthetic",
            "--deadline",
            "30s",
        ])
        .args(["--max-tokens", "4", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(prompt.as_bytes())
        .unwrap();
    expect(&child.wait_with_output().unwrap());

    let file = cluster.dir.join("prompt.txt");
    std::fs::write(&file, prompt).unwrap();
    let out = cluster
        .cli()
        .args([
            "submit",
            "--json",
            "--model",
            "synthetic",
            "--deadline",
            "30s",
        ])
        .args(["--max-tokens", "4", "--prompt-file"])
        .arg(&file)
        .output()
        .unwrap();
    expect(&out);

    // Neither source: a usage error (exit 2) that says how to give one.
    let out = cluster
        .cli()
        .args(["submit", "--model", "synthetic", "--deadline", "30s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`-` to read stdin"));
}

#[test]
fn a_waiting_job_shows_its_position_and_predicted_start() {
    // No credit at the pool: later jobs wait at the queen behind the running one (10 s).
    let cluster = Cluster::start(PoolOpts {
        tps: 10.0,
        extra_args: vec!["--credits-per-slot".into(), "0".into()],
        ..PoolOpts::default()
    });
    let mut running = cluster.spawn_submit("60s", 100, "running");
    running.wait_for("token");
    // In JSON: the queued event carries the predicted start, before the predicted finish.
    let mut waiting = cluster.spawn_submit("60s", 2, "waits");
    let accepted = waiting.wait_for("accepted");
    let queued = waiting.wait_for("queued");
    assert_eq!(queued["position"], 1, "{queued}");
    let start = queued["predicted_start_ms"].as_u64().unwrap();
    assert!(start > 0, "{queued}");
    assert!(start < accepted["predicted_finish_ms"].as_u64().unwrap());
    // On a terminal (forced here): a progress line on stderr while it waits.
    let out = cluster
        .cli()
        .args(["submit", "--model", "synthetic", "--deadline", "60s"])
        .args(["--max-tokens", "2", "--progress", "always", "waits too"])
        .output()
        .unwrap();
    skep_integration::assert_success(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("queued: position 2, predicted to start in"),
        "{stderr}"
    );
    let (code, _) = waiting.finish();
    assert_eq!(code, Some(0));
    drop(running);
}
