//! Parallel (attention) form: the explicit `T x T` masked matrix, `O(T^2 K)`, one thread per
//! query row (forward, `dq`) or key column (`dk`, `dv`).
//!
//! The mask entry of the pair `(i, j)`, `j <= i`, is `exp(sum_{m = j+1..i} g_m)` per key channel.
//! A thread walks `j` away from its own row and keeps that exponent as a running sum of the gates
//! it steps over (in a scratch row `[rows, H, K]`), so every exponent is a sum of non-positive
//! terms accumulated in order: `<= 0`, and never a difference of two large cumulative sums (whose
//! cancellation would cost an ulp of `|G|`, which grows with `T`).

use cubecl::prelude::*;

use super::layout::{gate_value, physical_row};
use crate::cube::launch::thread_index;

/// `o_i = sum_{j <= i} scale (q_i . k_j exp(gates j+1..=i)) v_j` (+ the `h0` term), one thread per
/// (logical row, head); `o` is written (or added to when `accumulate`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn parallel_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    seqs: &[u32],
    row_seq: &[u32],
    h0: &[f32],
    o: &mut [f32],
    exponent: &mut [f32],
    rows: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    scale: f32,
    kind: u32,
    reverse: u32,
    strict: u32,
    has_h0: u32,
    accumulate: u32,
) {
    let id = thread_index();
    if id < rows * heads {
        let h = id % heads;
        let i = id / heads;
        let n = row_seq[i] as usize;
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let pi = physical_row(i, s0, slen, reverse);
        let eo = (i * heads + h) * dk;
        let qo = (pi * heads + h) * dk;
        let oo = (pi * heads + h) * dv;
        for kk in 0..dk {
            exponent[eo + kk] = 0.0;
        }
        if accumulate == 0 {
            for vv in 0..dv {
                o[oo + vv] = 0.0;
            }
        }
        for step in 0..i - s0 + 1 {
            let j = i - step;
            if step > 0 {
                for kk in 0..dk {
                    exponent[eo + kk] +=
                        gate_value(g, kind, j + 1, s0, slen, reverse, h, kk, heads, dk);
                }
            }
            if step > 0 || strict == 0 {
                let pj = physical_row(j, s0, slen, reverse);
                let ko = (pj * heads + h) * dk;
                let mut a = 0.0f32;
                for kk in 0..dk {
                    a += q[qo + kk] * k[ko + kk] * exponent[eo + kk].exp();
                }
                a *= scale;
                let vo = (pj * heads + h) * dv;
                for vv in 0..dv {
                    o[oo + vv] += a * v[vo + vv];
                }
            }
        }
        if has_h0 == 1 {
            // exp(gates s0..=i) weighs the initial state.
            for kk in 0..dk {
                let e = exponent[eo + kk]
                    + gate_value(g, kind, s0, s0, slen, reverse, h, kk, heads, dk);
                exponent[eo + kk] = scale * q[qo + kk] * e.exp();
            }
            let so = (n * heads + h) * dk * dv;
            for vv in 0..dv {
                let mut acc = 0.0f32;
                for kk in 0..dk {
                    acc += exponent[eo + kk] * h0[so + kk * dv + vv];
                }
                o[oo + vv] += acc;
            }
        }
    }
}

/// `dq_i = scale sum_{j <= i} (do_i . v_j) k_j exp(gates j+1..=i)` (+ the `h0` term), one thread
/// per (logical row, head). The off-diagonal part accumulates in `gq`, which ends as `q dq`
/// without the diagonal.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn parallel_dq(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    d_o: &[f32],
    seqs: &[u32],
    row_seq: &[u32],
    h0: &[f32],
    dq: &mut [f32],
    gq: &mut [f32],
    exponent: &mut [f32],
    rows: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    scale: f32,
    kind: u32,
    reverse: u32,
    strict: u32,
    has_h0: u32,
    accumulate: u32,
) {
    let id = thread_index();
    if id < rows * heads {
        let h = id % heads;
        let i = id / heads;
        let n = row_seq[i] as usize;
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let pi = physical_row(i, s0, slen, reverse);
        let eo = (i * heads + h) * dk;
        let qo = (pi * heads + h) * dk;
        let go = (pi * heads + h) * dv;
        for kk in 0..dk {
            exponent[eo + kk] = 0.0;
            gq[eo + kk] = 0.0;
        }
        for step in 1..i - s0 + 1 {
            let j = i - step;
            for kk in 0..dk {
                exponent[eo + kk] += gate_value(g, kind, j + 1, s0, slen, reverse, h, kk, heads, dk);
            }
            let pj = physical_row(j, s0, slen, reverse);
            let vo = (pj * heads + h) * dv;
            let mut da = 0.0f32;
            for vv in 0..dv {
                da += d_o[go + vv] * v[vo + vv];
            }
            let ko = (pj * heads + h) * dk;
            for kk in 0..dk {
                gq[eo + kk] += scale * da * k[ko + kk] * exponent[eo + kk].exp();
            }
        }
        if has_h0 == 1 {
            let so = (n * heads + h) * dk * dv;
            for kk in 0..dk {
                let e = exponent[eo + kk]
                    + gate_value(g, kind, s0, s0, slen, reverse, h, kk, heads, dk);
                let mut acc = 0.0f32;
                for vv in 0..dv {
                    acc += h0[so + kk * dv + vv] * d_o[go + vv];
                }
                gq[eo + kk] += scale * e.exp() * acc;
            }
        }
        let mut diag_da = 0.0f32;
        if strict == 0 {
            let vo = (pi * heads + h) * dv;
            for vv in 0..dv {
                diag_da += d_o[go + vv] * v[vo + vv];
            }
        }
        for kk in 0..dk {
            let off = gq[eo + kk];
            let mut total = off + scale * diag_da * k[qo + kk];
            if accumulate == 1 {
                total += dq[qo + kk];
            }
            dq[qo + kk] = total;
            gq[eo + kk] = q[qo + kk] * off;
        }
    }
}

/// `dk_j`, `dv_j` over the rows `i >= j`, one thread per (logical column, head):
/// `dv_j = sum_i A_ij do_i`, `dk_j = scale sum_i (do_i . v_j) q_i exp(gates j+1..=i)`, plus the
/// `dht` terms (`ht` holds `k_j exp(gates j+1..=end) v_j`). The off-diagonal `dk` accumulates in
/// `gk`, which ends as `k dk` without the diagonal.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn parallel_dkdv(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    d_o: &[f32],
    seqs: &[u32],
    row_seq: &[u32],
    dht: &[f32],
    dkey: &mut [f32],
    dvalue: &mut [f32],
    gk: &mut [f32],
    exponent: &mut [f32],
    rows: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    scale: f32,
    kind: u32,
    reverse: u32,
    strict: u32,
    has_dht: u32,
    accumulate: u32,
) {
    let id = thread_index();
    if id < rows * heads {
        let h = id % heads;
        let j = id / heads;
        let n = row_seq[j] as usize;
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let pj = physical_row(j, s0, slen, reverse);
        let eo = (j * heads + h) * dk;
        let ko = (pj * heads + h) * dk;
        let vo = (pj * heads + h) * dv;
        for kk in 0..dk {
            exponent[eo + kk] = 0.0;
            gk[eo + kk] = 0.0;
        }
        if accumulate == 0 {
            for vv in 0..dv {
                dvalue[vo + vv] = 0.0;
            }
        }
        let mut diag_da = 0.0f32;
        for step in 0..s0 + slen - j {
            let i = j + step;
            if step > 0 {
                for kk in 0..dk {
                    exponent[eo + kk] += gate_value(g, kind, i, s0, slen, reverse, h, kk, heads, dk);
                }
            }
            if step > 0 || strict == 0 {
                let pi = physical_row(i, s0, slen, reverse);
                let qo = (pi * heads + h) * dk;
                let go = (pi * heads + h) * dv;
                let mut a = 0.0f32;
                for kk in 0..dk {
                    a += q[qo + kk] * k[ko + kk] * exponent[eo + kk].exp();
                }
                a *= scale;
                let mut da = 0.0f32;
                for vv in 0..dv {
                    da += d_o[go + vv] * v[vo + vv];
                    dvalue[vo + vv] += a * d_o[go + vv];
                }
                if step > 0 {
                    for kk in 0..dk {
                        gk[eo + kk] += scale * da * q[qo + kk] * exponent[eo + kk].exp();
                    }
                } else {
                    diag_da = da;
                }
            }
        }
        if has_dht == 1 {
            let so = (n * heads + h) * dk * dv;
            for kk in 0..dk {
                let w = exponent[eo + kk].exp();
                exponent[eo + kk] = w;
                let mut acc = 0.0f32;
                for vv in 0..dv {
                    acc += v[vo + vv] * dht[so + kk * dv + vv];
                }
                gk[eo + kk] += w * acc;
            }
            for vv in 0..dv {
                let mut acc = 0.0f32;
                for kk in 0..dk {
                    acc += k[ko + kk] * exponent[eo + kk] * dht[so + kk * dv + vv];
                }
                dvalue[vo + vv] += acc;
            }
        }
        for kk in 0..dk {
            let off = gk[eo + kk];
            let mut total = off;
            if strict == 0 {
                total += scale * diag_da * q[ko + kk];
            }
            if accumulate == 1 {
                total += dkey[ko + kk];
            }
            dkey[ko + kk] = total;
            gk[eo + kk] = k[ko + kk] * off;
        }
    }
}

/// Final state `ht = sum_j k_j^T v_j exp(gates j+1..=end) + exp(all gates) h0`, one thread per
/// (sequence, head, key row), walking back from the end (forward direction only).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn parallel_final_state(
    k: &[f32],
    v: &[f32],
    g: &[f32],
    seqs: &[u32],
    h0: &[f32],
    ht: &mut [f32],
    n_seq: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    kind: u32,
    has_h0: u32,
) {
    let id = thread_index();
    if id < n_seq * heads * dk {
        let kk = id % dk;
        let h = (id / dk) % heads;
        let n = id / (dk * heads);
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let base = ((n * heads + h) * dk + kk) * dv;
        for vv in 0..dv {
            ht[base + vv] = 0.0;
        }
        let mut e = 0.0f32;
        for step in 0..slen {
            let j = s0 + slen - 1 - step;
            if step > 0 {
                e += gate_value(g, kind, j + 1, s0, slen, 0u32, h, kk, heads, dk);
            }
            let w = k[(j * heads + h) * dk + kk] * e.exp();
            let vo = (j * heads + h) * dv;
            for vv in 0..dv {
                ht[base + vv] += w * v[vo + vv];
            }
        }
        if has_h0 == 1 {
            if slen > 0 {
                e += gate_value(g, kind, s0, s0, slen, 0u32, h, kk, heads, dk);
            }
            let w = e.exp();
            for vv in 0..dv {
                ht[base + vv] += w * h0[base + vv];
            }
        }
    }
}

/// `dh0 = sum_i scale exp(gates s0..=i) q_i^T do_i + exp(all gates) dht`, one thread per
/// (sequence, head, key row) (forward direction only).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn parallel_dh0(
    q: &[f32],
    g: &[f32],
    d_o: &[f32],
    seqs: &[u32],
    dht: &[f32],
    dh0: &mut [f32],
    n_seq: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    scale: f32,
    kind: u32,
    has_dht: u32,
) {
    let id = thread_index();
    if id < n_seq * heads * dk {
        let kk = id % dk;
        let h = (id / dk) % heads;
        let n = id / (dk * heads);
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let base = ((n * heads + h) * dk + kk) * dv;
        for vv in 0..dv {
            dh0[base + vv] = 0.0;
        }
        let mut e = 0.0f32;
        for tau in 0..slen {
            let i = s0 + tau;
            e += gate_value(g, kind, i, s0, slen, 0u32, h, kk, heads, dk);
            let w = scale * q[(i * heads + h) * dk + kk] * e.exp();
            let go = (i * heads + h) * dv;
            for vv in 0..dv {
                dh0[base + vv] += w * d_o[go + vv];
            }
        }
        if has_dht == 1 {
            let w = e.exp();
            for vv in 0..dv {
                dh0[base + vv] += w * dht[base + vv];
            }
        }
    }
}
