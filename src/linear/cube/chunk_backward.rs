//! Chunkwise backward kernels (materialise and recompute, kernels.md): the reverse state pass for
//! `dh`, the intra-chunk score gradient `dA`, and `dq`, `dk`, `dv`.
//!
//! With `D_c` the gradient w.r.t. the state at the *end* of chunk `c` (`dht` after the last
//! chunk), one pass's gradients are, for rows `t, j` of chunk `c`:
//! ```text
//! D_{c-1} = exp(Fc_last) D_c + scale * sum_t (q_t exp(Fc_t))^T do_t          (dh0 = D_{-1})
//! dA_tj   = do_t . v_j                                          (j <= t; j < t when strict)
//! dq_t    = scale exp(Fc_t) (h_c do_t^T)  + scale sum_j dA_tj k_j exp(gates j+1..=t)
//! dk_j    = exp(Rc_j) (D_c v_j^T)         + scale sum_t dA_tj q_t exp(gates j+1..=t)
//! dv_j    = sum_t A_tj do_t               + (k_j exp(Rc_j)) D_c
//! ```
//! where `exp(gates j+1..=t)` is split exactly as in the forward scores: inside a sub-chunk a
//! running sum of the gates stepped over (walking `j` down from `t` for `dq`, `t` up from `j` for
//! `dk`), anchored at the boundary before `t`'s sub-chunk otherwise (every exponent `<= 0`).
//! The dq and dk kernels also write this pass's gate-gradient terms `gq = q dq`, `gk = k dk`
//! *without* the diagonal (`j = t`) contributions and without the `dht` path (`D_c` above splits
//! into the part from later outputs and `suffix_decay * dht`), which cancel in `q dq - k dk`
//! analytically (see [`gate_grad_scan`](fn@super::gates::gate_grad_scan)).

use cubecl::prelude::*;

use super::chunk_forward::{COL_BLOCK, TILE};
use super::gates::{
    MAX_CHUNK, PLANE_FC_EXP, PLANE_FS_EXP, PLANE_GATE, PLANE_RC_EXP, PLANE_RS_EXP, SUB,
};
use super::layout::{CHUNK_FIELDS, physical_row};
use crate::cube::launch::cube_index;

/// Reverse chunk-state pass, one cube per (sequence, head, K tile, V tile), one thread per state
/// element: walks the chunks from last to first, stores `D_c` in `dstates` (`[n_chunks, H, K, V]`),
/// then `D <- exp(Fc_last) D + scale sum_t (q_t exp(Fc_t))^T do_t`. `D` leaves out the `dht`
/// path; `suffix_decay` (`[n_chunks, H, K]`) holds the factor that carries `dht` back to the end
/// of each chunk. Writes `dh0 = D_{-1} + suffix dht` when `want_dh0`.
///
/// One launch covers the chunks `seg_from .. seg_from + seg_count` counted from each sequence's
/// end; `D` and `suffix` cross launches in `carry` and `carry_suffix` (`[N, H, K, V]`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn chunk_dstates(
    q: &[f32],
    d_o: &[f32],
    factors: &[f32],
    chunks: &[u32],
    chunk_first: &[u32],
    dht: &[f32],
    dstates: &mut [f32],
    suffix_decay: &mut [f32],
    carry: &mut [f32],
    carry_suffix: &mut [f32],
    dh0: &mut [f32],
    n_seq: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    k_tiles: usize,
    v_tiles: usize,
    plane_len: usize,
    scale: f32,
    reverse: u32,
    has_dht: u32,
    want_dh0: u32,
    seg_from: usize,
    seg_count: usize,
) {
    let cube = cube_index();
    if cube < n_seq * heads * k_tiles * v_tiles {
        let vb = cube % v_tiles;
        let kb = (cube / v_tiles) % k_tiles;
        let h = (cube / (v_tiles * k_tiles)) % heads;
        let n = cube / (v_tiles * k_tiles * heads);
        let tx = UNIT_POS_X as usize;
        let ty = UNIT_POS_Y as usize;
        let tid = ty * TILE + tx;
        let kk = kb * TILE + ty;
        let vv = vb * TILE + tx;
        let active = kk < dk && vv < dv;
        let state_idx = ((n * heads + h) * dk + kk) * dv + vv;

        let mut query_tile = Shared::<[f32]>::new_slice(MAX_CHUNK * TILE);
        let mut grad_tile = Shared::<[f32]>::new_slice(MAX_CHUNK * TILE);

        // `d` is the gradient w.r.t. the state without the `dht` path, whose share reaches chunk
        // `c` as `suffix * dht` (`suffix` the product of the decays of the chunks after `c`, each
        // `<= 1`); the kernels downstream keep the two apart (see [`super::gates::gate_grad_scan`]).
        let mut d = 0.0f32;
        let mut suffix = 1.0f32;
        if active && seg_from > 0 {
            d = carry[state_idx];
            suffix = carry_suffix[state_idx];
        }
        let c_begin = chunk_first[n] as usize;
        let c_end = chunk_first[n + 1] as usize;
        let count = c_end - c_begin;
        let mut lo = seg_from;
        if lo > count {
            lo = count;
        }
        let mut hi = lo + seg_count;
        if hi > count {
            hi = count;
        }
        for step in lo..hi {
            let c = c_end - 1 - step;
            let row0 = chunks[c * CHUNK_FIELDS] as usize;
            let len = chunks[c * CHUNK_FIELDS + 1] as usize;
            let s0 = chunks[c * CHUNK_FIELDS + 2] as usize;
            let slen = chunks[c * CHUNK_FIELDS + 3] as usize;
            if active {
                dstates[((c * heads + h) * dk + kk) * dv + vv] = d;
                if vb == 0 && tx == 0 {
                    suffix_decay[(c * heads + h) * dk + kk] = suffix;
                }
            }
            let mut e = tid;
            while e < len * TILE {
                let i = e / TILE;
                let col = e % TILE;
                let lrow = row0 + i;
                let p = physical_row(lrow, s0, slen, reverse);
                let kc = kb * TILE + col;
                let mut qval = 0.0f32;
                if kc < dk {
                    qval = q[(p * heads + h) * dk + kc]
                        * factors[PLANE_FC_EXP * plane_len + (lrow * heads + h) * dk + kc];
                }
                query_tile[e] = qval;
                let vc = vb * TILE + col;
                let mut gval = 0.0f32;
                if vc < dv {
                    gval = d_o[(p * heads + h) * dv + vc];
                }
                grad_tile[e] = gval;
                e += TILE * TILE;
            }
            sync_cube();
            if active {
                let last = row0 + len - 1;
                let decay = factors[PLANE_FC_EXP * plane_len + (last * heads + h) * dk + kk];
                let mut acc = 0.0f32;
                for i in 0..len {
                    acc += query_tile[i * TILE + ty] * grad_tile[i * TILE + tx];
                }
                d = d * decay + scale * acc;
                suffix *= decay;
            }
            sync_cube();
        }
        if active {
            carry[state_idx] = d;
            carry_suffix[state_idx] = suffix;
        }
        if active && want_dh0 == 1 && hi == count {
            let mut total = d;
            if has_dht == 1 {
                total += suffix * dht[state_idx];
            }
            dh0[state_idx] = total;
        }
    }
}

/// `dA[c, h, t, j] = do_t . v_j` on the causal (or strict) triangle, 0 elsewhere; one cube per
/// (chunk, head), rows and columns `< len` written.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn intra_dscores(
    d_o: &[f32],
    v: &[f32],
    chunks: &[u32],
    dscores: &mut [f32],
    n_chunks: usize,
    heads: usize,
    dv: usize,
    chunk: usize,
    reverse: u32,
    strict: u32,
) {
    let cube = cube_index();
    if cube < n_chunks * heads {
        let h = cube % heads;
        let c = cube / heads;
        let row0 = chunks[c * CHUNK_FIELDS] as usize;
        let len = chunks[c * CHUNK_FIELDS + 1] as usize;
        let s0 = chunks[c * CHUNK_FIELDS + 2] as usize;
        let slen = chunks[c * CHUNK_FIELDS + 3] as usize;
        let mut e = UNIT_POS_X as usize;
        while e < len * len {
            let t = e / len;
            let j = e % len;
            let mut a = 0.0f32;
            if j < t || (j == t && strict == 0) {
                let go = (physical_row(row0 + t, s0, slen, reverse) * heads + h) * dv;
                let vo = (physical_row(row0 + j, s0, slen, reverse) * heads + h) * dv;
                for vv in 0..dv {
                    a += d_o[go + vv] * v[vo + vv];
                }
            }
            dscores[((c * heads + h) * chunk + t) * chunk + j] = a;
            e += CUBE_DIM_X as usize;
        }
    }
}

/// `dq` of one pass, one cube per (chunk, head, block of [`COL_BLOCK`] key channels), a strided
/// loop over `(t, k)`; also `gq = q dq` without the diagonal term (logical row).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn chunk_dq(
    q: &[f32],
    k: &[f32],
    d_o: &[f32],
    factors: &[f32],
    states: &[f32],
    dscores: &[f32],
    chunks: &[u32],
    dq: &mut [f32],
    gq: &mut [f32],
    n_chunks: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    chunk: usize,
    plane_len: usize,
    scale: f32,
    reverse: u32,
    strict: u32,
    accumulate: u32,
    weighted: u32,
) {
    let cube = cube_index();
    // (`usize::div_ceil` has no expansion inside `#[cube]` functions.)
    #[allow(clippy::manual_div_ceil)]
    let blocks = (dk + COL_BLOCK - 1) / COL_BLOCK;
    if cube < n_chunks * heads * blocks {
        let b = cube % blocks;
        let h = (cube / blocks) % heads;
        let c = cube / (blocks * heads);
        let col0 = b * COL_BLOCK;
        let mut width = dk - col0;
        if width > COL_BLOCK {
            width = COL_BLOCK;
        }
        let row0 = chunks[c * CHUNK_FIELDS] as usize;
        let len = chunks[c * CHUNK_FIELDS + 1] as usize;
        let s0 = chunks[c * CHUNK_FIELDS + 2] as usize;
        let slen = chunks[c * CHUNK_FIELDS + 3] as usize;
        let mut e = UNIT_POS_X as usize;
        while e < len * width {
            let t = e / width;
            let kk = col0 + e % width;
            let lt = row0 + t;
            let pt = physical_row(lt, s0, slen, reverse);
            let ft = (lt * heads + h) * dk + kk;

            // Inter-chunk: scale exp(Fc_t) (h_c do_t^T)[k].
            let go = (pt * heads + h) * dv;
            let so = ((c * heads + h) * dk + kk) * dv;
            let mut inter = 0.0f32;
            for vv in 0..dv {
                inter += d_o[go + vv] * states[so + vv];
            }
            inter *= factors[PLANE_FC_EXP * plane_len + ft];

            // Intra-chunk, earlier sub-chunks: anchored at the boundary before t's sub-chunk.
            let st = t / SUB;
            let ao = ((c * heads + h) * chunk + t) * chunk;
            let mut anchored = 0.0f32;
            for j in 0..st * SUB {
                let lj = row0 + j;
                let pj = physical_row(lj, s0, slen, reverse);
                let plane = PLANE_RS_EXP + (st - j / SUB - 1);
                anchored += dscores[ao + j]
                    * k[(pj * heads + h) * dk + kk]
                    * factors[plane * plane_len + (lj * heads + h) * dk + kk];
            }
            anchored *= factors[PLANE_FS_EXP * plane_len + ft];

            // Intra-chunk, same sub-chunk, j < t: the gates j+1..=t summed walking down from t.
            let mut same = 0.0f32;
            let mut gates_between = 0.0f32;
            for step in 1..t - st * SUB + 1 {
                let j = t - step;
                let lj = row0 + j;
                let pj = physical_row(lj, s0, slen, reverse);
                gates_between += factors[PLANE_GATE * plane_len + ((lj + 1) * heads + h) * dk + kk];
                same += dscores[ao + j] * k[(pj * heads + h) * dk + kk] * gates_between.exp();
            }

            let qi = (pt * heads + h) * dk + kk;
            let off = scale * (inter + anchored + same);
            let mut diag = 0.0f32;
            if strict == 0 {
                diag = scale * dscores[ao + t] * k[qi];
            }
            let mut total = off + diag;
            if accumulate == 1 {
                total += dq[qi];
            }
            dq[qi] = total;
            let mut gate_term = q[qi] * off;
            if weighted == 1 {
                // Per-head gate: pairs from before the chunk cross the t + 1 gates up to t.
                gate_term = q[qi] * scale * inter * (t + 1) as f32;
            }
            gq[(lt * heads + h) * dk + kk] = gate_term;
            e += CUBE_DIM_X as usize;
        }
    }
}

/// `dk` of one pass, one cube per (chunk, head, block of [`COL_BLOCK`] key channels), a strided
/// loop over `(j, k)`; also `gk = k dk` without the diagonal term and the `dht` path.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn chunk_dk(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    factors: &[f32],
    dstates: &[f32],
    suffix_decay: &[f32],
    dht: &[f32],
    dscores: &[f32],
    chunks: &[u32],
    dkey: &mut [f32],
    gk: &mut [f32],
    n_chunks: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    chunk: usize,
    plane_len: usize,
    scale: f32,
    reverse: u32,
    strict: u32,
    has_dht: u32,
    accumulate: u32,
    weighted: u32,
) {
    let cube = cube_index();
    // (`usize::div_ceil` has no expansion inside `#[cube]` functions.)
    #[allow(clippy::manual_div_ceil)]
    let blocks = (dk + COL_BLOCK - 1) / COL_BLOCK;
    if cube < n_chunks * heads * blocks {
        let b = cube % blocks;
        let h = (cube / blocks) % heads;
        let c = cube / (blocks * heads);
        let col0 = b * COL_BLOCK;
        let mut width = dk - col0;
        if width > COL_BLOCK {
            width = COL_BLOCK;
        }
        let row0 = chunks[c * CHUNK_FIELDS] as usize;
        let len = chunks[c * CHUNK_FIELDS + 1] as usize;
        let s0 = chunks[c * CHUNK_FIELDS + 2] as usize;
        let slen = chunks[c * CHUNK_FIELDS + 3] as usize;
        let n = chunks[c * CHUNK_FIELDS + 4] as usize;
        let mut e = UNIT_POS_X as usize;
        while e < len * width {
            let j = e / width;
            let kk = col0 + e % width;
            let lj = row0 + j;
            let pj = physical_row(lj, s0, slen, reverse);
            let fj = (lj * heads + h) * dk + kk;

            // Inter-chunk: exp(Rc_j) (D_c v_j^T)[k].
            let vo = (pj * heads + h) * dv;
            let so = ((c * heads + h) * dk + kk) * dv;
            let mut inter = 0.0f32;
            for vv in 0..dv {
                inter += v[vo + vv] * dstates[so + vv];
            }
            let rc = factors[PLANE_RC_EXP * plane_len + fj];
            inter *= rc;
            // The final state's path, kept out of `gk`.
            let mut through_ht = 0.0f32;
            if has_dht == 1 {
                let ho = ((n * heads + h) * dk + kk) * dv;
                for vv in 0..dv {
                    through_ht += v[vo + vv] * dht[ho + vv];
                }
                through_ht *= rc * suffix_decay[(c * heads + h) * dk + kk];
            }

            // Intra-chunk, later sub-chunks: anchored at the boundary before t's sub-chunk.
            let sj = j / SUB;
            let col = (c * heads + h) * chunk * chunk + j;
            let mut anchored = 0.0f32;
            for t in (sj + 1) * SUB..len {
                let lt = row0 + t;
                let pt = physical_row(lt, s0, slen, reverse);
                let ft = (lt * heads + h) * dk + kk;
                let plane = PLANE_RS_EXP + (t / SUB - sj - 1);
                anchored += dscores[col + t * chunk]
                    * q[(pt * heads + h) * dk + kk]
                    * factors[PLANE_FS_EXP * plane_len + ft]
                    * factors[plane * plane_len + fj];
            }

            // Intra-chunk, same sub-chunk, t > j: the gates j+1..=t summed walking up from j.
            let mut same = 0.0f32;
            let mut gates_between = 0.0f32;
            let mut sub_end = (sj + 1) * SUB;
            if sub_end > len {
                sub_end = len;
            }
            for t in j + 1..sub_end {
                let lt = row0 + t;
                let pt = physical_row(lt, s0, slen, reverse);
                gates_between += factors[PLANE_GATE * plane_len + (lt * heads + h) * dk + kk];
                same +=
                    dscores[col + t * chunk] * q[(pt * heads + h) * dk + kk] * gates_between.exp();
            }

            let ki = (pj * heads + h) * dk + kk;
            let off = inter + scale * (anchored + same);
            let mut diag = 0.0f32;
            if strict == 0 {
                diag = scale * dscores[col + j * chunk] * q[ki];
            }
            let mut total = off + diag + through_ht;
            if accumulate == 1 {
                total += dkey[ki];
            }
            dkey[ki] = total;
            let mut gate_term = k[ki] * off;
            if weighted == 1 {
                // Per-head gate: pairs into later chunks (and `ht`) cross the gates after j.
                gate_term = k[ki] * (inter + through_ht) * (len - 1 - j) as f32;
            }
            gk[fj] = gate_term;
            e += CUBE_DIM_X as usize;
        }
    }
}

/// `dv` of one pass, one cube per (chunk, head, block of [`COL_BLOCK`] value columns), a strided
/// loop over `(j, v)`:
/// `dv_j = sum_{t >= j} A_tj do_t + (k_j exp(Rc_j)) D_c` (`A` is zero off the mask).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn chunk_dv(
    k: &[f32],
    d_o: &[f32],
    factors: &[f32],
    dstates: &[f32],
    suffix_decay: &[f32],
    dht: &[f32],
    scores: &[f32],
    chunks: &[u32],
    dvalue: &mut [f32],
    n_chunks: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    chunk: usize,
    plane_len: usize,
    reverse: u32,
    has_dht: u32,
    accumulate: u32,
) {
    let cube = cube_index();
    // (`usize::div_ceil` has no expansion inside `#[cube]` functions.)
    #[allow(clippy::manual_div_ceil)]
    let blocks = (dv + COL_BLOCK - 1) / COL_BLOCK;
    if cube < n_chunks * heads * blocks {
        let b = cube % blocks;
        let h = (cube / blocks) % heads;
        let c = cube / (blocks * heads);
        let col0 = b * COL_BLOCK;
        let mut width = dv - col0;
        if width > COL_BLOCK {
            width = COL_BLOCK;
        }
        let row0 = chunks[c * CHUNK_FIELDS] as usize;
        let len = chunks[c * CHUNK_FIELDS + 1] as usize;
        let s0 = chunks[c * CHUNK_FIELDS + 2] as usize;
        let slen = chunks[c * CHUNK_FIELDS + 3] as usize;
        let n = chunks[c * CHUNK_FIELDS + 4] as usize;
        let mut e = UNIT_POS_X as usize;
        while e < len * width {
            let j = e / width;
            let vv = col0 + e % width;
            let lj = row0 + j;
            let pj = physical_row(lj, s0, slen, reverse);
            let col = (c * heads + h) * chunk * chunk + j;
            let mut acc = 0.0f32;
            for t in j..len {
                let pt = physical_row(row0 + t, s0, slen, reverse);
                acc += scores[col + t * chunk] * d_o[(pt * heads + h) * dv + vv];
            }
            let ko = (pj * heads + h) * dk;
            let fo = (lj * heads + h) * dk;
            let so = (c * heads + h) * dk * dv + vv;
            let xo = (c * heads + h) * dk;
            let ho = (n * heads + h) * dk * dv + vv;
            for kk in 0..dk {
                let mut d = dstates[so + kk * dv];
                if has_dht == 1 {
                    d += suffix_decay[xo + kk] * dht[ho + kk * dv];
                }
                acc += k[ko + kk] * factors[PLANE_RC_EXP * plane_len + fo + kk] * d;
            }
            let vi = (pj * heads + h) * dv + vv;
            if accumulate == 1 {
                acc += dvalue[vi];
            }
            dvalue[vi] = acc;
            e += CUBE_DIM_X as usize;
        }
    }
}
