//! The tuned NVIDIA tier: hand-written CUDA C++ (`kernels/*.cu`) compiled at run time by NVRTC
//! through cudarc. libcuda and libnvrtc are loaded dynamically; their absence is reported as
//! [`Error::DeviceUnavailable`], never as a panic (cudarc itself panics on a missing library, so we
//! probe first).
//!
//! Layout: [`compile`] (embedded sources, NVRTC, PTX cache; usable without a GPU), [`exec`] (the
//! [`exec::Executor`] interface, its CUDA implementation with a per-context module cache, and
//! launches), [`emu`] (the same interface on the host emulation of `kernels/emu`, for checks
//! without a GPU). Kernel families (e.g. `linear::cuda`) build on these.

pub mod compile;
pub mod emu;
pub mod exec;

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext as DriverContext, CudaStream};

use crate::error::{Error, Result};

/// Why the CUDA backend cannot compile kernels when libnvrtc is missing.
pub(crate) const NVRTC_MISSING: &str = "libnvrtc not found (install the CUDA toolkit or the `nvidia-cuda-nvrtc-cu12` wheel, e.g. scripts/install-cuda-wheels.sh, and put its lib folder on LD_LIBRARY_PATH)";

/// Whether libnvrtc can be loaded (kernels can be compiled, with or without a GPU).
///
/// cudarc looks for libnvrtc on the dynamic loader's search path only. Before asking it, a copy in
/// `$LINATTN_NVRTC_DIR` (CUDA 12 or 13), or else in this checkout's `.tools/cuda` (where
/// scripts/install-cuda-wheels.sh puts the `nvidia-cuda-nvrtc-cu12` wheel), is loaded and kept
/// loaded: the loader then resolves cudarc's `dlopen("libnvrtc.so.12")` to it by its soname (the
/// wheel's library finds its builtins next to itself through its `$ORIGIN` runpath).
pub fn nvrtc_available() -> bool {
    preload_nvrtc();
    library_present(|| {
        // SAFETY: only tries to dlopen the library.
        #[cfg(not(feature = "cuda-linked"))]
        unsafe {
            cudarc::nvrtc::sys::is_culib_present()
        }
        #[cfg(feature = "cuda-linked")]
        true
    })
}

/// Whether a CUDA library is there. With `cuda-linked` (cudarc built with `dynamic-linking`, as
/// candle's `cuda` feature asks), the libraries are linked when the binary is loaded: a running
/// process has them, and cudarc has no probe to ask.
fn library_present(probe: impl FnOnce() -> bool) -> bool {
    probe()
}

fn preload_nvrtc() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut dirs: Vec<std::path::PathBuf> = Vec::new();
        if let Some(d) = std::env::var_os("LINATTN_NVRTC_DIR") {
            dirs.push(d.into());
        }
        dirs.push(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(".tools/cuda/nvidia/cuda_nvrtc/lib"),
        );
        // CUDA 12's wheel ships `libnvrtc.so.12`, CUDA 13's `libnvrtc.so.13` (in `nvidia/cu13/lib`);
        // cudarc's candidate names cover both sonames, so either one preloaded is the one it uses.
        for dir in dirs {
            for name in ["libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so"] {
                let lib = dir.join(name);
                if lib.exists() {
                    // SAFETY: loading libnvrtc runs no code beyond its initialisers.
                    if let Ok(l) = unsafe { libloading::Library::new(&lib) } {
                        // Keep it loaded for the life of the process.
                        std::mem::forget(l);
                        return;
                    }
                }
            }
        }
    });
}

/// Every kernel variant the library can launch (engine, attention, optimizer): what
/// [`compile::precompile`] warms before a run that uses most of them.
pub fn all_variants() -> Vec<compile::Variant> {
    let mut out = crate::linear::cuda::kernels::all_variants();
    out.extend(crate::attention::cuda::kernels::all_variants());
    out.extend(crate::optim::cuda::all_variants());
    out
}

/// Compiles every variant of [`all_variants`] for this context's architecture on all cores (or
/// takes them from `LINATTN_KERNEL_CACHE`), so that the launches after it do not wait for NVRTC
/// one variant at a time. Returns how many were compiled and on how many threads.
pub fn warm_up_kernels(ctx: &CudaContext) -> Result<(usize, usize)> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let n = compile::precompile(&ctx.arch(), &all_variants(), threads)?;
    Ok((n, threads))
}

static HOST_TRANSFER_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes linattn's CUDA tier has copied between host and device in this process: every upload
/// and read-back of [`exec::CudaExec`] (the host-tensor API's inputs and outputs, variable-length
/// chunk tables, uploaded attention plans, the value check's flags) and the value check's
/// read-back of a flagged input. The device-resident APIs add nothing for fixed-length problems
/// with the value check off: a framework adapter asserts that its device path keeps this
/// constant (the cube tier's twin is [`crate::cube::host_transfer_bytes`]).
pub fn host_transfer_bytes() -> u64 {
    HOST_TRANSFER_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Adds `bytes` to [`host_transfer_bytes`].
pub(crate) fn count_host_transfer(bytes: usize) {
    HOST_TRANSFER_BYTES.fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
}

/// Whether libcuda (the driver) can be loaded.
pub fn driver_available() -> bool {
    library_present(|| {
        // SAFETY: only tries to dlopen the library.
        #[cfg(not(feature = "cuda-linked"))]
        unsafe {
            cudarc::driver::sys::is_culib_present()
        }
        #[cfg(feature = "cuda-linked")]
        true
    })
}

/// A CUDA device, its default stream and its architecture.
#[derive(Clone)]
pub struct CudaContext {
    inner: Arc<CudaInner>,
}

struct CudaInner {
    context: Arc<DriverContext>,
    stream: Arc<CudaStream>,
    name: String,
    /// Compute capability, e.g. (9, 0).
    capability: (i32, i32),
    /// Loaded modules of the driver context, per kernel variant (shared by every
    /// [`CudaContext`] on that driver context, whatever its stream).
    modules: Arc<exec::ModuleCache>,
}

/// The module cache of a driver context (`CUcontext`): modules are per driver context, so
/// contexts made from different streams of one device share them.
fn module_cache_of(context: &DriverContext) -> Arc<exec::ModuleCache> {
    /// Per `CUcontext` (its address), the module cache of that driver context.
    type Caches = std::sync::Mutex<Vec<(usize, Arc<exec::ModuleCache>)>>;
    static CACHES: OnceLock<Caches> = OnceLock::new();
    let key = context.cu_ctx() as usize;
    let mut caches = CACHES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some((_, cache)) = caches.iter().find(|(k, _)| *k == key) {
        return cache.clone();
    }
    let cache = Arc::new(exec::ModuleCache::default());
    caches.push((key, cache.clone()));
    cache
}

impl CudaContext {
    /// Device 0, started once per process.
    pub fn shared() -> Result<CudaContext> {
        static CONTEXT: OnceLock<std::result::Result<CudaContext, String>> = OnceLock::new();
        CONTEXT
            .get_or_init(|| Self::start(0))
            .clone()
            .map_err(|reason| Error::DeviceUnavailable {
                backend: "cuda".into(),
                reason,
            })
    }

    fn start(ordinal: usize) -> std::result::Result<CudaContext, String> {
        if !driver_available() {
            return Err("libcuda (the NVIDIA driver library) not found".into());
        }
        if !nvrtc_available() {
            return Err(NVRTC_MISSING.into());
        }
        let count = DriverContext::device_count().map_err(|e| format!("cuInit failed: {e:?}"))?;
        if count <= ordinal as i32 {
            return Err(format!("no CUDA device {ordinal} ({count} found)"));
        }
        let context = DriverContext::new(ordinal).map_err(|e| format!("{e:?}"))?;
        let name = context.name().map_err(|e| format!("{e:?}"))?;
        let capability = context.compute_capability().map_err(|e| format!("{e:?}"))?;
        if capability.0 < 8 {
            return Err(format!(
                "{name} has compute capability {}.{}; the kernels need 8.0 or newer",
                capability.0, capability.1
            ));
        }
        let stream = context.default_stream();
        Ok(CudaContext {
            inner: Arc::new(CudaInner {
                modules: module_cache_of(&context),
                context,
                stream,
                name,
                capability,
            }),
        })
    }

    /// A context that launches on `stream` (a framework's own stream: candle's per-thread stream,
    /// say), on the device and driver context the stream belongs to. Kernels loaded through any
    /// context of that driver context are shared. Errors: `DeviceUnavailable` without libnvrtc
    /// or on a device older than compute capability 8.0.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<CudaContext> {
        let unavailable = |reason: String| Error::DeviceUnavailable {
            backend: "cuda".into(),
            reason,
        };
        if !nvrtc_available() {
            return Err(unavailable(NVRTC_MISSING.into()));
        }
        let context = stream.context().clone();
        let name = context.name().map_err(|e| unavailable(format!("{e:?}")))?;
        let capability = context
            .compute_capability()
            .map_err(|e| unavailable(format!("{e:?}")))?;
        if capability.0 < 8 {
            return Err(unavailable(format!(
                "{name} has compute capability {}.{}; the kernels need 8.0 or newer",
                capability.0, capability.1
            )));
        }
        Ok(CudaContext {
            inner: Arc::new(CudaInner {
                modules: module_cache_of(&context),
                context,
                stream,
                name,
                capability,
            }),
        })
    }

    pub fn device_name(&self) -> &str {
        &self.inner.name
    }

    /// `(major, minor)` compute capability.
    pub fn capability(&self) -> (i32, i32) {
        self.inner.capability
    }

    /// NVRTC architecture flag value for this device, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        let (major, minor) = self.inner.capability;
        format!("sm_{major}{minor}")
    }

    pub fn driver_context(&self) -> &Arc<DriverContext> {
        &self.inner.context
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    pub(crate) fn module_cache(&self) -> &exec::ModuleCache {
        &self.inner.modules
    }
}
