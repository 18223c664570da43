//! linattn's fused optimizer over a burn module: one multi-tensor AdamW / Lion step per call
//! (decoupled / fully decoupled / cautious weight decay, global-norm clipping, the non-finite
//! skip, EMA) with the learning rate of a schedule (`linattn::optim::Schedule`: warmup + cosine,
//! linear, WSD, inverse-sqrt, REX, ...), and WSM merging of kept checkpoints.
//!
//! **Why not burn's `Optimizer` trait.** burn 0.22's `Optimizer` is per parameter tensor (its
//! `ModuleOptimizer` calls `step` once per tensor), which cannot express one fused launch
//! sequence over the whole module. [`FusedOptimizer::step`] has the shape of
//! `ModuleOptimizer::step` instead (module and gradients in, module out), so a training loop
//! swaps one for the other; the learning rate comes from the schedule, evaluated per call.
//!
//! **Where the state lives.** The f32 master weights, moments and counters live in linattn's
//! device optimizer on a wgpu device (created at the first step from the module's weights:
//! one upload) and in its f64 reference on NdArray. Each step packs the gradients into the
//! optimizer's arena layout with burn ops (on the device), runs the fused step as one backend
//! op, and cuts the new weights back out of the arena, in each parameter's dtype (16-bit
//! parameters are written from the f32 masters, rounded to nearest).

use std::sync::{Arc, Mutex};

use burn::backend::Dispatch;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{DType as BurnDType, Gradients, Tensor};
use linattn::optim::{ArenaLayout, CpuOptimizer, OptimizerConfig, Schedule, StepRecord};
use linattn::{Error, Result};

use crate::backend::LinattnBackend;

/// What the fused-step op carries: the optimizer's state, shared by every call.
#[derive(Clone)]
pub struct OptimHandle(pub(crate) Arc<Mutex<OptimState>>);

impl std::fmt::Debug for OptimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OptimHandle")
    }
}

impl PartialEq for OptimHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

// One value per optimizer, behind a mutex: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum OptimState {
    /// Before the first step: what the backend's optimizer is created from.
    Pending {
        config: OptimizerConfig,
        schedule: Schedule,
        capacity: usize,
        params: Vec<Vec<f32>>,
        decay: Vec<bool>,
        /// A saved state to restore once the backend's optimizer exists.
        restore: Option<SavedState>,
    },
    Cube(linattn::optim::cube::FusedOptimizer),
    Cpu(CpuOptimizer),
}

impl OptimHandle {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, OptimState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A saved optimizer state: the device optimizer's raw buffers, or the host reference's f64
/// state, by name.
#[derive(Clone, Debug, PartialEq)]
pub enum SavedState {
    Device(Vec<(String, Vec<u32>)>),
    Host(Vec<(String, Vec<f64>)>),
}

/// One parameter of the module, in visit order.
#[derive(Clone, Debug)]
struct Slot {
    id: ParamId,
    dims: Vec<usize>,
}

struct Collect {
    slots: Vec<Slot>,
    values: Vec<Vec<f32>>,
}

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        self.slots.push(Slot {
            id: param.id,
            dims: t.dims().to_vec(),
        });
        let data = t.into_data();
        self.values.push(data.iter::<f32>().collect());
    }
}

/// The gradients of the module's parameters, flattened, padded to the arena layout, one tensor.
struct GatherGrads<'a> {
    grads: &'a Gradients,
    layout: &'a ArenaLayout,
    parts: Vec<Tensor<1>>,
    index: usize,
    missing: Vec<usize>,
}

impl ModuleVisitor for GatherGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let i = self.index;
        self.index += 1;
        let t = param.val();
        let n = self.layout.sizes.get(i).copied().unwrap_or(0);
        let padded = self
            .layout
            .offsets
            .get(i + 1)
            .copied()
            .unwrap_or(self.layout.total)
            - self.layout.offsets.get(i).copied().unwrap_or(0);
        let device = t.device().inner();
        let grad = match t.grad(self.grads) {
            Some(g) => g.flatten::<1>(0, D - 1).cast(BurnDType::F32),
            None => {
                // An unused parameter: a zero gradient (its moments decay, its weight decays).
                self.missing.push(i);
                Tensor::<1>::zeros([n], &device)
            }
        };
        self.parts.push(grad);
        if padded as usize > n {
            self.parts
                .push(Tensor::<1>::zeros([padded as usize - n], &device));
        }
    }
}

/// Writes the new weights back, each slice of the arena in its parameter's shape and dtype.
struct Scatter<'a> {
    arena: Tensor<1>,
    layout: &'a ArenaLayout,
    index: usize,
}

impl ModuleMapper for Scatter<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let i = self.index;
        self.index += 1;
        let (offset, n) = (self.layout.offsets[i] as usize, self.layout.sizes[i]);
        let arena = self.arena.clone();
        param.map(|t| {
            let dims: [usize; D] = t.dims();
            like_param(&t, arena.slice(offset..offset + n).reshape(dims))
        })
    }
}

/// The fused optimizer of one burn module.
pub struct FusedOptimizer {
    handle: OptimHandle,
    layout: ArenaLayout,
    slots: Vec<Slot>,
}

impl FusedOptimizer {
    /// An optimizer over every float parameter of `module` (read once, now, as the starting
    /// master weights). Weight decay applies to parameters of rank >= 2 (weights, embeddings),
    /// not to biases and norm scales. `capacity` is the number of calls the schedule covers
    /// (its total; later calls keep its last learning rate).
    pub fn new<M: Module>(
        module: &M,
        config: &OptimizerConfig,
        schedule: &Schedule,
        capacity: usize,
    ) -> Result<Self> {
        config.validate()?;
        linattn::optim::validate_schedule(schedule)?;
        if capacity == 0 {
            return Err(Error::InvalidArgument(
                "the schedule needs a capacity of at least one call".into(),
            ));
        }
        let mut collect = Collect {
            slots: Vec::new(),
            values: Vec::new(),
        };
        module.visit(&mut collect);
        if collect.slots.is_empty() {
            return Err(Error::InvalidArgument(
                "the module has no float parameters".into(),
            ));
        }
        let layout = ArenaLayout::new(&collect.values.iter().map(Vec::len).collect::<Vec<_>>());
        let decay = collect.slots.iter().map(|s| s.dims.len() >= 2).collect();
        Ok(FusedOptimizer {
            handle: OptimHandle(Arc::new(Mutex::new(OptimState::Pending {
                config: config.clone(),
                schedule: schedule.clone(),
                capacity,
                params: collect.values,
                decay,
                restore: None,
            }))),
            layout,
            slots: collect.slots,
        })
    }

    /// One fused call: the gradients of `grads` (from `loss.backward()`) for every parameter
    /// (a parameter without one gets a zero gradient), the update, and the module with the new
    /// weights. The parameters must be the ones this optimizer was created from, in the same
    /// structure.
    pub fn step<M: Module>(&mut self, module: M, grads: &Gradients) -> Result<M> {
        // The structure only (shapes), no values.
        let mut seen = IdsAndDims(Vec::new());
        module.visit(&mut seen);
        if seen.0.len() != self.slots.len()
            || seen
                .0
                .iter()
                .zip(&self.slots)
                .any(|(a, b)| a.dims != b.dims)
        {
            return Err(Error::InvalidArgument(
                "the module's parameters are not the ones this optimizer was created from".into(),
            ));
        }
        let mut gather = GatherGrads {
            grads,
            layout: &self.layout,
            parts: Vec::new(),
            index: 0,
            missing: Vec::new(),
        };
        module.visit(&mut gather);
        let arena = Tensor::cat(gather.parts, 0);
        let new = Dispatch::linattn_fused_step(arena.into_dispatch(), self.handle.clone());
        let mut scatter = Scatter {
            arena: Tensor::from_dispatch(new),
            layout: &self.layout,
            index: 0,
        };
        Ok(module.map(&mut scatter))
    }

    /// The ids of the parameters, in the order of [`history`](Self::history)'s layout.
    pub fn param_ids(&self) -> Vec<ParamId> {
        self.slots.iter().map(|s| s.id).collect()
    }

    /// `model` with the optimizer's EMA of the weights in place of its own (`None` when the
    /// config has no `ema_beta`, or before the first step). Reads the EMA back to the host
    /// (a checkpoint-time operation, not a per-step one).
    pub fn ema_model<M: Module>(&self, model: M) -> Result<Option<M>> {
        let values: Vec<Vec<f32>> = match &*self.handle.lock() {
            OptimState::Pending { .. } => return Ok(None),
            OptimState::Cube(o) => match o.read_ema()? {
                Some(v) => v,
                None => return Ok(None),
            },
            OptimState::Cpu(o) => match o.ema() {
                Some(v) => v
                    .iter()
                    .map(|t| t.iter().map(|&x| x as f32).collect())
                    .collect(),
                None => return Ok(None),
            },
        };
        let mut set = SetHost { values, index: 0 };
        Ok(Some(model.map(&mut set)))
    }

    /// The latest call's record (`None` before the first call).
    pub fn last_record(&self) -> Result<Option<StepRecord>> {
        Ok(self.history()?.last().copied())
    }

    /// The optimizer's whole state (synchronises), for [`import_state`](Self::import_state) in
    /// a later process: a resumed run continues bit for bit. `None` before the first step (the
    /// state is then just the module's weights).
    pub fn export_state(&self) -> Result<Option<SavedState>> {
        match &*self.handle.lock() {
            OptimState::Pending { restore, .. } => Ok(restore.clone()),
            OptimState::Cube(o) => Ok(Some(SavedState::Device(o.export_state()?))),
            OptimState::Cpu(o) => Ok(Some(SavedState::Host(o.export_state()))),
        }
    }

    /// Restores a state from [`export_state`](Self::export_state) of an optimizer created with
    /// the same configuration, schedule, capacity and module structure, on the same kind of
    /// device (a wgpu state on wgpu, a CPU state on NdArray).
    pub fn import_state(&mut self, state: SavedState) -> Result<()> {
        match &mut *self.handle.lock() {
            OptimState::Pending { restore, .. } => {
                *restore = Some(state);
                Ok(())
            }
            OptimState::Cube(o) => match state {
                SavedState::Device(s) => o.import_state(&s),
                SavedState::Host(_) => Err(Error::InvalidArgument(
                    "a CPU optimizer state cannot continue on a device".into(),
                )),
            },
            OptimState::Cpu(o) => match state {
                SavedState::Host(s) => o.import_state(&s),
                SavedState::Device(_) => Err(Error::InvalidArgument(
                    "a device optimizer state cannot continue on the CPU".into(),
                )),
            },
        }
    }

    /// One record per call so far (learning rate used, gradient norm, skipped). On a device this
    /// reads the optimizer's history back (a synchronisation).
    pub fn history(&self) -> Result<Vec<StepRecord>> {
        match &*self.handle.lock() {
            OptimState::Pending { .. } => Ok(Vec::new()),
            OptimState::Cube(o) => o.history(),
            OptimState::Cpu(o) => Ok(o.history().to_vec()),
        }
    }
}

struct IdsAndDims(Vec<Slot>);

impl ModuleVisitor for IdsAndDims {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(Slot {
            id: param.id,
            dims: param.val().dims().to_vec(),
        });
    }
}

/// The host step (NdArray): the f64 reference, created at the first call.
pub(crate) fn host_step(handle: &OptimHandle, layout_total: usize, grads: Vec<f64>) -> Vec<f64> {
    let mut state = handle.lock();
    if let OptimState::Pending {
        config,
        schedule,
        params,
        decay,
        restore,
        ..
    } = &*state
    {
        let params64: Vec<Vec<f64>> = params
            .iter()
            .map(|p| p.iter().map(|&x| x as f64).collect())
            .collect();
        let borrowed: Vec<&[f64]> = params64.iter().map(Vec::as_slice).collect();
        let mut cpu = CpuOptimizer::new(config, schedule, &borrowed, decay)
            .unwrap_or_else(|e| panic!("linattn: {e}"));
        match restore {
            Some(SavedState::Host(saved)) => cpu
                .import_state(saved)
                .unwrap_or_else(|e| panic!("linattn: {e}")),
            Some(SavedState::Device(_)) => {
                panic!("linattn: a device optimizer state cannot continue on the CPU")
            }
            None => {}
        }
        *state = OptimState::Cpu(cpu);
    }
    let OptimState::Cpu(cpu) = &mut *state else {
        panic!("linattn: this optimizer's state lives on a device; step it there");
    };
    let sizes: Vec<usize> = cpu.params().iter().map(|p| p.len()).collect();
    let layout = ArenaLayout::new(&sizes);
    assert_eq!(layout.total as usize, layout_total, "linattn: arena size");
    let parts: Vec<&[f64]> = layout
        .offsets
        .iter()
        .zip(&sizes)
        .map(|(&o, &n)| &grads[o as usize..o as usize + n])
        .collect();
    cpu.step(&parts).unwrap_or_else(|e| panic!("linattn: {e}"));
    let mut out = vec![0.0f64; layout_total];
    for ((p, &o), &n) in cpu.params().iter().zip(&layout.offsets).zip(&sizes) {
        out[o as usize..o as usize + n].copy_from_slice(&p[..n]);
    }
    out
}

/// Warmup-Stable-Merge (WSM, `../shared/spec/optim.md`): the checkpoints kept along a
/// constant-lr run, merged into one model with the coefficients of a decay `shape`
/// ([`linattn::optim::wsm_coefficients`]; oldest checkpoint first). The merge is a weighted sum
/// of each parameter across the checkpoints, computed in f32 with burn ops on the checkpoints'
/// device (no host copy); the result takes the structure of the first checkpoint.
pub fn merge_checkpoints<M: Module>(checkpoints: &[M], shape: linattn::optim::Shape) -> Result<M> {
    if checkpoints.is_empty() {
        return Err(Error::InvalidArgument("merging needs a checkpoint".into()));
    }
    let coefficients = linattn::optim::wsm_coefficients(shape, checkpoints.len() - 1);
    merge_with(checkpoints, &coefficients)
}

/// The weighted sum `sum_j coefficients[j] * checkpoints[j]`, parameter by parameter.
pub fn merge_with<M: Module>(checkpoints: &[M], coefficients: &[f64]) -> Result<M> {
    if checkpoints.is_empty() || checkpoints.len() != coefficients.len() {
        return Err(Error::InvalidArgument(format!(
            "{} coefficients for {} checkpoints",
            coefficients.len(),
            checkpoints.len()
        )));
    }
    if let Some(c) = coefficients.iter().find(|c| !c.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "merge coefficients must be finite, got {c}"
        )));
    }
    let structure = |m: &M| {
        let mut s = IdsAndDims(Vec::new());
        m.visit(&mut s);
        s.0.into_iter().map(|s| s.dims).collect::<Vec<_>>()
    };
    let first = structure(&checkpoints[0]);
    for (j, m) in checkpoints.iter().enumerate().skip(1) {
        if structure(m) != first {
            return Err(Error::InvalidArgument(format!(
                "checkpoint {j} does not have the parameters of checkpoint 0"
            )));
        }
    }
    // Every checkpoint's parameters, flattened, in visit order.
    let flat: Vec<Vec<Tensor<1>>> = checkpoints
        .iter()
        .map(|m| {
            let mut f = Flatten(Vec::new());
            m.visit(&mut f);
            f.0
        })
        .collect();
    let merged: Vec<Tensor<1>> = (0..first.len())
        .map(|i| {
            let mut acc = flat[0][i].clone() * coefficients[0];
            for (j, c) in coefficients.iter().enumerate().skip(1) {
                acc = acc + flat[j][i].clone() * *c;
            }
            acc
        })
        .collect();
    let mut set = SetFlat {
        values: merged,
        index: 0,
    };
    Ok(checkpoints[0].clone().map(&mut set))
}

struct Flatten(Vec<Tensor<1>>);

impl ModuleVisitor for Flatten {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(
            param
                .val()
                .inner()
                .flatten::<1>(0, D - 1)
                .cast(BurnDType::F32),
        );
    }
}

struct SetFlat {
    values: Vec<Tensor<1>>,
    index: usize,
}

impl ModuleMapper for SetFlat {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let value = self.values[self.index].clone();
        self.index += 1;
        param.map(|t| {
            let dims: [usize; D] = t.dims();
            like_param(&t, value.reshape(dims))
        })
    }
}

/// Sets each parameter from host values (in visit order).
struct SetHost {
    values: Vec<Vec<f32>>,
    index: usize,
}

impl ModuleMapper for SetHost {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let values = self.values[self.index].clone();
        self.index += 1;
        param.map(|t| {
            let dims: [usize; D] = t.dims();
            let host: Tensor<D> = Tensor::from_data(
                burn::tensor::TensorData::new(values, dims),
                &t.device().inner(),
            );
            like_param(&t, host)
        })
    }
}

/// `new` (a value without autodiff) as the replacement of parameter value `old`: `old`'s
/// dtype, autodiff association and gradient requirement.
pub(crate) fn like_param<const D: usize>(old: &Tensor<D>, new: Tensor<D>) -> Tensor<D> {
    let mut new = new.cast(old.dtype());
    if old.is_autodiff() {
        new = Tensor::from_inner(new);
    }
    if old.is_require_grad() {
        new = new.require_grad();
    }
    new
}
