//! The state store: jobs in an embedded SQLite database (WAL) under the data directory.
//!
//! SQLite calls block, so the store is a `SyncArbiter` actor on its own thread; `StoreHandle` is
//! the async face the rest of the queen uses.

use std::path::Path;
use std::sync::Mutex;

use actix::prelude::*;
use rusqlite::{Connection, OptionalExtension, params};

use crate::Error;
use crate::auth::{Role, TokenEntry};
use crate::catalogue::ModelEntry;
use crate::model::{JobRecord, JobState, Timings};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    finished_unix_ms INTEGER NOT NULL DEFAULT 0,
    deadline_ms INTEGER NOT NULL,
    max_tokens INTEGER NOT NULL,
    tokens INTEGER NOT NULL DEFAULT 0,
    node_id TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    timings TEXT NOT NULL DEFAULT '{}',
    prompt TEXT NOT NULL DEFAULT '',
    caller TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_unix_ms);
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    format TEXT NOT NULL,
    added_unix_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    digest TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    label TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    expires_unix_ms INTEGER NOT NULL DEFAULT 0,
    revoked INTEGER NOT NULL DEFAULT 0,
    node_id TEXT NOT NULL DEFAULT ''
);
";

pub struct Store {
    conn: Connection,
}

impl Actor for Store {
    type Context = SyncContext<Self>;
}

/// Opens (creating if needed) the database and starts the store on its own thread.
pub fn start(path: &Path) -> Result<StoreHandle, StoreError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)?;
    migrate(&conn)?;
    // SyncArbiter wants a factory; with one thread it is called once, so hand the connection over.
    let slot = Mutex::new(Some(conn));
    let addr = SyncArbiter::start(1, move || {
        let conn = slot
            .lock()
            .ok()
            .and_then(|mut c| c.take())
            .expect("store factory is called once for its single thread");
        Store { conn }
    });
    Ok(StoreHandle { addr })
}

/// Columns added after the first release; databases created before them gain them here.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('jobs')")?;
    let have = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    for (column, ddl) in [
        (
            "prompt",
            "ALTER TABLE jobs ADD COLUMN prompt TEXT NOT NULL DEFAULT ''",
        ),
        (
            "caller",
            "ALTER TABLE jobs ADD COLUMN caller TEXT NOT NULL DEFAULT ''",
        ),
    ] {
        if !have.iter().any(|c| c == column) {
            conn.execute_batch(ddl)?;
        }
    }
    Ok(())
}

/// A job the previous run of the queen left unfinished: enough to run it again.
#[derive(Debug, Clone, PartialEq)]
pub struct Interrupted {
    pub id: String,
    pub model: String,
    pub prompt: String,
    pub max_tokens: u32,
    pub caller: String,
    /// Wall-clock time the job's deadline falls at (created + budget).
    pub deadline_unix_ms: u64,
}

/// Fields that change as a job progresses.
#[derive(Debug, Clone)]
pub struct JobUpdate {
    pub id: String,
    pub state: JobState,
    pub tokens: u32,
    pub node_id: String,
    pub error: String,
    pub timings: Timings,
    pub finished_unix_ms: u64,
}

#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
struct Insert {
    job: JobRecord,
    prompt: String,
    caller: String,
}

#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
struct Update(JobUpdate);

#[derive(Message)]
#[rtype(result = "Result<Option<JobRecord>, StoreError>")]
struct Get(String);

#[derive(Message)]
#[rtype(result = "Result<Vec<JobRecord>, StoreError>")]
struct List(u32);

impl Handler<Insert> for Store {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, msg: Insert, _: &mut Self::Context) -> Self::Result {
        let j = msg.job;
        // A recovered job is inserted again: it keeps its creation time and original budget.
        self.conn.execute(
            "INSERT INTO jobs (id, model, state, created_unix_ms, finished_unix_ms, deadline_ms,
                               max_tokens, tokens, node_id, error, timings, prompt, caller)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT(id) DO UPDATE SET state = excluded.state, tokens = 0,
                 node_id = '', error = '', finished_unix_ms = 0",
            params![
                j.id,
                j.model,
                j.state.as_str(),
                j.created_unix_ms,
                j.finished_unix_ms,
                j.deadline_ms,
                j.max_tokens,
                j.tokens,
                j.node_id,
                j.error,
                timings_json(&j.timings),
                msg.prompt,
                msg.caller,
            ],
        )?;
        Ok(())
    }
}

impl Handler<Update> for Store {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, Update(u): Update, _: &mut Self::Context) -> Self::Result {
        // The prompt is kept only while the job may still need to run again after a restart.
        self.conn.execute(
            "UPDATE jobs SET state = ?2, tokens = ?3, node_id = ?4, error = ?5, timings = ?6,
                             finished_unix_ms = ?7,
                             prompt = CASE WHEN ?8 THEN '' ELSE prompt END
             WHERE id = ?1",
            params![
                u.id,
                u.state.as_str(),
                u.tokens,
                u.node_id,
                u.error,
                timings_json(&u.timings),
                u.finished_unix_ms,
                u.state.is_terminal(),
            ],
        )?;
        Ok(())
    }
}

const SELECT: &str = "SELECT id, model, state, created_unix_ms, finished_unix_ms, deadline_ms,
                             max_tokens, tokens, node_id, error, timings FROM jobs";

impl Handler<Get> for Store {
    type Result = Result<Option<JobRecord>, StoreError>;
    fn handle(&mut self, Get(id): Get, _: &mut Self::Context) -> Self::Result {
        let row = self
            .conn
            .query_row(&format!("{SELECT} WHERE id = ?1"), [id], row_to_raw)
            .optional()?;
        row.map(decode).transpose()
    }
}

impl Handler<List> for Store {
    type Result = Result<Vec<JobRecord>, StoreError>;
    fn handle(&mut self, List(limit): List, _: &mut Self::Context) -> Self::Result {
        let mut stmt = self
            .conn
            .prepare(&format!("{SELECT} ORDER BY created_unix_ms DESC LIMIT ?1"))?;
        let rows = stmt.query_map([limit], row_to_raw)?;
        rows.map(|r| decode(r?)).collect()
    }
}

#[derive(Message)]
#[rtype(result = "Result<usize, StoreError>")]
struct Prune {
    finished_before_unix_ms: u64,
}

impl Handler<Prune> for Store {
    type Result = Result<usize, StoreError>;
    fn handle(&mut self, msg: Prune, _: &mut Self::Context) -> Self::Result {
        Ok(self.conn.execute(
            "DELETE FROM jobs WHERE finished_unix_ms > 0 AND finished_unix_ms < ?1",
            [msg.finished_before_unix_ms],
        )?)
    }
}

#[derive(Message)]
#[rtype(result = "Result<Vec<Interrupted>, StoreError>")]
struct TakeInterrupted;

impl Handler<TakeInterrupted> for Store {
    type Result = Result<Vec<Interrupted>, StoreError>;
    fn handle(&mut self, _: TakeInterrupted, _: &mut Self::Context) -> Self::Result {
        let tx = self.conn.transaction()?;
        let jobs = {
            let mut stmt = tx.prepare(
                "SELECT id, model, prompt, max_tokens, caller, created_unix_ms + deadline_ms
                 FROM jobs WHERE state IN ('queued', 'running') ORDER BY created_unix_ms",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(Interrupted {
                    id: r.get(0)?,
                    model: r.get(1)?,
                    prompt: r.get(2)?,
                    max_tokens: r.get(3)?,
                    caller: r.get(4)?,
                    deadline_unix_ms: r.get(5)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        // Whatever they were doing stopped with the previous process: they wait again.
        tx.execute(
            "UPDATE jobs SET state = 'queued', node_id = '', tokens = 0
             WHERE state IN ('queued', 'running')",
            [],
        )?;
        tx.commit()?;
        Ok(jobs)
    }
}

#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
struct UpsertModel(ModelEntry);

#[derive(Message)]
#[rtype(result = "Result<Vec<ModelEntry>, StoreError>")]
struct ListModels;

impl Handler<UpsertModel> for Store {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, UpsertModel(m): UpsertModel, _: &mut Self::Context) -> Self::Result {
        self.conn.execute(
            "INSERT OR REPLACE INTO models (name, sha256, size, format, added_unix_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![m.name, m.sha256, m.size, m.format, m.added_unix_ms],
        )?;
        Ok(())
    }
}

impl Handler<ListModels> for Store {
    type Result = Result<Vec<ModelEntry>, StoreError>;
    fn handle(&mut self, _: ListModels, _: &mut Self::Context) -> Self::Result {
        let mut stmt = self.conn.prepare(
            "SELECT name, sha256, size, format, added_unix_ms FROM models ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ModelEntry {
                name: r.get(0)?,
                sha256: r.get(1)?,
                size: r.get(2)?,
                format: r.get(3)?,
                added_unix_ms: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
struct InsertToken(TokenEntry);

#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
struct RevokeToken(String);

#[derive(Message)]
#[rtype(result = "Result<Vec<TokenEntry>, StoreError>")]
struct LoadTokens;

impl Handler<InsertToken> for Store {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, InsertToken(t): InsertToken, _: &mut Self::Context) -> Self::Result {
        self.conn.execute(
            "INSERT OR REPLACE INTO tokens
                (digest, role, label, created_unix_ms, expires_unix_ms, revoked, node_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                t.digest.to_hex(),
                t.role.as_str(),
                t.label,
                t.created_unix_ms,
                t.expires_unix_ms,
                t.revoked,
                t.node_id
            ],
        )?;
        Ok(())
    }
}

impl Handler<RevokeToken> for Store {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, RevokeToken(digest): RevokeToken, _: &mut Self::Context) -> Self::Result {
        self.conn
            .execute("UPDATE tokens SET revoked = 1 WHERE digest = ?1", [digest])?;
        Ok(())
    }
}

impl Handler<LoadTokens> for Store {
    type Result = Result<Vec<TokenEntry>, StoreError>;
    fn handle(&mut self, _: LoadTokens, _: &mut Self::Context) -> Self::Result {
        let mut stmt = self.conn.prepare(
            "SELECT digest, role, label, created_unix_ms, expires_unix_ms, revoked, node_id FROM tokens",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, u64>(3)?,
                r.get::<_, u64>(4)?,
                r.get::<_, bool>(5)?,
                r.get::<_, String>(6)?,
            ))
        })?;
        rows.map(|r| {
            let (digest, role, label, created, expires, revoked, node_id) = r?;
            Ok(TokenEntry {
                digest: skep_common::auth::TokenDigest::from_hex(&digest)
                    .ok_or_else(|| StoreError::Corrupt("token digest".into()))?,
                role: Role::parse(&role)
                    .ok_or_else(|| StoreError::Corrupt(format!("role {role:?}")))?,
                label,
                created_unix_ms: created,
                expires_unix_ms: expires,
                revoked,
                node_id,
            })
        })
        .collect()
    }
}

type RawRow = (
    String,
    String,
    String,
    u64,
    u64,
    u64,
    u32,
    u32,
    String,
    String,
    String,
);

fn row_to_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
    ))
}

fn decode(raw: RawRow) -> Result<JobRecord, StoreError> {
    let (id, model, state, created, finished, deadline, max_tokens, tokens, node_id, error, t) =
        raw;
    let state =
        JobState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("state {state:?}")))?;
    let timings = serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(JobRecord {
        id,
        model,
        state,
        created_unix_ms: created,
        finished_unix_ms: finished,
        deadline_ms: deadline,
        max_tokens,
        tokens,
        node_id,
        error,
        timings,
    })
}

fn timings_json(t: &Timings) -> String {
    serde_json::to_string(t).unwrap_or_else(|_| "{}".to_owned())
}

/// Async handle to the store.
#[derive(Clone)]
pub struct StoreHandle {
    addr: Addr<Store>,
}

// === impl StoreHandle ===

impl StoreHandle {
    /// Records a job (or re-records a recovered one) with what is needed to run it again.
    pub async fn insert(&self, job: JobRecord, prompt: &str, caller: &str) -> Result<(), Error> {
        let msg = Insert {
            job,
            prompt: prompt.to_owned(),
            caller: caller.to_owned(),
        };
        Ok(self.addr.send(msg).await??)
    }

    pub async fn update(&self, update: JobUpdate) -> Result<(), Error> {
        Ok(self.addr.send(Update(update)).await??)
    }

    pub async fn get(&self, id: &str) -> Result<Option<JobRecord>, Error> {
        Ok(self.addr.send(Get(id.to_owned())).await??)
    }

    /// At start: the jobs the previous run left queued or running, now marked queued again,
    /// oldest first, for the queen to run them again.
    pub async fn take_interrupted(&self) -> Result<Vec<Interrupted>, Error> {
        Ok(self.addr.send(TakeInterrupted).await??)
    }

    /// Deletes jobs that finished before the given time; returns how many.
    pub async fn prune(&self, finished_before_unix_ms: u64) -> Result<usize, Error> {
        Ok(self
            .addr
            .send(Prune {
                finished_before_unix_ms,
            })
            .await??)
    }

    pub async fn insert_token(&self, token: TokenEntry) -> Result<(), Error> {
        Ok(self.addr.send(InsertToken(token)).await??)
    }

    pub async fn revoke_token(&self, digest: &skep_common::auth::TokenDigest) -> Result<(), Error> {
        Ok(self.addr.send(RevokeToken(digest.to_hex())).await??)
    }

    pub async fn load_tokens(&self) -> Result<Vec<TokenEntry>, Error> {
        Ok(self.addr.send(LoadTokens).await??)
    }

    pub async fn upsert_model(&self, model: ModelEntry) -> Result<(), Error> {
        Ok(self.addr.send(UpsertModel(model)).await??)
    }

    pub async fn list_models(&self) -> Result<Vec<ModelEntry>, Error> {
        Ok(self.addr.send(ListModels).await??)
    }

    pub async fn list(&self, limit: u32) -> Result<Vec<JobRecord>, Error> {
        Ok(self.addr.send(List(limit)).await??)
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn prune_and_recovery_touch_only_the_right_jobs() {
        let dir = std::env::temp_dir().join(format!("skep-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sys = actix::System::new();
        sys.block_on(async {
            let store = start(&dir.join("q.db")).unwrap();
            let insert = |j| store.insert(j, "a prompt", "abc123");
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
        let _ = std::fs::remove_dir_all(&dir);
    }
}
