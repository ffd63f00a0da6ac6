//! Audit file names, directory listing and the bounded line reader the verifier and the CLI share.
//!
//! A log is a directory of `audit-NNNNNN.jsonl` files numbered from 1; the chain runs through
//! them in number order. Lines are read with a hard length cap, so a file of garbage without
//! newlines cannot make a reader allocate without bound.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::entry::parse;
use crate::{AuditError, Entry, MAX_LINE_BYTES};

const PREFIX: &str = "audit-";
const SUFFIX: &str = ".jsonl";

/// The file name of rotation number `n` (`audit-000001.jsonl` for 1).
pub fn file_name(n: u64) -> String {
    format!("{PREFIX}{n:06}{SUFFIX}")
}

/// The rotation number in an audit file name, if it is one.
pub(crate) fn file_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The audit files in `dir`, in chain order (by number, not by name). Other files are ignored.
pub fn audit_files(dir: &Path) -> Result<Vec<PathBuf>, AuditError> {
    Ok(numbered_files(dir)?.into_iter().map(|(_, p)| p).collect())
}

pub(crate) fn numbered_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let mut files = Vec::new();
    for ent in std::fs::read_dir(dir).map_err(AuditError::io(dir))? {
        let ent = ent.map_err(AuditError::io(dir))?;
        let name = ent.file_name();
        if let Some(n) = name.to_str().and_then(file_number) {
            files.push((n, ent.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// Expands directories to their audit files; files are taken as given, in the given order.
pub(crate) fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, AuditError> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            out.extend(audit_files(p)?);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// One raw line: where it is, its bytes without `\n`, and whether it had one.
pub(crate) struct RawLine {
    pub file: usize,
    pub line: u64,
    pub bytes: Vec<u8>,
    pub terminated: bool,
}

/// Reads lines from a sequence of already opened files, at most `MAX_LINE_BYTES + 1` bytes each.
pub(crate) struct Lines {
    files: Vec<(PathBuf, BufReader<File>)>,
    current: usize,
    line: u64,
}

impl Lines {
    /// Opens every file up front so an unreadable one is found before any verdict is formed.
    pub fn open(paths: &[PathBuf]) -> Result<Lines, AuditError> {
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            let f = File::open(p).map_err(AuditError::io(p))?;
            if f.metadata().map_err(AuditError::io(p))?.is_dir() {
                return Err(AuditError::Io {
                    path: p.clone(),
                    source: std::io::Error::other("is a directory"),
                });
            }
            files.push((p.clone(), BufReader::new(f)));
        }
        Ok(Lines {
            files,
            current: 0,
            line: 0,
        })
    }

    pub fn path(&self, file: usize) -> &Path {
        &self.files[file].0
    }

    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// The next line, `Ok(None)` at the end of the last file. A line over the cap comes back
    /// truncated to the cap (and unterminated), which no parser accepts.
    pub fn next_line(&mut self) -> Result<Option<RawLine>, AuditError> {
        while self.current < self.files.len() {
            let (path, reader) = &mut self.files[self.current];
            let mut bytes = Vec::new();
            let n = reader
                .by_ref()
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut bytes)
                .map_err(AuditError::io(path))?;
            if n == 0 {
                self.current += 1;
                self.line = 0;
                continue;
            }
            self.line += 1;
            let terminated = bytes.last() == Some(&b'\n');
            if terminated {
                bytes.pop();
            } else if bytes.len() > MAX_LINE_BYTES {
                // Skip the rest of the oversized line, without buffering it, so the next call
                // starts on a fresh line.
                loop {
                    let buf = reader.fill_buf().map_err(AuditError::io(path))?;
                    if buf.is_empty() {
                        break;
                    }
                    if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                        reader.consume(i + 1);
                        break;
                    }
                    let n = buf.len();
                    reader.consume(n);
                }
            }
            return Ok(Some(RawLine {
                file: self.current,
                line: self.line,
                bytes,
                terminated,
            }));
        }
        Ok(None)
    }
}

/// Every parseable entry in `paths` (directories expanded), for tailing and searching. This does
/// not verify anything; lines that do not parse come back as `Err(description)`.
pub fn read_entries(
    paths: &[PathBuf],
) -> Result<impl Iterator<Item = Result<(PathBuf, u64, Entry), String>>, AuditError> {
    let mut lines = Lines::open(&expand(paths)?)?;
    Ok(std::iter::from_fn(move || {
        let raw = match lines.next_line() {
            Ok(Some(raw)) => raw,
            Ok(None) => return None,
            Err(e) => return Some(Err(e.to_string())),
        };
        let path = lines.path(raw.file).to_owned();
        Some(match parse(&raw.bytes) {
            Ok(p) => Ok((path, raw.line, p.entry)),
            Err(e) => Err(format!("{}:{}: {e}", path.display(), raw.line)),
        })
    }))
}
