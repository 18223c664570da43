//! `run gla` and `run lion`: the engine's causal and bidirectional front-ends.

use clap::Args;

use super::{CommonArgs, FormArgs, RunResult, cu_seqlens};
use crate::cli::io::{Inputs, Outputs};
use crate::error::{Error, Result};
use crate::linear::{self, Gate, LinearAttention};
use crate::tensor::Tensor;

#[derive(Args, Debug)]
pub struct GlaArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub form: FormArgs,
    /// Score scale (default K^-0.5).
    #[arg(long)]
    pub scale: Option<f64>,
}

#[derive(Args, Debug)]
pub struct LionArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub form: FormArgs,
    /// Score scale (default K^-0.5).
    #[arg(long)]
    pub scale: Option<f64>,
    /// Row-sum normalisation o_i = sum_j A_ij v_j / (sum_j A_ij + eps).
    #[arg(long)]
    pub normalize: bool,
    /// eps of the normalisation.
    #[arg(long, default_value_t = 1e-6)]
    pub eps: f64,
}

/// A gate tensor's kind from its rank: `[H]`, `[B,T,H]` or `[B,T,H,K]`.
fn gate_of<'a>(name: &str, t: Option<&'a Tensor>) -> Result<Gate<'a>> {
    Ok(match t {
        None => Gate::None,
        Some(t) => match t.shape().len() {
            1 => Gate::PerHead(t),
            3 => Gate::Scalar(t),
            4 => Gate::Vector(t),
            _ => {
                return Err(Error::shape(
                    name,
                    "[H], [B, T, H] or [B, T, H, K]",
                    t.shape(),
                ));
            }
        },
    })
}

/// Forward, and backward when `do` is present; writes `o`, `ht` and the `d<name>` gradients.
fn run_engine(
    common: &CommonArgs,
    form: &FormArgs,
    inputs: &Inputs,
    problem: LinearAttention,
) -> RunResult {
    let backend = common.backend()?;
    let form = form.form()?;
    let out = linear::forward(&backend, &problem, form)?;
    let mut outputs = Outputs::default();
    outputs.float("o", out.o);
    if let Some(ht) = out.ht {
        outputs.float("ht", ht);
    }
    if let Some(d_o) = inputs.opt_float("do")? {
        let d_ht = inputs.opt_float("dht")?;
        let grads = linear::backward(&backend, &problem, form, d_o, d_ht)?;
        outputs.float("dq", grads.dq);
        outputs.float("dk", grads.dk);
        outputs.float("dv", grads.dv);
        if let Some(dg) = grads.dg {
            outputs.float("dg", dg);
        }
        if let Some(dg_bwd) = grads.dg_bwd {
            outputs.float("dg_bwd", dg_bwd);
        }
        if let Some(dh0) = grads.dh0 {
            outputs.float("dh0", dh0);
        }
    } else if inputs.opt_float("dht")?.is_some() {
        return Err(Error::InvalidArgument(
            "`dht` given without `do`; pass both for the backward pass".into(),
        ));
    }
    Ok(outputs)
}

pub fn gla(args: &GlaArgs) -> RunResult {
    let inputs = args.common.read_inputs(
        "gla",
        &["q", "k", "v", "g", "h0", "cu_seqlens", "do", "dht"],
    )?;
    let cu = cu_seqlens(&inputs)?;
    let mut problem =
        LinearAttention::causal(inputs.float("q")?, inputs.float("k")?, inputs.float("v")?)
            .with_gate(gate_of("g", Some(inputs.float("g")?))?);
    if let Some(scale) = args.scale {
        problem = problem.with_scale(scale);
    }
    if let Some(h0) = inputs.opt_float("h0")? {
        problem = problem.with_h0(h0);
    }
    if let Some(cu) = cu.as_deref() {
        problem = problem.with_cu_seqlens(cu);
    }
    run_engine(&args.common, &args.form, &inputs, problem)
}

pub fn lion(args: &LionArgs) -> RunResult {
    let inputs = args
        .common
        .read_inputs("lion", &["q", "k", "v", "g", "g_bwd", "cu_seqlens", "do"])?;
    let cu = cu_seqlens(&inputs)?;
    let g = inputs.opt_float("g")?;
    let g_bwd = inputs.opt_float("g_bwd")?;
    if g.is_none() && g_bwd.is_some() {
        return Err(Error::InvalidArgument(
            "`g_bwd` given without `g`; the backward gate needs a forward gate".into(),
        ));
    }
    let mut problem =
        LinearAttention::bidirectional(inputs.float("q")?, inputs.float("k")?, inputs.float("v")?)
            .with_gate(gate_of("g", g)?);
    if g_bwd.is_some() {
        problem = problem.with_gate_bwd(gate_of("g_bwd", g_bwd)?);
    }
    if let Some(scale) = args.scale {
        problem = problem.with_scale(scale);
    }
    if args.normalize {
        problem = problem.with_normalize(args.eps);
    }
    if let Some(cu) = cu.as_deref() {
        problem = problem.with_cu_seqlens(cu);
    }
    run_engine(&args.common, &args.form, &inputs, problem)
}
