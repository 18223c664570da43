//! One optimizer step over many tensors, in f64 (optim.md).
//!
//! AdamW follows `torch.optim.AdamW` (single-tensor / foreach path, `amsgrad=False`,
//! `maximize=False`) operation for operation:
//! ```text
//! t     <- t + 1
//! theta <- theta * (1 - decay)                 decay = eta * lambda (decoupled)
//! m     <- m + (1 - b1) (g - m)                exp_avg.lerp_(grad, 1 - beta1)
//! v     <- b2 v + (1 - b2) g^2                 exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
//! denom  = sqrt(v) / sqrt(1 - b2^t) + eps      eps outside the sqrt, after the bias correction
//! theta <- theta - (eta / (1 - b1^t)) m / denom
//! ```
//! with the bias corrections `1 - b^t` computed in f64 from the integer step (`beta ** step` in
//! Python is C `pow`, which is what [`f64::powf`] calls).
//!
//! Lion (Chen et al. 2023, as lucidrains' `lion-pytorch`): decay first, then
//! `theta <- theta - eta sign(b1 m + (1 - b1) g)` (`sign(0) = 0`), then `m <- b2 m + (1 - b2) g`.
//!
//! Cautious weight decay (CWD, arXiv 2510.12402) multiplies the decay of each element by
//! `1[u * theta >= 0]`, `u` the update direction before decay (`m / denom` for AdamW, `sign(c)`
//! for Lion) and `theta` the value before the step.

/// The optimizer and its constants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    AdamW { beta1: f64, beta2: f64, eps: f64 },
    Lion { beta1: f64, beta2: f64 },
}

impl Method {
    /// torch defaults: betas (0.9, 0.999), eps 1e-8.
    pub fn adamw() -> Method {
        Method::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    /// The paper's defaults: betas (0.9, 0.99).
    pub fn lion() -> Method {
        Method::Lion {
            beta1: 0.9,
            beta2: 0.99,
        }
    }

    /// Whether the method keeps a second moment `exp_avg_sq`.
    pub fn has_second_moment(&self) -> bool {
        matches!(self, Method::AdamW { .. })
    }
}

/// How the decay factor follows the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecayMode {
    /// torch AdamW: `eta_t * lambda`.
    Decoupled,
    /// Loshchilov & Hutter's original / MosaicML's fully decoupled form: `(eta_t / eta_max) *
    /// lambda`, so lambda is a per-step fraction independent of the lr's size.
    FullyDecoupled,
}

/// Everything of a step except the learning rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepConfig {
    pub method: Method,
    pub weight_decay: f64,
    pub decay_mode: DecayMode,
    /// Cautious weight decay: decay only where `u * theta >= 0`.
    pub cautious: bool,
    /// Global grad-norm clipping: `coef = min(1, max_norm / (||g||_2 + 1e-6))` on every gradient.
    pub max_grad_norm: Option<f64>,
    /// EMA of the weights after the step: `ema <- ema + (1 - beta) (theta - ema)`.
    pub ema_beta: Option<f64>,
    /// Skip the whole step when a gradient holds NaN or an infinity (the default). Off, the
    /// non-finite values flow into the state as in plain torch.
    pub skip_non_finite: bool,
}

impl StepConfig {
    /// No weight decay, no clipping, no EMA.
    pub fn new(method: Method) -> Self {
        StepConfig {
            method,
            weight_decay: 0.0,
            decay_mode: DecayMode::Decoupled,
            cautious: false,
            max_grad_norm: None,
            ema_beta: None,
            skip_non_finite: true,
        }
    }
}

/// The state of one parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorState {
    pub param: Vec<f64>,
    /// First moment (AdamW `exp_avg`, Lion's momentum).
    pub exp_avg: Vec<f64>,
    /// Second moment (AdamW only; empty for Lion).
    pub exp_avg_sq: Vec<f64>,
    /// EMA of the weights, when enabled (starts at the initial weights).
    pub ema: Option<Vec<f64>>,
    /// Whether weight decay applies to this tensor (usually off for biases and norms).
    pub decay: bool,
}

impl TensorState {
    /// Zero moments; the EMA, when asked for, starts at `param`.
    pub fn new(param: Vec<f64>, method: &Method, ema: bool, decay: bool) -> Self {
        let n = param.len();
        TensorState {
            exp_avg: vec![0.0; n],
            exp_avg_sq: if method.has_second_moment() {
                vec![0.0; n]
            } else {
                Vec::new()
            },
            ema: ema.then(|| param.clone()),
            param,
            decay,
        }
    }
}

/// What a step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// A gradient held NaN or an infinity: nothing changed (not even `t`).
    pub skipped: bool,
    /// The global l2 norm of the raw gradients (NaN or inf when skipped for that reason).
    pub grad_norm: f64,
    /// The clipping coefficient applied (1 without clipping or when skipped).
    pub clip_coef: f64,
}

/// The decay factor multiplying `theta` before the update (without the cautious mask).
pub fn decay_factor(mode: DecayMode, lr: f64, lr_max: f64, weight_decay: f64) -> f64 {
    match mode {
        DecayMode::Decoupled => lr * weight_decay,
        DecayMode::FullyDecoupled => lr / lr_max * weight_decay,
    }
}

/// `(1 - b1^t, 1 - b2^t)` in f64 from the integer step `t >= 1`.
pub fn bias_corrections(beta1: f64, beta2: f64, t: u64) -> (f64, f64) {
    assert!(t >= 1, "bias corrections need t >= 1");
    (1.0 - beta1.powf(t as f64), 1.0 - beta2.powf(t as f64))
}

/// `sqrt(sum g^2)` over every tensor.
pub fn global_grad_norm(grads: &[&[f64]]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|g| g * g)
        .sum::<f64>()
        .sqrt()
}

/// torch `clip_grad_norm_`'s coefficient `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_coefficient(grad_norm: f64, max_norm: f64) -> f64 {
    (max_norm / (grad_norm + 1e-6)).min(1.0)
}

fn cautious_mask(cautious: bool, update: f64, theta: f64) -> f64 {
    if !cautious || update * theta >= 0.0 {
        1.0
    } else {
        0.0
    }
}

/// One AdamW update of one tensor. `t` is the step count after the increment (1 on the first
/// step), `decay` the decay factor ([`decay_factor`], 0 for no decay).
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    param: &mut [f64],
    grad: &[f64],
    exp_avg: &mut [f64],
    exp_avg_sq: &mut [f64],
    t: u64,
    lr: f64,
    decay: f64,
    (beta1, beta2, eps): (f64, f64, f64),
    cautious: bool,
) {
    let n = param.len();
    assert!(grad.len() == n && exp_avg.len() == n && exp_avg_sq.len() == n);
    let (bc1, bc2) = bias_corrections(beta1, beta2, t);
    let step_size = lr / bc1;
    let bc2_sqrt = bc2.sqrt();
    for i in 0..n {
        let g = grad[i];
        let theta = param[i];
        let m = exp_avg[i] + (1.0 - beta1) * (g - exp_avg[i]);
        let v = beta2 * exp_avg_sq[i] + (1.0 - beta2) * g * g;
        let denom = v.sqrt() / bc2_sqrt + eps;
        let direction = m / denom;
        let mask = cautious_mask(cautious, direction, theta);
        param[i] = theta * (1.0 - decay * mask) - step_size * direction;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
    }
}

/// `sign` with `sign(0) = 0`.
pub fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// One Lion update of one tensor.
#[allow(clippy::too_many_arguments)]
pub fn lion_update(
    param: &mut [f64],
    grad: &[f64],
    exp_avg: &mut [f64],
    lr: f64,
    decay: f64,
    (beta1, beta2): (f64, f64),
    cautious: bool,
) {
    let n = param.len();
    assert!(grad.len() == n && exp_avg.len() == n);
    for i in 0..n {
        let g = grad[i];
        let theta = param[i];
        let c = beta1 * exp_avg[i] + (1.0 - beta1) * g;
        let direction = sign(c);
        let mask = cautious_mask(cautious, direction, theta);
        param[i] = theta * (1.0 - decay * mask) - lr * direction;
        exp_avg[i] = beta2 * exp_avg[i] + (1.0 - beta2) * g;
    }
}

/// One fused multi-tensor step at learning rate `lr` (the scheduled one; `lr_max` is the peak the
/// fully decoupled decay divides by). `t` is the optimizer's step count, incremented unless the
/// step is skipped. `grads[i]` belongs to `states[i]`.
///
/// Order: non-finite check over all gradients (skip everything if any), global norm, clipping
/// coefficient, `t += 1`, then per tensor the optimizer update and the EMA.
pub fn fused_step(
    config: &StepConfig,
    lr: f64,
    lr_max: f64,
    t: &mut u64,
    states: &mut [TensorState],
    grads: &[&[f64]],
) -> StepOutcome {
    assert_eq!(states.len(), grads.len(), "one gradient per tensor");
    let grad_norm = global_grad_norm(grads);
    if config.skip_non_finite && grads.iter().any(|g| g.iter().any(|x| !x.is_finite())) {
        return StepOutcome {
            skipped: true,
            grad_norm,
            clip_coef: 1.0,
        };
    }
    let clip_coef = config
        .max_grad_norm
        .map_or(1.0, |max| clip_coefficient(grad_norm, max));
    *t += 1;
    let decay_all = decay_factor(config.decay_mode, lr, lr_max, config.weight_decay);
    for (state, grad) in states.iter_mut().zip(grads) {
        assert_eq!(state.param.len(), grad.len(), "gradient size");
        let clipped: Vec<f64> = grad.iter().map(|g| g * clip_coef).collect();
        let decay = if state.decay { decay_all } else { 0.0 };
        match config.method {
            Method::AdamW { beta1, beta2, eps } => adamw_update(
                &mut state.param,
                &clipped,
                &mut state.exp_avg,
                &mut state.exp_avg_sq,
                *t,
                lr,
                decay,
                (beta1, beta2, eps),
                config.cautious,
            ),
            Method::Lion { beta1, beta2 } => lion_update(
                &mut state.param,
                &clipped,
                &mut state.exp_avg,
                lr,
                decay,
                (beta1, beta2),
                config.cautious,
            ),
        }
        if let (Some(beta), Some(ema)) = (config.ema_beta, state.ema.as_mut()) {
            for (e, &p) in ema.iter_mut().zip(&state.param) {
                *e += (1.0 - beta) * (p - *e);
            }
        }
    }
    StepOutcome {
        skipped: false,
        grad_norm,
        clip_coef,
    }
}
