//! `linattn bench engine`: the chunkwise engine (GLA: causal, vector gate) on
//! flash-linear-attention's benchmark shapes, forward and forward + backward.
//!
//! Inputs as in flash-linear-attention's benchmarks: q, k, v, do ~ N(0, 1) in the chosen dtype,
//! gates `logsigmoid(randn).clamp_min(-5)` (`[B, T, H, K]`, f32 on our side), K = V = D, scale
//! D^-0.5, no initial or final state. The JSON is the schema `benches/peers.py` reads.

use clap::Args;

use super::Common;
#[cfg(any(feature = "cuda", feature = "cube"))]
use super::{Bench, Timing};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// flash-linear-attention's shape list: (B, T, H, D).
pub const FLA_SHAPES: [(usize, usize, usize, usize); 6] = [
    (1, 8192, 96, 128),
    (2, 16384, 16, 128),
    (4, 2048, 16, 128),
    (4, 4096, 64, 128),
    (8, 1024, 8, 64),
    (8, 2048, 32, 256),
];

#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    #[command(flatten)]
    pub common: Common,
    /// Shapes as `B1-T8192-H96-D128` labels, comma separated (default: flash-linear-attention's
    /// list).
    #[arg(long, value_delimiter = ',')]
    pub shapes: Vec<String>,
    /// Input dtype: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Chunk size (cuda: 16 or 64).
    #[arg(long, default_value_t = 64)]
    pub chunk: usize,
    /// Time the forward pass only.
    #[arg(long)]
    pub forward_only: bool,
}

/// Parses `B1-T8192-H96-D128`.
pub fn parse_shape(label: &str) -> Result<(usize, usize, usize, usize)> {
    let bad = || {
        Error::InvalidArgument(format!(
            "bad shape `{label}` (expected e.g. B1-T8192-H96-D128)"
        ))
    };
    let mut out = [0usize; 4];
    let parts: Vec<&str> = label.split('-').collect();
    if parts.len() != 4 {
        return Err(bad());
    }
    for (i, (part, prefix)) in parts.iter().zip(["B", "T", "H", "D"]).enumerate() {
        out[i] = part
            .strip_prefix(prefix)
            .and_then(|n| n.parse().ok())
            .filter(|&n: &usize| n > 0)
            .ok_or_else(bad)?;
    }
    Ok((out[0], out[1], out[2], out[3]))
}

pub fn shape_label((b, t, h, d): (usize, usize, usize, usize)) -> String {
    format!("B{b}-T{t}-H{h}-D{d}")
}

/// Matmul FLOPs of chunked linear attention (per the algorithm every chunked implementation
/// runs): forward `B H (4 T K V + T C (K + V))` (states, q h, the causal halves of q k^T and A v),
/// forward + backward three times that. Used for ours and flash-linear-attention alike, so their
/// TFLOP/s ratio is their speed ratio.
pub fn linear_flops(b: usize, t: usize, h: usize, d: usize, chunk: usize) -> (f64, f64) {
    let (b, t, h, k, v, c) = (
        b as f64,
        t as f64,
        h as f64,
        d as f64,
        d as f64,
        chunk as f64,
    );
    let fwd = b * h * (4.0 * t * k * v + t * c * (k + v));
    (fwd, 3.0 * fwd)
}

#[cfg(any(feature = "cuda", feature = "cube"))]
/// One shape's times.
#[derive(Clone, Debug)]
struct Row {
    shape: (usize, usize, usize, usize),
    fwd: Timing,
    fwdbwd: Option<Timing>,
}

#[cfg(any(feature = "cuda", feature = "cube"))]
pub(super) fn execute(args: &EngineArgs) -> Result<()> {
    args.common.check()?;
    let shapes: Vec<(usize, usize, usize, usize)> = if args.shapes.is_empty() {
        FLA_SHAPES.to_vec()
    } else {
        args.shapes
            .iter()
            .map(|s| parse_shape(s))
            .collect::<Result<_>>()?
    };
    let dtype: DType = args.dtype.parse()?;
    if args.chunk == 0 {
        return Err(Error::InvalidArgument("--chunk must be >= 1".into()));
    }
    let bench = Bench::open(&args.common.device)?;
    println!(
        "linattn bench engine: {} ({}, {}), GLA causal vector gate, {dtype}, chunk {}, {} warm-up + {} timed iterations, median",
        bench.device_name(),
        bench.backend(),
        bench.arch(),
        args.chunk,
        args.common.warmup,
        args.common.iters
    );
    println!(
        "| shape | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s |\n|---|---:|---:|---:|---:|"
    );
    let mut rows = Vec::new();
    for &shape in &shapes {
        let row = time_shape(&bench, shape, dtype, args)?;
        let (b, t, h, d) = shape;
        let (ff, fb) = linear_flops(b, t, h, d, args.chunk);
        let tflops = |flops: f64, ms: f64| flops / (ms * 1e-3) / 1e12;
        println!(
            "| {} | {:.3} | {} | {:.2} | {} |",
            shape_label(shape),
            row.fwd.median_ms,
            row.fwdbwd
                .map_or("-".into(), |x| format!("{:.3}", x.median_ms)),
            tflops(ff, row.fwd.median_ms),
            row.fwdbwd
                .map_or("-".into(), |x| format!("{:.2}", tflops(fb, x.median_ms))),
        );
        rows.push(row);
    }
    if let Some(path) = &args.common.json {
        super::write_json(path, &to_json(&bench, dtype, args.chunk, &rows))?;
    }
    Ok(())
}

#[cfg(any(feature = "cuda", feature = "cube"))]
fn to_json(bench: &Bench, dtype: DType, chunk: usize, rows: &[Row]) -> serde_json::Value {
    let mut doc = super::header(bench, "engine");
    doc.insert("dtype".into(), dtype.name().into());
    doc.insert("chunk".into(), chunk.into());
    doc.insert("flop_model".into(), "chunked-linear".into());
    let tf = |flops: f64, t: Option<Timing>| t.map(|t| flops / (t.median_ms * 1e-3) / 1e12);
    let results: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let (b, t, h, d) = r.shape;
            let (ff, fb) = linear_flops(b, t, h, d, chunk);
            serde_json::json!({
                "shape": shape_label(r.shape),
                "B": b, "T": t, "H": h, "D": d,
                "fwd_ms": r.fwd.median_ms,
                "fwd_ms_min": r.fwd.min_ms,
                "fwdbwd_ms": r.fwdbwd.map(|x| x.median_ms),
                "fwdbwd_ms_min": r.fwdbwd.map(|x| x.min_ms),
                "fwd_tflops": tf(ff, Some(r.fwd)),
                "fwdbwd_tflops": tf(fb, r.fwdbwd),
            })
        })
        .collect();
    doc.insert("results".into(), results.into());
    serde_json::Value::Object(doc)
}

/// The drawn inputs of one shape (f32; each backend rounds them to its dtype).
struct Drawn {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
    g: Vec<f32>,
}

impl Drawn {
    fn new(n: usize) -> Drawn {
        let draw = |i: u64| super::normal_f32(n, 20_261_127 + i);
        // logsigmoid(x).clamp_min(-5), as flash-linear-attention's benchmarks draw GLA gates.
        let mut g = draw(4);
        for x in &mut g {
            *x = (-(-*x).exp().ln_1p()).max(-5.0);
        }
        Drawn {
            q: draw(0),
            k: draw(1),
            v: draw(2),
            d_o: draw(3),
            g,
        }
    }
}

#[cfg(any(feature = "cuda", feature = "cube"))]
fn time_shape(
    bench: &Bench,
    shape: (usize, usize, usize, usize),
    dtype: DType,
    args: &EngineArgs,
) -> Result<Row> {
    let drawn = Drawn::new(shape.0 * shape.1 * shape.2 * shape.3);
    match bench {
        #[cfg(feature = "cuda")]
        Bench::Cuda(ctx) => cuda::time_shape(bench, ctx, shape, dtype, &drawn, args),
        #[cfg(feature = "cube")]
        Bench::Cube(ctx) => cube::time_shape(bench, ctx, shape, dtype, &drawn, args),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use cudarc::driver::CudaSlice;
    use half::{bf16, f16};

    use super::{Drawn, EngineArgs, Row};
    use crate::cli::bench::{Bench, cuda_error};
    use crate::cuda::CudaContext;
    use crate::error::{Error, Result};
    use crate::linear::cuda::device::{
        self, CudaTensor, DeviceBackward, DeviceForward, TypedSlice,
    };
    use crate::linear::{Form, Gate, LinearAttention};
    use crate::tensor::DType;

    enum Typed {
        BF16(CudaSlice<bf16>),
        F16(CudaSlice<f16>),
        F32(CudaSlice<f32>),
    }

    impl Typed {
        fn upload(ctx: &CudaContext, dtype: DType, x: &[f32]) -> Result<Typed> {
            let s = ctx.stream();
            Ok(match dtype {
                DType::BF16 => {
                    let h: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
                    Typed::BF16(s.clone_htod(&h).map_err(cuda_error)?)
                }
                DType::F16 => {
                    let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
                    Typed::F16(s.clone_htod(&h).map_err(cuda_error)?)
                }
                DType::F32 => Typed::F32(s.clone_htod(x).map_err(cuda_error)?),
                DType::F64 => {
                    return Err(Error::UnsupportedDtype {
                        tensor: "q".into(),
                        dtype,
                        backend: "cuda".into(),
                        supported: "bf16, f16, f32".into(),
                    });
                }
            })
        }

        fn tensor(&self, shape: &[usize]) -> Result<CudaTensor<'_>> {
            let view = match self {
                Typed::BF16(s) => TypedSlice::from(s),
                Typed::F16(s) => TypedSlice::from(s),
                Typed::F32(s) => TypedSlice::from(s),
            };
            CudaTensor::new(view, shape.to_vec())
        }
    }

    pub(super) fn time_shape(
        bench: &Bench,
        ctx: &CudaContext,
        (b, t, h, d): (usize, usize, usize, usize),
        dtype: DType,
        drawn: &Drawn,
        args: &EngineArgs,
    ) -> Result<Row> {
        let n = b * t * h * d;
        let q = Typed::upload(ctx, dtype, &drawn.q)?;
        let k = Typed::upload(ctx, dtype, &drawn.k)?;
        let v = Typed::upload(ctx, dtype, &drawn.v)?;
        let d_o = Typed::upload(ctx, dtype, &drawn.d_o)?;
        let s = ctx.stream();
        let g = s.clone_htod(&drawn.g).map_err(cuda_error)?;
        let zeros = |n: usize| s.alloc_zeros::<f32>(n).map_err(cuda_error);
        let (mut o, mut dq, mut dk, mut dv, mut dg) =
            (zeros(n)?, zeros(n)?, zeros(n)?, zeros(n)?, zeros(n)?);
        let shape = [b, t, h, d];
        let (qt, kt, vt, d_ot) = (
            q.tensor(&shape)?,
            k.tensor(&shape)?,
            v.tensor(&shape)?,
            d_o.tensor(&shape)?,
        );
        let gt = CudaTensor::new(&g, shape.to_vec())?;
        // The kernels alone: the inputs are made here, finite and with gates <= 0.
        let problem = LinearAttention::causal(&qt, &kt, &vt)
            .with_gate(Gate::Vector(&gt))
            .with_value_check(crate::ValueCheck::Off);
        let form = Form::Chunkwise { chunk: args.chunk };
        let (warmup, iters) = (args.common.warmup, args.common.iters);
        let fwd = bench.time(warmup, iters, || {
            device::forward(
                ctx,
                s,
                &problem,
                form,
                DeviceForward {
                    o: o.as_view_mut(),
                    ht: None,
                },
            )
        })?;
        let fwdbwd = if args.forward_only {
            None
        } else {
            Some(bench.time(warmup, iters, || {
                device::forward(
                    ctx,
                    s,
                    &problem,
                    form,
                    DeviceForward {
                        o: o.as_view_mut(),
                        ht: None,
                    },
                )?;
                device::backward(
                    ctx,
                    s,
                    &problem,
                    form,
                    &d_ot,
                    None,
                    DeviceBackward {
                        dq: dq.as_view_mut(),
                        dk: dk.as_view_mut(),
                        dv: dv.as_view_mut(),
                        dg: Some(dg.as_view_mut()),
                        dg_bwd: None,
                        dh0: None,
                    },
                )
            })?)
        };
        Ok(Row {
            shape: (b, t, h, d),
            fwd,
            fwdbwd,
        })
    }
}

#[cfg(feature = "cube")]
mod cube {
    use super::{Drawn, EngineArgs, Row};
    use crate::ValueCheck;
    use crate::cli::bench::Bench;
    use crate::cube::CubeContext;
    use crate::error::Result;
    use crate::linear::Form;
    use crate::linear::cube::{DeviceGate, DeviceLinearAttention, backward_device, forward_device};
    use crate::tensor::{DType, Tensor};

    pub(super) fn time_shape(
        bench: &Bench,
        ctx: &CubeContext,
        (b, t, h, d): (usize, usize, usize, usize),
        dtype: DType,
        drawn: &Drawn,
        args: &EngineArgs,
    ) -> Result<Row> {
        ctx.check_dtype("q", dtype)?;
        let shape = vec![b, t, h, d];
        let upload = |name: &str, x: &[f32], dtype: DType| -> Result<_> {
            let host = Tensor::from_f32(shape.clone(), x.to_vec())?.to_dtype(dtype);
            ctx.upload(name, &host)
        };
        let q = upload("q", &drawn.q, dtype)?;
        let k = upload("k", &drawn.k, dtype)?;
        let v = upload("v", &drawn.v, dtype)?;
        let d_o = upload("do", &drawn.d_o, dtype)?;
        let g = upload("g", &drawn.g, DType::F32)?;
        let problem = DeviceLinearAttention::causal(&q, &k, &v)
            .with_gate(DeviceGate::Vector(&g))
            .with_value_check(ValueCheck::Off);
        let form = Form::Chunkwise { chunk: args.chunk };
        let (warmup, iters) = (args.common.warmup, args.common.iters);
        let fwd = bench.time(warmup, iters, || {
            forward_device(ctx, &problem, form).map(|_| ())
        })?;
        let fwdbwd = if args.forward_only {
            None
        } else {
            Some(bench.time(warmup, iters, || {
                forward_device(ctx, &problem, form)?;
                backward_device(ctx, &problem, form, &d_o, None).map(|_| ())
            })?)
        };
        Ok(Row {
            shape: (b, t, h, d),
            fwd,
            fwdbwd,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_print() {
        for s in FLA_SHAPES {
            assert_eq!(parse_shape(&shape_label(s)).unwrap(), s);
        }
        assert!(parse_shape("B1-T8192-H96").is_err());
        assert!(parse_shape("B0-T1-H1-D1").is_err());
    }

    #[test]
    fn gates_are_clamped_log_decays() {
        let d = Drawn::new(1000);
        assert!(d.g.iter().all(|&g| (-5.0..=0.0).contains(&g)));
        assert!(d.g.iter().any(|&g| g < -1.0));
    }
}
