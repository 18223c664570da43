//! `linattn bench optim`: the fused AdamW step over `--params` f32 parameters in `--tensors`
//! uneven, odd tensors (default 100M in 200), against a device copy of the same number of bytes.
//!
//! Bytes per parameter: the update reads param, grad, exp_avg, exp_avg_sq and writes param,
//! exp_avg, exp_avg_sq (28 B); with the non-finite check the statistics pass reads the gradient
//! once more (32 B). The copy moves the same bytes (half read, half written). The JSON is what
//! `benches/peers_optim.py` compares with `torch.optim.AdamW(fused=True)`.

use clap::Args;

#[cfg(any(feature = "cuda", feature = "cube"))]
use super::{Bench, Timing};
use super::{Common, optim_sizes};
use crate::error::{Error, Result};
use crate::optim::OptimizerConfig;

#[derive(Args, Debug, Clone)]
pub struct OptimArgs {
    #[command(flatten)]
    pub common: Common,
    /// Parameters in all.
    #[arg(long, default_value_t = 100_000_000)]
    pub params: usize,
    /// Tensors they are split into (uneven, odd sizes).
    #[arg(long, default_value_t = 200)]
    pub tensors: usize,
}

#[cfg(any(feature = "cuda", feature = "cube"))]
/// One timed step kind and its copy baseline.
struct Measured {
    name: &'static str,
    bytes_per_param: usize,
    step: Timing,
    copy: Timing,
}

#[cfg(any(feature = "cuda", feature = "cube"))]
pub(super) fn execute(args: &OptimArgs) -> Result<()> {
    args.common.check()?;
    if args.params == 0 || args.tensors == 0 || args.tensors > args.params {
        return Err(Error::InvalidArgument(
            "--params and --tensors must be >= 1, and --tensors <= --params".into(),
        ));
    }
    let bench = Bench::open(&args.common.device)?;
    let sizes = optim_sizes(args.params, args.tensors);
    let n: usize = sizes.iter().sum();
    println!(
        "linattn bench optim: {} ({}), fused AdamW, {n} f32 parameters in {} tensors, {} warm-up + {} timed steps, median",
        bench.device_name(),
        bench.backend(),
        args.tensors,
        args.common.warmup,
        args.common.iters
    );
    // Values in the range of real weights and gradients (the step's speed does not depend on
    // them; they only need to be finite).
    let params: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&s| (0..s).map(|j| ((j % 97) as f32 - 48.0) / 64.0).collect())
        .collect();
    let grads: Vec<Vec<f32>> = sizes
        .iter()
        .map(|&s| (0..s).map(|j| ((j % 89) as f32 - 44.0) / 1000.0).collect())
        .collect();
    let group = Group {
        params: params.iter().map(Vec::as_slice).collect(),
        grads: grads.iter().map(Vec::as_slice).collect(),
        decay: vec![true; sizes.len()],
    };
    let mut measured = Vec::new();
    for (name, check, bytes_per_param) in [
        ("fused_adamw", false, 28usize),
        ("fused_adamw_checked", true, 32usize),
    ] {
        let config = OptimizerConfig {
            skip_non_finite: check,
            ..OptimizerConfig::adamw(1e-3)
        };
        let bytes = bytes_per_param * n;
        let (step, copy) = match &bench {
            #[cfg(feature = "cuda")]
            Bench::Cuda(ctx) => cuda::measure(&bench, ctx, &config, &group, bytes, &args.common)?,
            #[cfg(feature = "cube")]
            Bench::Cube(ctx) => cube::measure(&bench, ctx, &config, &group, bytes, &args.common)?,
        };
        let gbs = |t: Timing| bytes as f64 / (t.median_ms * 1e-3) / 1e9;
        println!(
            "{name}: {:.3} ms ({:.0} GB/s); copy of the same bytes {:.3} ms ({:.0} GB/s); step / copy {:.2}",
            step.median_ms,
            gbs(step),
            copy.median_ms,
            gbs(copy),
            step.median_ms / copy.median_ms
        );
        measured.push(Measured {
            name,
            bytes_per_param,
            step,
            copy,
        });
    }
    if let Some(path) = &args.common.json {
        let mut doc = super::header(&bench, "optim");
        doc.insert("params".into(), n.into());
        // The split is a function of the requested total; the peer script splits the same way.
        doc.insert("params_requested".into(), args.params.into());
        doc.insert("tensors".into(), args.tensors.into());
        let results: Vec<serde_json::Value> = measured
            .iter()
            .map(|m| {
                let bytes = (m.bytes_per_param * n) as f64;
                serde_json::json!({
                    "name": m.name,
                    "bytes_per_param": m.bytes_per_param,
                    "bytes_per_step": bytes,
                    "ms": m.step.median_ms,
                    "ms_min": m.step.min_ms,
                    "gb_s": bytes / (m.step.median_ms * 1e-3) / 1e9,
                    "copy_ms": m.copy.median_ms,
                    "copy_gb_s": bytes / (m.copy.median_ms * 1e-3) / 1e9,
                })
            })
            .collect();
        doc.insert("results".into(), results.into());
        super::write_json(path, &serde_json::Value::Object(doc))?;
    }
    Ok(())
}

/// The parameter group on the host.
struct Group<'a> {
    params: Vec<&'a [f32]>,
    grads: Vec<&'a [f32]>,
    decay: Vec<bool>,
}

/// Fails unless the steps moved the weights (a step that silently did nothing would time well).
fn expect_moved(before: &[&[f32]], after: &[Vec<f32>]) -> Result<()> {
    if after.iter().zip(before).any(|(a, p)| a.as_slice() != *p) {
        Ok(())
    } else {
        Err(Error::Runtime {
            backend: "bench".into(),
            message: "the fused step did not change the weights".into(),
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{Group, Timing, expect_moved};
    use crate::cli::bench::{Bench, Common, cuda_error};
    use crate::cuda::CudaContext;
    use crate::cuda::exec::{CudaExec, Executor};
    use crate::error::Result;
    use crate::optim::cuda::CudaOptimizer;
    use crate::optim::{OptimizerConfig, Schedule};

    pub(super) fn measure(
        bench: &Bench,
        ctx: &CudaContext,
        config: &OptimizerConfig,
        group: &Group,
        bytes: usize,
        common: &Common,
    ) -> Result<(Timing, Timing)> {
        let exec = CudaExec::new(ctx);
        let schedule = Schedule::Constant { warmup: 0 };
        let step = {
            let mut opt = CudaOptimizer::new(
                exec.clone(),
                config,
                &schedule,
                1,
                &group.params,
                &group.decay,
            )?;
            opt.set_grads(&group.grads)?;
            let t = bench.time(common.warmup, common.iters, || opt.step())?;
            expect_moved(&group.params, &opt.read_params()?)?;
            t
        };
        // The optimizer's memory is freed before the copy's buffers are allocated.
        let src = exec.alloc_zeroed(bytes / 2)?;
        let mut dst = exec.alloc_zeroed(bytes / 2)?;
        let stream = exec.stream().clone();
        let copy = bench.time(common.warmup, common.iters, || {
            stream.memcpy_dtod(&src, &mut dst).map_err(cuda_error)
        })?;
        Ok((step, copy))
    }
}

#[cfg(feature = "cube")]
mod cube {
    use super::{Group, Timing, expect_moved};
    use crate::cli::bench::{Bench, Common};
    use crate::cube::CubeContext;
    use crate::error::Result;
    use crate::optim::cube::FusedOptimizer;
    use crate::optim::{OptimizerConfig, Schedule};

    pub(super) fn measure(
        bench: &Bench,
        ctx: &CubeContext,
        config: &OptimizerConfig,
        group: &Group,
        bytes: usize,
        common: &Common,
    ) -> Result<(Timing, Timing)> {
        let schedule = Schedule::Constant { warmup: 0 };
        let step = {
            let mut opt =
                FusedOptimizer::new(ctx, config, &schedule, 1, &group.params, &group.decay)?;
            opt.set_grads(&group.grads)?;
            let t = bench.time(common.warmup, common.iters, || opt.step())?;
            expect_moved(&group.params, &opt.read_params()?)?;
            t
        };
        // The copy of the same bytes, in buffers of at most the device's largest page (as the
        // optimizer splits its arena into buckets).
        let client = ctx.client();
        let max_floats = (client.properties().memory.max_page_size / 4) as usize;
        let mut left = bytes / 2 / 4;
        let mut pairs = Vec::new();
        while left > 0 {
            let floats = left.min(max_floats);
            pairs.push((client.empty(floats * 4), client.empty(floats * 4), floats));
            left -= floats;
        }
        let copy = bench.time(common.warmup, common.iters, || {
            for (src, dst, n) in &pairs {
                // SAFETY: both buffers hold `n` f32.
                unsafe { crate::cube::kernels::copy_range(ctx, src, 0, dst, 0, *n) };
            }
            Ok(())
        })?;
        Ok((step, copy))
    }
}
