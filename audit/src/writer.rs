//! The audit writer: appends signed, chained entries to the newest file of a log directory,
//! rotates files by size, applies the fsync policy, and on open resumes the chain where it
//! stopped (cutting off, and recording, a line torn by a crash).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::entry::{self, Head, encode, parse, sha256_hex};
use crate::events::{ACTOR_SYSTEM, AUDIT_TORN_TAIL};
use crate::files::{file_name, numbered_files};
use crate::{AuditError, AuditKey, Checkpoint, Fields, MAX_LINE_BYTES};

/// When appended entries are forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// `fdatasync` after every entry: an acknowledged entry survives power loss. The default.
    EveryEntry,
    /// `fdatasync` after every `n` entries (0 counts as 1), on rotation, `sync` and drop: up to
    /// `n - 1` acknowledged entries can be lost to a power cut (not to a process crash).
    Batch(u32),
    /// Never `fdatasync`; the OS writes back when it likes. For tests and benchmarks.
    Never,
}

/// How an `AuditLog` writes.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// A new file is started when the next entry would take the current one past this size. A
    /// file always holds at least one entry, whatever this says.
    pub max_file_bytes: u64,
    pub fsync: FsyncPolicy,
}

impl Default for AuditOptions {
    fn default() -> AuditOptions {
        AuditOptions {
            max_file_bytes: 64 * 1024 * 1024,
            fsync: FsyncPolicy::EveryEntry,
        }
    }
}

/// The writer of one audit log directory. One writer per directory: two would fork the chain.
pub struct AuditLog {
    dir: PathBuf,
    key: AuditKey,
    kid: String,
    opts: AuditOptions,
    file: File,
    path: PathBuf,
    number: u64,
    len: u64,
    head: Head,
    unsynced: u32,
    poisoned: bool,
}

// === impl AuditLog ===

impl AuditLog {
    /// Opens (creating it 0700 if needed) the log in `dir` and resumes its chain from the last
    /// entry of the newest file, after checking that entry's MAC with `key`. A torn final line is
    /// truncated away and an `audit.torn_tail` entry records its offset, length and hash.
    pub fn open(dir: &Path, key: AuditKey, opts: AuditOptions) -> Result<AuditLog, AuditError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(AuditError::io(dir))?;
        let kid = key.id();
        let files = numbered_files(dir)?;
        let Some((number, path)) = files.last().cloned() else {
            let path = dir.join(file_name(1));
            let file = create_file(&path)?;
            sync_dir(dir, opts.fsync)?;
            return Ok(AuditLog {
                dir: dir.to_owned(),
                key,
                kid,
                opts,
                file,
                path,
                number: 1,
                len: 0,
                head: Head::genesis(),
                unsynced: 0,
                poisoned: false,
            });
        };

        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(AuditError::io(&path))?;
        let scan = scan_tail(&mut file, &path, true)?;
        let mut head = match &scan.last {
            Some(line) => resume_point(line, &key, &path)?,
            None => Head::genesis(),
        };
        if scan.last.is_none() {
            // The newest file holds no entry yet (a crash right after rotation): the chain
            // continues from the last entry of the newest earlier file that has one.
            for (_, older) in files.iter().rev().skip(1) {
                let mut f = File::open(older).map_err(AuditError::io(older))?;
                let s = scan_tail(&mut f, older, false)?;
                if let Some(line) = &s.last {
                    head = resume_point(line, &key, older)?;
                    break;
                }
            }
        }
        let mut len = file.metadata().map_err(AuditError::io(&path))?.len();
        let mut torn = None;
        if let Some(start) = scan.torn_from {
            let bytes = read_range(&mut file, &path, start, len)?;
            file.set_len(start).map_err(AuditError::io(&path))?;
            file.sync_data().map_err(AuditError::io(&path))?;
            tracing::warn!(
                file = %path.display(), offset = start, bytes = bytes.len(),
                "audit log ended in a torn line; truncated it"
            );
            torn = Some((start, bytes));
            len = start;
        }
        let mut log = AuditLog {
            dir: dir.to_owned(),
            key,
            kid,
            opts,
            file,
            path,
            number,
            len,
            head,
            unsynced: 0,
            poisoned: false,
        };
        if let Some((offset, bytes)) = torn {
            let name = file_name(log.number);
            log.append(
                AUDIT_TORN_TAIL,
                ACTOR_SYSTEM,
                Fields::new()
                    .str("file", &name)
                    .num("offset", offset)
                    .num("bytes", bytes.len() as u64)
                    .str("sha256", &sha256_hex(&bytes)),
            )?;
        }
        Ok(log)
    }

    /// Appends one entry and returns its sequence number. `event` is an event type
    /// (`events::*`), `actor` a token fingerprint, node id or `system`; `fields` must not hold raw
    /// prompts or tokens (use `Fields::prompt` / `Fields::token`), and such fields are refused.
    /// On error nothing was appended and the chain is unchanged.
    pub fn append(
        &mut self,
        event: &str,
        actor: &str,
        fields: impl Into<Map<String, Value>>,
    ) -> Result<u64, AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned);
        }
        let fields = fields.into();
        entry::check_event(event)?;
        entry::check_actor(actor)?;
        entry::check_fields(&fields)?;
        let seq = self
            .head
            .seq
            .checked_add(1)
            .ok_or(AuditError::SeqExhausted)?;
        let ts = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let (line, hash) = encode(
            seq,
            &ts,
            event,
            actor,
            &fields,
            &self.kid,
            &self.head.hash,
            |body| self.key.mac_hex(body),
        )?;
        if self.len > 0 && self.len + line.len() as u64 > self.opts.max_file_bytes {
            self.rotate()?;
        }
        // One write per entry and no user-space buffer: a process crash leaves whole lines, or
        // at worst one torn last line, which `open` repairs.
        if let Err(source) = self.file.write_all(&line) {
            // Undo a partial write so the chain on disk stays what `head` says.
            if self.file.set_len(self.len).is_err() {
                self.poisoned = true;
            }
            return Err(AuditError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.len += line.len() as u64;
        self.head = Head { seq, hash };
        self.unsynced += 1;
        let due = match self.opts.fsync {
            FsyncPolicy::EveryEntry => true,
            FsyncPolicy::Batch(n) => self.unsynced >= n.max(1),
            FsyncPolicy::Never => false,
        };
        if due {
            self.sync()?;
        }
        Ok(seq)
    }

    /// A signed checkpoint of the current head, to be stored apart from the log. Entries are in
    /// the OS once `append` returns; with `Batch` or `Never`, call `sync` first if the
    /// checkpoint must not run ahead of what survives a power cut.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint::sign(&self.key, self.head.seq, &self.head.hash)
    }

    /// Forces appended entries to stable storage.
    pub fn sync(&mut self) -> Result<(), AuditError> {
        self.file.sync_data().map_err(AuditError::io(&self.path))?;
        self.unsynced = 0;
        Ok(())
    }

    /// Sequence number and hash of the last entry.
    pub fn head(&self) -> &Head {
        &self.head
    }

    /// The file entries currently go to.
    pub fn current_file(&self) -> &Path {
        &self.path
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        if self.opts.fsync != FsyncPolicy::Never {
            self.sync()?;
        }
        let number = self.number + 1;
        let path = self.dir.join(file_name(number));
        let file = create_file(&path)?;
        sync_dir(&self.dir, self.opts.fsync)?;
        self.file = file;
        self.path = path;
        self.number = number;
        self.len = 0;
        self.unsynced = 0;
        Ok(())
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        if self.unsynced > 0 && self.opts.fsync != FsyncPolicy::Never {
            let _ = self.file.sync_data();
        }
    }
}

/// What the end of a file looks like.
struct TailScan {
    /// The last complete, parseable line (without `\n`).
    last: Option<Vec<u8>>,
    /// Where a torn tail starts, if the file ends in one.
    torn_from: Option<u64>,
}

/// Finds the last entry of a file and, if `allow_torn`, a torn tail after it: bytes after the
/// last `\n`, or a final terminated line that does not parse (a crash can leave zero-filled
/// blocks). Anything worse is `Corrupt`: the writer does not continue a chain it cannot vouch for.
fn scan_tail(file: &mut File, path: &Path, allow_torn: bool) -> Result<TailScan, AuditError> {
    let corrupt = |detail: &str| AuditError::Corrupt {
        path: path.to_owned(),
        detail: detail.to_owned(),
    };
    let len = file.metadata().map_err(AuditError::io(path))?.len();
    let complete_end = match last_newline_before(file, path, len)? {
        Some(nl) => nl + 1,
        None if len == 0 => 0,
        None if len as usize <= 2 * MAX_LINE_BYTES => 0,
        None => return Err(corrupt("the last line is longer than any audit entry")),
    };
    let mut torn_from = (complete_end < len).then_some(complete_end);
    if torn_from.is_some() && !allow_torn {
        return Err(corrupt("an older file ends in a torn line"));
    }
    let mut end = complete_end;
    while end > 0 {
        let start = last_newline_before(file, path, end - 1)?.map_or(0, |nl| nl + 1);
        if (end - 1 - start) as usize > MAX_LINE_BYTES {
            return Err(corrupt("a line is longer than any audit entry"));
        }
        let line = read_range(file, path, start, end - 1)?;
        if parse(&line).is_ok() {
            return Ok(TailScan {
                last: Some(line),
                torn_from,
            });
        }
        // Only the single last line may be torn; a second bad line is damage, not a crash.
        if torn_from.is_some() || !allow_torn {
            return Err(corrupt("the last line is not a valid audit entry"));
        }
        torn_from = Some(start);
        end = start;
    }
    Ok(TailScan {
        last: None,
        torn_from,
    })
}

/// Offset of the last `\n` in `[end - 2 * MAX_LINE_BYTES, end)`, if any.
fn last_newline_before(file: &mut File, path: &Path, end: u64) -> Result<Option<u64>, AuditError> {
    let start = end.saturating_sub(2 * MAX_LINE_BYTES as u64);
    let buf = read_range(file, path, start, end)?;
    Ok(buf
        .iter()
        .rposition(|&b| b == b'\n')
        .map(|i| start + i as u64))
}

fn read_range(file: &mut File, path: &Path, start: u64, end: u64) -> Result<Vec<u8>, AuditError> {
    let mut buf = Vec::with_capacity(end.saturating_sub(start) as usize);
    file.seek(SeekFrom::Start(start))
        .map_err(AuditError::io(path))?;
    Read::by_ref(file)
        .take(end.saturating_sub(start))
        .read_to_end(&mut buf)
        .map_err(AuditError::io(path))?;
    Ok(buf)
}

/// The head to continue from: the given last line, which must carry a valid MAC under `key`.
fn resume_point(line: &[u8], key: &AuditKey, path: &Path) -> Result<Head, AuditError> {
    let p = parse(line).map_err(|detail| AuditError::Corrupt {
        path: path.to_owned(),
        detail,
    })?;
    if p.entry.kid != key.id() || !key.mac_ok(&p.body, &p.entry.mac) {
        return Err(AuditError::Corrupt {
            path: path.to_owned(),
            detail: format!(
                "the last entry (seq {}) is not signed by this key; refusing to extend it",
                p.entry.seq
            ),
        });
    }
    Ok(Head {
        seq: p.entry.seq,
        hash: p.hash,
    })
}

fn create_file(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(AuditError::io(path))
}

/// Makes a new file's directory entry durable, so a rotation cannot vanish in a power cut.
fn sync_dir(dir: &Path, policy: FsyncPolicy) -> Result<(), AuditError> {
    if policy == FsyncPolicy::Never {
        return Ok(());
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(AuditError::io(dir))
}
