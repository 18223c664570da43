//! Hand-written CUDA kernels of the engine (kernels/linear_*.cu): chunkwise forward and backward
//! on tensor cores (mma.sync m16n8k16, f32 accumulation) for every gate kind, causal and
//! bidirectional, the recurrent scan, and the decoding step.
//!
//! Entry points:
//! - host tensors: `forward`/`backward` behind `linear::forward(&Backend::Cuda(..), ..)`, and
//!   [`forward_on`]/[`backward_on`] for any [`Executor`] (the CUDA one, or the host emulation used
//!   by the tests without a GPU);
//! - device slices: [`device`] (inputs and outputs stay on the GPU, launches on a caller's stream);
//! - decoding: [`decode_step`].
//!
//! Supported: q, k, v in bf16, f16 or f32 (f32 accumulation; f32 inputs run the same kernels with
//! an exact f32 product in place of the tensor-core one), gates in any float type (used as f32),
//! K <= 256 and V <= 512 (head dims that are not multiples of the 64-channel tiles are zero-padded
//! inside the kernels), chunk sizes 16 and 64, the recurrent form. Outputs and gradients are f32.

pub mod device;
mod engine;
pub mod kernels;
mod params;
pub mod values;

use linattn_reference::linear::Dims;

use self::engine::{BackwardTargets, Cotangents, EngineConfig, ForwardTargets, Inputs};
use super::{Form, Gate, Grads, LinearAttention, Output, Spec};
use crate::cuda::CudaContext;
use crate::cuda::exec::{CudaExec, Executor};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorData};

const BACKEND: &str = "cuda";

/// Checks what the kernels support and builds the engine configuration.
pub(crate) fn engine_config(spec: &Spec, form: Form) -> Result<EngineConfig> {
    if kernels::dtype_code(spec.dtype).is_none() {
        return Err(Error::UnsupportedDtype {
            tensor: "q".into(),
            dtype: spec.dtype,
            backend: BACKEND.into(),
            supported: "bf16, f16, f32".into(),
        });
    }
    let Dims { b, t, k, v, .. } = spec.dims;
    if k > kernels::MAX_K {
        return Err(Error::UnsupportedHeadDim {
            tensor: "q".into(),
            dim: k,
            backend: BACKEND.into(),
            supported: format!(
                "1..={} (64, 128, 256 natively, others zero-padded)",
                kernels::MAX_K
            ),
        });
    }
    if v > kernels::MAX_V {
        return Err(Error::UnsupportedHeadDim {
            tensor: "v".into(),
            dim: v,
            backend: BACKEND.into(),
            supported: format!(
                "1..={} (multiples of 64 natively, others zero-padded)",
                kernels::MAX_V
            ),
        });
    }
    match form {
        Form::Recurrent => {}
        Form::Chunkwise { chunk } if kernels::CHUNK_SIZES.contains(&chunk) => {}
        Form::Chunkwise { chunk } => {
            return Err(Error::Unsupported(format!(
                "chunk size {chunk} on the cuda backend (compiled chunk sizes: {:?})",
                kernels::CHUNK_SIZES
            )));
        }
        Form::Parallel => {
            return Err(Error::Unsupported(
                "the parallel form on the cuda backend (it offers the recurrent and chunkwise forms)"
                    .into(),
            ));
        }
    }
    let seq_starts: Vec<i64> = match &spec.cu_seqlens {
        Some(cu) => cu.iter().map(|&x| x as i64).collect(),
        None => (0..=b).map(|i| (i * t) as i64).collect(),
    };
    Ok(EngineConfig {
        dims: spec.dims,
        dtype: spec.dtype,
        gate_kind: spec.gate_kind,
        has_gate_bwd: spec.has_gate_bwd,
        direction: spec.direction,
        scale: spec.scale,
        normalize: spec.normalize,
        form,
        seq_starts,
    })
}

/// The raw bytes of a tensor in its own dtype.
fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    match t.data() {
        TensorData::BF16(d) => bytemuck::cast_slice(d).to_vec(),
        TensorData::F16(d) => bytemuck::cast_slice(d).to_vec(),
        TensorData::F32(d) => bytemuck::cast_slice(d).to_vec(),
        TensorData::F64(d) => bytemuck::cast_slice(d).to_vec(),
    }
}

fn f32_bytes(t: &Tensor) -> Vec<u8> {
    bytemuck::cast_slice(&t.to_f32_vec()).to_vec()
}

/// Buffers of one host-tensor call: uploads and result buffers, kept alive together.
struct Buffers<'e, E: Executor> {
    exec: &'e E,
    keep: Vec<E::Buffer>,
}

impl<'e, E: Executor> Buffers<'e, E> {
    fn new(exec: &'e E) -> Self {
        Buffers {
            exec,
            keep: Vec::new(),
        }
    }

    fn upload(&mut self, bytes: &[u8]) -> Result<u64> {
        let buf = self.exec.upload(bytes)?;
        let a = self.exec.address(&buf);
        self.keep.push(buf);
        Ok(a)
    }

    fn opt_upload(&mut self, t: Option<&Tensor>) -> Result<u64> {
        t.map_or(Ok(0), |t| self.upload(&f32_bytes(t)))
    }

    /// An f32 result buffer of `n` elements (every element is written by the engine); returns
    /// (index, address).
    fn result(&mut self, n: usize) -> Result<(usize, u64)> {
        let buf = self.exec.alloc(n * 4)?;
        let a = self.exec.address(&buf);
        self.keep.push(buf);
        Ok((self.keep.len() - 1, a))
    }

    fn download(&self, index: usize, shape: Vec<usize>) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut bytes = vec![0u8; n * 4];
        self.exec.download(&self.keep[index], &mut bytes)?;
        let data: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Tensor::f32_unchecked(shape, data))
    }

    fn inputs(&mut self, args: &LinearAttention) -> Result<Inputs> {
        Ok(Inputs {
            q: self.upload(&tensor_bytes(args.q))?,
            k: self.upload(&tensor_bytes(args.k))?,
            v: self.upload(&tensor_bytes(args.v))?,
            g: self.opt_upload(args.gate.tensor())?,
            g_bwd: self.opt_upload(args.gate_bwd.as_ref().and_then(Gate::tensor))?,
            h0: self.opt_upload(args.h0)?,
        })
    }
}

pub(super) fn forward(
    ctx: &CudaContext,
    spec: &Spec,
    args: &LinearAttention,
    form: Form,
) -> Result<Output> {
    forward_on(&CudaExec::new(ctx), spec, args, form)
}

pub(super) fn backward(
    ctx: &CudaContext,
    spec: &Spec,
    args: &LinearAttention,
    form: Form,
    d_o: &Tensor,
    d_ht: Option<&Tensor>,
) -> Result<Grads> {
    backward_on(&CudaExec::new(ctx), spec, args, form, d_o, d_ht)
}

/// Forward pass on any executor. `spec` must come from `args.validate()`.
#[doc(hidden)]
pub fn forward_on<E: Executor>(
    exec: &E,
    spec: &Spec,
    args: &LinearAttention,
    form: Form,
) -> Result<Output> {
    let cfg = engine_config(spec, form)?;
    let mut bufs = Buffers::new(exec);
    let inp = bufs.inputs(args)?;
    let Dims { b, t, h, v, .. } = spec.dims;
    let (o_idx, o) = bufs.result(b * t * h * v)?;
    let ht = if spec.has_final_state() {
        Some(bufs.result(spec.state_shape().iter().product())?)
    } else {
        None
    };
    engine::forward(
        exec,
        &cfg,
        &inp,
        &ForwardTargets {
            o,
            ht: ht.map_or(0, |(_, a)| a),
        },
    )?;
    Ok(Output {
        o: bufs.download(o_idx, spec.o_shape())?,
        ht: ht
            .map(|(i, _)| bufs.download(i, spec.state_shape()))
            .transpose()?,
    })
}

/// Backward pass on any executor. `spec` must come from `args.validate()` and the cotangents must
/// have passed `spec.validate_cotangents`.
#[doc(hidden)]
pub fn backward_on<E: Executor>(
    exec: &E,
    spec: &Spec,
    args: &LinearAttention,
    form: Form,
    d_o: &Tensor,
    d_ht: Option<&Tensor>,
) -> Result<Grads> {
    let cfg = engine_config(spec, form)?;
    let mut bufs = Buffers::new(exec);
    let inp = bufs.inputs(args)?;
    // do in the input dtype goes to the kernels as is; any other dtype as f32.
    let (d_o_addr, do_f32) = if d_o.dtype() == spec.dtype {
        (bufs.upload(&tensor_bytes(d_o))?, false)
    } else {
        (bufs.upload(&f32_bytes(d_o))?, true)
    };
    let cot = Cotangents {
        d_o: d_o_addr,
        do_f32,
        dht: bufs.opt_upload(d_ht)?,
    };
    let Dims { b, t, h, k, v } = spec.dims;
    let (dq_idx, dq) = bufs.result(b * t * h * k)?;
    let (dk_idx, dk) = bufs.result(b * t * h * k)?;
    let (dv_idx, dv) = bufs.result(b * t * h * v)?;
    let gate_len = |g: &Gate| g.tensor().map(Tensor::numel);
    let dg = gate_len(&args.gate).map(|n| bufs.result(n)).transpose()?;
    let dg_bwd = args
        .gate_bwd
        .as_ref()
        .and_then(gate_len)
        .map(|n| bufs.result(n))
        .transpose()?;
    let dh0 = args.h0.map(|h0| bufs.result(h0.numel())).transpose()?;
    engine::backward(
        exec,
        &cfg,
        &inp,
        &cot,
        &BackwardTargets {
            dq,
            dk,
            dv,
            dg: dg.map_or(0, |(_, a)| a),
            dg_bwd: dg_bwd.map_or(0, |(_, a)| a),
            dh0: dh0.map_or(0, |(_, a)| a),
        },
    )?;
    let shape_of = |t: &Tensor| t.shape().to_vec();
    Ok(Grads {
        dq: bufs.download(dq_idx, shape_of(args.q))?,
        dk: bufs.download(dk_idx, shape_of(args.k))?,
        dv: bufs.download(dv_idx, shape_of(args.v))?,
        dg: match (dg, args.gate.tensor()) {
            (Some((i, _)), Some(g)) => Some(bufs.download(i, shape_of(g))?),
            _ => None,
        },
        dg_bwd: match (dg_bwd, args.gate_bwd.as_ref().and_then(Gate::tensor)) {
            (Some((i, _)), Some(g)) => Some(bufs.download(i, shape_of(g))?),
            _ => None,
        },
        dh0: match (dh0, args.h0) {
            (Some((i, _)), Some(h0)) => Some(bufs.download(i, shape_of(h0))?),
            _ => None,
        },
    })
}

/// One causal decoding step on host tensors: `state <- diag(exp g) state + k^T v`,
/// `o = scale q state`, for `q, k: [B, 1, H, K]`, `v: [B, 1, H, V]`, a gate for that token
/// (`[H]`, `[B, 1, H]` or `[B, 1, H, K]`, or none) and `state: [B, H, K, V]` (f32, updated in
/// place). Returns `o: [B, 1, H, V]` (f32). Runs the recurrent kernel on one token per sequence.
pub fn decode_step(
    ctx: &CudaContext,
    state: &mut Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gate: Gate,
    scale: Option<f64>,
) -> Result<Tensor> {
    decode_step_on(&CudaExec::new(ctx), state, q, k, v, gate, scale)
}

/// [`decode_step`] on any executor.
#[doc(hidden)]
pub fn decode_step_on<E: Executor>(
    exec: &E,
    state: &mut Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gate: Gate,
    scale: Option<f64>,
) -> Result<Tensor> {
    if q.shape().len() != 4 || q.shape()[1] != 1 {
        return Err(Error::shape("q", "[B, 1, H, K] (one token)", q.shape()));
    }
    let mut problem = LinearAttention::causal(q, k, v)
        .with_gate(gate)
        .with_h0(state);
    if let Some(s) = scale {
        problem = problem.with_scale(s);
    }
    let spec = problem.validate()?;
    let out = forward_on(exec, &spec, &problem, Form::Recurrent)?;
    *state = out.ht.ok_or_else(|| Error::Runtime {
        backend: BACKEND.into(),
        message: "decode step produced no state".into(),
    })?;
    Ok(out.o)
}

/// Whether `dtype` can be a q/k/v dtype on this backend.
pub fn supports_dtype(dtype: DType) -> bool {
    kernels::dtype_code(dtype).is_some()
}
