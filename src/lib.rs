//! linattn: GPU kernels for decayed linear attention, LightNet, block-sparse (Radial) softmax
//! attention and fused optimizer steps, each checked against the naive f64 CPU reference of
//! [`linattn_reference`].
//!
//! The backend is picked at run time ([`Backend::new`] with [`DeviceRequest::Auto`]: CUDA if usable,
//! else a wgpu adapter, else the CPU). Every op validates its input on the host and returns a typed
//! [`Error`]; nothing panics across the public API.

pub mod attention;
pub mod backend;
#[doc(hidden)]
pub mod cli;
#[cfg(feature = "cube")]
pub mod cube;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod lightnet;
pub mod linear;
pub mod lion;
pub mod optim;
pub mod suites;
pub mod tensor;
pub(crate) mod validation;

pub use backend::{Backend, BackendKind, BackendProbe, DeviceRequest, ValueCheck};
pub use error::{Error, Result};
pub use linattn_reference as reference;
pub use tensor::{DType, Shaped, Tensor, TensorData, TensorMeta};
/// The typed error for a tensor whose values a device-side check flagged (framework adapters
/// check values with their own ops, then name the element with this).
pub use validation::flagged_values_error;

/// The README's examples, compiled and run as doc tests.
#[cfg(all(doctest, feature = "cube"))]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;
