//! The host path: any burn backend without a device implementation (NdArray, Flex) reads its
//! tensors, runs linattn's f64 CPU reference, and writes the results back in the inputs' dtype.
//! A host copy is the point here: CPU users and CI run models without a GPU.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, TensorMetadata};
use burn::tensor::{DType, TensorData};
use linattn::attention::{self, Attention};
use linattn::lightnet::{self, LightNet};
use linattn::linear::{self, Gate, GateKind, LinearAttention};
use linattn::{Backend as LinattnDevice, Tensor};

use crate::config::{AttentionConfig, DecodeConfig, LightNetConfig, LinearConfig};

/// A burn tensor's values as an f64 host tensor.
fn read<B: Backend>(t: FloatTensor<B>) -> Tensor {
    let shape = t.shape().to_vec();
    let data = burn::tensor::read_sync(B::float_into_data(t))
        .unwrap_or_else(|e| panic!("linattn: reading a tensor to the host failed: {e:?}"));
    let values: Vec<f64> = data.iter::<f64>().collect();
    Tensor::from_f64(shape, values).expect("burn's shape matches its data")
}

/// A host tensor written back as a burn tensor of `dtype` on `device`.
fn write<B: Backend>(t: &Tensor, dtype: DType, device: &B::Device) -> FloatTensor<B> {
    let data = TensorData::new(t.to_f64_vec(), t.shape().to_vec()).convert_dtype(dtype);
    B::float_from_data(data, device)
}

/// A one-element placeholder gradient for an absent input.
fn placeholder<B: Backend>(dtype: DType, device: &B::Device) -> FloatTensor<B> {
    B::float_from_data(
        TensorData::new(vec![0.0f64], [1]).convert_dtype(dtype),
        device,
    )
}

fn gate<'a>(kind: GateKind, t: &'a Tensor) -> Gate<'a> {
    match kind {
        GateKind::None => Gate::None,
        GateKind::PerHead => Gate::PerHead(t),
        GateKind::Scalar => Gate::Scalar(t),
        GateKind::Vector => Gate::Vector(t),
    }
}

struct HostInputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    g_bwd: Tensor,
    h0: Tensor,
    cu_seqlens: Option<Vec<i64>>,
}

impl HostInputs {
    /// The engine inputs `[q, k, v, g, g_bwd, h0]` read to the host.
    fn read<B: Backend>(inputs: [FloatTensor<B>; 6], config: &LinearConfig) -> HostInputs {
        let [q, k, v, g, g_bwd, h0] = inputs.map(read::<B>);
        HostInputs {
            q,
            k,
            v,
            g,
            g_bwd,
            h0,
            cu_seqlens: config.cu_seqlens(),
        }
    }

    fn problem(&self, config: &LinearConfig) -> LinearAttention<'_> {
        let spec = &config.spec;
        let mut p = match spec.direction {
            linear::Direction::Causal => LinearAttention::causal(&self.q, &self.k, &self.v),
            linear::Direction::Bidirectional => {
                LinearAttention::bidirectional(&self.q, &self.k, &self.v)
            }
        }
        .with_gate(gate(spec.gate_kind, &self.g))
        .with_scale(spec.scale);
        if spec.has_gate_bwd {
            p = p.with_gate_bwd(gate(spec.gate_kind, &self.g_bwd));
        }
        if let Some(eps) = spec.normalize {
            p = p.with_normalize(eps);
        }
        if spec.has_h0 {
            p = p.with_h0(&self.h0);
        }
        if let Some(cu) = self.cu_seqlens.as_deref() {
            p = p.with_cu_seqlens(cu);
        }
        p
    }
}

fn expect_ok<T>(r: linattn::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("linattn: {e}"))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    g: FloatTensor<B>,
    g_bwd: FloatTensor<B>,
    h0: FloatTensor<B>,
    config: &LinearConfig,
) -> FloatTensor<B> {
    let (dtype, device) = (q.dtype(), q.device());
    let inputs = HostInputs::read::<B>([q, k, v, g, g_bwd, h0], config);
    let out = expect_ok(linear::forward(
        &LinattnDevice::Cpu,
        &inputs.problem(config),
        config.form,
    ));
    let packed = if config.final_state {
        let mut flat = out.o.to_f64_vec();
        flat.extend(out.ht.expect("a causal problem has ht").to_f64_vec());
        let n = flat.len();
        Tensor::from_f64(vec![n], flat).expect("sized above")
    } else {
        out.o
    };
    write::<B>(&packed, dtype, &device)
}

#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) fn linear_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    g: FloatTensor<B>,
    g_bwd: FloatTensor<B>,
    h0: FloatTensor<B>,
    d_o: FloatTensor<B>,
    d_ht: FloatTensor<B>,
    config: &LinearConfig,
) -> (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
) {
    let device = q.device();
    let dtypes = [&q, &k, &v, &g, &g_bwd, &h0].map(|t| t.dtype());
    let inputs = HostInputs::read::<B>([q, k, v, g, g_bwd, h0], config);
    let d_o = read::<B>(d_o);
    let d_ht = config.final_state.then(|| read::<B>(d_ht));
    let grads = expect_ok(linear::backward(
        &LinattnDevice::Cpu,
        &inputs.problem(config),
        config.form,
        &d_o,
        d_ht.as_ref(),
    ));
    let out = |t: Option<&Tensor>, dtype: DType| match t {
        Some(t) => write::<B>(t, dtype, &device),
        None => placeholder::<B>(dtype, &device),
    };
    (
        out(Some(&grads.dq), dtypes[0]),
        out(Some(&grads.dk), dtypes[1]),
        out(Some(&grads.dv), dtypes[2]),
        out(grads.dg.as_ref(), dtypes[3]),
        out(grads.dg_bwd.as_ref(), dtypes[4]),
        out(grads.dh0.as_ref(), dtypes[5]),
    )
}

pub(crate) fn lightnet_problem<'a>(
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    state: Option<(&'a Tensor, &'a Tensor)>,
    cu: Option<&'a [i64]>,
    config: &LightNetConfig,
) -> LightNet<'a> {
    let mut p = if config.spec.bidirectional {
        LightNet::non_causal(q, k, v)
    } else {
        LightNet::causal(q, k, v)
    }
    .with_scale(config.spec.scale);
    if let Some((s, z)) = state {
        p = p.with_initial_state(s, z);
    }
    if let Some(cu) = cu {
        p = p.with_cu_seqlens(cu);
    }
    p
}

pub(crate) fn lightnet_forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    s0: FloatTensor<B>,
    z0: FloatTensor<B>,
    config: &LightNetConfig,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (dtype, device) = (q.dtype(), q.device());
    let (q, k, v, s0, z0) = (
        read::<B>(q),
        read::<B>(k),
        read::<B>(v),
        read::<B>(s0),
        read::<B>(z0),
    );
    let cu = config.cu_seqlens();
    let state = config.spec.has_initial_state.then_some((&s0, &z0));
    let p = lightnet_problem(&q, &k, &v, state, cu.as_deref(), config);
    let out = expect_ok(lightnet::forward(&LinattnDevice::Cpu, &p, config.form));
    let state = match (config.final_state, out.state) {
        (true, Some(st)) => {
            let mut flat = st.s.to_f64_vec();
            flat.extend(st.z.to_f64_vec());
            let n = flat.len();
            write::<B>(
                &Tensor::from_f64(vec![n], flat).expect("sized"),
                dtype,
                &device,
            )
        }
        _ => placeholder::<B>(dtype, &device),
    };
    (write::<B>(&out.o, dtype, &device), state)
}

pub(crate) fn lightnet_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    s0: FloatTensor<B>,
    z0: FloatTensor<B>,
    d_o: FloatTensor<B>,
    config: &LightNetConfig,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let device = q.device();
    let dtypes = [&q, &k, &v].map(|t| t.dtype());
    let (q, k, v, s0, z0) = (
        read::<B>(q),
        read::<B>(k),
        read::<B>(v),
        read::<B>(s0),
        read::<B>(z0),
    );
    let d_o = read::<B>(d_o);
    let cu = config.cu_seqlens();
    let state = config.spec.has_initial_state.then_some((&s0, &z0));
    let p = lightnet_problem(&q, &k, &v, state, cu.as_deref(), config);
    let g = expect_ok(lightnet::backward(
        &LinattnDevice::Cpu,
        &p,
        config.form,
        &d_o,
    ));
    (
        write::<B>(&g.dq, dtypes[0], &device),
        write::<B>(&g.dk, dtypes[1], &device),
        write::<B>(&g.dv, dtypes[2], &device),
    )
}

pub(crate) fn decode_step<B: Backend>(
    state: FloatTensor<B>,
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    g: FloatTensor<B>,
    config: &DecodeConfig,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (dtype, state_dtype, device) = (q.dtype(), state.dtype(), q.device());
    let (state, q, k, v, g) = (
        read::<B>(state),
        read::<B>(q),
        read::<B>(k),
        read::<B>(v),
        read::<B>(g),
    );
    let out = expect_ok(linear::decode_step(
        &LinattnDevice::Cpu,
        &state,
        &q,
        &k,
        &v,
        gate(config.gate, &g),
        Some(config.scale),
    ));
    (
        write::<B>(&out.o, dtype, &device),
        write::<B>(&out.state, state_dtype, &device),
    )
}

pub(crate) fn attention_forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    config: &AttentionConfig,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (dtype, device) = (q.dtype(), q.device());
    let (q, k, v) = (read::<B>(q), read::<B>(k), read::<B>(v));
    let p = attention_problem(&q, &k, &v, config);
    let out = expect_ok(attention::forward(&LinattnDevice::Cpu, &p));
    (
        write::<B>(&out.o, dtype, &device),
        write::<B>(&out.lse, DType::F32, &device),
    )
}

fn attention_problem<'a>(
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    config: &'a AttentionConfig,
) -> Attention<'a> {
    let mut p = Attention::dense(q, k, v)
        .with_causal(config.spec.causal)
        .with_scale(config.spec.scale);
    if let Some(mask) = config.mask.as_deref() {
        p = p.with_mask(mask);
    }
    p
}

pub(crate) fn attention_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    _o: FloatTensor<B>,
    _lse: FloatTensor<B>,
    d_o: FloatTensor<B>,
    config: &AttentionConfig,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    // The reference recomputes the forward statistics itself.
    let device = q.device();
    let dtypes = [&q, &k, &v].map(|t| t.dtype());
    let (q, k, v, d_o) = (read::<B>(q), read::<B>(k), read::<B>(v), read::<B>(d_o));
    let p = attention_problem(&q, &k, &v, config);
    let g = expect_ok(attention::backward(&LinattnDevice::Cpu, &p, &d_o));
    (
        write::<B>(&g.dq, dtypes[0], &device),
        write::<B>(&g.dk, dtypes[1], &device),
        write::<B>(&g.dv, dtypes[2], &device),
    )
}

pub(crate) fn fused_step<B: Backend>(
    grads: FloatTensor<B>,
    state: &crate::optim::OptimHandle,
) -> FloatTensor<B> {
    let device = grads.device();
    let grads = read::<B>(grads);
    let n = grads.numel();
    let out = crate::optim::host_step(state, n, grads.to_f64_vec());
    write::<B>(
        &Tensor::from_f64(vec![n], out).expect("sized"),
        DType::F32,
        &device,
    )
}
