//! The CUDA fused optimizer (kernels/optim.cu) on a real GPU: the groups of
//! `linattn::suites::optim` (every method and decay mode step by step, the 100-step trajectories,
//! the non-finite skip, scalars, 16-bit copies, WSM merging), a group large enough for the
//! grid-stride loops of every kernel, and the public `optim::optimize` / `optim::merge` on
//! `Backend::Cuda`. `linattn validate --device cuda --full` runs the same groups. Prints
//! `skipped: no CUDA device ...` without a GPU (or without libcuda / libnvrtc).
#![cfg(feature = "cuda")]

use linattn::cuda::CudaContext;
use linattn::cuda::exec::CudaExec;
use linattn::suites::optim::{
    gpu, per_step_runs, scalar_and_copy_runs, skip_runs, trajectory_runs,
};
use linattn::suites::{Run, verdict};

fn exec() -> Option<(CudaContext, CudaExec)> {
    match CudaContext::shared() {
        Ok(ctx) => {
            let exec = CudaExec::new(&ctx);
            Some((ctx, exec))
        }
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn assert_all(runs: Vec<Run>) {
    for r in &runs {
        println!("{}", r.line());
    }
    if let Err(e) = verdict(&runs) {
        panic!("{e}");
    }
}

#[test]
fn every_method_and_decay_mode_matches_reference_each_step() {
    let Some((_, exec)) = exec() else { return };
    assert_all(per_step_runs(&exec));
}

#[test]
fn large_group_matches_reference_each_step() {
    let Some((_, exec)) = exec() else { return };
    assert_all(vec![gpu::large_group(&exec)]);
}

#[test]
fn multi_step_trajectories_match_reference() {
    let Some((_, exec)) = exec() else { return };
    assert_all(trajectory_runs(&exec));
}

#[test]
fn non_finite_gradient_skips_the_whole_step() {
    let Some((_, exec)) = exec() else { return };
    assert_all(skip_runs(&exec));
}

#[test]
fn scalars_and_copies() {
    let Some((_, exec)) = exec() else { return };
    assert_all(scalar_and_copy_runs(&exec));
}

#[test]
fn public_api_on_the_cuda_backend() {
    let Some((ctx, _)) = exec() else { return };
    assert_all(vec![gpu::public_api(&ctx)]);
}
