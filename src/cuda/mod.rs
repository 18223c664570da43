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
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether libcuda (the driver) can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
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
    /// Loaded modules of this context, per kernel variant.
    modules: exec::ModuleCache,
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
                context,
                stream,
                name,
                capability,
                modules: exec::ModuleCache::default(),
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
