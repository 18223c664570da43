//! Optimizer steps, learning-rate schedules, WSM checkpoint merging, EMA and low-precision rounding
//! (the formulas of `shared/spec/optim.md`), in f64 unless a function is about bits.
//!
//! - [`schedule`]: multipliers `f(k)` of the 0-based step `k` (LambdaLR convention: step `k` runs
//!   with `lr * f(k)`), mirroring HuggingFace transformers, torch and the papers named per variant.
//! - [`step`]: AdamW (exactly `torch.optim.AdamW`), Lion, the weight-decay modes, global grad-norm
//!   clipping, the non-finite skip and EMA, as one multi-tensor step.
//! - [`wsm`]: merge coefficients from a decay shape and the weighted average of checkpoints.
//! - [`rounding`]: f32 to bf16 / f16 bits, round-to-nearest-even and stochastic, and the counter
//!   hash that feeds stochastic rounding; the GPU kernels reproduce these bit for bit.

pub mod rounding;
pub mod schedule;
pub mod step;
pub mod wsm;

pub use schedule::{Anneal, RefineFor, Schedule, Shape};
pub use step::{DecayMode, Method, StepConfig, StepOutcome, TensorState};
