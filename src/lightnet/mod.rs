//! LightNet's additive recurrence (ops.md section 2): causal (`z_t = logcumsumexp(k)`,
//! `khat = exp(k - z)`, decay `g_t = z_{t-1} - z_t`, fed to the decayed linear attention engine) and
//! the non-causal form (softmax of the key logits over the whole sequence). One problem
//! description ([`LightNet`]), validated once on the host ([`LightNet::validate`]), runs on any
//! [`Backend`] in any [`Form`] (the form of the engine underneath).
//!
//! Inner shape, as in every op module: this file (spec and validation), `reference` (the CPU path
//! through `linattn-reference`), `cube` (CubeCL kernels: the transform on the device too),
//! `engine_path` (the transform on the host, the engine on any backend: how `cuda` runs it).

mod engine_path;
mod reference;

#[cfg(feature = "cube")]
pub mod cube;

use crate::backend::{Backend, ValueCheck};
use crate::error::{Error, Result};
use crate::linear::{Dims, Form};
use crate::tensor::{DType, Shaped, Tensor, narrowed_all};
use crate::validation::*;

/// The recurrent state `(S, z)` of causal LightNet, as host tensors (or device tensors, for the
/// device-resident API).
#[derive(Debug)]
pub struct LightNetStateRef<'a, T = Tensor> {
    /// `[N, H, K, V]`: the engine state.
    pub s: &'a T,
    /// `[N, H, K]`: `z = logcumsumexp(k)` at the last token (`-inf` for an empty prefix, whose `S`
    /// must then be zero).
    pub z: &'a T,
}

impl<T> Clone for LightNetStateRef<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for LightNetStateRef<'_, T> {}

/// One LightNet problem over host tensors (or any [`Shaped`] tensors: device tensors for
/// [`cube::forward_device`], metadata for [`LightNet::validate_layout`]). `k` holds the key
/// logits (also the decay logits).
#[derive(Debug)]
pub struct LightNet<'a, T = Tensor> {
    /// `[B, T, H, K]`.
    pub q: &'a T,
    /// `[B, T, H, K]`, key logits.
    pub k: &'a T,
    /// `[B, T, H, V]`.
    pub v: &'a T,
    /// Defaults to `K^-0.5`.
    pub scale: Option<f64>,
    /// `false`: causal (additive recurrence); `true`: non-causal (softmax over the sequence).
    pub bidirectional: bool,
    /// Causal only: the state to continue from.
    pub initial_state: Option<LightNetStateRef<'a, T>>,
    /// Packed variable-length offsets `[N + 1]` (with `B = 1`).
    pub cu_seqlens: Option<&'a [i64]>,
    /// Over device tensors: whether `q, k, v, s0` (and `do` in the backward pass) are checked
    /// for finite values on the device first ([`ValueCheck::On`], the default). Host tensors
    /// are always checked on the host.
    pub value_check: ValueCheck,
}

impl<T> Clone for LightNet<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for LightNet<'_, T> {}

impl<'a, T: Shaped> LightNet<'a, T> {
    pub fn causal(q: &'a T, k: &'a T, v: &'a T) -> Self {
        LightNet {
            q,
            k,
            v,
            scale: None,
            bidirectional: false,
            initial_state: None,
            cu_seqlens: None,
            value_check: ValueCheck::On,
        }
    }

    /// The non-causal form (images, video: one scan regardless of flattening order).
    pub fn non_causal(q: &'a T, k: &'a T, v: &'a T) -> Self {
        LightNet {
            bidirectional: true,
            ..Self::causal(q, k, v)
        }
    }

    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    pub fn with_initial_state(mut self, s: &'a T, z: &'a T) -> Self {
        self.initial_state = Some(LightNetStateRef { s, z });
        self
    }

    pub fn with_cu_seqlens(mut self, cu_seqlens: &'a [i64]) -> Self {
        self.cu_seqlens = Some(cu_seqlens);
        self
    }

    /// Over device tensors: [`ValueCheck::On`] (the default) checks the values on the device
    /// first; [`ValueCheck::Off`] skips that pass (the caller vouches for finite inputs).
    pub fn with_value_check(mut self, check: ValueCheck) -> Self {
        self.value_check = check;
        self
    }

    /// Checks every shape, dtype and option, not the values (see
    /// [`LinearAttention::validate_layout`](crate::linear::LinearAttention::validate_layout)).
    pub fn validate_layout(&self) -> Result<LightNetSpec> {
        let qs = expect_rank("q", self.q, &["B", "T", "H", "K"])?;
        expect_nonzero("q", self.q)?;
        let (b, t, h, k) = (qs[0], qs[1], qs[2], qs[3]);
        expect_shape("k", self.k, &["B", "T", "H", "K"], &[b, t, h, k])?;
        let vs = expect_rank("v", self.v, &["B", "T", "H", "V"])?;
        expect_nonzero("v", self.v)?;
        let v = vs[3];
        expect_shape("v", self.v, &["B", "T", "H", "V"], &[b, t, h, v])?;
        let dtype = expect_same_dtype(&[("q", self.q), ("k", self.k), ("v", self.v)])?;
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
        let scale = expect_scale(self.scale.unwrap_or((k as f64).powf(-0.5)))?;
        if let Some(state) = self.initial_state {
            if self.bidirectional {
                return Err(Error::InvalidArgument(
                    "an initial state `(s0, z0)` needs the causal form".into(),
                ));
            }
            expect_shape(
                "s0",
                state.s,
                &["N", "H", "K", "V"],
                &[num_sequences, h, k, v],
            )?;
            expect_shape("z0", state.z, &["N", "H", "K"], &[num_sequences, h, k])?;
        }
        Ok(LightNetSpec {
            dims: Dims { b, t, h, k, v },
            dtype,
            scale,
            bidirectional: self.bidirectional,
            has_initial_state: self.initial_state.is_some(),
            cu_seqlens,
            num_sequences,
        })
    }
}

impl LightNet<'_> {
    /// Checks every shape, value and option ([`validate_layout`](Self::validate_layout), then
    /// the values); returns the sizes every backend works from.
    pub fn validate(&self) -> Result<LightNetSpec> {
        let spec = self.validate_layout()?;
        for (name, tensor) in [("q", self.q), ("k", self.k), ("v", self.v)] {
            expect_finite(name, tensor)?;
        }
        if let Some(state) = self.initial_state {
            expect_finite("s0", state.s)?;
            // `-inf` is the log-normaliser of an empty prefix; `+inf` and NaN are not.
            let bad = state
                .z
                .to_f64_vec()
                .into_iter()
                .enumerate()
                .find(|(_, z)| z.is_nan() || *z == f64::INFINITY);
            if let Some((index, value)) = bad {
                return Err(Error::NonFinite {
                    tensor: "z0".into(),
                    index,
                    value,
                });
            }
            // An empty prefix has nothing to carry: its `S` row must be zero (the additive gate
            // starts it over at the first token, so a stray row would be kept, not discarded).
            let v = spec.dims.v;
            let s = state.s.to_f64_vec();
            let empty_with_state = state.z.to_f64_vec().into_iter().enumerate().find(|(i, z)| {
                *z == f64::NEG_INFINITY && s[i * v..(i + 1) * v].iter().any(|&x| x != 0.0)
            });
            if let Some((index, _)) = empty_with_state {
                return Err(Error::InvalidArgument(format!(
                    "z0[{index}] is -inf (an empty prefix) but its row of s0 is not zero"
                )));
            }
        }
        Ok(spec)
    }
}

/// A validated LightNet problem.
#[derive(Clone, Debug, PartialEq)]
pub struct LightNetSpec {
    pub dims: Dims,
    pub dtype: DType,
    pub scale: f64,
    pub bidirectional: bool,
    pub has_initial_state: bool,
    pub cu_seqlens: Option<Vec<usize>>,
    pub num_sequences: usize,
}

impl LightNetSpec {
    /// `[B, T, H, V]`.
    pub fn o_shape(&self) -> Vec<usize> {
        let d = self.dims;
        vec![d.b, d.t, d.h, d.v]
    }

    /// `[N, H, K, V]`.
    pub fn s_shape(&self) -> Vec<usize> {
        vec![self.num_sequences, self.dims.h, self.dims.k, self.dims.v]
    }

    /// `[N, H, K]`.
    pub fn z_shape(&self) -> Vec<usize> {
        vec![self.num_sequences, self.dims.h, self.dims.k]
    }
}

/// The final recurrent state `(S, z)` of causal LightNet.
#[derive(Clone, Debug, PartialEq)]
pub struct LightNetFinalState {
    /// `[N, H, K, V]`.
    pub s: Tensor,
    /// `[N, H, K]`.
    pub z: Tensor,
}

/// Forward result. The CPU backend returns f64 tensors, the GPU backends f32.
#[derive(Clone, Debug, PartialEq)]
pub struct LightNetOutput {
    /// `[B, T, H, V]`.
    pub o: Tensor,
    /// Causal only.
    pub state: Option<LightNetFinalState>,
}

/// Gradients of `loss = sum(o * do)` w.r.t. `q`, `k` (the logits) and `v`.
#[derive(Clone, Debug, PartialEq)]
pub struct LightNetGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// Runs the forward pass.
pub fn forward(backend: &Backend, args: &LightNet, form: Form) -> Result<LightNetOutput> {
    let spec = args.validate()?;
    check_form(&form)?;
    if let Some(n) = narrowed_all(backend, &narrowed_inputs(args, None)) {
        return forward(backend, &with_narrowed(args, &n), form);
    }
    match backend {
        Backend::Cpu => Ok(reference::forward(&spec, args, form)),
        #[cfg(feature = "cube")]
        Backend::Cube(ctx) => cube::forward(ctx, &spec, args, form),
        #[cfg(feature = "cuda")]
        Backend::Cuda(_) => engine_path::forward(backend, &spec, args, form),
    }
}

/// The tensors a device backend may need narrowed from f64: q, k, v, s0, z0, then `do`.
fn narrowed_inputs<'a>(args: &LightNet<'a>, d_o: Option<&'a Tensor>) -> [Option<&'a Tensor>; 6] {
    let state = args.initial_state;
    [
        Some(args.q),
        Some(args.k),
        Some(args.v),
        state.map(|s| s.s),
        state.map(|s| s.z),
        d_o,
    ]
}

/// `args` with the narrowed copies of [`narrowed_inputs`] in place of their f64 originals.
fn with_narrowed<'s>(args: &LightNet<'s>, n: &'s [Option<Tensor>]) -> LightNet<'s> {
    let pick = |i: usize, t: &'s Tensor| n[i].as_ref().unwrap_or(t);
    LightNet {
        q: pick(0, args.q),
        k: pick(1, args.k),
        v: pick(2, args.v),
        initial_state: args.initial_state.map(|st| LightNetStateRef {
            s: pick(3, st.s),
            z: pick(4, st.z),
        }),
        ..*args
    }
}

/// Runs the backward pass (recomputing what it needs from the inputs).
pub fn backward(
    backend: &Backend,
    args: &LightNet,
    form: Form,
    d_o: &Tensor,
) -> Result<LightNetGrads> {
    let spec = args.validate()?;
    check_form(&form)?;
    expect_shape("do", d_o, &["B", "T", "H", "V"], &spec.o_shape())?;
    expect_finite("do", d_o)?;
    if let Some(n) = narrowed_all(backend, &narrowed_inputs(args, Some(d_o))) {
        let d_o = n[5].as_ref().unwrap_or(d_o);
        return backward(backend, &with_narrowed(args, &n), form, d_o);
    }
    match backend {
        Backend::Cpu => Ok(reference::backward(&spec, args, form, d_o)),
        #[cfg(feature = "cube")]
        Backend::Cube(ctx) => cube::backward(ctx, &spec, args, form, d_o),
        #[cfg(feature = "cuda")]
        Backend::Cuda(_) => engine_path::backward(backend, &spec, args, form, d_o),
    }
}

/// The forward pass as two stages: the gate transform on the host (f64), then the decayed linear
/// attention engine of `backend` in `form`. This is how the `cuda` backend runs LightNet; on the
/// `cpu` backend it is an independent derivation of the reference's definition-based LightNet
/// (which `linattn validate` compares it with).
pub fn forward_via_engine(
    backend: &Backend,
    args: &LightNet,
    form: Form,
) -> Result<LightNetOutput> {
    let spec = args.validate()?;
    check_form(&form)?;
    engine_path::forward(backend, &spec, args, form)
}

/// The backward pass of [`forward_via_engine`]: the engine's gradients, then the adjoint of the
/// gate transform on the host.
pub fn backward_via_engine(
    backend: &Backend,
    args: &LightNet,
    form: Form,
    d_o: &Tensor,
) -> Result<LightNetGrads> {
    let spec = args.validate()?;
    check_form(&form)?;
    expect_shape("do", d_o, &["B", "T", "H", "V"], &spec.o_shape())?;
    expect_finite("do", d_o)?;
    engine_path::backward(backend, &spec, args, form, d_o)
}

fn check_form(form: &Form) -> Result<()> {
    if let Form::Chunkwise { chunk: 0 } = form {
        return Err(Error::InvalidArgument("chunk size must be >= 1".into()));
    }
    Ok(())
}
