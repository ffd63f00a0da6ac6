//! `skep model add|list`: the queen's model catalogue.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use sha2::{Digest, Sha256};
use skep_proto::v1::models_client::ModelsClient;
use skep_proto::v1::{ListModelsRequest, ModelChunk};

use crate::Queen;
use crate::exit::Failure;

/// Bytes per upload message (the queen accepts up to 1 MiB of data per message).
const CHUNK: usize = 1 << 20;

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Register a model file under NAME: uploaded to the queen, which keeps it by SHA-256.
    /// Pools started with `--engine gguf --model NAME` and no file fetch it from there.
    Add {
        name: String,
        file: PathBuf,
        #[arg(long, default_value = "gguf")]
        format: String,
        /// An approval credential for model.add over this file's SHA-256 (`skep approve`),
        /// where the queen requires one.
        #[arg(long)]
        approval: Option<PathBuf>,
    },
    /// List the catalogue.
    List {
        #[arg(long)]
        json: bool,
    },
}

/// SHA-256 and size of a file, read once.
fn digest(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let (mut h, mut size, mut buf) = (Sha256::new(), 0u64, vec![0u8; CHUNK]);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((hex::encode(h.finalize()), size));
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
}

pub async fn run(queen: &Queen, command: ModelCommand) -> Result<(), Failure> {
    let mut client = ModelsClient::new(queen.channel.clone());
    match command {
        ModelCommand::Add {
            name,
            file,
            format,
            approval,
        } => {
            let approval = crate::approve::read_approval(approval.as_deref())?;
            let io = |e: std::io::Error| Failure::usage(format!("{}: {e}", file.display()));
            let (sha256, size) = digest(&file).map_err(io)?;
            eprintln!(
                "uploading {} ({size} bytes, sha256 {sha256})",
                file.display()
            );
            // Stream the file from a blocking reader; the first message carries the metadata.
            let (tx, rx) = tokio::sync::mpsc::channel::<ModelChunk>(4);
            let path = file.clone();
            let (meta_name, meta_sha) = (name.clone(), sha256.clone());
            let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut f = std::fs::File::open(&path)?;
                let mut first = Some((meta_name, format, size, meta_sha, approval));
                loop {
                    let mut buf = vec![0u8; CHUNK];
                    let n = f.read(&mut buf)?;
                    buf.truncate(n);
                    let mut chunk = ModelChunk {
                        data: buf,
                        ..ModelChunk::default()
                    };
                    if let Some((name, format, size, sha256, approval)) = first.take() {
                        (
                            chunk.name,
                            chunk.format,
                            chunk.size,
                            chunk.sha256,
                            chunk.approval,
                        ) = (name, format, size, sha256, approval);
                    } else if n == 0 {
                        return Ok(());
                    }
                    if tx.blocking_send(chunk).is_err() || n == 0 {
                        return Ok(());
                    }
                }
            });
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let added = client.add(queen.request(stream)).await?.into_inner();
            reader
                .await
                .map_err(|e| Failure::other(e.to_string()))?
                .map_err(io)?;
            println!(
                "model {} added: sha256 {} ({} bytes)",
                added.name, added.sha256, added.size
            );
        }
        ModelCommand::List { json } => {
            let list = client
                .list(queen.request(ListModelsRequest {}))
                .await?
                .into_inner()
                .models;
            for m in list {
                if json {
                    let v = serde_json::json!({
                        "name": m.name, "sha256": m.sha256, "size": m.size,
                        "format": m.format, "added_unix_ms": m.added_unix_ms,
                    });
                    println!("{v}");
                } else {
                    println!("{}\t{}\t{}\t{}", m.name, m.format, m.size, m.sha256);
                }
            }
        }
    }
    Ok(())
}
