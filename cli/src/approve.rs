//! `skep approver init` and `skep approve`: approver keys and the approval credentials they sign,
//! offline (no queen, no token). Reading an approval file to present it lives here too.
//!
//! The private key is a 0600 file read and written only through `Secret` (zeroized, no `Debug`);
//! it never passes through argv or the environment. See docs/APPROVALS.md.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use skep_approval::{Action, Approval, Claims, MAX_APPROVAL_LEN, MAX_TTL_MS, SigningKey, SpecHash};
use skep_common::secret::Secret;

use crate::exit::Failure;

#[derive(Subcommand, Debug)]
pub enum ApproverCommand {
    /// Make an Ed25519 approver key pair: FILE (private, 0600) and FILE.pub (give the queen
    /// `--approver-key FILE.pub`).
    Init {
        #[arg(long)]
        out: PathBuf,
    },
}

/// `skep approve ACTION ...`: the arguments of one approval.
#[derive(clap::Args, Debug)]
pub struct ApproveArgs {
    /// model.add, node.enroll or token.revoke_last_admin.
    action: String,
    /// What is approved, as sha256:HEX: for model.add the SHA-256 of the model file; for
    /// node.enroll of the node's name; for token.revoke_last_admin of the token's fingerprint.
    #[arg(long)]
    spec_hash: String,
    /// The queen's cluster id (`skep cluster id`).
    #[arg(long)]
    env: String,
    /// How long the approval stays valid (e.g. 1h; at most 30d).
    #[arg(long, value_parser = crate::parse_duration)]
    ttl: Duration,
    /// The approver's private key file (from `skep approver init`).
    #[arg(long)]
    key: PathBuf,
    /// Write the approval to this new file.
    #[arg(long)]
    out: PathBuf,
}

pub fn init(command: ApproverCommand) -> ExitCode {
    let ApproverCommand::Init { out } = command;
    match write_key_pair(&out) {
        Ok(public) => {
            eprintln!(
                "approver key {} written to {} (private, 0600) and {}",
                public.fingerprint(),
                out.display(),
                pub_path(&out).display()
            );
            ExitCode::SUCCESS
        }
        Err(f) => f.report(),
    }
}

pub fn approve(args: ApproveArgs) -> ExitCode {
    match sign(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.report(),
    }
}

/// The approval at `path`, to send with a governed request (empty: none given).
pub fn read_approval(path: Option<&Path>) -> Result<String, Failure> {
    let Some(path) = path else {
        return Ok(String::new());
    };
    let meta = std::fs::metadata(path)
        .map_err(|e| Failure::usage(format!("--approval {}: {e}", path.display())))?;
    if meta.len() > MAX_APPROVAL_LEN as u64 {
        return Err(Failure::usage(format!(
            "--approval {}: too large for an approval credential",
            path.display()
        )));
    }
    std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("--approval {}: {e}", path.display())))
}

fn pub_path(private: &Path) -> PathBuf {
    let mut p = private.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

fn write_key_pair(out: &Path) -> Result<skep_approval::PublicKey, Failure> {
    let key = SigningKey::generate().map_err(|e| Failure::other(e.to_string()))?;
    let public = key.public();
    let pub_file = pub_path(out);
    if pub_file.exists() {
        return Err(Failure::usage(format!(
            "{} already exists; not overwriting",
            pub_file.display()
        )));
    }
    let text = key.to_text();
    Secret::from_string(text.trim().to_owned())
        .write_new(out)
        .map_err(|e| Failure::usage(e.to_string()))?;
    std::fs::write(&pub_file, public.to_text())
        .map_err(|e| Failure::other(format!("{}: {e}", pub_file.display())))?;
    Ok(public)
}

fn sign(args: ApproveArgs) -> Result<(), Failure> {
    let action: Action = args
        .action
        .parse()
        .map_err(|e: skep_approval::FormatError| Failure::usage(e.to_string()))?;
    let spec: SpecHash = args
        .spec_hash
        .parse()
        .map_err(|e: skep_approval::FormatError| Failure::usage(e.to_string()))?;
    let ttl_ms = u64::try_from(args.ttl.as_millis()).unwrap_or(u64::MAX);
    if ttl_ms > MAX_TTL_MS {
        return Err(Failure::usage("--ttl must be at most 30d"));
    }
    let secret = Secret::from_file(&args.key).map_err(|e| Failure::usage(e.to_string()))?;
    let key = SigningKey::from_text(secret.expose())
        .map_err(|e| Failure::usage(format!("--key {}: {e}", args.key.display())))?;
    drop(secret);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let claims = Claims::new(action, spec, &args.env, now.saturating_add(ttl_ms))
        .map_err(|e| Failure::usage(format!("--env: {e}")))?;
    let approval = Approval::sign(claims, &key);
    // Single use and bound to one spec: not a secret like a token, but still kept private.
    Secret::from_string(approval.to_text())
        .write_new(&args.out)
        .map_err(|e| Failure::usage(e.to_string()))?;
    eprintln!(
        "approval for {action} on {spec} in {} written to {} (valid {}, usable once)",
        args.env,
        args.out.display(),
        humantime::format_duration(args.ttl)
    );
    Ok(())
}
