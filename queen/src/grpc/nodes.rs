//! `skep.v1.Nodes`: pool managers register and heartbeat; operators list nodes.

use skep_approval::{Action, SpecHash};
use skep_audit::Fields;
use skep_common::auth::TokenDigest;
use skep_common::secret::Secret;
use skep_common::{auth, validate};
use skep_proto::v1::nodes_server::Nodes;
use skep_proto::v1::{
    EnrollRequest, EnrollResponse, HeartbeatRequest, HeartbeatResponse, Inventory,
    IssueCertificateRequest, IssueCertificateResponse, ListNodesRequest, ListNodesResponse,
    RegisterRequest, RegisterResponse, RevokeNodeRequest, RevokeNodeResponse,
};
use tonic::{Request, Response, Status};
use tracing::info;

use super::{convert, require, require_any};
use crate::Error;
use crate::audit::events;
use crate::auth::{Role, TokenEntry};
use crate::job::Services;
use crate::model::unix_ms;

/// Bounds on what a pool may announce.
const MAX_SLOTS: u32 = 1024;
const MAX_MODELS: usize = 64;
const MAX_URL_LEN: usize = 256;
const MAX_GPUS: usize = 64;

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

/// Inventory is the node's own word about itself: bounded and printable before it is kept.
fn checked_inventory(inv: Option<Inventory>) -> Result<Option<Inventory>, Status> {
    let Some(inv) = inv else { return Ok(None) };
    if inv.gpus.len() > MAX_GPUS {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_GPUS} GPUs per node"
        )));
    }
    let printable = |s: &str| s.len() <= 64 && s.chars().all(|c| !c.is_control());
    if !inv.gpus.iter().all(|g| printable(&g.name)) {
        return Err(Status::invalid_argument(
            "GPU names must be printable, at most 64 bytes",
        ));
    }
    // "major.minor" (or empty when the driver is too old to say).
    let capability = |s: &str| s.len() <= 16 && s.chars().all(|c| c.is_ascii_digit() || c == '.');
    if !inv.gpus.iter().all(|g| capability(&g.compute_capability)) {
        return Err(Status::invalid_argument(
            "a GPU's compute capability must be digits and dots, at most 16 bytes",
        ));
    }
    check_models(&inv.models_loaded)?;
    if inv.models_held.len() > 64
        || inv
            .models_held
            .iter()
            .any(|h| crate::catalogue::check_sha256(h).is_err())
    {
        return Err(Status::invalid_argument(
            "models_held must be at most 64 lower-case hex SHA-256 digests",
        ));
    }
    Ok(Some(inv))
}

#[tonic::async_trait]
impl Nodes for NodesService {
    async fn enroll(
        &self,
        req: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let who = require(&req, Role::Enroll)?;
        let EnrollRequest { name, approval } = req.into_inner();
        validate::identifier("name", &name).map_err(Error::from)?;
        // Governed: the approval is checked (and used up) before the enrollment token is, so a
        // refused approval leaves the token for a retry with a good one.
        let approvals = &self.svc.approvals;
        if approvals.required(Action::NodeEnroll) {
            approvals
                .check(
                    Action::NodeEnroll,
                    &SpecHash::of(name.as_bytes()),
                    &approval,
                    &who.fingerprint,
                    &self.svc.store,
                    &self.svc.audit,
                )
                .await?;
        }
        // Single use: only the call that revokes the enrollment token may go on.
        if who.role == Role::Enroll {
            if !self.svc.tokens.consume(&who.digest) {
                let why = Fields::new().reason("enrollment token already used");
                self.svc
                    .audit
                    .record(events::AUTH_FAILURE, &who.fingerprint, why);
                return Err(Status::unauthenticated("invalid token"));
            }
            self.svc.store.revoke_token(&who.digest).await?;
        }
        let node_id = format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let key = Secret::generate();
        let entry = TokenEntry {
            digest: TokenDigest::of(key.expose()),
            role: Role::Node,
            label: name.clone(),
            created_unix_ms: unix_ms(),
            expires_unix_ms: 0,
            revoked: false,
            node_id: node_id.clone(),
            max_jobs: 0,
        };
        self.svc.store.insert_token(entry.clone()).await?;
        self.svc.tokens.add(entry);
        info!(node = %node_id, %name, by = %who.fingerprint, "node enrolled");
        let fields = Fields::new().node(&node_id).str("name", &name);
        self.svc
            .audit
            .record(events::NODE_ENROLLED, &who.fingerprint, fields);
        Ok(Response::new(EnrollResponse {
            node_id,
            runtime_key: key.expose().to_owned(),
        }))
    }

    async fn revoke(
        &self,
        req: Request<RevokeNodeRequest>,
    ) -> Result<Response<RevokeNodeResponse>, Status> {
        let who = require(&req, Role::Admin)?;
        let node_id = req.into_inner().node_id;
        validate::identifier("node_id", &node_id).map_err(Error::from)?;
        let keys = self.svc.tokens.revoke_node(&node_id);
        for digest in &keys {
            self.svc.store.revoke_token(digest).await?;
        }
        // An id that was never enrolled nor registered is only NOT_FOUND: it must not be
        // blocked forever in the registry's revoked set (a later node could be given it).
        if keys.is_empty() {
            let registered = self.svc.registry.list().await?;
            if !registered.iter().any(|n| n.id == node_id) {
                return Err(Error::NodeNotFound(node_id).into());
            }
        }
        self.svc.registry.revoke(&node_id).await?;
        self.svc.audit.record(
            events::NODE_REVOKED,
            &who.fingerprint,
            Fields::new().node(&node_id),
        );
        Ok(Response::new(RevokeNodeResponse {}))
    }

    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let who = require_any(&req, &[Role::Node])?;
        let r = req.into_inner();
        validate::identifier("name", &r.name).map_err(Error::from)?;
        // A node registers as itself: the id comes from its key, not from the request.
        let node_id = match who.role {
            Role::Node if !r.node_id.is_empty() && r.node_id != who.node_id => {
                return Err(Status::permission_denied(
                    "a node may only register as itself",
                ));
            }
            Role::Node => Some(who.node_id.clone()),
            _ if r.node_id.is_empty() => None,
            _ => {
                validate::identifier("node_id", &r.node_id).map_err(Error::from)?;
                Some(r.node_id.clone())
            }
        };
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
            .register(crate::registry::NewNode {
                name: r.name,
                pool_url: r.pool_url,
                slots: r.slots,
                models: r.models,
                dispatch_key: key,
                node_id,
                figures: checked_figures(&r.figures)?,
                model_states: checked_model_states(&r.model_states, r.memory_budget_bytes)?,
            })
            .await
            .inspect_err(|e| {
                if let Error::UrlTaken { holder, .. } = e {
                    let fields = Fields::new().node(&who.node_id).reason(&e.to_string());
                    self.svc.audit.record(
                        "node.url_conflict",
                        &who.fingerprint,
                        fields.str("holder", holder),
                    );
                }
            })?;
        Ok(Response::new(RegisterResponse {
            node_id: reg.node_id,
            heartbeat_interval_ms: u32::try_from(
                self.svc.registry.heartbeat_interval().as_millis(),
            )
            .unwrap_or(u32::MAX),
        }))
    }

    async fn issue_certificate(
        &self,
        req: Request<IssueCertificateRequest>,
    ) -> Result<Response<IssueCertificateResponse>, Status> {
        let who = require(&req, Role::Node)?;
        let r = req.into_inner();
        // A certificate names the node its key belongs to, whatever the request says.
        if who.node_id.is_empty() || r.node_id != who.node_id {
            return Err(Status::permission_denied(
                "a node may only ask for its own certificate",
            ));
        }
        let Some(tls) = &self.svc.tls else {
            return Err(Error::Tls(
                "this queen runs without TLS; dial it with http:// and serve the pool plaintext"
                    .into(),
            )
            .into());
        };
        let certificate_pem = tls
            .ca
            .issue_pool(&who.node_id, &r.public_key)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        info!(node = %who.node_id, "TLS certificate issued");
        self.svc.audit.record(
            "node.certificate_issued",
            &who.fingerprint,
            Fields::new().node(&who.node_id),
        );
        Ok(Response::new(IssueCertificateResponse {
            certificate_pem,
            ca_pem: tls.ca.cert_pem.clone(),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let who = require_any(&req, &[Role::Node])?;
        let r = req.into_inner();
        validate::identifier("node_id", &r.node_id).map_err(Error::from)?;
        if who.role == Role::Node && who.node_id != r.node_id {
            return Err(Status::permission_denied(
                "a node may only heartbeat as itself",
            ));
        }
        check_models(&r.models)?;
        let known = self
            .svc
            .registry
            .heartbeat(
                r.node_id,
                r.free_slots,
                r.models,
                checked_inventory(r.inventory)?,
                checked_figures(&r.figures)?,
                checked_model_states(&r.model_states, r.memory_budget_bytes)?,
            )
            .await?;
        Ok(Response::new(HeartbeatResponse { known }))
    }

    async fn list(
        &self,
        req: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        require(&req, Role::Admin)?;
        let nodes = self.svc.registry.list().await?;
        let running = self.svc.dispatch.running().await?;
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

/// Model states a pool reported (register, heartbeat, or its session's `models` event), checked
/// like any other input: bounded, known model names, each once, times and sizes that are not
/// absurd. `None` when it reported none (a pool that serves its models warm, as before).
pub(crate) fn checked_model_states(
    states: &[skep_proto::v1::ModelState],
    budget: u64,
) -> Result<Option<crate::dispatch::NodeModels>, Status> {
    /// A day: no load takes longer, and sums of these never overflow.
    const MAX_LOAD_US: u64 = 86_400_000_000;
    /// 1 PiB: more than any machine's memory, and far from overflowing a sum of 64.
    const MAX_BYTES: u64 = 1 << 50;
    if states.len() > MAX_MODELS {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_MODELS} model states per node"
        )));
    }
    if states.is_empty() && budget == 0 {
        return Ok(None);
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(states.len());
    for st in states {
        validate::model_name(&st.model).map_err(Error::from)?;
        if !seen.insert(st.model.as_str()) {
            return Err(Status::invalid_argument(format!(
                "model {:?} has two states",
                st.model
            )));
        }
        if st.load_us > MAX_LOAD_US || st.footprint_bytes > MAX_BYTES {
            return Err(Status::invalid_argument(
                "a model's load time must be at most a day and its footprint at most 1 PiB",
            ));
        }
        out.push(crate::dispatch::ModelState {
            model: st.model.clone(),
            warm: st.warm,
            // Warm wins: a model ready everywhere is not waiting for anything.
            loading: st.loading && !st.warm,
            load_us: st.load_us,
            footprint_bytes: st.footprint_bytes,
        });
    }
    Ok(Some(crate::dispatch::NodeModels {
        states: out,
        budget: budget.min(MAX_BYTES.saturating_mul(64)),
    }))
}

/// Engine figures a pool measured, checked like any other input: known model names, and times
/// that are neither zero nor absurd.
fn checked_figures(
    figures: &[skep_proto::v1::EngineFigures],
) -> Result<Vec<(String, crate::dispatch::Figures)>, Status> {
    const MAX_FIGURES: usize = 64;
    const MAX_US: u64 = 3_600_000_000;
    if figures.len() > MAX_FIGURES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_FIGURES} engine figures"
        )));
    }
    figures
        .iter()
        .map(|f| {
            validate::model_name(&f.model).map_err(Error::from)?;
            let ok = |v: u64| (1..=MAX_US).contains(&v);
            if !ok(f.first_token_us) || !ok(f.per_token_us) {
                return Err(Status::invalid_argument(
                    "engine figures must be between 1us and 1h",
                ));
            }
            Ok((
                f.model.clone(),
                crate::dispatch::Figures {
                    first_token_us: f.first_token_us,
                    per_token_us: f.per_token_us,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use skep_proto::v1::{Gpu, ModelState};

    use super::*;

    #[test]
    fn a_gpu_compute_capability_must_be_short_digits_and_dots() {
        let inv = |cc: &str| {
            Some(Inventory {
                gpus: vec![Gpu {
                    name: "NVIDIA H200".into(),
                    memory_bytes: 1 << 30,
                    compute_capability: cc.into(),
                    in_use: true,
                }],
                ..Inventory::default()
            })
        };
        for ok in ["9.0", "6.1", ""] {
            assert!(checked_inventory(inv(ok)).is_ok(), "{ok:?}");
        }
        for bad in ["9.0\x1b[2J", "sm_90", "1.2.3.4.5.6.7.8.9"] {
            let err = checked_inventory(inv(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    fn state(model: &str, load_us: u64, footprint_bytes: u64) -> ModelState {
        ModelState {
            model: model.into(),
            warm: true,
            loading: true,
            load_us,
            footprint_bytes,
        }
    }

    #[test]
    fn model_states_are_bounded_named_once_and_sane() {
        assert!(checked_model_states(&[], 0).unwrap().is_none());
        let ok = checked_model_states(&[state("smollm2", 900_000, 1 << 30)], 1 << 32)
            .unwrap()
            .unwrap();
        assert_eq!(ok.budget, 1 << 32);
        // Warm wins over loading.
        assert!(ok.states[0].warm && !ok.states[0].loading);
        let bad = [
            vec![state("bad name!", 1, 1)],
            vec![state("a", 1, 1), state("a", 2, 2)],
            vec![state("a", u64::MAX, 1)],
            vec![state("a", 1, u64::MAX)],
            (0..=MAX_MODELS)
                .map(|i| state(&format!("m{i}"), 1, 1))
                .collect(),
        ];
        for states in bad {
            let e = checked_model_states(&states, 0).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{states:?}");
        }
    }
}
