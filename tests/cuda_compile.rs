//! CI gate without a GPU: every kernel variant the library can launch (the linear-attention
//! kernels and the fused optimizer of kernels/optim.cu) compiles with NVRTC for
//! sm_80 and sm_90, and the PTX holds every kernel the engine launches. NVRTC runs its front end
//! here (PTX for compute_80 / compute_90, `compile_ptx_virtual`); scripts/ptxas-report.sh
//! assembles that PTX for sm_80 / sm_90 with `ptxas -v` (the back end, and the spill gate), so
//! the test suite does each half of the compile once. Needs libnvrtc (the
//! `nvidia-cuda-nvrtc-cu12` wheel: scripts/install-cuda-wheels.sh, lib folder on LD_LIBRARY_PATH);
//! prints `skipped: libnvrtc not found` only when the library cannot be loaded.
//!
//! With `LINATTN_PTX_DIR=<dir>` the PTX of every (arch, variant) is also written there, for
//! scripts/ptxas-report.sh (registers, spills, shared memory per kernel).
#![cfg(feature = "cuda")]

use std::sync::Mutex;

use linattn::cuda::compile::{Variant, compile_ptx, compile_ptx_virtual};
use linattn::linear::cuda::kernels::{
    CHUNK_KERNELS, RECURRENT_KERNELS, UTIL_KERNELS, all_variants,
};
use linattn::optim::cuda as optim_cuda;

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

fn kernels_of(variant: &Variant) -> Vec<&'static str> {
    match variant.file {
        "linear_chunk.cu" => CHUNK_KERNELS.iter().map(|(n, _)| *n).collect(),
        "linear_recurrent.cu" => RECURRENT_KERNELS.to_vec(),
        "linear_util.cu" => UTIL_KERNELS.to_vec(),
        "optim.cu" => optim_cuda::KERNELS.to_vec(),
        other => panic!("unknown kernel file {other}"),
    }
}

#[test]
fn every_variant_compiles_for_sm80_and_sm90() {
    if !linattn::cuda::nvrtc_available() {
        assert!(
            std::env::var_os("LINATTN_REQUIRE_NVRTC").is_none(),
            "LINATTN_REQUIRE_NVRTC is set but libnvrtc cannot be loaded"
        );
        println!(
            "skipped: libnvrtc not found (run scripts/install-cuda-wheels.sh and put its NVRTC_LIB_DIR on LD_LIBRARY_PATH)"
        );
        return;
    }
    let dump = std::env::var_os("LINATTN_PTX_DIR").map(std::path::PathBuf::from);
    if let Some(dir) = &dump {
        std::fs::create_dir_all(dir).unwrap();
    }
    let jobs: Vec<(&str, Variant)> = ARCHS
        .iter()
        .flat_map(|a| {
            all_variants()
                .into_iter()
                .chain(optim_cuda::all_variants())
                .map(move |v| (*a, v))
        })
        .collect();
    let total = jobs.len();
    let queue = Mutex::new(jobs);
    let failures = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let Some((arch, variant)) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    match compile_ptx_virtual(arch, &variant) {
                        Ok(ptx) => {
                            for kernel in kernels_of(&variant) {
                                if !ptx.contains(&format!(".entry {kernel}(")) {
                                    failures.lock().unwrap().push(format!(
                                        "{arch} {}: no entry {kernel}",
                                        variant.label()
                                    ));
                                }
                            }
                            if variant.file == "linear_chunk.cu" && !ptx.contains("la_smem_table") {
                                failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("{arch} {}: no la_smem_table", variant.label()));
                            }
                            if let Some(dir) = &dump {
                                let name: String = variant
                                    .label()
                                    .chars()
                                    .map(|c| {
                                        if c.is_ascii_alphanumeric() || c == '=' || c == '.' {
                                            c
                                        } else {
                                            '_'
                                        }
                                    })
                                    .collect();
                                std::fs::write(
                                    dir.join(format!("{arch}__{name}.ptx")),
                                    ptx.as_bytes(),
                                )
                                .unwrap();
                            }
                        }
                        Err(e) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{arch} {}: {e}", variant.label())),
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    println!(
        "compiled {total} (arch, variant) pairs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn compile_errors_carry_the_nvrtc_log() {
    if !linattn::cuda::nvrtc_available() {
        assert!(
            std::env::var_os("LINATTN_REQUIRE_NVRTC").is_none(),
            "LINATTN_REQUIRE_NVRTC is set but libnvrtc cannot be loaded"
        );
        println!("skipped: libnvrtc not found");
        return;
    }
    // A variant whose define breaks the source: the error names the kernel file and the arch and
    // carries NVRTC's log.
    let bad = Variant::new(
        "linear_util.cu",
        &[("LA_DTYPE", "0".into()), ("LaParams", "int".into())],
    );
    match compile_ptx("sm_80", &bad) {
        Err(linattn::Error::KernelCompile { kernel, arch, log }) => {
            assert!(kernel.contains("linear_util.cu"), "{kernel}");
            assert_eq!(arch, "sm_80");
            assert!(log.contains("error"), "{log}");
        }
        other => panic!("expected KernelCompile, got {other:?}"),
    }
    assert!(matches!(
        compile_ptx("sm_75", &all_variants()[0]),
        Err(linattn::Error::DeviceUnavailable { .. })
    ));
}
