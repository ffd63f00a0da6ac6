//! Per-hop credentials: the pool manager answers only its queen, secrets stay out of logs, and
//! secret files readable by others stop a daemon at start.

use std::process::Command;

use skep_integration::{Cluster, PoolOpts, bin, runtime};
use skep_proto::v1::pool_client::PoolClient;
use skep_proto::v1::{JobFrame, QueenFrame, queen_frame};
use tonic::Code;

#[test]
fn pool_manager_refuses_sessions_from_anyone_but_its_queen() {
    let cluster = Cluster::start(PoolOpts::default());
    let pool_addr = std::fs::read_to_string(cluster.pools[0].dir.join("listen.addr")).unwrap();
    let admin = std::fs::read_to_string(cluster.token_file())
        .unwrap()
        .trim()
        .to_owned();
    // The client's own (admin!) token, a made-up key (standing for another node's dispatch key:
    // each pool knows only the digest of its own), and no token at all.
    let foreign = format!("skep_{}", "ab".repeat(32));
    let rt = runtime();
    rt.block_on(async {
        let mut pool = PoolClient::connect(format!("http://{pool_addr}"))
            .await
            .unwrap();
        for bearer in [Some(admin.as_str()), Some(foreign.as_str()), None] {
            let job = QueenFrame {
                kind: Some(queen_frame::Kind::Job(JobFrame {
                    handle: 1,
                    job_id: "job-1".into(),
                    model: "synthetic".into(),
                    prompt: "hi".into(),
                    max_tokens: 1,
                    budget_us: 5_000_000,
                    slot: 0,
                    order: 0,
                    ..Default::default()
                })),
            };
            let mut req = tonic::Request::new(tokio_stream::iter([job]));
            req.set_timeout(std::time::Duration::from_secs(5));
            if let Some(b) = bearer {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {b}").parse().unwrap());
            }
            let Err(status) = pool.session(req).await else {
                panic!("the pool opened a session for a caller that is not its queen")
            };
            assert_eq!(status.code(), Code::Unauthenticated, "{bearer:?}");
        }
    });
    // Its queen still gets through.
    assert_eq!(
        cluster
            .submit("synthetic", "10s", 2, "from the queen")
            .status
            .code(),
        Some(0)
    );
    // And the refused callers are in the pool manager's audit log, by fingerprint only: the
    // first at once, the two after it (same address, same interval) as a count in one summary.
    let audit_dir = cluster.pools[0].dir.join("audit");
    skep_integration::wait_until("auth.failure entries in the pool's audit log", || {
        let text = skep_integration::audit_text(&audit_dir);
        let refused: u64 = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["event"] == "auth.failure")
            .filter_map(|e| e["fields"]["count"].as_u64())
            .sum();
        refused >= 3 && !text.contains(&admin)
    });
}

#[test]
fn no_raw_token_reaches_the_logs_even_at_trace() {
    let cluster = Cluster::start(PoolOpts {
        rust_log: Some("trace".into()),
        ..PoolOpts::default()
    });
    let out = cluster.submit("synthetic", "10s", 3, "trace me");
    assert_eq!(out.status.code(), Some(0));
    let admin = std::fs::read_to_string(cluster.token_file())
        .unwrap()
        .trim()
        .to_owned();
    let queen_log = std::fs::read_to_string(cluster.dir.join("queen.log")).unwrap();
    let pool_log = std::fs::read_to_string(cluster.dir.join("pool0.log")).unwrap();
    assert!(queen_log.len() > 10_000, "expected a TRACE-level log");
    for (name, log) in [("queen", &queen_log), ("pool", &pool_log)] {
        assert!(
            !log.contains(&admin),
            "{name} log contains the raw admin token"
        );
        // Every skep token is `skep_` + 64 hex digits: none may appear, dispatch, runtime and
        // session keys included.
        assert!(!contains_token(log), "{name} log contains a skep token");
    }
    assert!(
        queen_log.contains(&skep_common::auth::fingerprint(&admin)),
        "fingerprint expected"
    );
}

#[test]
fn daemons_refuse_secret_files_readable_by_others() {
    let cluster = Cluster::queen_only("perms");
    let loose = cluster.dir.join("loose.token");
    std::fs::copy(cluster.token_file(), &loose).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new(bin("skep-pool"))
        .args([
            "--data-dir",
            cluster.dir.join("p").to_str().unwrap(),
            "--queen",
            &cluster.queen_url,
        ])
        .args(["--token-file", loose.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "refused at start-up");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("loose.token") && stderr.contains("chmod 600"),
        "{stderr}"
    );

    // The queen's own admin token file, loosened, stops the queen too.
    let qdir = cluster.dir.join("q2");
    std::fs::create_dir_all(&qdir).unwrap();
    let admin = qdir.join("admin.token");
    std::fs::copy(cluster.token_file(), &admin).unwrap();
    std::fs::set_permissions(&admin, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let out = Command::new(bin("skep-queen"))
        .args([
            "--data-dir",
            qdir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "refused at start-up");
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

fn contains_token(log: &str) -> bool {
    log.match_indices("skep_").any(|(i, _)| {
        let rest = log.as_bytes().get(i + 5..i + 5 + 64);
        rest.is_some_and(|r| r.iter().all(u8::is_ascii_hexdigit))
    })
}

#[test]
fn the_token_detector_finds_tokens() {
    assert!(contains_token(&format!("x skep_{} y", "0f".repeat(32))));
    assert!(!contains_token("skep_queen::grpc skep_pool_manager"));
}
