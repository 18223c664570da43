//! `linattn bench`: times linattn's kernels on device-resident inputs and writes JSON for the peer
//! scripts (`benches/peers.py`, `benches/peers_attention.py`, `benches/peers_optim.py`), which time
//! the peers on the same shapes and assemble the side-by-side tables. Three benchmarks:
//!
//! - `engine`: the chunkwise GLA engine (causal, vector gate) on flash-linear-attention's shape
//!   list, forward and forward + backward;
//! - `attention`: dense and Radial block-sparse FlashAttention-2 (D = 128, 16K to 115K tokens),
//!   forward and backward;
//! - `optim`: the fused AdamW step over 100M parameters in 200 tensors against a device copy of
//!   the same bytes.
//!
//! Each runs on `--device cuda` (the hand-written kernels, timed with CUDA events) or `--device
//! cube` (the CubeCL kernels, timed with the host clock around a device sync; on a CPU through
//! llvmpipe this is what `scripts/gpu-run.sh --dry-run` runs, on tiny shapes). Every timed
//! iteration is one call of the device API on inputs already on the device; the value check is
//! off (the inputs are made here, finite and with gates <= 0). Warm-up iterations come first
//! (they also compile the kernels); the median is reported.

// Without either backend the flags still parse and every benchmark says why it cannot run; the
// timing code is compiled only with one.
#![cfg_attr(
    not(any(feature = "cuda", feature = "cube")),
    allow(dead_code, unused_imports)
)]

mod attention;
mod engine;
mod optim;

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use crate::error::{Error, Result};

pub use engine::{FLA_SHAPES, linear_flops, parse_shape, shape_label};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Subcommand, Debug, Clone)]
pub enum BenchWhat {
    /// The chunkwise GLA engine on flash-linear-attention's shapes (fwd, fwd+bwd).
    Engine(engine::EngineArgs),
    /// Dense and Radial block-sparse FlashAttention-2 (fwd, bwd).
    Attention(attention::AttentionArgs),
    /// The fused AdamW step against a device copy of the same bytes.
    Optim(optim::OptimArgs),
}

/// Flags every benchmark takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// cuda (the hand-written kernels) or cube (the CubeCL kernels on a wgpu adapter).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Untimed iterations before measuring (the first also compiles the kernels).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl Common {
    fn check(&self) -> Result<()> {
        if self.iters == 0 {
            return Err(Error::InvalidArgument("--iters must be >= 1".into()));
        }
        Ok(())
    }
}

#[cfg(any(feature = "cuda", feature = "cube"))]
pub fn execute(args: &BenchArgs) -> Result<()> {
    match &args.what {
        BenchWhat::Engine(a) => engine::execute(a),
        BenchWhat::Attention(a) => attention::execute(a),
        BenchWhat::Optim(a) => optim::execute(a),
    }
}

#[cfg(not(any(feature = "cuda", feature = "cube")))]
pub fn execute(args: &BenchArgs) -> Result<()> {
    let device = match &args.what {
        BenchWhat::Engine(a) => &a.common.device,
        BenchWhat::Attention(a) => &a.common.device,
        BenchWhat::Optim(a) => &a.common.device,
    };
    Err(Error::DeviceUnavailable {
        backend: device.clone(),
        reason: "linattn was built without the `cuda` and `cube` features".into(),
    })
}

#[cfg(any(feature = "cuda", feature = "cube"))]
/// Where a benchmark runs, and how its iterations are timed.
pub(crate) enum Bench {
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaContext),
    #[cfg(feature = "cube")]
    Cube(crate::cube::CubeContext),
}

/// Median and minimum of the timed iterations, in milliseconds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    pub median_ms: f64,
    pub min_ms: f64,
}

#[cfg(any(feature = "cuda", feature = "cube"))]
impl Bench {
    pub(crate) fn open(device: &str) -> Result<Bench> {
        match device {
            #[cfg(feature = "cuda")]
            "cuda" => Ok(Bench::Cuda(crate::cuda::CudaContext::shared()?)),
            #[cfg(feature = "cube")]
            "cube" => {
                let ctx = crate::cube::CubeContext::shared()?;
                // Timing, not testing: no NaN fills of the outputs.
                ctx.set_poison_outputs(false);
                crate::attention::cube::set_poison_outputs(false);
                Ok(Bench::Cube(ctx))
            }
            #[allow(unreachable_patterns)]
            "cuda" | "cube" => Err(Error::DeviceUnavailable {
                backend: device.into(),
                reason: format!("linattn was built without the `{device}` feature"),
            }),
            other => Err(Error::InvalidArgument(format!(
                "unknown bench device `{other}` (expected cuda or cube)"
            ))),
        }
    }

    /// The device's name as the tables print it.
    pub(crate) fn device_name(&self) -> String {
        match self {
            #[cfg(feature = "cuda")]
            Bench::Cuda(ctx) => ctx.device_name().to_string(),
            #[cfg(feature = "cube")]
            Bench::Cube(ctx) => ctx.adapter_name().to_string(),
        }
    }

    /// `sm_90`-style architecture (cuda) or `wgpu` (cube).
    pub(crate) fn arch(&self) -> String {
        match self {
            #[cfg(feature = "cuda")]
            Bench::Cuda(ctx) => ctx.arch(),
            #[cfg(feature = "cube")]
            Bench::Cube(_) => "wgpu".into(),
        }
    }

    /// `cuda` or `cube`.
    pub(crate) fn backend(&self) -> &'static str {
        match self {
            #[cfg(feature = "cuda")]
            Bench::Cuda(_) => "cuda",
            #[cfg(feature = "cube")]
            Bench::Cube(_) => "cube",
        }
    }

    /// Runs `f` `warmup` times, then `iters` timed times: CUDA events around each call on the
    /// context's stream (cuda), the host clock around each call and a device sync (cube).
    pub(crate) fn time(
        &self,
        warmup: usize,
        iters: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<Timing> {
        for _ in 0..warmup {
            f()?;
        }
        self.sync()?;
        let mut ms = Vec::with_capacity(iters);
        for _ in 0..iters.max(1) {
            ms.push(match self {
                #[cfg(feature = "cuda")]
                Bench::Cuda(ctx) => {
                    use cudarc::driver::sys::CUevent_flags;
                    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
                    let stream = ctx.stream();
                    let start = stream.record_event(flags).map_err(cuda_error)?;
                    f()?;
                    let end = stream.record_event(flags).map_err(cuda_error)?;
                    f64::from(start.elapsed_ms(&end).map_err(cuda_error)?)
                }
                #[cfg(feature = "cube")]
                Bench::Cube(_) => {
                    let start = std::time::Instant::now();
                    f()?;
                    self.sync()?;
                    start.elapsed().as_secs_f64() * 1e3
                }
            });
        }
        ms.sort_by(f64::total_cmp);
        Ok(Timing {
            median_ms: median(&ms),
            min_ms: ms[0],
        })
    }

    /// Waits for everything queued on the device.
    pub(crate) fn sync(&self) -> Result<()> {
        match self {
            #[cfg(feature = "cuda")]
            Bench::Cuda(ctx) => ctx.stream().synchronize().map_err(cuda_error),
            #[cfg(feature = "cube")]
            Bench::Cube(ctx) => {
                cubecl::future::block_on(ctx.client().sync()).map_err(|e| Error::Runtime {
                    backend: "cube".into(),
                    message: format!("device sync: {e:?}"),
                })
            }
        }
    }
}

#[cfg(feature = "cuda")]
pub(crate) fn cuda_error(e: impl std::fmt::Debug) -> Error {
    Error::Runtime {
        backend: "cuda".into(),
        message: format!("{e:?}"),
    }
}

/// The median of sorted values.
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

/// A device's datasheet peaks: dense bf16 tensor-core TFLOP/s (no sparsity) and memory bandwidth
/// in GB/s, by its name. The tables print measured rates as fractions of these; the GPU run also
/// measures a device copy, the bandwidth actually reachable.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peaks {
    pub bf16_tflops: f64,
    pub memory_gb_s: f64,
}

/// [`Peaks`] of a device name (`None` when unknown). More specific names come first.
pub fn peaks(device: &str) -> Option<Peaks> {
    let d = device.to_ascii_uppercase();
    let table: [(&str, f64, f64); 10] = [
        ("GB200", 2500.0, 8000.0),
        ("B200", 2250.0, 8000.0),
        ("H200", 989.4, 4800.0),
        ("H100 PCIE", 756.0, 2000.0),
        ("H100 NVL", 835.0, 3900.0),
        ("H100", 989.4, 3350.0),
        ("A100-SXM4-80GB", 312.0, 2039.0),
        ("A100", 312.0, 1555.0),
        ("L40S", 362.0, 864.0),
        ("A10G", 70.0, 600.0),
    ];
    table
        .iter()
        .find(|(k, _, _)| d.contains(k))
        .map(|&(_, bf16_tflops, memory_gb_s)| Peaks {
            bf16_tflops,
            memory_gb_s,
        })
}

/// Writes `doc` as pretty JSON to `path` (creating its folder) and says so.
pub(crate) fn write_json(path: &Path, doc: &serde_json::Value) -> Result<()> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let text = serde_json::to_string_pretty(doc)
        .map_err(|e| Error::InvalidArgument(format!("JSON: {e}")))?;
    std::fs::write(path, text + "\n").map_err(io)?;
    println!("wrote {}", path.display());
    Ok(())
}

#[cfg(any(feature = "cuda", feature = "cube"))]
/// The document header every benchmark writes (the peer scripts read `device` and `backend`).
#[cfg(any(feature = "cuda", feature = "cube"))]
pub(crate) fn header(bench: &Bench, what: &str) -> serde_json::Map<String, serde_json::Value> {
    let device = bench.device_name();
    let peaks = peaks(&device);
    let mut m = serde_json::Map::new();
    m.insert(
        "implementation".into(),
        format!("linattn-{}", bench.backend()).into(),
    );
    m.insert("bench".into(), what.into());
    m.insert("backend".into(), bench.backend().into());
    m.insert("device".into(), device.into());
    m.insert("arch".into(), bench.arch().into());
    m.insert("peak_tflops".into(), peaks.map(|p| p.bf16_tflops).into());
    m.insert("peak_gb_s".into(), peaks.map(|p| p.memory_gb_s).into());
    m
}

/// `n` standard-normal f32 values from `seed`, drawn on every core: the benchmarks' inputs run to
/// hundreds of millions of values (fla's largest shape is 134M per tensor), which one core draws
/// in most of a minute. Chunks of 2^20 values each have their own seed, so the values depend on
/// `(n, seed)` only, not on the thread count.
pub(crate) fn normal_f32(n: usize, seed: u64) -> Vec<f32> {
    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use rand_distr::{Distribution, StandardNormal};
    const CHUNK: usize = 1 << 20;
    let mut out = vec![0f32; n];
    let mut chunks: Vec<(usize, &mut [f32])> = out.chunks_mut(CHUNK).enumerate().collect();
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per_thread = chunks.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        while !chunks.is_empty() {
            let batch: Vec<(usize, &mut [f32])> =
                chunks.drain(..per_thread.min(chunks.len())).collect();
            scope.spawn(move || {
                for (i, chunk) in batch {
                    let mut rng = SmallRng::seed_from_u64(
                        seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    );
                    for x in chunk.iter_mut() {
                        *x = StandardNormal.sample(&mut rng);
                    }
                }
            });
        }
    });
    out
}

/// `count` tensor sizes summing to about `total`, deliberately uneven and odd (the optimizer
/// benchmark's group; `benches/peers_optim.py` splits its group the same way).
pub fn optim_sizes(total: usize, count: usize) -> Vec<usize> {
    let base = total / count.max(1);
    (0..count)
        .map(|i| {
            let wobble = (i * 7919 % 101) as f64 / 100.0 - 0.5; // in [-0.5, 0.5]
            ((base as f64 * (1.0 + 0.5 * wobble)) as usize) | 1
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_by_name() {
        assert_eq!(peaks("NVIDIA H100 PCIe").unwrap().bf16_tflops, 756.0);
        assert_eq!(peaks("NVIDIA H100 80GB HBM3").unwrap().memory_gb_s, 3350.0);
        assert_eq!(peaks("NVIDIA H200").unwrap().memory_gb_s, 4800.0);
        assert_eq!(peaks("llvmpipe (LLVM 15.0.6, 256 bits)"), None);
    }

    #[test]
    fn normal_values_are_standard_and_reproducible() {
        let a = normal_f32(3_000_000, 7);
        assert_eq!(a, normal_f32(3_000_000, 7));
        assert_ne!(a[..100], normal_f32(100, 8)[..]);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 1e-2 && (var - 1.0).abs() < 1e-2,
            "{mean} {var}"
        );
    }

    #[test]
    fn median_and_sizes() {
        assert_eq!(median(&[1.0, 2.0, 10.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 3.0, 10.0]), 2.5);
        assert!(median(&[]).is_nan());
        let s = optim_sizes(100_000_000, 200);
        assert_eq!(s.len(), 200);
        assert!(s.iter().all(|n| n % 2 == 1));
        let total: usize = s.iter().sum();
        assert!((total as f64 - 1e8).abs() < 2e6, "{total}");
    }

    #[cfg(any(feature = "cuda", feature = "cube"))]
    #[test]
    fn unknown_device_is_an_error() {
        assert!(matches!(Bench::open("tpu"), Err(Error::InvalidArgument(_))));
    }
}
