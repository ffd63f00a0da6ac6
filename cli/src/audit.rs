//! `skep audit`: verify, tail and search an audit log offline, straight from its files.
//!
//! Exit status of `verify` is a contract for scripts and CI: 0 intact, 1 tampered, 2
//! inconclusive (could not check: unreadable file, wrong or missing key, bad checkpoint).
//! `tail` and `search` exit 0, 2 on a bad argument, 1 when the files cannot be read.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use skep_audit::{AuditKey, Checkpoint, Entry, Verdict};

const USAGE: u8 = 2;
const IO: u8 = 1;

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify the hash chain and, with --key-file, every MAC. Exit 0 intact, 1 tampered,
    /// 2 inconclusive.
    Verify {
        /// Print the verdict as one JSON object.
        #[arg(long)]
        json: bool,
        /// The audit key file (mode 0600). Without it only the chain is checked, not the MACs.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// A checkpoint to check the log against: a JSON object, or a file holding one.
        #[arg(long)]
        checkpoint: Option<String>,
        /// Audit files in chain order, or a log directory.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print the last entries.
    Tail {
        /// How many entries.
        #[arg(short = 'n', long, default_value_t = 20)]
        n: usize,
        /// Print entries as JSON lines.
        #[arg(long)]
        json: bool,
        /// Audit files in chain order, or a log directory.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Print the entries matching every given filter.
    Search {
        /// Event type, e.g. auth.failure.
        #[arg(long)]
        event: Option<String>,
        /// Actor: token fingerprint, node id or `system`.
        #[arg(long)]
        actor: Option<String>,
        /// Job id (the `job_id` field).
        #[arg(long)]
        job: Option<String>,
        /// Not before: RFC 3339 time (2025-10-10T16:00:00Z) or a duration ago (1h, 30m).
        #[arg(long)]
        since: Option<String>,
        /// Not after: RFC 3339 time or a duration ago.
        #[arg(long)]
        until: Option<String>,
        /// Print entries as JSON lines.
        #[arg(long)]
        json: bool,
        /// Audit files in chain order, or a log directory.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

pub fn run(cmd: AuditCommand) -> ExitCode {
    match cmd {
        AuditCommand::Verify {
            json,
            key_file,
            checkpoint,
            paths,
        } => verify(json, key_file, checkpoint, &paths),
        AuditCommand::Tail { n, json, paths } => tail(n, json, &paths),
        AuditCommand::Search {
            event,
            actor,
            job,
            since,
            until,
            json,
            paths,
        } => {
            let since = match since.as_deref().map(parse_time).transpose() {
                Ok(t) => t,
                Err(e) => return fail(USAGE, &format!("--since: {e}")),
            };
            let until = match until.as_deref().map(parse_time).transpose() {
                Ok(t) => t,
                Err(e) => return fail(USAGE, &format!("--until: {e}")),
            };
            let filter = Filter {
                event,
                actor,
                job,
                since,
                until,
            };
            search(&filter, json, &paths)
        }
    }
}

fn verify(
    json: bool,
    key_file: Option<PathBuf>,
    checkpoint: Option<String>,
    paths: &[PathBuf],
) -> ExitCode {
    let verdict = match (load_key(key_file), load_checkpoint(checkpoint)) {
        (Err(reason), _) | (_, Err(reason)) => Verdict::Inconclusive { reason },
        (Ok(key), Ok(cp)) => skep_audit::verify(paths, key.as_ref(), cp.as_ref()),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&verdict).unwrap_or_else(|_| "{}".into())
        );
    } else {
        print_verdict(&verdict);
    }
    ExitCode::from(verdict.exit_code())
}

fn load_key(path: Option<PathBuf>) -> Result<Option<AuditKey>, String> {
    path.map(|p| AuditKey::from_file(&p).map_err(|e| e.to_string()))
        .transpose()
}

fn load_checkpoint(arg: Option<String>) -> Result<Option<Checkpoint>, String> {
    let Some(arg) = arg else {
        return Ok(None);
    };
    let text = if arg.trim_start().starts_with('{') {
        arg
    } else {
        std::fs::read_to_string(&arg).map_err(|e| format!("cannot read checkpoint {arg}: {e}"))?
    };
    Checkpoint::from_json(text.trim())
        .map(Some)
        .map_err(|e| format!("invalid checkpoint: {e}"))
}

fn print_verdict(v: &Verdict) {
    match v {
        Verdict::Intact {
            entries,
            files,
            head,
            authenticated,
            checkpoint_matched,
            torn_tail,
        } => {
            println!(
                "intact: {entries} entries in {files} file(s), head seq {} ({})",
                head.seq, head.hash
            );
            if *checkpoint_matched {
                println!("checkpoint matched");
            }
            if let Some(t) = torn_tail {
                println!(
                    "note: torn final line at {}:{} ({} bytes): a crash mid-write, not tampering",
                    t.file.display(),
                    t.line,
                    t.bytes
                );
            }
            if !*authenticated {
                eprintln!(
                    "warning: no --key-file, MACs not checked: the chain is consistent, but anyone could have rewritten it whole"
                );
            }
        }
        Verdict::Tampered {
            seq,
            kind,
            file,
            line,
            detail,
        } => {
            let kind = serde_json::to_value(kind)
                .ok()
                .and_then(|k| k.as_str().map(str::to_owned))
                .unwrap_or_default();
            println!(
                "TAMPERED at seq {seq} ({kind}), {}:{line}: {detail}",
                file.display()
            );
        }
        Verdict::Inconclusive { reason } => println!("inconclusive: {reason}"),
    }
}

fn tail(n: usize, json: bool, paths: &[PathBuf]) -> ExitCode {
    let entries = match skep_audit::read_entries(paths) {
        Ok(it) => it,
        Err(e) => return fail(IO, &e.to_string()),
    };
    let mut last = VecDeque::with_capacity(n.min(4096));
    for r in entries {
        match r {
            Ok((_, _, e)) => {
                if last.len() == n {
                    last.pop_front();
                }
                if n > 0 {
                    last.push_back(e);
                }
            }
            Err(why) => eprintln!("skipping unreadable line: {why}"),
        }
    }
    for e in &last {
        print_entry(e, json);
    }
    ExitCode::SUCCESS
}

struct Filter {
    event: Option<String>,
    actor: Option<String>,
    job: Option<String>,
    since: Option<SystemTime>,
    until: Option<SystemTime>,
}

impl Filter {
    fn matches(&self, e: &Entry) -> bool {
        let eq = |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| w == got);
        let job = e
            .fields
            .get(skep_audit::events::field::JOB_ID)
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if !(eq(&self.event, &e.event) && eq(&self.actor, &e.actor) && eq(&self.job, job)) {
            return false;
        }
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        // An entry whose time does not parse cannot be placed in a window.
        let Ok(ts) = humantime::parse_rfc3339_weak(&e.ts) else {
            return false;
        };
        self.since.is_none_or(|s| ts >= s) && self.until.is_none_or(|u| ts <= u)
    }
}

fn search(filter: &Filter, json: bool, paths: &[PathBuf]) -> ExitCode {
    let entries = match skep_audit::read_entries(paths) {
        Ok(it) => it,
        Err(e) => return fail(IO, &e.to_string()),
    };
    for r in entries {
        match r {
            Ok((_, _, e)) if filter.matches(&e) => print_entry(&e, json),
            Ok(_) => {}
            Err(why) => eprintln!("skipping unreadable line: {why}"),
        }
    }
    ExitCode::SUCCESS
}

fn print_entry(e: &Entry, json: bool) {
    if json {
        println!("{}", serde_json::to_string(e).unwrap_or_default());
    } else {
        println!(
            "{:>8} {} {:<24} {:<12} {}",
            e.seq,
            e.ts,
            e.event,
            e.actor,
            serde_json::Value::Object(e.fields.clone())
        );
    }
}

/// An RFC 3339 time, or a duration before now (`1h`, `30m`, `2days`).
fn parse_time(s: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    let ago: Duration = humantime::parse_duration(s)
        .map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration"))?;
    SystemTime::now()
        .checked_sub(ago)
        .ok_or_else(|| format!("{s:?} reaches before the epoch"))
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("skep audit: {msg}");
    ExitCode::from(code)
}
