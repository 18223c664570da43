//! The device path: linattn's CubeCL kernels on a `CubeBackend` tensor's own client and buffers.
//! Inputs are made contiguous on the device (burn views may be strided), wrapped as
//! [`DeviceTensor`]s without a copy, and the f32 results are converted on the device to the
//! inputs' dtype and wrapped back as `CubeTensor`s of the same device.

use burn::backend::tensor::FloatTensor;
use burn::tensor::{DType as BurnDType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use linattn::cube::{CubeContext, DeviceTensor, ValueCheck};
use linattn::lightnet::LightNet;
use linattn::lightnet::cube as lightnet_cube;
use linattn::linear::cube::{DeviceGate, DeviceLinearAttention, backward_device, forward_device};
use linattn::linear::{Direction, GateKind};
use linattn::{DType, Result};

use crate::backend::LinattnBackend;
use std::sync::{Arc, Mutex};

use linattn::attention::BlockMask;
use linattn::attention::cube::{CubeAttentionPlan, DeviceAttention};

use crate::config::{AttentionConfig, DecodeConfig, LightNetConfig, LinearConfig};
use crate::optim::{OptimHandle, OptimState};

fn expect_ok<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("linattn: {e}"))
}

pub(crate) fn dtype_of(dtype: BurnDType) -> Result<DType> {
    match dtype {
        BurnDType::F32 | BurnDType::Flex32 => Ok(DType::F32),
        BurnDType::F16 => Ok(DType::F16),
        BurnDType::BF16 => Ok(DType::BF16),
        other => Err(linattn::Error::InvalidArgument(format!(
            "linattn's kernels take f32, f16 or bf16 tensors, got {other:?}"
        ))),
    }
}

fn burn_dtype(dtype: DType) -> BurnDType {
    match dtype {
        DType::F32 => BurnDType::F32,
        DType::F16 => BurnDType::F16,
        DType::BF16 => BurnDType::BF16,
        DType::F64 => BurnDType::F64,
    }
}

/// A context over the tensor's own client: the kernels launch in burn's stream and allocate
/// from burn's memory pool.
fn context(t: &CubeTensor) -> CubeContext {
    CubeContext::from_client(t.client.clone(), format!("burn {:?}", t.device))
}

/// The tensor's buffer as a linattn device tensor (contiguous first; no copy when it already is).
fn device_tensor(t: CubeTensor) -> DeviceTensor {
    let t = into_contiguous(t);
    let dtype = expect_ok(dtype_of(t.dtype));
    expect_ok(DeviceTensor::from_handle(
        t.handle.clone(),
        t.meta.shape().to_vec(),
        dtype,
    ))
}

/// An f32 result as a burn tensor of `dtype` on `like`'s device.
fn wrap(ctx: &CubeContext, like: &CubeTensor, t: DeviceTensor, dtype: BurnDType) -> CubeTensor {
    let t = expect_ok(t.to_dtype(ctx, expect_ok(dtype_of(dtype))));
    let shape = Shape::from(t.shape().to_vec());
    let dtype = burn_dtype(t.dtype());
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        t.into_handle(),
        dtype,
    )
}

/// A one-element zero placeholder for an absent gradient.
fn placeholder(ctx: &CubeContext, like: &CubeTensor, dtype: BurnDType) -> CubeTensor {
    let zero =
        DeviceTensor::from_handle(linattn::cube::kernels::zeros(ctx, 1), vec![1], DType::F32);
    wrap(ctx, like, expect_ok(zero), dtype)
}

fn gate(kind: GateKind, t: &DeviceTensor) -> DeviceGate<'_> {
    match kind {
        GateKind::None => DeviceGate::None,
        GateKind::PerHead => DeviceGate::PerHead(t),
        GateKind::Scalar => DeviceGate::Scalar(t),
        GateKind::Vector => DeviceGate::Vector(t),
    }
}

struct Inputs {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    g: DeviceTensor,
    g_bwd: DeviceTensor,
    h0: DeviceTensor,
}

impl Inputs {
    /// The engine inputs `[q, k, v, g, g_bwd, h0]` as linattn device tensors.
    fn new(inputs: [CubeTensor; 6]) -> Inputs {
        let [q, k, v, g, g_bwd, h0] = inputs.map(device_tensor);
        Inputs {
            q,
            k,
            v,
            g,
            g_bwd,
            h0,
        }
    }

    fn problem<'a>(
        &'a self,
        config: &LinearConfig,
        cu: Option<&'a [i64]>,
    ) -> DeviceLinearAttention<'a> {
        let spec = &config.spec;
        let mut p = match spec.direction {
            Direction::Causal => DeviceLinearAttention::causal(&self.q, &self.k, &self.v),
            Direction::Bidirectional => {
                DeviceLinearAttention::bidirectional(&self.q, &self.k, &self.v)
            }
        }
        .with_gate(gate(spec.gate_kind, &self.g))
        .with_scale(spec.scale)
        // The public functions validated shapes before queueing this op; values are checked
        // there too (or not, when the caller opts out), never by a device read here.
        .with_value_check(ValueCheck::Off);
        if spec.has_gate_bwd {
            p = p.with_gate_bwd(gate(spec.gate_kind, &self.g_bwd));
        }
        if let Some(eps) = spec.normalize {
            p = p.with_normalize(eps);
        }
        if spec.has_h0 {
            p = p.with_h0(&self.h0);
        }
        if let Some(cu) = cu {
            p = p.with_cu_seqlens(cu);
        }
        p
    }
}

impl LinattnBackend for CubeBackend {
    fn linattn_linear_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        g_bwd: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        config: LinearConfig,
    ) -> FloatTensor<Self> {
        let ctx = context(&q);
        let (like, dtype) = (q.clone(), q.dtype);
        let inputs = Inputs::new([q, k, v, g, g_bwd, h0]);
        let cu = config.cu_seqlens();
        let out = expect_ok(forward_device(
            &ctx,
            &inputs.problem(&config, cu.as_deref()),
            config.form,
        ));
        let packed = if config.final_state {
            let ht = out
                .ht
                .expect("a causal problem without normalisation has ht");
            let handle = linattn::cube::kernels::concat_f32(
                &ctx,
                &[(out.o.handle(), out.o.numel()), (ht.handle(), ht.numel())],
            );
            let n = out.o.numel() + ht.numel();
            expect_ok(DeviceTensor::from_handle(handle, vec![n], DType::F32))
        } else {
            out.o
        };
        wrap(&ctx, &like, packed, dtype)
    }

    fn linattn_linear_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        g_bwd: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        d_ht: FloatTensor<Self>,
        config: LinearConfig,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let ctx = context(&q);
        let like = q.clone();
        let dtypes = [&q, &k, &v, &g, &g_bwd, &h0].map(|t| t.dtype);
        let inputs = Inputs::new([q, k, v, g, g_bwd, h0]);
        let d_o = device_tensor(d_o);
        let d_ht = config.final_state.then(|| device_tensor(d_ht));
        let cu = config.cu_seqlens();
        let grads = expect_ok(backward_device(
            &ctx,
            &inputs.problem(&config, cu.as_deref()),
            config.form,
            &d_o,
            d_ht.as_ref(),
        ));
        let out = |t: Option<DeviceTensor>, dtype| match t {
            Some(t) => wrap(&ctx, &like, t, dtype),
            None => placeholder(&ctx, &like, dtype),
        };
        (
            out(Some(grads.dq), dtypes[0]),
            out(Some(grads.dk), dtypes[1]),
            out(Some(grads.dv), dtypes[2]),
            out(grads.dg, dtypes[3]),
            out(grads.dg_bwd, dtypes[4]),
            out(grads.dh0, dtypes[5]),
        )
    }

    fn linattn_lightnet_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s0: FloatTensor<Self>,
        z0: FloatTensor<Self>,
        config: LightNetConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        lightnet_forward(q, k, v, s0, z0, &config)
    }

    fn linattn_lightnet_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        s0: FloatTensor<Self>,
        z0: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        config: LightNetConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        lightnet_backward(q, k, v, s0, z0, d_o, &config)
    }

    fn linattn_decode_step(
        state: FloatTensor<Self>,
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        g: FloatTensor<Self>,
        config: DecodeConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        decode_step(state, q, k, v, g, &config)
    }

    fn linattn_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        config: AttentionConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        attention_forward(q, k, v, &config)
    }

    fn linattn_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        o: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_o: FloatTensor<Self>,
        config: AttentionConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        attention_backward(q, k, v, o, lse, d_o, &config)
    }

    fn linattn_fused_step(grads: FloatTensor<Self>, state: OptimHandle) -> FloatTensor<Self> {
        fused_step(grads, &state)
    }
}

pub(crate) fn lightnet_forward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    s0: CubeTensor,
    z0: CubeTensor,
    config: &LightNetConfig,
) -> (CubeTensor, CubeTensor) {
    let ctx = context(&q);
    let (like, dtype) = (q.clone(), q.dtype);
    let (q, k, v) = (device_tensor(q), device_tensor(k), device_tensor(v));
    let (s0, z0) = (device_tensor(s0), device_tensor(z0));
    let cu = config.cu_seqlens();
    let p = lightnet_problem(&q, &k, &v, &s0, &z0, cu.as_deref(), config);
    let out = expect_ok(lightnet_cube::forward_device(&ctx, &p, config.form));
    let state = match (config.final_state, out.state) {
        (true, Some((s, z))) => {
            let handle = linattn::cube::kernels::concat_f32(
                &ctx,
                &[(s.handle(), s.numel()), (z.handle(), z.numel())],
            );
            let n = s.numel() + z.numel();
            let packed = expect_ok(DeviceTensor::from_handle(handle, vec![n], DType::F32));
            wrap(&ctx, &like, packed, dtype)
        }
        _ => placeholder(&ctx, &like, dtype),
    };
    (wrap(&ctx, &like, out.o, dtype), state)
}

fn lightnet_problem<'a>(
    q: &'a DeviceTensor,
    k: &'a DeviceTensor,
    v: &'a DeviceTensor,
    s0: &'a DeviceTensor,
    z0: &'a DeviceTensor,
    cu: Option<&'a [i64]>,
    config: &LightNetConfig,
) -> LightNet<'a, DeviceTensor> {
    let mut p = if config.spec.bidirectional {
        LightNet::non_causal(q, k, v)
    } else {
        LightNet::causal(q, k, v)
    }
    .with_scale(config.spec.scale)
    // Values were checked with burn ops before the op was queued (or the caller opted out).
    .with_value_check(ValueCheck::Off);
    if config.spec.has_initial_state {
        p = p.with_initial_state(s0, z0);
    }
    if let Some(cu) = cu {
        p = p.with_cu_seqlens(cu);
    }
    p
}

pub(crate) fn lightnet_backward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    s0: CubeTensor,
    z0: CubeTensor,
    d_o: CubeTensor,
    config: &LightNetConfig,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let ctx = context(&q);
    let like = q.clone();
    let dtypes = [&q, &k, &v].map(|t| t.dtype);
    let (q, k, v) = (device_tensor(q), device_tensor(k), device_tensor(v));
    let (s0, z0, d_o) = (device_tensor(s0), device_tensor(z0), device_tensor(d_o));
    let cu = config.cu_seqlens();
    let p = lightnet_problem(&q, &k, &v, &s0, &z0, cu.as_deref(), config);
    let g = expect_ok(lightnet_cube::backward_device(&ctx, &p, config.form, &d_o));
    (
        wrap(&ctx, &like, g.dq, dtypes[0]),
        wrap(&ctx, &like, g.dk, dtypes[1]),
        wrap(&ctx, &like, g.dv, dtypes[2]),
    )
}

pub(crate) fn decode_step(
    state: CubeTensor,
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    g: CubeTensor,
    config: &DecodeConfig,
) -> (CubeTensor, CubeTensor) {
    let ctx = context(&q);
    let (like, dtype, state_dtype) = (q.clone(), q.dtype, state.dtype);
    let mut state = device_tensor(state);
    let (q, k, v, g) = (
        device_tensor(q),
        device_tensor(k),
        device_tensor(v),
        device_tensor(g),
    );
    let token = linattn::linear::LinearAttention::causal(&q, &k, &v)
        .with_gate(gate(config.gate, &g))
        .with_scale(config.scale)
        .with_value_check(ValueCheck::Off);
    let o = expect_ok(linattn::linear::cube::decode_step_device(
        &ctx, &token, &mut state,
    ));
    (
        wrap(&ctx, &like, o, dtype),
        wrap(&ctx, &like, state, state_dtype),
    )
}

/// Uploaded attention plans, reused across calls with the same device, mask, `T`, `S` and
/// causal flag: the plan's CSR lists are host data (the mask), uploaded once, so a training
/// loop's steps move nothing. A small cache: the oldest plan is dropped past [`PLAN_CACHE`].
struct PlanEntry {
    device: String,
    mask: Option<Arc<BlockMask>>,
    t: usize,
    s: usize,
    causal: bool,
    plan: Arc<CubeAttentionPlan>,
}

const PLAN_CACHE: usize = 32;

fn attention_plan(
    ctx: &CubeContext,
    like: &CubeTensor,
    config: &AttentionConfig,
) -> Arc<CubeAttentionPlan> {
    static PLANS: Mutex<Vec<PlanEntry>> = Mutex::new(Vec::new());
    let d = config.spec.dims;
    let device = format!("{:?}", like.device);
    let mut plans = PLANS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(e) = plans.iter().find(|e| {
        e.device == device
            && e.mask == config.mask
            && (e.t, e.s, e.causal) == (d.t, d.s, config.spec.causal)
    }) {
        return e.plan.clone();
    }
    let plan = expect_ok(CubeAttentionPlan::from_mask(
        ctx,
        config.mask.as_deref(),
        d.t,
        d.s,
        config.spec.causal,
    ));
    let plan = Arc::new(plan);
    if plans.len() >= PLAN_CACHE {
        plans.remove(0);
    }
    plans.push(PlanEntry {
        device,
        mask: config.mask.clone(),
        t: d.t,
        s: d.s,
        causal: config.spec.causal,
        plan: plan.clone(),
    });
    plan
}

/// The problem over the tensors' device buffers: the values were checked with burn ops before
/// the op was queued (or the caller opted out), so no device-side value check here.
fn device_attention<'a>(
    q: &'a DeviceTensor,
    k: &'a DeviceTensor,
    v: &'a DeviceTensor,
    config: &'a AttentionConfig,
) -> DeviceAttention<'a> {
    let mut args = DeviceAttention::dense(q, k, v)
        .with_causal(config.spec.causal)
        .with_scale(config.spec.scale)
        .with_value_check(ValueCheck::Off);
    if let Some(mask) = config.mask.as_deref() {
        args = args.with_mask(mask);
    }
    args
}

pub(crate) fn attention_forward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    config: &AttentionConfig,
) -> (CubeTensor, CubeTensor) {
    let ctx = context(&q);
    let (like, dtype) = (q.clone(), q.dtype);
    let plan = attention_plan(&ctx, &like, config);
    let (q, k, v) = (device_tensor(q), device_tensor(k), device_tensor(v));
    let out = expect_ok(plan.forward(&device_attention(&q, &k, &v, config)));
    (
        wrap(&ctx, &like, out.o, dtype),
        wrap(&ctx, &like, out.lse, BurnDType::F32),
    )
}

pub(crate) fn attention_backward(
    q: CubeTensor,
    k: CubeTensor,
    v: CubeTensor,
    o: CubeTensor,
    lse: CubeTensor,
    d_o: CubeTensor,
    config: &AttentionConfig,
) -> (CubeTensor, CubeTensor, CubeTensor) {
    let ctx = context(&q);
    let like = q.clone();
    let dtypes = [&q, &k, &v].map(|t| t.dtype);
    let plan = attention_plan(&ctx, &like, config);
    let (q, k, v) = (device_tensor(q), device_tensor(k), device_tensor(v));
    // The backward widens 16-bit `o`, `lse` and `do` to f32 on the device.
    let (o, lse, d_o) = (device_tensor(o), device_tensor(lse), device_tensor(d_o));
    let g = expect_ok(plan.backward(&device_attention(&q, &k, &v, config), &o, &lse, &d_o));
    (
        wrap(&ctx, &like, g.dq, dtypes[0]),
        wrap(&ctx, &like, g.dk, dtypes[1]),
        wrap(&ctx, &like, g.dv, dtypes[2]),
    )
}

pub(crate) fn fused_step(grads: CubeTensor, handle: &OptimHandle) -> CubeTensor {
    let ctx = context(&grads);
    let like = grads.clone();
    let grads = device_tensor(grads);
    let mut state = handle.lock();
    if let OptimState::Pending {
        config,
        schedule,
        capacity,
        params,
        decay,
        restore,
    } = &*state
    {
        let borrowed: Vec<&[f32]> = params.iter().map(Vec::as_slice).collect();
        let mut fused = expect_ok(linattn::optim::cube::FusedOptimizer::new(
            &ctx, config, schedule, *capacity, &borrowed, decay,
        ));
        match restore {
            Some(crate::optim::SavedState::Device(saved)) => {
                expect_ok(fused.import_state(saved));
            }
            Some(crate::optim::SavedState::Host(_)) => {
                panic!("linattn: a CPU optimizer state cannot continue on a device")
            }
            None => {}
        }
        *state = OptimState::Cube(fused);
    }
    let OptimState::Cube(fused) = &mut *state else {
        panic!("linattn: this optimizer's state lives on the host; step it on a CPU device");
    };
    expect_ok(fused.set_grads_from_arena(&grads));
    expect_ok(fused.step());
    let params = expect_ok(fused.params_arena());
    wrap(&ctx, &like, params, BurnDType::F32)
}
