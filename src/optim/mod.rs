//! Fused training step: multi-tensor AdamW and Lion with a scheduled learning rate and weight decay,
//! global grad-norm clipping, an atomic skip on non-finite gradients, EMA and 16-bit model copies;
//! learning-rate schedules; WSM checkpoint merging (`shared/spec/optim.md`).
//!
//! Inner shape, as in every op module: this file (configuration, validation, the host-tensor API),
//! `reference` (the f64 CPU path through `linattn-reference`), `cube` (the CubeCL kernels and the
//! device-resident [`cube::FusedOptimizer`]), `cuda` (the hand-written kernels of kernels/optim.cu
//! and the device-resident `cuda::CudaOptimizer`, on a GPU or the host emulation), with the same
//! configuration and arena layout.
//!
//! Conventions:
//! - schedule step `k` is 0-based and counts every call, skipped or not (like a torch LR scheduler
//!   stepped every iteration); the learning rate of call `k` is `lr * schedule.multiplier(k)`;
//! - the optimizer step `t` (AdamW's bias corrections) counts only the calls that were applied;
//! - a call whose gradients hold a NaN or an infinity (or whose squared norm overflows f32 on the
//!   cube backend; the cuda backend accumulates it in f64) leaves every parameter, moment, EMA,
//!   copy and `t` untouched and is reported as skipped.

mod optimizer;
mod reference;
mod state;

#[cfg(feature = "cube")]
pub mod cube;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use linattn_reference::optim::schedule::{Anneal, RefineFor, Schedule, Shape};
pub use linattn_reference::optim::step::{DecayMode, Method};
pub use optimizer::{Gradient, GradientRef, Optimizer, OptimizerStatus};
pub use state::OptimizerState;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use crate::validation::expect_finite;

/// The 16-bit format of the model copy written from the f32 master weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFormat {
    Bf16,
    F16,
}

impl CopyFormat {
    pub fn dtype(&self) -> DType {
        match self {
            CopyFormat::Bf16 => DType::BF16,
            CopyFormat::F16 => DType::F16,
        }
    }
}

/// How the 16-bit copy rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// Round to nearest, ties to even.
    Nearest,
    /// Stochastic rounding with bits from a counter hash of `(seed, call, element)`
    /// (`linattn_reference::optim::rounding`): unbiased, reproducible, no RNG state.
    Stochastic { seed: u32 },
}

/// Everything a step needs besides the parameters and the schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerConfig {
    pub method: Method,
    /// The peak learning rate `eta_max`: call `k` uses `lr * schedule.multiplier(k)`.
    pub lr: f64,
    pub weight_decay: f64,
    pub decay_mode: DecayMode,
    /// Cautious weight decay (CWD): decay only where update and parameter agree in sign.
    pub cautious: bool,
    /// Global grad-norm clipping to this l2 norm.
    pub max_grad_norm: Option<f64>,
    /// Check every gradient for NaN / infinity and skip the whole step if one is found (default).
    /// Off, the norm pass is skipped (when there is no clipping) and a non-finite gradient
    /// propagates into the state, as in plain torch.
    pub skip_non_finite: bool,
    /// EMA of the weights, `ema <- ema + (1 - beta) (theta - ema)`, after each applied step.
    pub ema_beta: Option<f64>,
    /// A 16-bit copy of the weights written after each applied step.
    pub model_copy: Option<(CopyFormat, Rounding)>,
}

impl OptimizerConfig {
    /// `torch.optim.AdamW` defaults: betas (0.9, 0.999), eps 1e-8, weight decay 1e-2.
    pub fn adamw(lr: f64) -> Self {
        OptimizerConfig {
            method: Method::adamw(),
            lr,
            weight_decay: 1e-2,
            decay_mode: DecayMode::Decoupled,
            cautious: false,
            max_grad_norm: None,
            skip_non_finite: true,
            ema_beta: None,
            model_copy: None,
        }
    }

    /// Lion with betas (0.9, 0.99) and no weight decay.
    pub fn lion(lr: f64) -> Self {
        OptimizerConfig {
            method: Method::lion(),
            weight_decay: 0.0,
            ..Self::adamw(lr)
        }
    }

    /// Checks every hyperparameter's domain.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidArgument(what));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("lr must be finite and >= 0, got {}", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight decay must be finite and >= 0, got {}",
                self.weight_decay
            ));
        }
        if self.decay_mode == DecayMode::FullyDecoupled && self.lr == 0.0 {
            return bad("fully decoupled weight decay divides by lr, which is 0".into());
        }
        let (beta1, beta2) = match self.method {
            Method::AdamW { beta1, beta2, eps } => {
                if !(eps.is_finite() && eps >= 0.0) {
                    return bad(format!("eps must be finite and >= 0, got {eps}"));
                }
                (beta1, beta2)
            }
            Method::Lion { beta1, beta2 } => (beta1, beta2),
        };
        for (name, beta) in [("beta1", beta1), ("beta2", beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(format!("{name} must be in [0, 1), got {beta}"));
            }
        }
        if let Some(max) = self.max_grad_norm
            && !(max.is_finite() && max > 0.0)
        {
            return bad(format!("max grad norm must be finite and > 0, got {max}"));
        }
        if let Some(beta) = self.ema_beta
            && !(0.0..=1.0).contains(&beta)
        {
            return bad(format!("EMA beta must be in [0, 1], got {beta}"));
        }
        Ok(())
    }

    /// The stochastic-rounding seed of the 16-bit copy (0 without one): the GPU tiers keep it in
    /// their counter buffers.
    #[cfg(any(feature = "cube", feature = "cuda"))]
    pub(crate) fn rounding_seed(&self) -> u32 {
        match self.model_copy {
            Some((_, Rounding::Stochastic { seed })) => seed,
            _ => 0,
        }
    }

    pub(crate) fn step_config(&self) -> linattn_reference::optim::StepConfig {
        linattn_reference::optim::StepConfig {
            method: self.method,
            weight_decay: self.weight_decay,
            decay_mode: self.decay_mode,
            cautious: self.cautious,
            max_grad_norm: self.max_grad_norm,
            ema_beta: self.ema_beta,
            skip_non_finite: self.skip_non_finite,
        }
    }
}

/// Checks a schedule's parameters (the reference crate assumes them valid).
pub fn validate_schedule(schedule: &Schedule) -> Result<()> {
    let bad = |what: String| Err(Error::InvalidArgument(format!("schedule: {what}")));
    let ratio = |r: f64| {
        if (0.0..=1.0).contains(&r) {
            Ok(())
        } else {
            bad(format!("min ratio must be in [0, 1], got {r}"))
        }
    };
    match schedule {
        Schedule::Constant { .. } | Schedule::Linear { .. } | Schedule::Rex { .. } => Ok(()),
        Schedule::Cosine {
            min_ratio,
            num_cycles,
            ..
        } => {
            ratio(*min_ratio)?;
            if !(num_cycles.is_finite() && *num_cycles > 0.0) {
                return bad(format!(
                    "num_cycles must be finite and > 0, got {num_cycles}"
                ));
            }
            Ok(())
        }
        Schedule::InverseSqrt { timescale, .. } => {
            if *timescale == Some(0) {
                return bad("inverse-sqrt timescale must be >= 1".into());
            }
            Ok(())
        }
        Schedule::Wsd { min_ratio, .. } => ratio(*min_ratio),
        Schedule::OneCycle {
            total,
            pct_start,
            div_factor,
            final_div_factor,
            ..
        } => {
            if !(*pct_start > 0.0 && *pct_start < 1.0) {
                return bad(format!(
                    "1cycle pct_start must be in (0, 1), got {pct_start}"
                ));
            }
            // torch divides by the phase lengths; both must be positive.
            let peak = pct_start * *total as f64 - 1.0;
            if !(peak > 0.0 && peak < *total as f64 - 1.0) {
                return bad(format!(
                    "1cycle with {total} steps and pct_start {pct_start} has an empty phase"
                ));
            }
            for (name, v) in [
                ("div_factor", *div_factor),
                ("final_div_factor", *final_div_factor),
            ] {
                if !(v.is_finite() && v > 0.0) {
                    return bad(format!("1cycle {name} must be finite and > 0, got {v}"));
                }
            }
            Ok(())
        }
        Schedule::Refined { multipliers } => {
            if multipliers.iter().any(|f| !(f.is_finite() && *f >= 0.0)) {
                return bad("refined multipliers must be finite and >= 0".into());
            }
            Ok(())
        }
        Schedule::Rewarm { inner, .. } => validate_schedule(inner),
        Schedule::Sequential { phases } => {
            if phases.is_empty() {
                return bad("a sequential schedule needs at least one phase".into());
            }
            phases.iter().try_for_each(|(s, _)| validate_schedule(s))
        }
    }
}

/// The refined schedule of Defazio et al. (see [`Schedule::refined`]) with typed errors.
pub fn refined_schedule(norms: &[f64], window: usize, kind: RefineFor) -> Result<Schedule> {
    Schedule::refined(norms, window, kind).map_err(Error::InvalidArgument)
}

/// Per-call record of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepRecord {
    /// The learning rate the call used (scheduled).
    pub lr: f64,
    /// The global l2 norm of the raw gradients, when it was computed.
    pub grad_norm: Option<f64>,
    /// Whether the call was skipped for a non-finite gradient.
    pub skipped: bool,
}

/// The state after a run of [`optimize`]. The CPU backend returns f64 tensors, the GPU backends
/// f32 (and the copies in their 16-bit dtype).
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizeOutput {
    pub params: Vec<Tensor>,
    pub exp_avg: Vec<Tensor>,
    /// AdamW only.
    pub exp_avg_sq: Option<Vec<Tensor>>,
    pub ema: Option<Vec<Tensor>>,
    pub model_copy: Option<Vec<Tensor>>,
    /// One per call.
    pub history: Vec<StepRecord>,
    /// Optimizer steps applied (`t`).
    pub steps: u64,
}

/// The parameters of one group: tensors of any shape and float dtype (kept as f32 master weights
/// on the GPU) and whether weight decay applies to each.
#[derive(Clone, Copy, Debug)]
pub struct Params<'a> {
    pub tensors: &'a [&'a Tensor],
    /// `None`: decay every tensor.
    pub decay: Option<&'a [bool]>,
}

impl<'a> Params<'a> {
    pub fn new(tensors: &'a [&'a Tensor]) -> Self {
        Params {
            tensors,
            decay: None,
        }
    }

    pub fn decays(&self, i: usize) -> bool {
        self.decay.is_none_or(|d| d[i])
    }
}

/// Checks the parameters, per-step gradients and options; returns the flat sizes.
pub(crate) fn validate_run(
    config: &OptimizerConfig,
    schedule: &Schedule,
    params: &Params,
    grads: &[Vec<&Tensor>],
) -> Result<Vec<usize>> {
    config.validate()?;
    validate_schedule(schedule)?;
    if let Some(decay) = params.decay
        && decay.len() != params.tensors.len()
    {
        return Err(Error::InvalidArgument(format!(
            "{} decay flags for {} parameter tensors",
            decay.len(),
            params.tensors.len()
        )));
    }
    for (i, p) in params.tensors.iter().enumerate() {
        expect_finite(&format!("params[{i}]"), p)?;
    }
    let sizes: Vec<usize> = params.tensors.iter().map(|t| t.numel()).collect();
    for (s, step) in grads.iter().enumerate() {
        if step.len() != params.tensors.len() {
            return Err(Error::InvalidArgument(format!(
                "step {s} has {} gradients for {} parameter tensors",
                step.len(),
                params.tensors.len()
            )));
        }
        for (i, (g, p)) in step.iter().zip(params.tensors).enumerate() {
            if g.shape() != p.shape() {
                return Err(Error::shape(
                    &format!("grads[{s}][{i}]"),
                    format!("the shape of params[{i}] = {:?}", p.shape()),
                    g.shape(),
                ));
            }
        }
    }
    Ok(sizes)
}

/// Runs `grads.len()` optimizer calls (`grads[s][i]` is the gradient of tensor `i` at call `s`)
/// from zero moments and returns the final state and the per-call record. On a GPU backend the
/// state stays on the device for the whole run (see [`cube::FusedOptimizer`] for the
/// device-resident API).
pub fn optimize(
    backend: &Backend,
    config: &OptimizerConfig,
    schedule: &Schedule,
    params: &Params,
    grads: &[Vec<&Tensor>],
) -> Result<OptimizeOutput> {
    validate_run(config, schedule, params, grads)?;
    match backend {
        Backend::Cpu => Ok(reference::optimize(config, schedule, params, grads)),
        #[cfg(feature = "cube")]
        Backend::Cube(ctx) => cube::optimize(ctx, config, schedule, params, grads),
        #[cfg(feature = "cuda")]
        Backend::Cuda(ctx) => cuda::optimize(ctx, config, schedule, params, grads),
    }
}

/// A 16-bit copy's bits as a host tensor of its format.
#[cfg(any(feature = "cube", feature = "cuda"))]
pub(crate) fn half_tensor(shape: Vec<usize>, bits: &[u16], format: CopyFormat) -> Tensor {
    use half::{bf16, f16};
    let data = match format {
        CopyFormat::Bf16 => {
            crate::tensor::TensorData::BF16(bits.iter().map(|&b| bf16::from_bits(b)).collect())
        }
        CopyFormat::F16 => {
            crate::tensor::TensorData::F16(bits.iter().map(|&b| f16::from_bits(b)).collect())
        }
    };
    Tensor::new(shape, data).expect("shape matches the copy")
}

/// WSM merge coefficients `c_0 ..= c_k` (oldest checkpoint first) from a decay shape.
pub fn wsm_coefficients(shape: Shape, k: usize) -> Vec<f64> {
    linattn_reference::optim::wsm::shape_coefficients(shape, k)
}

/// `sum_j c_j * checkpoints[j]`, tensor by tensor, accumulated in f32 on a GPU (f64 on the CPU),
/// then cast once to `dtype` (f32, bf16 or f16; f64 is the CPU's own result).
pub fn merge(
    backend: &Backend,
    checkpoints: &[Vec<&Tensor>],
    coefficients: &[f64],
    dtype: DType,
) -> Result<Vec<Tensor>> {
    if checkpoints.is_empty() {
        return Err(Error::InvalidArgument("merge needs a checkpoint".into()));
    }
    if checkpoints.len() != coefficients.len() {
        return Err(Error::InvalidArgument(format!(
            "{} coefficients for {} checkpoints",
            coefficients.len(),
            checkpoints.len()
        )));
    }
    if let Some(c) = coefficients.iter().find(|c| !c.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "merge coefficients must be finite, got {c}"
        )));
    }
    let first = &checkpoints[0];
    for (j, checkpoint) in checkpoints.iter().enumerate() {
        if checkpoint.len() != first.len() {
            return Err(Error::InvalidArgument(format!(
                "checkpoint {j} has {} tensors, checkpoint 0 has {}",
                checkpoint.len(),
                first.len()
            )));
        }
        for (i, (t, t0)) in checkpoint.iter().zip(first).enumerate() {
            if t.shape() != t0.shape() {
                return Err(Error::shape(
                    &format!("checkpoints[{j}][{i}]"),
                    format!("the shape of checkpoints[0][{i}] = {:?}", t0.shape()),
                    t.shape(),
                ));
            }
            expect_finite(&format!("checkpoints[{j}][{i}]"), t)?;
        }
    }
    match backend {
        Backend::Cpu => Ok(reference::merge(checkpoints, coefficients, dtype)),
        #[cfg(feature = "cube")]
        Backend::Cube(ctx) => cube::merge(ctx, checkpoints, coefficients, dtype),
        #[cfg(feature = "cuda")]
        Backend::Cuda(ctx) => cuda::merge(ctx, checkpoints, coefficients, dtype),
    }
}

/// Where each tensor of a group lives in the flat f32 arena of the GPU kernels: tensor `i` starts
/// at element `offsets[i]`, a multiple of 4 (the kernels move 4-element vectors), and the padding
/// up to the next tensor is zero. `total` is the padded arena length. Stochastic rounding draws
/// its bits from these arena positions, so the CPU reference uses the same layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArenaLayout {
    pub sizes: Vec<usize>,
    pub offsets: Vec<u64>,
    pub total: u64,
}

impl ArenaLayout {
    pub fn new(sizes: &[usize]) -> Self {
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut total = 0u64;
        for &n in sizes {
            offsets.push(total);
            total += (n as u64).div_ceil(4) * 4;
        }
        ArenaLayout {
            sizes: sizes.to_vec(),
            offsets,
            total,
        }
    }

    /// The tensors packed into one zero-padded arena.
    pub fn pack(&self, tensors: &[&[f32]]) -> Vec<f32> {
        let mut arena = vec![0.0f32; self.total as usize];
        for ((t, &offset), &n) in tensors.iter().zip(&self.offsets).zip(&self.sizes) {
            arena[offset as usize..offset as usize + n].copy_from_slice(&t[..n]);
        }
        arena
    }

    /// The tensors cut back out of an arena.
    pub fn unpack<T: Copy>(&self, arena: &[T]) -> Vec<Vec<T>> {
        self.offsets
            .iter()
            .zip(&self.sizes)
            .map(|(&offset, &n)| arena[offset as usize..offset as usize + n].to_vec())
            .collect()
    }
}

/// The fused step with its state on the host, one call at a time: the f64 reference
/// ([`linattn_reference::optim::step::fused_step`]) behind a stateful API, for CPU users (the
/// burn adapter's NdArray path) and as the oracle of the device optimizers. The state after `n`
/// calls equals [`optimize`]'s on the CPU backend with the same `n` gradients.
#[derive(Clone, Debug)]
pub struct CpuOptimizer {
    config: OptimizerConfig,
    schedule: Schedule,
    states: Vec<linattn_reference::optim::step::TensorState>,
    steps: u64,
    history: Vec<StepRecord>,
}

impl CpuOptimizer {
    /// Zero moments over `params` (the EMA, when on, starts at them); `decay[i]` says whether
    /// weight decay applies to tensor `i`.
    pub fn new(
        config: &OptimizerConfig,
        schedule: &Schedule,
        params: &[&[f64]],
        decay: &[bool],
    ) -> Result<Self> {
        config.validate()?;
        validate_schedule(schedule)?;
        if decay.len() != params.len() {
            return Err(Error::InvalidArgument(format!(
                "{} decay flags for {} parameter tensors",
                decay.len(),
                params.len()
            )));
        }
        for (i, p) in params.iter().enumerate() {
            if let Some((index, &value)) = p.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                return Err(Error::NonFinite {
                    tensor: format!("params[{i}]"),
                    index,
                    value,
                });
            }
        }
        let states = params
            .iter()
            .zip(decay)
            .map(|(p, &d)| {
                linattn_reference::optim::step::TensorState::new(
                    p.to_vec(),
                    &config.method,
                    config.ema_beta.is_some(),
                    d,
                )
            })
            .collect();
        Ok(CpuOptimizer {
            config: config.clone(),
            schedule: schedule.clone(),
            states,
            steps: 0,
            history: Vec::new(),
        })
    }

    /// One call with the scheduled lr of call [`calls`](Self::calls): clipping, the non-finite
    /// skip, the update, the EMA.
    pub fn step(&mut self, grads: &[&[f64]]) -> Result<StepRecord> {
        if grads.len() != self.states.len() {
            return Err(Error::InvalidArgument(format!(
                "{} gradients for {} parameter tensors",
                grads.len(),
                self.states.len()
            )));
        }
        for (i, (g, s)) in grads.iter().zip(&self.states).enumerate() {
            if g.len() != s.param.len() {
                return Err(Error::shape(
                    &format!("grads[{i}]"),
                    format!("{} elements (params[{i}])", s.param.len()),
                    &[g.len()],
                ));
            }
        }
        let lr = self.config.lr * self.schedule.multiplier(self.history.len());
        let outcome = linattn_reference::optim::step::fused_step(
            &self.config.step_config(),
            lr,
            self.config.lr,
            &mut self.steps,
            &mut self.states,
            grads,
        );
        let record = StepRecord {
            lr,
            grad_norm: Some(outcome.grad_norm),
            skipped: outcome.skipped,
        };
        self.history.push(record);
        Ok(record)
    }

    /// The whole state (weights, moments, EMA, step count, history) by name, for
    /// [`CpuOptimizer::import_state`] in another process.
    pub fn export_state(&self) -> Vec<(String, Vec<f64>)> {
        let mut out = Vec::new();
        for (i, s) in self.states.iter().enumerate() {
            out.push((format!("tensor{i}.param"), s.param.clone()));
            out.push((format!("tensor{i}.exp_avg"), s.exp_avg.clone()));
            out.push((format!("tensor{i}.exp_avg_sq"), s.exp_avg_sq.clone()));
            if let Some(e) = &s.ema {
                out.push((format!("tensor{i}.ema"), e.clone()));
            }
        }
        out.push(("steps".into(), vec![self.steps as f64]));
        let history = self
            .history
            .iter()
            .flat_map(|r| {
                [
                    r.lr,
                    r.grad_norm.unwrap_or(f64::NAN),
                    f64::from(u8::from(r.skipped)),
                ]
            })
            .collect();
        out.push(("history".into(), history));
        out
    }

    /// Restores a state [`CpuOptimizer::export_state`] returned (same configuration and sizes).
    pub fn import_state(&mut self, state: &[(String, Vec<f64>)]) -> Result<()> {
        let find = |name: &str, len: Option<usize>| -> Result<Vec<f64>> {
            let v = state
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| Error::InvalidArgument(format!("optimizer state: no `{name}`")))?;
            if let Some(len) = len
                && v.len() != len
            {
                return Err(Error::InvalidArgument(format!(
                    "optimizer state: `{name}` has {} values, expected {len}",
                    v.len()
                )));
            }
            Ok(v)
        };
        let mut states = self.states.clone();
        for (i, s) in states.iter_mut().enumerate() {
            let n = s.param.len();
            s.param = find(&format!("tensor{i}.param"), Some(n))?;
            s.exp_avg = find(&format!("tensor{i}.exp_avg"), Some(n))?;
            s.exp_avg_sq = find(&format!("tensor{i}.exp_avg_sq"), Some(s.exp_avg_sq.len()))?;
            if s.ema.is_some() {
                s.ema = Some(find(&format!("tensor{i}.ema"), Some(n))?);
            }
        }
        let steps = find("steps", Some(1))?[0] as u64;
        let h = find("history", None)?;
        if h.len() % 3 != 0 {
            return Err(Error::InvalidArgument(
                "optimizer state: `history` is not a list of (lr, norm, skipped)".into(),
            ));
        }
        self.history = h
            .chunks(3)
            .map(|c| StepRecord {
                lr: c[0],
                grad_norm: (!c[1].is_nan()).then_some(c[1]),
                skipped: c[2] != 0.0,
            })
            .collect();
        self.states = states;
        self.steps = steps;
        Ok(())
    }

    /// The whole state by tensor (the backend-neutral form of [`Optimizer::state`]).
    pub fn state(&self) -> OptimizerState {
        let adamw = self.config.method.has_second_moment();
        OptimizerState {
            params: self.states.iter().map(|s| s.param.clone()).collect(),
            exp_avg: self.states.iter().map(|s| s.exp_avg.clone()).collect(),
            exp_avg_sq: adamw.then(|| self.states.iter().map(|s| s.exp_avg_sq.clone()).collect()),
            ema: self.states.iter().map(|s| s.ema.clone()).collect(),
            model_copy: None,
            calls: self.history.len() as u64,
            steps: self.steps,
            skipped: self.history.iter().filter(|r| r.skipped).count() as u64,
            last_skipped: self.history.last().is_some_and(|r| r.skipped),
            history: self.history.clone(),
        }
    }

    /// Replaces the state with `state` (checked to fit: sizes, method, EMA). Every call must be
    /// in its history (the CPU records all); a 16-bit copy in it is ignored (the CPU keeps none).
    pub fn set_state(&mut self, state: &OptimizerState) -> Result<()> {
        let sizes: Vec<usize> = self.states.iter().map(|s| s.param.len()).collect();
        state.check_fits(&self.config, &sizes)?;
        if state.history.len() as u64 != state.calls {
            return Err(Error::InvalidArgument(format!(
                "optimizer state: the CPU optimizer needs the record of every call (it derives \
                 the next call's schedule index from them), the state has {} of {} calls",
                state.history.len(),
                state.calls
            )));
        }
        for (i, s) in self.states.iter_mut().enumerate() {
            s.param = state.params[i].clone();
            s.exp_avg = state.exp_avg[i].clone();
            if let Some(v) = &state.exp_avg_sq {
                s.exp_avg_sq = v[i].clone();
            }
            s.ema = state.ema.as_ref().map(|e| e[i].clone());
        }
        self.steps = state.steps;
        self.history = state.history.clone();
        Ok(())
    }

    /// The weights.
    pub fn params(&self) -> Vec<&[f64]> {
        self.states.iter().map(|s| s.param.as_slice()).collect()
    }

    /// The EMA of the weights, when on.
    pub fn ema(&self) -> Option<Vec<&[f64]>> {
        self.states.iter().map(|s| s.ema.as_deref()).collect()
    }

    /// Calls so far (the next call's schedule index).
    pub fn calls(&self) -> usize {
        self.history.len()
    }

    /// Steps applied (AdamW's `t`).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One record per call.
    pub fn history(&self) -> &[StepRecord] {
        &self.history
    }
}
