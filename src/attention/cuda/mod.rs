//! Hand-written CUDA block-sparse FlashAttention-2 (kernels/attention.cu): forward and backward on
//! tensor cores (mma.sync m16n8k16, f32 accumulation and softmax statistics), bf16 / f16 inputs,
//! head dims 64 and 128, plan block sizes 64 and 128, causal or not.
//!
//! Entry points:
//! - host tensors: `attention::forward/backward(&Backend::Cuda(..), ..)` (outputs f32), and
//!   [`forward_on`] / [`backward_on`] for any [`Executor`] (the CUDA one, or the host emulation
//!   the tests use without a GPU);
//! - device slices: [`device`] (inputs, outputs and the uploaded [`DeviceAttentionPlan`] stay on
//!   the GPU, launches go to the caller's stream), including the dense FlashAttention baseline
//!   [`device::flash_attention_dense_forward`] / [`device::flash_attention_dense_backward`].
//!
//! Dense mode (no mask) is the library's FlashAttention baseline: the kernels compute the block
//! lists themselves (every block, pruned by the causal rule), so nothing is uploaded.

pub mod device;
mod engine;
pub mod kernels;
mod params;
pub mod plan;

pub use engine::check_support;
pub use plan::{CudaAttentionPlan, DeviceAttentionPlan, PlanGeometry};

use self::engine::{BackwardAddrs, ForwardAddrs, Problem};
use super::plan::AttentionPlan;
use super::{Attention, AttnGrads, AttnOutput, AttnSpec, BlockMask};
use crate::cuda::CudaContext;
use crate::cuda::exec::{CudaExec, Executor};
use crate::error::Result;
use crate::tensor::{Tensor, TensorData};

/// Block sizes of the dense mode (query rows and keys per block).
pub const DENSE_BLOCK_Q: usize = 128;
pub const DENSE_BLOCK_K: usize = 128;

pub(super) fn forward(ctx: &CudaContext, spec: &AttnSpec, args: &Attention) -> Result<AttnOutput> {
    forward_on(&CudaExec::new(ctx), spec, args)
}

pub(super) fn backward(
    ctx: &CudaContext,
    spec: &AttnSpec,
    args: &Attention,
    d_o: &Tensor,
) -> Result<AttnGrads> {
    backward_on(&CudaExec::new(ctx), spec, args, d_o)
}

/// The plan of a host-tensor call: the mask's blocks uploaded, or the dense mode.
pub fn plan_for<E: Executor>(
    exec: &E,
    spec: &AttnSpec,
    mask: Option<&BlockMask>,
) -> Result<DeviceAttentionPlan<E::Buffer>> {
    let d = spec.dims;
    match mask {
        Some(m) => {
            let plan =
                AttentionPlan::new(Some(m), d.t, d.s, m.block_q(), m.block_k(), spec.causal)?;
            DeviceAttentionPlan::upload(exec, &plan)
        }
        None => DeviceAttentionPlan::dense(d.t, d.s, DENSE_BLOCK_Q, DENSE_BLOCK_K, spec.causal),
    }
}

fn problem(spec: &AttnSpec) -> Result<Problem> {
    engine::check_support(spec.dtype, spec.dims.d)?;
    Ok(Problem {
        dims: spec.dims,
        dtype: spec.dtype,
        scale: spec.scale,
        causal: spec.causal,
    })
}

/// The raw bytes of a 16-bit tensor (the kernels' input layout).
fn raw_bytes(t: &Tensor) -> Vec<u8> {
    match t.data() {
        TensorData::BF16(d) => bytemuck::cast_slice(d).to_vec(),
        TensorData::F16(d) => bytemuck::cast_slice(d).to_vec(),
        TensorData::F32(d) => bytemuck::cast_slice(d).to_vec(),
        TensorData::F64(d) => bytemuck::cast_slice(d).to_vec(),
    }
}

fn download_f32<E: Executor>(exec: &E, buf: &E::Buffer, shape: Vec<usize>) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut bytes = vec![0u8; n * 4];
    exec.download(buf, &mut bytes)?;
    let data: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Tensor::f32_unchecked(shape, data))
}

/// Device copies of one host-tensor call: inputs, o and lse (f32).
struct Forwarded<E: Executor> {
    q: E::Buffer,
    k: E::Buffer,
    v: E::Buffer,
    o: E::Buffer,
    lse: E::Buffer,
}

fn run_forward<E: Executor>(
    exec: &E,
    spec: &AttnSpec,
    args: &Attention,
    plan: &DeviceAttentionPlan<E::Buffer>,
) -> Result<Forwarded<E>> {
    let prob = problem(spec)?;
    let d = spec.dims;
    let f = Forwarded::<E> {
        q: exec.upload(&raw_bytes(args.q))?,
        k: exec.upload(&raw_bytes(args.k))?,
        v: exec.upload(&raw_bytes(args.v))?,
        o: exec.alloc_zeroed(d.q_len() * 4)?,
        lse: exec.alloc_zeroed(d.lse_len() * 4)?,
    };
    engine::forward(
        exec,
        plan,
        &prob,
        &ForwardAddrs {
            q: exec.address(&f.q),
            k: exec.address(&f.k),
            v: exec.address(&f.v),
            o: exec.address(&f.o),
            o_f32: true,
            lse: exec.address(&f.lse),
        },
    )?;
    Ok(f)
}

/// Forward pass on any executor with the plan of [`plan_for`]. `spec` must come from
/// `args.validate()`. Outputs are f32.
#[doc(hidden)]
pub fn forward_on<E: Executor>(exec: &E, spec: &AttnSpec, args: &Attention) -> Result<AttnOutput> {
    problem(spec)?;
    let plan = plan_for(exec, spec, args.mask)?;
    forward_with_plan_on(exec, spec, args, &plan)
}

/// Forward pass with a given plan (e.g. a full mask uploaded instead of the dense mode).
#[doc(hidden)]
pub fn forward_with_plan_on<E: Executor>(
    exec: &E,
    spec: &AttnSpec,
    args: &Attention,
    plan: &DeviceAttentionPlan<E::Buffer>,
) -> Result<AttnOutput> {
    let f = run_forward(exec, spec, args, plan)?;
    Ok(AttnOutput {
        o: download_f32(exec, &f.o, spec.o_shape())?,
        lse: download_f32(exec, &f.lse, spec.lse_shape())?,
    })
}

/// Backward pass on any executor (runs the forward for o and lse first). `d_o` is rounded to the
/// inputs' dtype, the type the kernels multiply in. Gradients are f32.
#[doc(hidden)]
pub fn backward_on<E: Executor>(
    exec: &E,
    spec: &AttnSpec,
    args: &Attention,
    d_o: &Tensor,
) -> Result<AttnGrads> {
    problem(spec)?;
    let plan = plan_for(exec, spec, args.mask)?;
    backward_with_plan_on(exec, spec, args, d_o, &plan)
}

/// Backward pass with a given plan.
#[doc(hidden)]
pub fn backward_with_plan_on<E: Executor>(
    exec: &E,
    spec: &AttnSpec,
    args: &Attention,
    d_o: &Tensor,
    plan: &DeviceAttentionPlan<E::Buffer>,
) -> Result<AttnGrads> {
    let prob = problem(spec)?;
    let f = run_forward(exec, spec, args, plan)?;
    let d = spec.dims;
    let d_o = exec.upload(&raw_bytes(&d_o.to_dtype(spec.dtype)))?;
    let delta = exec.alloc_zeroed(d.lse_len() * 4)?;
    let dq = exec.alloc_zeroed(d.q_len() * 4)?;
    let dk = exec.alloc_zeroed(d.kv_len() * 4)?;
    let dv = exec.alloc_zeroed(d.kv_len() * 4)?;
    engine::backward(
        exec,
        plan,
        &prob,
        &BackwardAddrs {
            q: exec.address(&f.q),
            k: exec.address(&f.k),
            v: exec.address(&f.v),
            o: exec.address(&f.o),
            o_f32: true,
            lse: exec.address(&f.lse),
            d_o: exec.address(&d_o),
            delta: exec.address(&delta),
            dq: exec.address(&dq),
            dk: exec.address(&dk),
            dv: exec.address(&dv),
            grad_f32: true,
        },
    )?;
    Ok(AttnGrads {
        dq: download_f32(exec, &dq, args.q.shape().to_vec())?,
        dk: download_f32(exec, &dk, args.k.shape().to_vec())?,
        dv: download_f32(exec, &dv, args.v.shape().to_vec())?,
    })
}
