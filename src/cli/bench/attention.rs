//! `linattn bench attention`: dense and Radial block-sparse FlashAttention-2, forward and
//! backward, B = 1, non-causal, on sequence lengths from 16K to 115,200 tokens (HunyuanVideo: 30
//! frames x 3,840 tokens). Dense: the kernels' computed lists (the library's FlashAttention
//! baseline; on cuda with query blocks of 128 and of 64). Sparse: the released-code Radial mask
//! (`hunyuan`, decay 0.95, blocks of 128; other lengths use frames of `--tokens-per-frame`),
//! planned and uploaded once, outside the timing. The JSON is the schema
//! `benches/peers_attention.py` reads.

use std::time::Instant;

use clap::Args;

use super::Common;
#[cfg(any(feature = "cuda", feature = "cube"))]
use super::{Bench, Timing};
use crate::attention::plan::AttentionPlan;
use crate::attention::{RadialConfig, RadialModel, radial_mask};
use crate::error::{Error, Result};
use crate::tensor::DType;

#[derive(Args, Debug, Clone)]
pub struct AttentionArgs {
    #[command(flatten)]
    pub common: Common,
    /// Sequence lengths (T = S), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "16384,65536,115200")]
    pub seqs: Vec<usize>,
    /// Heads.
    #[arg(long, default_value_t = 24)]
    pub heads: usize,
    /// Head dim (cuda: 64 or 128).
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// Tokens per video frame of the Radial mask (115,200 tokens are always 30 x 3,840).
    #[arg(long, default_value_t = 4096)]
    pub tokens_per_frame: usize,
    /// Input dtype (cuda: bf16; cube: f32 or f16).
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Time the forward pass only.
    #[arg(long)]
    pub forward_only: bool,
}

/// The Radial configuration of a sequence length: HunyuanVideo's 30 x 3,840 at 115,200, else
/// frames of `tokens_per_frame`.
pub fn radial_for(seq: usize, tokens_per_frame: usize) -> Result<RadialConfig> {
    let (frames, tokens) = if seq == 115_200 {
        (30, 3_840)
    } else if tokens_per_frame > 0 && seq.is_multiple_of(tokens_per_frame) {
        (seq / tokens_per_frame, tokens_per_frame)
    } else {
        return Err(Error::InvalidArgument(format!(
            "sequence length {seq}: use 115200 or a multiple of --tokens-per-frame ({tokens_per_frame})"
        )));
    };
    Ok(RadialConfig {
        frames,
        tokens_per_frame: tokens,
        block_size: 128,
        decay_factor: 0.95,
        model: RadialModel::Hunyuan,
        text_tokens: 0,
    })
}

#[cfg(any(feature = "cuda", feature = "cube"))]
/// One timed configuration of one sequence length.
pub(super) struct Measured {
    mode: &'static str,
    block_q: usize,
    block_k: usize,
    density: f64,
    fwd: Timing,
    bwd: Option<Timing>,
}

#[cfg(any(feature = "cuda", feature = "cube"))]
/// Everything one sequence length needs: sizes, inputs, the sparse plan.
pub(super) struct Point {
    seq: usize,
    heads: usize,
    head_dim: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
    sparse: AttentionPlan,
    plan_ms: f64,
}

#[cfg(any(feature = "cuda", feature = "cube"))]
pub(super) fn execute(args: &AttentionArgs) -> Result<()> {
    args.common.check()?;
    let dtype: DType = args.dtype.parse()?;
    if args.heads == 0 || args.head_dim == 0 || args.seqs.contains(&0) {
        return Err(Error::InvalidArgument(
            "--heads, --head-dim and every --seqs entry must be >= 1".into(),
        ));
    }
    let bench = Bench::open(&args.common.device)?;
    println!(
        "linattn bench attention: {} ({}, {}), {dtype}, B=1 H={} D={}, non-causal, {} warm-up + {} timed iterations, median",
        bench.device_name(),
        bench.backend(),
        bench.arch(),
        args.heads,
        args.head_dim,
        args.common.warmup,
        args.common.iters
    );
    let mut results = Vec::new();
    for &seq in &args.seqs {
        let cfg = radial_for(seq, args.tokens_per_frame)?;
        let planned = Instant::now();
        let mask = radial_mask(&cfg)?;
        let sparse = AttentionPlan::new(Some(&mask), seq, seq, 128, 128, false)?;
        let plan_ms = planned.elapsed().as_secs_f64() * 1e3;
        let n = seq * args.heads * args.head_dim;
        let draw = |i: u64| super::normal_f32(n, seq as u64 * 4 + i);
        let point = Point {
            seq,
            heads: args.heads,
            head_dim: args.head_dim,
            q: draw(0),
            k: draw(1),
            v: draw(2),
            d_o: draw(3),
            sparse,
            plan_ms,
        };
        let measured = match &bench {
            #[cfg(feature = "cuda")]
            Bench::Cuda(ctx) => cuda::measure(&bench, ctx, &point, dtype, args)?,
            #[cfg(feature = "cube")]
            Bench::Cube(ctx) => cube::measure(&bench, ctx, &point, dtype, args)?,
        };
        for m in measured {
            // FLOPs of the visited blocks: 4 B H D per token pair forward, 2.5x that backward.
            let fwd_flops =
                4.0 * (args.heads * args.head_dim) as f64 * (seq as f64).powi(2) * m.density;
            for (pass, timing, flops) in [
                ("fwd", Some(m.fwd), fwd_flops),
                ("bwd", m.bwd, 2.5 * fwd_flops),
            ] {
                let Some(timing) = timing else { continue };
                let tflops = flops / (timing.median_ms * 1e-3) / 1e12;
                println!(
                    "T={seq:>6} {:<6} blocks {}x{} density {:.3} {pass}: median {:9.3} ms (min {:9.3}) {tflops:8.2} TFLOP/s",
                    m.mode, m.block_q, m.block_k, m.density, timing.median_ms, timing.min_ms
                );
                results.push(serde_json::json!({
                    "impl": "linattn",
                    "mode": m.mode,
                    "pass": pass,
                    "seq": seq,
                    "batch": 1,
                    "heads": args.heads,
                    "head_dim": args.head_dim,
                    "dtype": dtype.name(),
                    "causal": false,
                    "block_q": m.block_q,
                    "block_k": m.block_k,
                    "density": m.density,
                    "ms": timing.median_ms,
                    "ms_min": timing.min_ms,
                    "tflops": tflops,
                    "iters": args.common.iters,
                    "plan_ms": if m.mode == "sparse" { point.plan_ms } else { 0.0 },
                }));
            }
        }
    }
    if let Some(path) = &args.common.json {
        let mut doc = super::header(&bench, "attention");
        doc.insert("tool".into(), "linattn".into());
        doc.insert("results".into(), results.into());
        super::write_json(path, &serde_json::Value::Object(doc))?;
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::CudaSlice;
    use half::bf16;

    use super::{AttentionArgs, Measured, Point};
    use crate::attention::cuda::DeviceAttentionPlan;
    use crate::attention::cuda::device::{
        self, CudaTensor, DeviceForwardState, DeviceGrads, DeviceTensorMut,
    };
    use crate::attention::{Attention, AttnDims};
    use crate::cli::bench::{Bench, cuda_error};
    use crate::cuda::CudaContext;
    use crate::error::{Error, Result};
    use crate::tensor::DType;

    pub(super) fn measure(
        bench: &Bench,
        ctx: &CudaContext,
        p: &Point,
        dtype: DType,
        args: &AttentionArgs,
    ) -> Result<Vec<Measured>> {
        if dtype != DType::BF16 {
            return Err(Error::UnsupportedDtype {
                tensor: "q".into(),
                dtype,
                backend: "cuda (bench attention)".into(),
                supported: "bf16".into(),
            });
        }
        let stream = ctx.stream().clone();
        let dims = AttnDims {
            b: 1,
            t: p.seq,
            s: p.seq,
            h: p.heads,
            d: p.head_dim,
        };
        let n = dims.q_len();
        let upload = |x: &[f32]| -> Result<CudaSlice<bf16>> {
            let h: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            stream.clone_htod(&h).map_err(cuda_error)
        };
        let (q, k, v, d_o) = (upload(&p.q)?, upload(&p.k)?, upload(&p.v)?, upload(&p.d_o)?);
        let alloc = |n: usize| stream.alloc_zeros::<bf16>(n).map_err(cuda_error);
        let (mut o, mut dq, mut dk, mut dv) = (alloc(n)?, alloc(n)?, alloc(n)?, alloc(n)?);
        let mut lse = stream
            .alloc_zeros::<f32>(dims.lse_len())
            .map_err(cuda_error)?;
        let shape = vec![dims.b, dims.t, dims.h, dims.d];
        let (qt, kt, vt) = (
            CudaTensor::new(&q, shape.clone())?,
            CudaTensor::new(&k, shape.clone())?,
            CudaTensor::new(&v, shape.clone())?,
        );
        // The mask lives in each plan; the kernels alone are timed (no value check).
        let problem = Attention::dense(&qt, &kt, &vt).with_value_check(crate::ValueCheck::Off);
        let mut plans = vec![
            (
                "dense",
                DeviceAttentionPlan::dense(p.seq, p.seq, 128, 128, false)?,
            ),
            (
                "dense",
                DeviceAttentionPlan::dense(p.seq, p.seq, 64, 128, false)?,
            ),
        ];
        plans.push(("sparse", device::upload_plan(ctx, &stream, &p.sparse)?));
        let (warmup, iters) = (args.common.warmup, args.common.iters);
        let mut out = Vec::new();
        for (mode, plan) in &plans {
            let g = *plan.geometry();
            let fwd = bench.time(warmup, iters, || {
                device::forward(
                    ctx,
                    &stream,
                    plan,
                    &problem,
                    DeviceTensorMut::BF16(o.as_view_mut()),
                    lse.as_view_mut(),
                )
            })?;
            let bwd = if args.forward_only {
                None
            } else {
                Some(bench.time(warmup, iters, || {
                    device::backward(
                        ctx,
                        &stream,
                        plan,
                        &problem,
                        DeviceForwardState {
                            o: &CudaTensor::new(&o, shape.clone())?,
                            lse: &CudaTensor::new(&lse, vec![dims.b, dims.h, dims.t])?,
                            d_o: &CudaTensor::new(&d_o, shape.clone())?,
                        },
                        DeviceGrads {
                            dq: DeviceTensorMut::BF16(dq.as_view_mut()),
                            dk: DeviceTensorMut::BF16(dk.as_view_mut()),
                            dv: DeviceTensorMut::BF16(dv.as_view_mut()),
                        },
                    )
                })?)
            };
            // Every row of these masks has keys: a non-finite lse is a kernel fault.
            let lse_host = stream.clone_dtoh(&lse).map_err(cuda_error)?;
            let bad = lse_host.iter().filter(|x| !x.is_finite()).count();
            if bad > 0 {
                println!("WARNING: {bad} non-finite lse values ({mode}, T={})", p.seq);
            }
            out.push(Measured {
                mode,
                block_q: g.block_q,
                block_k: g.block_k,
                density: g.density(),
                fwd,
                bwd,
            });
        }
        Ok(out)
    }
}

#[cfg(feature = "cube")]
mod cube {
    use super::{AttentionArgs, Measured, Point};
    use crate::ValueCheck;
    use crate::attention::Attention;
    use crate::attention::cube::CubeAttentionPlan;
    use crate::attention::plan::AttentionPlan;
    use crate::cli::bench::Bench;
    use crate::cube::{CubeContext, DeviceTensor};
    use crate::error::Result;
    use crate::tensor::{DType, Tensor};

    pub(super) fn measure(
        bench: &Bench,
        ctx: &CubeContext,
        p: &Point,
        dtype: DType,
        args: &AttentionArgs,
    ) -> Result<Vec<Measured>> {
        ctx.check_dtype("q", dtype)?;
        let shape = vec![1, p.seq, p.heads, p.head_dim];
        let upload = |name: &str, x: &[f32], dtype: DType| -> Result<DeviceTensor> {
            let host = Tensor::from_f32(shape.clone(), x.to_vec())?.to_dtype(dtype);
            ctx.upload(name, &host)
        };
        let (q, k, v) = (
            upload("q", &p.q, dtype)?,
            upload("k", &p.k, dtype)?,
            upload("v", &p.v, dtype)?,
        );
        let d_o = upload("do", &p.d_o, DType::F32)?;
        // The mask lives in each plan; the kernels alone are timed (no value check).
        let problem = Attention::dense(&q, &k, &v).with_value_check(ValueCheck::Off);
        let dense = AttentionPlan::new(None, p.seq, p.seq, 128, 128, false)?;
        let plans = [
            ("dense", CubeAttentionPlan::new(ctx, &dense)?),
            ("sparse", CubeAttentionPlan::new(ctx, &p.sparse)?),
        ];
        let (warmup, iters) = (args.common.warmup, args.common.iters);
        let mut out = Vec::new();
        for (mode, plan) in plans {
            let fwd = bench.time(warmup, iters, || plan.forward(&problem).map(|_| ()))?;
            let bwd = if args.forward_only {
                None
            } else {
                let stored = plan.forward(&problem)?;
                Some(bench.time(warmup, iters, || {
                    plan.backward(&problem, &stored.o, &stored.lse, &d_o)
                        .map(|_| ())
                })?)
            };
            let host = plan.plan();
            out.push(Measured {
                mode,
                block_q: host.block_q,
                block_k: host.block_k,
                density: host.density(),
                fwd,
                bwd,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radial_configurations_of_the_lengths() {
        let c = radial_for(115_200, 4096).unwrap();
        assert_eq!((c.frames, c.tokens_per_frame), (30, 3840));
        let c = radial_for(65_536, 4096).unwrap();
        assert_eq!((c.frames, c.tokens_per_frame), (16, 4096));
        let c = radial_for(512, 128).unwrap();
        assert_eq!((c.frames, c.tokens_per_frame), (4, 128));
        assert!(radial_for(1000, 4096).is_err());
        assert!(radial_for(1000, 0).is_err());
    }
}
