//! linattn's fused optimizer over candle variables: one multi-tensor AdamW / Lion step per call
//! (decoupled / fully decoupled / cautious weight decay, global-norm clipping, the non-finite
//! skip, EMA) with the learning rate of a schedule ([`Schedule`]: warmup + cosine, linear, WSD,
//! inverse-sqrt, REX, ...), over a list of [`Var`]s (`VarMap::all_vars()` gives a model's).
//!
//! **Where the state lives.** On a CUDA device, linattn's CUDA optimizer (`kernels/optim.cu`)
//! keeps the f32 master weights, the moments and the counters in its arenas on the device, on
//! candle's stream: created from the variables' values (one upload), then each step copies the
//! gradients into the gradient arena (device to device), runs the fused step (three launches, no
//! host sync) and copies the new weights back into the variables (device to device, cast to each
//! variable's dtype by candle). On the CPU, linattn's f64 reference step with state
//! ([`linattn::optim::CpuOptimizer`]).

use candle_core::backprop::GradStore;
use candle_core::{DType as CDType, Device, Tensor as CTensor, Var};
use linattn::optim::{CpuOptimizer, OptimizerConfig, Schedule, StepRecord};
use linattn::{Error, Result};

use crate::convert::from_candle;

/// The fused optimizer over a fixed list of variables.
pub struct FusedOptimizer {
    vars: Vec<Var>,
    inner: Inner,
}

enum Inner {
    Cpu(CpuOptimizer),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::optim::CudaState>),
}

impl FusedOptimizer {
    /// Over `vars` (one device; f32, f16 or bf16), with weight decay on every variable of rank 2
    /// or more (matrices) and none on vectors (biases, norms), as is usual; `capacity` is the
    /// number of calls the schedule's learning-rate table and the history cover (usually the
    /// schedule's total).
    pub fn new(
        vars: Vec<Var>,
        config: &OptimizerConfig,
        schedule: &Schedule,
        capacity: usize,
    ) -> Result<Self> {
        let decay: Vec<bool> = vars.iter().map(|v| v.rank() >= 2).collect();
        Self::with_decay(vars, &decay, config, schedule, capacity)
    }

    /// As [`FusedOptimizer::new`], with `decay[i]` saying whether weight decay applies to
    /// `vars[i]`.
    pub fn with_decay(
        vars: Vec<Var>,
        decay: &[bool],
        config: &OptimizerConfig,
        schedule: &Schedule,
        capacity: usize,
    ) -> Result<Self> {
        if decay.len() != vars.len() {
            return Err(Error::InvalidArgument(format!(
                "{} decay flags for {} variables",
                decay.len(),
                vars.len()
            )));
        }
        let device = match vars.first() {
            Some(v) => v.device().clone(),
            None => Device::Cpu,
        };
        for (i, v) in vars.iter().enumerate() {
            crate::convert::dtype_of(&format!("vars[{i}]"), v.dtype())?;
            if !v.device().same_device(&device) {
                return Err(Error::InvalidArgument(format!(
                    "vars[{i}] is on {:?}, vars[0] on {:?}: the optimizer's variables share one device",
                    v.device().location(),
                    device.location()
                )));
            }
        }
        let inner = match &device {
            Device::Cpu => {
                let params = vars
                    .iter()
                    .map(|v| host_f64(v.as_tensor()))
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<&[f64]> = params.iter().map(Vec::as_slice).collect();
                let _ = capacity;
                Inner::Cpu(CpuOptimizer::new(config, schedule, &refs, decay)?)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => Inner::Cuda(Box::new(crate::cuda::optim::CudaState::new(
                dev, &vars, decay, config, schedule, capacity,
            )?)),
            other => {
                return Err(Error::DeviceUnavailable {
                    backend: format!("candle {:?}", other.location()),
                    reason: "linattn's candle optimizer runs on the CPU and (with the `cuda` feature) on CUDA devices".into(),
                });
            }
        };
        Ok(FusedOptimizer { vars, inner })
    }

    /// The variables, in the optimizer's order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// One fused step with the gradients of `grads` (a variable without one gets a zero
    /// gradient: its moments decay, its weight decays); the variables hold the new weights
    /// afterwards. The step's record (learning rate, gradient norm, whether a non-finite
    /// gradient skipped it) is in [`FusedOptimizer::history`]; on CUDA reading it is the only
    /// host sync, so the step itself stays asynchronous.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        match &mut self.inner {
            Inner::Cpu(opt) => {
                let g = self
                    .vars
                    .iter()
                    .map(|v| match grads.get(v.as_tensor()) {
                        Some(g) => host_f64(g),
                        None => Ok(vec![0.0; v.elem_count()]),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<&[f64]> = g.iter().map(Vec::as_slice).collect();
                opt.step(&refs)?;
                for (v, p) in self.vars.iter().zip(opt.params()) {
                    let t = CTensor::from_slice(p, v.shape(), &Device::Cpu)
                        .and_then(|t| t.to_dtype(v.dtype()))
                        .map_err(from_candle)?;
                    v.set(&t).map_err(from_candle)?;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda(state) => state.step(&self.vars, grads),
        }
    }

    /// One record per call so far (learning rate, gradient norm, skipped).
    pub fn history(&self) -> Result<Vec<StepRecord>> {
        match &self.inner {
            Inner::Cpu(opt) => Ok(opt.history().to_vec()),
            #[cfg(feature = "cuda")]
            Inner::Cuda(state) => state.history(),
        }
    }
}

/// A tensor's values as f64 on the host.
fn host_f64(t: &CTensor) -> Result<Vec<f64>> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(CDType::F64))
        .and_then(|t| t.to_vec1())
        .map_err(from_candle)
}
