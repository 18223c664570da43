//! The CUDA fused optimizer (kernels/optim.cu) on a real GPU: the cases of
//! tests/cuda_optim_emulated.rs, plus the public `optim::optimize` / `optim::merge` on
//! `Backend::Cuda` and a group large enough for the grid-stride loops of every kernel. Prints
//! `skipped: no CUDA device ...` without a GPU (or without libcuda / libnvrtc).
#![cfg(feature = "cuda")]

#[path = "common/optim_cuda_cases.rs"]
mod optim_cuda_cases;

use linattn::backend::Backend;
use linattn::cuda::CudaContext;
use linattn::cuda::exec::CudaExec;
use linattn::optim::{
    self, CopyFormat, Method, OptimizerConfig, Params, Rounding, Schedule, Shape,
};
use linattn::tensor::{DType, Tensor};
use linattn_reference::rel_rms;
use linattn_reference::testing::Rng;
use optim_cuda_cases::*;

fn context() -> Option<CudaContext> {
    match CudaContext::shared() {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

#[test]
fn every_method_and_decay_mode_matches_reference_each_step() {
    let Some(ctx) = context() else { return };
    let exec = CudaExec::new(&ctx);
    for (label, config, decay, grad_scale) in per_step_configs() {
        let worst = per_step_check(&exec, &config, &decay, grad_scale);
        println!("{label}: worst relative RMS over 5 steps {worst:.2e}");
    }
}

/// 20M elements: more quads than the statistics pass covers in one sweep of its 1024 blocks
/// (4M quads), so every grid-stride loop runs several rounds.
#[test]
fn large_group_matches_reference_each_step() {
    let Some(ctx) = context() else { return };
    let exec = CudaExec::new(&ctx);
    let config = OptimizerConfig {
        max_grad_norm: Some(100.0),
        ema_beta: Some(0.9),
        model_copy: Some((CopyFormat::Bf16, Rounding::Stochastic { seed: 1 })),
        ..adamw(0.5)
    };
    let worst = per_step_check_sizes(
        &exec,
        &config,
        &[true, false, true],
        0.5,
        &[20_000_003, 5, 1],
        2,
    );
    println!("adamw, 20M elements, 2 steps: worst relative RMS {worst:.2e}");
}

#[test]
fn multi_step_trajectories_match_reference() {
    let Some(ctx) = context() else { return };
    let exec = CudaExec::new(&ctx);
    let adamw = OptimizerConfig {
        weight_decay: 0.1,
        max_grad_norm: Some(5.0),
        ema_beta: Some(0.9),
        model_copy: Some((CopyFormat::Bf16, Rounding::Nearest)),
        ..OptimizerConfig::adamw(0.05)
    };
    println!("adamw: {:.2e}", multi_step(&exec, &adamw, 100));
    let lion = OptimizerConfig {
        weight_decay: 0.1,
        max_grad_norm: Some(5.0),
        ema_beta: Some(0.9),
        cautious: true,
        ..OptimizerConfig::lion(0.01)
    };
    println!("lion: {:.2e}", multi_step(&exec, &lion, 100));
}

#[test]
fn non_finite_gradient_skips_the_whole_step() {
    let Some(ctx) = context() else { return };
    let exec = CudaExec::new(&ctx);
    non_finite_skip(&exec, Method::adamw());
    non_finite_skip(&exec, Method::lion());
    skipped_steps_match_reference(&exec);
    unchecked_nan_propagates(&exec);
}

#[test]
fn scalars_and_copies() {
    let Some(ctx) = context() else { return };
    let exec = CudaExec::new(&ctx);
    println!(
        "bias corrections: {:.2e}",
        bias_corrections_match_f64(&exec)
    );
    model_copies_match_rounding(&exec);
    println!("merge: {:.2e}", wsm_merge_matches_reference(&exec));
    nearest_conversions_match_half(&exec);
}

/// The public API dispatches `Backend::Cuda` to these kernels.
#[test]
fn public_api_on_the_cuda_backend() {
    let Some(ctx) = context() else { return };
    let cuda = Backend::Cuda(ctx);
    let mut rng = Rng::new(1);
    let sizes = [0usize, 1000, 3];
    let tensors = |rng: &mut Rng, scale: f64| -> Vec<Tensor> {
        random_tensors(rng, &sizes, scale)
            .into_iter()
            .zip(sizes)
            .map(|(v, n)| Tensor::from_f32(vec![n], v).unwrap())
            .collect()
    };
    let params = tensors(&mut rng, 1.0);
    let grads: Vec<Vec<Tensor>> = (0..10).map(|_| tensors(&mut rng, 0.3)).collect();
    let grad_refs: Vec<Vec<&Tensor>> = grads.iter().map(|s| s.iter().collect()).collect();
    let param_refs: Vec<&Tensor> = params.iter().collect();
    let group = Params::new(&param_refs);
    let schedule = Schedule::Constant { warmup: 2 };
    let config = adamw(0.05);
    let gpu = optim::optimize(&cuda, &config, &schedule, &group, &grad_refs).unwrap();
    let cpu = optim::optimize(&Backend::Cpu, &config, &schedule, &group, &grad_refs).unwrap();
    let flat = |ts: &[Tensor]| -> Vec<f64> { ts.iter().flat_map(|t| t.to_f64_vec()).collect() };
    let rel = rel_rms(&flat(&gpu.params), &flat(&cpu.params));
    assert!(rel <= 1e-5, "params: {rel:.3e}");
    assert_eq!(gpu.steps, 10);
    let c = optim::wsm_coefficients(Shape::Linear, 1);
    let merged = optim::merge(
        &cuda,
        &[param_refs.clone(), param_refs.clone()],
        &c,
        DType::F32,
    )
    .unwrap();
    assert_eq!(flat(&merged), flat(&params));
}
