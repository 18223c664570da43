//! Cases of the CUDA fused optimizer (kernels/optim.cu) against the f64 reference, generic over the
//! executor.
//!
//! Thresholds (issue 4): one f32 step agrees with the f64 reference step taken from the same f32
//! state to a relative RMS of 1e-6; independent multi-step trajectories agree to 1e-5. The
//! learning rates are large (0.05 - 0.5) so that an error in the update is not hidden under the
//! rounding of the parameters themselves. Sizes are small (the emulation runs every CUDA thread
//! as a fiber on one core).
//!
//! Callers: `tests/cuda_optim_emulated.rs`, `tests/cuda_optim.rs` and `linattn validate --device
//! cuda --full` (through [`gpu`]).

use half::{bf16, f16};

use super::{Failure, Outcome, Run, ensure, ensure_eq};
use crate::backend::Backend;
use crate::cuda::exec::Executor;
use crate::optim::cuda::{CudaOptimizer, merge_on, optimize_on};
use crate::optim::{
    self, CopyFormat, DecayMode, Method, OptimizerConfig, Params, Rounding, Schedule, Shape,
};
use crate::reference::optim::rounding;
use crate::reference::optim::step::{
    adamw_update, clip_coefficient, decay_factor, global_grad_norm, lion_update,
};
use crate::reference::testing::Rng;
use crate::reference::{max_abs_diff, rel_rms};
use crate::tensor::{DType, Tensor, TensorData};

/// Odd sizes, an empty tensor, and one that spans two chunks of 4096.
pub const SIZES: [usize; 5] = [1, 7, 0, 4099, 33];

pub fn random_tensors(rng: &mut Rng, sizes: &[usize], scale: f64) -> Vec<Vec<f32>> {
    sizes
        .iter()
        .map(|&n| {
            rng.randn(n)
                .into_iter()
                .map(|x| (x * scale) as f32)
                .collect()
        })
        .collect()
}

/// Each vector as a 1-D tensor.
fn tensors_1d(v: Vec<Vec<f32>>) -> crate::Result<Vec<Tensor>> {
    v.into_iter()
        .map(|x| Tensor::from_f32(vec![x.len()], x))
        .collect()
}

fn slices(v: &[Vec<f32>]) -> Vec<&[f32]> {
    v.iter().map(Vec::as_slice).collect()
}

fn flat64(v: &[Vec<f32>]) -> Vec<f64> {
    v.iter().flatten().map(|&x| x as f64).collect()
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The relative RMS of `actual` against `expected`, or a failure naming `what` when it exceeds
/// `threshold` (or the lengths differ).
fn close(what: &str, actual: &[f64], expected: &[f64], threshold: f64) -> Outcome<f64> {
    ensure!(
        actual.len() == expected.len(),
        "{what}: {} values, expected {}",
        actual.len(),
        expected.len()
    );
    let rel = rel_rms(actual, expected);
    ensure!(
        rel <= threshold,
        "{what}: relative RMS {rel:.3e} > {threshold:e} (max abs {:.3e})",
        max_abs_diff(actual, expected)
    );
    Ok(rel)
}

pub fn adamw(lr: f64) -> OptimizerConfig {
    OptimizerConfig {
        weight_decay: 0.1,
        ..OptimizerConfig::adamw(lr)
    }
}

/// Steps the device optimizer and, at every step, the f64 reference from the device's own f32
/// state (clipping coefficient and EMA included); compares parameters, moments and EMA after each
/// step. Returns the worst relative RMS seen.
pub fn per_step_check<E: Executor + Clone>(
    exec: &E,
    config: &OptimizerConfig,
    decay: &[bool],
    grad_scale: f64,
) -> Outcome<f64> {
    per_step_check_sizes(exec, config, decay, grad_scale, &SIZES, 5)
}

/// [`per_step_check`] on tensors of `sizes` for `steps` calls (at most 5).
pub fn per_step_check_sizes<E: Executor + Clone>(
    exec: &E,
    config: &OptimizerConfig,
    decay: &[bool],
    grad_scale: f64,
    sizes: &[usize],
    steps: usize,
) -> Outcome<f64> {
    let mut rng = Rng::new(11);
    let params = random_tensors(&mut rng, sizes, 1.0);
    let schedule = Schedule::Linear {
        warmup: 1,
        total: 6,
    };
    let mut opt = CudaOptimizer::new(exec.clone(), config, &schedule, 6, &slices(&params), decay)?;
    let mut p = params.clone();
    let mut m: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut v = m.clone();
    let mut e = params.clone();
    let mut worst = 0f64;
    for call in 0..steps {
        let grads = random_tensors(&mut rng, sizes, grad_scale);
        opt.set_grads(&slices(&grads))?;
        opt.step()?;
        let lr = config.lr * schedule.multiplier(call);
        let grads64: Vec<Vec<f64>> = grads.iter().map(|g| to64(g)).collect();
        let grad_refs: Vec<&[f64]> = grads64.iter().map(Vec::as_slice).collect();
        let coef = config.max_grad_norm.map_or(1.0, |max| {
            clip_coefficient(global_grad_norm(&grad_refs), max)
        });
        let mut expect_p = Vec::new();
        let mut expect_m = Vec::new();
        let mut expect_v = Vec::new();
        for i in 0..sizes.len() {
            let mut pi = to64(&p[i]);
            let mut mi = to64(&m[i]);
            let mut vi = to64(&v[i]);
            let gi: Vec<f64> = grads64[i].iter().map(|g| g * coef).collect();
            let d = if decay[i] {
                decay_factor(config.decay_mode, lr, config.lr, config.weight_decay)
            } else {
                0.0
            };
            match config.method {
                Method::AdamW { beta1, beta2, eps } => adamw_update(
                    &mut pi,
                    &gi,
                    &mut mi,
                    &mut vi,
                    call as u64 + 1,
                    lr,
                    d,
                    (beta1, beta2, eps),
                    config.cautious,
                ),
                Method::Lion { beta1, beta2 } => lion_update(
                    &mut pi,
                    &gi,
                    &mut mi,
                    lr,
                    d,
                    (beta1, beta2),
                    config.cautious,
                ),
            }
            expect_p.extend(pi);
            expect_m.extend(mi);
            expect_v.extend(vi);
        }
        p = opt.read_params()?;
        m = opt.read_exp_avg()?;
        let check =
            |what: &str, a: &[f64], b: &[f64]| close(&format!("{what}, step {call}"), a, b, 1e-6);
        worst = worst.max(check("param", &flat64(&p), &expect_p)?);
        worst = worst.max(check("exp_avg", &flat64(&m), &expect_m)?);
        if let Some(sq) = opt.read_exp_avg_sq()? {
            v = sq;
            worst = worst.max(check("exp_avg_sq", &flat64(&v), &expect_v)?);
        }
        if let Some(beta) = config.ema_beta {
            // ema <- ema + (1 - beta) (theta - ema) from the device's previous EMA and new weights.
            let mut expect_e = Vec::new();
            for (ei, pi) in e.iter().zip(&p) {
                for (&x, &w) in ei.iter().zip(pi) {
                    expect_e.push(x as f64 + (1.0 - beta) * (w as f64 - x as f64));
                }
            }
            e = opt.read_ema()?.ok_or_else(|| Failure("not kept".into()))?;
            worst = worst.max(check("ema", &flat64(&e), &expect_e)?);
        }
    }
    let status = opt.status()?;
    let steps = steps as u64;
    ensure_eq!(
        (status.calls, status.steps, status.skipped),
        (steps, steps, 0)
    );
    Ok(worst)
}

/// `optimize_on` (the device) against the CPU backend over `steps` calls with a cosine schedule:
/// independent trajectories, f32 vs f64. Returns the worst relative RMS.
pub fn multi_step<E: Executor + Clone>(
    exec: &E,
    config: &OptimizerConfig,
    steps: usize,
) -> Outcome<f64> {
    let mut rng = Rng::new(5);
    let sizes = [3usize, 0, 129, 1000];
    let params = tensors_1d(random_tensors(&mut rng, &sizes, 1.0))?;
    let grads: Vec<Vec<Tensor>> = (0..steps)
        .map(|_| tensors_1d(random_tensors(&mut rng, &sizes, 0.3)))
        .collect::<crate::Result<_>>()?;
    let grad_refs: Vec<Vec<&Tensor>> = grads.iter().map(|s| s.iter().collect()).collect();
    let param_refs: Vec<&Tensor> = params.iter().collect();
    let decay = [true, true, false, true];
    let group = Params {
        tensors: &param_refs,
        decay: Some(&decay),
    };
    let schedule = Schedule::Cosine {
        warmup: steps / 10,
        total: steps,
        min_ratio: 0.1,
        num_cycles: 0.5,
    };
    let gpu = optimize_on(exec.clone(), config, &schedule, &group, &grad_refs)?;
    let cpu = optim::optimize(&Backend::Cpu, config, &schedule, &group, &grad_refs)?;
    let flat = |ts: &[Tensor]| -> Vec<f64> { ts.iter().flat_map(|t| t.to_f64_vec()).collect() };
    ensure_eq!(gpu.steps, steps as u64);
    let mut worst = close("params", &flat(&gpu.params), &flat(&cpu.params), 1e-5)?;
    worst = worst.max(close(
        "exp_avg",
        &flat(&gpu.exp_avg),
        &flat(&cpu.exp_avg),
        1e-5,
    )?);
    if let (Some(g), Some(c)) = (&gpu.exp_avg_sq, &cpu.exp_avg_sq) {
        worst = worst.max(close("exp_avg_sq", &flat(g), &flat(c), 1e-5)?);
    }
    if let (Some(g), Some(c)) = (&gpu.ema, &cpu.ema) {
        worst = worst.max(close("ema", &flat(g), &flat(c), 1e-5)?);
    }
    if let (Some(g), Some(c)) = (&gpu.model_copy, &cpu.model_copy) {
        // Both are the 16-bit image of weights that agree to ~1e-6: the copies agree to within one
        // 16-bit spacing (a near-tie can round either way), so compare at the 16-bit precision.
        ensure_eq!(g[0].dtype(), c[0].dtype());
        let tolerance = if g[0].dtype() == DType::BF16 {
            4e-3
        } else {
            5e-4
        };
        worst = worst.max(close("model copy", &flat(g), &flat(c), tolerance)?);
    }
    for (k, (g, c)) in gpu.history.iter().zip(&cpu.history).enumerate() {
        ensure!((g.lr - c.lr).abs() <= 1e-12 * c.lr.abs(), "lr at {k}");
        let norm = |r: &crate::optim::StepRecord| {
            r.grad_norm
                .ok_or_else(|| Failure(format!("no gradient norm recorded at step {k}")))
        };
        let (gn, cn) = (norm(g)?, norm(c)?);
        // Same f32 gradients, both summed in f64: only the order of the additions differs.
        ensure!(
            (gn - cn).abs() <= 1e-12 * cn,
            "grad norm at {k}: {gn} vs {cn}"
        );
        ensure!(!g.skipped && !c.skipped);
    }
    Ok(worst)
}

type Snapshot = (
    Vec<Vec<f32>>,
    Vec<Vec<f32>>,
    Option<Vec<Vec<f32>>>,
    Option<Vec<Vec<f32>>>,
    Option<Vec<Vec<u16>>>,
);

fn snapshot<E: Executor>(opt: &CudaOptimizer<E>) -> crate::Result<Snapshot> {
    Ok((
        opt.read_params()?,
        opt.read_exp_avg()?,
        opt.read_exp_avg_sq()?,
        opt.read_ema()?,
        opt.read_model_copy()?,
    ))
}

/// A NaN / +inf / -inf in the last element of the two-chunk tensor skips the whole step: every
/// state bit for bit unchanged, `t` unchanged, the skip reported in the counters and the history.
pub fn non_finite_skip<E: Executor + Clone>(exec: &E, method: Method) -> Outcome<()> {
    let config = OptimizerConfig {
        method,
        weight_decay: 0.1,
        max_grad_norm: Some(1.0),
        ema_beta: Some(0.5),
        model_copy: Some((CopyFormat::Bf16, Rounding::Stochastic { seed: 3 })),
        ..OptimizerConfig::adamw(0.1)
    };
    let mut rng = Rng::new(2);
    let params = random_tensors(&mut rng, &SIZES, 1.0);
    let schedule = Schedule::Constant { warmup: 0 };
    let mut opt = CudaOptimizer::new(
        exec.clone(),
        &config,
        &schedule,
        8,
        &slices(&params),
        &[true; 5],
    )?;
    let good = random_tensors(&mut rng, &SIZES, 0.5);
    opt.set_grads(&slices(&good))?;
    opt.step()?;
    let after_first = snapshot(&opt)?;
    let scalars_after_first = opt.read_scalars()?;
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut grads = random_tensors(&mut rng, &SIZES, 0.5);
        grads[3][4098] = bad; // the last element, in the second chunk of the big tensor
        opt.set_grads(&slices(&grads))?;
        opt.step()?;
        let now = snapshot(&opt)?;
        // Bitwise: NaN-free states compare equal exactly when unchanged.
        ensure!(now == after_first, "state changed on a {bad} gradient");
        let status = opt.status()?;
        ensure!(status.last_skipped);
        ensure_eq!(status.steps, 1);
    }
    // The update's scalars of the skipped calls were never written.
    ensure_eq!(opt.read_scalars()?, scalars_after_first);
    opt.set_grads(&slices(&good))?;
    opt.step()?;
    let status = opt.status()?;
    ensure_eq!(
        (
            status.calls,
            status.steps,
            status.skipped,
            status.last_skipped
        ),
        (5, 2, 3, false)
    );
    let history = opt.history()?;
    let skipped: Vec<bool> = history.iter().map(|r| r.skipped).collect();
    ensure_eq!(skipped, [false, true, true, true, false]);
    ensure!(history[1].grad_norm.is_some_and(f64::is_nan));
    ensure!(history[2].grad_norm.is_some_and(f64::is_infinite));
    ensure!(
        snapshot(&opt)?.0 != after_first.0,
        "the good step after the skips changed nothing"
    );
    Ok(())
}

/// A run with a NaN call agrees with the CPU reference run: same skips, same `t`, the schedule
/// advanced on the skipped call.
pub fn skipped_steps_match_reference<E: Executor + Clone>(exec: &E) -> Outcome<f64> {
    let config = adamw(0.2);
    let mut rng = Rng::new(9);
    let p = Tensor::from_f32(vec![10], random_tensors(&mut rng, &[10], 1.0).remove(0))?;
    let grads: Vec<Tensor> = (0..4)
        .map(|s| {
            let mut g = random_tensors(&mut rng, &[10], 0.5).remove(0);
            if s == 1 {
                g[3] = f32::NAN;
            }
            Tensor::from_f32(vec![10], g)
        })
        .collect::<crate::Result<_>>()?;
    let grad_refs: Vec<Vec<&Tensor>> = grads.iter().map(|g| vec![g]).collect();
    let params = [&p];
    let schedule = Schedule::Linear {
        warmup: 0,
        total: 4,
    };
    let gpu = optimize_on(
        exec.clone(),
        &config,
        &schedule,
        &Params::new(&params),
        &grad_refs,
    )?;
    let cpu = optim::optimize(
        &Backend::Cpu,
        &config,
        &schedule,
        &Params::new(&params),
        &grad_refs,
    )?;
    ensure_eq!((gpu.steps, cpu.steps), (3, 3));
    let skipped: Vec<bool> = gpu.history.iter().map(|r| r.skipped).collect();
    ensure_eq!(skipped, [false, true, false, false]);
    ensure_eq!(gpu.history[2].lr, cpu.history[2].lr);
    ensure!((gpu.history[2].lr - 0.1).abs() < 1e-15);
    close(
        "params",
        &gpu.params[0].to_f64_vec(),
        &cpu.params[0].to_f64_vec(),
        1e-6,
    )
}

/// Without the check and without clipping the norm pass does not run (no norm in the history) and
/// a NaN gradient flows into the state, as in plain torch.
pub fn unchecked_nan_propagates<E: Executor + Clone>(exec: &E) -> Outcome<()> {
    let config = OptimizerConfig {
        skip_non_finite: false,
        ..adamw(0.1)
    };
    let params = vec![vec![1.0f32; 9]];
    let schedule = Schedule::Constant { warmup: 0 };
    let mut opt = CudaOptimizer::new(
        exec.clone(),
        &config,
        &schedule,
        2,
        &slices(&params),
        &[true],
    )?;
    let mut g = vec![0.5f32; 9];
    g[8] = f32::NAN;
    opt.set_grads(&[&g])?;
    opt.step()?;
    let p = opt.read_params()?;
    ensure!(p[0][8].is_nan());
    ensure!(p[0][..8].iter().all(|x| x.is_finite()));
    let history = opt.history()?;
    ensure_eq!(history.len(), 1);
    ensure!(!history[0].skipped);
    ensure_eq!(history[0].grad_norm, None);
    ensure_eq!(opt.status()?.steps, 1);
    Ok(())
}

/// The device's scalars against f64: bias corrections from the integer step (an empty group, so
/// each call only runs the scalar kernel), rounded once to f32.
pub fn bias_corrections_match_f64<E: Executor + Clone>(exec: &E) -> Outcome<f64> {
    let config = OptimizerConfig::adamw(1.0);
    let schedule = Schedule::Constant { warmup: 0 };
    let mut opt = CudaOptimizer::new(exec.clone(), &config, &schedule, 1, &[], &[])?;
    let mut t = 0u64;
    let mut worst = 0f64;
    for target in [1u64, 2, 3, 10, 100, 400] {
        while t < target {
            opt.step()?;
            t += 1;
        }
        let [step_size, bc2_sqrt, decay, clip] = opt.read_scalars()?;
        let bc1 = 1.0 - 0.9f64.powf(t as f64);
        let bc2 = 1.0 - 0.999f64.powf(t as f64);
        let rel = |a: f32, b: f64| (a as f64 - b).abs() / b;
        // f64 on the device, rounded once to f32: half an ulp.
        for (what, got, want) in [
            ("step size", step_size, 1.0 / bc1),
            ("sqrt(bc2)", bc2_sqrt, bc2.sqrt()),
            ("decay", decay, 1e-2),
        ] {
            let r = rel(got, want);
            ensure!(r <= 6e-8, "t = {t}: {what} {got} vs {want}");
            worst = worst.max(r);
        }
        ensure_eq!(clip, 1.0);
    }
    ensure_eq!(opt.status()?.steps, 400);
    // Calls past the lr table (capacity 1) keep its last value and are not recorded.
    let history = opt.history()?;
    ensure_eq!(history.len(), 1);
    ensure_eq!(history[0].lr, 1.0);
    Ok(worst)
}

/// The 16-bit copy equals the reference rounding of the device's own f32 weights, bit for bit
/// (arena positions feed the stochastic-rounding hash).
pub fn model_copies_match_rounding<E: Executor + Clone>(exec: &E) -> Outcome<()> {
    for format in [CopyFormat::Bf16, CopyFormat::F16] {
        for rounding_mode in [Rounding::Nearest, Rounding::Stochastic { seed: 77 }] {
            let config = OptimizerConfig {
                model_copy: Some((format, rounding_mode)),
                ..OptimizerConfig::lion(0.01)
            };
            let mut rng = Rng::new(4);
            let params = random_tensors(&mut rng, &SIZES, 1e-3);
            let schedule = Schedule::Constant { warmup: 0 };
            let mut opt = CudaOptimizer::new(
                exec.clone(),
                &config,
                &schedule,
                4,
                &slices(&params),
                &[true; 5],
            )?;
            // Before any step: the nearest image of the initial weights.
            let initial = opt
                .read_model_copy()?
                .ok_or_else(|| Failure("not kept".into()))?;
            for (w, c) in params.iter().zip(&initial) {
                for (&x, &bits) in w.iter().zip(c) {
                    let expected = match format {
                        CopyFormat::Bf16 => rounding::bf16_nearest(x),
                        CopyFormat::F16 => rounding::f16_nearest(x),
                    };
                    ensure_eq!(bits, expected);
                }
            }
            for _ in 0..3 {
                let grads = random_tensors(&mut rng, &SIZES, 1.0);
                opt.set_grads(&slices(&grads))?;
                opt.step()?;
            }
            let weights = opt.read_params()?;
            let copy = opt
                .read_model_copy()?
                .ok_or_else(|| Failure("not kept".into()))?;
            let key = match rounding_mode {
                Rounding::Nearest => None,
                Rounding::Stochastic { seed } => Some(rounding::call_key(seed, 2)),
            };
            for (i, (w, c)) in weights.iter().zip(&copy).enumerate() {
                let offset = opt.layout().offsets[i];
                for (j, (&x, &bits)) in w.iter().zip(c).enumerate() {
                    let random = key.map(|k| rounding::element_bits(k, (offset + j as u64) as u32));
                    let expected = match (format, random) {
                        (CopyFormat::Bf16, None) => rounding::bf16_nearest(x),
                        (CopyFormat::Bf16, Some(r)) => rounding::bf16_stochastic(x, r),
                        (CopyFormat::F16, None) => rounding::f16_nearest(x),
                        (CopyFormat::F16, Some(r)) => rounding::f16_stochastic(x, r),
                    };
                    ensure_eq!(
                        bits,
                        expected,
                        "{format:?} {rounding_mode:?} tensor {i} element {j}: x = {x:e}"
                    );
                }
            }
        }
    }
    Ok(())
}

/// WSM merging against the CPU reference, and the one 16-bit cast against `half`.
pub fn wsm_merge_matches_reference<E: Executor>(exec: &E) -> Outcome<f64> {
    let mut rng = Rng::new(8);
    let sizes = [5usize, 0, 4100];
    let checkpoints: Vec<Vec<Tensor>> = (0..4)
        .map(|_| tensors_1d(random_tensors(&mut rng, &sizes, 1.0)))
        .collect::<crate::Result<_>>()?;
    let refs: Vec<Vec<&Tensor>> = checkpoints.iter().map(|c| c.iter().collect()).collect();
    let c = optim::wsm_coefficients(Shape::Cosine, 3);
    let gpu = merge_on(exec, &refs, &c, DType::F32)?;
    let cpu = optim::merge(&Backend::Cpu, &refs, &c, DType::F64)?;
    let mut worst = 0f64;
    for (g, r) in gpu.iter().zip(&cpu) {
        ensure_eq!(g.shape(), r.shape());
        worst = worst.max(close("merged", &g.to_f64_vec(), &r.to_f64_vec(), 1e-6)?);
    }
    for dtype in [DType::BF16, DType::F16] {
        let half = merge_on(exec, &refs, &c, dtype)?;
        for (h, g) in half.iter().zip(&gpu) {
            ensure_eq!(h.dtype(), dtype);
            let expected: Vec<f64> = g
                .to_f32_vec()
                .iter()
                .map(|&x| {
                    if dtype == DType::BF16 {
                        bf16::from_f32(x).to_f64()
                    } else {
                        f16::from_f32(x).to_f64()
                    }
                })
                .collect();
            ensure_eq!(h.to_f64_vec(), expected);
        }
    }
    Ok(worst)
}

/// The kernel's f32 -> bf16 / f16 nearest-even conversion against `half` on special values
/// (subnormals, ties, overflow) and random bit patterns: merging one checkpoint with coefficient
/// 1 is the identity in f32, so the copy is the conversion itself.
pub fn nearest_conversions_match_half<E: Executor>(exec: &E) -> Outcome<()> {
    let mut values: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.5,
        65504.0,
        65519.0,
        65520.0,
        -65536.0,
        1e10,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        2f32.powi(-14),
        2f32.powi(-24),
        2f32.powi(-25),
        3.0 * 2f32.powi(-25),
        1023.5 * 2f32.powi(-24),
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
    ];
    let mut rng = Rng::new(3);
    for _ in 0..2000 {
        // Random bit patterns over the finite range.
        values.push(f32::from_bits((rng.next_u64() as u32) & 0xff7f_ffff));
    }
    let t = Tensor::new(vec![values.len()], TensorData::F32(values.clone()))?;
    for dtype in [DType::BF16, DType::F16] {
        let out = merge_on(exec, &[vec![&t]], &[1.0], dtype)?;
        let bits: Vec<u16> = match out[0].data() {
            TensorData::BF16(d) => d.iter().map(|x| x.to_bits()).collect(),
            TensorData::F16(d) => d.iter().map(|x| x.to_bits()).collect(),
            other => return Err(Failure(format!("a 16-bit merge returned {other:?}"))),
        };
        for (&x, &b) in values.iter().zip(&bits) {
            let expected = if dtype == DType::BF16 {
                bf16::from_f32(x).to_bits()
            } else {
                f16::from_f32(x).to_bits()
            };
            ensure_eq!(b, expected, "{dtype} of {x:e} ({:#010x})", x.to_bits());
        }
    }
    Ok(())
}

/// The configurations of the per-step checks: `(label, config, decay flags, gradient scale)`.
pub fn per_step_configs() -> Vec<(&'static str, OptimizerConfig, [bool; 5], f64)> {
    vec![
        ("adamw decoupled", adamw(0.5), [true; 5], 0.5),
        // Gradients of the size of eps: m / (sqrt(v) + eps) and m / sqrt(v + eps) differ by
        // orders of magnitude here, so the placement of eps is checked.
        ("adamw eps regime", adamw(0.5), [true; 5], 1e-8),
        (
            "adamw cautious fully decoupled",
            OptimizerConfig {
                cautious: true,
                decay_mode: DecayMode::FullyDecoupled,
                weight_decay: 0.2,
                ..OptimizerConfig::adamw(0.3)
            },
            [true, false, true, true, false],
            0.5,
        ),
        (
            "adamw clipped with ema",
            OptimizerConfig {
                max_grad_norm: Some(2.0),
                ema_beta: Some(0.9),
                ..adamw(0.5)
            },
            [true; 5],
            0.5,
        ),
        (
            "lion decoupled",
            OptimizerConfig {
                weight_decay: 0.5,
                ..OptimizerConfig::lion(0.1)
            },
            [true, true, true, false, true],
            0.5,
        ),
        (
            "lion cautious",
            OptimizerConfig {
                weight_decay: 0.5,
                cautious: true,
                ..OptimizerConfig::lion(0.1)
            },
            [true; 5],
            0.5,
        ),
        (
            "lion fully decoupled clipped with ema",
            OptimizerConfig {
                weight_decay: 0.5,
                decay_mode: DecayMode::FullyDecoupled,
                max_grad_norm: Some(1.0),
                ema_beta: Some(0.8),
                ..OptimizerConfig::lion(0.1)
            },
            [true, false, true, true, true],
            0.5,
        ),
    ]
}

/// The configurations of the 100-step trajectories: AdamW with a schedule, clipping, EMA and a
/// bf16 copy; cautious Lion with clipping and EMA.
pub fn trajectory_configs() -> [(&'static str, OptimizerConfig); 2] {
    [
        (
            "adamw, 100 steps, schedule + clip + ema + bf16 copy",
            OptimizerConfig {
                weight_decay: 0.1,
                max_grad_norm: Some(5.0),
                ema_beta: Some(0.9),
                model_copy: Some((CopyFormat::Bf16, Rounding::Nearest)),
                ..OptimizerConfig::adamw(0.05)
            },
        ),
        (
            "lion cautious, 100 steps, schedule + clip + ema",
            OptimizerConfig {
                weight_decay: 0.1,
                max_grad_norm: Some(5.0),
                ema_beta: Some(0.9),
                cautious: true,
                ..OptimizerConfig::lion(0.01)
            },
        ),
    ]
}

const SUITE: &str = "optim";

/// One per-step run per configuration of [`per_step_configs`] (5 steps each, 1e-6).
pub fn per_step_runs<E: Executor + Clone>(exec: &E) -> Vec<Run> {
    per_step_configs()
        .into_iter()
        .map(|(label, config, decay, grad_scale)| {
            Run::scalar(SUITE, format!("{label}, each of 5 steps"), 1e-6, || {
                per_step_check(exec, &config, &decay, grad_scale)
            })
        })
        .collect()
}

/// The 100-step trajectories of [`trajectory_configs`] against the CPU backend (1e-5).
pub fn trajectory_runs<E: Executor + Clone>(exec: &E) -> Vec<Run> {
    trajectory_configs()
        .into_iter()
        .map(|(label, config)| Run::scalar(SUITE, label, 1e-5, || multi_step(exec, &config, 100)))
        .collect()
}

/// The non-finite rules: the atomic skip (AdamW, Lion), a run with a skipped call against the
/// reference, and NaN propagation with the check off.
pub fn skip_runs<E: Executor + Clone>(exec: &E) -> Vec<Run> {
    vec![
        Run::exact(SUITE, "adamw: a non-finite gradient skips the step", || {
            non_finite_skip(exec, Method::adamw())
        }),
        Run::exact(SUITE, "lion: a non-finite gradient skips the step", || {
            non_finite_skip(exec, Method::lion())
        }),
        Run::scalar(
            SUITE,
            "a run with a skipped call vs reference",
            1e-6,
            || skipped_steps_match_reference(exec),
        ),
        Run::exact(SUITE, "unchecked NaN propagates", || {
            unchecked_nan_propagates(exec)
        }),
    ]
}

/// The device's step scalars, the 16-bit copies, WSM merging and the 16-bit conversions.
pub fn scalar_and_copy_runs<E: Executor + Clone>(exec: &E) -> Vec<Run> {
    vec![
        Run::scalar(SUITE, "bias corrections vs f64, t up to 400", 6e-8, || {
            bias_corrections_match_f64(exec)
        }),
        Run::exact(SUITE, "bf16 / f16 copies bit-exact", || {
            model_copies_match_rounding(exec)
        }),
        Run::scalar(SUITE, "WSM merge of 4 checkpoints", 1e-6, || {
            wsm_merge_matches_reference(exec)
        }),
        Run::exact(SUITE, "nearest f32 -> bf16 / f16 conversions", || {
            nearest_conversions_match_half(exec)
        }),
    ]
}

/// The GPU groups of the optimizer suite (`tests/cuda_optim.rs` asserts each one; `linattn validate
/// --device cuda --full` tabulates them all).
pub mod gpu {
    use super::{
        CopyFormat, Executor, OptimizerConfig, Params, Rounding, Run, SUITE, Schedule, Shape,
        adamw, per_step_check_sizes, random_tensors,
    };
    use crate::backend::Backend;
    use crate::cuda::CudaContext;
    use crate::cuda::exec::CudaExec;
    use crate::optim;
    use crate::reference::testing::Rng;
    use crate::suites::ensure_eq;
    use crate::tensor::{DType, Tensor};

    /// 20M elements: more quads than the statistics pass covers in one sweep of its 1024 blocks
    /// (4M quads), so every grid-stride loop runs several rounds.
    pub fn large_group<E: Executor + Clone>(exec: &E) -> Run {
        Run::scalar(SUITE, "adamw, 20M elements, each of 2 steps", 1e-6, || {
            let config = OptimizerConfig {
                max_grad_norm: Some(100.0),
                ema_beta: Some(0.9),
                model_copy: Some((CopyFormat::Bf16, Rounding::Stochastic { seed: 1 })),
                ..adamw(0.5)
            };
            per_step_check_sizes(
                exec,
                &config,
                &[true, false, true],
                0.5,
                &[20_000_003, 5, 1],
                2,
            )
        })
    }

    /// The public `optim::optimize` / `optim::merge` dispatch `Backend::Cuda` to these kernels.
    pub fn public_api(ctx: &CudaContext) -> Run {
        Run::scalar(
            SUITE,
            "public optimize / merge on Backend::Cuda",
            1e-5,
            || {
                let cuda = Backend::Cuda(ctx.clone());
                let mut rng = Rng::new(1);
                let sizes = [0usize, 1000, 3];
                let tensors = |rng: &mut Rng, scale: f64| {
                    super::tensors_1d(random_tensors(rng, &sizes, scale))
                };
                let params = tensors(&mut rng, 1.0)?;
                let grads: Vec<Vec<Tensor>> = (0..10)
                    .map(|_| tensors(&mut rng, 0.3))
                    .collect::<crate::Result<_>>()?;
                let grad_refs: Vec<Vec<&Tensor>> =
                    grads.iter().map(|s| s.iter().collect()).collect();
                let param_refs: Vec<&Tensor> = params.iter().collect();
                let group = Params::new(&param_refs);
                let schedule = Schedule::Constant { warmup: 2 };
                let config = adamw(0.05);
                let gpu = optim::optimize(&cuda, &config, &schedule, &group, &grad_refs)?;
                let cpu = optim::optimize(&Backend::Cpu, &config, &schedule, &group, &grad_refs)?;
                let flat = |ts: &[Tensor]| -> Vec<f64> {
                    ts.iter().flat_map(|t| t.to_f64_vec()).collect()
                };
                let rel = super::close("params", &flat(&gpu.params), &flat(&cpu.params), 1e-5)?;
                ensure_eq!(gpu.steps, 10);
                let c = optim::wsm_coefficients(Shape::Linear, 1);
                let merged = optim::merge(
                    &cuda,
                    &[param_refs.clone(), param_refs.clone()],
                    &c,
                    DType::F32,
                )?;
                ensure_eq!(flat(&merged), flat(&params));
                Ok(rel)
            },
        )
    }

    /// The stateful `optim::Optimizer` on `Backend::Cuda`: host gradients give `optimize`'s
    /// steps bit for bit, device gradients (f32 slices) the same steps, and a state saved after
    /// 4 calls and loaded into a fresh optimizer continues the run bit for bit.
    pub fn stateful_optimizer(ctx: &CudaContext) -> Run {
        Run::exact(
            SUITE,
            "Optimizer on Backend::Cuda: steps, device grads, save/load",
            || {
                let cuda = Backend::Cuda(ctx.clone());
                let mut rng = Rng::new(2);
                let sizes = [5usize, 0, 1000, 3];
                let tensors = |rng: &mut Rng, scale: f64| {
                    super::tensors_1d(random_tensors(rng, &sizes, scale))
                };
                let params = tensors(&mut rng, 1.0)?;
                let grads: Vec<Vec<Tensor>> = (0..10)
                    .map(|_| tensors(&mut rng, 0.3))
                    .collect::<crate::Result<_>>()?;
                fn refs(v: &[Tensor]) -> Vec<&Tensor> {
                    v.iter().collect()
                }
                let grad_refs: Vec<Vec<&Tensor>> = grads.iter().map(|s| refs(s)).collect();
                let param_refs = refs(&params);
                let group = Params::new(&param_refs);
                let schedule = Schedule::Constant { warmup: 2 };
                let config = OptimizerConfig {
                    ema_beta: Some(0.9),
                    model_copy: Some((CopyFormat::Bf16, Rounding::Stochastic { seed: 5 })),
                    ..adamw(0.05)
                };
                let bits = |ts: &[Tensor]| -> Vec<u64> {
                    ts.iter()
                        .flat_map(|t| t.to_f64_vec())
                        .map(f64::to_bits)
                        .collect()
                };
                let expected = optim::optimize(&cuda, &config, &schedule, &group, &grad_refs)?;
                let mut host = optim::Optimizer::new(&cuda, &group, &config, &schedule)?;
                let mut device = optim::Optimizer::new(&cuda, &group, &config, &schedule)?;
                let mut first = optim::Optimizer::new(&cuda, &group, &config, &schedule)?;
                let stream = ctx.stream().clone();
                for (k, g) in grads.iter().enumerate() {
                    host.step(&refs(g))?;
                    let slices = g
                        .iter()
                        .map(|t| stream.clone_htod(&t.to_f32_vec()))
                        .collect::<Result<Vec<_>, _>>()?;
                    let views = slices
                        .iter()
                        .zip(g)
                        .map(|(s, t)| {
                            crate::linear::cuda::device::CudaTensor::new(s, t.shape().to_vec())
                        })
                        .collect::<crate::Result<Vec<_>>>()?;
                    device.step(&views.iter().collect::<Vec<_>>())?;
                    if k < 4 {
                        first.step(&refs(g))?;
                    }
                }
                ensure_eq!(bits(&host.params()?), bits(&expected.params));
                ensure_eq!(bits(&device.params()?), bits(&expected.params));
                let saved = first.to_safetensors()?;
                let mut resumed = optim::Optimizer::new(&cuda, &group, &config, &schedule)?;
                resumed.load_safetensors(&saved)?;
                for g in &grads[4..] {
                    resumed.step(&refs(g))?;
                }
                ensure_eq!(bits(&resumed.params()?), bits(&expected.params));
                let (a, b) = (resumed.state()?, host.state()?);
                ensure_eq!(a.model_copy, b.model_copy);
                ensure_eq!(a.ema, b.ema);
                ensure_eq!(a.steps, 10);
                let w = host
                    .as_cuda()
                    .ok_or_else(|| crate::suites::Failure("not a cuda optimizer".into()))?
                    .param_slice(2)?;
                let w = stream.clone_dtoh(&w)?;
                ensure_eq!(
                    w.iter()
                        .map(|&x| f64::from(x).to_bits())
                        .collect::<Vec<_>>(),
                    expected.params[2]
                        .to_f64_vec()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>()
                );
                Ok(())
            },
        )
    }

    /// Every GPU group of the optimizer suite, in order.
    pub fn all(ctx: &CudaContext, print: bool) -> Vec<Run> {
        let exec = CudaExec::new(ctx);
        let mut runs = Vec::new();
        let mut push = |run: Run| {
            if print {
                println!("{}", run.line());
            }
            runs.push(run);
        };
        super::per_step_runs(&exec).into_iter().for_each(&mut push);
        push(large_group(&exec));
        super::trajectory_runs(&exec)
            .into_iter()
            .for_each(&mut push);
        super::skip_runs(&exec).into_iter().for_each(&mut push);
        super::scalar_and_copy_runs(&exec)
            .into_iter()
            .for_each(&mut push);
        push(public_api(ctx));
        push(stateful_optimizer(ctx));
        runs
    }
}
