//! Parallel (attention) form: the explicit `T x T` masked matrix, `O(T^2 K)`, one thread per
//! query row (forward, `dq`) or key column (`dk`, `dv`).
//!
//! The mask entry of the pair `(i, j)`, `j <= i`, is `exp(sum_{m = j+1..i} g_m)` per key channel.
//! A thread walks `j` away from its own row and keeps that exponent as a running sum of the gates
//! it steps over (in a scratch row `[rows, H, K]`), so every exponent is a sum of non-positive
//! terms accumulated in order: `<= 0`, and never a difference of two large cumulative sums (whose
//! cancellation would cost an ulp of `|G|`, which grows with `T`).
//!
//! **Segments.** A walk step costs `O(K + V)` loop iterations, so one launch covers the walk
//! steps `step_from .. step_from + step_count` of every thread, and the host launches until the
//! longest walk is done ([`crate::cube::CubeContext::loop_budget`]). Everything a walk carries
//! lives in device memory (the exponent row and the accumulated gradient rows). The `h0` and
//! `dht` terms, `O(K V)` per row, are applied afterwards by their own kernels, one thread per
//! output element, from the exponent row the walk leaves behind.

use cubecl::prelude::*;

use super::layout::{gate_value, physical_row};
use crate::cube::launch::thread_index;

/// Forward walk, one thread per (logical row, head): `o_i = sum_{j <= i} A_ij v_j`,
/// `A_ij = scale q_i . (k_j exp(gates j+1..=i))`, written at the first step (or added to when
/// `accumulate`). When the walk ends and `has_h0`, the exponent row becomes the weights of the
/// initial state, `scale q_i exp(gates s0..=i)`, for [`parallel_initial_state`](fn@parallel_initial_state).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn parallel_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    seqs: &[u32],
    row_seq: &[u32],
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
    step_from: usize,
    step_count: usize,
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
        if step_from == 0 {
            for kk in 0..dk {
                exponent[eo + kk] = 0.0;
            }
            if accumulate == 0 {
                for vv in 0..dv {
                    o[oo + vv] = 0.0;
                }
            }
        }
        let walk = i - s0 + 1;
        let mut end = step_from + step_count;
        if end > walk {
            end = walk;
        }
        for step in step_from..end {
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
        if has_h0 == 1 && step_from < walk && end == walk {
            for kk in 0..dk {
                let e = exponent[eo + kk]
                    + gate_value(g, kind, s0, s0, slen, reverse, h, kk, heads, dk);
                exponent[eo + kk] = scale * q[qo + kk] * e.exp();
            }
        }
    }
}

/// `o_i += sum_k w_i[k] h0[k, :]` with the weights [`parallel_forward`](fn@parallel_forward) left in `weights`; one
/// thread per (row, head, value column), forward direction only.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn parallel_initial_state(
    weights: &[f32],
    row_seq: &[u32],
    h0: &[f32],
    o: &mut [f32],
    rows: usize,
    heads: usize,
    dk: usize,
    dv: usize,
) {
    let id = thread_index();
    if id < rows * heads * dv {
        let vv = id % dv;
        let h = (id / dv) % heads;
        let i = id / (dv * heads);
        let n = row_seq[i] as usize;
        let wo = (i * heads + h) * dk;
        let so = (n * heads + h) * dk * dv + vv;
        let mut acc = 0.0f32;
        for kk in 0..dk {
            acc += weights[wo + kk] * h0[so + kk * dv];
        }
        o[(i * heads + h) * dv + vv] += acc;
    }
}

/// `dq` walk, one thread per (logical row, head): `gq` accumulates the off-diagonal
/// `scale sum_{j < i} (do_i . v_j) k_j exp(gates j+1..=i)`; the diagonal term goes to `dq` at the
/// first step. When the walk ends and `has_h0`, the exponent row becomes `scale exp(gates s0..=i)`
/// for [`parallel_dq_finish`](fn@parallel_dq_finish). With `weighted` (a per-head gate) it also sums each pair's
/// contribution to the loss times its distance `i - j` (the gates it crosses) in `walk_partial`
/// (`[rows, H]`): that pair's exact share of `dL/dg`.
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
    dq: &mut [f32],
    gq: &mut [f32],
    exponent: &mut [f32],
    walk_partial: &mut [f32],
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
    weighted: u32,
    step_from: usize,
    step_count: usize,
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
        if step_from == 0 {
            let mut diag_da = 0.0f32;
            if strict == 0 {
                for vv in 0..dv {
                    diag_da += d_o[go + vv] * v[go + vv];
                }
            }
            for kk in 0..dk {
                exponent[eo + kk] = 0.0;
                gq[eo + kk] = 0.0;
                let mut total = scale * diag_da * k[qo + kk];
                if accumulate == 1 {
                    total += dq[qo + kk];
                }
                dq[qo + kk] = total;
            }
            if weighted == 1 {
                walk_partial[id] = 0.0;
            }
        }
        let walk = i - s0 + 1;
        let mut end = step_from + step_count;
        if end > walk {
            end = walk;
        }
        let mut first = step_from;
        if first == 0 {
            first = 1;
        }
        for step in first..end {
            let j = i - step;
            for kk in 0..dk {
                exponent[eo + kk] +=
                    gate_value(g, kind, j + 1, s0, slen, reverse, h, kk, heads, dk);
            }
            let pj = physical_row(j, s0, slen, reverse);
            let vo = (pj * heads + h) * dv;
            let mut da = 0.0f32;
            for vv in 0..dv {
                da += d_o[go + vv] * v[vo + vv];
            }
            let ko = (pj * heads + h) * dk;
            let mut pair = 0.0f32;
            for kk in 0..dk {
                let term = scale * da * k[ko + kk] * exponent[eo + kk].exp();
                gq[eo + kk] += term;
                pair += q[qo + kk] * term;
            }
            if weighted == 1 {
                walk_partial[id] += step as f32 * pair;
            }
        }
        if has_h0 == 1 && step_from < walk && end == walk {
            for kk in 0..dk {
                let e = exponent[eo + kk]
                    + gate_value(g, kind, s0, s0, slen, reverse, h, kk, heads, dk);
                exponent[eo + kk] = scale * e.exp();
            }
        }
    }
}

/// Finishes `dq`, one thread per (logical row, head, key channel): adds the `h0` term
/// (`w[k] (h0 do_i^T)[k]`, when `has_h0`) to `gq`, adds `gq` to `dq`, and turns `gq` into
/// `q dq` (off-diagonal) for the gate gradient. With `weighted`, `per_head` (`[rows, H, K]`)
/// gets the `h0` pair's share of `dL/dg`: its contribution times the `i - s0 + 1` gates it
/// crosses.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn parallel_dq_finish(
    q: &[f32],
    d_o: &[f32],
    seqs: &[u32],
    row_seq: &[u32],
    h0: &[f32],
    weights: &[f32],
    dq: &mut [f32],
    gq: &mut [f32],
    per_head: &mut [f32],
    rows: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    reverse: u32,
    has_h0: u32,
    weighted: u32,
) {
    let id = thread_index();
    if id < rows * heads * dk {
        let kk = id % dk;
        let h = (id / dk) % heads;
        let i = id / (dk * heads);
        let n = row_seq[i] as usize;
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let pi = physical_row(i, s0, slen, reverse);
        let mut off = gq[id];
        let mut from_h0 = 0.0f32;
        if has_h0 == 1 {
            let so = ((n * heads + h) * dk + kk) * dv;
            let go = (pi * heads + h) * dv;
            let mut acc = 0.0f32;
            for vv in 0..dv {
                acc += h0[so + vv] * d_o[go + vv];
            }
            from_h0 = weights[id] * acc;
            off += from_h0;
        }
        let qi = (pi * heads + h) * dk + kk;
        if weighted == 1 {
            per_head[id] = (i - s0 + 1) as f32 * q[qi] * from_h0;
        }
        dq[qi] += off;
        gq[id] = q[qi] * off;
    }
}

/// `dk`, `dv` walk over the rows `i >= j`, one thread per (logical column, head):
/// `dv_j += A_ij do_i`, and `gk` accumulates the off-diagonal
/// `scale sum_{i > j} (do_i . v_j) q_i exp(gates j+1..=i)`; the diagonal goes to `dk` and `dv` at
/// the first step. When the walk ends the exponent row becomes `exp(gates j+1..=end)`, the weight
/// of `k_j^T v_j` in `ht`, for the `dht` kernels.
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
    accumulate: u32,
    step_from: usize,
    step_count: usize,
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
        if step_from == 0 {
            let mut a = 0.0f32;
            let mut da = 0.0f32;
            if strict == 0 {
                for kk in 0..dk {
                    a += q[ko + kk] * k[ko + kk];
                }
                a *= scale;
                for vv in 0..dv {
                    da += d_o[vo + vv] * v[vo + vv];
                }
            }
            for kk in 0..dk {
                exponent[eo + kk] = 0.0;
                gk[eo + kk] = 0.0;
                let mut total = scale * da * q[ko + kk];
                if accumulate == 1 {
                    total += dkey[ko + kk];
                }
                dkey[ko + kk] = total;
            }
            for vv in 0..dv {
                let mut total = a * d_o[vo + vv];
                if accumulate == 1 {
                    total += dvalue[vo + vv];
                }
                dvalue[vo + vv] = total;
            }
        }
        let walk = s0 + slen - j;
        let mut end = step_from + step_count;
        if end > walk {
            end = walk;
        }
        let mut first = step_from;
        if first == 0 {
            first = 1;
        }
        for step in first..end {
            let i = j + step;
            for kk in 0..dk {
                exponent[eo + kk] += gate_value(g, kind, i, s0, slen, reverse, h, kk, heads, dk);
            }
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
            for kk in 0..dk {
                gk[eo + kk] += scale * da * q[qo + kk] * exponent[eo + kk].exp();
            }
        }
        if step_from < walk && end == walk {
            for kk in 0..dk {
                exponent[eo + kk] = exponent[eo + kk].exp();
            }
        }
    }
}

/// Finishes `dk`, one thread per (logical row, head, key channel): adds the `dht` term
/// (`w[k] (dht v_j^T)[k]`, when `has_dht`), adds the off-diagonal `gk` to `dk`, and turns `gk`
/// into `k dk` *without* the `dht` term (see `gate_grad_scan`). With `weighted`, `per_head`
/// (`[rows, H, K]`) gets the `dht` pair's share of `dL/dg`: its contribution times the
/// `end - 1 - j` gates it crosses.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn parallel_dk_finish(
    k: &[f32],
    v: &[f32],
    seqs: &[u32],
    row_seq: &[u32],
    dht: &[f32],
    weights: &[f32],
    dkey: &mut [f32],
    gk: &mut [f32],
    per_head: &mut [f32],
    rows: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    reverse: u32,
    has_dht: u32,
    weighted: u32,
) {
    let id = thread_index();
    if id < rows * heads * dk {
        let kk = id % dk;
        let h = (id / dk) % heads;
        let j = id / (dk * heads);
        let n = row_seq[j] as usize;
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let pj = physical_row(j, s0, slen, reverse);
        let off = gk[id];
        let mut through_ht = 0.0f32;
        if has_dht == 1 {
            let so = ((n * heads + h) * dk + kk) * dv;
            let vo = (pj * heads + h) * dv;
            for vv in 0..dv {
                through_ht += v[vo + vv] * dht[so + vv];
            }
            through_ht *= weights[id];
        }
        let ki = (pj * heads + h) * dk + kk;
        dkey[ki] += off + through_ht;
        gk[id] = k[ki] * off;
        if weighted == 1 {
            per_head[id] = (s0 + slen - 1 - j) as f32 * k[ki] * through_ht;
        }
    }
}

/// `dv_j += sum_k k_j[k] w_j[k] dht[k, :]` (the `dht` path), one thread per (row, head, value
/// column), forward direction only.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn parallel_dv_final_state(
    k: &[f32],
    row_seq: &[u32],
    dht: &[f32],
    weights: &[f32],
    dvalue: &mut [f32],
    rows: usize,
    heads: usize,
    dk: usize,
    dv: usize,
) {
    let id = thread_index();
    if id < rows * heads * dv {
        let vv = id % dv;
        let h = (id / dv) % heads;
        let j = id / (dv * heads);
        let n = row_seq[j] as usize;
        let wo = (j * heads + h) * dk;
        let so = (n * heads + h) * dk * dv + vv;
        let mut acc = 0.0f32;
        for kk in 0..dk {
            acc += k[wo + kk] * weights[wo + kk] * dht[so + kk * dv];
        }
        dvalue[(j * heads + h) * dv + vv] += acc;
    }
}

/// Final state `ht = sum_j k_j^T v_j exp(gates j+1..=end) + exp(all gates) h0`, one thread per
/// (sequence, head, key row) walking back from the end (forward direction only); the running
/// exponent crosses segments in `exponent` (`[N, H, K]`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn parallel_final_state(
    k: &[f32],
    v: &[f32],
    g: &[f32],
    seqs: &[u32],
    h0: &[f32],
    ht: &mut [f32],
    exponent: &mut [f32],
    n_seq: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    kind: u32,
    has_h0: u32,
    step_from: usize,
    step_count: usize,
) {
    let id = thread_index();
    if id < n_seq * heads * dk {
        let kk = id % dk;
        let h = (id / dk) % heads;
        let n = id / (dk * heads);
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let base = ((n * heads + h) * dk + kk) * dv;
        let mut e = 0.0f32;
        if step_from == 0 {
            for vv in 0..dv {
                ht[base + vv] = 0.0;
            }
        } else {
            e = exponent[id];
        }
        let mut end = step_from + step_count;
        if end > slen {
            end = slen;
        }
        for step in step_from..end {
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
        exponent[id] = e;
        let finishing = (step_from < slen && end == slen) || (slen == 0 && step_from == 0);
        if has_h0 == 1 && finishing {
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
/// (sequence, head, key row), forward direction only; the running exponent crosses segments in
/// `exponent` (`[N, H, K]`). With `weighted`, `per_head` (`[N, H, K]`) gets the share of the
/// `h0 -> dht` pair in `dL/dg`: `slen exp(all gates) h0[k, :] . dht[k, :]`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn parallel_dh0(
    q: &[f32],
    g: &[f32],
    d_o: &[f32],
    seqs: &[u32],
    h0: &[f32],
    dht: &[f32],
    dh0: &mut [f32],
    exponent: &mut [f32],
    per_head: &mut [f32],
    n_seq: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    scale: f32,
    kind: u32,
    has_dht: u32,
    weighted: u32,
    step_from: usize,
    step_count: usize,
) {
    let id = thread_index();
    if id < n_seq * heads * dk {
        let kk = id % dk;
        let h = (id / dk) % heads;
        let n = id / (dk * heads);
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let base = ((n * heads + h) * dk + kk) * dv;
        let mut e = 0.0f32;
        if step_from == 0 {
            for vv in 0..dv {
                dh0[base + vv] = 0.0;
            }
        } else {
            e = exponent[id];
        }
        let mut end = step_from + step_count;
        if end > slen {
            end = slen;
        }
        for tau in step_from..end {
            let i = s0 + tau;
            e += gate_value(g, kind, i, s0, slen, 0u32, h, kk, heads, dk);
            let w = scale * q[(i * heads + h) * dk + kk] * e.exp();
            let go = (i * heads + h) * dv;
            for vv in 0..dv {
                dh0[base + vv] += w * d_o[go + vv];
            }
        }
        exponent[id] = e;
        let finishing = (step_from < slen && end == slen) || (slen == 0 && step_from == 0);
        if finishing {
            let w = e.exp();
            let mut pair = 0.0f32;
            if has_dht == 1 {
                for vv in 0..dv {
                    dh0[base + vv] += w * dht[base + vv];
                    pair += h0[base + vv] * dht[base + vv];
                }
            }
            if weighted == 1 {
                per_head[id] = slen as f32 * w * pair;
            }
        }
    }
}
