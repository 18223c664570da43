//! CubeCL kernels of the decayed linear attention engine (ops.md section 1), forward and backward,
//! in the recurrent, parallel and chunkwise forms, for every gate kind, causal and bidirectional,
//! with row-sum normalisation, `h0`/`ht` and `cu_seqlens`.
//!
//! Two entry points: the host-tensor path behind [`crate::linear::forward`] /
//! [`crate::linear::backward`] with `Backend::Cube`, and a device-resident API
//! ([`forward_device`], [`backward_device`] over [`DeviceTensor`]s) for callers who keep their
//! data on the device. Both run the same launches; the host path uploads, calls the device path,
//! and downloads. Results are f32.
//!
//! **Structure.** A problem is one or two *passes* of a causal engine over logical rows
//! ([`layout`]): the forward pass (diagonal included) and, for a bidirectional problem, the reverse
//! pass (the upper triangle through the flip identity, diagonal excluded), added into the same
//! outputs. Normalisation appends a ones column to `v` and keeps the diagonal apart
//! ([`normalize`]). Each pass's gate gradient comes from the closed form of kernels.md (a reverse
//! cumulative sum, [`gates::gate_grad_scan`](fn@gates::gate_grad_scan), without the terms that
//! cancel analytically) and is summed to the gate's shape at the end; a per-head gate takes the
//! pair-weighted form instead (`Run::add_head_sums`), which the closed form conditions badly.
//!
//! **Numerics.** Every `exp` has a non-positive argument that is a running sum of gates, never a
//! difference of two large cumulative sums; results are f32 throughout, inputs f32 or f16/bf16
//! widened on the device where the runtime has them. Measured against the f64 reference over
//! the test matrix, the worst relative RMS error of any output or gradient is about `3e-6`.
//!
//! **Loop budget.** Every kernel bounds the loop iterations of one invocation
//! ([`CubeContext::loop_budget`]): llvmpipe silently cuts loops off beyond 65535. Long scans run
//! as several launches that carry their state through device memory.
//!
//! **Kernels** (one file per group, each documents its indexing and why its exponents are `<= 0`):
//! [`gates`] (chunk-local cumulative gates as decay factors, gate-gradient scan and reductions),
//! [`chunk_forward`] (chunk states, intra-chunk scores with sub-chunk anchoring, output),
//! [`chunk_backward`] (reverse state pass `dh`, `dA`, `dq`, `dk`, `dv`), [`recurrent`] (scans,
//! also the decoding step), [`parallel`] (the `T x T` form).
//!
//! **Device-resident inputs are value-checked on the device** by default: one reduction per input
//! (finite values, gates `<= 0`, [`crate::cube::values`]) before the launches, giving the host
//! API's typed errors; [`DeviceLinearAttention::with_value_check`] with [`ValueCheck::Off`] skips
//! it, and the caller then vouches for the values. The host path validates on the host and does
//! not check twice.

pub mod chunk_backward;
pub mod chunk_forward;
pub mod gates;
pub mod layout;
pub mod normalize;
pub mod parallel;
pub mod recurrent;

use cubecl::prelude::*;
use cubecl::server::Handle;

use self::gates::{MAX_CHUNK, PLANES};
use self::layout::{Chunks, GATE_NONE, GATE_PER_HEAD, GATE_SCALAR, GATE_VECTOR, Sequences};
use super::{Dims, Direction, Form, Gate, GateKind, Grads, LinearAttention, Output, Spec};
use crate::cube::kernels::{alloc_f32, columns, output, zeros};
use crate::cube::launch::{grid, per_item};
use crate::cube::values::{self, ValueCheck};
use crate::cube::{CubeContext, DeviceTensor};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::validation::describe;

/// Threads per cube of the per-(chunk, head) kernels.
const CHUNK_THREADS: u32 = 256;

/// A gate over device tensors (natural-log decays, all `<= 0`): the host API's [`Gate`] over
/// [`DeviceTensor`]s.
pub type DeviceGate<'a> = Gate<'a, DeviceTensor>;

/// One engine problem over device tensors: the host API's builder, [`LinearAttention`], over
/// [`DeviceTensor`]s (the same `causal` / `bidirectional` / `with_*` calls, plus
/// [`LinearAttention::with_value_check`]).
pub type DeviceLinearAttention<'a> = LinearAttention<'a, DeviceTensor>;

impl LinearAttention<'_, DeviceTensor> {
    /// Checks shapes and options (not values: they stay on the device, see
    /// [`LinearAttention::with_value_check`]), with the host path's validator
    /// ([`LinearAttention::validate_layout`]).
    pub fn validate(&self) -> Result<Spec> {
        self.validate_layout()
    }
}

/// The device-side value check of the inputs (and of the cotangents `extra`), when on.
fn check_values(
    args: &DeviceLinearAttention,
    ctx: &CubeContext,
    problem: &Problem,
    extra: &[(&str, &Handle, usize)],
) -> Result<()> {
    if args.value_check == ValueCheck::Off {
        return Ok(());
    }
    let mut checked = vec![
        values::Checked {
            name: "q",
            buffer: &problem.q,
            len: args.q.numel(),
            gate: false,
        },
        values::Checked {
            name: "k",
            buffer: &problem.k,
            len: args.k.numel(),
            gate: false,
        },
        values::Checked {
            name: "v",
            buffer: &problem.v,
            len: args.v.numel(),
            gate: false,
        },
    ];
    if let (Some(t), Some(buffer)) = (args.gate.tensor(), problem.gate.as_ref()) {
        checked.push(values::Checked {
            name: "g",
            buffer,
            len: t.numel(),
            gate: true,
        });
    }
    if let (Some(t), Some(buffer)) = (
        args.gate_bwd.as_ref().and_then(|g| g.tensor()),
        problem.gate_bwd.as_ref(),
    ) {
        checked.push(values::Checked {
            name: "g_bwd",
            buffer,
            len: t.numel(),
            gate: true,
        });
    }
    if let (Some(t), Some(buffer)) = (args.h0, problem.h0.as_ref()) {
        checked.push(values::Checked {
            name: "h0",
            buffer,
            len: t.numel(),
            gate: false,
        });
    }
    for &(name, buffer, len) in extra {
        checked.push(values::Checked {
            name,
            buffer,
            len,
            gate: false,
        });
    }
    values::check(ctx, &checked)
}

/// Forward result on the device (f32).
#[derive(Clone, Debug)]
pub struct DeviceOutput {
    /// `[B, T, H, V]`.
    pub o: DeviceTensor,
    /// `[N, H, K, V]`, when [`Spec::has_final_state`].
    pub ht: Option<DeviceTensor>,
}

/// Gradients on the device (f32), shaped like [`Grads`].
#[derive(Clone, Debug)]
pub struct DeviceGrads {
    pub dq: DeviceTensor,
    pub dk: DeviceTensor,
    pub dv: DeviceTensor,
    pub dg: Option<DeviceTensor>,
    pub dg_bwd: Option<DeviceTensor>,
    pub dh0: Option<DeviceTensor>,
}

/// Forward pass over device tensors.
pub fn forward_device(
    ctx: &CubeContext,
    args: &DeviceLinearAttention,
    form: Form,
) -> Result<DeviceOutput> {
    let spec = args.validate()?;
    let problem = Problem::new(ctx, &spec, args)?;
    check_values(args, ctx, &problem, &[])?;
    let run = Run::new(ctx, &problem, form)?;
    let (o, ht) = run.forward()?;
    let d = spec.dims;
    Ok(DeviceOutput {
        o: DeviceTensor::f32_unchecked(o, vec![d.b, d.t, d.h, d.v]),
        ht: ht.map(|ht| DeviceTensor::f32_unchecked(ht, spec.state_shape())),
    })
}

/// Backward pass over device tensors (recomputes what it needs from the inputs).
pub fn backward_device(
    ctx: &CubeContext,
    args: &DeviceLinearAttention,
    form: Form,
    d_o: &DeviceTensor,
    d_ht: Option<&DeviceTensor>,
) -> Result<DeviceGrads> {
    let spec = args.validate()?;
    if d_o.shape() != spec.o_shape() {
        return Err(Error::shape(
            "do",
            describe(&["B", "T", "H", "V"], &spec.o_shape()),
            d_o.shape(),
        ));
    }
    if let Some(d_ht) = d_ht {
        if !spec.has_final_state() {
            return Err(Error::InvalidArgument(
                "`dht` given but this problem has no final state (bidirectional or normalised)"
                    .into(),
            ));
        }
        if d_ht.shape() != spec.state_shape() {
            return Err(Error::shape(
                "dht",
                describe(&["N", "H", "K", "V"], &spec.state_shape()),
                d_ht.shape(),
            ));
        }
    }
    let problem = Problem::new(ctx, &spec, args)?;
    let d_o_len = d_o.numel();
    let d_ht_len = d_ht.map_or(0, |t| t.numel());
    let d_o = d_o.to_f32(ctx, "do")?;
    let d_ht = d_ht.map(|t| t.to_f32(ctx, "dht")).transpose()?;
    let mut cotangents = vec![("do", &d_o, d_o_len)];
    if let Some(d_ht) = d_ht.as_ref() {
        cotangents.push(("dht", d_ht, d_ht_len));
    }
    check_values(args, ctx, &problem, &cotangents)?;
    let run = Run::new(ctx, &problem, form)?;
    let grads = run.backward(&d_o, d_ht.as_ref())?;
    let d = spec.dims;
    let gate_shape = |kind: GateKind| match kind {
        GateKind::None => vec![],
        GateKind::PerHead => vec![d.h],
        GateKind::Scalar => vec![d.b, d.t, d.h],
        GateKind::Vector => vec![d.b, d.t, d.h, d.k],
    };
    Ok(DeviceGrads {
        dq: DeviceTensor::f32_unchecked(grads.dq, vec![d.b, d.t, d.h, d.k]),
        dk: DeviceTensor::f32_unchecked(grads.dk, vec![d.b, d.t, d.h, d.k]),
        dv: DeviceTensor::f32_unchecked(grads.dv, vec![d.b, d.t, d.h, d.v]),
        dg: grads
            .dg
            .map(|g| DeviceTensor::f32_unchecked(g, gate_shape(spec.gate_kind))),
        dg_bwd: grads
            .dg_bwd
            .map(|g| DeviceTensor::f32_unchecked(g, gate_shape(spec.gate_kind))),
        dh0: grads
            .dh0
            .map(|h| DeviceTensor::f32_unchecked(h, spec.state_shape())),
    })
}

/// Host tensors on the device, in the shape [`DeviceLinearAttention`] borrows.
struct Uploaded {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    g: Option<DeviceTensor>,
    g_bwd: Option<DeviceTensor>,
    h0: Option<DeviceTensor>,
}

impl Uploaded {
    fn new(ctx: &CubeContext, args: &LinearAttention) -> Result<Uploaded> {
        let opt = |name: &str, t: Option<&Tensor>| t.map(|t| ctx.upload(name, t)).transpose();
        Ok(Uploaded {
            q: ctx.upload("q", args.q)?,
            k: ctx.upload("k", args.k)?,
            v: ctx.upload("v", args.v)?,
            g: opt("g", args.gate.tensor())?,
            g_bwd: opt("g_bwd", args.gate_bwd.as_ref().and_then(|g| g.tensor()))?,
            h0: opt("h0", args.h0)?,
        })
    }

    fn problem<'a>(&'a self, args: &'a LinearAttention) -> DeviceLinearAttention<'a> {
        let wrap = |gate: &Gate, t: Option<&'a DeviceTensor>| match (gate, t) {
            (Gate::PerHead(_), Some(t)) => DeviceGate::PerHead(t),
            (Gate::Scalar(_), Some(t)) => DeviceGate::Scalar(t),
            (Gate::Vector(_), Some(t)) => DeviceGate::Vector(t),
            _ => DeviceGate::None,
        };
        DeviceLinearAttention {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            gate: wrap(&args.gate, self.g.as_ref()),
            gate_bwd: args.gate_bwd.map(|gb| wrap(&gb, self.g_bwd.as_ref())),
            direction: args.direction,
            scale: args.scale,
            normalize: args.normalize,
            h0: self.h0.as_ref(),
            cu_seqlens: args.cu_seqlens,
            // The host API validated every value before the upload.
            value_check: ValueCheck::Off,
        }
    }
}

/// The host path of `linear::forward` (inputs already validated, values included).
pub(in crate::linear) fn forward(
    ctx: &CubeContext,
    _spec: &Spec,
    args: &LinearAttention,
    form: Form,
) -> Result<Output> {
    let uploaded = Uploaded::new(ctx, args)?;
    let out = forward_device(ctx, &uploaded.problem(args), form)?;
    Ok(Output {
        o: ctx.download(&out.o)?,
        ht: out.ht.map(|ht| ctx.download(&ht)).transpose()?,
    })
}

/// The host path of `linear::backward` (inputs and cotangents already validated).
pub(in crate::linear) fn backward(
    ctx: &CubeContext,
    _spec: &Spec,
    args: &LinearAttention,
    form: Form,
    d_o: &Tensor,
    d_ht: Option<&Tensor>,
) -> Result<Grads> {
    let uploaded = Uploaded::new(ctx, args)?;
    let d_o = ctx.upload("do", d_o)?;
    let d_ht = d_ht.map(|t| ctx.upload("dht", t)).transpose()?;
    let grads = backward_device(ctx, &uploaded.problem(args), form, &d_o, d_ht.as_ref())?;
    let opt = |t: Option<DeviceTensor>| t.map(|t| ctx.download(&t)).transpose();
    Ok(Grads {
        dq: ctx.download(&grads.dq)?,
        dk: ctx.download(&grads.dk)?,
        dv: ctx.download(&grads.dv)?,
        dg: opt(grads.dg)?,
        dg_bwd: opt(grads.dg_bwd)?,
        dh0: opt(grads.dh0)?,
    })
}

/// The host path of `linear::decode_step` (inputs already validated): the recurrent scan with one
/// token, starting from `state` as `h0`; its final state is the new state.
pub(in crate::linear) fn decode_step(
    ctx: &CubeContext,
    state: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    gate: Gate,
    scale: f64,
) -> Result<super::DecodeOutput> {
    let problem = LinearAttention::causal(q, k, v)
        .with_gate(gate)
        .with_h0(state)
        .with_scale(scale);
    let uploaded = Uploaded::new(ctx, &problem)?;
    let out = forward_device(ctx, &uploaded.problem(&problem), Form::Recurrent)?;
    Ok(super::DecodeOutput {
        o: ctx.download(&out.o)?,
        state: ctx.download(&out.ht.expect("a causal problem has a final state"))?,
    })
}

/// One causal decoding step over device tensors, for generation: `token` is the step's problem,
/// the host API's builder over device tensors (`q, k: [B, 1, H, K]`, `v: [B, 1, H, V]`, causal,
/// no normalisation, no `h0`, no `cu_seqlens`; its gate is the token's: `[H]`, `[B, 1, H]` or
/// `[B, 1, H, K]`; its scale and value check apply), `state: [B, H, K, V]` the running state:
/// `state <- diag(exp g) state + k^T v`, returns `o = scale q state` (`[B, 1, H, V]`, f32). The
/// state never leaves the device: on return `*state` is the new state (an f32 buffer from the
/// context's pool; the old one is released), so a generation loop calls this once per token with
/// no host copy. The CUDA tier's `linear::cuda::device::decode_step` has the same shape.
pub fn decode_step_device(
    ctx: &CubeContext,
    token: &DeviceLinearAttention,
    state: &mut DeviceTensor,
) -> Result<DeviceTensor> {
    token.expect_decode_token()?;
    let q = token.q;
    if q.shape().len() != 4 || q.shape()[1] != 1 {
        return Err(Error::shape("q", "[B, 1, H, K] (one token)", q.shape()));
    }
    let (b, h, kd) = (q.shape()[0], q.shape()[2], q.shape()[3]);
    let vd = token.v.shape().last().copied().unwrap_or(0);
    if state.shape() != [b, h, kd, vd] {
        return Err(Error::shape(
            "state",
            describe(&["B", "H", "K", "V"], &[b, h, kd, vd]),
            state.shape(),
        ));
    }
    let args = token.with_h0(state);
    let out = forward_device(ctx, &args, Form::Recurrent)?;
    *state = out.ht.ok_or_else(|| Error::Runtime {
        backend: "cube".into(),
        message: "decode step produced no state".into(),
    })?;
    Ok(out.o)
}

/// Largest head dim (`K` and `V`) the kernels take: their per-invocation loops are sized for it
/// ([`CubeContext::loop_budget`]); no kernel holds a whole head in registers or shared memory,
/// so there is no separate path for 512.
pub const MAX_HEAD_DIM: usize = 512;

fn check_head_dims(ctx: &CubeContext, d: &Dims) -> Result<()> {
    for (tensor, dim) in [("k", d.k), ("v", d.v)] {
        if dim > MAX_HEAD_DIM {
            return Err(Error::UnsupportedHeadDim {
                tensor: tensor.into(),
                dim,
                backend: format!("cube ({})", ctx.adapter_name()),
                supported: format!("1..={MAX_HEAD_DIM}"),
            });
        }
    }
    Ok(())
}

/// A validated problem as f32 device buffers.
pub(crate) struct Problem {
    pub dims: Dims,
    pub scale: f32,
    pub direction: Direction,
    pub normalize: Option<f32>,
    pub gate_kind: GateKind,
    pub seqs: Sequences,
    pub q: Handle,
    pub k: Handle,
    pub v: Handle,
    pub gate: Option<Handle>,
    pub gate_bwd: Option<Handle>,
    pub h0: Option<Handle>,
}

impl Problem {
    fn new(ctx: &CubeContext, spec: &Spec, args: &DeviceLinearAttention) -> Result<Problem> {
        let d = spec.dims;
        check_head_dims(ctx, &d)?;
        // Kernels index with 32-bit arithmetic on some runtimes: keep every buffer (the largest
        // is the chunk factors, PLANES x [rows, H, K]) well inside it.
        let largest = (d.b * d.t * d.h * d.k.max(d.v + 1)).saturating_mul(PLANES);
        if largest >= i32::MAX as usize {
            return Err(Error::Unsupported(format!(
                "problem too large for 32-bit indexing on the cube backend ({largest} elements in one buffer)"
            )));
        }
        let gate = |g: &DeviceGate, name: &str| g.tensor().map(|t| t.to_f32(ctx, name)).transpose();
        Ok(Problem {
            dims: d,
            scale: spec.scale as f32,
            direction: spec.direction,
            normalize: spec.normalize.map(|e| e as f32),
            gate_kind: spec.gate_kind,
            seqs: Sequences::new(ctx, d.b, d.t, spec.cu_seqlens.as_deref()),
            q: args.q.to_f32(ctx, "q")?,
            k: args.k.to_f32(ctx, "k")?,
            v: args.v.to_f32(ctx, "v")?,
            gate: gate(&args.gate, "g")?,
            gate_bwd: args
                .gate_bwd
                .as_ref()
                .map(|gb| gate(gb, "g_bwd"))
                .transpose()?
                .flatten(),
            h0: args.h0.map(|t| t.to_f32(ctx, "h0")).transpose()?,
        })
    }

    /// An f32 problem built from buffers the caller already holds (LightNet feeds its transformed
    /// keys and gate this way).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_buffers(
        ctx: &CubeContext,
        dims: Dims,
        cu_seqlens: Option<&[usize]>,
        scale: f32,
        direction: Direction,
        (q, k, v): (Handle, Handle, Handle),
        gate: Option<Handle>,
        h0: Option<Handle>,
    ) -> Result<Problem> {
        check_head_dims(ctx, &dims)?;
        Ok(Problem {
            dims,
            scale,
            direction,
            normalize: None,
            gate_kind: if gate.is_some() {
                GateKind::Vector
            } else {
                GateKind::None
            },
            seqs: Sequences::new(ctx, dims.b, dims.t, cu_seqlens),
            q,
            k,
            v,
            gate,
            gate_bwd: None,
            h0,
        })
    }

    fn n_seq(&self) -> usize {
        self.seqs.count()
    }

    fn rows(&self) -> usize {
        self.seqs.rows
    }

    fn kind_code(&self) -> u32 {
        match self.gate_kind {
            GateKind::None => GATE_NONE,
            GateKind::PerHead => GATE_PER_HEAD,
            GateKind::Scalar => GATE_SCALAR,
            GateKind::Vector => GATE_VECTOR,
        }
    }
}

/// One causal pass over logical rows (see [`layout`]).
#[derive(Clone, Copy)]
struct Pass<'a> {
    reverse: bool,
    /// Leave the diagonal out: the reverse pass always (the forward pass counts it), the forward
    /// pass too under normalisation (the diagonal is added by [`normalize`]).
    strict: bool,
    /// The gate this pass reads (`g` forward, `g_bwd` or `g` reverse).
    gate: Option<&'a Handle>,
    /// Add into the outputs instead of writing them (second pass).
    accumulate: bool,
}

impl Pass<'_> {
    fn strict(&self) -> u32 {
        self.strict as u32
    }
}

/// Where one backward pass writes.
struct PassGrads<'a> {
    dq: &'a Handle,
    dk: &'a Handle,
    dv: &'a Handle,
    /// Scratch `[rows, H, K]`: this pass's `q dq`, `k dk` (off-diagonal).
    gq: &'a Handle,
    gk: &'a Handle,
    dh0: Option<&'a Handle>,
    /// Expanded gate gradient `[rows, H, K]` this pass adds to (scalar and vector gates).
    dg: Option<&'a Handle>,
    /// Per-head gate: the `[H]` gradient this pass adds to (computed pair-weighted instead of
    /// through the closed form, see [`Run::add_head_sums`]).
    per_head: Option<&'a Handle>,
}

impl PassGrads<'_> {
    fn weighted(&self) -> u32 {
        self.per_head.is_some() as u32
    }
}

/// Raw gradients of [`Run::backward`].
pub(crate) struct RawGrads {
    pub dq: Handle,
    pub dk: Handle,
    pub dv: Handle,
    pub dg: Option<Handle>,
    pub dg_bwd: Option<Handle>,
    pub dh0: Option<Handle>,
}

/// A problem bound to a form, with the value width the passes see.
pub(crate) struct Run<'a> {
    ctx: &'a CubeContext,
    p: &'a Problem,
    form: Form,
    chunks: Option<Chunks>,
}

/// `(from, count)` launches covering `0..total` steps, `per_launch` at a time; always at least one
/// (a launch over nothing still initialises and finishes every sequence, e.g. empty ones).
fn segments(total: usize, per_launch: usize) -> impl Iterator<Item = (usize, usize)> {
    let launches = total.div_ceil(per_launch).max(1);
    (0..launches).map(move |i| (i * per_launch, per_launch))
}

/// A buffer argument of `len` elements.
///
/// # Safety
/// `handle` must hold at least `len.max(1)` elements of the kernel's element type.
unsafe fn arg(handle: &Handle, len: usize) -> BufferArg {
    unsafe { BufferArg::from_raw_parts(handle.clone(), len.max(1)) }
}

impl<'a> Run<'a> {
    pub(crate) fn new(ctx: &'a CubeContext, p: &'a Problem, form: Form) -> Result<Run<'a>> {
        let longest = p.seqs.seqs.iter().map(|s| s.1).max().unwrap_or(0);
        if ctx.is_llvmpipe() && longest > crate::cube::LLVMPIPE_MAX_SEQUENCE {
            return Err(Error::Unsupported(format!(
                "a sequence of {longest} tokens on llvmpipe: its per-invocation loop limit \
                 (65535 iterations) caps the single-loop scans at {} tokens per sequence",
                crate::cube::LLVMPIPE_MAX_SEQUENCE
            )));
        }
        let chunks = match form {
            Form::Chunkwise { chunk } => {
                if chunk == 0 || chunk > MAX_CHUNK {
                    return Err(Error::Unsupported(format!(
                        "chunk size {chunk} on the cube backend (supported: 1..={MAX_CHUNK})"
                    )));
                }
                Some(Chunks::new(ctx, &p.seqs, chunk))
            }
            _ => None,
        };
        Ok(Run {
            ctx,
            p,
            form,
            chunks,
        })
    }

    fn client(&self) -> &Client {
        self.ctx.client()
    }

    /// A fresh one-element buffer bound where a kernel's optional input or output is absent (a
    /// distinct buffer each time: a runtime may refuse one buffer bound twice when one binding
    /// writes).
    fn dummy(&self) -> Handle {
        alloc_f32(self.ctx, 1)
    }

    /// The value buffer and width the passes see: `[v | 1]` with normalisation.
    fn values(&self) -> (Handle, usize) {
        let d = self.p.dims;
        match self.p.normalize {
            Some(_) => (
                columns(self.ctx, &self.p.v, self.p.rows() * d.h, d.v, d.v + 1, 1.0),
                d.v + 1,
            ),
            None => (self.p.v.clone(), d.v),
        }
    }

    fn passes(&self) -> Vec<Pass<'_>> {
        let mut passes = vec![Pass {
            reverse: false,
            strict: self.p.normalize.is_some(),
            gate: self.p.gate.as_ref(),
            accumulate: false,
        }];
        if self.p.direction == Direction::Bidirectional {
            passes.push(Pass {
                reverse: true,
                strict: true,
                gate: self.p.gate_bwd.as_ref().or(self.p.gate.as_ref()),
                accumulate: true,
            });
        }
        passes
    }

    fn has_final_state(&self) -> bool {
        self.p.direction == Direction::Causal && self.p.normalize.is_none()
    }

    /// `o` (and `ht`), checked for launch failures.
    pub(crate) fn forward(&self) -> Result<(Handle, Option<Handle>)> {
        let d = self.p.dims;
        let (v, dv) = self.values();
        let rows_heads = self.p.rows() * d.h;
        let wide = output(self.ctx, rows_heads * dv);
        let ht = self
            .has_final_state()
            .then(|| output(self.ctx, self.p.n_seq() * d.h * d.k * d.v));
        for pass in self.passes() {
            let pass_ht = if pass.reverse { None } else { ht.as_ref() };
            self.forward_pass(pass, &v, dv, &wide, pass_ht);
        }
        let o = match self.p.normalize {
            Some(eps) => {
                let o = output(self.ctx, rows_heads * d.v);
                let (count, dim) = per_item(rows_heads);
                // SAFETY: `wide` is `[rows * H, V + 1]`, `o` and `v` `[rows * H, V]`, `q`, `k`
                // `[rows * H, K]`.
                unsafe {
                    normalize::normalize_output::launch_unchecked(
                        self.client(),
                        count,
                        dim,
                        arg(&wide, rows_heads * dv),
                        arg(&self.p.q, rows_heads * d.k),
                        arg(&self.p.k, rows_heads * d.k),
                        arg(&self.p.v, rows_heads * d.v),
                        arg(&o, rows_heads * d.v),
                        rows_heads,
                        d.k,
                        d.v,
                        self.p.scale,
                        eps,
                    )
                };
                o
            }
            None => wide,
        };
        self.check(&o)?;
        Ok((o, ht))
    }

    /// Gradients (recomputing the forward quantities), checked for launch failures.
    pub(crate) fn backward(&self, d_o: &Handle, d_ht: Option<&Handle>) -> Result<RawGrads> {
        let ctx = self.ctx;
        let d = self.p.dims;
        let rows = self.p.rows();
        let rows_heads = rows * d.h;
        let (v, dv) = self.values();

        // With normalisation the cotangent of the wide output needs the forward result.
        let (wide, d_wide) = match self.p.normalize {
            Some(eps) => {
                let wide = output(ctx, rows_heads * dv);
                for pass in self.passes() {
                    self.forward_pass(pass, &v, dv, &wide, None);
                }
                let d_wide = output(ctx, rows_heads * dv);
                let (count, dim) = per_item(rows_heads);
                // SAFETY: `wide`, `d_wide` are `[rows * H, V + 1]`, `d_o`, `v` `[rows * H, V]`.
                unsafe {
                    normalize::normalize_grad::launch_unchecked(
                        self.client(),
                        count,
                        dim,
                        arg(&wide, rows_heads * dv),
                        arg(&self.p.q, rows_heads * d.k),
                        arg(&self.p.k, rows_heads * d.k),
                        arg(&self.p.v, rows_heads * d.v),
                        arg(d_o, rows_heads * d.v),
                        arg(&d_wide, rows_heads * dv),
                        rows_heads,
                        d.k,
                        d.v,
                        self.p.scale,
                        eps,
                    )
                };
                (Some(wide), d_wide)
            }
            None => (None, d_o.clone()),
        };

        let qk_len = rows_heads * d.k;
        let dq = output(ctx, qk_len);
        let dk = output(ctx, qk_len);
        let dv_wide = output(ctx, rows_heads * dv);
        let gq = output(ctx, qk_len);
        let gk = output(ctx, qk_len);
        let state_len = self.p.n_seq() * d.h * d.k * d.v;
        let dh0 = self.p.h0.as_ref().map(|_| output(ctx, state_len));
        // Scalar and vector gates: the closed form into an expanded `[rows, H, K]` gradient.
        // Per-head gates: pair-weighted sums straight into `[H]` (see `add_head_sums`).
        let per_head = self.p.gate_kind == GateKind::PerHead;
        let gated = self.p.gate_kind != GateKind::None;
        let separate = gated && self.p.gate_bwd.is_some();
        let grad_len = if per_head { d.h } else { qk_len };
        let dg_acc = gated.then(|| zeros(ctx, grad_len));
        let dgb_acc = separate.then(|| zeros(ctx, grad_len));

        for pass in self.passes() {
            let target = if pass.reverse && separate {
                dgb_acc.as_ref()
            } else {
                dg_acc.as_ref()
            };
            let grads = PassGrads {
                dq: &dq,
                dk: &dk,
                dv: &dv_wide,
                gq: &gq,
                gk: &gk,
                dh0: if pass.reverse { None } else { dh0.as_ref() },
                dg: if per_head { None } else { target },
                per_head: if per_head { target } else { None },
            };
            let pass_dht = if pass.reverse { None } else { d_ht };
            self.backward_pass(pass, &v, dv, &d_wide, pass_dht, &grads);
        }

        if let (Some(wide), Some(eps)) = (&wide, self.p.normalize) {
            let (count, dim) = per_item(rows_heads);
            // SAFETY: as for `normalize_grad`; `dq`, `dk` are `[rows * H, K]`, `dv_wide`
            // `[rows * H, V + 1]`.
            unsafe {
                normalize::normalize_diag_grad::launch_unchecked(
                    self.client(),
                    count,
                    dim,
                    arg(wide, rows_heads * dv),
                    arg(&self.p.q, rows_heads * d.k),
                    arg(&self.p.k, rows_heads * d.k),
                    arg(&self.p.v, rows_heads * d.v),
                    arg(d_o, rows_heads * d.v),
                    arg(&dq, qk_len),
                    arg(&dk, qk_len),
                    arg(&dv_wide, rows_heads * dv),
                    rows_heads,
                    d.k,
                    d.v,
                    self.p.scale,
                    eps,
                )
            };
        }
        let dv_out = if dv != d.v {
            columns(ctx, &dv_wide, rows_heads, dv, d.v, 0.0)
        } else {
            dv_wide
        };
        let reduce = |acc: Handle| {
            if per_head {
                acc
            } else {
                self.reduce_gate_grad(&acc)
            }
        };
        let dg = dg_acc.map(reduce);
        let dg_bwd = dgb_acc.map(reduce);
        self.check(&dv_out)?;
        Ok(RawGrads {
            dq,
            dk,
            dv: dv_out,
            dg,
            dg_bwd,
            dh0,
        })
    }

    /// Surfaces a failed launch (compilation, resources) before results are handed out.
    fn check(&self, handle: &Handle) -> Result<()> {
        cubecl::future::block_on(self.client().sync_buffers([handle]))
            .map_err(crate::cube::runtime_error)
    }

    fn forward_pass(&self, pass: Pass, v: &Handle, dv: usize, o: &Handle, ht: Option<&Handle>) {
        match self.form {
            Form::Chunkwise { .. } => self.chunk_forward(pass, v, dv, o, ht),
            Form::Recurrent => self.recurrent_forward(pass, v, dv, o, ht),
            Form::Parallel => self.parallel_forward(pass, v, dv, o, ht),
        }
    }

    fn backward_pass(
        &self,
        pass: Pass,
        v: &Handle,
        dv: usize,
        d_o: &Handle,
        dht: Option<&Handle>,
        grads: &PassGrads,
    ) {
        match self.form {
            Form::Chunkwise { .. } => self.chunk_backward(pass, v, dv, d_o, dht, grads),
            Form::Recurrent => self.recurrent_backward(pass, v, dv, d_o, dht, grads),
            Form::Parallel => self.parallel_backward(pass, v, dv, d_o, dht, grads),
        }
        if let Some(dg) = grads.dg {
            self.gate_grad_scan(pass, grads, dg);
            if let Some(dht) = dht {
                self.final_state_gate_grad(pass, v, dv, dht, dg);
            }
        }
    }

    // ----- chunkwise -----

    fn chunks(&self) -> &Chunks {
        self.chunks.as_ref().expect("chunkwise form")
    }

    fn plane_len(&self) -> usize {
        self.p.rows() * self.p.dims.h * self.p.dims.k
    }

    fn chunk_factors(&self, pass: Pass) -> Handle {
        let d = self.p.dims;
        let ch = self.chunks();
        let plane_len = self.plane_len();
        let factors = output(self.ctx, PLANES * plane_len);
        let dummy = self.dummy();
        let g = pass.gate.unwrap_or(&dummy);
        let (count, dim) = per_item(ch.count * d.h * d.k);
        // SAFETY: `factors` holds PLANES planes of `[rows, H, K]`; chunks index rows < rows.
        unsafe {
            gates::chunk_gate_factors::launch_unchecked(
                self.client(),
                count,
                dim,
                arg(g, self.gate_len()),
                arg(&ch.table, ch.count * layout::CHUNK_FIELDS),
                arg(&factors, PLANES * plane_len),
                ch.count,
                d.h,
                d.k,
                self.gate_code(pass),
                pass.reverse as u32,
                plane_len,
            )
        };
        factors
    }

    fn gate_len(&self) -> usize {
        let d = self.p.dims;
        match self.p.gate_kind {
            GateKind::None => 1,
            GateKind::PerHead => d.h,
            GateKind::Scalar => self.p.rows() * d.h,
            GateKind::Vector => self.p.rows() * d.h * d.k,
        }
    }

    fn gate_code(&self, pass: Pass) -> u32 {
        if pass.gate.is_some() {
            self.p.kind_code()
        } else {
            GATE_NONE
        }
    }

    fn tiles(&self, dv: usize) -> (usize, usize) {
        let t = chunk_forward::TILE;
        (self.p.dims.k.div_ceil(t), dv.div_ceil(t))
    }

    /// The longest sequence, in rows.
    fn max_len(&self) -> usize {
        self.p.seqs.seqs.iter().map(|s| s.1).max().unwrap_or(0)
    }

    /// Steps per launch for a scan that spends `per_step` loop iterations on each step.
    fn steps_per_launch(&self, per_step: usize) -> usize {
        (self.ctx.loop_budget() / (per_step + 2)).max(1)
    }

    fn chunk_states(
        &self,
        pass: Pass,
        v: &Handle,
        dv: usize,
        factors: &Handle,
        ht: Option<&Handle>,
    ) -> Handle {
        let d = self.p.dims;
        let ch = self.chunks();
        let n_seq = self.p.n_seq();
        let states = output(self.ctx, ch.count * d.h * d.k * dv);
        let (k_tiles, v_tiles) = self.tiles(dv);
        let h0_dummy = self.dummy();
        let ht_dummy = self.dummy();
        let h0 = if pass.reverse {
            None
        } else {
            self.p.h0.as_ref()
        };
        let state_len = n_seq * d.h * d.k * dv;
        let carry = alloc_f32(self.ctx, state_len);
        let per_launch = self.steps_per_launch(chunk_forward::state_pass_cost(ch.chunk));
        for (from, count) in segments(self.max_len().div_ceil(ch.chunk), per_launch) {
            // SAFETY: buffer lengths as passed; the kernel reads `h0`/writes `ht` only when
            // flagged.
            unsafe {
                chunk_forward::chunk_states::launch_unchecked(
                    self.client(),
                    grid(n_seq * d.h * k_tiles * v_tiles),
                    CubeDim::new_2d(chunk_forward::TILE as u32, chunk_forward::TILE as u32),
                    arg(&self.p.k, self.p.rows() * d.h * d.k),
                    arg(v, self.p.rows() * d.h * dv),
                    arg(factors, PLANES * self.plane_len()),
                    arg(&ch.table, ch.count * layout::CHUNK_FIELDS),
                    arg(&ch.first, n_seq + 1),
                    arg(h0.unwrap_or(&h0_dummy), state_len),
                    arg(&states, ch.count * d.h * d.k * dv),
                    arg(&carry, state_len),
                    arg(ht.unwrap_or(&ht_dummy), state_len),
                    n_seq,
                    d.h,
                    d.k,
                    dv,
                    k_tiles,
                    v_tiles,
                    self.plane_len(),
                    pass.reverse as u32,
                    h0.is_some() as u32,
                    ht.is_some() as u32,
                    from,
                    count,
                )
            };
        }
        states
    }

    fn chunk_scores(&self, pass: Pass, factors: &Handle) -> Handle {
        let d = self.p.dims;
        let ch = self.chunks();
        let c = ch.chunk;
        let scores = output(self.ctx, ch.count * d.h * c * c);
        let qk_len = self.p.rows() * d.h * d.k;
        let exponent = alloc_f32(self.ctx, qk_len);
        // SAFETY: `scores` is `[n_chunks, H, C, C]`; rows/cols < len <= C; the exponent scratch
        // is `[rows, H, K]`. The cube has `CHUNK_THREADS >= MAX_CHUNK` threads, one per row of
        // the diagonal sub-blocks.
        unsafe {
            chunk_forward::intra_scores::launch_unchecked(
                self.client(),
                grid(ch.count * d.h),
                CubeDim::new_1d(CHUNK_THREADS),
                arg(&self.p.q, qk_len),
                arg(&self.p.k, qk_len),
                arg(factors, PLANES * self.plane_len()),
                arg(&ch.table, ch.count * layout::CHUNK_FIELDS),
                arg(&scores, ch.count * d.h * c * c),
                arg(&exponent, qk_len),
                ch.count,
                d.h,
                d.k,
                c,
                self.plane_len(),
                self.p.scale,
                pass.reverse as u32,
                pass.strict(),
            )
        };
        scores
    }

    /// Grid of the per-(chunk, head, column block) kernels over `cols` columns.
    fn chunk_block_grid(&self, cols: usize) -> CubeCount {
        let blocks = cols.div_ceil(chunk_forward::COL_BLOCK);
        grid(self.chunks().count * self.p.dims.h * blocks)
    }

    fn chunk_forward(&self, pass: Pass, v: &Handle, dv: usize, o: &Handle, ht: Option<&Handle>) {
        let d = self.p.dims;
        let ch = self.chunks();
        let factors = self.chunk_factors(pass);
        let states = self.chunk_states(pass, v, dv, &factors, ht);
        let scores = self.chunk_scores(pass, &factors);
        let c = ch.chunk;
        let rows_heads = self.p.rows() * d.h;
        // SAFETY: lengths as passed; `o` is `[rows, H, dv]`.
        unsafe {
            chunk_forward::chunk_output::launch_unchecked(
                self.client(),
                self.chunk_block_grid(dv),
                CubeDim::new_1d(CHUNK_THREADS),
                arg(&self.p.q, rows_heads * d.k),
                arg(v, rows_heads * dv),
                arg(&factors, PLANES * self.plane_len()),
                arg(&states, ch.count * d.h * d.k * dv),
                arg(&scores, ch.count * d.h * c * c),
                arg(&ch.table, ch.count * layout::CHUNK_FIELDS),
                arg(o, rows_heads * dv),
                ch.count,
                d.h,
                d.k,
                dv,
                c,
                self.plane_len(),
                self.p.scale,
                pass.reverse as u32,
                pass.accumulate as u32,
            )
        };
    }

    fn chunk_backward(
        &self,
        pass: Pass,
        v: &Handle,
        dv: usize,
        d_o: &Handle,
        dht: Option<&Handle>,
        grads: &PassGrads,
    ) {
        let d = self.p.dims;
        let ch = self.chunks();
        let c = ch.chunk;
        let n_seq = self.p.n_seq();
        let rows_heads = self.p.rows() * d.h;
        let qk_len = rows_heads * d.k;
        let v_len = rows_heads * dv;
        let plane_len = self.plane_len();
        let factors = self.chunk_factors(pass);
        let states = self.chunk_states(pass, v, dv, &factors, None);
        let scores = self.chunk_scores(pass, &factors);
        let state_len = n_seq * d.h * d.k * dv;
        let states_len = ch.count * d.h * d.k * dv;
        let scores_len = ch.count * d.h * c * c;
        let table_len = ch.count * layout::CHUNK_FIELDS;

        let dstates = output(self.ctx, states_len);
        let suffix_len = ch.count * d.h * d.k;
        let suffix = output(self.ctx, suffix_len);
        let carry = alloc_f32(self.ctx, state_len);
        let carry_suffix = alloc_f32(self.ctx, state_len);
        let (k_tiles, v_tiles) = self.tiles(dv);
        let dht_dummy = self.dummy();
        let dh0_dummy = self.dummy();
        let per_launch = self.steps_per_launch(chunk_forward::state_pass_cost(c));
        for (from, count) in segments(self.max_len().div_ceil(c), per_launch) {
            // SAFETY: lengths as passed; `dht`/`dh0` touched only when flagged.
            unsafe {
                chunk_backward::chunk_dstates::launch_unchecked(
                    self.client(),
                    grid(n_seq * d.h * k_tiles * v_tiles),
                    CubeDim::new_2d(chunk_forward::TILE as u32, chunk_forward::TILE as u32),
                    arg(&self.p.q, qk_len),
                    arg(d_o, v_len),
                    arg(&factors, PLANES * plane_len),
                    arg(&ch.table, table_len),
                    arg(&ch.first, n_seq + 1),
                    arg(dht.unwrap_or(&dht_dummy), state_len),
                    arg(&dstates, states_len),
                    arg(&suffix, suffix_len),
                    arg(&carry, state_len),
                    arg(&carry_suffix, state_len),
                    arg(grads.dh0.unwrap_or(&dh0_dummy), state_len),
                    n_seq,
                    d.h,
                    d.k,
                    dv,
                    k_tiles,
                    v_tiles,
                    plane_len,
                    self.p.scale,
                    pass.reverse as u32,
                    dht.is_some() as u32,
                    grads.dh0.is_some() as u32,
                    from,
                    count,
                )
            };
        }

        let dscores = output(self.ctx, scores_len);
        // SAFETY: as for `intra_scores`.
        unsafe {
            chunk_backward::intra_dscores::launch_unchecked(
                self.client(),
                grid(ch.count * d.h),
                CubeDim::new_1d(CHUNK_THREADS),
                arg(d_o, v_len),
                arg(v, v_len),
                arg(&ch.table, table_len),
                arg(&dscores, scores_len),
                ch.count,
                d.h,
                dv,
                c,
                pass.reverse as u32,
                pass.strict(),
            )
        };
        // SAFETY: lengths as passed; every written index is a row of a chunk.
        unsafe {
            chunk_backward::chunk_dq::launch_unchecked(
                self.client(),
                self.chunk_block_grid(d.k),
                CubeDim::new_1d(CHUNK_THREADS),
                arg(&self.p.q, qk_len),
                arg(&self.p.k, qk_len),
                arg(d_o, v_len),
                arg(&factors, PLANES * plane_len),
                arg(&states, states_len),
                arg(&dscores, scores_len),
                arg(&ch.table, table_len),
                arg(grads.dq, qk_len),
                arg(grads.gq, qk_len),
                ch.count,
                d.h,
                d.k,
                dv,
                c,
                plane_len,
                self.p.scale,
                pass.reverse as u32,
                pass.strict(),
                pass.accumulate as u32,
                grads.weighted(),
            )
        };
        // SAFETY: as above.
        unsafe {
            chunk_backward::chunk_dk::launch_unchecked(
                self.client(),
                self.chunk_block_grid(d.k),
                CubeDim::new_1d(CHUNK_THREADS),
                arg(&self.p.q, qk_len),
                arg(&self.p.k, qk_len),
                arg(v, v_len),
                arg(&factors, PLANES * plane_len),
                arg(&dstates, states_len),
                arg(&suffix, suffix_len),
                arg(dht.unwrap_or(&dht_dummy), state_len),
                arg(&dscores, scores_len),
                arg(&ch.table, table_len),
                arg(grads.dk, qk_len),
                arg(grads.gk, qk_len),
                ch.count,
                d.h,
                d.k,
                dv,
                c,
                plane_len,
                self.p.scale,
                pass.reverse as u32,
                pass.strict(),
                dht.is_some() as u32,
                pass.accumulate as u32,
                grads.weighted(),
            )
        };
        // SAFETY: as above.
        unsafe {
            chunk_backward::chunk_dv::launch_unchecked(
                self.client(),
                self.chunk_block_grid(dv),
                CubeDim::new_1d(CHUNK_THREADS),
                arg(&self.p.k, qk_len),
                arg(d_o, v_len),
                arg(&factors, PLANES * plane_len),
                arg(&dstates, states_len),
                arg(&suffix, suffix_len),
                arg(dht.unwrap_or(&dht_dummy), state_len),
                arg(&scores, scores_len),
                arg(&ch.table, table_len),
                arg(grads.dv, v_len),
                ch.count,
                d.h,
                d.k,
                dv,
                c,
                plane_len,
                pass.reverse as u32,
                dht.is_some() as u32,
                pass.accumulate as u32,
            )
        };

        if let Some(target) = grads.per_head {
            // (b) + (c): the weighted inter-chunk terms left in `gq`, `gk`.
            self.add_head_sums(grads.gq, self.p.rows(), true, target);
            self.add_head_sums(grads.gk, self.p.rows(), true, target);
            // (a): pairs inside a chunk.
            let intra = output(self.ctx, ch.count * d.h);
            // SAFETY: `scores`, `dscores` are `[n_chunks, H, C, C]`, `intra` `[n_chunks, H]`; one
            // cube of 256 threads per (chunk, head) (the kernel's shared array is 256 long).
            unsafe {
                gates::per_head_intra::launch_unchecked(
                    self.client(),
                    grid(ch.count * d.h),
                    CubeDim::new_1d(256),
                    arg(&scores, scores_len),
                    arg(&dscores, scores_len),
                    arg(&ch.table, table_len),
                    arg(&intra, ch.count * d.h),
                    ch.count,
                    d.h,
                    c,
                )
            };
            self.add_head_sums(&intra, ch.count, false, target);
            // (d): pairs crossing a whole chunk.
            let through = output(self.ctx, suffix_len);
            let (count, dim) = per_item(suffix_len);
            // SAFETY: lengths as passed; `through` is `[n_chunks, H, K]`.
            unsafe {
                gates::per_head_through::launch_unchecked(
                    self.client(),
                    count,
                    dim,
                    arg(&factors, PLANES * plane_len),
                    arg(&states, states_len),
                    arg(&dstates, states_len),
                    arg(&suffix, suffix_len),
                    arg(dht.unwrap_or(&dht_dummy), state_len),
                    arg(&ch.table, table_len),
                    arg(&through, suffix_len),
                    ch.count,
                    d.h,
                    d.k,
                    dv,
                    plane_len,
                    dht.is_some() as u32,
                )
            };
            self.add_head_sums(&through, ch.count, true, target);
        }
    }

    // ----- recurrent -----

    fn recurrent_forward(
        &self,
        pass: Pass,
        v: &Handle,
        dv: usize,
        o: &Handle,
        ht: Option<&Handle>,
    ) {
        let d = self.p.dims;
        let n_seq = self.p.n_seq();
        let rows_heads = self.p.rows() * d.h;
        let state_len = n_seq * d.h * d.k * dv;
        let scratch;
        let state = match ht {
            Some(ht) => ht,
            None => {
                scratch = alloc_f32(self.ctx, state_len);
                &scratch
            }
        };
        let g_dummy = self.dummy();
        let h0_dummy = self.dummy();
        let h0 = if pass.reverse {
            None
        } else {
            self.p.h0.as_ref()
        };
        let (count, dim) = per_item(n_seq * d.h * dv);
        for (from, steps) in segments(self.max_len(), self.steps_per_launch(d.k)) {
            // SAFETY: lengths as passed; the state scratch is `[N, H, K, dv]`.
            unsafe {
                recurrent::recurrent_forward::launch_unchecked(
                    self.client(),
                    count.clone(),
                    dim,
                    arg(&self.p.q, rows_heads * d.k),
                    arg(&self.p.k, rows_heads * d.k),
                    arg(v, rows_heads * dv),
                    arg(pass.gate.unwrap_or(&g_dummy), self.gate_len()),
                    arg(&self.p.seqs.table, 2 * n_seq),
                    arg(h0.unwrap_or(&h0_dummy), state_len),
                    arg(o, rows_heads * dv),
                    arg(state, state_len),
                    n_seq,
                    d.h,
                    d.k,
                    dv,
                    self.p.scale,
                    self.gate_code(pass),
                    pass.reverse as u32,
                    pass.strict(),
                    h0.is_some() as u32,
                    pass.accumulate as u32,
                    from,
                    steps,
                )
            };
        }
    }

    fn recurrent_backward(
        &self,
        pass: Pass,
        v: &Handle,
        dv: usize,
        d_o: &Handle,
        dht: Option<&Handle>,
        grads: &PassGrads,
    ) {
        let d = self.p.dims;
        let n_seq = self.p.n_seq();
        let rows_heads = self.p.rows() * d.h;
        let qk_len = rows_heads * d.k;
        let v_len = rows_heads * dv;
        let state_len = n_seq * d.h * d.k * dv;
        let g_dummy = self.dummy();
        let g = pass.gate.unwrap_or(&g_dummy);
        let gate_len = self.gate_len();
        let kind = self.gate_code(pass);
        let h0_dummy = self.dummy();
        let dht_dummy = self.dummy();
        let h0 = if pass.reverse {
            None
        } else {
            self.p.h0.as_ref()
        };
        let max_len = self.max_len();

        let state = alloc_f32(self.ctx, state_len);
        let weighted = grads.per_head.is_some();
        let deriv = alloc_f32(self.ctx, if weighted { state_len } else { 1 });
        let per_head_rows = output(self.ctx, n_seq * d.h * d.k);
        let dht_dummy0 = self.dummy();
        let (count, dim) = per_item(n_seq * d.h * d.k);
        for (from, steps) in segments(max_len, self.steps_per_launch(dv)) {
            // SAFETY: lengths as passed; scratch rows `[N, H, K, dv]`.
            unsafe {
                recurrent::recurrent_dq::launch_unchecked(
                    self.client(),
                    count.clone(),
                    dim,
                    arg(&self.p.q, qk_len),
                    arg(&self.p.k, qk_len),
                    arg(v, v_len),
                    arg(g, gate_len),
                    arg(d_o, v_len),
                    arg(&self.p.seqs.table, 2 * n_seq),
                    arg(h0.unwrap_or(&h0_dummy), state_len),
                    arg(dht.unwrap_or(&dht_dummy0), state_len),
                    arg(grads.dq, qk_len),
                    arg(grads.gq, qk_len),
                    arg(&state, state_len),
                    arg(&deriv, if weighted { state_len } else { 1 }),
                    arg(&per_head_rows, n_seq * d.h * d.k),
                    n_seq,
                    d.h,
                    d.k,
                    dv,
                    self.p.scale,
                    kind,
                    pass.reverse as u32,
                    pass.strict(),
                    h0.is_some() as u32,
                    pass.accumulate as u32,
                    weighted as u32,
                    dht.is_some() as u32,
                    from,
                    steps,
                )
            };
        }
        if let Some(target) = grads.per_head {
            self.add_head_sums(&per_head_rows, n_seq, true, target);
        }
        let carry_scratch;
        let carry = match grads.dh0 {
            Some(dh0) => dh0,
            None => {
                carry_scratch = alloc_f32(self.ctx, state_len);
                &carry_scratch
            }
        };
        let suffix = alloc_f32(self.ctx, n_seq * d.h * d.k);
        for (from, steps) in segments(max_len, self.steps_per_launch(2 * dv)) {
            // SAFETY: as above.
            unsafe {
                recurrent::recurrent_dk::launch_unchecked(
                    self.client(),
                    count.clone(),
                    dim,
                    arg(&self.p.q, qk_len),
                    arg(&self.p.k, qk_len),
                    arg(v, v_len),
                    arg(g, gate_len),
                    arg(d_o, v_len),
                    arg(&self.p.seqs.table, 2 * n_seq),
                    arg(dht.unwrap_or(&dht_dummy), state_len),
                    arg(grads.dk, qk_len),
                    arg(grads.gk, qk_len),
                    arg(carry, state_len),
                    arg(&suffix, n_seq * d.h * d.k),
                    n_seq,
                    d.h,
                    d.k,
                    dv,
                    self.p.scale,
                    kind,
                    pass.reverse as u32,
                    pass.strict(),
                    dht.is_some() as u32,
                    pass.accumulate as u32,
                    from,
                    steps,
                )
            };
        }
        let column_carry = alloc_f32(self.ctx, state_len);
        let dht_dummy2 = self.dummy();
        let (count, dim) = per_item(n_seq * d.h * dv);
        for (from, steps) in segments(max_len, self.steps_per_launch(d.k)) {
            // SAFETY: as above.
            unsafe {
                recurrent::recurrent_dv::launch_unchecked(
                    self.client(),
                    count.clone(),
                    dim,
                    arg(&self.p.q, qk_len),
                    arg(&self.p.k, qk_len),
                    arg(g, gate_len),
                    arg(d_o, v_len),
                    arg(&self.p.seqs.table, 2 * n_seq),
                    arg(dht.unwrap_or(&dht_dummy2), state_len),
                    arg(grads.dv, v_len),
                    arg(&column_carry, state_len),
                    n_seq,
                    d.h,
                    d.k,
                    dv,
                    self.p.scale,
                    kind,
                    pass.reverse as u32,
                    pass.strict(),
                    dht.is_some() as u32,
                    pass.accumulate as u32,
                    from,
                    steps,
                )
            };
        }
    }

    // ----- parallel -----

    fn parallel_forward(&self, pass: Pass, v: &Handle, dv: usize, o: &Handle, ht: Option<&Handle>) {
        let d = self.p.dims;
        let n_seq = self.p.n_seq();
        let rows = self.p.rows();
        let rows_heads = rows * d.h;
        let state_len = n_seq * d.h * d.k * dv;
        let exponent = alloc_f32(self.ctx, rows_heads * d.k);
        let g_dummy = self.dummy();
        let g = pass.gate.unwrap_or(&g_dummy);
        let h0 = if pass.reverse {
            None
        } else {
            self.p.h0.as_ref()
        };
        let (count, dim) = per_item(rows_heads);
        for (from, steps) in segments(self.max_len(), self.steps_per_launch(2 * d.k + dv)) {
            // SAFETY: lengths as passed; the exponent scratch is `[rows, H, K]`.
            unsafe {
                parallel::parallel_forward::launch_unchecked(
                    self.client(),
                    count.clone(),
                    dim,
                    arg(&self.p.q, rows_heads * d.k),
                    arg(&self.p.k, rows_heads * d.k),
                    arg(v, rows_heads * dv),
                    arg(g, self.gate_len()),
                    arg(&self.p.seqs.table, 2 * n_seq),
                    arg(&self.p.seqs.row_seq, rows),
                    arg(o, rows_heads * dv),
                    arg(&exponent, rows_heads * d.k),
                    rows,
                    d.h,
                    d.k,
                    dv,
                    self.p.scale,
                    self.gate_code(pass),
                    pass.reverse as u32,
                    pass.strict(),
                    h0.is_some() as u32,
                    pass.accumulate as u32,
                    from,
                    steps,
                )
            };
        }
        if let Some(h0) = h0 {
            let (count, dim) = per_item(rows_heads * dv);
            // SAFETY: the weights are `[rows, H, K]`, `h0` `[N, H, K, dv]`.
            unsafe {
                parallel::parallel_initial_state::launch_unchecked(
                    self.client(),
                    count,
                    dim,
                    arg(&exponent, rows_heads * d.k),
                    arg(&self.p.seqs.row_seq, rows),
                    arg(h0, state_len),
                    arg(o, rows_heads * dv),
                    rows,
                    d.h,
                    d.k,
                    dv,
                )
            };
        }
        if let Some(ht) = ht {
            self.parallel_final_state(pass, v, dv, ht);
        }
    }

    fn parallel_final_state(&self, pass: Pass, v: &Handle, dv: usize, ht: &Handle) {
        let d = self.p.dims;
        let n_seq = self.p.n_seq();
        let rows_heads = self.p.rows() * d.h;
        let state_len = n_seq * d.h * d.k * dv;
        let g_dummy = self.dummy();
        let h0_dummy = self.dummy();
        let exponent = alloc_f32(self.ctx, n_seq * d.h * d.k);
        let (count, dim) = per_item(n_seq * d.h * d.k);
        for (from, steps) in segments(self.max_len(), self.steps_per_launch(dv)) {
            // SAFETY: lengths as passed (forward direction only: physical rows).
            unsafe {
                parallel::parallel_final_state::launch_unchecked(
                    self.client(),
                    count.clone(),
                    dim,
                    arg(&self.p.k, rows_heads * d.k),
                    arg(v, rows_heads * dv),
                    arg(pass.gate.unwrap_or(&g_dummy), self.gate_len()),
                    arg(&self.p.seqs.table, 2 * n_seq),
                    arg(self.p.h0.as_ref().unwrap_or(&h0_dummy), state_len),
                    arg(ht, state_len),
                    arg(&exponent, n_seq * d.h * d.k),
                    n_seq,
                    d.h,
                    d.k,
                    dv,
                    self.gate_code(pass),
                    self.p.h0.is_some() as u32,
                    from,
                    steps,
                )
            };
        }
    }

    fn parallel_backward(
        &self,
        pass: Pass,
        v: &Handle,
        dv: usize,
        d_o: &Handle,
        dht: Option<&Handle>,
        grads: &PassGrads,
    ) {
        let d = self.p.dims;
        let n_seq = self.p.n_seq();
        let rows = self.p.rows();
        let rows_heads = rows * d.h;
        let qk_len = rows_heads * d.k;
        let v_len = rows_heads * dv;
        let state_len = n_seq * d.h * d.k * dv;
        let g_dummy = self.dummy();
        let g = pass.gate.unwrap_or(&g_dummy);
        let gate_len = self.gate_len();
        let kind = self.gate_code(pass);
        let h0 = if pass.reverse {
            None
        } else {
            self.p.h0.as_ref()
        };
        let max_len = self.max_len();
        let per_launch = self.steps_per_launch(3 * d.k + dv);

        let exponent = alloc_f32(self.ctx, qk_len);
        let weighted = grads.weighted();
        let walk_partial = output(self.ctx, rows_heads);
        let (count, dim) = per_item(rows_heads);
        for (from, steps) in segments(max_len, per_launch) {
            // SAFETY: lengths as passed.
            unsafe {
                parallel::parallel_dq::launch_unchecked(
                    self.client(),
                    count.clone(),
                    dim,
                    arg(&self.p.q, qk_len),
                    arg(&self.p.k, qk_len),
                    arg(v, v_len),
                    arg(g, gate_len),
                    arg(d_o, v_len),
                    arg(&self.p.seqs.table, 2 * n_seq),
                    arg(&self.p.seqs.row_seq, rows),
                    arg(grads.dq, qk_len),
                    arg(grads.gq, qk_len),
                    arg(&exponent, qk_len),
                    arg(&walk_partial, rows_heads),
                    rows,
                    d.h,
                    d.k,
                    dv,
                    self.p.scale,
                    kind,
                    pass.reverse as u32,
                    pass.strict(),
                    h0.is_some() as u32,
                    pass.accumulate as u32,
                    weighted,
                    from,
                    steps,
                )
            };
        }
        let h0_dummy = self.dummy();
        let from_h0 = output(self.ctx, qk_len);
        let (count_k, dim_k) = per_item(qk_len);
        // SAFETY: lengths as passed; `exponent` holds the `h0` weights when flagged.
        unsafe {
            parallel::parallel_dq_finish::launch_unchecked(
                self.client(),
                count_k.clone(),
                dim_k,
                arg(&self.p.q, qk_len),
                arg(d_o, v_len),
                arg(&self.p.seqs.table, 2 * n_seq),
                arg(&self.p.seqs.row_seq, rows),
                arg(h0.unwrap_or(&h0_dummy), state_len),
                arg(&exponent, qk_len),
                arg(grads.dq, qk_len),
                arg(grads.gq, qk_len),
                arg(&from_h0, qk_len),
                rows,
                d.h,
                d.k,
                dv,
                pass.reverse as u32,
                h0.is_some() as u32,
                weighted,
            )
        };

        for (from, steps) in segments(max_len, per_launch) {
            // SAFETY: lengths as passed.
            unsafe {
                parallel::parallel_dkdv::launch_unchecked(
                    self.client(),
                    count.clone(),
                    dim,
                    arg(&self.p.q, qk_len),
                    arg(&self.p.k, qk_len),
                    arg(v, v_len),
                    arg(g, gate_len),
                    arg(d_o, v_len),
                    arg(&self.p.seqs.table, 2 * n_seq),
                    arg(&self.p.seqs.row_seq, rows),
                    arg(grads.dk, qk_len),
                    arg(grads.dv, v_len),
                    arg(grads.gk, qk_len),
                    arg(&exponent, qk_len),
                    rows,
                    d.h,
                    d.k,
                    dv,
                    self.p.scale,
                    kind,
                    pass.reverse as u32,
                    pass.strict(),
                    pass.accumulate as u32,
                    from,
                    steps,
                )
            };
        }
        let dht_dummy = self.dummy();
        let from_dht = output(self.ctx, qk_len);
        // SAFETY: lengths as passed; `exponent` now holds the `ht` weights of each key row.
        unsafe {
            parallel::parallel_dk_finish::launch_unchecked(
                self.client(),
                count_k,
                dim_k,
                arg(&self.p.k, qk_len),
                arg(v, v_len),
                arg(&self.p.seqs.table, 2 * n_seq),
                arg(&self.p.seqs.row_seq, rows),
                arg(dht.unwrap_or(&dht_dummy), state_len),
                arg(&exponent, qk_len),
                arg(grads.dk, qk_len),
                arg(grads.gk, qk_len),
                arg(&from_dht, qk_len),
                rows,
                d.h,
                d.k,
                dv,
                pass.reverse as u32,
                dht.is_some() as u32,
                weighted,
            )
        };
        if let Some(dht) = dht {
            let (count, dim) = per_item(v_len);
            // SAFETY: lengths as passed (forward direction only).
            unsafe {
                parallel::parallel_dv_final_state::launch_unchecked(
                    self.client(),
                    count,
                    dim,
                    arg(&self.p.k, qk_len),
                    arg(&self.p.seqs.row_seq, rows),
                    arg(dht, state_len),
                    arg(&exponent, qk_len),
                    arg(grads.dv, v_len),
                    rows,
                    d.h,
                    d.k,
                    dv,
                )
            };
        }
        if let Some(target) = grads.per_head {
            self.add_head_sums(&walk_partial, rows, false, target);
            if h0.is_some() {
                self.add_head_sums(&from_h0, rows, true, target);
            }
            if dht.is_some() {
                self.add_head_sums(&from_dht, rows, true, target);
            }
        }
        if let Some(dh0) = grads.dh0 {
            let dht_dummy = self.dummy();
            let running = alloc_f32(self.ctx, n_seq * d.h * d.k);
            let h0_pair = output(self.ctx, n_seq * d.h * d.k);
            let (count, dim) = per_item(n_seq * d.h * d.k);
            for (from, steps) in segments(max_len, self.steps_per_launch(dv)) {
                // SAFETY: lengths as passed (forward direction only).
                unsafe {
                    parallel::parallel_dh0::launch_unchecked(
                        self.client(),
                        count.clone(),
                        dim,
                        arg(&self.p.q, qk_len),
                        arg(g, gate_len),
                        arg(d_o, v_len),
                        arg(&self.p.seqs.table, 2 * n_seq),
                        arg(h0.unwrap_or(&h0_dummy), state_len),
                        arg(dht.unwrap_or(&dht_dummy), state_len),
                        arg(dh0, state_len),
                        arg(&running, n_seq * d.h * d.k),
                        arg(&h0_pair, n_seq * d.h * d.k),
                        n_seq,
                        d.h,
                        d.k,
                        dv,
                        self.p.scale,
                        kind,
                        dht.is_some() as u32,
                        weighted,
                        from,
                        steps,
                    )
                };
            }
            if let Some(target) = grads.per_head {
                self.add_head_sums(&h0_pair, n_seq, true, target);
            }
        }
    }

    // ----- gate gradient -----

    fn gate_grad_scan(&self, pass: Pass, grads: &PassGrads, dg: &Handle) {
        let d = self.p.dims;
        let n_seq = self.p.n_seq();
        let qk_len = self.p.rows() * d.h * d.k;
        let (count, dim) = per_item(n_seq * d.h * d.k);
        // SAFETY: lengths as passed; `dg` is the expanded `[rows, H, K]` gradient.
        unsafe {
            gates::gate_grad_scan::launch_unchecked(
                self.client(),
                count,
                dim,
                arg(grads.gq, qk_len),
                arg(grads.gk, qk_len),
                arg(&self.p.seqs.table, 2 * n_seq),
                arg(dg, qk_len),
                n_seq,
                d.h,
                d.k,
                pass.reverse as u32,
            )
        };
    }

    /// The `dht` path's share of the gate gradient (forward pass only: `dht` is causal).
    fn final_state_gate_grad(&self, pass: Pass, v: &Handle, dv: usize, dht: &Handle, dg: &Handle) {
        let d = self.p.dims;
        let n_seq = self.p.n_seq();
        let rows = self.p.rows();
        let qk_len = rows * d.h * d.k;
        let state_len = n_seq * d.h * d.k * dv;
        let projected = output(self.ctx, qk_len);
        let (count, dim) = per_item(qk_len);
        // SAFETY: `v` is `[rows, H, dv]`, `dht` `[N, H, K, dv]`, `projected` `[rows, H, K]`.
        unsafe {
            gates::dht_projection::launch_unchecked(
                self.client(),
                count,
                dim,
                arg(v, rows * d.h * dv),
                arg(dht, state_len),
                arg(&self.p.seqs.row_seq, rows),
                arg(&projected, qk_len),
                rows,
                d.h,
                d.k,
                dv,
            )
        };
        let scratch = output(self.ctx, qk_len);
        let g_dummy = self.dummy();
        let h0_dummy = self.dummy();
        let (count, dim) = per_item(n_seq * d.h * d.k);
        // SAFETY: lengths as passed; the scratch is `[rows, H, K]`.
        unsafe {
            gates::final_state_gate_grad::launch_unchecked(
                self.client(),
                count,
                dim,
                arg(&self.p.k, qk_len),
                arg(&projected, qk_len),
                arg(pass.gate.unwrap_or(&g_dummy), self.gate_len()),
                arg(&self.p.seqs.table, 2 * n_seq),
                arg(self.p.h0.as_ref().unwrap_or(&h0_dummy), state_len),
                arg(dht, state_len),
                arg(&scratch, qk_len),
                arg(dg, qk_len),
                n_seq,
                d.h,
                d.k,
                dv,
                self.gate_code(pass),
                self.p.h0.is_some() as u32,
            )
        };
    }

    /// Adds `sum over rows (and key channels when `per_channel`)` of `partials` (`[rows, H]` or
    /// `[rows, H, K]`) to the per-head gradient `target` (`[H]`).
    ///
    /// **Per-head gates.** For a gate `g_h` shared by every token, `dL/dg_h = sum_pairs (i - j)
    /// c_ij` (each pair `j <= i` contributes `c_ij` to the loss and crosses `i - j` gates; `h0`
    /// sits before the first token, `dht` after the last). The closed form computes this as
    /// `sum_i (i + 1) (gq_i - gk_i)`: position weights up to `T` multiply rounding errors of terms
    /// that then cancel, which cost up to `1e-4` relative in f32 (measured: `T = 300`, `n = 0.1`).
    /// So per-head gates take the pairs' weights directly, each form where it has them: the
    /// parallel form weighs each pair by its distance; the recurrent form carries the forward
    /// derivative `dS/dg` (a sum of positive multiples of state terms); the chunkwise form splits
    /// `i - j` at the chunk boundaries into (a) pairs inside a chunk, weighted `t - j` from the
    /// materialised scores, (b) inter-chunk terms of `q`, weighted by the gates from the chunk
    /// start to `t`, (c) of `k`, by the gates from `j` to the chunk end, and (d) pairs crossing a
    /// whole chunk, `len * <decayed h_m, D_m>`. Every weight is at most the chunk length.
    fn add_head_sums(&self, partials: &Handle, rows: usize, per_channel: bool, target: &Handle) {
        let d = self.p.dims;
        let per_row = if per_channel {
            let per_row = output(self.ctx, rows * d.h);
            let (count, dim) = per_item(rows * d.h);
            // SAFETY: `partials` is `[rows * H, K]`, `per_row` `[rows * H]`.
            unsafe {
                gates::gate_grad_sum_channels::launch_unchecked(
                    self.client(),
                    count,
                    dim,
                    arg(partials, rows * d.h * d.k),
                    arg(&per_row, rows * d.h),
                    rows * d.h,
                    d.k,
                )
            };
            per_row
        } else {
            partials.clone()
        };
        // SAFETY: one cube of 256 threads per head (the kernel's shared array is 256 long).
        unsafe {
            gates::gate_grad_sum_rows::launch_unchecked(
                self.client(),
                grid(d.h),
                CubeDim::new_1d(256),
                arg(&per_row, rows * d.h),
                arg(target, d.h),
                rows,
                d.h,
            )
        };
    }

    /// The expanded `[rows, H, K]` gate gradient summed to the gate's own shape.
    fn reduce_gate_grad(&self, expanded: &Handle) -> Handle {
        let d = self.p.dims;
        let rows = self.p.rows();
        match self.p.gate_kind {
            GateKind::Vector | GateKind::None => expanded.clone(),
            GateKind::Scalar | GateKind::PerHead => {
                let per_token = output(self.ctx, rows * d.h);
                let (count, dim) = per_item(rows * d.h);
                // SAFETY: `expanded` is `[rows * H, K]`, `per_token` `[rows * H]`.
                unsafe {
                    gates::gate_grad_sum_channels::launch_unchecked(
                        self.client(),
                        count,
                        dim,
                        arg(expanded, rows * d.h * d.k),
                        arg(&per_token, rows * d.h),
                        rows * d.h,
                        d.k,
                    )
                };
                if self.p.gate_kind == GateKind::Scalar {
                    return per_token;
                }
                let per_head = zeros(self.ctx, d.h);
                self.add_head_sums(&per_token, rows, false, &per_head);
                per_head
            }
        }
    }
}
