//! Masked softmax attention: hand-checked values, a brute-force dense formula (explicit token mask,
//! explicit softmax Jacobian), central finite differences, empty rows, causal with T != S, masks
//! with and without the diagonal.

use linattn_reference::attention::{
    AttnDims, AttnGrads, AttnOutput, AttnProblem, backward, forward,
};
use linattn_reference::block_mask::BlockMask;
use linattn_reference::testing::Rng;
use linattn_reference::{max_abs_diff, rel_rms};

struct Data {
    dims: AttnDims,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    d_o: Vec<f64>,
}

fn data(dims: AttnDims, seed: u64) -> Data {
    let mut rng = Rng::new(seed);
    let ql = dims.b * dims.t * dims.h * dims.d;
    let kl = dims.b * dims.s * dims.h * dims.d;
    Data {
        dims,
        q: rng.randn(ql),
        k: rng.randn(kl),
        v: rng.randn(kl),
        d_o: rng.randn(ql),
    }
}

fn problem<'a>(x: &'a Data, causal: bool, mask: Option<&'a BlockMask>) -> AttnProblem<'a> {
    AttnProblem {
        dims: x.dims,
        q: &x.q,
        k: &x.k,
        v: &x.v,
        scale: 1.0 / (x.dims.d as f64).sqrt(),
        causal,
        mask,
    }
}

/// The token-level `[T, S]` mask, built block by block over explicit token ranges (not through
/// `BlockMask::allows_tokens`), with the causal rule `j <= i`.
fn token_mask(dims: &AttnDims, causal: bool, mask: Option<&BlockMask>) -> Vec<bool> {
    let (t, s) = (dims.t, dims.s);
    let mut m = vec![mask.is_none(); t * s];
    if let Some(bm) = mask {
        for qb in 0..bm.nq() {
            for kb in 0..bm.nk() {
                if !bm.allowed(qb, kb) {
                    continue;
                }
                for i in qb * bm.block_q()..((qb + 1) * bm.block_q()).min(t) {
                    for j in kb * bm.block_k()..((kb + 1) * bm.block_k()).min(s) {
                        m[i * s + j] = true;
                    }
                }
            }
        }
    }
    if causal {
        for i in 0..t {
            for j in i + 1..s {
                m[i * s + j] = false;
            }
        }
    }
    m
}

/// Dense brute force: full score matrix with `-inf` where masked, softmax per row (max subtracted),
/// and the backward through the explicit softmax Jacobian `diag(p) - p p^T`.
fn brute(p: &AttnProblem, d_o: &[f64]) -> (AttnOutput, AttnGrads) {
    let AttnDims { b, t, s, h, d } = p.dims;
    let tm = token_mask(&p.dims, p.causal, p.mask);
    let qi = |bb: usize, i: usize, hh: usize| ((bb * t + i) * h + hh) * d;
    let kj = |bb: usize, j: usize, hh: usize| ((bb * s + j) * h + hh) * d;
    let mut o = vec![0.0; b * t * h * d];
    let mut lse = vec![f64::NEG_INFINITY; b * h * t];
    let mut dq = vec![0.0; b * t * h * d];
    let mut dk = vec![0.0; b * s * h * d];
    let mut dv = vec![0.0; b * s * h * d];
    for bb in 0..b {
        for hh in 0..h {
            for i in 0..t {
                let mut sc = vec![f64::NEG_INFINITY; s];
                for j in 0..s {
                    if tm[i * s + j] {
                        sc[j] = p.scale
                            * (0..d)
                                .map(|x| p.q[qi(bb, i, hh) + x] * p.k[kj(bb, j, hh) + x])
                                .sum::<f64>();
                    }
                }
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let l: f64 = e.iter().sum();
                let pr: Vec<f64> = e.iter().map(|x| x / l).collect();
                lse[(bb * h + hh) * t + i] = m + l.ln();
                for (j, pj) in pr.iter().enumerate() {
                    for x in 0..d {
                        o[qi(bb, i, hh) + x] += pj * p.v[kj(bb, j, hh) + x];
                    }
                }
                // dp_j = d_o_i . v_j ; ds = (diag(p) - p p^T) dp
                let dp: Vec<f64> = (0..s)
                    .map(|j| {
                        (0..d)
                            .map(|x| d_o[qi(bb, i, hh) + x] * p.v[kj(bb, j, hh) + x])
                            .sum()
                    })
                    .collect();
                for j in 0..s {
                    let mut ds = 0.0;
                    for jj in 0..s {
                        let jac = if j == jj { pr[j] } else { 0.0 } - pr[j] * pr[jj];
                        ds += jac * dp[jj];
                    }
                    for x in 0..d {
                        dq[qi(bb, i, hh) + x] += p.scale * ds * p.k[kj(bb, j, hh) + x];
                        dk[kj(bb, j, hh) + x] += p.scale * ds * p.q[qi(bb, i, hh) + x];
                        dv[kj(bb, j, hh) + x] += pr[j] * d_o[qi(bb, i, hh) + x];
                    }
                }
            }
        }
    }
    (AttnOutput { o, lse }, AttnGrads { dq, dk, dv })
}

fn loss(p: &AttnProblem, d_o: &[f64]) -> f64 {
    forward(p).o.iter().zip(d_o).map(|(a, b)| a * b).sum()
}

fn field(y: &mut Data, which: usize) -> &mut Vec<f64> {
    match which {
        0 => &mut y.q,
        1 => &mut y.k,
        _ => &mut y.v,
    }
}

/// Central differences of `sum(o * d_o)` w.r.t. every element of q, k, v.
fn finite_differences(x: &Data, causal: bool, mask: Option<&BlockMask>) -> AttnGrads {
    let eps = 1e-5;
    let mut y = Data {
        dims: x.dims,
        q: x.q.clone(),
        k: x.k.clone(),
        v: x.v.clone(),
        d_o: x.d_o.clone(),
    };
    let mut grad = |which: usize| -> Vec<f64> {
        let n = field(&mut y, which).len();
        (0..n)
            .map(|idx| {
                let orig = field(&mut y, which)[idx];
                field(&mut y, which)[idx] = orig + eps;
                let lp = loss(&problem(&y, causal, mask), &y.d_o);
                field(&mut y, which)[idx] = orig - eps;
                let lm = loss(&problem(&y, causal, mask), &y.d_o);
                field(&mut y, which)[idx] = orig;
                (lp - lm) / (2.0 * eps)
            })
            .collect()
    };
    AttnGrads {
        dq: grad(0),
        dk: grad(1),
        dv: grad(2),
    }
}

fn assert_close(name: &str, a: &[f64], r: &[f64], tol: f64) {
    let err = rel_rms(a, r);
    let abs = max_abs_diff(a, r);
    assert!(
        abs <= 1e-12 || err <= tol,
        "{name}: rel_rms {err:e}, max abs {abs:e} (tol {tol:e})"
    );
}

fn check_all(x: &Data, causal: bool, mask: Option<&BlockMask>) {
    let p = problem(x, causal, mask);
    let out = forward(&p);
    let grads = backward(&p, &x.d_o);
    for v in out
        .o
        .iter()
        .chain(&grads.dq)
        .chain(&grads.dk)
        .chain(&grads.dv)
    {
        assert!(v.is_finite(), "non-finite output or gradient");
    }
    assert!(out.lse.iter().all(|l| !l.is_nan() && *l < f64::INFINITY));
    let (bo, bg) = brute(&p, &x.d_o);
    assert_close("o vs brute", &out.o, &bo.o, 1e-13);
    assert_eq!(
        out.lse.iter().map(|l| l.is_finite()).collect::<Vec<_>>(),
        bo.lse.iter().map(|l| l.is_finite()).collect::<Vec<_>>()
    );
    let fin = |v: &[f64]| {
        v.iter()
            .map(|l| if l.is_finite() { *l } else { 0.0 })
            .collect::<Vec<_>>()
    };
    assert_close("lse vs brute", &fin(&out.lse), &fin(&bo.lse), 1e-13);
    assert_close("dq vs brute", &grads.dq, &bg.dq, 1e-12);
    assert_close("dk vs brute", &grads.dk, &bg.dk, 1e-12);
    assert_close("dv vs brute", &grads.dv, &bg.dv, 1e-12);
    let fd = finite_differences(x, causal, mask);
    assert_close("dq vs FD", &grads.dq, &fd.dq, 1e-7);
    assert_close("dk vs FD", &grads.dk, &fd.dk, 1e-7);
    assert_close("dv vs FD", &grads.dv, &fd.dv, 1e-7);
}

fn dims(b: usize, t: usize, s: usize, h: usize, d: usize) -> AttnDims {
    AttnDims { b, t, s, h, d }
}

#[test]
fn hand_checked_causal_t_lt_s() {
    // T = 2, S = 3, D = 1, scale 1: row 0 sees key 0 only, row 1 keys 0 and 1 (top-left aligned).
    let q = [1.0, 2.0];
    let k = [0.0, 1.0, 2.0];
    let v = [1.0, 2.0, 3.0];
    let p = AttnProblem {
        dims: dims(1, 2, 3, 1, 1),
        q: &q,
        k: &k,
        v: &v,
        scale: 1.0,
        causal: true,
        mask: None,
    };
    let out = forward(&p);
    let e2 = 2f64.exp();
    assert!((out.o[0] - 1.0).abs() < 1e-15);
    assert!((out.o[1] - (1.0 + 2.0 * e2) / (1.0 + e2)).abs() < 1e-15);
    assert!(out.lse[0].abs() < 1e-15);
    assert!((out.lse[1] - (1.0 + e2).ln()).abs() < 1e-15);
    // non-causal row 1: keys 0, 1, 2 with scores 0, 2, 4
    let out = forward(&AttnProblem { causal: false, ..p });
    let e4 = 4f64.exp();
    assert!((out.lse[1] - (1.0 + e2 + e4).ln()).abs() < 1e-14);
    assert!((out.o[1] - (1.0 + 2.0 * e2 + 3.0 * e4) / (1.0 + e2 + e4)).abs() < 1e-14);
}

#[test]
fn dense_matches_brute_and_finite_differences() {
    let x = data(dims(2, 5, 6, 2, 3), 11);
    check_all(&x, false, None);
}

#[test]
fn causal_t_ne_s() {
    for (t, s, seed) in [(7, 4, 1), (3, 6, 2), (5, 5, 3)] {
        let x = data(dims(1, t, s, 2, 3), seed);
        check_all(&x, true, None);
        // rows i >= S - 1 see every key: identical to non-causal there
        let pc = forward(&problem(&x, true, None));
        let pn = forward(&problem(&x, false, None));
        for hh in 0..2 {
            for i in 0..t {
                let same = (pc.lse[hh * t + i] - pn.lse[hh * t + i]).abs() < 1e-14;
                assert_eq!(same, i + 1 >= s, "t {t} s {s} row {i}");
            }
        }
    }
}

#[test]
fn block_mask_with_partial_blocks() {
    // T = 7, S = 5, blocks 3 x 2: grid 3 x 3, last blocks partial (1 query, 1 key token)
    let x = data(dims(2, 7, 5, 1, 2), 21);
    let m = BlockMask::from_dense(3, 3, 3, 2, &[1, 0, 1, 0, 1, 1, 1, 0, 0]).unwrap();
    check_all(&x, false, Some(&m));
    check_all(&x, true, Some(&m));
}

#[test]
fn full_mask_equals_no_mask() {
    let x = data(dims(1, 6, 9, 2, 4), 5);
    let full = BlockMask::full_for_tokens(6, 9, 4, 4).unwrap();
    for causal in [false, true] {
        let a = forward(&problem(&x, causal, None));
        let b = forward(&problem(&x, causal, Some(&full)));
        assert_eq!(a, b);
        assert_eq!(
            backward(&problem(&x, causal, None), &x.d_o),
            backward(&problem(&x, causal, Some(&full)), &x.d_o)
        );
    }
}

#[test]
fn empty_rows_give_zero_output_and_gradients() {
    // T = S = 8, blocks of 2; strictly-lower block mask (no diagonal) + causal: the first query
    // block has no key; a fully masked second block row as well.
    let x = data(dims(1, 8, 8, 2, 3), 8);
    let m = BlockMask::from_fn_for_tokens(8, 8, 2, 2, |a, b| b < a && a != 2).unwrap();
    let p = problem(&x, true, Some(&m));
    let out = forward(&p);
    let g = backward(&p, &x.d_o);
    for hh in 0..2 {
        for i in 0..8 {
            let empty = i < 2 || (4..6).contains(&i);
            assert_eq!(out.lse[hh * 8 + i] == f64::NEG_INFINITY, empty, "row {i}");
            let off = (i * 2 + hh) * 3;
            if empty {
                assert!(out.o[off..off + 3].iter().all(|&v| v == 0.0));
                assert!(g.dq[off..off + 3].iter().all(|&v| v == 0.0));
            }
        }
    }
    // keys 6, 7 are seen by nobody (block 3 only sees blocks < 3): zero dk, dv
    for j in 6..8 {
        for hh in 0..2 {
            let off = (j * 2 + hh) * 3;
            assert!(
                g.dk[off..off + 3]
                    .iter()
                    .chain(&g.dv[off..off + 3])
                    .all(|&v| v == 0.0)
            );
        }
    }
    check_all(&x, true, Some(&m));
    // an all-empty mask
    let none = BlockMask::empty(4, 4, 2, 2).unwrap();
    let out = forward(&problem(&x, false, Some(&none)));
    assert!(out.o.iter().all(|&v| v == 0.0));
    assert!(out.lse.iter().all(|&l| l == f64::NEG_INFINITY));
    let g = backward(&problem(&x, false, Some(&none)), &x.d_o);
    assert!(g.dq.iter().chain(&g.dk).chain(&g.dv).all(|&v| v == 0.0));
}

#[test]
fn masks_with_and_without_diagonal() {
    let x = data(dims(1, 9, 9, 1, 2), 13);
    // with the diagonal: block-banded; without: off-diagonal blocks only (non-causal)
    let with_diag = BlockMask::from_fn_for_tokens(9, 9, 3, 3, |a, b| a.abs_diff(b) <= 1).unwrap();
    let without = BlockMask::from_fn_for_tokens(9, 9, 3, 3, |a, b| a != b).unwrap();
    for causal in [false, true] {
        check_all(&x, causal, Some(&with_diag));
        check_all(&x, causal, Some(&without));
    }
}

#[test]
fn large_scores_are_stable_and_sum_rules_hold() {
    let mut x = data(dims(1, 6, 7, 2, 4), 17);
    for q in &mut x.q {
        *q *= 300.0; // scores of order +-1e3: exp would overflow without the max subtraction
    }
    let p = problem(&x, false, None);
    let out = forward(&p);
    assert!(out.o.iter().chain(&out.lse).all(|v| v.is_finite()));
    let (bo, _) = brute(&p, &x.d_o);
    assert_close("o", &out.o, &bo.o, 1e-12);
    // o is a convex combination of the values, per channel
    for i in 0..6 {
        for hh in 0..2 {
            for dd in 0..4 {
                let vs: Vec<f64> = (0..7).map(|j| x.v[(j * 2 + hh) * 4 + dd]).collect();
                let lo = vs.iter().cloned().fold(f64::INFINITY, f64::min);
                let hi = vs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let o = out.o[(i * 2 + hh) * 4 + dd];
                assert!(o >= lo - 1e-12 && o <= hi + 1e-12);
            }
        }
    }
    // softmax rows sum to one: sum_j dv_j = sum_i d_o_i; sum_j dS_ij = 0: sum_j dk_j = 0
    let x = data(dims(1, 6, 7, 2, 4), 18);
    let g = backward(&problem(&x, false, None), &x.d_o);
    for hh in 0..2 {
        for dd in 0..4 {
            let sdv: f64 = (0..7).map(|j| g.dv[(j * 2 + hh) * 4 + dd]).sum();
            let sdo: f64 = (0..6).map(|i| x.d_o[(i * 2 + hh) * 4 + dd]).sum();
            let sdk: f64 = (0..7).map(|j| g.dk[(j * 2 + hh) * 4 + dd]).sum();
            assert!((sdv - sdo).abs() < 1e-12);
            assert!(sdk.abs() < 1e-12);
        }
    }
}

#[test]
#[should_panic(expected = "block mask")]
fn mask_on_the_wrong_grid_is_rejected() {
    let x = data(dims(1, 8, 8, 1, 2), 1);
    let m = BlockMask::full(3, 4, 2, 2).unwrap(); // the 8 x 8 grid of 2 x 2 blocks is 4 x 4
    forward(&problem(&x, false, Some(&m)));
}
