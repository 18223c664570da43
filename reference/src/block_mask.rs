//! Block masks for block-sparse attention: dense u8 `[NQ, NK]`, CSR, and per-block sorted lists with
//! their transpose (FlexAttention's counts + padded indices).

/// A block mask over `NQ x NK` blocks of `block_q x block_k` tokens. Shared across batch and heads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMask {
    nq: usize,
    nk: usize,
    block_q: usize,
    block_k: usize,
    /// Row-major `[NQ, NK]`, 1 = allowed.
    dense: Vec<u8>,
}

/// Sorted block lists: for each of `rows` rows, `counts[r]` valid entries at
/// `indices[r * width .. r * width + counts[r]]`, ascending; the rest is padding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLists {
    pub rows: usize,
    pub width: usize,
    pub counts: Vec<u32>,
    pub indices: Vec<u32>,
}
