//! Recurrent form: the scan `S_t = diag(exp g_t) S_{t-1} + k_t^T v_t`, `o_t = scale q_t S_t`,
//! and its backward, one thread per state column or row (`O(T K V)`, no chunking: the reference
//! path for short sequences and, with `T = 1`, the decoding step).
//!
//! Each thread owns one column `S[:, v]` (forward, `dv`) or one row `S[k, :]` (`dq`, `dk`) of its
//! sequence's state in a global scratch buffer `[N, H, K, V]`, so no thread ever waits on another.
//! A strict (reverse) pass reads the decayed state *before* adding the current token
//! (`P_t = diag(exp g_t) S_{t-1}`), which leaves the diagonal out.
//!
//! Backward: with `C_t` the gradient flowing into `S_t` from later steps (`dht` at the end),
//! `dS_t = C_t + scale q_t^T do_t` (just `C_t` when strict), `dk_t = dS_t v_t`,
//! `dv_t = k_t dS_t`, and `C_{t-1} = diag(exp g_t) (C_t + scale q_t^T do_t)`; `dh0 = C_{-1}`.
//! `dq_t = scale P_t do_t + scale k_t (v_t . do_t)` (the second term only when not strict).
//!
//! **Segments.** A scan costs `K` or `V` loop iterations per step, so one launch covers the steps
//! `step_from .. step_from + step_count` of every sequence (forward steps for the forward scans,
//! steps counted from the end for the reverse ones) and the host launches until the longest
//! sequence is done ([`crate::cube::CubeContext::loop_budget`]). Everything a thread carries
//! between steps lives in device memory (the state scratch, and `suffix` of `dk`), so a
//! segment boundary changes nothing in the arithmetic.

use cubecl::prelude::*;

use super::layout::{gate_value, physical_row};
use crate::cube::launch::thread_index;

/// Forward scan, one thread per (sequence, head, value column). The column lives in `state`
/// (`[N, H, K, V]`), which holds the final state `ht` afterwards.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn recurrent_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    seqs: &[u32],
    h0: &[f32],
    o: &mut [f32],
    state: &mut [f32],
    n_seq: usize,
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
    if id < n_seq * heads * dv {
        let vv = id % dv;
        let h = (id / dv) % heads;
        let n = id / (dv * heads);
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let base = (n * heads + h) * dk * dv + vv;
        if step_from == 0 {
            for kk in 0..dk {
                let mut init = 0.0f32;
                if has_h0 == 1 {
                    init = h0[base + kk * dv];
                }
                state[base + kk * dv] = init;
            }
        }
        let mut end = step_from + step_count;
        if end > slen {
            end = slen;
        }
        for tau in step_from..end {
            let lrow = s0 + tau;
            let p = physical_row(lrow, s0, slen, reverse);
            let vval = v[(p * heads + h) * dv + vv];
            let qk = (p * heads + h) * dk;
            let mut acc = 0.0f32;
            for kk in 0..dk {
                let decay = gate_value(g, kind, lrow, s0, slen, reverse, h, kk, heads, dk).exp();
                let prev = state[base + kk * dv] * decay;
                let next = prev + k[qk + kk] * vval;
                state[base + kk * dv] = next;
                if strict == 1 {
                    acc += q[qk + kk] * prev;
                } else {
                    acc += q[qk + kk] * next;
                }
            }
            let oi = (p * heads + h) * dv + vv;
            let mut out = scale * acc;
            if accumulate == 1 {
                out += o[oi];
            }
            o[oi] = out;
        }
    }
}

/// `dq` by a second forward scan, one thread per (sequence, head, key row); the row lives in
/// `state`, which holds the final state `ht` afterwards. Also `gq = q dq` without the diagonal.
///
/// With `weighted` (a per-head gate `γ`) it also carries the row of `S' = dS/dγ` in `deriv`
/// (forward mode: `P'_t = exp(γ) (S_{t-1} + S'_{t-1})` where this step applies the gate, `S'_t =
/// P'_t`, `S'_{-1} = 0`) and accumulates this row's share of `dL/dγ`,
/// `sum_t scale q_t[k] (P'_t[k, :] . do_t) + S'_end[k, :] . dht[k, :]`, in `per_head` (`[N, H, K]`).
/// `S'` is a sum of positive multiples of the terms of `S`: nothing cancels.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn recurrent_dq(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    d_o: &[f32],
    seqs: &[u32],
    h0: &[f32],
    dht: &[f32],
    dq: &mut [f32],
    gq: &mut [f32],
    state: &mut [f32],
    deriv: &mut [f32],
    per_head: &mut [f32],
    n_seq: usize,
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
    has_dht: u32,
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
        let mut weighted_sum = 0.0f32;
        if step_from == 0 {
            for vv in 0..dv {
                let mut init = 0.0f32;
                if has_h0 == 1 {
                    init = h0[base + vv];
                }
                state[base + vv] = init;
                if weighted == 1 {
                    deriv[base + vv] = 0.0;
                }
            }
        } else if weighted == 1 {
            weighted_sum = per_head[id];
        }
        let mut end = step_from + step_count;
        if end > slen {
            end = slen;
        }
        for tau in step_from..end {
            let lrow = s0 + tau;
            let p = physical_row(lrow, s0, slen, reverse);
            let decay = gate_value(g, kind, lrow, s0, slen, reverse, h, kk, heads, dk).exp();
            // The reverse pass applies no gate at its first logical step.
            let gated = reverse == 0 || tau > 0;
            let qi = (p * heads + h) * dk + kk;
            let kval = k[qi];
            let ro = (p * heads + h) * dv;
            let mut prev_do = 0.0f32;
            let mut v_do = 0.0f32;
            let mut deriv_do = 0.0f32;
            for vv in 0..dv {
                let before = state[base + vv];
                let prev = before * decay;
                let dov = d_o[ro + vv];
                let vval = v[ro + vv];
                prev_do += prev * dov;
                v_do += vval * dov;
                state[base + vv] = prev + kval * vval;
                if weighted == 1 {
                    let mut d = deriv[base + vv];
                    if gated {
                        d = decay * (before + d);
                    }
                    deriv[base + vv] = d;
                    deriv_do += d * dov;
                }
            }
            weighted_sum += scale * q[qi] * deriv_do;
            let off = scale * prev_do;
            let mut diag = 0.0f32;
            if strict == 0 {
                diag = scale * kval * v_do;
            }
            let mut total = off + diag;
            if accumulate == 1 {
                total += dq[qi];
            }
            dq[qi] = total;
            gq[(lrow * heads + h) * dk + kk] = q[qi] * off;
        }
        if weighted == 1 {
            let finishing = (step_from < slen && end == slen) || (slen == 0 && step_from == 0);
            if has_dht == 1 && finishing {
                for vv in 0..dv {
                    weighted_sum += deriv[base + vv] * dht[base + vv];
                }
            }
            per_head[id] = weighted_sum;
        }
    }
}

/// `dk` by a reverse scan, one thread per (sequence, head, key row). The carried gradient row
/// lives in `carry`, which holds `dh0` afterwards, the sum of the gates after the current step in
/// `suffix` (`[N, H, K]`). Also `gk = k dk` without the diagonal and the `dht` path.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn recurrent_dk(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    g: &[f32],
    d_o: &[f32],
    seqs: &[u32],
    dht: &[f32],
    dkey: &mut [f32],
    gk: &mut [f32],
    carry: &mut [f32],
    suffix_sum: &mut [f32],
    n_seq: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    scale: f32,
    kind: u32,
    reverse: u32,
    strict: u32,
    has_dht: u32,
    accumulate: u32,
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
        // The carry leaves out the `dht` path; its share at step t is `exp(suffix) dht`, with
        // `suffix` the sum of the gates after t (kept out of `gk`, see `gate_grad_scan`).
        let mut suffix = 0.0f32;
        if step_from == 0 {
            for vv in 0..dv {
                carry[base + vv] = 0.0;
            }
        } else {
            suffix = suffix_sum[id];
        }
        let mut end = step_from + step_count;
        if end > slen {
            end = slen;
        }
        for step in step_from..end {
            let lrow = s0 + slen - 1 - step;
            let p = physical_row(lrow, s0, slen, reverse);
            let ki = (p * heads + h) * dk + kk;
            let q_scaled = scale * q[ki];
            let ro = (p * heads + h) * dv;
            let mut carry_v = 0.0f32;
            let mut v_do = 0.0f32;
            let mut dht_v = 0.0f32;
            for vv in 0..dv {
                let vval = v[ro + vv];
                carry_v += carry[base + vv] * vval;
                v_do += vval * d_o[ro + vv];
                if has_dht == 1 {
                    dht_v += dht[base + vv] * vval;
                }
            }
            let mut diag = 0.0f32;
            if strict == 0 {
                diag = q_scaled * v_do;
            }
            let mut total = carry_v + diag + suffix.exp() * dht_v;
            if accumulate == 1 {
                total += dkey[ki];
            }
            dkey[ki] = total;
            gk[(lrow * heads + h) * dk + kk] = k[ki] * carry_v;
            let gv = gate_value(g, kind, lrow, s0, slen, reverse, h, kk, heads, dk);
            let decay = gv.exp();
            for vv in 0..dv {
                carry[base + vv] = decay * (carry[base + vv] + q_scaled * d_o[ro + vv]);
            }
            suffix += gv;
        }
        suffix_sum[id] = suffix;
        // The last segment of this sequence adds the `dht` path to what becomes `dh0`.
        let finishing = (step_from < slen && end == slen) || (slen == 0 && step_from == 0);
        if has_dht == 1 && finishing {
            let w = suffix.exp();
            for vv in 0..dv {
                carry[base + vv] += w * dht[base + vv];
            }
        }
    }
}

/// `dv` by a reverse scan, one thread per (sequence, head, value column); the carried gradient
/// column lives in the scratch `carry` (`[N, H, K, V]`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn recurrent_dv(
    q: &[f32],
    k: &[f32],
    g: &[f32],
    d_o: &[f32],
    seqs: &[u32],
    dht: &[f32],
    dvalue: &mut [f32],
    carry: &mut [f32],
    n_seq: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    scale: f32,
    kind: u32,
    reverse: u32,
    strict: u32,
    has_dht: u32,
    accumulate: u32,
    step_from: usize,
    step_count: usize,
) {
    let id = thread_index();
    if id < n_seq * heads * dv {
        let vv = id % dv;
        let h = (id / dv) % heads;
        let n = id / (dv * heads);
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let base = (n * heads + h) * dk * dv + vv;
        if step_from == 0 {
            for kk in 0..dk {
                let mut init = 0.0f32;
                if has_dht == 1 {
                    init = dht[base + kk * dv];
                }
                carry[base + kk * dv] = init;
            }
        }
        let mut end = step_from + step_count;
        if end > slen {
            end = slen;
        }
        for step in step_from..end {
            let lrow = s0 + slen - 1 - step;
            let p = physical_row(lrow, s0, slen, reverse);
            let dov = d_o[(p * heads + h) * dv + vv];
            let qk = (p * heads + h) * dk;
            let mut acc = 0.0f32;
            for kk in 0..dk {
                let from_query = scale * q[qk + kk] * dov;
                let c = carry[base + kk * dv];
                let mut ds = c + from_query;
                if strict == 1 {
                    ds = c;
                }
                acc += k[qk + kk] * ds;
                let decay = gate_value(g, kind, lrow, s0, slen, reverse, h, kk, heads, dk).exp();
                carry[base + kk * dv] = decay * (c + from_query);
            }
            let vi = (p * heads + h) * dv + vv;
            if accumulate == 1 {
                acc += dvalue[vi];
            }
            dvalue[vi] = acc;
        }
    }
}
