//! Chunkwise forward kernels: the chunk-state pass, the intra-chunk scores, and the output.
//!
//! Notation (one pass, one sequence, one head; rows are logical, see [`super::layout`]): chunk `c`
//! has rows `t`, its state at the chunk start is `h_c` (`[K, V]`), the factors are those of
//! [`super::gates`]. The pass computes, for every row `t` of chunk `c`,
//! ```text
//! o_t = scale * (q_t * exp(Fc_t)) h_c  +  sum_{j in c, j <= t} A_tj v_j
//! h_{c+1} = exp(Fc_last) * h_c + sum_{t in c} (k_t * exp(Rc_t))^T v_t
//! ```
//! with `j < t` instead of `j <= t` in a strict (reverse) pass.

use cubecl::prelude::*;

use super::gates::{
    MAX_CHUNK, PLANE_FC_EXP, PLANE_FS_EXP, PLANE_GATE, PLANE_RC_EXP, PLANE_RS_EXP, SUB,
};
use super::layout::{CHUNK_FIELDS, physical_row};
use crate::cube::launch::cube_index;

/// Side of the state tile one cube owns in the state passes (`TILE x TILE` threads, one state
/// element each).
pub const TILE: usize = 16;

/// Columns (of `V` or `K`) one cube of the per-chunk kernels covers: with `len <= 64` rows, a
/// thread's strided loop runs `64 * COL_BLOCK / 256 = 16` entries, each at most `K + V + 2C`
/// long, which keeps heads up to 512 wide inside the loop budget
/// ([`crate::cube::CubeContext::loop_budget`]).
pub const COL_BLOCK: usize = 64;

/// Loop iterations one chunk costs a thread of the state passes (staging plus the row loop), for
/// sizing their segments.
pub fn state_pass_cost(chunk: usize) -> usize {
    chunk + (chunk * TILE).div_ceil(TILE * TILE) + 3
}

/// Chunk-state pass, one cube per (sequence, head, K tile, V tile), one thread per state element:
/// walks the sequence's chunks in order, stores the state at each chunk start in `states`
/// (`[n_chunks, H, K, V]`), then applies `h <- exp(Fc_last) h + sum_t (k_t exp(Rc_t))^T v_t`. Both
/// exponents are sums of gates, `<= 0`. The chunk's scaled keys and values of this tile are
/// staged in shared memory once per chunk. Starts from `h0` when `has_h0`, writes the final state
/// to `ht` when `want_ht` (an empty sequence gives back `h0`, or zeros).
///
/// One launch covers the chunks `seg_from .. seg_from + seg_count` of every sequence (the loop
/// budget); the running state crosses launches in `carry` (`[N, H, K, V]`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn chunk_states(
    k: &[f32],
    v: &[f32],
    factors: &[f32],
    chunks: &[u32],
    chunk_first: &[u32],
    h0: &[f32],
    states: &mut [f32],
    carry: &mut [f32],
    ht: &mut [f32],
    n_seq: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    k_tiles: usize,
    v_tiles: usize,
    plane_len: usize,
    reverse: u32,
    has_h0: u32,
    want_ht: u32,
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

        let mut key_tile = Shared::<[f32]>::new_slice(MAX_CHUNK * TILE);
        let mut value_tile = Shared::<[f32]>::new_slice(MAX_CHUNK * TILE);

        let mut s = 0.0f32;
        if active {
            if seg_from > 0 {
                s = carry[state_idx];
            } else if has_h0 == 1 {
                s = h0[state_idx];
            }
        }
        let c_begin = chunk_first[n] as usize;
        let c_end = chunk_first[n + 1] as usize;
        let mut lo = c_begin + seg_from;
        if lo > c_end {
            lo = c_end;
        }
        let mut hi = lo + seg_count;
        if hi > c_end {
            hi = c_end;
        }
        for c in lo..hi {
            let row0 = chunks[c * CHUNK_FIELDS] as usize;
            let len = chunks[c * CHUNK_FIELDS + 1] as usize;
            let s0 = chunks[c * CHUNK_FIELDS + 2] as usize;
            let slen = chunks[c * CHUNK_FIELDS + 3] as usize;
            if active {
                states[((c * heads + h) * dk + kk) * dv + vv] = s;
            }
            // Stage rows 0..len of this tile's columns: k * exp(Rc) and v.
            let mut e = tid;
            while e < len * TILE {
                let i = e / TILE;
                let col = e % TILE;
                let lrow = row0 + i;
                let p = physical_row(lrow, s0, slen, reverse);
                let kc = kb * TILE + col;
                let mut kval = 0.0f32;
                if kc < dk {
                    kval = k[(p * heads + h) * dk + kc]
                        * factors[PLANE_RC_EXP * plane_len + (lrow * heads + h) * dk + kc];
                }
                key_tile[e] = kval;
                let vc = vb * TILE + col;
                let mut vval = 0.0f32;
                if vc < dv {
                    vval = v[(p * heads + h) * dv + vc];
                }
                value_tile[e] = vval;
                e += TILE * TILE;
            }
            sync_cube();
            if active {
                let last = row0 + len - 1;
                let decay = factors[PLANE_FC_EXP * plane_len + (last * heads + h) * dk + kk];
                let mut acc = 0.0f32;
                for i in 0..len {
                    acc += key_tile[i * TILE + ty] * value_tile[i * TILE + tx];
                }
                s = s * decay + acc;
            }
            sync_cube();
        }
        if active {
            carry[state_idx] = s;
            if want_ht == 1 && hi == c_end {
                ht[state_idx] = s;
            }
        }
    }
}

/// Intra-chunk scores `A[c, h, t, j]` (`[n_chunks, H, C, C]`, rows and columns `< len` written),
/// one cube per (chunk, head):
/// ```text
/// j > t (or j == t in a strict pass): 0
/// sub-chunks d apart: scale * sum_k (q_t exp(Fs_t)) (k_j exp(Rs_j + d-1 sub totals))
/// same sub-chunk:     scale * sum_k q_t k_j exp(g_{j+1} + ... + g_t)      (exact, elementwise)
/// ```
/// The anchored form (first, a strided loop over the entries) splits at the boundary before
/// `t`'s sub-chunk: `Fs_t` sums the gates from there to `t`, the key factor from `j + 1` to
/// there; together exactly the gates `j+1 ..= t`, each part `<= 0`, so the product is a plain
/// dot product of bounded factors (a matmul on hardware that has them) and nothing overflows.
/// The diagonal sub-blocks (then, one thread per row `t`) walk `j` down from `t` and add each
/// gate they step over to a running exponent row in `exponent` (`[rows, H, K]`): a sum of
/// non-positive terms, `<= 0`, with no cancellation.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn intra_scores(
    q: &[f32],
    k: &[f32],
    factors: &[f32],
    chunks: &[u32],
    scores: &mut [f32],
    exponent: &mut [f32],
    n_chunks: usize,
    heads: usize,
    dk: usize,
    chunk: usize,
    plane_len: usize,
    scale: f32,
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
        let base = (c * heads + h) * chunk * chunk;
        let mut e = UNIT_POS_X as usize;
        while e < len * len {
            let t = e / len;
            let j = e % len;
            let st = t / SUB;
            let sj = j / SUB;
            // The diagonal sub-blocks' lower triangle is the second phase's.
            if !(st == sj && j <= t) {
                let mut a = 0.0f32;
                if j < t {
                    let lt = row0 + t;
                    let lj = row0 + j;
                    let qo = (physical_row(lt, s0, slen, reverse) * heads + h) * dk;
                    let ko = (physical_row(lj, s0, slen, reverse) * heads + h) * dk;
                    let ft = (lt * heads + h) * dk;
                    let fj = (lj * heads + h) * dk;
                    let plane = PLANE_RS_EXP + (st - sj - 1);
                    for kk in 0..dk {
                        a += q[qo + kk]
                            * factors[PLANE_FS_EXP * plane_len + ft + kk]
                            * k[ko + kk]
                            * factors[plane * plane_len + fj + kk];
                    }
                    a *= scale;
                }
                scores[base + t * chunk + j] = a;
            }
            e += CUBE_DIM_X as usize;
        }

        let t = UNIT_POS_X as usize;
        if t < len {
            let lt = row0 + t;
            let qo = (physical_row(lt, s0, slen, reverse) * heads + h) * dk;
            let eo = (lt * heads + h) * dk;
            for kk in 0..dk {
                exponent[eo + kk] = 0.0;
            }
            let sub_start = (t / SUB) * SUB;
            for step in 0..t - sub_start + 1 {
                let j = t - step;
                let lj = row0 + j;
                if step > 0 {
                    let go = ((lj + 1) * heads + h) * dk;
                    for kk in 0..dk {
                        exponent[eo + kk] += factors[PLANE_GATE * plane_len + go + kk];
                    }
                }
                let mut a = 0.0f32;
                if step > 0 || strict == 0 {
                    let ko = (physical_row(lj, s0, slen, reverse) * heads + h) * dk;
                    for kk in 0..dk {
                        a += q[qo + kk] * k[ko + kk] * exponent[eo + kk].exp();
                    }
                    a *= scale;
                }
                scores[base + t * chunk + j] = a;
            }
        }
    }
}

/// Output of one pass, one cube per (chunk, head, block of [`COL_BLOCK`] value columns), a
/// strided loop over `(t, v)`:
/// `o_t = scale (q_t exp(Fc_t)) h_c + sum_{j <= t} A_tj v_j`, written to the physical row, or added
/// to what is there when `accumulate` (the second pass of a bidirectional problem).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn chunk_output(
    q: &[f32],
    v: &[f32],
    factors: &[f32],
    states: &[f32],
    scores: &[f32],
    chunks: &[u32],
    o: &mut [f32],
    n_chunks: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    chunk: usize,
    plane_len: usize,
    scale: f32,
    reverse: u32,
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
        let mut e = UNIT_POS_X as usize;
        while e < len * width {
            let t = e / width;
            let vv = col0 + e % width;
            let lt = row0 + t;
            let pt = physical_row(lt, s0, slen, reverse);
            let qo = (pt * heads + h) * dk;
            let ft = (lt * heads + h) * dk;
            let so = (c * heads + h) * dk * dv + vv;
            let mut inter = 0.0f32;
            for kk in 0..dk {
                inter +=
                    q[qo + kk] * factors[PLANE_FC_EXP * plane_len + ft + kk] * states[so + kk * dv];
            }
            let mut acc = scale * inter;
            let ao = ((c * heads + h) * chunk + t) * chunk;
            for j in 0..t + 1 {
                let pj = physical_row(row0 + j, s0, slen, reverse);
                acc += scores[ao + j] * v[(pj * heads + h) * dv + vv];
            }
            let oi = (pt * heads + h) * dv + vv;
            if accumulate == 1 {
                acc += o[oi];
            }
            o[oi] = acc;
            e += CUBE_DIM_X as usize;
        }
    }
}
