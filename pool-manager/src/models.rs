//! The models a pool serves: which are warm, loading or cold, the memory budget they share,
//! least-recently-used eviction and each model's measured cold-load time.
//!
//! This is bookkeeping only, with no processes of its own: the supervisor starts and stops the
//! workers it asks for (`wanted`) and reports back when they are ready (`set_ready`). A model is
//! *warm* when every worker group has a ready worker for it, *loading* while it is wanted and not warm,
//! *cold* otherwise. Loading one more model first unloads the models the queen named
//! (`JobFrame.evict`), then, if it still does not fit, the least recently used warm models; a
//! model with a job running or queued at this pool is never unloaded, and a model that cannot
//! fit is refused rather than pushed over the budget.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use skep_proto::v1::ModelState;
use tokio::sync::watch;

use crate::{Error, Figures};

/// The default `--memory-budget`: this share of the machine's RAM (the rest is left to the
/// operating system, the page cache and whatever else the machine runs).
pub const DEFAULT_BUDGET_SHARE: f64 = 0.5;

/// One model this pool can serve and how to start a worker for it.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    /// Engine flags for its workers (never a secret: these go through argv).
    pub args: Vec<String>,
    /// Size of its weights file (0 for the synthetic engine): counted once however many
    /// workers map it.
    pub file_bytes: u64,
}

#[derive(Debug)]
struct Entry {
    /// Loading or warm: the supervisor keeps a worker for it in every worker group.
    wanted: bool,
    /// Per slot: that slot's worker for this model is up and ready.
    ready: Vec<bool>,
    /// When the current load began (None when warm or cold).
    load_started: Option<Instant>,
    /// The last completed cold load, measured.
    load_us: u64,
    /// Measured memory while warm: weights once + every worker's own memory (0 = not yet).
    footprint: u64,
    last_used: Instant,
    /// Warm-up figures, once measured.
    figures: Option<Figures>,
    /// Moving average of real jobs' first-token times (0 = none yet).
    first_token_us: u64,
}

impl Entry {
    /// No longer wanted: its workers are stopped and it reads cold.
    fn unload(&mut self) {
        self.wanted = false;
        self.load_started = None;
        self.ready.iter_mut().for_each(|r| *r = false);
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct ModelSet {
    specs: Vec<ModelSpec>,
    /// Bytes; 0 = unlimited.
    budget: u64,
    slots: usize,
    entries: Mutex<Vec<Entry>>,
    /// Bumped on every change the queen should hear of (the session's `Models` event).
    changed: watch::Sender<u64>,
}

impl ModelSet {
    /// `specs` must be non-empty with distinct names (checked by the caller's flag parsing).
    pub fn new(specs: Vec<ModelSpec>, budget: u64, slots: usize) -> ModelSet {
        let now = Instant::now();
        let entries = specs
            .iter()
            .map(|_| Entry {
                wanted: false,
                ready: vec![false; slots],
                load_started: None,
                load_us: 0,
                footprint: 0,
                last_used: now,
                figures: None,
                first_token_us: 0,
            })
            .collect();
        ModelSet {
            specs,
            budget,
            slots,
            entries: Mutex::new(entries),
            changed: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn index(&self, model: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == model)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Every model this pool can serve, in the order given.
    pub fn names(&self) -> Vec<String> {
        self.specs.iter().map(|s| s.name.clone()).collect()
    }

    pub fn specs(&self) -> &[ModelSpec] {
        &self.specs
    }

    pub fn spec(&self, model: &str) -> Option<&ModelSpec> {
        self.index(model).map(|i| &self.specs[i])
    }

    pub fn serves(&self, model: &str) -> bool {
        self.index(model).is_some()
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Follows changes (for the session's `Models` events).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Models the supervisor must keep workers for.
    pub fn wanted(&self) -> Vec<String> {
        let e = self.lock();
        self.specs
            .iter()
            .zip(e.iter())
            .filter(|(_, e)| e.wanted)
            .map(|(s, _)| s.name.clone())
            .collect()
    }

    pub fn is_wanted(&self, model: &str) -> bool {
        self.index(model).is_some_and(|i| self.lock()[i].wanted)
    }

    /// Every slot has a ready worker for `model`.
    pub fn is_warm(&self, model: &str) -> bool {
        self.index(model).is_some_and(|i| {
            let e = &self.lock()[i];
            e.wanted && e.ready.iter().all(|r| *r)
        })
    }

    /// Models warm now (inventory's `models_loaded`).
    pub fn warm(&self) -> Vec<String> {
        let e = self.lock();
        self.specs
            .iter()
            .zip(e.iter())
            .filter(|(_, e)| e.wanted && e.ready.iter().all(|r| *r))
            .map(|(s, _)| s.name.clone())
            .collect()
    }

    /// What a warm model is counted at against the budget: measured when it has been warm,
    /// else its file (the least it can take).
    fn cost(&self, i: usize, e: &Entry) -> u64 {
        if e.footprint > 0 {
            e.footprint
        } else {
            self.specs[i].file_bytes
        }
    }

    /// Makes `model` wanted (a job for it arrived, or the start-up measurement): a no-op when
    /// it is already loading or warm. Otherwise unloads the models in `evict`, then the least
    /// recently used ones, none of them in `in_use` (a job running or queued here), until it
    /// fits the budget. Returns the models unloaded; refuses, changing nothing, when it cannot
    /// fit.
    pub fn request(
        &self,
        model: &str,
        evict: &[String],
        in_use: &HashSet<String>,
    ) -> Result<Vec<String>, Error> {
        let Some(want) = self.index(model) else {
            return Err(Error::UnknownModel(model.to_owned()));
        };
        let mut e = self.lock();
        let now = Instant::now();
        e[want].last_used = now;
        if e[want].wanted {
            return Ok(Vec::new());
        }
        let need = self.cost(want, &e[want]);
        let mut used: u64 = (0..e.len())
            .filter(|&i| e[i].wanted)
            .map(|i| self.cost(i, &e[i]))
            .fold(0, u64::saturating_add);
        let mut unload: Vec<usize> = Vec::new();
        if self.budget > 0 {
            let idle = |i: usize| e[i].wanted && !in_use.contains(&self.specs[i].name);
            // The queen's choice first (it also knows the jobs it still holds for this pool),
            // then our own least recently used.
            let mut order: Vec<usize> = evict
                .iter()
                .filter_map(|m| self.index(m))
                .filter(|&i| idle(i))
                .collect();
            let mut lru: Vec<usize> = (0..e.len())
                .filter(|&i| idle(i) && !order.contains(&i))
                .collect();
            lru.sort_by_key(|&i| e[i].last_used);
            let queen_named = order.len();
            order.extend(lru);
            for (n, i) in order.into_iter().enumerate() {
                // Named by the queen: unloaded even if the model fits without (its predictions
                // assume it); ours only while the budget needs it.
                if n >= queen_named && used.saturating_add(need) <= self.budget {
                    break;
                }
                used = used.saturating_sub(self.cost(i, &e[i]));
                unload.push(i);
            }
            if used.saturating_add(need) > self.budget {
                return Err(Error::OverBudget {
                    model: model.to_owned(),
                    need,
                    budget: self.budget,
                    in_use: used,
                });
            }
        }
        for &i in &unload {
            e[i].unload();
        }
        let w = &mut e[want];
        w.wanted = true;
        w.load_started = Some(now);
        w.ready.iter_mut().for_each(|r| *r = false);
        drop(e);
        self.bump();
        Ok(unload
            .into_iter()
            .map(|i| self.specs[i].name.clone())
            .collect())
    }

    /// Stops wanting `model` (its load failed): its workers are stopped.
    pub fn drop_model(&self, model: &str) {
        let Some(i) = self.index(model) else { return };
        self.lock()[i].unload();
        self.bump();
    }

    /// A slot's worker for `model` became ready (or stopped being so). Returns true when this
    /// made the model warm: its load time is then recorded.
    pub fn set_ready(&self, model: &str, slot: u32, ready: bool) -> bool {
        let Some(i) = self.index(model) else {
            return false;
        };
        let mut e = self.lock();
        let m = &mut e[i];
        let Some(r) = m.ready.get_mut(slot as usize) else {
            return false;
        };
        if *r == ready || !m.wanted {
            return false;
        }
        *r = ready;
        let warm = m.ready.iter().all(|r| *r);
        if warm && let Some(t) = m.load_started.take() {
            m.load_us = u64::try_from(t.elapsed().as_micros())
                .unwrap_or(u64::MAX)
                .max(1);
        }
        drop(e);
        self.bump();
        warm
    }

    /// A job of `model` is starting: it becomes the most recently used.
    pub fn touch(&self, model: &str) {
        if let Some(i) = self.index(model) {
            self.lock()[i].last_used = Instant::now();
        }
    }

    /// The memory `model` was measured to take while warm. Its load was admitted on an
    /// estimate (its file size); when the measurement pushes the pool over its budget, the least
    /// recently used other models not in `in_use` are unloaded until it fits again. Returns
    /// them.
    pub fn set_footprint(&self, model: &str, bytes: u64, in_use: &HashSet<String>) -> Vec<String> {
        let Some(me) = self.index(model) else {
            return Vec::new();
        };
        let mut e = self.lock();
        e[me].footprint = bytes;
        let mut unload = Vec::new();
        if self.budget > 0 {
            let mut used: u64 = (0..e.len())
                .filter(|&i| e[i].wanted)
                .map(|i| self.cost(i, &e[i]))
                .fold(0, u64::saturating_add);
            let mut lru: Vec<usize> = (0..e.len())
                .filter(|&i| i != me && e[i].wanted && !in_use.contains(&self.specs[i].name))
                .collect();
            lru.sort_by_key(|&i| e[i].last_used);
            for i in lru {
                if used <= self.budget {
                    break;
                }
                used = used.saturating_sub(self.cost(i, &e[i]));
                e[i].unload();
                unload.push(self.specs[i].name.clone());
            }
        }
        drop(e);
        self.bump();
        unload
    }

    /// The last measured cold load of `model` (0 = never measured).
    pub fn load_us(&self, model: &str) -> u64 {
        self.index(model).map_or(0, |i| self.lock()[i].load_us)
    }

    pub fn footprint(&self, model: &str) -> u64 {
        self.index(model).map_or(0, |i| {
            let e = self.lock();
            self.cost(i, &e[i])
        })
    }

    pub fn set_figures(&self, model: &str, f: Figures) {
        if let Some(i) = self.index(model) {
            self.lock()[i].figures = Some(f);
            self.bump();
        }
    }

    /// Folds in one real job's first-token time (moving average, weight 1/4 for the newest).
    pub fn observe_first_token(&self, model: &str, us: u64) {
        if let Some(i) = self.index(model) {
            let e = &mut self.lock()[i];
            let old = e.first_token_us;
            e.first_token_us = if old == 0 { us } else { old - old / 4 + us / 4 }.max(1);
        }
    }

    pub fn figures(&self, model: &str) -> Option<Figures> {
        self.index(model).and_then(|i| self.lock()[i].figures)
    }

    /// The least time a job of `model` needs before its first token: its measured first
    /// token, plus its measured load when it is not warm (zero while unmeasured).
    pub fn first_token_floor(&self, model: &str) -> std::time::Duration {
        let Some(i) = self.index(model) else {
            return std::time::Duration::ZERO;
        };
        let e = self.lock();
        let m = &e[i];
        // Real jobs' times once there are some: the warm-up's prompt is shorter than most.
        let first = match m.first_token_us {
            0 => m.figures.map_or(0, |f| f.first_token_us),
            n => n,
        };
        let load = if m.wanted { 0 } else { m.load_us };
        std::time::Duration::from_micros(first.saturating_add(load))
    }

    /// Every model's state, as heartbeats and the session's `Models` event carry it.
    pub fn states(&self) -> Vec<ModelState> {
        let e = self.lock();
        self.specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let m = &e[i];
                let warm = m.wanted && m.ready.iter().all(|r| *r);
                ModelState {
                    model: s.name.clone(),
                    warm,
                    loading: m.wanted && !warm,
                    load_us: m.load_us,
                    footprint_bytes: self.cost(i, m),
                }
            })
            .collect()
    }
}

/// `--memory-budget`: a size with an optional unit (`512M`, `8G`, `1.5GiB`, `123456`), or `0`
/// for no limit.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: use e.g. 512M, 8G or a number of bytes"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        u => return Err(format!("unknown size unit {u:?}: use K, M, G or T")),
    };
    let bytes = n * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(budget: u64, sizes: &[(&str, u64)]) -> ModelSet {
        let specs = sizes
            .iter()
            .map(|(n, b)| ModelSpec {
                name: (*n).into(),
                args: Vec::new(),
                file_bytes: *b,
            })
            .collect();
        ModelSet::new(specs, budget, 2)
    }

    fn warm_up(s: &ModelSet, m: &str) {
        s.set_ready(m, 0, true);
        s.set_ready(m, 1, true);
    }

    fn none() -> HashSet<String> {
        HashSet::new()
    }

    #[test]
    fn a_model_is_warm_only_when_every_slot_is_ready_and_its_load_is_timed_then() {
        let s = set(0, &[("a", 10)]);
        assert!(s.request("a", &[], &none()).unwrap().is_empty());
        assert!(!s.set_ready("a", 0, true));
        let st = &s.states()[0];
        assert!(st.loading && !st.warm && st.load_us == 0);
        assert!(s.set_ready("a", 1, true));
        let st = &s.states()[0];
        assert!(st.warm && !st.loading && st.load_us > 0);
        assert_eq!(s.warm(), vec!["a".to_owned()]);
    }

    #[test]
    fn the_least_recently_used_idle_model_is_unloaded_when_one_more_must_fit() {
        let s = set(250, &[("a", 100), ("b", 100), ("c", 100)]);
        s.request("a", &[], &none()).unwrap();
        warm_up(&s, "a");
        s.request("b", &[], &none()).unwrap();
        warm_up(&s, "b");
        s.touch("a"); // b is now the least recently used
        let out = s.request("c", &[], &none()).unwrap();
        assert_eq!(out, vec!["b".to_owned()]);
        assert_eq!(s.wanted(), vec!["a".to_owned(), "c".to_owned()]);
    }

    #[test]
    fn a_model_with_jobs_is_never_unloaded_and_a_load_that_cannot_fit_is_refused() {
        let s = set(150, &[("a", 100), ("b", 100)]);
        s.request("a", &[], &none()).unwrap();
        warm_up(&s, "a");
        let busy: HashSet<String> = ["a".to_owned()].into();
        // Even when the queen names it.
        let err = s.request("b", &["a".to_owned()], &busy).unwrap_err();
        assert!(matches!(err, Error::OverBudget { .. }), "{err}");
        assert_eq!(s.wanted(), vec!["a".to_owned()], "nothing changed");
        assert!(s.is_warm("a"));
        // Once idle it goes.
        assert_eq!(s.request("b", &[], &none()).unwrap(), vec!["a".to_owned()]);
    }

    #[test]
    fn the_queens_choice_is_unloaded_first_and_the_budget_is_never_exceeded() {
        let s = set(300, &[("a", 100), ("b", 100), ("c", 100), ("d", 100)]);
        for m in ["a", "b", "c"] {
            s.request(m, &[], &none()).unwrap();
            warm_up(&s, m);
        }
        s.touch("c");
        // LRU would be a; the queen names c.
        assert_eq!(
            s.request("d", &["c".to_owned()], &none()).unwrap(),
            vec!["c".to_owned()]
        );
        let used: u64 = s
            .states()
            .iter()
            .filter(|m| m.warm || m.loading)
            .map(|m| m.footprint_bytes)
            .sum();
        assert!(used <= 300, "{used}");
    }

    #[test]
    fn a_measured_footprint_replaces_the_file_size() {
        let s = set(0, &[("a", 100)]);
        assert_eq!(s.footprint("a"), 100);
        s.set_footprint("a", 180, &none());
        assert_eq!(s.states()[0].footprint_bytes, 180);
    }

    #[test]
    fn a_model_measured_larger_than_its_estimate_makes_room_by_unloading_idle_ones() {
        // Admitted on its file size (0, as a synthetic model), then measured at 90.
        let s = set(150, &[("a", 0), ("b", 0), ("c", 0)]);
        for m in ["a", "b"] {
            s.request(m, &[], &none()).unwrap();
            warm_up(&s, m);
        }
        s.set_footprint("a", 90, &none());
        s.set_footprint("b", 50, &none());
        s.request("c", &[], &none()).unwrap();
        warm_up(&s, "c");
        let busy: HashSet<String> = ["a".to_owned()].into();
        // 90 + 50 + 60 > 150: b (idle) goes; a is busy; c itself stays.
        assert_eq!(s.set_footprint("c", 60, &busy), vec!["b".to_owned()]);
        assert_eq!(s.wanted(), vec!["a".to_owned(), "c".to_owned()]);
    }

    #[test]
    fn sizes_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
        assert!(parse_size("5Q").unwrap_err().contains("unknown size unit"));
    }
}
