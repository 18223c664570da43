//! The hand-written CUDA backend of the fused step and of WSM merging (kernels/optim.cu), on any
//! [`Executor`]: [`CudaExec`] on a GPU, or the host emulation (`cuda::emu::EmuExec`) the tests
//! use without one. Same semantics as the CubeCL backend (`optim::cube`).
//!
//! [`CudaOptimizer`] keeps the whole state on the device: the f32 master weights, moments, EMA and
//! 16-bit copy as arenas ([`ArenaLayout`]), the per-tensor chunk table, the counters, the f64 table
//! of scheduled learning rates indexed by the device's call counter, and the history. A step is
//! three launches (gradient statistics, scalars, update) that never wait for the device and never
//! change between steps (graph-capturable): the host reads nothing back.
//!
//! Differences from the CubeCL backend, all in precision: the squared gradient norm is accumulated
//! in f64 (so it cannot overflow for finite f32 gradients, and matches the f64 reference's skip
//! decision), the per-step scalars are always computed in f64, the lr table and the history are
//! f64, and the state is one buffer per arena (no buckets: CUDA allocations are not limited to a
//! page size).

use super::{
    ArenaLayout, CopyFormat, DecayMode, Method, OptimizeOutput, OptimizerConfig, Params, Rounding,
    Schedule, StepRecord, half_tensor, validate_schedule,
};
use crate::cuda::CudaContext;
use crate::cuda::compile::Variant;
use crate::cuda::exec::{CudaExec, Executor, KernelRef};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// The kernel file.
pub const FILE: &str = "optim.cu";
/// The kernels of optim.cu (none carves dynamic shared memory).
pub const KERNELS: [&str; 4] = ["opt_grad_stats", "opt_finalize", "opt_update", "opt_merge"];
/// Threads per block of every kernel (OPT_THREADS).
pub const THREADS: u32 = 256;
/// Quads (4 elements) per chunk of the tensor table (OPT_CHUNK_QUADS).
pub const CHUNK_QUADS: u64 = 1024;
/// Most blocks of the statistics pass (each writes one partial).
pub const MAX_STATS_BLOCKS: usize = 1024;
/// Most blocks of the update and merge passes (grid-stride loops cover the rest).
const MAX_GRID: u64 = 65_535;

const COPY_NONE: i32 = 0;
const COPY_BF16: i32 = 1;
const COPY_F16: i32 = 2;

/// `sizeof(OptScalars)` in optim.cu.
const SCALARS_BYTES: usize = 32;
/// `OptCounters` in optim.cu: calls, steps, skipped, last_skipped, seed (u64 each).
const COUNTERS_WORDS: usize = 5;
/// f64 per history entry: lr, grad norm, flags (1 = skipped, 2 = norm computed).
const HISTORY_WORDS: usize = 3;

/// optim.cu has no compile-time variants: every option is a run-time flag (the kernels are
/// bandwidth-bound, the flags are uniform branches).
pub fn variant() -> Variant {
    Variant::new(FILE, &[])
}

/// Every variant the library launches (for the compile checks).
pub fn all_variants() -> Vec<Variant> {
    vec![variant()]
}

/// The launch parameters, mirrored field by field from `OptParams` in kernels/optim.cu (which
/// documents each field and static_asserts the same size).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct OptParams {
    param: u64,
    grad: u64,
    exp_avg: u64,
    exp_avg_sq: u64,
    ema: u64,
    copy: u64,
    chunks: u64,
    num_chunks: u64,
    quads: u64,
    partial_sq: u64,
    partial_bad: u64,
    lr_table: u64,
    scalars: u64,
    counters: u64,
    history: u64,
    merge_stack: u64,
    merge_coefficients: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    one_minus_beta1: f64,
    one_minus_beta2: f64,
    weight_decay: f64,
    lr_max: f64,
    max_norm: f64,
    one_minus_ema: f64,
    capacity: u32,
    num_partials: u32,
    merge_count: u32,
    adamw: i32,
    cautious: i32,
    fully_decoupled: i32,
    check: i32,
    clip: i32,
    with_ema: i32,
    copy_kind: i32,
    stochastic: i32,
    reserved: i32,
}

const OPT_PARAMS_BYTES: usize = 256;
const _: () = assert!(std::mem::size_of::<OptParams>() == OPT_PARAMS_BYTES);

impl OptParams {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: repr(C), Copy, integers and floats only, no padding (17 u64 + 9 f64 + 12 x 4
        // bytes = 256, every field naturally aligned in this order).
        unsafe {
            std::slice::from_raw_parts(self as *const OptParams as *const u8, OPT_PARAMS_BYTES)
        }
    }
}

fn kernel<'a>(variant: &'a Variant, name: &'static str) -> KernelRef<'a> {
    KernelRef {
        variant,
        name,
        smem_slot: None,
    }
}

/// Counters of a [`CudaOptimizer`] (read back with a device synchronisation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Calls of [`CudaOptimizer::step`] so far (the next call's schedule index).
    pub calls: u64,
    /// Steps applied (AdamW's `t`).
    pub steps: u64,
    /// Calls skipped for non-finite gradients.
    pub skipped: u64,
    /// Whether the latest call was skipped.
    pub last_skipped: bool,
}

/// The fused optimizer with its whole state on a CUDA device (or the emulation).
///
/// Gradients are read from [`CudaOptimizer::grad_buffer`] (the arena layout of
/// [`CudaOptimizer::layout`], f32, padding zero): fill it with [`CudaOptimizer::set_grads`] or
/// from your own kernels. The schedule is evaluated once on the host, in f64, into a device table
/// of `capacity` learning rates; calls past the table keep its last value and are not recorded in
/// the history.
pub struct CudaOptimizer<E: Executor> {
    exec: E,
    config: OptimizerConfig,
    layout: ArenaLayout,
    variant: Variant,
    capacity: usize,
    num_chunks: usize,
    stats_blocks: usize,
    param: E::Buffer,
    grad: E::Buffer,
    exp_avg: E::Buffer,
    exp_avg_sq: Option<E::Buffer>,
    ema: Option<E::Buffer>,
    copy: Option<E::Buffer>,
    chunks: E::Buffer,
    partial_sq: E::Buffer,
    partial_bad: E::Buffer,
    lr_table: E::Buffer,
    scalars: E::Buffer,
    counters: E::Buffer,
    history: E::Buffer,
}

impl<E: Executor> CudaOptimizer<E> {
    /// Uploads the parameters (f32 master weights) and allocates zero moments. `decay[i]` says
    /// whether weight decay applies to tensor `i`; `capacity` is the number of calls the lr table
    /// and the history cover (usually the schedule's total).
    pub fn new(
        exec: E,
        config: &OptimizerConfig,
        schedule: &Schedule,
        capacity: usize,
        params: &[&[f32]],
        decay: &[bool],
    ) -> Result<Self> {
        config.validate()?;
        validate_schedule(schedule)?;
        if capacity == 0 || capacity > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "the lr table needs a capacity in 1..=2^32-1 calls, got {capacity}"
            )));
        }
        if decay.len() != params.len() {
            return Err(Error::InvalidArgument(format!(
                "{} decay flags for {} parameter tensors",
                decay.len(),
                params.len()
            )));
        }
        for (i, p) in params.iter().enumerate() {
            if let Some((index, &value)) = p.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                return Err(Error::NonFinite {
                    tensor: format!("params[{i}]"),
                    index,
                    value: value as f64,
                });
            }
        }
        let layout = ArenaLayout::new(&params.iter().map(|p| p.len()).collect::<Vec<_>>());
        let arena = layout.pack(params);
        let quads = layout.total / 4;
        let floats = |v: &[f32]| exec.upload(bytemuck::cast_slice(v));
        let zeros = || exec.alloc_zeroed(layout.total as usize * 4);

        let chunk_bytes: Vec<u8> = chunk_table(&layout, decay)
            .iter()
            .flat_map(|&(start, len, flags)| {
                let mut entry = [0u8; 16];
                entry[..8].copy_from_slice(&start.to_le_bytes());
                entry[8..12].copy_from_slice(&len.to_le_bytes());
                entry[12..].copy_from_slice(&flags.to_le_bytes());
                entry
            })
            .collect();
        let num_chunks = chunk_bytes.len() / 16;
        // At least 16 quads per thread, at most MAX_STATS_BLOCKS blocks striding over the arena.
        let stats_blocks = (quads as usize)
            .div_ceil(THREADS as usize * 16)
            .clamp(1, MAX_STATS_BLOCKS);
        let counters = initial_counters(config);
        let lr_table = schedule.lr_table(config.lr, capacity);
        Ok(CudaOptimizer {
            param: floats(&arena)?,
            grad: zeros()?,
            exp_avg: zeros()?,
            exp_avg_sq: if config.method.has_second_moment() {
                Some(zeros()?)
            } else {
                None
            },
            ema: match config.ema_beta {
                Some(_) => Some(floats(&arena)?),
                None => None,
            },
            copy: match config.model_copy {
                // Before the first applied step the copy is the nearest image of the weights.
                Some((format, _)) => Some(exec.upload(bytemuck::cast_slice(
                    &super::state::nearest_halves(&arena, format),
                ))?),
                None => None,
            },
            chunks: exec.upload(&chunk_bytes)?,
            partial_sq: exec.alloc_zeroed(stats_blocks * 8)?,
            partial_bad: exec.alloc_zeroed(stats_blocks * 4)?,
            lr_table: exec.upload(bytemuck::cast_slice(&lr_table))?,
            scalars: exec.alloc_zeroed(SCALARS_BYTES)?,
            counters: exec.upload(bytemuck::cast_slice(&counters))?,
            history: exec.alloc_zeroed(capacity * HISTORY_WORDS * 8)?,
            exec,
            config: config.clone(),
            layout,
            variant: variant(),
            capacity,
            num_chunks,
            stats_blocks,
        })
    }

    /// Where each tensor lives in the arenas.
    pub fn layout(&self) -> &ArenaLayout {
        &self.layout
    }

    /// The gradient arena the next step reads (f32, [`CudaOptimizer::layout`] positions; keep the
    /// padding zero).
    pub fn grad_buffer(&self) -> &E::Buffer {
        &self.grad
    }

    /// The gradient arena, to be filled on the device by the caller (a framework adapter copies
    /// its gradients in at [`CudaOptimizer::layout`] offsets; the padding must stay zero).
    pub fn grad_buffer_mut(&mut self) -> &mut E::Buffer {
        &mut self.grad
    }

    /// The f32 master weights (arena positions of [`CudaOptimizer::layout`]), for device-side
    /// copies back into a framework's parameters after a step.
    pub fn param_buffer(&self) -> &E::Buffer {
        &self.param
    }

    /// The executor the optimizer launches on.
    pub fn exec(&self) -> &E {
        &self.exec
    }

    /// Uploads the gradients of the next step into a fresh gradient arena (the previous one is
    /// released in stream order).
    pub fn set_grads(&mut self, grads: &[&[f32]]) -> Result<()> {
        if grads.len() != self.layout.sizes.len() {
            return Err(Error::InvalidArgument(format!(
                "{} gradients for {} parameter tensors",
                grads.len(),
                self.layout.sizes.len()
            )));
        }
        for (i, (g, &n)) in grads.iter().zip(&self.layout.sizes).enumerate() {
            if g.len() != n {
                return Err(Error::shape(
                    &format!("grads[{i}]"),
                    format!("{n} elements (params[{i}])"),
                    &[g.len()],
                ));
            }
        }
        let arena = self.layout.pack(grads);
        self.grad = self.exec.upload(bytemuck::cast_slice(&arena))?;
        Ok(())
    }

    fn params(&self) -> OptParams {
        let c = &self.config;
        let (beta1, beta2, eps) = match c.method {
            Method::AdamW { beta1, beta2, eps } => (beta1, beta2, eps),
            Method::Lion { beta1, beta2 } => (beta1, beta2, 0.0),
        };
        let e = &self.exec;
        let (copy_kind, stochastic) = match c.model_copy {
            None => (COPY_NONE, false),
            Some((format, rounding)) => (
                match format {
                    CopyFormat::Bf16 => COPY_BF16,
                    CopyFormat::F16 => COPY_F16,
                },
                matches!(rounding, Rounding::Stochastic { .. }),
            ),
        };
        OptParams {
            param: e.address(&self.param),
            grad: e.address(&self.grad),
            exp_avg: e.address(&self.exp_avg),
            exp_avg_sq: self.exp_avg_sq.as_ref().map_or(0, |b| e.address(b)),
            ema: self.ema.as_ref().map_or(0, |b| e.address(b)),
            copy: self.copy.as_ref().map_or(0, |b| e.address(b)),
            chunks: e.address(&self.chunks),
            num_chunks: self.num_chunks as u64,
            quads: self.layout.total / 4,
            partial_sq: e.address(&self.partial_sq),
            partial_bad: e.address(&self.partial_bad),
            lr_table: e.address(&self.lr_table),
            scalars: e.address(&self.scalars),
            counters: e.address(&self.counters),
            history: e.address(&self.history),
            beta1,
            beta2,
            eps,
            one_minus_beta1: 1.0 - beta1,
            one_minus_beta2: 1.0 - beta2,
            weight_decay: c.weight_decay,
            lr_max: c.lr,
            max_norm: c.max_grad_norm.unwrap_or(0.0),
            one_minus_ema: 1.0 - c.ema_beta.unwrap_or(1.0),
            capacity: self.capacity as u32,
            adamw: c.method.has_second_moment() as i32,
            cautious: c.cautious as i32,
            fully_decoupled: (c.decay_mode == DecayMode::FullyDecoupled) as i32,
            check: c.skip_non_finite as i32,
            clip: c.max_grad_norm.is_some() as i32,
            with_ema: c.ema_beta.is_some() as i32,
            copy_kind,
            stochastic: stochastic as i32,
            ..OptParams::default()
        }
    }

    /// Enqueues one optimizer call: gradient statistics (when checking or clipping), scalars,
    /// update. Never waits for the device; whether the call was skipped is in
    /// [`CudaOptimizer::status`] and the history.
    pub fn step(&mut self) -> Result<()> {
        let stats = self.config.skip_non_finite || self.config.max_grad_norm.is_some();
        let mut p = self.params();
        let v = &self.variant;
        if stats {
            p.num_partials = self.stats_blocks as u32;
            self.exec.launch(
                kernel(v, "opt_grad_stats"),
                [self.stats_blocks as u32, 1, 1],
                THREADS,
                p.as_bytes(),
            )?;
        }
        self.exec
            .launch(kernel(v, "opt_finalize"), [1, 1, 1], THREADS, p.as_bytes())?;
        let blocks = (self.num_chunks as u64).min(MAX_GRID) as u32;
        self.exec.launch(
            kernel(v, "opt_update"),
            [blocks, 1, 1],
            THREADS,
            p.as_bytes(),
        )
    }

    fn read_bytes(&self, buf: &E::Buffer, bytes: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; bytes];
        self.exec.download(buf, &mut out)?;
        Ok(out)
    }

    fn read_arena(&self, buf: &E::Buffer) -> Result<Vec<Vec<f32>>> {
        let bytes = self.read_bytes(buf, self.layout.total as usize * 4)?;
        let arena: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(self.layout.unpack(&arena))
    }

    /// The whole state by tensor (synchronises): the backend-neutral form that
    /// [`crate::optim::Optimizer::save`] writes.
    pub fn state(&self) -> Result<super::OptimizerState> {
        let status = self.status()?;
        Ok(super::state::F32State {
            params: self.read_params()?,
            exp_avg: self.read_exp_avg()?,
            exp_avg_sq: self.read_exp_avg_sq()?,
            ema: self.read_ema()?,
            model_copy: self.read_model_copy()?,
            counts: [status.calls, status.steps, status.skipped],
            last_skipped: status.last_skipped,
            history: self.history()?,
        }
        .into())
    }

    /// Replaces this optimizer's buffers with a state by tensor (values rounded to f32; a missing
    /// 16-bit copy is rebuilt as the weights' nearest image; history past the capacity is
    /// dropped). The next call continues from `state.calls`.
    pub fn set_state(&mut self, state: &super::OptimizerState) -> Result<()> {
        let arenas = state.to_arenas(&self.config, &self.layout)?;
        let floats = |v: &[f32]| self.exec.upload(bytemuck::cast_slice(v));
        let optional = |v: &Option<Vec<f32>>| v.as_deref().map(floats).transpose();
        let param = floats(&arenas.params)?;
        let exp_avg = floats(&arenas.exp_avg)?;
        let exp_avg_sq = optional(&arenas.exp_avg_sq)?;
        let ema = optional(&arenas.ema)?;
        let copy = arenas
            .copy
            .as_deref()
            .map(|halves| self.exec.upload(bytemuck::cast_slice(halves)))
            .transpose()?;
        let mut counters = initial_counters(&self.config);
        counters[0] = state.calls;
        counters[1] = state.steps;
        counters[2] = state.skipped;
        counters[3] = u64::from(state.last_skipped);
        let mut history = vec![0.0f64; self.capacity * HISTORY_WORDS];
        for (k, r) in state.history.iter().take(self.capacity).enumerate() {
            let flags = u32::from(r.skipped) | if r.grad_norm.is_some() { 2 } else { 0 };
            history[k * HISTORY_WORDS] = r.lr;
            history[k * HISTORY_WORDS + 1] = r.grad_norm.unwrap_or(0.0);
            history[k * HISTORY_WORDS + 2] = flags as f64;
        }
        let counters = self.exec.upload(bytemuck::cast_slice(&counters))?;
        let history = self.exec.upload(bytemuck::cast_slice(&history))?;
        self.param = param;
        self.exp_avg = exp_avg;
        self.exp_avg_sq = exp_avg_sq;
        self.ema = ema;
        self.copy = copy;
        self.counters = counters;
        self.history = history;
        Ok(())
    }

    /// The f32 master weights, tensor by tensor (synchronises).
    pub fn read_params(&self) -> Result<Vec<Vec<f32>>> {
        self.read_arena(&self.param)
    }

    /// The first moments (synchronises).
    pub fn read_exp_avg(&self) -> Result<Vec<Vec<f32>>> {
        self.read_arena(&self.exp_avg)
    }

    /// The second moments, AdamW only (synchronises).
    pub fn read_exp_avg_sq(&self) -> Result<Option<Vec<Vec<f32>>>> {
        self.exp_avg_sq
            .as_ref()
            .map(|b| self.read_arena(b))
            .transpose()
    }

    /// The EMA weights, when enabled (synchronises).
    pub fn read_ema(&self) -> Result<Option<Vec<Vec<f32>>>> {
        self.ema.as_ref().map(|b| self.read_arena(b)).transpose()
    }

    /// The 16-bit copy as raw bits (bf16 or f16 per the config), when enabled (synchronises).
    pub fn read_model_copy(&self) -> Result<Option<Vec<Vec<u16>>>> {
        let Some(buf) = &self.copy else {
            return Ok(None);
        };
        let bytes = self.read_bytes(buf, self.layout.total as usize * 2)?;
        let halves: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Ok(Some(self.layout.unpack(&halves)))
    }

    /// The counters (synchronises).
    pub fn status(&self) -> Result<Status> {
        let bytes = self.read_bytes(&self.counters, COUNTERS_WORDS * 8)?;
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        Ok(Status {
            calls: word(0),
            steps: word(1),
            skipped: word(2),
            last_skipped: word(3) != 0,
        })
    }

    /// One record per call so far, up to the capacity (synchronises).
    pub fn history(&self) -> Result<Vec<StepRecord>> {
        let calls = self.status()?.calls.min(self.capacity as u64) as usize;
        let bytes = self.read_bytes(&self.history, calls * HISTORY_WORDS * 8)?;
        let h: Vec<f64> = bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Ok((0..calls)
            .map(|k| {
                let flags = h[k * HISTORY_WORDS + 2] as u32;
                StepRecord {
                    lr: h[k * HISTORY_WORDS],
                    grad_norm: (flags & 2 != 0).then_some(h[k * HISTORY_WORDS + 1]),
                    skipped: flags & 1 != 0,
                }
            })
            .collect())
    }

    /// `(step_size, sqrt(1 - b2^t), decay, clip)` of the latest applied call, as the update reads
    /// them (f32; synchronises). For tests.
    #[doc(hidden)]
    pub fn read_scalars(&self) -> Result<[f32; 4]> {
        let bytes = self.read_bytes(&self.scalars, 16)?;
        let word = |i: usize| f32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
        Ok([word(0), word(1), word(2), word(3)])
    }

    /// Waits until every enqueued step has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.exec.synchronize()
    }
}

impl CudaOptimizer<CudaExec> {
    /// Copies the next step's gradient of tensor `i` from an f32 device slice with its element
    /// count, device to device on the optimizer's stream (16-bit gradients: widen them first).
    pub fn set_grad_device(
        &mut self,
        i: usize,
        grad: crate::linear::cuda::device::DeviceSlice<'_, f32>,
    ) -> Result<()> {
        let Some(&n) = self.layout.sizes.get(i) else {
            return Err(Error::InvalidArgument(format!(
                "gradient {i} of an optimizer over {} tensors",
                self.layout.sizes.len()
            )));
        };
        if grad.len() != n {
            return Err(Error::shape(
                &format!("grads[{i}]"),
                format!("{n} elements (params[{i}])"),
                &[grad.len()],
            ));
        }
        if n == 0 {
            return Ok(());
        }
        let stream = self.exec.stream().clone();
        let offset = self.layout.offsets[i] * 4;
        let (src, _read) = grad.device_ptr(&stream);
        let (dst, _write) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut self.grad, &stream);
        // SAFETY: the source holds `n` f32 (its length was checked) and the arena holds tensor
        // `i`'s `n` f32 from `offset`; both are ordered on this stream by cudarc's guards.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst + offset, src, n * 4, stream.cu_stream())
        }
        .map_err(|e| Error::Runtime {
            backend: "cuda".into(),
            message: format!("copying gradient {i}: {e}"),
        })
    }

    /// The master weights of tensor `i` as a new f32 device slice (a device copy).
    pub fn param_slice(&self, i: usize) -> Result<cudarc::driver::CudaSlice<f32>> {
        let Some(&n) = self.layout.sizes.get(i) else {
            return Err(Error::InvalidArgument(format!(
                "parameter {i} of an optimizer over {} tensors",
                self.layout.sizes.len()
            )));
        };
        let stream = self.exec.stream().clone();
        let runtime = |e: cudarc::driver::DriverError| Error::Runtime {
            backend: "cuda".into(),
            message: format!("copying parameter {i}: {e}"),
        };
        let mut out = stream.alloc_zeros::<f32>(n.max(1)).map_err(runtime)?;
        if n > 0 {
            let (src, _read) = cudarc::driver::DevicePtr::device_ptr(&self.param, &stream);
            let (dst, _write) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut out, &stream);
            // SAFETY: `out` holds `n` f32, the arena tensor `i`'s `n` f32 from its offset.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    dst,
                    src + self.layout.offsets[i] * 4,
                    n * 4,
                    stream.cu_stream(),
                )
            }
            .map_err(runtime)?;
        }
        Ok(out)
    }
}

/// A fresh counter buffer `[calls, steps, skipped, last_skipped, seed]`: no calls yet, the
/// rounding seed from the configuration.
fn initial_counters(config: &OptimizerConfig) -> [u64; COUNTERS_WORDS] {
    [0, 0, 0, 0, u64::from(config.rounding_seed())]
}

/// The tensor table of the update kernel, one `(first quad, quads, flags)` per chunk (`OptChunk`):
/// tensor `i` covers quads `[offset_i / 4, offset_i / 4 + ceil(n_i / 4))` of the arena, cut into
/// chunks of at most [`CHUNK_QUADS`]; flags bit 0 = apply weight decay; an empty tensor has no
/// chunk.
pub fn chunk_table(layout: &ArenaLayout, decay: &[bool]) -> Vec<(u64, u32, u32)> {
    let mut chunks = Vec::new();
    for ((&offset, &n), &d) in layout.offsets.iter().zip(&layout.sizes).zip(decay) {
        let (mut start, end) = (offset / 4, offset / 4 + (n as u64).div_ceil(4));
        while start < end {
            let len = (end - start).min(CHUNK_QUADS);
            chunks.push((start, len as u32, d as u32));
            start += len;
        }
    }
    chunks
}

pub(super) fn optimize(
    ctx: &CudaContext,
    config: &OptimizerConfig,
    schedule: &Schedule,
    params: &Params,
    grads: &[Vec<&Tensor>],
) -> Result<OptimizeOutput> {
    optimize_on(CudaExec::new(ctx), config, schedule, params, grads)
}

/// [`super::optimize`] on any executor (validated inputs: call through [`super::optimize`], or
/// validate with the same rules).
pub fn optimize_on<E: Executor>(
    exec: E,
    config: &OptimizerConfig,
    schedule: &Schedule,
    params: &Params,
    grads: &[Vec<&Tensor>],
) -> Result<OptimizeOutput> {
    super::validate_run(config, schedule, params, grads)?;
    let values: Vec<Vec<f32>> = params.tensors.iter().map(|t| t.to_f32_vec()).collect();
    let slices: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
    let decay: Vec<bool> = (0..params.tensors.len())
        .map(|i| params.decays(i))
        .collect();
    let mut optimizer =
        CudaOptimizer::new(exec, config, schedule, grads.len().max(1), &slices, &decay)?;
    for step in grads {
        let owned: Vec<Vec<f32>> = step.iter().map(|g| g.to_f32_vec()).collect();
        let borrowed: Vec<&[f32]> = owned.iter().map(Vec::as_slice).collect();
        optimizer.set_grads(&borrowed)?;
        optimizer.step()?;
    }
    let shape = |i: usize| params.tensors[i].shape().to_vec();
    let shaped = |arena: Vec<Vec<f32>>| -> Vec<Tensor> {
        arena
            .into_iter()
            .enumerate()
            .map(|(i, v)| Tensor::f32_unchecked(shape(i), v))
            .collect()
    };
    let status = optimizer.status()?;
    Ok(OptimizeOutput {
        params: shaped(optimizer.read_params()?),
        exp_avg: shaped(optimizer.read_exp_avg()?),
        exp_avg_sq: optimizer.read_exp_avg_sq()?.map(shaped),
        ema: optimizer.read_ema()?.map(shaped),
        model_copy: match (optimizer.read_model_copy()?, config.model_copy) {
            (Some(bits), Some((format, _))) => Some(
                bits.iter()
                    .enumerate()
                    .map(|(i, b)| half_tensor(shape(i), b, format))
                    .collect(),
            ),
            _ => None,
        },
        history: optimizer.history()?,
        steps: status.steps,
    })
}

pub(super) fn merge(
    ctx: &CudaContext,
    checkpoints: &[Vec<&Tensor>],
    coefficients: &[f64],
    dtype: DType,
) -> Result<Vec<Tensor>> {
    merge_on(&CudaExec::new(ctx), checkpoints, coefficients, dtype)
}

/// WSM merging on any executor: `sum_j c_j * checkpoints[j]` accumulated in f32 (coefficients
/// rounded to f32), then one cast to `dtype` (bf16 / f16 by round-to-nearest-even on the device).
/// Inputs are expected validated as [`super::merge`] does.
pub fn merge_on<E: Executor>(
    exec: &E,
    checkpoints: &[Vec<&Tensor>],
    coefficients: &[f64],
    dtype: DType,
) -> Result<Vec<Tensor>> {
    if checkpoints.is_empty() || checkpoints.len() != coefficients.len() {
        return Err(Error::InvalidArgument(format!(
            "{} coefficients for {} checkpoints",
            coefficients.len(),
            checkpoints.len()
        )));
    }
    let shapes: Vec<Vec<usize>> = checkpoints[0].iter().map(|t| t.shape().to_vec()).collect();
    let layout = ArenaLayout::new(&checkpoints[0].iter().map(|t| t.numel()).collect::<Vec<_>>());
    let count = checkpoints.len();
    let copy_format = match dtype {
        DType::BF16 => Some(CopyFormat::Bf16),
        DType::F16 => Some(CopyFormat::F16),
        DType::F32 | DType::F64 => None,
    };
    // The stack [count][total] of the checkpoints' arenas.
    let mut stack = Vec::with_capacity(count * layout.total as usize);
    for checkpoint in checkpoints {
        let values: Vec<Vec<f32>> = checkpoint.iter().map(|t| t.to_f32_vec()).collect();
        let slices: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
        stack.extend(layout.pack(&slices));
    }
    let coefficients: Vec<f32> = coefficients.iter().map(|&c| c as f32).collect();
    let stack = exec.upload(bytemuck::cast_slice(&stack))?;
    let coefficient_buf = exec.upload(bytemuck::cast_slice(&coefficients))?;
    let out = exec.alloc(layout.total as usize * 4)?;
    let copy = match copy_format {
        Some(_) => Some(exec.alloc(layout.total as usize * 2)?),
        None => None,
    };
    let quads = layout.total / 4;
    let p = OptParams {
        param: exec.address(&out),
        copy: copy.as_ref().map_or(0, |b| exec.address(b)),
        quads,
        merge_stack: exec.address(&stack),
        merge_coefficients: exec.address(&coefficient_buf),
        merge_count: count as u32,
        copy_kind: match copy_format {
            None => COPY_NONE,
            Some(CopyFormat::Bf16) => COPY_BF16,
            Some(CopyFormat::F16) => COPY_F16,
        },
        ..OptParams::default()
    };
    let v = variant();
    let blocks = quads.div_ceil(THREADS as u64).min(MAX_GRID) as u32;
    exec.launch(
        kernel(&v, "opt_merge"),
        [blocks, 1, 1],
        THREADS,
        p.as_bytes(),
    )?;
    Ok(match (copy_format, copy) {
        (Some(format), Some(copy)) => {
            let mut bytes = vec![0u8; layout.total as usize * 2];
            exec.download(&copy, &mut bytes)?;
            let halves: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            layout
                .unpack(&halves)
                .into_iter()
                .zip(shapes)
                .map(|(b, s)| half_tensor(s, &b, format))
                .collect()
        }
        _ => {
            let mut bytes = vec![0u8; layout.total as usize * 4];
            exec.download(&out, &mut bytes)?;
            let merged: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            layout
                .unpack(&merged)
                .into_iter()
                .zip(shapes)
                .map(|(v, s)| Tensor::f32_unchecked(s, v).to_dtype(dtype))
                .collect()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_table_covers_every_tensor_once() {
        // 4099 elements = 1025 quads = a full chunk and one quad; the empty tensor has no chunk.
        let layout = ArenaLayout::new(&[1, 0, 4099, 7]);
        assert_eq!(layout.offsets, [0, 4, 4, 4104]);
        let chunks = chunk_table(&layout, &[true, true, false, true]);
        assert_eq!(
            chunks,
            [(0, 1, 1), (1, 1024, 0), (1025, 1, 0), (1026, 2, 1)]
        );
        let covered: u64 = chunks.iter().map(|c| c.1 as u64).sum();
        assert_eq!(covered, layout.total / 4);
    }
}
