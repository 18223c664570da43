//! The decayed linear attention engine (ops.md section 1) and its causal front-ends (GLA, RetNet,
//! Mamba-2-style decay). One problem description ([`LinearAttention`]), validated once on the host
//! ([`LinearAttention::validate`]), runs on any [`Backend`] in any [`Form`].
//!
//! Inner shape, as in every op module: this file (spec and validation), `reference` (the CPU path
//! through `linattn-reference`), `cube` (CubeCL kernels), `cuda` (the NVRTC launcher).

mod frontends;
mod reference;

#[cfg(feature = "cube")]
pub mod cube;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use frontends::{gla, mamba2_gate, retnet_gates};
pub use linattn_reference::linear::{Dims, Direction, Form, GateKind};

use crate::backend::{Backend, ValueCheck};
use crate::error::{Error, Result};
use crate::tensor::{DType, Shaped, Tensor};
use crate::validation::*;

/// A gate (natural-log decays, all `<= 0`) over host tensors, or over any [`Shaped`] stand-in
/// for shape-only validation ([`LinearAttention::validate_layout`]).
#[derive(Debug)]
pub enum Gate<'a, T = Tensor> {
    None,
    /// `[H]`.
    PerHead(&'a T),
    /// `[B, T, H]`.
    Scalar(&'a T),
    /// `[B, T, H, K]`.
    Vector(&'a T),
}

impl<T> Clone for Gate<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Gate<'_, T> {}

impl<'a, T> Gate<'a, T> {
    pub fn kind(&self) -> GateKind {
        match self {
            Gate::None => GateKind::None,
            Gate::PerHead(_) => GateKind::PerHead,
            Gate::Scalar(_) => GateKind::Scalar,
            Gate::Vector(_) => GateKind::Vector,
        }
    }

    pub fn tensor(&self) -> Option<&'a T> {
        match *self {
            Gate::None => None,
            Gate::PerHead(t) | Gate::Scalar(t) | Gate::Vector(t) => Some(t),
        }
    }
}

/// One engine problem over host tensors (or, for [`validate_layout`](Self::validate_layout)
/// alone, over any [`Shaped`] stand-in such as [`crate::TensorMeta`]). Build it with
/// [`LinearAttention::causal`] or [`LinearAttention::bidirectional`] and the `with_*` methods.
#[derive(Debug)]
pub struct LinearAttention<'a, T = Tensor> {
    /// `[B, T, H, K]`.
    pub q: &'a T,
    /// `[B, T, H, K]`.
    pub k: &'a T,
    /// `[B, T, H, V]`.
    pub v: &'a T,
    /// Forward gate (below the diagonal).
    pub gate: Gate<'a, T>,
    /// Bidirectional only: the gate above the diagonal; `None` uses `gate` for both.
    pub gate_bwd: Option<Gate<'a, T>>,
    pub direction: Direction,
    /// Defaults to `K^-0.5`.
    pub scale: Option<f64>,
    /// Row-sum normalisation with this `eps`.
    pub normalize: Option<f64>,
    /// Causal only: initial state `[N, H, K, V]`.
    pub h0: Option<&'a T>,
    /// Packed variable-length offsets `[N + 1]` (with `B = 1`).
    pub cu_seqlens: Option<&'a [i64]>,
    /// Over device tensors: whether the inputs' values (finite, gates `<= 0`; and the
    /// cotangents' in the backward pass) are checked on the device before any launch
    /// ([`ValueCheck::On`], the default). Host tensors are always checked on the host.
    pub value_check: ValueCheck,
}

impl<T> Clone for LinearAttention<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for LinearAttention<'_, T> {}

impl<'a, T: Shaped> LinearAttention<'a, T> {
    pub fn causal(q: &'a T, k: &'a T, v: &'a T) -> Self {
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
            value_check: ValueCheck::On,
        }
    }

    pub fn bidirectional(q: &'a T, k: &'a T, v: &'a T) -> Self {
        LinearAttention {
            direction: Direction::Bidirectional,
            ..Self::causal(q, k, v)
        }
    }

    pub fn with_gate(mut self, gate: Gate<'a, T>) -> Self {
        self.gate = gate;
        self
    }

    pub fn with_gate_bwd(mut self, gate_bwd: Gate<'a, T>) -> Self {
        self.gate_bwd = Some(gate_bwd);
        self
    }

    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    pub fn with_normalize(mut self, eps: f64) -> Self {
        self.normalize = Some(eps);
        self
    }

    pub fn with_h0(mut self, h0: &'a T) -> Self {
        self.h0 = Some(h0);
        self
    }

    pub fn with_cu_seqlens(mut self, cu_seqlens: &'a [i64]) -> Self {
        self.cu_seqlens = Some(cu_seqlens);
        self
    }

    /// Over device tensors: [`ValueCheck::On`] (the default) checks the values on the device
    /// first (one pass per input and a small read-back, which waits for the device once);
    /// [`ValueCheck::Off`] skips it and keeps the call asynchronous (the caller vouches for
    /// finite inputs and gates `<= 0`: a positive gate overflows).
    pub fn with_value_check(mut self, check: ValueCheck) -> Self {
        self.value_check = check;
        self
    }

    /// For a decoding step: the token must be causal, without normalisation, `h0` (the state is
    /// passed apart) or `cu_seqlens`.
    #[cfg(any(feature = "cube", feature = "cuda"))]
    pub(crate) fn expect_decode_token(&self) -> Result<()> {
        if self.direction != Direction::Causal
            || self.normalize.is_some()
            || self.h0.is_some()
            || self.cu_seqlens.is_some()
        {
            return Err(Error::InvalidArgument(
                "decode_step takes a causal token without normalisation, h0 or cu_seqlens (the state is passed apart)".into(),
            ));
        }
        Ok(())
    }

    /// Checks every shape, dtype and option, not the values: what can be checked from metadata
    /// alone (framework adapters call it before queueing kernels; the host path adds the value
    /// checks in [`LinearAttention::validate`]). Returns the sizes every backend works from.
    pub fn validate_layout(&self) -> Result<Spec> {
        let qs = expect_rank("q", self.q, &["B", "T", "H", "K"])?;
        expect_nonzero("q", self.q)?;
        let (b, t, h, k) = (qs[0], qs[1], qs[2], qs[3]);
        expect_shape("k", self.k, &["B", "T", "H", "K"], &[b, t, h, k])?;
        let vs = expect_rank("v", self.v, &["B", "T", "H", "V"])?;
        expect_nonzero("v", self.v)?;
        let v = vs[3];
        expect_shape("v", self.v, &["B", "T", "H", "V"], &[b, t, h, v])?;
        let dtype = expect_same_dtype(&[("q", self.q), ("k", self.k), ("v", self.v)])?;
        let dims = Dims { b, t, h, k, v };

        let cu_seqlens = match self.cu_seqlens {
            None => None,
            Some(cu) => {
                if b != 1 {
                    return Err(Error::BadCuSeqlens(format!(
                        "variable length needs B = 1 (packed sequences), got B = {b}"
                    )));
                }
                Some(parse_cu_seqlens(cu, t)?)
            }
        };
        let num_sequences = cu_seqlens.as_ref().map_or(b, |cu| cu.len() - 1);

        gate_layout("g", &self.gate, &dims)?;
        let gate_kind = self.gate.kind();
        if let Some(gate_bwd) = &self.gate_bwd {
            if self.direction != Direction::Bidirectional {
                return Err(Error::InvalidArgument(
                    "a backward-direction gate `g_bwd` needs the bidirectional direction".into(),
                ));
            }
            if gate_bwd.kind() != gate_kind {
                return Err(Error::InvalidArgument(format!(
                    "`g_bwd` must be the same kind of gate as `g` ({:?}), got {:?}",
                    gate_kind,
                    gate_bwd.kind()
                )));
            }
            gate_layout("g_bwd", gate_bwd, &dims)?;
        }

        let scale = expect_scale(self.scale.unwrap_or((k as f64).powf(-0.5)))?;
        if let Some(eps) = self.normalize
            && !(eps.is_finite() && eps >= 0.0)
        {
            return Err(Error::InvalidArgument(format!(
                "normalisation eps must be finite and >= 0, got {eps}"
            )));
        }
        if let Some(h0) = self.h0 {
            if self.direction != Direction::Causal {
                return Err(Error::InvalidArgument(
                    "an initial state `h0` needs the causal direction".into(),
                ));
            }
            if self.normalize.is_some() {
                return Err(Error::Unsupported(
                    "an initial state `h0` together with row-sum normalisation".into(),
                ));
            }
            expect_shape("h0", h0, &["N", "H", "K", "V"], &[num_sequences, h, k, v])?;
        }

        Ok(Spec {
            dims,
            dtype,
            gate_kind,
            has_gate_bwd: self.gate_bwd.is_some(),
            direction: self.direction,
            scale,
            normalize: self.normalize,
            has_h0: self.h0.is_some(),
            cu_seqlens,
            num_sequences,
        })
    }
}

impl LinearAttention<'_> {
    /// Checks every shape, value and option ([`validate_layout`](Self::validate_layout), then
    /// finite inputs and gates `<= 0`); returns the sizes every backend works from.
    pub fn validate(&self) -> Result<Spec> {
        let spec = self.validate_layout()?;
        for (name, tensor) in [("q", self.q), ("k", self.k), ("v", self.v)] {
            expect_finite(name, tensor)?;
        }
        if let Some(g) = self.gate.tensor() {
            expect_log_decay("g", g)?;
        }
        if let Some(g) = self.gate_bwd.and_then(|g| g.tensor()) {
            expect_log_decay("g_bwd", g)?;
        }
        if let Some(h0) = self.h0 {
            expect_finite("h0", h0)?;
        }
        Ok(spec)
    }
}

fn gate_layout<T: Shaped>(name: &str, gate: &Gate<T>, dims: &Dims) -> Result<()> {
    let Dims { b, t, h, k, .. } = *dims;
    match *gate {
        Gate::None => Ok(()),
        Gate::PerHead(g) => expect_shape(name, g, &["H"], &[h]),
        Gate::Scalar(g) => expect_shape(name, g, &["B", "T", "H"], &[b, t, h]),
        Gate::Vector(g) => expect_shape(name, g, &["B", "T", "H", "K"], &[b, t, h, k]),
    }
}

/// A validated problem: sizes and options every backend works from.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub dims: Dims,
    /// The dtype of `q`, `k`, `v`.
    pub dtype: DType,
    pub gate_kind: GateKind,
    pub has_gate_bwd: bool,
    pub direction: Direction,
    pub scale: f64,
    pub normalize: Option<f64>,
    pub has_h0: bool,
    pub cu_seqlens: Option<Vec<usize>>,
    /// `B`, or the number of packed segments.
    pub num_sequences: usize,
}

impl Spec {
    /// Whether the final state `ht` is part of the output (causal without normalisation).
    pub fn has_final_state(&self) -> bool {
        self.direction == Direction::Causal && self.normalize.is_none()
    }

    /// Shape of `h0` / `ht`: `[N, H, K, V]`.
    pub fn state_shape(&self) -> Vec<usize> {
        vec![self.num_sequences, self.dims.h, self.dims.k, self.dims.v]
    }

    /// Shape of `o`: `[B, T, H, V]`.
    pub fn o_shape(&self) -> Vec<usize> {
        let d = self.dims;
        vec![d.b, d.t, d.h, d.v]
    }

    /// Checks the cotangents of a backward call.
    pub fn validate_cotangents(&self, d_o: &Tensor, d_ht: Option<&Tensor>) -> Result<()> {
        expect_shape("do", d_o, &["B", "T", "H", "V"], &self.o_shape())?;
        expect_finite("do", d_o)?;
        if let Some(d_ht) = d_ht {
            if !self.has_final_state() {
                return Err(Error::InvalidArgument(
                    "`dht` given but this problem has no final state (bidirectional or normalised)"
                        .into(),
                ));
            }
            expect_shape("dht", d_ht, &["N", "H", "K", "V"], &self.state_shape())?;
            expect_finite("dht", d_ht)?;
        }
        Ok(())
    }
}

/// Forward result. The CPU backend returns f64 tensors, the GPU backends f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// `[B, T, H, V]`.
    pub o: Tensor,
    /// `[N, H, K, V]`, when [`Spec::has_final_state`].
    pub ht: Option<Tensor>,
}

/// Gradients of `loss = sum(o * do) + sum(ht * dht)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Grads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
    /// Shape of `g`; `None` without a gate. Without `g_bwd` in a bidirectional problem it holds both
    /// directions' contributions.
    pub dg: Option<Tensor>,
    /// Shape of `g_bwd`, when given.
    pub dg_bwd: Option<Tensor>,
    /// Shape of `h0`, when given.
    pub dh0: Option<Tensor>,
}

/// Runs the forward pass.
pub fn forward(backend: &Backend, args: &LinearAttention, form: Form) -> Result<Output> {
    let spec = args.validate()?;
    check_form(&form)?;
    if let Some(narrowed) = Narrowed::for_device(backend, args, &[]) {
        return forward(backend, &narrowed.problem(args), form);
    }
    match backend {
        Backend::Cpu => Ok(reference::forward(&spec, args, form)),
        #[cfg(feature = "cube")]
        Backend::Cube(ctx) => cube::forward(ctx, &spec, args, form),
        #[cfg(feature = "cuda")]
        Backend::Cuda(ctx) => cuda::forward(ctx, &spec, args, form),
    }
}

/// Runs the backward pass (recomputing what it needs from the inputs).
pub fn backward(
    backend: &Backend,
    args: &LinearAttention,
    form: Form,
    d_o: &Tensor,
    d_ht: Option<&Tensor>,
) -> Result<Grads> {
    let spec = args.validate()?;
    check_form(&form)?;
    spec.validate_cotangents(d_o, d_ht)?;
    if let Some(n) = Narrowed::for_device(backend, args, &[Some(d_o), d_ht]) {
        let d_o = n.extra[0].as_ref().unwrap_or(d_o);
        let d_ht = d_ht.map(|t| n.extra[1].as_ref().unwrap_or(t));
        return backward(backend, &n.problem(args), form, d_o, d_ht);
    }
    match backend {
        Backend::Cpu => Ok(reference::backward(&spec, args, form, d_o, d_ht)),
        #[cfg(feature = "cube")]
        Backend::Cube(ctx) => cube::backward(ctx, &spec, args, form, d_o, d_ht),
        #[cfg(feature = "cuda")]
        Backend::Cuda(ctx) => cuda::backward(ctx, &spec, args, form, d_o, d_ht),
    }
}

/// f32 copies of the f64 inputs of a problem for a device backend
/// ([`crate::tensor::narrowed_for_device`]); `None` on the CPU or when no input is f64.
struct Narrowed {
    q: Option<Tensor>,
    k: Option<Tensor>,
    v: Option<Tensor>,
    gate: Option<Tensor>,
    gate_bwd: Option<Tensor>,
    h0: Option<Tensor>,
    /// The cotangents (or other tensors) passed as `extra`, in order.
    extra: Vec<Option<Tensor>>,
}

impl Narrowed {
    fn for_device(
        backend: &Backend,
        args: &LinearAttention,
        extra: &[Option<&Tensor>],
    ) -> Option<Narrowed> {
        if matches!(backend, Backend::Cpu) {
            return None;
        }
        let narrow = |t: Option<&Tensor>| t.and_then(crate::tensor::narrowed_for_device);
        let n = Narrowed {
            q: narrow(Some(args.q)),
            k: narrow(Some(args.k)),
            v: narrow(Some(args.v)),
            gate: narrow(args.gate.tensor()),
            gate_bwd: narrow(args.gate_bwd.as_ref().and_then(Gate::tensor)),
            h0: narrow(args.h0),
            extra: extra.iter().map(|t| narrow(*t)).collect(),
        };
        let any = [&n.q, &n.k, &n.v, &n.gate, &n.gate_bwd, &n.h0]
            .into_iter()
            .chain(&n.extra)
            .any(Option::is_some);
        any.then_some(n)
    }

    /// `args` with every narrowed tensor in place of its f64 original.
    fn problem<'s>(&'s self, args: &LinearAttention<'s>) -> LinearAttention<'s> {
        let pick = |own: &'s Option<Tensor>, t: &'s Tensor| own.as_ref().unwrap_or(t);
        let gate = |own: &'s Option<Tensor>, g: Gate<'s>| match g {
            Gate::None => Gate::None,
            Gate::PerHead(t) => Gate::PerHead(pick(own, t)),
            Gate::Scalar(t) => Gate::Scalar(pick(own, t)),
            Gate::Vector(t) => Gate::Vector(pick(own, t)),
        };
        LinearAttention {
            q: pick(&self.q, args.q),
            k: pick(&self.k, args.k),
            v: pick(&self.v, args.v),
            gate: gate(&self.gate, args.gate),
            gate_bwd: args.gate_bwd.map(|g| gate(&self.gate_bwd, g)),
            h0: args.h0.map(|t| pick(&self.h0, t)),
            ..*args
        }
    }
}

fn check_form(form: &Form) -> Result<()> {
    if let Form::Chunkwise { chunk: 0 } = form {
        return Err(Error::InvalidArgument("chunk size must be >= 1".into()));
    }
    Ok(())
}

/// Result of one decoding step.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeOutput {
    /// `[B, 1, H, V]`.
    pub o: Tensor,
    /// The updated state `[B, H, K, V]`.
    pub state: Tensor,
}

/// One causal decoding step (ops.md section 1, recurrent form with one token):
/// `S <- diag(exp g) S + k^T v`, `o = scale q S`.
///
/// `state` is `[B, H, K, V]`; `q`, `k` are `[B, 1, H, K]`, `v` `[B, 1, H, V]`; the gate is for
/// that token (`[H]`, `[B, 1, H]` or `[B, 1, H, K]`); `scale` defaults to `K^-0.5`. Returns the
/// output and the new state (the input is not modified).
pub fn decode_step(
    backend: &Backend,
    state: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gate: Gate,
    scale: Option<f64>,
) -> Result<DecodeOutput> {
    let dims = validate_decode(state, q, k, v, &gate)?;
    let scale = expect_scale(scale.unwrap_or((dims.k as f64).powf(-0.5)))?;
    // f64 inputs are narrowed to f32 on the host for the device backends.
    let tensors = [Some(state), Some(q), Some(k), Some(v), gate.tensor()];
    if let Some(n) = crate::tensor::narrowed_all(backend, &tensors) {
        let pick = |i: usize, t: &'_ Tensor| n[i].clone().unwrap_or_else(|| t.clone());
        let g = gate.tensor().map(|t| pick(4, t));
        let gate = match (gate, g.as_ref()) {
            (Gate::PerHead(_), Some(t)) => Gate::PerHead(t),
            (Gate::Scalar(_), Some(t)) => Gate::Scalar(t),
            (Gate::Vector(_), Some(t)) => Gate::Vector(t),
            _ => Gate::None,
        };
        let (state, q, k, v) = (pick(0, state), pick(1, q), pick(2, k), pick(3, v));
        return decode_step(backend, &state, &q, &k, &v, gate, Some(scale));
    }
    match backend {
        Backend::Cpu => Ok(reference::decode_step(&dims, state, q, k, v, &gate, scale)),
        #[cfg(feature = "cube")]
        Backend::Cube(ctx) => cube::decode_step(ctx, state, q, k, v, gate, scale),
        #[cfg(feature = "cuda")]
        Backend::Cuda(ctx) => {
            // The CUDA step updates an f32 state in place; the public API leaves its input alone.
            let mut new_state = state.to_dtype(DType::F32);
            let o = cuda::decode_step(ctx, &mut new_state, q, k, v, gate, Some(scale))?;
            Ok(DecodeOutput {
                o,
                state: new_state,
            })
        }
    }
}

/// Shapes and values of a decoding step; returns its sizes (`t = 1`).
fn validate_decode(
    state: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gate: &Gate,
) -> Result<Dims> {
    // The sizes come from the token (q gives B, H, K; v gives V), so that a state of the wrong
    // shape is reported as the state's error, not as a mismatch of q.
    let qs = expect_rank("q", q, &["B", "1", "H", "K"])?;
    expect_nonzero("q", q)?;
    let (b, h, kd) = (qs[0], qs[2], qs[3]);
    let vd = expect_rank("v", v, &["B", "1", "H", "V"])?[3];
    expect_nonzero("v", v)?;
    expect_shape("q", q, &["B", "1", "H", "K"], &[b, 1, h, kd])?;
    expect_shape("k", k, &["B", "1", "H", "K"], &[b, 1, h, kd])?;
    expect_shape("v", v, &["B", "1", "H", "V"], &[b, 1, h, vd])?;
    expect_shape("state", state, &["B", "H", "K", "V"], &[b, h, kd, vd])?;
    expect_same_dtype(&[("q", q), ("k", k), ("v", v)])?;
    for (name, tensor) in [("state", state), ("q", q), ("k", k), ("v", v)] {
        expect_finite(name, tensor)?;
    }
    let dims = Dims {
        b,
        t: 1,
        h,
        k: kd,
        v: vd,
    };
    gate_layout("g", gate, &dims)?;
    if let Some(g) = gate.tensor() {
        expect_log_decay("g", g)?;
    }
    Ok(dims)
}
