//! linattn's kernels as differentiable burn tensor ops, on the tensors' own device.
//!
//! ```ignore
//! let out = linattn_burn::LinearAttention::causal(q, k, v)
//!     .with_gate(linattn_burn::Gate::Vector(g))
//!     .forward()?;
//! ```
//!
//! Each function takes burn [`Tensor`](burn::tensor::Tensor)s in linattn's `[B, T, H, D]` layout,
//! checks shapes (and, unless told not to, values) before anything is queued, and returns
//! burn tensors in the inputs' dtype. Under `device.autodiff()` the gradients come from
//! linattn's analytic backward kernels. See [`backend`] for how each burn backend runs them.

// The backend ops take every tensor of a problem as its own argument and return tuples of
// gradients: burn's extension macro routes each tensor argument separately.
#![allow(clippy::too_many_arguments, clippy::type_complexity)]

pub mod attention;
pub mod backend;
pub mod config;
mod cube;
pub mod decode;
mod host;
pub mod lightnet;
pub mod linear;
pub mod optim;

pub use attention::{AttentionOutput, BlockSparseAttention};
pub use backend::LinattnBackend;
pub use decode::decode_step;
pub use lightnet::{LightNet, LightNetOutput};
pub use linattn::attention::{BlockMask, RadialConfig, RadialModel};
pub use linattn::linear::{Direction, Form};
pub use linattn::{Error, Result};
pub use linear::{Gate, LinearAttention, LinearOutput, Lion, gla};
pub use optim::{FusedOptimizer, merge_checkpoints};

/// Bytes linattn copied between host and device (see [`linattn::cube::host_transfer_bytes`]);
/// the device path of this crate adds nothing to it.
pub fn host_transfer_bytes() -> u64 {
    linattn::cube::host_transfer_bytes()
}
