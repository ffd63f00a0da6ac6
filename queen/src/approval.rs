//! Governed actions at the queen: which actions need an approval credential, which approver keys
//! it trusts, its cluster id (the environment approvals name), and the one check every governed
//! handler calls.
//!
//! An approval never authenticates a call (handlers still require the caller's bearer token and
//! role first) and a bearer token never stands in for an approval (it does not parse as one).
//! Every refusal is audited with its exact reason; the caller gets PERMISSION_DENIED with one
//! message for every reason, so it cannot learn which parts of a credential matched.

use std::path::Path;
use std::sync::Arc;

use skep_approval::{Action, Approval, Expected, PublicKey, SpecHash};
use skep_audit::Fields;
use tracing::info;

use crate::Error;
use crate::audit::{self, AuditHandle};
use crate::model::unix_ms;
use crate::store::StoreHandle;

/// The cluster id file in the queen's data dir: created at first start, never changed.
pub const CLUSTER_ID_FILE: &str = "cluster.id";

/// What the caller is told for any approval that does not hold (the audit has the reason).
const NOT_VALID: &str = "the approval is not valid for this request: it must be signed by a \
     trusted approver key for this action, this exact spec hash and this cluster, unexpired and \
     never used before (the queen's audit log has the reason)";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--require-approval names {0} but no --approver-key is given: nothing could approve it; \
         make a key with `skep approver init --out FILE` and pass --approver-key FILE.pub"
    )]
    NoApprover(String),
    #[error("--require-approval: {0}")]
    Action(skep_approval::FormatError),
    #[error("--approver-key {0}: {1}")]
    Key(String, String),
    #[error("cluster id {0}: {1}")]
    ClusterId(String, String),
}

/// The queen's approval policy; cheap to clone.
#[derive(Clone)]
pub struct Approvals {
    inner: Arc<Inner>,
}

struct Inner {
    cluster_id: String,
    trusted: Vec<PublicKey>,
    required: Vec<Action>,
}

// === impl Approvals ===

impl Approvals {
    /// The policy from the queen's flags: action names and public key files.
    pub fn configure(
        cluster_id: String,
        key_files: &[impl AsRef<Path>],
        required: &[String],
    ) -> Result<Approvals, ConfigError> {
        let required = required
            .iter()
            .map(|a| a.trim().parse::<Action>().map_err(ConfigError::Action))
            .collect::<Result<Vec<_>, _>>()?;
        if key_files.is_empty() && !required.is_empty() {
            let names: Vec<_> = required.iter().map(|a| a.as_str()).collect();
            return Err(ConfigError::NoApprover(names.join(",")));
        }
        let trusted = key_files
            .iter()
            .map(|f| {
                let f = f.as_ref();
                let name = f.display().to_string();
                let text = std::fs::read_to_string(f)
                    .map_err(|e| ConfigError::Key(name.clone(), e.to_string()))?;
                PublicKey::from_text(&text).map_err(|e| ConfigError::Key(name, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for k in &trusted {
            info!(key = %k.fingerprint(), "trusting approver key");
        }
        if !required.is_empty() {
            let names: Vec<_> = required.iter().map(|a| a.as_str()).collect();
            info!(actions = %names.join(","), "approval required");
        }
        Ok(Approvals {
            inner: Arc::new(Inner {
                cluster_id,
                trusted,
                required,
            }),
        })
    }

    /// No action needs approval (tests, and queens started without `--require-approval`).
    pub fn none(cluster_id: String) -> Approvals {
        Approvals {
            inner: Arc::new(Inner {
                cluster_id,
                trusted: Vec::new(),
                required: Vec::new(),
            }),
        }
    }

    pub fn cluster_id(&self) -> &str {
        &self.inner.cluster_id
    }

    pub fn required(&self, action: Action) -> bool {
        self.inner.required.contains(&action)
    }

    /// Checks `presented` (the approval's text) for `action` on `spec`, and uses it up. Call
    /// only where `required(action)`; `actor` is the caller's token fingerprint, for the audit.
    pub async fn check(
        &self,
        action: Action,
        spec: &SpecHash,
        presented: &str,
        actor: &str,
        store: &StoreHandle,
        audit: &AuditHandle,
    ) -> Result<(), Error> {
        let refuse = |reason: &str, key: Option<&PublicKey>, message: String| {
            let mut fields = Fields::new()
                .str("action", action.as_str())
                .str("spec_hash", &spec.to_string())
                .reason(reason);
            if let Some(k) = key {
                fields = fields.str("approver_key", &k.fingerprint());
            }
            audit.record(audit::APPROVAL_REFUSED, actor, fields);
            Error::ApprovalRefused(message)
        };
        if presented.trim().is_empty() {
            return Err(refuse(
                "no approval presented",
                None,
                format!("{action} needs an approval credential here: pass --approval FILE"),
            ));
        }
        let approval = Approval::parse(presented).map_err(|e| {
            refuse(
                &e.to_string(),
                None,
                "the approval is not a skep approval credential (a bearer token or any other \
                 credential cannot stand in for one)"
                    .to_owned(),
            )
        })?;
        let expected = Expected {
            action,
            spec_hash: spec,
            env: &self.inner.cluster_id,
            now_unix_ms: unix_ms(),
        };
        if let Err(why) = approval.verify(&self.inner.trusted, expected) {
            return Err(refuse(
                &why.to_string(),
                Some(&approval.key),
                NOT_VALID.to_owned(),
            ));
        }
        // Recorded durably before the action goes on: a restart cannot make it new again.
        let fresh = store
            .use_approval_nonce(
                approval.claims.nonce_hex(),
                action.as_str(),
                approval.claims.expires_unix_ms,
                expected.now_unix_ms,
            )
            .await?;
        if !fresh {
            return Err(refuse(
                "approval already used",
                Some(&approval.key),
                NOT_VALID.to_owned(),
            ));
        }
        let fields = Fields::new()
            .str("action", action.as_str())
            .str("spec_hash", &spec.to_string())
            .str("approver_key", &approval.key.fingerprint())
            .str("nonce", &approval.claims.nonce_hex());
        audit.record(audit::APPROVAL_USED, actor, fields);
        info!(%action, approver = %approval.key.fingerprint(), "approval accepted");
        Ok(())
    }
}

/// The queen's cluster id: read from `<data-dir>/cluster.id`, created there (random) at first
/// start. It names the environment an approval is valid in, so an approval for one cluster is
/// refused by every other.
pub fn load_or_create_cluster_id(data_dir: &Path) -> Result<String, ConfigError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(CLUSTER_ID_FILE);
    let err = |e: &dyn std::fmt::Display| {
        ConfigError::ClusterId(path.display().to_string(), e.to_string())
    };
    let fresh = format!("skep-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            f.write_all(format!("{fresh}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| err(&e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(&e)),
    }
    let id = std::fs::read_to_string(&path).map_err(|e| err(&e))?;
    let id = id.trim().to_owned();
    skep_approval::check_env(&id).map_err(|e| err(&e))?;
    Ok(id)
}
