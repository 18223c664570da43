//! Launch sequences of the attention kernels over device addresses, on any [`Executor`].

use super::kernels::{self, DELTA_ROWS, DELTA_THREADS, HEAD_DIMS};
use super::params::AttnParams;
use super::plan::{DeviceAttentionPlan, PlanAddrs};
use crate::attention::AttnDims;
use crate::cuda::exec::Executor;
use crate::error::{Error, Result};
use crate::tensor::DType;

pub(crate) const BACKEND: &str = "cuda";

/// A problem's shape and options, checked against what the kernels support.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Problem {
    pub dims: AttnDims,
    pub dtype: DType,
    pub scale: f64,
    pub causal: bool,
}

/// Checks dtype and head dim.
pub fn check_support(dtype: DType, head_dim: usize) -> Result<()> {
    if kernels::dtype_code(dtype).is_none() {
        return Err(Error::UnsupportedDtype {
            tensor: "q".into(),
            dtype,
            backend: BACKEND.into(),
            supported: "bf16, f16".into(),
        });
    }
    if !HEAD_DIMS.contains(&head_dim) {
        return Err(Error::UnsupportedHeadDim {
            tensor: "q".into(),
            dim: head_dim,
            backend: BACKEND.into(),
            supported: "64, 128".into(),
        });
    }
    Ok(())
}

impl Problem {
    /// Checks support, the plan against the problem, and the launch-size limits.
    fn check<B>(&self, plan: &DeviceAttentionPlan<B>) -> Result<()> {
        let d = self.dims;
        check_support(self.dtype, d.d)?;
        let g = plan.geometry();
        if (g.t, g.s, g.causal) != (d.t, d.s, self.causal) {
            return Err(Error::InvalidArgument(format!(
                "the attention plan covers T = {}, S = {}, causal = {}; the problem has T = {}, S = {}, causal = {}",
                g.t, g.s, g.causal, d.t, d.s, self.causal
            )));
        }
        if d.b * d.h > i32::MAX as usize || d.h > i32::MAX as usize || d.b > i32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "B * H = {} exceeds the grid's {} CTAs per block row",
                d.b * d.h,
                i32::MAX
            )));
        }
        if (d.b * d.t * d.h).div_ceil(DELTA_ROWS) > i32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "B * T * H = {} rows exceed one launch",
                d.b * d.t * d.h
            )));
        }
        Ok(())
    }

    fn params(&self, nq: usize, nk: usize, plan: PlanAddrs) -> AttnParams {
        let d = self.dims;
        AttnParams {
            rows_ptr: plan.rows_ptr,
            rows_ent: plan.rows_ent,
            cols_ptr: plan.cols_ptr,
            cols_ent: plan.cols_ent,
            row_order: plan.row_order,
            col_order: plan.col_order,
            b: d.b as i32,
            t: d.t as i32,
            s: d.s as i32,
            h: d.h as i32,
            nq: nq as i32,
            nk: nk as i32,
            causal: self.causal as i32,
            scale: self.scale as f32,
            scale_log2: (self.scale * std::f64::consts::LOG2_E) as f32,
            ..AttnParams::default()
        }
    }
}

/// Forward addresses: inputs q, k, v (the problem's dtype), outputs o (f32 or that dtype) and
/// lse (f32).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ForwardAddrs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub o_f32: bool,
    pub lse: u64,
}

/// Backward addresses: the forward's inputs and outputs, `d_o` (the problem's dtype), a delta
/// workspace of `B * H * T` f32, and the gradients (all f32 or all the problem's dtype).
#[derive(Clone, Copy, Debug)]
pub(crate) struct BackwardAddrs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub o_f32: bool,
    pub lse: u64,
    pub d_o: u64,
    pub delta: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub grad_f32: bool,
}

/// o and lse.
pub(crate) fn forward<E: Executor>(
    exec: &E,
    plan: &DeviceAttentionPlan<E::Buffer>,
    prob: &Problem,
    a: &ForwardAddrs,
) -> Result<()> {
    prob.check(plan)?;
    let g = *plan.geometry();
    let variant = kernels::variant(prob.dtype, prob.dims.d, g.block_q, g.block_k);
    let p = AttnParams {
        q: a.q,
        k: a.k,
        v: a.v,
        o: a.o,
        o_f32: a.o_f32 as i32,
        lse: a.lse,
        ..prob.params(g.nq, g.nk, plan.addresses(exec))
    };
    let bh = (prob.dims.b * prob.dims.h) as u32;
    exec.launch(
        kernels::kernel(&variant, "attn_fwd"),
        [bh, g.nq as u32, 1],
        kernels::QUERY_THREADS,
        p.as_bytes(),
    )
}

/// dq, dk, dv from the forward's o and lse: delta, then dQ over the rows, dK/dV over the columns.
pub(crate) fn backward<E: Executor>(
    exec: &E,
    plan: &DeviceAttentionPlan<E::Buffer>,
    prob: &Problem,
    a: &BackwardAddrs,
) -> Result<()> {
    prob.check(plan)?;
    let g = *plan.geometry();
    let d = prob.dims;
    let variant = kernels::variant(prob.dtype, d.d, g.block_q, g.block_k);
    let p = AttnParams {
        q: a.q,
        k: a.k,
        v: a.v,
        o: a.o,
        o_f32: a.o_f32 as i32,
        lse: a.lse,
        d_o: a.d_o,
        delta: a.delta,
        dq: a.dq,
        dk: a.dk,
        dv: a.dv,
        grad_f32: a.grad_f32 as i32,
        ..prob.params(g.nq, g.nk, plan.addresses(exec))
    };
    let rows = d.b * d.t * d.h;
    exec.launch(
        kernels::kernel(&variant, "attn_bwd_delta"),
        [rows.div_ceil(DELTA_ROWS) as u32, 1, 1],
        DELTA_THREADS,
        p.as_bytes(),
    )?;
    let bh = (d.b * d.h) as u32;
    exec.launch(
        kernels::kernel(&variant, "attn_bwd_dq"),
        [bh, g.nq as u32, 1],
        kernels::QUERY_THREADS,
        p.as_bytes(),
    )?;
    exec.launch(
        kernels::kernel(&variant, "attn_bwd_dkdv"),
        [bh, g.nk as u32, 1],
        kernels::key_threads(g.block_k),
        p.as_bytes(),
    )
}
