//! The CPU backend: the f64 reference of `linattn-reference`, behind the validated API.

use linattn_reference::linear as reference;

use super::{Form, Gate, Grads, LinearAttention, Output, Spec};
use crate::tensor::Tensor;

/// Owned f64 copies of the inputs, so that a reference [`reference::Problem`] can borrow them.
struct F64Inputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    g: Option<Vec<f64>>,
    g_bwd: Option<Vec<f64>>,
    h0: Option<Vec<f64>>,
}

impl F64Inputs {
    fn new(args: &LinearAttention) -> Self {
        let gate = |g: &Gate| g.tensor().map(Tensor::to_f64_vec);
        F64Inputs {
            q: args.q.to_f64_vec(),
            k: args.k.to_f64_vec(),
            v: args.v.to_f64_vec(),
            g: gate(&args.gate),
            g_bwd: args.gate_bwd.as_ref().and_then(gate),
            h0: args.h0.map(Tensor::to_f64_vec),
        }
    }

    fn problem<'a>(&'a self, spec: &'a Spec) -> reference::Problem<'a> {
        let g = self.g.as_deref().unwrap_or(&[]);
        reference::Problem {
            dims: spec.dims,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            gate: reference::Gate::from_kind(spec.gate_kind, g),
            gate_bwd: self
                .g_bwd
                .as_deref()
                .map(|gb| reference::Gate::from_kind(spec.gate_kind, gb)),
            direction: spec.direction,
            scale: spec.scale,
            normalize: spec.normalize,
            h0: self.h0.as_deref(),
            cu_seqlens: spec.cu_seqlens.as_deref(),
        }
    }
}

pub(super) fn forward(spec: &Spec, args: &LinearAttention, form: Form) -> Output {
    let inputs = F64Inputs::new(args);
    let out = reference::forward(&inputs.problem(spec), form);
    Output {
        o: Tensor::f64_unchecked(spec.o_shape(), out.o),
        ht: out
            .ht
            .map(|ht| Tensor::f64_unchecked(spec.state_shape(), ht)),
    }
}

pub(super) fn backward(
    spec: &Spec,
    args: &LinearAttention,
    form: Form,
    d_o: &Tensor,
    d_ht: Option<&Tensor>,
) -> Grads {
    let inputs = F64Inputs::new(args);
    let d_ht = d_ht.map(Tensor::to_f64_vec);
    let grads = reference::backward(
        &inputs.problem(spec),
        form,
        &d_o.to_f64_vec(),
        d_ht.as_deref(),
    );
    let like = |t: &Tensor, data: Vec<f64>| Tensor::f64_unchecked(t.shape().to_vec(), data);
    Grads {
        dq: like(args.q, grads.dq),
        dk: like(args.k, grads.dk),
        dv: like(args.v, grads.dv),
        dg: grads.dg.zip(args.gate.tensor()).map(|(d, g)| like(g, d)),
        dg_bwd: grads
            .dg_bwd
            .zip(args.gate_bwd.as_ref().and_then(|g| g.tensor()))
            .map(|(d, g)| like(g, d)),
        dh0: grads.dh0.zip(args.h0).map(|(d, h0)| like(h0, d)),
    }
}

pub(super) fn decode_step(
    dims: &super::Dims,
    state: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gate: &Gate,
    scale: f64,
) -> super::DecodeOutput {
    let mut s = state.to_f64_vec();
    let g = gate.tensor().map(Tensor::to_f64_vec);
    let o = reference::decode_step(
        dims,
        &mut s,
        &q.to_f64_vec(),
        &k.to_f64_vec(),
        &v.to_f64_vec(),
        reference::Gate::from_kind(gate.kind(), g.as_deref().unwrap_or(&[])),
        scale,
    );
    super::DecodeOutput {
        o: Tensor::f64_unchecked(vec![dims.b, 1, dims.h, dims.v], o),
        state: Tensor::f64_unchecked(state.shape().to_vec(), s),
    }
}
