//! CubeCL kernels of LightNet: the additive gate (a `logcumsumexp` scan over T per key channel,
//! forward and backward, carrying `z` across chunks and into the next call through the state) and
//! the softmax of the non-causal form, both feeding the engine of [`crate::linear::cube`].
//!
//! Causal: [`additive_gate`](fn@additive_gate) turns the logits `k` into `khat` and the vector gate `g`; the engine
//! runs causal GLA on `(q, khat, v, g)` with `h0 = S0`; backward, the engine's `dkhat` and `dg` go
//! through [`additive_gate_backward`](fn@additive_gate_backward). Non-causal: [`softmax_keys`](fn@softmax_keys) gives `khat = softmax_t(k)`
//! per channel and the engine runs bidirectional without a gate (plain non-causal linear
//! attention); backward through [`softmax_keys_backward`](fn@softmax_keys_backward).
//!
//! **Numerics.** With `d = z_{t-1} - k_t`, `g_t = logsigmoid(d) = min(d, 0) - log1p(exp(-|d|))`
//! (`<= 0`), `z_t = max(z_{t-1}, k_t) + log1p(exp(-|d|))` and `khat_t = exp(k_t - z_t)` (`<= 1`):
//! every `exp` has a non-positive argument and `z_{t-1} - z_t` is never formed from infinities.
//! `log1p` is evaluated as `log(u) * x / (u - 1)` with `u = 1 + x` (exact to an ulp where the
//! naive `log(1 + x)` would lose every digit of a small `x`).
//!
//! Each scan spends one loop iteration per token in one invocation (three for the softmax): on
//! llvmpipe sequences up to [`crate::cube::LLVMPIPE_MAX_SEQUENCE`] tokens (checked by the
//! engine).

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::{
    LightNet, LightNetFinalState, LightNetGrads, LightNetOutput, LightNetSpec, LightNetStateRef,
};
use crate::cube::kernels::{alloc_f32, fill, output};
use crate::cube::launch::{per_item, thread_index};
use crate::cube::values::{self, ValueCheck};
use crate::cube::{CubeContext, DeviceTensor};
use crate::error::Result;
use crate::linear::cube::layout::Sequences;
use crate::linear::cube::{Problem, Run};
use crate::linear::{Direction, Form};
use crate::tensor::Tensor;

/// `log(1 + x)` for `x >= 0`, accurate for small `x` (Goldberg's correction).
#[cube]
fn log1p_accurate(x: f32) -> f32 {
    let u = 1.0f32 + x;
    let mut r = x;
    if u != 1.0f32 {
        r = u.ln() * x / (u - 1.0f32);
    }
    r
}

/// The additive gate, one thread per (sequence, head, key channel): `khat` and `g`
/// (`[rows, H, K]`) and the final `z` (`[N, H, K]`). Starts from `z0` when `has_z0` (a `-inf`
/// entry means an empty prefix); before the first token of a sequence without one, `z_0 = k_0`,
/// `khat_0 = 1`, `g_0 = 0`. `neg_inf` holds one `-inf`, the `z` of an empty sequence.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn additive_gate(
    k: &[f32],
    seqs: &[u32],
    z0: &[f32],
    neg_inf: &[f32],
    khat: &mut [f32],
    g: &mut [f32],
    z_final: &mut [f32],
    n_seq: usize,
    heads: usize,
    dk: usize,
    has_z0: u32,
) {
    let id = thread_index();
    if id < n_seq * heads * dk {
        let kk = id % dk;
        let h = (id / dk) % heads;
        let n = id / (dk * heads);
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let mut z = neg_inf[0];
        let mut started = false;
        if has_z0 == 1 {
            z = z0[id];
            // Finite z0 (validation rules out +inf and NaN): a non-empty prefix.
            started = z > -3.0e38f32;
        }
        for tau in 0..slen {
            let idx = ((s0 + tau) * heads + h) * dk + kk;
            let x = k[idx];
            let mut gate = 0.0f32;
            if started {
                let d = z - x;
                let l = log1p_accurate((-d.abs()).exp());
                gate = d.min(0.0f32) - l;
                z = z.max(x) + l;
            } else {
                z = x;
                started = true;
            }
            g[idx] = gate;
            khat[idx] = (x - z).exp();
        }
        z_final[id] = z;
    }
}

/// Backward of the additive gate, one thread per (sequence, head, key channel), a reverse scan.
/// With `dz_t = -khat_t dkhat_t - dg_t [g_t depends on z_{t-1}] + dg_{t+1}` and
/// `R_t = sum_{u >= t} dz_u exp(z_t - z_u) = dz_t + exp(g_{t+1}) R_{t+1}` (exponents `<= 0`),
/// `dk_t = khat_t (dkhat_t + R_t)`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn additive_gate_backward(
    khat: &[f32],
    g: &[f32],
    dkhat: &[f32],
    dg: &[f32],
    seqs: &[u32],
    z0: &[f32],
    dk_out: &mut [f32],
    n_seq: usize,
    heads: usize,
    dk: usize,
    has_z0: u32,
) {
    let id = thread_index();
    if id < n_seq * heads * dk {
        let kk = id % dk;
        let h = (id / dk) % heads;
        let n = id / (dk * heads);
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let mut started0 = false;
        if has_z0 == 1 {
            started0 = z0[id] > -3.0e38f32;
        }
        let mut r = 0.0f32;
        for step in 0..slen {
            let tau = slen - 1 - step;
            let idx = ((s0 + tau) * heads + h) * dk + kk;
            let kh = khat[idx];
            let dkh = dkhat[idx];
            let mut dz = -kh * dkh;
            if tau > 0 || started0 {
                dz -= dg[idx];
            }
            let mut carried = 0.0f32;
            if tau + 1 < slen {
                let next = idx + heads * dk;
                dz += dg[next];
                carried = g[next].exp() * r;
            }
            r = dz + carried;
            dk_out[idx] = kh * (dkh + r);
        }
    }
}

/// Non-causal keys, one thread per (sequence, head, key channel):
/// `khat_t = exp(k_t - logsumexp_u k_u)` over the sequence (max-shifted: every `exp` argument is
/// `<= 0`).
#[cube(launch_unchecked)]
pub fn softmax_keys(
    k: &[f32],
    seqs: &[u32],
    khat: &mut [f32],
    n_seq: usize,
    heads: usize,
    dk: usize,
) {
    let id = thread_index();
    if id < n_seq * heads * dk {
        let kk = id % dk;
        let h = (id / dk) % heads;
        let n = id / (dk * heads);
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        if slen > 0 {
            let mut m = k[(s0 * heads + h) * dk + kk];
            for tau in 1..slen {
                m = m.max(k[((s0 + tau) * heads + h) * dk + kk]);
            }
            let mut sum = 0.0f32;
            for tau in 0..slen {
                sum += (k[((s0 + tau) * heads + h) * dk + kk] - m).exp();
            }
            let lse = m + sum.ln();
            for tau in 0..slen {
                let idx = ((s0 + tau) * heads + h) * dk + kk;
                khat[idx] = (k[idx] - lse).exp();
            }
        }
    }
}

/// Backward of the softmax: `dk_t = khat_t (dkhat_t - sum_u khat_u dkhat_u)`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn softmax_keys_backward(
    khat: &[f32],
    dkhat: &[f32],
    seqs: &[u32],
    dk_out: &mut [f32],
    n_seq: usize,
    heads: usize,
    dk: usize,
) {
    let id = thread_index();
    if id < n_seq * heads * dk {
        let kk = id % dk;
        let h = (id / dk) % heads;
        let n = id / (dk * heads);
        let s0 = seqs[2 * n] as usize;
        let slen = seqs[2 * n + 1] as usize;
        let mut dot = 0.0f32;
        for tau in 0..slen {
            let idx = ((s0 + tau) * heads + h) * dk + kk;
            dot += khat[idx] * dkhat[idx];
        }
        for tau in 0..slen {
            let idx = ((s0 + tau) * heads + h) * dk + kk;
            dk_out[idx] = khat[idx] * (dkhat[idx] - dot);
        }
    }
}

/// f32 device buffers of a LightNet problem's inputs.
struct DeviceInputs {
    q: Handle,
    k: Handle,
    v: Handle,
    s0: Option<Handle>,
    z0: Option<Handle>,
}

impl DeviceInputs {
    fn new(ctx: &CubeContext, args: &LightNet<'_, DeviceTensor>) -> Result<DeviceInputs> {
        Ok(DeviceInputs {
            q: args.q.to_f32(ctx, "q")?,
            k: args.k.to_f32(ctx, "k")?,
            v: args.v.to_f32(ctx, "v")?,
            s0: args
                .initial_state
                .map(|st| st.s.to_f32(ctx, "s0"))
                .transpose()?,
            z0: args
                .initial_state
                .map(|st| st.z.to_f32(ctx, "z0"))
                .transpose()?,
        })
    }

    /// The device value check of the inputs (finite `q, k, v, s0`; `z0` may hold `-inf`, the
    /// log-normaliser of an empty prefix, so it is not checked here).
    fn check(&self, ctx: &CubeContext, spec: &LightNetSpec, d_o: Option<&Handle>) -> Result<()> {
        let d = spec.dims;
        let (qk, o) = (d.b * d.t * d.h * d.k, d.b * d.t * d.h * d.v);
        let s_len = spec.num_sequences * d.h * d.k * d.v;
        let mut checked = vec![
            values::Checked {
                name: "q",
                buffer: &self.q,
                len: qk,
                gate: false,
            },
            values::Checked {
                name: "k",
                buffer: &self.k,
                len: qk,
                gate: false,
            },
            values::Checked {
                name: "v",
                buffer: &self.v,
                len: o,
                gate: false,
            },
        ];
        if let Some(s0) = self.s0.as_ref() {
            checked.push(values::Checked {
                name: "s0",
                buffer: s0,
                len: s_len,
                gate: false,
            });
        }
        if let Some(d_o) = d_o {
            checked.push(values::Checked {
                name: "do",
                buffer: d_o,
                len: o,
                gate: false,
            });
        }
        values::check(ctx, &checked)
    }
}

/// Host tensors uploaded, in the shape of a [`LightNet`] over device tensors.
struct Uploaded {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    state: Option<(DeviceTensor, DeviceTensor)>,
}

impl Uploaded {
    fn new(ctx: &CubeContext, args: &LightNet) -> Result<Uploaded> {
        Ok(Uploaded {
            q: ctx.upload("q", args.q)?,
            k: ctx.upload("k", args.k)?,
            v: ctx.upload("v", args.v)?,
            state: args
                .initial_state
                .map(|st| -> Result<_> {
                    // `z0` may hold `-inf` (an empty prefix): upload it as f32 whatever its dtype.
                    let z = Tensor::f32_unchecked(st.z.shape().to_vec(), st.z.to_f32_vec());
                    Ok((ctx.upload("s0", st.s)?, ctx.upload("z0", &z)?))
                })
                .transpose()?,
        })
    }

    fn problem<'a>(&'a self, args: &LightNet<'a>) -> LightNet<'a, DeviceTensor> {
        LightNet {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            scale: args.scale,
            bidirectional: args.bidirectional,
            initial_state: self.state.as_ref().map(|(s, z)| LightNetStateRef { s, z }),
            cu_seqlens: args.cu_seqlens,
            // The host API validated every value before the upload: no second check.
            value_check: ValueCheck::Off,
        }
    }
}

/// A buffer argument of `len` elements.
///
/// # Safety
/// `handle` must hold at least `len.max(1)` elements of the kernel's element type.
unsafe fn arg(handle: &Handle, len: usize) -> BufferArg {
    unsafe { BufferArg::from_raw_parts(handle.clone(), len.max(1)) }
}

/// `(khat, g, z_final)` of the causal form.
fn gate(
    ctx: &CubeContext,
    spec: &LightNetSpec,
    seqs: &Sequences,
    inputs: &DeviceInputs,
) -> (Handle, Handle, Handle) {
    let d = spec.dims;
    let n_seq = seqs.count();
    let qk_len = seqs.rows * d.h * d.k;
    let z_len = n_seq * d.h * d.k;
    let khat = output(ctx, qk_len);
    let g = output(ctx, qk_len);
    let z_final = output(ctx, z_len);
    let neg_inf = alloc_f32(ctx, 1);
    fill(ctx, &neg_inf, 1, f32::NEG_INFINITY);
    let z0_dummy = alloc_f32(ctx, 1);
    let (count, dim) = per_item(z_len);
    // SAFETY: `k`, `khat`, `g` are `[rows, H, K]`; `z0`, `z_final` `[N, H, K]`.
    unsafe {
        additive_gate::launch_unchecked(
            ctx.client(),
            count,
            dim,
            arg(&inputs.k, qk_len),
            arg(&seqs.table, 2 * n_seq),
            arg(inputs.z0.as_ref().unwrap_or(&z0_dummy), z_len),
            arg(&neg_inf, 1),
            arg(&khat, qk_len),
            arg(&g, qk_len),
            arg(&z_final, z_len),
            n_seq,
            d.h,
            d.k,
            inputs.z0.is_some() as u32,
        )
    };
    (khat, g, z_final)
}

/// `khat` of the non-causal form.
fn softmax(ctx: &CubeContext, spec: &LightNetSpec, seqs: &Sequences, k: &Handle) -> Handle {
    let d = spec.dims;
    let n_seq = seqs.count();
    let qk_len = seqs.rows * d.h * d.k;
    let khat = output(ctx, qk_len);
    let (count, dim) = per_item(n_seq * d.h * d.k);
    // SAFETY: `k`, `khat` are `[rows, H, K]`; every row belongs to one sequence.
    unsafe {
        softmax_keys::launch_unchecked(
            ctx.client(),
            count,
            dim,
            arg(k, qk_len),
            arg(&seqs.table, 2 * n_seq),
            arg(&khat, qk_len),
            n_seq,
            d.h,
            d.k,
        )
    };
    khat
}

fn engine_problem(
    ctx: &CubeContext,
    spec: &LightNetSpec,
    inputs: &DeviceInputs,
    khat: Handle,
    g: Option<Handle>,
) -> Result<Problem> {
    Problem::from_buffers(
        ctx,
        spec.dims,
        spec.cu_seqlens.as_deref(),
        spec.scale as f32,
        if spec.bidirectional {
            Direction::Bidirectional
        } else {
            Direction::Causal
        },
        (inputs.q.clone(), khat, inputs.v.clone()),
        g,
        inputs.s0.clone(),
    )
}

/// Forward result on the device (f32).
#[derive(Clone, Debug)]
pub struct DeviceLightNetOutput {
    /// `[B, T, H, V]`.
    pub o: DeviceTensor,
    /// Causal only: `(S [N, H, K, V], z [N, H, K])`.
    pub state: Option<(DeviceTensor, DeviceTensor)>,
}

/// Gradients on the device (f32): `dq`, `dk` (of the logits), `dv`.
#[derive(Clone, Debug)]
pub struct DeviceLightNetGrads {
    pub dq: DeviceTensor,
    pub dk: DeviceTensor,
    pub dv: DeviceTensor,
}

/// LightNet's forward pass over device tensors (the transform and the engine both on the
/// device; nothing is copied to the host). With the builder's value check on (the default,
/// [`LightNet::with_value_check`]) the inputs are checked on the device first (finite
/// `q, k, v, s0`), giving the host API's typed errors; the `z0` and `s0` consistency rule of
/// [`LightNet::validate`] is the caller's to keep.
pub fn forward_device(
    ctx: &CubeContext,
    args: &LightNet<'_, DeviceTensor>,
    form: Form,
) -> Result<DeviceLightNetOutput> {
    let spec = args.validate_layout()?;
    super::check_form(&form)?;
    let inputs = DeviceInputs::new(ctx, args)?;
    if args.value_check == ValueCheck::On {
        inputs.check(ctx, &spec, None)?;
    }
    let seqs = Sequences::new(ctx, spec.dims.b, spec.dims.t, spec.cu_seqlens.as_deref());
    let o_shape = spec.o_shape();
    if spec.bidirectional {
        let khat = softmax(ctx, &spec, &seqs, &inputs.k);
        let problem = engine_problem(ctx, &spec, &inputs, khat, None)?;
        let (o, _) = Run::new(ctx, &problem, form)?.forward()?;
        return Ok(DeviceLightNetOutput {
            o: DeviceTensor::f32_unchecked(o, o_shape),
            state: None,
        });
    }
    let (khat, g, z_final) = gate(ctx, &spec, &seqs, &inputs);
    let problem = engine_problem(ctx, &spec, &inputs, khat, Some(g))?;
    let (o, s) = Run::new(ctx, &problem, form)?.forward()?;
    let s = s.expect("the causal engine without normalisation has a final state");
    Ok(DeviceLightNetOutput {
        o: DeviceTensor::f32_unchecked(o, o_shape),
        state: Some((
            DeviceTensor::f32_unchecked(s, spec.s_shape()),
            DeviceTensor::f32_unchecked(z_final, spec.z_shape()),
        )),
    })
}

pub(super) fn forward(
    ctx: &CubeContext,
    _spec: &LightNetSpec,
    args: &LightNet,
    form: Form,
) -> Result<LightNetOutput> {
    let uploaded = Uploaded::new(ctx, args)?;
    let out = forward_device(ctx, &uploaded.problem(args), form)?;
    Ok(LightNetOutput {
        o: ctx.download(&out.o)?,
        state: out
            .state
            .map(|(s, z)| -> Result<_> {
                Ok(LightNetFinalState {
                    s: ctx.download(&s)?,
                    z: ctx.download(&z)?,
                })
            })
            .transpose()?,
    })
}

pub(super) fn backward(
    ctx: &CubeContext,
    _spec: &LightNetSpec,
    args: &LightNet,
    form: Form,
    d_o: &Tensor,
) -> Result<LightNetGrads> {
    let uploaded = Uploaded::new(ctx, args)?;
    let d_o = ctx.upload("do", d_o)?;
    let grads = backward_device(ctx, &uploaded.problem(args), form, &d_o)?;
    Ok(LightNetGrads {
        dq: ctx.download(&grads.dq)?,
        dk: ctx.download(&grads.dk)?,
        dv: ctx.download(&grads.dv)?,
    })
}

/// LightNet's backward pass over device tensors (recomputes what it needs from the inputs).
pub fn backward_device(
    ctx: &CubeContext,
    args: &LightNet<'_, DeviceTensor>,
    form: Form,
    d_o: &DeviceTensor,
) -> Result<DeviceLightNetGrads> {
    let spec = args.validate_layout()?;
    super::check_form(&form)?;
    if d_o.shape() != spec.o_shape() {
        return Err(crate::error::Error::shape(
            "do",
            crate::validation::describe(&["B", "T", "H", "V"], &spec.o_shape()),
            d_o.shape(),
        ));
    }
    let spec = &spec;
    let d = spec.dims;
    let inputs = DeviceInputs::new(ctx, args)?;
    let d_o = d_o.to_f32(ctx, "do")?;
    if args.value_check == ValueCheck::On {
        inputs.check(ctx, spec, Some(&d_o))?;
    }
    let seqs = Sequences::new(ctx, d.b, d.t, spec.cu_seqlens.as_deref());
    let n_seq = seqs.count();
    let qk_len = seqs.rows * d.h * d.k;
    let dk_logits = output(ctx, qk_len);
    let grads = if spec.bidirectional {
        let khat = softmax(ctx, spec, &seqs, &inputs.k);
        let problem = engine_problem(ctx, spec, &inputs, khat.clone(), None)?;
        let grads = Run::new(ctx, &problem, form)?.backward(&d_o, None)?;
        let (count, dim) = per_item(n_seq * d.h * d.k);
        // SAFETY: all `[rows, H, K]`.
        unsafe {
            softmax_keys_backward::launch_unchecked(
                ctx.client(),
                count,
                dim,
                arg(&khat, qk_len),
                arg(&grads.dk, qk_len),
                arg(&seqs.table, 2 * n_seq),
                arg(&dk_logits, qk_len),
                n_seq,
                d.h,
                d.k,
            )
        };
        grads
    } else {
        let (khat, g, _) = gate(ctx, spec, &seqs, &inputs);
        let problem = engine_problem(ctx, spec, &inputs, khat.clone(), Some(g.clone()))?;
        let grads = Run::new(ctx, &problem, form)?.backward(&d_o, None)?;
        let dg = grads.dg.as_ref().expect("the vector gate has a gradient");
        let z0_dummy = alloc_f32(ctx, 1);
        let (count, dim) = per_item(n_seq * d.h * d.k);
        // SAFETY: `khat`, `g`, `dkhat`, `dg`, `dk_logits` are `[rows, H, K]`, `z0` `[N, H, K]`.
        unsafe {
            additive_gate_backward::launch_unchecked(
                ctx.client(),
                count,
                dim,
                arg(&khat, qk_len),
                arg(&g, qk_len),
                arg(&grads.dk, qk_len),
                arg(dg, qk_len),
                arg(&seqs.table, 2 * n_seq),
                arg(inputs.z0.as_ref().unwrap_or(&z0_dummy), n_seq * d.h * d.k),
                arg(&dk_logits, qk_len),
                n_seq,
                d.h,
                d.k,
                inputs.z0.is_some() as u32,
            )
        };
        grads
    };
    let qk_shape = vec![d.b, d.t, d.h, d.k];
    Ok(DeviceLightNetGrads {
        dq: DeviceTensor::f32_unchecked(grads.dq, qk_shape.clone()),
        dk: DeviceTensor::f32_unchecked(dk_logits, qk_shape),
        dv: DeviceTensor::f32_unchecked(grads.dv, spec.o_shape()),
    })
}
