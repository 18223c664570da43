//! The CUDA path: linattn's hand-written kernels on candle's own CUDA buffers and stream.
//!
//! A candle CUDA tensor is a `CudaSlice` plus a layout; the packed arguments of the ops are
//! contiguous, so each input is a [`DeviceSlice`] (the storage's slice, from the layout's start
//! offset plus the piece's offset in the pack). The output is one f32 buffer allocated on
//! candle's stream, split into the op's outputs with `split_at_mut`, filled by linattn's device
//! API on that stream ([`linattn::cuda::CudaContext::from_stream`]) and handed to candle as its
//! storage. Nothing goes through the host; the values were checked before the op with candle's
//! own ops, so linattn's device check is off here.

use std::ops::Range;

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, DType as CDType, Layout, Shape};
use cudarc::driver::{CudaSlice, CudaViewMut};
use half::{bf16, f16};
use linattn::cuda::CudaContext;
use linattn::linear::cuda::device::{
    self, CudaLinearAttention, CudaTensor, DeviceBackward, DeviceForward, DeviceSlice, TypedSlice,
};
use linattn::linear::{Gate, GateKind, LinearAttention};
use linattn::{Error, Result, ValueCheck};

use crate::convert::{from_candle, ranges};
use crate::linear::Problem;

/// A contiguous run of a candle CUDA storage, typed.
pub(crate) enum DeviceRun<'a> {
    BF16(&'a CudaSlice<bf16>, usize),
    F16(&'a CudaSlice<f16>, usize),
    F32(&'a CudaSlice<f32>, usize),
}

impl<'a> DeviceRun<'a> {
    /// The elements of a contiguous tensor (`layout`) in `storage`.
    pub(crate) fn of(storage: &'a CudaStorage, layout: &Layout) -> Result<Self> {
        let Some((start, _)) = layout.contiguous_offsets() else {
            return Err(Error::InvalidArgument(
                "a packed argument must be contiguous".into(),
            ));
        };
        Ok(match storage.dtype() {
            CDType::BF16 => DeviceRun::BF16(storage.as_cuda_slice().map_err(from_candle)?, start),
            CDType::F16 => DeviceRun::F16(storage.as_cuda_slice().map_err(from_candle)?, start),
            CDType::F32 => DeviceRun::F32(storage.as_cuda_slice().map_err(from_candle)?, start),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unsupported dtype {other:?} in a packed argument"
                )));
            }
        })
    }

    /// Elements `range` of the run, in its dtype, seen with `shape`.
    pub(crate) fn tensor(&self, range: Range<usize>, shape: Vec<usize>) -> Result<CudaTensor<'a>> {
        let slice = match *self {
            DeviceRun::BF16(s, at) => {
                TypedSlice::BF16(DeviceSlice::range(s, at + range.start, range.len())?)
            }
            DeviceRun::F16(s, at) => {
                TypedSlice::F16(DeviceSlice::range(s, at + range.start, range.len())?)
            }
            DeviceRun::F32(s, at) => {
                TypedSlice::F32(DeviceSlice::range(s, at + range.start, range.len())?)
            }
        };
        CudaTensor::new(slice, shape)
    }

    /// Elements `range` of an f32 run, seen with `shape`.
    pub(crate) fn f32(&self, range: Range<usize>, shape: Vec<usize>) -> Result<CudaTensor<'a>> {
        match *self {
            DeviceRun::F32(s, at) => {
                CudaTensor::new(DeviceSlice::range(s, at + range.start, range.len())?, shape)
            }
            _ => Err(Error::InvalidArgument(
                "an f32 packed argument is of another dtype".into(),
            )),
        }
    }
}

/// linattn's context on the storage's device and candle's stream.
pub(crate) fn context(storage: &CudaStorage) -> Result<CudaContext> {
    CudaContext::from_stream(storage.device().cuda_stream())
}

fn runtime(e: cudarc::driver::DriverError) -> Error {
    Error::Runtime {
        backend: "cuda".into(),
        message: e.to_string(),
    }
}

/// One packed f32 output as candle storage on `like`'s device, with its flat shape.
fn packed_output(out: CudaSlice<f32>, like: &CudaStorage) -> (CudaStorage, Shape) {
    let n = out.len();
    (
        CudaStorage::wrap_cuda_slice(out, like.device().clone()),
        Shape::from(n),
    )
}

/// The packed arguments as CUDA tensors in the problem's shapes.
struct LinearViews<'a> {
    q: CudaTensor<'a>,
    k: CudaTensor<'a>,
    v: CudaTensor<'a>,
    g: Option<CudaTensor<'a>>,
    g_bwd: Option<CudaTensor<'a>>,
    h0: Option<CudaTensor<'a>>,
}

impl<'a> LinearViews<'a> {
    fn of(p: &Problem, qkv: &DeviceRun<'a>, params: &DeviceRun<'a>) -> Result<Self> {
        let r = ranges(&p.qkv_lens());
        let pr = ranges(&p.param_lens());
        let d = p.spec.dims;
        let gate_shape = match p.spec.gate_kind {
            GateKind::PerHead => vec![d.h],
            GateKind::Scalar => vec![d.b, d.t, d.h],
            _ => vec![d.b, d.t, d.h, d.k],
        };
        let f32_part = |range: &Range<usize>, shape: Vec<usize>| {
            (!range.is_empty())
                .then(|| params.f32(range.clone(), shape))
                .transpose()
        };
        Ok(LinearViews {
            q: qkv.tensor(r[0].clone(), vec![d.b, d.t, d.h, d.k])?,
            k: qkv.tensor(r[1].clone(), vec![d.b, d.t, d.h, d.k])?,
            v: qkv.tensor(r[2].clone(), vec![d.b, d.t, d.h, d.v])?,
            g: f32_part(&pr[0], gate_shape.clone())?,
            g_bwd: f32_part(&pr[1], gate_shape)?,
            h0: f32_part(&pr[2], p.spec.state_shape())?,
        })
    }

    /// linattn's builder over these tensors. The values were checked with candle ops before the
    /// op ran: no device-side check.
    fn problem<'b>(&'b self, p: &'b Problem) -> CudaLinearAttention<'b, 'a> {
        let gate = |t: Option<&'b CudaTensor<'a>>| match (p.spec.gate_kind, t) {
            (GateKind::PerHead, Some(t)) => Gate::PerHead(t),
            (GateKind::Scalar, Some(t)) => Gate::Scalar(t),
            (GateKind::Vector, Some(t)) => Gate::Vector(t),
            _ => Gate::None,
        };
        LinearAttention {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            gate: gate(self.g.as_ref()),
            gate_bwd: self.g_bwd.as_ref().map(|g| gate(Some(g))),
            direction: p.spec.direction,
            scale: Some(p.spec.scale),
            normalize: p.spec.normalize,
            h0: self.h0.as_ref(),
            cu_seqlens: p.cu_seqlens.as_deref(),
            value_check: ValueCheck::Off,
        }
    }
}

/// The engine forward on candle's buffers: packed f32 `o|ht`.
pub(crate) fn linear_forward(
    p: &Problem,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let ctx = context(s1)?;
    let stream = ctx.stream().clone();
    let (qkv, params) = (DeviceRun::of(s1, l1)?, DeviceRun::of(s2, l2)?);
    let views = LinearViews::of(p, &qkv, &params)?;
    let problem = views.problem(p);
    let [o_len, ht_len] = p.out_lens();
    let mut out = stream.alloc_zeros::<f32>(o_len + ht_len).map_err(runtime)?;
    {
        let (o, ht) = out.split_at_mut(o_len);
        let ht = (ht_len > 0).then_some(ht);
        device::forward(&ctx, &stream, &problem, p.form, DeviceForward { o, ht })?;
    }
    Ok(packed_output(out, s1))
}

/// The engine backward on candle's buffers: packed f32 `dq|dk|dv|dg|dg_bwd|dh0`.
pub(crate) fn linear_backward(
    p: &Problem,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let ctx = context(s1)?;
    let stream = ctx.stream().clone();
    let (qkv, params, cot) = (
        DeviceRun::of(s1, l1)?,
        DeviceRun::of(s2, l2)?,
        DeviceRun::of(s3, l3)?,
    );
    let views = LinearViews::of(p, &qkv, &params)?;
    let problem = views.problem(p);
    let co = ranges(&p.out_lens());
    let d_o = cot.tensor(co[0].clone(), p.spec.o_shape())?;
    let d_ht = if co[1].is_empty() {
        None
    } else {
        Some(cot.f32(co[1].clone(), p.spec.state_shape())?)
    };
    let lens: Vec<usize> = p.qkv_lens().into_iter().chain(p.param_lens()).collect();
    let total: usize = lens.iter().sum();
    let mut out = stream.alloc_zeros::<f32>(total).map_err(runtime)?;
    {
        // The one buffer cut into the six gradients, in pack order (each split borrows the
        // remainder before it; all six views live to the end of this block).
        let (dq, mut r1) = out.split_at_mut(lens[0]);
        let (dk, mut r2) = r1.split_at_mut(lens[1]);
        let (dv, mut r3) = r2.split_at_mut(lens[2]);
        let (dg, mut r4) = r3.split_at_mut(lens[3]);
        let (dg_bwd, dh0) = r4.split_at_mut(lens[4]);
        fn present(v: CudaViewMut<'_, f32>) -> Option<CudaViewMut<'_, f32>> {
            (!v.is_empty()).then_some(v)
        }
        device::backward(
            &ctx,
            &stream,
            &problem,
            p.form,
            &d_o,
            d_ht.as_ref(),
            DeviceBackward {
                dq,
                dk,
                dv,
                dg: present(dg),
                dg_bwd: present(dg_bwd),
                dh0: present(dh0),
            },
        )?;
    }
    Ok(packed_output(out, s1))
}

/// The CUDA attention kernels' dtypes (bf16, f16) and head dims (64, 128).
pub(crate) fn check_attention_support(spec: &linattn::attention::AttnSpec) -> Result<()> {
    linattn::attention::cuda::check_support(spec.dtype, spec.dims.d)
}

/// The plan of an attention problem on candle's stream (the mask's block lists uploaded; the
/// dense mode computes its lists in the kernels).
fn attention_plan(
    ctx: &CudaContext,
    p: &crate::attention::Problem,
) -> Result<linattn::attention::cuda::CudaAttentionPlan> {
    let exec = linattn::cuda::exec::CudaExec::on_stream(ctx, ctx.stream().clone());
    linattn::attention::cuda::plan_for(&exec, &p.spec, p.mask.as_deref())
}

/// The packed `q|k|v` of an attention problem as CUDA tensors.
struct AttentionViews<'a> {
    q: CudaTensor<'a>,
    k: CudaTensor<'a>,
    v: CudaTensor<'a>,
}

impl<'a> AttentionViews<'a> {
    fn of(p: &crate::attention::Problem, qkv: &DeviceRun<'a>) -> Result<Self> {
        let r = ranges(&p.qkv_lens());
        let d = p.spec.dims;
        Ok(AttentionViews {
            q: qkv.tensor(r[0].clone(), vec![d.b, d.t, d.h, d.d])?,
            k: qkv.tensor(r[1].clone(), vec![d.b, d.s, d.h, d.d])?,
            v: qkv.tensor(r[2].clone(), vec![d.b, d.s, d.h, d.d])?,
        })
    }

    /// linattn's builder over these tensors (values checked with candle ops before the op ran).
    fn problem<'b>(
        &'b self,
        p: &'b crate::attention::Problem,
    ) -> linattn::attention::cuda::device::CudaAttention<'b, 'a> {
        let mut args = linattn::attention::Attention::dense(&self.q, &self.k, &self.v)
            .with_scale(p.spec.scale)
            .with_causal(p.spec.causal)
            .with_value_check(ValueCheck::Off);
        if let Some(mask) = p.mask.as_deref() {
            args = args.with_mask(mask);
        }
        args
    }
}

/// Attention forward on candle's buffers: packed f32 `o|lse`.
pub(crate) fn attention_forward(
    p: &crate::attention::Problem,
    s: &CudaStorage,
    l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    use linattn::attention::cuda::device::{self as attn, DeviceTensorMut};
    let ctx = context(s)?;
    let stream = ctx.stream().clone();
    let qkv = DeviceRun::of(s, l)?;
    let views = AttentionViews::of(p, &qkv)?;
    let problem = views.problem(p);
    let plan = attention_plan(&ctx, p)?;
    let [o_len, lse_len] = p.out_lens();
    let mut out = stream
        .alloc_zeros::<f32>(o_len + lse_len)
        .map_err(runtime)?;
    {
        let (o, lse) = out.split_at_mut(o_len);
        attn::forward(&ctx, &stream, &plan, &problem, DeviceTensorMut::F32(o), lse)?;
    }
    Ok(packed_output(out, s))
}

/// Attention backward on candle's buffers: packed f32 `dq|dk|dv` from the packed inputs, the
/// forward's packed `o|lse` and `do` (the inputs' dtype).
pub(crate) fn attention_backward(
    p: &crate::attention::Problem,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    use linattn::attention::cuda::device::{
        self as attn, DeviceForwardState, DeviceGrads, DeviceTensorMut,
    };
    let ctx = context(s1)?;
    let stream = ctx.stream().clone();
    let (qkv, fwd, cot) = (
        DeviceRun::of(s1, l1)?,
        DeviceRun::of(s2, l2)?,
        DeviceRun::of(s3, l3)?,
    );
    let views = AttentionViews::of(p, &qkv)?;
    let problem = views.problem(p);
    let fr = ranges(&p.out_lens());
    let (o, lse, d_o) = (
        fwd.tensor(fr[0].clone(), p.spec.o_shape())?,
        fwd.f32(fr[1].clone(), p.spec.lse_shape())?,
        cot.tensor(0..p.out_lens()[0], p.spec.o_shape())?,
    );
    let state = DeviceForwardState {
        o: &o,
        lse: &lse,
        d_o: &d_o,
    };
    let plan = attention_plan(&ctx, p)?;
    let lens = p.qkv_lens();
    let total: usize = lens.iter().sum();
    let mut out = stream.alloc_zeros::<f32>(total).map_err(runtime)?;
    {
        let (dq, mut rest) = out.split_at_mut(lens[0]);
        let (dk, dv) = rest.split_at_mut(lens[1]);
        attn::backward(
            &ctx,
            &stream,
            &plan,
            &problem,
            state,
            DeviceGrads {
                dq: DeviceTensorMut::F32(dq),
                dk: DeviceTensorMut::F32(dk),
                dv: DeviceTensorMut::F32(dv),
            },
        )?;
    }
    Ok(packed_output(out, s1))
}

/// A packed argument copied to the host.
enum HostOwned {
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl HostOwned {
    fn download(
        run: &DeviceRun,
        len: usize,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<Self> {
        Ok(match *run {
            DeviceRun::BF16(s, at) => {
                HostOwned::BF16(stream.clone_dtoh(&s.slice(at..at + len)).map_err(runtime)?)
            }
            DeviceRun::F16(s, at) => {
                HostOwned::F16(stream.clone_dtoh(&s.slice(at..at + len)).map_err(runtime)?)
            }
            DeviceRun::F32(s, at) => {
                HostOwned::F32(stream.clone_dtoh(&s.slice(at..at + len)).map_err(runtime)?)
            }
        })
    }

    fn run(&self) -> crate::convert::HostRun<'_> {
        match self {
            HostOwned::BF16(v) => crate::convert::HostRun::BF16(v),
            HostOwned::F16(v) => crate::convert::HostRun::F16(v),
            HostOwned::F32(v) => crate::convert::HostRun::F32(v),
        }
    }
}

/// Runs `f` on host copies of `args` with linattn's `cuda` backend (for the ops whose linattn
/// implementation has host stages: LightNet's key transform), and uploads its f32 result.
pub(crate) fn through_host(
    args: &[(&CudaStorage, &Layout)],
    f: impl FnOnce(&linattn::Backend, &[crate::convert::HostRun]) -> Result<Vec<f32>>,
) -> Result<(CudaStorage, Shape)> {
    let first = args
        .first()
        .ok_or_else(|| Error::InvalidArgument("no argument".into()))?
        .0;
    let ctx = context(first)?;
    let stream = ctx.stream().clone();
    let owned = args
        .iter()
        .map(|&(s, l)| {
            let len = l.shape().elem_count();
            HostOwned::download(&DeviceRun::of(s, l)?, len, &stream)
        })
        .collect::<Result<Vec<_>>>()?;
    let runs: Vec<_> = owned.iter().map(HostOwned::run).collect();
    let out = f(&linattn::Backend::Cuda(ctx.clone()), &runs)?;
    let slice = stream.clone_htod(&out).map_err(runtime)?;
    Ok(packed_output(slice, first))
}

/// The fused optimizer on candle's CUDA buffers.
pub(crate) mod optim {
    use candle_core::backprop::GradStore;
    use candle_core::{CudaDevice, CudaStorage, DType as CDType, Storage, Tensor, Var};
    use linattn::cuda::CudaContext;
    use linattn::cuda::exec::{CudaExec, Executor};
    use linattn::optim::cuda::CudaOptimizer;
    use linattn::optim::{OptimizerConfig, Schedule, StepRecord};
    use linattn::{Error, Result};

    use super::DeviceSlice;
    use crate::convert::from_candle;

    pub(crate) struct CudaState {
        /// Launches on candle's stream (its executor keeps the context).
        opt: CudaOptimizer<CudaExec>,
        device: CudaDevice,
    }

    /// A tensor's f32 values, contiguous, as (storage, start offset); the tensor keeps them.
    fn f32_contiguous(t: &Tensor) -> Result<Tensor> {
        t.flatten_all()
            .and_then(|t| t.to_dtype(CDType::F32))
            .and_then(|t| t.contiguous())
            .map_err(from_candle)
    }

    impl CudaState {
        pub(crate) fn new(
            device: &CudaDevice,
            vars: &[Var],
            decay: &[bool],
            config: &OptimizerConfig,
            schedule: &Schedule,
            capacity: usize,
        ) -> Result<Self> {
            let ctx = CudaContext::from_stream(device.cuda_stream())?;
            // The first state comes from the variables' values: one upload.
            let params = vars
                .iter()
                .map(|v| {
                    f32_contiguous(v.as_tensor())
                        .and_then(|t| t.to_vec1::<f32>().map_err(from_candle))
                })
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&[f32]> = params.iter().map(Vec::as_slice).collect();
            let exec = CudaExec::on_stream(&ctx, ctx.stream().clone());
            let opt = CudaOptimizer::new(exec, config, schedule, capacity, &refs, decay)?;
            Ok(CudaState {
                opt,
                device: device.clone(),
            })
        }

        pub(crate) fn step(&mut self, vars: &[Var], grads: &GradStore) -> Result<()> {
            let layout = self.opt.layout().clone();
            // Missing gradients are zero; the padding stays zero.
            {
                let exec = self.opt.exec().clone();
                exec.zero(self.opt.grad_buffer_mut())?;
            }
            for (i, v) in vars.iter().enumerate() {
                let Some(g) = grads.get(v.as_tensor()) else {
                    continue;
                };
                let g = f32_contiguous(g)?;
                let (storage, layout_g) = g.storage_and_layout();
                let Storage::Cuda(cs) = &*storage else {
                    return Err(Error::InvalidArgument(format!(
                        "the gradient of vars[{i}] is not on the CUDA device"
                    )));
                };
                let slice = cs.as_cuda_slice::<f32>().map_err(from_candle)?;
                let n = layout.sizes[i];
                let run = DeviceSlice::range(slice, layout_g.start_offset(), n).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "the gradient of vars[{i}] has fewer than {n} elements"
                    ))
                })?;
                // Device to device, on candle's stream (the optimizer's).
                self.opt.set_grad_device(i, run)?;
            }
            self.opt.step()?;
            // The new weights back into the variables, device to device.
            for (i, v) in vars.iter().enumerate() {
                let out = self.opt.param_slice(i)?;
                let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.device.clone()));
                let t = Tensor::from_storage(
                    storage,
                    v.shape().clone(),
                    candle_core::op::BackpropOp::none(),
                    false,
                )
                .to_dtype(v.dtype())
                .map_err(from_candle)?;
                v.set(&t).map_err(from_candle)?;
            }
            Ok(())
        }

        pub(crate) fn history(&self) -> Result<Vec<StepRecord>> {
            self.opt.history()
        }
    }
}
