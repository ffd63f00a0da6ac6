//! The statements: one function per command, run on whichever connection owns the command
//! (the writer for writes, a reader for reads). All go through `prepare_cached`, so each
//! connection parses a statement once.

use rusqlite::{Connection, OptionalExtension, params};
use skep_common::sampling::Sampling;

use super::{AuditCheckpoint, Interrupted, JobUpdate, StoreError};
use crate::auth::{Role, TokenEntry};
use crate::catalogue::ModelEntry;
use crate::model::{JobRecord, JobState, Timings};

/// The tables, created if missing. The same tables and columns as every earlier release, so an
/// existing database opens as it is (older ones gain their missing columns in `migrate`).
pub(super) const SCHEMA: &str = "
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
    caller TEXT NOT NULL DEFAULT '',
    temperature REAL NOT NULL DEFAULT 0,
    top_p REAL NOT NULL DEFAULT 0,
    seed INTEGER NOT NULL DEFAULT 0
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
    node_id TEXT NOT NULL DEFAULT '',
    max_jobs INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS approval_nonces (
    nonce TEXT PRIMARY KEY,
    action TEXT NOT NULL,
    used_unix_ms INTEGER NOT NULL,
    expires_unix_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    seq INTEGER NOT NULL, checkpoint TEXT NOT NULL, dropped INTEGER NOT NULL,
    created DATETIME DEFAULT CURRENT_TIMESTAMP
);
";

/// Columns added after the first release; databases created before them gain them here.
pub(super) fn migrate(conn: &Connection) -> Result<(), StoreError> {
    for (table, column, ddl) in [
        (
            "jobs",
            "prompt",
            "ALTER TABLE jobs ADD COLUMN prompt TEXT NOT NULL DEFAULT ''",
        ),
        (
            "jobs",
            "caller",
            "ALTER TABLE jobs ADD COLUMN caller TEXT NOT NULL DEFAULT ''",
        ),
        (
            "jobs",
            "temperature",
            "ALTER TABLE jobs ADD COLUMN temperature REAL NOT NULL DEFAULT 0",
        ),
        (
            "jobs",
            "top_p",
            "ALTER TABLE jobs ADD COLUMN top_p REAL NOT NULL DEFAULT 0",
        ),
        (
            "jobs",
            "seed",
            "ALTER TABLE jobs ADD COLUMN seed INTEGER NOT NULL DEFAULT 0",
        ),
        (
            "tokens",
            "max_jobs",
            "ALTER TABLE tokens ADD COLUMN max_jobs INTEGER NOT NULL DEFAULT 0",
        ),
    ] {
        let mut stmt = conn.prepare_cached("SELECT name FROM pragma_table_info(?1)")?;
        let have = stmt
            .query_map([table], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        if !have.iter().any(|c| c == column) {
            conn.execute_batch(ddl)?;
        }
    }
    Ok(())
}

// --- writes (writer thread only) ---

pub(super) fn insert(
    conn: &Connection,
    j: &JobRecord,
    prompt: &str,
    caller: &str,
    sampling: &Sampling,
) -> Result<(), StoreError> {
    // A recovered job is inserted again: it keeps its creation time and original budget.
    conn.prepare_cached(
        "INSERT INTO jobs (id, model, state, created_unix_ms, finished_unix_ms, deadline_ms,
                           max_tokens, tokens, node_id, error, timings, prompt, caller,
                           temperature, top_p, seed)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
         ON CONFLICT(id) DO UPDATE SET state = excluded.state, tokens = 0,
             node_id = '', error = '', finished_unix_ms = 0",
    )?
    .execute(params![
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
        prompt,
        caller,
        f64::from(sampling.temperature),
        f64::from(sampling.top_p),
        // SQLite integers are signed: the seed's bits are kept as they are.
        sampling.seed as i64,
    ])?;
    Ok(())
}

pub(super) fn update(conn: &Connection, u: &JobUpdate) -> Result<(), StoreError> {
    // The prompt is kept only while the job may still need to run again after a restart; once
    // cleared, the WAL that still holds its old pages is scrubbed after the commit.
    if u.state.is_terminal() {
        super::writer::scrub_after_commit();
    }
    conn.prepare_cached(
        "UPDATE jobs SET state = ?2, tokens = ?3, node_id = ?4, error = ?5, timings = ?6,
                         finished_unix_ms = ?7,
                         prompt = CASE WHEN ?8 THEN '' ELSE prompt END
         WHERE id = ?1",
    )?
    .execute(params![
        u.id,
        u.state.as_str(),
        u.tokens,
        u.node_id,
        u.error,
        timings_json(&u.timings),
        u.finished_unix_ms,
        u.state.is_terminal(),
    ])?;
    Ok(())
}

pub(super) fn prune(conn: &Connection, finished_before_unix_ms: u64) -> Result<usize, StoreError> {
    Ok(conn
        .prepare_cached("DELETE FROM jobs WHERE finished_unix_ms > 0 AND finished_unix_ms < ?1")?
        .execute([finished_before_unix_ms])?)
}

/// Reads and re-queues in one command, so the writer's savepoint makes the pair atomic.
pub(super) fn take_interrupted(conn: &Connection) -> Result<Vec<Interrupted>, StoreError> {
    let jobs = conn
        .prepare_cached(
            "SELECT id, model, prompt, max_tokens, caller, created_unix_ms + deadline_ms,
                    temperature, top_p, seed
             FROM jobs WHERE state IN ('queued', 'running') ORDER BY created_unix_ms",
        )?
        .query_map([], |r| {
            Ok(Interrupted {
                id: r.get(0)?,
                model: r.get(1)?,
                prompt: r.get(2)?,
                max_tokens: r.get(3)?,
                caller: r.get(4)?,
                deadline_unix_ms: r.get(5)?,
                sampling: Sampling {
                    temperature: r.get::<_, f64>(6)? as f32,
                    top_p: r.get::<_, f64>(7)? as f32,
                    seed: r.get::<_, i64>(8)? as u64,
                },
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    // Whatever they were doing stopped with the previous process: they wait again.
    conn.prepare_cached(
        "UPDATE jobs SET state = 'queued', node_id = '', tokens = 0
         WHERE state IN ('queued', 'running')",
    )?
    .execute([])?;
    Ok(jobs)
}

pub(super) fn upsert_model(conn: &Connection, m: &ModelEntry) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO models (name, sha256, size, format, added_unix_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![m.name, m.sha256, m.size, m.format, m.added_unix_ms])?;
    Ok(())
}

pub(super) fn insert_token(conn: &Connection, t: &TokenEntry) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO tokens
            (digest, role, label, created_unix_ms, expires_unix_ms, revoked, node_id, max_jobs)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        t.digest.to_hex(),
        t.role.as_str(),
        t.label,
        t.created_unix_ms,
        t.expires_unix_ms,
        t.revoked,
        t.node_id,
        t.max_jobs
    ])?;
    Ok(())
}

pub(super) fn revoke_token(conn: &Connection, digest_hex: &str) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE tokens SET revoked = 1 WHERE digest = ?1")?
        .execute([digest_hex])?;
    Ok(())
}

/// How long past its approval's expiry a used nonce is kept: the approval is refused as expired
/// by then anyway; the margin covers a clock set back a little.
const NONCE_KEEP_MS: u64 = 24 * 3600 * 1000;

/// Records an approval's nonce as used; false if it was used before. Nonces of approvals long
/// expired are dropped here, so the table holds only what could still be replayed.
pub(super) fn use_approval_nonce(
    conn: &Connection,
    nonce: &str,
    action: &str,
    expires_unix_ms: u64,
    now_unix_ms: u64,
) -> Result<bool, StoreError> {
    conn.prepare_cached("DELETE FROM approval_nonces WHERE expires_unix_ms < ?1")?
        .execute(params![now_unix_ms.saturating_sub(NONCE_KEEP_MS)])?;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO approval_nonces (nonce, action, used_unix_ms, expires_unix_ms)
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT(nonce) DO NOTHING",
        )?
        .execute(params![nonce, action, now_unix_ms, expires_unix_ms])?;
    Ok(inserted == 1)
}

pub(super) fn insert_checkpoint(conn: &Connection, cp: &AuditCheckpoint) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO audit_checkpoints (seq, checkpoint, dropped) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![cp.seq, cp.checkpoint, cp.dropped])?;
    Ok(())
}

// --- reads (reader threads) ---

macro_rules! select_jobs {
    ($tail:literal) => {
        concat!(
            "SELECT id, model, state, created_unix_ms, finished_unix_ms, deadline_ms,
                    max_tokens, tokens, node_id, error, timings FROM jobs ",
            $tail
        )
    };
}

/// The job `id`; with a `caller`, only if that caller submitted it (a job of someone else reads
/// as missing).
pub(super) fn get(
    conn: &Connection,
    id: &str,
    caller: Option<&str>,
) -> Result<Option<JobRecord>, StoreError> {
    let row = conn
        .prepare_cached(select_jobs!(
            "WHERE id = ?1 AND (?2 IS NULL OR caller = ?2)"
        ))?
        .query_row(params![id, caller], row_to_raw)
        .optional()?;
    row.map(decode).transpose()
}

/// The newest `limit` jobs; with a `caller`, only those it submitted.
pub(super) fn list(
    conn: &Connection,
    limit: u32,
    caller: Option<&str>,
) -> Result<Vec<JobRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(select_jobs!(
        "WHERE (?2 IS NULL OR caller = ?2) ORDER BY created_unix_ms DESC LIMIT ?1"
    ))?;
    let rows = stmt.query_map(params![limit, caller], row_to_raw)?;
    rows.map(|r| decode(r?)).collect()
}

pub(super) fn list_models(conn: &Connection) -> Result<Vec<ModelEntry>, StoreError> {
    let mut stmt = conn.prepare_cached(
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

pub(super) fn load_tokens(conn: &Connection) -> Result<Vec<TokenEntry>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT digest, role, label, created_unix_ms, expires_unix_ms, revoked, node_id, max_jobs
         FROM tokens",
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
            r.get::<_, u32>(7)?,
        ))
    })?;
    rows.map(|r| {
        let (digest, role, label, created, expires, revoked, node_id, max_jobs) = r?;
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
            max_jobs,
        })
    })
    .collect()
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
