//! The independent verifier: walks the chain through every file, stops at the first entry that
//! does not belong, and classifies what was done to the log (see `docs/AUDIT.md`, "Verdicts").
//!
//! It reads the files and nothing else (no writer state), never panics, and keeps three outcomes
//! apart: intact, tampered (with the first bad sequence number), and inconclusive (it could not
//! look: unreadable file, wrong key, unauthentic checkpoint).

use std::collections::VecDeque;
use std::path::PathBuf;

use serde::Serialize;

use crate::entry::{Head, Parsed, parse};
use crate::files::{Lines, RawLine, expand};
use crate::{AuditError, AuditKey, Checkpoint, GENESIS};

/// How far ahead the verifier looks for a missing sequence number before calling it deleted
/// rather than reordered. Bounds memory on multi-gigabyte logs.
const REORDER_WINDOW: usize = 4096;

/// What was done to the log at the first bad entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TamperKind {
    /// An entry's content changed: its MAC fails, or it no longer hashes to what its successor
    /// (or the checkpoint) recorded, or a line in the middle is not an entry at all.
    Edited,
    /// Sequence numbers are missing and the chain is broken where they were (lines or a whole
    /// file removed).
    Deleted,
    /// A missing sequence number turns up later: entries were moved.
    Reordered,
    /// An extra entry: it duplicates a sequence number, or the chain resumes right after it.
    Inserted,
    /// The log ends before the checkpoint's sequence number.
    Truncated,
    /// The sequence number goes backwards and the log carries on from there.
    CounterRegression,
    /// From here on the entries belong to another chain (another log, or another key), typically
    /// at a file boundary.
    Spliced,
    /// Only the MAC is wrong: the content is exactly what the authenticated successor chained to.
    BadMac,
}

/// A last line cut short by a crash (no `\n`, or not an entry), not counted as an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TornTail {
    pub file: PathBuf,
    pub line: u64,
    pub bytes: usize,
}

/// The verifier's answer. `exit_code` maps it to the CLI's 0 / 1 / 2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Intact {
        /// Entries verified.
        entries: u64,
        files: usize,
        /// The last entry: compare with (or store as) a checkpoint.
        head: Head,
        /// Whether MACs were checked (a key was given). Without, only the chain was.
        authenticated: bool,
        /// Whether a checkpoint was given and matched.
        checkpoint_matched: bool,
        torn_tail: Option<TornTail>,
    },
    Tampered {
        /// The first sequence number that cannot be trusted (see `TamperKind` and docs).
        seq: u64,
        kind: TamperKind,
        file: PathBuf,
        /// 1-based line in `file`.
        line: u64,
        detail: String,
    },
    Inconclusive {
        reason: String,
    },
}

impl Verdict {
    /// 0 intact, 1 tampered, 2 inconclusive.
    pub fn exit_code(&self) -> u8 {
        match self {
            Verdict::Intact { .. } => 0,
            Verdict::Tampered { .. } => 1,
            Verdict::Inconclusive { .. } => 2,
        }
    }

    pub fn is_intact(&self) -> bool {
        matches!(self, Verdict::Intact { .. })
    }
}

/// Verifies the chain through `paths` in order (a directory stands for its audit files in
/// number order). With `key`, every MAC is checked too; with `checkpoint`, the log must reach
/// its sequence number with the same head hash.
pub fn verify(
    paths: &[PathBuf],
    key: Option<&AuditKey>,
    checkpoint: Option<&Checkpoint>,
) -> Verdict {
    let inconclusive = |reason: String| Verdict::Inconclusive { reason };
    let files = match expand(paths) {
        Ok(f) if f.is_empty() => return inconclusive("no audit files to verify".into()),
        Ok(f) => f,
        Err(e) => return inconclusive(e.to_string()),
    };
    if let (Some(k), Some(cp)) = (key, checkpoint)
        && !cp.is_signed_by(k)
    {
        return inconclusive("the checkpoint is not signed by this key".into());
    }
    let lines = match Lines::open(&files) {
        Ok(l) => l,
        Err(e) => return inconclusive(e.to_string()),
    };
    let mut walk = Walk {
        stream: Stream {
            lines,
            buf: VecDeque::new(),
        },
        key,
        kid: key.map(AuditKey::id),
        checkpoint,
        last: None,
        entries: 0,
        hash_at_checkpoint: None,
    };
    match walk.run() {
        Ok(v) => v,
        Err(e) => inconclusive(e.to_string()),
    }
}

/// One line from the files, parsed as far as it goes.
struct Item {
    file: usize,
    line: u64,
    terminated: bool,
    len: usize,
    parsed: Result<Parsed, String>,
}

/// The lines, with a lookahead buffer.
struct Stream {
    lines: Lines,
    buf: VecDeque<Item>,
}

impl Stream {
    fn read(&mut self) -> Result<Option<Item>, AuditError> {
        Ok(self.lines.next_line()?.map(|raw: RawLine| Item {
            file: raw.file,
            line: raw.line,
            terminated: raw.terminated,
            len: raw.bytes.len(),
            parsed: parse(&raw.bytes),
        }))
    }

    fn next(&mut self) -> Result<Option<Item>, AuditError> {
        match self.buf.pop_front() {
            Some(item) => Ok(Some(item)),
            None => self.read(),
        }
    }

    fn peek(&mut self, i: usize) -> Result<Option<&Item>, AuditError> {
        while self.buf.len() <= i {
            match self.read()? {
                Some(item) => self.buf.push_back(item),
                None => return Ok(None),
            }
        }
        Ok(self.buf.get(i))
    }

    /// The next line, if it is a parseable entry.
    fn peek_entry(&mut self) -> Result<Option<&Parsed>, AuditError> {
        Ok(self.peek(0)?.and_then(|i| i.parsed.as_ref().ok()))
    }
}

/// The last verified entry.
struct Last {
    seq: u64,
    hash: String,
    prev: String,
    file: usize,
    line: u64,
}

struct Walk<'a> {
    stream: Stream,
    key: Option<&'a AuditKey>,
    kid: Option<String>,
    checkpoint: Option<&'a Checkpoint>,
    last: Option<Last>,
    entries: u64,
    hash_at_checkpoint: Option<String>,
}

/// A finding before it is placed in a file.
struct Finding {
    seq: u64,
    kind: TamperKind,
    /// `None`: the current line; `Some`: the last verified entry's line.
    at_last: bool,
    detail: String,
}

fn finding(seq: u64, kind: TamperKind, detail: String) -> Option<Finding> {
    Some(Finding {
        seq,
        kind,
        at_last: false,
        detail,
    })
}

impl Walk<'_> {
    fn run(&mut self) -> Result<Verdict, AuditError> {
        let mut torn_tail = None;
        while let Some(item) = self.stream.next()? {
            let is_last = self.stream.peek(0)?.is_none();
            let e = self.expected();
            let p = match (&item.parsed, item.terminated) {
                (Ok(p), true) => p,
                (parsed, _) if is_last => {
                    // A crash mid-write leaves exactly this: one bad or unterminated last line.
                    let _ = parsed;
                    torn_tail = Some(TornTail {
                        file: self.stream.lines.path(item.file).to_owned(),
                        line: item.line,
                        bytes: item.len,
                    });
                    break;
                }
                (Err(why), _) => {
                    return Ok(self.tampered(&item, e, TamperKind::Edited, false, why.clone()));
                }
                (Ok(_), false) => {
                    return Ok(self.tampered(
                        &item,
                        e,
                        TamperKind::Edited,
                        false,
                        "a line without a newline in the middle of the log".into(),
                    ));
                }
            };
            if let Some(kid) = self.kid.clone()
                && p.entry.kid != kid
            {
                // The next entry carrying our key id means this one line's `kid` was
                // changed, not that the log (or its tail) comes from elsewhere.
                let next_ours = self
                    .stream
                    .peek_entry()?
                    .is_some_and(|n| n.entry.kid == kid);
                if next_ours {
                    let detail = format!(
                        "entry {} carries key id {} between entries signed with {kid}",
                        p.entry.seq, p.entry.kid
                    );
                    return Ok(self.tampered(&item, e, TamperKind::Edited, false, detail));
                }
                if self.last.is_none() {
                    return Ok(Verdict::Inconclusive {
                        reason: format!(
                            "the log is signed with key id {}, the given key is {kid}",
                            p.entry.kid
                        ),
                    });
                }
                let detail = format!(
                    "entry {} is signed with key id {}, the log so far with {kid}",
                    p.entry.seq, p.entry.kid
                );
                return Ok(self.tampered(&item, e, TamperKind::Spliced, false, detail));
            }
            if let Some(f) = self.classify(&item, p)? {
                return Ok(self.tampered(&item, f.seq, f.kind, f.at_last, f.detail));
            }
            if self.checkpoint.is_some_and(|cp| cp.seq == p.entry.seq) {
                self.hash_at_checkpoint = Some(p.hash.clone());
            }
            self.entries += 1;
            self.last = Some(Last {
                seq: p.entry.seq,
                hash: p.hash.clone(),
                prev: p.entry.prev.clone(),
                file: item.file,
                line: item.line,
            });
        }
        Ok(self.finish(torn_tail))
    }

    fn expected(&self) -> u64 {
        self.last.as_ref().map_or(1, |l| l.seq.saturating_add(1))
    }

    fn head_hash(&self) -> &str {
        self.last.as_ref().map_or(GENESIS, |l| &l.hash)
    }

    fn mac_ok(&self, p: &Parsed) -> Option<bool> {
        self.key.map(|k| k.mac_ok(&p.body, &p.entry.mac))
    }

    /// Why the entry `p` at `item` does not belong at the current position, or `None`.
    fn classify(&mut self, item: &Item, p: &Parsed) -> Result<Option<Finding>, AuditError> {
        use TamperKind::*;
        let e = self.expected();
        let h = self.head_hash().to_owned();
        let s = p.entry.seq;
        let chained = p.entry.prev == h;
        let boundary = self.last.as_ref().is_some_and(|l| l.file != item.file);

        // An extra line followed by the entry that really belongs here.
        let next_is_sibling = |n: &Parsed| n.entry.seq == e && n.entry.prev == h;

        if s == e && chained {
            if self.mac_ok(p) != Some(false) {
                return Ok(None);
            }
            let next = self.stream.peek_entry()?;
            return Ok(match next {
                Some(n) if next_is_sibling(n) => finding(
                    s,
                    Inserted,
                    format!("entry {s} fails its MAC and the real entry {s} follows it"),
                ),
                Some(n) if n.entry.seq.checked_sub(1) == Some(s) && n.entry.prev == p.hash => {
                    let n_ok = self.key.is_some_and(|k| k.mac_ok(&n.body, &n.entry.mac));
                    if n_ok {
                        finding(
                            s,
                            BadMac,
                            format!(
                                "entry {s}'s MAC is wrong but its content is what the authenticated entry after it chained to"
                            ),
                        )
                    } else {
                        finding(
                            s,
                            Edited,
                            format!("entry {s} fails its MAC and the chain after it was rewritten"),
                        )
                    }
                }
                None if self
                    .checkpoint
                    .is_some_and(|cp| cp.seq == s && cp.head == p.hash) =>
                {
                    finding(
                        s,
                        BadMac,
                        format!("entry {s}'s MAC is wrong but its content matches the checkpoint"),
                    )
                }
                _ => finding(s, Edited, format!("entry {s} fails its MAC")),
            });
        }

        if s == e {
            // The counter is right but the chain is not.
            if self.stream.peek_entry()?.is_some_and(next_is_sibling) {
                return Ok(finding(
                    s,
                    Inserted,
                    format!("an extra entry claiming seq {s}; the real one follows it"),
                ));
            }
            if self.last.is_none() {
                return Ok(finding(
                    s,
                    Edited,
                    "the first entry does not start from the genesis hash".into(),
                ));
            }
            if boundary {
                return Ok(finding(
                    s,
                    Spliced,
                    format!(
                        "this file does not continue the chain of the previous file at seq {s}"
                    ),
                ));
            }
            return Ok(match self.mac_ok(p) {
                Some(true) => finding(
                    s,
                    Spliced,
                    format!("entry {s} is authentic but belongs to another chain"),
                ),
                Some(false) => finding(
                    s,
                    Edited,
                    format!(
                        "entry {s} fails its MAC and does not chain to entry {}",
                        s - 1
                    ),
                ),
                // Without the key, an edit of entry s-1 and an edit of this `prev` look the
                // same; the earlier entry is the one named.
                None => Some(Finding {
                    seq: s - 1,
                    kind: Edited,
                    at_last: true,
                    detail: format!(
                        "entry {} no longer hashes to what entry {s} recorded",
                        s - 1
                    ),
                }),
            });
        }

        if s > e {
            if chained {
                return Ok(finding(
                    e,
                    Edited,
                    format!("entry {e} chains correctly but claims seq {s}"),
                ));
            }
            for i in 0..REORDER_WINDOW {
                let Some(ahead) = self.stream.peek(i)? else {
                    break;
                };
                if ahead.parsed.as_ref().is_ok_and(|a| a.entry.seq == e) {
                    return Ok(finding(
                        e,
                        Reordered,
                        format!("entry {e} is missing here (found {s}) but appears later"),
                    ));
                }
            }
            let whole_file = if boundary {
                " (at a file boundary: a file may be missing)"
            } else {
                ""
            };
            let missing = if s - 1 == e {
                format!("entry {e} is")
            } else {
                format!("entries {e}..={} are", s - 1)
            };
            return Ok(finding(
                e,
                Deleted,
                format!("{missing} missing and the chain is broken{whole_file}"),
            ));
        }

        // s < e: the counter went backwards.
        if self
            .last
            .as_ref()
            .is_some_and(|l| l.seq == s && l.prev == p.entry.prev)
        {
            return Ok(finding(
                s,
                Inserted,
                format!("two entries claim seq {s} on the same predecessor"),
            ));
        }
        if self.stream.peek_entry()?.is_some_and(next_is_sibling) {
            return Ok(finding(
                s,
                Inserted,
                format!("an extra entry claiming seq {s} before entry {e}"),
            ));
        }
        if chained {
            return Ok(finding(
                e,
                CounterRegression,
                format!(
                    "entry claims seq {s} after seq {}: the counter went backwards",
                    e - 1
                ),
            ));
        }
        if s == 1 && p.entry.prev == GENESIS {
            return Ok(finding(
                e,
                CounterRegression,
                format!("a new chain starts from genesis after seq {}", e - 1),
            ));
        }
        if boundary {
            return Ok(finding(
                e,
                Spliced,
                format!("this file starts at seq {s}, which does not continue the previous file"),
            ));
        }
        Ok(finding(
            e,
            CounterRegression,
            format!("seq goes back from {} to {s}", e - 1),
        ))
    }

    fn tampered(
        &self,
        item: &Item,
        seq: u64,
        kind: TamperKind,
        at_last: bool,
        detail: String,
    ) -> Verdict {
        let (file, line) = match (&self.last, at_last) {
            (Some(l), true) => (l.file, l.line),
            _ => (item.file, item.line),
        };
        Verdict::Tampered {
            seq,
            kind,
            file: self.stream.lines.path(file).to_owned(),
            line,
            detail,
        }
    }

    fn finish(&self, torn_tail: Option<TornTail>) -> Verdict {
        let head = match &self.last {
            Some(l) => Head {
                seq: l.seq,
                hash: l.hash.clone(),
            },
            None => Head::genesis(),
        };
        let mut checkpoint_matched = false;
        if let Some(cp) = self.checkpoint {
            let (file, line) = self.end_position();
            if cp.seq > head.seq {
                return Verdict::Tampered {
                    seq: head.seq + 1,
                    kind: TamperKind::Truncated,
                    file,
                    line,
                    detail: format!(
                        "the log ends at seq {} but the checkpoint records seq {}",
                        head.seq, cp.seq
                    ),
                };
            }
            let recorded = if cp.seq == 0 {
                Some(GENESIS)
            } else {
                self.hash_at_checkpoint.as_deref()
            };
            if recorded != Some(cp.head.as_str()) {
                return Verdict::Tampered {
                    seq: cp.seq,
                    kind: TamperKind::Edited,
                    file,
                    line,
                    detail: format!(
                        "entry {} does not hash to the checkpoint's head: the log was rewritten up to or before it",
                        cp.seq
                    ),
                };
            }
            checkpoint_matched = true;
        }
        Verdict::Intact {
            entries: self.entries,
            files: self.stream.lines.file_count(),
            head,
            authenticated: self.key.is_some(),
            checkpoint_matched,
            torn_tail,
        }
    }

    /// Where a missing tail would have been: after the last verified entry.
    fn end_position(&self) -> (PathBuf, u64) {
        match &self.last {
            Some(l) => (self.stream.lines.path(l.file).to_owned(), l.line + 1),
            None => (self.stream.lines.path(0).to_owned(), 1),
        }
    }
}
