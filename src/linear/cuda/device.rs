//! Device-resident API: the host API's builder, [`LinearAttention`], over [`CudaTensor`]s (a
//! typed [`DeviceSlice`] with a shape: a whole cudarc slice, or a run of one at an offset, as a
//! framework's tensor is a view into its storage). Outputs are cudarc mutable views
//! (`CudaSlice::as_view_mut`, or disjoint parts of one buffer from `split_at_mut`), launches go to
//! the caller's stream, nothing is copied to the host (except the tiny chunk tables built from
//! `cu_seqlens`, which is a host slice because the launch grids depend on it).
//!
//! Shapes are checked by the host API's validator and typed errors returned. Values are checked
//! on the device by default ([`LinearAttention::with_value_check`], [`ValueCheck::On`]): one
//! `la_value_flags` pass per input (finite values, gates `<= 0`) and one 4-byte-per-tensor read
//! back, which synchronises the stream once; a bad value is the host API's typed error. With
//! [`ValueCheck::Off`] the call is fully asynchronous and the caller vouches for the values (a
//! positive gate overflows).

use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop,
};
use half::{bf16, f16};
use linattn_reference::linear::{Dims, Direction, Form, GateKind};

use super::engine::{self, BackwardTargets, Cotangents, ForwardTargets, Inputs};
use super::values::{self, CheckedBuffer};
use super::{Spec, engine_config};
use crate::backend::ValueCheck;
use crate::cuda::CudaContext;
use crate::cuda::exec::CudaExec;
use crate::error::{Error, Result};
use crate::linear::{Gate, LinearAttention};
use crate::tensor::{DType, Shaped};
use crate::validation::{describe, parse_cu_seqlens};

/// `len` elements of a device slice from `offset` on: a whole [`CudaSlice`] (`From`), or a run of
/// one ([`DeviceSlice::range`]), such as a framework tensor's elements inside its storage (candle
/// hands out its storage and the layout's start offset). Read-only, `Copy`.
pub struct DeviceSlice<'a, T> {
    slice: &'a CudaSlice<T>,
    offset: usize,
    len: usize,
}

impl<T> Clone for DeviceSlice<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for DeviceSlice<'_, T> {}

impl<'a, T> From<&'a CudaSlice<T>> for DeviceSlice<'a, T> {
    fn from(slice: &'a CudaSlice<T>) -> Self {
        DeviceSlice {
            slice,
            offset: 0,
            len: slice.len(),
        }
    }
}

impl<'a, T: DeviceRepr> DeviceSlice<'a, T> {
    /// Elements `offset..offset + len` of `slice`; an error when they are not all in it.
    pub fn range(slice: &'a CudaSlice<T>, offset: usize, len: usize) -> Result<Self> {
        if offset.checked_add(len).is_none_or(|end| end > slice.len()) {
            return Err(Error::InvalidArgument(format!(
                "elements {offset}..{} of a device slice of {}",
                offset.saturating_add(len),
                slice.len()
            )));
        }
        Ok(DeviceSlice { slice, offset, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of the first element, with cudarc's stream-ordering guard of the whole
    /// slice (the stream waits for its last write; the guard records this read).
    pub(crate) fn device_ptr<'s>(&self, stream: &'s CudaStream) -> (u64, SyncOnDrop<'s>)
    where
        'a: 's,
    {
        let (base, guard) = self.slice.device_ptr(stream);
        (
            base + (self.offset * std::mem::size_of::<T>()) as u64,
            guard,
        )
    }

    /// A copy on the host (the value check's error path).
    pub(crate) fn download(
        &self,
        stream: &Arc<CudaStream>,
    ) -> std::result::Result<Vec<T>, cudarc::driver::DriverError> {
        crate::cuda::count_host_transfer(self.len * std::mem::size_of::<T>());
        stream.clone_dtoh(&self.slice.slice(self.offset..self.offset + self.len))
    }
}

/// A device slice of one of the supported element types (bf16, f16, f32). `From` a `&CudaSlice`
/// of one of them for a whole slice, or a [`DeviceSlice`] for a part of one.
#[derive(Clone, Copy)]
pub enum TypedSlice<'a> {
    BF16(DeviceSlice<'a, bf16>),
    F16(DeviceSlice<'a, f16>),
    F32(DeviceSlice<'a, f32>),
}

impl<'a> From<&'a CudaSlice<bf16>> for TypedSlice<'a> {
    fn from(s: &'a CudaSlice<bf16>) -> Self {
        TypedSlice::BF16(s.into())
    }
}

impl<'a> From<&'a CudaSlice<f16>> for TypedSlice<'a> {
    fn from(s: &'a CudaSlice<f16>) -> Self {
        TypedSlice::F16(s.into())
    }
}

impl<'a> From<&'a CudaSlice<f32>> for TypedSlice<'a> {
    fn from(s: &'a CudaSlice<f32>) -> Self {
        TypedSlice::F32(s.into())
    }
}

impl TypedSlice<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            TypedSlice::BF16(_) => DType::BF16,
            TypedSlice::F16(_) => DType::F16,
            TypedSlice::F32(_) => DType::F32,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TypedSlice::BF16(s) => s.len(),
            TypedSlice::F16(s) => s.len(),
            TypedSlice::F32(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'a> From<DeviceSlice<'a, bf16>> for TypedSlice<'a> {
    fn from(s: DeviceSlice<'a, bf16>) -> Self {
        TypedSlice::BF16(s)
    }
}

impl<'a> From<DeviceSlice<'a, f16>> for TypedSlice<'a> {
    fn from(s: DeviceSlice<'a, f16>) -> Self {
        TypedSlice::F16(s)
    }
}

impl<'a> From<DeviceSlice<'a, f32>> for TypedSlice<'a> {
    fn from(s: DeviceSlice<'a, f32>) -> Self {
        TypedSlice::F32(s)
    }
}

/// A device tensor of the CUDA tier: a typed slice of device memory (a whole `CudaSlice`, or a
/// framework tensor's run inside its storage) with a row-major shape. The CUDA twin of
/// `cube::DeviceTensor`: both are [`Shaped`], and the device APIs of both take the host API's
/// builders over them ([`LinearAttention`], `attention::Attention`).
#[derive(Clone)]
pub struct CudaTensor<'a> {
    data: TypedSlice<'a>,
    shape: Vec<usize>,
}

impl std::fmt::Debug for CudaTensor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaTensor({:?}, {})", self.shape, self.data.dtype())
    }
}

impl Shaped for CudaTensor<'_> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn dtype(&self) -> DType {
        self.data.dtype()
    }
}

impl<'a> CudaTensor<'a> {
    /// `data` (a `&CudaSlice` of bf16 / f16 / f32, a [`DeviceSlice`] or a [`TypedSlice`]) seen
    /// with `shape`; an error unless it holds exactly the shape's element count.
    pub fn new(data: impl Into<TypedSlice<'a>>, shape: Vec<usize>) -> Result<Self> {
        let data = data.into();
        let numel: usize = shape.iter().product();
        if data.len() != numel {
            return Err(Error::InvalidArgument(format!(
                "a device slice of {} elements seen as shape {shape:?} ({numel} elements)",
                data.len()
            )));
        }
        Ok(CudaTensor { data, shape })
    }

    pub fn data(&self) -> TypedSlice<'a> {
        self.data
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The f32 slice of an f32 tensor (gates, states and f32 cotangents are f32 on this tier).
    pub(crate) fn f32_slice(&self, name: &str, what: &str) -> Result<DeviceSlice<'a, f32>> {
        match self.data {
            TypedSlice::F32(s) => Ok(s),
            other => Err(Error::UnsupportedDtype {
                tensor: name.into(),
                dtype: other.dtype(),
                backend: "cuda".into(),
                supported: format!("f32 ({what})"),
            }),
        }
    }
}

/// One engine problem over CUDA device tensors: the host API's builder, [`LinearAttention`], over
/// [`CudaTensor`]s (gates and `h0` f32).
pub type CudaLinearAttention<'p, 'a> = LinearAttention<'p, CudaTensor<'a>>;

/// A gate over CUDA device tensors (f32 natural-log decays `<= 0`).
pub type CudaGate<'p, 'a> = Gate<'p, CudaTensor<'a>>;

/// The problem lowered to slices: validated sizes, f32 gates and state.
fn lower<'p, 'a: 'p>(
    problem: &LinearAttention<'p, CudaTensor<'a>>,
) -> Result<(Spec, DeviceProblem<'p>)> {
    let spec = problem.validate_layout()?;
    let gate = |name: &str, g: &Gate<'p, CudaTensor<'a>>| -> Result<DeviceGate<'p>> {
        Ok(match *g {
            Gate::None => DeviceGate::None,
            Gate::PerHead(t) => DeviceGate::PerHead(t.f32_slice(name, "log decays")?),
            Gate::Scalar(t) => DeviceGate::Scalar(t.f32_slice(name, "log decays")?),
            Gate::Vector(t) => DeviceGate::Vector(t.f32_slice(name, "log decays")?),
        })
    };
    let lowered = DeviceProblem {
        dims: spec.dims,
        q: problem.q.data,
        k: problem.k.data,
        v: problem.v.data,
        gate: gate("g", &problem.gate)?,
        gate_bwd: problem
            .gate_bwd
            .as_ref()
            .map(|g| gate("g_bwd", g))
            .transpose()?,
        direction: problem.direction,
        scale: problem.scale,
        normalize: problem.normalize,
        h0: problem
            .h0
            .map(|t| t.f32_slice("h0", "the state"))
            .transpose()?,
        cu_seqlens: problem.cu_seqlens,
        value_check: problem.value_check,
    };
    Ok((spec, lowered))
}

/// A lowered gate (f32 natural-log decays `<= 0`).
#[derive(Clone, Copy)]
pub(crate) enum DeviceGate<'a> {
    None,
    /// `[H]`.
    PerHead(DeviceSlice<'a, f32>),
    /// `[B, T, H]`.
    Scalar(DeviceSlice<'a, f32>),
    /// `[B, T, H, K]`.
    Vector(DeviceSlice<'a, f32>),
}

impl<'a> DeviceGate<'a> {
    fn kind(&self) -> GateKind {
        match self {
            DeviceGate::None => GateKind::None,
            DeviceGate::PerHead(_) => GateKind::PerHead,
            DeviceGate::Scalar(_) => GateKind::Scalar,
            DeviceGate::Vector(_) => GateKind::Vector,
        }
    }

    fn slice(&self) -> Option<DeviceSlice<'a, f32>> {
        match *self {
            DeviceGate::None => None,
            DeviceGate::PerHead(s) | DeviceGate::Scalar(s) | DeviceGate::Vector(s) => Some(s),
        }
    }
}

/// One engine problem lowered to device slices (from a [`CudaLinearAttention`]).
#[derive(Clone, Copy)]
pub(crate) struct DeviceProblem<'a> {
    /// With `cu_seqlens`, `b == 1` and `t` is the packed length.
    pub dims: Dims,
    pub q: TypedSlice<'a>,
    pub k: TypedSlice<'a>,
    pub v: TypedSlice<'a>,
    pub gate: DeviceGate<'a>,
    pub gate_bwd: Option<DeviceGate<'a>>,
    pub direction: Direction,
    /// Defaults to `K^-0.5`.
    pub scale: Option<f64>,
    pub normalize: Option<f64>,
    /// `[N, H, K, V]`, causal only.
    pub h0: Option<DeviceSlice<'a, f32>>,
    /// Packed offsets `[N + 1]` (host).
    pub cu_seqlens: Option<&'a [i64]>,
    /// [`ValueCheck::On`] (the default of [`ValueCheck`]): the input values (and the cotangents
    /// in the backward pass) are checked on the device before the launches.
    pub value_check: ValueCheck,
}

/// Forward results, written in place (f32): `o: [B, T, H, V]`, `ht: [N, H, K, V]` (whole slices
/// through `as_view_mut`, or parts of one buffer through `split_at_mut`).
pub struct DeviceForward<'a> {
    pub o: CudaViewMut<'a, f32>,
    pub ht: Option<CudaViewMut<'a, f32>>,
}

/// Gradients, written in place (f32), shaped like their inputs.
pub struct DeviceBackward<'a> {
    pub dq: CudaViewMut<'a, f32>,
    pub dk: CudaViewMut<'a, f32>,
    pub dv: CudaViewMut<'a, f32>,
    pub dg: Option<CudaViewMut<'a, f32>>,
    pub dg_bwd: Option<CudaViewMut<'a, f32>>,
    pub dh0: Option<CudaViewMut<'a, f32>>,
}

fn expect_len(name: &str, len: usize, want: usize, what: &str) -> Result<()> {
    if len != want {
        return Err(Error::ShapeMismatch {
            tensor: name.to_string(),
            expected: format!("{what} = {want} elements"),
            actual: vec![len],
        });
    }
    Ok(())
}

impl DeviceProblem<'_> {
    /// Checks sizes and options; the device counterpart of `LinearAttention::validate`.
    pub fn validate(&self) -> Result<Spec> {
        let d = self.dims;
        if [d.b, d.t, d.h, d.k, d.v].contains(&0) {
            return Err(Error::InvalidArgument(format!(
                "every dimension must be >= 1, got {d:?}"
            )));
        }
        expect_len("q", self.q.len(), d.qk_len(), "B*T*H*K")?;
        expect_len("k", self.k.len(), d.qk_len(), "B*T*H*K")?;
        expect_len("v", self.v.len(), d.v_len(), "B*T*H*V")?;
        let dtype = self.q.dtype();
        if self.k.dtype() != dtype || self.v.dtype() != dtype {
            return Err(Error::InvalidArgument(
                "q, k, v must share one dtype".into(),
            ));
        }
        let cu_seqlens = match self.cu_seqlens {
            None => None,
            Some(cu) => {
                if d.b != 1 {
                    return Err(Error::BadCuSeqlens(format!(
                        "variable length needs B = 1, got B = {}",
                        d.b
                    )));
                }
                Some(parse_cu_seqlens(cu, d.t)?)
            }
        };
        let num_sequences = cu_seqlens.as_ref().map_or(d.b, |cu| cu.len() - 1);
        let gate_kind = self.gate.kind();
        let check_gate = |name: &str, g: &DeviceGate| -> Result<()> {
            if let Some(s) = g.slice() {
                expect_len(name, s.len(), g.kind().len(&d), "the gate's element count")?;
            }
            Ok(())
        };
        check_gate("g", &self.gate)?;
        if let Some(gb) = &self.gate_bwd {
            if self.direction != Direction::Bidirectional || gb.kind() != gate_kind {
                return Err(Error::InvalidArgument(
                    "`g_bwd` needs the bidirectional direction and the same gate kind as `g`"
                        .into(),
                ));
            }
            check_gate("g_bwd", gb)?;
        }
        let scale = self.scale.unwrap_or((d.k as f64).powf(-0.5));
        if !scale.is_finite() || scale == 0.0 {
            return Err(Error::InvalidArgument(format!(
                "scale must be finite and nonzero, got {scale}"
            )));
        }
        if let Some(eps) = self.normalize
            && !(eps.is_finite() && eps >= 0.0)
        {
            return Err(Error::InvalidArgument(format!(
                "normalisation eps must be finite and >= 0, got {eps}"
            )));
        }
        if let Some(h0) = self.h0 {
            if self.direction != Direction::Causal || self.normalize.is_some() {
                return Err(Error::InvalidArgument(
                    "an initial state needs the causal direction without normalisation".into(),
                ));
            }
            expect_len("h0", h0.len(), num_sequences * d.state_len(), "N*H*K*V")?;
        }
        Ok(Spec {
            dims: d,
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

/// A device buffer the value check may have to read back (its error path only).
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    Tensor(TypedSlice<'a>),
    F32(DeviceSlice<'a, f32>),
}

/// Runs the device-side value check over `checked` (addresses already taken) and turns a flag
/// into the typed error of the first bad element, read back from `sources`.
pub(crate) fn check_values<'a>(
    exec: &CudaExec,
    stream: &Arc<CudaStream>,
    checked: &[CheckedBuffer],
    sources: &[Source<'a>],
) -> Result<()> {
    let flags = values::value_flags_on(exec, checked)?;
    let runtime = |e: cudarc::driver::DriverError| Error::Runtime {
        backend: "cuda".into(),
        message: format!("reading a flagged input back: {e}"),
    };
    values::first_error(checked, &flags, |i| {
        Ok(match sources[i] {
            Source::Tensor(TypedSlice::BF16(s)) => s
                .download(stream)
                .map_err(runtime)?
                .iter()
                .map(|x| x.to_f64())
                .collect(),
            Source::Tensor(TypedSlice::F16(s)) => s
                .download(stream)
                .map_err(runtime)?
                .iter()
                .map(|x| x.to_f64())
                .collect(),
            Source::Tensor(TypedSlice::F32(s)) | Source::F32(s) => s
                .download(stream)
                .map_err(runtime)?
                .iter()
                .map(|&x| x as f64)
                .collect(),
        })
    })
}

/// The buffers of `problem` (and the extra cotangents) to check, with their addresses in `inp`.
fn input_checks<'a>(
    problem: &DeviceProblem<'a>,
    inp: &Inputs,
    extra: &[(&'static str, u64, Source<'a>)],
) -> (Vec<CheckedBuffer<'static>>, Vec<Source<'a>>) {
    let mut checked = Vec::new();
    let mut sources = Vec::new();
    let mut push = |name: &'static str, address: u64, source: Source<'a>, gate: bool| {
        let (len, dtype) = match source {
            Source::Tensor(t) => (t.len(), t.dtype()),
            Source::F32(s) => (s.len(), DType::F32),
        };
        checked.push(CheckedBuffer {
            name,
            address,
            len,
            dtype,
            gate,
        });
        sources.push(source);
    };
    push("q", inp.q, Source::Tensor(problem.q), false);
    push("k", inp.k, Source::Tensor(problem.k), false);
    push("v", inp.v, Source::Tensor(problem.v), false);
    if let Some(g) = problem.gate.slice() {
        push("g", inp.g, Source::F32(g), true);
    }
    if let Some(g) = problem.gate_bwd.as_ref().and_then(DeviceGate::slice) {
        push("g_bwd", inp.g_bwd, Source::F32(g), true);
    }
    if let Some(h0) = problem.h0 {
        push("h0", inp.h0, Source::F32(h0), false);
    }
    for &(name, address, source) in extra {
        push(name, address, source, false);
    }
    (checked, sources)
}

/// Raw device addresses of the slices, with cudarc's stream-ordering guards kept alive until the
/// launches are issued.
pub(crate) struct Pointers<'a> {
    pub(crate) stream: &'a Arc<CudaStream>,
    pub(crate) guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Pointers<'a> {
    pub(crate) fn new(stream: &'a Arc<CudaStream>) -> Self {
        Pointers {
            stream,
            guards: Vec::new(),
        }
    }

    pub(crate) fn read<T: DeviceRepr>(&mut self, s: DeviceSlice<'a, T>) -> u64 {
        let (ptr, guard) = s.device_ptr(self.stream);
        self.guards.push(guard);
        ptr
    }

    pub(crate) fn write<T>(&mut self, s: &'a mut CudaViewMut<'_, T>) -> u64 {
        let (ptr, guard) = s.device_ptr_mut(self.stream);
        self.guards.push(guard);
        ptr
    }

    /// A whole owned slice (a workspace of the call).
    pub(crate) fn write_slice<T>(&mut self, s: &'a mut CudaSlice<T>) -> u64 {
        let (ptr, guard) = s.device_ptr_mut(self.stream);
        self.guards.push(guard);
        ptr
    }

    pub(crate) fn tensor(&mut self, t: TypedSlice<'a>) -> u64 {
        match t {
            TypedSlice::BF16(s) => self.read(s),
            TypedSlice::F16(s) => self.read(s),
            TypedSlice::F32(s) => self.read(s),
        }
    }

    fn gate(&mut self, g: Option<&DeviceGate<'a>>) -> u64 {
        g.and_then(DeviceGate::slice).map_or(0, |s| self.read(s))
    }

    fn inputs(&mut self, p: &DeviceProblem<'a>) -> Inputs {
        Inputs {
            q: self.tensor(p.q),
            k: self.tensor(p.k),
            v: self.tensor(p.v),
            g: self.gate(Some(&p.gate)),
            g_bwd: self.gate(p.gate_bwd.as_ref()),
            h0: p.h0.map_or(0, |s| self.read(s)),
        }
    }
}

/// Forward pass over CUDA device tensors, launched on `stream` (asynchronous: results are ready
/// when the stream reaches this point; with the value check on, the call waits for the stream
/// once).
pub fn forward<'a>(
    ctx: &CudaContext,
    stream: &'a Arc<CudaStream>,
    problem: &CudaLinearAttention<'_, 'a>,
    form: Form,
    out: DeviceForward<'a>,
) -> Result<()> {
    let (_, lowered) = lower(problem)?;
    forward_lowered(ctx, stream, &lowered, form, out)
}

fn forward_lowered<'a>(
    ctx: &CudaContext,
    stream: &'a Arc<CudaStream>,
    problem: &DeviceProblem<'a>,
    form: Form,
    out: DeviceForward<'a>,
) -> Result<()> {
    let spec = problem.validate()?;
    let cfg = engine_config(&spec, form)?;
    expect_len("o", out.o.len(), spec.dims.v_len(), "B*T*H*V")?;
    match (&out.ht, spec.has_final_state()) {
        (Some(ht), true) => expect_len(
            "ht",
            ht.len(),
            spec.num_sequences * spec.dims.state_len(),
            "N*H*K*V",
        )?,
        (Some(_), false) => {
            return Err(Error::InvalidArgument(
                "`ht` requested but this problem has no final state".into(),
            ));
        }
        (None, _) => {}
    }
    let exec = CudaExec::on_stream(ctx, stream.clone());
    // The outputs outlive the guards of `ptrs` (declared after them, dropped before).
    let mut out = out;
    let mut ptrs = Pointers::new(stream);
    let inp = ptrs.inputs(problem);
    if problem.value_check == ValueCheck::On {
        let (checked, sources) = input_checks(problem, &inp, &[]);
        check_values(&exec, stream, &checked, &sources)?;
    }
    let targets = ForwardTargets {
        o: ptrs.write(&mut out.o),
        ht: out.ht.as_mut().map_or(0, |s| ptrs.write(s)),
    };
    engine::forward(&exec, &cfg, &inp, &targets)
}

/// Backward pass over CUDA device tensors (recomputes what it needs), launched on `stream`.
/// `d_o` (`[B, T, H, V]`) may be of the inputs' dtype or f32; `d_ht` (`[N, H, K, V]`) is f32.
pub fn backward<'a>(
    ctx: &CudaContext,
    stream: &'a Arc<CudaStream>,
    problem: &CudaLinearAttention<'_, 'a>,
    form: Form,
    d_o: &CudaTensor<'a>,
    d_ht: Option<&CudaTensor<'a>>,
    out: DeviceBackward<'a>,
) -> Result<()> {
    let (spec, lowered) = lower(problem)?;
    let o_shape = spec.o_shape();
    if d_o.shape() != o_shape.as_slice() {
        return Err(Error::shape(
            "do",
            describe(&["B", "T", "H", "V"], &o_shape),
            d_o.shape(),
        ));
    }
    let d_ht = match d_ht {
        None => None,
        Some(t) => {
            let state = spec.state_shape();
            if t.shape() != state.as_slice() {
                return Err(Error::shape(
                    "dht",
                    describe(&["N", "H", "K", "V"], &state),
                    t.shape(),
                ));
            }
            Some(t.f32_slice("dht", "the state's cotangent")?)
        }
    };
    backward_lowered(ctx, stream, &lowered, form, d_o.data, d_ht, out)
}

fn backward_lowered<'a>(
    ctx: &CudaContext,
    stream: &'a Arc<CudaStream>,
    problem: &DeviceProblem<'a>,
    form: Form,
    d_o: TypedSlice<'a>,
    d_ht: Option<DeviceSlice<'a, f32>>,
    out: DeviceBackward<'a>,
) -> Result<()> {
    let spec = problem.validate()?;
    let cfg = engine_config(&spec, form)?;
    let d = spec.dims;
    expect_len("do", d_o.len(), d.v_len(), "B*T*H*V")?;
    if d_o.dtype() != spec.dtype && d_o.dtype() != DType::F32 {
        return Err(Error::UnsupportedDtype {
            tensor: "do".into(),
            dtype: d_o.dtype(),
            backend: "cuda".into(),
            supported: format!("{} (the inputs' dtype) or f32", spec.dtype),
        });
    }
    let state_len = spec.num_sequences * d.state_len();
    if let Some(dht) = d_ht {
        if !spec.has_final_state() {
            return Err(Error::InvalidArgument(
                "`dht` given but this problem has no final state".into(),
            ));
        }
        expect_len("dht", dht.len(), state_len, "N*H*K*V")?;
    }
    expect_len("dq", out.dq.len(), d.qk_len(), "B*T*H*K")?;
    expect_len("dk", out.dk.len(), d.qk_len(), "B*T*H*K")?;
    expect_len("dv", out.dv.len(), d.v_len(), "B*T*H*V")?;
    let gate_len = spec.gate_kind.len(&d);
    for (name, s, wanted) in [
        ("dg", out.dg.as_ref(), spec.gate_kind != GateKind::None),
        ("dg_bwd", out.dg_bwd.as_ref(), spec.has_gate_bwd),
    ] {
        match (s, wanted) {
            (Some(s), true) => expect_len(name, s.len(), gate_len, "the gate's element count")?,
            (Some(_), false) => {
                return Err(Error::InvalidArgument(format!(
                    "`{name}` given but there is no such gate"
                )));
            }
            (None, _) => {}
        }
    }
    if let Some(dh0) = out.dh0.as_ref() {
        if !spec.has_h0 {
            return Err(Error::InvalidArgument(
                "`dh0` given but the problem has no h0".into(),
            ));
        }
        expect_len("dh0", dh0.len(), state_len, "N*H*K*V")?;
    }
    let exec = CudaExec::on_stream(ctx, stream.clone());
    // The outputs outlive the guards of `ptrs` (declared after them, dropped before).
    let mut out = out;
    let mut ptrs = Pointers::new(stream);
    let inp = ptrs.inputs(problem);
    let cot = Cotangents {
        d_o: ptrs.tensor(d_o),
        do_f32: d_o.dtype() != spec.dtype,
        dht: d_ht.map_or(0, |s| ptrs.read(s)),
    };
    if problem.value_check == ValueCheck::On {
        let mut extra = vec![("do", cot.d_o, Source::Tensor(d_o))];
        if let Some(dht) = d_ht {
            extra.push(("dht", cot.dht, Source::F32(dht)));
        }
        let (checked, sources) = input_checks(problem, &inp, &extra);
        check_values(&exec, stream, &checked, &sources)?;
    }
    let targets = BackwardTargets {
        dq: ptrs.write(&mut out.dq),
        dk: ptrs.write(&mut out.dk),
        dv: ptrs.write(&mut out.dv),
        dg: out.dg.as_mut().map_or(0, |s| ptrs.write(s)),
        dg_bwd: out.dg_bwd.as_mut().map_or(0, |s| ptrs.write(s)),
        dh0: out.dh0.as_mut().map_or(0, |s| ptrs.write(s)),
    };
    engine::backward(&exec, &cfg, &inp, &cot, &targets)
}

/// One causal decoding step over CUDA device tensors, for generation: `token` is the step's
/// problem (`q, k: [B, 1, H, K]`, `v: [B, 1, H, V]`, causal, no normalisation, no `h0`, no
/// `cu_seqlens`; its gate is the token's), `state` `[B, H, K, V]` f32 the running state, `o`
/// `[B, 1, H, V]` f32 the output. The state never leaves the device: on return `*state` holds
/// the new state (a slice allocated on `stream`, swapped in; the old one is released), so a
/// generation loop makes no host copy. Launched on `stream`; with the value check on, the call
/// synchronises it once.
pub fn decode_step<'a>(
    ctx: &CudaContext,
    stream: &'a Arc<CudaStream>,
    token: &CudaLinearAttention<'_, 'a>,
    state: &mut CudaSlice<f32>,
    o: CudaViewMut<'a, f32>,
) -> Result<()> {
    token.expect_decode_token()?;
    let (_, token) = lower(token)?;
    let token = &token;
    let d = token.dims;
    if d.t != 1 {
        return Err(Error::shape(
            "q",
            "[B, 1, H, K] (one token)",
            &[d.b, d.t, d.h, d.k],
        ));
    }
    expect_len("state", state.len(), d.b * d.state_len(), "B*H*K*V")?;
    let mut next = stream
        .alloc_zeros::<f32>(state.len())
        .map_err(|e| Error::Runtime {
            backend: "cuda".into(),
            message: format!("allocating the next state: {e:?}"),
        })?;
    {
        let problem = DeviceProblem {
            h0: Some(DeviceSlice::from(&*state)),
            ..*token
        };
        // The borrows of `state` and `next` end with this block's launches (stream-ordered).
        forward_one(ctx, stream, &problem, o, next.as_view_mut())?;
    }
    std::mem::swap(state, &mut next);
    Ok(())
}

/// [`forward`] in the recurrent form with a final state, for [`decode_step`] (whose borrows of
/// the state end before the swap).
fn forward_one(
    ctx: &CudaContext,
    stream: &Arc<CudaStream>,
    problem: &DeviceProblem,
    o: CudaViewMut<'_, f32>,
    ht: CudaViewMut<'_, f32>,
) -> Result<()> {
    forward_lowered(
        ctx,
        stream,
        problem,
        Form::Recurrent,
        DeviceForward { o, ht: Some(ht) },
    )
}
