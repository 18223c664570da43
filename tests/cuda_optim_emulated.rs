//! The CUDA fused optimizer (kernels/optim.cu) on the host emulation (kernels/emu, no GPU) against
//! the f64 reference: AdamW and Lion in every weight-decay mode, odd sizes and an empty tensor,
//! clipping, EMA, the atomic skip on non-finite gradients, 16-bit copies, WSM merging. Needs
//! x86-64 and a C++20 compiler (g++); prints `skipped: ...` without them.
#![cfg(feature = "cuda")]

#[path = "common/optim_cuda_cases.rs"]
mod optim_cuda_cases;

use std::sync::Mutex;

use linattn::cuda::emu::EmuExec;
use linattn::optim::{Method, OptimizerConfig};
use optim_cuda_cases::*;

fn exec() -> Option<EmuExec> {
    // EmuExec builds a variant's library on first use with no lock inside a process: test threads
    // starting together on a cold cache would run the C++ compiler into the same temporary file.
    // Build it once, under a lock, before any test launches (later calls hit the in-memory cache).
    static BUILD: Mutex<()> = Mutex::new(());
    match EmuExec::new() {
        Ok(e) => {
            let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
            e.prepare(&linattn::optim::cuda::variant()).unwrap();
            Some(e)
        }
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

#[test]
fn every_method_and_decay_mode_matches_reference_each_step() {
    let Some(exec) = exec() else { return };
    for (label, config, decay, grad_scale) in per_step_configs() {
        let worst = per_step_check(&exec, &config, &decay, grad_scale);
        println!("{label}: worst relative RMS over 5 steps {worst:.2e}");
    }
}

#[test]
fn multi_step_trajectories_match_reference() {
    let Some(exec) = exec() else { return };
    let adamw = OptimizerConfig {
        weight_decay: 0.1,
        max_grad_norm: Some(5.0),
        ema_beta: Some(0.9),
        model_copy: Some((
            linattn::optim::CopyFormat::Bf16,
            linattn::optim::Rounding::Nearest,
        )),
        ..OptimizerConfig::adamw(0.05)
    };
    let worst = multi_step(&exec, &adamw, 100);
    println!("adamw, 100 steps, schedule + clip + ema + bf16 copy: worst relative RMS {worst:.2e}");
    let lion = OptimizerConfig {
        weight_decay: 0.1,
        max_grad_norm: Some(5.0),
        ema_beta: Some(0.9),
        cautious: true,
        ..OptimizerConfig::lion(0.01)
    };
    let worst = multi_step(&exec, &lion, 100);
    println!("lion cautious, 100 steps, schedule + clip + ema: worst relative RMS {worst:.2e}");
}

#[test]
fn non_finite_gradient_skips_the_whole_step() {
    let Some(exec) = exec() else { return };
    non_finite_skip(&exec, Method::adamw());
    non_finite_skip(&exec, Method::lion());
    let worst = skipped_steps_match_reference(&exec);
    println!("run with a skipped call vs reference: relative RMS {worst:.2e}");
    unchecked_nan_propagates(&exec);
}

#[test]
fn scalars_match_f64() {
    let Some(exec) = exec() else { return };
    let worst = bias_corrections_match_f64(&exec);
    println!("bias corrections, t up to 400: worst relative error {worst:.2e}");
}

#[test]
fn model_copies_are_bit_exact() {
    let Some(exec) = exec() else { return };
    model_copies_match_rounding(&exec);
}

#[test]
fn wsm_merge_is_correct() {
    let Some(exec) = exec() else { return };
    let worst = wsm_merge_matches_reference(&exec);
    println!("WSM merge of 4 checkpoints: relative RMS {worst:.2e}");
    nearest_conversions_match_half(&exec);
}

/// The kernel file compiles with NVRTC for sm_80 and sm_90 and holds every kernel the launcher
/// uses (tests/cuda_compile.rs checks it with every other variant; this is the fast check). With
/// `LINATTN_PTX_DIR` set the PTX is written there too (for a `ptxas -v` look at this file alone).
#[test]
fn optim_kernels_compile_with_nvrtc() {
    if !linattn::cuda::nvrtc_available() {
        println!("skipped: libnvrtc not found");
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        let ptx = linattn::cuda::compile::compile_ptx(arch, &linattn::optim::cuda::variant())
            .unwrap_or_else(|e| panic!("{arch}: {e}"));
        for kernel in linattn::optim::cuda::KERNELS {
            assert!(
                ptx.contains(&format!(".entry {kernel}(")),
                "{arch}: no {kernel}"
            );
        }
        if let Some(dir) = std::env::var_os("LINATTN_PTX_DIR") {
            let dir = std::path::PathBuf::from(dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("{arch}__optim.cu.ptx")), ptx.as_bytes()).unwrap();
        }
    }
}
