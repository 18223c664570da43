//! The host path: any burn backend without a device implementation (NdArray, Flex) reads its
//! tensors, runs linattn's f64 CPU reference, and writes the results back in the inputs' dtype.
//! A host copy is the point here: CPU users and CI run models without a GPU.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, TensorMetadata};
use burn::tensor::{DType, TensorData};
use linattn::linear::{self, Gate, GateKind, LinearAttention};
use linattn::{Backend as LinattnDevice, Tensor};

use crate::config::LinearConfig;

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
    let inputs = HostInputs {
        q: read::<B>(q),
        k: read::<B>(k),
        v: read::<B>(v),
        g: read::<B>(g),
        g_bwd: read::<B>(g_bwd),
        h0: read::<B>(h0),
        cu_seqlens: config.cu_seqlens(),
    };
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
    let inputs = HostInputs {
        q: read::<B>(q),
        k: read::<B>(k),
        v: read::<B>(v),
        g: read::<B>(g),
        g_bwd: read::<B>(g_bwd),
        h0: read::<B>(h0),
        cu_seqlens: config.cu_seqlens(),
    };
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
