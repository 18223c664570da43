//! Conventions pinned by hand-computed values, and the identities the kernels rely on:
//! bidirectional RNN = masked matrix, bidirectional = two causal passes (flip identity, also for
//! gradients and with normalisation), chaining through `h0`/`ht`, decode steps, the closed-form gate
//! gradient, and the chunk building blocks.

mod linear_common;

use linattn_reference::linear::{
    self, Dims, Direction, Form, Gate, GateKind, Problem, chunkwise, decode_step,
};
use linattn_reference::testing::Rng;
use linear_common::{ALL_KINDS, Case, Spec, assert_grads, assert_outputs, assert_rel};

const TOL: f64 = 1e-10;
const ALL_FORMS: [Form; 5] = [
    Form::Recurrent,
    Form::Parallel,
    Form::Chunkwise { chunk: 1 },
    Form::Chunkwise { chunk: 2 },
    Form::Chunkwise { chunk: 64 },
];

fn ln(x: f64) -> f64 {
    x.ln()
}

fn tiny_dims(t: usize) -> Dims {
    Dims {
        b: 1,
        t,
        h: 1,
        k: 1,
        v: 1,
    }
}

#[track_caller]
fn assert_values(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-12 * w.abs().max(1.0),
            "{what}[{i}]: got {g}, want {w} (all: {got:?})"
        );
    }
}

/// T = 2, K = V = 1, scale 1, gates ln 0.5 and ln 0.25, h0 = 13:
/// S_0 = 0.5 * 13 + 3 * 7 = 27.5, o_0 = 1 * 27.5;
/// S_1 = 0.25 * 27.5 + 5 * 11 = 61.875, o_1 = 2 * 61.875 = 123.75, ht = 61.875.
/// The decay of step t is applied at step t (also at t = 0, to h0), before k_t^T v_t is added.
#[test]
fn hand_checked_causal_scalar_gate() {
    let (q, k, v, g, h0) = (
        [1.0, 2.0],
        [3.0, 5.0],
        [7.0, 11.0],
        [ln(0.5), ln(0.25)],
        [13.0],
    );
    let p = Problem {
        dims: tiny_dims(2),
        q: &q,
        k: &k,
        v: &v,
        gate: Gate::Scalar(&g),
        gate_bwd: None,
        direction: Direction::Causal,
        scale: 1.0,
        normalize: None,
        h0: Some(&h0),
        cu_seqlens: None,
    };
    for form in ALL_FORMS {
        let out = linear::forward(&p, form);
        assert_values(&format!("{form:?} o"), &out.o, &[27.5, 123.75]);
        assert_values(&format!("{form:?} ht"), &out.ht.unwrap(), &[61.875]);

        // loss = o_0 + o_1 + ht: dL/dS_1 = q_1 + 1 = 3, dL/dS_0 = q_0 + 0.25 * 3 = 1.75,
        // dh0 = 0.5 * 1.75, dg_0 = 0.5 * 13 * 1.75, dg_1 = 0.25 * 27.5 * 3,
        // dq = (S_0, S_1), dk_t = dS_t v_t, dv_t = k_t dS_t.
        let gr = linear::backward(&p, form, &[1.0, 1.0], Some(&[1.0]));
        assert_values(&format!("{form:?} dq"), &gr.dq, &[27.5, 61.875]);
        assert_values(&format!("{form:?} dk"), &gr.dk, &[12.25, 33.0]);
        assert_values(&format!("{form:?} dv"), &gr.dv, &[5.25, 15.0]);
        assert_values(&format!("{form:?} dg"), &gr.dg.unwrap(), &[11.375, 20.625]);
        assert_values(&format!("{form:?} dh0"), &gr.dh0.unwrap(), &[0.875]);
    }
}

/// A per-head gate decays at every token, t = 0 included (it decays h0):
/// S_0 = 0.5 * 13 + 21 = 27.5, S_1 = 0.5 * 27.5 + 55 = 68.75.
#[test]
fn hand_checked_causal_per_head_gate_decays_h0() {
    let (q, k, v, g, h0) = ([1.0, 2.0], [3.0, 5.0], [7.0, 11.0], [ln(0.5)], [13.0]);
    let p = Problem {
        dims: tiny_dims(2),
        q: &q,
        k: &k,
        v: &v,
        gate: Gate::PerHead(&g),
        gate_bwd: None,
        direction: Direction::Causal,
        scale: 1.0,
        normalize: None,
        h0: Some(&h0),
        cu_seqlens: None,
    };
    for form in ALL_FORMS {
        let out = linear::forward(&p, form);
        assert_values(&format!("{form:?} o"), &out.o, &[27.5, 137.5]);
        assert_values(&format!("{form:?} ht"), &out.ht.unwrap(), &[68.75]);
    }
}

/// T = 3, K = V = 1, scale 1, q = (1, 2, 3), k = (1, 1, 2), v = (1, 10, 100),
/// forward decays (., 0.5, 0.25), backward decays (., 0.75, 0.5) (entry 0 is never used):
/// M = [[1, 0.75, 0.75 * 0.5], [0.5, 1, 0.5], [0.5 * 0.25, 0.25, 1]],
/// A = [[1, 0.75, 0.75], [1, 2, 2], [0.375, 0.75, 6]],
/// o = A v = (83.5, 221, 607.875); row sums (2.5, 5, 7.125).
#[test]
fn hand_checked_bidirectional_separate_gates() {
    let (q, k, v) = ([1.0, 2.0, 3.0], [1.0, 1.0, 2.0], [1.0, 10.0, 100.0]);
    let g = [ln(0.5), ln(0.5), ln(0.25)];
    let gb = [ln(0.125), ln(0.75), ln(0.5)];
    for normalize in [None, Some(0.0)] {
        let p = Problem {
            dims: tiny_dims(3),
            q: &q,
            k: &k,
            v: &v,
            gate: Gate::Scalar(&g),
            gate_bwd: Some(Gate::Scalar(&gb)),
            direction: Direction::Bidirectional,
            scale: 1.0,
            normalize,
            h0: None,
            cu_seqlens: None,
        };
        let want: Vec<f64> = match normalize {
            None => vec![83.5, 221.0, 607.875],
            Some(_) => vec![83.5 / 2.5, 221.0 / 5.0, 607.875 / 7.125],
        };
        for form in ALL_FORMS {
            let out = linear::forward(&p, form);
            assert_values(&format!("{form:?} {normalize:?} o"), &out.o, &want);
            assert!(out.ht.is_none());
        }
    }
}

/// No gate, bidirectional: plain non-causal linear attention, the diagonal counted once:
/// o_i = q_i (3 * 7 + 5 * 11) = q_i * 76. Causal: o = (1 * 21, 2 * 76).
#[test]
fn hand_checked_no_gate_diagonal_once() {
    let (q, k, v) = ([1.0, 2.0], [3.0, 5.0], [7.0, 11.0]);
    for (direction, want) in [
        (Direction::Bidirectional, [76.0, 152.0]),
        (Direction::Causal, [21.0, 152.0]),
    ] {
        let p = Problem {
            dims: tiny_dims(2),
            q: &q,
            k: &k,
            v: &v,
            gate: Gate::None,
            gate_bwd: None,
            direction,
            scale: 1.0,
            normalize: None,
            h0: None,
            cu_seqlens: None,
        };
        for form in ALL_FORMS {
            assert_values(
                &format!("{direction:?} {form:?}"),
                &linear::forward(&p, form).o,
                &want,
            );
        }
    }
}

/// Hand-checked varlen: segments [0, 1) and [1, 3) with h0 = (2, 3), per-head gate ln 0.5:
/// segment 0: S = 0.5 * 2 + 1 * 1 = 2, o = 2; segment 1: S_0 = 0.5 * 3 + 1 * 1 = 2.5, o = 2.5,
/// S_1 = 0.5 * 2.5 + 1 * 1 = 2.25, o = 2.25. An empty segment would keep its h0.
#[test]
fn hand_checked_varlen_gates_do_not_leak() {
    let ones = [1.0, 1.0, 1.0];
    let g = [ln(0.5)];
    let cu = [0usize, 1, 1, 3];
    let h0 = [2.0, 7.0, 3.0];
    let p = Problem {
        dims: tiny_dims(3),
        q: &ones,
        k: &ones,
        v: &ones,
        gate: Gate::PerHead(&g),
        gate_bwd: None,
        direction: Direction::Causal,
        scale: 1.0,
        normalize: None,
        h0: Some(&h0),
        cu_seqlens: Some(&cu),
    };
    for form in ALL_FORMS {
        let out = linear::forward(&p, form);
        assert_values(&format!("{form:?} o"), &out.o, &[2.0, 2.5, 2.25]);
        assert_values(&format!("{form:?} ht"), &out.ht.unwrap(), &[2.0, 7.0, 2.25]);
    }
}

/// LION Theorem 3.1: the two-scan RNN form equals the masked-matrix form, forward and backward,
/// for every gate kind, with and without a separate backward gate and normalisation.
#[test]
fn bidirectional_rnn_equals_masked_matrix() {
    let dims = Dims {
        b: 2,
        t: 19,
        h: 2,
        k: 4,
        v: 3,
    };
    let mut seed = 7000;
    for kind in ALL_KINDS {
        for normalize in [false, true] {
            for separate_gb in [false, true] {
                seed += 1;
                let spec = Spec {
                    normalize,
                    separate_gb,
                    ..Spec::new(dims, kind, Direction::Bidirectional)
                };
                let case = Case::random(seed, &spec);
                let what = format!("{spec:?}");
                assert_outputs(
                    &what,
                    &case.forward(Form::Recurrent),
                    &case.forward(Form::Parallel),
                    TOL,
                );
                assert_grads(
                    &what,
                    &case.backward(Form::Recurrent),
                    &case.backward(Form::Parallel),
                    TOL,
                );
            }
        }
    }
}

/// Reverses the time axis of a `[B, T, H, width]` tensor.
fn flip(x: &[f64], d: &Dims, width: usize) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for b in 0..d.b {
        for t in 0..d.t {
            let src = ((b * d.t + t) * d.h) * width;
            let dst = ((b * d.t + (d.t - 1 - t)) * d.h) * width;
            out[dst..dst + d.h * width].copy_from_slice(&x[src..src + d.h * width]);
        }
    }
    out
}

/// Moves a `[B, T, H, width]` gate one step later: `shift(x)_0 = 0`, `shift(x)_t = x_{t-1}`.
fn shift(x: &[f64], d: &Dims, width: usize) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for b in 0..d.b {
        for t in 1..d.t {
            let src = ((b * d.t + t - 1) * d.h) * width;
            let dst = ((b * d.t + t) * d.h) * width;
            out[dst..dst + d.h * width].copy_from_slice(&x[src..src + d.h * width]);
        }
    }
    out
}

/// Adjoint of `shift`: `unshift(y)_t = y_{t+1}`, `unshift(y)_{T-1} = 0`.
fn unshift(y: &[f64], d: &Dims, width: usize) -> Vec<f64> {
    let mut out = vec![0.0; y.len()];
    for b in 0..d.b {
        for t in 0..d.t - 1 {
            let src = ((b * d.t + t + 1) * d.h) * width;
            let dst = ((b * d.t + t) * d.h) * width;
            out[dst..dst + d.h * width].copy_from_slice(&y[src..src + d.h * width]);
        }
    }
    out
}

/// Appends a ones column to `[B, T, H, V]`.
fn with_ones(v: &[f64], width: usize) -> Vec<f64> {
    v.chunks(width)
        .flat_map(|r| r.iter().copied().chain(std::iter::once(1.0)))
        .collect()
}

fn causal<'a>(dims: Dims, q: &'a [f64], k: &'a [f64], v: &'a [f64], g: &'a [f64]) -> Problem<'a> {
    Problem {
        dims,
        q,
        k,
        v,
        gate: Gate::Vector(g),
        gate_bwd: None,
        direction: Direction::Causal,
        scale: 0.5,
        normalize: None,
        h0: None,
        cu_seqlens: None,
    }
}

/// kernels.md: `o = causal(q, k, v, g) + flip(causal(flip q, flip k, flip v, shift(flip gb)))`
/// minus the doubly counted diagonal `scale (q_i . k_i) v_i`, with normalisation through a ones column, and the same identity for
/// the gradients (the reversed pass's gate gradient maps back through shift and flip).
#[test]
fn flip_identity_bidirectional_is_two_causal_passes() {
    let dims = Dims {
        b: 2,
        t: 13,
        h: 2,
        k: 4,
        v: 3,
    };
    let (kd, vd) = (dims.k, dims.v);
    for (seed, kind) in ALL_KINDS.into_iter().enumerate() {
        let spec = Spec {
            separate_gb: true,
            ..Spec::new(dims, kind, Direction::Bidirectional)
        };
        let mut case = Case::random(40 + seed as u64, &spec);
        case.scale = 0.5;
        // The identity in terms of per-channel gates: expand every kind to [B, T, H, K].
        let g = Gate::from_kind(kind, &case.g).expand(&dims);
        let gb = match &case.gb {
            Some(gb) => Gate::from_kind(kind, gb).expand(&dims),
            None => g.clone(),
        };
        let (qf, kf) = (flip(&case.q, &dims, kd), flip(&case.k, &dims, kd));
        let gb_rev = shift(&flip(&gb, &dims, kd), &dims, kd);
        // -scale (q_i . k_i) per token and head.
        let diag: Vec<f64> = case
            .q
            .chunks(kd)
            .zip(case.k.chunks(kd))
            .map(|(q, k)| -case.scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>())
            .collect();

        for normalize in [false, true] {
            let w = if normalize { vd + 1 } else { vd };
            let v = if normalize {
                with_ones(&case.v, vd)
            } else {
                case.v.clone()
            };
            let dims_w = Dims { v: w, ..dims };
            let vf = flip(&v, &dims, w);
            let fwd = linear::forward(&causal(dims_w, &case.q, &case.k, &v, &g), Form::Recurrent);
            let bwd = linear::forward(&causal(dims_w, &qf, &kf, &vf, &gb_rev), Form::Recurrent);
            let bwd_o = flip(&bwd.o, &dims, w);
            let mut u = vec![0.0; fwd.o.len()];
            for (row, d) in diag.iter().enumerate() {
                for c in 0..w {
                    let i = row * w + c;
                    u[i] = fwd.o[i] + bwd_o[i] + d * v[i];
                }
            }
            let identity: Vec<f64> = if normalize {
                let eps = 1e-6;
                u.chunks(w)
                    .flat_map(|r| {
                        r[..vd]
                            .iter()
                            .map(|x| x / (r[vd] + eps))
                            .collect::<Vec<_>>()
                    })
                    .collect()
            } else {
                u
            };
            case.normalize = normalize.then_some(1e-6);
            for form in [Form::Parallel, Form::Chunkwise { chunk: 4 }] {
                assert_rel(
                    &format!("{kind:?} normalize {normalize} {form:?}: flip identity o"),
                    &identity,
                    &case.forward(form).o,
                    TOL,
                );
            }
        }

        // Gradients (unnormalised): the sum of both passes' gradients and the diagonal's.
        case.normalize = None;
        let (v, vf) = (&case.v, flip(&case.v, &dims, vd));
        let do_f = flip(&case.d_o, &dims, vd);
        let p1 = causal(dims, &case.q, &case.k, v, &g);
        let p2 = causal(dims, &qf, &kf, &vf, &gb_rev);
        let g1 = linear::backward(&p1, Form::Recurrent, &case.d_o, None);
        let g2 = linear::backward(&p2, Form::Recurrent, &do_f, None);
        let (dq2, dk2, dv2) = (
            flip(&g2.dq, &dims, kd),
            flip(&g2.dk, &dims, kd),
            flip(&g2.dv, &dims, vd),
        );
        let mut dq = vec![0.0; g1.dq.len()];
        let mut dk = vec![0.0; g1.dk.len()];
        let mut dv = vec![0.0; g1.dv.len()];
        for (row, d) in diag.iter().enumerate() {
            let do_v: f64 = (0..vd)
                .map(|c| case.d_o[row * vd + c] * v[row * vd + c])
                .sum();
            for c in 0..kd {
                let i = row * kd + c;
                // d/dq of -scale (q . k)(v . do) is -scale (v . do) k.
                dq[i] = g1.dq[i] + dq2[i] - case.scale * do_v * case.k[i];
                dk[i] = g1.dk[i] + dk2[i] - case.scale * do_v * case.q[i];
            }
            for c in 0..vd {
                let i = row * vd + c;
                dv[i] = g1.dv[i] + dv2[i] + d * case.d_o[i];
            }
        }
        // The reversed pass's gate is shift(flip(gb)): its gradient maps back by the adjoints,
        // flip(unshift(.)).
        let dgb_expanded = flip(&unshift(&g2.dg.unwrap(), &dims, kd), &dims, kd);
        let dg_expanded = g1.dg.unwrap();
        let want = case.backward(Form::Chunkwise { chunk: 4 });
        let what = format!("{kind:?}: flip identity");
        assert_rel(&format!("{what} dq"), &dq, &want.dq, TOL);
        assert_rel(&format!("{what} dk"), &dk, &want.dk, TOL);
        assert_rel(&format!("{what} dv"), &dv, &want.dv, TOL);
        if kind != GateKind::None {
            assert_rel(
                &format!("{what} dg"),
                &kind.reduce_grad(&dims, &dg_expanded).unwrap(),
                want.dg.as_ref().unwrap(),
                TOL,
            );
            assert_rel(
                &format!("{what} dg_bwd"),
                &kind.reduce_grad(&dims, &dgb_expanded).unwrap(),
                want.dg_bwd.as_ref().unwrap(),
                TOL,
            );
        }
    }
}

/// Rows `t0..t1` of every batch of a `[B, T, H, width]` tensor.
fn time_slice(x: &[f64], d: &Dims, width: usize, t0: usize, t1: usize) -> Vec<f64> {
    let row = d.h * width;
    (0..d.b)
        .flat_map(|b| x[(b * d.t + t0) * row..(b * d.t + t1) * row].to_vec())
        .collect()
}

/// Forward over [0, T) equals forward over [0, t) then [t, T) with h0 = the first part's ht.
#[test]
fn chaining_through_final_state() {
    let dims = Dims {
        b: 2,
        t: 29,
        h: 2,
        k: 4,
        v: 3,
    };
    for (seed, kind) in ALL_KINDS.into_iter().enumerate() {
        let spec = Spec {
            h0: true,
            ..Spec::new(dims, kind, Direction::Causal)
        };
        let case = Case::random(60 + seed as u64, &spec);
        let full = case.forward(Form::Recurrent);
        for split in [0, 1, 11, 28, 29] {
            let mut state = case.h0.clone().unwrap();
            let mut o = vec![Vec::new(); dims.b];
            for (t0, t1) in [(0, split), (split, dims.t)] {
                let part = Dims { t: t1 - t0, ..dims };
                let gate_part = match kind {
                    GateKind::None | GateKind::PerHead => case.g.clone(),
                    GateKind::Scalar => time_slice(&case.g, &dims, 1, t0, t1),
                    GateKind::Vector => time_slice(&case.g, &dims, dims.k, t0, t1),
                };
                let (q, k, v) = (
                    time_slice(&case.q, &dims, dims.k, t0, t1),
                    time_slice(&case.k, &dims, dims.k, t0, t1),
                    time_slice(&case.v, &dims, dims.v, t0, t1),
                );
                let p = Problem {
                    dims: part,
                    q: &q,
                    k: &k,
                    v: &v,
                    gate: Gate::from_kind(kind, &gate_part),
                    gate_bwd: None,
                    direction: Direction::Causal,
                    scale: case.scale,
                    normalize: None,
                    h0: Some(&state),
                    cu_seqlens: None,
                };
                let out = linear::forward(&p, Form::Chunkwise { chunk: 5 });
                let row = part.t * dims.h * dims.v;
                for (b, ob) in o.iter_mut().enumerate() {
                    ob.extend_from_slice(&out.o[b * row..(b + 1) * row]);
                }
                state = out.ht.unwrap();
            }
            let what = format!("{kind:?} split at {split}");
            assert_rel(&format!("{what}: o"), &o.concat(), &full.o, TOL);
            assert_rel(
                &format!("{what}: ht"),
                &state,
                full.ht.as_ref().unwrap(),
                TOL,
            );
        }
    }
}

/// T decode steps from h0 give the recurrent forward's outputs and final state.
#[test]
fn decode_steps_equal_recurrent_forward() {
    let dims = Dims {
        b: 2,
        t: 17,
        h: 3,
        k: 5,
        v: 4,
    };
    for (seed, kind) in ALL_KINDS.into_iter().enumerate() {
        let spec = Spec {
            h0: true,
            ..Spec::new(dims, kind, Direction::Causal)
        };
        let case = Case::random(80 + seed as u64, &spec);
        let full = case.forward(Form::Recurrent);
        let step_dims = Dims { t: 1, ..dims };
        let mut state = case.h0.clone().unwrap();
        let mut o_steps = vec![vec![Vec::new(); dims.t]; dims.b];
        for t in 0..dims.t {
            let g_t = match kind {
                GateKind::None | GateKind::PerHead => case.g.clone(),
                GateKind::Scalar => time_slice(&case.g, &dims, 1, t, t + 1),
                GateKind::Vector => time_slice(&case.g, &dims, dims.k, t, t + 1),
            };
            let o = decode_step(
                &step_dims,
                &mut state,
                &time_slice(&case.q, &dims, dims.k, t, t + 1),
                &time_slice(&case.k, &dims, dims.k, t, t + 1),
                &time_slice(&case.v, &dims, dims.v, t, t + 1),
                Gate::from_kind(kind, &g_t),
                case.scale,
            );
            for (b, ob) in o_steps.iter_mut().enumerate() {
                ob[t] = o[b * dims.h * dims.v..(b + 1) * dims.h * dims.v].to_vec();
            }
        }
        let o: Vec<f64> = o_steps.concat().concat();
        assert_rel(&format!("{kind:?}: decode o"), &o, &full.o, TOL);
        assert_rel(
            &format!("{kind:?}: decode state"),
            &state,
            full.ht.as_ref().unwrap(),
            TOL,
        );
    }
}

/// kernels.md's closed form with the full gradients (diagonal included), as a kernel would use it:
/// `dg_t = sum_{i >= t} (q_i * dq_i - k_i * dk_i) + rowsum_V(ht * dht)`, with h0.
#[test]
fn closed_form_gate_gradient_with_full_gradients() {
    let dims = Dims {
        b: 1,
        t: 23,
        h: 1,
        k: 4,
        v: 3,
    };
    for strength in [1.0, 10.0] {
        let spec = Spec {
            h0: true,
            strength,
            ..Spec::new(dims, GateKind::Vector, Direction::Causal)
        };
        let case = Case::random(99, &spec);
        let grads = case.backward(Form::Recurrent);
        let ht = case.forward(Form::Recurrent).ht.unwrap();
        let d_ht = case.d_ht.as_ref().unwrap();
        let rowsum: Vec<f64> = (0..dims.k)
            .map(|c| {
                (0..dims.v)
                    .map(|w| ht[c * dims.v + w] * d_ht[c * dims.v + w])
                    .sum()
            })
            .collect();
        let dg = chunkwise::gate_grad_closed_form(
            &case.q,
            &grads.dq,
            &case.k,
            &grads.dk,
            dims.t,
            dims.k,
            Some(&rowsum),
        );
        // The diagonal cancels in floating point only to rounding of O(1) terms: 1e-9.
        assert_rel("closed-form dg", &dg, grads.dg.as_ref().unwrap(), 1e-9);
    }
}

#[test]
fn chunk_building_blocks() {
    assert_eq!(chunkwise::chunk_ranges(7, 3), vec![0..3, 3..6, 6..7]);
    assert_eq!(chunkwise::chunk_ranges(6, 3), vec![0..3, 3..6]);
    assert!(chunkwise::chunk_ranges(0, 3).is_empty());
    // Two channels, chunks of 2 over 5 tokens: the sums restart at tokens 0, 2, 4.
    let g = [
        -1.0, -10.0, -2.0, -20.0, -3.0, -30.0, -4.0, -40.0, -5.0, -50.0,
    ];
    assert_eq!(
        chunkwise::chunk_local_cumsum(&g, 5, 2, 2),
        vec![
            -1.0, -10.0, -3.0, -30.0, -3.0, -30.0, -7.0, -70.0, -5.0, -50.0
        ]
    );

    // Chunk states are the recurrent states at the chunk boundaries.
    let mut rng = Rng::new(5);
    let dims = Dims {
        b: 1,
        t: 10,
        h: 1,
        k: 3,
        v: 2,
    };
    let q = rng.randn(dims.qk_len());
    let k = rng.randn(dims.qk_len());
    let v = rng.randn(dims.v_len());
    let g = linattn_reference::testing::logsigmoid_gates(&mut rng, dims.qk_len(), 1.0);
    let h0 = rng.randn(dims.state_len());
    let hp = linear::HeadProblem {
        len: 10,
        key_dim: 3,
        value_dim: 2,
        q,
        k,
        v,
        g: g.clone(),
        gb: g.clone(),
        direction: Direction::Causal,
        scale: 0.5,
        normalize: None,
        h0: Some(h0),
    };
    let gc = chunkwise::chunk_local_cumsum(&g, 10, 3, 4);
    let chunk_states = chunkwise::chunk_states_forward(&hp, &gc, 4);
    let scan_states = linear::recurrent::causal_scan_states(&hp);
    assert_eq!(chunk_states.len(), 4);
    for (n, t) in [0usize, 4, 8, 10].into_iter().enumerate() {
        assert_rel(
            &format!("chunk state {n}"),
            &chunk_states[n],
            &scan_states[t],
            TOL,
        );
    }
}
