//! The CUDA attention kernels on a real GPU: the groups of `linattn::suites::attention::gpu` (the
//! emulated matrix plus T = S = 1000 everywhere and the Radial masks of 8 frames x 256 tokens,
//! through the host path on a `CudaExec`; the backend entry points and their typed errors; the
//! device-slice API with bf16 outputs, the dense FlashAttention entry points and an uploaded plan
//! reused across calls). `linattn validate --device cuda --full` runs the same groups. Prints
//! `skipped: no CUDA device` without a GPU.
#![cfg(feature = "cuda")]

use linattn::cuda::CudaContext;
use linattn::cuda::exec::CudaExec;
use linattn::suites::attention::gpu;
use linattn::suites::{Run, verdict};

fn context() -> Option<CudaContext> {
    match CudaContext::shared() {
        Ok(c) => Some(c),
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn assert_all(runs: Vec<Run>) {
    if let Err(e) = verdict(&runs) {
        panic!("{e}");
    }
}

#[test]
fn dense_and_full_plan() {
    let Some(ctx) = context() else { return };
    assert_all(gpu::dense_and_full_plan(&CudaExec::new(&ctx), true));
}

#[test]
fn random_masks() {
    let Some(ctx) = context() else { return };
    assert_all(gpu::random_masks(&CudaExec::new(&ctx), true));
}

#[test]
fn radial_masks() {
    let Some(ctx) = context() else { return };
    assert_all(gpu::radial_masks(&CudaExec::new(&ctx), true));
}

#[test]
fn strides_sharp_softmax_and_host_api() {
    let Some(ctx) = context() else { return };
    assert_all(gpu::strides_sharp_softmax_and_host_api(
        &CudaExec::new(&ctx),
        true,
    ));
}

#[test]
fn backend_entry_points_and_errors() {
    let Some(ctx) = context() else { return };
    let run = gpu::backend_entry_points_and_errors(&ctx);
    println!("{}", run.line());
    assert_all(vec![run]);
}

#[test]
fn device_slice_api() {
    let Some(ctx) = context() else { return };
    let run = gpu::device_slice_api(&ctx);
    println!("{}", run.line());
    assert_all(vec![run]);
}
