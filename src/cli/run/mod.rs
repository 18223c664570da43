//! `linattn run OP`: one subcommand per op, each in the file of its op family.

mod attention;
mod lightnet;
mod linear;
mod optim;

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::io::{Inputs, Outputs};
use crate::backend::{Backend, DeviceRequest};
use crate::error::{Error, Result};
use crate::linear::Form;

/// Flags every op takes.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Input safetensors file.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Output safetensors file.
    #[arg(long)]
    pub output: PathBuf,
    /// auto (CUDA, else a wgpu adapter, else CPU), cpu, cube or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl CommonArgs {
    pub fn backend(&self) -> Result<Backend> {
        Backend::new(self.device.parse::<DeviceRequest>()?)
    }

    pub fn read_inputs(&self) -> Result<Inputs> {
        let path = self
            .input
            .as_deref()
            .ok_or_else(|| Error::InvalidArgument("this op needs --input IN.safetensors".into()))?;
        Inputs::read(Some(path))
    }
}

/// The form flags of the engine-based ops.
#[derive(Args, Debug, Clone)]
pub struct FormArgs {
    /// recurrent, parallel or chunkwise.
    #[arg(long, default_value = "chunkwise")]
    pub form: String,
    /// Chunk size of the chunkwise form.
    #[arg(long, default_value_t = 64)]
    pub chunk_size: usize,
}

impl FormArgs {
    pub fn form(&self) -> Result<Form> {
        parse_form(&self.form, self.chunk_size)
    }
}

/// `recurrent`, `parallel`, `chunkwise` (or `chunk`).
pub fn parse_form(name: &str, chunk: usize) -> Result<Form> {
    match name {
        "recurrent" => Ok(Form::Recurrent),
        "parallel" => Ok(Form::Parallel),
        "chunkwise" | "chunk" => Ok(Form::Chunkwise { chunk }),
        other => Err(Error::InvalidArgument(format!(
            "unknown form `{other}` (expected recurrent, parallel or chunkwise)"
        ))),
    }
}

#[derive(Subcommand, Debug)]
pub enum RunOp {
    /// Causal gated linear attention (flash-linear-attention's naive_recurrent_gla, explicit scale).
    /// Inputs q, k [B,T,H,K], v [B,T,H,V], g [B,T,H,K] (or [B,T,H], [H]), optional h0 [N,H,K,V],
    /// cu_seqlens [N+1], do, dht. Outputs o, ht; with do: dq, dk, dv, dg, dh0.
    Gla(linear::GlaArgs),
    /// Bidirectional LION attention. Inputs q, k [B,T,H,K], v [B,T,H,V], optional g and g_bwd
    /// ([B,T,H] or [H]), cu_seqlens, do. Outputs o; with do: dq, dk, dv, dg, dg_bwd.
    Lion(linear::LionArgs),
    /// Block-sparse (or dense) softmax attention. Inputs q [B,T,H,D], k, v [B,S,H,D], optional
    /// block_mask u8 [ceil(T/bs), ceil(S/bs)], do. Outputs o, lse [B,H,T]; with do: dq, dk, dv.
    Attention(attention::AttentionArgs),
    /// A Radial attention block mask (no inputs). Output block_mask u8 [NB, NB].
    RadialMask(attention::RadialMaskArgs),
    /// S fused optimizer steps (AdamW or Lion, scheduled lr, weight decay, clipping, non-finite
    /// skip). Inputs param [*P], grads [S, *P]. Outputs param, exp_avg, exp_avg_sq (adamw), ema
    /// (with --ema-beta), lr [S], skipped [S].
    Optimize(Box<optim::OptimizeArgs>),
    /// The multipliers of a learning-rate schedule for steps 0 .. T-1 (transformers' lambdas).
    /// Output lr [T].
    Schedule(optim::ScheduleArgs),
    /// LightNet (additive recurrence on key logits; --bidirectional for the non-causal form).
    /// Inputs q, k (key logits) [B,T,H,K], v [B,T,H,V], optional cu_seqlens [N+1], initial state
    /// s0 [N,H,K,V] with z0 [N,H,K], do. Outputs o (and s, z when causal); with do: dq, dk, dv.
    Lightnet(lightnet::LightNetArgs),
}

/// Runs one op end to end: read, compute, write.
pub fn execute(op: RunOp) -> Result<()> {
    let (common, outputs) = match op {
        RunOp::Gla(args) => (args.common.clone(), linear::gla(&args)?),
        RunOp::Lion(args) => (args.common.clone(), linear::lion(&args)?),
        RunOp::Attention(args) => (args.common.clone(), attention::attention(&args)?),
        RunOp::RadialMask(args) => return attention::radial_mask(&args)?.write(&args.output),
        RunOp::Optimize(args) => (args.common.clone(), optim::optimize(&args)?),
        RunOp::Schedule(args) => return optim::schedule(&args)?.write(&args.output),
        RunOp::Lightnet(args) => (args.common.clone(), lightnet::lightnet(&args)?),
    };
    outputs.write(&common.output)
}

/// Reads an optional integer `cu_seqlens` tensor.
pub(crate) fn cu_seqlens(inputs: &Inputs) -> Result<Option<Vec<i64>>> {
    match inputs.opt_int("cu_seqlens")? {
        None => Ok(None),
        Some(t) if t.shape.len() == 1 => Ok(Some(t.data.clone())),
        Some(t) => Err(Error::shape("cu_seqlens", "rank 1 [N + 1]", &t.shape)),
    }
}

/// Helper for ops that return [`Outputs`].
pub(crate) type RunResult = Result<Outputs>;
