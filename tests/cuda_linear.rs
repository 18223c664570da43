//! The CUDA engine on a GPU against the f64 reference: the groups of `linattn::suites::linear::gpu`
//! (the whole shape x gate x direction matrix in bf16, f16 and f32, chunk sizes 64 and 16 and the
//! recurrent form, forward and every gradient; the device-slice API with NaN-poisoned outputs; the
//! decoding step; LightNet on the engine; the device value check). `linattn validate --device
//! cuda --full` runs the same groups. Prints `skipped: no CUDA device` without a usable GPU
//! (driver, libnvrtc, compute capability >= 8.0).
#![cfg(feature = "cuda")]

use linattn::cuda::CudaContext;
use linattn::suites::linear::gpu;
use linattn::suites::{Run, verdict};

fn context() -> Option<CudaContext> {
    match CudaContext::shared() {
        Ok(c) => {
            println!("device: {} ({})", c.device_name(), c.arch());
            Some(c)
        }
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

fn assert_one(run: Run) {
    println!("{}", run.line());
    assert_all(vec![run]);
}

#[test]
fn matrix_host_api() {
    let Some(ctx) = context() else { return };
    assert_all(gpu::host_api_matrix(&ctx, true));
}

#[test]
fn device_api_poisoned_outputs() {
    let Some(ctx) = context() else { return };
    assert_all(gpu::device_api_poisoned_outputs(&ctx, true));
}

#[test]
fn decode_step_chain() {
    let Some(ctx) = context() else { return };
    assert_one(gpu::decode_step_chain(&ctx));
}

#[test]
fn device_api_rejects_a_final_state_request_without_one() {
    let Some(ctx) = context() else { return };
    assert_one(gpu::rejects_a_final_state_request_without_one(&ctx));
}

#[test]
fn lightnet_on_the_cuda_engine() {
    let Some(ctx) = context() else { return };
    let runs = gpu::lightnet_on_the_cuda_engine(&ctx);
    for r in &runs {
        println!("{}", r.line());
    }
    assert_all(runs);
}

#[test]
fn public_decode_step_matches_the_cpu() {
    let Some(ctx) = context() else { return };
    assert_one(gpu::public_decode_step_matches_the_cpu(&ctx));
}

#[test]
fn device_api_checks_values_by_default() {
    let Some(ctx) = context() else { return };
    assert_one(gpu::device_api_checks_values_by_default(&ctx));
}

#[test]
fn device_decode_step_keeps_the_state_on_the_gpu() {
    let Some(ctx) = context() else { return };
    assert_one(gpu::device_decode_step_keeps_the_state_on_the_gpu(&ctx));
}
