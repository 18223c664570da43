#![doc = include_str!("../README.md")]
//!
//! ## What is here
//!
//! - [`LinearAttention`] (with [`Gate`], [`Lion`] and [`gla`]): the decayed linear attention
//!   engine, causal or bidirectional, every gate kind, `h0` in and `ht` out, `cu_seqlens`, every
//!   form.
//! - [`LightNet`]: the additive recurrence (causal with its state, non-causal).
//! - [`BlockSparseAttention`]: dense, causal, a [`BlockMask`] or a Radial mask; `o` and `lse`.
//! - [`decode_step`]: one token of generation, the state on the device.
//! - [`FusedOptimizer`] and [`merge_checkpoints`]: linattn's fused AdamW / Lion step over a whole
//!   module with a scheduled learning rate, and WSM merging.
//!
//! Each function takes burn tensors in linattn's `[B, T, H, D]` layout, checks shapes, dtypes,
//! devices (and, unless told not to, values) before anything is queued, returning a typed
//! [`Error`], and returns burn tensors in the inputs' dtype. See [`backend`] for how each burn
//! backend runs the ops.

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
pub mod train;

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
