//! Device selection: which device a worker runs on (`--device cpu|cuda:N`), and the probe that
//! tells whether that GPU is usable before anything is loaded onto it.

use std::fmt;
use std::str::FromStr;

/// The oldest NVIDIA driver the backend supports: the first R470 release that JITs the PTX ISA
/// the kernels are compiled for (see docs/MODELS.md, "GPU device").
pub const MIN_DRIVER: &str = "470.57";

/// Where a worker runs its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA GPU by the driver's ordinal.
    Cuda(usize),
}

impl DeviceSpec {
    pub fn is_cpu(&self) -> bool {
        matches!(self, DeviceSpec::Cpu)
    }
}

/// A `--device` value that is none of the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown device {0:?}: expected cpu, cuda (the first GPU) or cuda:N (GPU ordinal N)")]
pub struct ParseDeviceError(pub String);

impl FromStr for DeviceSpec {
    type Err = ParseDeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseDeviceError(s.to_owned());
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                // Digits only: `usize::from_str` would take "+1", and "cuda:01" is a typo
                // more likely than an intent.
                if n.is_empty()
                    || !n.bytes().all(|b| b.is_ascii_digit())
                    || n.len() > 1 && n.starts_with('0')
                {
                    return Err(bad());
                }
                n.parse().map(DeviceSpec::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// What the driver says about one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub memory_bytes: u64,
    pub compute_capability: (u32, u32),
    /// `GPU-xxxxxxxx-…` as `nvidia-smi` prints it, so the pool can tell which of the GPUs it
    /// lists is this one (CUDA's ordinals need not follow `nvidia-smi`'s order). Empty when the
    /// driver would not say.
    pub uuid: String,
}

impl GpuInfo {
    /// One line for `skep-worker --probe-device`; [`GpuInfo::parse_line`] reads it back.
    pub fn to_line(&self) -> String {
        let (major, minor) = self.compute_capability;
        let mut line = format!(
            "name={} memory_bytes={} compute_capability={major}.{minor} ordinal={}",
            self.name.replace(['\n', '\r'], " "),
            self.memory_bytes,
            self.ordinal
        );
        if !self.uuid.is_empty() {
            line.push_str(" uuid=");
            line.push_str(&self.uuid);
        }
        line
    }

    /// Reads a [`GpuInfo::to_line`] line. The name comes first and may hold spaces, so it runs
    /// up to ` memory_bytes=`; the rest are `key=value` words.
    pub fn parse_line(line: &str) -> Option<GpuInfo> {
        let rest = line.trim().strip_prefix("name=")?;
        let (name, rest) = rest.split_once(" memory_bytes=")?;
        let mut info = GpuInfo {
            ordinal: 0,
            name: name.to_owned(),
            memory_bytes: 0,
            compute_capability: (0, 0),
            uuid: String::new(),
        };
        let (mut memory, mut cc, mut ordinal) = (false, false, false);
        for (i, word) in rest.split_whitespace().enumerate() {
            let (key, value) = if i == 0 {
                ("memory_bytes", word)
            } else {
                word.split_once('=')?
            };
            match key {
                "memory_bytes" => {
                    info.memory_bytes = value.parse().ok()?;
                    memory = true;
                }
                "compute_capability" => {
                    let (major, minor) = value.split_once('.')?;
                    info.compute_capability = (major.parse().ok()?, minor.parse().ok()?);
                    cc = true;
                }
                "ordinal" => {
                    info.ordinal = value.parse().ok()?;
                    ordinal = true;
                }
                "uuid" => info.uuid = value.to_owned(),
                // A newer worker may say more; what this reader does not know it skips.
                _ => {}
            }
        }
        (memory && cc && ordinal).then_some(info)
    }
}

/// Why the requested GPU cannot be used. Every message says what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "this build of skep-worker has no CUDA support; rebuild with \
         `cargo build --release --features skep-worker/cuda` (see docs/MODELS.md)"
    )]
    NotBuilt,
    #[error(
        "no NVIDIA driver: libcuda.so.1 could not be loaded ({0}); install the NVIDIA driver \
         >= {MIN_DRIVER}"
    )]
    NoDriver(String),
    #[error(
        "no CUDA device {ordinal}: the driver sees {count} GPU(s){}",
        if *.count == 0 { String::new() } else { format!(" (use cuda:0 to cuda:{})", .count - 1) }
    )]
    NoDevice { ordinal: usize, count: usize },
    #[error("the NVIDIA driver failed: {0}")]
    Driver(String),
}

/// Checks that `spec` can be used and says what it is: `None` for the CPU, the GPU's figures
/// otherwise.
pub fn probe(spec: &DeviceSpec) -> Result<Option<GpuInfo>, DeviceError> {
    match *spec {
        DeviceSpec::Cpu => Ok(None),
        DeviceSpec::Cuda(ordinal) => probe_cuda(ordinal).map(Some),
    }
}

#[cfg(not(feature = "cuda"))]
fn probe_cuda(_ordinal: usize) -> Result<GpuInfo, DeviceError> {
    Err(DeviceError::NotBuilt)
}

#[cfg(feature = "cuda")]
fn probe_cuda(ordinal: usize) -> Result<GpuInfo, DeviceError> {
    if !driver_present() {
        return Err(DeviceError::NoDriver(
            "not found on the library path".into(),
        ));
    }
    // cudarc loads the driver's symbols lazily and panics on one it cannot find (a driver too
    // old for a symbol it resolves): that must be an error, not a crashed worker or pool.
    std::panic::catch_unwind(|| query(ordinal)).unwrap_or_else(|panic| {
        let text = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("the driver library panicked");
        Err(DeviceError::Driver(text.to_owned()))
    })
}

/// Whether libcuda can be loaded at all (cudarc would panic on first use if not).
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn driver_present() -> bool {
    // SAFETY: it only dlopens the driver library by its candidate names and drops the handle;
    // libcuda's initialisers have no preconditions on the caller.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

#[cfg(feature = "cuda")]
fn query(ordinal: usize) -> Result<GpuInfo, DeviceError> {
    use cudarc::driver::{CudaContext, DriverError, sys::CUresult};

    let count = match CudaContext::device_count() {
        Ok(n) => usize::try_from(n).unwrap_or(0),
        // cuInit says so when the driver is loaded but sees no GPU.
        Err(DriverError(CUresult::CUDA_ERROR_NO_DEVICE)) => 0,
        Err(e) => return Err(driver_error(e)),
    };
    if ordinal >= count {
        return Err(DeviceError::NoDevice { ordinal, count });
    }
    let ctx = CudaContext::new(ordinal).map_err(driver_error)?;
    let name = ctx.name().map_err(driver_error)?;
    let memory_bytes = ctx.total_mem().map_err(driver_error)? as u64;
    let (major, minor) = ctx.compute_capability().map_err(driver_error)?;
    let uuid = ctx
        .uuid()
        .map(|u| format_uuid(&u.bytes))
        .unwrap_or_default();
    Ok(GpuInfo {
        ordinal,
        name,
        memory_bytes,
        compute_capability: (
            u32::try_from(major).unwrap_or(0),
            u32::try_from(minor).unwrap_or(0),
        ),
        uuid,
    })
}

/// The driver's own name and text for an error (e.g. `CUDA_ERROR_OUT_OF_MEMORY: out of memory`).
#[cfg(feature = "cuda")]
fn driver_error(e: cudarc::driver::DriverError) -> DeviceError {
    let text = match (e.error_name(), e.error_string()) {
        (Ok(name), Ok(text)) => format!("{}: {}", name.to_string_lossy(), text.to_string_lossy()),
        _ => format!("{:?}", e.0),
    };
    DeviceError::Driver(text)
}

/// `nvidia-smi`'s form of a GPU UUID: `GPU-` and the 16 bytes as 8-4-4-4-12 hex digits.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn format_uuid(bytes: &[std::ffi::c_char; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{:02x}", *b as u8)).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_accepted_forms() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:0".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:7".parse(), Ok(DeviceSpec::Cuda(7)));
        assert_eq!("cuda:12".parse(), Ok(DeviceSpec::Cuda(12)));
    }

    #[test]
    fn refuses_other_forms_naming_the_accepted_ones() {
        for bad in [
            "",
            "gpu",
            "CPU",
            "cuda:",
            "cuda:-1",
            "cuda:+1",
            "cuda:01",
            "cuda:x",
            "cuda:0 ",
            "cuda0",
            "cuda:99999999999999999999999",
            "rocm:0",
        ] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("cpu") && text.contains("cuda:N"),
                "{bad:?}: {text}"
            );
            assert_eq!(err.0, bad);
        }
    }

    #[test]
    fn display_round_trips() {
        for spec in [DeviceSpec::Cpu, DeviceSpec::Cuda(0), DeviceSpec::Cuda(3)] {
            assert_eq!(spec.to_string().parse(), Ok(spec));
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        assert_eq!(DeviceSpec::default(), DeviceSpec::Cpu);
    }

    #[test]
    fn probing_the_cpu_finds_no_gpu() {
        assert_eq!(probe(&DeviceSpec::Cpu), Ok(None));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn probing_a_gpu_without_the_feature_says_how_to_rebuild() {
        let err = probe(&DeviceSpec::Cuda(0)).unwrap_err();
        assert_eq!(err, DeviceError::NotBuilt);
        assert!(err.to_string().contains("--features skep-worker/cuda"));
    }

    /// Runs on any machine: without a driver the answer is `NoDriver`, with one it is the GPU's
    /// figures; an ordinal no machine has is refused either way, never a panic.
    #[cfg(feature = "cuda")]
    #[test]
    fn probing_with_the_feature_answers_without_panicking() {
        match probe(&DeviceSpec::Cuda(0)) {
            Ok(Some(gpu)) => {
                assert_eq!(gpu.ordinal, 0);
                assert!(!gpu.name.is_empty() && gpu.memory_bytes > 0);
                assert!(gpu.compute_capability.0 >= 3, "{gpu:?}");
            }
            Ok(None) => panic!("a GPU probe answered as the CPU"),
            Err(e) => assert!(
                matches!(e, DeviceError::NoDriver(_) | DeviceError::NoDevice { .. }),
                "{e}"
            ),
        }
        let far = probe(&DeviceSpec::Cuda(10_000)).unwrap_err();
        assert!(
            matches!(
                far,
                DeviceError::NoDriver(_)
                    | DeviceError::NoDevice {
                        ordinal: 10_000,
                        ..
                    }
            ),
            "{far}"
        );
    }

    #[test]
    fn messages_say_what_to_do() {
        let no_driver = DeviceError::NoDriver("not found".into()).to_string();
        assert!(no_driver.contains("libcuda.so.1") && no_driver.contains(MIN_DRIVER));
        let none = DeviceError::NoDevice {
            ordinal: 2,
            count: 0,
        }
        .to_string();
        assert_eq!(none, "no CUDA device 2: the driver sees 0 GPU(s)");
        let two = DeviceError::NoDevice {
            ordinal: 2,
            count: 2,
        }
        .to_string();
        assert!(two.ends_with("(use cuda:0 to cuda:1)"), "{two}");
    }

    #[test]
    fn the_probe_line_reads_back() {
        let info = GpuInfo {
            ordinal: 1,
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_bytes: 85_520_809_984,
            compute_capability: (9, 0),
            uuid: "GPU-0a1b2c3d-0000-1111-2222-333344445555".into(),
        };
        let line = info.to_line();
        assert_eq!(
            line,
            "name=NVIDIA H100 80GB HBM3 memory_bytes=85520809984 compute_capability=9.0 \
             ordinal=1 uuid=GPU-0a1b2c3d-0000-1111-2222-333344445555"
        );
        assert_eq!(GpuInfo::parse_line(&line), Some(info.clone()));
        let no_uuid = GpuInfo {
            uuid: String::new(),
            ..info
        };
        assert_eq!(GpuInfo::parse_line(&no_uuid.to_line()), Some(no_uuid));
        assert_eq!(GpuInfo::parse_line("cpu"), None);
        assert_eq!(GpuInfo::parse_line("name=X memory_bytes=1 ordinal=0"), None);
    }

    #[test]
    fn uuids_print_as_nvidia_smi_does() {
        let bytes: [std::ffi::c_char; 16] =
            std::array::from_fn(|i| (i as u8 * 17) as std::ffi::c_char);
        assert_eq!(
            format_uuid(&bytes),
            "GPU-00112233-4455-6677-8899-aabbccddeeff"
        );
    }
}
