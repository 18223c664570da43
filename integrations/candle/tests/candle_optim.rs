//! linattn's fused optimizer over candle variables matches linattn's reference step on the same
//! gradients for 20 steps, every method and decay mode, with clipping and EMA, on every device;
//! and bad variable lists are typed errors.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use linattn::optim::{self, OptimizerConfig, Params, Schedule};
use linattn_candle::FusedOptimizer;

/// AdamW and Lion in every decay mode, and AdamW with clipping and EMA (shared with the other
/// framework adapter's tests).
fn configs() -> Vec<(&'static str, OptimizerConfig)> {
    linattn::suites::adapter_optimizer_configs()
}

/// A two-layer tanh model `y = tanh(x W1 + b1) W2`, its loss against targets, trained with the
/// fused optimizer; every step's gradients are recorded and replayed through linattn's
/// reference (`optim::optimize` on the CPU backend).
#[test]
fn fused_optimizer_matches_the_reference() {
    let steps = 20;
    let schedule = Schedule::cosine(3, steps);
    for device in devices() {
        let mut worst: f64 = 0.0;
        for (name, config) in configs() {
            let mut rng = rng(8);
            let x = tensor(
                &values(&mut rng, 16 * 8, -1.0, 1.0),
                &[16, 8],
                DType::F32,
                &device,
            );
            let y = tensor(
                &values(&mut rng, 16 * 4, -1.0, 1.0),
                &[16, 4],
                DType::F32,
                &device,
            );
            let init = [
                (values(&mut rng, 8 * 12, -0.3, 0.3), vec![8, 12]),
                (values(&mut rng, 12, -0.3, 0.3), vec![12]),
                (values(&mut rng, 12 * 4, -0.3, 0.3), vec![12, 4]),
            ];
            let vars: Vec<Var> = init
                .iter()
                .map(|(d, s)| var(&rounded(d, DType::F32), s, DType::F32, &device))
                .collect();
            let initial: Vec<Vec<f64>> = vars.iter().map(|v| to_vec(v.as_tensor())).collect();
            let mut opt = FusedOptimizer::new(vars.clone(), &config, &schedule, steps).unwrap();
            let mut recorded = Vec::new();
            for _ in 0..steps {
                let h = x
                    .matmul(vars[0].as_tensor())
                    .unwrap()
                    .broadcast_add(vars[1].as_tensor())
                    .unwrap()
                    .tanh()
                    .unwrap();
                let out = h.matmul(vars[2].as_tensor()).unwrap();
                let loss = (out - &y).unwrap().sqr().unwrap().mean_all().unwrap();
                let grads = loss.backward().unwrap();
                recorded.push(
                    vars.iter()
                        .map(|v| to_vec(grads.get(v.as_tensor()).unwrap()))
                        .collect::<Vec<_>>(),
                );
                opt.step(&grads).unwrap();
            }
            let got: Vec<f64> = vars.iter().flat_map(|v| to_vec(v.as_tensor())).collect();
            let params: Vec<linattn::Tensor> =
                initial.iter().map(|v| host(v, vec![v.len()])).collect();
            let param_refs: Vec<&linattn::Tensor> = params.iter().collect();
            let grads: Vec<Vec<linattn::Tensor>> = recorded
                .iter()
                .map(|s| s.iter().map(|g| host(g, vec![g.len()])).collect())
                .collect();
            let grad_refs: Vec<Vec<&linattn::Tensor>> =
                grads.iter().map(|s| s.iter().collect()).collect();
            // Decay on the matrices, not on the bias (the optimizer's default).
            let decay = [true, false, true];
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
            let want: Vec<f64> = want.params.iter().flat_map(|t| t.to_f64_vec()).collect();
            let e = rel_rms(&got, &want);
            assert!(
                e <= F32_LIMIT,
                "{name} {:?} on {device:?}: {e:.2e}",
                config.method
            );
            worst = worst.max(e);
            assert_eq!(opt.history().unwrap().len(), steps);
        }
        println!(
            "{device:?}: {} configs x {steps} steps, worst relative RMS error {worst:.2e}",
            configs().len()
        );
    }
}

/// 16-bit variables keep their dtype; their values are the f32 masters' nearest 16-bit values.
#[test]
fn half_variables_keep_their_dtype() {
    for device in devices() {
        for dtype in [DType::BF16, DType::F16] {
            let w = var(&[0.5, -0.25, 0.125], &[3], dtype, &device);
            let mut opt = FusedOptimizer::with_decay(
                vec![w.clone()],
                &[false],
                &OptimizerConfig::adamw(0.1),
                &Schedule::Constant { warmup: 0 },
                4,
            )
            .unwrap();
            for _ in 0..3 {
                let loss = w
                    .as_tensor()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                opt.step(&loss.backward().unwrap()).unwrap();
            }
            assert_eq!(w.dtype(), dtype);
            // AdamW with a constant gradient moves each weight by about lr per step.
            let got = to_vec(w.as_tensor());
            for (g, w0) in got.iter().zip([0.5, -0.25, 0.125]) {
                assert!((w0 - g - 0.3).abs() < 0.02, "{dtype:?}: {w0} -> {g}");
            }
        }
    }
}

#[test]
fn bad_variable_lists_are_errors() {
    let a = Var::from_tensor(&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let c = OptimizerConfig::adamw(1e-3);
    let s = Schedule::Constant { warmup: 0 };
    assert!(matches!(
        FusedOptimizer::with_decay(vec![a.clone()], &[true, false], &c, &s, 1),
        Err(linattn::Error::InvalidArgument(_))
    ));
    let ints = Var::from_tensor(&Tensor::zeros(3, DType::U32, &Device::Cpu).unwrap()).unwrap();
    assert!(FusedOptimizer::new(vec![a, ints], &c, &s, 1).is_err());
}
