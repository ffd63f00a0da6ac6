//! Model provisioning by content hash: `skep model add` puts a model in the queen's catalogue; a
//! pool without the file fetches it by hash, verifies it and serves jobs on it; a transfer that
//! does not match (a flipped byte) is rejected, audited, and no worker ever loads it.

use sha2::{Digest, Sha256};
use skep_integration::{Cluster, PoolOpts, audit_text, events, smollm2_path, wait_until};

fn sha256_of(path: &std::path::Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// A queen with SmolLM2 in its catalogue as "smollm2"; returns the cluster and the hash.
fn queen_with_model(tag: &str) -> (Cluster, String) {
    let cluster = Cluster::queen_only(tag);
    let model = smollm2_path();
    let out = cluster
        .cli()
        .args(["model", "add", "smollm2"])
        .arg(&model)
        .output()
        .unwrap();
    skep_integration::assert_success(&out);
    let sha = sha256_of(&model);
    let list = cluster
        .cli()
        .args(["model", "list", "--json"])
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("one model as JSON");
    assert_eq!(list["name"], "smollm2");
    assert_eq!(list["sha256"], sha.as_str());
    assert_eq!(list["size"], std::fs::metadata(&model).unwrap().len());
    (cluster, sha)
}

fn catalogue_pool() -> PoolOpts {
    PoolOpts {
        model: "smollm2".into(),
        from_catalogue: true,
        ..PoolOpts::default()
    }
}

#[test]
fn a_pool_without_the_model_fetches_it_by_hash_and_serves_the_job() {
    let (mut cluster, sha) = queen_with_model("provision-ok");
    // The first pool has the file locally; the second has nothing but the model's name.
    cluster.add_pool(PoolOpts {
        model: "smollm2".into(),
        gguf: Some(smollm2_path()),
        ..PoolOpts::default()
    });
    cluster.add_pool(catalogue_pool());
    cluster.wait_for_nodes(2);
    let fetched = cluster.pools[1]
        .dir
        .join("models")
        .join(format!("{sha}.gguf"));
    assert_eq!(
        sha256_of(&fetched),
        sha,
        "the fetched file is the catalogue's"
    );

    // Its heartbeat reports the model it holds.
    wait_until("the heartbeat to report the held model", || {
        let out = cluster
            .cli()
            .args(["nodes", "list", "--json"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|n| n["inventory"]["models_held"][0] == sha.as_str())
    });

    // With the first pool gone, the job can only run on the provisioned one.
    cluster.kill_pool(0);
    wait_until("the job to run on the provisioned pool", || {
        let out = cluster.submit("smollm2", "60s", 8, "What is 2+2?");
        out.status.code() == Some(0)
            && events(&out)
                .iter()
                .filter(|e| e["event"] == "token")
                .count()
                > 0
    });
}

#[test]
fn a_corrupted_transfer_is_rejected_and_no_worker_runs_on_it() {
    let (mut cluster, sha) = queen_with_model("provision-bad");
    // Bit rot on the queen's disk: one byte flipped in the stored file.
    let stored = cluster.dir.join("queen").join("models").join(&sha);
    let mut bytes = std::fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&stored, &bytes).unwrap();

    cluster.add_pool(catalogue_pool());
    let status = cluster.pools[0].child.wait().unwrap();
    let log = std::fs::read_to_string(cluster.dir.join("pool0.log")).unwrap();
    // The pool must not start on a bad file: an orderly refusal (main's error, exit 1) after
    // its three attempts, not a crash, a signal or another error.
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "model \"smollm2\": 3 transfers did not match the catalogue (size {}, SHA-256 {sha})",
            bytes.len()
        )),
        "{log}"
    );
    let pool_dir = &cluster.pools[0].dir;
    // Nothing kept under any name, and no worker was ever started.
    let kept: Vec<_> = std::fs::read_dir(pool_dir.join("models"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(kept.is_empty(), "left behind: {kept:?}");
    assert!(!log.contains("worker started"), "{log}");
    let audit = audit_text(&pool_dir.join("audit"));
    let mismatches = audit
        .lines()
        .filter(|l| l.contains("model.hash_mismatch"))
        .count();
    assert_eq!(mismatches, 3, "each rejected transfer is audited: {audit}");
    assert_eq!(cluster.healthy_nodes(), Ok(0));
}
