//! Run-time device selection. `auto` tries CUDA (the hand-written kernels), then a wgpu adapter (the
//! CubeCL kernels), then the CPU reference; a backend that cannot start reports why instead of
//! panicking.

use crate::error::{Error, Result};

/// What the caller asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// CUDA if usable, else a wgpu adapter, else the CPU reference.
    Auto,
    /// The f64 CPU reference.
    Cpu,
    /// The CubeCL kernels (wgpu: Vulkan, Metal, DX12, or llvmpipe on a CPU).
    Cube,
    /// The hand-written CUDA kernels (NVRTC through cudarc).
    Cuda,
}

impl std::str::FromStr for DeviceRequest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" | "reference" => Ok(DeviceRequest::Cpu),
            "cube" | "wgpu" => Ok(DeviceRequest::Cube),
            "cuda" => Ok(DeviceRequest::Cuda),
            other => Err(Error::InvalidArgument(format!(
                "unknown device `{other}` (expected auto, cpu, cube or cuda)"
            ))),
        }
    }
}

/// The three backend families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Cpu,
    Cube,
    Cuda,
}

impl BackendKind {
    pub fn name(&self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cube => "cube",
            BackendKind::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A started backend. Cheap to clone (contexts are shared).
#[derive(Clone)]
pub enum Backend {
    /// The f64 CPU reference (`linattn-reference`).
    Cpu,
    #[cfg(feature = "cube")]
    Cube(crate::cube::CubeContext),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaContext),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backend({})", self.description())
    }
}

impl Backend {
    /// Starts the requested backend.
    pub fn new(request: DeviceRequest) -> Result<Backend> {
        match request {
            DeviceRequest::Cpu => Ok(Backend::Cpu),
            DeviceRequest::Cube => Self::cube(),
            DeviceRequest::Cuda => Self::cuda(),
            DeviceRequest::Auto => Ok(Self::cuda()
                .or_else(|_| Self::cube())
                .unwrap_or(Backend::Cpu)),
        }
    }

    /// Starts a backend of this kind.
    pub fn of_kind(kind: BackendKind) -> Result<Backend> {
        Self::new(match kind {
            BackendKind::Cpu => DeviceRequest::Cpu,
            BackendKind::Cube => DeviceRequest::Cube,
            BackendKind::Cuda => DeviceRequest::Cuda,
        })
    }

    fn cube() -> Result<Backend> {
        #[cfg(feature = "cube")]
        {
            crate::cube::CubeContext::shared().map(Backend::Cube)
        }
        #[cfg(not(feature = "cube"))]
        {
            Err(Error::DeviceUnavailable {
                backend: "cube".into(),
                reason: "linattn was built without the `cube` feature".into(),
            })
        }
    }

    fn cuda() -> Result<Backend> {
        #[cfg(feature = "cuda")]
        {
            crate::cuda::CudaContext::shared().map(Backend::Cuda)
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(Error::DeviceUnavailable {
                backend: "cuda".into(),
                reason: "linattn was built without the `cuda` feature".into(),
            })
        }
    }

    pub fn kind(&self) -> BackendKind {
        match self {
            Backend::Cpu => BackendKind::Cpu,
            #[cfg(feature = "cube")]
            Backend::Cube(_) => BackendKind::Cube,
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => BackendKind::Cuda,
        }
    }

    /// Backend and device in words, e.g. `cube (wgpu: llvmpipe (LLVM 15.0.6, 256 bits))`.
    pub fn description(&self) -> String {
        match self {
            Backend::Cpu => "cpu (f64 reference)".to_string(),
            #[cfg(feature = "cube")]
            Backend::Cube(c) => format!("cube ({})", c.adapter_name()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(c) => format!("cuda ({})", c.device_name()),
        }
    }
}
