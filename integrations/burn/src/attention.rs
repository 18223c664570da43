//! Block-sparse softmax attention over burn tensors (ops.md section 3): dense (the in-library
//! FlashAttention baseline), causal, a [`BlockMask`], or a Radial mask from its generator.
//! `o` is differentiable through linattn's backward kernels; `lse` is returned for callers that
//! need it (f32, `-inf` on a row with no allowed key).

use std::sync::Arc;

use burn::backend::Dispatch;
use burn::tensor::Tensor;
use linattn::attention::{Attention as Problem, BlockMask, RadialConfig};
use linattn::{Error, Result};

use crate::backend::LinattnBackend;
use crate::config::AttentionConfig;
use crate::linear::{check_values, meta, same_device};

/// Largest head dim of the attention kernels (multiples of 8 up to it). The same rule holds on
/// every burn backend, so a model that runs on NdArray runs on wgpu.
pub const MAX_HEAD_DIM: usize = linattn::attention::cube::MAX_HEAD_DIM;

/// One attention problem: `q: [B, T, H, D]`, `k, v: [B, S, H, D]`.
#[derive(Clone, Debug)]
pub struct BlockSparseAttention {
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    causal: bool,
    mask: Option<Arc<BlockMask>>,
    scale: Option<f64>,
    check_values: bool,
}

/// What [`BlockSparseAttention::forward`] returns.
#[derive(Clone, Debug)]
pub struct AttentionOutput {
    /// `[B, T, H, D]` in the inputs' dtype; 0 on a row with no allowed key.
    pub o: Tensor<4>,
    /// `[B, H, T]`, f32, not differentiable.
    pub lse: Tensor<3>,
}

impl BlockSparseAttention {
    /// Dense attention (every key for every query).
    pub fn dense(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Self {
        BlockSparseAttention {
            q,
            k,
            v,
            causal: false,
            mask: None,
            scale: None,
            check_values: true,
        }
    }

    /// Key `j` allowed for query `i` only if `j <= i` (top-left aligned).
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Only the mask's blocks are computed.
    pub fn with_mask(mut self, mask: BlockMask) -> Self {
        self.mask = Some(Arc::new(mask));
        self
    }

    /// The Radial mask of `cfg` (ops.md section 3: the paper rule or the released code's).
    pub fn with_radial(self, cfg: &RadialConfig) -> Result<Self> {
        Ok(self.with_mask(linattn::attention::radial_mask(cfg)?))
    }

    /// Defaults to `D^-0.5`.
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// See [`crate::LinearAttention::without_value_check`].
    pub fn without_value_check(mut self) -> Self {
        self.check_values = false;
        self
    }

    pub fn forward(self) -> Result<AttentionOutput> {
        same_device(&[
            ("q", Some(self.q.device())),
            ("k", Some(self.k.device())),
            ("v", Some(self.v.device())),
        ])?;
        let (q, k, v) = (
            meta("q", &self.q)?,
            meta("k", &self.k)?,
            meta("v", &self.v)?,
        );
        let mut p = Problem::dense(&q, &k, &v).with_causal(self.causal);
        p.scale = self.scale;
        p.mask = self.mask.as_deref();
        let spec = p.validate_layout()?;
        crate::linear::check_dtype_and_form(spec.dtype, linattn::linear::Form::Recurrent)?;
        crate::linear::check_device_dtype("q", &self.q)?;
        let d = spec.dims.d;
        if d % 8 != 0 || d > MAX_HEAD_DIM {
            return Err(Error::UnsupportedHeadDim {
                tensor: "q".into(),
                dim: d,
                backend: "linattn-burn attention".into(),
                supported: format!("multiples of 8 up to {MAX_HEAD_DIM}"),
            });
        }
        if self.check_values {
            check_values("q", self.q.clone().flatten(0, 3), false)?;
            check_values("k", self.k.clone().flatten(0, 3), false)?;
            check_values("v", self.v.clone().flatten(0, 3), false)?;
        }
        let config = AttentionConfig {
            spec,
            mask: self.mask,
        };
        let (o, lse) = Dispatch::linattn_attention_forward(
            self.q.into_dispatch(),
            self.k.into_dispatch(),
            self.v.into_dispatch(),
            config,
        );
        Ok(AttentionOutput {
            o: Tensor::from_dispatch(o),
            lse: Tensor::from_dispatch(lse),
        })
    }
}
