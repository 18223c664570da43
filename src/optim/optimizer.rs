//! One stateful fused optimizer with the same API on every backend: [`Optimizer::new`] over a
//! backend and a parameter group, [`Optimizer::step`] with one gradient per tensor (host tensors,
//! or device tensors of the optimizer's backend, copied on the device), the weights read back or
//! left on the device, and the state saved to and loaded from safetensors
//! ([`super::OptimizerState`]: by tensor, so a file moves between devices and backends).
//!
//! Behind it are the backends' own optimizers: [`super::CpuOptimizer`] (the f64 reference step),
//! [`super::cube::FusedOptimizer`] and [`super::cuda::CudaOptimizer`] (the state in device
//! buffers, a step is three launches and never waits). [`Optimizer::as_cube`] /
//! [`Optimizer::as_cuda`] reach them for what is backend-specific (the gradient arenas that a
//! framework fills with its own kernels).

use std::path::Path;

use super::state::{read_file, write_file};
use super::{CpuOptimizer, OptimizerConfig, OptimizerState, Params, Schedule, StepRecord};
use crate::backend::Backend;
use crate::error::{Error, Result};
#[cfg(any(feature = "cube", feature = "cuda"))]
use crate::tensor::DType;
use crate::tensor::{Tensor, TensorData};

/// A gradient as [`Optimizer::step`] reads it.
#[derive(Clone, Copy)]
pub enum GradientRef<'a> {
    /// A host tensor of any float dtype (uploaded on a GPU backend).
    Host(&'a Tensor),
    /// A cube device tensor (f32, or f16 / bf16 widened on the device), of a cube optimizer.
    #[cfg(feature = "cube")]
    Cube(&'a crate::cube::DeviceTensor),
    /// A CUDA device tensor (f32), of a cuda optimizer.
    #[cfg(feature = "cuda")]
    Cuda(&'a crate::linear::cuda::device::CudaTensor<'a>),
}

/// What [`Optimizer::step`] takes a gradient from: [`Tensor`], `cube::DeviceTensor` and
/// `CudaTensor`.
pub trait Gradient {
    fn gradient(&self) -> GradientRef<'_>;
}

impl Gradient for Tensor {
    fn gradient(&self) -> GradientRef<'_> {
        GradientRef::Host(self)
    }
}

#[cfg(feature = "cube")]
impl Gradient for crate::cube::DeviceTensor {
    fn gradient(&self) -> GradientRef<'_> {
        GradientRef::Cube(self)
    }
}

#[cfg(feature = "cuda")]
impl Gradient for crate::linear::cuda::device::CudaTensor<'_> {
    fn gradient(&self) -> GradientRef<'_> {
        GradientRef::Cuda(self)
    }
}

impl GradientRef<'_> {
    fn place(&self) -> &'static str {
        match self {
            GradientRef::Host(_) => "a host tensor",
            #[cfg(feature = "cube")]
            GradientRef::Cube(_) => "a cube device tensor",
            #[cfg(feature = "cuda")]
            GradientRef::Cuda(_) => "a CUDA device tensor",
        }
    }
}

/// The counters of an [`Optimizer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptimizerStatus {
    /// Calls of [`Optimizer::step`] so far (the next call's schedule index).
    pub calls: u64,
    /// Steps applied (AdamW's `t`).
    pub steps: u64,
    /// Calls skipped for non-finite gradients.
    pub skipped: u64,
    /// Whether the latest call was skipped.
    pub last_skipped: bool,
}

enum Inner {
    Cpu(CpuOptimizer),
    #[cfg(feature = "cube")]
    Cube(Box<super::cube::FusedOptimizer>),
    #[cfg(feature = "cuda")]
    Cuda(Box<super::cuda::CudaOptimizer<crate::cuda::exec::CudaExec>>),
}

/// The fused optimizer (AdamW / Lion, decoupled or cautious weight decay, clipping, the
/// non-finite skip, EMA, 16-bit copies on a GPU) with one API on every backend.
///
/// The CPU backend keeps f64 weights and records every call; a GPU backend keeps f32 weights on
/// the device and an lr table and history of `capacity` calls (calls past it use the table's
/// last learning rate and are not recorded), and never waits for the device in a step.
pub struct Optimizer {
    inner: Inner,
    config: OptimizerConfig,
    shapes: Vec<Vec<usize>>,
}

impl Optimizer {
    /// The lr table and history length when the schedule has no total (constant,
    /// inverse-sqrt): 65536 calls.
    pub const DEFAULT_CAPACITY: usize = 1 << 16;

    /// An optimizer over `params` on `backend`: zero moments, the EMA at the weights. The lr
    /// table covers the schedule's total, or [`Optimizer::DEFAULT_CAPACITY`] calls.
    pub fn new(
        backend: &Backend,
        params: &Params,
        config: &OptimizerConfig,
        schedule: &Schedule,
    ) -> Result<Self> {
        let capacity = schedule
            .total_steps()
            .unwrap_or(Self::DEFAULT_CAPACITY)
            .max(1);
        Self::with_capacity(backend, params, config, schedule, capacity)
    }

    /// [`Optimizer::new`] with the lr table and history of `capacity` calls (GPU backends).
    pub fn with_capacity(
        backend: &Backend,
        params: &Params,
        config: &OptimizerConfig,
        schedule: &Schedule,
        capacity: usize,
    ) -> Result<Self> {
        super::validate_run(config, schedule, params, &[])?;
        let shapes: Vec<Vec<usize>> = params.tensors.iter().map(|t| t.shape().to_vec()).collect();
        let decay: Vec<bool> = (0..params.tensors.len())
            .map(|i| params.decays(i))
            .collect();
        let inner = match backend {
            Backend::Cpu => {
                // The CPU computes every call's lr and records every call: no table.
                let _ = capacity;
                let values: Vec<Vec<f64>> = params.tensors.iter().map(|t| t.to_f64_vec()).collect();
                let refs: Vec<&[f64]> = values.iter().map(Vec::as_slice).collect();
                Inner::Cpu(CpuOptimizer::new(config, schedule, &refs, &decay)?)
            }
            #[cfg(feature = "cube")]
            Backend::Cube(ctx) => {
                let values: Vec<Vec<f32>> = params.tensors.iter().map(|t| t.to_f32_vec()).collect();
                let refs: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
                Inner::Cube(Box::new(super::cube::FusedOptimizer::new(
                    ctx, config, schedule, capacity, &refs, &decay,
                )?))
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(ctx) => {
                let values: Vec<Vec<f32>> = params.tensors.iter().map(|t| t.to_f32_vec()).collect();
                let refs: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
                Inner::Cuda(Box::new(super::cuda::CudaOptimizer::new(
                    crate::cuda::exec::CudaExec::new(ctx),
                    config,
                    schedule,
                    capacity,
                    &refs,
                    &decay,
                )?))
            }
        };
        Ok(Optimizer {
            inner,
            config: config.clone(),
            shapes,
        })
    }

    /// The backend's name (`cpu`, `cube`, `cuda`).
    pub fn backend_name(&self) -> &'static str {
        match self.inner {
            Inner::Cpu(_) => "cpu",
            #[cfg(feature = "cube")]
            Inner::Cube(_) => "cube",
            #[cfg(feature = "cuda")]
            Inner::Cuda(_) => "cuda",
        }
    }

    /// The parameters' shapes.
    pub fn shapes(&self) -> &[Vec<usize>] {
        &self.shapes
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Checks one gradient per tensor, each with its parameter's shape.
    fn check_grads(&self, grads: &[GradientRef]) -> Result<()> {
        if grads.len() != self.shapes.len() {
            return Err(Error::InvalidArgument(format!(
                "{} gradients for {} parameter tensors",
                grads.len(),
                self.shapes.len()
            )));
        }
        for (i, (g, shape)) in grads.iter().zip(&self.shapes).enumerate() {
            let name = format!("grads[{i}]");
            let expected = || format!("the shape of params[{i}] = {shape:?}");
            match g {
                GradientRef::Host(t) if t.shape() != shape.as_slice() => {
                    return Err(Error::shape(&name, expected(), t.shape()));
                }
                #[cfg(feature = "cube")]
                GradientRef::Cube(t) if t.shape() != shape.as_slice() => {
                    return Err(Error::shape(&name, expected(), t.shape()));
                }
                #[cfg(feature = "cuda")]
                GradientRef::Cuda(t) => {
                    if t.shape() != shape.as_slice() {
                        return Err(Error::shape(&name, expected(), t.shape()));
                    }
                    if t.dtype() != DType::F32 {
                        return Err(Error::UnsupportedDtype {
                            tensor: name,
                            dtype: t.dtype(),
                            backend: "cuda".into(),
                            supported: "f32 (widen 16-bit gradients on the device first)".into(),
                        });
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// One optimizer call with `grads[i]` the gradient of tensor `i`: host tensors (any float
    /// dtype), or device tensors of this optimizer's backend (copied into its gradient arena on
    /// the device, nothing through the host). On a GPU backend the call is enqueued and not
    /// waited for; whether it was skipped is in [`Optimizer::status`].
    pub fn step<G: Gradient + ?Sized>(&mut self, grads: &[&G]) -> Result<()> {
        let grads: Vec<GradientRef> = grads.iter().map(|g| g.gradient()).collect();
        self.check_grads(&grads)?;
        let wrong_place = |i: usize, g: &GradientRef, backend: &str| {
            Error::InvalidArgument(format!(
                "grads[{i}] is {}, the optimizer runs on the {backend} backend",
                g.place()
            ))
        };
        let backend = self.backend_name();
        match &mut self.inner {
            Inner::Cpu(opt) => {
                let values = grads
                    .iter()
                    .enumerate()
                    .map(|(i, g)| match g {
                        GradientRef::Host(t) => Ok(t.to_f64_vec()),
                        #[allow(unreachable_patterns)]
                        other => Err(wrong_place(i, other, backend)),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<&[f64]> = values.iter().map(Vec::as_slice).collect();
                opt.step(&refs).map(|_| ())
            }
            #[cfg(feature = "cube")]
            Inner::Cube(opt) => {
                if let Some(values) = all_host_f32(&grads) {
                    let refs: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
                    opt.set_grads(&refs)?;
                } else {
                    for (i, g) in grads.iter().enumerate() {
                        match g {
                            GradientRef::Cube(t) => opt.set_grad_device(i, t)?,
                            GradientRef::Host(t) => {
                                let f32_host = t.to_dtype(DType::F32);
                                let device =
                                    ctx_of(opt).upload(&format!("grads[{i}]"), &f32_host)?;
                                opt.set_grad_device(i, &device)?;
                            }
                            #[allow(unreachable_patterns)]
                            other => return Err(wrong_place(i, other, backend)),
                        }
                    }
                }
                opt.step()
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda(opt) => {
                if let Some(values) = all_host_f32(&grads) {
                    let refs: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
                    opt.set_grads(&refs)?;
                } else {
                    for (i, g) in grads.iter().enumerate() {
                        match g {
                            GradientRef::Cuda(t) => opt.set_grad_device(
                                i,
                                t.f32_slice(&format!("grads[{i}]"), "gradients")?,
                            )?,
                            GradientRef::Host(t) => {
                                let values = t.to_f32_vec();
                                let stream = opt.exec().stream().clone();
                                crate::cuda::count_host_transfer(values.len() * 4);
                                let device =
                                    stream.clone_htod(&values).map_err(|e| Error::Runtime {
                                        backend: "cuda".into(),
                                        message: format!("uploading grads[{i}]: {e}"),
                                    })?;
                                opt.set_grad_device(i, (&device).into())?;
                            }
                            #[allow(unreachable_patterns)]
                            other => return Err(wrong_place(i, other, backend)),
                        }
                    }
                }
                opt.step()
            }
        }
    }

    /// The counters (synchronises on a GPU backend).
    pub fn status(&self) -> Result<OptimizerStatus> {
        Ok(match &self.inner {
            Inner::Cpu(opt) => OptimizerStatus {
                calls: opt.calls() as u64,
                steps: opt.steps(),
                skipped: opt.history().iter().filter(|r| r.skipped).count() as u64,
                last_skipped: opt.history().last().is_some_and(|r| r.skipped),
            },
            #[cfg(feature = "cube")]
            Inner::Cube(opt) => {
                let s = opt.status()?;
                OptimizerStatus {
                    calls: s.calls,
                    steps: s.steps,
                    skipped: s.skipped,
                    last_skipped: s.last_skipped,
                }
            }
            #[cfg(feature = "cuda")]
            Inner::Cuda(opt) => {
                let s = opt.status()?;
                OptimizerStatus {
                    calls: s.calls,
                    steps: s.steps,
                    skipped: s.skipped,
                    last_skipped: s.last_skipped,
                }
            }
        })
    }

    /// One record per call (up to the capacity on a GPU backend; synchronises).
    pub fn history(&self) -> Result<Vec<StepRecord>> {
        match &self.inner {
            Inner::Cpu(opt) => Ok(opt.history().to_vec()),
            #[cfg(feature = "cube")]
            Inner::Cube(opt) => opt.history(),
            #[cfg(feature = "cuda")]
            Inner::Cuda(opt) => opt.history(),
        }
    }

    /// The whole state by tensor (synchronises on a GPU backend).
    pub fn state(&self) -> Result<OptimizerState> {
        match &self.inner {
            Inner::Cpu(opt) => Ok(opt.state()),
            #[cfg(feature = "cube")]
            Inner::Cube(opt) => opt.state(),
            #[cfg(feature = "cuda")]
            Inner::Cuda(opt) => opt.state(),
        }
    }

    /// Replaces the state (checked against this optimizer's sizes, method and EMA; converted
    /// to the backend's precision). The next call continues from `state.calls`.
    pub fn set_state(&mut self, state: &OptimizerState) -> Result<()> {
        match &mut self.inner {
            Inner::Cpu(opt) => opt.set_state(state),
            #[cfg(feature = "cube")]
            Inner::Cube(opt) => opt.set_state(state),
            #[cfg(feature = "cuda")]
            Inner::Cuda(opt) => opt.set_state(state),
        }
    }

    /// The weights as host tensors in the parameters' shapes: f64 on the CPU, f32 on a GPU
    /// (synchronises; reads the weights alone).
    pub fn params(&self) -> Result<Vec<Tensor>> {
        match &self.inner {
            Inner::Cpu(opt) => self.shaped(opt.params().into_iter().map(f64_data).collect()),
            #[cfg(feature = "cube")]
            Inner::Cube(opt) => self.shaped(
                opt.read_params()?
                    .into_iter()
                    .map(TensorData::F32)
                    .collect(),
            ),
            #[cfg(feature = "cuda")]
            Inner::Cuda(opt) => self.shaped(
                opt.read_params()?
                    .into_iter()
                    .map(TensorData::F32)
                    .collect(),
            ),
        }
    }

    /// The EMA of the weights, when on (as [`Optimizer::params`]).
    pub fn ema(&self) -> Result<Option<Vec<Tensor>>> {
        let data: Option<Vec<TensorData>> = match &self.inner {
            Inner::Cpu(opt) => opt.ema().map(|e| e.into_iter().map(f64_data).collect()),
            #[cfg(feature = "cube")]
            Inner::Cube(opt) => opt
                .read_ema()?
                .map(|e| e.into_iter().map(TensorData::F32).collect()),
            #[cfg(feature = "cuda")]
            Inner::Cuda(opt) => opt
                .read_ema()?
                .map(|e| e.into_iter().map(TensorData::F32).collect()),
        };
        data.map(|d| self.shaped(d)).transpose()
    }

    /// One tensor per parameter, in its shape.
    fn shaped(&self, data: Vec<TensorData>) -> Result<Vec<Tensor>> {
        data.into_iter()
            .zip(&self.shapes)
            .map(|(d, shape)| Tensor::new(shape.clone(), d))
            .collect()
    }

    /// The state as safetensors bytes (see [`OptimizerState`] for the layout).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        self.state()?.to_safetensors(
            &self.shapes,
            &self.config.method,
            self.config.model_copy.map(|(format, _)| format),
            self.backend_name(),
            matches!(self.inner, Inner::Cpu(_)),
        )
    }

    /// Restores a state from [`Optimizer::to_safetensors`]'s bytes, saved on any backend.
    pub fn load_safetensors(&mut self, bytes: &[u8]) -> Result<()> {
        let state = OptimizerState::from_safetensors(bytes, &self.shapes, &self.config)?;
        self.set_state(&state)
    }

    /// Saves the state to a safetensors file (written to a temporary file and renamed, so a
    /// crash leaves the old file whole).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        write_file(path.as_ref(), &self.to_safetensors()?)
    }

    /// Loads a state [`Optimizer::save`] wrote (on any backend) into this optimizer, which must
    /// have the same parameter shapes, method and EMA setting.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = read_file(path.as_ref())?;
        self.load_safetensors(&bytes)
    }

    /// Waits for every enqueued step (a no-op on the CPU).
    pub fn synchronize(&self) -> Result<()> {
        match &self.inner {
            Inner::Cpu(_) => Ok(()),
            #[cfg(feature = "cube")]
            Inner::Cube(opt) => opt.synchronize(),
            #[cfg(feature = "cuda")]
            Inner::Cuda(opt) => opt.synchronize(),
        }
    }

    /// The cube optimizer behind this one, on the cube backend (its gradient buffers, the
    /// weights as device tensors with `param_tensor`).
    #[cfg(feature = "cube")]
    pub fn as_cube(&self) -> Option<&super::cube::FusedOptimizer> {
        match &self.inner {
            Inner::Cube(opt) => Some(opt),
            _ => None,
        }
    }

    #[cfg(feature = "cube")]
    pub fn as_cube_mut(&mut self) -> Option<&mut super::cube::FusedOptimizer> {
        match &mut self.inner {
            Inner::Cube(opt) => Some(opt),
            _ => None,
        }
    }

    /// The CUDA optimizer behind this one, on the cuda backend (its gradient arena, the weights
    /// as device slices with `param_slice`).
    #[cfg(feature = "cuda")]
    pub fn as_cuda(&self) -> Option<&super::cuda::CudaOptimizer<crate::cuda::exec::CudaExec>> {
        match &self.inner {
            Inner::Cuda(opt) => Some(opt),
            _ => None,
        }
    }

    #[cfg(feature = "cuda")]
    pub fn as_cuda_mut(
        &mut self,
    ) -> Option<&mut super::cuda::CudaOptimizer<crate::cuda::exec::CudaExec>> {
        match &mut self.inner {
            Inner::Cuda(opt) => Some(opt),
            _ => None,
        }
    }
}

/// The gradients as f32 host vectors, when every one is a host tensor (one packed upload).
#[cfg(any(feature = "cube", feature = "cuda"))]
fn all_host_f32(grads: &[GradientRef]) -> Option<Vec<Vec<f32>>> {
    grads
        .iter()
        .map(|g| match g {
            GradientRef::Host(t) => Some(t.to_f32_vec()),
            #[allow(unreachable_patterns)]
            _ => None,
        })
        .collect()
}

fn f64_data(values: &[f64]) -> TensorData {
    TensorData::F64(values.to_vec())
}

#[cfg(feature = "cube")]
fn ctx_of(opt: &super::cube::FusedOptimizer) -> &crate::cube::CubeContext {
    opt.context()
}
