//! What this machine offers, for heartbeats: CPUs, memory, load, GPUs and loaded models.
//!
//! Read from /proc (Linux) and, when present, `nvidia-smi`; anything unreadable is reported as
//! zero or absent rather than failing a heartbeat.

use std::process::Command;

use skep_proto::v1::{Gpu, Inventory};

/// GPUs do not come and go while a pool runs: probe them once.
pub fn gpus() -> Vec<Gpu> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output();
    let Ok(out) = out else { return Vec::new() };
    if !out.status.success() {
        return Vec::new();
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
}

fn parse_nvidia_smi(text: &str) -> Vec<Gpu> {
    text.lines()
        .filter_map(|l| {
            let (name, mib) = l.rsplit_once(',')?;
            let mib: u64 = mib.trim().parse().ok()?;
            Some(Gpu {
                name: name.trim().chars().take(64).collect(),
                memory_bytes: mib * 1024 * 1024,
            })
        })
        .collect()
}

/// A fresh reading (cheap: two small /proc files).
pub fn read(gpus: &[Gpu], models_loaded: &[String], models_held: Vec<String>) -> Inventory {
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0);
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    Inventory {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get() as u32),
        memory_bytes,
        load1,
        gpus: gpus.to_vec(),
        models_loaded: models_loaded.to_vec(),
        models_held,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi_csv_and_skips_junk() {
        let g = parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559\nbad line\nA, B, 1024\n");
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(g[0].memory_bytes, 81559 * 1024 * 1024);
        assert_eq!(g[1].name, "A, B");
    }

    #[test]
    fn reading_this_machine_finds_cpus_and_memory() {
        let inv = read(&[], &["m".into()], vec!["ab".repeat(32)]);
        assert!(inv.cpus >= 1);
        assert!(inv.memory_bytes > 0);
        assert_eq!(inv.models_loaded, vec!["m".to_owned()]);
        assert_eq!(inv.models_held, vec!["ab".repeat(32)]);
    }
}
