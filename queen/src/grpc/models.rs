//! `skep.v1.Models`: the model catalogue — add a file (admin), list, fetch by content hash.

use std::pin::Pin;

use skep_proto::v1::models_server::Models;
use skep_proto::v1::{
    FetchModelRequest, ListModelsRequest, ListModelsResponse, ModelChunk, ModelData, ModelInfo,
};
use tokio::io::AsyncReadExt;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

use super::{require, require_any};
use crate::Error;
use crate::audit::events;
use crate::auth::Role;
use crate::catalogue::{self, ModelEntry};
use crate::job::Services;
use skep_approval::{Action, SpecHash};
use skep_audit::Fields;

/// Bytes per `ModelData` message when streaming a model out.
pub const CHUNK: usize = 1 << 20;

pub struct ModelsService {
    svc: Services,
}

impl ModelsService {
    pub fn new(svc: Services) -> Self {
        ModelsService { svc }
    }
}

fn info(m: ModelEntry) -> ModelInfo {
    ModelInfo {
        name: m.name,
        sha256: m.sha256,
        size: m.size,
        format: m.format,
        added_unix_ms: m.added_unix_ms,
    }
}

type DataStream = Pin<Box<dyn Stream<Item = Result<ModelData, Status>> + Send>>;

#[tonic::async_trait]
impl Models for ModelsService {
    async fn add(
        &self,
        req: Request<Streaming<ModelChunk>>,
    ) -> Result<Response<ModelInfo>, Status> {
        let who = require(&req, Role::Admin)?;
        let mut chunks = req.into_inner();
        let first = chunks
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty upload: send the model's bytes"))?;
        let mut incoming = self
            .svc
            .catalogue
            .begin(&first.name, &first.format, first.size, &first.sha256)
            .await?;
        // Governed: checked (and used up) before any byte is taken. The approval must name the
        // declared SHA-256, and `finish` keeps the file only if the bytes that arrive hash to
        // exactly that, so a different file is refused either way. `begin` has checked the
        // declared hash's form.
        let approvals = &self.svc.approvals;
        if approvals.required(Action::ModelAdd) {
            let spec =
                SpecHash::from_hex(&first.sha256).map_err(|e| Error::Model(e.to_string()))?;
            approvals
                .check(
                    Action::ModelAdd,
                    &spec,
                    &first.approval,
                    &who.fingerprint,
                    &self.svc.store,
                    &self.svc.audit,
                )
                .await?;
        }
        incoming.write(&first.data).await?;
        while let Some(chunk) = chunks.message().await? {
            incoming.write(&chunk.data).await?;
        }
        let entry = incoming.finish().await.inspect_err(|e| {
            let why = Fields::new().model(&first.name).reason(&e.to_string());
            self.svc
                .audit
                .record(events::MODEL_HASH_MISMATCH, &who.fingerprint, why);
        })?;
        info!(model = %entry.name, sha256 = %entry.sha256, size = entry.size, "model added to the catalogue");
        let fields = Fields::new()
            .model(&entry.name)
            .str("sha256", &entry.sha256)
            .num("size", entry.size);
        self.svc
            .audit
            .record(events::MODEL_ADDED, &who.fingerprint, fields);
        Ok(Response::new(info(entry)))
    }

    async fn list(
        &self,
        req: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        require_any(&req, &[Role::Submit, Role::Node])?;
        let models = self.svc.catalogue.list().await?;
        Ok(Response::new(ListModelsResponse {
            models: models.into_iter().map(info).collect(),
        }))
    }

    type FetchStream = DataStream;

    async fn fetch(&self, req: Request<FetchModelRequest>) -> Result<Response<DataStream>, Status> {
        require_any(&req, &[Role::Node])?;
        let sha = req.into_inner().sha256;
        catalogue::check_sha256(&sha)?;
        let known = self.svc.catalogue.list().await?;
        if !known.iter().any(|m| m.sha256 == sha) {
            return Err(Error::ModelNotFound(sha).into());
        }
        let path = self.svc.catalogue.path_of(&sha);
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|_| Error::ModelNotFound(sha.clone()))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("reading model: {e}"))))
                            .await;
                        return;
                    }
                };
                buf.truncate(n);
                if tx.send(Ok(ModelData { data: buf })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
