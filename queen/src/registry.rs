//! The node registry: which pool managers exist, what they serve, and whether they are alive.
//!
//! A node that misses heartbeats becomes suspect (no new work) and then dead (forgotten; it must
//! register again). The registry tells the dispatch actor about every change, so no work is
//! placed on a node whose heartbeat is stale, and passes on the speed figures pools measure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use skep_common::secret::Secret;
use skep_proto::v1::pool_client::PoolClient;
use tonic::transport::Endpoint;
use tracing::{info, warn};

use crate::Error;
use crate::dispatch::{DispatchHandle, Figures, ModelState, NodeModels, Target};

/// Heartbeats missed before a node is suspect, then dead.
const SUSPECT_AFTER_BEATS: u32 = 3;
const DEAD_AFTER_BEATS: u32 = 6;
/// How long a dead node stays visible in listings.
const FORGET_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeHealth {
    Healthy,
    Suspect,
    Dead,
}

/// A node as shown to operators.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub name: String,
    pub pool_url: String,
    pub slots: u32,
    pub free_slots: u32,
    pub models: Vec<String>,
    pub health: NodeHealth,
    pub last_heartbeat: Duration,
    /// The latest machine inventory the node reported (wire type: it is only passed through).
    pub inventory: Option<skep_proto::v1::Inventory>,
    /// Every model it can load, warm or not, with its load time, as its last report said.
    pub model_states: Vec<ModelState>,
    /// Memory its warm models may take (bytes); 0 = unlimited or not reported.
    pub memory_budget: u64,
}

struct Entry {
    info: NodeInfo,
    target: Target,
    last_seen: Instant,
}

pub struct Registry {
    nodes: HashMap<String, Entry>,
    /// Nodes cut off by an operator; they may not register again under the same id.
    revoked: std::collections::HashSet<String>,
    heartbeat: Duration,
    dispatch: DispatchHandle,
    /// The queen's CA certificate when it serves TLS: pools are dialed over TLS and must
    /// present a certificate it issued for their node id.
    ca_pem: Option<String>,
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.heartbeat / 2, |this, ctx| this.sweep(ctx));
    }
}

// === impl Registry ===

impl Registry {
    pub fn start(
        heartbeat: Duration,
        dispatch: DispatchHandle,
        ca_pem: Option<String>,
    ) -> RegistryHandle {
        let addr = Registry {
            nodes: HashMap::new(),
            revoked: Default::default(),
            heartbeat,
            dispatch,
            ca_pem,
        }
        .start();
        RegistryHandle { addr, heartbeat }
    }

    /// Demotes nodes whose heartbeats stopped, and tells the dispatch actor.
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let suspect = self.heartbeat * SUSPECT_AFTER_BEATS;
        let dead = self.heartbeat * DEAD_AFTER_BEATS;
        let mut gone = Vec::new();
        self.nodes.retain(|id, e| {
            let silent = now.duration_since(e.last_seen);
            let before = e.info.health;
            e.info.health = if silent >= dead {
                NodeHealth::Dead
            } else if silent >= suspect {
                NodeHealth::Suspect
            } else {
                before
            };
            if e.info.health == NodeHealth::Dead && before != NodeHealth::Dead {
                // Jobs still streaming from a dead node will not finish there: fail them over.
                e.target.gone.cancel();
            }
            if before == NodeHealth::Healthy && e.info.health != NodeHealth::Healthy {
                warn!(node = %id, silent_ms = silent.as_millis() as u64, "node stopped heartbeating");
                gone.push(id.clone());
            }
            silent < dead + FORGET_AFTER
        });
        for id in gone {
            let sched = self.dispatch.clone();
            ctx.spawn(actix::fut::wrap_future(async move {
                let _ = sched.node_down(&id).await;
            }));
        }
    }
}

/// How to dial a pool. With TLS on, only `https` (or loopback) pool URLs are accepted, and the
/// pool must prove it is `node_id` with a certificate from the queen's CA.
fn pool_endpoint(url: &str, node_id: &str, ca_pem: Option<&str>) -> Result<Endpoint, Error> {
    let bad = |why: String| Error::BadPoolUrl(why);
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| bad(format!("{url:?} is not a URL: {e}")))?
        .connect_timeout(Duration::from_secs(2));
    let https = url.starts_with("https://");
    match ca_pem {
        Some(ca) if https => endpoint
            .tls_config(skep_tls::client_config(ca, &skep_tls::pool_name(node_id)))
            .map_err(|e| bad(format!("TLS for {url}: {e}"))),
        Some(_) if !is_loopback_url(url) => Err(bad(format!(
            "{url} is plaintext and not on loopback, but this queen serves TLS: \
             point the pool at an https:// queen URL so it serves TLS too"
        ))),
        None if https => Err(bad(format!(
            "{url} wants TLS but this queen runs without it (--tls off, or a loopback listen \
             address with --tls auto)"
        ))),
        _ => Ok(endpoint),
    }
}

fn is_loopback_url(url: &str) -> bool {
    url.parse::<tonic::codegen::http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_owned))
        .is_some_and(|h| {
            h == "localhost"
                || h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        })
}

/// A pool manager asking to register.
pub struct NewNode {
    pub name: String,
    pub pool_url: String,
    pub slots: u32,
    pub models: Vec<String>,
    pub dispatch_key: Secret,
    /// The enrolled id, or `None` for a fresh one.
    pub node_id: Option<String>,
    /// Engine speed the pool measured at warm-up, per model.
    pub figures: Vec<(String, Figures)>,
    /// Its models' states and memory budget, if it reports them.
    pub model_states: Option<NodeModels>,
}

pub struct Registered {
    pub node_id: String,
}

#[derive(Message)]
#[rtype(result = "Result<Registered, Error>")]
struct Register {
    name: String,
    pool_url: String,
    slots: u32,
    models: Vec<String>,
    dispatch_key: Secret,
    /// The enrolled id, or `None` for a fresh one.
    node_id: Option<String>,
    figures: Vec<(String, Figures)>,
    model_states: Option<NodeModels>,
}

impl Handler<Register> for Registry {
    type Result = ResponseFuture<Result<Registered, Error>>;
    fn handle(&mut self, msg: Register, _: &mut Self::Context) -> Self::Result {
        let node_id = msg.node_id.clone().unwrap_or_else(|| {
            format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
        });
        let endpoint = match pool_endpoint(&msg.pool_url, &node_id, self.ca_pem.as_deref()) {
            Ok(e) => e,
            Err(e) => return Box::pin(async { Err(e) }),
        };
        // Checked before anything changes: a refused registration must not disturb anyone.
        if self.revoked.contains(&node_id) {
            return Box::pin(async { Err(Error::NodeRevoked(node_id)) });
        }
        // A node may only replace its own registration: a healthy node's URL is not up for
        // grabs (it would evict that node and fail its jobs). A holder that stopped heartbeating
        // (suspect or dead: a machine whose pool was replaced) gives its URL up.
        let holder = self
            .nodes
            .iter()
            .find(|(id, e)| {
                **id != node_id
                    && e.info.pool_url == msg.pool_url
                    && e.info.health == NodeHealth::Healthy
            })
            .map(|(id, _)| id.clone());
        if let Some(holder) = holder {
            warn!(node = %node_id, %holder, url = %msg.pool_url, "registration refused: the pool URL belongs to another node");
            return Box::pin(async move {
                Err(Error::UrlTaken {
                    url: msg.pool_url,
                    holder,
                })
            });
        }
        // A pool that registers again (e.g. after restarting) replaces its old entry.
        let stale: Vec<String> = self
            .nodes
            .iter()
            .filter(|(id, e)| e.info.pool_url == msg.pool_url || **id == node_id)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &stale {
            if let Some(old) = self.nodes.remove(id) {
                old.target.gone.cancel();
            }
        }
        let target = Target {
            node_id: node_id.clone(),
            client: PoolClient::new(endpoint.connect_lazy()),
            dispatch_key: Arc::new(msg.dispatch_key),
            gone: tokio_util::sync::CancellationToken::new(),
        };
        info!(node = %node_id, name = %msg.name, url = %msg.pool_url, slots = msg.slots, "node registered");
        self.nodes.insert(
            node_id.clone(),
            Entry {
                info: NodeInfo {
                    id: node_id.clone(),
                    name: msg.name,
                    pool_url: msg.pool_url,
                    slots: msg.slots,
                    free_slots: msg.slots,
                    models: msg.models.clone(),
                    health: NodeHealth::Healthy,
                    last_heartbeat: Duration::ZERO,
                    inventory: None,
                    model_states: msg
                        .model_states
                        .as_ref()
                        .map(|m| m.states.clone())
                        .unwrap_or_default(),
                    memory_budget: msg.model_states.as_ref().map_or(0, |m| m.budget),
                },
                target: target.clone(),
                last_seen: Instant::now(),
            },
        );
        let sched = self.dispatch.clone();
        Box::pin(async move {
            for id in stale {
                sched.node_down(&id).await?;
            }
            sched
                .node_up(target, msg.models, msg.figures, msg.model_states)
                .await?;
            Ok(Registered { node_id })
        })
    }
}

#[derive(Message)]
#[rtype(result = "Result<bool, Error>")]
struct Heartbeat {
    node_id: String,
    free_slots: u32,
    models: Vec<String>,
    inventory: Option<skep_proto::v1::Inventory>,
    figures: Vec<(String, Figures)>,
    model_states: Option<NodeModels>,
}

impl Handler<Heartbeat> for Registry {
    type Result = ResponseFuture<Result<bool, Error>>;
    fn handle(&mut self, msg: Heartbeat, _: &mut Self::Context) -> Self::Result {
        let Some(e) = self.nodes.get_mut(&msg.node_id) else {
            return Box::pin(async { Ok(false) });
        };
        if e.info.health == NodeHealth::Dead {
            return Box::pin(async { Ok(false) });
        }
        e.last_seen = Instant::now();
        e.info.free_slots = msg.free_slots;
        e.info.inventory = msg.inventory;
        if let Some(m) = &msg.model_states {
            e.info.model_states = m.states.clone();
            e.info.memory_budget = m.budget;
        }
        let revived = e.info.health == NodeHealth::Suspect || e.info.models != msg.models;
        e.info.models = msg.models;
        e.info.health = NodeHealth::Healthy;
        if !revived {
            if msg.figures.is_empty() && msg.model_states.is_none() {
                return Box::pin(async { Ok(true) });
            }
            let (sched, id) = (self.dispatch.clone(), msg.node_id);
            return Box::pin(async move {
                sched.figures(&id, msg.figures, msg.model_states).await?;
                Ok(true)
            });
        }
        info!(node = %msg.node_id, "node healthy again");
        let (sched, target, models) = (
            self.dispatch.clone(),
            e.target.clone(),
            e.info.models.clone(),
        );
        Box::pin(async move {
            sched
                .node_up(target, models, msg.figures, msg.model_states)
                .await?;
            Ok(true)
        })
    }
}

#[derive(Message)]
#[rtype(result = "Result<(), Error>")]
struct Unreachable {
    node_id: String,
}

impl Handler<Unreachable> for Registry {
    type Result = ResponseFuture<Result<(), Error>>;
    fn handle(&mut self, msg: Unreachable, _: &mut Self::Context) -> Self::Result {
        let Some(e) = self.nodes.get_mut(&msg.node_id) else {
            return Box::pin(async { Ok(()) });
        };
        if e.info.health != NodeHealth::Healthy {
            return Box::pin(async { Ok(()) });
        }
        // Until its next heartbeat says otherwise: without this, every job placed on a crashed
        // pool before its heartbeats are missed would pay a failed attempt.
        e.info.health = NodeHealth::Suspect;
        warn!(node = %msg.node_id, "dispatch could not reach the node; suspect until it heartbeats");
        let sched = self.dispatch.clone();
        Box::pin(async move { sched.node_down(&msg.node_id).await })
    }
}

#[derive(Message)]
#[rtype(result = "Result<bool, Error>")]
struct Revoke {
    node_id: String,
}

impl Handler<Revoke> for Registry {
    type Result = ResponseFuture<Result<bool, Error>>;
    fn handle(&mut self, msg: Revoke, _: &mut Self::Context) -> Self::Result {
        self.revoked.insert(msg.node_id.clone());
        let known = match self.nodes.remove(&msg.node_id) {
            Some(e) => {
                e.target.gone.cancel();
                true
            }
            None => false,
        };
        warn!(node = %msg.node_id, "node revoked");
        let sched = self.dispatch.clone();
        Box::pin(async move {
            sched.node_down(&msg.node_id).await?;
            Ok(known)
        })
    }
}

#[derive(Message)]
#[rtype(result = "Vec<NodeInfo>")]
struct List;

impl Handler<List> for Registry {
    type Result = MessageResult<List>;
    fn handle(&mut self, _: List, _: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        let mut v: Vec<NodeInfo> = self
            .nodes
            .values()
            .map(|e| NodeInfo {
                last_heartbeat: now.duration_since(e.last_seen),
                ..e.info.clone()
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        MessageResult(v)
    }
}

/// Async handle to the registry.
#[derive(Clone)]
pub struct RegistryHandle {
    addr: Addr<Registry>,
    heartbeat: Duration,
}

// === impl RegistryHandle ===

impl RegistryHandle {
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat
    }

    pub async fn register(&self, node: NewNode) -> Result<Registered, Error> {
        self.addr
            .send(Register {
                name: node.name,
                pool_url: node.pool_url,
                slots: node.slots,
                models: node.models,
                dispatch_key: node.dispatch_key,
                node_id: node.node_id,
                figures: node.figures,
                model_states: node.model_states,
            })
            .await?
    }

    /// False when the node is unknown (or declared dead) and must register again.
    pub async fn heartbeat(
        &self,
        node_id: String,
        free_slots: u32,
        models: Vec<String>,
        inventory: Option<skep_proto::v1::Inventory>,
        figures: Vec<(String, Figures)>,
        model_states: Option<NodeModels>,
    ) -> Result<bool, Error> {
        self.addr
            .send(Heartbeat {
                node_id,
                free_slots,
                models,
                inventory,
                figures,
                model_states,
            })
            .await?
    }

    /// A dispatch found the node unreachable: it takes no new work until it heartbeats again.
    pub async fn unreachable(&self, node_id: &str) -> Result<(), Error> {
        self.addr
            .send(Unreachable {
                node_id: node_id.to_owned(),
            })
            .await?
    }

    /// Cuts a node off: no more work, running jobs fail over, no re-registration under its id.
    /// False if it was not registered at the time (it is refused from now on all the same).
    pub async fn revoke(&self, node_id: &str) -> Result<bool, Error> {
        self.addr
            .send(Revoke {
                node_id: node_id.to_owned(),
            })
            .await?
    }

    pub async fn list(&self) -> Result<Vec<NodeInfo>, Error> {
        Ok(self.addr.send(List).await?)
    }
}
