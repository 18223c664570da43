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

use linattn_reference::lightnet::additive_gate;

use super::{LightNet, LightNetFinalState, LightNetGrads, LightNetOutput, LightNetSpec};
use crate::backend::Backend;
use crate::error::Result;
use crate::linear::{self, Form, Gate, LinearAttention};
use crate::tensor::{DType, Tensor};

/// `(batch row, first token, end token)` of every independent sequence.
fn sequences(spec: &LightNetSpec) -> Vec<(usize, usize, usize)> {
    match &spec.cu_seqlens {
        Some(cu) => cu.windows(2).map(|w| (0, w[0], w[1])).collect(),
        None => (0..spec.dims.b).map(|b| (b, 0, spec.dims.t)).collect(),
    }
}

/// Index of channel `c` of `(b, t, h)` in a `[B, T, H, K]` tensor.
fn at(spec: &LightNetSpec, b: usize, t: usize, h: usize, c: usize) -> usize {
    let d = spec.dims;
    ((b * d.t + t) * d.h + h) * d.k + c
}

/// What the engine runs on, built from the key logits.
struct Transformed {
    /// `[B, T, H, K]`: normalised key weights.
    khat: Vec<f64>,
    /// Causal: `[B, T, H, K]` log decays (`<= 0`) and `z_T` `[N, H, K]`.
    gate: Option<(Vec<f64>, Vec<f64>)>,
}

fn transform(spec: &LightNetSpec, k: &[f64], z0: Option<&[f64]>) -> Transformed {
    if !spec.bidirectional {
        let gate = additive_gate(&spec.dims, k, spec.cu_seqlens.as_deref(), z0);
        return Transformed {
            khat: gate.khat,
            gate: Some((gate.g, gate.z_final)),
        };
    }
    // Softmax over each sequence, per head and channel, with the maximum subtracted (exponents
    // <= 0). An empty sequence has nothing to normalise.
    let mut khat = vec![0.0; k.len()];
    for (b, start, end) in sequences(spec) {
        for h in 0..spec.dims.h {
            for c in 0..spec.dims.k {
                let idx = |t| at(spec, b, t, h, c);
                let m = (start..end)
                    .map(|t| k[idx(t)])
                    .fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = (start..end).map(|t| (k[idx(t)] - m).exp()).sum();
                for t in start..end {
                    khat[idx(t)] = (k[idx(t)] - m).exp() / sum;
                }
            }
        }
    }
    Transformed { khat, gate: None }
}

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
    z_final: Option<Vec<f64>>,
}

fn engine_inputs(spec: &LightNetSpec, args: &LightNet) -> Result<EngineInputs> {
    let dtype = engine_dtype(spec);
    let shape_qk = args.k.shape().to_vec();
    let z0 = args.initial_state.map(|st| st.z.to_f64_vec());
    let tr = transform(spec, &args.k.to_f64_vec(), z0.as_deref());
    let (g, z_final) = match tr.gate {
        Some((g, z)) => (
            Some(Tensor::from_f64(shape_qk.clone(), g)?.to_dtype(dtype)),
            Some(z),
        ),
        None => (None, None),
    };
    Ok(EngineInputs {
        q: args.q.to_dtype(dtype),
        khat: Tensor::from_f64(shape_qk, tr.khat)?.to_dtype(dtype),
        v: args.v.to_dtype(dtype),
        g,
        s0: args.initial_state.map(|st| st.s.to_dtype(dtype)),
        z_final,
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
    let state = match (e.z_final, out.ht) {
        (Some(z), Some(s)) => Some(LightNetFinalState {
            s,
            z: Tensor::from_f64(spec.z_shape(), z)?.to_dtype(out.o.dtype()),
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
    let khat = e.khat.to_f64_vec();
    let dkhat = grads.dk.to_f64_vec();
    let mut dk = vec![0.0; khat.len()];
    match &e.g {
        None => {
            // Softmax adjoint: dk_u = khat_u (dkhat_u - sum_t khat_t dkhat_t).
            for (b, start, end) in sequences(spec) {
                for h in 0..spec.dims.h {
                    for c in 0..spec.dims.k {
                        let idx = |t| at(spec, b, t, h, c);
                        let mean: f64 = (start..end).map(|t| khat[idx(t)] * dkhat[idx(t)]).sum();
                        for t in start..end {
                            dk[idx(t)] = khat[idx(t)] * (dkhat[idx(t)] - mean);
                        }
                    }
                }
            }
        }
        Some(g) => {
            let g = g.to_f64_vec();
            let dg = grads
                .dg
                .as_ref()
                .expect("a vector gate has a gradient")
                .to_f64_vec();
            let has_z0: Vec<bool> = match args.initial_state {
                Some(st) => st.z.to_f64_vec().iter().map(|z| z.is_finite()).collect(),
                None => vec![false; spec.num_sequences * spec.dims.h * spec.dims.k],
            };
            // Reverse scan of the adjoint of z_t = logaddexp(z_{t-1}, k_t) with
            // khat_t = exp(k_t - z_t) and g_t = z_{t-1} - z_t:
            //   dz_t = -khat_t dkhat_t - dg_t + dg_{t+1} + exp(g_{t+1}) dz_{t+1}
            //   dk_t = khat_t (dkhat_t + dz_t)
            // where `dg_{t+1} + exp(g_{t+1}) dz_{t+1}` is what flows back from token t + 1
            // (dz_{t+1} / dz_t = exp(z_t - z_{t+1}) = exp(g_{t+1}) <= 1: the scan only shrinks).
            // At the first token of a sequence with an empty prefix z_0 = k_0 and g_0 = 0 is a
            // constant, so its `-dg_0` term drops out (khat_0 = 1 and dk_0 = dz_0 + dkhat_0).
            for (n, (b, start, end)) in sequences(spec).into_iter().enumerate() {
                for h in 0..spec.dims.h {
                    for c in 0..spec.dims.k {
                        let idx = |t| at(spec, b, t, h, c);
                        let mut carry = 0.0; // dg_{t+1} + exp(g_{t+1}) dz_{t+1}
                        for t in (start..end).rev() {
                            let i = idx(t);
                            let first_without_prefix =
                                t == start && !has_z0[(n * spec.dims.h + h) * spec.dims.k + c];
                            let own_gate = if first_without_prefix { 0.0 } else { dg[i] };
                            let dz = -khat[i] * dkhat[i] - own_gate + carry;
                            dk[i] = khat[i] * (dkhat[i] + dz);
                            carry = dg[i] + g[i].exp() * dz;
                        }
                    }
                }
            }
        }
    }
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
