//! LightNet: the additive gate, the three causal forms against each other, hand-checked values,
//! the non-causal form, analytic gradients against central finite differences, the reduction to the
//! engine, and MD-LRPE.

use linattn_reference::lightnet::{
    LightNetOutput, LightNetProblem, LightNetState, additive_gate, backward, forward, md_lrpe,
    md_lrpe_backward,
};
use linattn_reference::linear::{self, Dims, Direction, Form, Gate};
use linattn_reference::testing::Rng;
use linattn_reference::{max_abs_diff, rel_rms};

struct Data {
    dims: Dims,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    d_o: Vec<f64>,
    state: Option<LightNetState>,
    cu: Option<Vec<usize>>,
}

/// `logit_scale` multiplies the key logits (large values stress the log-sum-exp).
fn data(dims: Dims, cu: Option<Vec<usize>>, with_state: bool, logit_scale: f64, seed: u64) -> Data {
    let mut rng = Rng::new(seed);
    let n = cu.as_ref().map_or(dims.b, |c| c.len() - 1);
    let state = with_state.then(|| LightNetState {
        s: rng.randn(n * dims.h * dims.k * dims.v),
        z: rng.randn(n * dims.h * dims.k),
    });
    Data {
        dims,
        q: rng.randn(dims.qk_len()),
        k: rng
            .randn(dims.qk_len())
            .iter()
            .map(|x| x * logit_scale)
            .collect(),
        v: rng.randn(dims.v_len()),
        d_o: rng.randn(dims.v_len()),
        state,
        cu,
    }
}

fn problem(x: &Data, bidirectional: bool) -> LightNetProblem<'_> {
    LightNetProblem {
        dims: x.dims,
        q: &x.q,
        k: &x.k,
        v: &x.v,
        scale: 0.7,
        bidirectional,
        initial_state: x.state.as_ref(),
        cu_seqlens: x.cu.as_deref(),
    }
}

fn dims(b: usize, t: usize, h: usize, k: usize, v: usize) -> Dims {
    Dims { b, t, h, k, v }
}

fn assert_close(name: &str, a: &[f64], r: &[f64], tol: f64) {
    let err = rel_rms(a, r);
    let abs = max_abs_diff(a, r);
    assert!(
        abs <= 1e-12 || err <= tol,
        "{name}: rel_rms {err:e}, max abs {abs:e} (tol {tol:e})"
    );
}

/// Direct `log sum exp` (max subtracted) of a slice.
fn lse(xs: &[f64]) -> f64 {
    let m = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

// ---------------------------------------------------------------- additive gate

#[test]
fn additive_gate_matches_logcumsumexp() {
    let d = dims(1, 9, 2, 3, 1);
    let cu = vec![0, 4, 4, 9]; // an empty middle segment
    let x = data(d, Some(cu.clone()), false, 3.0, 1);
    let z0: Vec<f64> = Rng::new(9).randn(3 * 2 * 3);
    for with_z0 in [false, true] {
        let zz = with_z0.then_some(z0.as_slice());
        let g = additive_gate(&d, &x.k, Some(&cu), zz);
        for (n, w) in cu.windows(2).enumerate() {
            for h in 0..2 {
                for c in 0..3 {
                    let zi = (n * 2 + h) * 3 + c;
                    let mut pref: Vec<f64> = if with_z0 { vec![z0[zi]] } else { vec![] };
                    for t in w[0]..w[1] {
                        let idx = (t * 2 + h) * 3 + c;
                        let z_prev = if pref.is_empty() {
                            None
                        } else {
                            Some(lse(&pref))
                        };
                        pref.push(x.k[idx]);
                        let z = lse(&pref);
                        assert!((g.khat[idx] - (x.k[idx] - z).exp()).abs() < 1e-14);
                        match z_prev {
                            None => assert_eq!(g.g[idx], 0.0),
                            Some(zp) => assert!((g.g[idx] - (zp - z)).abs() < 1e-13),
                        }
                        assert!(g.g[idx] <= 0.0);
                    }
                    let zf = g.z_final[zi];
                    if pref.is_empty() {
                        assert_eq!(zf, f64::NEG_INFINITY);
                    } else {
                        assert!((zf - lse(&pref)).abs() < 1e-13);
                    }
                }
            }
        }
    }
}

#[test]
fn additive_gate_extreme_logits_stay_finite() {
    let d = dims(1, 6, 1, 1, 1);
    let k = [-1000.0, 1000.0, -1000.0, 1000.0, 700.0, -5.0];
    let g = additive_gate(&d, &k, None, None);
    assert!(
        g.khat
            .iter()
            .chain(&g.g)
            .chain(&g.z_final)
            .all(|x| x.is_finite())
    );
    assert_eq!(g.g[0], 0.0);
    assert_eq!(g.khat[0], 1.0);
    assert!((g.g[1] + 2000.0).abs() < 1e-9); // z jumps from -1000 to 1000
    assert!(g.g[2].abs() < 1e-300 && g.khat[2] == 0.0); // exp(-2000) underflows to 0
    assert!((g.g[3] + 2f64.ln()).abs() < 1e-12); // two equal dominant logits: z rises by ln 2
    assert!((g.khat[3] - 0.5).abs() < 1e-12);
    // z0 = -inf is an empty prefix: the first token restarts like without z0
    let g2 = additive_gate(&d, &k, None, Some(&[f64::NEG_INFINITY]));
    assert_eq!(g2, g);
    // a finite z0: g_0 = z0 - logaddexp(z0, k_0)
    let g3 = additive_gate(&d, &k, None, Some(&[-999.0]));
    let z_0 = lse(&[-999.0, -1000.0]);
    assert!((g3.g[0] - (-999.0 - z_0)).abs() < 1e-12);
}

// ---------------------------------------------------------------- forward

#[test]
fn hand_checked_values() {
    // T = 2, K = V = 1, scale 1: z_0 = 0, S_0 = 2; z_1 = ln 4, S_1 = (1 * 2 + 3 * 6) / 4 = 5
    let d = dims(1, 2, 1, 1, 1);
    let (q, k, v) = ([1.0, 2.0], [0.0, 3f64.ln()], [2.0, 6.0]);
    let p = LightNetProblem {
        dims: d,
        q: &q,
        k: &k,
        v: &v,
        scale: 1.0,
        bidirectional: false,
        initial_state: None,
        cu_seqlens: None,
    };
    for form in [
        Form::Parallel,
        Form::Recurrent,
        Form::Chunkwise { chunk: 1 },
    ] {
        let out = forward(&p, form);
        assert_close("o", &out.o, &[2.0, 10.0], 1e-15);
        let st = out.state.unwrap();
        assert_close("S", &st.s, &[5.0], 1e-15);
        assert!((st.z[0] - 4f64.ln()).abs() < 1e-15);
    }
    let out = forward(
        &LightNetProblem {
            bidirectional: true,
            ..p
        },
        Form::Parallel,
    );
    assert_close("non-causal o", &out.o, &[5.0, 10.0], 1e-15);
    assert!(out.state.is_none());
    // carried state (S0 = 4, z0 = ln 2): z_0 = ln 3, S_0 = (2 * 4 + 1 * 2) / 3
    let st = LightNetState {
        s: vec![4.0],
        z: vec![2f64.ln()],
    };
    let out = forward(
        &LightNetProblem {
            initial_state: Some(&st),
            ..p
        },
        Form::Recurrent,
    );
    assert!((out.o[0] - 10.0 / 3.0).abs() < 1e-14);
    // z_1 = ln 6, S_1 = (2 * 4 + 2 + 3 * 6) / 6
    assert!((out.o[1] - 2.0 * 28.0 / 6.0).abs() < 1e-14);
}

fn all_forms() -> Vec<Form> {
    vec![
        Form::Parallel,
        Form::Recurrent,
        Form::Chunkwise { chunk: 1 },
        Form::Chunkwise { chunk: 2 },
        Form::Chunkwise { chunk: 3 },
        Form::Chunkwise { chunk: 64 },
    ]
}

fn check_forms_agree(x: &Data) {
    let p = problem(x, false);
    let reference = forward(&p, Form::Parallel);
    let st = reference.state.as_ref().unwrap();
    assert!(reference.o.iter().chain(&st.s).all(|v| v.is_finite()));
    for form in all_forms() {
        let out = forward(&p, form);
        let os = out.state.as_ref().unwrap();
        assert_close(&format!("o {form:?}"), &out.o, &reference.o, 1e-10);
        assert_close(&format!("S {form:?}"), &os.s, &st.s, 1e-10);
        assert_eq!(os.z.len(), st.z.len());
        for (a, b) in os.z.iter().zip(&st.z) {
            assert!(
                a == b || (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                "z {form:?}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn causal_forms_agree() {
    check_forms_agree(&data(dims(2, 7, 2, 3, 2), None, false, 1.0, 2));
    check_forms_agree(&data(dims(2, 7, 2, 3, 2), None, true, 1.0, 3));
    check_forms_agree(&data(
        dims(1, 11, 2, 2, 3),
        Some(vec![0, 3, 3, 8, 11]),
        true,
        1.0,
        4,
    ));
    check_forms_agree(&data(
        dims(1, 11, 1, 2, 2),
        Some(vec![0, 0, 5, 11]),
        false,
        30.0,
        5,
    ));
}

#[test]
fn empty_sequence_passes_the_state_through() {
    let x = data(dims(1, 4, 1, 2, 2), Some(vec![0, 0, 4]), true, 1.0, 6);
    let out = forward(&problem(&x, false), Form::Recurrent);
    let st = out.state.unwrap();
    let init = x.state.as_ref().unwrap();
    assert_eq!(&st.s[..4], &init.s[..4]);
    assert_eq!(&st.z[..2], &init.z[..2]);
    let y = data(dims(1, 4, 1, 2, 2), Some(vec![0, 0, 4]), false, 1.0, 6);
    let st = forward(&problem(&y, false), Form::Parallel).state.unwrap();
    assert!(st.s[..4].iter().all(|&v| v == 0.0));
    assert!(st.z[..2].iter().all(|&z| z == f64::NEG_INFINITY));
}

#[test]
fn state_is_a_weighted_mean_of_the_values() {
    // huge logits: S_t[c,:] is a convex combination of v_0..v_t, so it stays within their range
    let x = data(dims(1, 12, 1, 3, 1), None, false, 300.0, 7);
    let p = problem(&x, false);
    let out = forward(&p, Form::Recurrent);
    let vmax = x.v.iter().cloned().fold(0.0f64, |m, v| m.max(v.abs()));
    let qmax: f64 = (0..12)
        .map(|t| (0..3).map(|c| x.q[t * 3 + c].abs()).sum::<f64>())
        .fold(0.0, f64::max);
    assert!(out.o.iter().all(|o| o.abs() <= 0.7 * qmax * vmax + 1e-12));
    assert!(out.state.unwrap().s.iter().all(|s| s.abs() <= vmax + 1e-12));
    assert_close("parallel", &forward(&p, Form::Parallel).o, &out.o, 1e-10);
}

#[test]
fn non_causal_uses_the_last_causal_state() {
    let x = data(dims(1, 9, 2, 3, 2), Some(vec![0, 4, 9]), false, 2.0, 8);
    let causal = forward(&problem(&x, false), Form::Parallel);
    let st = causal.state.unwrap();
    let nc: LightNetOutput = forward(&problem(&x, true), Form::Recurrent);
    let mut expect = vec![0.0; x.dims.v_len()];
    for (n, w) in [0usize, 4, 9].windows(2).enumerate() {
        for t in w[0]..w[1] {
            for h in 0..2 {
                for c in 0..3 {
                    for vv in 0..2 {
                        expect[(t * 2 + h) * 2 + vv] +=
                            0.7 * x.q[(t * 2 + h) * 3 + c] * st.s[((n * 2 + h) * 3 + c) * 2 + vv];
                    }
                }
            }
        }
    }
    assert_close("non-causal", &nc.o, &expect, 1e-12);
    // every form gives the same non-causal output
    for form in all_forms() {
        assert_eq!(forward(&problem(&x, true), form).o, nc.o);
    }
}

// ---------------------------------------------------------------- backward

fn loss(x: &Data, bidirectional: bool) -> f64 {
    forward(&problem(x, bidirectional), Form::Parallel)
        .o
        .iter()
        .zip(&x.d_o)
        .map(|(a, b)| a * b)
        .sum()
}

fn field(x: &mut Data, which: usize) -> &mut Vec<f64> {
    match which {
        0 => &mut x.q,
        1 => &mut x.k,
        _ => &mut x.v,
    }
}

fn check_gradients(mut x: Data, bidirectional: bool) {
    let g = backward(&problem(&x, bidirectional), Form::Recurrent, &x.d_o);
    let eps = 1e-5;
    for (which, analytic) in [(0, &g.dq), (1, &g.dk), (2, &g.dv)] {
        let n = field(&mut x, which).len();
        let fd: Vec<f64> = (0..n)
            .map(|i| {
                let orig = field(&mut x, which)[i];
                field(&mut x, which)[i] = orig + eps;
                let lp = loss(&x, bidirectional);
                field(&mut x, which)[i] = orig - eps;
                let lm = loss(&x, bidirectional);
                field(&mut x, which)[i] = orig;
                (lp - lm) / (2.0 * eps)
            })
            .collect();
        assert_close(["dq", "dk", "dv"][which], analytic, &fd, 1e-7);
    }
    // form does not change the gradients
    assert_eq!(
        g,
        backward(&problem(&x, bidirectional), Form::Parallel, &x.d_o)
    );
}

#[test]
fn causal_gradients_match_finite_differences() {
    check_gradients(data(dims(2, 5, 2, 3, 2), None, false, 1.0, 10), false);
    check_gradients(data(dims(2, 5, 1, 2, 3), None, true, 1.0, 11), false);
    check_gradients(
        data(dims(1, 8, 2, 2, 2), Some(vec![0, 3, 3, 8]), true, 2.0, 12),
        false,
    );
}

#[test]
fn non_causal_gradients_match_finite_differences() {
    check_gradients(data(dims(2, 5, 2, 3, 2), None, false, 1.0, 13), true);
    check_gradients(
        data(dims(1, 8, 2, 2, 2), Some(vec![0, 3, 3, 8]), false, 2.0, 14),
        true,
    );
}

// ---------------------------------------------------------------- reduction to the engine

/// LightNet is the engine's causal GLA on `(q, khat, v)` with the vector gate `g`; its `dk` is the
/// engine's `dk` (w.r.t. `khat`) and `dg` chained through `khat = exp(k - z)`, `g_t = z_{t-1} - z_t`.
#[test]
fn lightnet_equals_engine_on_the_additive_gate() {
    for (x, form) in [
        (
            data(dims(2, 7, 2, 3, 2), None, true, 1.0, 20),
            Form::Recurrent,
        ),
        (
            data(
                dims(1, 11, 2, 2, 3),
                Some(vec![0, 3, 3, 8, 11]),
                true,
                3.0,
                21,
            ),
            Form::Chunkwise { chunk: 4 },
        ),
        (
            data(dims(1, 9, 1, 2, 2), Some(vec![0, 4, 9]), false, 1.0, 22),
            Form::Parallel,
        ),
    ] {
        let d = x.dims;
        let z0 = x.state.as_ref().map(|s| s.z.as_slice());
        let gate = additive_gate(&d, &x.k, x.cu.as_deref(), z0);
        let engine = linear::Problem {
            dims: d,
            q: &x.q,
            k: &gate.khat,
            v: &x.v,
            gate: Gate::Vector(&gate.g),
            gate_bwd: None,
            direction: Direction::Causal,
            scale: 0.7,
            normalize: None,
            h0: x.state.as_ref().map(|s| s.s.as_slice()),
            cu_seqlens: x.cu.as_deref(),
        };
        let eo = linear::forward(&engine, form);
        let lo = forward(&problem(&x, false), Form::Parallel);
        assert_close("o", &eo.o, &lo.o, 1e-10);
        assert_close(
            "ht",
            eo.ht.as_ref().unwrap(),
            &lo.state.as_ref().unwrap().s,
            1e-10,
        );

        let eg = linear::backward(&engine, form, &x.d_o, None);
        let lg = backward(&problem(&x, false), Form::Parallel, &x.d_o);
        assert_close("dq", &eg.dq, &lg.dq, 1e-10);
        assert_close("dv", &eg.dv, &lg.dv, 1e-10);
        // chain rule: dL/dz_t = -dkhat_t khat_t - [g_t depends on z_t] dg_t + dg_{t+1};
        // dL/dk_s = dkhat_s khat_s + sum_{t >= s} dL/dz_t exp(k_s - z_t)
        let dg = eg.dg.as_ref().unwrap();
        let seqs: Vec<(usize, usize, usize)> = match &x.cu {
            Some(cu) => cu.windows(2).map(|w| (0, w[0], w[1])).collect(),
            None => (0..d.b).map(|b| (b, 0, d.t)).collect(),
        };
        let mut dk = vec![0.0; d.qk_len()];
        for (n, &(b, start, end)) in seqs.iter().enumerate() {
            for h in 0..d.h {
                for c in 0..d.k {
                    let idx = |t: usize| ((b * d.t + t) * d.h + h) * d.k + c;
                    let has_z0 = z0.is_some_and(|z| z[(n * d.h + h) * d.k + c] > f64::NEG_INFINITY);
                    // z_t recovered from khat: z_t = k_t - ln khat_t
                    let z = |t: usize| x.k[idx(t)] - gate.khat[idx(t)].ln();
                    let dz: Vec<f64> = (start..end)
                        .map(|t| {
                            let mut v = -eg.dk[idx(t)] * gate.khat[idx(t)];
                            if t > start || has_z0 {
                                v -= dg[idx(t)];
                            }
                            if t + 1 < end {
                                v += dg[idx(t + 1)];
                            }
                            v
                        })
                        .collect();
                    for s in start..end {
                        let mut v = eg.dk[idx(s)] * gate.khat[idx(s)];
                        for t in s..end {
                            v += dz[t - start] * (x.k[idx(s)] - z(t)).exp();
                        }
                        dk[idx(s)] = v;
                    }
                }
            }
        }
        assert_close("dk through khat and g", &dk, &lg.dk, 1e-9);
    }
}

// ---------------------------------------------------------------- MD-LRPE

#[test]
fn md_lrpe_hand_checked() {
    // Theta = concat(2 * [0.5, 1], 3 * [0.5, 1])[:3] = [1, 2, 1.5]
    let y = md_lrpe(&[1.0, 2.0, 3.0], 1, 3, &[2.0, 3.0], 2, &[0.5, 1.0]);
    let expect = [
        1f64.cos(),
        2.0 * 2f64.cos(),
        3.0 * 1.5f64.cos(),
        1f64.sin(),
        2.0 * 2f64.sin(),
        3.0 * 1.5f64.sin(),
    ];
    assert_close("md_lrpe", &y, &expect, 1e-15);
}

#[test]
fn md_lrpe_adjoint_and_finite_differences() {
    let mut rng = Rng::new(30);
    let (rows, d, n) = (5, 7, 3);
    let theta = rng.uniform_vec(3, 0.01, 1.0);
    let pos: Vec<f64> = (0..rows * n).map(|_| rng.range(0, 20) as f64).collect();
    let x = rng.randn(rows * d);
    let dy = rng.randn(rows * 2 * d);
    let y = md_lrpe(&x, rows, d, &pos, n, &theta);
    let dx = md_lrpe_backward(&dy, rows, d, &pos, n, &theta);
    let lhs: f64 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
    let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
    assert!((lhs - rhs).abs() < 1e-12 * lhs.abs().max(1.0));
    let eps = 1e-6;
    let fd: Vec<f64> = (0..x.len())
        .map(|i| {
            let mut xp = x.clone();
            xp[i] += eps;
            let mut xm = x.clone();
            xm[i] -= eps;
            let lp: f64 = md_lrpe(&xp, rows, d, &pos, n, &theta)
                .iter()
                .zip(&dy)
                .map(|(a, b)| a * b)
                .sum();
            let lm: f64 = md_lrpe(&xm, rows, d, &pos, n, &theta)
                .iter()
                .zip(&dy)
                .map(|(a, b)| a * b)
                .sum();
            (lp - lm) / (2.0 * eps)
        })
        .collect();
    assert_close("dx", &dx, &fd, 1e-8);
}

#[test]
fn md_lrpe_scores_depend_on_relative_positions_only() {
    // q'.k' = sum_c q_c k_c cos(Theta_q,c - Theta_k,c): shifting both grid positions by the same
    // offset leaves the score unchanged.
    let mut rng = Rng::new(31);
    let (d, n) = (8, 3);
    let theta = rng.uniform_vec(3, 0.05, 1.5);
    let q = rng.randn(d);
    let k = rng.randn(d);
    let score = |pq: &[f64], pk: &[f64]| -> f64 {
        let a = md_lrpe(&q, 1, d, pq, n, &theta);
        let b = md_lrpe(&k, 1, d, pk, n, &theta);
        a.iter().zip(&b).map(|(x, y)| x * y).sum()
    };
    let (pq, pk) = ([3.0, 1.0, 4.0], [1.0, 5.0, 9.0]);
    let base = score(&pq, &pk);
    for _ in 0..5 {
        let off: Vec<f64> = (0..n).map(|_| rng.range(0, 30) as f64).collect();
        let sq: Vec<f64> = pq.iter().zip(&off).map(|(a, b)| a + b).collect();
        let sk: Vec<f64> = pk.iter().zip(&off).map(|(a, b)| a + b).collect();
        assert!((score(&sq, &sk) - base).abs() < 1e-12);
    }
    // and it is the cosine of the angle difference per channel
    let m = theta.len();
    let expect: f64 = (0..d)
        .map(|c| q[c] * k[c] * ((pq[c / m] - pk[c / m]) * theta[c % m]).cos())
        .sum();
    assert!((base - expect).abs() < 1e-12);
}

#[test]
#[should_panic(expected = "empty prefix")]
fn stray_state_with_an_empty_prefix_is_rejected() {
    let mut x = data(dims(1, 3, 1, 1, 1), None, true, 1.0, 40);
    x.state.as_mut().unwrap().z[0] = f64::NEG_INFINITY;
    x.state.as_mut().unwrap().s[0] = 1.0;
    forward(&problem(&x, false), Form::Recurrent);
}

#[test]
fn empty_prefix_state_matches_no_state() {
    let mut x = data(dims(1, 5, 2, 2, 2), None, true, 1.0, 41);
    let st = x.state.as_mut().unwrap();
    st.z.iter_mut().for_each(|z| *z = f64::NEG_INFINITY);
    st.s.iter_mut().for_each(|s| *s = 0.0);
    let with = forward(&problem(&x, false), Form::Recurrent);
    x.state = None;
    for form in all_forms() {
        let without = forward(&problem(&x, false), form);
        assert_close("o", &with.o, &without.o, 1e-12);
    }
}

/// The adjoints of the two key transforms against central finite differences of
/// `L(k) = sum(khat * a) + sum(g * b)` (causal) and `sum(khat * a)` (non-causal), with varlen
/// (an empty sequence), an initial `z0` with a `-inf` entry, and without `z0`.
#[test]
fn key_transform_adjoints_match_finite_differences() {
    use linattn_reference::lightnet::{
        additive_gate_backward, softmax_keys, softmax_keys_backward,
    };
    let dims = Dims {
        b: 1,
        t: 9,
        h: 2,
        k: 3,
        v: 1,
    };
    let cu = vec![0, 4, 4, 9];
    let mut rng = Rng::new(31);
    let k: Vec<f64> = rng.randn(dims.qk_len()).iter().map(|x| 2.0 * x).collect();
    let a = rng.randn(dims.qk_len());
    let b = rng.randn(dims.qk_len());
    let mut z0 = rng.randn(3 * dims.h * dims.k);
    z0[1] = f64::NEG_INFINITY;
    let eps = 1e-6;
    for z0 in [None, Some(&z0[..])] {
        let loss = |k: &[f64]| {
            let gate = additive_gate(&dims, k, Some(&cu), z0);
            let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f64>();
            dot(&gate.khat, &a) + dot(&gate.g, &b)
        };
        let gate = additive_gate(&dims, &k, Some(&cu), z0);
        let dk = additive_gate_backward(&dims, &gate, &a, &b, Some(&cu), z0);
        for i in 0..k.len() {
            let (mut kp, mut km) = (k.clone(), k.clone());
            kp[i] += eps;
            km[i] -= eps;
            let fd = (loss(&kp) - loss(&km)) / (2.0 * eps);
            assert!(
                (fd - dk[i]).abs() <= 1e-7 * (1.0 + fd.abs()),
                "causal z0={} i={i}: {fd} vs {}",
                z0.is_some(),
                dk[i]
            );
        }
    }
    let loss = |k: &[f64]| {
        softmax_keys(&dims, k, Some(&cu))
            .iter()
            .zip(&a)
            .map(|(p, q)| p * q)
            .sum::<f64>()
    };
    let khat = softmax_keys(&dims, &k, Some(&cu));
    let dk = softmax_keys_backward(&dims, &khat, &a, Some(&cu));
    for i in 0..k.len() {
        let (mut kp, mut km) = (k.clone(), k.clone());
        kp[i] += eps;
        km[i] -= eps;
        let fd = (loss(&kp) - loss(&km)) / (2.0 * eps);
        assert!(
            (fd - dk[i]).abs() <= 1e-7 * (1.0 + fd.abs()),
            "softmax i={i}: {fd} vs {}",
            dk[i]
        );
    }
}
