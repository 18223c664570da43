//! Masked softmax attention with `lse` (ops.md section 3), forward and backward, in f64.

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

pub fn forward(p: &AttnProblem) -> AttnOutput {
    let _ = p;
    todo!("attention forward")
}

pub fn backward(p: &AttnProblem, d_o: &[f64]) -> AttnGrads {
    let _ = (p, d_o);
    todo!("attention backward")
}
