//! Parallel form: the explicit masked matrix of ops.md section 1, O(L^2 K) per head, and its
//! derivative.
//!
//! `A_ij = scale sum_c q_ic k_jc M_ijc` with, per key channel `c`,
//! `log M_ijc = sum_{m=j+1..i} g_mc` (`j < i`), `0` (`j = i`), `sum_{m=i+1..j} gb_mc` (`j > i`,
//! bidirectional only). The sums are taken literally (accumulated outward from the diagonal), not
//! as differences of cumulative sums, so this form shares no algebra with the chunkwise one.
//! `o_i = sum_j A_ij v_j (+ scale (q_i * exp(sum_{m=0..i} g_m)) h0)`, or with normalisation
//! `o_i = sum_j A_ij v_j / (sum_j A_ij + eps)`.
//! `ht = sum_j (k_j * exp(sum_{m=j+1..L-1} g_m))^T v_j + diag(exp(sum_{m=0..L-1} g_m)) h0`.
//!
//! Backward: `dA_ij = do_i . v_j` (normalised: `(do_i . v_j - do_i . o_i) / (den_i + eps)`), then
//! `dq, dk` through `A`, and the gate gradient by the chain rule through `log M`: each mask entry
//! `(i, j, c)` contributes `W_ijc = scale dA_ij q_ic k_jc M_ijc` to every gate entry `g_mc` of its
//! interval `m in [j+1, i]` (or `gb_mc`, `m in [i+1, j]`); the interval additions go through a
//! difference array, keeping the whole backward O(L^2 K).

use super::{Direction, HeadGrads, HeadOutput, HeadProblem, dot, row, row_mut};

/// `log M_ij` for query row `i` and every key `j` that row sees, as `[L, K]`. Entries outside
/// [`visible`]`(hp, i)` are not written (left at `-inf`) and never read.
pub fn log_mask_row(hp: &HeadProblem, i: usize) -> Vec<f64> {
    let kd = hp.key_dim;
    let mut log_mask = vec![f64::NEG_INFINITY; hp.len * kd];
    row_mut(&mut log_mask, i, kd).fill(0.0);
    // Below the diagonal: sum_{m=j+1..i} g_m, growing as j moves away from i.
    let mut acc = vec![0.0; kd];
    for j in (0..i).rev() {
        for (a, g) in acc.iter_mut().zip(row(&hp.g, j + 1, kd)) {
            *a += g;
        }
        row_mut(&mut log_mask, j, kd).copy_from_slice(&acc);
    }
    if hp.direction == Direction::Bidirectional {
        // Above the diagonal: sum_{m=i+1..j} gb_m.
        acc.fill(0.0);
        for j in i + 1..hp.len {
            for (a, g) in acc.iter_mut().zip(row(&hp.gb, j, kd)) {
                *a += g;
            }
            row_mut(&mut log_mask, j, kd).copy_from_slice(&acc);
        }
    }
    log_mask
}

/// The keys `j` query `i` sees.
pub fn visible(hp: &HeadProblem, i: usize) -> std::ops::Range<usize> {
    match hp.direction {
        Direction::Causal => 0..i + 1,
        Direction::Bidirectional => 0..hp.len,
    }
}

/// Row `i` of the score matrix, `A_ij` for `j` in [`visible`] (zero elsewhere).
pub fn score_row(hp: &HeadProblem, i: usize, log_mask: &[f64]) -> Vec<f64> {
    let kd = hp.key_dim;
    let q = row(&hp.q, i, kd);
    let mut a = vec![0.0; hp.len];
    for j in visible(hp, i) {
        let k = row(&hp.k, j, kd);
        let lm = row(log_mask, j, kd);
        a[j] = hp.scale * (0..kd).map(|c| q[c] * k[c] * lm[c].exp()).sum::<f64>();
    }
    a
}

/// `sum_{m=0..i} g_m` for every `i` (`[L, K]`): the decay applied to `h0` up to token `i`.
fn h0_log_decays(hp: &HeadProblem) -> Vec<f64> {
    let kd = hp.key_dim;
    let mut out = vec![0.0; hp.len * kd];
    let mut acc = vec![0.0; kd];
    for t in 0..hp.len {
        for (a, g) in acc.iter_mut().zip(row(&hp.g, t, kd)) {
            *a += g;
        }
        row_mut(&mut out, t, kd).copy_from_slice(&acc);
    }
    out
}

/// Forward pass of the parallel form on one (sequence, head).
pub fn forward(hp: &HeadProblem) -> HeadOutput {
    let (l, kd, w) = (hp.len, hp.key_dim, hp.value_dim);
    let h0_decay = h0_log_decays(hp);
    let mut o = vec![0.0; l * w];
    for i in 0..l {
        let a = score_row(hp, i, &log_mask_row(hp, i));
        let o_row = row_mut(&mut o, i, w);
        for j in visible(hp, i) {
            for (ov, vv) in o_row.iter_mut().zip(row(&hp.v, j, w)) {
                *ov += a[j] * vv;
            }
        }
        if let Some(eps) = hp.normalize {
            let den = a.iter().sum::<f64>() + eps;
            o_row.iter_mut().for_each(|x| *x /= den);
        }
        if let Some(h0) = &hp.h0 {
            let q = row(&hp.q, i, kd);
            let decay = row(&h0_decay, i, kd);
            for c in 0..kd {
                let coef = hp.scale * q[c] * decay[c].exp();
                for (ov, hv) in o_row.iter_mut().zip(row(h0, c, w)) {
                    *ov += coef * hv;
                }
            }
        }
    }
    let ht = hp.has_final_state().then(|| final_state(hp, &h0_decay));
    HeadOutput { o, ht }
}

/// `ht` from its closed form (an empty sequence leaves `h0`, or zero).
fn final_state(hp: &HeadProblem, h0_decay: &[f64]) -> Vec<f64> {
    let (l, kd, w) = (hp.len, hp.key_dim, hp.value_dim);
    let mut ht = vec![0.0; kd * w];
    if l == 0 {
        if let Some(h0) = &hp.h0 {
            ht.copy_from_slice(h0);
        }
        return ht;
    }
    // Row L-1 of the causal log mask is exactly sum_{m=j+1..L-1} g_m.
    let log_mask = log_mask_row(hp, l - 1);
    for j in 0..l {
        let (k, v, lm) = (row(&hp.k, j, kd), row(&hp.v, j, w), row(&log_mask, j, kd));
        for c in 0..kd {
            let coef = k[c] * lm[c].exp();
            for (hv, vv) in row_mut(&mut ht, c, w).iter_mut().zip(v) {
                *hv += coef * vv;
            }
        }
    }
    if let Some(h0) = &hp.h0 {
        let decay = row(h0_decay, l - 1, kd);
        for c in 0..kd {
            let d = decay[c].exp();
            for (hv, h0v) in row_mut(&mut ht, c, w).iter_mut().zip(row(h0, c, w)) {
                *hv += d * h0v;
            }
        }
    }
    ht
}

/// Adds `x` to every row `m` in `[lo, hi]` of a `[L, K]` gradient, recorded in the difference
/// array `diff` (`[L + 1, K]`): `diff[lo] += x`, `diff[hi + 1] -= x`.
fn add_interval(diff: &mut [f64], kd: usize, lo: usize, hi: usize, c: usize, x: f64) {
    diff[lo * kd + c] += x;
    diff[(hi + 1) * kd + c] -= x;
}

/// Prefix sum over rows of a difference array `[L + 1, K]`, giving `[L, K]`.
fn integrate(diff: &[f64], l: usize, kd: usize) -> Vec<f64> {
    let mut out = vec![0.0; l * kd];
    let mut acc = vec![0.0; kd];
    for m in 0..l {
        for (a, d) in acc.iter_mut().zip(row(diff, m, kd)) {
            *a += d;
        }
        row_mut(&mut out, m, kd).copy_from_slice(&acc);
    }
    out
}

/// Backward pass of the parallel form on one (sequence, head).
pub fn backward(hp: &HeadProblem, d_o: &[f64], d_ht: Option<&[f64]>) -> HeadGrads {
    let (l, kd, w, scale) = (hp.len, hp.key_dim, hp.value_dim, hp.scale);
    if d_ht.is_some() {
        assert!(
            hp.has_final_state(),
            "d_ht given for a problem without a final state"
        );
    }
    let mut grads = hp.zero_grads();
    let mut diff_g = vec![0.0; (l + 1) * kd];
    let mut diff_gb = vec![0.0; (l + 1) * kd];
    let h0_decay = h0_log_decays(hp);

    for i in 0..l {
        let log_mask = log_mask_row(hp, i);
        let a = score_row(hp, i, &log_mask);
        let d_o_i = row(d_o, i, w);
        // dL/dA_ij and the weight of A_ij in o_i.
        let (d_a, a_weight): (Vec<f64>, f64) = match hp.normalize {
            None => ((0..l).map(|j| dot(d_o_i, row(&hp.v, j, w))).collect(), 1.0),
            Some(eps) => {
                // o_i = sum_j A_ij v_j / den_i, den_i = sum_j A_ij + eps:
                // dL/dA_ij = (do_i . v_j) / den_i - (do_i . o_i) / den_i.
                let den = a.iter().sum::<f64>() + eps;
                let mut o_i = vec![0.0; w];
                for j in visible(hp, i) {
                    for (ov, vv) in o_i.iter_mut().zip(row(&hp.v, j, w)) {
                        *ov += a[j] * vv / den;
                    }
                }
                let do_o = dot(d_o_i, &o_i);
                (
                    (0..l)
                        .map(|j| (dot(d_o_i, row(&hp.v, j, w)) - do_o) / den)
                        .collect(),
                    1.0 / den,
                )
            }
        };
        let q = row(&hp.q, i, kd);
        for j in visible(hp, i) {
            for (dv, d) in row_mut(&mut grads.dv, j, w).iter_mut().zip(d_o_i) {
                *dv += a[j] * a_weight * d;
            }
            let k = row(&hp.k, j, kd);
            let lm = row(&log_mask, j, kd);
            for c in 0..kd {
                let m = lm[c].exp();
                grads.dq[i * kd + c] += scale * d_a[j] * k[c] * m;
                grads.dk[j * kd + c] += scale * d_a[j] * q[c] * m;
                // dL/d(log M_ijc), spread over the gate entries the mask entry sums.
                let weight = scale * d_a[j] * q[c] * k[c] * m;
                if j < i {
                    add_interval(&mut diff_g, kd, j + 1, i, c, weight);
                } else if j > i {
                    add_interval(&mut diff_gb, kd, i + 1, j, c, weight);
                }
            }
        }
        if let Some(h0) = &hp.h0 {
            // o_i += scale sum_c q_ic E_ic h0[c, :], E_ic = exp(sum_{m=0..i} g_mc).
            let decay = row(&h0_decay, i, kd);
            let dh0 = grads.dh0.as_mut().expect("dh0 exists with h0");
            for c in 0..kd {
                let e = decay[c].exp();
                let h0_do = dot(row(h0, c, w), d_o_i);
                grads.dq[i * kd + c] += scale * e * h0_do;
                for (dh, d) in row_mut(dh0, c, w).iter_mut().zip(d_o_i) {
                    *dh += scale * q[c] * e * d;
                }
                add_interval(&mut diff_g, kd, 0, i, c, scale * q[c] * e * h0_do);
            }
        }
    }

    if let (Some(d_ht), true) = (d_ht, l > 0) {
        // ht = sum_j (k_j * F_j)^T v_j + diag(E_{L-1}) h0, F_jc = exp(sum_{m=j+1..L-1} g_mc).
        let log_mask = log_mask_row(hp, l - 1);
        for j in 0..l {
            let (k, v, lm) = (row(&hp.k, j, kd), row(&hp.v, j, w), row(&log_mask, j, kd));
            for c in 0..kd {
                let f = lm[c].exp();
                let dht_v = dot(row(d_ht, c, w), v);
                grads.dk[j * kd + c] += f * dht_v;
                for (dv, d) in row_mut(&mut grads.dv, j, w).iter_mut().zip(row(d_ht, c, w)) {
                    *dv += k[c] * f * d;
                }
                if j + 1 < l {
                    add_interval(&mut diff_g, kd, j + 1, l - 1, c, k[c] * f * dht_v);
                }
            }
        }
        if let Some(h0) = &hp.h0 {
            let decay = row(&h0_decay, l - 1, kd);
            let dh0 = grads.dh0.as_mut().expect("dh0 exists with h0");
            for c in 0..kd {
                let e = decay[c].exp();
                for (dh, d) in row_mut(dh0, c, w).iter_mut().zip(row(d_ht, c, w)) {
                    *dh += e * d;
                }
                add_interval(
                    &mut diff_g,
                    kd,
                    0,
                    l - 1,
                    c,
                    e * dot(row(h0, c, w), row(d_ht, c, w)),
                );
            }
        }
    } else if let (Some(d_ht), Some(dh0)) = (d_ht, grads.dh0.as_mut()) {
        // Empty sequence: ht = h0.
        for (dh, d) in dh0.iter_mut().zip(d_ht) {
            *dh += d;
        }
    }

    grads.dg = integrate(&diff_g, l, kd);
    grads.dgb = integrate(&diff_gb, l, kd);
    grads
}
