//! Run-time device selection. `auto` tries CUDA (the hand-written kernels), then a wgpu adapter (the
//! CubeCL kernels), then the CPU reference; a backend that cannot start reports why instead of
//! panicking.

use crate::error::{Error, Result};

/// Whether a device-resident call (inputs already on the device: `linear::cube::forward_device`,
/// `CubeAttentionPlan::forward`, `linear::cuda::device::forward`, ...) checks its input values on
/// the device before the launches. The host API always validates values on the host and never
/// checks twice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ValueCheck {
    /// The default: one reduction per input (finite values, gates `<= 0`) and one small read back
    /// (on CUDA the call then synchronises its stream once); a bad value is the host API's
    /// [`Error::NonFinite`] or [`Error::InvalidGate`], naming the tensor and the first bad element.
    #[default]
    On,
    /// No check: the caller vouches for finite inputs and gates `<= 0` (a positive gate overflows
    /// and the outputs hold inf / NaN), and a CUDA call stays fully asynchronous.
    Off,
}

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

/// What [`Backend::probe`] found for one backend kind.
#[derive(Clone, Debug)]
pub struct BackendProbe {
    pub kind: BackendKind,
    /// The started backend's description ([`Backend::description`]), or why it cannot start.
    pub status: std::result::Result<String, String>,
}

impl std::fmt::Display for BackendProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.status {
            Ok(description) => write!(f, "{}: available, {description}", self.kind),
            Err(reason) => write!(f, "{}: skipped: {reason}", self.kind),
        }
    }
}

impl Backend {
    /// Starts the requested backend. `Auto` takes the first of cuda, cube, cpu that starts; what it
    /// passed over and why is what [`Backend::probe`] (or [`Backend::auto_with_report`]) says.
    pub fn new(request: DeviceRequest) -> Result<Backend> {
        match request {
            DeviceRequest::Cpu => Ok(Backend::Cpu),
            DeviceRequest::Cube => Self::cube(),
            DeviceRequest::Cuda => Self::cuda(),
            DeviceRequest::Auto => Ok(Self::auto_with_report().0),
        }
    }

    /// `Auto`'s choice, with the backends it passed over (faster than the one chosen) and why
    /// each could not start.
    pub fn auto_with_report() -> (Backend, Vec<BackendProbe>) {
        let mut skipped = Vec::new();
        for (kind, start) in [
            (BackendKind::Cuda, Self::cuda as fn() -> Result<Backend>),
            (BackendKind::Cube, Self::cube),
        ] {
            match start() {
                Ok(backend) => return (backend, skipped),
                Err(e) => skipped.push(BackendProbe {
                    kind,
                    status: Err(unavailable_reason(e)),
                }),
            }
        }
        (Backend::Cpu, skipped)
    }

    /// Tries every backend kind (cuda, cube, cpu; the shared contexts are started once per
    /// process) and says which can run here and, for the others, why not.
    pub fn probe() -> Vec<BackendProbe> {
        [BackendKind::Cuda, BackendKind::Cube, BackendKind::Cpu]
            .into_iter()
            .map(|kind| BackendProbe {
                kind,
                status: Self::of_kind(kind)
                    .map(|b| b.description())
                    .map_err(unavailable_reason),
            })
            .collect()
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

/// The reason of a backend that could not start, without the error's prefix.
fn unavailable_reason(e: Error) -> String {
    match e {
        Error::DeviceUnavailable { reason, .. } => reason,
        other => other.to_string(),
    }
}
