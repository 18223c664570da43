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

use super::{LightNet, LightNetFinalState, LightNetGrads, LightNetOutput, LightNetSpec};
use crate::cube::kernels::{alloc_f32, output, upload_f32};
use crate::cube::launch::{per_item, thread_index};
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

/// f32 device copies of a LightNet problem's inputs.
struct DeviceInputs {
    q: Handle,
    k: Handle,
    v: Handle,
    s0: Option<Handle>,
    z0: Option<Handle>,
}

impl DeviceInputs {
    fn new(ctx: &CubeContext, args: &LightNet) -> Result<DeviceInputs> {
        let f32_of = |name: &str, t: &Tensor| -> Result<Handle> {
            let dev: DeviceTensor = ctx.upload(name, t)?;
            dev.to_f32(ctx, name)
        };
        Ok(DeviceInputs {
            q: f32_of("q", args.q)?,
            k: f32_of("k", args.k)?,
            v: f32_of("v", args.v)?,
            s0: args
                .initial_state
                .map(|st| f32_of("s0", st.s))
                .transpose()?,
            // `z0` may hold `-inf` (an empty prefix): upload it as f32 whatever its dtype.
            z0: args
                .initial_state
                .map(|st| upload_f32(ctx, &st.z.to_f32_vec())),
        })
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
    let neg_inf = upload_f32(ctx, &[f32::NEG_INFINITY]);
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

fn download(ctx: &CubeContext, handle: Handle, shape: Vec<usize>) -> Result<Tensor> {
    ctx.download(&DeviceTensor::f32_unchecked(handle, shape))
}

pub(super) fn forward(
    ctx: &CubeContext,
    spec: &LightNetSpec,
    args: &LightNet,
    form: Form,
) -> Result<LightNetOutput> {
    let inputs = DeviceInputs::new(ctx, args)?;
    let seqs = Sequences::new(ctx, spec.dims.b, spec.dims.t, spec.cu_seqlens.as_deref());
    if spec.bidirectional {
        let khat = softmax(ctx, spec, &seqs, &inputs.k);
        let problem = engine_problem(ctx, spec, &inputs, khat, None)?;
        let (o, _) = Run::new(ctx, &problem, form)?.forward()?;
        return Ok(LightNetOutput {
            o: download(ctx, o, spec.o_shape())?,
            state: None,
        });
    }
    let (khat, g, z_final) = gate(ctx, spec, &seqs, &inputs);
    let problem = engine_problem(ctx, spec, &inputs, khat, Some(g))?;
    let (o, s) = Run::new(ctx, &problem, form)?.forward()?;
    let s = s.expect("the causal engine without normalisation has a final state");
    Ok(LightNetOutput {
        o: download(ctx, o, spec.o_shape())?,
        state: Some(LightNetFinalState {
            s: download(ctx, s, spec.s_shape())?,
            z: download(ctx, z_final, spec.z_shape())?,
        }),
    })
}

pub(super) fn backward(
    ctx: &CubeContext,
    spec: &LightNetSpec,
    args: &LightNet,
    form: Form,
    d_o: &Tensor,
) -> Result<LightNetGrads> {
    let d = spec.dims;
    let inputs = DeviceInputs::new(ctx, args)?;
    let d_o = ctx.upload("do", d_o)?.to_f32(ctx, "do")?;
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
    Ok(LightNetGrads {
        dq: download(ctx, grads.dq, qk_shape.clone())?,
        dk: download(ctx, dk_logits, qk_shape)?,
        dv: download(ctx, grads.dv, spec.o_shape())?,
    })
}
