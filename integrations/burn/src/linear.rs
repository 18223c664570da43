//! The decayed linear attention engine over burn tensors (ops.md section 1): GLA, RetNet,
//! Mamba-2-style and LION problems, causal or bidirectional, every gate kind, `h0` / `ht`,
//! `cu_seqlens`, in any form.

use burn::backend::Dispatch;
use burn::tensor::{Bool, DType as BurnDType, Device, Tensor, TensorData};
use linattn::linear::{self as engine, Direction, Form, GateKind};
use linattn::{DType, Error, Result, TensorMeta};

use crate::backend::LinattnBackend;
use crate::config::LinearConfig;

/// A gate over burn tensors (natural-log decays, all `<= 0`).
#[derive(Clone, Debug)]
pub enum Gate {
    None,
    /// `[H]`.
    PerHead(Tensor<1>),
    /// `[B, T, H]`.
    Scalar(Tensor<3>),
    /// `[B, T, H, K]`.
    Vector(Tensor<4>),
}

impl Gate {
    pub(crate) fn kind(&self) -> GateKind {
        match self {
            Gate::None => GateKind::None,
            Gate::PerHead(_) => GateKind::PerHead,
            Gate::Scalar(_) => GateKind::Scalar,
            Gate::Vector(_) => GateKind::Vector,
        }
    }

    pub(crate) fn meta(&self) -> Result<Option<TensorMeta>> {
        match self {
            Gate::None => Ok(None),
            Gate::PerHead(t) => meta("g", t).map(Some),
            Gate::Scalar(t) => meta("g", t).map(Some),
            Gate::Vector(t) => meta("g", t).map(Some),
        }
    }

    pub(crate) fn device(&self) -> Option<Device> {
        match self {
            Gate::None => None,
            Gate::PerHead(t) => Some(t.device()),
            Gate::Scalar(t) => Some(t.device()),
            Gate::Vector(t) => Some(t.device()),
        }
    }

    /// The gate flattened (the ops take it as a primitive of any rank).
    fn flat(&self) -> Option<Tensor<1>> {
        match self {
            Gate::None => None,
            Gate::PerHead(t) => Some(t.clone()),
            Gate::Scalar(t) => Some(t.clone().flatten(0, 2)),
            Gate::Vector(t) => Some(t.clone().flatten(0, 3)),
        }
    }

    /// The gate in its own rank, as the op's input.
    pub(crate) fn input(&self) -> Option<burn::backend::DispatchTensor> {
        match self {
            Gate::None => None,
            Gate::PerHead(t) => Some(t.clone().into_dispatch()),
            Gate::Scalar(t) => Some(t.clone().into_dispatch()),
            Gate::Vector(t) => Some(t.clone().into_dispatch()),
        }
    }
}

fn linattn_dtype(name: &str, dtype: BurnDType) -> Result<DType> {
    match dtype {
        BurnDType::F32 | BurnDType::Flex32 => Ok(DType::F32),
        BurnDType::F16 => Ok(DType::F16),
        BurnDType::BF16 => Ok(DType::BF16),
        BurnDType::F64 => Ok(DType::F64),
        other => Err(Error::InvalidArgument(format!(
            "`{name}` is {other:?}; linattn's ops take float tensors (f32, f16, bf16)"
        ))),
    }
}

pub(crate) fn meta<const D: usize>(name: &str, t: &Tensor<D>) -> Result<TensorMeta> {
    Ok(TensorMeta::new(
        t.dims().to_vec(),
        linattn_dtype(name, t.dtype())?,
    ))
}

/// Every input on one device.
pub(crate) fn same_device(tensors: &[(&str, Option<Device>)]) -> Result<()> {
    let mut first: Option<(&str, &Device)> = None;
    for (name, device) in tensors {
        let Some(device) = device else { continue };
        match first {
            None => first = Some((name, device)),
            Some((first_name, first_device)) if first_device != device => {
                return Err(Error::InvalidArgument(format!(
                    "`{name}` is on {device:?} but `{first_name}` is on {first_device:?}; \
                     every input of one op must be on one device"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Checks the values of `t` with burn's own ops on its device (one boolean read back); on a
/// flag, reads the tensor to name the first bad element with linattn's host check.
pub(crate) fn check_values(name: &str, t: Tensor<1>, gate: bool) -> Result<()> {
    let bad: Tensor<1, Bool> = if gate {
        // NaN compares false, so "not <= 0" catches it with the positive values.
        t.clone().lower_equal_elem(0.0).bool_not()
    } else {
        t.clone().is_finite().bool_not()
    };
    if !bad.any().into_scalar::<bool>() {
        return Ok(());
    }
    let shape = t.dims().to_vec();
    let data: TensorData = t.into_data();
    let values = linattn::Tensor::from_f64(shape, data.iter::<f64>().collect())?;
    Err(linattn::flagged_values_error(name, gate, &values))
}

/// The kernels' dtypes (f64 is the CPU reference's, not a burn op's) and a chunk size >= 1.
pub(crate) fn check_dtype_and_form(dtype: DType, form: Form) -> Result<()> {
    if dtype == DType::F64 {
        return Err(Error::InvalidArgument(
            "linattn's burn ops take f32, f16 or bf16 tensors, got f64".into(),
        ));
    }
    if let Form::Chunkwise { chunk: 0 } = form {
        return Err(Error::InvalidArgument("the chunk size must be >= 1".into()));
    }
    Ok(())
}

/// Whether the device holds and computes `t`'s dtype (burn's own answer; on llvmpipe f16 is
/// there and bf16 is not): the kernels would fail inside the queued op otherwise.
pub(crate) fn check_device_dtype<const D: usize>(name: &str, t: &Tensor<D>) -> Result<()> {
    let dtype = t.dtype();
    if t.device().supports_dtype(dtype) {
        return Ok(());
    }
    Err(Error::UnsupportedDtype {
        tensor: name.to_string(),
        dtype: linattn_dtype(name, dtype)?,
        backend: format!("burn {:?}", t.device()),
        supported: "the float dtypes this device supports (f32 always)".into(),
    })
}

/// One engine problem over burn tensors. Build it with [`LinearAttention::causal`] or
/// [`LinearAttention::bidirectional`] and the `with_*` methods, then call
/// [`forward`](Self::forward). The fields mean what they mean in
/// [`linattn::linear::LinearAttention`].
#[derive(Clone, Debug)]
pub struct LinearAttention {
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    gate: Gate,
    gate_bwd: Option<Gate>,
    direction: Direction,
    scale: Option<f64>,
    normalize: Option<f64>,
    h0: Option<Tensor<4>>,
    cu_seqlens: Option<Vec<i64>>,
    form: Form,
    final_state: bool,
    check_values: bool,
}

/// What [`LinearAttention::forward`] returns.
#[derive(Clone, Debug)]
pub struct LinearOutput {
    /// `[B, T, H, V]`, in the inputs' dtype.
    pub o: Tensor<4>,
    /// `[N, H, K, V]`, when asked for with [`LinearAttention::with_final_state`].
    pub ht: Option<Tensor<4>>,
}

/// The default form: chunkwise with chunks of 64 (flash-linear-attention's default).
pub const DEFAULT_FORM: Form = Form::Chunkwise { chunk: 64 };

impl LinearAttention {
    /// `q, k: [B, T, H, K]`, `v: [B, T, H, V]`, `o_i` sees `j <= i`.
    pub fn causal(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Self {
        LinearAttention {
            q,
            k,
            v,
            gate: Gate::None,
            gate_bwd: None,
            direction: Direction::Causal,
            scale: None,
            normalize: None,
            h0: None,
            cu_seqlens: None,
            form: DEFAULT_FORM,
            final_state: false,
            check_values: true,
        }
    }

    /// `o_i` sees every `j` (LION).
    pub fn bidirectional(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Self {
        LinearAttention {
            direction: Direction::Bidirectional,
            ..Self::causal(q, k, v)
        }
    }

    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }

    /// Bidirectional only: the gate above the diagonal (same kind as the forward gate).
    pub fn with_gate_bwd(mut self, gate_bwd: Gate) -> Self {
        self.gate_bwd = Some(gate_bwd);
        self
    }

    /// Defaults to `K^-0.5`.
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Row-sum normalisation with this `eps`.
    pub fn with_normalize(mut self, eps: f64) -> Self {
        self.normalize = Some(eps);
        self
    }

    /// Causal only: the initial state `[N, H, K, V]`.
    pub fn with_h0(mut self, h0: Tensor<4>) -> Self {
        self.h0 = Some(h0);
        self
    }

    /// Packed variable-length offsets `[N + 1]` (with `B = 1`), on the host.
    pub fn with_cu_seqlens(mut self, cu_seqlens: Vec<i64>) -> Self {
        self.cu_seqlens = Some(cu_seqlens);
        self
    }

    /// The form to compute in (default [`DEFAULT_FORM`]); every form computes the same function.
    pub fn with_form(mut self, form: Form) -> Self {
        self.form = form;
        self
    }

    /// Also return the final state `ht` (causal, without normalisation), differentiable.
    pub fn with_final_state(mut self) -> Self {
        self.final_state = true;
        self
    }

    /// Skips the value check (finite inputs, gates `<= 0`): it costs one boolean read back
    /// from the device per input, a synchronisation a training loop may not want. The caller
    /// then vouches for the values.
    pub fn without_value_check(mut self) -> Self {
        self.check_values = false;
        self
    }

    fn validate(&self) -> Result<engine::Spec> {
        same_device(&[
            ("q", Some(self.q.device())),
            ("k", Some(self.k.device())),
            ("v", Some(self.v.device())),
            ("g", self.gate.device()),
            ("g_bwd", self.gate_bwd.as_ref().and_then(Gate::device)),
            ("h0", self.h0.as_ref().map(Tensor::device)),
        ])?;
        let (q, k, v) = (
            meta("q", &self.q)?,
            meta("k", &self.k)?,
            meta("v", &self.v)?,
        );
        let g = self.gate.meta()?;
        let g_bwd = self
            .gate_bwd
            .as_ref()
            .map(Gate::meta)
            .transpose()?
            .flatten();
        let h0 = self.h0.as_ref().map(|t| meta("h0", t)).transpose()?;
        fn as_gate(kind: GateKind, m: Option<&TensorMeta>) -> engine::Gate<'_, TensorMeta> {
            match (kind, m) {
                (GateKind::PerHead, Some(m)) => engine::Gate::PerHead(m),
                (GateKind::Scalar, Some(m)) => engine::Gate::Scalar(m),
                (GateKind::Vector, Some(m)) => engine::Gate::Vector(m),
                _ => engine::Gate::None,
            }
        }
        let mut p = match self.direction {
            Direction::Causal => engine::LinearAttention::causal(&q, &k, &v),
            Direction::Bidirectional => engine::LinearAttention::bidirectional(&q, &k, &v),
        }
        .with_gate(as_gate(self.gate.kind(), g.as_ref()));
        if let Some(gb) = &self.gate_bwd {
            p = p.with_gate_bwd(as_gate(gb.kind(), g_bwd.as_ref()));
        }
        p.scale = self.scale;
        p.normalize = self.normalize;
        p.h0 = h0.as_ref();
        p.cu_seqlens = self.cu_seqlens.as_deref();
        let spec = p.validate_layout()?;
        check_dtype_and_form(q.dtype, self.form)?;
        check_device_dtype("q", &self.q)?;
        if self.final_state && !spec.has_final_state() {
            return Err(Error::InvalidArgument(
                "a final state `ht` exists only for a causal problem without normalisation".into(),
            ));
        }
        if self.check_values {
            check_values("q", self.q.clone().flatten(0, 3), false)?;
            check_values("k", self.k.clone().flatten(0, 3), false)?;
            check_values("v", self.v.clone().flatten(0, 3), false)?;
            if let Some(g) = self.gate.flat() {
                check_values("g", g, true)?;
            }
            if let Some(g) = self.gate_bwd.as_ref().and_then(Gate::flat) {
                check_values("g_bwd", g, true)?;
            }
            if let Some(h0) = &self.h0 {
                check_values("h0", h0.clone().flatten(0, 3), false)?;
            }
        }
        Ok(spec)
    }

    /// Runs the problem: `o` (and `ht` when asked for), differentiable under autodiff.
    pub fn forward(self) -> Result<LinearOutput> {
        let spec = self.validate()?;
        let config = LinearConfig {
            spec,
            form: self.form,
            final_state: self.final_state,
        };
        let device = self.q.device();
        // Absent inputs are one-element placeholders of q's dtype (never read).
        let placeholder = || {
            Tensor::<1>::zeros([1], &device)
                .cast(self.q.dtype())
                .into_dispatch()
        };
        let g = self.gate.input().unwrap_or_else(placeholder);
        let g_bwd = self
            .gate_bwd
            .as_ref()
            .and_then(Gate::input)
            .unwrap_or_else(placeholder);
        let h0 = self
            .h0
            .clone()
            .map(Tensor::into_dispatch)
            .unwrap_or_else(placeholder);
        let out = Dispatch::linattn_linear_forward(
            self.q.into_dispatch(),
            self.k.into_dispatch(),
            self.v.into_dispatch(),
            g,
            g_bwd,
            h0,
            config.clone(),
        );
        let o_shape: [usize; 4] = config.spec.o_shape().try_into().expect("rank 4");
        if !config.final_state {
            return Ok(LinearOutput {
                o: Tensor::from_dispatch(out),
                ht: None,
            });
        }
        let packed: Tensor<1> = Tensor::from_dispatch(out);
        let (n_o, n_s) = (config.o_len(), config.state_len());
        let s_shape: [usize; 4] = config.spec.state_shape().try_into().expect("rank 4");
        Ok(LinearOutput {
            o: packed.clone().slice(0..n_o).reshape(o_shape),
            ht: Some(packed.slice(n_o..n_o + n_s).reshape(s_shape)),
        })
    }
}

/// Gated linear attention (GLA): causal, vector gate `g: [B, T, H, K]`, scale `K^-0.5`,
/// chunkwise. `o: [B, T, H, V]`.
pub fn gla(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, g: Tensor<4>) -> Result<Tensor<4>> {
    Ok(LinearAttention::causal(q, k, v)
        .with_gate(Gate::Vector(g))
        .forward()?
        .o)
}

/// LION's three variants (`linattn::lion`): the gates of a bidirectional problem with row-sum
/// normalisation (eps `1e-6`).
// Built once per call and consumed by `problem`: the size of a burn tensor handle per variant
// does not matter here.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Lion {
    /// No decay.
    Lit,
    /// One decay per head, `[H]`.
    D(Tensor<1>),
    /// A decay per token and head, `[B, T, H]`; `g_bwd` above the diagonal (`g` if `None`).
    S {
        g: Tensor<3>,
        g_bwd: Option<Tensor<3>>,
    },
}

impl Lion {
    /// The engine problem of this variant with LION's defaults (scale `K^-0.5`, normalisation
    /// eps `1e-6`, chunkwise); adjust it with the `with_*` methods. `q` and `k` are the
    /// feature-mapped (positive) queries and keys.
    pub fn problem(self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> LinearAttention {
        let p = LinearAttention::bidirectional(q, k, v).with_normalize(linattn::lion::DEFAULT_EPS);
        match self {
            Lion::Lit => p,
            Lion::D(g) => p.with_gate(Gate::PerHead(g)),
            Lion::S { g, g_bwd } => {
                let p = p.with_gate(Gate::Scalar(g));
                match g_bwd {
                    Some(gb) => p.with_gate_bwd(Gate::Scalar(gb)),
                    None => p,
                }
            }
        }
    }
}
