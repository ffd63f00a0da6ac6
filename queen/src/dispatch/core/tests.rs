//! Property tests of the dispatch core on a simulated clock: random pools, arrival traces,
//! cancels and pool failures, with no real sleeps.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use proptest::prelude::*;

use super::*;

const MS: Micros = 1000;

#[derive(Debug, Clone)]
struct PoolSpec {
    slots: u32,
    first_token: Micros,
    per_token: Micros,
    /// Models on demand: the memory budget (0 = unlimited) and, for models `m` and `n`,
    /// whether each starts warm and its load time. `None`: `m` only, always warm, no reports.
    loads: Option<(u64, [(bool, Micros); 2])>,
}

/// Every model takes this much memory in the simulated pools.
const FOOTPRINT: u64 = 100;
const MODELS: [&str; 2] = ["m", "n"];

#[derive(Debug, Clone)]
struct Arrival {
    model: &'static str,
    after: Micros,
    max_tokens: u32,
    budget: Micros,
    /// Cancel this job this long after it arrives.
    cancel_after: Option<Micros>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrive(usize),
    Finish {
        node: String,
        slot: u32,
        key: JobKey,
    },
    Cancel(usize),
    Kill(String),
    Tick,
    /// A load the pool started is done.
    Loaded {
        node: String,
        model: String,
    },
}

/// A pool as the core's ledger assumes it: a FIFO per slot, one job running per slot.
struct SimPool {
    spec: PoolSpec,
    alive: bool,
    /// Waiting jobs per slot, as (order, arrival, key): the pool starts the smallest.
    queues: Vec<BTreeSet<(u64, u64, JobKey)>>,
    running: Vec<Option<JobKey>>,
    /// Per model: warm, or loading (ready at). Empty when the pool does not report models.
    warm: BTreeMap<String, bool>,
    loading: BTreeMap<String, Micros>,
}

struct Sim {
    core: Core,
    now: Micros,
    seq: u64,
    events: BinaryHeap<Reverse<(Micros, u64, Ev)>>,
    pools: BTreeMap<String, SimPool>,
    arrivals: Vec<Arrival>,
    keys: HashMap<usize, JobKey>,
    progress: HashMap<JobKey, Arc<Progress>>,
    max_tokens: HashMap<JobKey, u32>,
    admitted: Vec<JobKey>,
    ends: HashMap<JobKey, Vec<Outcome>>,
    sent_after_end: Vec<JobKey>,
    model_of: HashMap<JobKey, &'static str>,
    /// Broken promises of the models protocol: an eviction of a model with work at the pool,
    /// or a load the budget could not take.
    model_faults: Vec<String>,
    /// Loads each pool started, per model.
    loads: BTreeMap<(String, String), usize>,
}

impl Sim {
    fn new(policy: Policy, pools: &[PoolSpec], arrivals: Vec<Arrival>) -> Sim {
        let mut core = Core::new(Config {
            policy,
            max_queued: 10_000,
            max_live: 10_000,
            caller_share: SIM_SHARE,
            ..Config::default()
        });
        let mut sim_pools = BTreeMap::new();
        for (i, p) in pools.iter().enumerate() {
            let id = format!("node-{i}");
            let served: &[&str] = if p.loads.is_some() {
                &MODELS
            } else {
                &MODELS[..1]
            };
            // The pool measured itself at warm-up: its figures are its true speed.
            for m in served {
                core.figures(
                    &id,
                    m,
                    Figures {
                        first_token_us: p.first_token,
                        per_token_us: p.per_token,
                    },
                );
            }
            let mut warm = BTreeMap::new();
            if let Some((_, models)) = &p.loads {
                for (m, (w, _)) in MODELS.iter().zip(models) {
                    warm.insert((*m).to_owned(), *w);
                }
            }
            let pool = SimPool {
                spec: p.clone(),
                alive: true,
                queues: vec![BTreeSet::new(); p.slots as usize],
                running: vec![None; p.slots as usize],
                warm,
                loading: BTreeMap::new(),
            };
            if let Some((states, budget)) = pool.report() {
                core.model_states(0, &id, states, budget);
            }
            core.node_up(
                0,
                &id,
                p.slots,
                2,
                served.iter().map(|m| (*m).into()).collect(),
            );
            sim_pools.insert(id, pool);
        }
        let mut sim = Sim {
            core,
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            pools: sim_pools,
            arrivals: Vec::new(),
            keys: HashMap::new(),
            progress: HashMap::new(),
            max_tokens: HashMap::new(),
            admitted: Vec::new(),
            ends: HashMap::new(),
            sent_after_end: Vec::new(),
            model_of: HashMap::new(),
            model_faults: Vec::new(),
            loads: BTreeMap::new(),
        };
        let mut t = 0;
        for (i, a) in arrivals.iter().enumerate() {
            t += a.after;
            sim.at(t, Ev::Arrive(i));
            if let Some(c) = a.cancel_after {
                sim.at(t + c, Ev::Cancel(i));
            }
        }
        sim.arrivals = arrivals;
        sim
    }

    fn at(&mut self, t: Micros, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((t, self.seq, ev)));
    }

    /// Predicted finish and deadline of every job on every slot.
    fn predictions(&self) -> HashMap<JobKey, (Micros, Micros)> {
        let mut out = HashMap::new();
        for node in self.core.nodes.values().filter(|n| n.up) {
            for s in 0..node.slots.len() {
                for p in self.core.predict(self.now, node, s) {
                    out.insert(p.key, (p.finish, p.deadline));
                }
            }
        }
        out
    }

    fn apply_actions(&mut self) {
        loop {
            let actions = self.core.take_actions();
            if actions.is_empty() {
                return;
            }
            self.apply(actions);
        }
    }

    fn apply(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send {
                    key,
                    node,
                    slot,
                    order,
                    evict,
                    ..
                } => {
                    if self.ends.contains_key(&key) {
                        self.sent_after_end.push(key);
                    }
                    let Some(pool) = self.pools.get(&node) else {
                        continue;
                    };
                    if !pool.alive {
                        continue;
                    }
                    if pool.spec.loads.is_some() && !self.load(&node, key, &evict) {
                        continue;
                    }
                    let pool = self.pools.get_mut(&node).expect("checked above");
                    self.seq += 1;
                    pool.queues[slot as usize].insert((order, self.seq, key));
                    self.start_next(&node, slot);
                }
                Action::Cancel { key, node } => {
                    let Some(pool) = self.pools.get_mut(&node) else {
                        continue;
                    };
                    if !pool.alive {
                        continue;
                    }
                    for q in &mut pool.queues {
                        if let Some(e) = q.iter().find(|e| e.2 == key).copied() {
                            q.remove(&e);
                            self.core.ended(
                                self.now,
                                key,
                                &node,
                                Report::Failed {
                                    code: CODE_CANCELLED,
                                    message: "cancelled".into(),
                                },
                            );
                        }
                    }
                    // A running job stops at its next token and reports the cancel (see Finish).
                    let stop = self.now + pool.spec.per_token;
                    let running = pool
                        .running
                        .iter()
                        .position(|r| *r == Some(key))
                        .map(|s| s as u32);
                    if let Some(slot) = running {
                        self.at(stop, Ev::Finish { node, slot, key });
                    }
                }
                Action::End { key, outcome } => {
                    self.ends.entry(key).or_default().push(outcome);
                }
            }
        }
    }

    /// What the pool does with a job for a model that is not warm: it unloads what the queen
    /// named, then starts the load if the budget takes it; otherwise it fails the job
    /// (UNAVAILABLE). False when the job was failed.
    fn load(&mut self, node: &str, key: JobKey, evict: &[String]) -> bool {
        let model = self.model_of[&key];
        let now = self.now;
        let pool = self.pools.get_mut(node).expect("pool");
        if pool.warm[model] || pool.loading.contains_key(model) {
            return true;
        }
        for e in evict {
            let busy = pool
                .queues
                .iter()
                .flatten()
                .map(|q| q.2)
                .chain(pool.running.iter().flatten().copied())
                .any(|k| self.model_of[&k] == e.as_str());
            if busy || pool.loading.contains_key(e) {
                self.model_faults
                    .push(format!("{node}: evicted {e}, which had work there"));
            }
            pool.warm.insert(e.clone(), false);
        }
        let (budget, loads) = pool.spec.loads.expect("a pool with models");
        let resident = pool.warm.values().filter(|w| **w).count() + pool.loading.len();
        if budget > 0 && (resident as u64 + 1) * FOOTPRINT > budget {
            self.model_faults
                .push(format!("{node}: asked to load {model} beyond its budget"));
            self.core.ended(
                now,
                key,
                node,
                Report::Failed {
                    code: CODE_UNAVAILABLE,
                    message: "over budget".into(),
                },
            );
            return false;
        }
        let load_us = loads[MODELS.iter().position(|m| *m == model).expect("known")].1;
        pool.loading.insert(model.to_owned(), now + load_us);
        *self
            .loads
            .entry((node.to_owned(), model.to_owned()))
            .or_default() += 1;
        let report = pool.report();
        self.at(
            now + load_us,
            Ev::Loaded {
                node: node.to_owned(),
                model: model.to_owned(),
            },
        );
        if let Some((states, budget)) = report {
            self.core.model_states(now, node, states, budget);
        }
        true
    }

    fn start_next(&mut self, node: &str, slot: u32) {
        let pool = self.pools.get_mut(node).expect("pool");
        let s = slot as usize;
        if pool.running[s].is_some() {
            return;
        }
        // The job whose turn it is waits for its model to be ready.
        let Some(&(_, _, key)) = pool.queues[s].first() else {
            return;
        };
        if pool.spec.loads.is_some() && !pool.warm[self.model_of[&key]] {
            return;
        }
        pool.queues[s].pop_first();
        pool.running[s] = Some(key);
        let tokens = u64::from(self.max_tokens[&key]);
        let took = pool.spec.first_token + pool.spec.per_token * tokens.saturating_sub(1);
        self.progress[&key].started(self.now);
        let end = self.now + took;
        self.at(
            end,
            Ev::Finish {
                node: node.to_owned(),
                slot,
                key,
            },
        );
    }

    fn run(&mut self, check: bool) {
        while let Some(Reverse((t, _, ev))) = self.events.pop() {
            self.now = t;
            match ev {
                Ev::Arrive(i) => {
                    let a = self.arrivals[i].clone();
                    let before = self.predictions();
                    let caller = sim_caller(i);
                    let spec = JobSpec {
                        prompt_bytes: 0,
                        pace_us: 0,
                        model: a.model.into(),
                        max_tokens: a.max_tokens,
                        deadline: self.now + a.budget,
                        caller: Arc::clone(&caller),
                        caller_share: None,
                    };
                    let live_before = self.core.live_of(&caller);
                    let r = self.core.submit(self.now, spec);
                    if let Err(Refusal::CallerShare { share, .. }) = &r {
                        assert_eq!(*share, SIM_SHARE);
                        assert!(live_before >= SIM_SHARE, "refused below its share");
                    }
                    if let Ok(adm) = &r {
                        self.model_of.insert(adm.key, a.model);
                        self.keys.insert(i, adm.key);
                        self.progress.insert(adm.key, Arc::clone(&adm.progress));
                        self.max_tokens.insert(adm.key, a.max_tokens);
                        self.admitted.push(adm.key);
                        if check && self.core.policy() == Policy::Reserve {
                            assert!(
                                adm.predicted_finish <= self.now + a.budget,
                                "admitted job {} predicted past its deadline",
                                adm.key
                            );
                        }
                    }
                    if check && self.core.policy() == Policy::Reserve {
                        let after = self.predictions();
                        for (key, (finish, deadline)) in &before {
                            if finish <= deadline
                                && let Some((f2, d2)) = after.get(key)
                            {
                                assert!(
                                    f2 <= d2,
                                    "admitting a job made job {key} late: {f2} > {d2}"
                                );
                            }
                        }
                    }
                    self.apply_actions();
                }
                Ev::Finish { node, slot, key } => {
                    let pool = self.pools.get_mut(&node).expect("pool");
                    if !pool.alive || pool.running[slot as usize] != Some(key) {
                        continue;
                    }
                    pool.running[slot as usize] = None;
                    // The pool starts its next job at once, before the queen hears of this end.
                    self.start_next(&node, slot);
                    let pool = self.pools.get_mut(&node).expect("pool");
                    let tokens = self.max_tokens[&key];
                    let (ft, pt) = (pool.spec.first_token, pool.spec.per_token);
                    for _ in 0..tokens {
                        self.progress[&key].token(self.now);
                    }
                    let cancelled = self
                        .ends
                        .get(&key)
                        .is_some_and(|e| e.contains(&Outcome::Cancelled));
                    let report = if cancelled {
                        Report::Failed {
                            code: CODE_CANCELLED,
                            message: "cancelled".into(),
                        }
                    } else {
                        Report::Finished {
                            worker_first_token_us: ft,
                            generation_us: pt * u64::from(tokens.saturating_sub(1)),
                            tokens,
                        }
                    };
                    self.core.ended(self.now, key, &node, report);
                    self.apply_actions();
                    self.start_next(&node, slot);
                }
                Ev::Cancel(i) => {
                    if let Some(key) = self.keys.get(&i) {
                        self.core.cancel(self.now, *key);
                        self.apply_actions();
                    }
                }
                Ev::Kill(node) => {
                    if let Some(pool) = self.pools.get_mut(&node) {
                        pool.alive = false;
                    }
                    self.core.node_down(self.now, &node);
                    self.apply_actions();
                }
                Ev::Tick => {
                    self.core.tick(self.now);
                    self.apply_actions();
                }
                Ev::Loaded { node, model } => {
                    let pool = self.pools.get_mut(&node).expect("pool");
                    if !pool.alive || pool.loading.remove(&model).is_none() {
                        continue;
                    }
                    pool.warm.insert(model, true);
                    if let Some((states, budget)) = pool.report() {
                        self.core.model_states(self.now, &node, states, budget);
                    }
                    self.apply_actions();
                    for slot in 0..self.pools[&node].running.len() as u32 {
                        self.start_next(&node, slot);
                    }
                }
            }
            self.assert_caller_counts();
        }
        // Let time pass until everything has ended.
        for _ in 0..10_000 {
            if self.core.live() == 0 {
                break;
            }
            self.now += 100 * MS;
            self.core.tick(self.now);
            self.apply_actions();
        }
    }

    /// The core's per-caller counts are exactly its live jobs per caller, and none exceeds the
    /// share (every job here came in through `submit`).
    fn assert_caller_counts(&self) {
        let mut truth: HashMap<Arc<str>, u32> = HashMap::new();
        for job in self.core.jobs.values() {
            *truth.entry(Arc::clone(&job.spec.caller)).or_default() += 1;
        }
        for c in 0..SIM_CALLERS {
            let caller = sim_caller(c);
            let want = truth.get(&caller).copied().unwrap_or(0);
            assert_eq!(
                self.core.live_of(&caller),
                want,
                "caller {caller} miscounted"
            );
            assert!(want <= SIM_SHARE, "caller {caller} holds {want} jobs");
        }
        assert_eq!(self.core.callers.len(), truth.len(), "a stale caller entry");
    }

    fn assert_every_admitted_job_ended_once(&self) {
        assert_eq!(self.core.live(), 0, "jobs still live at the end");
        for key in &self.admitted {
            let ends = self.ends.get(key).map_or(0, Vec::len);
            assert_eq!(
                ends,
                1,
                "job {key} ended {ends} times: {:?}",
                self.ends.get(key)
            );
        }
        assert_eq!(
            self.ends.len(),
            self.admitted.len(),
            "an End for a job never admitted"
        );
        assert!(
            self.sent_after_end.is_empty(),
            "sent after its end: {:?}",
            self.sent_after_end
        );
    }
}

impl SimPool {
    /// The pool's models as its reports say (`None`: it reports none).
    fn report(&self) -> Option<(Vec<ModelState>, u64)> {
        let (budget, loads) = self.spec.loads?;
        let states = MODELS
            .iter()
            .zip(loads)
            .map(|(m, (_, load_us))| ModelState {
                model: (*m).into(),
                warm: self.warm[*m],
                loading: self.loading.contains_key(*m),
                load_us,
                footprint_bytes: FOOTPRINT,
            })
            .collect();
        Some((states, budget))
    }
}

/// Tenants in the simulated traces (arrival i belongs to tenant i mod SIM_CALLERS), and the
/// share each may hold: small enough that long traces hit it.
const SIM_CALLERS: usize = 3;
const SIM_SHARE: u32 = 12;

fn sim_caller(arrival: usize) -> Arc<str> {
    Arc::from(format!("caller-{}", arrival % SIM_CALLERS))
}

fn pools() -> impl Strategy<Value = Vec<PoolSpec>> {
    prop::collection::vec(
        (1u32..=4, 1u64..=50, 1u64..=20).prop_map(|(slots, ft, pt)| PoolSpec {
            slots,
            first_token: ft * MS,
            per_token: pt * MS,
            loads: None,
        }),
        1..=3,
    )
}

fn arrivals(cancels: bool) -> impl Strategy<Value = Vec<Arrival>> {
    prop::collection::vec(
        (
            0u64..=30,
            1u32..=64,
            10u64..=3000,
            prop::option::weighted(0.2, 0u64..=500),
        )
            .prop_map(move |(after, max_tokens, budget, cancel)| Arrival {
                model: "m",
                after: after * MS,
                max_tokens,
                budget: budget * MS,
                cancel_after: cancel.filter(|_| cancels).map(|c| c * MS),
            }),
        1..=150,
    )
}

/// Pools serving two models with loads: budgets that fit one model, both, or no limit.
fn pools_with_loads() -> impl Strategy<Value = Vec<PoolSpec>> {
    prop::collection::vec(
        (
            1u32..=3,
            1u64..=50,
            1u64..=20,
            prop::sample::select(vec![0u64, FOOTPRINT, 2 * FOOTPRINT]),
            any::<bool>(),
            10u64..=1500,
            10u64..=1500,
        )
            .prop_map(|(slots, ft, pt, budget, m_warm, lm, ln)| PoolSpec {
                slots,
                first_token: ft * MS,
                per_token: pt * MS,
                loads: Some((budget, [(m_warm, lm * MS), (false, ln * MS)])),
            }),
        1..=3,
    )
}

/// Arrivals for either model.
fn arrivals_two(cancels: bool) -> impl Strategy<Value = Vec<Arrival>> {
    (arrivals(cancels), prop::collection::vec(any::<bool>(), 150)).prop_map(|(mut a, which)| {
        for (x, n) in a.iter_mut().zip(which) {
            x.model = if n { "n" } else { "m" };
        }
        a
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Models on demand: with honest load times and figures, every admitted job (cold loads,
    /// drains and grouping included) finishes by its deadline, no admission makes another job
    /// late, the queen never evicts a model with work at the pool nor asks for a load the
    /// budget cannot take.
    #[test]
    fn admitted_jobs_finish_in_time_with_loads(
        pools in pools_with_loads(),
        arrivals in arrivals_two(false),
    ) {
        let mut sim = Sim::new(Policy::Reserve, &pools, arrivals);
        sim.run(true);
        sim.assert_every_admitted_job_ended_once();
        prop_assert!(sim.model_faults.is_empty(), "{:?}", sim.model_faults);
        for key in &sim.admitted {
            prop_assert_eq!(&sim.ends[key][0], &Outcome::Done, "job {} missed", key);
        }
        // Where both models fit, nothing is evicted: each is loaded once at most.
        for ((node, model), n) in &sim.loads {
            let budget = sim.pools[node].spec.loads.expect("models").0;
            if budget != FOOTPRINT {
                prop_assert!(*n <= 1, "{} loaded {} {} times", node, model, n);
            }
        }
    }

    /// The same with cancels, ticks and a pool dying: every admitted job ends exactly once.
    #[test]
    fn every_job_ends_once_with_loads(
        pools in pools_with_loads(),
        arrivals in arrivals_two(true),
        kill_at in prop::option::of(0u64..=2000),
        ticks in 0u64..=40,
    ) {
        let n = pools.len();
        let mut sim = Sim::new(Policy::Reserve, &pools, arrivals);
        if let Some(k) = kill_at {
            sim.at(k * MS, Ev::Kill(format!("node-{}", (k as usize) % n)));
        }
        for i in 0..ticks {
            sim.at(i * 50 * MS, Ev::Tick);
        }
        sim.run(true);
        sim.assert_every_admitted_job_ended_once();
        prop_assert!(sim.model_faults.is_empty(), "{:?}", sim.model_faults);
    }

    /// With honest warm-up figures, admission by reservation keeps every promise: each admitted
    /// job is predicted on time when admitted, no admission makes another job late, and every
    /// admitted job then really finishes by its deadline on the simulated pools.
    #[test]
    fn admitted_jobs_finish_in_time(pools in pools(), arrivals in arrivals(false)) {
        let mut sim = Sim::new(Policy::Reserve, &pools, arrivals);
        sim.run(true);
        sim.assert_every_admitted_job_ended_once();
        for key in &sim.admitted {
            prop_assert_eq!(&sim.ends[key][0], &Outcome::Done, "job {} missed", key);
        }
    }

    /// Cancels, ticks and a pool dying mid-trace: every admitted job still ends exactly once,
    /// and the admission invariants hold at every submit.
    #[test]
    fn every_admitted_job_ends_exactly_once(
        pools in pools(),
        arrivals in arrivals(true),
        kill_at in prop::option::of(0u64..=2000),
        ticks in 0u64..=40,
    ) {
        let n = pools.len();
        let mut sim = Sim::new(Policy::Reserve, &pools, arrivals);
        if let Some(k) = kill_at {
            sim.at(k * MS, Ev::Kill(format!("node-{}", (k as usize) % n)));
        }
        for i in 0..ticks {
            sim.at(i * 50 * MS, Ev::Tick);
        }
        sim.run(true);
        sim.assert_every_admitted_job_ended_once();
    }

    /// The comparison policies (no admission) also account for every job exactly once.
    #[test]
    fn baselines_end_every_job_once(pools in pools(), arrivals in arrivals(true), edf in any::<bool>()) {
        let policy = if edf { Policy::Edf } else { Policy::Fcfs };
        let mut sim = Sim::new(policy, &pools, arrivals);
        sim.run(false);
        sim.assert_every_admitted_job_ended_once();
    }
}

fn one_pool(slots: u32, first_token: Micros, per_token: Micros) -> Core {
    let mut core = Core::new(Config::default());
    core.figures(
        "n",
        "m",
        Figures {
            first_token_us: first_token,
            per_token_us: per_token,
        },
    );
    core.node_up(0, "n", slots, 2, vec!["m".into()]);
    core
}

fn spec(max_tokens: u32, deadline: Micros) -> JobSpec {
    spec_of("c", max_tokens, deadline)
}

fn spec_of(caller: &str, max_tokens: u32, deadline: Micros) -> JobSpec {
    JobSpec {
        prompt_bytes: 0,
        pace_us: 0,
        model: "m".into(),
        max_tokens,
        deadline,
        caller: Arc::from(caller),
        caller_share: None,
    }
}

#[test]
fn a_caller_at_its_share_is_refused_while_others_are_admitted() {
    let mut core = Core::new(Config {
        caller_share: 3,
        ..Config::default()
    });
    core.figures(
        "n",
        "m",
        Figures {
            first_token_us: MS,
            per_token_us: MS,
        },
    );
    core.node_up(0, "n", 1, 2, vec!["m".into()]);
    let deadline = 3_600 * 1_000 * MS;
    let a: Vec<JobKey> = (0..3)
        .map(|_| core.submit(0, spec_of("a", 10, deadline)).unwrap().key)
        .collect();
    let r = core.submit(0, spec_of("a", 10, deadline));
    assert!(
        matches!(r, Err(Refusal::CallerShare { share: 3, .. })),
        "{r:?}"
    );
    // Another tenant is unaffected, and a token's own share overrides the default.
    core.submit(0, spec_of("b", 10, deadline)).unwrap();
    let mut big = spec_of("a", 10, deadline);
    big.caller_share = Some(4);
    let extra = core.submit(0, big).unwrap().key;
    assert_eq!(core.live_of("a"), 4);
    // A job cancelled while waiting gives its place back at once...
    assert!(core.cancel(0, extra));
    assert_eq!(core.live_of("a"), 3);
    // ...one at a pool when the pool reports its end.
    core.ended(
        5 * MS,
        a[0],
        "n",
        Report::Finished {
            worker_first_token_us: MS,
            generation_us: 9 * MS,
            tokens: 10,
        },
    );
    assert_eq!(core.live_of("a"), 2);
    core.submit(5 * MS, spec_of("a", 10, deadline)).unwrap();
}

#[test]
fn cold_start_refuses_what_the_warm_up_figures_say_cannot_fit() {
    // 200 tokens/s and 20 ms to a first token, measured at warm-up.
    let mut core = one_pool(1, 20 * MS, 5 * MS);
    let r = core.submit(0, spec(8000, 200 * MS));
    assert!(matches!(r, Err(Refusal::Infeasible { .. })), "{r:?}");
    assert!(core.take_actions().is_empty(), "nothing may reach a pool");
    // A job that fits is admitted and sent at once.
    let ok = core.submit(0, spec(8, 200 * MS)).unwrap();
    assert!(ok.predicted_finish <= 200 * MS);
    assert!(matches!(core.take_actions()[..], [Action::Send { .. }]));
}

#[test]
fn a_model_nobody_measured_gets_the_conservative_prior_not_zero() {
    let mut core = Core::new(Config::default());
    core.node_up(0, "n", 1, 2, vec!["m".into()]);
    assert!(matches!(
        core.submit(0, spec(100, 1_000 * MS)),
        Err(Refusal::Infeasible { .. })
    ));
}

#[test]
fn a_later_arrival_that_would_make_an_admitted_job_late_is_refused() {
    // One slot; every job costs 5 + 30 + 15*(n-1) ms at the figures' margin.
    let mut core = one_pool(1, 20 * MS, 10 * MS);
    let cost = core.cost_of("n", "m", &cost_spec(10)).unwrap();
    // A: admitted with little slack.
    core.submit(0, spec(10, cost + 10 * MS)).unwrap();
    // B: same size, a deadline that fits after A.
    core.submit(0, spec(10, 2 * cost + 10 * MS)).unwrap();
    // C: an earlier deadline than B would jump ahead of it in EDF order and make B late.
    let c = core.submit(0, spec(10, 2 * cost + 5 * MS));
    assert!(matches!(c, Err(Refusal::Infeasible { .. })), "{c:?}");
}

#[test]
fn placement_prefers_the_pool_that_finishes_first() {
    let mut core = Core::new(Config::default());
    for (id, per_token) in [("laptop", 50 * MS), ("gaming-pc", 5 * MS)] {
        core.figures(
            id,
            "m",
            Figures {
                first_token_us: 10 * MS,
                per_token_us: per_token,
            },
        );
        core.node_up(0, id, 1, 2, vec!["m".into()]);
    }
    let a = core.submit(0, spec(50, 60_000 * MS)).unwrap();
    assert_eq!(a.node, "gaming-pc");
}

#[test]
fn a_job_predicted_late_is_never_sent() {
    let mut core = one_pool(1, 10 * MS, 10 * MS);
    let cost = core.cost_of("n", "m", &cost_spec(10)).unwrap();
    let a = core.submit(0, spec(10, 10 * cost)).unwrap();
    // Credit for two more at the pool; fill it.
    core.submit(0, spec(10, 10 * cost)).unwrap();
    core.submit(0, spec(10, 10 * cost)).unwrap();
    let d = core.submit(0, spec(10, 10 * cost)).unwrap();
    core.take_actions();
    // The running job stalls: its first token never comes, so by the time the slot frees, d's
    // predicted finish is past its deadline.
    let late = 10 * cost - cost / 2;
    core.ended(
        late,
        a.key,
        "n",
        Report::Finished {
            worker_first_token_us: 1,
            generation_us: 1,
            tokens: 10,
        },
    );
    let acts = core.take_actions();
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::Send { key, .. } if *key == d.key)),
        "{acts:?}"
    );
    assert!(acts.iter().any(
        |a| matches!(a, Action::End { key, outcome: Outcome::Missed { .. } } if *key == d.key)
    ));
}

#[test]
fn credits_bound_what_a_pool_holds_per_slot() {
    let mut core = one_pool(1, MS, MS);
    for _ in 0..5 {
        core.submit(0, spec(1, 60_000 * MS)).unwrap();
    }
    let sends = core
        .take_actions()
        .into_iter()
        .filter(|a| matches!(a, Action::Send { .. }))
        .count();
    // One running plus two waiting (credits = 2).
    assert_eq!(sends, 3);
    assert_eq!(core.queued(), 2);
}

#[test]
fn a_lost_pool_sends_its_jobs_elsewhere_within_the_deadline() {
    let mut core = Core::new(Config::default());
    for id in ["a", "b"] {
        core.figures(
            id,
            "m",
            Figures {
                first_token_us: MS,
                per_token_us: MS,
            },
        );
        core.node_up(0, id, 1, 2, vec!["m".into()]);
    }
    let j = core.submit(0, spec(4, 10_000 * MS)).unwrap();
    core.take_actions();
    core.node_down(MS, &j.node);
    let acts = core.take_actions();
    let other = if j.node == "a" { "b" } else { "a" };
    assert!(
        acts.iter().any(|a| matches!(a, Action::Send { key, node, attempt: 2, .. } if *key == j.key && node == other)),
        "{acts:?}"
    );
}

#[test]
fn cancel_of_a_sent_job_ends_it_once_and_holds_the_slot_until_the_pool_answers() {
    let mut core = one_pool(1, MS, MS);
    let j = core.submit(0, spec(4, 10_000 * MS)).unwrap();
    core.take_actions();
    assert!(core.cancel(MS, j.key));
    assert!(
        !core.cancel(MS, j.key),
        "a second cancel is not a second end"
    );
    let acts = core.take_actions();
    assert_eq!(
        acts,
        vec![
            Action::Cancel {
                key: j.key,
                node: "n".into()
            },
            Action::End {
                key: j.key,
                outcome: Outcome::Cancelled
            },
        ]
    );
    assert_eq!(core.running()["n"], 1);
    core.ended(
        2 * MS,
        j.key,
        "n",
        Report::Failed {
            code: CODE_CANCELLED,
            message: "cancelled".into(),
        },
    );
    assert!(core.take_actions().is_empty());
    assert_eq!(core.running()["n"], 0);
    assert_eq!(core.live(), 0);
}

#[test]
fn a_job_sent_to_an_idle_slot_runs_first_even_before_it_starts() {
    // 10 ms per token (×1.5 while these are warm-up figures): A takes 150 ms, B alone 15 ms.
    let mut core = one_pool(1, 10 * MS, 10 * MS);
    let a = core.submit(0, spec(10, 3_600 * 1000 * MS)).unwrap();
    // A went to the idle slot with order 0, so the pool runs it first whatever follows.
    let sent: Vec<u64> = core
        .take_actions()
        .iter()
        .filter_map(|x| match x {
            Action::Send { key, order, .. } if *key == a.key => Some(*order),
            _ => None,
        })
        .collect();
    assert_eq!(sent, [0]);
    // A has not reported `started`; B's earlier deadline must not be treated as letting it run
    // first: behind A it would finish at ~165 ms, after its 100 ms deadline.
    let b = core.submit(MS, spec(1, 100 * MS));
    assert!(matches!(b, Err(Refusal::Infeasible { .. })), "{b:?}");
}

/// A job of `max_tokens` as `cost_of` prices it (no prompt, the tightest pace).
fn cost_spec(max_tokens: u32) -> JobSpec {
    JobSpec {
        model: "m".into(),
        prompt_bytes: 0,
        pace_us: 0,
        max_tokens,
        deadline: 0,
        caller: std::sync::Arc::from("c"),
        caller_share: None,
    }
}
