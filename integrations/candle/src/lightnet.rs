//! LightNet's additive recurrence over candle tensors (ops.md section 2): causal, with its state
//! `(S, z)` in and out, and the non-causal form. Gradients flow to `q`, `k` (the logits) and `v`;
//! the state is not differentiable (the kernels give no gradient of it): the initial state gets
//! no gradient and the final state comes back detached.
//!
//! On a CUDA device this op goes through the host: linattn's CUDA LightNet runs its key
//! transform (an `O(B T H K)` scan) and that transform's adjoint on the host in f64, around the
//! engine on the GPU (the README's "What runs where"), so the packed arguments are read back and
//! the results uploaded. The engine, attention and the optimizer make no host copy.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor as CTensor};
use linattn::lightnet::{self as engine, LightNetSpec};
use linattn::linear::Form;
use linattn::{Backend, Result};

use crate::convert::{self, HostRun, from_candle, meta, to_candle};
use crate::linear::DEFAULT_FORM;

/// One LightNet problem over candle tensors; `k` holds the key logits.
#[derive(Clone, Debug)]
pub struct LightNet {
    q: CTensor,
    k: CTensor,
    v: CTensor,
    scale: Option<f64>,
    non_causal: bool,
    initial_state: Option<(CTensor, CTensor)>,
    cu_seqlens: Option<Vec<i64>>,
    form: Form,
    check_values: bool,
}

/// What [`LightNet::forward`] returns.
#[derive(Clone, Debug)]
pub struct LightNetOutput {
    /// `[B, T, H, V]` in the inputs' dtype, differentiable.
    pub o: CTensor,
    /// Causal only: `(S [N, H, K, V], z [N, H, K])` f32, detached, to continue from.
    pub state: Option<(CTensor, CTensor)>,
}

impl LightNet {
    /// The causal additive recurrence.
    pub fn causal(q: &CTensor, k: &CTensor, v: &CTensor) -> Self {
        LightNet {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            scale: None,
            non_causal: false,
            initial_state: None,
            cu_seqlens: None,
            form: DEFAULT_FORM,
            check_values: true,
        }
    }

    /// The non-causal form (softmax of the key logits over the sequence).
    pub fn non_causal(q: &CTensor, k: &CTensor, v: &CTensor) -> Self {
        LightNet {
            non_causal: true,
            ..Self::causal(q, k, v)
        }
    }

    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Causal only: the state `(S [N, H, K, V], z [N, H, K])` to continue from.
    pub fn with_initial_state(mut self, s: &CTensor, z: &CTensor) -> Self {
        self.initial_state = Some((s.clone(), z.clone()));
        self
    }

    pub fn with_cu_seqlens(mut self, cu_seqlens: &[i64]) -> Self {
        self.cu_seqlens = Some(cu_seqlens.to_vec());
        self
    }

    pub fn with_form(mut self, form: Form) -> Self {
        self.form = form;
        self
    }

    /// See [`crate::LinearAttention::without_value_check`].
    pub fn without_value_check(mut self) -> Self {
        self.check_values = false;
        self
    }

    fn validate(&self) -> Result<LightNetSpec> {
        let (s0, z0) = match &self.initial_state {
            Some((s, z)) => (Some(s), Some(z)),
            None => (None, None),
        };
        convert::same_device(&[
            ("q", Some(&self.q)),
            ("k", Some(&self.k)),
            ("v", Some(&self.v)),
            ("s0", s0),
            ("z0", z0),
        ])?;
        let (q, k, v) = (
            meta("q", &self.q)?,
            meta("k", &self.k)?,
            meta("v", &self.v)?,
        );
        let s0m = s0.map(|t| meta("s0", t)).transpose()?;
        let z0m = z0.map(|t| meta("z0", t)).transpose()?;
        let mut layout = if self.non_causal {
            engine::LightNet::non_causal(&q, &k, &v)
        } else {
            engine::LightNet::causal(&q, &k, &v)
        };
        if let Some(s) = self.scale {
            layout = layout.with_scale(s);
        }
        if let (Some(s), Some(z)) = (&s0m, &z0m) {
            layout = layout.with_initial_state(s, z);
        }
        if let Some(cu) = &self.cu_seqlens {
            layout = layout.with_cu_seqlens(cu);
        }
        let spec = layout.validate_layout()?;
        if let Form::Chunkwise { chunk: 0 } = self.form {
            return Err(linattn::Error::InvalidArgument(
                "the chunk size must be >= 1".into(),
            ));
        }
        if self.check_values {
            for (name, t) in [("q", &self.q), ("k", &self.k), ("v", &self.v)] {
                convert::check_values(name, t, false)?;
            }
            if let Some(s) = s0 {
                convert::check_values("s0", s, false)?;
            }
        }
        Ok(spec)
    }

    /// Runs the problem: `o` in the inputs' dtype, and the final state when causal.
    pub fn forward(&self) -> Result<LightNetOutput> {
        let spec = self.validate()?;
        let problem = Arc::new(Problem {
            spec,
            cu_seqlens: self.cu_seqlens.clone(),
            form: self.form,
        });
        let run = || -> candle_core::Result<LightNetOutput> {
            let qkv = convert::pack(&[&self.q, &self.k, &self.v])?;
            // The state is not differentiable: detached, so no gradient is expected of it.
            let state: Vec<CTensor> = match &self.initial_state {
                Some((s, z)) => vec![s.detach(), z.detach()],
                None => Vec::new(),
            };
            let state = convert::pack_f32(&state.iter().collect::<Vec<_>>(), self.q.device())?;
            let out = qkv.apply_op2(&state, Forward(problem.clone()))?;
            let [o_len, s_len, z_len] = problem.out_lens();
            let o = out
                .narrow(0, 0, o_len)?
                .reshape(problem.spec.o_shape())?
                .to_dtype(self.q.dtype())?;
            let state = if s_len > 0 {
                Some((
                    out.narrow(0, o_len, s_len)?
                        .reshape(problem.spec.s_shape())?
                        .detach(),
                    out.narrow(0, o_len + s_len, z_len)?
                        .reshape(problem.spec.z_shape())?
                        .detach(),
                ))
            } else {
                None
            };
            Ok(LightNetOutput { o, state })
        };
        run().map_err(from_candle)
    }
}

/// A validated problem, as the ops carry it.
#[derive(Debug)]
pub(crate) struct Problem {
    pub(crate) spec: LightNetSpec,
    pub(crate) cu_seqlens: Option<Vec<i64>>,
    pub(crate) form: Form,
}

impl Problem {
    pub(crate) fn qkv_lens(&self) -> [usize; 3] {
        let d = self.spec.dims;
        [d.qk_len(), d.qk_len(), d.v_len()]
    }

    fn state_lens(&self) -> [usize; 2] {
        let s: usize = self.spec.s_shape().iter().product();
        let z: usize = self.spec.z_shape().iter().product();
        [s, z]
    }

    /// o, S, z (the last two 0 when non-causal).
    pub(crate) fn out_lens(&self) -> [usize; 3] {
        let [s, z] = if self.spec.bidirectional {
            [0, 0]
        } else {
            self.state_lens()
        };
        [self.spec.dims.v_len(), s, z]
    }

    /// Runs `f` on the host problem of the packed arguments.
    fn with_host<R>(
        &self,
        qkv: &HostRun,
        state: &HostRun,
        f: impl FnOnce(&engine::LightNet) -> Result<R>,
    ) -> Result<R> {
        let d = self.spec.dims;
        let r = convert::ranges(&self.qkv_lens());
        let q = qkv.tensor(r[0].clone(), vec![d.b, d.t, d.h, d.k])?;
        let k = qkv.tensor(r[1].clone(), vec![d.b, d.t, d.h, d.k])?;
        let v = qkv.tensor(r[2].clone(), vec![d.b, d.t, d.h, d.v])?;
        let mut p = if self.spec.bidirectional {
            engine::LightNet::non_causal(&q, &k, &v)
        } else {
            engine::LightNet::causal(&q, &k, &v)
        }
        .with_scale(self.spec.scale);
        let held;
        if self.spec.has_initial_state {
            let sr = convert::ranges(&self.state_lens());
            held = (
                state.tensor(sr[0].clone(), self.spec.s_shape())?,
                state.tensor(sr[1].clone(), self.spec.z_shape())?,
            );
            p = p.with_initial_state(&held.0, &held.1);
        }
        if let Some(cu) = &self.cu_seqlens {
            p = p.with_cu_seqlens(cu);
        }
        f(&p)
    }

    /// The forward on `backend` over host copies: packed `o|S|z` (f32).
    pub(crate) fn host_forward(
        &self,
        backend: &Backend,
        qkv: &HostRun,
        state: &HostRun,
    ) -> Result<Vec<f32>> {
        self.with_host(qkv, state, |p| {
            let out = engine::forward(backend, p, self.form)?;
            let mut parts = vec![&out.o];
            if let Some(st) = &out.state {
                parts.push(&st.s);
                parts.push(&st.z);
            }
            Ok(parts.iter().flat_map(|t| t.to_f32_vec()).collect())
        })
    }

    /// The backward on `backend` over host copies: packed `dq|dk|dv` (f32).
    pub(crate) fn host_backward(
        &self,
        backend: &Backend,
        qkv: &HostRun,
        state: &HostRun,
        d_o: &HostRun,
    ) -> Result<Vec<f32>> {
        let d_o = d_o.tensor(0..self.spec.dims.v_len(), self.spec.o_shape())?;
        self.with_host(qkv, state, |p| {
            let g = engine::backward(backend, p, self.form, &d_o)?;
            Ok([&g.dq, &g.dk, &g.dv]
                .iter()
                .flat_map(|t| t.to_f32_vec())
                .collect())
        })
    }
}

/// `(packed q|k|v, packed f32 S0|z0)` to packed f32 `o|S|z`.
pub(crate) struct Forward(pub(crate) Arc<Problem>);

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "linattn-lightnet"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self
            .0
            .host_forward(&Backend::Cpu, &HostRun::of(s1, l1)?, &HostRun::of(s2, l2)?)
            .map_err(to_candle)?;
        Ok(convert::host_storage(out))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::through_host(&[(s1, l1), (s2, l2)], |backend, runs| {
            self.0.host_forward(backend, &runs[0], &runs[1])
        })
        .map_err(to_candle)
    }

    fn bwd(
        &self,
        qkv: &CTensor,
        state: &CTensor,
        _res: &CTensor,
        grad_res: &CTensor,
    ) -> candle_core::Result<(Option<CTensor>, Option<CTensor>)> {
        // Only `o`'s part of the cotangent: the state comes back detached.
        let d_o = grad_res.narrow(0, 0, self.0.out_lens()[0])?.contiguous()?;
        let grads = qkv.apply_op3_no_bwd(state, &d_o, &Backward(self.0.clone()))?;
        Ok((Some(grads.to_dtype(qkv.dtype())?), None))
    }
}

/// `(packed q|k|v, packed f32 S0|z0, f32 do)` to packed f32 `dq|dk|dv`.
pub(crate) struct Backward(pub(crate) Arc<Problem>);

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "linattn-lightnet-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self
            .0
            .host_backward(
                &Backend::Cpu,
                &HostRun::of(s1, l1)?,
                &HostRun::of(s2, l2)?,
                &HostRun::of(s3, l3)?,
            )
            .map_err(to_candle)?;
        Ok(convert::host_storage(out))
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
        crate::cuda::through_host(&[(s1, l1), (s2, l2), (s3, l3)], |backend, runs| {
            self.0.host_backward(backend, &runs[0], &runs[1], &runs[2])
        })
        .map_err(to_candle)
    }
}
