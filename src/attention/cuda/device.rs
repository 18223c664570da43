//! Device-resident API: the host API's builder, [`Attention`], over [`CudaTensor`]s; o, lse and
//! the gradients are cudarc device views; the mask's plan is a [`CudaAttentionPlan`] uploaded
//! once; launches go to the caller's stream and nothing is copied to the host. Shapes, dtypes,
//! head dim and the plan's geometry are checked and typed errors returned. Values (q, k, v, and
//! do in the backward pass) are checked on the device by default
//! ([`Attention::with_value_check`]): one flag pass per input and one small read back, which
//! synchronises the stream once; [`ValueCheck::Off`] keeps the call asynchronous.
//!
//! Outputs may be f32 or the inputs' dtype (o; the three gradients share one choice).

use std::sync::Arc;

use cudarc::driver::{CudaStream, CudaViewMut};
use half::{bf16, f16};

pub use crate::linear::cuda::device::{CudaTensor, DeviceSlice, TypedSlice};

use super::engine::{self, BackwardAddrs, ForwardAddrs, Problem};
use super::plan::{CudaAttentionPlan, DeviceAttentionPlan};
use super::{DENSE_BLOCK_K, DENSE_BLOCK_Q};
use crate::attention::plan::AttentionPlan;
use crate::attention::{Attention, AttnDims};
use crate::backend::ValueCheck;
use crate::cuda::CudaContext;
use crate::cuda::exec::CudaExec;
use crate::error::{Error, Result};
use crate::linear::cuda::device::{Pointers, Source, check_values};
use crate::linear::cuda::values::CheckedBuffer;
use crate::tensor::DType;
use crate::validation::describe;

/// A device output of one of the supported element types (a whole slice through `as_view_mut`,
/// or a part of one buffer through `split_at_mut`).
pub enum DeviceTensorMut<'a> {
    BF16(CudaViewMut<'a, bf16>),
    F16(CudaViewMut<'a, f16>),
    F32(CudaViewMut<'a, f32>),
}

impl DeviceTensorMut<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            DeviceTensorMut::BF16(_) => DType::BF16,
            DeviceTensorMut::F16(_) => DType::F16,
            DeviceTensorMut::F32(_) => DType::F32,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            DeviceTensorMut::BF16(s) => s.len(),
            DeviceTensorMut::F16(s) => s.len(),
            DeviceTensorMut::F32(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One attention problem over CUDA device tensors: the host API's builder, [`Attention`], over
/// [`CudaTensor`]s. The mask's device form is a [`CudaAttentionPlan`] passed beside it (uploaded
/// once per mask and sequence lengths; [`upload_plan`]); a builder's own mask must match it.
pub type CudaAttention<'p, 'a> = Attention<'p, CudaTensor<'a>>;

/// One attention problem lowered to device slices.
#[derive(Clone, Copy)]
pub(crate) struct DeviceAttention<'a> {
    pub dims: AttnDims,
    /// `[B, T, H, D]`.
    pub q: TypedSlice<'a>,
    /// `[B, S, H, D]`.
    pub k: TypedSlice<'a>,
    /// `[B, S, H, D]`.
    pub v: TypedSlice<'a>,
    /// Defaults to `D^-0.5`.
    pub scale: Option<f64>,
    /// Top-left aligned causal rule (must match the plan's).
    pub causal: bool,
    /// [`ValueCheck::On`] by default: NaN / infinities in the inputs are a typed error.
    pub value_check: ValueCheck,
}

/// The value check of q, k, v and `extra` (addresses already taken), when on.
fn check_inputs<'a>(
    exec: &CudaExec,
    stream: &Arc<CudaStream>,
    problem: &DeviceAttention<'a>,
    addrs: [u64; 3],
    extra: Option<(u64, TypedSlice<'a>)>,
) -> Result<()> {
    if problem.value_check == ValueCheck::Off {
        return Ok(());
    }
    let mut named = vec![
        ("q", addrs[0], problem.q),
        ("k", addrs[1], problem.k),
        ("v", addrs[2], problem.v),
    ];
    if let Some((address, d_o)) = extra {
        named.push(("do", address, d_o));
    }
    let checked: Vec<CheckedBuffer> = named
        .iter()
        .map(|&(name, address, t)| CheckedBuffer {
            name,
            address,
            len: t.len(),
            dtype: t.dtype(),
            gate: false,
        })
        .collect();
    let sources: Vec<Source> = named.iter().map(|&(_, _, t)| Source::Tensor(t)).collect();
    check_values(exec, stream, &checked, &sources)
}

fn expect_len(name: &str, len: usize, want: usize, what: &str) -> Result<()> {
    if len != want {
        return Err(Error::ShapeMismatch {
            tensor: name.to_string(),
            expected: format!("{what} = {want} elements"),
            actual: vec![len],
        });
    }
    Ok(())
}

/// The output dtype rule: f32 or the inputs' dtype; returns whether it is f32.
fn output_is_f32(name: &str, out: DType, input: DType) -> Result<bool> {
    if out == DType::F32 {
        Ok(true)
    } else if out == input {
        Ok(false)
    } else {
        Err(Error::UnsupportedDtype {
            tensor: name.into(),
            dtype: out,
            backend: engine::BACKEND.into(),
            supported: format!("f32 or {input} (the inputs' dtype)"),
        })
    }
}

impl DeviceAttention<'_> {
    /// Checks sizes, dtypes, head dim and scale.
    fn validate(&self) -> Result<Problem> {
        let d = self.dims;
        if [d.b, d.t, d.s, d.h, d.d].contains(&0) {
            return Err(Error::InvalidArgument(format!(
                "every dimension must be >= 1, got {d:?}"
            )));
        }
        expect_len("q", self.q.len(), d.q_len(), "B*T*H*D")?;
        expect_len("k", self.k.len(), d.kv_len(), "B*S*H*D")?;
        expect_len("v", self.v.len(), d.kv_len(), "B*S*H*D")?;
        let dtype = self.q.dtype();
        if self.k.dtype() != dtype || self.v.dtype() != dtype {
            return Err(Error::InvalidArgument(
                "q, k, v must share one dtype".into(),
            ));
        }
        engine::check_support(dtype, d.d)?;
        let scale = self.scale.unwrap_or((d.d as f64).powf(-0.5));
        if !scale.is_finite() || scale == 0.0 {
            return Err(Error::InvalidArgument(format!(
                "scale must be finite and nonzero, got {scale}"
            )));
        }
        Ok(Problem {
            dims: d,
            dtype,
            scale,
            causal: self.causal,
        })
    }
}

/// The problem lowered to slices, checked against the plan's geometry.
fn lower<'a>(
    problem: &CudaAttention<'_, 'a>,
    plan: Option<&CudaAttentionPlan>,
) -> Result<DeviceAttention<'a>> {
    let spec = problem.validate_layout()?;
    let d = spec.dims;
    if let Some(plan) = plan {
        let g = plan.geometry();
        if (g.t, g.s, g.causal) != (d.t, d.s, problem.causal) {
            return Err(Error::InvalidArgument(format!(
                "the plan covers T = {}, S = {}, causal = {}; the problem has T = {}, S = {}, causal = {}",
                g.t, g.s, g.causal, d.t, d.s, problem.causal
            )));
        }
        if let Some(mask) = problem.mask
            && (mask.block_q(), mask.block_k()) != (g.block_q, g.block_k)
        {
            return Err(Error::InvalidArgument(format!(
                "the mask's blocks are {}x{}, the plan's {}x{}: upload the plan from this mask",
                mask.block_q(),
                mask.block_k(),
                g.block_q,
                g.block_k
            )));
        }
    }
    Ok(DeviceAttention {
        dims: d,
        q: problem.q.data(),
        k: problem.k.data(),
        v: problem.v.data(),
        scale: problem.scale,
        causal: problem.causal,
        value_check: problem.value_check,
    })
}

fn expect_shape_of(name: &str, t: &CudaTensor, dims: &[&str], want: &[usize]) -> Result<()> {
    if t.shape() != want {
        return Err(Error::shape(name, describe(dims, want), t.shape()));
    }
    Ok(())
}

/// The address of an output, its guard kept by `ptrs`.
fn write_tensor<'p>(ptrs: &mut Pointers<'p>, t: &'p mut DeviceTensorMut<'_>) -> u64 {
    match t {
        DeviceTensorMut::BF16(s) => ptrs.write(s),
        DeviceTensorMut::F16(s) => ptrs.write(s),
        DeviceTensorMut::F32(s) => ptrs.write(s),
    }
}

/// Uploads a host plan to the device of `stream` (do it once per mask and sequence lengths).
pub fn upload_plan(
    ctx: &CudaContext,
    stream: &Arc<CudaStream>,
    plan: &AttentionPlan,
) -> Result<CudaAttentionPlan> {
    DeviceAttentionPlan::upload(&CudaExec::on_stream(ctx, stream.clone()), plan)
}

/// Forward pass: `o [B, T, H, D]` (f32 or the inputs' dtype) and `lse [B, H, T]` f32, launched on
/// `stream` (asynchronous).
pub fn forward<'a>(
    ctx: &CudaContext,
    stream: &'a Arc<CudaStream>,
    plan: &CudaAttentionPlan,
    problem: &CudaAttention<'_, 'a>,
    o: DeviceTensorMut<'a>,
    lse: CudaViewMut<'a, f32>,
) -> Result<()> {
    let lowered = lower(problem, Some(plan))?;
    forward_lowered(ctx, stream, plan, &lowered, o, lse)
}

fn forward_lowered<'a>(
    ctx: &CudaContext,
    stream: &'a Arc<CudaStream>,
    plan: &CudaAttentionPlan,
    problem: &DeviceAttention<'a>,
    o: DeviceTensorMut<'a>,
    lse: CudaViewMut<'a, f32>,
) -> Result<()> {
    let prob = problem.validate()?;
    let d = prob.dims;
    expect_len("o", o.len(), d.q_len(), "B*T*H*D")?;
    expect_len("lse", lse.len(), d.lse_len(), "B*H*T")?;
    let o_f32 = output_is_f32("o", o.dtype(), prob.dtype)?;
    let exec = CudaExec::on_stream(ctx, stream.clone());
    // The outputs outlive the guards of `ptrs` (declared after them, dropped before).
    let (mut o, mut lse) = (o, lse);
    let mut ptrs = Pointers::new(stream);
    let addrs = ForwardAddrs {
        q: ptrs.tensor(problem.q),
        k: ptrs.tensor(problem.k),
        v: ptrs.tensor(problem.v),
        o: write_tensor(&mut ptrs, &mut o),
        o_f32,
        lse: ptrs.write(&mut lse),
    };
    check_inputs(&exec, stream, problem, [addrs.q, addrs.k, addrs.v], None)?;
    engine::forward(&exec, plan, &prob, &addrs)
}

/// The backward's inputs besides the problem: the forward's `o` and `lse`, and `do` (the inputs'
/// dtype).
#[derive(Clone, Copy)]
pub struct DeviceForwardState<'s, 'a> {
    /// `[B, T, H, D]`, f32 or the inputs' dtype.
    pub o: &'s CudaTensor<'a>,
    /// `[B, H, T]`, f32.
    pub lse: &'s CudaTensor<'a>,
    /// `[B, T, H, D]`, the inputs' dtype.
    pub d_o: &'s CudaTensor<'a>,
}

/// [`DeviceForwardState`] lowered to slices.
#[derive(Clone, Copy)]
struct LoweredState<'a> {
    o: TypedSlice<'a>,
    lse: DeviceSlice<'a, f32>,
    d_o: TypedSlice<'a>,
}

fn lower_state<'a>(
    problem: &DeviceAttention<'a>,
    state: &DeviceForwardState<'_, 'a>,
) -> Result<LoweredState<'a>> {
    let d = problem.dims;
    let bthd = ["B", "T", "H", "D"];
    expect_shape_of("o", state.o, &bthd, &[d.b, d.t, d.h, d.d])?;
    expect_shape_of("lse", state.lse, &["B", "H", "T"], &[d.b, d.h, d.t])?;
    expect_shape_of("do", state.d_o, &bthd, &[d.b, d.t, d.h, d.d])?;
    Ok(LoweredState {
        o: state.o.data(),
        lse: state.lse.f32_slice("lse", "the forward's log-sum-exp")?,
        d_o: state.d_o.data(),
    })
}

/// Gradients, written in place: all f32 or all the inputs' dtype.
pub struct DeviceGrads<'a> {
    pub dq: DeviceTensorMut<'a>,
    pub dk: DeviceTensorMut<'a>,
    pub dv: DeviceTensorMut<'a>,
}

/// Backward pass: `delta = rowsum(do * o)` (a `B * H * T` f32 workspace allocated on the stream),
/// dQ over the plan's rows, dK / dV over its columns; no atomics. Launched on `stream`.
pub fn backward<'a>(
    ctx: &CudaContext,
    stream: &'a Arc<CudaStream>,
    plan: &CudaAttentionPlan,
    problem: &CudaAttention<'_, 'a>,
    state: DeviceForwardState<'_, 'a>,
    grads: DeviceGrads<'a>,
) -> Result<()> {
    let lowered = lower(problem, Some(plan))?;
    let state = lower_state(&lowered, &state)?;
    backward_lowered(ctx, stream, plan, &lowered, state, grads)
}

fn backward_lowered<'a>(
    ctx: &CudaContext,
    stream: &'a Arc<CudaStream>,
    plan: &CudaAttentionPlan,
    problem: &DeviceAttention<'a>,
    state: LoweredState<'a>,
    grads: DeviceGrads<'a>,
) -> Result<()> {
    let prob = problem.validate()?;
    let d = prob.dims;
    expect_len("o", state.o.len(), d.q_len(), "B*T*H*D")?;
    expect_len("lse", state.lse.len(), d.lse_len(), "B*H*T")?;
    expect_len("do", state.d_o.len(), d.q_len(), "B*T*H*D")?;
    let o_f32 = output_is_f32("o", state.o.dtype(), prob.dtype)?;
    if state.d_o.dtype() != prob.dtype {
        return Err(Error::UnsupportedDtype {
            tensor: "do".into(),
            dtype: state.d_o.dtype(),
            backend: engine::BACKEND.into(),
            supported: format!("{} (the inputs' dtype)", prob.dtype),
        });
    }
    expect_len("dq", grads.dq.len(), d.q_len(), "B*T*H*D")?;
    expect_len("dk", grads.dk.len(), d.kv_len(), "B*S*H*D")?;
    expect_len("dv", grads.dv.len(), d.kv_len(), "B*S*H*D")?;
    let grad_f32 = output_is_f32("dq", grads.dq.dtype(), prob.dtype)?;
    for (name, g) in [("dk", &grads.dk), ("dv", &grads.dv)] {
        if g.dtype() != grads.dq.dtype() {
            return Err(Error::InvalidArgument(format!(
                "`{name}` is {} but `dq` is {}: the gradients share one dtype",
                g.dtype(),
                grads.dq.dtype()
            )));
        }
    }
    let mut delta = stream
        .alloc_zeros::<f32>(d.lse_len())
        .map_err(|e| Error::Runtime {
            backend: engine::BACKEND.into(),
            message: format!("allocating the delta workspace: {e:?}"),
        })?;
    let exec = CudaExec::on_stream(ctx, stream.clone());
    // The outputs outlive the guards of `ptrs` (declared after them, dropped before).
    let mut grads = grads;
    let mut ptrs = Pointers::new(stream);
    let addrs = BackwardAddrs {
        q: ptrs.tensor(problem.q),
        k: ptrs.tensor(problem.k),
        v: ptrs.tensor(problem.v),
        o: ptrs.tensor(state.o),
        o_f32,
        lse: ptrs.read(state.lse),
        d_o: ptrs.tensor(state.d_o),
        delta: ptrs.write_slice(&mut delta),
        dq: write_tensor(&mut ptrs, &mut grads.dq),
        dk: write_tensor(&mut ptrs, &mut grads.dk),
        dv: write_tensor(&mut ptrs, &mut grads.dv),
        grad_f32,
    };
    let result = check_inputs(
        &exec,
        stream,
        problem,
        [addrs.q, addrs.k, addrs.v],
        Some((addrs.d_o, state.d_o)),
    )
    .and_then(|()| engine::backward(&exec, plan, &prob, &addrs));
    drop(ptrs);
    drop(delta);
    result
}

/// The dense FlashAttention baseline's plan (computed lists, nothing uploaded) for `problem`.
pub fn dense_plan(problem: &CudaAttention) -> Result<CudaAttentionPlan> {
    let spec = problem.validate_layout()?;
    let d = spec.dims;
    DeviceAttentionPlan::dense(d.t, d.s, DENSE_BLOCK_Q, DENSE_BLOCK_K, problem.causal)
}

/// Dense FlashAttention-2 forward (every key, optionally causal): the library's baseline. The
/// problem must have no mask.
pub fn flash_attention_dense_forward<'a>(
    ctx: &CudaContext,
    stream: &'a Arc<CudaStream>,
    problem: &CudaAttention<'_, 'a>,
    o: DeviceTensorMut<'a>,
    lse: CudaViewMut<'a, f32>,
) -> Result<()> {
    expect_no_mask(problem)?;
    forward(ctx, stream, &dense_plan(problem)?, problem, o, lse)
}

/// Dense FlashAttention-2 backward (the baseline's gradients).
pub fn flash_attention_dense_backward<'a>(
    ctx: &CudaContext,
    stream: &'a Arc<CudaStream>,
    problem: &CudaAttention<'_, 'a>,
    state: DeviceForwardState<'_, 'a>,
    grads: DeviceGrads<'a>,
) -> Result<()> {
    expect_no_mask(problem)?;
    backward(ctx, stream, &dense_plan(problem)?, problem, state, grads)
}

fn expect_no_mask(problem: &CudaAttention) -> Result<()> {
    if problem.mask.is_some() {
        return Err(Error::InvalidArgument(
            "the dense baseline takes no mask: upload a plan from the mask and call `forward`"
                .into(),
        ));
    }
    Ok(())
}
