//! The CubeCL backend of the fused step and of WSM merging, and the device-resident
//! [`FusedOptimizer`]: parameters, moments, EMA, 16-bit copy, counters and scalars stay in device
//! buffers across steps; a step enqueues three kernels and never waits for the device.

pub mod kernels;

use std::panic::{AssertUnwindSafe, catch_unwind};

use cubecl::bytes::Bytes;
use cubecl::prelude::*;
use cubecl::server::Handle;

use self::kernels::*;
use super::{
    ArenaLayout, CopyFormat, DecayMode, Method, OptimizeOutput, OptimizerConfig, Params, Rounding,
    Schedule, StepRecord, half_tensor, validate_schedule,
};
use crate::cube::{CubeContext, panic_message};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

fn runtime(message: impl std::fmt::Display) -> Error {
    Error::Runtime {
        backend: "cube".into(),
        message: message.to_string(),
    }
}

/// Runs `f`, turning a panic inside CubeCL (kernel expansion, compilation, launch) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => Err(runtime(format!("{what}: {}", panic_message(&panic)))),
    }
}

/// A 1D launch of `n` cubes, folded into two dimensions past the 65535 limit (the kernels index
/// by the linear `CUBE_POS` and ignore cubes past `n`).
fn cube_count(n: usize) -> CubeCount {
    const MAX: usize = 65_535;
    if n <= MAX {
        CubeCount::Static(n as u32, 1, 1)
    } else {
        CubeCount::Static(MAX as u32, n.div_ceil(MAX) as u32, 1)
    }
}

/// The precision of the per-step scalar computation (bias corrections, step size, decay factor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScalarPrecision {
    /// f64 when the device supports it (bias corrections exactly from the integer step), else f32.
    #[default]
    Auto,
    /// f32 even where f64 exists: `1 - b^t` as `-expm1(t ln b)` with `ln b` from the host (a few
    /// ulp of f32). For testing the fallback.
    F32,
}

/// Options of the device-resident optimizer beyond the [`OptimizerConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DeviceOptions {
    pub precision: ScalarPrecision,
    /// The largest buffer to allocate, in bytes; `None` takes the device's limit (128 MiB under
    /// wgpu's default limits). Parameter groups larger than this are split into several buckets
    /// (each its own set of buffers and launches; tensors may straddle two buckets).
    pub max_bucket_bytes: Option<u64>,
}

/// Counters of a [`FusedOptimizer`] (read back with a device synchronisation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Calls of [`FusedOptimizer::step`] so far (the next call's schedule index).
    pub calls: u64,
    /// Steps applied (AdamW's `t`).
    pub steps: u64,
    /// Calls skipped for non-finite gradients.
    pub skipped: u64,
    /// Whether the latest call was skipped.
    pub last_skipped: bool,
}

/// One contiguous range of the group's arena with its own buffers.
struct Bucket {
    /// First quad of the bucket in the group's arena.
    first_quad: u64,
    quads: usize,
    num_chunks: usize,
    /// Cubes of the statistics pass, and where their partials start.
    stats_cubes: usize,
    partial_offset: usize,
    param: Handle,
    grad: Handle,
    exp_avg: Handle,
    exp_avg_sq: Handle,
    ema: Handle,
    copy: Handle,
    chunks: Handle,
}

/// The fused optimizer with its whole state on the device.
///
/// The parameter group is one arena ([`FusedOptimizer::layout`]) cut into buckets of at most the
/// device's largest buffer. Every [`FusedOptimizer::step`] reads the gradient buffers
/// ([`FusedOptimizer::grad_buffers`]); fill them with [`FusedOptimizer::set_grads`] (an in-place,
/// non-blocking write) or from your own kernels (keep the padding zero). The schedule is evaluated
/// on the host once, in f64, into a device table of `capacity` learning rates indexed by the
/// device's call counter; calls past the table keep its last value (and are not recorded in the
/// history). Nothing in a step reads back to the host, so steps queue up back to back, and the
/// launches of a step never change (graph-capturable on runtimes that capture).
pub struct FusedOptimizer {
    ctx: CubeContext,
    config: OptimizerConfig,
    layout: ArenaLayout,
    buckets: Vec<Bucket>,
    /// Partials of all buckets' statistics passes.
    total_partials: usize,
    capacity: usize,
    exact_scalars: bool,
    scalars: Handle,
    counters: Handle,
    history: Handle,
    lr_table: Handle,
    wide: Handle,
    partial_sq: Handle,
    partial_bad: Handle,
}

impl FusedOptimizer {
    /// Uploads the parameters (f32 master weights) and allocates zero moments. `decay[i]` says
    /// whether weight decay applies to tensor `i`; `capacity` is the number of calls the lr table
    /// and the history cover (usually the schedule's total).
    pub fn new(
        ctx: &CubeContext,
        config: &OptimizerConfig,
        schedule: &Schedule,
        capacity: usize,
        params: &[&[f32]],
        decay: &[bool],
    ) -> Result<Self> {
        Self::with_options(
            ctx,
            config,
            schedule,
            capacity,
            params,
            decay,
            DeviceOptions::default(),
        )
    }

    /// [`FusedOptimizer::new`] with explicit [`DeviceOptions`].
    pub fn with_options(
        ctx: &CubeContext,
        config: &OptimizerConfig,
        schedule: &Schedule,
        capacity: usize,
        params: &[&[f32]],
        decay: &[bool],
        options: DeviceOptions,
    ) -> Result<Self> {
        config.validate()?;
        validate_schedule(schedule)?;
        if capacity == 0 {
            return Err(Error::InvalidArgument(
                "the lr table needs a capacity of at least one call".into(),
            ));
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
        let total_quads = layout.total / 4;
        if total_quads > u32::MAX as u64 {
            return Err(Error::Unsupported(format!(
                "{} parameters in one group on the cube backend (its kernels index with 32 bits)",
                layout.total
            )));
        }
        let client = ctx.client();
        let device_limit = client.properties().memory.max_page_size;
        let bucket_bytes = options
            .max_bucket_bytes
            .unwrap_or(device_limit)
            .min(device_limit);
        let bucket_quads = (bucket_bytes / 16).min(u32::MAX as u64);
        if bucket_quads == 0 {
            return Err(Error::InvalidArgument(format!(
                "a bucket of {bucket_bytes} bytes cannot hold one 16-byte vector"
            )));
        }
        let exact_scalars = options.precision == ScalarPrecision::Auto
            && client.properties().supports_type(f64::elem_type_native());
        let arena = layout.pack(params);

        // Tensor `i` covers quads [a_i, b_i) of the arena; each bucket [q0, q1) gets the chunks of
        // every tensor piece inside it, with bucket-local starts.
        let tensor_quads: Vec<(u64, u64, bool)> = layout
            .offsets
            .iter()
            .zip(&layout.sizes)
            .zip(decay)
            .map(|((&offset, &n), &d)| (offset / 4, offset / 4 + (n as u64).div_ceil(4), d))
            .collect();
        let mut ranges = Vec::new();
        let mut q0 = 0u64;
        while q0 < total_quads {
            let q1 = (q0 + bucket_quads).min(total_quads);
            ranges.push((q0, q1));
            q0 = q1;
        }

        guarded("creating the optimizer state", || {
            let floats = |v: &[f32]| crate::cube::upload_bytes(client, f32::as_bytes(v));
            let words = |v: &[u32]| crate::cube::upload_bytes(client, u32::as_bytes(v));
            // A disabled slot still needs a binding of one element.
            let dummy_quad = || floats(&[0.0; 4]);
            let mut buckets = Vec::with_capacity(ranges.len());
            let mut total_partials = 0;
            for &(q0, q1) in &ranges {
                let quads = (q1 - q0) as usize;
                let mut chunks: Vec<u32> = Vec::new();
                for &(a, b, d) in &tensor_quads {
                    let (mut start, end) = (a.max(q0), b.min(q1));
                    while start < end {
                        let len = (end - start).min(CHUNK_QUADS as u64);
                        chunks.extend_from_slice(&[
                            (start - q0) as u32,
                            ((start - q0) >> 32) as u32,
                            len as u32,
                            d as u32,
                        ]);
                        start += len;
                    }
                }
                let values = &arena[(q0 * 4) as usize..(q1 * 4) as usize];
                let zeros = || floats(&vec![0.0; quads * 4]);
                // At least 16 quads per unit, at most MAX_STATS_CUBES cubes striding over it.
                let stats_cubes = quads
                    .div_ceil(CUBE_UNITS as usize * 16)
                    .clamp(1, MAX_STATS_CUBES as usize);
                buckets.push(Bucket {
                    first_quad: q0,
                    quads,
                    num_chunks: chunks.len() / CHUNK_WORDS,
                    stats_cubes,
                    partial_offset: total_partials,
                    param: floats(values),
                    grad: zeros(),
                    exp_avg: zeros(),
                    exp_avg_sq: if config.method.has_second_moment() {
                        zeros()
                    } else {
                        dummy_quad()
                    },
                    ema: if config.ema_beta.is_some() {
                        floats(values)
                    } else {
                        dummy_quad()
                    },
                    copy: match config.model_copy {
                        // Before the first applied step the copy is the nearest image.
                        Some((format, _)) => words(&pack_halves(values, format)),
                        None => words(&[0, 0]),
                    },
                    chunks: words(&chunks),
                });
                total_partials += stats_cubes;
            }

            let (beta1, beta2, eps) = match config.method {
                Method::AdamW { beta1, beta2, eps } => (beta1, beta2, eps),
                Method::Lion { beta1, beta2 } => (beta1, beta2, 0.0),
            };
            let mut scalars = vec![0.0f32; SCALARS_LEN];
            scalars[S_CLIP] = 1.0;
            scalars[S_BETA1] = beta1 as f32;
            scalars[S_ONE_MINUS_BETA1] = (1.0 - beta1) as f32;
            scalars[S_BETA2] = beta2 as f32;
            scalars[S_ONE_MINUS_BETA2] = (1.0 - beta2) as f32;
            scalars[S_EPS] = eps as f32;
            scalars[S_ONE_MINUS_EMA] = (1.0 - config.ema_beta.unwrap_or(1.0)) as f32;
            scalars[S_MAX_NORM] = config.max_grad_norm.unwrap_or(0.0) as f32;
            scalars[S_WEIGHT_DECAY] = config.weight_decay as f32;
            scalars[S_INV_LR_MAX] = if config.lr > 0.0 {
                (1.0 / config.lr) as f32
            } else {
                0.0
            };
            let counters = initial_counters(config);
            let lr_table: Vec<f32> = schedule
                .lr_table(config.lr, capacity)
                .into_iter()
                .map(|x| x as f32)
                .collect();
            let wide = if exact_scalars {
                crate::cube::upload_bytes(client, f64::as_bytes(&[beta1, beta2]))
            } else {
                floats(&[beta1.ln() as f32, beta2.ln() as f32])
            };
            Ok(FusedOptimizer {
                ctx: ctx.clone(),
                config: config.clone(),
                layout,
                buckets,
                total_partials,
                capacity,
                exact_scalars,
                scalars: floats(&scalars),
                counters: words(&counters),
                history: floats(&vec![0.0; capacity * HISTORY_WORDS]),
                lr_table: floats(&lr_table),
                wide,
                partial_sq: floats(&vec![0.0; total_partials.max(1)]),
                partial_bad: words(&vec![0; total_partials.max(1)]),
            })
        })
    }

    /// The context the optimizer launches on.
    pub fn context(&self) -> &CubeContext {
        &self.ctx
    }

    /// Where each tensor lives in the group's arena.
    pub fn layout(&self) -> &ArenaLayout {
        &self.layout
    }

    /// The gradient buffers the next step reads: each covers the arena elements of its range
    /// (f32, [`FusedOptimizer::layout`] positions minus the range start).
    pub fn grad_buffers(&self) -> Vec<(std::ops::Range<u64>, &Handle)> {
        self.buckets
            .iter()
            .map(|b| {
                let start = b.first_quad * 4;
                (start..start + b.quads as u64 * 4, &b.grad)
            })
            .collect()
    }

    /// Whether the per-step scalars are computed in f64 on this device.
    pub fn exact_scalars(&self) -> bool {
        self.exact_scalars
    }

    /// Buffers per state (the group is split when it exceeds the largest buffer).
    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Writes the gradients of the next step into the gradient buffers (in place, non-blocking).
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
        guarded("writing the gradients", || {
            for b in &self.buckets {
                let start = (b.first_quad * 4) as usize;
                let values = &arena[start..start + b.quads * 4];
                crate::cube::count_upload(values.len() * 4);
                self.ctx.client().write(
                    &b.grad,
                    Bytes::from_bytes_vec(f32::as_bytes(values).to_vec()),
                );
            }
            Ok(())
        })
    }

    /// Copies the next step's gradients from a device buffer already in the arena layout
    /// ([`FusedOptimizer::layout`]: `layout.total` f32, each tensor at its offset, zero padding)
    /// into the gradient buffers: one device copy per bucket, nothing through the host. A 16-bit
    /// arena is widened on the device first.
    pub fn set_grads_from_arena(&mut self, arena: &crate::cube::DeviceTensor) -> Result<()> {
        let total = self.layout.total as usize;
        if arena.numel() != total {
            return Err(Error::shape(
                "grads",
                format!("the arena layout: {total} elements"),
                arena.shape(),
            ));
        }
        let src = arena.to_f32(&self.ctx, "grads")?;
        guarded("copying the gradients", || {
            for b in &self.buckets {
                let start = (b.first_quad * 4) as usize;
                // SAFETY: `src` holds `total` f32 and the bucket's `[start, start + 4 quads)`
                // lies inside it; the bucket's gradient buffer holds `4 quads` f32.
                unsafe {
                    crate::cube::kernels::copy_range(
                        &self.ctx,
                        &src,
                        start,
                        &b.grad,
                        0,
                        b.quads * 4,
                    )
                };
            }
            Ok(())
        })
    }

    /// The master weights in the arena layout, as a new f32 device buffer (`layout.total`
    /// elements): one device copy per bucket.
    pub fn params_arena(&self) -> Result<crate::cube::DeviceTensor> {
        let total = self.layout.total as usize;
        let out = crate::cube::kernels::alloc_f32(&self.ctx, total);
        guarded("copying the parameters", || {
            for b in &self.buckets {
                let start = (b.first_quad * 4) as usize;
                // SAFETY: as in `set_grads_from_arena`, the other way round.
                unsafe {
                    crate::cube::kernels::copy_range(
                        &self.ctx,
                        &b.param,
                        0,
                        &out,
                        start,
                        b.quads * 4,
                    )
                };
            }
            Ok(())
        })?;
        crate::cube::DeviceTensor::from_handle(out, vec![total], DType::F32)
    }

    /// Enqueues one optimizer call: gradient statistics (per bucket), scalars, update (per
    /// bucket). Never waits for the device; whether the call was skipped is in
    /// [`FusedOptimizer::status`] and the history.
    pub fn step(&mut self) -> Result<()> {
        let client = self.ctx.client();
        let adamw = self.config.method.has_second_moment();
        let check = self.config.skip_non_finite;
        let clip = self.config.max_grad_norm.is_some();
        let stats = check || clip;
        let arg = |h: &Handle, len: usize| unsafe { BufferArg::from_raw_parts(h.clone(), len) };
        guarded("launching the fused step", || {
            if stats {
                for b in &self.buckets {
                    unsafe {
                        grad_stats::launch_unchecked(
                            client,
                            CubeCount::Static(b.stats_cubes as u32, 1, 1),
                            CubeDim::new_1d(CUBE_UNITS),
                            arg(&b.grad, b.quads),
                            arg(&self.partial_sq, self.total_partials),
                            arg(&self.partial_bad, self.total_partials),
                            b.partial_offset as u32,
                        )
                    };
                }
            }
            let num_partials = if stats { self.total_partials } else { 0 };
            let partial_len = self.total_partials.max(1);
            let fully_decoupled = self.config.decay_mode == DecayMode::FullyDecoupled;
            macro_rules! finalize {
                ($wide:ty) => {
                    unsafe {
                        finalize_scalars::launch_unchecked::<$wide>(
                            client,
                            CubeCount::Static(1, 1, 1),
                            CubeDim::new_1d(CUBE_UNITS),
                            arg(&self.partial_sq, partial_len),
                            arg(&self.partial_bad, partial_len),
                            arg(&self.lr_table, self.capacity),
                            arg(&self.wide, 2),
                            arg(&self.scalars, SCALARS_LEN),
                            arg(&self.counters, COUNTERS_LEN),
                            arg(&self.history, self.capacity * HISTORY_WORDS),
                            num_partials as u32,
                            adamw,
                            self.exact_scalars,
                            check,
                            clip,
                            fully_decoupled,
                        )
                    }
                };
            }
            if self.exact_scalars {
                finalize!(f64);
            } else {
                finalize!(f32);
            }
            let (copy_kind, stochastic) = match self.config.model_copy {
                None => (COPY_NONE, false),
                Some((format, rounding)) => (
                    match format {
                        CopyFormat::Bf16 => COPY_BF16,
                        CopyFormat::F16 => COPY_F16,
                    },
                    matches!(rounding, Rounding::Stochastic { .. }),
                ),
            };
            let with_ema = self.config.ema_beta.is_some();
            for b in self.buckets.iter().filter(|b| b.num_chunks > 0) {
                let optional = |on: bool| if on { b.quads } else { 1 };
                unsafe {
                    fused_update::launch_unchecked(
                        client,
                        cube_count(b.num_chunks),
                        CubeDim::new_1d(CUBE_UNITS),
                        arg(&b.param, b.quads),
                        arg(&b.grad, b.quads),
                        arg(&b.exp_avg, b.quads),
                        arg(&b.exp_avg_sq, optional(adamw)),
                        arg(&b.ema, optional(with_ema)),
                        arg(&b.copy, optional(copy_kind != COPY_NONE)),
                        arg(&b.chunks, b.num_chunks * CHUNK_WORDS),
                        arg(&self.scalars, SCALARS_LEN),
                        arg(&self.counters, COUNTERS_LEN),
                        // Arena position of the bucket's first element (mod 2^32), for the
                        // stochastic-rounding hash.
                        (b.first_quad * 4) as u32,
                        adamw,
                        self.config.cautious,
                        with_ema,
                        copy_kind,
                        stochastic,
                    )
                };
            }
            Ok(())
        })
    }

    fn read_words(&self, handle: &Handle) -> Result<Vec<u32>> {
        guarded("reading back", || {
            let bytes =
                crate::cube::read_bytes(self.ctx.client(), handle.clone()).map_err(runtime)?;
            Ok(u32::from_bytes(&bytes).to_vec())
        })
    }

    fn read_f32(&self, handle: &Handle) -> Result<Vec<f32>> {
        Ok(self
            .read_words(handle)?
            .into_iter()
            .map(f32::from_bits)
            .collect())
    }

    /// One state of every bucket, concatenated into the arena and cut into tensors.
    fn read_arena(&self, pick: impl Fn(&Bucket) -> &Handle) -> Result<Vec<Vec<f32>>> {
        let mut arena = Vec::with_capacity(self.layout.total as usize);
        for b in &self.buckets {
            arena.extend(self.read_f32(pick(b))?);
        }
        Ok(self.layout.unpack(&arena))
    }

    /// Every buffer of the optimizer's state, raw (synchronises): enough to continue a run
    /// bit for bit in another process with [`FusedOptimizer::import_state`] on an optimizer
    /// created with the same configuration, schedule, capacity and parameter sizes.
    pub fn export_state(&self) -> Result<Vec<(String, Vec<u32>)>> {
        let mut out = Vec::new();
        for (i, b) in self.buckets.iter().enumerate() {
            for (name, h) in [
                ("param", &b.param),
                ("exp_avg", &b.exp_avg),
                ("exp_avg_sq", &b.exp_avg_sq),
                ("ema", &b.ema),
                ("copy", &b.copy),
            ] {
                out.push((format!("bucket{i}.{name}"), self.read_words(h)?));
            }
        }
        out.push(("counters".into(), self.read_words(&self.counters)?));
        out.push(("history".into(), self.read_words(&self.history)?));
        out.push(("scalars".into(), self.read_words(&self.scalars)?));
        Ok(out)
    }

    /// Writes a state [`FusedOptimizer::export_state`] returned back into this optimizer's
    /// buffers (in place). Every buffer must be there with its size.
    pub fn import_state(&mut self, state: &[(String, Vec<u32>)]) -> Result<()> {
        let find = |name: &str| -> Result<&Vec<u32>> {
            state
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
                .ok_or_else(|| Error::InvalidArgument(format!("optimizer state: no `{name}`")))
        };
        let mut writes: Vec<(&Handle, &Vec<u32>, String)> = Vec::new();
        for (i, b) in self.buckets.iter().enumerate() {
            for (name, h) in [
                ("param", &b.param),
                ("exp_avg", &b.exp_avg),
                ("exp_avg_sq", &b.exp_avg_sq),
                ("ema", &b.ema),
                ("copy", &b.copy),
            ] {
                let key = format!("bucket{i}.{name}");
                writes.push((h, find(&key)?, key));
            }
        }
        for (name, h) in [
            ("counters", &self.counters),
            ("history", &self.history),
            ("scalars", &self.scalars),
        ] {
            writes.push((h, find(name)?, name.to_string()));
        }
        for (h, words, name) in &writes {
            // What a read gives back: the bytes in use (allocations may be rounded up).
            let have = (h.size_in_used() as usize) / 4;
            if words.len() != have {
                return Err(Error::InvalidArgument(format!(
                    "optimizer state: `{name}` has {} words, this optimizer's buffer {have}",
                    words.len()
                )));
            }
        }
        guarded("restoring the optimizer state", || {
            for (h, words, _) in &writes {
                let bytes = u32::as_bytes(words);
                crate::cube::count_upload(bytes.len());
                self.ctx
                    .client()
                    .write(h, Bytes::from_bytes_vec(bytes.to_vec()));
            }
            Ok(())
        })
    }

    /// The pieces of tensor `i` in the buckets: `(bucket, offset in the tensor, offset in the
    /// bucket, length)`, in order (a tensor may straddle buckets).
    fn tensor_pieces(&self, i: usize) -> Vec<(usize, usize, usize, usize)> {
        let (start, n) = (self.layout.offsets[i] as usize, self.layout.sizes[i]);
        let end = start + n;
        self.buckets
            .iter()
            .enumerate()
            .filter_map(|(j, b)| {
                let b0 = (b.first_quad * 4) as usize;
                let b1 = b0 + b.quads * 4;
                let (s, e) = (start.max(b0), end.min(b1));
                (s < e).then(|| (j, s - start, s - b0, e - s))
            })
            .collect()
    }

    /// Copies the next step's gradient of tensor `i` from a device tensor with its element
    /// count (any shape; f32, or f16 / bf16 widened on the device): device copies only.
    pub fn set_grad_device(&mut self, i: usize, grad: &crate::cube::DeviceTensor) -> Result<()> {
        let Some(&n) = self.layout.sizes.get(i) else {
            return Err(Error::InvalidArgument(format!(
                "gradient {i} of an optimizer over {} tensors",
                self.layout.sizes.len()
            )));
        };
        if grad.numel() != n {
            return Err(Error::shape(
                &format!("grads[{i}]"),
                format!("{n} elements (params[{i}])"),
                grad.shape(),
            ));
        }
        let src = grad.to_f32(&self.ctx, &format!("grads[{i}]"))?;
        let pieces = self.tensor_pieces(i);
        guarded("copying a gradient", || {
            for (j, from, to, len) in pieces {
                // SAFETY: `src` holds the tensor's `n` f32 and `[from, from + len)` lies inside
                // it; `[to, to + len)` lies inside bucket `j` (tensor_pieces intersects ranges).
                unsafe {
                    crate::cube::kernels::copy_range(
                        &self.ctx,
                        &src,
                        from,
                        &self.buckets[j].grad,
                        to,
                        len,
                    )
                };
            }
            Ok(())
        })
    }

    /// The master weights of tensor `i` as a new f32 device tensor of `shape` (device copies).
    pub fn param_tensor(&self, i: usize, shape: Vec<usize>) -> Result<crate::cube::DeviceTensor> {
        let Some(&n) = self.layout.sizes.get(i) else {
            return Err(Error::InvalidArgument(format!(
                "parameter {i} of an optimizer over {} tensors",
                self.layout.sizes.len()
            )));
        };
        if shape.iter().product::<usize>() != n {
            return Err(Error::shape(
                &format!("params[{i}]"),
                format!("{n} elements"),
                &shape,
            ));
        }
        let out = crate::cube::kernels::alloc_f32(&self.ctx, n.max(1));
        let pieces = self.tensor_pieces(i);
        guarded("copying a parameter", || {
            for (j, from, to, len) in pieces {
                // SAFETY: as in `set_grad_device`, the other way round.
                unsafe {
                    crate::cube::kernels::copy_range(
                        &self.ctx,
                        &self.buckets[j].param,
                        to,
                        &out,
                        from,
                        len,
                    )
                };
            }
            Ok(())
        })?;
        crate::cube::DeviceTensor::from_handle(out, shape, DType::F32)
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

    /// Writes a state by tensor into this optimizer's buffers (values rounded to f32; a missing
    /// 16-bit copy is rebuilt as the weights' nearest image; history past the capacity is
    /// dropped). The next call continues from `state.calls`.
    pub fn set_state(&mut self, state: &super::OptimizerState) -> Result<()> {
        let arenas = state.to_arenas(&self.config, &self.layout)?;
        let copy = arenas.copy.as_deref().map(halves_to_words);
        let mut counters = initial_counters(&self.config);
        let narrow_count = |what: &str, c: u64| -> Result<u32> {
            u32::try_from(c).map_err(|_| {
                Error::InvalidArgument(format!(
                    "optimizer state: {c} {what} exceed the cube backend's 32-bit counters"
                ))
            })
        };
        counters[C_CALLS] = narrow_count("calls", state.calls)?;
        counters[C_STEPS] = narrow_count("steps", state.steps)?;
        counters[C_SKIPPED] = narrow_count("skipped calls", state.skipped)?;
        counters[C_LAST_SKIPPED] = u32::from(state.last_skipped);
        // The record of call k sits at entry k; the state holds calls 0.. in order.
        let mut history = vec![0.0f32; self.capacity * HISTORY_WORDS];
        for (k, r) in state.history.iter().take(self.capacity).enumerate() {
            let flags = if r.skipped { HISTORY_SKIPPED } else { 0 }
                | if r.grad_norm.is_some() {
                    HISTORY_NORM
                } else {
                    0
                };
            history[k * HISTORY_WORDS] = r.lr as f32;
            history[k * HISTORY_WORDS + 1] = r.grad_norm.unwrap_or(0.0) as f32;
            history[k * HISTORY_WORDS + 2] = flags as f32;
        }
        guarded("writing the optimizer state", || {
            let client = self.ctx.client();
            let write = |h: &Handle, bytes: &[u8]| {
                crate::cube::count_upload(bytes.len());
                client.write(h, Bytes::from_bytes_vec(bytes.to_vec()));
            };
            for b in &self.buckets {
                let range =
                    (b.first_quad * 4) as usize..((b.first_quad + b.quads as u64) * 4) as usize;
                write(&b.param, f32::as_bytes(&arenas.params[range.clone()]));
                write(&b.exp_avg, f32::as_bytes(&arenas.exp_avg[range.clone()]));
                if let Some(v) = &arenas.exp_avg_sq {
                    write(&b.exp_avg_sq, f32::as_bytes(&v[range.clone()]));
                }
                if let Some(v) = &arenas.ema {
                    write(&b.ema, f32::as_bytes(&v[range.clone()]));
                }
                if let Some(words) = &copy {
                    write(
                        &b.copy,
                        u32::as_bytes(&words[range.start / 2..range.end / 2]),
                    );
                }
            }
            write(&self.counters, u32::as_bytes(&counters));
            write(&self.history, f32::as_bytes(&history));
            Ok(())
        })
    }

    /// The f32 master weights, tensor by tensor (synchronises).
    pub fn read_params(&self) -> Result<Vec<Vec<f32>>> {
        self.read_arena(|b| &b.param)
    }

    /// The first moments (synchronises).
    pub fn read_exp_avg(&self) -> Result<Vec<Vec<f32>>> {
        self.read_arena(|b| &b.exp_avg)
    }

    /// The second moments, AdamW only (synchronises).
    pub fn read_exp_avg_sq(&self) -> Result<Option<Vec<Vec<f32>>>> {
        if !self.config.method.has_second_moment() {
            return Ok(None);
        }
        self.read_arena(|b| &b.exp_avg_sq).map(Some)
    }

    /// The EMA weights, when enabled (synchronises).
    pub fn read_ema(&self) -> Result<Option<Vec<Vec<f32>>>> {
        if self.config.ema_beta.is_none() {
            return Ok(None);
        }
        self.read_arena(|b| &b.ema).map(Some)
    }

    /// The 16-bit copy as raw bits (bf16 or f16 per the config), when enabled (synchronises).
    pub fn read_model_copy(&self) -> Result<Option<Vec<Vec<u16>>>> {
        if self.config.model_copy.is_none() {
            return Ok(None);
        }
        let mut halves = Vec::with_capacity(self.layout.total as usize);
        for b in &self.buckets {
            halves.extend(
                self.read_words(&b.copy)?
                    .iter()
                    .flat_map(|&w| [w as u16, (w >> 16) as u16]),
            );
        }
        Ok(Some(self.layout.unpack(&halves)))
    }

    /// The counters (synchronises).
    pub fn status(&self) -> Result<Status> {
        let c = self.read_words(&self.counters)?;
        Ok(Status {
            calls: c[C_CALLS] as u64,
            steps: c[C_STEPS] as u64,
            skipped: c[C_SKIPPED] as u64,
            last_skipped: c[C_LAST_SKIPPED] != 0,
        })
    }

    /// One record per call so far, up to the capacity (synchronises).
    pub fn history(&self) -> Result<Vec<StepRecord>> {
        let calls = self.status()?.calls.min(self.capacity as u64) as usize;
        let h = self.read_f32(&self.history)?;
        Ok((0..calls)
            .map(|k| {
                let flags = h[k * HISTORY_WORDS + 2] as u32;
                StepRecord {
                    lr: h[k * HISTORY_WORDS] as f64,
                    grad_norm: (flags & HISTORY_NORM != 0)
                        .then_some(h[k * HISTORY_WORDS + 1] as f64),
                    skipped: flags & HISTORY_SKIPPED != 0,
                }
            })
            .collect())
    }

    /// Waits until every enqueued step has finished, and reports a failed launch (which a bare
    /// device barrier would not: the failure is attached to the buffers the launch should have
    /// written).
    pub fn synchronize(&self) -> Result<()> {
        let mut handles = vec![&self.scalars, &self.counters];
        handles.extend(self.buckets.iter().map(|b| &b.param));
        guarded("synchronising", || {
            cubecl::future::block_on(self.ctx.client().sync_buffers(handles)).map_err(runtime)
        })
    }

    /// The scalar slots of the latest call (see `kernels::S_*`; synchronises). For tests.
    #[doc(hidden)]
    pub fn read_scalars(&self) -> Result<Vec<f32>> {
        self.read_f32(&self.scalars)
    }
}

/// A fresh counter buffer: no calls yet, the rounding seed from the configuration (the per-call
/// key is derived from it at each call).
fn initial_counters(config: &OptimizerConfig) -> Vec<u32> {
    let mut counters = vec![0u32; COUNTERS_LEN];
    counters[C_SEED] = config.rounding_seed();
    counters
}

/// The nearest-even 16-bit image of an arena, two halves per u32 (low half first).
fn pack_halves(arena: &[f32], format: CopyFormat) -> Vec<u32> {
    halves_to_words(&super::state::nearest_halves(arena, format))
}

/// 16-bit halves two per u32, low half first (the copy buffer's layout).
fn halves_to_words(halves: &[u16]) -> Vec<u32> {
    halves
        .chunks_exact(2)
        .map(|p| p[0] as u32 | ((p[1] as u32) << 16))
        .collect()
}

pub(super) fn optimize(
    ctx: &CubeContext,
    config: &OptimizerConfig,
    schedule: &Schedule,
    params: &Params,
    grads: &[Vec<&Tensor>],
) -> Result<OptimizeOutput> {
    let values: Vec<Vec<f32>> = params.tensors.iter().map(|t| t.to_f32_vec()).collect();
    let slices: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
    let decay: Vec<bool> = (0..params.tensors.len())
        .map(|i| params.decays(i))
        .collect();
    let mut optimizer =
        FusedOptimizer::new(ctx, config, schedule, grads.len().max(1), &slices, &decay)?;
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
    ctx: &CubeContext,
    checkpoints: &[Vec<&Tensor>],
    coefficients: &[f64],
    dtype: DType,
) -> Result<Vec<Tensor>> {
    let shapes: Vec<Vec<usize>> = checkpoints[0].iter().map(|t| t.shape().to_vec()).collect();
    let layout = ArenaLayout::new(&checkpoints[0].iter().map(|t| t.numel()).collect::<Vec<_>>());
    let total_quads = (layout.total / 4) as usize;
    let count = checkpoints.len();
    let copy_format = match dtype {
        DType::BF16 => Some(CopyFormat::Bf16),
        DType::F16 => Some(CopyFormat::F16),
        DType::F32 | DType::F64 => None,
    };
    let client = ctx.client();
    // The stack of one bucket, `count` checkpoints of `bucket_quads` quads, must fit in the
    // largest buffer the device allows.
    let bucket_quads = (client.properties().memory.max_page_size / (16 * count as u64))
        .min(u32::MAX as u64) as usize;
    if bucket_quads == 0 {
        return Err(Error::Unsupported(format!(
            "merging {count} checkpoints at once on the cube backend (the stack of one vector \
             each exceeds the largest buffer)"
        )));
    }
    let arenas: Vec<Vec<f32>> = checkpoints
        .iter()
        .map(|checkpoint| {
            let values: Vec<Vec<f32>> = checkpoint.iter().map(|t| t.to_f32_vec()).collect();
            let slices: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
            layout.pack(&slices)
        })
        .collect();
    let coefficients: Vec<f32> = coefficients.iter().map(|&c| c as f32).collect();
    let copy_kind = match copy_format {
        None => COPY_NONE,
        Some(CopyFormat::Bf16) => COPY_BF16,
        Some(CopyFormat::F16) => COPY_F16,
    };
    let mut merged = Vec::with_capacity(layout.total as usize);
    let mut bits: Vec<u16> = Vec::new();
    let mut q0 = 0;
    while q0 < total_quads {
        let quads = bucket_quads.min(total_quads - q0);
        let mut stack = Vec::with_capacity(count * quads * 4);
        for arena in &arenas {
            stack.extend_from_slice(&arena[q0 * 4..(q0 + quads) * 4]);
        }
        guarded("merging checkpoints", || {
            let stack = crate::cube::upload_bytes(client, f32::as_bytes(&stack));
            let coefficients = crate::cube::upload_bytes(client, f32::as_bytes(&coefficients));
            let out = client.empty(quads * 16);
            let copy_quads = if copy_format.is_some() { quads } else { 1 };
            let copy = client.empty(copy_quads * 8);
            let cubes = quads.div_ceil(CUBE_UNITS as usize).min(65_535);
            unsafe {
                weighted_merge::launch_unchecked(
                    client,
                    CubeCount::Static(cubes as u32, 1, 1),
                    CubeDim::new_1d(CUBE_UNITS),
                    BufferArg::from_raw_parts(stack, count * quads),
                    BufferArg::from_raw_parts(coefficients, count),
                    BufferArg::from_raw_parts(out.clone(), quads),
                    BufferArg::from_raw_parts(copy.clone(), copy_quads),
                    quads as u32,
                    copy_kind,
                )
            };
            let values = crate::cube::read_bytes(client, out).map_err(runtime)?;
            merged.extend_from_slice(f32::from_bytes(&values));
            if copy_format.is_some() {
                let words = crate::cube::read_bytes(client, copy).map_err(runtime)?;
                bits.extend(
                    u32::from_bytes(&words)
                        .iter()
                        .flat_map(|&w| [w as u16, (w >> 16) as u16]),
                );
            }
            Ok(())
        })?;
        q0 += quads;
    }
    Ok(match copy_format {
        Some(format) => layout
            .unpack(&bits)
            .into_iter()
            .zip(shapes)
            .map(|(b, s)| half_tensor(s, &b, format))
            .collect(),
        None => layout
            .unpack(&merged)
            .into_iter()
            .zip(shapes)
            .map(|(v, s)| Tensor::f32_unchecked(s, v).to_dtype(dtype))
            .collect(),
    })
}
