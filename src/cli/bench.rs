//! `linattn bench`: times the CUDA chunkwise engine (GLA: causal, vector gate) on
//! flash-linear-attention's benchmark shapes, forward and forward+backward, with CUDA events,
//! warm-up and medians, and writes JSON in the format of `benches/peers.py`, which times
//! flash-linear-attention and FlashAttention on the same shapes and assembles the side-by-side
//! table (`benches/RESULTS.md`).
//!
//! Inputs as in flash-linear-attention's benchmarks: q, k, v, do ~ N(0, 1) in the chosen dtype,
//! gates `logsigmoid(randn).clamp_min(-5)` ([B, T, H, K], f32 on our side), K = V = D, scale
//! D^-0.5. Everything stays on the device; each timed iteration is one call of the device API
//! (including its stream-ordered scratch allocations).

use std::path::PathBuf;

use clap::Args;

use crate::error::{Error, Result};

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
pub struct BenchArgs {
    /// Shapes as `B1-T8192-H96-D128` labels, comma separated (default: flash-linear-attention's
    /// list).
    #[arg(long, value_delimiter = ',')]
    pub shapes: Vec<String>,
    /// Input dtype: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Chunk size (16 or 64).
    #[arg(long, default_value_t = 64)]
    pub chunk: usize,
    /// Untimed iterations before measuring.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The device's dense bf16 tensor-core peak in TFLOP/s (default: from the device name).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
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

/// Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device name; `None` when unknown.
pub fn bf16_peak_tflops(device: &str) -> Option<f64> {
    let d = device.to_ascii_uppercase();
    let table: [(&str, f64); 9] = [
        ("GB200", 2500.0),
        ("B200", 2250.0),
        ("H200", 989.4),
        ("H100 PCIE", 756.0),
        ("H100 NVL", 835.0),
        ("H100", 989.4),
        ("A100", 312.0),
        ("L40S", 362.0),
        ("A10G", 70.0),
    ];
    table.iter().find(|(k, _)| d.contains(k)).map(|(_, v)| *v)
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

/// One row of the results.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub shape: (usize, usize, usize, usize),
    pub fwd_ms: f64,
    pub fwdbwd_ms: Option<f64>,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        0.5 * (xs[n / 2 - 1] + xs[n / 2])
    }
}

/// The JSON document (the schema `benches/peers.py` reads and writes).
pub fn to_json(
    device: &str,
    dtype: &str,
    chunk: usize,
    peak: Option<f64>,
    rows: &[BenchRow],
) -> String {
    let num = |x: Option<f64>| x.map_or("null".to_string(), |x| format!("{x:.6}"));
    let mut out = String::from("{\n");
    out.push_str("  \"implementation\": \"linattn-cuda\",\n");
    out.push_str(&format!(
        "  \"device\": \"{}\",\n",
        device.replace('"', "'")
    ));
    out.push_str(&format!("  \"dtype\": \"{dtype}\",\n"));
    out.push_str(&format!("  \"chunk\": {chunk},\n"));
    out.push_str(&format!("  \"peak_tflops\": {},\n", num(peak)));
    out.push_str("  \"flop_model\": \"chunked-linear\",\n");
    out.push_str("  \"results\": [\n");
    for (i, r) in rows.iter().enumerate() {
        let (b, t, h, d) = r.shape;
        let (ff, fb) = linear_flops(b, t, h, d, chunk);
        let tf = |flops: f64, ms: Option<f64>| ms.map(|ms| flops / (ms * 1e-3) / 1e12);
        out.push_str(&format!(
            "    {{\"shape\": \"{}\", \"B\": {b}, \"T\": {t}, \"H\": {h}, \"D\": {d}, \"fwd_ms\": {}, \"fwdbwd_ms\": {}, \"fwd_tflops\": {}, \"fwdbwd_tflops\": {}}}{}\n",
            shape_label(r.shape),
            num(Some(r.fwd_ms)),
            num(r.fwdbwd_ms),
            num(tf(ff, Some(r.fwd_ms))),
            num(tf(fb, r.fwdbwd_ms)),
            if i + 1 < rows.len() { "," } else { "" }
        ));
    }
    out.push_str("  ]\n}\n");
    out
}

pub fn execute(args: &BenchArgs) -> Result<()> {
    let shapes: Vec<(usize, usize, usize, usize)> = if args.shapes.is_empty() {
        FLA_SHAPES.to_vec()
    } else {
        args.shapes
            .iter()
            .map(|s| parse_shape(s))
            .collect::<Result<_>>()?
    };
    if args.iters == 0 {
        return Err(Error::InvalidArgument("--iters must be >= 1".into()));
    }
    run(args, &shapes)
}

#[cfg(not(feature = "cuda"))]
fn run(_args: &BenchArgs, _shapes: &[(usize, usize, usize, usize)]) -> Result<()> {
    Err(Error::DeviceUnavailable {
        backend: "cuda".into(),
        reason: "linattn was built without the `cuda` feature".into(),
    })
}

#[cfg(feature = "cuda")]
fn run(args: &BenchArgs, shapes: &[(usize, usize, usize, usize)]) -> Result<()> {
    use crate::cuda::CudaContext;
    use crate::tensor::DType;

    let dtype: DType = args.dtype.parse()?;
    let ctx = CudaContext::shared()?;
    let device = ctx.device_name().to_string();
    let peak = args.peak_tflops.or_else(|| bf16_peak_tflops(&device));
    println!(
        "linattn bench: {device} ({}), {dtype}, chunk {}, {} warm-up + {} timed iterations, median",
        ctx.arch(),
        args.chunk,
        args.warmup,
        args.iters
    );
    println!(
        "| shape | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s |\n|---|---:|---:|---:|---:|"
    );
    let mut rows = Vec::new();
    for &shape in shapes {
        let row = gpu::time_shape(&ctx, shape, dtype, args)?;
        let (b, t, h, d) = shape;
        let (ff, fb) = linear_flops(b, t, h, d, args.chunk);
        println!(
            "| {} | {:.3} | {} | {:.1} | {} |",
            shape_label(shape),
            row.fwd_ms,
            row.fwdbwd_ms.map_or("-".into(), |x| format!("{x:.3}")),
            ff / (row.fwd_ms * 1e-3) / 1e12,
            row.fwdbwd_ms
                .map_or("-".into(), |x| format!("{:.1}", fb / (x * 1e-3) / 1e12)),
        );
        rows.push(row);
    }
    if let Some(path) = &args.json {
        let text = to_json(&device, dtype.name(), args.chunk, peak, &rows);
        std::fs::write(path, text).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod gpu {
    use cudarc::driver::CudaSlice;
    use cudarc::driver::sys::CUevent_flags;
    use half::{bf16, f16};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use rand_distr::{Distribution, StandardNormal};

    use super::{BenchArgs, BenchRow, median};
    use crate::cuda::CudaContext;
    use crate::error::{Error, Result};
    use crate::linear::cuda::device::{
        self, DeviceBackward, DeviceForward, DeviceGate, DeviceProblem, DeviceTensor,
    };
    use crate::linear::{Dims, Direction, Form};
    use crate::tensor::DType;

    fn runtime(e: impl std::fmt::Debug) -> Error {
        Error::Runtime {
            backend: "cuda".into(),
            message: format!("{e:?}"),
        }
    }

    enum Typed {
        BF16(CudaSlice<bf16>),
        F16(CudaSlice<f16>),
        F32(CudaSlice<f32>),
    }

    impl Typed {
        fn view(&self) -> DeviceTensor<'_> {
            match self {
                Typed::BF16(s) => DeviceTensor::BF16(s),
                Typed::F16(s) => DeviceTensor::F16(s),
                Typed::F32(s) => DeviceTensor::F32(s),
            }
        }
    }

    fn normal(rng: &mut SmallRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| StandardNormal.sample(rng)).collect()
    }

    fn upload(ctx: &CudaContext, dtype: DType, x: Vec<f32>) -> Result<Typed> {
        let s = ctx.stream();
        Ok(match dtype {
            DType::BF16 => Typed::BF16(
                s.clone_htod(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>())
                    .map_err(runtime)?,
            ),
            DType::F16 => Typed::F16(
                s.clone_htod(&x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>())
                    .map_err(runtime)?,
            ),
            DType::F32 => Typed::F32(s.clone_htod(&x).map_err(runtime)?),
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

    /// Median milliseconds of `f` over `iters` runs after `warmup` runs, timed by CUDA events on
    /// the context's stream.
    fn time<F: FnMut() -> Result<()>>(
        ctx: &CudaContext,
        warmup: usize,
        iters: usize,
        mut f: F,
    ) -> Result<f64> {
        for _ in 0..warmup {
            f()?;
        }
        ctx.stream().synchronize().map_err(runtime)?;
        let mut ms = Vec::with_capacity(iters);
        for _ in 0..iters {
            let start = ctx
                .stream()
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(runtime)?;
            f()?;
            let end = ctx
                .stream()
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(runtime)?;
            ms.push(start.elapsed_ms(&end).map_err(runtime)? as f64);
        }
        Ok(median(ms))
    }

    pub(super) fn time_shape(
        ctx: &CudaContext,
        (b, t, h, d): (usize, usize, usize, usize),
        dtype: DType,
        args: &BenchArgs,
    ) -> Result<BenchRow> {
        let n = b * t * h * d;
        let mut rng = SmallRng::seed_from_u64(20_261_127);
        let q = upload(ctx, dtype, normal(&mut rng, n))?;
        let k = upload(ctx, dtype, normal(&mut rng, n))?;
        let v = upload(ctx, dtype, normal(&mut rng, n))?;
        let d_o = upload(ctx, dtype, normal(&mut rng, n))?;
        // logsigmoid(x).clamp_min(-5), as flash-linear-attention's benchmarks draw GLA gates.
        let g: Vec<f32> = normal(&mut rng, n)
            .into_iter()
            .map(|x| {
                let ls = if x >= 0.0 {
                    -(-x).exp().ln_1p()
                } else {
                    x - x.exp().ln_1p()
                };
                ls.max(-5.0)
            })
            .collect();
        let s = ctx.stream();
        let g = s.clone_htod(&g).map_err(runtime)?;
        let zeros = |n: usize| s.alloc_zeros::<f32>(n).map_err(runtime);
        let (mut o, mut dq, mut dk, mut dv, mut dg) =
            (zeros(n)?, zeros(n)?, zeros(n)?, zeros(n)?, zeros(n)?);
        let problem = DeviceProblem {
            dims: Dims {
                b,
                t,
                h,
                k: d,
                v: d,
            },
            q: q.view(),
            k: k.view(),
            v: v.view(),
            gate: DeviceGate::Vector(&g),
            gate_bwd: None,
            direction: Direction::Causal,
            scale: None,
            normalize: None,
            h0: None,
            cu_seqlens: None,
            // The kernels alone: the inputs are made here, finite and with gates <= 0.
            value_check: crate::ValueCheck::Off,
        };
        let form = Form::Chunkwise { chunk: args.chunk };
        let fwd_ms = time(ctx, args.warmup, args.iters, || {
            device::forward(
                ctx,
                s,
                &problem,
                form,
                DeviceForward {
                    o: &mut o,
                    ht: None,
                },
            )
        })?;
        let fwdbwd_ms = if args.forward_only {
            None
        } else {
            Some(time(ctx, args.warmup, args.iters, || {
                device::forward(
                    ctx,
                    s,
                    &problem,
                    form,
                    DeviceForward {
                        o: &mut o,
                        ht: None,
                    },
                )?;
                device::backward(
                    ctx,
                    s,
                    &problem,
                    form,
                    d_o.view(),
                    None,
                    DeviceBackward {
                        dq: &mut dq,
                        dk: &mut dk,
                        dv: &mut dv,
                        dg: Some(&mut dg),
                        dg_bwd: None,
                        dh0: None,
                    },
                )
            })?)
        };
        Ok(BenchRow {
            shape: (b, t, h, d),
            fwd_ms,
            fwdbwd_ms,
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
    fn json_has_every_row() {
        let rows = vec![
            BenchRow {
                shape: (1, 8192, 96, 128),
                fwd_ms: 1.5,
                fwdbwd_ms: Some(5.0),
            },
            BenchRow {
                shape: (8, 1024, 8, 64),
                fwd_ms: 0.1,
                fwdbwd_ms: None,
            },
        ];
        let j = to_json(
            "NVIDIA H100 80GB HBM3",
            "bf16",
            64,
            bf16_peak_tflops("NVIDIA H100 80GB HBM3"),
            &rows,
        );
        assert!(j.contains("\"shape\": \"B1-T8192-H96-D128\""));
        assert!(j.contains("\"fwdbwd_ms\": null"));
        assert!(j.contains("\"peak_tflops\": 989.4"));
        assert_eq!(bf16_peak_tflops("NVIDIA H100 PCIe"), Some(756.0));
    }
}
