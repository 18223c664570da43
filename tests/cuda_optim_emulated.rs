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
