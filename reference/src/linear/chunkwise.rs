//! Chunkwise form: the algorithm the GPU kernels implement (kernels.md), in f64, one small named
//! function per kernel stage so that each kernel has a naive twin to be checked against.
//!
//! The sequence is cut into chunks `[s_n, e_n)` of `chunk` tokens (the last one may be shorter).
//! All decays are built from chunk-local inclusive cumulative gates ([`chunk_local_cumsum`]):
//! `gc_i = sum_{m=s_n..i} g_m` for `i` in chunk `n` (and `gbc` likewise from `gb`). Every decay
//! factor is `exp` of a difference of two of these that is `<= 0` (a sum of gates over an interval),
//! never `exp(+G) * exp(-G)`, so strong gates (cumulative sums far below -700) stay finite and exact.
//!
//! Causal direction, for `i` in chunk `n`:
//! - forward chunk states ([`chunk_states_forward`]): `hF_0 = h0` (or 0),
//!   `hF_{n+1} = diag(exp(gc_{e-1})) hF_n + sum_{j in n} (k_j * exp(gc_{e-1} - gc_j))^T v_j`;
//!   `hF_n` is the causal state `S_{s_n - 1}` and `hF_N` is `ht`;
//! - `o_i = scale (q_i * exp(gc_i)) hF_n + sum_{j in n, j <= i} A_ij v_j`, with the intra-chunk
//!   scores `A_ij = scale sum_c q_ic k_jc exp(gc_ic - gc_jc)` ([`intra_chunk_scores`]).
//!
//! Bidirectional (linear time): additionally backward chunk states ([`chunk_states_backward`])
//! `hB_n = sum_{j >= e_n} (k_j * exp(sum_{m=e_n..j} gb_m))^T v_j`, i.e. `hB_{N-1} = 0`,
//! `hB_{n-1} = diag(exp(gbc_{e_n-1})) hB_n + sum_{j in n} (k_j * exp(gbc_j))^T v_j`, contributing
//! `scale (q_i * exp(gbc_{e_n-1} - gbc_i)) hB_n` (the mask factorises at the chunk end, because
//! `sum_{m=i+1..j} gb = sum_{m=i+1..e-1} gb + sum_{m=e..j} gb`); the forward states start at zero;
//! and the intra-chunk block is the full `C x C` block: `exp(gc_i - gc_j)` below the diagonal,
//! 1 on it (counted once), `exp(gbc_j - gbc_i)` above it.
//!
//! Backward (the kernels' recompute scheme): recompute the chunk states, a reverse pass for the
//! forward-state gradients `dhF` ([`chunk_state_grads_forward`]), a forward pass for the
//! backward-state gradients `dhB` ([`chunk_state_grads_backward`]), then per chunk
//! `dv_j = sum_i A_ij do_i + (k_j * exp(gc_{e-1} - gc_j)) dhF_{n+1} (+ (k_j * exp(gbc_j)) dhB_{n-1})`,
//! the intra `dq, dk` through `dA_ij = do_i . v_j`, the inter `dq` from `do hF^T` / `do hB^T` and
//! inter `dk` from `v dhF^T` / `v dhB^T`; and the gate gradients in closed form, no per-step states:
//! [`gate_grad_closed_form`] for the forward gate and [`gate_bwd_grad_closed_form`] for the
//! backward gate (derivation on each). For that, `dq` and `dk` are kept split into the part that
//! flows through the strict lower triangle, the forward states, `h0` and `ht` (`F`), the part
//! through the strict upper triangle and the backward states (`B`), and the part through no decay
//! at all (`D`: the diagonal, and the last token's own term of `ht`), which cancels from the gate
//! gradients and is kept out of them for accuracy.
//!
//! Normalisation goes through [`super::normalized_forward`] (ones column appended to `V`).

use std::ops::Range;

use super::{
    Direction, HeadGrads, HeadOutput, HeadProblem, add_outer, dot, mat_times_col,
    normalized_backward, normalized_forward, row, row_mut, row_times_mat,
};

/// Token ranges of the chunks of a `len`-token sequence (the last one may be shorter; none for an
/// empty sequence).
pub fn chunk_ranges(len: usize, chunk: usize) -> Vec<Range<usize>> {
    assert!(chunk >= 1, "chunk must be >= 1");
    (0..len.div_ceil(chunk))
        .map(|n| n * chunk..((n + 1) * chunk).min(len))
        .collect()
}

/// Inclusive cumulative sum of `g` (`[len, width]`) along the rows, restarting at every chunk start:
/// row `i` of chunk `[s, e)` holds `sum_{m=s..i} g_m`.
pub fn chunk_local_cumsum(g: &[f64], len: usize, width: usize, chunk: usize) -> Vec<f64> {
    assert_eq!(g.len(), len * width);
    let mut out = vec![0.0; len * width];
    for range in chunk_ranges(len, chunk) {
        let mut acc = vec![0.0; width];
        for i in range {
            for (a, x) in acc.iter_mut().zip(row(g, i, width)) {
                *a += x;
            }
            row_mut(&mut out, i, width).copy_from_slice(&acc);
        }
    }
    out
}

/// Forward (causal-direction) chunk states, `N + 1` matrices `[K, W]`: element `n` is the state
/// entering chunk `n` (`S_{s_n - 1}`; element 0 is `h0` or zero), element `N` the final state.
/// `gc` is [`chunk_local_cumsum`] of `hp.g`.
pub fn chunk_states_forward(hp: &HeadProblem, gc: &[f64], chunk: usize) -> Vec<Vec<f64>> {
    let (kd, w) = (hp.key_dim, hp.value_dim);
    let mut state = hp.h0.clone().unwrap_or_else(|| vec![0.0; kd * w]);
    let mut states = vec![state.clone()];
    for range in chunk_ranges(hp.len, chunk) {
        let gc_last = row(gc, range.end - 1, kd);
        for c in 0..kd {
            let decay = gc_last[c].exp();
            row_mut(&mut state, c, w)
                .iter_mut()
                .for_each(|x| *x *= decay);
        }
        for j in range {
            let gc_j = row(gc, j, kd);
            // k_j decayed from token j to the chunk end: exp(sum_{m=j+1..e-1} g_m).
            let k_decayed: Vec<f64> = row(&hp.k, j, kd)
                .iter()
                .enumerate()
                .map(|(c, k)| k * (gc_last[c] - gc_j[c]).exp())
                .collect();
            add_outer(&mut state, 1.0, &k_decayed, row(&hp.v, j, w));
        }
        states.push(state.clone());
    }
    states
}

/// Backward-direction chunk states, `N` matrices `[K, W]`: element `n` is the contribution of every
/// token after chunk `n`, seen from chunk `n`'s last token:
/// `hB_n = sum_{j >= e_n} (k_j * exp(sum_{m=e_n..j} gb_m))^T v_j` (so `hB_{N-1} = 0`).
/// `gbc` is [`chunk_local_cumsum`] of `hp.gb`.
pub fn chunk_states_backward(hp: &HeadProblem, gbc: &[f64], chunk: usize) -> Vec<Vec<f64>> {
    let (kd, w) = (hp.key_dim, hp.value_dim);
    let ranges = chunk_ranges(hp.len, chunk);
    let mut states = vec![vec![0.0; kd * w]; ranges.len()];
    for n in (1..ranges.len()).rev() {
        // hB_{n-1} from chunk n and hB_n: chunk n starts right after chunk n-1 ends, so the decay
        // from e_{n-1} = s_n to token j of chunk n is exp(gbc_j), and across chunk n exp(gbc_{e-1}).
        let mut state = states[n].clone();
        let gbc_last = row(gbc, ranges[n].end - 1, kd);
        for c in 0..kd {
            let decay = gbc_last[c].exp();
            row_mut(&mut state, c, w)
                .iter_mut()
                .for_each(|x| *x *= decay);
        }
        for j in ranges[n].clone() {
            let gbc_j = row(gbc, j, kd);
            let k_decayed: Vec<f64> = row(&hp.k, j, kd)
                .iter()
                .enumerate()
                .map(|(c, k)| k * gbc_j[c].exp())
                .collect();
            add_outer(&mut state, 1.0, &k_decayed, row(&hp.v, j, w));
        }
        states[n - 1] = state;
    }
    states
}

/// Log of the intra-chunk mask entry `(i, j)`, key channel `c`, for `i, j` in the same chunk, from
/// the chunk-local cumulative gates: `gc_i - gc_j = sum_{m=j+1..i} g` below the diagonal, 0 on it,
/// `gbc_j - gbc_i = sum_{m=i+1..j} gb` above it (bidirectional only; `gbc` must then be given).
/// Always `<= 0`.
pub fn intra_log_mask(
    gc: &[f64],
    gbc: Option<&[f64]>,
    kd: usize,
    i: usize,
    j: usize,
    c: usize,
) -> f64 {
    use std::cmp::Ordering;
    match j.cmp(&i) {
        Ordering::Less => gc[i * kd + c] - gc[j * kd + c],
        Ordering::Equal => 0.0,
        Ordering::Greater => {
            let gbc = gbc.expect("entries above the diagonal need the backward gate");
            gbc[j * kd + c] - gbc[i * kd + c]
        }
    }
}

/// Whether key `j` is inside query `i`'s intra-chunk block for this direction.
fn intra_visible(direction: Direction, i: usize, j: usize) -> bool {
    direction == Direction::Bidirectional || j <= i
}

/// The intra-chunk score block `A_ij = scale sum_c q_ic k_jc exp(intra_log_mask(i, j, c))` for
/// `i, j` in `range`, as `[C, C]` (row `i - s`, column `j - s`); zero above the diagonal when causal.
pub fn intra_chunk_scores(
    hp: &HeadProblem,
    gc: &[f64],
    gbc: Option<&[f64]>,
    range: Range<usize>,
) -> Vec<f64> {
    let (kd, s, size) = (hp.key_dim, range.start, range.len());
    let mut a = vec![0.0; size * size];
    for i in range.clone() {
        let q = row(&hp.q, i, kd);
        for j in range.clone() {
            if !intra_visible(hp.direction, i, j) {
                continue;
            }
            let k = row(&hp.k, j, kd);
            a[(i - s) * size + (j - s)] = hp.scale
                * (0..kd)
                    .map(|c| q[c] * k[c] * intra_log_mask(gc, gbc, kd, i, j, c).exp())
                    .sum::<f64>();
        }
    }
    a
}

/// Forward pass of the chunkwise form on one (sequence, head).
pub fn forward(hp: &HeadProblem, chunk: usize) -> HeadOutput {
    match hp.normalize {
        Some(eps) => normalized_forward(hp, eps, |aug| forward_unnormalized(aug, chunk)),
        None => forward_unnormalized(hp, chunk),
    }
}

/// Backward pass of the chunkwise form on one (sequence, head).
pub fn backward(hp: &HeadProblem, chunk: usize, d_o: &[f64], d_ht: Option<&[f64]>) -> HeadGrads {
    match hp.normalize {
        Some(eps) => {
            assert!(d_ht.is_none(), "normalised problems have no final state");
            normalized_backward(
                hp,
                eps,
                d_o,
                |aug| forward_unnormalized(aug, chunk),
                |aug, du| backward_unnormalized(aug, chunk, du, None),
            )
        }
        None => backward_unnormalized(hp, chunk, d_o, d_ht),
    }
}

/// The chunk-local cumulative gates: `gc` always, `gbc` when bidirectional.
fn cumulative_gates(hp: &HeadProblem, chunk: usize) -> (Vec<f64>, Option<Vec<f64>>) {
    let gc = chunk_local_cumsum(&hp.g, hp.len, hp.key_dim, chunk);
    let gbc = (hp.direction == Direction::Bidirectional)
        .then(|| chunk_local_cumsum(&hp.gb, hp.len, hp.key_dim, chunk));
    (gc, gbc)
}

/// `q_i` scaled per channel by `exp(log_decay_c)`, the row factor of an inter-chunk term.
fn decayed(x: &[f64], log_decay: impl Fn(usize) -> f64) -> Vec<f64> {
    x.iter()
        .enumerate()
        .map(|(c, x)| x * log_decay(c).exp())
        .collect()
}

fn forward_unnormalized(hp: &HeadProblem, chunk: usize) -> HeadOutput {
    let (kd, w, scale) = (hp.key_dim, hp.value_dim, hp.scale);
    let (gc, gbc) = cumulative_gates(hp, chunk);
    let forward_states = chunk_states_forward(hp, &gc, chunk);
    let backward_states = gbc
        .as_ref()
        .map(|gbc| chunk_states_backward(hp, gbc, chunk));
    let mut o = vec![0.0; hp.len * w];
    for (n, range) in chunk_ranges(hp.len, chunk).into_iter().enumerate() {
        let last = range.end - 1;
        let a = intra_chunk_scores(hp, &gc, gbc.as_deref(), range.clone());
        for i in range.clone() {
            let q = row(&hp.q, i, kd);
            let o_row = row_mut(&mut o, i, w);
            // Earlier chunks: exp(gc_i) = exp(sum_{m=s..i} g) carries hF_n to token i.
            let q_fwd = decayed(q, |c| gc[i * kd + c]);
            row_times_mat(o_row, scale, &q_fwd, &forward_states[n]);
            if let (Some(gbc), Some(hb)) = (&gbc, &backward_states) {
                // Later chunks: exp(gbc_{e-1} - gbc_i) = exp(sum_{m=i+1..e-1} gb) to the chunk end.
                let q_bwd = decayed(q, |c| gbc[last * kd + c] - gbc[i * kd + c]);
                row_times_mat(o_row, scale, &q_bwd, &hb[n]);
            }
            for j in range.clone() {
                let a_ij = a[(i - range.start) * range.len() + (j - range.start)];
                for (ov, vv) in o_row.iter_mut().zip(row(&hp.v, j, w)) {
                    *ov += a_ij * vv;
                }
            }
        }
    }
    let ht = hp
        .has_final_state()
        .then(|| forward_states.last().expect("at least h0").clone());
    HeadOutput { o, ht }
}

/// Gradients w.r.t. the forward chunk states, `N + 1` matrices: element `n` is `dL/dhF_n`
/// (element 0 is `dh0`, element `N` is `d_ht`). Reverse pass:
/// `dhF_n = diag(exp(gc_{e_n-1})) dhF_{n+1} + scale sum_{i in n} (q_i * exp(gc_i))^T do_i`.
pub fn chunk_state_grads_forward(
    hp: &HeadProblem,
    gc: &[f64],
    chunk: usize,
    d_o: &[f64],
    d_ht: Option<&[f64]>,
) -> Vec<Vec<f64>> {
    let (kd, w) = (hp.key_dim, hp.value_dim);
    let ranges = chunk_ranges(hp.len, chunk);
    let mut grads = vec![vec![0.0; kd * w]; ranges.len() + 1];
    if let Some(d_ht) = d_ht {
        grads[ranges.len()].copy_from_slice(d_ht);
    }
    for (n, range) in ranges.iter().enumerate().rev() {
        let mut dh = grads[n + 1].clone();
        let gc_last = row(gc, range.end - 1, kd);
        for c in 0..kd {
            let decay = gc_last[c].exp();
            row_mut(&mut dh, c, w).iter_mut().for_each(|x| *x *= decay);
        }
        for i in range.clone() {
            let q_fwd = decayed(row(&hp.q, i, kd), |c| gc[i * kd + c]);
            add_outer(&mut dh, hp.scale, &q_fwd, row(d_o, i, w));
        }
        grads[n] = dh;
    }
    grads
}

/// Gradients w.r.t. the backward chunk states, `N` matrices: element `n` is `dL/dhB_n`. Since
/// `hB_n` feeds the outputs of chunk `n` and the state `hB_{n-1}`, this is a forward pass:
/// `dhB_n = scale sum_{i in n} (q_i * exp(gbc_{e-1} - gbc_i))^T do_i
///        + diag(exp(gbc_{e_n-1})) dhB_{n-1}`.
pub fn chunk_state_grads_backward(
    hp: &HeadProblem,
    gbc: &[f64],
    chunk: usize,
    d_o: &[f64],
) -> Vec<Vec<f64>> {
    let (kd, w) = (hp.key_dim, hp.value_dim);
    let ranges = chunk_ranges(hp.len, chunk);
    let mut grads: Vec<Vec<f64>> = Vec::with_capacity(ranges.len());
    for (n, range) in ranges.iter().enumerate() {
        let last = range.end - 1;
        let mut dh = vec![0.0; kd * w];
        if n > 0 {
            dh.copy_from_slice(&grads[n - 1]);
            let gbc_last = row(gbc, last, kd);
            for c in 0..kd {
                let decay = gbc_last[c].exp();
                row_mut(&mut dh, c, w).iter_mut().for_each(|x| *x *= decay);
            }
        }
        for i in range.clone() {
            let q_bwd = decayed(row(&hp.q, i, kd), |c| gbc[last * kd + c] - gbc[i * kd + c]);
            add_outer(&mut dh, hp.scale, &q_bwd, row(d_o, i, w));
        }
        grads.push(dh);
    }
    grads
}

/// Closed-form gradient w.r.t. the forward (causal) gate `g` (`[L, K]`), kernels.md "Useful
/// identities": `dg_t = sum_{i >= t} (q_i * dq_i - k_i * dk_i) + rowsum_W(ht * dht)` per key
/// channel, where `dq, dk` are the parts of the q/k gradients that flow through the lower triangle,
/// the forward states, `h0` and `ht` (for a causal problem: all of them).
///
/// Why: along channel `c` the loss depends on `G = cumsum(g)` only through `q_ic exp(G_ic)`,
/// `k_jc exp(-G_jc)` and the factor `exp(G_{L-1,c})` of `ht`, so
/// `dL/dG_tc = q_tc dq_tc - k_tc dk_tc + [t = L-1] rowsum(ht * dht)_c` and `dg` is its reverse
/// cumulative sum.
///
/// Terms that pass through no decay cancel exactly and may be left out of all three inputs
/// together: the diagonal (`M_ii = 1`: `scale q_ic k_ic (do_i . v_i)` in both `q dq` and `k dk`),
/// and the last token's own `k_{L-1}^T v_{L-1}` in `ht` (in both `rowsum(ht * dht)` and
/// `k_{L-1} dk_{L-1}`). The chunkwise backward leaves them out: with them, `dg` is a difference of
/// O(1) terms even when it is exponentially small (strong gates), and loses all relative accuracy
/// (about 1e-6 relative for a per-head gate of -20 in f64; kernels in f32 lose correspondingly more).
/// `final_rowsum` is `rowsum_W(ht * dht)` (`[K]`), or that of the decayed part of `ht`, when there
/// is a final state.
pub fn gate_grad_closed_form(
    q: &[f64],
    dq: &[f64],
    k: &[f64],
    dk: &[f64],
    len: usize,
    kd: usize,
    final_rowsum: Option<&[f64]>,
) -> Vec<f64> {
    let mut dg = vec![0.0; len * kd];
    let mut acc = final_rowsum.map_or_else(|| vec![0.0; kd], <[f64]>::to_vec);
    for t in (0..len).rev() {
        for c in 0..kd {
            let i = t * kd + c;
            acc[c] += q[i] * dq[i] - k[i] * dk[i];
            dg[i] = acc[c];
        }
    }
    dg
}

/// Closed-form gradient w.r.t. the backward-direction gate `gb` (`[L, K]`):
/// `dgb_t = sum_{i < t} (q_i * dq^B_i - k_i * dk^B_i)`, with `dq^B, dk^B` the parts of the q/k
/// gradients through the strict upper triangle and the backward states (`dgb_0 = 0`: `gb_0` is
/// never used).
///
/// Why: `gb_t` enters the mask entries `(i, j)` with `i < t <= j`, as a factor shared by
/// `exp(-GB_i)` on `q_i` and `exp(GB_j)` on `k_j` (`GB = cumsum(gb)`). With
/// `W_ij = dL/d(log M_ij)`, `q_i dq^B_i = sum_{j > i} W_ij` and `k_j dk^B_j = sum_{i < j} W_ij`,
/// so `sum_{i < t} (q_i dq^B_i - k_i dk^B_i)` keeps exactly the pairs with `i < t <= j`.
/// (Equivalently: the causal closed form on the time-reversed problem of the flip identity.)
pub fn gate_bwd_grad_closed_form(
    q: &[f64],
    dq_b: &[f64],
    k: &[f64],
    dk_b: &[f64],
    len: usize,
    kd: usize,
) -> Vec<f64> {
    let mut dgb = vec![0.0; len * kd];
    let mut acc = vec![0.0; kd];
    for t in 0..len {
        for c in 0..kd {
            let i = t * kd + c;
            dgb[i] = acc[c];
            acc[c] += q[i] * dq_b[i] - k[i] * dk_b[i];
        }
    }
    dgb
}

fn backward_unnormalized(
    hp: &HeadProblem,
    chunk: usize,
    d_o: &[f64],
    d_ht: Option<&[f64]>,
) -> HeadGrads {
    let (l, kd, w, scale) = (hp.len, hp.key_dim, hp.value_dim, hp.scale);
    if d_ht.is_some() {
        assert!(
            hp.has_final_state(),
            "d_ht given for a problem without a final state"
        );
    }
    let (gc, gbc) = cumulative_gates(hp, chunk);
    let forward_states = chunk_states_forward(hp, &gc, chunk);
    let backward_states = gbc
        .as_ref()
        .map(|gbc| chunk_states_backward(hp, gbc, chunk));
    let d_forward = chunk_state_grads_forward(hp, &gc, chunk, d_o, d_ht);
    let d_backward = gbc
        .as_ref()
        .map(|gbc| chunk_state_grads_backward(hp, gbc, chunk, d_o));

    let mut grads = hp.zero_grads();
    // q/k gradients split by the gate that carries them (see the module doc): `_f` through the
    // forward gate (strict lower triangle, forward states, h0, ht), `_b` through the backward gate
    // (strict upper triangle, backward states), `_d` through no gate at all (the diagonal, and the
    // last token's own undecayed term of ht). The `_d` part enters q dq and k dk equally and
    // cancels from the closed-form gate gradients; leaving it out of them avoids cancelling O(1)
    // terms when the true gate gradient is exponentially small (strong gates).
    let mut dq_f = vec![0.0; l * kd];
    let mut dk_f = vec![0.0; l * kd];
    let mut dq_b = vec![0.0; l * kd];
    let mut dk_b = vec![0.0; l * kd];
    let mut dq_d = vec![0.0; l * kd];
    let mut dk_d = vec![0.0; l * kd];

    for (n, range) in chunk_ranges(l, chunk).into_iter().enumerate() {
        let last = range.end - 1;
        let a = intra_chunk_scores(hp, &gc, gbc.as_deref(), range.clone());
        // Inter-chunk terms.
        for i in range.clone() {
            let d_o_i = row(d_o, i, w);
            // o_i += scale (q_i * exp(gc_i)) hF_n
            let mut t = vec![0.0; kd];
            mat_times_col(&mut t, scale, &forward_states[n], d_o_i);
            for c in 0..kd {
                dq_f[i * kd + c] += t[c] * gc[i * kd + c].exp();
            }
            // k_i, v_i enter hF_{n+1} as (k_i * exp(gc_{e-1} - gc_i))^T v_i.
            let k_fwd = decayed(row(&hp.k, i, kd), |c| gc[last * kd + c] - gc[i * kd + c]);
            let mut t = vec![0.0; kd];
            mat_times_col(&mut t, 1.0, &d_forward[n + 1], row(&hp.v, i, w));
            // For the sequence's last token, d_forward[N] is d_ht and the decay is exp(0): that
            // term passes through no gate.
            let dk_part = if i + 1 == l { &mut dk_d } else { &mut dk_f };
            for c in 0..kd {
                dk_part[i * kd + c] += t[c] * (gc[last * kd + c] - gc[i * kd + c]).exp();
            }
            row_times_mat(row_mut(&mut grads.dv, i, w), 1.0, &k_fwd, &d_forward[n + 1]);

            if let (Some(gbc), Some(hb), Some(dhb)) = (&gbc, &backward_states, &d_backward) {
                // o_i += scale (q_i * exp(gbc_{e-1} - gbc_i)) hB_n
                let mut t = vec![0.0; kd];
                mat_times_col(&mut t, scale, &hb[n], d_o_i);
                for c in 0..kd {
                    dq_b[i * kd + c] += t[c] * (gbc[last * kd + c] - gbc[i * kd + c]).exp();
                }
                // k_i, v_i enter hB_{n-1} as (k_i * exp(gbc_i))^T v_i.
                if n > 0 {
                    let k_bwd = decayed(row(&hp.k, i, kd), |c| gbc[i * kd + c]);
                    let mut t = vec![0.0; kd];
                    mat_times_col(&mut t, 1.0, &dhb[n - 1], row(&hp.v, i, w));
                    for c in 0..kd {
                        dk_b[i * kd + c] += t[c] * gbc[i * kd + c].exp();
                    }
                    row_times_mat(row_mut(&mut grads.dv, i, w), 1.0, &k_bwd, &dhb[n - 1]);
                }
            }
        }
        // Intra-chunk block: dv = A^T do, dA_ij = do_i . v_j, then dq, dk through the mask.
        for i in range.clone() {
            let d_o_i = row(d_o, i, w);
            let q = row(&hp.q, i, kd);
            for j in range.clone() {
                if !intra_visible(hp.direction, i, j) {
                    continue;
                }
                let a_ij = a[(i - range.start) * range.len() + (j - range.start)];
                for (dv, d) in row_mut(&mut grads.dv, j, w).iter_mut().zip(d_o_i) {
                    *dv += a_ij * d;
                }
                let d_a = dot(d_o_i, row(&hp.v, j, w));
                let k = row(&hp.k, j, kd);
                let (dq_part, dk_part) = match j.cmp(&i) {
                    std::cmp::Ordering::Less => (&mut dq_f, &mut dk_f),
                    std::cmp::Ordering::Equal => (&mut dq_d, &mut dk_d),
                    std::cmp::Ordering::Greater => (&mut dq_b, &mut dk_b),
                };
                for c in 0..kd {
                    let m = intra_log_mask(&gc, gbc.as_deref(), kd, i, j, c).exp();
                    dq_part[i * kd + c] += scale * d_a * k[c] * m;
                    dk_part[j * kd + c] += scale * d_a * q[c] * m;
                }
            }
        }
    }

    // rowsum(ht * dht) without the last token's undecayed k^T v (see dk_d): the part of ht that
    // went through at least one decay, built directly rather than by subtraction.
    let final_rowsum: Option<Vec<f64>> = match (d_ht, l) {
        (Some(d_ht), 1..) => {
            let ranges = chunk_ranges(l, chunk);
            let last_chunk = ranges.last().expect("l > 0").clone();
            let gc_last = row(&gc, l - 1, kd);
            let mut decayed_ht = forward_states[ranges.len() - 1].clone();
            for c in 0..kd {
                let decay = gc_last[c].exp();
                row_mut(&mut decayed_ht, c, w)
                    .iter_mut()
                    .for_each(|x| *x *= decay);
            }
            for j in last_chunk.start..l - 1 {
                let k_fwd = decayed(row(&hp.k, j, kd), |c| gc_last[c] - gc[j * kd + c]);
                add_outer(&mut decayed_ht, 1.0, &k_fwd, row(&hp.v, j, w));
            }
            Some(
                (0..kd)
                    .map(|c| dot(row(&decayed_ht, c, w), row(d_ht, c, w)))
                    .collect(),
            )
        }
        _ => None,
    };
    grads.dg = gate_grad_closed_form(&hp.q, &dq_f, &hp.k, &dk_f, l, kd, final_rowsum.as_deref());
    grads.dgb = gate_bwd_grad_closed_form(&hp.q, &dq_b, &hp.k, &dk_b, l, kd);
    for i in 0..l * kd {
        grads.dq[i] = dq_f[i] + dq_b[i] + dq_d[i];
        grads.dk[i] = dk_f[i] + dk_b[i] + dk_d[i];
    }
    if let Some(dh0) = grads.dh0.as_mut() {
        dh0.copy_from_slice(&d_forward[0]);
    }
    grads
}
