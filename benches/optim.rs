//! The fused AdamW step against a plain device copy of the same bytes, on the cube backend.
//!
//! Sizes: `LINATTN_OPTIM_BENCH_PARAMS` parameters (default 4M, small enough for llvmpipe) in
//! `LINATTN_OPTIM_BENCH_TENSORS` tensors (default 200); the configuration is
//! `LINATTN_OPTIM_BENCH_PARAMS=100000000` on a GPU. `benches/peers_optim.py` times
//! `torch.optim.AdamW(fused=True)` on the same sizes.
//!
//! Bytes per parameter: the update reads param, grad, exp_avg, exp_avg_sq and writes param,
//! exp_avg, exp_avg_sq (28 B); with the non-finite check (the default) the statistics pass reads
//! the gradient once more (32 B). The copy moves the same number of bytes (half read, half
//! written). Each measurement enqueues a batch of steps and waits for the device once.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use cubecl::prelude::*;
use linattn::cube::CubeContext;
use linattn::optim::cube::FusedOptimizer;
use linattn::optim::{OptimizerConfig, Schedule};

type Quad = Vector<f32, Const<4>>;

#[cube(launch_unchecked)]
fn copy_quads(input: &[Quad], output: &mut [Quad]) {
    let stride = CUBE_COUNT * CUBE_DIM as usize;
    let mut i = ABSOLUTE_POS;
    while i < input.len() {
        output[i] = input[i];
        i += stride;
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bench(c: &mut Criterion) {
    let ctx = match CubeContext::shared() {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("skipped: no wgpu adapter ({e})");
            return;
        }
    };
    let total = env_usize("LINATTN_OPTIM_BENCH_PARAMS", 4_000_000);
    let count = env_usize("LINATTN_OPTIM_BENCH_TENSORS", 200);
    // The uneven, odd split `linattn bench optim` and benches/peers_optim.py use.
    let sizes = linattn::cli::bench::optim_sizes(total, count);
    let n: usize = sizes.iter().sum();
    println!(
        "optim bench on {}: {n} parameters in {count} tensors",
        ctx.adapter_name()
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
    let batch = env_usize("LINATTN_OPTIM_BENCH_BATCH", 5) as u64;

    let mut group = c.benchmark_group("optim");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    let mut results = Vec::new();
    for (name, check, bytes_per_param) in [
        ("fused_adamw", false, 28u64),
        ("fused_adamw_checked", true, 32u64),
    ] {
        let config = OptimizerConfig {
            skip_non_finite: check,
            ..OptimizerConfig::adamw(1e-3)
        };
        let mut opt =
            FusedOptimizer::new(&ctx, &config, &schedule, 1, &param_refs, &decay).unwrap();
        opt.set_grads(&grad_refs).unwrap();
        opt.step().unwrap();
        opt.synchronize().unwrap();
        println!("{name}: {} bucket(s)", opt.bucket_count());
        let bytes = bytes_per_param * n as u64;
        group.throughput(Throughput::Bytes(bytes));
        let mut best = f64::INFINITY;
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters.div_ceil(batch) {
                    let start = Instant::now();
                    for _ in 0..batch {
                        opt.step().unwrap();
                    }
                    opt.synchronize().unwrap();
                    let took = start.elapsed();
                    best = best.min(took.as_secs_f64() / batch as f64);
                    elapsed += took;
                }
                elapsed.mul_f64(iters as f64 / (iters.div_ceil(batch) * batch) as f64)
            })
        });
        // The steps really ran: the weights moved.
        let after = opt.read_params().unwrap();
        assert!(
            after.iter().zip(&params).any(|(a, p)| a != p),
            "the fused step did not run"
        );
        results.push((name, bytes, best));

        // The copy of the same bytes: buffers holding bytes / 2 in total, read and written once,
        // split like the optimizer's buckets when they exceed the largest buffer.
        let client = ctx.client();
        let max_quads = (client.properties().memory.max_page_size / 16) as usize;
        let mut left = (bytes / 2 / 16) as usize;
        let mut pairs = Vec::new();
        while left > 0 {
            let quads = left.min(max_quads);
            pairs.push((client.empty(quads * 16), client.empty(quads * 16), quads));
            left -= quads;
        }
        let launch = || {
            for (input, output, quads) in &pairs {
                let cubes = quads.div_ceil(256).min(65_535) as u32;
                unsafe {
                    copy_quads::launch_unchecked(
                        client,
                        CubeCount::Static(cubes, 1, 1),
                        CubeDim::new_1d(256),
                        BufferArg::from_raw_parts(input.clone(), *quads),
                        BufferArg::from_raw_parts(output.clone(), *quads),
                    )
                }
            }
        };
        let sync = || {
            cubecl::future::block_on(client.sync_buffers(pairs.iter().map(|p| &p.1)))
                .expect("copy kernels ran")
        };
        launch();
        sync();
        let copy_name = format!("copy_{}_bytes", bytes);
        let mut best_copy = f64::INFINITY;
        group.bench_function(&copy_name, |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters.div_ceil(batch) {
                    let start = Instant::now();
                    for _ in 0..batch {
                        launch();
                    }
                    sync();
                    let took = start.elapsed();
                    best_copy = best_copy.min(took.as_secs_f64() / batch as f64);
                    elapsed += took;
                }
                elapsed.mul_f64(iters as f64 / (iters.div_ceil(batch) * batch) as f64)
            })
        });
        results.push(("copy (same bytes)", bytes, best_copy));
    }
    group.finish();
    println!("\nbest of batches ({n} parameters, {count} tensors):");
    for pair in results.chunks(2) {
        let (name, bytes, step) = pair[0];
        let (_, _, copy) = pair[1];
        let gbps = |s: f64| bytes as f64 / s / 1e9;
        println!(
            "  {name}: {:.3} ms/step, {:.2} GB/s; copy of the same {bytes} B: {:.3} ms, {:.2} GB/s; step/copy bandwidth {:.1}%",
            step * 1e3,
            gbps(step),
            copy * 1e3,
            gbps(copy),
            100.0 * copy / step
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
