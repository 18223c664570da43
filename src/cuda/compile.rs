//! Kernel sources and their compilation to PTX by NVRTC.
//!
//! The `.cu`/`.cuh` files of `kernels/` are embedded in the library. A [`Variant`] is one kernel
//! file plus its compile-time constants (`-D` defines); [`compile_ptx`] turns it into PTX for one
//! architecture (`sm_80`, `sm_90`, ...) and caches the result per `(arch, variant)` for the life of
//! the process. Compilation needs libnvrtc only (no GPU, no CUDA toolkit headers), so it also runs
//! in CI and is the entry point of the compile-only checks.

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

type PtxCache = Mutex<HashMap<(String, Variant), Arc<str>>>;

fn ptx_cache() -> &'static PtxCache {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Compiles `variant` for `arch` (e.g. `sm_90`) to PTX text, once per process.
///
/// Errors: [`Error::DeviceUnavailable`] when libnvrtc cannot be loaded or the architecture is too
/// old, [`Error::KernelCompile`] with NVRTC's log when the source does not compile.
pub fn compile_ptx(arch: &str, variant: &Variant) -> Result<Arc<str>> {
    check_arch(arch)?;
    let key = (arch.to_string(), variant.clone());
    if let Some(ptx) = ptx_cache().lock().expect("ptx cache").get(&key) {
        return Ok(ptx.clone());
    }
    if !super::nvrtc_available() {
        return Err(Error::DeviceUnavailable {
            backend: "cuda".into(),
            reason: super::NVRTC_MISSING.into(),
        });
    }
    let source = variant.source()?;
    let options = cudarc::nvrtc::CompileOptions {
        options: nvrtc_options(arch),
        name: Some(variant.file.to_string()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, options).map_err(|e| {
        let log = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        };
        Error::KernelCompile {
            kernel: variant.label(),
            arch: arch.to_string(),
            log,
        }
    })?;
    let text: Arc<str> = Arc::from(ptx.to_src());
    ptx_cache()
        .lock()
        .expect("ptx cache")
        .insert(key, text.clone());
    Ok(text)
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

    #[test]
    fn arch_names() {
        assert_eq!(check_arch("sm_90").unwrap(), 90);
        assert_eq!(check_arch("sm_80").unwrap(), 80);
        assert!(check_arch("sm_75").is_err());
        assert!(check_arch("compute_90").is_err());
    }
}
