//! Block-sparse softmax attention (ops.md section 3) and the Radial masks. Dense mode (no mask) is
//! the library's FlashAttention baseline.
//!
//! Inner shape, as in every op module: this file (spec and validation), `reference` (the CPU path),
//! `cube` (CubeCL kernels), `cuda` (the NVRTC launcher).

pub mod plan;
mod reference;

#[cfg(feature = "cube")]
pub mod cube;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use linattn_reference::attention::AttnDims;
pub use linattn_reference::block_mask::{BlockLists, BlockMask};
pub use linattn_reference::radial::{RadialConfig, RadialModel};
pub use plan::{AttentionPlan, PlanLists};

use crate::backend::{Backend, ValueCheck};
use crate::error::{Error, Result};
use crate::tensor::{DType, Shaped, Tensor, narrowed_all};
use crate::validation::*;

/// One attention problem over host tensors (or any [`Shaped`] stand-in, for
/// [`Attention::validate_layout`]).
#[derive(Debug)]
pub struct Attention<'a, T = Tensor> {
    /// `[B, T, H, D]`.
    pub q: &'a T,
    /// `[B, S, H, D]`.
    pub k: &'a T,
    /// `[B, S, H, D]`.
    pub v: &'a T,
    /// Defaults to `D^-0.5`.
    pub scale: Option<f64>,
    /// Key `j` allowed for query `i` only if `j <= i` (top-left aligned, as torch SDPA's
    /// `is_causal`; FlashAttention >= 2.1 aligns bottom-right, which is the same when `T == S`).
    pub causal: bool,
    /// Allowed blocks over the `ceil(T / block_q) x ceil(S / block_k)` grid; `None` = dense.
    pub mask: Option<&'a BlockMask>,
    /// Over device tensors: whether `q`, `k`, `v` (and `do` in the backward pass) are checked
    /// for NaN and infinities on the device first ([`ValueCheck::On`], the default). Host
    /// tensors are always checked on the host.
    pub value_check: ValueCheck,
}

impl<T> Clone for Attention<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Attention<'_, T> {}

impl<'a, T: Shaped> Attention<'a, T> {
    /// Dense attention: the FlashAttention baseline.
    pub fn dense(q: &'a T, k: &'a T, v: &'a T) -> Self {
        Attention {
            q,
            k,
            v,
            scale: None,
            causal: false,
            mask: None,
            value_check: ValueCheck::On,
        }
    }

    pub fn with_mask(mut self, mask: &'a BlockMask) -> Self {
        self.mask = Some(mask);
        self
    }

    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Over device tensors: [`ValueCheck::On`] (the default) checks the values on the device
    /// first (one pass per input and a small read-back, which waits for the device once);
    /// [`ValueCheck::Off`] skips it and keeps the call asynchronous.
    pub fn with_value_check(mut self, check: ValueCheck) -> Self {
        self.value_check = check;
        self
    }

    /// Checks shapes, dtypes and the mask grid, not the values.
    pub fn validate_layout(&self) -> Result<AttnSpec> {
        let qs = expect_rank("q", self.q, &["B", "T", "H", "D"])?;
        expect_nonzero("q", self.q)?;
        let (b, t, h, d) = (qs[0], qs[1], qs[2], qs[3]);
        let ks = expect_rank("k", self.k, &["B", "S", "H", "D"])?;
        expect_nonzero("k", self.k)?;
        let s = ks[1];
        expect_shape("k", self.k, &["B", "S", "H", "D"], &[b, s, h, d])?;
        expect_shape("v", self.v, &["B", "S", "H", "D"], &[b, s, h, d])?;
        let dtype = expect_same_dtype(&[("q", self.q), ("k", self.k), ("v", self.v)])?;
        if let Some(mask) = self.mask
            && !mask.covers(t, s)
        {
            let (nq, nk) = BlockMask::grid(t, s, mask.block_q(), mask.block_k())
                .map_err(Error::InvalidArgument)?;
            return Err(Error::shape(
                "block_mask",
                format!(
                    "[ceil(T / {}), ceil(S / {})] = [{nq}, {nk}] blocks",
                    mask.block_q(),
                    mask.block_k()
                ),
                &[mask.nq(), mask.nk()],
            ));
        }
        let scale = expect_scale(self.scale.unwrap_or((d as f64).powf(-0.5)))?;
        Ok(AttnSpec {
            dims: AttnDims { b, t, s, h, d },
            dtype,
            scale,
            causal: self.causal,
        })
    }
}

impl Attention<'_> {
    /// Checks shapes, values and the mask grid.
    pub fn validate(&self) -> Result<AttnSpec> {
        let spec = self.validate_layout()?;
        for (name, tensor) in [("q", self.q), ("k", self.k), ("v", self.v)] {
            expect_finite(name, tensor)?;
        }
        Ok(spec)
    }
}

/// A validated problem.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnSpec {
    pub dims: AttnDims,
    pub dtype: DType,
    pub scale: f64,
    pub causal: bool,
}

impl AttnSpec {
    pub fn o_shape(&self) -> Vec<usize> {
        let d = self.dims;
        vec![d.b, d.t, d.h, d.d]
    }

    pub fn lse_shape(&self) -> Vec<usize> {
        let d = self.dims;
        vec![d.b, d.h, d.t]
    }
}

/// Forward result. The CPU backend returns f64 tensors, the GPU backends f32.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnOutput {
    /// `[B, T, H, D]`; 0 for a row with no allowed key.
    pub o: Tensor,
    /// `[B, H, T]`; `-inf` for a row with no allowed key.
    pub lse: Tensor,
}

/// Gradients of `loss = sum(o * do)`.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

pub fn forward(backend: &Backend, args: &Attention) -> Result<AttnOutput> {
    let spec = args.validate()?;
    // f64 inputs are narrowed to f32 on the host for the device backends.
    if let Some(n) = narrowed_all(backend, &[Some(args.q), Some(args.k), Some(args.v)]) {
        return forward(backend, &with_narrowed(args, &n));
    }
    match backend {
        Backend::Cpu => Ok(reference::forward(&spec, args)),
        #[cfg(feature = "cube")]
        Backend::Cube(ctx) => cube::forward(ctx, &spec, args),
        #[cfg(feature = "cuda")]
        Backend::Cuda(ctx) => cuda::forward(ctx, &spec, args),
    }
}

/// Backward pass (recomputes the forward statistics it needs).
pub fn backward(backend: &Backend, args: &Attention, d_o: &Tensor) -> Result<AttnGrads> {
    let spec = args.validate()?;
    expect_shape("do", d_o, &["B", "T", "H", "D"], &spec.o_shape())?;
    expect_finite("do", d_o)?;
    // f64 inputs are narrowed to f32 on the host for the device backends.
    if let Some(n) = narrowed_all(
        backend,
        &[Some(args.q), Some(args.k), Some(args.v), Some(d_o)],
    ) {
        return backward(
            backend,
            &with_narrowed(args, &n),
            n[3].as_ref().unwrap_or(d_o),
        );
    }
    match backend {
        Backend::Cpu => Ok(reference::backward(&spec, args, d_o)),
        #[cfg(feature = "cube")]
        Backend::Cube(ctx) => cube::backward(ctx, &spec, args, d_o),
        #[cfg(feature = "cuda")]
        Backend::Cuda(ctx) => cuda::backward(ctx, &spec, args, d_o),
    }
}

/// `args` with the narrowed copies (`n[0..3]` for q, k, v) in place of their f64 originals.
fn with_narrowed<'s>(args: &Attention<'s>, n: &'s [Option<Tensor>]) -> Attention<'s> {
    let pick = |i: usize, t: &'s Tensor| n[i].as_ref().unwrap_or(t);
    Attention {
        q: pick(0, args.q),
        k: pick(1, args.k),
        v: pick(2, args.v),
        ..*args
    }
}

/// A block mask from a dense u8 matrix `[NQ, NK]` (1 = allowed, 0 = masked; other values are an
/// error), for `block_q x block_k` token blocks.
pub fn block_mask_from_dense(
    shape: &[usize],
    values: &[i64],
    block_q: usize,
    block_k: usize,
) -> Result<BlockMask> {
    if shape.len() != 2 {
        return Err(Error::shape("block_mask", "rank 2 [NQ, NK]", shape));
    }
    if block_q == 0 || block_k == 0 {
        return Err(Error::InvalidArgument("block size must be >= 1".into()));
    }
    if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !matches!(v, 0 | 1)) {
        return Err(Error::InvalidArgument(format!(
            "block_mask element {i} is {v}; a block mask holds 0 (masked) or 1 (allowed)"
        )));
    }
    let dense: Vec<u8> = values.iter().map(|&v| v as u8).collect();
    BlockMask::from_dense(shape[0], shape[1], block_q, block_k, &dense)
        .map_err(|e| Error::InvalidArgument(format!("block_mask: {e}")))
}

/// The Radial mask of `cfg` (paper rule or the released code's rule for `wan` / `hunyuan`).
pub fn radial_mask(cfg: &RadialConfig) -> Result<BlockMask> {
    linattn_reference::radial::radial_mask(cfg).map_err(Error::InvalidArgument)
}
