//! Block-sparse FlashAttention-2 in CubeCL (ops.md section 3, kernels.md "Block-sparse flash
//! attention"), generic over the CubeCL runtime: wgpu (Vulkan / Metal / DX12, Mesa llvmpipe on a
//! CPU) through [`CubeContext::shared`], or any client wrapped with [`CubeContext::from_client`].
//!
//! Two entry levels:
//! - Device-resident: upload the plan once ([`CubeAttentionPlan`], built from an
//!   [`AttentionPlan`]) and call [`CubeAttentionPlan::forward`] / [`CubeAttentionPlan::backward`]
//!   on cubecl buffer handles ([`DeviceAttention`]) for every layer, head group and step that
//!   shares the mask, `T`, `S` and the causal flag. Nothing goes through the host.
//! - Host tensors: `attention::forward/backward(&Backend::Cube(..), ..)` plans, uploads, runs and
//!   downloads per call. The plan's block size is the mask's (`block_q x block_k`); a dense
//!   problem (no mask) is planned with 64 x 64 blocks (any block size gives the same result; 64
//!   keeps the causal pruning fine-grained). The backward re-runs the forward on the device for
//!   `o` and `lse` (the host API does not carry them).
//!
//! Dtypes: `q, k, v` may be f32, or f16 / bf16 where the runtime stores and converts them
//! (llvmpipe: f16 yes, bf16 no); anything else is [`Error::UnsupportedDtype`]. Outputs (`o`, `lse`,
//! `dq`, `dk`, `dv`) and the incoming gradient `do` are f32; the host path widens an f16/bf16 `do`
//! exactly. All arithmetic is f32.
//!
//! Head dims: any multiple of 8 from 8 to 256 whose tiles fit the device's shared memory; 64 and
//! 128 (the sizes) and 32 are tested. Others are [`Error::UnsupportedHeadDim`].
//!
//! Block sizes: any `block_q, block_k >= 1`. Each cube owns `rows` query (forward, dQ) or key
//! (dK/dV) rows inside one block and walks the other axis's blocks in sub-tiles of `cols` rows, so
//! blocks of 64 and 128 split into whole tiles; other sizes work with a ragged last tile.
//! The tile sizes come from the device's limits ([`kernel_tiles`]): on llvmpipe (32 KiB of shared
//! memory) they are 16-32 rows, on GPUs larger.
//!
//! Backward: `delta = rowsum(do * o)` (its own small kernel), then dQ over the plan's per-query
//! block lists and dK/dV over the transposed per-key-block lists, each output row owned by one
//! cube (no atomics), `P` recomputed from `lse`.

mod kernels;

use std::sync::atomic::{AtomicBool, Ordering};

use cubecl::features::TypeUsage;
use cubecl::prelude::*;
use cubecl::server::Handle;
use half::{bf16, f16};

use super::{Attention, AttentionPlan, AttnGrads, AttnOutput, AttnSpec, BlockMask};
use crate::cube::values::{self, ValueCheck};
use crate::cube::{CubeContext, DeviceTensor};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorData};

/// Block size of the plan of a dense (mask-free) problem on the host path.
pub const DENSE_BLOCK: usize = 64;

/// Largest head dim the kernels are compiled for (accumulators live in registers, `D / tpr` each).
pub const MAX_HEAD_DIM: usize = 256;

/// Threads per cube the tile choice aims for (and never exceeds).
const TARGET_UNITS: usize = 256;

/// Units per cube of the one-thread-per-item kernels (`delta`, fill).
const ITEM_UNITS: u32 = 64;

/// Largest grid extent along one axis that every runtime accepts (wgpu: 65535).
const MAX_GRID_AXIS: usize = 65_535;

static POISON_OUTPUTS: AtomicBool = AtomicBool::new(cfg!(debug_assertions));

/// Whether output buffers are filled with NaN before the kernels that must write every element run
/// (so an element a kernel forgets reads back as NaN and fails any comparison). On by default in
/// debug builds; the tests turn it on explicitly.
pub fn poison_outputs() -> bool {
    POISON_OUTPUTS.load(Ordering::Relaxed)
}

/// Turns output poisoning on or off for every caller in the process.
pub fn set_poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, Ordering::Relaxed);
}

/// Which kernel a tile shape is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    Forward,
    BackwardDq,
    BackwardDkDv,
}

/// The compile-time tile shape of one kernel: a cube owns `rows` rows and walks sub-tiles of
/// `cols` rows of the other axis, with `tpr` units per owned row (`rows * tpr` units per cube).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    pub rows: usize,
    pub cols: usize,
    pub tpr: usize,
}

impl Tiles {
    pub fn units(&self) -> usize {
        self.rows * self.tpr
    }

    /// Shared memory of `kernel` with this shape and head dim `d`, in f32 elements (the layout of
    /// `kernels.rs`).
    pub fn shared_floats(&self, kernel: AttnKernel, d: usize) -> usize {
        let (r, c) = (self.rows, self.cols);
        // Feature tiles have row stride d + 1, score tiles c + 1 (bank-conflict padding).
        let (fs, ps) = (d + 1, c + 1);
        match kernel {
            // q tile, k and v sub-tiles, P, per-lane reduction.
            AttnKernel::Forward => (r + 2 * c) * fs + r * ps + r * self.tpr,
            // q and do tiles, k and v sub-tiles, dS.
            AttnKernel::BackwardDq => (2 * r + 2 * c) * fs + r * ps,
            // k and v tiles, q and do sub-tiles, lse and delta, P and dS.
            AttnKernel::BackwardDkDv => (2 * r + 2 * c) * fs + 2 * c + 2 * r * ps,
        }
    }
}

/// The tile shape of `kernel` for head dim `d` on a device with `max_shared_bytes` of shared memory
/// and `max_units` units per cube, for blocks of `block_rows` (owned axis) and `block_cols` (walked
/// axis): the largest `rows x cols` (then the most rows) from {8, 16, 32, 64}^2 that fits, with
/// `rows`, `cols` not above the block sizes rounded up to a power of two, and the most lanes per row
/// (a power of two dividing `d` and `cols`) that keeps the cube at most 256 units. `None` when
/// nothing fits.
pub fn kernel_tiles(
    kernel: AttnKernel,
    d: usize,
    block_rows: usize,
    block_cols: usize,
    max_shared_bytes: usize,
    max_units: usize,
) -> Option<Tiles> {
    const SIZES: [usize; 4] = [64, 32, 16, 8];
    let unit_cap = TARGET_UNITS.min(max_units);
    let row_cap = block_rows.next_power_of_two().max(8);
    let col_cap = block_cols.next_power_of_two().max(8);
    let mut best: Option<Tiles> = None;
    for &rows in SIZES.iter().filter(|&&r| r <= row_cap) {
        for &cols in SIZES.iter().filter(|&&c| c <= col_cap) {
            let mut tpr = 1;
            while rows * tpr * 2 <= unit_cap
                && d.is_multiple_of(tpr * 2)
                && cols.is_multiple_of(tpr * 2)
            {
                tpr *= 2;
            }
            let tiles = Tiles { rows, cols, tpr };
            // dK/dV loads one lse / delta value per unit of the first `cols` units.
            if rows * tpr > unit_cap || (kernel == AttnKernel::BackwardDkDv && rows * tpr < cols) {
                continue;
            }
            if tiles.shared_floats(kernel, d) * 4 > max_shared_bytes {
                continue;
            }
            let better = best.is_none_or(|b| (rows * cols, rows) > (b.rows * b.cols, b.rows));
            if better {
                best = Some(tiles);
            }
        }
    }
    best
}

/// Whether the runtime behind `ctx` can take inputs `q, k, v` of `dtype` (stored in buffers and
/// converted to f32 in the kernels). f64 never on the device (the kernels compute in f32); the
/// host API `attention::forward` narrows f64 inputs to f32 on the host first.
pub fn supports_dtype(ctx: &CubeContext, dtype: DType) -> bool {
    let usable = |uses: cubecl::ir::EnumSet<TypeUsage>| {
        uses.contains(TypeUsage::Buffer) && uses.contains(TypeUsage::Conversion)
    };
    match dtype {
        DType::F32 => true,
        DType::F16 => usable(<f16 as Scalar>::supported_uses(ctx.client())),
        DType::BF16 => usable(<bf16 as Scalar>::supported_uses(ctx.client())),
        DType::F64 => false,
    }
}

fn check_dtype(ctx: &CubeContext, tensor: &str, dtype: DType) -> Result<()> {
    if supports_dtype(ctx, dtype) {
        return Ok(());
    }
    let supported = [DType::F32, DType::F16, DType::BF16]
        .into_iter()
        .filter(|&d| supports_dtype(ctx, d))
        .map(|d| d.name())
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::UnsupportedDtype {
        tensor: tensor.to_string(),
        dtype,
        backend: format!("cube ({})", ctx.adapter_name()),
        supported,
    })
}

fn runtime_error(message: impl std::fmt::Display) -> Error {
    Error::Runtime {
        backend: "cube".into(),
        message: message.to_string(),
    }
}

/// Runs `f`, turning a panic inside cubecl / wgpu (a shader the driver rejects, a lost device)
/// into [`Error::Runtime`], so nothing panics across the public API.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => Err(runtime_error(format!(
            "{what} panicked: {}",
            crate::cube::panic_message(&panic)
        ))),
    }
}

/// One of the plan's two CSR directions on the device (u32 buffers; `full` widened to u32).
struct DeviceLists {
    ptr: Handle,
    idx: Handle,
    full: Handle,
}

impl DeviceLists {
    fn upload(ctx: &CubeContext, lists: &super::PlanLists) -> Self {
        let full: Vec<u32> = lists.full.iter().map(|&f| u32::from(f)).collect();
        DeviceLists {
            ptr: upload_u32(ctx, &lists.ptr),
            idx: upload_u32(ctx, &lists.idx),
            full: upload_u32(ctx, &full),
        }
    }
}

/// An [`AttentionPlan`] uploaded once to a device: reuse it for every call with the same mask, `T`,
/// `S` and causal flag (any batch, heads, head dim, scale and dtype).
pub struct CubeAttentionPlan {
    ctx: CubeContext,
    plan: AttentionPlan,
    rows: DeviceLists,
    cols: DeviceLists,
}

impl std::fmt::Debug for CubeAttentionPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CubeAttentionPlan(T {}, S {}, blocks {}x{}, nnz {}, causal {}, {})",
            self.plan.t,
            self.plan.s,
            self.plan.block_q,
            self.plan.block_k,
            self.plan.rows.nnz(),
            self.plan.causal,
            self.ctx.adapter_name()
        )
    }
}

/// One attention problem over device tensors: the host API's builder, [`Attention`], over
/// [`DeviceTensor`]s (`q: [B, T, H, D]`, `k, v: [B, S, H, D]`, one dtype; the same `dense` /
/// `with_mask` / `with_causal` / `with_scale` calls, plus [`Attention::with_value_check`]).
pub type DeviceAttention<'a> = Attention<'a, DeviceTensor>;

/// A problem lowered to raw buffers (the plan's `T` and `S`).
#[derive(Clone, Copy, Debug)]
struct RawAttention<'a> {
    q: &'a Handle,
    k: &'a Handle,
    v: &'a Handle,
    dtype: DType,
    batch: usize,
    heads: usize,
    head_dim: usize,
    /// Defaults to `D^-0.5`.
    scale: Option<f64>,
    value_check: ValueCheck,
}

/// Forward outputs on the device, f32: `o: [B, T, H, D]`, `lse: [B, H, T]` (`-inf` for a row with
/// no allowed key, whose `o` is 0).
#[derive(Clone, Debug)]
pub struct DeviceAttnOutput {
    pub o: DeviceTensor,
    pub lse: DeviceTensor,
}

/// Gradients on the device, f32: `dq: [B, T, H, D]`, `dk, dv: [B, S, H, D]`.
#[derive(Clone, Debug)]
pub struct DeviceAttnGrads {
    pub dq: DeviceTensor,
    pub dk: DeviceTensor,
    pub dv: DeviceTensor,
}

/// The raw outputs of the launches.
struct RawOutput {
    o: Handle,
    lse: Handle,
}

struct RawGrads {
    dq: Handle,
    dk: Handle,
    dv: Handle,
}

/// Forward pass over device tensors, planning `args.mask` (uploaded for this call; keep a
/// [`CubeAttentionPlan`] to reuse one mask's plan across calls).
pub fn forward_device(ctx: &CubeContext, args: &DeviceAttention) -> Result<DeviceAttnOutput> {
    let spec = args.validate_layout()?;
    check_dtype(ctx, "q", spec.dtype)?;
    CubeAttentionPlan::from_mask(ctx, args.mask, spec.dims.t, spec.dims.s, spec.causal)?
        .forward(args)
}

/// Backward pass over device tensors (`o`, `lse`: the forward's outputs; `d_o`: the gradient of
/// `o`, `[B, T, H, D]`, f32 or 16-bit, widened on the device), planning `args.mask` for this call.
pub fn backward_device(
    ctx: &CubeContext,
    args: &DeviceAttention,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    d_o: &DeviceTensor,
) -> Result<DeviceAttnGrads> {
    let spec = args.validate_layout()?;
    check_dtype(ctx, "q", spec.dtype)?;
    CubeAttentionPlan::from_mask(ctx, args.mask, spec.dims.t, spec.dims.s, spec.causal)?
        .backward(args, o, lse, d_o)
}

/// Validated sizes and launch constants of one device call.
struct Launch {
    b: usize,
    h: usize,
    d: usize,
    scale: f32,
    dtype: DType,
}

impl CubeAttentionPlan {
    /// Uploads `plan` to the device of `ctx`.
    pub fn new(ctx: &CubeContext, plan: &AttentionPlan) -> Result<Self> {
        guarded("uploading the attention plan", || {
            Ok(CubeAttentionPlan {
                ctx: ctx.clone(),
                plan: plan.clone(),
                rows: DeviceLists::upload(ctx, &plan.rows),
                cols: DeviceLists::upload(ctx, &plan.cols),
            })
        })
    }

    /// Plans and uploads `mask` (its block size; [`DENSE_BLOCK`] when `None`) for `t` queries,
    /// `s` keys and the causal rule.
    pub fn from_mask(
        ctx: &CubeContext,
        mask: Option<&BlockMask>,
        t: usize,
        s: usize,
        causal: bool,
    ) -> Result<Self> {
        let (bq, bk) = mask.map_or((DENSE_BLOCK, DENSE_BLOCK), |m| (m.block_q(), m.block_k()));
        Self::new(ctx, &AttentionPlan::new(mask, t, s, bq, bk, causal)?)
    }

    /// The host plan this was uploaded from.
    pub fn plan(&self) -> &AttentionPlan {
        &self.plan
    }

    /// The builder over device tensors lowered to this plan's buffers: shapes and options
    /// checked (the host validator), `T`, `S`, the causal rule and the mask's blocks against the
    /// plan's.
    fn lower<'a>(&self, args: &'a DeviceAttention) -> Result<RawAttention<'a>> {
        let spec = args.validate_layout()?;
        let d = spec.dims;
        let p = &self.plan;
        if (p.t, p.s, p.causal) != (d.t, d.s, spec.causal) {
            return Err(Error::InvalidArgument(format!(
                "the plan covers T = {}, S = {}, causal = {}; the problem has T = {}, S = {}, causal = {}",
                p.t, p.s, p.causal, d.t, d.s, spec.causal
            )));
        }
        if let Some(mask) = args.mask
            && (mask.block_q(), mask.block_k()) != (p.block_q, p.block_k)
        {
            return Err(Error::InvalidArgument(format!(
                "the mask's blocks are {}x{}, the plan's {}x{}: plan this mask",
                mask.block_q(),
                mask.block_k(),
                p.block_q,
                p.block_k
            )));
        }
        Ok(RawAttention {
            q: args.q.handle(),
            k: args.k.handle(),
            v: args.v.handle(),
            dtype: spec.dtype,
            batch: d.b,
            heads: d.h,
            head_dim: d.d,
            scale: Some(spec.scale),
            value_check: args.value_check,
        })
    }

    /// Forward pass over device tensors with this plan's mask (`args.mask`, when given, must be
    /// the one planned; its blocks and the sequence lengths are checked).
    pub fn forward(&self, args: &DeviceAttention) -> Result<DeviceAttnOutput> {
        let raw = self.lower(args)?;
        let out = self.forward_raw(&raw)?;
        let (b, h, d, t) = (raw.batch, raw.heads, raw.head_dim, self.plan.t);
        Ok(DeviceAttnOutput {
            o: DeviceTensor::f32_unchecked(out.o, vec![b, t, h, d]),
            lse: DeviceTensor::f32_unchecked(out.lse, vec![b, h, t]),
        })
    }

    /// Backward pass over device tensors: `o` and `lse` are this plan's forward outputs for
    /// `args`, `d_o` the gradient of `o` (`[B, T, H, D]`; f32, or 16-bit widened on the device).
    pub fn backward(
        &self,
        args: &DeviceAttention,
        o: &DeviceTensor,
        lse: &DeviceTensor,
        d_o: &DeviceTensor,
    ) -> Result<DeviceAttnGrads> {
        let raw = self.lower(args)?;
        let (b, h, d, t, s) = (raw.batch, raw.heads, raw.head_dim, self.plan.t, self.plan.s);
        let bthd = ["B", "T", "H", "D"];
        for (name, tensor, dims, want) in [
            ("o", o, &bthd[..], vec![b, t, h, d]),
            ("lse", lse, &["B", "H", "T"][..], vec![b, h, t]),
            ("do", d_o, &bthd[..], vec![b, t, h, d]),
        ] {
            if tensor.shape() != want.as_slice() {
                return Err(Error::shape(
                    name,
                    crate::validation::describe(dims, &want),
                    tensor.shape(),
                ));
            }
        }
        let o = o.to_f32(&self.ctx, "o")?;
        let lse = lse.to_f32(&self.ctx, "lse")?;
        let d_o = d_o.to_f32(&self.ctx, "do")?;
        let grads = self.backward_raw(&raw, &o, &lse, &d_o)?;
        Ok(DeviceAttnGrads {
            dq: DeviceTensor::f32_unchecked(grads.dq, vec![b, t, h, d]),
            dk: DeviceTensor::f32_unchecked(grads.dk, vec![b, s, h, d]),
            dv: DeviceTensor::f32_unchecked(grads.dv, vec![b, s, h, d]),
        })
    }

    /// The value check of `args` (16-bit inputs are widened to f32 for it) and of `extra` f32
    /// buffers.
    fn check_values(
        &self,
        args: &RawAttention,
        l: &Launch,
        extra: &[(&str, &Handle, usize)],
    ) -> Result<()> {
        if args.value_check == ValueCheck::Off {
            return Ok(());
        }
        let (t, s) = (self.plan.t, self.plan.s);
        let lens = [
            l.b * t * l.h * l.d,
            l.b * s * l.h * l.d,
            l.b * s * l.h * l.d,
        ];
        let widened: Vec<Handle> = [args.q, args.k, args.v]
            .iter()
            .zip(lens)
            .map(|(h, n)| match l.dtype {
                DType::F16 => crate::cube::kernels::cast_f32::<f16>(&self.ctx, h, n),
                DType::BF16 => crate::cube::kernels::cast_f32::<bf16>(&self.ctx, h, n),
                _ => (*h).clone(),
            })
            .collect();
        let mut checked: Vec<values::Checked> = ["q", "k", "v"]
            .iter()
            .zip(&widened)
            .zip(lens)
            .map(|((&name, buffer), len)| values::Checked {
                name,
                buffer,
                len,
                gate: false,
            })
            .collect();
        for &(name, buffer, len) in extra {
            checked.push(values::Checked {
                name,
                buffer,
                len,
                gate: false,
            });
        }
        values::check(&self.ctx, &checked)
    }

    pub fn context(&self) -> &CubeContext {
        &self.ctx
    }

    fn client(&self) -> &Client {
        self.ctx.client()
    }

    fn validate(&self, args: &RawAttention) -> Result<Launch> {
        check_dtype(&self.ctx, "q", args.dtype)?;
        let (b, h, d) = (args.batch, args.heads, args.head_dim);
        if b == 0 || h == 0 {
            return Err(Error::InvalidArgument(format!(
                "attention needs B >= 1 and H >= 1, got B = {b}, H = {h}"
            )));
        }
        if d == 0 || d % 8 != 0 || d > MAX_HEAD_DIM {
            return Err(self.unsupported_head_dim(d));
        }
        let elem = args.dtype.size_in_bytes();
        let (t, s) = (self.plan.t, self.plan.s);
        for (name, handle, tokens) in [("q", args.q, t), ("k", args.k, s), ("v", args.v, s)] {
            expect_buffer(name, handle, b * tokens * h * d * elem)?;
        }
        let scale = crate::validation::expect_scale(args.scale.unwrap_or((d as f64).powf(-0.5)))?;
        if b * h > MAX_GRID_AXIS.min(self.client().properties().hardware.max_cube_count.1 as usize)
        {
            return Err(Error::Unsupported(format!(
                "B * H = {} exceeds the grid limit of the cube attention kernels",
                b * h
            )));
        }
        Ok(Launch {
            b,
            h,
            d,
            scale: scale as f32,
            dtype: args.dtype,
        })
    }

    fn unsupported_head_dim(&self, d: usize) -> Error {
        Error::UnsupportedHeadDim {
            tensor: "q".into(),
            dim: d,
            backend: format!("cube ({})", self.ctx.adapter_name()),
            supported: format!(
                "multiples of 8 up to {MAX_HEAD_DIM} whose tiles fit {} bytes of shared memory",
                self.max_shared_bytes()
            ),
        }
    }

    fn max_shared_bytes(&self) -> usize {
        self.client().properties().hardware.max_shared_memory_size
    }

    /// The tile shape `kernel` runs with for head dim `d` on this plan's device.
    pub fn kernel_tiles(&self, kernel: AttnKernel, d: usize) -> Result<Tiles> {
        self.tiles(kernel, d).map(|(tiles, _, _)| tiles)
    }

    /// Tile shape of `kernel` for head dim `d` on this device, and the grid extent along x
    /// (`blocks * tiles per block`).
    fn tiles(&self, kernel: AttnKernel, d: usize) -> Result<(Tiles, usize, usize)> {
        let p = &self.plan;
        let (block_rows, block_cols, blocks) = match kernel {
            AttnKernel::Forward | AttnKernel::BackwardDq => (p.block_q, p.block_k, p.nq),
            AttnKernel::BackwardDkDv => (p.block_k, p.block_q, p.nk),
        };
        let hw = &self.client().properties().hardware;
        let tiles = kernel_tiles(
            kernel,
            d,
            block_rows,
            block_cols,
            hw.max_shared_memory_size,
            hw.max_units_per_cube as usize,
        )
        .ok_or_else(|| self.unsupported_head_dim(d))?;
        let per_block = block_rows.div_ceil(tiles.rows);
        let grid_x = blocks * per_block;
        if grid_x > MAX_GRID_AXIS.min(hw.max_cube_count.0 as usize) {
            return Err(Error::Unsupported(format!(
                "{grid_x} tiles exceed the grid limit of the cube attention kernels"
            )));
        }
        Ok((tiles, per_block, grid_x))
    }

    /// Forward pass on raw device buffers.
    fn forward_raw(&self, args: &RawAttention) -> Result<RawOutput> {
        let l = self.validate(args)?;
        self.check_values(args, &l, &[])?;
        let (tiles, per_block, grid_x) = self.tiles(AttnKernel::Forward, l.d)?;
        guarded("attention forward", || {
            let t = self.plan.t;
            let o = output_f32(&self.ctx, l.b * t * l.h * l.d);
            let lse = output_f32(&self.ctx, l.b * l.h * t);
            match l.dtype {
                DType::F32 => {
                    self.launch_forward::<f32>(args, &l, tiles, per_block, grid_x, &o, &lse)
                }
                DType::F16 => {
                    self.launch_forward::<f16>(args, &l, tiles, per_block, grid_x, &o, &lse)
                }
                DType::BF16 => {
                    self.launch_forward::<bf16>(args, &l, tiles, per_block, grid_x, &o, &lse)
                }
                DType::F64 => unreachable!("check_dtype refuses f64"),
            }
            Ok(RawOutput { o, lse })
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_forward<F: Float + CubeElement>(
        &self,
        args: &RawAttention,
        l: &Launch,
        tiles: Tiles,
        per_block: usize,
        grid_x: usize,
        o: &Handle,
        lse: &Handle,
    ) {
        let p = &self.plan;
        let (t, s) = (p.t, p.s);
        // SAFETY: every buffer holds what the kernel indexes: q/k/v were checked against
        // B*T*H*D / B*S*H*D elements of F, o and lse are allocated for B*T*H*D and B*H*T f32, the
        // plan lists are the plan's own (indices < nq, nk; ptr has nq + 1 entries), and the
        // kernel writes only rows < T (< the block end) and features < D.
        unsafe {
            kernels::attn_forward::launch_unchecked::<F>(
                self.client(),
                CubeCount::Static(grid_x as u32, (l.b * l.h) as u32, 1),
                CubeDim::new_1d(tiles.units() as u32),
                buf(args.q, l.b * t * l.h * l.d),
                buf(args.k, l.b * s * l.h * l.d),
                buf(args.v, l.b * s * l.h * l.d),
                buf(&self.rows.ptr, p.nq + 1),
                buf(&self.rows.idx, p.rows.nnz().max(1)),
                buf(&self.rows.full, p.rows.nnz().max(1)),
                buf(o, l.b * t * l.h * l.d),
                buf(lse, l.b * l.h * t),
                t,
                s,
                l.h,
                p.block_q,
                p.block_k,
                per_block,
                l.scale,
                u32::from(p.causal),
                f32::NEG_INFINITY,
                l.d,
                tiles.rows,
                tiles.cols,
                tiles.tpr,
            )
        };
    }

    /// Backward pass on raw device buffers: `o` and `lse` are this plan's forward outputs for
    /// `args` (f32), `d_o` the f32 gradient of `o` (`[B, T, H, D]`).
    fn backward_raw(
        &self,
        args: &RawAttention,
        o: &Handle,
        lse: &Handle,
        d_o: &Handle,
    ) -> Result<RawGrads> {
        let l = self.validate(args)?;
        let (t, s) = (self.plan.t, self.plan.s);
        let q_len = l.b * t * l.h * l.d;
        expect_buffer("o", o, q_len * 4)?;
        expect_buffer("do", d_o, q_len * 4)?;
        expect_buffer("lse", lse, l.b * l.h * t * 4)?;
        // o and lse are this plan's forward outputs (lse is -inf on an empty row): not checked.
        self.check_values(args, &l, &[("do", d_o, q_len)])?;
        let dq_tiles = self.tiles(AttnKernel::BackwardDq, l.d)?;
        let dkdv_tiles = self.tiles(AttnKernel::BackwardDkDv, l.d)?;
        guarded("attention backward", || {
            let delta = output_f32(&self.ctx, l.b * l.h * t);
            self.launch_delta(&l, o, d_o, &delta);
            let dq = output_f32(&self.ctx, q_len);
            let dk = output_f32(&self.ctx, l.b * s * l.h * l.d);
            let dv = output_f32(&self.ctx, l.b * s * l.h * l.d);
            let bufs = BackwardBuffers {
                d_o,
                lse,
                delta: &delta,
                dq: &dq,
                dk: &dk,
                dv: &dv,
            };
            match l.dtype {
                DType::F32 => self.launch_backward::<f32>(args, &l, &bufs, dq_tiles, dkdv_tiles),
                DType::F16 => self.launch_backward::<f16>(args, &l, &bufs, dq_tiles, dkdv_tiles),
                DType::BF16 => self.launch_backward::<bf16>(args, &l, &bufs, dq_tiles, dkdv_tiles),
                DType::F64 => unreachable!("check_dtype refuses f64"),
            }
            Ok(RawGrads { dq, dk, dv })
        })
    }

    fn launch_delta(&self, l: &Launch, o: &Handle, d_o: &Handle, delta: &Handle) {
        let t = self.plan.t;
        let n_rows = l.b * t * l.h;
        // SAFETY: o and do hold B*T*H*D f32 (checked), delta B*H*T; the kernel touches rows < n_rows.
        unsafe {
            kernels::attn_delta::launch_unchecked(
                self.client(),
                item_grid(n_rows),
                CubeDim::new_1d(ITEM_UNITS),
                buf(d_o, n_rows * l.d),
                buf(o, n_rows * l.d),
                buf(delta, n_rows),
                n_rows,
                t,
                l.h,
                l.d,
            )
        };
    }

    fn launch_backward<F: Float + CubeElement>(
        &self,
        args: &RawAttention,
        l: &Launch,
        bufs: &BackwardBuffers,
        (dq_tiles, dq_per_block, dq_grid): (Tiles, usize, usize),
        (kv_tiles, kv_per_block, kv_grid): (Tiles, usize, usize),
    ) {
        let p = &self.plan;
        let (t, s) = (p.t, p.s);
        let (q_len, kv_len, lse_len) = (l.b * t * l.h * l.d, l.b * s * l.h * l.d, l.b * l.h * t);
        // SAFETY: as in the forward; lse/delta hold B*H*T f32, do/dq B*T*H*D, dk/dv B*S*H*D; the
        // dQ kernel writes rows < T, the dK/dV kernel rows < S, features < D.
        unsafe {
            kernels::attn_backward_dq::launch_unchecked::<F>(
                self.client(),
                CubeCount::Static(dq_grid as u32, (l.b * l.h) as u32, 1),
                CubeDim::new_1d(dq_tiles.units() as u32),
                buf(args.q, q_len),
                buf(args.k, kv_len),
                buf(args.v, kv_len),
                buf(bufs.d_o, q_len),
                buf(bufs.lse, lse_len),
                buf(bufs.delta, lse_len),
                buf(&self.rows.ptr, p.nq + 1),
                buf(&self.rows.idx, p.rows.nnz().max(1)),
                buf(&self.rows.full, p.rows.nnz().max(1)),
                buf(bufs.dq, q_len),
                t,
                s,
                l.h,
                p.block_q,
                p.block_k,
                dq_per_block,
                l.scale,
                u32::from(p.causal),
                l.d,
                dq_tiles.rows,
                dq_tiles.cols,
                dq_tiles.tpr,
            );
            kernels::attn_backward_dkdv::launch_unchecked::<F>(
                self.client(),
                CubeCount::Static(kv_grid as u32, (l.b * l.h) as u32, 1),
                CubeDim::new_1d(kv_tiles.units() as u32),
                buf(args.q, q_len),
                buf(args.k, kv_len),
                buf(args.v, kv_len),
                buf(bufs.d_o, q_len),
                buf(bufs.lse, lse_len),
                buf(bufs.delta, lse_len),
                buf(&self.cols.ptr, p.nk + 1),
                buf(&self.cols.idx, p.cols.nnz().max(1)),
                buf(&self.cols.full, p.cols.nnz().max(1)),
                buf(bufs.dk, kv_len),
                buf(bufs.dv, kv_len),
                t,
                s,
                l.h,
                p.block_q,
                p.block_k,
                kv_per_block,
                l.scale,
                u32::from(p.causal),
                l.d,
                kv_tiles.rows,
                kv_tiles.cols,
                kv_tiles.tpr,
            );
        }
    }
}

struct BackwardBuffers<'a> {
    d_o: &'a Handle,
    lse: &'a Handle,
    delta: &'a Handle,
    dq: &'a Handle,
    dk: &'a Handle,
    dv: &'a Handle,
}

fn expect_buffer(name: &str, handle: &Handle, bytes: usize) -> Result<()> {
    if (handle.size() as usize) < bytes {
        return Err(Error::InvalidArgument(format!(
            "device buffer `{name}` holds {} bytes, the problem needs {bytes}",
            handle.size()
        )));
    }
    Ok(())
}

/// A kernel argument over the first `len` elements of `handle`.
///
/// # Safety
/// `handle` must hold at least `len` elements of the kernel parameter's type.
unsafe fn buf(handle: &Handle, len: usize) -> BufferArg {
    unsafe { BufferArg::from_raw_parts(handle.clone(), len) }
}

/// A grid of 1-D cubes of [`ITEM_UNITS`] covering `items` items, folded into x * y.
fn item_grid(items: usize) -> CubeCount {
    let cubes = items.div_ceil(ITEM_UNITS as usize).max(1);
    let x = cubes.min(MAX_GRID_AXIS);
    CubeCount::Static(x as u32, cubes.div_ceil(x) as u32, 1)
}

/// Uploads u32 values (a binding of one element for an empty list).
fn upload_u32(ctx: &CubeContext, data: &[u32]) -> Handle {
    if data.is_empty() {
        return crate::cube::upload_bytes(ctx.client(), u32::as_bytes(&[0]));
    }
    crate::cube::upload_bytes(ctx.client(), u32::as_bytes(data))
}

/// Uploads f32 values (a binding of one element for an empty buffer).
pub fn upload_f32(ctx: &CubeContext, data: &[f32]) -> Handle {
    if data.is_empty() {
        return crate::cube::upload_bytes(ctx.client(), f32::as_bytes(&[0.0]));
    }
    crate::cube::upload_bytes(ctx.client(), f32::as_bytes(data))
}

/// Reads the first `n` f32 of a buffer back (waits for every launch that writes it).
pub fn download_f32(ctx: &CubeContext, handle: &Handle, n: usize) -> Result<Vec<f32>> {
    let bytes = guarded("reading a device buffer", || {
        crate::cube::read_bytes(ctx.client(), handle.clone())
            .map_err(|e| runtime_error(format!("{e:?}")))
    })?;
    let values = f32::from_bytes(&bytes);
    if values.len() < n {
        return Err(runtime_error(format!(
            "read {} f32 back where {n} were expected",
            values.len()
        )));
    }
    Ok(values[..n].to_vec())
}

/// An f32 buffer of `n` elements that the next kernels must write completely, NaN-filled while
/// [`poison_outputs`] is on.
fn output_f32(ctx: &CubeContext, n: usize) -> Handle {
    let handle = ctx.client().empty(n.max(1) * 4);
    if poison_outputs() {
        fill_f32(ctx, &handle, n, f32::NAN);
    }
    handle
}

/// Sets the first `n` f32 of `handle` to `value`.
pub fn fill_f32(ctx: &CubeContext, handle: &Handle, n: usize, value: f32) {
    if n == 0 {
        return;
    }
    // SAFETY: the callers' buffers hold at least n f32; the kernel writes indices < n only.
    unsafe {
        kernels::fill_f32::launch_unchecked(
            ctx.client(),
            item_grid(n),
            CubeDim::new_1d(ITEM_UNITS),
            buf(handle, n),
            value,
            n,
        )
    };
}

/// Uploads one host input of `q, k, v` in its own dtype (checked).
fn upload_input(ctx: &CubeContext, name: &str, tensor: &Tensor) -> Result<Handle> {
    check_dtype(ctx, name, tensor.dtype())?;
    let client = ctx.client();
    Ok(match tensor.data() {
        TensorData::F32(d) => upload_f32(ctx, d),
        TensorData::F16(d) => crate::cube::upload_bytes(client, f16::as_bytes(d)),
        TensorData::BF16(d) => crate::cube::upload_bytes(client, bf16::as_bytes(d)),
        TensorData::F64(_) => unreachable!("check_dtype refuses f64"),
    })
}

/// The host problem planned, uploaded and described for the device API.
struct HostProblem {
    plan: CubeAttentionPlan,
    q: Handle,
    k: Handle,
    v: Handle,
    spec: AttnSpec,
}

impl HostProblem {
    fn new(ctx: &CubeContext, spec: &AttnSpec, args: &Attention) -> Result<Self> {
        // Refuse an unsupported dtype before planning or uploading anything.
        check_dtype(ctx, "q", spec.dtype)?;
        let plan =
            CubeAttentionPlan::from_mask(ctx, args.mask, spec.dims.t, spec.dims.s, spec.causal)?;
        let q = upload_input(ctx, "q", args.q)?;
        let k = upload_input(ctx, "k", args.k)?;
        let v = upload_input(ctx, "v", args.v)?;
        Ok(HostProblem {
            plan,
            q,
            k,
            v,
            spec: spec.clone(),
        })
    }

    fn device_args(&self) -> RawAttention<'_> {
        let d = self.spec.dims;
        RawAttention {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            dtype: self.spec.dtype,
            batch: d.b,
            heads: d.h,
            head_dim: d.d,
            scale: Some(self.spec.scale),
            // The host API validated every value before the upload: no second check.
            value_check: ValueCheck::Off,
        }
    }
}

pub(super) fn forward(ctx: &CubeContext, spec: &AttnSpec, args: &Attention) -> Result<AttnOutput> {
    let problem = HostProblem::new(ctx, spec, args)?;
    let out = problem.plan.forward_raw(&problem.device_args())?;
    let o_shape = spec.o_shape();
    let lse_shape = spec.lse_shape();
    let o = download_f32(ctx, &out.o, o_shape.iter().product())?;
    let lse = download_f32(ctx, &out.lse, lse_shape.iter().product())?;
    Ok(AttnOutput {
        o: Tensor::f32_unchecked(o_shape, o),
        lse: Tensor::f32_unchecked(lse_shape, lse),
    })
}

pub(super) fn backward(
    ctx: &CubeContext,
    spec: &AttnSpec,
    args: &Attention,
    d_o: &Tensor,
) -> Result<AttnGrads> {
    if d_o.dtype() == DType::F64 {
        return Err(Error::UnsupportedDtype {
            tensor: "do".into(),
            dtype: DType::F64,
            backend: format!("cube ({})", ctx.adapter_name()),
            supported: "f32, f16, bf16 (widened to f32)".into(),
        });
    }
    let problem = HostProblem::new(ctx, spec, args)?;
    let device = problem.device_args();
    let out = problem.plan.forward_raw(&device)?;
    // f16 / bf16 widen to f32 exactly.
    let d_o_dev = upload_f32(ctx, &d_o.to_f32_vec());
    let grads = problem
        .plan
        .backward_raw(&device, &out.o, &out.lse, &d_o_dev)?;
    let dims = spec.dims;
    let (t, s) = (dims.t, dims.s);
    let q_len = dims.b * t * dims.h * dims.d;
    let kv_len = dims.b * s * dims.h * dims.d;
    Ok(AttnGrads {
        dq: Tensor::f32_unchecked(
            args.q.shape().to_vec(),
            download_f32(ctx, &grads.dq, q_len)?,
        ),
        dk: Tensor::f32_unchecked(
            args.k.shape().to_vec(),
            download_f32(ctx, &grads.dk, kv_len)?,
        ),
        dv: Tensor::f32_unchecked(
            args.v.shape().to_vec(),
            download_f32(ctx, &grads.dv, kv_len)?,
        ),
    })
}
