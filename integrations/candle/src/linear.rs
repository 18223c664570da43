//! The decayed linear attention engine over candle tensors (ops.md section 1): GLA, RetNet,
//! Mamba-2-style and LION problems, causal or bidirectional, every gate kind, `h0` / `ht`,
//! `cu_seqlens`, in any form; differentiable through candle's autograd for every input, the gates
//! and `h0` included.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor as CTensor};
use linattn::linear::{self as engine, Direction, Form, GateKind, Spec};
use linattn::{Backend, Error, Result, TensorMeta};

use crate::convert::{self, HostRun, from_candle, meta, to_candle};

/// A gate over candle tensors (natural-log decays, all `<= 0`; any float dtype, used as f32).
#[derive(Clone, Debug)]
pub enum Gate {
    None,
    /// `[H]`.
    PerHead(CTensor),
    /// `[B, T, H]`.
    Scalar(CTensor),
    /// `[B, T, H, K]`.
    Vector(CTensor),
}

impl Gate {
    fn kind(&self) -> GateKind {
        match self {
            Gate::None => GateKind::None,
            Gate::PerHead(_) => GateKind::PerHead,
            Gate::Scalar(_) => GateKind::Scalar,
            Gate::Vector(_) => GateKind::Vector,
        }
    }

    fn tensor(&self) -> Option<&CTensor> {
        match self {
            Gate::None => None,
            Gate::PerHead(t) | Gate::Scalar(t) | Gate::Vector(t) => Some(t),
        }
    }
}

/// One engine problem over candle tensors. Build it with [`LinearAttention::causal`] or
/// [`LinearAttention::bidirectional`] and the `with_*` methods, then call
/// [`forward`](Self::forward). The fields mean what they mean in
/// [`linattn::linear::LinearAttention`].
#[derive(Clone, Debug)]
pub struct LinearAttention {
    q: CTensor,
    k: CTensor,
    v: CTensor,
    gate: Gate,
    gate_bwd: Option<Gate>,
    direction: Direction,
    scale: Option<f64>,
    normalize: Option<f64>,
    h0: Option<CTensor>,
    cu_seqlens: Option<Vec<i64>>,
    form: Form,
    check_values: bool,
}

/// What [`LinearAttention::forward`] returns.
#[derive(Clone, Debug)]
pub struct LinearOutput {
    /// `[B, T, H, V]`, in the inputs' dtype.
    pub o: CTensor,
    /// `[N, H, K, V]` f32, for causal problems without normalisation.
    pub ht: Option<CTensor>,
}

/// The default form: chunkwise with chunks of 64 (flash-linear-attention's default).
pub const DEFAULT_FORM: Form = Form::Chunkwise { chunk: 64 };

impl LinearAttention {
    /// `q, k: [B, T, H, K]`, `v: [B, T, H, V]` (one dtype: f32, f16 or bf16); `o_i` sees `j <= i`.
    pub fn causal(q: &CTensor, k: &CTensor, v: &CTensor) -> Self {
        LinearAttention {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            gate: Gate::None,
            gate_bwd: None,
            direction: Direction::Causal,
            scale: None,
            normalize: None,
            h0: None,
            cu_seqlens: None,
            form: DEFAULT_FORM,
            check_values: true,
        }
    }

    /// LION's symmetric mask: `o_i` sees every `j`.
    pub fn bidirectional(q: &CTensor, k: &CTensor, v: &CTensor) -> Self {
        LinearAttention {
            direction: Direction::Bidirectional,
            ..Self::causal(q, k, v)
        }
    }

    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }

    /// Bidirectional only: the gate above the diagonal (default: the forward gate).
    pub fn with_gate_bwd(mut self, gate: Gate) -> Self {
        self.gate_bwd = Some(gate);
        self
    }

    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Row-sum normalisation with this `eps`.
    pub fn with_normalize(mut self, eps: f64) -> Self {
        self.normalize = Some(eps);
        self
    }

    /// Causal only: the initial state `[N, H, K, V]` (differentiable).
    pub fn with_h0(mut self, h0: &CTensor) -> Self {
        self.h0 = Some(h0.clone());
        self
    }

    /// Packed variable-length sequences (`B = 1`): offsets `[N + 1]`.
    pub fn with_cu_seqlens(mut self, cu_seqlens: &[i64]) -> Self {
        self.cu_seqlens = Some(cu_seqlens.to_vec());
        self
    }

    /// The form (default [`DEFAULT_FORM`]).
    pub fn with_form(mut self, form: Form) -> Self {
        self.form = form;
        self
    }

    /// Skips the value check (finite inputs, gates `<= 0`): one small read back per input less.
    pub fn without_value_check(mut self) -> Self {
        self.check_values = false;
        self
    }

    /// Shapes, dtypes, devices, options and (unless switched off) values, before anything runs.
    fn validate(&self) -> Result<Spec> {
        let gate_bwd_tensor = self.gate_bwd.as_ref().and_then(Gate::tensor);
        convert::same_device(&[
            ("q", Some(&self.q)),
            ("k", Some(&self.k)),
            ("v", Some(&self.v)),
            ("g", self.gate.tensor()),
            ("g_bwd", gate_bwd_tensor),
            ("h0", self.h0.as_ref()),
        ])?;
        let (q, k, v) = (
            meta("q", &self.q)?,
            meta("k", &self.k)?,
            meta("v", &self.v)?,
        );
        let g = self.gate.tensor().map(|t| meta("g", t)).transpose()?;
        let gb = gate_bwd_tensor.map(|t| meta("g_bwd", t)).transpose()?;
        let h0 = self.h0.as_ref().map(|t| meta("h0", t)).transpose()?;
        fn wrap(kind: GateKind, t: Option<&TensorMeta>) -> engine::Gate<'_, TensorMeta> {
            match (kind, t) {
                (GateKind::PerHead, Some(t)) => engine::Gate::PerHead(t),
                (GateKind::Scalar, Some(t)) => engine::Gate::Scalar(t),
                (GateKind::Vector, Some(t)) => engine::Gate::Vector(t),
                _ => engine::Gate::None,
            }
        }
        let mut layout = match self.direction {
            Direction::Causal => engine::LinearAttention::causal(&q, &k, &v),
            Direction::Bidirectional => engine::LinearAttention::bidirectional(&q, &k, &v),
        };
        layout = layout.with_gate(wrap(self.gate.kind(), g.as_ref()));
        if let Some(gate_bwd) = &self.gate_bwd {
            layout = layout.with_gate_bwd(wrap(gate_bwd.kind(), gb.as_ref()));
        }
        if let Some(s) = self.scale {
            layout = layout.with_scale(s);
        }
        if let Some(eps) = self.normalize {
            layout = layout.with_normalize(eps);
        }
        if let Some(h0) = &h0 {
            layout = layout.with_h0(h0);
        }
        if let Some(cu) = &self.cu_seqlens {
            layout = layout.with_cu_seqlens(cu);
        }
        let spec = layout.validate_layout()?;
        if let Form::Chunkwise { chunk: 0 } = self.form {
            return Err(Error::InvalidArgument("the chunk size must be >= 1".into()));
        }
        if self.check_values {
            for (name, t) in [("q", &self.q), ("k", &self.k), ("v", &self.v)] {
                convert::check_values(name, t, false)?;
            }
            if let Some(g) = self.gate.tensor() {
                convert::check_values("g", g, true)?;
            }
            if let Some(g) = gate_bwd_tensor {
                convert::check_values("g_bwd", g, true)?;
            }
            if let Some(h0) = &self.h0 {
                convert::check_values("h0", h0, false)?;
            }
        }
        Ok(spec)
    }

    /// Runs the problem: `o` in the inputs' dtype and, for causal problems without
    /// normalisation, `ht` (f32). Both are differentiable (through linattn's backward kernels);
    /// the gradients reach every input that is a variable or depends on one.
    pub fn forward(&self) -> Result<LinearOutput> {
        let spec = self.validate()?;
        let problem = Arc::new(Problem {
            spec,
            cu_seqlens: self.cu_seqlens.clone(),
            form: self.form,
        });
        let run = || -> candle_core::Result<LinearOutput> {
            let qkv = convert::pack(&[&self.q, &self.k, &self.v])?;
            let mut params = Vec::new();
            params.extend(self.gate.tensor());
            params.extend(self.gate_bwd.as_ref().and_then(Gate::tensor));
            params.extend(self.h0.as_ref());
            let params = convert::pack_f32(&params, self.q.device())?;
            let out = qkv.apply_op2(&params, Forward(problem.clone()))?;
            let p = &problem;
            let d = p.spec.dims;
            let o = out
                .narrow(0, 0, d.v_len())?
                .reshape(p.spec.o_shape())?
                .to_dtype(self.q.dtype())?;
            let ht = if p.spec.has_final_state() {
                Some(
                    out.narrow(0, d.v_len(), p.state_len())?
                        .reshape(p.spec.state_shape())?,
                )
            } else {
                None
            };
            Ok(LinearOutput { o, ht })
        };
        run().map_err(from_candle)
    }
}

/// GLA (flash-linear-attention's `chunk_gla`): causal, per-token vector gates `g: [B, T, H, K]`,
/// chunkwise (64); `o` and the final state.
pub fn gla(q: &CTensor, k: &CTensor, v: &CTensor, g: &CTensor) -> Result<LinearOutput> {
    LinearAttention::causal(q, k, v)
        .with_gate(Gate::Vector(g.clone()))
        .forward()
}

/// The LION front-ends (LION-LIT / D / S): bidirectional, normalised, `eps = 1e-6` (ops.md
/// section 1); features (elu + 1, shifted SiLU) are applied by the caller.
#[derive(Clone, Debug)]
pub enum Lion {
    /// No gate.
    Lit,
    /// A fixed decay per head, `[H]`.
    D(CTensor),
    /// A selective decay per token, `[B, T, H]`, and optionally its own backward-direction gate.
    S { g: CTensor, g_bwd: Option<CTensor> },
}

impl Lion {
    /// The LION problem over `q, k, v` (normalised, bidirectional).
    pub fn problem(&self, q: &CTensor, k: &CTensor, v: &CTensor) -> LinearAttention {
        let p = LinearAttention::bidirectional(q, k, v).with_normalize(1e-6);
        match self {
            Lion::Lit => p,
            Lion::D(g) => p.with_gate(Gate::PerHead(g.clone())),
            Lion::S { g, g_bwd } => {
                let p = p.with_gate(Gate::Scalar(g.clone()));
                match g_bwd {
                    Some(gb) => p.with_gate_bwd(Gate::Scalar(gb.clone())),
                    None => p,
                }
            }
        }
    }
}

/// A validated problem, as the ops carry it.
#[derive(Debug)]
pub(crate) struct Problem {
    pub(crate) spec: Spec,
    pub(crate) cu_seqlens: Option<Vec<i64>>,
    pub(crate) form: Form,
}

impl Problem {
    pub(crate) fn gate_len(&self) -> usize {
        self.spec.gate_kind.len(&self.spec.dims)
    }

    pub(crate) fn state_len(&self) -> usize {
        self.spec.num_sequences * self.spec.dims.state_len()
    }

    /// Lengths of the first packed argument: q, k, v.
    pub(crate) fn qkv_lens(&self) -> [usize; 3] {
        let d = self.spec.dims;
        [d.qk_len(), d.qk_len(), d.v_len()]
    }

    /// Lengths of the second packed argument (f32): g, g_bwd, h0, each 0 when absent.
    pub(crate) fn param_lens(&self) -> [usize; 3] {
        let s = &self.spec;
        let g = if s.gate_kind == GateKind::None {
            0
        } else {
            self.gate_len()
        };
        [
            g,
            if s.has_gate_bwd { g } else { 0 },
            if s.has_h0 { self.state_len() } else { 0 },
        ]
    }

    /// Lengths of the output (f32): o, ht (0 without a final state).
    pub(crate) fn out_lens(&self) -> [usize; 2] {
        [
            self.spec.dims.v_len(),
            if self.spec.has_final_state() {
                self.state_len()
            } else {
                0
            },
        ]
    }

    fn gate_shape(&self) -> Vec<usize> {
        let d = self.spec.dims;
        match self.spec.gate_kind {
            GateKind::PerHead => vec![d.h],
            GateKind::Scalar => vec![d.b, d.t, d.h],
            _ => vec![d.b, d.t, d.h, d.k],
        }
    }

    /// The host tensors of the packed arguments (the CPU path).
    fn host_inputs(&self, qkv: &HostRun, params: &HostRun) -> Result<HostInputs> {
        let d = self.spec.dims;
        let r = convert::ranges(&self.qkv_lens());
        let pr = convert::ranges(&self.param_lens());
        let opt = |i: usize, shape: Vec<usize>| -> Result<Option<linattn::Tensor>> {
            if pr[i].is_empty() {
                Ok(None)
            } else {
                params.tensor(pr[i].clone(), shape).map(Some)
            }
        };
        Ok(HostInputs {
            q: qkv.tensor(r[0].clone(), vec![d.b, d.t, d.h, d.k])?,
            k: qkv.tensor(r[1].clone(), vec![d.b, d.t, d.h, d.k])?,
            v: qkv.tensor(r[2].clone(), vec![d.b, d.t, d.h, d.v])?,
            g: opt(0, self.gate_shape())?,
            g_bwd: opt(1, self.gate_shape())?,
            h0: opt(2, self.spec.state_shape())?,
        })
    }
}

/// A problem's inputs on the host.
struct HostInputs {
    q: linattn::Tensor,
    k: linattn::Tensor,
    v: linattn::Tensor,
    g: Option<linattn::Tensor>,
    g_bwd: Option<linattn::Tensor>,
    h0: Option<linattn::Tensor>,
}

impl HostInputs {
    fn problem<'a>(&'a self, p: &'a Problem) -> engine::LinearAttention<'a> {
        let wrap = |t: &'a linattn::Tensor| match p.spec.gate_kind {
            GateKind::PerHead => engine::Gate::PerHead(t),
            GateKind::Scalar => engine::Gate::Scalar(t),
            _ => engine::Gate::Vector(t),
        };
        let mut problem = match p.spec.direction {
            Direction::Causal => engine::LinearAttention::causal(&self.q, &self.k, &self.v),
            Direction::Bidirectional => {
                engine::LinearAttention::bidirectional(&self.q, &self.k, &self.v)
            }
        }
        .with_scale(p.spec.scale);
        if let Some(g) = &self.g {
            problem = problem.with_gate(wrap(g));
        }
        if let Some(g) = &self.g_bwd {
            problem = problem.with_gate_bwd(wrap(g));
        }
        if let Some(eps) = p.spec.normalize {
            problem = problem.with_normalize(eps);
        }
        if let Some(h0) = &self.h0 {
            problem = problem.with_h0(h0);
        }
        if let Some(cu) = &p.cu_seqlens {
            problem = problem.with_cu_seqlens(cu);
        }
        problem
    }
}

/// The forward op: `(packed q|k|v, packed f32 g|g_bwd|h0)` to packed f32 `o|ht`.
pub(crate) struct Forward(pub(crate) Arc<Problem>);

impl CustomOp2 for Forward {
    fn name(&self) -> &'static str {
        "linattn-linear-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = &self.0;
        let inputs = p
            .host_inputs(&HostRun::of(s1, l1)?, &HostRun::of(s2, l2)?)
            .map_err(to_candle)?;
        let out = engine::forward(&Backend::Cpu, &inputs.problem(p), p.form).map_err(to_candle)?;
        let mut parts = vec![&out.o];
        parts.extend(out.ht.as_ref());
        Ok(convert::host_packed(&parts))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::linear_forward(&self.0, s1, l1, s2, l2).map_err(to_candle)
    }

    fn bwd(
        &self,
        qkv: &CTensor,
        params: &CTensor,
        _res: &CTensor,
        grad_res: &CTensor,
    ) -> candle_core::Result<(Option<CTensor>, Option<CTensor>)> {
        let p = &self.0;
        let grads = qkv.apply_op3_no_bwd(params, &grad_res.contiguous()?, &Backward(p.clone()))?;
        let n_qkv: usize = p.qkv_lens().iter().sum();
        let n_params: usize = p.param_lens().iter().sum();
        let d_qkv = grads.narrow(0, 0, n_qkv)?.to_dtype(qkv.dtype())?;
        let d_params = if n_params > 0 {
            Some(grads.narrow(0, n_qkv, n_params)?)
        } else {
            None
        };
        Ok((Some(d_qkv), d_params))
    }
}

/// The backward op: `(packed q|k|v, packed g|g_bwd|h0, packed f32 do|dht)` to packed f32
/// `dq|dk|dv|dg|dg_bwd|dh0` (the absent ones left out).
pub(crate) struct Backward(pub(crate) Arc<Problem>);

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "linattn-linear-attention-backward"
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
        let p = &self.0;
        let inputs = p
            .host_inputs(&HostRun::of(s1, l1)?, &HostRun::of(s2, l2)?)
            .map_err(to_candle)?;
        let cot = HostRun::of(s3, l3)?;
        let r = convert::ranges(&p.out_lens());
        let d_o = cot
            .tensor(r[0].clone(), p.spec.o_shape())
            .map_err(to_candle)?;
        let d_ht = if r[1].is_empty() {
            None
        } else {
            Some(
                cot.tensor(r[1].clone(), p.spec.state_shape())
                    .map_err(to_candle)?,
            )
        };
        let g = engine::backward(
            &Backend::Cpu,
            &inputs.problem(p),
            p.form,
            &d_o,
            d_ht.as_ref(),
        )
        .map_err(to_candle)?;
        let mut parts = vec![&g.dq, &g.dk, &g.dv];
        parts.extend(g.dg.as_ref());
        parts.extend(g.dg_bwd.as_ref());
        parts.extend(g.dh0.as_ref());
        Ok(convert::host_packed(&parts))
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
        crate::cuda::linear_backward(&self.0, s1, l1, s2, l2, s3, l3).map_err(to_candle)
    }
}
