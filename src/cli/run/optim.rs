//! `run optimize` (S fused optimizer steps on one parameter tensor) and `run schedule` (the
//! multipliers of a learning-rate schedule).

use clap::Args;

use super::{CommonArgs, RunResult};
use crate::cli::io::Outputs;
use crate::error::{Error, Result};
use crate::optim::{
    self, Anneal, DecayMode, Method, OptimizerConfig, Params, Schedule, Shape, validate_schedule,
};
use crate::tensor::Tensor;

/// Schedule parameters shared by `run optimize` and `run schedule`.
#[derive(Args, Debug, Clone)]
pub struct ScheduleFlags {
    /// Total steps T (`run optimize` defaults it to the number of gradient steps S).
    #[arg(long)]
    pub total: Option<usize>,
    /// Linear warmup steps W.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Floor as a fraction of lr (cosine, wsd).
    #[arg(long)]
    pub min_ratio: Option<f64>,
    /// Decay steps D of wsd (the stable phase is T - W - D).
    #[arg(long)]
    pub decay_steps: Option<usize>,
    /// Decay shape of wsd: linear, cosine or 1-sqrt (transformers' default is cosine).
    #[arg(long, default_value = "cosine")]
    pub decay_shape: String,
    /// Timescale of inverse-sqrt (default W, or 10000 when W = 0).
    #[arg(long)]
    pub timescale: Option<usize>,
    /// one-cycle: fraction of T spent rising.
    #[arg(long, default_value_t = 0.3)]
    pub pct_start: f64,
    /// one-cycle: initial lr = lr / div_factor.
    #[arg(long, default_value_t = 25.0)]
    pub div_factor: f64,
    /// one-cycle: final lr = initial lr / final_div_factor.
    #[arg(long, default_value_t = 1e4)]
    pub final_div_factor: f64,
    /// one-cycle annealing: cos or linear.
    #[arg(long, default_value = "cos")]
    pub anneal: String,
}

fn parse_shape(name: &str) -> Result<Shape> {
    match name {
        "linear" => Ok(Shape::Linear),
        "cosine" | "cos" => Ok(Shape::Cosine),
        "1-sqrt" | "one-minus-sqrt" => Ok(Shape::OneMinusSqrt),
        other => Err(Error::InvalidArgument(format!(
            "unknown decay shape `{other}` (expected linear, cosine or 1-sqrt)"
        ))),
    }
}

/// The longest lr table `run schedule` writes: 2^26 steps (256 MiB as f32).
pub const MAX_SCHEDULE_STEPS: usize = 1 << 26;

/// The schedule named `kind` from the flags. `steps` is the number of optimizer steps that will
/// read it (`run optimize`), which also stands in for a missing `--total`: a finite schedule's
/// total must be >= 1 and cover every step run (past its total a schedule is outside its
/// definition: the cosine turns back up, linear stays at 0).
pub fn build_schedule(kind: &str, flags: &ScheduleFlags, steps: Option<usize>) -> Result<Schedule> {
    let total = || {
        let total = flags.total.or(steps).ok_or_else(|| {
            Error::InvalidArgument(format!("the `{kind}` schedule needs --total T"))
        })?;
        if total == 0 {
            return Err(Error::InvalidArgument(format!(
                "the `{kind}` schedule needs --total >= 1, got 0"
            )));
        }
        match steps {
            Some(steps) if total < steps => Err(Error::InvalidArgument(format!(
                "the `{kind}` schedule's --total {total} is smaller than the {steps} steps run (the gradients' first dimension); pass --total >= {steps}"
            ))),
            _ => Ok(total),
        }
    };
    let no_floor = |kind: &str| match flags.min_ratio {
        Some(r) if r != 0.0 => Err(Error::InvalidArgument(format!(
            "--min-ratio applies to cosine and wsd, not to {kind}"
        ))),
        _ => Ok(()),
    };
    if flags.decay_steps.is_some() && kind != "wsd" {
        return Err(Error::InvalidArgument(format!(
            "--decay-steps applies to wsd, not to {kind}"
        )));
    }
    let schedule = match kind {
        "constant" => {
            no_floor(kind)?;
            Schedule::Constant {
                warmup: flags.warmup,
            }
        }
        "linear" => {
            no_floor(kind)?;
            Schedule::Linear {
                warmup: flags.warmup,
                total: total()?,
            }
        }
        "cosine" => Schedule::Cosine {
            warmup: flags.warmup,
            total: total()?,
            min_ratio: flags.min_ratio.unwrap_or(0.0),
            num_cycles: 0.5,
        },
        "inverse-sqrt" => {
            no_floor(kind)?;
            Schedule::InverseSqrt {
                warmup: flags.warmup,
                timescale: flags.timescale,
            }
        }
        "wsd" => {
            let total = total()?;
            let decay = flags.decay_steps.ok_or_else(|| {
                Error::InvalidArgument("the wsd schedule needs --decay-steps D".into())
            })?;
            if flags.warmup + decay > total {
                return Err(Error::InvalidArgument(format!(
                    "wsd: warmup {} + decay {decay} exceed the total {total}",
                    flags.warmup
                )));
            }
            Schedule::Wsd {
                warmup: flags.warmup,
                stable: total - flags.warmup - decay,
                decay,
                min_ratio: flags.min_ratio.unwrap_or(0.0),
                warmup_shape: Shape::Linear,
                decay_shape: parse_shape(&flags.decay_shape)?,
            }
        }
        "rex" => {
            no_floor(kind)?;
            Schedule::Rex {
                warmup: flags.warmup,
                total: total()?,
            }
        }
        "one-cycle" | "1cycle" => {
            no_floor(kind)?;
            if flags.warmup != 0 {
                return Err(Error::InvalidArgument(
                    "one-cycle has its own rise (--pct-start), not --warmup".into(),
                ));
            }
            Schedule::OneCycle {
                total: total()?,
                pct_start: flags.pct_start,
                div_factor: flags.div_factor,
                final_div_factor: flags.final_div_factor,
                anneal: match flags.anneal.as_str() {
                    "cos" | "cosine" => Anneal::Cos,
                    "linear" => Anneal::Linear,
                    other => {
                        return Err(Error::InvalidArgument(format!(
                            "unknown anneal `{other}` (expected cos or linear)"
                        )));
                    }
                },
            }
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown schedule `{other}` (expected constant, linear, cosine, inverse-sqrt, wsd, rex or one-cycle)"
            )));
        }
    };
    validate_schedule(&schedule)?;
    Ok(schedule)
}

#[derive(Args, Debug)]
pub struct ScheduleArgs {
    /// --output gets one tensor `lr` [T] (the multipliers of steps 0 .. T-1); --input is ignored.
    #[command(flatten)]
    pub common: CommonArgs,
    /// constant, linear, cosine, inverse-sqrt, wsd, rex or one-cycle.
    #[arg(long)]
    pub kind: String,
    #[command(flatten)]
    pub flags: ScheduleFlags,
}

/// `lr` [T] = f(0) .. f(T - 1) (LambdaLR convention), as transformers' lambdas.
pub fn schedule(args: &ScheduleArgs) -> RunResult {
    let total = args
        .flags
        .total
        .ok_or_else(|| Error::InvalidArgument("run schedule needs --total T".into()))?;
    if total == 0 {
        return Err(Error::InvalidArgument(
            "run schedule needs --total >= 1, got 0".into(),
        ));
    }
    if total > MAX_SCHEDULE_STEPS {
        return Err(Error::InvalidArgument(format!(
            "run schedule --total {total} asks for an lr table of {total} steps ({} bytes as f64); the limit is {MAX_SCHEDULE_STEPS} steps (2^26)",
            total as u128 * 8
        )));
    }
    let schedule = build_schedule(&args.kind, &args.flags, None)?;
    let mut outputs = Outputs::default();
    outputs.float(
        "lr",
        Tensor::from_f64(vec![total], schedule.lr_table(1.0, total))?,
    );
    Ok(outputs)
}

#[derive(Args, Debug)]
pub struct OptimizeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// adamw or lion.
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// Peak learning rate (the schedule multiplies it).
    #[arg(long)]
    pub lr: f64,
    /// Default 0.9.
    #[arg(long)]
    pub beta1: Option<f64>,
    /// Default 0.999 (adamw) or 0.99 (lion).
    #[arg(long)]
    pub beta2: Option<f64>,
    /// AdamW's eps (outside the square root).
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// Default 0.01 (torch AdamW) for adamw, 0 for lion.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Cautious weight decay: only where update and parameter agree in sign.
    #[arg(long)]
    pub cautious: bool,
    /// decoupled (lr * wd) or fully-decoupled (lr / lr_max * wd).
    #[arg(long, default_value = "decoupled")]
    pub decay_mode: String,
    /// Global grad-norm clipping.
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// EMA of the weights (adds the output `ema`).
    #[arg(long)]
    pub ema_beta: Option<f64>,
    /// The schedule kind (as `run schedule --kind`).
    #[arg(long, default_value = "constant")]
    pub schedule: String,
    #[command(flatten)]
    pub flags: ScheduleFlags,
}

/// Inputs `param` (any shape P) and `grads` [S, P]; outputs `param`, `exp_avg`, `exp_avg_sq`
/// (adamw), `ema` (with --ema-beta), `lr` [S] (the lr of each call) and `skipped` [S] (u8: the
/// call had a non-finite gradient and changed nothing).
pub fn optimize(args: &OptimizeArgs) -> RunResult {
    let inputs = args.common.read_inputs("optimize", &["param", "grads"])?;
    let param = inputs.float("param")?;
    let grads = inputs.float("grads")?;
    let steps = grads.shape().first().copied().unwrap_or(0);
    if grads.shape().len() != param.shape().len() + 1 || grads.shape()[1..] != *param.shape() {
        let mut expected = vec![steps];
        expected.extend_from_slice(param.shape());
        return Err(Error::shape(
            "grads",
            format!("[S, *param.shape] = {expected:?}"),
            grads.shape(),
        ));
    }
    let method = match args.optimizer.as_str() {
        "adamw" => Method::AdamW {
            beta1: args.beta1.unwrap_or(0.9),
            beta2: args.beta2.unwrap_or(0.999),
            eps: args.eps,
        },
        "lion" => Method::Lion {
            beta1: args.beta1.unwrap_or(0.9),
            beta2: args.beta2.unwrap_or(0.99),
        },
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown optimizer `{other}` (expected adamw or lion)"
            )));
        }
    };
    let decay_mode = match args.decay_mode.as_str() {
        "decoupled" => DecayMode::Decoupled,
        "fully-decoupled" => DecayMode::FullyDecoupled,
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown decay mode `{other}` (expected decoupled or fully-decoupled)"
            )));
        }
    };
    let config = OptimizerConfig {
        method,
        lr: args.lr,
        weight_decay: args.weight_decay.unwrap_or(match method {
            Method::AdamW { .. } => 1e-2,
            Method::Lion { .. } => 0.0,
        }),
        decay_mode,
        cautious: args.cautious,
        max_grad_norm: args.max_grad_norm,
        skip_non_finite: true,
        ema_beta: args.ema_beta,
        model_copy: None,
    };
    let schedule = build_schedule(&args.schedule, &args.flags, Some(steps))?;
    let backend = args.common.backend()?;

    let per_step = param.numel();
    let values = grads.to_f64_vec();
    let step_grads: Vec<Tensor> = (0..steps)
        .map(|s| {
            Tensor::from_f64(
                param.shape().to_vec(),
                values[s * per_step..(s + 1) * per_step].to_vec(),
            )
        })
        .collect::<Result<_>>()?;
    let grad_refs: Vec<Vec<&Tensor>> = step_grads.iter().map(|g| vec![g]).collect();
    let params = [param];
    let out = optim::optimize(
        &backend,
        &config,
        &schedule,
        &Params::new(&params),
        &grad_refs,
    )?;

    let mut outputs = Outputs::default();
    let first = |v: Vec<Tensor>| v.into_iter().next().expect("one tensor");
    outputs.float("param", first(out.params));
    outputs.float("exp_avg", first(out.exp_avg));
    if let Some(sq) = out.exp_avg_sq {
        outputs.float("exp_avg_sq", first(sq));
    }
    if let Some(ema) = out.ema {
        outputs.float("ema", first(ema));
    }
    outputs.float(
        "lr",
        Tensor::from_f64(vec![steps], out.history.iter().map(|r| r.lr).collect())?,
    );
    outputs.u8(
        "skipped",
        vec![steps],
        out.history.iter().map(|r| r.skipped as u8).collect(),
    );
    Ok(outputs)
}
