//! The device this pool's workers run on (`--device cpu|cuda:N`), and the check at start that
//! asks the worker binary itself whether that GPU is usable (`skep-worker --probe-device`).
//!
//! The forms and the probe line are `skep_cuda::device`'s (the worker's side); the pool links
//! skep-cuda without its `cuda` feature, so no CUDA code comes with them.

use std::path::Path;
use std::time::Duration;

use skep_cuda::device::GpuInfo;

use skep_proto::v1::Gpu;

/// How long the worker binary may take to answer `--probe-device`: loading the driver and
/// creating a context takes seconds on a cold GPU, never minutes.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// `--device`: where the workers run (the worker's own type: one parser, one set of forms).
pub use skep_cuda::device::DeviceSpec as Device;

/// The GPU a probe found: what the inventory needs to report it and to tell it among the GPUs
/// `nvidia-smi` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbedGpu {
    pub ordinal: usize,
    pub name: String,
    pub memory_bytes: u64,
    /// "major.minor", e.g. "9.0".
    pub compute_capability: String,
    /// `GPU-…` as `nvidia-smi` prints it; empty when the worker did not say.
    pub uuid: String,
}

impl ProbedGpu {
    /// Reads the worker's probe line (`skep_cuda::device::GpuInfo::to_line`).
    pub fn parse_line(line: &str) -> Option<ProbedGpu> {
        let info = GpuInfo::parse_line(line)?;
        let (major, minor) = info.compute_capability;
        Some(ProbedGpu {
            ordinal: info.ordinal,
            name: info.name.chars().take(64).collect(),
            memory_bytes: info.memory_bytes,
            compute_capability: format!("{major}.{minor}"),
            uuid: info.uuid,
        })
    }

    /// This GPU as the inventory reports it, when `nvidia-smi` did not list it.
    pub fn to_gpu(&self) -> Gpu {
        Gpu {
            name: self.name.clone(),
            memory_bytes: self.memory_bytes,
            compute_capability: self.compute_capability.clone(),
            in_use: true,
        }
    }
}

/// Why the pool will not start on the device it was given.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot run {worker} --probe-device {device}: {why}")]
    Spawn {
        worker: String,
        device: Device,
        why: String,
    },
    #[error("device {device} is not usable: {reason}")]
    Unusable { device: Device, reason: String },
    #[error("device {device}: the worker's probe did not answer within {PROBE_TIMEOUT:?}")]
    Timeout { device: Device },
    #[error("device {device}: the worker's probe printed {line:?}, not a GPU's figures")]
    Garbled { device: Device, line: String },
}

/// Asks the worker binary whether `device` is usable: `None` for the CPU (nothing to ask), the
/// GPU it found otherwise. The worker answers, not the pool, because the worker is what links
/// (or lacks) CUDA support and loads the driver.
pub async fn probe(worker: &Path, device: Device) -> Result<Option<ProbedGpu>, ProbeError> {
    if device == Device::Cpu {
        return Ok(None);
    }
    let mut command = tokio::process::Command::new(worker);
    command
        .arg("--probe-device")
        .arg(device.to_string())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(PROBE_TIMEOUT, command.output()).await {
        Err(_) => return Err(ProbeError::Timeout { device }),
        Ok(Err(e)) => {
            return Err(ProbeError::Spawn {
                worker: worker.display().to_string(),
                device,
                why: e.to_string(),
            });
        }
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The worker prints "device cuda:N: <reason>"; the pool names the device itself.
        let prefix = format!("device {device}: ");
        let reason = stderr.trim();
        let reason = reason.strip_prefix(&prefix).unwrap_or(reason);
        let reason = match (reason.is_empty(), out.status.code()) {
            (false, _) => reason.chars().take(2000).collect(),
            (true, Some(code)) => format!("the worker's probe exited with code {code}"),
            (true, None) => "the worker's probe was killed by a signal".to_owned(),
        };
        return Err(ProbeError::Unusable { device, reason });
    }
    let line = stdout.lines().next().unwrap_or_default();
    ProbedGpu::parse_line(line)
        .map(Some)
        .ok_or_else(|| ProbeError::Garbled {
            device,
            line: line.chars().take(200).collect(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_probe_line() {
        let gpu = ProbedGpu::parse_line(
            "name=NVIDIA H200 memory_bytes=150754820096 compute_capability=9.0 ordinal=0 \
             uuid=GPU-00112233-4455-6677-8899-aabbccddeeff\n",
        )
        .unwrap();
        assert_eq!(gpu.name, "NVIDIA H200");
        assert_eq!(gpu.memory_bytes, 150_754_820_096);
        assert_eq!(gpu.compute_capability, "9.0");
        assert_eq!(gpu.ordinal, 0);
        assert_eq!(gpu.uuid, "GPU-00112233-4455-6677-8899-aabbccddeeff");
        let gpu = ProbedGpu::parse_line(
            "name=GeForce GTX 1080 memory_bytes=8 compute_capability=6.1 ordinal=1",
        )
        .unwrap();
        assert_eq!((gpu.ordinal, gpu.uuid.as_str()), (1, ""));
        assert_eq!(ProbedGpu::parse_line("cpu"), None);
        assert_eq!(
            ProbedGpu::parse_line("name=X memory_bytes=1 compute_capability=9 ordinal=0"),
            None
        );
    }

    #[tokio::test]
    async fn the_cpu_needs_no_probe() {
        // Never spawned: the path does not exist.
        let found = probe(Path::new("/nonexistent/skep-worker"), Device::Cpu).await;
        assert_eq!(found.unwrap(), None);
    }

    #[tokio::test]
    async fn a_worker_that_cannot_be_run_is_an_error() {
        let err = probe(Path::new("/nonexistent/skep-worker"), Device::Cuda(0))
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Spawn { .. }), "{err}");
        assert!(err.to_string().contains("cuda:0"), "{err}");
    }
}
