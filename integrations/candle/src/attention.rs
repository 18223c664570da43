//! Block-sparse softmax attention over candle tensors (ops.md section 3): dense (the in-library
//! FlashAttention baseline), causal, a [`BlockMask`], or a Radial mask from its generator. `o` is
//! differentiable through linattn's backward kernels; `lse` is returned for callers that need it
//! (f32, `-inf` on a row with no allowed key) and is not differentiable (the kernels give no
//! gradient of it, so it comes back detached).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor as CTensor};
use linattn::attention::{self as engine, AttnSpec, BlockMask, RadialConfig};
use linattn::{Backend, Result};

use crate::convert::{self, HostRun, from_candle, meta, to_candle};

/// One attention problem: `q: [B, T, H, D]`, `k, v: [B, S, H, D]`, one dtype.
#[derive(Clone, Debug)]
pub struct BlockSparseAttention {
    q: CTensor,
    k: CTensor,
    v: CTensor,
    causal: bool,
    mask: Option<Arc<BlockMask>>,
    scale: Option<f64>,
    check_values: bool,
}

/// What [`BlockSparseAttention::forward`] returns.
#[derive(Clone, Debug)]
pub struct AttentionOutput {
    /// `[B, T, H, D]` in the inputs' dtype; 0 on a row with no allowed key.
    pub o: CTensor,
    /// `[B, H, T]`, f32, detached.
    pub lse: CTensor,
}

impl BlockSparseAttention {
    /// Dense attention (every key for every query).
    pub fn dense(q: &CTensor, k: &CTensor, v: &CTensor) -> Self {
        BlockSparseAttention {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            causal: false,
            mask: None,
            scale: None,
            check_values: true,
        }
    }

    /// Key `j` allowed for query `i` only if `j <= i` (top-left aligned, as SDPA's `is_causal`).
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
        Ok(self.with_mask(engine::radial_mask(cfg)?))
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

    fn validate(&self) -> Result<AttnSpec> {
        convert::same_device(&[
            ("q", Some(&self.q)),
            ("k", Some(&self.k)),
            ("v", Some(&self.v)),
        ])?;
        let (q, k, v) = (
            meta("q", &self.q)?,
            meta("k", &self.k)?,
            meta("v", &self.v)?,
        );
        let mut layout = engine::Attention::dense(&q, &k, &v).with_causal(self.causal);
        if let Some(mask) = &self.mask {
            layout = layout.with_mask(mask);
        }
        if let Some(s) = self.scale {
            layout = layout.with_scale(s);
        }
        let spec = layout.validate_layout()?;
        #[cfg(feature = "cuda")]
        if self.q.device().is_cuda() {
            crate::cuda::check_attention_support(&spec)?;
        }
        if self.check_values {
            for (name, t) in [("q", &self.q), ("k", &self.k), ("v", &self.v)] {
                convert::check_values(name, t, false)?;
            }
        }
        Ok(spec)
    }

    /// Runs the attention: `o` (differentiable) and `lse`.
    pub fn forward(&self) -> Result<AttentionOutput> {
        let spec = self.validate()?;
        let problem = Arc::new(Problem {
            spec,
            mask: self.mask.clone(),
        });
        let run = || -> candle_core::Result<AttentionOutput> {
            let qkv = convert::pack(&[&self.q, &self.k, &self.v])?;
            let out = qkv.apply_op1(Forward(problem.clone()))?;
            let [o_len, lse_len] = problem.out_lens();
            let o = out
                .narrow(0, 0, o_len)?
                .reshape(problem.spec.o_shape())?
                .to_dtype(self.q.dtype())?;
            let lse = out
                .narrow(0, o_len, lse_len)?
                .reshape(problem.spec.lse_shape())?
                .detach();
            Ok(AttentionOutput { o, lse })
        };
        run().map_err(from_candle)
    }
}

/// A validated problem, as the ops carry it.
#[derive(Debug)]
pub(crate) struct Problem {
    pub(crate) spec: AttnSpec,
    pub(crate) mask: Option<Arc<BlockMask>>,
}

impl Problem {
    pub(crate) fn qkv_lens(&self) -> [usize; 3] {
        let d = self.spec.dims;
        [d.q_len(), d.kv_len(), d.kv_len()]
    }

    pub(crate) fn out_lens(&self) -> [usize; 2] {
        let d = self.spec.dims;
        [d.q_len(), d.lse_len()]
    }

    fn host(&self, qkv: &HostRun) -> Result<[linattn::Tensor; 3]> {
        let d = self.spec.dims;
        let r = convert::ranges(&self.qkv_lens());
        Ok([
            qkv.tensor(r[0].clone(), vec![d.b, d.t, d.h, d.d])?,
            qkv.tensor(r[1].clone(), vec![d.b, d.s, d.h, d.d])?,
            qkv.tensor(r[2].clone(), vec![d.b, d.s, d.h, d.d])?,
        ])
    }

    fn host_problem<'a>(&'a self, t: &'a [linattn::Tensor; 3]) -> engine::Attention<'a> {
        let mut p = engine::Attention::dense(&t[0], &t[1], &t[2])
            .with_causal(self.spec.causal)
            .with_scale(self.spec.scale);
        if let Some(mask) = &self.mask {
            p = p.with_mask(mask);
        }
        p
    }
}

/// `packed q|k|v` to packed f32 `o|lse`.
pub(crate) struct Forward(pub(crate) Arc<Problem>);

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "linattn-block-sparse-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = &self.0;
        let t = p.host(&HostRun::of(s, l)?).map_err(to_candle)?;
        let out = engine::forward(&Backend::Cpu, &p.host_problem(&t)).map_err(to_candle)?;
        Ok(convert::host_packed(&[&out.o, &out.lse]))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::attention_forward(&self.0, s, l).map_err(to_candle)
    }

    fn bwd(
        &self,
        qkv: &CTensor,
        res: &CTensor,
        grad_res: &CTensor,
    ) -> candle_core::Result<Option<CTensor>> {
        let p = &self.0;
        // Only `o`'s part of the cotangent: `lse` is detached, its part is zero. The kernels take
        // `do` in the inputs' dtype (as FlashAttention does).
        let d_o = grad_res
            .narrow(0, 0, p.out_lens()[0])?
            .to_dtype(qkv.dtype())?
            .contiguous()?;
        let grads = qkv.apply_op3_no_bwd(res, &d_o, &Backward(p.clone()))?;
        Ok(Some(grads.to_dtype(qkv.dtype())?))
    }
}

/// `(packed q|k|v, the forward's packed f32 o|lse, do in the inputs' dtype)` to packed f32
/// `dq|dk|dv` (the CPU path recomputes and reads only q, k, v and do).
pub(crate) struct Backward(pub(crate) Arc<Problem>);

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "linattn-block-sparse-attention-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = &self.0;
        let t = p.host(&HostRun::of(s1, l1)?).map_err(to_candle)?;
        let cot = HostRun::of(s3, l3)?;
        let d_o = cot
            .tensor(0..cot.len(), p.spec.o_shape())
            .map_err(to_candle)?;
        let g = engine::backward(&Backend::Cpu, &p.host_problem(&t), &d_o).map_err(to_candle)?;
        Ok(convert::host_packed(&[&g.dq, &g.dk, &g.dv]))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::attention_backward(&self.0, s1, l1, s2, l2, s3, l3).map_err(to_candle)
    }
}
