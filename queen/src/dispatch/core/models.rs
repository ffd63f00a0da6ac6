//! Models on demand, as the dispatch core sees them: which model is warm, loading or cold on
//! each pool, what a cold load costs, whether a model fits the pool's memory budget, and which
//! warm models a load evicts.
//!
//! The pool's reports (register, heartbeats, the session's `models` event) are the truth; the
//! queen's own sends cover the time until the next report arrives (a job sent for a cold model
//! makes it *loading*, ready `load_us` after the send, and its evictions cold).
//!
//! **Memory.** The models a node *needs* are those of its jobs (sent, or reserved here) and those
//! loading; the others are warm and idle, free to evict. A job for a model is placed on a node
//! when the needed models and it fit the budget together (its load, if cold, evicts idle models,
//! least recently used first). When it fits the budget alone but not beside the models with work
//! there, the node *drains* for it: its jobs wait here until every job of another model on the
//! node has ended, then load it and run. While a node drains, it takes only jobs of the drained
//! model or of models already in memory, and only when no admitted job becomes late (so the
//! models in memory are used as long as the deadlines allow before the switch): requests that
//! alternate between two models run in groups, one switch per group, instead of one load per
//! request. A model that does not fit alone is not placed there at all.

use std::collections::BTreeSet;

use super::{Core, Extra, JobKey, Micros, Node};

/// Load time assumed for a model whose load the pool never measured: conservative, never zero.
pub const PRIOR_LOAD_US: Micros = 30_000_000;
/// How long after the queen evicted a model a report that still has it in memory is taken for
/// one written before the eviction reached the pool (heartbeats come every few seconds; a pool
/// loads a model only for a job the queen sent, which clears this).
const STALE_REPORT_US: Micros = 10_000_000;

/// One model a pool can serve, as the pool reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelState {
    pub model: String,
    /// Loaded and ready on every slot.
    pub warm: bool,
    /// A load is under way.
    pub loading: bool,
    /// The pool's measured cold-load time (µs); 0 = never measured.
    pub load_us: u64,
    /// Memory it takes while warm (bytes); 0 = unknown (counted as nothing).
    pub footprint_bytes: u64,
}

/// What the core tracks of one model on one node.
#[derive(Debug, Clone, Default)]
pub(super) struct Load {
    warm: bool,
    loading: bool,
    /// While loading: when it is predicted ready (the queen's send plus the load time).
    ready_at: Micros,
    load_us: u64,
    footprint: u64,
    /// The last time a job of it was sent to or ended on this node (for least-recently-used).
    last_use: Micros,
    /// When the queen last evicted it, until it sends a job of it again.
    evicted_at: Option<Micros>,
}

/// How a node can take a job of one model.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fit<'a> {
    /// The model the node drains for, if it will be draining with the job.
    pub drain: Option<&'a str>,
    /// The job changes when the drained model's jobs start, on every slot of the node.
    pub everywhere: bool,
}

impl Core {
    /// A pool's report of its models and memory budget (0 = unlimited).
    pub fn model_states(&mut self, now: Micros, id: &str, states: Vec<ModelState>, budget: u64) {
        let node = self.nodes.entry(id.to_owned()).or_insert_with(Node::down);
        node.budget = budget;
        let mut next = std::collections::HashMap::with_capacity(states.len());
        for st in states {
            let old = node.loads.get(&st.model);
            let load_us = st.load_us;
            let predicted = old.filter(|o| o.loading).map(|o| o.ready_at);
            let evicted_at = old.and_then(|o| o.evicted_at);
            let stale = evicted_at.is_some_and(|e| now < e.saturating_add(STALE_REPORT_US));
            let (warm, loading, ready_at) = if stale {
                (false, false, 0)
            } else if st.warm {
                (true, false, 0)
            } else if st.loading {
                let fallback =
                    now.saturating_add(if load_us > 0 { load_us } else { PRIOR_LOAD_US });
                (false, true, predicted.unwrap_or(fallback))
            } else {
                // A report written before our job reached the pool does not undo the load the
                // job started: our prediction stands until its time.
                match predicted.filter(|r| *r > now) {
                    Some(r) => (false, true, r),
                    None => (false, false, 0),
                }
            };
            next.insert(
                st.model,
                Load {
                    warm,
                    loading,
                    ready_at,
                    load_us,
                    footprint: st.footprint_bytes,
                    last_use: old.map_or(0, |o| o.last_use),
                    evicted_at,
                },
            );
        }
        node.loads = next;
        if node.up {
            for s in 0..node.slots.len() as u32 {
                self.pump(now, id, s);
            }
        }
    }

    /// Whether the model is in the node's memory (warm or loading). A node that reports no
    /// model states has every model it serves warm.
    pub(super) fn resident(&self, node: &Node, model: &str) -> bool {
        node.loads.get(model).is_none_or(|l| l.warm || l.loading)
    }

    /// When the model is ready on the node, if it is in memory (`None`: cold).
    pub(super) fn ready(&self, now: Micros, node: &Node, model: &str) -> Option<Micros> {
        match node.loads.get(model) {
            None => Some(0),
            Some(l) if l.warm => Some(0),
            Some(l) if l.loading => Some(l.ready_at.max(now)),
            Some(_) => None,
        }
    }

    /// A cold load of the model on the node.
    pub(super) fn load_time(&self, node: &Node, model: &str) -> Micros {
        node.loads
            .get(model)
            .map(|l| l.load_us)
            .filter(|us| *us > 0)
            .unwrap_or(PRIOR_LOAD_US)
    }

    fn footprint(node: &Node, model: &str) -> u64 {
        node.loads.get(model).map_or(0, |l| l.footprint)
    }

    /// Models with jobs on the node (sent or reserved here) and models loading.
    fn needed<'a>(&'a self, node: &'a Node) -> BTreeSet<&'a str> {
        let mut out: BTreeSet<&str> = node
            .slots
            .iter()
            .flat_map(|s| s.sent.iter().chain(s.pending.iter().map(|(_, k)| k)))
            .filter_map(|k| self.jobs.get(k).map(|j| j.spec.model.as_str()))
            .collect();
        out.extend(
            node.loads
                .iter()
                .filter(|(_, l)| l.loading)
                .map(|(m, _)| m.as_str()),
        );
        out
    }

    fn fits_beside_needed(&self, node: &Node, model: &str) -> bool {
        if node.budget == 0 {
            return true;
        }
        let mut needed = self.needed(node);
        needed.insert(model);
        needed
            .iter()
            .map(|m| Self::footprint(node, m))
            .fold(0u64, u64::saturating_add)
            <= node.budget
    }

    /// Whether (and how) the node can take a job of `model` now; `None` when its memory cannot.
    pub(super) fn fit<'a>(&self, node: &'a Node, model: &'a str) -> Option<Fit<'a>> {
        if let Some(y) = node.drain.as_deref() {
            if y == model {
                return Some(Fit {
                    drain: Some(y),
                    everywhere: false,
                });
            }
            // Runs before the switch, which it may delay: checked on every slot.
            return self.resident(node, model).then_some(Fit {
                drain: Some(y),
                everywhere: true,
            });
        }
        if self.fits_beside_needed(node, model) {
            return Some(Fit {
                drain: None,
                everywhere: false,
            });
        }
        // In memory but in the way of a load already planned; or too big for this pool.
        if self.resident(node, model) || Self::footprint(node, model) > node.budget {
            return None;
        }
        Some(Fit {
            drain: Some(model),
            everywhere: true,
        })
    }

    /// When the drained model `y` becomes ready: once every job of another model on the node has
    /// ended (and every other load under way), plus its load. `extra` is a job being considered
    /// for one slot. Returned with the model, as `simulate` takes it.
    pub(super) fn gate(
        &self,
        now: Micros,
        node: &Node,
        y: Option<&str>,
        extra: Option<(usize, Extra<'_>)>,
    ) -> Option<(String, Option<Micros>)> {
        let y = y?;
        let apart = (y.to_owned(), None);
        let mut end = now;
        for s in 0..node.slots.len() {
            let e = extra.filter(|(at, _)| *at == s).map(|(_, e)| e);
            end = end.max(self.simulate(now, node, s, e, Some(&apart)).1);
        }
        for (m, l) in &node.loads {
            if l.loading && m != y {
                end = end.max(l.ready_at);
            }
        }
        Some((
            y.to_owned(),
            Some(end.saturating_add(self.load_time(node, y))),
        ))
    }

    /// Enters a drain when the job just reserved on the node is for a cold model that does not
    /// fit beside the models with work there (`fit` allowed it).
    pub(super) fn begin_drain(&mut self, node_id: &str, key: JobKey) {
        let Some(node) = self.nodes.get(node_id) else {
            return;
        };
        let Some(job) = self.jobs.get(&key) else {
            return;
        };
        let model = job.spec.model.as_str();
        if node.drain.is_some()
            || node.budget == 0
            || self.resident(node, model)
            || Self::footprint(node, model) > node.budget
        {
            return;
        }
        let total = self
            .needed(node)
            .iter()
            .map(|m| Self::footprint(node, m))
            .fold(0u64, u64::saturating_add);
        if total > node.budget {
            let model = model.to_owned();
            if let Some(node) = self.nodes.get_mut(node_id) {
                node.drain = Some(model);
            }
        }
    }

    /// Ends the node's drain once it is over: its model is in memory, no job of it waits, or no
    /// job of another model (nor another load) is left on the node.
    pub(super) fn settle(&mut self, now: Micros, node_id: &str) {
        let Some(node) = self.nodes.get(node_id) else {
            return;
        };
        let Some(y) = node.drain.as_deref() else {
            return;
        };
        let mut waiting = false;
        let mut others = false;
        for s in &node.slots {
            for k in s.sent.iter().chain(s.pending.iter().map(|(_, k)| k)) {
                match self.jobs.get(k) {
                    Some(j) if j.spec.model == y => waiting = true,
                    Some(_) => others = true,
                    None => {}
                }
            }
        }
        let loading = node
            .loads
            .iter()
            .any(|(m, l)| m != y && l.loading && l.ready_at > now);
        if (self.resident(node, y) || !waiting || !(others || loading))
            && let Some(node) = self.nodes.get_mut(node_id)
        {
            node.drain = None;
        }
    }

    /// Warm models to unload so that `model` fits: idle ones (no job sent or reserved, not
    /// loading), least recently used first. `None` when even that is not enough.
    pub(super) fn evictions(&self, node: &Node, model: &str) -> Option<Vec<String>> {
        if node.budget == 0 {
            return Some(Vec::new());
        }
        let mut pinned = self.needed(node);
        pinned.insert(model);
        let mut used = node
            .loads
            .iter()
            .filter(|(m, l)| (l.warm || l.loading) && m.as_str() != model)
            .map(|(_, l)| l.footprint)
            .fold(0u64, u64::saturating_add);
        let need = Self::footprint(node, model);
        let mut idle: Vec<(Micros, &String, u64)> = node
            .loads
            .iter()
            .filter(|(m, l)| l.warm && !l.loading && !pinned.contains(m.as_str()))
            .map(|(m, l)| (l.last_use, m, l.footprint))
            .collect();
        idle.sort_unstable();
        let mut out = Vec::new();
        for (_, m, footprint) in idle {
            if used.saturating_add(need) <= node.budget {
                break;
            }
            used = used.saturating_sub(footprint);
            out.push(m.clone());
        }
        (used.saturating_add(need) <= node.budget).then_some(out)
    }

    /// Before a job of `model` is sent to the node: the models to evict, and whether the job
    /// waits for a load there. `None` when it cannot fit beside the models with work on the
    /// node: the node then drains for it (and was not draining before, so the caller's loop
    /// moves on).
    pub(super) fn prepare_load(
        &mut self,
        _now: Micros,
        node_id: &str,
        model: &str,
    ) -> Option<(Vec<String>, bool)> {
        let node = self.nodes.get(node_id)?;
        let warm = node.loads.get(model).is_none_or(|l| l.warm);
        if self.resident(node, model) {
            return Some((Vec::new(), !warm));
        }
        if let Some(evict) = self.evictions(node, model) {
            return Some((evict, true));
        }
        let busy = self.needed(node).iter().any(|m| *m != model);
        if node.drain.is_none() && busy {
            let model = model.to_owned();
            self.nodes.get_mut(node_id)?.drain = Some(model);
            return None;
        }
        // Nothing of ours is in its way: the pool decides (and refuses it if it cannot fit,
        // and the job is retried elsewhere).
        Some((Vec::new(), true))
    }

    /// A job of `model` was just sent: a cold model is now loading, ready a load time from now,
    /// and the evicted ones are cold.
    pub(super) fn loading(&mut self, now: Micros, node_id: &str, model: &str, evict: &[String]) {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return;
        };
        for m in evict {
            if let Some(l) = node.loads.get_mut(m) {
                l.warm = false;
                l.loading = false;
                l.evicted_at = Some(now);
            }
        }
        if let Some(l) = node.loads.get_mut(model) {
            if !l.warm && !l.loading {
                l.loading = true;
                let load = if l.load_us > 0 {
                    l.load_us
                } else {
                    PRIOR_LOAD_US
                };
                l.ready_at = now.saturating_add(load);
            }
            l.last_use = now;
            l.evicted_at = None;
        }
    }

    /// A job of `model` ended on the node: it was used now.
    pub(super) fn used(&mut self, now: Micros, node_id: &str, model: &str) {
        if let Some(l) = self
            .nodes
            .get_mut(node_id)
            .and_then(|n| n.loads.get_mut(model))
        {
            l.last_use = now;
        }
    }
}

#[cfg(test)]
mod tests;
