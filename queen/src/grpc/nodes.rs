//! `skep.v1.Nodes`: pool managers register and heartbeat; operators list nodes.

use skep_common::secret::Secret;
use skep_common::{auth, validate};
use skep_proto::v1::nodes_server::Nodes;
use skep_proto::v1::{
    HeartbeatRequest, HeartbeatResponse, ListNodesRequest, ListNodesResponse, RegisterRequest,
    RegisterResponse,
};
use tonic::{Request, Response, Status};

use super::{convert, require};
use crate::Error;
use crate::auth::Role;
use crate::job::Services;

/// Bounds on what a pool may announce.
const MAX_SLOTS: u32 = 1024;
const MAX_MODELS: usize = 64;
const MAX_URL_LEN: usize = 256;

pub struct NodesService {
    svc: Services,
}

impl NodesService {
    pub fn new(svc: Services) -> Self {
        NodesService { svc }
    }
}

fn check_models(models: &[String]) -> Result<(), Status> {
    if models.len() > MAX_MODELS {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_MODELS} models per node"
        )));
    }
    for m in models {
        validate::model_name(m).map_err(Error::from)?;
    }
    Ok(())
}

#[tonic::async_trait]
impl Nodes for NodesService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        require(&req, Role::Admin)?;
        let r = req.into_inner();
        validate::identifier("name", &r.name).map_err(Error::from)?;
        let url_ok = r.pool_url.len() <= MAX_URL_LEN
            && (r.pool_url.starts_with("http://") || r.pool_url.starts_with("https://"))
            && r.pool_url.bytes().all(|b| b.is_ascii_graphic());
        if !url_ok {
            return Err(Status::invalid_argument(
                "pool_url must be an http(s) URL of at most 256 printable characters",
            ));
        }
        if r.slots == 0 || r.slots > MAX_SLOTS {
            return Err(Status::invalid_argument(format!(
                "slots must be between 1 and {MAX_SLOTS}"
            )));
        }
        check_models(&r.models)?;
        auth::parse_bearer(format!("Bearer {}", r.dispatch_key).as_bytes())
            .map_err(|_| Status::invalid_argument("dispatch_key must be a token68 string"))?;
        let key = Secret::from_string(r.dispatch_key);
        let reg = self
            .svc
            .registry
            .register(r.name, r.pool_url, r.slots, r.models, key)
            .await?;
        Ok(Response::new(RegisterResponse {
            node_id: reg.node_id,
            heartbeat_interval_ms: u32::try_from(
                self.svc.registry.heartbeat_interval().as_millis(),
            )
            .unwrap_or(u32::MAX),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        require(&req, Role::Admin)?;
        let r = req.into_inner();
        validate::identifier("node_id", &r.node_id).map_err(Error::from)?;
        check_models(&r.models)?;
        let known = self
            .svc
            .registry
            .heartbeat(r.node_id, r.free_slots, r.models)
            .await?;
        Ok(Response::new(HeartbeatResponse { known }))
    }

    async fn list(
        &self,
        req: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        require(&req, Role::Admin)?;
        let nodes = self.svc.registry.list().await?;
        let running = self.svc.scheduler.running().await?;
        let nodes = nodes
            .into_iter()
            .map(|n| {
                let r = running.get(&n.id).copied().unwrap_or(0);
                convert::node(n, r)
            })
            .collect();
        Ok(Response::new(ListNodesResponse { nodes }))
    }
}
