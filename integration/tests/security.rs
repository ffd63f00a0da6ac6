//! Authentication, token management, rate limits and hostile input, against the real queen.

use skep_integration::{Cluster, PoolOpts, runtime, wait_until};
use skep_proto::v1::jobs_client::JobsClient;
use skep_proto::v1::{ListJobsRequest, SubmitRequest};
use tonic::Code;

fn create_token(cluster: &Cluster, role: &str, extra: &[&str]) -> std::path::PathBuf {
    let path = cluster.dir.join(format!("{role}-{}.token", extra.len()));
    let out = cluster
        .cli()
        .args([
            "token", "create", "--role", role, "--label", "test", "--out",
        ])
        .arg(&path)
        .args(extra)
        .output()
        .unwrap();
    skep_integration::assert_success(&out);
    path
}

fn submit_with(cluster: &Cluster, token: &std::path::Path) -> Option<i32> {
    cluster
        .cli_as(token)
        .args([
            "submit",
            "--model",
            "synthetic",
            "--deadline",
            "10s",
            "--max-tokens",
            "2",
            "hi",
        ])
        .output()
        .unwrap()
        .status
        .code()
}

#[test]
fn tokens_have_roles_and_can_be_revoked() {
    let cluster = Cluster::start(PoolOpts::default());
    let submit = create_token(&cluster, "submit", &[]);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&submit).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(submit_with(&cluster, &submit), Some(0));
    // A submit token cannot manage the cluster.
    let out = cluster
        .cli_as(&submit)
        .args(["nodes", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let out = cluster
        .cli_as(&submit)
        .args(["token", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));

    let listed = cluster
        .cli()
        .args(["token", "list", "--json"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    let token = std::fs::read_to_string(&submit).unwrap();
    assert!(
        !listed.contains(token.trim()),
        "token list must not show tokens"
    );
    let fp = skep_common::auth::fingerprint(token.trim());
    assert!(listed.contains(&fp));

    let out = cluster
        .cli()
        .args(["token", "revoke", &fp])
        .output()
        .unwrap();
    skep_integration::assert_success(&out);
    assert_eq!(
        submit_with(&cluster, &submit),
        Some(5),
        "a revoked token must stop working at once"
    );

    // The last admin token cannot be revoked.
    let admin = std::fs::read_to_string(cluster.token_file()).unwrap();
    let admin_fp = skep_common::auth::fingerprint(admin.trim());
    let out = cluster
        .cli()
        .args(["token", "revoke", &admin_fp])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lock yourself out"));
}

#[test]
fn expired_tokens_are_refused() {
    let cluster = Cluster::start(PoolOpts::default());
    let short = create_token(&cluster, "submit", &["--ttl", "1s"]);
    wait_until("the token to expire", || {
        submit_with(&cluster, &short) == Some(5)
    });
}

#[test]
fn tokens_survive_a_queen_restart_but_revocations_too() {
    let mut cluster = Cluster::start(PoolOpts::default());
    let kept = create_token(&cluster, "submit", &[]);
    let revoked = create_token(&cluster, "submit", &["--ttl", "1h"]);
    let fp = skep_common::auth::fingerprint(std::fs::read_to_string(&revoked).unwrap().trim());
    assert_eq!(
        cluster
            .cli()
            .args(["token", "revoke", &fp])
            .status()
            .unwrap()
            .code(),
        Some(0)
    );
    cluster.restart_queen();
    cluster.wait_for_nodes(1);
    assert_eq!(submit_with(&cluster, &kept), Some(0));
    assert_eq!(submit_with(&cluster, &revoked), Some(5));
}

#[test]
fn callers_over_their_rate_get_exit_4_with_a_retry_hint() {
    let cluster = Cluster::queen_with("rate", &["--rate-limit", "3/1m"]);
    for _ in 0..3 {
        let out = cluster.cli().args(["jobs", "list"]).output().unwrap();
        skep_integration::assert_success(&out);
    }
    let out = cluster.cli().args(["jobs", "list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rate limit") && stderr.contains("retry after"),
        "{stderr}"
    );
}

#[test]
fn a_peer_repeating_bad_tokens_is_throttled() {
    let cluster = Cluster::queen_with("badauth", &["--bad-auth-limit", "3/1m"]);
    let bad = cluster.write_token_file("bad.token", "skep_not_a_real_token");
    for _ in 0..3 {
        let out = cluster
            .cli_as(&bad)
            .args(["jobs", "list"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(5));
    }
    let out = cluster
        .cli_as(&bad)
        .args(["jobs", "list"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The penalty is for bad tokens only: a valid caller at the same address is served
    // (integration/tests/frontdoor.rs floods it harder).
    let out = cluster.cli().args(["jobs", "list"]).output().unwrap();
    skep_integration::assert_success(&out);
}

#[test]
fn token_files_readable_by_others_are_refused() {
    let cluster = Cluster::queen_only("perm");
    let loose = cluster.dir.join("loose.token");
    std::fs::copy(cluster.token_file(), &loose).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = cluster
        .cli_as(&loose)
        .args(["jobs", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
}

#[test]
fn hostile_inputs_are_rejected_with_the_right_status_and_never_logged_raw() {
    let cluster = Cluster::start(PoolOpts::default());
    let huge = "x".repeat(10 * 1024 * 1024);
    let cases: Vec<(&str, String, u32, Code)> = vec![
        ("../../etc/passwd", "hi".into(), 5, Code::InvalidArgument),
        ("m;rm -rf /", "hi".into(), 5, Code::InvalidArgument),
        ("$(reboot)", "hi".into(), 5, Code::InvalidArgument),
        ("m\0odel", "hi".into(), 5, Code::InvalidArgument),
        ("\x1b[31mred", "hi".into(), 5, Code::InvalidArgument),
        (
            "m\r\nINFO forged line",
            "hi".into(),
            5,
            Code::InvalidArgument,
        ),
        ("synthetic", "a\0b".into(), 5, Code::InvalidArgument),
        ("synthetic", "hi".into(), u32::MAX, Code::InvalidArgument),
        ("synthetic", String::new(), 5, Code::InvalidArgument),
        ("synthetic", huge, 5, Code::OutOfRange),
    ];
    let rt = runtime();
    rt.block_on(async {
        let mut jobs = cluster.jobs_client().await;
        for (model, prompt, max_tokens, want) in cases {
            let short = format!("{model:?}/{}B/{max_tokens}", prompt.len());
            let mut req = cluster.authed(SubmitRequest {
                model: model.into(),
                prompt,
                max_tokens,
                deadline_ms: 5000,
                ..Default::default()
            });
            req.set_timeout(std::time::Duration::from_secs(5));
            let err = jobs
                .submit(req)
                .await
                .err()
                .unwrap_or_else(|| panic!("{short} accepted"));
            assert_eq!(err.code(), want, "{short}: {}", err.message());
            assert!(
                !err.message().contains(model) || model == "synthetic",
                "{short}: message echoes input"
            );
        }
        for header in [
            "Bearer",
            "Basic abc",
            "Bearer  abc",
            "bearer abc",
            "Bearer abc def",
            "Token abc",
        ] {
            let mut req = tonic::Request::new(ListJobsRequest { limit: 1 });
            req.metadata_mut()
                .insert("authorization", header.parse().unwrap());
            let err = jobs
                .list(req)
                .await
                .err()
                .unwrap_or_else(|| panic!("{header:?} accepted"));
            assert_eq!(err.code(), Code::Unauthenticated, "{header:?}");
        }
        let long = format!("Bearer {}", "a".repeat(600));
        let mut req = tonic::Request::new(ListJobsRequest { limit: 1 });
        req.metadata_mut()
            .insert("authorization", long.parse().unwrap());
        assert_eq!(
            jobs.list(req).await.unwrap_err().code(),
            Code::Unauthenticated
        );
        let _: &JobsClient<_> = &jobs;
    });
    // The queen is still serving, and its log holds none of the hostile strings.
    let out = cluster.submit("synthetic", "10s", 2, "still alive?");
    assert_eq!(out.status.code(), Some(0));
    let log = std::fs::read_to_string(cluster.dir.join("queen.log")).unwrap();
    for needle in ["etc/passwd", "rm -rf", "reboot", "\x1b[31m", "forged line"] {
        assert!(!log.contains(needle), "queen log contains {needle:?}");
    }
}
