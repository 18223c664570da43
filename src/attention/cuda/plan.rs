//! The device-resident attention plan: an [`AttentionPlan`] uploaded once (block lists in both
//! directions, full/partial flags packed into the entries, longest-first launch orders) and reused
//! for every layer, head and step; or the dense mode, whose lists the kernels compute on the fly
//! (nothing uploaded: the library's FlashAttention baseline).

use cudarc::driver::CudaSlice;

use super::kernels::BLOCK_SIZES;
use crate::attention::plan::{AttentionPlan, PlanLists};
use crate::cuda::exec::Executor;
use crate::error::{Error, Result};

/// Largest grid y extent: one CTA per query (or key) block.
const MAX_GRID_Y: usize = 65_535;
/// Bit of a packed entry that marks a full block (kernels/attention.cuh, ATT_FULL_BIT).
const FULL_BIT: u32 = 1 << 31;

/// What a plan covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanGeometry {
    pub t: usize,
    pub s: usize,
    pub block_q: usize,
    pub block_k: usize,
    pub causal: bool,
    /// `ceil(T / block_q)`.
    pub nq: usize,
    /// `ceil(S / block_k)`.
    pub nk: usize,
    /// Visited blocks.
    pub nnz: usize,
}

impl PlanGeometry {
    /// Fraction of the `nq x nk` blocks that are visited.
    pub fn density(&self) -> f64 {
        self.nnz as f64 / (self.nq * self.nk) as f64
    }
}

/// Uploaded block lists (u32 arrays).
pub(crate) struct PlanBuffers<B> {
    rows_ptr: B,
    rows_ent: B,
    cols_ptr: B,
    cols_ent: B,
    row_order: B,
    col_order: B,
}

/// Device addresses of a plan as the kernels see them (all 0 in dense mode).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PlanAddrs {
    pub rows_ptr: u64,
    pub rows_ent: u64,
    pub cols_ptr: u64,
    pub cols_ent: u64,
    pub row_order: u64,
    pub col_order: u64,
}

/// A plan on a device (`B` is the executor's buffer type; [`CudaAttentionPlan`] on a GPU).
pub struct DeviceAttentionPlan<B> {
    geometry: PlanGeometry,
    lists: Option<PlanBuffers<B>>,
}

/// A plan resident on a CUDA device.
pub type CudaAttentionPlan = DeviceAttentionPlan<CudaSlice<u8>>;

fn check_geometry(t: usize, s: usize, block_q: usize, block_k: usize) -> Result<(usize, usize)> {
    if t == 0 || s == 0 {
        return Err(Error::InvalidArgument(format!(
            "attention plan needs T >= 1 and S >= 1, got T = {t}, S = {s}"
        )));
    }
    for (name, bs) in [("block_q", block_q), ("block_k", block_k)] {
        if !BLOCK_SIZES.contains(&bs) {
            return Err(Error::Unsupported(format!(
                "{name} = {bs} on the cuda backend (compiled block sizes: {BLOCK_SIZES:?})"
            )));
        }
    }
    if i32::try_from(t).is_err() || i32::try_from(s).is_err() {
        return Err(Error::InvalidArgument(format!(
            "T = {t}, S = {s}: the kernels index tokens with 32-bit integers"
        )));
    }
    let (nq, nk) = (t.div_ceil(block_q), s.div_ceil(block_k));
    if nq > MAX_GRID_Y || nk > MAX_GRID_Y {
        return Err(Error::InvalidArgument(format!(
            "{nq} x {nk} blocks: at most {MAX_GRID_Y} query or key blocks per launch"
        )));
    }
    Ok((nq, nk))
}

/// Entries `block | full << 31` of CSR lists.
fn packed_entries(lists: &PlanLists) -> Vec<u32> {
    lists
        .idx
        .iter()
        .zip(&lists.full)
        .map(|(&i, &f)| i | if f != 0 { FULL_BIT } else { 0 })
        .collect()
}

/// Rows ordered longest first (ties by index): the CTAs with the most blocks start first, so the
/// short ones fill the tail of the launch.
fn longest_first(lists: &PlanLists) -> Vec<u32> {
    let mut order: Vec<u32> = (0..lists.rows() as u32).collect();
    order.sort_by_key(|&r| {
        let r = r as usize;
        std::cmp::Reverse(lists.ptr[r + 1] - lists.ptr[r])
    });
    order
}

fn bytes_of(v: &[u32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

impl<B> DeviceAttentionPlan<B> {
    /// Uploads `plan` (one copy per direction; keep the result and reuse it for every call with
    /// the same mask, sequence lengths and causal flag).
    pub fn upload<E: Executor<Buffer = B>>(exec: &E, plan: &AttentionPlan) -> Result<Self> {
        let (nq, nk) = check_geometry(plan.t, plan.s, plan.block_q, plan.block_k)?;
        debug_assert_eq!((nq, nk), (plan.nq, plan.nk));
        let lists = PlanBuffers {
            rows_ptr: exec.upload(bytes_of(&plan.rows.ptr))?,
            rows_ent: exec.upload(bytes_of(&packed_entries(&plan.rows)))?,
            cols_ptr: exec.upload(bytes_of(&plan.cols.ptr))?,
            cols_ent: exec.upload(bytes_of(&packed_entries(&plan.cols)))?,
            row_order: exec.upload(bytes_of(&longest_first(&plan.rows)))?,
            col_order: exec.upload(bytes_of(&longest_first(&plan.cols)))?,
        };
        Ok(DeviceAttentionPlan {
            geometry: PlanGeometry {
                t: plan.t,
                s: plan.s,
                block_q: plan.block_q,
                block_k: plan.block_k,
                causal: plan.causal,
                nq,
                nk,
                nnz: plan.rows.nnz(),
            },
            lists: Some(lists),
        })
    }

    /// Dense attention (every block, causal pruning if `causal`): the kernels compute the block
    /// lists, nothing is uploaded.
    pub fn dense(t: usize, s: usize, block_q: usize, block_k: usize, causal: bool) -> Result<Self> {
        let (nq, nk) = check_geometry(t, s, block_q, block_k)?;
        let nnz = if causal {
            (0..nq)
                .map(|qb| (((qb + 1) * block_q).min(t) - 1) / block_k + 1)
                .map(|n| n.min(nk))
                .sum()
        } else {
            nq * nk
        };
        Ok(DeviceAttentionPlan {
            geometry: PlanGeometry {
                t,
                s,
                block_q,
                block_k,
                causal,
                nq,
                nk,
                nnz,
            },
            lists: None,
        })
    }

    pub fn geometry(&self) -> &PlanGeometry {
        &self.geometry
    }

    /// Whether this is the dense mode (computed lists).
    pub fn is_dense(&self) -> bool {
        self.lists.is_none()
    }

    pub(crate) fn addresses<E: Executor<Buffer = B>>(&self, exec: &E) -> PlanAddrs {
        match &self.lists {
            None => PlanAddrs::default(),
            Some(l) => PlanAddrs {
                rows_ptr: exec.address(&l.rows_ptr),
                rows_ent: exec.address(&l.rows_ent),
                cols_ptr: exec.address(&l.cols_ptr),
                cols_ent: exec.address(&l.cols_ent),
                row_order: exec.address(&l.row_order),
                col_order: exec.address(&l.col_order),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_nnz_matches_the_host_plan() {
        for &(t, s, bq, bk) in &[
            (200, 256, 64, 128),
            (1000, 1000, 128, 64),
            (64, 300, 128, 128),
        ] {
            for causal in [false, true] {
                let host = AttentionPlan::new(None, t, s, bq, bk, causal).unwrap();
                let dense = DeviceAttentionPlan::<()>::dense(t, s, bq, bk, causal).unwrap();
                assert_eq!(
                    dense.geometry().nnz,
                    host.rows.nnz(),
                    "{t} {s} {bq} {bk} {causal}"
                );
            }
        }
    }

    #[test]
    fn rejects_uncompiled_block_sizes() {
        assert!(matches!(
            DeviceAttentionPlan::<()>::dense(100, 100, 32, 64, false),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn orders_rows_longest_first() {
        let lists = PlanLists {
            ptr: vec![0, 1, 4, 4, 6],
            idx: vec![0, 0, 1, 2, 1, 3],
            full: vec![1, 0, 1, 1, 0, 1],
        };
        // Row lengths 1, 3, 0, 2.
        assert_eq!(longest_first(&lists), vec![1u32, 3, 0, 2]);
        assert_eq!(
            packed_entries(&lists),
            vec![FULL_BIT, 0, 1 | FULL_BIT, 2 | FULL_BIT, 1, 3 | FULL_BIT]
        );
    }
}
