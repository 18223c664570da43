//! Masked softmax attention with `lse` (ops.md section 3), forward and backward, in f64.
//!
//! For query token `i` of a `(batch, head)` pair, key token `j` (`0 <= j < S`) is *allowed* iff
//! - `causal` is off, or `j <= i` (top-left aligned, exactly torch SDPA's `is_causal`: with `T > S`
//!   the rows `i >= S` see every key, with `T < S` row `i` sees keys `0..=i` only), and
//! - there is no block mask, or block `(i / block_q, j / block_k)` is allowed. The mask must be on
//!   the grid `ceil(T / block_q) x ceil(S / block_k)`; the last block of an axis holds only the real
//!   tokens (`j < S` always), so a padded key never exists.
//!
//! Then, with `s_ij = scale * q_i . k_j` over the allowed `j`:
//! `lse_i = log sum_j exp(s_ij)`, `P_ij = exp(s_ij - lse_i)`, `o_i = sum_j P_ij v_j`.
//! The softmax subtracts the row max before exponentiating. A row with no allowed key gives
//! `o_i = 0`, `lse_i = -inf`, and contributes zero to every gradient (no NaN).

use crate::block_mask::BlockMask;

/// `q: [B, T, H, D]`, `k, v: [B, S, H, D]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub s: usize,
    pub h: usize,
    pub d: usize,
}

#[derive(Clone, Copy, Debug)]
pub struct AttnProblem<'a> {
    pub dims: AttnDims,
    pub q: &'a [f64],
    pub k: &'a [f64],
    pub v: &'a [f64],
    pub scale: f64,
    /// Key `j` allowed for query `i` only if `j <= i` (top-left aligned, as torch SDPA `is_causal`).
    pub causal: bool,
    /// Block mask over `ceil(T / block_q) x ceil(S / block_k)` blocks; `None` = dense.
    pub mask: Option<&'a BlockMask>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AttnOutput {
    /// `[B, T, H, D]`; 0 for a row with no allowed key.
    pub o: Vec<f64>,
    /// `[B, H, T]`; `-inf` for a row with no allowed key.
    pub lse: Vec<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AttnGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

impl AttnDims {
    pub fn q_len(&self) -> usize {
        self.b * self.t * self.h * self.d
    }
    pub fn kv_len(&self) -> usize {
        self.b * self.s * self.h * self.d
    }
    /// `b * h * t`, the length of `lse`.
    pub fn lse_len(&self) -> usize {
        self.b * self.h * self.t
    }
}

impl AttnProblem<'_> {
    fn check(&self) {
        let d = &self.dims;
        assert_eq!(self.q.len(), d.q_len(), "q must be [B, T, H, D]");
        assert_eq!(self.k.len(), d.kv_len(), "k must be [B, S, H, D]");
        assert_eq!(self.v.len(), d.kv_len(), "v must be [B, S, H, D]");
        if let Some(m) = self.mask {
            assert!(
                m.covers(d.t, d.s),
                "block mask is {}x{} blocks of {}x{}, expected the grid over T = {} x S = {} tokens",
                m.nq(),
                m.nk(),
                m.block_q(),
                m.block_k(),
                d.t,
                d.s
            );
        }
    }

    /// Whether key token `j` is allowed for query token `i` (causal rule and block mask).
    pub fn allowed(&self, i: usize, j: usize) -> bool {
        (!self.causal || j <= i) && self.mask.is_none_or(|m| m.allows_tokens(i, j))
    }

    fn q_at(&self, b: usize, i: usize, h: usize) -> &[f64] {
        let d = &self.dims;
        let off = ((b * d.t + i) * d.h + h) * d.d;
        &self.q[off..off + d.d]
    }

    fn kv_offset(&self, b: usize, j: usize, h: usize) -> usize {
        let d = &self.dims;
        ((b * d.s + j) * d.h + h) * d.d
    }

    /// The allowed keys of query `(b, i, h)` and their scores `scale * q_i . k_j`.
    fn scores(&self, b: usize, i: usize, h: usize) -> Vec<(usize, f64)> {
        let qi = self.q_at(b, i, h);
        (0..self.dims.s)
            .filter(|&j| self.allowed(i, j))
            .map(|j| {
                let off = self.kv_offset(b, j, h);
                let kj = &self.k[off..off + self.dims.d];
                (j, self.scale * dot(qi, kj))
            })
            .collect()
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Softmax probabilities of `scores` and their log-sum-exp, subtracting the max first.
/// `None` for an empty row.
fn softmax(scores: &[(usize, f64)]) -> Option<(Vec<f64>, f64)> {
    if scores.is_empty() {
        return None;
    }
    let m = scores
        .iter()
        .map(|&(_, s)| s)
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = scores.iter().map(|&(_, s)| (s - m).exp()).collect();
    // The max term contributes exp(0) = 1, so the sum is >= 1 and its log is finite.
    let l: f64 = e.iter().sum();
    Some((e.iter().map(|x| x / l).collect(), m + l.ln()))
}

/// Forward pass: `o [B, T, H, D]` and `lse [B, H, T]`.
pub fn forward(p: &AttnProblem) -> AttnOutput {
    p.check();
    let AttnDims { b, t, h, d, .. } = p.dims;
    let mut o = vec![0.0; p.dims.q_len()];
    let mut lse = vec![f64::NEG_INFINITY; p.dims.lse_len()];
    for bb in 0..b {
        for hh in 0..h {
            for i in 0..t {
                let scores = p.scores(bb, i, hh);
                let Some((probs, row_lse)) = softmax(&scores) else {
                    continue; // no allowed key: o stays 0, lse stays -inf
                };
                lse[(bb * h + hh) * t + i] = row_lse;
                let o_off = ((bb * t + i) * h + hh) * d;
                for (&(j, _), &pij) in scores.iter().zip(&probs) {
                    let v_off = p.kv_offset(bb, j, hh);
                    for dd in 0..d {
                        o[o_off + dd] += pij * p.v[v_off + dd];
                    }
                }
            }
        }
    }
    AttnOutput { o, lse }
}

/// Analytic backward pass of `loss = sum(o * d_o)`: with `P` recomputed from the scores,
/// `dP_ij = d_o_i . v_j`, `delta_i = rowsum(d_o_i * o_i) = sum_j P_ij dP_ij`,
/// `dS_ij = P_ij (dP_ij - delta_i)`; then `dq_i = scale sum_j dS_ij k_j`,
/// `dk_j = scale sum_i dS_ij q_i`, `dv_j = sum_i P_ij d_o_i`. Empty rows contribute nothing.
pub fn backward(p: &AttnProblem, d_o: &[f64]) -> AttnGrads {
    p.check();
    assert_eq!(d_o.len(), p.dims.q_len(), "d_o must be [B, T, H, D]");
    let AttnDims { b, t, h, d, .. } = p.dims;
    let out = forward(p);
    let mut dq = vec![0.0; p.dims.q_len()];
    let mut dk = vec![0.0; p.dims.kv_len()];
    let mut dv = vec![0.0; p.dims.kv_len()];
    for bb in 0..b {
        for hh in 0..h {
            for i in 0..t {
                let scores = p.scores(bb, i, hh);
                let Some((probs, _)) = softmax(&scores) else {
                    continue;
                };
                let o_off = ((bb * t + i) * h + hh) * d;
                let do_i = &d_o[o_off..o_off + d];
                let delta = dot(do_i, &out.o[o_off..o_off + d]);
                let qi = p.q_at(bb, i, hh);
                for (&(j, _), &pij) in scores.iter().zip(&probs) {
                    let kv_off = p.kv_offset(bb, j, hh);
                    let vj = &p.v[kv_off..kv_off + d];
                    let kj = &p.k[kv_off..kv_off + d];
                    let dpij = dot(do_i, vj);
                    let dsij = pij * (dpij - delta);
                    for dd in 0..d {
                        dq[o_off + dd] += p.scale * dsij * kj[dd];
                        dk[kv_off + dd] += p.scale * dsij * qi[dd];
                        dv[kv_off + dd] += pij * do_i[dd];
                    }
                }
            }
        }
    }
    AttnGrads { dq, dk, dv }
}
