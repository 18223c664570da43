//! Shared helpers of the candle tests: seeded inputs, comparison with linattn's f64 reference,
//! and the devices (the CPU always; CUDA with the `cuda` feature and a GPU).

#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The f32 limit of the issue: relative RMS error of every output and gradient.
pub const F32_LIMIT: f64 = 1e-5;
/// ops.md's limits for 16-bit inputs: outputs 4e-3, gradients 5e-3.
pub const HALF_LIMIT: f64 = 5e-3;

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn values(rng: &mut StdRng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// `data` rounded to `dtype` and back (what the candle side holds).
pub fn rounded(data: &[f64], dtype: DType) -> Vec<f64> {
    data.iter()
        .map(|&x| match dtype {
            DType::BF16 => half::bf16::from_f64(x).to_f64(),
            DType::F16 => half::f16::from_f64(x).to_f64(),
            _ => x as f32 as f64,
        })
        .collect()
}

/// A candle tensor of `dtype` holding `data` (rounded to it).
pub fn tensor(data: &[f64], shape: &[usize], dtype: DType, device: &Device) -> Tensor {
    let f32s: Vec<f32> = data.iter().map(|&x| x as f32).collect();
    Tensor::from_vec(f32s, shape, device)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

pub fn var(data: &[f64], shape: &[usize], dtype: DType, device: &Device) -> Var {
    Var::from_tensor(&tensor(data, shape, dtype, device)).unwrap()
}

pub fn to_vec(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

pub fn host(data: &[f64], shape: Vec<usize>) -> linattn::Tensor {
    linattn::Tensor::from_f64(shape, data.to_vec()).unwrap()
}

/// Relative RMS error of `got` against `want` (0 when both are 0).
pub fn rel_rms(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    if num == 0.0 {
        0.0
    } else {
        (num / den.max(1e-300)).sqrt()
    }
}

/// Outputs and gradients as f64 vectors, by name.
pub type Results = Vec<(&'static str, Vec<f64>)>;

/// Compares every output and gradient (same names, same order); returns the worst error, panics
/// above `limit`.
pub fn compare(what: &str, got: &Results, want: &Results, limit: f64) -> f64 {
    let names = |r: &Results| r.iter().map(|(n, _)| *n).collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: outputs differ");
    let mut worst: f64 = 0.0;
    for ((name, g), (_, w)) in got.iter().zip(want) {
        let e = rel_rms(g, w);
        assert!(
            e <= limit,
            "{what}: `{name}` relative RMS error {e:.3e} > {limit:.0e}"
        );
        worst = worst.max(e);
    }
    worst
}

/// The devices the tests run on: the CPU, and the first CUDA device when the crate is built
/// with `cuda` and one is usable (else a `skipped:` line).
pub fn devices() -> Vec<Device> {
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut out = vec![Device::Cpu];
    #[cfg(feature = "cuda")]
    match linattn::cuda::CudaContext::shared() {
        Ok(_) => match Device::new_cuda(0) {
            Ok(d) => out.push(d),
            Err(e) => println!("skipped: CUDA through candle ({e})"),
        },
        Err(e) => println!("skipped: no CUDA device ({e})"),
    }
    #[cfg(not(feature = "cuda"))]
    println!("skipped: CUDA (linattn-candle built without the `cuda` feature)");
    out
}
