//! Criterion benchmarks: single-thread push+pop round trip and cross-thread ping-pong latency.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use skep_lane::{Lane, LaneConfig};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("skep-lane-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// push + try_pop of a 64-byte entry on one thread: the per-message protocol cost with no
/// contention and no wake-ups.
fn round_trip_64(c: &mut Criterion) {
    let path = scratch("rt");
    let lane = Lane::create(&path, LaneConfig::default(), 1).unwrap();
    let payload = [0x5Au8; 64];
    let mut out = Vec::with_capacity(64);
    c.bench_function("push_pop_64B_single_thread", |b| {
        b.iter(|| {
            lane.push(std::hint::black_box(&payload)).unwrap();
            assert!(lane.try_pop(&mut out).unwrap());
        })
    });
    let _ = std::fs::remove_file(&path);
}

/// One iteration = request on lane A, echo thread replies on lane B, we receive it: a full
/// cross-thread round trip including spin/futex wake-ups (the latency a worker call sees).
fn ping_pong_64(c: &mut Criterion) {
    let (pa, pb) = (scratch("ping"), scratch("pong"));
    let cfg = LaneConfig::default();
    let req = Lane::create(&pa, cfg, 1).unwrap();
    let resp = Lane::create(&pb, cfg, 1).unwrap();
    let (req_rx, resp_tx) = (Lane::open(&pa, 1).unwrap(), Lane::open(&pb, 1).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let echo = std::thread::spawn(move || {
        let mut buf = Vec::with_capacity(64);
        while !stop2.load(Ordering::Relaxed) {
            if req_rx
                .pop_timeout(&mut buf, Duration::from_millis(50))
                .unwrap()
            {
                resp_tx.push_timeout(&buf, Duration::from_secs(5)).unwrap();
            }
        }
    });
    let payload = [0xA5u8; 64];
    let mut out = Vec::with_capacity(64);
    c.bench_function("ping_pong_64B_cross_thread", |b| {
        b.iter(|| {
            req.push_timeout(&payload, Duration::from_secs(5)).unwrap();
            assert!(resp.pop_timeout(&mut out, Duration::from_secs(5)).unwrap());
        })
    });
    stop.store(true, Ordering::Relaxed);
    req.wake();
    echo.join().unwrap();
    let _ = std::fs::remove_file(&pa);
    let _ = std::fs::remove_file(&pb);
    // Last benchmark to run: drop the per-process scratch directory too.
    if let Some(dir) = pa.parent() {
        let _ = std::fs::remove_dir(dir);
    }
}

criterion_group!(benches, round_trip_64, ping_pong_64);
criterion_main!(benches);
