//! Placement with cold loads on a simulated clock: warm against cold pools, loads that a
//! deadline covers or not, eviction choices, and grouping when a budget fits one model.

use std::sync::Arc;

use super::super::*;

const MS: Micros = 1000;
const S: Micros = 1_000_000;

/// (model, warm, load_us, footprint)
type M<'a> = (&'a str, bool, u64, u64);

/// A pool with every model at 10 ms to first token and 1 ms per token (warm-up figures, ×1.5).
fn pool(core: &mut Core, id: &str, slots: u32, credits: u32, models: &[M<'_>], budget: u64) {
    for (m, ..) in models {
        core.figures(
            id,
            m,
            Figures {
                first_token_us: 10 * MS,
                per_token_us: MS,
            },
        );
    }
    let states = models
        .iter()
        .map(|(m, warm, load_us, footprint)| ModelState {
            model: (*m).into(),
            warm: *warm,
            loading: false,
            load_us: *load_us,
            footprint_bytes: *footprint,
        })
        .collect();
    core.model_states(0, id, states, budget);
    let names = models.iter().map(|(m, ..)| (*m).to_owned()).collect();
    core.node_up(0, id, slots, credits, names);
}

fn job(model: &str, max_tokens: u32, deadline: Micros) -> JobSpec {
    JobSpec {
        prompt_bytes: 0,
        pace_us: 0,
        model: model.into(),
        max_tokens,
        deadline,
        caller: Arc::from("c"),
        caller_share: Some(1000),
    }
}

fn sends(actions: &[Action]) -> Vec<(JobKey, String, Vec<String>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                key, node, evict, ..
            } => Some((*key, node.clone(), evict.clone())),
            _ => None,
        })
        .collect()
}

fn finish(core: &mut Core, now: Micros, key: JobKey, node: &str) -> Vec<Action> {
    core.ended(
        now,
        key,
        node,
        Report::Finished {
            worker_first_token_us: 10 * MS,
            generation_us: 9 * MS,
            tokens: 10,
        },
    );
    core.take_actions()
}

fn state(core: &Core, node: &str, model: &str) -> (bool, bool) {
    let l = &core.nodes[node].loads[model];
    (l.warm, l.loading)
}

#[test]
fn a_warm_pool_wins_when_it_finishes_first() {
    let mut core = Core::new(Config::default());
    pool(&mut core, "cold", 1, 2, &[("m", false, 5 * S, 100)], 0);
    pool(&mut core, "warm", 1, 2, &[("m", true, 5 * S, 100)], 0);
    let cost = core.cost_of("warm", "m", &cost_spec(10)).unwrap();
    let a = core.submit(0, job("m", 10, 60 * S)).unwrap();
    assert_eq!(a.node, "warm");
    assert_eq!(a.predicted_finish, cost);
    // No load was started anywhere.
    assert_eq!(state(&core, "cold", "m"), (false, false));
}

#[test]
fn a_load_elsewhere_when_the_warm_pool_is_busy_and_the_deadline_covers_it() {
    let mut core = Core::new(Config::default());
    pool(&mut core, "warm", 1, 2, &[("m", true, S, 100)], 0);
    pool(&mut core, "cold", 1, 2, &[("m", false, S, 100)], 0);
    // A long job keeps the warm pool busy for about 30 s.
    let long = core.submit(0, job("m", 20_000, 600 * S)).unwrap();
    assert_eq!(long.node, "warm");
    core.take_actions();
    let cost = core.cost_of("cold", "m", &cost_spec(10)).unwrap();
    let b = core.submit(MS, job("m", 10, 10 * S)).unwrap();
    assert_eq!(b.node, "cold");
    // It starts when the load is predicted to end.
    assert_eq!(b.predicted_finish, MS + S + cost);
    assert_eq!(
        sends(&core.take_actions()),
        [(b.key, "cold".into(), vec![])]
    );
    assert_eq!(state(&core, "cold", "m"), (false, true));
}

#[test]
fn refused_at_once_when_even_the_load_cannot_meet_the_deadline() {
    let mut core = Core::new(Config::default());
    pool(&mut core, "cold", 2, 2, &[("m", false, 5 * S, 100)], 0);
    let r = core.submit(0, job("m", 10, 4 * S));
    let Err(Refusal::Infeasible {
        best_finish: Some(best),
    }) = r
    else {
        panic!("{r:?}");
    };
    assert!(best > 5 * S, "the estimate includes the load: {best}");
    assert!(core.take_actions().is_empty(), "nothing reached the pool");
    assert_eq!(state(&core, "cold", "m"), (false, false), "no load started");
    // With a deadline that covers the load, the same job is admitted and starts the load.
    let ok = core.submit(0, job("m", 10, 6 * S)).unwrap();
    assert!(ok.predicted_finish > 5 * S && ok.predicted_finish <= 6 * S);
}

#[test]
fn evictions_are_the_least_recently_used_idle_models_never_one_with_work() {
    let mut core = Core::new(Config::default());
    let models = [
        ("a", true, S, 100),
        ("b", true, S, 100),
        ("c", true, S, 100),
        ("e", true, S, 100),
        ("d", false, S, 100),
    ];
    // Room for four; no credit beyond the running job, so a second job waits here.
    pool(&mut core, "n", 2, 0, &models, 400);
    let day = 86_400 * S;
    // `a` is the least recently used, but loading; `b` next, but a job waits for it here.
    {
        let n = core.nodes.get_mut("n").unwrap();
        n.loads.get_mut("a").unwrap().loading = true;
        n.loads.get_mut("a").unwrap().warm = false;
        n.loads.get_mut("a").unwrap().ready_at = 10 * MS;
        for (m, t) in [("a", 1), ("b", 2), ("e", 3)] {
            n.loads.get_mut(m).unwrap().last_use = t;
        }
    }
    let c1 = core.submit(0, job("c", 10, day)).unwrap();
    assert_eq!(c1.slot, 0);
    // A job of `b` reserved here, behind `c1` (no credit: it is not at the pool).
    let (b1, _) = core.track(job("b", 10, day));
    core.enqueue(b1, "n", 0);
    assert!(!core.is_sent(b1));
    core.take_actions();
    // `d` goes to the idle slot: it must evict one model, and only `e` is idle.
    let d1 = core.submit(MS, job("d", 10, day)).unwrap();
    assert_eq!(d1.slot, 1);
    assert_eq!(
        sends(&core.take_actions()),
        [(d1.key, "n".into(), vec!["e".to_owned()])]
    );
    assert_eq!(state(&core, "n", "e"), (false, false));
    assert_eq!(state(&core, "n", "d"), (false, true));
}

#[test]
fn a_job_behind_a_load_is_predicted_at_the_ready_time() {
    let mut core = Core::new(Config::default());
    pool(&mut core, "n", 2, 2, &[("m", false, 2 * S, 100)], 0);
    let cost = core.cost_of("n", "m", &cost_spec(10)).unwrap();
    let a = core.submit(0, job("m", 10, 60 * S)).unwrap();
    assert_eq!(a.predicted_finish, 2 * S + cost);
    core.take_actions();
    // On the other slot, half a second later: the load under way, not a new one.
    let b = core.submit(500 * MS, job("m", 10, 60 * S)).unwrap();
    assert_eq!(b.slot, 1);
    assert_eq!(b.predicted_finish, 2 * S + cost);
    // The pool's word that it is loading changes nothing; its word that the model is warm
    // (early) does.
    let report = |warm, loading| ModelState {
        model: "m".into(),
        warm,
        loading,
        load_us: 2 * S,
        footprint_bytes: 100,
    };
    core.model_states(600 * MS, "n", vec![report(false, true)], 0);
    assert_eq!(core.nodes["n"].loads["m"].ready_at, 2 * S);
    // A report written before the job reached the pool (cold) does not cancel the load either.
    core.model_states(700 * MS, "n", vec![report(false, false)], 0);
    assert_eq!(state(&core, "n", "m"), (false, true));
    core.model_states(S, "n", vec![report(true, false)], 0);
    let predicted: Vec<Micros> = core
        .predict(S, &core.nodes["n"], 1)
        .iter()
        .map(|p| p.finish)
        .collect();
    assert_eq!(predicted, [S + cost]);
}

#[test]
fn a_load_waits_for_the_models_in_use_and_groups_their_jobs_first() {
    let mut core = Core::new(Config::default());
    // The budget fits one model: x is warm, y cold.
    pool(
        &mut core,
        "n",
        1,
        2,
        &[("x", true, S, 100), ("y", false, S, 100)],
        100,
    );
    let cost = core.cost_of("n", "x", &cost_spec(10)).unwrap();
    let finish_of = |core: &Core, now: Micros, key: JobKey| {
        core.predict(now, &core.nodes["n"], 0)
            .iter()
            .find(|p| p.key == key)
            .unwrap()
            .finish
    };
    let x1 = core.submit(0, job("x", 10, 60 * S)).unwrap();
    x1.progress.started(0);
    core.take_actions();
    let fx1 = finish_of(&core, 0, x1.key);
    // y does not fit beside x, which has work: it waits here for x's jobs, then loads.
    let y1 = core.submit(MS, job("y", 10, 60 * S)).unwrap();
    assert_eq!(y1.predicted_finish, fx1 + S + cost);
    assert!(sends(&core.take_actions()).is_empty(), "y waits here");
    assert_eq!(core.nodes["n"].drain.as_deref(), Some("y"));
    // More x jobs run before the switch while y's deadline holds: grouped with x1, sent to
    // the pool at once, although y1 came first.
    let x2 = core.submit(2 * MS, job("x", 10, 60 * S)).unwrap();
    let x3 = core.submit(3 * MS, job("x", 10, 60 * S)).unwrap();
    assert_eq!(x2.predicted_finish, fx1 + cost);
    assert_eq!(x3.predicted_finish, fx1 + 2 * cost);
    let sent: Vec<JobKey> = sends(&core.take_actions()).iter().map(|s| s.0).collect();
    assert_eq!(sent, [x2.key, x3.key]);
    let py1 = finish_of(&core, 3 * MS, y1.key);
    assert_eq!(py1, fx1 + 2 * cost + S + cost);
    // A second y job joins the group with an earlier deadline (EDF: it goes first) and
    // little slack...
    let y2 = core.submit(4 * MS, job("y", 10, py1 + 10 * MS)).unwrap();
    assert_eq!(y2.predicted_finish, py1);
    // ...and one more x job before the switch would make it late: refused, although x is warm.
    let late = core.submit(5 * MS, job("x", 10, 60 * S));
    assert!(
        matches!(late, Err(Refusal::Infeasible { .. })),
        "an x job before the switch would make y2 late: {late:?}"
    );
    assert!(core.take_actions().is_empty());
    // The x jobs end; only then does y load, once, evicting x, and both y jobs go, in order.
    assert!(sends(&finish(&mut core, fx1, x1.key, "n")).is_empty());
    assert!(sends(&finish(&mut core, fx1 + cost, x2.key, "n")).is_empty());
    let acts = finish(&mut core, fx1 + 2 * cost, x3.key, "n");
    assert_eq!(
        sends(&acts),
        [
            (y2.key, "n".into(), vec!["x".to_owned()]),
            (y1.key, "n".into(), vec![])
        ],
        "{acts:?}"
    );
    assert_eq!(core.nodes["n"].drain, None);
    assert_eq!(state(&core, "n", "x"), (false, false));
    assert_eq!(state(&core, "n", "y"), (false, true));
    assert_eq!(finish_of(&core, fx1 + 2 * cost, y2.key), py1);
    assert_eq!(finish_of(&core, fx1 + 2 * cost, y1.key), py1 + cost);
}

#[test]
fn a_model_too_big_for_the_budget_is_never_placed_there() {
    let mut core = Core::new(Config::default());
    pool(&mut core, "small", 1, 2, &[("big", false, S, 500)], 100);
    let r = core.submit(0, job("big", 10, 600 * S));
    assert!(matches!(r, Err(Refusal::Infeasible { .. })), "{r:?}");
    assert!(core.take_actions().is_empty());
}

#[test]
fn a_pool_without_model_states_serves_every_model_warm() {
    let mut core = Core::new(Config::default());
    core.figures(
        "n",
        "m",
        Figures {
            first_token_us: 10 * MS,
            per_token_us: MS,
        },
    );
    core.node_up(0, "n", 1, 2, vec!["m".into()]);
    let cost = core.cost_of("n", "m", &cost_spec(10)).unwrap();
    let a = core.submit(0, job("m", 10, 60 * S)).unwrap();
    assert_eq!(a.predicted_finish, cost);
    assert_eq!(sends(&core.take_actions()), [(a.key, "n".into(), vec![])]);
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
