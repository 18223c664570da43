//! The CubeCL fused step, scalars and WSM kernels against the f64 reference (llvmpipe in CI).
//!
//! Thresholds (issue 4): one f32 step agrees with the f64 reference step taken from the same f32
//! state to a relative RMS of 1e-6; after 100 steps the independent trajectories agree to 1e-5.
//! The learning rates are large (0.05 - 0.5) so that an error in the update is not hidden under the
//! rounding of the parameters themselves.

use half::{bf16, f16};
use linattn::backend::Backend;
use linattn::cube::CubeContext;
use linattn::optim::cube::{DeviceOptions, FusedOptimizer, ScalarPrecision, kernels};
use linattn::optim::{
    self, CopyFormat, DecayMode, Method, OptimizerConfig, Params, Rounding, Schedule, Shape,
};
use linattn::tensor::{DType, Tensor, TensorData};
use linattn_reference::optim::rounding;
use linattn_reference::optim::step::{adamw_update, decay_factor, lion_update};
use linattn_reference::testing::Rng;
use linattn_reference::{max_abs_diff, rel_rms};

fn context() -> Option<CubeContext> {
    match CubeContext::shared() {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            assert!(
                std::env::var_os("LINATTN_REQUIRE_WGPU").is_none(),
                "LINATTN_REQUIRE_WGPU is set but no wgpu adapter: {e}"
            );
            println!("skipped: no wgpu adapter ({e})");
            None
        }
    }
}

/// Odd sizes, an empty tensor, and one that spans two chunks of 4096.
const SIZES: [usize; 5] = [1, 7, 0, 4099, 33];

fn random_tensors(rng: &mut Rng, sizes: &[usize], scale: f64) -> Vec<Vec<f32>> {
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

fn slices(v: &[Vec<f32>]) -> Vec<&[f32]> {
    v.iter().map(Vec::as_slice).collect()
}

fn flat64(v: &[Vec<f32>]) -> Vec<f64> {
    v.iter().flatten().map(|&x| x as f64).collect()
}

fn assert_close(what: &str, actual: &[f64], expected: &[f64], threshold: f64) {
    let rel = rel_rms(actual, expected);
    assert!(
        rel <= threshold,
        "{what}: relative RMS {rel:.3e} > {threshold:e} (max abs {:.3e})",
        max_abs_diff(actual, expected)
    );
}

/// Steps the device optimizer and, at every step, the f64 reference from the device's own f32
/// state; compares parameters and moments after each step.
fn per_step_check(
    config: &OptimizerConfig,
    decay: &[bool],
    options: DeviceOptions,
    grad_scale: f64,
) {
    let Some(ctx) = context() else { return };
    let mut rng = Rng::new(11);
    let params = random_tensors(&mut rng, &SIZES, 1.0);
    let schedule = Schedule::Linear {
        warmup: 1,
        total: 6,
    };
    let mut opt =
        FusedOptimizer::with_options(&ctx, config, &schedule, 6, &slices(&params), decay, options)
            .unwrap();
    if options.max_bucket_bytes.is_some() {
        assert!(opt.bucket_count() > 1);
    }
    let mut p = params.clone();
    let mut m: Vec<Vec<f32>> = SIZES.iter().map(|&n| vec![0.0; n]).collect();
    let mut v = m.clone();
    for call in 0..5usize {
        let grads = random_tensors(&mut rng, &SIZES, grad_scale);
        opt.set_grads(&slices(&grads)).unwrap();
        opt.step().unwrap();
        let lr = config.lr * schedule.multiplier(call);
        let mut expect_p = Vec::new();
        let mut expect_m = Vec::new();
        let mut expect_v = Vec::new();
        for i in 0..SIZES.len() {
            let mut pi: Vec<f64> = p[i].iter().map(|&x| x as f64).collect();
            let mut mi: Vec<f64> = m[i].iter().map(|&x| x as f64).collect();
            let mut vi: Vec<f64> = v[i].iter().map(|&x| x as f64).collect();
            let gi: Vec<f64> = grads[i].iter().map(|&x| x as f64).collect();
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
        p = opt.read_params().unwrap();
        m = opt.read_exp_avg().unwrap();
        assert_close(&format!("param, step {call}"), &flat64(&p), &expect_p, 1e-6);
        assert_close(
            &format!("exp_avg, step {call}"),
            &flat64(&m),
            &expect_m,
            1e-6,
        );
        if let Some(sq) = opt.read_exp_avg_sq().unwrap() {
            v = sq;
            assert_close(
                &format!("exp_avg_sq, step {call}"),
                &flat64(&v),
                &expect_v,
                1e-6,
            );
        }
    }
    let status = opt.status().unwrap();
    assert_eq!((status.calls, status.steps, status.skipped), (5, 5, 0));
}

const F32_SCALARS: DeviceOptions = DeviceOptions {
    precision: ScalarPrecision::F32,
    max_bucket_bytes: None,
};

/// Buckets of 259 quads: the 4148-element arena of `SIZES` becomes 5 buffers, with the large
/// tensor straddling three of them.
const SMALL_BUCKETS: DeviceOptions = DeviceOptions {
    precision: ScalarPrecision::Auto,
    max_bucket_bytes: Some(259 * 16),
};

fn adamw(lr: f64) -> OptimizerConfig {
    OptimizerConfig {
        weight_decay: 0.1,
        ..OptimizerConfig::adamw(lr)
    }
}

#[test]
fn adamw_step_matches_reference_each_step() {
    per_step_check(&adamw(0.5), &[true; 5], DeviceOptions::default(), 0.5);
}

/// Gradients of the size of eps: `m / (sqrt(v) + eps)` and `m / sqrt(v + eps)` differ by orders
/// of magnitude here, so the placement of eps is checked.
#[test]
fn adamw_step_in_the_eps_regime() {
    per_step_check(&adamw(0.5), &[true; 5], DeviceOptions::default(), 1e-8);
}

#[test]
fn adamw_step_split_into_buckets() {
    per_step_check(
        &adamw(0.5),
        &[true, false, true, true, false],
        SMALL_BUCKETS,
        0.5,
    );
}

#[test]
fn adamw_f32_scalar_path_matches_reference_each_step() {
    per_step_check(&adamw(0.5), &[true; 5], F32_SCALARS, 0.5);
}

#[test]
fn adamw_cautious_fully_decoupled_with_decay_flags() {
    let config = OptimizerConfig {
        cautious: true,
        decay_mode: DecayMode::FullyDecoupled,
        weight_decay: 0.2,
        ..OptimizerConfig::adamw(0.3)
    };
    per_step_check(
        &config,
        &[true, false, true, true, false],
        DeviceOptions::default(),
        0.5,
    );
}

#[test]
fn lion_step_matches_reference_each_step() {
    let config = OptimizerConfig {
        weight_decay: 0.5,
        ..OptimizerConfig::lion(0.1)
    };
    per_step_check(
        &config,
        &[true, true, true, false, true],
        DeviceOptions::default(),
        0.5,
    );
    let cautious = OptimizerConfig {
        cautious: true,
        ..config
    };
    per_step_check(&cautious, &[true; 5], DeviceOptions::default(), 0.5);
}

/// `optimize` on the cube backend against the CPU backend over 100 steps with a schedule,
/// clipping and EMA: independent trajectories, f32 vs f64.
fn hundred_steps(config: &OptimizerConfig) {
    let Some(ctx) = context() else { return };
    let cube = Backend::Cube(ctx);
    let mut rng = Rng::new(5);
    let sizes = [3usize, 0, 129, 1000];
    let params: Vec<Tensor> = random_tensors(&mut rng, &sizes, 1.0)
        .into_iter()
        .zip(sizes)
        .map(|(v, n)| Tensor::from_f32(vec![n], v).unwrap())
        .collect();
    let grads: Vec<Vec<Tensor>> = (0..100)
        .map(|_| {
            random_tensors(&mut rng, &sizes, 0.3)
                .into_iter()
                .zip(sizes)
                .map(|(v, n)| Tensor::from_f32(vec![n], v).unwrap())
                .collect()
        })
        .collect();
    let grad_refs: Vec<Vec<&Tensor>> = grads.iter().map(|s| s.iter().collect()).collect();
    let param_refs: Vec<&Tensor> = params.iter().collect();
    let decay = [true, true, false, true];
    let group = Params {
        tensors: &param_refs,
        decay: Some(&decay),
    };
    let schedule = Schedule::Cosine {
        warmup: 10,
        total: 100,
        min_ratio: 0.1,
        num_cycles: 0.5,
    };
    let gpu = optim::optimize(&cube, config, &schedule, &group, &grad_refs).unwrap();
    let cpu = optim::optimize(&Backend::Cpu, config, &schedule, &group, &grad_refs).unwrap();
    let flat = |ts: &[Tensor]| -> Vec<f64> { ts.iter().flat_map(|t| t.to_f64_vec()).collect() };
    assert_eq!(gpu.steps, 100);
    assert_close("params", &flat(&gpu.params), &flat(&cpu.params), 1e-5);
    assert_close("exp_avg", &flat(&gpu.exp_avg), &flat(&cpu.exp_avg), 1e-5);
    if let (Some(g), Some(c)) = (&gpu.exp_avg_sq, &cpu.exp_avg_sq) {
        assert_close("exp_avg_sq", &flat(g), &flat(c), 1e-5);
    }
    assert_close(
        "ema",
        &flat(gpu.ema.as_ref().unwrap()),
        &flat(cpu.ema.as_ref().unwrap()),
        1e-5,
    );
    for (k, (g, c)) in gpu.history.iter().zip(&cpu.history).enumerate() {
        assert!(
            (g.lr - c.lr).abs() <= 1e-7 * c.lr.abs().max(1e-30),
            "lr at {k}"
        );
        let (gn, cn) = (g.grad_norm.unwrap(), c.grad_norm.unwrap());
        assert!(
            (gn - cn).abs() <= 1e-5 * cn,
            "grad norm at {k}: {gn} vs {cn}"
        );
        assert!(!g.skipped && !c.skipped);
    }
}

#[test]
fn adamw_hundred_steps_with_schedule_clip_and_ema() {
    hundred_steps(&OptimizerConfig {
        weight_decay: 0.1,
        max_grad_norm: Some(5.0),
        ema_beta: Some(0.9),
        ..OptimizerConfig::adamw(0.05)
    });
}

#[test]
fn lion_hundred_steps_with_schedule_clip_and_ema() {
    hundred_steps(&OptimizerConfig {
        weight_decay: 0.1,
        max_grad_norm: Some(5.0),
        ema_beta: Some(0.9),
        cautious: true,
        ..OptimizerConfig::lion(0.01)
    });
}

#[test]
fn non_finite_gradient_skips_the_whole_step() {
    non_finite_skip(DeviceOptions::default());
}

/// The non-finite value sits in the fourth of five buckets; the skip still covers all of them.
#[test]
fn non_finite_gradient_skips_every_bucket() {
    non_finite_skip(SMALL_BUCKETS);
}

fn non_finite_skip(options: DeviceOptions) {
    let Some(ctx) = context() else { return };
    let config = OptimizerConfig {
        weight_decay: 0.1,
        ema_beta: Some(0.5),
        model_copy: Some((CopyFormat::Bf16, Rounding::Stochastic { seed: 3 })),
        ..OptimizerConfig::adamw(0.1)
    };
    let mut rng = Rng::new(2);
    let params = random_tensors(&mut rng, &SIZES, 1.0);
    let schedule = Schedule::Constant { warmup: 0 };
    let mut opt = FusedOptimizer::with_options(
        &ctx,
        &config,
        &schedule,
        8,
        &slices(&params),
        &[true; 5],
        options,
    )
    .unwrap();
    let snapshot = |opt: &FusedOptimizer| {
        (
            opt.read_params().unwrap(),
            opt.read_exp_avg().unwrap(),
            opt.read_exp_avg_sq().unwrap(),
            opt.read_ema().unwrap(),
            opt.read_model_copy().unwrap(),
        )
    };
    let good = random_tensors(&mut rng, &SIZES, 0.5);
    opt.set_grads(&slices(&good)).unwrap();
    opt.step().unwrap();
    let after_first = snapshot(&opt);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut grads = random_tensors(&mut rng, &SIZES, 0.5);
        grads[3][4098] = bad; // the last element, in the second chunk of the big tensor
        opt.set_grads(&slices(&grads)).unwrap();
        opt.step().unwrap();
        assert_eq!(
            snapshot(&opt),
            after_first,
            "state changed on a {bad} gradient"
        );
        let status = opt.status().unwrap();
        assert!(status.last_skipped);
        assert_eq!(status.steps, 1);
    }
    opt.set_grads(&slices(&good)).unwrap();
    opt.step().unwrap();
    let status = opt.status().unwrap();
    assert_eq!(
        (
            status.calls,
            status.steps,
            status.skipped,
            status.last_skipped
        ),
        (5, 2, 3, false)
    );
    let history = opt.history().unwrap();
    let skipped: Vec<bool> = history.iter().map(|r| r.skipped).collect();
    assert_eq!(skipped, [false, true, true, true, false]);
    assert!(history[1].grad_norm.unwrap().is_nan());
    assert!(history[2].grad_norm.unwrap().is_infinite());
    assert_ne!(snapshot(&opt).0, after_first.0);
}

#[test]
fn skipped_steps_match_the_reference_run() {
    let Some(ctx) = context() else { return };
    let cube = Backend::Cube(ctx);
    let config = OptimizerConfig {
        weight_decay: 0.1,
        ..OptimizerConfig::adamw(0.2)
    };
    let mut rng = Rng::new(9);
    let p = Tensor::from_f32(vec![10], random_tensors(&mut rng, &[10], 1.0).remove(0)).unwrap();
    let grads: Vec<Tensor> = (0..4)
        .map(|s| {
            let mut g = random_tensors(&mut rng, &[10], 0.5).remove(0);
            if s == 1 {
                g[3] = f32::NAN;
            }
            Tensor::from_f32(vec![10], g).unwrap()
        })
        .collect();
    let grad_refs: Vec<Vec<&Tensor>> = grads.iter().map(|g| vec![g]).collect();
    let params = [&p];
    let schedule = Schedule::Linear {
        warmup: 0,
        total: 4,
    };
    let gpu =
        optim::optimize(&cube, &config, &schedule, &Params::new(&params), &grad_refs).unwrap();
    let cpu = optim::optimize(
        &Backend::Cpu,
        &config,
        &schedule,
        &Params::new(&params),
        &grad_refs,
    )
    .unwrap();
    assert_eq!((gpu.steps, cpu.steps), (3, 3));
    let skipped: Vec<bool> = gpu.history.iter().map(|r| r.skipped).collect();
    assert_eq!(skipped, [false, true, false, false]);
    // The schedule still advanced on the skipped call: call 2 ran at lr * 2/4.
    assert!((gpu.history[2].lr - 0.1).abs() < 1e-8);
    assert_close(
        "params",
        &gpu.params[0].to_f64_vec(),
        &cpu.params[0].to_f64_vec(),
        1e-6,
    );
}

#[test]
fn bias_corrections_on_device_match_f64() {
    // An empty group: each call only runs the scalar kernel, so many steps are cheap.
    let Some(ctx) = context() else { return };
    let config = OptimizerConfig {
        method: Method::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        ..OptimizerConfig::adamw(1.0)
    };
    let schedule = Schedule::Constant { warmup: 0 };
    for precision in [ScalarPrecision::Auto, ScalarPrecision::F32] {
        let mut opt = FusedOptimizer::with_options(
            &ctx,
            &config,
            &schedule,
            1,
            &[],
            &[],
            DeviceOptions {
                precision,
                max_bucket_bytes: None,
            },
        )
        .unwrap();
        let checkpoints = [1u64, 2, 3, 10, 100, 400];
        let mut t = 0;
        for &target in &checkpoints {
            while t < target {
                opt.step().unwrap();
                t += 1;
            }
            let s = opt.read_scalars().unwrap();
            let bc1 = 1.0 - 0.9f64.powf(t as f64);
            let bc2 = 1.0 - 0.999f64.powf(t as f64);
            let step_size = s[kernels::S_STEP_SIZE] as f64;
            let bc2_sqrt = s[kernels::S_BC2_SQRT] as f64;
            let tolerance = match precision {
                // f64 on the device, rounded once to f32.
                ScalarPrecision::Auto if opt.exact_scalars() => 6e-8,
                _ => 1e-6,
            };
            let rel = |a: f64, b: f64| (a - b).abs() / b;
            assert!(
                rel(step_size, 1.0 / bc1) <= tolerance,
                "{precision:?} t = {t}: step size {step_size} vs {}",
                1.0 / bc1
            );
            assert!(
                rel(bc2_sqrt, bc2.sqrt()) <= tolerance,
                "{precision:?} t = {t}: sqrt(bc2) {bc2_sqrt} vs {}",
                bc2.sqrt()
            );
        }
    }
}

/// The 16-bit copy equals the reference rounding of the device's own f32 weights, bit for bit.
#[test]
fn model_copies_match_the_rounding_recipes() {
    let Some(ctx) = context() else { return };
    let cases = [
        (
            CopyFormat::Bf16,
            Rounding::Nearest,
            DeviceOptions::default(),
        ),
        (
            CopyFormat::Bf16,
            Rounding::Stochastic { seed: 77 },
            DeviceOptions::default(),
        ),
        (CopyFormat::F16, Rounding::Nearest, DeviceOptions::default()),
        (
            CopyFormat::F16,
            Rounding::Stochastic { seed: 77 },
            DeviceOptions::default(),
        ),
        (
            CopyFormat::Bf16,
            Rounding::Stochastic { seed: 5 },
            SMALL_BUCKETS,
        ),
        (
            CopyFormat::F16,
            Rounding::Stochastic { seed: 5 },
            SMALL_BUCKETS,
        ),
    ];
    for (format, rounding_mode, options) in cases {
        {
            let config = OptimizerConfig {
                model_copy: Some((format, rounding_mode)),
                ..OptimizerConfig::lion(0.01)
            };
            let mut rng = Rng::new(4);
            let params = random_tensors(&mut rng, &SIZES, 1e-3);
            let schedule = Schedule::Constant { warmup: 0 };
            let mut opt = FusedOptimizer::with_options(
                &ctx,
                &config,
                &schedule,
                4,
                &slices(&params),
                &[true; 5],
                options,
            )
            .unwrap();
            for _ in 0..3 {
                let grads = random_tensors(&mut rng, &SIZES, 1.0);
                opt.set_grads(&slices(&grads)).unwrap();
                opt.step().unwrap();
            }
            let weights = opt.read_params().unwrap();
            let copy = opt.read_model_copy().unwrap().unwrap();
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
                    assert_eq!(
                        bits, expected,
                        "{format:?} {rounding_mode:?} tensor {i} element {j}: x = {x:e}"
                    );
                }
            }
        }
    }
}

/// Stochastic rounding is unbiased on average: many copies of one value round to a mean within
/// a few standard errors of the value, far closer than round-to-nearest.
#[test]
fn stochastic_rounding_is_unbiased_on_average() {
    let Some(ctx) = context() else { return };
    let n = 1 << 16;
    // A third of a spacing above 1.0 in each format: nearest rounds down by 1/3 spacing.
    for (format, spacing) in [
        (CopyFormat::Bf16, 2f64.powi(-7)),
        (CopyFormat::F16, 2f64.powi(-10)),
    ] {
        let x = (1.0 + spacing / 3.0) as f32;
        let config = OptimizerConfig {
            weight_decay: 0.0,
            model_copy: Some((format, Rounding::Stochastic { seed: 1 })),
            ..OptimizerConfig::adamw(0.0)
        };
        let params = vec![vec![x; n]];
        let schedule = Schedule::Constant { warmup: 0 };
        let mut opt =
            FusedOptimizer::new(&ctx, &config, &schedule, 4, &slices(&params), &[true]).unwrap();
        let mut means = Vec::new();
        for _ in 0..3 {
            // lr = 0 leaves the weights at x; each call re-draws the copy with a new key.
            opt.set_grads(&[&vec![1.0; n]]).unwrap();
            opt.step().unwrap();
            let copy = opt.read_model_copy().unwrap().unwrap();
            let values: Vec<f64> = copy[0]
                .iter()
                .map(|&b| match format {
                    CopyFormat::Bf16 => rounding::bf16_to_f64(b),
                    CopyFormat::F16 => rounding::f16_to_f64(b),
                })
                .collect();
            let mean = values.iter().sum::<f64>() / n as f64;
            // p = 1/3: standard error spacing * sqrt(2/9 / n) = 0.0018 spacing; allow 5 of them.
            assert!(
                (mean - x as f64).abs() < 0.01 * spacing,
                "{format:?}: mean {mean} vs x {x}"
            );
            means.push(mean);
        }
        assert!(
            means[0] != means[1] && means[1] != means[2],
            "fresh bits per call"
        );
    }
}

#[test]
fn wsm_merge_matches_reference() {
    let Some(ctx) = context() else { return };
    let cube = Backend::Cube(ctx);
    let mut rng = Rng::new(8);
    let sizes = [5usize, 0, 4100];
    let checkpoints: Vec<Vec<Tensor>> = (0..4)
        .map(|_| {
            random_tensors(&mut rng, &sizes, 1.0)
                .into_iter()
                .zip(sizes)
                .map(|(v, n)| Tensor::from_f32(vec![n], v).unwrap())
                .collect()
        })
        .collect();
    let refs: Vec<Vec<&Tensor>> = checkpoints.iter().map(|c| c.iter().collect()).collect();
    let c = optim::wsm_coefficients(Shape::Cosine, 3);
    let gpu = optim::merge(&cube, &refs, &c, DType::F32).unwrap();
    let cpu = optim::merge(&Backend::Cpu, &refs, &c, DType::F64).unwrap();
    for (g, r) in gpu.iter().zip(&cpu) {
        assert_eq!(g.shape(), r.shape());
        assert_close("merged", &g.to_f64_vec(), &r.to_f64_vec(), 1e-6);
    }
    // The one cast: bf16 / f16 of the f32 accumulator, round to nearest even.
    for (dtype, format) in [(DType::BF16, 0), (DType::F16, 1)] {
        let half = optim::merge(&cube, &refs, &c, dtype).unwrap();
        for (h, g) in half.iter().zip(&gpu) {
            assert_eq!(h.dtype(), dtype);
            let expected: Vec<f64> = g
                .to_f32_vec()
                .iter()
                .map(|&x| {
                    if format == 0 {
                        bf16::from_f32(x).to_f64()
                    } else {
                        f16::from_f32(x).to_f64()
                    }
                })
                .collect();
            assert_eq!(h.to_f64_vec(), expected);
        }
    }
}

/// The kernel's f32 -> f16 / bf16 nearest-even conversion against the `half` crate on special
/// values (subnormals, ties, overflow, infinities): merging one checkpoint with coefficient 1 is
/// the identity in f32, so the copy is the conversion itself.
#[test]
fn kernel_nearest_conversions_match_half() {
    let Some(ctx) = context() else { return };
    let cube = Backend::Cube(ctx);
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
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
    ];
    let mut rng = Rng::new(3);
    for _ in 0..3000 {
        // Random bit patterns over the finite range (NaN excluded: merging rejects it).
        let bits = (rng.next_u64() as u32) & 0xff7f_ffff;
        values.push(f32::from_bits(bits));
    }
    // Infinities are non-finite inputs for `merge`; check them through the bits directly below.
    let finite: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let t = Tensor::new(vec![finite.len()], TensorData::F32(finite.clone())).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let out = optim::merge(&cube, &[vec![&t]], &[1.0], dtype).unwrap();
        let bits: Vec<u16> = match out[0].data() {
            TensorData::BF16(d) => d.iter().map(|x| x.to_bits()).collect(),
            TensorData::F16(d) => d.iter().map(|x| x.to_bits()).collect(),
            other => panic!("{other:?}"),
        };
        for (&x, &b) in finite.iter().zip(&bits) {
            let expected = if dtype == DType::BF16 {
                bf16::from_f32(x).to_bits()
            } else {
                f16::from_f32(x).to_bits()
            };
            assert_eq!(b, expected, "{dtype} of {x:e} ({:#010x})", x.to_bits());
        }
    }
    // The reference recipes agree with `half` on the infinities too.
    for x in [f32::INFINITY, f32::NEG_INFINITY] {
        assert_eq!(rounding::bf16_nearest(x), bf16::from_f32(x).to_bits());
        assert_eq!(rounding::f16_nearest(x), f16::from_f32(x).to_bits());
    }
}
