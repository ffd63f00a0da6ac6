//! The store against real database files in temp dirs. No timing assertions: where a test needs
//! commands to share a batch, it holds the writer on a gate until they are all queued.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;

use skep_common::sampling::Sampling;

use super::*;

fn job(id: &str, state: JobState, finished: u64) -> JobRecord {
    JobRecord {
        id: id.into(),
        model: "m".into(),
        state,
        created_unix_ms: 1,
        finished_unix_ms: finished,
        deadline_ms: 1000,
        max_tokens: 1,
        tokens: 0,
        node_id: String::new(),
        error: String::new(),
        timings: Timings::default(),
    }
}

/// A fresh directory for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("skep-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("q.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Holds the writer thread inside a command until released, so that whatever is sent meanwhile
/// queues up and is taken as one batch.
struct Gate {
    release: std_mpsc::Sender<()>,
    done: tokio::task::JoinHandle<Result<(), StoreError>>,
}

impl Gate {
    async fn close(store: &StoreHandle) -> Gate {
        let (release, released) = std_mpsc::channel::<()>();
        let (entered, inside) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(store.writer.submit(Durability::Committed, move |_| {
            let _ = entered.send(());
            let _ = released.recv();
            Ok(())
        }));
        // Once the writer is inside the gate command, its batch is fixed: everything sent from
        // now on waits in the queue.
        inside.await.unwrap();
        Gate { release, done }
    }

    /// Waits until `n` commands are queued behind the gate, then lets the writer go on.
    async fn open_after(self, store: &StoreHandle, n: usize) {
        while store.writer.queued() < n {
            tokio::task::yield_now().await;
        }
        self.release.send(()).unwrap();
        self.done.await.unwrap().unwrap();
    }
}

fn count(db: &Path, sql: &str) -> i64 {
    let conn = Connection::open(db).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn prune_and_recovery_touch_only_the_right_jobs() {
    let dir = TempDir::new("recovery");
    runtime().block_on(async {
        let store = start(&dir.db()).unwrap();
        let sampled = Sampling {
            temperature: 0.8,
            top_p: 0.95,
            seed: u64::MAX,
        };
        let insert = |j| store.insert(j, "a prompt", "abc123", sampled);
        insert(job("old", JobState::Done, 10)).await.unwrap();
        insert(job("new", JobState::Done, 5_000)).await.unwrap();
        insert(job("live", JobState::Running, 0)).await.unwrap();
        assert_eq!(store.prune(1_000).await.unwrap(), 1);
        assert!(store.get("old").await.unwrap().is_none());
        assert!(store.get("new").await.unwrap().is_some());
        let interrupted = store.take_interrupted().await.unwrap();
        assert_eq!(
            interrupted,
            vec![Interrupted {
                id: "live".into(),
                model: "m".into(),
                prompt: "a prompt".into(),
                max_tokens: 1,
                caller: "abc123".into(),
                deadline_unix_ms: 1 + 1000,
                sampling: sampled,
            }]
        );
        assert_eq!(
            store.get("live").await.unwrap().unwrap().state,
            JobState::Queued
        );

        // Re-inserting a recovered job keeps its creation time and budget.
        let mut again = job("live", JobState::Queued, 0);
        again.created_unix_ms = 99;
        again.deadline_ms = 5;
        insert(again).await.unwrap();
        let live = store.get("live").await.unwrap().unwrap();
        assert_eq!((live.created_unix_ms, live.deadline_ms), (1, 1000));

        // A terminal update forgets the prompt: nothing left to recover.
        let done = JobUpdate {
            id: "live".into(),
            state: JobState::Done,
            tokens: 1,
            node_id: String::new(),
            error: String::new(),
            timings: Timings::default(),
            finished_unix_ms: 2,
        };
        store.update(done).await.unwrap();
        assert!(store.take_interrupted().await.unwrap().is_empty());
    });
}

#[test]
fn concurrent_writes_share_transactions() {
    let dir = TempDir::new("group");
    runtime().block_on(async {
        let store = start(&dir.db()).unwrap();
        let gate = Gate::close(&store).await;
        let before = store.stats();
        let tasks: Vec<_> = (0..500)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .insert(
                            job(&format!("j{i}"), JobState::Queued, 0),
                            "p",
                            "c",
                            Sampling::default(),
                        )
                        .await
                })
            })
            .collect();
        gate.open_after(&store, 500).await;
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        // The gate's own transaction, then all 500 inserts in one.
        let after = store.stats();
        assert_eq!(after.transactions - before.transactions, 2);
        assert_eq!(after.commands - before.commands, 501);
        assert_eq!(store.list(1000).await.unwrap().len(), 500);

        // Without a gate, whatever queues while the writer commits still shares a commit; how
        // much depends on timing, so only the totals are checked.
        let before = store.stats();
        let tasks: Vec<_> = (0..500)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .insert(
                            job(&format!("k{i}"), JobState::Queued, 0),
                            "p",
                            "c",
                            Sampling::default(),
                        )
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let after = store.stats();
        assert_eq!(after.commands - before.commands, 500);
        assert!(after.transactions - before.transactions <= 500);
    });
    assert_eq!(count(&dir.db(), "SELECT count(*) FROM jobs"), 1000);
}

#[test]
fn a_failing_command_fails_alone_and_its_batch_commits() {
    let dir = TempDir::new("failing");
    runtime().block_on(async {
        let store = start(&dir.db()).unwrap();
        store
            .insert(job("taken", JobState::Done, 1), "", "", Sampling::default())
            .await
            .unwrap();
        let gate = Gate::close(&store).await;
        let before = store.stats();
        let a = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .insert(job("a", JobState::Queued, 0), "", "", Sampling::default())
                    .await
            }
        });
        // A duplicate primary key (the store's own insert upserts, so plain SQL).
        let dup = tokio::spawn(store.writer.submit(Durability::Committed, |c| {
            c.execute(
                "INSERT INTO jobs (id, model, state, created_unix_ms, deadline_ms, max_tokens)
                 VALUES ('taken', 'm', 'queued', 1, 1, 1)",
                [],
            )?;
            Ok(())
        }));
        // A command that writes, then fails: its write must be undone with it.
        let partial = tokio::spawn(store.writer.submit(Durability::Committed, |c| {
            c.execute(
                "INSERT INTO jobs (id, model, state, created_unix_ms, deadline_ms, max_tokens)
                 VALUES ('partial', 'm', 'queued', 1, 1, 1)",
                [],
            )?;
            Err::<(), _>(StoreError::Corrupt("on purpose".into()))
        }));
        let b = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .insert(job("b", JobState::Queued, 0), "", "", Sampling::default())
                    .await
            }
        });
        gate.open_after(&store, 4).await;

        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
        assert!(matches!(
            dup.await.unwrap(),
            Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                if e.code == rusqlite::ErrorCode::ConstraintViolation
        ));
        assert!(matches!(
            partial.await.unwrap(),
            Err(StoreError::Corrupt(_))
        ));
        // One transaction for the gate, one for the four: the failures did not split it.
        let after = store.stats();
        assert_eq!(after.transactions - before.transactions, 2);
        assert_eq!(after.commands - before.commands, 5);

        assert!(store.get("a").await.unwrap().is_some());
        assert!(store.get("b").await.unwrap().is_some());
        assert!(store.get("partial").await.unwrap().is_none());
        assert_eq!(
            store.get("taken").await.unwrap().unwrap().state,
            JobState::Done
        );
    });
}

#[test]
fn reads_see_every_acknowledged_write() {
    let dir = TempDir::new("reads");
    runtime().block_on(async {
        let store = start(&dir.db()).unwrap();
        // Other writes in flight throughout, so reads race real batches.
        let noise = tokio::spawn({
            let store = store.clone();
            async move {
                for i in 0..300 {
                    let id = format!("noise{i}");
                    store
                        .insert(job(&id, JobState::Queued, 0), "", "", Sampling::default())
                        .await
                        .unwrap();
                }
            }
        });
        for i in 0..100 {
            let id = format!("j{i}");
            store
                .insert(job(&id, JobState::Queued, 0), "p", "c", Sampling::default())
                .await
                .unwrap();
            assert_eq!(
                store.get(&id).await.unwrap().unwrap().state,
                JobState::Queued
            );
            let update = JobUpdate {
                id: id.clone(),
                state: JobState::Done,
                tokens: 7,
                node_id: "n".into(),
                error: String::new(),
                timings: Timings {
                    total_us: 5,
                    ..Timings::default()
                },
                finished_unix_ms: 9,
            };
            store.update(update).await.unwrap();
            let got = store.get(&id).await.unwrap().unwrap();
            assert_eq!(
                (got.state, got.tokens, got.timings.total_us),
                (JobState::Done, 7, 5)
            );
        }
        noise.await.unwrap();
        assert_eq!(store.list(1000).await.unwrap().len(), 400);

        let model = ModelEntry {
            name: "m".into(),
            sha256: "00".repeat(32),
            size: 3,
            format: "gguf".into(),
            added_unix_ms: 1,
        };
        store.upsert_model(model.clone()).await.unwrap();
        assert_eq!(store.list_models().await.unwrap(), vec![model]);

        let digest = skep_common::auth::TokenDigest::of("a token");
        let token = TokenEntry {
            digest,
            role: crate::auth::Role::Submit,
            label: "t".into(),
            created_unix_ms: 1,
            expires_unix_ms: 0,
            revoked: false,
            node_id: String::new(),
            max_jobs: 7,
        };
        store.insert_token(token.clone()).await.unwrap();
        assert_eq!(store.load_tokens().await.unwrap(), vec![token]);
        store.revoke_token(&digest).await.unwrap();
        assert!(store.load_tokens().await.unwrap()[0].revoked);
    });
}

#[test]
fn acknowledged_writes_are_there_after_reopening() {
    let dir = TempDir::new("reopen");
    runtime().block_on(async {
        let store = start(&dir.db()).unwrap();
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .insert(
                            job(&format!("j{i}"), JobState::Running, 0),
                            "p",
                            "c",
                            Sampling::default(),
                        )
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        drop(store);

        let store = start(&dir.db()).unwrap();
        for i in 0..300 {
            assert!(store.get(&format!("j{i}")).await.unwrap().is_some(), "j{i}");
        }
        assert_eq!(store.take_interrupted().await.unwrap().len(), 300);
    });
}

const CRASH_CHILD: &str = "SKEP_STORE_CRASH_CHILD";

/// The child half of `acknowledged_writes_survive_sigkill`: inserts jobs from several tasks and
/// appends each acknowledged id to a file, until killed. Does nothing when run as a plain test.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_CHILD).map(PathBuf::from) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = start(&dir.join("q.db")).unwrap();
        let acks = std::sync::Arc::new(std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("acks"))
                .unwrap(),
        ));
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let (store, acks) = (store.clone(), acks.clone());
                tokio::spawn(async move {
                    for i in 0.. {
                        let id = format!("t{t}-{i}");
                        store
                            .insert(job(&id, JobState::Queued, 0), "p", "c", Sampling::default())
                            .await
                            .unwrap();
                        // Unbuffered: once written, the line outlives this process.
                        acks.lock()
                            .unwrap()
                            .write_all(format!("{id}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// Kills a process that is writing with SIGKILL and checks that every write it saw
/// acknowledged is in the database when it is opened again: the WAL+NORMAL promise.
#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = TempDir::new("sigkill");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "store::tests::crash_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD, &dir.0)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Let it get well into its writes; the bound only keeps a broken child from hanging us.
    let acks_file = dir.0.join("acks");
    let started = std::time::Instant::now();
    loop {
        let lines = std::fs::read_to_string(&acks_file)
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if lines >= 2_000 {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("child exited early: {status}");
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "child made no progress"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let acks = std::fs::read_to_string(&acks_file).unwrap();
    // A line cut off by the kill was not finished being recorded: only whole lines count.
    let acked: Vec<&str> = acks
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .collect();
    assert!(acked.len() >= 2_000);
    runtime().block_on(async {
        let store = start(&dir.db()).unwrap();
        for id in &acked {
            assert!(
                store.get(id).await.unwrap().is_some(),
                "acknowledged {id} lost"
            );
        }
    });
}

#[test]
fn audit_checkpoints_go_through_the_writer() {
    let dir = TempDir::new("checkpoints");
    runtime().block_on(async {
        let store = start(&dir.db()).unwrap();
        let cp = |seq| AuditCheckpoint {
            seq,
            checkpoint: format!("{{\"seq\":{seq}}}"),
            dropped: 3,
        };
        let before = store.stats();
        // Not awaited, as the auditor does between events: queued all the same, in order.
        drop(store.checkpoint(cp(32), Durability::Committed));
        store.checkpoint(cp(40), Durability::Synced).await.unwrap();
        assert_eq!(store.stats().commands - before.commands, 2);
    });
    let conn = Connection::open(dir.db()).unwrap();
    let rows: Vec<(u64, String, u64)> = conn
        .prepare("SELECT seq, checkpoint, dropped FROM audit_checkpoints ORDER BY rowid")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        rows,
        vec![
            (32, "{\"seq\":32}".to_owned(), 3),
            (40, "{\"seq\":40}".to_owned(), 3)
        ]
    );
}

#[test]
fn opens_a_database_from_an_earlier_release() {
    let dir = TempDir::new("old");
    {
        // The first release's jobs table: no prompt or caller, no audit_checkpoints.
        let conn = Connection::open(dir.db()).unwrap();
        conn.execute_batch(
            "CREATE TABLE jobs (
                id TEXT PRIMARY KEY, model TEXT NOT NULL, state TEXT NOT NULL,
                created_unix_ms INTEGER NOT NULL, finished_unix_ms INTEGER NOT NULL DEFAULT 0,
                deadline_ms INTEGER NOT NULL, max_tokens INTEGER NOT NULL,
                tokens INTEGER NOT NULL DEFAULT 0, node_id TEXT NOT NULL DEFAULT '',
                error TEXT NOT NULL DEFAULT '', timings TEXT NOT NULL DEFAULT '{}');
             INSERT INTO jobs (id, model, state, created_unix_ms, deadline_ms, max_tokens, timings)
                VALUES ('old', 'm', 'done', 1, 1, 1, '{\"admission_us\":0,\"queue_wait_us\":0,
                    \"dispatch_us\":0,\"pool_us\":0,\"worker_first_token_us\":0,
                    \"generation_us\":0,\"total_us\":0}');",
        )
        .unwrap();
    }
    runtime().block_on(async {
        let store = start(&dir.db()).unwrap();
        assert_eq!(
            store.get("old").await.unwrap().unwrap().state,
            JobState::Done
        );
        store
            .insert(
                job("new", JobState::Queued, 0),
                "p",
                "c",
                Sampling::default(),
            )
            .await
            .unwrap();
        assert_eq!(store.take_interrupted().await.unwrap()[0].prompt, "p");
    });
}

#[test]
fn an_approval_nonce_is_used_once_even_across_a_reopen() {
    let dir = TempDir::new("approval-nonce");
    let now = 1_800_000_000_000;
    runtime().block_on(async {
        let store = start(&dir.db()).unwrap();
        let first = store.use_approval_nonce("aa".into(), "model.add", now + 1000, now);
        assert!(first.await.unwrap());
        let again = store.use_approval_nonce("aa".into(), "model.add", now + 1000, now);
        assert!(!again.await.unwrap());
        // Long expired: dropped on the next use, since its approval is refused as expired.
        let old = store.use_approval_nonce("bb".into(), "model.add", 1, now);
        assert!(old.await.unwrap());
    });
    runtime().block_on(async {
        let store = start(&dir.db()).unwrap();
        let replay = store.use_approval_nonce("aa".into(), "node.enroll", now + 1000, now);
        assert!(!replay.await.unwrap());
    });
    assert_eq!(
        count(
            &dir.db(),
            "SELECT COUNT(*) FROM approval_nonces WHERE nonce = 'bb'"
        ),
        0
    );
}

#[test]
fn jobs_are_owned_by_the_whole_token_digest_not_its_fingerprint() {
    let dir = TempDir::new("owner");
    runtime().block_on(async {
        let store = start(&dir.db()).unwrap();
        // Two owners whose 6-hex fingerprints are equal: only the full digest tells them apart.
        let mine = format!("abc123{}", "0".repeat(58));
        let theirs = format!("abc123{}", "1".repeat(58));
        store
            .insert(
                job("j", JobState::Done, 10),
                "p",
                &mine,
                Sampling::default(),
            )
            .await
            .unwrap();
        assert!(store.get_owned("j", Some(&mine)).await.unwrap().is_some());
        assert!(store.get_owned("j", Some(&theirs)).await.unwrap().is_none());
        assert!(
            store
                .get_owned("j", Some("abc123"))
                .await
                .unwrap()
                .is_none()
        );
        assert!(store.get_owned("j", None).await.unwrap().is_some());
        assert_eq!(store.list_owned(10, Some(&theirs)).await.unwrap().len(), 0);
        assert_eq!(store.list_owned(10, Some(&mine)).await.unwrap().len(), 1);
    });
}
