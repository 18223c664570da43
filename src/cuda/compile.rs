//! Kernel sources and their compilation by NVRTC.
//!
//! The `.cu`/`.cuh` files of `kernels/` are embedded in the library. A [`Variant`] is one kernel
//! file plus its compile-time constants (`-D` defines); [`compile`] turns it into PTX and, since
//! the architecture is a real one (`sm_80`, `sm_90`, ...), the CUBIN that NVRTC's backend produced
//! on the way, and caches both per `(arch, variant)` for the life of the process. The driver loads
//! the CUBIN as it is: no second PTX-to-SASS compile (driver JIT) when a module is loaded.
//! Compilation needs libnvrtc only (no GPU, no CUDA toolkit headers), so it also runs in CI and is
//! the entry point of the compile-only checks.
//!
//! Every variant takes seconds of NVRTC time; [`precompile`] compiles a list on all cores at once
//! (a GPU check that uses every variant would otherwise spend minutes compiling one after the
//! other), and with `LINATTN_KERNEL_CACHE=<dir>` the results are also kept on disk, keyed by a
//! hash of the source, the options and the NVRTC version, so that later processes skip NVRTC.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};

/// One embedded kernel source file.
#[derive(Clone, Copy, Debug)]
pub struct KernelFile {
    /// File name inside `kernels/`, as used in `#include "..."`.
    pub name: &'static str,
    pub text: &'static str,
}

/// Every kernel source of the crate. Headers are inlined at their first `#include`.
pub static KERNEL_FILES: &[KernelFile] = &[
    KernelFile {
        name: "common.cuh",
        text: include_str!("../../kernels/common.cuh"),
    },
    KernelFile {
        name: "linear_params.cuh",
        text: include_str!("../../kernels/linear_params.cuh"),
    },
    KernelFile {
        name: "linear_chunk.cu",
        text: include_str!("../../kernels/linear_chunk.cu"),
    },
    KernelFile {
        name: "linear_recurrent.cu",
        text: include_str!("../../kernels/linear_recurrent.cu"),
    },
    KernelFile {
        name: "linear_util.cu",
        text: include_str!("../../kernels/linear_util.cu"),
    },
    KernelFile {
        name: "attention.cuh",
        text: include_str!("../../kernels/attention.cuh"),
    },
    KernelFile {
        name: "attention.cu",
        text: include_str!("../../kernels/attention.cu"),
    },
    KernelFile {
        name: "optim.cu",
        text: include_str!("../../kernels/optim.cu"),
    },
];

/// Looks up an embedded kernel file.
pub fn kernel_file(name: &str) -> Option<&'static KernelFile> {
    KERNEL_FILES.iter().find(|f| f.name == name)
}

/// A kernel file and its compile-time constants. Defines are kept sorted so that equal variants
/// compare (and hash) equal however they were built.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Variant {
    pub file: &'static str,
    pub defines: Vec<(String, String)>,
}

impl Variant {
    pub fn new(file: &'static str, defines: &[(&str, String)]) -> Variant {
        let mut defines: Vec<(String, String)> = defines
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        defines.sort();
        Variant { file, defines }
    }

    /// `linear_chunk.cu[LA_BT=64,LA_DTYPE=0]`: a readable, file-name-safe label.
    pub fn label(&self) -> String {
        let defs: Vec<String> = self
            .defines
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{}[{}]", self.file, defs.join(","))
    }

    /// The complete translation unit: defines, then the file with its headers inlined.
    pub fn source(&self) -> Result<String> {
        let mut out = String::new();
        for (k, v) in &self.defines {
            out.push_str(&format!("#define {k} {v}\n"));
        }
        let mut seen = Vec::new();
        inline_includes(self.file, &mut seen, &mut out, false)?;
        Ok(out)
    }

    /// The translation unit for the host emulation build (`LA_EMULATION`, kernels/emu/): the same
    /// text, with the emulation headers inlined too.
    pub fn emulation_source(&self) -> Result<String> {
        let mut out = String::from("#define LA_EMULATION 1\n");
        for (k, v) in &self.defines {
            out.push_str(&format!("#define {k} {v}\n"));
        }
        let mut seen = Vec::new();
        inline_includes(self.file, &mut seen, &mut out, true)?;
        Ok(out)
    }
}

/// Inlines `#include "x"` of embedded files (each once; `#pragma once` lines dropped). Includes under
/// `emu/` are kept as `#include` lines for the emulation build (resolved from the kernels folder by
/// the host compiler) and dropped for NVRTC.
fn inline_includes(
    name: &str,
    seen: &mut Vec<String>,
    out: &mut String,
    emulation: bool,
) -> Result<()> {
    let file = kernel_file(name).ok_or_else(|| Error::KernelCompile {
        kernel: name.to_string(),
        arch: "-".into(),
        log: format!("no embedded kernel file `{name}`"),
    })?;
    seen.push(name.to_string());
    for line in file.text.lines() {
        let trimmed = line.trim();
        if trimmed == "#pragma once" {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix("#include") {
            let inc = rest.trim().trim_matches('"');
            if inc.starts_with("emu/") {
                if emulation {
                    out.push_str(line);
                    out.push('\n');
                }
                continue;
            }
            if !seen.iter().any(|s| s == inc) {
                inline_includes(inc, seen, out, emulation)?;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    Ok(())
}

/// Checks an architecture name: `sm_XY` with compute capability 8.0 or newer (mma.sync m16n8k16
/// with bf16, ldmatrix and cvt.rn.bf16x2 need sm_80).
pub fn check_arch(arch: &str) -> Result<u32> {
    let cc: Option<u32> = arch.strip_prefix("sm_").and_then(|n| n.parse().ok());
    match cc {
        Some(cc) if cc >= 80 => Ok(cc),
        _ => Err(Error::DeviceUnavailable {
            backend: "cuda".into(),
            reason: format!(
                "architecture `{arch}` is not supported: the kernels need sm_80 or newer (bf16 mma.sync)"
            ),
        }),
    }
}

/// The NVRTC options of every compile.
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".into(),
        // Our numerics are written explicitly (fmaf, ex2.approx); keep IEEE division and sqrt.
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--fmad=true".into(),
        "-default-device".into(),
        // The smem-linkage note on the shared `extern __shared__` array is expected.
        "-diag-suppress=1556".into(),
    ]
}

/// One compiled variant: PTX text (what the compile-only checks and the ptxas report read) and the
/// CUBIN of the real architecture, when NVRTC produced one (the driver loads it without JIT).
#[derive(Debug)]
pub struct Compiled {
    pub ptx: Arc<str>,
    pub cubin: Option<Arc<[u8]>>,
}

type Cache = Mutex<HashMap<(String, Variant), Arc<Compiled>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Compiles `variant` for `arch` (e.g. `sm_90`) to PTX text, once per process.
///
/// Errors: [`Error::DeviceUnavailable`] when libnvrtc cannot be loaded or the architecture is too
/// old, [`Error::KernelCompile`] with NVRTC's log when the source does not compile.
pub fn compile_ptx(arch: &str, variant: &Variant) -> Result<Arc<str>> {
    Ok(compile(arch, variant)?.ptx.clone())
}

/// Compiles `variant` for `arch` to PTX and CUBIN, once per process (and, with
/// `LINATTN_KERNEL_CACHE`, once per cache folder). Errors as [`compile_ptx`].
pub fn compile(arch: &str, variant: &Variant) -> Result<Arc<Compiled>> {
    check_arch(arch)?;
    let key = (arch.to_string(), variant.clone());
    if let Some(c) = cache().lock().expect("kernel cache").get(&key) {
        return Ok(c.clone());
    }
    if !super::nvrtc_available() {
        return Err(Error::DeviceUnavailable {
            backend: "cuda".into(),
            reason: super::NVRTC_MISSING.into(),
        });
    }
    let source = variant.source()?;
    let options = nvrtc_options(arch);
    let disk = DiskCache::from_env(&source, &options);
    let compiled = match disk.as_ref().and_then(DiskCache::load) {
        Some(c) => c,
        None => {
            let c = nvrtc_compile(&source, variant.file, &options).map_err(|log| {
                Error::KernelCompile {
                    kernel: variant.label(),
                    arch: arch.to_string(),
                    log,
                }
            })?;
            if let Some(d) = &disk {
                d.store(&c);
            }
            c
        }
    };
    let compiled = Arc::new(compiled);
    cache()
        .lock()
        .expect("kernel cache")
        .insert(key, compiled.clone());
    Ok(compiled)
}

/// PTX of `variant` for the virtual architecture of `arch` (`compute_90` for `sm_90`): NVRTC's
/// front end only, without the SASS that [`compile`] also builds (about 40 % less NVRTC time on
/// the chunk kernels), not cached. For the compile-only checks, whose PTX
/// `scripts/ptxas-report.sh` then assembles for the real architecture with `ptxas -v`: the two
/// steps together are the compile for `arch`. Errors as [`compile_ptx`].
pub fn compile_ptx_virtual(arch: &str, variant: &Variant) -> Result<String> {
    check_arch(arch)?;
    if !super::nvrtc_available() {
        return Err(Error::DeviceUnavailable {
            backend: "cuda".into(),
            reason: super::NVRTC_MISSING.into(),
        });
    }
    let mut options = nvrtc_options(arch);
    options[0] = format!("--gpu-architecture={}", arch.replacen("sm_", "compute_", 1));
    nvrtc_compile(&variant.source()?, variant.file, &options)
        .map(|c| c.ptx.to_string())
        .map_err(|log| Error::KernelCompile {
            kernel: variant.label(),
            arch: arch.to_string(),
            log,
        })
}

/// Compiles every variant of `variants` that is not compiled yet, on up to `threads` threads at
/// once (NVRTC compiles independent programs concurrently). Returns how many it compiled; the
/// first error, if any, after every thread has finished.
pub fn precompile(arch: &str, variants: &[Variant], threads: usize) -> Result<usize> {
    check_arch(arch)?;
    let todo: Vec<&Variant> = {
        let done = cache().lock().expect("kernel cache");
        variants
            .iter()
            .filter(|v| !done.contains_key(&(arch.to_string(), (*v).clone())))
            .collect()
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first_error = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, todo.len().max(1)) {
            scope.spawn(|| {
                while let Some(v) =
                    todo.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    if let Err(e) = compile(arch, v) {
                        first_error.lock().expect("error slot").get_or_insert(e);
                    }
                }
            });
        }
    });
    match first_error.into_inner().expect("error slot") {
        Some(e) => Err(e),
        None => Ok(todo.len()),
    }
}

/// One NVRTC compile: PTX, and the CUBIN when the architecture is a real one; NVRTC's log as the
/// error.
fn nvrtc_compile(
    source: &str,
    name: &str,
    options: &[String],
) -> std::result::Result<Compiled, String> {
    use std::ffi::CString;

    use cudarc::nvrtc::{result, sys};

    /// Destroys the program on every path out.
    struct Program(sys::nvrtcProgram);
    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: created by `create_program` and destroyed only here.
            let _ = unsafe { result::destroy_program(self.0) };
        }
    }
    let text = |chars: Vec<std::ffi::c_char>| -> String {
        let bytes: Vec<u8> = chars
            .into_iter()
            .map(|c| c as u8)
            .take_while(|&b| b != 0)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };

    let src = CString::new(source).map_err(|_| "the source holds a NUL byte".to_string())?;
    let name = CString::new(name).map_err(|_| "the name holds a NUL byte".to_string())?;
    let prog = Program(
        result::create_program(&src, Some(&name))
            .map_err(|e| format!("nvrtcCreateProgram: {e}"))?,
    );
    // SAFETY: `prog.0` is a live program for every call below.
    unsafe {
        if let Err(e) = result::compile_program(prog.0, options) {
            let log = result::get_program_log(prog.0)
                .map(text)
                .unwrap_or_default();
            return Err(format!("{e}: {log}"));
        }
        let ptx = result::get_ptx(prog.0).map_err(|e| format!("nvrtcGetPTX: {e}"))?;
        let mut size = 0usize;
        let cubin = if sys::nvrtcGetCUBINSize(prog.0, &mut size).result().is_ok() && size > 0 {
            let mut bytes = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog.0, bytes.as_mut_ptr().cast())
                .result()
                .ok()
                .map(|()| Arc::from(bytes))
        } else {
            None
        };
        Ok(Compiled {
            ptx: Arc::from(text(ptx)),
            cubin,
        })
    }
}

/// The NVRTC version, `major.minor`.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !super::nvrtc_available() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: libnvrtc is loaded; the call writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .ok()
        .map(|()| (major, minor))
}

/// The on-disk cache of `LINATTN_KERNEL_CACHE`: `<hash>.ptx` and `<hash>.cubin`, the hash over the
/// source, the options and the NVRTC version (FNV-1a, stable across processes and builds).
struct DiskCache {
    stem: std::path::PathBuf,
}

impl DiskCache {
    fn from_env(source: &str, options: &[String]) -> Option<DiskCache> {
        let dir = std::path::PathBuf::from(std::env::var_os("LINATTN_KERNEL_CACHE")?);
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let version = format!("{:?}", nvrtc_version());
        for part in std::iter::once(source)
            .chain(options.iter().map(String::as_str))
            .chain(std::iter::once(version.as_str()))
        {
            for b in part.bytes().chain(std::iter::once(0)) {
                hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        std::fs::create_dir_all(&dir).ok()?;
        Some(DiskCache {
            stem: dir.join(format!("{hash:016x}")),
        })
    }

    fn load(&self) -> Option<Compiled> {
        let ptx = std::fs::read_to_string(self.stem.with_extension("ptx")).ok()?;
        let cubin = std::fs::read(self.stem.with_extension("cubin"))
            .ok()
            .map(Arc::from);
        Some(Compiled {
            ptx: Arc::from(ptx),
            cubin,
        })
    }

    /// Writes the entry (each file through a temporary name, so a reader never sees half of
    /// one; the CUBIN first, so a PTX file means the entry is complete). Failures only cost a
    /// later recompile.
    fn store(&self, c: &Compiled) {
        let write = |ext: &str, bytes: &[u8]| {
            let tmp = self
                .stem
                .with_extension(format!("{ext}.{}.tmp", std::process::id()));
            if std::fs::write(&tmp, bytes).is_ok() {
                let _ = std::fs::rename(&tmp, self.stem.with_extension(ext));
            }
        };
        if let Some(cubin) = &c.cubin {
            write("cubin", cubin);
        }
        write("ptx", c.ptx.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn includes_are_inlined_once() {
        let v = Variant::new("linear_util.cu", &[("LA_DTYPE", "0".into())]);
        let src = v.source().unwrap();
        assert!(src.starts_with("#define LA_DTYPE 0\n"));
        assert_eq!(src.matches("struct LaParams {").count(), 1);
        assert_eq!(src.matches("struct bf16_t {").count(), 1);
        assert!(!src.contains("#include"));
        assert!(!src.contains("#pragma once"));
        let emu = v.emulation_source().unwrap();
        assert!(emu.starts_with("#define LA_EMULATION 1\n"));
        assert!(emu.contains("#include \"emu/primitives.h\""));
    }

    #[test]
    fn variants_are_canonical() {
        let a = Variant::new("linear_chunk.cu", &[("B", "1".into()), ("A", "2".into())]);
        let b = Variant::new("linear_chunk.cu", &[("A", "2".into()), ("B", "1".into())]);
        assert_eq!(a, b);
        assert_eq!(a.label(), "linear_chunk.cu[A=2,B=1]");
    }

    /// NVRTC gives the CUBIN of the real architecture beside the PTX (the ELF the driver loads),
    /// and the on-disk cache returns what was compiled.
    #[test]
    fn compile_gives_cubin_and_the_disk_cache_returns_it() {
        if !crate::cuda::nvrtc_available() {
            println!("skipped: libnvrtc not found");
            return;
        }
        let v = Variant::new("linear_util.cu", &[("LA_DTYPE", "2".into())]);
        let source = v.source().unwrap();
        let options = nvrtc_options("sm_90");
        let c = nvrtc_compile(&source, v.file, &options).unwrap();
        assert!(c.ptx.contains(".target sm_90"), "{}", &c.ptx[..200]);
        let cubin = c.cubin.as_ref().expect("a CUBIN for sm_90");
        // The virtual-architecture PTX is the same program for the same target.
        let virtual_ptx = compile_ptx_virtual("sm_90", &v).unwrap();
        assert!(virtual_ptx.contains(".target sm_90"));
        assert_eq!(
            virtual_ptx.matches(".entry ").count(),
            c.ptx.matches(".entry ").count()
        );
        assert_eq!(&cubin[..4], b"\x7fELF");
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache {
            stem: dir.path().join("entry"),
        };
        assert!(disk.load().is_none());
        disk.store(&c);
        let back = disk.load().unwrap();
        assert_eq!(back.ptx, c.ptx);
        assert_eq!(back.cubin.as_deref(), c.cubin.as_deref());
        // A compile error is NVRTC's log.
        let err = nvrtc_compile(
            "__global__ void k() { undefined_thing(); }",
            "bad.cu",
            &options,
        )
        .unwrap_err();
        assert!(err.contains("undefined_thing"), "{err}");
    }

    #[test]
    fn arch_names() {
        assert_eq!(check_arch("sm_90").unwrap(), 90);
        assert_eq!(check_arch("sm_80").unwrap(), 80);
        assert!(check_arch("sm_75").is_err());
        assert!(check_arch("compute_90").is_err());
    }
}
