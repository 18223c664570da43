//! The CubeCL kernels of block-sparse FlashAttention-2 (forward, `delta`, dQ, dK/dV) and a fill
//! kernel for poisoning outputs.
//!
//! Layouts (ops.md): `q, o, do, dq: [B, T, H, D]`, `k, v, dk, dv: [B, S, H, D]`, element
//! `(b, t, h, x)` at `((b * T + t) * H + h) * D + x`; `lse, delta: [B, H, T]` at `(b * H + h) * T + t`.
//! Inputs `q, k, v` are of the kernel's float type `F` (f32, or f16/bf16 where the runtime has them)
//! and are widened to f32 when staged in shared memory; `do` and every output are f32, and all
//! arithmetic is f32.
//!
//! Work split (all kernels the same way): a cube owns a tile of `rows` rows (query rows for the
//! forward and dQ, key rows for dK/dV) of one mask block of one `(batch, head)`, and walks the
//! plan's list of blocks on the other axis in sub-tiles of `cols` rows staged in shared memory.
//! Its `rows * tpr` units are laid out as `tpr` lanes per tile row: lane `l` of row `r` computes the
//! scores of the sub-tile columns `c * tpr + l` and accumulates the output features
//! `x = c * tpr + l` of row `r` in registers. `rows`, `cols`, `tpr` and `D` are compile-time
//! (shared memory is sized at compile time); sizes, strides, block sizes and flags are run-time
//! scalars, so one compiled variant serves every problem with the same head dim on a device.
//!
//! Masking: a key is allowed iff it lies inside its block and before `S`, and (causal) `j <= i`. A
//! sub-tile of a block the plan calls *full* that does not run past the block end skips the
//! per-element test. Masked scores never enter an `exp`: the running max starts at the finite
//! sentinel [`NEG_SENTINEL`] (no infinities are formed in the kernels, so `-inf - -inf` cannot
//! happen), and a masked probability is set to 0 by selection, not computed. A row with no
//! allowed key ends with `l = 0` and gets `o = 0`, `lse = -inf` (the `-inf` is a run-time scalar).

use cubecl::prelude::*;

/// The running-max start and the stored score of a masked entry: below every real score (scores are
/// finite f32 products of finite inputs, far above `-3e38` in practice) yet finite, so
/// `exp(NEG_SENTINEL - m)` is 0 for a real `m` and nothing ever evaluates `-inf - -inf`.
pub(super) const NEG_SENTINEL: f32 = -3.0e38;

/// Where a cube's tile of rows lies: `tile` counts tiles of `rows` rows, `tiles_per_block` of them
/// per mask block of `block` rows (the last one of a block may be cut short, so a tile never spans
/// two blocks). Returns `(block index, first row, end of the block's rows)`.
#[cube]
fn tile_span(
    tile: usize,
    tiles_per_block: usize,
    block: usize,
    len: usize,
    #[comptime] rows: usize,
) -> (usize, usize, usize) {
    let blk = tile / tiles_per_block;
    let first = blk * block + (tile % tiles_per_block) * rows;
    let end = min((blk + 1) * block, len);
    (blk, first, end)
}

/// Stages `n_rows` rows of `d` features, starting at token `first` of `(b, h)`, from `src`
/// (`[B, len, H, D]`) into `dst` (row stride `stride`) as f32 times `factor`; rows at or past `end`
/// are zero.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_rows<F: Float>(
    src: &[F],
    dst: &mut Shared<[f32]>,
    first: usize,
    end: usize,
    len: usize,
    heads: usize,
    b: usize,
    h: usize,
    factor: f32,
    #[comptime] n_rows: usize,
    #[comptime] d: usize,
    #[comptime] stride: usize,
    #[comptime] threads: usize,
) {
    let tid = UNIT_POS as usize;
    #[unroll]
    for it in 0..comptime!(n_rows * d).div_ceil(threads) {
        let idx = it * threads + tid;
        if idx < comptime!(n_rows * d) {
            let r = idx / d;
            let x = idx % d;
            let token = first + r;
            let mut val = 0.0f32;
            if token < end {
                val = f32::cast_from(src[((b * len + token) * heads + h) * d + x]) * factor;
            }
            dst[r * stride + x] = val;
        }
    }
}

/// Forward: `o` and `lse` of one tile of `rows` queries of one `(b, h)`, iterating the plan's key
/// blocks (`row_ptr/row_idx/row_full`) of its query block in sub-tiles of `cols` keys.
/// Grid: `(nq * tiles_per_block, B * H)`, `rows * tpr` units.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(super) fn attn_forward<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    row_ptr: &[u32],
    row_idx: &[u32],
    row_full: &[u32],
    o: &mut [f32],
    lse: &mut [f32],
    t_len: usize,
    s_len: usize,
    heads: usize,
    block_q: usize,
    block_k: usize,
    tiles_per_block: usize,
    scale: f32,
    causal: u32,
    neg_inf: f32,
    #[comptime] d: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] tpr: usize,
) {
    let threads = comptime!(rows * tpr);
    // Feature tiles use row stride d + 1 and score tiles cols + 1, so that on GPUs the lanes of a
    // row (reading different tile rows) and the rows of a warp fall into different banks.
    let fs = comptime!(d + 1);
    let ps = comptime!(cols + 1);
    let per_lane = comptime!(cols / tpr);
    let feats = comptime!(d / tpr);
    let tid = UNIT_POS as usize;
    let row = tid / tpr;
    let lane = tid % tpr;
    let bh = CUBE_POS_Y as usize;
    let b = bh / heads;
    let h = bh % heads;
    let (qb, q0, q_end) = tile_span(CUBE_POS_X as usize, tiles_per_block, block_q, t_len, rows);
    let qi = q0 + row;
    let mut q_s = Shared::<[f32]>::new_slice(comptime!(rows * (d + 1)));
    let mut k_s = Shared::<[f32]>::new_slice(comptime!(cols * (d + 1)));
    let mut v_s = Shared::<[f32]>::new_slice(comptime!(cols * (d + 1)));
    let mut p_s = Shared::<[f32]>::new_slice(comptime!(rows * (cols + 1)));
    let mut red_s = Shared::<[f32]>::new_slice(comptime!(rows * tpr));
    let mut acc = Array::<f32>::new(feats);
    let mut sc = Array::<f32>::new(per_lane);
    #[unroll]
    for c in 0..feats {
        acc[c] = 0.0;
    }
    let mut m_run = NEG_SENTINEL.runtime();
    let mut l_part = 0.0f32;

    // A cube past the end of a short last block (q0 >= q_end) has nothing to do; the test is
    // uniform over the cube, so the barriers below stay in uniform control flow.
    if q0 < q_end {
        // q is staged pre-scaled: s = (scale q) . k.
        stage_rows::<F>(
            q, &mut q_s, q0, q_end, t_len, heads, b, h, scale, rows, d, fs, threads,
        );
        let q_last = min(q0 + rows, q_end) - 1;
        let sub_tiles = block_k.div_ceil(cols);
        for e in row_ptr[qb] as usize..row_ptr[qb + 1] as usize {
            let kb = row_idx[e] as usize;
            let block_full = row_full[e] == 1;
            let k_end = min((kb + 1) * block_k, s_len);
            for sub in 0..sub_tiles {
                let k0 = kb * block_k + sub * cols;
                // Uniform skips: sub-tile past the keys, or (causal) entirely after this tile's
                // last query.
                let live = k0 < k_end && !(causal == 1 && k0 > q_last);
                if live {
                    let full = block_full && k0 + cols <= k_end;
                    sync_cube();
                    stage_rows::<F>(
                        k, &mut k_s, k0, k_end, s_len, heads, b, h, 1.0, cols, d, fs, threads,
                    );
                    stage_rows::<F>(
                        v, &mut v_s, k0, k_end, s_len, heads, b, h, 1.0, cols, d, fs, threads,
                    );
                    sync_cube();

                    // Scores of this lane's columns j = c * tpr + lane (one q load per feature
                    // serves all of them), masked to the sentinel, and their max.
                    #[unroll]
                    for c in 0..per_lane {
                        sc[c] = 0.0;
                    }
                    for x0 in 0..comptime!(d / 8) {
                        #[unroll]
                        for x1 in 0..8usize {
                            let x = x0 * 8 + x1;
                            let qv = q_s[row * fs + x];
                            #[unroll]
                            for c in 0..per_lane {
                                sc[c] += qv * k_s[(c * tpr + lane) * fs + x];
                            }
                        }
                    }
                    let mut part_max = NEG_SENTINEL.runtime();
                    #[unroll]
                    for c in 0..per_lane {
                        let kj = k0 + c * tpr + lane;
                        let allowed = full || (kj < k_end && (causal == 0 || kj <= qi));
                        let score = select(allowed, sc[c], NEG_SENTINEL);
                        sc[c] = score;
                        part_max = max(part_max, score);
                    }
                    red_s[row * tpr + lane] = part_max;
                    sync_cube();

                    // Online softmax update with the row max over all lanes.
                    let mut m_new = m_run;
                    #[unroll]
                    for ln in 0..tpr {
                        m_new = max(m_new, red_s[row * tpr + ln]);
                    }
                    // m_run = m_new = NEG_SENTINEL (nothing allowed yet) gives alpha = 1 on a zero
                    // accumulator; a real m_new after the sentinel gives alpha = 0.
                    let alpha = f32::exp(m_run - m_new);
                    let mut tile_sum = 0.0f32;
                    #[unroll]
                    for c in 0..per_lane {
                        let j = c * tpr + lane;
                        let kj = k0 + j;
                        let allowed = full || (kj < k_end && (causal == 0 || kj <= qi));
                        let p = select(allowed, f32::exp(sc[c] - m_new), 0.0);
                        p_s[row * ps + j] = p;
                        tile_sum += p;
                    }
                    l_part = l_part * alpha + tile_sum;
                    m_run = m_new;
                    sync_cube();

                    // acc = alpha acc + P V over this lane's features x = c * tpr + lane.
                    #[unroll]
                    for c in 0..feats {
                        acc[c] *= alpha;
                    }
                    for j0 in 0..comptime!(cols / 8) {
                        #[unroll]
                        for j1 in 0..8usize {
                            let j = j0 * 8 + j1;
                            let p = p_s[row * ps + j];
                            #[unroll]
                            for c in 0..feats {
                                acc[c] += p * v_s[j * fs + c * tpr + lane];
                            }
                        }
                    }
                }
            }
        }

        // Row sum over the lanes (each lane summed its own columns, all rescaled by the same
        // alphas). The last reads of red_s are two barriers back.
        red_s[row * tpr + lane] = l_part;
        sync_cube();
        let mut l = 0.0f32;
        #[unroll]
        for ln in 0..tpr {
            l += red_s[row * tpr + ln];
        }
        if qi < q_end {
            let nonempty = l > 0.0;
            // l >= 1 for a non-empty row (its max term is exp(0)); an empty row has acc = 0.
            let safe_l = select(nonempty, l, 1.0);
            let inv = 1.0 / safe_l;
            let o0 = ((b * t_len + qi) * heads + h) * d;
            #[unroll]
            for c in 0..feats {
                o[o0 + c * tpr + lane] = acc[c] * inv;
            }
            if lane == 0 {
                lse[bh * t_len + qi] = select(nonempty, m_run + f32::ln(safe_l), neg_inf);
            }
        }
    }
}

/// `delta[b, h, t] = sum_x do[b, t, h, x] * o[b, t, h, x]`, one unit per `(b, t, h)` row.
/// Grid: a flat 2-D grid of 1-D cubes, `n_rows = B * T * H`.
#[cube(launch_unchecked)]
pub(super) fn attn_delta(
    d_o: &[f32],
    o: &[f32],
    delta: &mut [f32],
    n_rows: usize,
    t_len: usize,
    heads: usize,
    d: usize,
) {
    let r = (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize)
        * CUBE_DIM_X as usize
        + UNIT_POS_X as usize;
    if r < n_rows {
        let mut acc = 0.0f32;
        for x in 0..d {
            acc += d_o[r * d + x] * o[r * d + x];
        }
        // r = (b * T + t) * H + h.
        let h = r % heads;
        let bt = r / heads;
        let t = bt % t_len;
        let b = bt / t_len;
        delta[(b * heads + h) * t_len + t] = acc;
    }
}

/// dQ: for one tile of `rows` queries, `dq_i = scale * sum_j dS_ij k_j` with
/// `P_ij = exp(s_ij - lse_i)`, `dS_ij = P_ij (do_i . v_j - delta_i)`, iterating the plan's key
/// blocks like the forward. Grid: `(nq * tiles_per_block, B * H)`, `rows * tpr` units.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(super) fn attn_backward_dq<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    d_o: &[f32],
    lse: &[f32],
    delta: &[f32],
    row_ptr: &[u32],
    row_idx: &[u32],
    row_full: &[u32],
    dq: &mut [f32],
    t_len: usize,
    s_len: usize,
    heads: usize,
    block_q: usize,
    block_k: usize,
    tiles_per_block: usize,
    scale: f32,
    causal: u32,
    #[comptime] d: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] tpr: usize,
) {
    let threads = comptime!(rows * tpr);
    let fs = comptime!(d + 1);
    let ps = comptime!(cols + 1);
    let per_lane = comptime!(cols / tpr);
    let feats = comptime!(d / tpr);
    let tid = UNIT_POS as usize;
    let row = tid / tpr;
    let lane = tid % tpr;
    let bh = CUBE_POS_Y as usize;
    let b = bh / heads;
    let h = bh % heads;
    let (qb, q0, q_end) = tile_span(CUBE_POS_X as usize, tiles_per_block, block_q, t_len, rows);
    let qi = q0 + row;
    let mut q_s = Shared::<[f32]>::new_slice(comptime!(rows * (d + 1)));
    let mut do_s = Shared::<[f32]>::new_slice(comptime!(rows * (d + 1)));
    let mut k_s = Shared::<[f32]>::new_slice(comptime!(cols * (d + 1)));
    let mut v_s = Shared::<[f32]>::new_slice(comptime!(cols * (d + 1)));
    let mut ds_s = Shared::<[f32]>::new_slice(comptime!(rows * (cols + 1)));
    let mut acc = Array::<f32>::new(feats);
    let mut sc = Array::<f32>::new(per_lane);
    let mut dp = Array::<f32>::new(per_lane);
    #[unroll]
    for c in 0..feats {
        acc[c] = 0.0;
    }

    if q0 < q_end {
        stage_rows::<F>(
            q, &mut q_s, q0, q_end, t_len, heads, b, h, scale, rows, d, fs, threads,
        );
        stage_rows::<f32>(
            d_o, &mut do_s, q0, q_end, t_len, heads, b, h, 1.0, rows, d, fs, threads,
        );
        // Row statistics. An empty row has lse = -inf: it gets no probability at all (and the
        // exponent never sees the infinity).
        let mut row_lse = NEG_SENTINEL.runtime();
        let mut row_delta = 0.0f32;
        if qi < q_end {
            row_lse = lse[bh * t_len + qi];
            row_delta = delta[bh * t_len + qi];
        }
        let row_ok = row_lse > NEG_SENTINEL;
        let lse_used = select(row_ok, row_lse, 0.0);

        let q_last = min(q0 + rows, q_end) - 1;
        let sub_tiles = block_k.div_ceil(cols);
        for e in row_ptr[qb] as usize..row_ptr[qb + 1] as usize {
            let kb = row_idx[e] as usize;
            let block_full = row_full[e] == 1;
            let k_end = min((kb + 1) * block_k, s_len);
            for sub in 0..sub_tiles {
                let k0 = kb * block_k + sub * cols;
                let live = k0 < k_end && !(causal == 1 && k0 > q_last);
                if live {
                    let full = block_full && k0 + cols <= k_end;
                    sync_cube();
                    stage_rows::<F>(
                        k, &mut k_s, k0, k_end, s_len, heads, b, h, 1.0, cols, d, fs, threads,
                    );
                    stage_rows::<F>(
                        v, &mut v_s, k0, k_end, s_len, heads, b, h, 1.0, cols, d, fs, threads,
                    );
                    sync_cube();

                    // s_ij and dP_ij = do_i . v_j for this lane's columns.
                    #[unroll]
                    for c in 0..per_lane {
                        sc[c] = 0.0;
                        dp[c] = 0.0;
                    }
                    for x0 in 0..comptime!(d / 8) {
                        #[unroll]
                        for x1 in 0..8usize {
                            let x = x0 * 8 + x1;
                            let qv = q_s[row * fs + x];
                            let gv = do_s[row * fs + x];
                            #[unroll]
                            for c in 0..per_lane {
                                let j = c * tpr + lane;
                                sc[c] += qv * k_s[j * fs + x];
                                dp[c] += gv * v_s[j * fs + x];
                            }
                        }
                    }
                    #[unroll]
                    for c in 0..per_lane {
                        let j = c * tpr + lane;
                        let kj = k0 + j;
                        let allowed = row_ok && (full || (kj < k_end && (causal == 0 || kj <= qi)));
                        let p = select(allowed, f32::exp(sc[c] - lse_used), 0.0);
                        ds_s[row * ps + j] = p * (dp[c] - row_delta);
                    }
                    sync_cube();

                    for j0 in 0..comptime!(cols / 8) {
                        #[unroll]
                        for j1 in 0..8usize {
                            let j = j0 * 8 + j1;
                            let g = ds_s[row * ps + j];
                            #[unroll]
                            for c in 0..feats {
                                acc[c] += g * k_s[j * fs + c * tpr + lane];
                            }
                        }
                    }
                }
            }
        }
        if qi < q_end {
            let o0 = ((b * t_len + qi) * heads + h) * d;
            #[unroll]
            for c in 0..feats {
                dq[o0 + c * tpr + lane] = acc[c] * scale;
            }
        }
    }
}

/// dK and dV: for one tile of `rows` keys, `dv_j = sum_i P_ij do_i` and
/// `dk_j = scale * sum_i dS_ij q_i`, iterating the plan's transposed lists (`col_*`: per key block,
/// its query blocks) in sub-tiles of `cols` queries. No atomics: each key row has one owner.
/// Grid: `(nk * tiles_per_block, B * H)`, `rows * tpr` units.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(super) fn attn_backward_dkdv<F: Float>(
    q: &[F],
    k: &[F],
    v: &[F],
    d_o: &[f32],
    lse: &[f32],
    delta: &[f32],
    col_ptr: &[u32],
    col_idx: &[u32],
    col_full: &[u32],
    dk: &mut [f32],
    dv: &mut [f32],
    t_len: usize,
    s_len: usize,
    heads: usize,
    block_q: usize,
    block_k: usize,
    tiles_per_block: usize,
    scale: f32,
    causal: u32,
    #[comptime] d: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] tpr: usize,
) {
    let threads = comptime!(rows * tpr);
    let fs = comptime!(d + 1);
    let ps = comptime!(cols + 1);
    let per_lane = comptime!(cols / tpr);
    let feats = comptime!(d / tpr);
    let tid = UNIT_POS as usize;
    let row = tid / tpr;
    let lane = tid % tpr;
    let bh = CUBE_POS_Y as usize;
    let b = bh / heads;
    let h = bh % heads;
    let (kb, k0, k_end) = tile_span(CUBE_POS_X as usize, tiles_per_block, block_k, s_len, rows);
    let kj = k0 + row;
    let mut k_s = Shared::<[f32]>::new_slice(comptime!(rows * (d + 1)));
    let mut v_s = Shared::<[f32]>::new_slice(comptime!(rows * (d + 1)));
    let mut q_s = Shared::<[f32]>::new_slice(comptime!(cols * (d + 1)));
    let mut do_s = Shared::<[f32]>::new_slice(comptime!(cols * (d + 1)));
    let mut lse_s = Shared::<[f32]>::new_slice(cols);
    let mut delta_s = Shared::<[f32]>::new_slice(cols);
    let mut p_s = Shared::<[f32]>::new_slice(comptime!(rows * (cols + 1)));
    let mut ds_s = Shared::<[f32]>::new_slice(comptime!(rows * (cols + 1)));
    let mut dk_acc = Array::<f32>::new(feats);
    let mut dv_acc = Array::<f32>::new(feats);
    let mut sc = Array::<f32>::new(per_lane);
    let mut dp = Array::<f32>::new(per_lane);
    #[unroll]
    for c in 0..feats {
        dk_acc[c] = 0.0;
        dv_acc[c] = 0.0;
    }

    if k0 < k_end {
        stage_rows::<F>(
            k, &mut k_s, k0, k_end, s_len, heads, b, h, 1.0, rows, d, fs, threads,
        );
        stage_rows::<F>(
            v, &mut v_s, k0, k_end, s_len, heads, b, h, 1.0, rows, d, fs, threads,
        );
        let sub_tiles = block_q.div_ceil(cols);
        for e in col_ptr[kb] as usize..col_ptr[kb + 1] as usize {
            let qb = col_idx[e] as usize;
            let block_full = col_full[e] == 1;
            let q_end = min((qb + 1) * block_q, t_len);
            for sub in 0..sub_tiles {
                let i0 = qb * block_q + sub * cols;
                // Uniform skips: sub-tile past the queries, or (causal) entirely before this
                // tile's first key.
                let live = i0 < q_end && !(causal == 1 && min(i0 + cols, q_end) - 1 < k0);
                if live {
                    let full = block_full && i0 + cols <= q_end;
                    sync_cube();
                    // q pre-scaled: s = (scale q) . k and dk = sum_i dS_ij (scale q_i).
                    stage_rows::<F>(
                        q, &mut q_s, i0, q_end, t_len, heads, b, h, scale, cols, d, fs, threads,
                    );
                    stage_rows::<f32>(
                        d_o, &mut do_s, i0, q_end, t_len, heads, b, h, 1.0, cols, d, fs, threads,
                    );
                    if tid < cols {
                        let qi = i0 + tid;
                        let mut l = NEG_SENTINEL.runtime();
                        let mut dl = 0.0f32;
                        if qi < q_end {
                            l = lse[bh * t_len + qi];
                            dl = delta[bh * t_len + qi];
                        }
                        lse_s[tid] = l;
                        delta_s[tid] = dl;
                    }
                    sync_cube();

                    // s_ij and dP_ij for this lane's query columns i = c * tpr + lane.
                    #[unroll]
                    for c in 0..per_lane {
                        sc[c] = 0.0;
                        dp[c] = 0.0;
                    }
                    for x0 in 0..comptime!(d / 8) {
                        #[unroll]
                        for x1 in 0..8usize {
                            let x = x0 * 8 + x1;
                            let kv = k_s[row * fs + x];
                            let vv = v_s[row * fs + x];
                            #[unroll]
                            for c in 0..per_lane {
                                let i = c * tpr + lane;
                                sc[c] += q_s[i * fs + x] * kv;
                                dp[c] += do_s[i * fs + x] * vv;
                            }
                        }
                    }
                    #[unroll]
                    for c in 0..per_lane {
                        let i = c * tpr + lane;
                        let qi = i0 + i;
                        let row_lse = lse_s[i];
                        // An empty query row (lse = -inf) gets no probability.
                        let row_ok = row_lse > NEG_SENTINEL;
                        let allowed = row_ok && (full || (qi < q_end && (causal == 0 || kj <= qi)));
                        let p =
                            select(allowed, f32::exp(sc[c] - select(row_ok, row_lse, 0.0)), 0.0);
                        p_s[row * ps + i] = p;
                        ds_s[row * ps + i] = p * (dp[c] - delta_s[i]);
                    }
                    sync_cube();

                    for i0 in 0..comptime!(cols / 8) {
                        #[unroll]
                        for i1 in 0..8usize {
                            let i = i0 * 8 + i1;
                            let p = p_s[row * ps + i];
                            let g = ds_s[row * ps + i];
                            #[unroll]
                            for c in 0..feats {
                                let x = c * tpr + lane;
                                dk_acc[c] += g * q_s[i * fs + x];
                                dv_acc[c] += p * do_s[i * fs + x];
                            }
                        }
                    }
                }
            }
        }
        if kj < k_end {
            let o0 = ((b * s_len + kj) * heads + h) * d;
            #[unroll]
            for c in 0..feats {
                dk[o0 + c * tpr + lane] = dk_acc[c];
                dv[o0 + c * tpr + lane] = dv_acc[c];
            }
        }
    }
}

/// `out[i] = value` for `i < n` (poisoning outputs with NaN in tests and debug builds).
#[cube(launch_unchecked)]
pub(super) fn fill_f32(out: &mut [f32], value: f32, n: usize) {
    let i = (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize)
        * CUBE_DIM_X as usize
        + UNIT_POS_X as usize;
    if i < n {
        out[i] = value;
    }
}
