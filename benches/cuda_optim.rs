//! The CUDA fused AdamW step (kernels/optim.cu) against a device-to-device copy of the same
//! number of bytes, on a CUDA GPU.
//!
//! Sizes: `LINATTN_OPTIM_BENCH_PARAMS` parameters (default 100M, the configuration) in
//! `LINATTN_OPTIM_BENCH_TENSORS` tensors (default 200, uneven and odd). Bytes per parameter: the
//! update reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq (28 B);
//! with the non-finite check (the default) the statistics pass reads the gradient once more
//! (32 B). The copy moves the same bytes (half read, half written). Each measurement enqueues
//! `LINATTN_OPTIM_BENCH_BATCH` steps (default 20) and waits for the device once; best of 10.
//!
//!     cargo bench --bench cuda_optim
//!
//! Without a GPU it prints `skipped: no CUDA device` and exits.

use std::time::Instant;

use linattn::cuda::CudaContext;
use linattn::cuda::exec::{CudaExec, Executor};
use linattn::optim::cuda::CudaOptimizer;
use linattn::optim::{OptimizerConfig, Schedule};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `count` tensor sizes summing to about `total`, deliberately uneven and odd.
fn sizes(total: usize, count: usize) -> Vec<usize> {
    let base = total / count;
    (0..count)
        .map(|i| {
            let wobble = (i * 7919 % 101) as f64 / 100.0 - 0.5; // in [-0.5, 0.5]
            ((base as f64 * (1.0 + 0.5 * wobble)) as usize) | 1
        })
        .collect()
}

/// Best time per call of `f` over 10 batches of `batch` calls, each batch ending in a sync.
fn best_of(batch: usize, mut f: impl FnMut(), sync: impl Fn()) -> f64 {
    f();
    sync();
    let mut best = f64::INFINITY;
    for _ in 0..10 {
        let start = Instant::now();
        for _ in 0..batch {
            f();
        }
        sync();
        best = best.min(start.elapsed().as_secs_f64() / batch as f64);
    }
    best
}

fn main() {
    let ctx = match CudaContext::shared() {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
    };
    let exec = CudaExec::new(&ctx);
    let total = env_usize("LINATTN_OPTIM_BENCH_PARAMS", 100_000_000);
    let count = env_usize("LINATTN_OPTIM_BENCH_TENSORS", 200);
    let batch = env_usize("LINATTN_OPTIM_BENCH_BATCH", 20);
    let sizes = sizes(total, count);
    let n: usize = sizes.iter().sum();
    println!(
        "cuda optim bench on {}: {n} parameters in {count} tensors",
        ctx.device_name()
    );
    let params: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&s| (0..s).map(|j| ((j % 97) as f32 - 48.0) / 64.0).collect())
        .collect();
    let grads: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&s| (0..s).map(|j| ((j % 89) as f32 - 44.0) / 1000.0).collect())
        .collect();
    let param_refs: Vec<&[f32]> = params.iter().map(Vec::as_slice).collect();
    let grad_refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
    let decay = vec![true; count];
    let schedule = Schedule::Constant { warmup: 0 };
    for (name, check, bytes_per_param) in [
        ("fused_adamw", false, 28usize),
        ("fused_adamw_checked", true, 32usize),
    ] {
        let config = OptimizerConfig {
            skip_non_finite: check,
            ..OptimizerConfig::adamw(1e-3)
        };
        let mut opt =
            CudaOptimizer::new(exec.clone(), &config, &schedule, 1, &param_refs, &decay).unwrap();
        opt.set_grads(&grad_refs).unwrap();
        let step = best_of(
            batch,
            || opt.step().unwrap(),
            || exec.synchronize().unwrap(),
        );
        let after = opt.read_params().unwrap();
        assert!(
            after.iter().zip(&params).any(|(a, p)| a != p),
            "the fused step did not run"
        );
        drop(opt);
        let bytes = bytes_per_param * n;
        let src = exec.alloc_zeroed(bytes / 2).unwrap();
        let mut dst = exec.alloc_zeroed(bytes / 2).unwrap();
        let stream = exec.stream().clone();
        let copy = best_of(
            batch,
            || stream.memcpy_dtod(&src, &mut dst).unwrap(),
            || stream.synchronize().unwrap(),
        );
        let gbs = |t: f64| bytes as f64 / t / 1e9;
        println!(
            "{name}: {:.3} ms ({:.0} GB/s); copy of the same bytes {:.3} ms ({:.0} GB/s); ratio {:.2}",
            step * 1e3,
            gbs(step),
            copy * 1e3,
            gbs(copy),
            step / copy
        );
    }
}
