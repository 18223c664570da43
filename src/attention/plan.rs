//! The attention plan: a [`BlockMask`] turned once, on the host, into the block lists the kernels
//! iterate (forward: per query block, the key blocks; backward dK/dV: per key block, the query
//! blocks), with the causal rule folded in and every block classified as full or partial. Built
//! once per (mask, T, S, causal) and reused for every layer, head and step; each backend uploads it
//! once ([`crate::attention::cube`], [`crate::attention::cuda`]).
//!
//! Indexing decisions:
//! - Lists are compact CSR (`ptr[r]..ptr[r+1]` into `idx`), ascending, so a kernel's loop is
//!   `for e in ptr[r]..ptr[r+1]`; a 115,200-token Radial mask (900 x 900 blocks of 128, ~30%
//!   dense) is ~240k entries per direction.
//! - A block that the causal rule empties entirely (its first key after its last query) is dropped
//!   from both lists, so no program ever visits it.
//! - A block is *full* when every token pair in it is allowed: no causal cut through it and no
//!   padded key tail (`S % block_k != 0` in the last key block). Kernels skip per-element masking
//!   on full blocks; partial blocks mask `j > i` (causal) and `j >= S` (a padded key never gets
//!   weight). Query tails (`i >= T`) are simply not written.

use super::BlockMask;
use crate::error::{Error, Result};

/// Block lists of one direction in CSR form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanLists {
    /// `[rows + 1]`, `ptr[0] = 0`.
    pub ptr: Vec<u32>,
    /// `[nnz]`: block indices along the other axis, ascending within a row.
    pub idx: Vec<u32>,
    /// `[nnz]`: 1 when the block needs no per-element mask.
    pub full: Vec<u8>,
}

impl PlanLists {
    pub fn rows(&self) -> usize {
        self.ptr.len() - 1
    }

    pub fn nnz(&self) -> usize {
        self.idx.len()
    }

    /// `(block, full)` entries of row `r`.
    pub fn row(&self, r: usize) -> impl Iterator<Item = (u32, bool)> + '_ {
        let (a, b) = (self.ptr[r] as usize, self.ptr[r + 1] as usize);
        self.idx[a..b]
            .iter()
            .zip(&self.full[a..b])
            .map(|(&i, &f)| (i, f != 0))
    }

    /// Longest row (the kernels' loop bound).
    pub fn max_row_len(&self) -> usize {
        self.ptr
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(0)
    }
}

/// Everything the block-sparse kernels need to know about the mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionPlan {
    pub t: usize,
    pub s: usize,
    pub block_q: usize,
    pub block_k: usize,
    pub causal: bool,
    /// `ceil(T / block_q)`.
    pub nq: usize,
    /// `ceil(S / block_k)`.
    pub nk: usize,
    /// Per query block, its key blocks (forward, dQ).
    pub rows: PlanLists,
    /// Per key block, its query blocks (dK, dV), the transpose of `rows`.
    pub cols: PlanLists,
}

impl AttentionPlan {
    /// Plans `mask` (or all blocks, when `None`, with `block_q x block_k` blocks) for `t` queries,
    /// `s` keys and the causal rule.
    pub fn new(
        mask: Option<&BlockMask>,
        t: usize,
        s: usize,
        block_q: usize,
        block_k: usize,
        causal: bool,
    ) -> Result<AttentionPlan> {
        if t == 0 || s == 0 {
            return Err(Error::InvalidArgument(format!(
                "attention plan needs T >= 1 and S >= 1, got T = {t}, S = {s}"
            )));
        }
        if block_q == 0 || block_k == 0 {
            return Err(Error::InvalidArgument("block size must be >= 1".into()));
        }
        let (nq, nk) = BlockMask::grid(t, s, block_q, block_k).map_err(Error::InvalidArgument)?;
        if let Some(m) = mask
            && (m.nq(), m.nk(), m.block_q(), m.block_k()) != (nq, nk, block_q, block_k)
        {
            return Err(Error::shape(
                "block_mask",
                format!("[{nq}, {nk}] blocks of {block_q} x {block_k} for T = {t}, S = {s}"),
                &[m.nq(), m.nk()],
            ));
        }
        if u32::try_from(nq * nk).is_err() {
            return Err(Error::InvalidArgument(format!(
                "{nq} x {nk} blocks exceed the plan's 32-bit indices"
            )));
        }
        // Token ranges of a block: [first, last] inclusive, clipped to the real tokens.
        let q_first = |qb: usize| qb * block_q;
        let q_last = |qb: usize| ((qb + 1) * block_q).min(t) - 1;
        let k_first = |kb: usize| kb * block_k;
        let k_last = |kb: usize| ((kb + 1) * block_k).min(s) - 1;
        let padded_key_tail = |kb: usize| (kb + 1) * block_k > s;
        // 0: skipped, 1: partial, 2: full.
        let class = |qb: usize, kb: usize| -> u8 {
            if !mask.is_none_or(|m| m.allowed(qb, kb)) {
                return 0;
            }
            if causal && k_first(kb) > q_last(qb) {
                return 0;
            }
            let cut = causal && k_last(kb) > q_first(qb);
            if cut || padded_key_tail(kb) { 1 } else { 2 }
        };
        let mut grid = vec![0u8; nq * nk];
        for qb in 0..nq {
            for kb in 0..nk {
                grid[qb * nk + kb] = class(qb, kb);
            }
        }
        let lists = |rows: usize, width: usize, at: &dyn Fn(usize, usize) -> u8| {
            let mut ptr = Vec::with_capacity(rows + 1);
            let mut idx = Vec::new();
            let mut full = Vec::new();
            ptr.push(0u32);
            for r in 0..rows {
                for c in 0..width {
                    let cls = at(r, c);
                    if cls != 0 {
                        idx.push(c as u32);
                        full.push(u8::from(cls == 2));
                    }
                }
                ptr.push(idx.len() as u32);
            }
            PlanLists { ptr, idx, full }
        };
        let rows = lists(nq, nk, &|qb, kb| grid[qb * nk + kb]);
        let cols = lists(nk, nq, &|kb, qb| grid[qb * nk + kb]);
        Ok(AttentionPlan {
            t,
            s,
            block_q,
            block_k,
            causal,
            nq,
            nk,
            rows,
            cols,
        })
    }

    /// Fraction of the `nq x nk` blocks that are visited.
    pub fn density(&self) -> f64 {
        self.rows.nnz() as f64 / (self.nq * self.nk) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force: token pair allowed by the mask and the causal rule.
    fn allowed(
        mask: Option<&BlockMask>,
        bq: usize,
        bk: usize,
        causal: bool,
        i: usize,
        j: usize,
    ) -> bool {
        mask.is_none_or(|m| m.allowed(i / bq, j / bk)) && (!causal || j <= i)
    }

    fn check(mask: Option<&BlockMask>, t: usize, s: usize, bq: usize, bk: usize, causal: bool) {
        let plan = AttentionPlan::new(mask, t, s, bq, bk, causal).unwrap();
        for qb in 0..plan.nq {
            let listed: Vec<(u32, bool)> = plan.rows.row(qb).collect();
            for kb in 0..plan.nk {
                let pairs: Vec<bool> = (qb * bq..((qb + 1) * bq).min(t))
                    .flat_map(|i| (kb * bk..(kb + 1) * bk).map(move |j| (i, j)))
                    .map(|(i, j)| j < s && allowed(mask, bq, bk, causal, i, j))
                    .collect();
                let any = pairs.iter().any(|&a| a);
                let all = pairs.iter().all(|&a| a);
                let entry = listed.iter().find(|(b, _)| *b as usize == kb);
                assert_eq!(
                    entry.is_some(),
                    any,
                    "block ({qb}, {kb}) listed iff any pair allowed"
                );
                if let Some(&(_, full)) = entry {
                    assert_eq!(full, all, "block ({qb}, {kb}) full iff every pair allowed");
                }
                let col_entry = plan.cols.row(kb).find(|(b, _)| *b as usize == qb);
                assert_eq!(
                    entry.copied().map(|e| e.1),
                    col_entry.map(|e| e.1),
                    "transpose"
                );
            }
            assert!(listed.windows(2).all(|w| w[0].0 < w[1].0), "ascending");
        }
        assert_eq!(plan.rows.nnz(), plan.cols.nnz());
    }

    #[test]
    fn plan_matches_brute_force() {
        let mut rng = linattn_reference::testing::Rng::new(5);
        for &(t, s, bq, bk) in &[
            (200, 256, 64, 64),
            (100, 70, 32, 16),
            (64, 64, 64, 64),
            (1, 5, 4, 4),
        ] {
            for causal in [false, true] {
                check(None, t, s, bq, bk, causal);
                let (nq, nk) = BlockMask::grid(t, s, bq, bk).unwrap();
                let dense: Vec<u8> = (0..nq * nk)
                    .map(|_| u8::from(rng.uniform() < 0.5))
                    .collect();
                let mask = BlockMask::from_dense(nq, nk, bq, bk, &dense).unwrap();
                check(Some(&mask), t, s, bq, bk, causal);
            }
        }
    }

    #[test]
    fn rejects_a_mask_of_another_grid() {
        let mask = BlockMask::full(2, 2, 64, 64).unwrap();
        assert!(matches!(
            AttentionPlan::new(Some(&mask), 200, 200, 64, 64, false),
            Err(Error::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn plans_a_hunyuan_radial_mask_quickly() {
        // 30 frames x 3840 tokens = 115,200 tokens, 900 x 900 blocks of 128.
        let cfg = crate::attention::RadialConfig {
            frames: 30,
            tokens_per_frame: 3840,
            block_size: 128,
            decay_factor: 0.95,
            model: crate::attention::RadialModel::Hunyuan,
            text_tokens: 0,
        };
        let mask = crate::attention::radial_mask(&cfg).unwrap();
        let started = std::time::Instant::now();
        let plan = AttentionPlan::new(Some(&mask), 115_200, 115_200, 128, 128, false).unwrap();
        let elapsed = started.elapsed();
        assert_eq!((plan.nq, plan.nk), (900, 900));
        assert!(
            plan.density() > 0.05 && plan.density() < 0.6,
            "{}",
            plan.density()
        );
        // Generous for unoptimised test builds; a release build plans this in milliseconds.
        assert!(elapsed.as_secs_f64() < 5.0, "planning took {elapsed:?}");
    }
}
