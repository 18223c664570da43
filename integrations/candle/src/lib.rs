#![doc = include_str!("../README.md")]
//!
//! ## What is here
//!
//! - [`LinearAttention`] (with [`Gate`], [`Lion`] and [`gla`]): the decayed linear attention
//!   engine, causal or bidirectional, every gate kind, `h0` in and `ht` out, `cu_seqlens`, every
//!   form.
//! - [`LightNet`]: the additive recurrence (causal with its state, non-causal).
//! - [`BlockSparseAttention`]: dense, causal, a [`BlockMask`] or a Radial mask; `o` and `lse`.
//! - [`decode_step`]: one token of generation.
//! - [`FusedOptimizer`]: linattn's fused AdamW / Lion step over a list of variables, with a
//!   scheduled learning rate.
//!
//! Each function takes candle tensors in linattn's `[B, T, H, D]` layout, checks shapes, dtypes,
//! devices (and, unless told not to, values) before anything runs, returning linattn's typed
//! [`Error`], and returns candle tensors: outputs in the inputs' dtype, states in f32. On a CPU
//! device the ops run linattn's f64 reference; with the `cuda` feature, on a CUDA device, they
//! run linattn's hand-written kernels on candle's buffers and stream (no host copy).
//!
//! candle's custom ops take at most three tensors and return one: each op packs its inputs
//! (`flatten_all` + `cat`) and cuts its packed output apart (`narrow`), so that candle's autograd
//! routes every gradient (`convert` module docs).

pub mod attention;
mod convert;
#[cfg(feature = "cuda")]
mod cuda;
pub mod decode;
pub mod lightnet;
pub mod linear;
pub mod optim;

pub use attention::{AttentionOutput, BlockSparseAttention};
pub use decode::decode_step;
pub use lightnet::{LightNet, LightNetOutput};
pub use linattn::attention::{BlockMask, RadialConfig, RadialModel};
pub use linattn::linear::{Direction, Form};
pub use linattn::{Error, Result};
pub use linear::{DEFAULT_FORM, Gate, LinearAttention, LinearOutput, Lion, gla};
pub use optim::FusedOptimizer;

/// Bytes linattn's CUDA tier copied between host and device (see
/// [`linattn::cuda::host_transfer_bytes`]): the CUDA path of these ops adds nothing to it for
/// the engine, dense attention and the optimizer's steps (a block mask's lists are uploaded per
/// call; LightNet goes through the host).
#[cfg(feature = "cuda")]
pub fn host_transfer_bytes() -> u64 {
    linattn::cuda::host_transfer_bytes()
}
