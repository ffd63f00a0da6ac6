//! Callers are kept apart: a submit token sees and cancels only its own jobs. Also the small
//! protocol edges of the authenticating interceptor and of node revocation.

use std::path::PathBuf;

use skep_integration::{Cluster, PoolOpts, runtime};
use skep_proto::v1::job_event::Kind;
use skep_proto::v1::nodes_client::NodesClient;
use skep_proto::v1::{
    CancelJobRequest, GetJobRequest, JobState, ListJobsRequest, RegisterRequest, RevokeNodeRequest,
    SubmitRequest,
};
use tonic::{Code, Request};

/// A new token of `role`, written by `skep token create` to `name` in the cluster's directory.
fn create_token(cluster: &Cluster, role: &str, name: &str) -> String {
    let path: PathBuf = cluster.dir.join(name);
    let out = cluster
        .cli()
        .args(["token", "create", "--role", role, "--label", name, "--out"])
        .arg(&path)
        .output()
        .unwrap();
    skep_integration::assert_success(&out);
    std::fs::read_to_string(&path).unwrap().trim().to_owned()
}

fn admin_token(cluster: &Cluster) -> String {
    std::fs::read_to_string(cluster.token_file())
        .unwrap()
        .trim()
        .to_owned()
}

/// `msg` with `authorization: Bearer <token>`.
fn as_caller<T>(token: &str, msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn get(id: &str) -> GetJobRequest {
    GetJobRequest { job_id: id.into() }
}

fn cancel(id: &str) -> CancelJobRequest {
    CancelJobRequest { job_id: id.into() }
}

fn list() -> ListJobsRequest {
    ListJobsRequest { limit: 1000 }
}

#[test]
fn submit_tokens_see_and_cancel_only_their_own_jobs() {
    // A slow pool: the job runs for many seconds, so it is live while the others look at it.
    let cluster = Cluster::start(PoolOpts {
        tps: 10.0,
        ..PoolOpts::default()
    });
    let a = create_token(&cluster, "submit", "a.token");
    let b = create_token(&cluster, "submit", "b.token");
    let admin = admin_token(&cluster);
    let rt = runtime();
    rt.block_on(async {
        let mut jobs = cluster.jobs_client().await;
        let mut stream = jobs
            .submit(as_caller(
                &a,
                SubmitRequest {
                    model: "synthetic".into(),
                    prompt: "a long story".into(),
                    max_tokens: 200,
                    deadline_ms: 60_000,
                    ..Default::default()
                },
            ))
            .await
            .expect("A submits")
            .into_inner();
        let first = stream.message().await.unwrap().expect("an event");
        assert!(matches!(first.kind, Some(Kind::Accepted(_))), "{first:?}");
        let id = first.job_id.clone();
        let missing = "00000000-0000-4000-8000-000000000000";

        // B: A's job is exactly as absent as a job that does not exist.
        let foreign = jobs.get(as_caller(&b, get(&id))).await.unwrap_err();
        let absent = jobs.get(as_caller(&b, get(missing))).await.unwrap_err();
        assert_eq!(foreign.code(), Code::NotFound, "{}", foreign.message());
        assert_eq!(absent.code(), Code::NotFound, "{}", absent.message());
        assert_eq!(
            foreign.message().replace(&id, "ID"),
            absent.message().replace(missing, "ID")
        );
        let foreign = jobs.cancel(as_caller(&b, cancel(&id))).await.unwrap_err();
        let absent = jobs
            .cancel(as_caller(&b, cancel(missing)))
            .await
            .unwrap_err();
        assert_eq!(foreign.code(), Code::NotFound, "{}", foreign.message());
        assert_eq!(absent.code(), Code::NotFound, "{}", absent.message());
        assert_eq!(
            foreign.message().replace(&id, "ID"),
            absent.message().replace(missing, "ID")
        );
        let seen = jobs.list(as_caller(&b, list())).await.unwrap().into_inner();
        assert!(
            seen.jobs.iter().all(|j| j.id != id),
            "B lists A's job: {seen:?}"
        );

        // A sees its job, still live: B's cancel did nothing.
        let job = jobs
            .get(as_caller(&a, get(&id)))
            .await
            .expect("A gets its job")
            .into_inner();
        assert!(
            job.state == JobState::Queued as i32 || job.state == JobState::Running as i32,
            "{job:?}"
        );
        let seen = jobs.list(as_caller(&a, list())).await.unwrap().into_inner();
        assert!(seen.jobs.iter().any(|j| j.id == id), "A: {seen:?}");

        // The admin sees everyone's jobs.
        jobs.get(as_caller(&admin, get(&id)))
            .await
            .expect("admin gets A's job");
        let seen = jobs
            .list(as_caller(&admin, list()))
            .await
            .unwrap()
            .into_inner();
        assert!(seen.jobs.iter().any(|j| j.id == id), "admin: {seen:?}");

        // A may cancel its own job.
        let done = jobs
            .cancel(as_caller(&a, cancel(&id)))
            .await
            .expect("A cancels its job")
            .into_inner();
        assert_eq!(done.state, JobState::Cancelled as i32);
        // Still invisible to B once it ended.
        let foreign = jobs.get(as_caller(&b, get(&id))).await.unwrap_err();
        assert_eq!(foreign.code(), Code::NotFound);
    });
}

#[test]
fn two_authorization_headers_are_refused() {
    let cluster = Cluster::queen_only("dupauth");
    let admin = admin_token(&cluster);
    let good = format!("Bearer {admin}");
    let rt = runtime();
    rt.block_on(async {
        let mut jobs = cluster.jobs_client().await;
        // One header: fine.
        jobs.list(as_caller(&admin, list()))
            .await
            .expect("one header");
        for pair in [
            [good.as_str(), "Bearer skep_someone_else"],
            ["Bearer skep_someone_else", good.as_str()],
            [good.as_str(), good.as_str()],
        ] {
            let mut req = Request::new(list());
            for value in pair {
                req.metadata_mut()
                    .append("authorization", value.parse().unwrap());
            }
            let err = jobs
                .list(req)
                .await
                .err()
                .unwrap_or_else(|| panic!("two headers accepted: {pair:?}"));
            assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
        }
    });
}

fn register(node_id: &str) -> RegisterRequest {
    RegisterRequest {
        name: "ghost".into(),
        // Nothing listens there; the registration itself is all these tests look at.
        pool_url: "http://127.0.0.1:9".into(),
        slots: 1,
        models: vec!["ghost-model".into()],
        dispatch_key: "ghostkey".into(),
        node_id: node_id.into(),
        figures: Vec::new(),
        ..Default::default()
    }
}

fn revoke(node_id: &str) -> RevokeNodeRequest {
    RevokeNodeRequest {
        node_id: node_id.into(),
    }
}

#[test]
fn revoking_an_unknown_node_does_not_block_its_id() {
    let cluster = Cluster::queen_only("revoke-unknown");
    let rt = runtime();
    rt.block_on(async {
        let mut nodes = NodesClient::new(cluster.channel().await.unwrap());
        let err = nodes
            .revoke(cluster.authed(revoke("node-unknown")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{}", err.message());
        // The id was never in use: nothing may be blocked by that answer.
        nodes
            .register(cluster.authed(register("node-unknown")))
            .await
            .expect("an id whose revocation was NOT_FOUND registers");
    });
}

#[test]
fn a_revoked_node_is_told_so_plainly() {
    let cluster = Cluster::queen_only("revoked-msg");
    let rt = runtime();
    rt.block_on(async {
        let mut nodes = NodesClient::new(cluster.channel().await.unwrap());
        nodes
            .register(cluster.authed(register("node-gone")))
            .await
            .expect("register");
        nodes
            .revoke(cluster.authed(revoke("node-gone")))
            .await
            .expect("revoke a registered node");
        let err = nodes
            .register(cluster.authed(register("node-gone")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        assert!(
            err.message().contains("node-gone is revoked") && !err.message().contains("needs the"),
            "{}",
            err.message()
        );
    });
}

#[test]
fn one_tenant_holding_500_unread_streams_cannot_starve_another() {
    // The rate limit is raised so that only the per-caller share stands between tenant A and
    // the whole queue (256 waiting jobs by default).
    let cluster = Cluster::start_with(
        &["--rate-limit", "2000/1s"],
        PoolOpts {
            tps: 20.0,
            ..PoolOpts::default()
        },
    );
    let a = create_token(&cluster, "submit", "a.token");
    let b = create_token(&cluster, "submit", "b.token");
    let rt = runtime();
    rt.block_on(async {
        // A opens 500 job streams over a few connections and never reads one of them.
        let mut held = Vec::new();
        let mut refused = Vec::new();
        for conn in 0..5 {
            let mut jobs = cluster.jobs_client().await;
            for i in 0..100 {
                let req = SubmitRequest {
                    model: "synthetic".into(),
                    prompt: format!("A's job {conn}/{i}"),
                    // 10 s each: none of A's jobs ends while A is still submitting, so exactly
                    // its share is admitted.
                    max_tokens: 200,
                    deadline_ms: 3_600_000,
                    ..Default::default()
                };
                match jobs.submit(as_caller(&a, req)).await {
                    Ok(stream) => held.push(stream.into_inner()),
                    Err(status) => refused.push(status),
                }
            }
        }
        // B is admitted and its job finishes while A's streams sit unread.
        let mut jobs = cluster.jobs_client().await;
        let mut stream = jobs
            .submit(as_caller(
                &b,
                SubmitRequest {
                    model: "synthetic".into(),
                    prompt: "B's job".into(),
                    max_tokens: 2,
                    deadline_ms: 120_000,
                    ..Default::default()
                },
            ))
            .await
            .expect("B is admitted while A holds its streams")
            .into_inner();
        let mut last = None;
        while let Some(ev) = stream.message().await.expect("B's stream") {
            last = ev.kind;
        }
        assert!(matches!(last, Some(Kind::Done(_))), "B's job: {last:?}");
        // The default share is 64 live jobs per caller; the rest are refused as A's own excess.
        assert_eq!(held.len(), 64, "A holds {} streams", held.len());
        assert_eq!(refused.len(), 500 - 64);
        for status in &refused {
            assert_eq!(
                status.code(),
                Code::ResourceExhausted,
                "{}",
                status.message()
            );
            assert!(
                status.message().contains("its share"),
                "{}",
                status.message()
            );
        }
        drop(held);
    });
}

#[test]
fn a_token_created_with_max_jobs_has_its_own_share() {
    let cluster = Cluster::start(PoolOpts {
        tps: 10.0,
        ..PoolOpts::default()
    });
    let path = cluster.dir.join("small.token");
    let out = cluster
        .cli()
        .args(["token", "create", "--role", "submit", "--max-jobs", "2"])
        .args(["--label", "small", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    skep_integration::assert_success(&out);
    let small = std::fs::read_to_string(&path).unwrap().trim().to_owned();
    let listed = cluster
        .cli()
        .args(["token", "list", "--json"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.contains("\"label\":\"small\"") && l.contains("\"max_jobs\":2")),
        "{listed}"
    );
    let rt = runtime();
    rt.block_on(async {
        let mut jobs = cluster.jobs_client().await;
        let req = || SubmitRequest {
            model: "synthetic".into(),
            prompt: "a long story".into(),
            max_tokens: 100,
            deadline_ms: 600_000,
            ..Default::default()
        };
        let _first = jobs.submit(as_caller(&small, req())).await.expect("first");
        let _second = jobs.submit(as_caller(&small, req())).await.expect("second");
        let third = jobs.submit(as_caller(&small, req())).await.unwrap_err();
        assert_eq!(third.code(), Code::ResourceExhausted, "{}", third.message());
        assert!(
            third.message().contains("already has 2 jobs"),
            "{}",
            third.message()
        );
    });
    // A share beyond what a queen can hold, or on an enrollment token, is refused.
    for args in [
        &["--role", "submit", "--max-jobs", "5000"][..],
        &["--enroll", "--max-jobs", "3"][..],
    ] {
        let out = cluster
            .cli()
            .args(["token", "create"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("max_jobs"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
