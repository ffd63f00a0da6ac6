//! `skep model add|list`: the queen's model catalogue; `skep models`: which models are warm and
//! where, with their load times (the catalogue joined with the nodes' model states).

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use sha2::{Digest, Sha256};
use skep_proto::v1::models_client::ModelsClient;
use skep_proto::v1::nodes_client::NodesClient;
use skep_proto::v1::{ListModelsRequest, ListNodesRequest, ModelChunk, ModelInfo, Node, NodeState};

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

/// One line of `skep models`: a model on one node (or on none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub model: String,
    /// `None`: no live node serves it.
    pub node: Option<(String, String)>,
    /// warm, loading, cold; or `serving` for a pool that reports no model states.
    pub state: &'static str,
    pub load_us: u64,
    pub footprint_bytes: u64,
    pub in_catalogue: bool,
}

/// Every catalogue model and every model a live node can load, with where it stands on each.
pub fn placements(catalogue: &[ModelInfo], nodes: &[Node]) -> Vec<Placement> {
    let live: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.state != NodeState::Dead as i32)
        .collect();
    let mut names: Vec<&str> = catalogue.iter().map(|m| m.name.as_str()).collect();
    for n in &live {
        names.extend(n.models.iter().map(String::as_str));
        names.extend(n.model_states.iter().map(|s| s.model.as_str()));
    }
    names.sort_unstable();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let in_catalogue = catalogue.iter().any(|m| m.name == name);
        let before = out.len();
        for n in &live {
            let node = Some((n.id.clone(), n.name.clone()));
            if let Some(st) = n.model_states.iter().find(|s| s.model == name) {
                let state = if st.warm {
                    "warm"
                } else if st.loading {
                    "loading"
                } else {
                    "cold"
                };
                out.push(Placement {
                    model: name.to_owned(),
                    node,
                    state,
                    load_us: st.load_us,
                    footprint_bytes: st.footprint_bytes,
                    in_catalogue,
                });
            } else if n.models.iter().any(|m| m == name) {
                out.push(Placement {
                    model: name.to_owned(),
                    node,
                    state: "serving",
                    load_us: 0,
                    footprint_bytes: 0,
                    in_catalogue,
                });
            }
        }
        if out.len() == before {
            out.push(Placement {
                model: name.to_owned(),
                node: None,
                state: "no pool",
                load_us: 0,
                footprint_bytes: 0,
                in_catalogue,
            });
        }
    }
    // Warm first within a model: where a job starts at once.
    out.sort_by(|a, b| {
        let rank = |s: &str| match s {
            "warm" | "serving" => 0,
            "loading" => 1,
            "cold" => 2,
            _ => 3,
        };
        a.model
            .cmp(&b.model)
            .then(rank(a.state).cmp(&rank(b.state)))
            .then(a.load_us.cmp(&b.load_us))
    });
    out
}

fn seconds(us: u64) -> String {
    if us == 0 {
        "-".into()
    } else {
        format!("{:.1}s", us as f64 / 1e6)
    }
}

fn mib(bytes: u64) -> String {
    if bytes == 0 {
        "-".into()
    } else {
        format!("{} MiB", bytes.div_ceil(1 << 20))
    }
}

/// `skep models`.
pub async fn show(queen: &Queen, json: bool) -> Result<(), Failure> {
    let catalogue = ModelsClient::new(queen.channel.clone())
        .list(queen.request(ListModelsRequest {}))
        .await?
        .into_inner()
        .models;
    // Where models are warm is the nodes' business: an admin's to see.
    let nodes = match NodesClient::new(queen.channel.clone())
        .list(queen.request(ListNodesRequest {}))
        .await
    {
        Ok(r) => r.into_inner().nodes,
        Err(s) if s.code() == tonic::Code::PermissionDenied => {
            eprintln!("where models are warm is shown to admin tokens only; the catalogue:");
            Vec::new()
        }
        Err(s) => return Err(s.into()),
    };
    let rows = placements(&catalogue, &nodes);
    if json {
        for r in &rows {
            let (node_id, node_name) = r.node.clone().unwrap_or_default();
            let v = serde_json::json!({
                "model": r.model, "node_id": node_id, "node_name": node_name,
                "state": r.state, "load_us": r.load_us,
                "footprint_bytes": r.footprint_bytes, "in_catalogue": r.in_catalogue,
            });
            println!("{v}");
        }
        return Ok(());
    }
    println!(
        "{:<24} {:<32} {:<8} {:>8} {:>10}",
        "MODEL", "NODE", "STATE", "LOAD", "MEMORY"
    );
    for r in &rows {
        let node = r
            .node
            .as_ref()
            .map_or("-".to_owned(), |(id, name)| format!("{id} ({name})"));
        let model = if r.in_catalogue {
            r.model.clone()
        } else {
            format!("{} (local)", r.model)
        };
        println!(
            "{:<24} {:<32} {:<8} {:>8} {:>10}",
            model,
            node,
            r.state,
            seconds(r.load_us),
            mib(r.footprint_bytes)
        );
    }
    for n in nodes.iter().filter(|n| n.memory_budget_bytes > 0) {
        println!(
            "memory budget of {} ({}): {}",
            n.id,
            n.name,
            mib(n.memory_budget_bytes)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use skep_proto::v1::ModelState;

    use super::*;

    fn node(id: &str, models: &[&str], states: Vec<ModelState>, state: NodeState) -> Node {
        Node {
            id: id.into(),
            name: format!("{id}-name"),
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            model_states: states,
            state: state as i32,
            ..Node::default()
        }
    }

    fn st(model: &str, warm: bool, loading: bool, load_us: u64) -> ModelState {
        ModelState {
            model: model.into(),
            warm,
            loading,
            load_us,
            footprint_bytes: 1 << 20,
        }
    }

    #[test]
    fn each_model_shows_where_it_is_warm_first_then_where_it_loads() {
        let catalogue = vec![
            ModelInfo {
                name: "gemma3".into(),
                ..ModelInfo::default()
            },
            ModelInfo {
                name: "smollm2".into(),
                ..ModelInfo::default()
            },
            ModelInfo {
                name: "unused".into(),
                ..ModelInfo::default()
            },
        ];
        let nodes = vec![
            node(
                "a",
                &["smollm2", "gemma3"],
                vec![
                    st("smollm2", false, false, 900_000),
                    st("gemma3", true, false, 2_000_000),
                ],
                NodeState::Healthy,
            ),
            node(
                "b",
                &["smollm2"],
                vec![st("smollm2", true, false, 800_000)],
                NodeState::Healthy,
            ),
            node("old", &["smollm2"], vec![], NodeState::Healthy),
            node(
                "gone",
                &["gemma3"],
                vec![st("gemma3", true, false, 1)],
                NodeState::Dead,
            ),
        ];
        let got: Vec<(String, Option<String>, &str, u64)> = placements(&catalogue, &nodes)
            .into_iter()
            .map(|p| (p.model, p.node.map(|n| n.0), p.state, p.load_us))
            .collect();
        let want: Vec<(String, Option<String>, &str, u64)> = vec![
            ("gemma3".into(), Some("a".into()), "warm", 2_000_000),
            ("smollm2".into(), Some("old".into()), "serving", 0),
            ("smollm2".into(), Some("b".into()), "warm", 800_000),
            ("smollm2".into(), Some("a".into()), "cold", 900_000),
            ("unused".into(), None, "no pool", 0),
        ];
        assert_eq!(got, want);
    }
}
