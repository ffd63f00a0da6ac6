//! The scheduler: per-model earliest-deadline-first queues and the slots of every pool.
//!
//! A job asks for a slot with `enqueue` and receives an `Assignment` (which pool, how to reach
//! it) through a oneshot as soon as one frees up, earliest deadline first. The job gives the slot
//! back with `release`. Queues are bounded; a waiter whose deadline passed or who went away is
//! skipped, never dispatched.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use skep_common::secret::Secret;
use skep_proto::v1::pool_client::PoolClient;
use tokio::sync::oneshot;
use tonic::transport::Channel;

use crate::Error;

/// Default bound on jobs waiting for a slot, all models together.
pub const DEFAULT_MAX_QUEUED: usize = 256;
/// Retry hint given when the queue is full.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// How to reach one pool manager.
#[derive(Clone)]
pub struct Target {
    pub node_id: String,
    pub client: PoolClient<Channel>,
    /// Presented as bearer on every dispatch to this node.
    pub dispatch_key: Arc<Secret>,
    /// Cancelled when this registration ends (node dead, revoked or replaced): jobs running
    /// there stop waiting for it and fail over.
    pub gone: tokio_util::sync::CancellationToken,
}

/// A slot granted to a job; give it back with `SchedulerHandle::release`.
#[derive(Clone)]
pub struct Assignment {
    pub target: Target,
}

/// What `enqueue` answers.
pub struct Enqueued {
    /// Jobs of the same model ahead of this one (0: dispatched at once).
    pub position: usize,
    pub assignment: oneshot::Receiver<Assignment>,
}

struct NodeSlots {
    target: Target,
    models: Vec<String>,
    slots: u32,
    running: u32,
}

struct Waiting {
    deadline: Instant,
    seq: u64,
    tx: oneshot::Sender<Assignment>,
    /// Nodes this job already failed on.
    avoid: Vec<String>,
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.seq) == (other.deadline, other.seq)
    }
}
impl Eq for Waiting {}
impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiting {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.seq).cmp(&(other.deadline, other.seq))
    }
}

pub struct Scheduler {
    nodes: HashMap<String, NodeSlots>,
    queues: HashMap<String, BinaryHeap<Reverse<Waiting>>>,
    queued: usize,
    max_queued: usize,
    seq: u64,
}

impl Actor for Scheduler {
    type Context = Context<Self>;
}

// === impl Scheduler ===

impl Scheduler {
    pub fn start(max_queued: usize) -> SchedulerHandle {
        let addr = Scheduler {
            nodes: HashMap::new(),
            queues: HashMap::new(),
            queued: 0,
            max_queued,
            seq: 0,
        }
        .start();
        SchedulerHandle { addr }
    }

    /// The least-loaded node with a free slot for `model`, other than those in `avoid`.
    fn pick(&self, model: &str, avoid: &[String]) -> Option<String> {
        self.nodes
            .iter()
            .filter(|(id, _)| !avoid.contains(id))
            .filter(|(_, n)| n.running < n.slots && n.models.iter().any(|m| m == model))
            .min_by(|(ia, a), (ib, b)| {
                let la = a.running as f64 / a.slots as f64;
                let lb = b.running as f64 / b.slots as f64;
                la.total_cmp(&lb).then_with(|| ia.cmp(ib))
            })
            .map(|(id, _)| id.clone())
    }

    /// Hands `tx` a slot on `node`; false if the waiter is gone (the slot stays free).
    fn grant(&mut self, node: &str, tx: oneshot::Sender<Assignment>) -> bool {
        let Some(n) = self.nodes.get_mut(node) else {
            return false;
        };
        if tx
            .send(Assignment {
                target: n.target.clone(),
            })
            .is_ok()
        {
            n.running += 1;
            true
        } else {
            false
        }
    }

    /// Dispatches waiting jobs while slots are free, earliest deadline first.
    fn pump(&mut self) {
        let models: Vec<String> = self.queues.keys().cloned().collect();
        let now = Instant::now();
        for model in models {
            while let Some(q) = self.queues.get_mut(&model) {
                // A waiter past its deadline or gone has already failed itself; drop it.
                while q
                    .peek()
                    .is_some_and(|Reverse(w)| w.deadline <= now || w.tx.is_closed())
                {
                    q.pop();
                    self.queued -= 1;
                }
                let Some(Reverse(head)) = q.peek() else { break };
                let avoid = head.avoid.clone();
                let Some(node) = self.pick(&model, &avoid) else {
                    break;
                };
                let Some(Reverse(w)) = self.queues.get_mut(&model).and_then(|q| q.pop()) else {
                    break;
                };
                self.queued -= 1;
                self.grant(&node, w.tx);
            }
        }
        self.queues.retain(|_, q| !q.is_empty());
    }
}

#[derive(Message)]
#[rtype(result = "Result<Enqueued, Error>")]
struct Enqueue {
    model: String,
    deadline: Instant,
    avoid: Vec<String>,
}

impl Handler<Enqueue> for Scheduler {
    type Result = Result<Enqueued, Error>;
    fn handle(&mut self, msg: Enqueue, _: &mut Self::Context) -> Self::Result {
        let serves = |(id, n): (&String, &NodeSlots)| {
            !msg.avoid.contains(id) && n.models.contains(&msg.model)
        };
        if !self.nodes.iter().any(serves) {
            return Err(Error::NoPool(msg.model));
        }
        let (tx, rx) = oneshot::channel();
        let queue_empty = self.queues.get(&msg.model).is_none_or(|q| q.is_empty());
        if queue_empty && let Some(node) = self.pick(&msg.model, &msg.avoid) {
            self.grant(&node, tx);
            return Ok(Enqueued {
                position: 0,
                assignment: rx,
            });
        }
        if self.queued >= self.max_queued {
            return Err(Error::QueueFull {
                retry_after: RETRY_AFTER,
            });
        }
        self.seq += 1;
        let q = self.queues.entry(msg.model).or_default();
        let position = q
            .iter()
            .filter(|Reverse(w)| w.deadline <= msg.deadline)
            .count()
            + 1;
        q.push(Reverse(Waiting {
            deadline: msg.deadline,
            seq: self.seq,
            tx,
            avoid: msg.avoid,
        }));
        self.queued += 1;
        Ok(Enqueued {
            position,
            assignment: rx,
        })
    }
}

/// How busy the pools serving one model are, as seen by a job with a given deadline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Waiting jobs that would run before this one (earlier or equal deadline).
    pub ahead: usize,
    /// Slots of healthy pools serving the model, and how many of them are busy.
    pub slots: u32,
    pub running: u32,
}

#[derive(Message)]
#[rtype(result = "Load")]
struct GetLoad {
    model: String,
    deadline: Instant,
}

impl Handler<GetLoad> for Scheduler {
    type Result = MessageResult<GetLoad>;
    fn handle(&mut self, msg: GetLoad, _: &mut Self::Context) -> Self::Result {
        let ahead = self.queues.get(&msg.model).map_or(0, |q| {
            q.iter()
                .filter(|Reverse(w)| w.deadline <= msg.deadline)
                .count()
        });
        let (slots, running) = self
            .nodes
            .values()
            .filter(|n| n.models.contains(&msg.model))
            .fold((0, 0), |(s, r), n| {
                (s + n.slots, r + n.running.min(n.slots))
            });
        MessageResult(Load {
            ahead,
            slots,
            running,
        })
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Release {
    node_id: String,
}

impl Handler<Release> for Scheduler {
    type Result = ();
    fn handle(&mut self, msg: Release, _: &mut Self::Context) {
        if let Some(n) = self.nodes.get_mut(&msg.node_id) {
            n.running = n.running.saturating_sub(1);
        }
        self.pump();
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct NodeUp {
    target: Target,
    models: Vec<String>,
    slots: u32,
}

impl Handler<NodeUp> for Scheduler {
    type Result = ();
    fn handle(&mut self, msg: NodeUp, _: &mut Self::Context) {
        let id = msg.target.node_id.clone();
        let running = self.nodes.get(&id).map_or(0, |n| n.running);
        self.nodes.insert(
            id,
            NodeSlots {
                target: msg.target,
                models: msg.models,
                slots: msg.slots,
                running,
            },
        );
        self.pump();
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct NodeDown {
    node_id: String,
}

impl Handler<NodeDown> for Scheduler {
    type Result = ();
    fn handle(&mut self, msg: NodeDown, _: &mut Self::Context) {
        self.nodes.remove(&msg.node_id);
    }
}

#[derive(Message)]
#[rtype(result = "HashMap<String, u32>")]
struct Running;

impl Handler<Running> for Scheduler {
    type Result = MessageResult<Running>;
    fn handle(&mut self, _: Running, _: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.nodes
                .iter()
                .map(|(id, n)| (id.clone(), n.running))
                .collect(),
        )
    }
}

/// Async handle to the scheduler.
#[derive(Clone)]
pub struct SchedulerHandle {
    addr: Addr<Scheduler>,
}

// === impl SchedulerHandle ===

impl SchedulerHandle {
    pub async fn enqueue(&self, model: &str, deadline: Instant) -> Result<Enqueued, Error> {
        self.enqueue_avoiding(model, deadline, Vec::new()).await
    }

    /// Like `enqueue`, never placing the job on a node in `avoid` (where it already failed).
    pub async fn enqueue_avoiding(
        &self,
        model: &str,
        deadline: Instant,
        avoid: Vec<String>,
    ) -> Result<Enqueued, Error> {
        self.addr
            .send(Enqueue {
                model: model.to_owned(),
                deadline,
                avoid,
            })
            .await?
    }

    /// Queue and slot occupancy for `model`, for admission's estimate.
    pub async fn load(&self, model: &str, deadline: Instant) -> Result<Load, Error> {
        Ok(self
            .addr
            .send(GetLoad {
                model: model.to_owned(),
                deadline,
            })
            .await?)
    }

    pub async fn release(&self, node_id: &str) -> Result<(), Error> {
        Ok(self
            .addr
            .send(Release {
                node_id: node_id.to_owned(),
            })
            .await?)
    }

    pub async fn node_up(
        &self,
        target: Target,
        models: Vec<String>,
        slots: u32,
    ) -> Result<(), Error> {
        Ok(self
            .addr
            .send(NodeUp {
                target,
                models,
                slots,
            })
            .await?)
    }

    pub async fn node_down(&self, node_id: &str) -> Result<(), Error> {
        Ok(self
            .addr
            .send(NodeDown {
                node_id: node_id.to_owned(),
            })
            .await?)
    }

    /// Jobs running per node.
    pub async fn running(&self) -> Result<HashMap<String, u32>, Error> {
        Ok(self.addr.send(Running).await?)
    }
}
