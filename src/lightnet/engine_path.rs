//! LightNet through the public engine API of any backend: the additive gate transform (and, in the
//! backward pass, its adjoint) on the host in f64, the decayed linear attention in between on the
//! backend. This is how the `cuda` backend runs LightNet: the transform is an `O(B T H K)`
//! element-wise scan, the engine is where the `O(T K V)` work is, and the hand-written engine
//! kernels already cover vector gates, `h0`, varlen and both directions.
//!
//! Causal: `z_t = logaddexp(z_{t-1}, k_t)`, `khat_t = exp(k_t - z_t)`, `g_t = z_{t-1} - z_t`
//! (`linattn_reference::lightnet::additive_gate`, computed as `-softplus(k_t - z_{t-1})`), then the
//! causal engine with `k := khat`, vector gate `g`, `h0 := s0`; the final state is `(ht, z_T)`.
//! Non-causal: `khat = softmax_t(k)` per sequence, head and channel, then the bidirectional engine
//! without a gate (every pair `(t, u)` of a sequence once, the diagonal included).

use linattn_reference::lightnet::{
    AdditiveGate, additive_gate, additive_gate_backward, softmax_keys, softmax_keys_backward,
};

use super::{LightNet, LightNetFinalState, LightNetGrads, LightNetOutput, LightNetSpec};
use crate::backend::Backend;
use crate::error::Result;
use crate::linear::{self, Form, Gate, LinearAttention};
use crate::tensor::{DType, Tensor};

/// The engine's input dtype: the inputs' own when every engine accepts it, else f32 (the
/// transform's results are f64 on the host and enter the engine in that dtype).
fn engine_dtype(spec: &LightNetSpec) -> DType {
    match spec.dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

struct EngineInputs {
    q: Tensor,
    khat: Tensor,
    v: Tensor,
    g: Option<Tensor>,
    s0: Option<Tensor>,
    /// The transform in f64, kept for `z_T` and the adjoint.
    transform: Transform,
}

enum Transform {
    /// Causal: `khat`, `g` and `z_T`.
    Additive(AdditiveGate),
    /// Non-causal: the softmax weights.
    Softmax(Vec<f64>),
}

fn engine_inputs(spec: &LightNetSpec, args: &LightNet) -> Result<EngineInputs> {
    let dtype = engine_dtype(spec);
    let shape_qk = args.k.shape().to_vec();
    let k = args.k.to_f64_vec();
    let cu = spec.cu_seqlens.as_deref();
    let (khat, g, transform) = if spec.bidirectional {
        let khat = softmax_keys(&spec.dims, &k, cu);
        (khat.clone(), None, Transform::Softmax(khat))
    } else {
        let z0 = args.initial_state.map(|st| st.z.to_f64_vec());
        let gate = additive_gate(&spec.dims, &k, cu, z0.as_deref());
        let g = Tensor::from_f64(shape_qk.clone(), gate.g.clone())?.to_dtype(dtype);
        (gate.khat.clone(), Some(g), Transform::Additive(gate))
    };
    Ok(EngineInputs {
        q: args.q.to_dtype(dtype),
        khat: Tensor::from_f64(shape_qk, khat)?.to_dtype(dtype),
        v: args.v.to_dtype(dtype),
        g,
        s0: args.initial_state.map(|st| st.s.to_dtype(dtype)),
        transform,
    })
}

fn problem<'a>(
    spec: &LightNetSpec,
    args: &'a LightNet,
    e: &'a EngineInputs,
) -> LinearAttention<'a> {
    let mut p = if spec.bidirectional {
        LinearAttention::bidirectional(&e.q, &e.khat, &e.v)
    } else {
        LinearAttention::causal(&e.q, &e.khat, &e.v)
    }
    .with_scale(spec.scale);
    if let Some(g) = &e.g {
        p = p.with_gate(Gate::Vector(g));
    }
    if let Some(s0) = &e.s0 {
        p = p.with_h0(s0);
    }
    if let Some(cu) = args.cu_seqlens {
        p = p.with_cu_seqlens(cu);
    }
    p
}

pub(super) fn forward(
    backend: &Backend,
    spec: &LightNetSpec,
    args: &LightNet,
    form: Form,
) -> Result<LightNetOutput> {
    let e = engine_inputs(spec, args)?;
    let out = linear::forward(backend, &problem(spec, args, &e), form)?;
    let state = match (e.transform, out.ht) {
        (Transform::Additive(gate), Some(s)) => Some(LightNetFinalState {
            s,
            z: Tensor::from_f64(spec.z_shape(), gate.z_final)?.to_dtype(out.o.dtype()),
        }),
        _ => None,
    };
    Ok(LightNetOutput { o: out.o, state })
}

pub(super) fn backward(
    backend: &Backend,
    spec: &LightNetSpec,
    args: &LightNet,
    form: Form,
    d_o: &Tensor,
) -> Result<LightNetGrads> {
    let e = engine_inputs(spec, args)?;
    let grads = linear::backward(backend, &problem(spec, args, &e), form, d_o, None)?;
    let dkhat = grads.dk.to_f64_vec();
    let cu = spec.cu_seqlens.as_deref();
    let dk = match &e.transform {
        Transform::Additive(gate) => {
            let dg = grads
                .dg
                .as_ref()
                .expect("a vector gate has a gradient")
                .to_f64_vec();
            let z0 = args.initial_state.map(|st| st.z.to_f64_vec());
            additive_gate_backward(&spec.dims, gate, &dkhat, &dg, cu, z0.as_deref())
        }
        Transform::Softmax(khat) => softmax_keys_backward(&spec.dims, khat, &dkhat, cu),
    };
    let dtype = grads.dq.dtype();
    Ok(LightNetGrads {
        dq: grads.dq,
        dk: Tensor::from_f64(args.k.shape().to_vec(), dk)?.to_dtype(dtype),
        dv: grads.dv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use linattn_reference::testing::Rng;

    fn tensor(rng: &mut Rng, shape: Vec<usize>, scale: f64) -> Tensor {
        let n = shape.iter().product();
        let data = rng.randn(n).into_iter().map(|x| x * scale).collect();
        Tensor::from_f64(shape, data).unwrap()
    }

    /// The host transform + engine path on the CPU engine equals the LightNet reference (a
    /// different derivation: the definition `S_t = sum_u exp(k_u - z_t) v_u`), forward and
    /// backward, causal with and without an initial state, varlen with an empty sequence, and the
    /// non-causal form.
    #[test]
    fn engine_path_equals_the_reference() {
        let (b, t, h, k, v) = (1, 13, 2, 5, 3);
        let mut rng = Rng::new(11);
        let q = tensor(&mut rng, vec![b, t, h, k], 1.0);
        let kl = tensor(&mut rng, vec![b, t, h, k], 2.0);
        let vv = tensor(&mut rng, vec![b, t, h, v], 1.0);
        let d_o = tensor(&mut rng, vec![b, t, h, v], 1.0);
        let cu: Vec<i64> = vec![0, 4, 4, 13];
        let n = cu.len() - 1;
        let s0 = tensor(&mut rng, vec![n, h, k, v], 1.0);
        let mut z0v = rng.randn(n * h * k);
        z0v[3] = f64::NEG_INFINITY;
        let mut s0v = s0.to_f64_vec();
        s0v[3 * v..4 * v].iter_mut().for_each(|x| *x = 0.0);
        let s0 = Tensor::from_f64(vec![n, h, k, v], s0v).unwrap();
        let z0 = Tensor::from_f64(vec![n, h, k], z0v).unwrap();
        let cases = [
            LightNet::causal(&q, &kl, &vv),
            LightNet::causal(&q, &kl, &vv).with_cu_seqlens(&cu),
            LightNet::causal(&q, &kl, &vv)
                .with_cu_seqlens(&cu)
                .with_initial_state(&s0, &z0),
            LightNet::non_causal(&q, &kl, &vv).with_cu_seqlens(&cu),
            LightNet::non_causal(&q, &kl, &vv),
        ];
        for (i, args) in cases.iter().enumerate() {
            let spec = args.validate().unwrap();
            let form = Form::Chunkwise { chunk: 4 };
            let ours = forward(&Backend::Cpu, &spec, args, form).unwrap();
            let want = super::super::forward(&Backend::Cpu, args, form).unwrap();
            let err = |a: &Tensor, b: &Tensor| {
                linattn_reference::rel_rms(&a.to_f64_vec(), &b.to_f64_vec())
            };
            assert!(err(&ours.o, &want.o) < 1e-12, "case {i} o");
            if let (Some(a), Some(w)) = (&ours.state, &want.state) {
                assert!(err(&a.s, &w.s) < 1e-12, "case {i} s");
                // The reference takes z_T as one log-sum-exp, the transform as a running logaddexp.
                // An empty sequence keeps z = -inf on both sides.
                for (x, y) in a.z.to_f64_vec().iter().zip(w.z.to_f64_vec()) {
                    assert!(
                        *x == y || (x - y).abs() <= 1e-13 * y.abs(),
                        "case {i} z: {x} {y}"
                    );
                }
            } else {
                assert_eq!(ours.state.is_some(), want.state.is_some(), "case {i}");
            }
            let g = backward(&Backend::Cpu, &spec, args, form, &d_o).unwrap();
            let w = super::super::backward(&Backend::Cpu, args, form, &d_o).unwrap();
            for (name, a, b) in [
                ("dq", &g.dq, &w.dq),
                ("dk", &g.dk, &w.dk),
                ("dv", &g.dv, &w.dv),
            ] {
                let e = err(a, b);
                assert!(e < 1e-10, "case {i} {name}: {e:e}");
            }
        }
    }
}
