//! CI gate without a GPU for the attention kernels: every variant of kernels/attention.cu (bf16 /
//! f16 x head dim 64 / 128 x block_q 64 / 128 x block_k 64 / 128; causal is a run-time flag)
//! compiles with NVRTC for sm_80 and sm_90, its PTX holds every kernel the engine launches, and
//! the dynamic shared memory of each kernel (its `la_smem_table` entry) fits the architecture.
//! Needs libnvrtc (scripts/install-cuda-wheels.sh, NVRTC_LIB_DIR on LD_LIBRARY_PATH); prints
//! `skipped: libnvrtc not found` only when the library cannot be loaded.
//!
//! With `LINATTN_PTX_DIR=<dir>` the PTX of every (arch, variant) is also written there (same
//! naming as tests/cuda_compile.rs), for scripts/ptxas-report.sh.

use std::sync::Mutex;

use linattn::attention::cuda::kernels::{KERNELS, all_variants};
use linattn::cuda::compile::{Variant, compile_ptx_virtual};

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// Opt-in dynamic shared memory per block: sm_80 (A100) 163 KiB, sm_90 (H100) 227 KiB.
fn smem_limit(arch: &str) -> u32 {
    match arch {
        "sm_80" => 163 * 1024,
        _ => 227 * 1024,
    }
}

/// `la_smem_table` from the PTX: `.b32 la_smem_table[3] = {a, b, c}`, or the byte form
/// `.b8 la_smem_table[12] = {..}` (little endian, trailing zero bytes omitted).
fn smem_table(ptx: &str) -> Option<Vec<u32>> {
    let at = ptx.find("la_smem_table[")?;
    let line = ptx[..at].rsplit('\n').next()?;
    let rest = &ptx[at..];
    let n: usize = rest["la_smem_table[".len()..rest.find(']')?].parse().ok()?;
    let (open, close) = (rest.find('{')?, rest.find('}')?);
    let mut vals: Vec<u32> = rest[open + 1..close]
        .split(',')
        .map(|x| x.trim().parse().ok())
        .collect::<Option<_>>()?;
    if vals.len() > n {
        return None;
    }
    vals.resize(n, 0);
    if line.contains(".b8") {
        Some(
            vals.chunks_exact(4)
                .map(|b| b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24)
                .collect(),
        )
    } else {
        Some(vals)
    }
}

#[test]
fn every_attention_variant_compiles_for_sm80_and_sm90() {
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
        .flat_map(|a| all_variants().into_iter().map(move |v| (*a, v)))
        .collect();
    assert_eq!(jobs.len(), 2 * 16);
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
                    let fail = |msg: String| {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{arch} {}: {msg}", variant.label()))
                    };
                    let ptx = match compile_ptx_virtual(arch, &variant) {
                        Ok(ptx) => ptx,
                        Err(e) => {
                            fail(e.to_string());
                            continue;
                        }
                    };
                    for (kernel, _) in KERNELS {
                        if !ptx.contains(&format!(".entry {kernel}(")) {
                            fail(format!("no entry {kernel}"));
                        }
                    }
                    match smem_table(&ptx) {
                        Some(table) if table.len() == 3 => {
                            for (bytes, (kernel, _)) in table.iter().zip(KERNELS) {
                                if *bytes == 0 || *bytes > smem_limit(arch) {
                                    fail(format!("{kernel} needs {bytes} bytes of shared memory"));
                                }
                            }
                        }
                        other => fail(format!("bad la_smem_table {other:?}")),
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
                        std::fs::write(dir.join(format!("{arch}__{name}.ptx")), ptx.as_bytes())
                            .unwrap();
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
