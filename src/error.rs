//! Typed errors. Every public entry point validates its input once, on the host, before any launch,
//! and reports what is wrong through one of these variants; nothing panics across the public API.

use crate::tensor::DType;

/// Result alias of the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor's shape does not match what the op needs.
    #[error("shape mismatch for `{tensor}`: expected {expected}, got {actual:?}")]
    ShapeMismatch {
        tensor: String,
        /// The expected shape in words, e.g. `[B, T, H, K] = [2, 64, 4, 32]`.
        expected: String,
        actual: Vec<usize>,
    },

    /// A required input is absent.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),

    /// A gate value is positive (a growth, not a decay) or not finite.
    #[error(
        "invalid gate `{tensor}`: element {index} is {value}; gates are natural-log decays and must be finite and <= 0"
    )]
    InvalidGate {
        tensor: String,
        index: usize,
        value: f64,
    },

    /// A non-gate input holds NaN or an infinity.
    #[error("non-finite input `{tensor}`: element {index} is {value}")]
    NonFinite {
        tensor: String,
        index: usize,
        value: f64,
    },

    /// `cu_seqlens` is empty, does not start at 0, decreases, or does not end at the packed length.
    #[error("bad cu_seqlens: {0}")]
    BadCuSeqlens(String),

    /// The backend does not take this dtype for this tensor.
    #[error("unsupported dtype {dtype} for `{tensor}` on {backend}: supported {supported}")]
    UnsupportedDtype {
        tensor: String,
        dtype: DType,
        backend: String,
        supported: String,
    },

    /// The backend does not take this head dimension.
    #[error("unsupported head dim {dim} for `{tensor}` on {backend}: supported {supported}")]
    UnsupportedHeadDim {
        tensor: String,
        dim: usize,
        backend: String,
        supported: String,
    },

    /// A combination of options that is not implemented (e.g. a form a backend does not offer).
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// An option or scalar argument is out of its domain.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The requested device cannot be used here.
    #[error("device unavailable ({backend}): {reason}")]
    DeviceUnavailable { backend: String, reason: String },

    /// NVRTC rejected a kernel; `log` is the compiler's log.
    #[error("kernel `{kernel}` failed to compile for {arch}:\n{log}")]
    KernelCompile {
        kernel: String,
        arch: String,
        log: String,
    },

    /// A driver or runtime call failed after validation (launch, copy, synchronisation).
    #[error("{backend} runtime error: {message}")]
    Runtime { backend: String, message: String },

    /// Reading or writing a file.
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// An output holds NaN or an infinity (an overflow, or a NaN the inputs did not show).
    #[error(
        "output `{tensor}` has {count} non-finite values of {total} ({detail}); the inputs overflow f32 on this backend (scale them down, or use the cpu backend)"
    )]
    NonFiniteOutput {
        tensor: String,
        count: usize,
        total: usize,
        detail: String,
    },

    /// A malformed safetensors file.
    #[error("safetensors: {0}")]
    Safetensors(String),
}

impl Error {
    /// [`Error::ShapeMismatch`] for `tensor`.
    pub fn shape(tensor: &str, expected: impl Into<String>, actual: &[usize]) -> Self {
        Error::ShapeMismatch {
            tensor: tensor.to_string(),
            expected: expected.into(),
            actual: actual.to_vec(),
        }
    }
}
