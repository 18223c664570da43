//! Training real models on linattn's kernels: a causal GLA language model and a bidirectional
//! LION-S encoder ([`models`]), synthetic tasks from a seed ([`tasks`]), the fused training
//! step ([`step`]), and checkpoints with flash-linear-attention's tensor names
//! ([`checkpoint`]). The `linattn-burn train` binary drives them.

pub mod checkpoint;
pub mod models;
pub mod plot;
pub mod run;
pub mod step;
pub mod tasks;

pub use models::{GlaLm, LionEncoder, ModelConfig};
pub use run::{RunConfig, Summary, run};
pub use step::{LossOutput, StepReport, TrainStep, masked_cross_entropy};
pub use tasks::{Batch, IGNORE, Task};
