//! `run lightnet`: LightNet's additive recurrence (causal) or its non-causal form.

use clap::Args;

use super::{CommonArgs, FormArgs, RunResult, cu_seqlens};
use crate::cli::io::Outputs;
use crate::error::{Error, Result};
use crate::lightnet::{self, LightNet};

#[derive(Args, Debug)]
pub struct LightNetArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub form: FormArgs,
    /// Score scale (default K^-0.5).
    #[arg(long)]
    pub scale: Option<f64>,
    /// The non-causal form (softmax of the key logits over the whole sequence).
    #[arg(long)]
    pub bidirectional: bool,
}

pub fn lightnet(args: &LightNetArgs) -> RunResult {
    let inputs = args
        .common
        .read_inputs("lightnet", &["q", "k", "v", "cu_seqlens", "s0", "z0", "do"])?;
    let cu = cu_seqlens(&inputs)?;
    let mut problem = if args.bidirectional {
        LightNet::non_causal(inputs.float("q")?, inputs.float("k")?, inputs.float("v")?)
    } else {
        LightNet::causal(inputs.float("q")?, inputs.float("k")?, inputs.float("v")?)
    };
    if let Some(scale) = args.scale {
        problem = problem.with_scale(scale);
    }
    match (inputs.opt_float("s0")?, inputs.opt_float("z0")?) {
        (Some(s0), Some(z0)) => problem = problem.with_initial_state(s0, z0),
        (None, None) => {}
        _ => {
            return Err(Error::InvalidArgument(
                "the initial state needs both `s0` [N,H,K,V] and `z0` [N,H,K]".into(),
            ));
        }
    }
    if let Some(cu) = cu.as_deref() {
        problem = problem.with_cu_seqlens(cu);
    }
    run(&args.common, &args.form, &inputs, &problem)
}

fn run(
    common: &CommonArgs,
    form: &FormArgs,
    inputs: &crate::cli::io::Inputs,
    problem: &LightNet,
) -> Result<Outputs> {
    let backend = common.backend()?;
    let form = form.form()?;
    let out = lightnet::forward(&backend, problem, form)?;
    let mut outputs = Outputs::default();
    outputs.float("o", out.o);
    if let Some(state) = out.state {
        outputs.float("s", state.s);
        // -inf is z of a sequence with an empty prefix (log of an empty sum).
        outputs.log_float("z", state.z);
    }
    if let Some(d_o) = inputs.opt_float("do")? {
        let grads = lightnet::backward(&backend, problem, form, d_o)?;
        outputs.float("dq", grads.dq);
        outputs.float("dk", grads.dk);
        outputs.float("dv", grads.dv);
    }
    Ok(outputs)
}
