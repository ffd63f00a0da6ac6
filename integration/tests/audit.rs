//! The audit trail of real activity: events present, fingerprints only, and verifiable.

use skep_integration::{Cluster, PoolOpts, events, wait_until};

fn audit_lines(cluster: &Cluster) -> Vec<serde_json::Value> {
    skep_integration::audit_text(&cluster.dir.join("queen").join("audit"))
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn a_job_and_a_failed_auth_leave_verifiable_events_without_secrets() {
    let cluster = Cluster::start(PoolOpts::default());
    let prompt = "my secret prompt about the garden";
    let out = cluster.submit("synthetic", "10s", 3, prompt);
    assert_eq!(out.status.code(), Some(0));
    let job_id = events(&out)[0]["job_id"].as_str().unwrap().to_owned();

    let bad_token = "skep_1111111111111111111111111111111111111111111111111111111111111111";
    let bad = cluster.write_token_file("bad.token", bad_token);
    let denied = cluster
        .cli_as(&bad)
        .args(["jobs", "list"])
        .output()
        .unwrap();
    assert_eq!(denied.status.code(), Some(5));

    let admin = std::fs::read_to_string(cluster.token_file())
        .unwrap()
        .trim()
        .to_owned();
    let admin_fp = skep_common::auth::fingerprint(&admin);
    let mut lines = Vec::new();
    // Both are written by the audit thread after the calls returned: wait for each.
    wait_until("the job's terminal and the refusal's audit events", || {
        lines = audit_lines(&cluster);
        lines.iter().any(|e| e["event"] == "job.completed")
            && lines.iter().any(|e| e["event"] == "auth.failure")
    });
    let of_job = |ev: &str| {
        lines
            .iter()
            .find(|e| e["event"] == ev && e["fields"]["job_id"] == job_id.as_str())
            .cloned()
    };
    let submitted = of_job("job.submitted").expect("job.submitted");
    assert_eq!(submitted["actor"], admin_fp.as_str());
    assert_eq!(submitted["fields"]["prompt_len"], prompt.len() as u64);
    assert!(of_job("job.dispatched").is_some(), "job.dispatched");
    assert_eq!(
        of_job("job.completed").expect("job.completed")["actor"],
        admin_fp.as_str()
    );
    let failure = lines
        .iter()
        .find(|e| e["event"] == "auth.failure")
        .expect("auth.failure");
    assert_eq!(
        failure["actor"],
        skep_common::auth::fingerprint(bad_token).as_str()
    );

    let raw: String = lines.iter().map(|l| l.to_string()).collect();
    for secret in [admin.as_str(), bad_token, prompt] {
        assert!(
            !raw.contains(secret),
            "audit log holds a raw secret or prompt"
        );
    }

    // The whole log verifies with the queen's key.
    let out = std::process::Command::new(skep_integration::bin("skep"))
        .args(["audit", "verify", "--key-file"])
        .arg(cluster.dir.join("queen").join("audit.key"))
        .arg(cluster.dir.join("queen").join("audit"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
