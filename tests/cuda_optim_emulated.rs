//! The CUDA fused optimizer (kernels/optim.cu) on the host emulation (kernels/emu, no GPU) against
//! the f64 reference: AdamW and Lion in every weight-decay mode, odd sizes and an empty tensor,
//! clipping, EMA, the atomic skip on non-finite gradients, 16-bit copies, WSM merging. Needs
//! x86-64 and a C++20 compiler (g++); prints `skipped: ...` without them.
#![cfg(feature = "cuda")]

use std::sync::Mutex;

use linattn::cuda::emu::EmuExec;
use linattn::suites::optim::{per_step_runs, scalar_and_copy_runs, skip_runs, trajectory_runs};
use linattn::suites::{Run, verdict};

fn assert_all(runs: Vec<Run>) {
    for r in &runs {
        println!("{}", r.line());
    }
    if let Err(e) = verdict(&runs) {
        panic!("{e}");
    }
}

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
    assert_all(per_step_runs(&exec));
}

#[test]
fn multi_step_trajectories_match_reference() {
    let Some(exec) = exec() else { return };
    assert_all(trajectory_runs(&exec));
}

#[test]
fn non_finite_gradient_skips_the_whole_step() {
    let Some(exec) = exec() else { return };
    assert_all(skip_runs(&exec));
}

/// Bias corrections, bit-exact 16-bit copies, WSM merging and the 16-bit conversions.
#[test]
fn scalars_copies_and_merges() {
    let Some(exec) = exec() else { return };
    assert_all(scalar_and_copy_runs(&exec));
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

/// The CUDA optimizer's state by tensor: read after 7 calls (one of them skipped), written into a
/// fresh optimizer over other weights, the run continues exactly as the uninterrupted one; with
/// an EMA and a stochastic bf16 copy, whose bits must survive the round trip.
#[test]
fn state_written_into_a_fresh_optimizer_continues_exactly() {
    use linattn::optim::cuda::CudaOptimizer;
    use linattn::optim::{CopyFormat, OptimizerConfig, Rounding, Schedule};
    let Some(exec) = exec() else { return };
    let sizes = [5usize, 0, 37, 130];
    let mut rng = linattn_reference::testing::Rng::new(21);
    let mut draw = |scale: f64| -> Vec<Vec<f32>> {
        sizes
            .iter()
            .map(|&n| rng.randn(n).iter().map(|x| (x * scale) as f32).collect())
            .collect()
    };
    let params = draw(1.0);
    let other = draw(1.0);
    let mut grads: Vec<Vec<Vec<f32>>> = (0..12).map(|_| draw(0.5)).collect();
    grads[4][2][3] = f32::INFINITY;
    let config = OptimizerConfig {
        ema_beta: Some(0.9),
        max_grad_norm: Some(2.0),
        model_copy: Some((CopyFormat::Bf16, Rounding::Stochastic { seed: 3 })),
        ..OptimizerConfig::adamw(1e-2)
    };
    let schedule = Schedule::Constant { warmup: 2 };
    let make = |p: &[Vec<f32>]| {
        CudaOptimizer::new(exec, &config, &schedule, 12, &slices(p), &[true; 4]).unwrap()
    };
    let mut whole = make(&params);
    let mut first = make(&params);
    for (k, g) in grads.iter().enumerate() {
        whole.set_grads(&slices(g)).unwrap();
        whole.step().unwrap();
        if k < 7 {
            first.set_grads(&slices(g)).unwrap();
            first.step().unwrap();
        }
    }
    let state = first.state().unwrap();
    assert_eq!((state.calls, state.steps, state.skipped), (7, 6, 1));
    let mut resumed = make(&other);
    resumed.set_state(&state).unwrap();
    let read_back = resumed.state().unwrap();
    assert_eq!(read_back.params, state.params);
    assert_eq!(read_back.model_copy, state.model_copy);
    assert_eq!(read_back.ema, state.ema);
    assert_eq!(read_back.exp_avg_sq, state.exp_avg_sq);
    for g in &grads[7..] {
        resumed.set_grads(&slices(g)).unwrap();
        resumed.step().unwrap();
    }
    let (a, b) = (resumed.state().unwrap(), whole.state().unwrap());
    assert_eq!(a.params, b.params);
    assert_eq!(a.exp_avg, b.exp_avg);
    assert_eq!(a.exp_avg_sq, b.exp_avg_sq);
    assert_eq!(a.ema, b.ema);
    assert_eq!(a.model_copy, b.model_copy);
    assert_eq!(
        (a.calls, a.steps, a.skipped, a.last_skipped),
        (b.calls, b.steps, b.skipped, b.last_skipped)
    );
    let bits = |h: &[linattn::optim::StepRecord]| -> Vec<(u64, Option<u64>, bool)> {
        h.iter()
            .map(|r| (r.lr.to_bits(), r.grad_norm.map(f64::to_bits), r.skipped))
            .collect()
    };
    assert_eq!(bits(&a.history), bits(&b.history));
}

fn slices(v: &[Vec<f32>]) -> Vec<&[f32]> {
    v.iter().map(Vec::as_slice).collect()
}
