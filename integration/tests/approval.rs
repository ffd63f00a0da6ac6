//! Approval credentials for governed actions (model.add, node.enroll, token.revoke_last_admin)
//! against the real binaries: the right approval works exactly once, every wrong one is refused
//! with PERMISSION_DENIED and audited with its reason, and without `--require-approval` nothing
//! changes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};
use skep_approval::{Action, Approval, Claims, SigningKey, SpecHash};
use skep_common::auth::TokenDigest;
use skep_integration::{
    Cluster, PoolOpts, WAIT, assert_success, audit_text, bin, scratch_dir, wait_until,
};
use skep_proto::v1::ModelChunk;
use skep_proto::v1::models_client::ModelsClient;

/// The CLI's exit code for UNAUTHENTICATED and PERMISSION_DENIED.
const EXIT_AUTH: i32 = 5;
/// What the queen says for any approval that does not hold.
const NOT_VALID: &str = "the approval is not valid for this request";

/// A directory of keys, approvals and model files, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        Scratch(scratch_dir(tag))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// `skep approver init --out <dir>/<name>`: returns the private key file (public: `.pub`).
    #[track_caller]
    fn approver(&self, name: &str) -> PathBuf {
        let key = self.path(name);
        let out = skep()
            .args(["approver", "init", "--out"])
            .arg(&key)
            .output()
            .unwrap();
        assert_success(&out);
        key
    }

    /// A model file with the given contents.
    fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn skep() -> Command {
    Command::new(bin("skep"))
}

fn pub_of(key: &Path) -> String {
    format!("{}.pub", key.display())
}

fn spec_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `skep approve ACTION --spec-hash SPEC --env ENV --ttl 1h --key KEY --out <dir>/<out>`.
#[track_caller]
fn approve(s: &Scratch, key: &Path, action: &str, spec: &str, env: &str, out: &str) -> PathBuf {
    let path = s.path(out);
    let run = skep()
        .args([
            "approve",
            action,
            "--spec-hash",
            spec,
            "--env",
            env,
            "--ttl",
            "1h",
        ])
        .arg("--key")
        .arg(key)
        .arg("--out")
        .arg(&path)
        .output()
        .unwrap();
    assert_success(&run);
    path
}

/// A queen that requires approval for `actions` and trusts `key`'s public half.
#[track_caller]
fn governed(tag: &str, actions: &str, key: &Path) -> Cluster {
    let public = pub_of(key);
    Cluster::queen_with(
        tag,
        &["--approver-key", &public, "--require-approval", actions],
    )
}

/// `skep cluster id`, checked against the file the queen keeps it in.
#[track_caller]
fn cluster_id(c: &Cluster) -> String {
    let out = c.cli().args(["cluster", "id"]).output().unwrap();
    assert_success(&out);
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let file = std::fs::read_to_string(c.dir.join("queen").join("cluster.id")).unwrap();
    assert_eq!(id, file.trim());
    assert!(id.starts_with("skep-"), "{id}");
    id
}

fn model_add(c: &Cluster, name: &str, file: &Path, approval: Option<&Path>) -> Output {
    let mut cmd = c.cli();
    cmd.args(["model", "add", name]).arg(file);
    if let Some(a) = approval {
        cmd.arg("--approval").arg(a);
    }
    cmd.output().unwrap()
}

/// PERMISSION_DENIED (exit 5) with `says` in the message.
#[track_caller]
fn assert_denied(out: &Output, says: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_AUTH), "{err}");
    assert!(err.contains(says), "expected {says:?} in: {err}");
}

fn models(c: &Cluster) -> String {
    let out = c.cli().args(["model", "list"]).output().unwrap();
    assert_success(&out);
    String::from_utf8(out.stdout).unwrap()
}

fn queen_audit(c: &Cluster) -> String {
    audit_text(&c.dir.join("queen").join("audit"))
}

#[track_caller]
fn wait_for_audit(c: &Cluster, text: &str) {
    wait_until(&format!("{text:?} in the queen's audit log"), || {
        queen_audit(c).contains(text)
    });
}

#[test]
fn a_model_add_approval_works_exactly_once_even_across_a_restart() {
    let s = Scratch::new("approval-once");
    let key = s.approver("approver.key");
    let mut c = governed("approval-once", "model.add", &key);
    let env = cluster_id(&c);
    let bytes = b"GGUF approved model bytes".to_vec();
    let file = s.file("m.gguf", &bytes);

    // Governed: without an approval the admin token alone is not enough.
    assert_denied(
        &model_add(&c, "m", &file, None),
        "needs an approval credential",
    );
    let approval = approve(&s, &key, "model.add", &spec_of(&bytes), &env, "a1");
    assert_success(&model_add(&c, "m", &file, Some(&approval)));
    assert!(models(&c).contains("m\t"), "{}", models(&c));
    wait_for_audit(&c, "approval.used");

    // Replayed: refused, to this process and to the next one.
    assert_denied(&model_add(&c, "m2", &file, Some(&approval)), NOT_VALID);
    wait_for_audit(&c, "approval already used");
    c.restart_queen();
    assert_denied(&model_add(&c, "m3", &file, Some(&approval)), NOT_VALID);
    // A fresh approval still works after the restart (same cluster id).
    assert_eq!(cluster_id(&c), env);
    let again = approve(&s, &key, "model.add", &spec_of(&bytes), &env, "a2");
    assert_success(&model_add(&c, "m4", &file, Some(&again)));
    let listed = models(&c);
    assert!(
        !listed.contains("m2\t") && !listed.contains("m3\t"),
        "{listed}"
    );
}

#[test]
fn every_wrong_model_add_approval_is_refused_and_audited() {
    let s = Scratch::new("approval-bad");
    let key = s.approver("approver.key");
    let stranger = s.approver("stranger.key");
    let c = governed("approval-bad", "model.add,node.enroll", &key);
    let env = cluster_id(&c);
    let bytes = b"GGUF the file the approver saw".to_vec();
    let file = s.file("m.gguf", &bytes);
    let other = s.file("other.gguf", b"GGUF a different file");
    let spec = spec_of(&bytes);

    // An approval that expired a second ago, signed with the real key (the CLI only makes
    // approvals that start valid).
    let signer = SigningKey::from_text(&std::fs::read_to_string(&key).unwrap()).unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let claims = Claims::new(Action::ModelAdd, SpecHash::of(&bytes), &env, now_ms - 1000).unwrap();
    let expired = s.path("expired");
    std::fs::write(&expired, Approval::sign(claims, &signer).to_text()).unwrap();
    // A bearer token (the admin's own) where the approval goes.
    let token = std::fs::read_to_string(c.token_file()).unwrap();
    let bearer = s.file("bearer", token.as_bytes());

    let cases: [(&str, PathBuf, &Path, &str, &str); 6] = [
        (
            "another file",
            approve(&s, &key, "model.add", &spec, &env, "for-m"),
            &other,
            NOT_VALID,
            "approval is for another spec hash",
        ),
        (
            "another environment",
            approve(
                &s,
                &key,
                "model.add",
                &spec,
                "skep-someoneelse",
                "wrong-env",
            ),
            &file,
            NOT_VALID,
            "approval is for another environment",
        ),
        ("expired", expired, &file, NOT_VALID, "approval has expired"),
        (
            "untrusted key",
            approve(&s, &stranger, "model.add", &spec, &env, "stranger"),
            &file,
            NOT_VALID,
            "signed by a key that is not trusted",
        ),
        (
            "another action",
            approve(&s, &key, "node.enroll", &spec, &env, "wrong-action"),
            &file,
            NOT_VALID,
            "approval is for another action",
        ),
        (
            "a bearer token",
            bearer,
            &file,
            "not a skep approval credential",
            "not a skep approval credential",
        ),
    ];
    for (what, approval, upload, says, reason) in &cases {
        let out = model_add(&c, "m", upload, Some(approval));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_AUTH), "{what}: {err}");
        assert!(err.contains(says), "{what}: expected {says:?} in: {err}");
        // The caller is not told which part failed; the audit is.
        assert!(
            !err.contains(reason) || says == reason,
            "{what}: leaks {reason:?}"
        );
        wait_for_audit(&c, reason);
    }
    assert!(!models(&c).contains("m\t"), "nothing may be added");

    // A client that declares the approved hash but sends other bytes: the queen hashes what
    // arrives, refuses the upload and keeps nothing.
    let lying = approve(&s, &key, "model.add", &spec, &env, "lying");
    let first = ModelChunk {
        name: "m".into(),
        format: "gguf".into(),
        size: bytes.len() as u64,
        sha256: spec.trim_start_matches("sha256:").into(),
        data: vec![b'X'; bytes.len()],
        approval: std::fs::read_to_string(&lying).unwrap(),
    };
    let refused = skep_integration::runtime().block_on(async {
        let mut client = ModelsClient::new(c.channel().await.unwrap());
        client
            .add(c.authed(tokio_stream::iter(vec![first])))
            .await
            .unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("SHA-256"), "{refused:?}");
    assert!(!models(&c).contains("m\t"), "nothing may be added");

    // An approval does not authenticate a call: a submit token presenting a good approval is
    // refused for its role, and that approval is not used up by the refusal.
    let good = approve(&s, &key, "model.add", &spec, &env, "good");
    let submit_token = c
        .cli()
        .args(["token", "create", "--role", "submit"])
        .output()
        .unwrap();
    assert_success(&submit_token);
    let submit = c.write_token_file(
        "submit.token",
        String::from_utf8(submit_token.stdout).unwrap().trim(),
    );
    let out = c
        .cli_as(&submit)
        .args(["model", "add", "m"])
        .arg(&file)
        .arg("--approval")
        .arg(&good)
        .output()
        .unwrap();
    assert_denied(&out, "admin role");
    // None of the refusals above used anything up: the right approval works once.
    assert_success(&model_add(&c, "m", &file, Some(&good)));
}

#[test]
fn a_node_enrolls_only_with_an_approval_for_its_name() {
    let s = Scratch::new("approval-enroll");
    let key = s.approver("approver.key");
    let mut c = governed("approval-enroll", "node.enroll", &key);
    let env = cluster_id(&c);
    let made = c
        .cli()
        .args(["token", "create", "--enroll", "--ttl", "1h"])
        .output()
        .unwrap();
    assert_success(&made);
    let enroll = c.write_token_file(
        "enroll.token",
        String::from_utf8(made.stdout).unwrap().trim(),
    );
    let with = |approval: Option<&Path>| PoolOpts {
        token_file: Some(enroll.clone()),
        extra_args: approval
            .map(|a| vec!["--approval".to_owned(), a.display().to_string()])
            .unwrap_or_default(),
        ..PoolOpts::default()
    };

    // Pools are named pool<index>: pool0 has no approval, pool1 one for pool0's name; both
    // are refused and stop, and neither uses up the enrollment token.
    let for_pool0 = approve(&s, &key, "node.enroll", &spec_of(b"pool0"), &env, "pool0");
    for (i, approval, says) in [
        (0, None, "needs an approval credential"),
        (1, Some(for_pool0.as_path()), NOT_VALID),
    ] {
        assert_eq!(c.add_pool(with(approval)), i);
        let deadline = std::time::Instant::now() + WAIT;
        while c.pools[i].child.try_wait().unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "pool{i} did not stop");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(c.dir.join(format!("pool{i}.log"))).unwrap();
        assert!(log.contains(says), "pool{i}: {log}");
    }
    wait_for_audit(&c, "approval is for another spec hash");
    assert_eq!(c.healthy_nodes(), Ok(0));

    let for_pool2 = approve(&s, &key, "node.enroll", &spec_of(b"pool2"), &env, "pool2");
    assert_eq!(c.add_pool(with(Some(&for_pool2))), 2);
    c.wait_for_nodes(1);
    wait_for_audit(&c, "approval.used");
}

#[test]
fn revoking_the_last_admin_token_needs_an_approval_for_its_fingerprint() {
    let s = Scratch::new("approval-revoke");
    let key = s.approver("approver.key");
    let c = governed("approval-revoke", "token.revoke_last_admin", &key);
    let env = cluster_id(&c);
    let token = std::fs::read_to_string(c.token_file()).unwrap();
    let fp = TokenDigest::of(token.trim()).fingerprint();
    let revoke = |approval: Option<&Path>| {
        let mut cmd = c.cli();
        cmd.args(["token", "revoke", &fp]);
        if let Some(a) = approval {
            cmd.arg("--approval").arg(a);
        }
        cmd.output().unwrap()
    };
    assert_denied(&revoke(None), "needs an approval credential");
    let wrong = approve(
        &s,
        &key,
        "token.revoke_last_admin",
        &spec_of(b"000000"),
        &env,
        "x",
    );
    assert_denied(&revoke(Some(&wrong)), NOT_VALID);
    let right = approve(
        &s,
        &key,
        "token.revoke_last_admin",
        &spec_of(fp.as_bytes()),
        &env,
        "y",
    );
    assert_success(&revoke(Some(&right)));
    // It is gone: the admin token no longer authenticates anything.
    let out = c.cli().args(["token", "list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(EXIT_AUTH));
}

#[test]
fn without_require_approval_nothing_changes() {
    let s = Scratch::new("approval-off");
    let mut c = Cluster::queen_with("approval-off", &[]);
    assert!(cluster_id(&c).starts_with("skep-"));
    let file = s.file("m.gguf", b"GGUF unapproved but ungoverned");
    assert_success(&model_add(&c, "m", &file, None));
    // An admin token still enrolls a pool with no approval.
    c.add_pool(PoolOpts::default());
    c.wait_for_nodes(1);
    // The last admin token is still simply not revocable.
    let token = std::fs::read_to_string(c.token_file()).unwrap();
    let fp = TokenDigest::of(token.trim()).fingerprint();
    let out = c.cli().args(["token", "revoke", &fp]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("last"), "{err}");
}

#[test]
fn a_queen_requiring_approval_without_an_approver_key_does_not_start() {
    let s = Scratch::new("approval-nokey");
    let out = Command::new(bin("skep-queen"))
        .arg("--data-dir")
        .arg(s.path("queen"))
        .args(["--listen", "127.0.0.1:0", "--require-approval", "model.add"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("no --approver-key"), "{err}");
    assert!(!s.path("queen").join("listen.addr").exists());
}
