//! The tuned NVIDIA tier: hand-written CUDA C++ (`kernels/*.cu`) compiled at run time by NVRTC
//! through cudarc. libcuda and libnvrtc are loaded dynamically; their absence is reported as
//! [`Error::DeviceUnavailable`], never as a panic (cudarc itself panics on a missing library, so we
//! probe first).

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext as DriverContext, CudaStream};

use crate::error::{Error, Result};

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
            return Err("libnvrtc not found (install the CUDA toolkit or the `nvidia-cuda-nvrtc-cu12` wheel and put its lib folder on LD_LIBRARY_PATH)".into());
        }
        let count = DriverContext::device_count().map_err(|e| format!("cuInit failed: {e:?}"))?;
        if count <= ordinal as i32 {
            return Err(format!("no CUDA device {ordinal} ({count} found)"));
        }
        let context = DriverContext::new(ordinal).map_err(|e| format!("{e:?}"))?;
        let name = context.name().map_err(|e| format!("{e:?}"))?;
        let capability = context.compute_capability().map_err(|e| format!("{e:?}"))?;
        let stream = context.default_stream();
        Ok(CudaContext {
            inner: Arc::new(CudaInner {
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
}
