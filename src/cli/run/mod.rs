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

/// Flags every op takes (`radial-mask` and `schedule` read no tensors: they accept and ignore
/// `--input`, and check `--device` only for its spelling).
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Input safetensors file (ignored by the ops that read no tensors).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Output safetensors file (written atomically; must not be the input file).
    #[arg(long)]
    pub output: PathBuf,
    /// auto (CUDA, else a wgpu adapter, else CPU), cpu, cube or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl CommonArgs {
    /// The backend of `--device`. With `auto`, a line on stderr says which faster backends were
    /// passed over and why (the outputs are the same; only their speed and precision differ).
    pub fn backend(&self) -> Result<Backend> {
        match self.device.parse::<DeviceRequest>()? {
            DeviceRequest::Auto => {
                let (backend, skipped) = Backend::auto_with_report();
                if !skipped.is_empty() {
                    let why: Vec<String> = skipped.iter().map(ToString::to_string).collect();
                    eprintln!(
                        "note: --device auto runs on {} ({})",
                        backend.description(),
                        why.join("; ")
                    );
                }
                Ok(backend)
            }
            explicit => Backend::new(explicit),
        }
    }

    /// Reads `--input` and refuses every tensor not in `accepted` (the names `op` reads).
    pub fn read_inputs(&self, op: &str, accepted: &[&str]) -> Result<Inputs> {
        let path = self.input.as_deref().ok_or_else(|| {
            Error::InvalidArgument(format!("`{op}` needs --input IN.safetensors"))
        })?;
        let inputs = Inputs::read(Some(path))?;
        inputs.expect_only(op, accepted)?;
        Ok(inputs)
    }

    /// Refuses an `--output` that names the `--input` file (through any path to it): writing the
    /// outputs there would destroy the inputs.
    pub fn check_output_is_not_input(&self) -> Result<()> {
        let Some(input) = self.input.as_deref() else {
            return Ok(());
        };
        // The output may not exist yet: compare its folder's canonical path plus its name.
        let canonical = |p: &std::path::Path| -> Option<PathBuf> {
            if let Ok(c) = p.canonicalize() {
                return Some(c);
            }
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            Some(dir.canonicalize().ok()?.join(p.file_name()?))
        };
        match (canonical(input), canonical(&self.output)) {
            (Some(a), Some(b)) if a == b => Err(Error::InvalidArgument(format!(
                "--output `{}` is the input file `{}`; writing there would replace the inputs with the outputs: choose another output path",
                self.output.display(),
                input.display()
            ))),
            _ => Ok(()),
        }
    }
}

/// The form flags of the engine-based ops.
#[derive(Args, Debug, Clone)]
pub struct FormArgs {
    /// recurrent, parallel or chunkwise.
    #[arg(long, default_value = "chunkwise")]
    pub form: String,
    /// Chunk size of the chunkwise form (>= 1).
    #[arg(long, default_value_t = 64, allow_negative_numbers = true, value_parser = parse_chunk_size)]
    pub chunk_size: usize,
}

/// `--chunk-size`: an integer >= 1 (a negative number is parsed here, so that the error says so
/// instead of clap's "unexpected argument '-1'").
fn parse_chunk_size(text: &str) -> std::result::Result<usize, String> {
    match text.trim().parse::<i128>() {
        Ok(n) if n >= 1 => usize::try_from(n).map_err(|_| format!("chunk size {n} is too large")),
        Ok(n) => Err(format!("the chunk size must be >= 1, got {n}")),
        Err(_) => Err(format!(
            "the chunk size must be an integer >= 1, got `{text}`"
        )),
    }
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
    /// Inputs q, k `[B,T,H,K]`, v `[B,T,H,V]`, g `[B,T,H,K]` (or `[B,T,H]`, `[H]`), optional h0 `[N,H,K,V]`,
    /// cu_seqlens `[N+1]`, do, dht. Outputs o, ht; with do: dq, dk, dv, dg, dh0.
    Gla(linear::GlaArgs),
    /// Bidirectional LION attention. Inputs q, k `[B,T,H,K]`, v `[B,T,H,V]`, optional g and g_bwd
    /// (`[B,T,H]` or `[H]`), cu_seqlens, do. Outputs o; with do: dq, dk, dv, dg, dg_bwd.
    Lion(linear::LionArgs),
    /// Block-sparse (or dense) softmax attention. Inputs q `[B,T,H,D]`, k, v `[B,S,H,D]`, optional
    /// block_mask u8 `[ceil(T/bs), ceil(S/bs)]`, do. Outputs o, lse `[B,H,T]`; with do: dq, dk, dv.
    Attention(attention::AttentionArgs),
    /// A Radial attention block mask (no input tensors; --input is ignored). Output block_mask u8
    /// `[NB, NB]`.
    RadialMask(attention::RadialMaskArgs),
    /// S fused optimizer steps (AdamW or Lion, scheduled lr, weight decay, clipping, non-finite
    /// skip). Inputs param `[*P]`, grads `[S, *P]`. Outputs param, exp_avg, exp_avg_sq (adamw), ema
    /// (with --ema-beta), lr `[S]`, skipped `[S]`.
    Optimize(Box<optim::OptimizeArgs>),
    /// The multipliers of a learning-rate schedule for steps 0 .. T-1 (transformers' lambdas; no
    /// input tensors, --input is ignored). Output lr `[T]`.
    Schedule(optim::ScheduleArgs),
    /// LightNet (additive recurrence on key logits; --bidirectional for the non-causal form).
    /// Inputs q, k (key logits) `[B,T,H,K]`, v `[B,T,H,V]`, optional cu_seqlens `[N+1]`, initial state
    /// s0 `[N,H,K,V]` with z0 `[N,H,K]`, do. Outputs o (and s, z when causal); with do: dq, dk, dv.
    Lightnet(lightnet::LightNetArgs),
}

impl RunOp {
    fn common(&self) -> &CommonArgs {
        match self {
            RunOp::Gla(a) => &a.common,
            RunOp::Lion(a) => &a.common,
            RunOp::Attention(a) => &a.common,
            RunOp::RadialMask(a) => &a.common,
            RunOp::Optimize(a) => &a.common,
            RunOp::Schedule(a) => &a.common,
            RunOp::Lightnet(a) => &a.common,
        }
    }
}

/// Runs one op end to end: read, compute, check, write.
pub fn execute(op: RunOp) -> Result<()> {
    let common = op.common().clone();
    common.check_output_is_not_input()?;
    let outputs = match op {
        RunOp::Gla(args) => linear::gla(&args)?,
        RunOp::Lion(args) => linear::lion(&args)?,
        RunOp::Attention(args) => attention::attention(&args)?,
        RunOp::RadialMask(args) => {
            common.device.parse::<DeviceRequest>()?;
            attention::radial_mask(&args)?
        }
        RunOp::Optimize(args) => optim::optimize(&args)?,
        RunOp::Schedule(args) => {
            common.device.parse::<DeviceRequest>()?;
            optim::schedule(&args)?
        }
        RunOp::Lightnet(args) => lightnet::lightnet(&args)?,
    };
    // An output that overflowed is an error, not a file.
    outputs.check_finite()?;
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
