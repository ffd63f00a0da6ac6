//! Build script: compiles the host build of the kernels' dequantization for the tests; with the
//! `cuda` feature, also compiles every `kernels/*.cu` to PTX with NVRTC and writes the module
//! table that `src/ptx.rs` embeds.

fn main() {
    host_quant::build();
    #[cfg(feature = "cuda")]
    kernels::build();
}

/// `tests/quant_host.c` (kernels/quant.cuh compiled as C), linked into the integration tests
/// only, so that tests/dequant.rs checks the GPU's dequantization bit for bit without a GPU.
///
/// Compiled in every build, `cuda` feature or not, because cargo has no build-script input that
/// says whether tests are being built; it is one small C file, and the workspace already needs a
/// C compiler (ring and libsqlite3-sys build C with `cc` too).
mod host_quant {
    use std::path::Path;

    pub fn build() {
        let manifest_dir =
            std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        let manifest_dir = Path::new(&manifest_dir);
        let shim = manifest_dir.join("tests/quant_host.c");
        let kernels_dir = manifest_dir.join("kernels");
        println!("cargo:rerun-if-changed={}", shim.display());
        println!(
            "cargo:rerun-if-changed={}",
            kernels_dir.join("quant.cuh").display()
        );
        let objects = cc::Build::new()
            .file(&shim)
            .include(&kernels_dir)
            .std("c99")
            .warnings_into_errors(true)
            // candle computes each value with separate roundings; a fused multiply-add (which
            // the GPU build does use) would round once and could differ in the last bit.
            .flag("-ffp-contract=off")
            .compile_intermediates();
        // As objects on the tests' link line rather than a `rustc-link-lib`, which would reach
        // the library and binaries too.
        for object in objects {
            println!("cargo:rustc-link-arg-tests={}", object.display());
        }
    }
}

#[cfg(feature = "cuda")]
mod kernels {
    use std::fmt::Write as _;
    use std::path::{Path, PathBuf};
    use std::{env, fs, process};

    /// The virtual architecture every kernel is compiled for: one PTX that the driver JITs for
    /// any GPU from Pascal (sm_61, where `dp4a` and fast f16 loads start) to Hopper (sm_90).
    const ARCH: &str = "compute_61";

    /// The PTX ISA version written into every module's `.version` line, replacing NVRTC's own.
    ///
    /// A driver JITs only the ISA versions it knows: NVRTC 12.9 writes `.version 8.8`, which
    /// needs driver >= 575. The oldest ISA that can hold our kernels is the newest of what
    /// `.target sm_61` needs (ISA 5.0) and what the instructions need: `shfl.sync` (every
    /// `__shfl_*_sync`) needs ISA 6.0. Measured with ptxas 12.9, which rejects an instruction
    /// newer than the declared ISA ("Feature 'shfl.sync' requires PTX ISA .version 6.0 or
    /// later" at 5.0) and accepts the smoke kernel at 6.0 for sm_61, sm_75, sm_86 and sm_90.
    /// scripts/ptx-check.sh repeats that check for every kernel: a kernel that needs a newer
    /// instruction fails it, and this constant must then move up (with MIN_DRIVER_FOR_PTX).
    const PTX_ISA: &str = "6.0";

    /// The oldest Linux driver that JITs PTX_ISA: ISA 6.0 came with CUDA 9.0 (driver 384.81).
    const MIN_DRIVER_FOR_PTX: &str = "384.81";

    /// The oldest Linux driver the driver-API bindings accept: cudarc's `cuda-11040` binds
    /// CUDA 11.4's driver API, which came with driver 470.57. Newer than MIN_DRIVER_FOR_PTX,
    /// so this is the backend's real minimum.
    const MIN_DRIVER: &str = "470.57";

    /// The NVRTC shared library, by its soname (what cudarc dlopens).
    const NVRTC_SONAME: &str = "libnvrtc.so.12";

    const INSTALL_HINT: &str = "run scripts/install-deps.sh (it installs NVRTC 12.9 from the \
        nvidia-cuda-nvrtc-cu12 wheel into .venv-cuda)";

    pub fn build() {
        if let Err(message) = try_build() {
            eprintln!("error: skep-cuda (feature `cuda`): {message}");
            process::exit(1);
        }
    }

    fn try_build() -> Result<(), String> {
        let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
        let out_dir = PathBuf::from(env_var("OUT_DIR")?);
        let workspace_root = manifest_dir
            .parent()
            .ok_or("the crate has no parent directory")?;
        let kernels_dir = manifest_dir.join("kernels");

        println!("cargo:rerun-if-env-changed=SKEP_NVRTC_DIR");
        println!("cargo:rerun-if-env-changed=SKEP_CUDA_INCLUDE_DIR");
        // A directory here is watched whole, so a new kernel file reruns the build too.
        println!("cargo:rerun-if-changed={}", kernels_dir.display());

        let kernels = kernel_files(&kernels_dir)?;
        let toolchain = Toolchain::find(workspace_root)?;
        println!("cargo:rerun-if-changed={}", toolchain.nvrtc.display());

        // Held until the end of main: while it is loaded, cudarc's dlopen of the bare soname
        // finds this copy (a process's LD_LIBRARY_PATH cannot be changed once it runs).
        let _nvrtc = preload_nvrtc(&toolchain.nvrtc)?;

        let mut table = String::from(
            "/// Each kernel file's stem and its PTX (ISA rewritten to `PTX_ISA`), sorted by stem.\n\
             pub const MODULES: &[(&str, &str)] = &[\n",
        );
        for (stem, path) in &kernels {
            println!("cargo:rerun-if-changed={}", path.display());
            let ptx = compile(path, &kernels_dir, &toolchain.include)?;
            let ptx = set_isa(&ptx, PTX_ISA).map_err(|e| format!("{}: {e}", path.display()))?;
            let ptx_path = out_dir.join(format!("{stem}.ptx"));
            fs::write(&ptx_path, ptx)
                .map_err(|e| format!("cannot write {}: {e}", ptx_path.display()))?;
            let ptx_path = ptx_path
                .to_str()
                .ok_or_else(|| format!("OUT_DIR is not UTF-8: {}", out_dir.display()))?;
            writeln!(table, "    ({stem:?}, include_str!({ptx_path:?})),")
                .expect("writing to a String");
        }
        table.push_str("];\n");
        writeln!(
            table,
            "\n/// The PTX ISA version of every module: the oldest that holds the kernels \
             (see build.rs).\npub const PTX_ISA: &str = {PTX_ISA:?};\n\
             \n/// The oldest Linux driver the backend runs on: the newer of the bindings' floor \
             ({MIN_DRIVER}, CUDA 11.4's driver API) and the PTX's ({MIN_DRIVER_FOR_PTX}, ISA \
             {PTX_ISA}).\npub const MIN_DRIVER: &str = {MIN_DRIVER:?};"
        )
        .expect("writing to a String");
        let table_path = out_dir.join("ptx_modules.rs");
        fs::write(&table_path, table)
            .map_err(|e| format!("cannot write {}: {e}", table_path.display()))?;
        Ok(())
    }

    fn env_var(name: &str) -> Result<String, String> {
        env::var(name).map_err(|e| format!("{name}: {e}"))
    }

    /// Every `*.cu` in `dir` as (stem, path), sorted by stem so the table is reproducible.
    fn kernel_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, String> {
        let entries =
            fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
        let mut kernels = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
                .path();
            if path.extension().is_none_or(|ext| ext != "cu") {
                continue;
            }
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .filter(|s| {
                    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                })
                // The stem names the module in Rust and a file in skep-ptx's output.
                .ok_or_else(|| {
                    format!(
                        "kernel file name {} is not [A-Za-z0-9_]+.cu",
                        path.display()
                    )
                })?
                .to_owned();
            kernels.push((stem, path));
        }
        if kernels.is_empty() {
            return Err(format!("no kernels (*.cu) in {}", dir.display()));
        }
        kernels.sort();
        Ok(kernels)
    }

    struct Toolchain {
        /// Full path of libnvrtc.so.12.
        nvrtc: PathBuf,
        /// Directory holding cuda_fp16.h (NVRTC ships no CUDA headers of its own).
        include: PathBuf,
    }

    impl Toolchain {
        /// SKEP_NVRTC_DIR and SKEP_CUDA_INCLUDE_DIR if set, else the wheels in
        /// `<workspace>/.venv-cuda`; a system toolkit's `include` beside SKEP_NVRTC_DIR also
        /// serves for headers. All that is missing is reported in one message.
        fn find(workspace_root: &Path) -> Result<Self, String> {
            let venv = workspace_root.join(".venv-cuda");
            let site_packages = venv_site_packages(&venv);
            let venv_nvidia =
                |sub: &str| site_packages.as_ref().map(|sp| sp.join("nvidia").join(sub));

            let nvrtc_dir = match env::var_os("SKEP_NVRTC_DIR") {
                Some(dir) => Some(PathBuf::from(dir)),
                None => venv_nvidia("cuda_nvrtc/lib"),
            };
            let nvrtc = nvrtc_dir
                .as_ref()
                .map(|dir| dir.join(NVRTC_SONAME))
                .filter(|lib| lib.is_file());

            let include = match env::var_os("SKEP_CUDA_INCLUDE_DIR") {
                Some(dir) => vec![PathBuf::from(dir)],
                None => {
                    let mut candidates: Vec<PathBuf> =
                        venv_nvidia("cuda_runtime/include").into_iter().collect();
                    if let Some(dir) = env::var_os("SKEP_NVRTC_DIR") {
                        candidates.push(PathBuf::from(dir).join("../include"));
                    }
                    candidates
                }
            };
            let include_found = include
                .iter()
                .find(|dir| dir.join("cuda_fp16.h").is_file())
                .cloned();

            let venv_pattern = venv.join("lib/python3*/site-packages/nvidia");
            let mut missing = Vec::new();
            if nvrtc.is_none() {
                missing.push(match &nvrtc_dir {
                    Some(dir) if env::var_os("SKEP_NVRTC_DIR").is_some() => {
                        format!("no {NVRTC_SONAME} in SKEP_NVRTC_DIR={}", dir.display())
                    }
                    _ => format!(
                        "no {NVRTC_SONAME} in {}",
                        venv_pattern.join("cuda_nvrtc/lib").display()
                    ),
                });
            }
            if include_found.is_none() {
                let places = if include.is_empty() {
                    venv_pattern
                        .join("cuda_runtime/include")
                        .display()
                        .to_string()
                } else {
                    include
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" or ")
                };
                missing.push(format!("no CUDA headers (cuda_fp16.h) in {places}"));
            }
            match (nvrtc, include_found) {
                (Some(nvrtc), Some(include)) => Ok(Self { nvrtc, include }),
                _ => Err(format!(
                    "NVRTC 12 is needed to compile the CUDA kernels: {}; {INSTALL_HINT}, or set \
                     SKEP_NVRTC_DIR to a directory holding {NVRTC_SONAME} (and \
                     SKEP_CUDA_INCLUDE_DIR to one holding cuda_fp16.h)",
                    missing.join("; ")
                )),
            }
        }
    }

    /// `<venv>/lib/python3.*/site-packages`, whatever Python made the venv.
    fn venv_site_packages(venv: &Path) -> Option<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(venv.join("lib"))
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path().join("site-packages"))
            .filter(|p| p.is_dir())
            .collect();
        found.sort();
        found.pop()
    }

    /// Loads NVRTC by full path, then checks that cudarc's own by-name load resolved to this
    /// same copy (a `libnvrtc.so` elsewhere on the loader's path would come first otherwise).
    #[allow(unsafe_code)]
    fn preload_nvrtc(path: &Path) -> Result<libloading::Library, String> {
        // SAFETY: NVRTC's initialisers have no preconditions; the handle outlives every use of
        // NVRTC in this process (it is held until the build script exits).
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        let symbol = b"nvrtcVersion\0";
        // SAFETY: only the symbols' addresses are compared; neither is called here.
        let (ours, theirs) = unsafe {
            let ours = lib
                .get::<unsafe extern "C" fn()>(symbol)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let theirs = cudarc::nvrtc::sys::culib()
                .get::<unsafe extern "C" fn()>(symbol)
                .map_err(|e| format!("cudarc's NVRTC: {e}"))?;
            (*ours as usize, *theirs as usize)
        };
        if ours != theirs {
            return Err(format!(
                "cudarc loaded a different NVRTC than {} (another libnvrtc.so is on the \
                 loader's path); remove it from LD_LIBRARY_PATH or point SKEP_NVRTC_DIR at it",
                path.display()
            ));
        }
        Ok(lib)
    }

    fn compile(path: &Path, kernels_dir: &Path, include: &Path) -> Result<String, String> {
        let src =
            fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(ARCH),
            // f32 results must match the CPU engine's closely, so no --use_fast_math (it
            // flushes denormals and approximates division, sqrt and transcendentals); a
            // fused multiply-add only rounds once, which is as close or closer.
            fmad: Some(true),
            include_paths: vec![
                kernels_dir.display().to_string(),
                include.display().to_string(),
            ],
            name,
            ..Default::default()
        };
        match cudarc::nvrtc::compile_ptx_with_opts(src, opts) {
            Ok(ptx) => Ok(ptx.to_src()),
            Err(cudarc::nvrtc::CompileError::CompileError { log, options, .. }) => Err(format!(
                "NVRTC failed to compile {} (options: {}):\n{}",
                path.display(),
                options.join(" "),
                log.to_string_lossy()
            )),
            Err(e) => Err(format!("NVRTC failed on {}: {e}", path.display())),
        }
    }

    /// `ptx` with its `.version` line replaced by `isa`, which must not be newer than NVRTC's.
    fn set_isa(ptx: &str, isa: &str) -> Result<String, String> {
        let parse = |v: &str| -> Option<(u32, u32)> {
            let (major, minor) = v.split_once('.')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        };
        let mut out = String::with_capacity(ptx.len());
        let mut replaced = false;
        for line in ptx.split_inclusive('\n') {
            match line.trim_end().strip_prefix(".version ") {
                Some(version) if !replaced => {
                    let theirs = parse(version.trim())
                        .ok_or_else(|| format!("unreadable PTX version line {line:?}"))?;
                    if parse(isa) > Some(theirs) {
                        return Err(format!(
                            "NVRTC wrote PTX ISA {version}, older than PTX_ISA {isa}"
                        ));
                    }
                    out.push_str(&format!(".version {isa}\n"));
                    replaced = true;
                }
                _ => out.push_str(line),
            }
        }
        if replaced {
            Ok(out)
        } else {
            Err("NVRTC's PTX has no .version line".into())
        }
    }
}
