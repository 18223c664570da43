//! The CPU backend: the f64 reference of `linattn-reference`, behind the validated API.

use linattn_reference::lightnet as reference;

use super::{LightNet, LightNetFinalState, LightNetGrads, LightNetOutput, LightNetSpec};
use crate::linear::Form;
use crate::tensor::Tensor;

/// Owned f64 copies of the inputs, so that a reference problem can borrow them.
struct F64Inputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    state: Option<reference::LightNetState>,
}

impl F64Inputs {
    fn new(args: &LightNet) -> Self {
        F64Inputs {
            q: args.q.to_f64_vec(),
            k: args.k.to_f64_vec(),
            v: args.v.to_f64_vec(),
            state: args.initial_state.map(|st| reference::LightNetState {
                s: st.s.to_f64_vec(),
                z: st.z.to_f64_vec(),
            }),
        }
    }

    fn problem<'a>(&'a self, spec: &'a LightNetSpec) -> reference::LightNetProblem<'a> {
        reference::LightNetProblem {
            dims: spec.dims,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            scale: spec.scale,
            bidirectional: spec.bidirectional,
            initial_state: self.state.as_ref(),
            cu_seqlens: spec.cu_seqlens.as_deref(),
        }
    }
}

pub(super) fn forward(spec: &LightNetSpec, args: &LightNet, form: Form) -> LightNetOutput {
    let inputs = F64Inputs::new(args);
    let out = reference::forward(&inputs.problem(spec), form);
    LightNetOutput {
        o: Tensor::f64_unchecked(spec.o_shape(), out.o),
        state: out.state.map(|st| LightNetFinalState {
            s: Tensor::f64_unchecked(spec.s_shape(), st.s),
            z: Tensor::f64_unchecked(spec.z_shape(), st.z),
        }),
    }
}

pub(super) fn backward(
    spec: &LightNetSpec,
    args: &LightNet,
    form: Form,
    d_o: &Tensor,
) -> LightNetGrads {
    let inputs = F64Inputs::new(args);
    let grads = reference::backward(&inputs.problem(spec), form, &d_o.to_f64_vec());
    let like = |t: &Tensor, data: Vec<f64>| Tensor::f64_unchecked(t.shape().to_vec(), data);
    LightNetGrads {
        dq: like(args.q, grads.dq),
        dk: like(args.k, grads.dk),
        dv: like(args.v, grads.dv),
    }
}
