//! Block masks for block-sparse attention: dense u8 `[NQ, NK]`, CSR, and per-block sorted lists with
//! their transpose (FlexAttention's counts + padded indices).
//!
//! A mask over a `T x S` token grid has `NQ = ceil(T / block_q)` query blocks and
//! `NK = ceil(S / block_k)` key blocks ([`BlockMask::grid`]). The last block of each axis may be
//! partial: it then holds only the real tokens, a padded key never exists.

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
///
/// The lists built by [`BlockMask::row_lists`] and [`BlockMask::col_lists`] use `width` = the length
/// of the other axis and pad each row with the blocks that are *not* allowed, also ascending (what
/// FlexAttention's stable `argsort` of the dense mask gives): every row is then a permutation of
/// `0..width`, so even a read past `counts[r]` stays in range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLists {
    pub rows: usize,
    pub width: usize,
    pub counts: Vec<u32>,
    pub indices: Vec<u32>,
}

impl BlockLists {
    /// The valid (allowed, ascending) entries of row `r`; empty for a row outside the lists (or a
    /// count past the stored indices).
    pub fn row(&self, r: usize) -> &[u32] {
        let Some(&count) = self.counts.get(r) else {
            return &[];
        };
        let start = r.saturating_mul(self.width);
        self.indices
            .get(start..start.saturating_add(count as usize))
            .unwrap_or(&[])
    }

    /// Total number of valid entries.
    pub fn nnz(&self) -> usize {
        self.counts.iter().map(|&c| c as usize).sum()
    }
}

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

impl BlockMask {
    /// `(NQ, NK) = (ceil(t / block_q), ceil(s / block_k))`: the block grid over `t` query and `s` key
    /// tokens, the last block of each axis possibly partial.
    /// Errors for a zero block size.
    pub fn grid(
        t: usize,
        s: usize,
        block_q: usize,
        block_k: usize,
    ) -> Result<(usize, usize), String> {
        if block_q == 0 || block_k == 0 {
            return Err(format!(
                "block sizes must be positive, got {block_q} x {block_k}"
            ));
        }
        Ok((ceil_div(t, block_q), ceil_div(s, block_k)))
    }

    /// `nq * nk`, refused when it overflows (the dense matrix could not exist).
    fn cells(nq: usize, nk: usize) -> Result<usize, String> {
        nq.checked_mul(nk)
            .ok_or_else(|| format!("a {nq} x {nk} block grid has more cells than memory can hold"))
    }

    /// Builds a mask from a row-major dense `[nq, nk]` matrix; any nonzero entry means allowed
    /// (stored as 1). Errors for a zero block size or a matrix that is not `nq * nk` long.
    pub fn from_dense(
        nq: usize,
        nk: usize,
        block_q: usize,
        block_k: usize,
        dense: &[u8],
    ) -> Result<Self, String> {
        Self::grid(0, 0, block_q, block_k)?;
        let cells = Self::cells(nq, nk)?;
        if dense.len() != cells {
            return Err(format!(
                "a dense {nq} x {nk} block mask needs {cells} entries, got {}",
                dense.len()
            ));
        }
        Ok(BlockMask {
            nq,
            nk,
            block_q,
            block_k,
            dense: dense.iter().map(|&x| u8::from(x != 0)).collect(),
        })
    }

    /// Every block allowed.
    pub fn full(nq: usize, nk: usize, block_q: usize, block_k: usize) -> Result<Self, String> {
        Self::from_dense(nq, nk, block_q, block_k, &vec![1; Self::cells(nq, nk)?])
    }

    /// No block allowed.
    pub fn empty(nq: usize, nk: usize, block_q: usize, block_k: usize) -> Result<Self, String> {
        Self::from_dense(nq, nk, block_q, block_k, &vec![0; Self::cells(nq, nk)?])
    }

    /// Every block allowed, on the grid over `t x s` tokens ([`BlockMask::grid`]).
    pub fn full_for_tokens(
        t: usize,
        s: usize,
        block_q: usize,
        block_k: usize,
    ) -> Result<Self, String> {
        let (nq, nk) = Self::grid(t, s, block_q, block_k)?;
        Self::full(nq, nk, block_q, block_k)
    }

    /// The mask on the grid over `t x s` tokens whose block `(qb, kb)` is allowed iff
    /// `allowed(qb, kb)`.
    pub fn from_fn_for_tokens(
        t: usize,
        s: usize,
        block_q: usize,
        block_k: usize,
        mut allowed: impl FnMut(usize, usize) -> bool,
    ) -> Result<Self, String> {
        let (nq, nk) = Self::grid(t, s, block_q, block_k)?;
        let mut dense = vec![0u8; Self::cells(nq, nk)?];
        for qb in 0..nq {
            for kb in 0..nk {
                dense[qb * nk + kb] = u8::from(allowed(qb, kb));
            }
        }
        Self::from_dense(nq, nk, block_q, block_k, &dense)
    }

    /// Builds a mask from CSR (FlashInfer's block-sparse form): `indptr` has `NQ + 1` entries starting
    /// at 0 and non-decreasing, row `r`'s allowed key blocks are `indices[indptr[r]..indptr[r+1]]`,
    /// strictly ascending (no duplicates) and `< nk`; `indptr[NQ] == indices.len()`.
    pub fn from_csr(
        nk: usize,
        block_q: usize,
        block_k: usize,
        indptr: &[u32],
        indices: &[u32],
    ) -> Result<Self, String> {
        if block_q == 0 || block_k == 0 {
            return Err("block sizes must be positive".into());
        }
        if indptr.is_empty() {
            return Err("indptr must have NQ + 1 >= 1 entries".into());
        }
        if indptr[0] != 0 {
            return Err(format!("indptr[0] must be 0, got {}", indptr[0]));
        }
        let nq = indptr.len() - 1;
        let cells = Self::cells(nq, nk)?;
        for r in 0..nq {
            if indptr[r + 1] < indptr[r] {
                return Err(format!(
                    "indptr must be non-decreasing: indptr[{}] = {} > indptr[{}] = {}",
                    r,
                    indptr[r],
                    r + 1,
                    indptr[r + 1]
                ));
            }
        }
        if indptr[nq] as usize != indices.len() {
            return Err(format!(
                "indptr[NQ] = {} must equal indices.len() = {}",
                indptr[nq],
                indices.len()
            ));
        }
        let mut dense = vec![0u8; cells];
        for r in 0..nq {
            let row = &indices[indptr[r] as usize..indptr[r + 1] as usize];
            for (pos, &kb) in row.iter().enumerate() {
                if kb as usize >= nk {
                    return Err(format!(
                        "row {r}: block index {kb} out of range (NK = {nk})"
                    ));
                }
                if pos > 0 && row[pos - 1] >= kb {
                    return Err(format!(
                        "row {r}: indices must be strictly ascending, got {} then {kb}",
                        row[pos - 1]
                    ));
                }
                dense[r * nk + kb as usize] = 1;
            }
        }
        Ok(BlockMask {
            nq,
            nk,
            block_q,
            block_k,
            dense,
        })
    }

    /// Builds a mask from per-query-block lists (the inverse of [`BlockMask::row_lists`]); only the
    /// first `counts[r]` entries of each row are read, they must be strictly ascending and `< nk`.
    pub fn from_row_lists(
        nk: usize,
        block_q: usize,
        block_k: usize,
        lists: &BlockLists,
    ) -> Result<Self, String> {
        if lists.counts.len() != lists.rows {
            return Err(format!(
                "counts has {} entries for {} rows",
                lists.counts.len(),
                lists.rows
            ));
        }
        if Some(lists.indices.len()) != lists.rows.checked_mul(lists.width) {
            return Err(format!(
                "indices has {} entries, expected rows * width = {} * {}",
                lists.indices.len(),
                lists.rows,
                lists.width
            ));
        }
        let mut indptr = Vec::with_capacity(lists.rows + 1);
        let mut indices = Vec::new();
        indptr.push(0u32);
        for r in 0..lists.rows {
            let c = lists.counts[r] as usize;
            if c > lists.width {
                return Err(format!("row {r}: count {c} exceeds width {}", lists.width));
            }
            indices.extend_from_slice(lists.row(r));
            indptr.push(indices.len() as u32);
        }
        Self::from_csr(nk, block_q, block_k, &indptr, &indices)
    }

    pub fn nq(&self) -> usize {
        self.nq
    }
    pub fn nk(&self) -> usize {
        self.nk
    }
    pub fn block_q(&self) -> usize {
        self.block_q
    }
    pub fn block_k(&self) -> usize {
        self.block_k
    }

    /// Whether key block `kb` is allowed for query block `qb`; a block outside the grid holds no
    /// token and is never allowed.
    pub fn allowed(&self, qb: usize, kb: usize) -> bool {
        qb < self.nq && kb < self.nk && self.dense[qb * self.nk + kb] != 0
    }

    /// Whether key token `j` may be seen by query token `i` as far as the block mask is concerned
    /// (block `(i / block_q, j / block_k)` allowed).
    pub fn allows_tokens(&self, i: usize, j: usize) -> bool {
        self.allowed(i / self.block_q, j / self.block_k)
    }

    /// Whether this mask has exactly the block grid of `t` query and `s` key tokens.
    pub fn covers(&self, t: usize, s: usize) -> bool {
        Self::grid(t, s, self.block_q, self.block_k) == Ok((self.nq, self.nk))
    }

    /// Number of allowed blocks.
    pub fn nnz(&self) -> usize {
        self.dense.iter().map(|&x| x as usize).sum()
    }

    /// Fraction of allowed blocks (0 for an empty grid).
    pub fn density(&self) -> f64 {
        let total = self.nq * self.nk;
        if total == 0 {
            0.0
        } else {
            self.nnz() as f64 / total as f64
        }
    }

    /// The dense row-major `[NQ, NK]` matrix, 1 = allowed.
    pub fn dense(&self) -> &[u8] {
        &self.dense
    }

    /// A copy of the dense row-major `[NQ, NK]` matrix, 1 = allowed.
    pub fn to_dense(&self) -> Vec<u8> {
        self.dense.clone()
    }

    /// CSR `(indptr [NQ + 1], indices [nnz])`, indices ascending within a row (FlashInfer's form).
    pub fn to_csr(&self) -> (Vec<u32>, Vec<u32>) {
        let mut indptr = Vec::with_capacity(self.nq + 1);
        let mut indices = Vec::with_capacity(self.nnz());
        indptr.push(0u32);
        for qb in 0..self.nq {
            for kb in 0..self.nk {
                if self.dense[qb * self.nk + kb] != 0 {
                    indices.push(kb as u32);
                }
            }
            indptr.push(indices.len() as u32);
        }
        (indptr, indices)
    }

    /// The transposed mask (`NK x NQ`, block sizes swapped).
    pub fn transpose(&self) -> BlockMask {
        let mut dense = vec![0u8; self.nq * self.nk];
        for qb in 0..self.nq {
            for kb in 0..self.nk {
                dense[kb * self.nq + qb] = self.dense[qb * self.nk + kb];
            }
        }
        BlockMask {
            nq: self.nk,
            nk: self.nq,
            block_q: self.block_k,
            block_k: self.block_q,
            dense,
        }
    }

    /// Lists of a row-major `[rows, width]` 0/1 matrix: allowed entries first, then the others,
    /// both ascending.
    fn lists_of(rows: usize, width: usize, dense: &[u8]) -> BlockLists {
        let mut counts = Vec::with_capacity(rows);
        let mut indices = Vec::with_capacity(rows * width);
        for r in 0..rows {
            let row = &dense[r * width..(r + 1) * width];
            let before = indices.len();
            indices.extend((0..width).filter(|&c| row[c] != 0).map(|c| c as u32));
            counts.push((indices.len() - before) as u32);
            indices.extend((0..width).filter(|&c| row[c] == 0).map(|c| c as u32));
        }
        BlockLists {
            rows,
            width,
            counts,
            indices,
        }
    }

    /// Per query block, the ascending allowed key blocks (forward pass; `rows = NQ`, `width = NK`).
    pub fn row_lists(&self) -> BlockLists {
        Self::lists_of(self.nq, self.nk, &self.dense)
    }

    /// Per key block, the ascending query blocks that may see it (backward pass for dK, dV;
    /// `rows = NK`, `width = NQ`).
    pub fn col_lists(&self) -> BlockLists {
        let t = self.transpose();
        Self::lists_of(t.nq, t.nk, &t.dense)
    }
}
