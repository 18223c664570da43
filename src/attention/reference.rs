//! The CPU backend: the f64 reference of `linattn-reference`, behind the validated API.

use linattn_reference::attention as reference;

use super::{Attention, AttnGrads, AttnOutput, AttnSpec};
use crate::tensor::Tensor;

struct F64Inputs {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
}

impl F64Inputs {
    fn new(args: &Attention) -> Self {
        F64Inputs {
            q: args.q.to_f64_vec(),
            k: args.k.to_f64_vec(),
            v: args.v.to_f64_vec(),
        }
    }

    fn problem<'a>(&'a self, spec: &AttnSpec, args: &Attention<'a>) -> reference::AttnProblem<'a> {
        reference::AttnProblem {
            dims: spec.dims,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            scale: spec.scale,
            causal: spec.causal,
            mask: args.mask,
        }
    }
}

pub(super) fn forward(spec: &AttnSpec, args: &Attention) -> AttnOutput {
    let inputs = F64Inputs::new(args);
    let out = reference::forward(&inputs.problem(spec, args));
    AttnOutput {
        o: Tensor::f64_unchecked(spec.o_shape(), out.o),
        lse: Tensor::f64_unchecked(spec.lse_shape(), out.lse),
    }
}

pub(super) fn backward(spec: &AttnSpec, args: &Attention, d_o: &Tensor) -> AttnGrads {
    let inputs = F64Inputs::new(args);
    let grads = reference::backward(&inputs.problem(spec, args), &d_o.to_f64_vec());
    let like = |t: &Tensor, data| Tensor::f64_unchecked(t.shape().to_vec(), data);
    AttnGrads {
        dq: like(args.q, grads.dq),
        dk: like(args.k, grads.dk),
        dv: like(args.v, grads.dv),
    }
}
