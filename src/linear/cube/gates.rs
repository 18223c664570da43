//! Gate kernels: the chunk-local cumulative gates (as decay factors), the closed-form gate
//! gradient (a reverse cumulative sum), and its reduction to the gate's own shape.
//!
//! **Why every exponent is `<= 0` and no exponent is a difference of large numbers.** Gates are
//! log decays `g <= 0`. Every factor below is `exp` of a sum of consecutive gates, accumulated as a
//! running sum of non-positive terms, so each exponent is `<= 0` (the factor is in `[0, 1]`,
//! underflow to 0 is harmless) and carries a relative rounding error of a few ulps of *itself*.
//! Inside the diagonal sub-blocks the kernels sum the gates `j+1..=t` themselves, walking from
//! one row to the next ([`PLANE_GATE`]). A cumulative gate differenced instead (`G_t - G_j`, as
//! flash-linear-attention does) costs an ulp of `|G|`: with strong decays (`n = 0.1`, about -8
//! per step) `|G|` reaches ~100 within 16 rows, and a weak step after strong ones then carries a
//! relative error near `1e-5` on a term of full weight (we measured `4e-5` on a per-head gate
//! gradient that way).
//!
//! CubeCL 0.11 has no `exp2` instruction (its `exp` lowers to the target's own `exp2` of
//! `x * log2(e)`), so the factors are kept in natural-log units; the "exp2 form" would only add a
//! rounding of `G / ln 2`.

use cubecl::prelude::*;

use super::layout::{CHUNK_FIELDS, gate_value};
use crate::cube::launch::{cube_index, thread_index};

/// Sub-chunk length: the intra-chunk scores are exact elementwise inside a `SUB x SUB` diagonal
/// block and anchored at sub-chunk boundaries between blocks.
pub const SUB: usize = 16;
/// Largest chunk of the chunkwise form (bounded by the shared-memory tiles of the state pass and
/// by the three anchored factors below: at most `MAX_CHUNK / SUB - 1 = 3` sub-chunks apart).
pub const MAX_CHUNK: usize = 64;

/// Planes of the factors buffer, each `[rows, H, K]` by logical row (`t` a row of chunk `c`,
/// sub-chunk `s`; sums are of this pass's gates):
/// `exp(Fc_t)`, `Fc_t = sum(chunk start ..= t)`: decays the chunk-start state to row `t`.
pub const PLANE_FC_EXP: usize = 0;
/// `exp(Rc_t)`, `Rc_t = sum(t+1 ..= chunk end)`: carries row `t`'s key to the chunk-end state.
pub const PLANE_RC_EXP: usize = 1;
/// `g_t`, this pass's gate at logical row `t` (log units), summed row by row inside the diagonal
/// sub-blocks.
pub const PLANE_GATE: usize = 2;
/// `exp(Fs_t)`: the query-side anchor factor (decay from the boundary before sub-chunk `s`).
pub const PLANE_FS_EXP: usize = 3;
/// `exp(Rs_t + totals of the next d-1 sub-chunks)` for `d = 1, 2, 3` (planes 4, 5, 6): the
/// key-side anchor factor from row `t` to the boundary before sub-chunk `s + d`.
pub const PLANE_RS_EXP: usize = 4;
pub const PLANES: usize = 7;

/// One thread per (chunk, head, key channel): walks the chunk forward for `Fc`, `Fs` and backward
/// for `Rc`, `Rs` and the anchored key factors, writing the planes described above.
#[cube(launch_unchecked)]
// (`usize::is_multiple_of` has no expansion inside `#[cube]` functions.)
#[allow(clippy::too_many_arguments, clippy::manual_is_multiple_of)]
pub fn chunk_gate_factors(
    g: &[f32],
    chunks: &[u32],
    factors: &mut [f32],
    n_chunks: usize,
    heads: usize,
    dk: usize,
    kind: u32,
    reverse: u32,
    plane_len: usize,
) {
    let id = thread_index();
    if id < n_chunks * heads * dk {
        let kk = id % dk;
        let h = (id / dk) % heads;
        let c = id / (dk * heads);
        let row0 = chunks[c * CHUNK_FIELDS] as usize;
        let len = chunks[c * CHUNK_FIELDS + 1] as usize;
        let s0 = chunks[c * CHUNK_FIELDS + 2] as usize;
        let slen = chunks[c * CHUNK_FIELDS + 3] as usize;

        let mut fc = 0.0f32;
        let mut fs = 0.0f32;
        for i in 0..len {
            let lrow = row0 + i;
            let gv = gate_value(g, kind, lrow, s0, slen, reverse, h, kk, heads, dk);
            if i % SUB == 0 {
                fs = 0.0;
            }
            fc += gv;
            fs += gv;
            let idx = (lrow * heads + h) * dk + kk;
            factors[PLANE_FC_EXP * plane_len + idx] = fc.exp();
            factors[PLANE_GATE * plane_len + idx] = gv;
            factors[PLANE_FS_EXP * plane_len + idx] = fs.exp();
        }

        // Backward walk. `rs` sums the gates after row i up to the end of its sub-chunk; `next1`,
        // `next2` are the totals of the following two sub-chunks (0 past the chunk's end, where
        // no anchor reads them).
        let mut rc = 0.0f32;
        let mut rs = 0.0f32;
        let mut next1 = 0.0f32;
        let mut next2 = 0.0f32;
        for step in 0..len {
            let i = len - 1 - step;
            let lrow = row0 + i;
            let idx = (lrow * heads + h) * dk + kk;
            factors[PLANE_RC_EXP * plane_len + idx] = rc.exp();
            factors[PLANE_RS_EXP * plane_len + idx] = rs.exp();
            factors[(PLANE_RS_EXP + 1) * plane_len + idx] = (rs + next1).exp();
            factors[(PLANE_RS_EXP + 2) * plane_len + idx] = (rs + next1 + next2).exp();
            let gv = gate_value(g, kind, lrow, s0, slen, reverse, h, kk, heads, dk);
            rc += gv;
            rs += gv;
            if i % SUB == 0 {
                next2 = next1;
                next1 = rs;
                rs = 0.0;
            }
        }
    }
}

/// Closed-form gate gradient of one pass (kernels.md), one thread per (sequence, head, channel):
/// `dg_tau = sum_{logical i >= tau} (q_i dq_i - k_i dk_i)`, where `gq = q dq` and `gk = k dk`
/// hold this pass's own terms *without* the diagonal `i = j` contributions and without the final
/// state's (`dht`) path. Both cancel in the sum analytically; left in, their rounding (an ulp of
/// terms that do not decay) would swamp a gradient that, with strong decays, is orders of
/// magnitude smaller. The `dht` path is added separately, in a form without cancellation, by
/// [`final_state_gate_grad`](fn@final_state_gate_grad). The result lands on the physical gate row this logical step read
/// (see [`gate_value`](fn@gate_value)), added to what earlier passes wrote there. The running sum is
/// Kahan-compensated: every prefix is a result, so its error must not grow with `T`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn gate_grad_scan(
    gq: &[f32],
    gk: &[f32],
    seqs: &[u32],
    dg: &mut [f32],
    n_seq: usize,
    heads: usize,
    dk: usize,
    reverse: u32,
) {
    let id = thread_index();
    if id < n_seq * heads * dk {
        let kk = id % dk;
        let h = (id / dk) % heads;
        let n = id / (dk * heads);
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let mut acc = 0.0f32;
        let mut comp = 0.0f32;
        for step in 0..slen {
            let tau = slen - 1 - step;
            let lrow = s0 + tau;
            let idx = (lrow * heads + h) * dk + kk;
            let y = (gq[idx] - gk[idx]) - comp;
            let sum = acc + y;
            comp = (sum - acc) - y;
            acc = sum;
            if reverse == 0 {
                dg[idx] += acc;
            } else if tau > 0 {
                let p = 2 * s0 + slen - lrow;
                dg[(p * heads + h) * dk + kk] += acc;
            }
        }
    }
}

/// The final state's share of the gate gradient (forward pass, causal), one thread per
/// (sequence, head, channel). `ht = exp(sum_{m >= t} g_m) S_{t-1} + (terms free of g_t)`, so
/// `dL/dg_t += exp(sum_{m >= t} g_m) * Z_t` with `Z_t = S_{t-1}[k, :] . dht[k, :]`, where
/// `S_{-1} = h0`. `Z` follows the scalar recurrence `Z_{t+1} = exp(g_t) Z_t + k_t w_t` with
/// `w_t = v_t . dht[k, :]` from [`dht_projection`](fn@dht_projection) (a forward walk storing `Z_t` in `scratch`),
/// then a backward walk accumulates the suffix exponent (`<= 0`) and adds the product. No term
/// cancels another. Two loop iterations per token: sequences up to
/// [`crate::cube::LLVMPIPE_MAX_SEQUENCE`] on llvmpipe.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn final_state_gate_grad(
    k: &[f32],
    w: &[f32],
    g: &[f32],
    seqs: &[u32],
    h0: &[f32],
    dht: &[f32],
    scratch: &mut [f32],
    dg: &mut [f32],
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
        let so = ((n * heads + h) * dk + kk) * dv;
        let mut z = 0.0f32;
        if has_h0 == 1 {
            for vv in 0..dv {
                z += h0[so + vv] * dht[so + vv];
            }
        }
        for tau in 0..slen {
            let row = s0 + tau;
            let idx = (row * heads + h) * dk + kk;
            scratch[idx] = z;
            let decay = gate_value(g, kind, row, s0, slen, 0u32, h, kk, heads, dk).exp();
            z = decay * z + k[idx] * w[idx];
        }
        let mut suffix = 0.0f32;
        for step in 0..slen {
            let row = s0 + slen - 1 - step;
            let idx = (row * heads + h) * dk + kk;
            suffix += gate_value(g, kind, row, s0, slen, 0u32, h, kk, heads, dk);
            dg[idx] += suffix.exp() * scratch[idx];
        }
    }
}

/// `w[row, h, k] = v[row, h, :] . dht[n, h, k, :]`, one thread per (row, head, key channel).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn dht_projection(
    v: &[f32],
    dht: &[f32],
    row_seq: &[u32],
    w: &mut [f32],
    rows: usize,
    heads: usize,
    dk: usize,
    dv: usize,
) {
    let id = thread_index();
    if id < rows * heads * dk {
        let kk = id % dk;
        let h = (id / dk) % heads;
        let row = id / (dk * heads);
        let n = row_seq[row] as usize;
        let so = ((n * heads + h) * dk + kk) * dv;
        let vo = (row * heads + h) * dv;
        let mut acc = 0.0f32;
        for vv in 0..dv {
            acc += v[vo + vv] * dht[so + vv];
        }
        w[id] = acc;
    }
}

/// Scalar gate `[rows, H]`: sums the expanded gradient `[rows, H, K]` over the key channels.
#[cube(launch_unchecked)]
pub fn gate_grad_sum_channels(expanded: &[f32], out: &mut [f32], rows_heads: usize, dk: usize) {
    let id = thread_index();
    if id < rows_heads {
        let mut acc = 0.0f32;
        for kk in 0..dk {
            acc += expanded[id * dk + kk];
        }
        out[id] = acc;
    }
}

/// Per-head sums: adds `sum_r per_row[r, h]` (`[rows, H]`) to `out[h]`, one cube per head.
/// Each thread sums a strided share with Kahan compensation, then the cube combines the partial
/// sums in shared memory, so the f32 error does not grow with the number of rows.
#[cube(launch_unchecked)]
pub fn gate_grad_sum_rows(per_token: &[f32], out: &mut [f32], rows: usize, heads: usize) {
    let h = cube_index();
    let mut partial = Shared::<[f32]>::new_slice(256usize);
    let tid = UNIT_POS_X as usize;
    let stride = CUBE_DIM_X as usize;
    let mut sum = 0.0f32;
    let mut comp = 0.0f32;
    let mut r = tid;
    while r < rows {
        let y = per_token[r * heads + h] - comp;
        let t = sum + y;
        comp = (t - sum) - y;
        sum = t;
        r += stride;
    }
    partial[tid] = sum;
    sync_cube();
    let mut width = stride / 2;
    while width > 0 {
        if tid < width {
            partial[tid] += partial[tid + width];
        }
        sync_cube();
        width /= 2;
    }
    if tid == 0 {
        out[h] += partial[0];
    }
}

/// Per-head gate, chunkwise form, pairs inside a chunk: `sum_{j < t} (t - j) A_tj dA_tj` for one
/// (chunk, head) per cube. With a per-head gate the pair `(t, j)` contributes `c_tj = A_tj dA_tj`
/// to the loss and depends on the decay through `t - j` gate applications, so this is its share
/// of `dL/dg` exactly, with no cancellation (see `Run::per_head_gate_grad`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn per_head_intra(
    scores: &[f32],
    dscores: &[f32],
    chunks: &[u32],
    out: &mut [f32],
    n_chunks: usize,
    heads: usize,
    chunk: usize,
) {
    let cube = cube_index();
    let mut partial = Shared::<[f32]>::new_slice(256usize);
    let tid = UNIT_POS_X as usize;
    let mut acc = 0.0f32;
    let active = cube < n_chunks * heads;
    if active {
        let h = cube % heads;
        let c = cube / heads;
        let len = chunks[c * CHUNK_FIELDS + 1] as usize;
        let base = (c * heads + h) * chunk * chunk;
        let mut e = tid;
        while e < len * len {
            let t = e / len;
            let j = e % len;
            if j < t {
                let idx = base + t * chunk + j;
                acc += (t - j) as f32 * scores[idx] * dscores[idx];
            }
            e += 256usize;
        }
    }
    partial[tid] = acc;
    sync_cube();
    let mut width = 128usize;
    while width > 0 {
        if tid < width {
            partial[tid] += partial[tid + width];
        }
        sync_cube();
        width /= 2;
    }
    if active && tid == 0 {
        out[cube] = partial[0];
    }
}

/// Per-head gate, chunkwise form, pairs that straddle a whole chunk `m` (`j` before it, `i`
/// after it, `h0`/`dht` included): they cross all `len_m` of its gate applications, so their
/// share is `len_m * sum_v exp(Fc_last) h_m[k, v] (D_m[k, v] + suffix dht[k, v])`, the state
/// entering the chunk decayed through it against the full gradient leaving it. One thread per
/// (chunk, head, key channel); the caller sums the channels.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn per_head_through(
    factors: &[f32],
    states: &[f32],
    dstates: &[f32],
    suffix_decay: &[f32],
    dht: &[f32],
    chunks: &[u32],
    out: &mut [f32],
    n_chunks: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    plane_len: usize,
    has_dht: u32,
) {
    let id = thread_index();
    if id < n_chunks * heads * dk {
        let kk = id % dk;
        let h = (id / dk) % heads;
        let c = id / (dk * heads);
        let row0 = chunks[c * CHUNK_FIELDS] as usize;
        let len = chunks[c * CHUNK_FIELDS + 1] as usize;
        let n = chunks[c * CHUNK_FIELDS + 4] as usize;
        let last = row0 + len - 1;
        let decay = factors[PLANE_FC_EXP * plane_len + (last * heads + h) * dk + kk];
        let so = ((c * heads + h) * dk + kk) * dv;
        let ho = ((n * heads + h) * dk + kk) * dv;
        let x = suffix_decay[(c * heads + h) * dk + kk];
        let mut acc = 0.0f32;
        for vv in 0..dv {
            let mut d = dstates[so + vv];
            if has_dht == 1 {
                d += x * dht[ho + vv];
            }
            acc += states[so + vv] * d;
        }
        out[id] = len as f32 * decay * acc;
    }
}
