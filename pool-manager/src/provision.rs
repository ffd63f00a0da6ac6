//! Model provisioning: a pool told to serve a model it has no file for fetches the file from the
//! queen's catalogue by content hash into `<data-dir>/models/<sha256>.gguf`. The bytes are
//! size-checked as they arrive and SHA-256-verified before the file gets its final name, so no
//! worker ever loads a file that differs from the catalogue's; a mismatch is deleted, audited
//! (`model.hash_mismatch`) and fetched again, a few times at most.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use skep_audit::{Fields, events};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::audit::Audit;
use crate::membership::{Credentials, Membership, MembershipError};

/// Fetches of one model before the pool gives up.
const ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("model {0:?} is not in the queen's catalogue; add it with `skep model add {0} FILE`")]
    Unknown(String),
    #[error(
        "model {name:?}: {attempts} transfers did not match the catalogue (size {size}, SHA-256 \
         {sha256}); last: {last}. The queen's copy may be damaged: add the model again"
    )]
    Mismatch {
        name: String,
        sha256: String,
        size: u64,
        attempts: u32,
        last: String,
    },
    #[error("fetching model: {0}")]
    Queen(#[from] tonic::Status),
    #[error("model file: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Membership(#[from] MembershipError),
}

/// Content hashes of the model files this pool holds (for heartbeats).
pub fn held(models_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(models_dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let sha = name.strip_suffix(".gguf")?;
            (sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                .then(|| sha.to_owned())
        })
        .collect();
    out.sort();
    out
}

/// The local path of catalogue model `name`, fetching and verifying it first if needed.
pub async fn ensure(
    member: &Membership,
    creds: &Credentials,
    name: &str,
    models_dir: &Path,
    audit: &Audit,
) -> Result<PathBuf, ProvisionError> {
    skep_common::daemon::create_private_dir(models_dir)?;
    let mut client = member.models_client(creds).await?;
    let catalogue = client
        .list(skep_proto::v1::ListModelsRequest {})
        .await?
        .into_inner()
        .models;
    let entry = catalogue
        .into_iter()
        .find(|m| m.name == name)
        .ok_or_else(|| ProvisionError::Unknown(name.to_owned()))?;
    let path = models_dir.join(format!("{}.gguf", entry.sha256));
    if path.exists() {
        info!(model = name, sha256 = %entry.sha256, "model already held");
        return Ok(path);
    }
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        match fetch(&mut client, &entry, models_dir).await? {
            Ok(tmp) => {
                tokio::fs::rename(&tmp, &path).await?;
                info!(model = name, sha256 = %entry.sha256, bytes = entry.size, "model fetched and verified");
                return Ok(path);
            }
            Err(why) => {
                warn!(model = name, attempt, reason = %why, "model transfer rejected");
                let fields = Fields::new()
                    .model(name)
                    .str("sha256", &entry.sha256)
                    .reason(&why);
                audit.record(events::MODEL_HASH_MISMATCH, events::ACTOR_SYSTEM, fields);
                last = why;
            }
        }
    }
    Err(ProvisionError::Mismatch {
        name: name.to_owned(),
        sha256: entry.sha256,
        size: entry.size,
        attempts: ATTEMPTS,
        last,
    })
}

/// One transfer into a temp file: `Ok(Ok(path))` when it matches, `Ok(Err(why))` when it does
/// not (the temp file is then gone).
async fn fetch(
    client: &mut crate::membership::ModelsClient,
    entry: &skep_proto::v1::ModelInfo,
    dir: &Path,
) -> Result<Result<PathBuf, String>, ProvisionError> {
    let tmp = dir.join(format!(".partial-{}", entry.sha256));
    let result = async {
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut stream = client
            .fetch(skep_proto::v1::FetchModelRequest {
                sha256: entry.sha256.clone(),
            })
            .await?
            .into_inner();
        let (mut hasher, mut got) = (Sha256::new(), 0u64);
        while let Some(chunk) = stream.message().await? {
            got += chunk.data.len() as u64;
            if got > entry.size {
                return Ok(Err(format!(
                    "more than the catalogue's {} bytes",
                    entry.size
                )));
            }
            hasher.update(&chunk.data);
            file.write_all(&chunk.data).await?;
        }
        if got != entry.size {
            return Ok(Err(format!("{got} bytes, catalogue says {}", entry.size)));
        }
        let sha = hex::encode(hasher.finalize());
        if sha != entry.sha256 {
            return Ok(Err(format!(
                "SHA-256 {sha}, catalogue says {}",
                entry.sha256
            )));
        }
        file.sync_all().await?;
        Ok::<_, ProvisionError>(Ok(tmp.clone()))
    }
    .await;
    if !matches!(result, Ok(Ok(_))) {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}
