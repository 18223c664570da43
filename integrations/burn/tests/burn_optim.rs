//! linattn's fused optimizer over a burn module matches linattn's f64 reference step on the same
//! gradients for 20 steps, every decay mode, both methods, on wgpu (the device optimizer) and
//! NdArray (the host reference behind the same API).

mod common;

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Gradients, Tensor, activation::tanh};
use common::*;
use linattn::optim::{self, OptimizerConfig, Params, Schedule};
use linattn_burn::FusedOptimizer;
use rand::SeedableRng;
use rand::rngs::StdRng;

#[derive(Module, Debug)]
struct Mlp {
    a: Linear,
    b: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Mlp {
        let mut rng = StdRng::seed_from_u64(21);
        let mut lin = |i: usize, o: usize| {
            let bound = (i as f64).powf(-0.5);
            let mut l: Linear = LinearConfig::new(i, o).init(device);
            l.weight = Param::from_tensor(tensor(
                &rounded(&values(&mut rng, i * o, -bound, bound)),
                [i, o],
                device,
            ));
            l.bias = Some(Param::from_tensor(tensor(
                &rounded(&values(&mut rng, o, -bound, bound)),
                [o],
                device,
            )));
            l
        };
        Mlp {
            a: lin(8, 16),
            b: lin(16, 4),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.b.forward(tanh(self.a.forward(x)))
    }
}

/// Every parameter's values (or gradient) as host vectors, in visit order.
fn read(model: &Mlp, grads: Option<&Gradients>) -> Vec<Vec<f64>> {
    param_values(model, grads)
}

/// AdamW and Lion in every decay mode, and AdamW with clipping and EMA (shared with the other
/// framework adapter's tests).
fn configs() -> Vec<(&'static str, OptimizerConfig)> {
    linattn::suites::adapter_optimizer_configs()
}

fn train_and_compare(device: &Device, what: &str) {
    let steps = 20;
    let schedule = Schedule::cosine(3, steps);
    let mut rng = StdRng::seed_from_u64(8);
    let x = rounded(&values(&mut rng, 32 * 8, -1.0, 1.0));
    let y = rounded(&values(&mut rng, 32 * 4, -1.0, 1.0));
    let mut worst: f64 = 0.0;
    for (name, config) in configs() {
        let dev = device.clone().autodiff();
        let mut model = Mlp::new(&dev);
        let initial = read(&model, None);
        let mut opt = FusedOptimizer::new(&model, &config, &schedule, steps).unwrap();
        let mut recorded = Vec::new();
        for _ in 0..steps {
            let out = model.forward(tensor(&x, [32, 8], &dev));
            let loss = (out - tensor(&y, [32, 4], &dev)).powf_scalar(2.0).mean();
            let grads = loss.backward();
            recorded.push(read(&model, Some(&grads)));
            model = opt.step(model, &grads).unwrap();
        }
        let got = read(&model, None);
        // The reference on the same gradients.
        let host = |v: &Vec<f64>| linattn::Tensor::from_f64(vec![v.len()], v.clone()).unwrap();
        let params: Vec<linattn::Tensor> = initial.iter().map(host).collect();
        let param_refs: Vec<&linattn::Tensor> = params.iter().collect();
        let decay: Vec<bool> = vec![true, false, true, false];
        let grads: Vec<Vec<linattn::Tensor>> = recorded
            .iter()
            .map(|s| s.iter().map(host).collect())
            .collect();
        let grad_refs: Vec<Vec<&linattn::Tensor>> =
            grads.iter().map(|s| s.iter().collect()).collect();
        let want = optim::optimize(
            &linattn::Backend::Cpu,
            &config,
            &schedule,
            &Params {
                tensors: &param_refs,
                decay: Some(&decay),
            },
            &grad_refs,
        )
        .unwrap();
        let flat = |v: Vec<Vec<f64>>| v.concat();
        let want_flat = flat(want.params.iter().map(|t| t.to_f64_vec()).collect());
        let e = rel_rms(&flat(got), &want_flat);
        let limit = 1e-5;
        assert!(
            e <= limit,
            "{what} {name} {:?}: params after {steps} steps {e:.2e}",
            config.method
        );
        worst = worst.max(e);
        let history = opt.history().unwrap();
        assert_eq!(history.len(), steps);
        for (h, w) in history.iter().zip(&want.history) {
            assert!(
                (h.lr - w.lr).abs() <= 1e-7 * w.lr.abs().max(1e-12),
                "lr {} vs {}",
                h.lr,
                w.lr
            );
        }
    }
    println!(
        "{what}: {} optimizer configs x {steps} steps, worst relative RMS error {worst:.2e}",
        configs().len()
    );
}

#[test]
fn fused_optimizer_matches_the_reference_on_wgpu() {
    let Some(device) = wgpu() else { return };
    train_and_compare(&device, "wgpu");
}

#[test]
fn fused_optimizer_matches_the_reference_on_ndarray() {
    train_and_compare(&ndarray(), "ndarray");
}

/// WSM: merging kept checkpoints with burn ops equals linattn's merge on the host.
fn wsm_merge_matches(device: &Device) {
    let dev = device.clone().autodiff();
    let mut model = Mlp::new(&dev);
    let schedule = Schedule::Constant { warmup: 0 };
    let mut opt = FusedOptimizer::new(&model, &OptimizerConfig::adamw(1e-2), &schedule, 8).unwrap();
    let mut rng = StdRng::seed_from_u64(4);
    let x = tensor(&values(&mut rng, 16 * 8, -1.0, 1.0), [16, 8], &dev);
    let mut kept = Vec::new();
    for _ in 0..4 {
        let grads = model.forward(x.clone()).powf_scalar(2.0).mean().backward();
        model = opt.step(model, &grads).unwrap();
        kept.push(model.clone());
    }
    let shape = optim::Shape::Cosine;
    let merged = linattn_burn::merge_checkpoints(&kept, shape).unwrap();
    let host: Vec<Vec<linattn::Tensor>> = kept
        .iter()
        .map(|m| {
            read(m, None)
                .into_iter()
                .map(|v| linattn::Tensor::from_f64(vec![v.len()], v).unwrap())
                .collect()
        })
        .collect();
    let refs: Vec<Vec<&linattn::Tensor>> = host.iter().map(|c| c.iter().collect()).collect();
    let coefficients = optim::wsm_coefficients(shape, kept.len() - 1);
    let want = optim::merge(
        &linattn::Backend::Cpu,
        &refs,
        &coefficients,
        linattn::DType::F64,
    )
    .unwrap();
    let want: Vec<f64> = want.iter().flat_map(|t| t.to_f64_vec()).collect();
    let got: Vec<f64> = read(&merged, None).concat();
    let e = rel_rms(&got, &want);
    assert!(e <= 1e-6, "WSM merge {e:.2e}");
}

#[test]
fn wsm_merge_matches_on_wgpu() {
    let Some(device) = wgpu() else { return };
    wsm_merge_matches(&device);
}

#[test]
fn wsm_merge_matches_on_ndarray() {
    wsm_merge_matches(&ndarray());
}

/// A module of one 16-bit weight matrix (rank 2: weight decay applies): the loss `sum(w * c)`
/// gives the gradient `c` exactly.
#[derive(Module, Debug)]
struct Half {
    w: Param<Tensor<2>>,
}

/// 16-bit module parameters: the optimizer keeps f32 masters (created from the parameter's
/// values widened) and writes each step's weights back in the parameter's dtype, rounded to
/// nearest from the f32 master. Checked step by step against linattn's reference step on the
/// same (16-bit) gradients: every weight is the 16-bit neighbour of the reference's, within one
/// 16-bit spacing of it (a near-tie of f32 vs f64 may round either way), and the dtype stays.
fn half_params_follow_the_f32_masters(device: &Device, dtype: burn::tensor::DType) {
    use half::f16;
    let dev = device.clone().autodiff();
    if !dev.supports_dtype(dtype) {
        println!("skipped: {dtype:?} parameters on {dev:?} (the device does not hold {dtype:?})");
        return;
    }
    let (rows, cols) = (6, 7);
    let n = rows * cols;
    let mut rng = StdRng::seed_from_u64(16);
    let to_dtype = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .map(|&x| match dtype {
                burn::tensor::DType::F16 => f16::from_f64(x).to_f64(),
                _ => half::bf16::from_f64(x).to_f64(),
            })
            .collect()
    };
    let w0 = to_dtype(&values(&mut rng, n, -1.0, 1.0));
    let c = to_dtype(&values(&mut rng, n, -0.5, 0.5));
    let mut model = Half {
        w: Param::from_tensor(tensor(&w0, [rows, cols], &dev).cast(dtype).require_grad()),
    };
    let config = OptimizerConfig {
        weight_decay: 0.1,
        ..OptimizerConfig::adamw(5e-2)
    };
    let schedule = Schedule::Constant { warmup: 0 };
    let steps = 6;
    let mut opt = FusedOptimizer::new(&model, &config, &schedule, steps).unwrap();
    let mut reference =
        linattn::optim::CpuOptimizer::new(&config, &schedule, &[&w0], &[true]).unwrap();
    for step in 0..steps {
        let w = model.w.val();
        assert_eq!(w.dtype(), dtype, "step {step}: the parameter's dtype");
        let loss = (w * tensor(&c, [rows, cols], &dev).cast(dtype)).sum();
        let grads = loss.backward();
        model = opt.step(model, &grads).unwrap();
        reference.step(&[&c]).unwrap();
        let got = to_vec(&model.w.val());
        let want = reference.params()[0].to_vec();
        assert_eq!(model.w.val().dtype(), dtype);
        for (i, (&g, &m)) in got.iter().zip(&want).enumerate() {
            // The 16-bit spacing at the reference value.
            let ulp = match dtype {
                burn::tensor::DType::F16 => {
                    let h = f16::from_f64(m);
                    (f16::from_bits(h.to_bits() + 1).to_f64() - h.to_f64()).abs()
                }
                _ => {
                    let h = half::bf16::from_f64(m);
                    (half::bf16::from_bits(h.to_bits() + 1).to_f64() - h.to_f64()).abs()
                }
            };
            assert_eq!(
                to_dtype(&[g])[0],
                g,
                "step {step} [{i}]: not a 16-bit value"
            );
            assert!(
                (g - m).abs() <= ulp,
                "step {step} [{i}]: {g} vs the reference master {m} (spacing {ulp})"
            );
        }
    }
}

#[test]
fn f16_parameters_on_wgpu() {
    let Some(device) = wgpu() else { return };
    half_params_follow_the_f32_masters(&device, burn::tensor::DType::F16);
}

#[test]
fn half_parameters_on_ndarray() {
    half_params_follow_the_f32_masters(&ndarray(), burn::tensor::DType::F16);
    half_params_follow_the_f32_masters(&ndarray(), burn::tensor::DType::BF16);
}
