//! What this machine offers, for heartbeats: CPUs, memory, load, GPUs (the one the workers use
//! marked) and loaded models.
//!
//! Read from /proc (Linux) and, when present, `nvidia-smi`; anything unreadable is reported as
//! zero or absent rather than failing a heartbeat.

use std::process::Command;

use skep_proto::v1::{Gpu, Inventory};

use crate::device::ProbedGpu;

/// GPUs do not come and go while a pool runs: probe them once. `in_use` marks the one the
/// workers run on (`--device cuda:N`, as the worker's probe found it).
pub fn gpus(in_use: Option<&ProbedGpu>) -> Vec<Gpu> {
    // compute_cap is unknown to nvidia-smi before driver 510: ask again without it then.
    let listed = nvidia_smi("index,uuid,name,memory.total,compute_cap")
        .map(|t| parse_nvidia_smi(&t, true))
        .or_else(|| nvidia_smi("index,uuid,name,memory.total").map(|t| parse_nvidia_smi(&t, false)))
        .unwrap_or_default();
    mark_in_use(listed, in_use)
}

fn nvidia_smi(fields: &str) -> Option<String> {
    let out = Command::new("nvidia-smi")
        .arg(format!("--query-gpu={fields}"))
        .arg("--format=csv,noheader,nounits")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One `nvidia-smi` GPU, with what tells it apart from the others.
#[derive(Debug, Clone, PartialEq)]
struct Listed {
    index: usize,
    uuid: String,
    gpu: Gpu,
}

/// Lines of `index, uuid, name, memory.total[, compute_cap]`. Names may hold commas, so the
/// leading fields are split from the left and the trailing ones from the right.
fn parse_nvidia_smi(text: &str, with_cc: bool) -> Vec<Listed> {
    text.lines()
        .filter_map(|l| {
            let (index, rest) = l.split_once(',')?;
            let (uuid, rest) = rest.split_once(',')?;
            let (rest, cc) = if with_cc {
                let (rest, cc) = rest.rsplit_once(',')?;
                (rest, cc.trim())
            } else {
                (rest, "")
            };
            let (name, mib) = rest.rsplit_once(',')?;
            let mib: u64 = mib.trim().parse().ok()?;
            // "[N/A]" or garbage is reported as unknown, not as a made-up capability.
            let cc = match cc.split_once('.') {
                Some((a, b)) if a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok() => cc,
                _ => "",
            };
            Some(Listed {
                index: index.trim().parse().ok()?,
                uuid: uuid.trim().to_owned(),
                gpu: Gpu {
                    name: name.trim().chars().take(64).collect(),
                    memory_bytes: mib * 1024 * 1024,
                    compute_capability: cc.to_owned(),
                    in_use: false,
                },
            })
        })
        .collect()
}

/// Marks the GPU the workers use: by UUID (CUDA's ordinals follow the fastest GPU first unless
/// told otherwise, `nvidia-smi`'s indices follow the PCI bus), by index where the worker gave no
/// UUID. A GPU the worker found but `nvidia-smi` did not list (no nvidia-smi in a container) is
/// reported from the probe.
fn mark_in_use(listed: Vec<Listed>, in_use: Option<&ProbedGpu>) -> Vec<Gpu> {
    let Some(probed) = in_use else {
        return listed.into_iter().map(|l| l.gpu).collect();
    };
    let is_it = |l: &Listed| {
        if probed.uuid.is_empty() {
            l.index == probed.ordinal
        } else {
            l.uuid.eq_ignore_ascii_case(&probed.uuid)
        }
    };
    let found = listed.iter().any(is_it);
    let mut gpus: Vec<Gpu> = listed
        .into_iter()
        .map(|l| {
            let mine = is_it(&l);
            let mut gpu = l.gpu;
            if mine {
                gpu.in_use = true;
                if gpu.compute_capability.is_empty() {
                    gpu.compute_capability = probed.compute_capability.clone();
                }
            }
            gpu
        })
        .collect();
    if !found {
        gpus.push(probed.to_gpu());
    }
    gpus
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
        let g = parse_nvidia_smi(
            "0, GPU-aa, NVIDIA H100 80GB HBM3, 81559, 9.0\nbad line\n1, GPU-bb, A, B, 1024, 8.6\n",
            true,
        );
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].index, 0);
        assert_eq!(g[0].uuid, "GPU-aa");
        assert_eq!(g[0].gpu.name, "NVIDIA H100 80GB HBM3");
        assert_eq!(g[0].gpu.memory_bytes, 81559 * 1024 * 1024);
        assert!(!g[0].gpu.in_use);
        assert_eq!(g[1].gpu.name, "A, B");
        assert_eq!(g[1].index, 1);
    }

    #[test]
    fn reads_the_compute_capability() {
        let g = parse_nvidia_smi(
            "0, GPU-aa, NVIDIA GeForce GTX 1080, 8192, 6.1\n1, GPU-bb, Old, 4096, [N/A]\n",
            true,
        );
        assert_eq!(g[0].gpu.compute_capability, "6.1");
        assert_eq!(
            g[1].gpu.compute_capability, "",
            "N/A is unknown, not a capability"
        );
        // Drivers before 510 cannot be asked for it: the same lines without the column.
        let g = parse_nvidia_smi("0, GPU-aa, Tesla T4, 15360\n", false);
        assert_eq!(g[0].gpu.name, "Tesla T4");
        assert_eq!(g[0].gpu.compute_capability, "");
    }

    fn probed(ordinal: usize, uuid: &str) -> ProbedGpu {
        ProbedGpu {
            ordinal,
            name: "probed".into(),
            memory_bytes: 7,
            compute_capability: "8.9".into(),
            uuid: uuid.into(),
        }
    }

    fn two_gpus() -> Vec<Listed> {
        parse_nvidia_smi(
            "0, GPU-aa, First, 1024, 8.6\n1, GPU-bb, Second, 2048, \n",
            true,
        )
    }

    #[test]
    fn marks_the_gpu_in_use_by_uuid_before_index() {
        // CUDA's ordinal 0 is nvidia-smi's index 1 here: the UUID decides.
        let g = mark_in_use(two_gpus(), Some(&probed(0, "GPU-BB")));
        assert_eq!(g.len(), 2);
        assert!(!g[0].in_use);
        assert!(g[1].in_use);
        assert_eq!(g[1].name, "Second");
        assert_eq!(g[1].compute_capability, "8.9", "filled in from the probe");
        assert_eq!(g[0].compute_capability, "8.6");
        let g = mark_in_use(two_gpus(), Some(&probed(1, "")));
        assert_eq!(
            g.iter().map(|g| g.in_use).collect::<Vec<_>>(),
            [false, true]
        );
        let g = mark_in_use(two_gpus(), None);
        assert!(g.iter().all(|g| !g.in_use));
    }

    #[test]
    fn a_gpu_nvidia_smi_missed_is_reported_from_the_probe() {
        let g = mark_in_use(Vec::new(), Some(&probed(0, "GPU-cc")));
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].name, "probed");
        assert_eq!(g[0].memory_bytes, 7);
        assert_eq!(g[0].compute_capability, "8.9");
        assert!(g[0].in_use);
        let g = mark_in_use(two_gpus(), Some(&probed(5, "")));
        assert_eq!(g.len(), 3);
        assert_eq!(g.iter().filter(|g| g.in_use).count(), 1);
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
