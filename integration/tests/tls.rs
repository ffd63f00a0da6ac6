//! TLS between machines: the queen serves TLS with its own CA, an enrollment token carries the
//! CA fingerprint, a joining pool pins it and gets a certificate for its node id, and jobs run
//! over TLS on both hops. Wrong pins, missing CAs and plaintext clients are refused clearly.

use std::path::PathBuf;

use skep_integration::{Cluster, PoolOpts, wait_until};

/// A TLS queen (on loopback, so `--tls on`) and a fresh enrollment token for it.
fn tls_queen(tag: &str) -> (Cluster, PathBuf) {
    let cluster = Cluster::queen_with(tag, &["--tls", "on"]);
    assert!(cluster.queen_url.starts_with("https://"));
    let token = cluster.dir.join("enroll.token");
    let out = cluster
        .cli()
        .args(["token", "create", "--enroll", "--ttl", "1h", "--out"])
        .arg(&token)
        .output()
        .unwrap();
    skep_integration::assert_success(&out);
    (cluster, token)
}

fn ca_fingerprint(cluster: &Cluster) -> String {
    let pem = std::fs::read_to_string(cluster.ca_file()).unwrap();
    skep_tls::pem_fingerprint(&pem).unwrap()
}

#[test]
fn jobs_run_over_tls_with_a_pool_that_pinned_the_queen_ca() {
    let (mut cluster, token) = tls_queen("tls-ok");
    // The enrollment token carries the CA fingerprint after '@'.
    let text = std::fs::read_to_string(&token).unwrap();
    let (_, pin) = text.trim().split_once('@').expect("token@fingerprint");
    assert_eq!(pin, ca_fingerprint(&cluster));

    cluster.add_pool(PoolOpts {
        token_file: Some(token),
        ..PoolOpts::default()
    });
    cluster.wait_for_nodes(1);
    // The pool pinned exactly the queen's CA, and advertises an https URL.
    let pinned = std::fs::read_to_string(cluster.pools[0].dir.join("queen-ca.pem")).unwrap();
    assert_eq!(skep_tls::pem_fingerprint(&pinned).unwrap(), pin);
    let nodes = cluster
        .cli()
        .args(["nodes", "list", "--json"])
        .output()
        .unwrap();
    let nodes = String::from_utf8_lossy(&nodes.stdout).to_string();
    assert!(nodes.contains("https://127.0.0.1:"), "{nodes}");

    let out = cluster.submit("synthetic", "5s", 4, "over TLS");
    skep_integration::assert_success(&out);
    let events = skep_integration::events(&out);
    assert_eq!(events.iter().filter(|e| e["event"] == "token").count(), 4);

    // A restarted pool uses the pinned CA and the certificate it is issued again.
    cluster.kill_pool(0);
    cluster.restart_pool(0);
    wait_until("the pool to serve again over TLS", || {
        cluster.submit("synthetic", "3s", 1, "again").status.code() == Some(0)
    });
}

#[test]
fn a_pool_refuses_a_queen_whose_ca_does_not_match_the_pin() {
    let (mut cluster, token) = tls_queen("tls-pin");
    let text = std::fs::read_to_string(&token).unwrap();
    let (bearer, pin) = text.trim().split_once('@').unwrap();
    // Another CA's fingerprint: the pool must not talk to this queen.
    let wrong = if pin.starts_with('0') { "1" } else { "0" }.to_owned() + &pin[1..];
    let forged = cluster.write_token_file("forged.token", &format!("{bearer}@{wrong}"));
    cluster.add_pool(PoolOpts {
        token_file: Some(forged),
        ..PoolOpts::default()
    });
    let status = cluster.pools[0].child.wait().unwrap();
    let log = std::fs::read_to_string(cluster.dir.join("pool0.log")).unwrap();
    // An orderly refusal (main's error, exit 1), not a crash or a signal, and for the pin.
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "presented no certificate with the pinned CA fingerprint {wrong}"
        )),
        "{log}"
    );
    assert!(!cluster.pools[0].dir.join("queen-ca.pem").exists());
    assert!(!cluster.pools[0].dir.join("runtime.key").exists());
    // Nothing was sent before the pin check: the genuine token still enrolls a pool.
    cluster.add_pool(PoolOpts {
        token_file: Some(token),
        ..PoolOpts::default()
    });
    cluster.wait_for_nodes(1);
}

#[test]
fn clients_without_the_ca_or_without_tls_are_refused() {
    let (cluster, _) = tls_queen("tls-clients");
    // https without a CA file: a usage error naming the fix.
    let out = std::process::Command::new(skep_integration::bin("skep"))
        .args(["--queen", &cluster.queen_url, "--token-file"])
        .arg(cluster.token_file())
        .args(["jobs", "list"])
        .env_remove("SKEP_CA_FILE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca-file"));
    // Plaintext against the TLS listener: the queen cannot be reached.
    let plain = cluster.queen_url.replace("https://", "http://");
    let out = std::process::Command::new(skep_integration::bin("skep"))
        .args(["--queen", &plain, "--token-file"])
        .arg(cluster.token_file())
        .args(["jobs", "list"])
        .output()
        .unwrap();
    // The TLS listener does not speak cleartext HTTP/2: the connection opens, and the call
    // then fails on the stream (exit 1), not as an unreachable queen (6) or a refused token
    // (5). Whether h2 or the transport reports it first depends on timing.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("h2 protocol error") || stderr.contains("transport error"),
        "{stderr}"
    );
    // The right CA works.
    let ok = cluster.cli().args(["jobs", "list"]).output().unwrap();
    skep_integration::assert_success(&ok);
}
