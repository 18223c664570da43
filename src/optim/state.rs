//! The optimizer's state tensor by tensor, the same on every backend, and its safetensors file.
//!
//! The GPU optimizers keep their state in padded, bucketed arenas whose cut depends on the
//! device's largest buffer; this form names the state by parameter instead, so a file saved on
//! one device loads on another, and on another backend (the values are f32 on a GPU and f64 on
//! the CPU; a load converts). File layout (`linattn.optimizer/1`):
//! - `param.{i}`, `exp_avg.{i}`, `exp_avg_sq.{i}` (AdamW), `ema.{i}` (with an EMA), each in the
//!   parameter's shape, f32 (GPU) or f64 (CPU);
//! - `model_copy.{i}` (GPU with a 16-bit copy), bf16 or f16;
//! - `counters`: u64 `[calls, steps, skipped, last_skipped]`;
//! - `history`: f64 `[calls, 3]`, one `(lr, grad norm or 0, flags)` per recorded call (flags: 1 =
//!   skipped, 2 = the norm was computed);
//! - metadata: `format`, `method`, `tensors`, `backend`.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

#[cfg(any(feature = "cube", feature = "cuda"))]
use super::ArenaLayout;
use super::{CopyFormat, Method, OptimizerConfig, StepRecord};
use crate::error::{Error, Result};

const FORMAT: &str = "linattn.optimizer/1";

/// The whole state of a fused optimizer, by parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    /// The master weights (f32 values on a GPU backend, widened exactly).
    pub params: Vec<Vec<f64>>,
    pub exp_avg: Vec<Vec<f64>>,
    /// AdamW only.
    pub exp_avg_sq: Option<Vec<Vec<f64>>>,
    /// With an EMA.
    pub ema: Option<Vec<Vec<f64>>>,
    /// The 16-bit copy's bits (GPU backends with a copy configured; the CPU keeps none).
    pub model_copy: Option<Vec<Vec<u16>>>,
    /// Calls so far (the next call's schedule index).
    pub calls: u64,
    /// Steps applied (AdamW's `t`).
    pub steps: u64,
    /// Calls skipped for non-finite gradients.
    pub skipped: u64,
    pub last_skipped: bool,
    /// One record per call, up to the optimizer's history capacity.
    pub history: Vec<StepRecord>,
}

fn bad(what: String) -> Error {
    Error::InvalidArgument(format!("optimizer state: {what}"))
}

impl OptimizerState {
    /// Checks that this state fits an optimizer over tensors of `sizes` elements with `config`:
    /// every tensor there with its size, the second moment and the EMA present exactly when the
    /// configuration has them. A missing 16-bit copy is allowed (the loader rebuilds it).
    pub fn check_fits(&self, config: &OptimizerConfig, sizes: &[usize]) -> Result<()> {
        let group = |name: &str, values: &[Vec<f64>]| -> Result<()> {
            if values.len() != sizes.len() {
                return Err(bad(format!(
                    "{} `{name}` tensors for {} parameters",
                    values.len(),
                    sizes.len()
                )));
            }
            for (i, (v, &n)) in values.iter().zip(sizes).enumerate() {
                if v.len() != n {
                    return Err(bad(format!(
                        "`{name}.{i}` has {} values, parameter {i} has {n}",
                        v.len()
                    )));
                }
            }
            Ok(())
        };
        group("param", &self.params)?;
        group("exp_avg", &self.exp_avg)?;
        match (&self.exp_avg_sq, config.method.has_second_moment()) {
            (Some(v), true) => group("exp_avg_sq", v)?,
            (None, false) => {}
            (None, true) => return Err(bad("AdamW needs `exp_avg_sq`, the state has none".into())),
            (Some(_), false) => {
                return Err(bad(
                    "the state has `exp_avg_sq` (AdamW), the optimizer is Lion".into(),
                ));
            }
        }
        match (&self.ema, config.ema_beta.is_some()) {
            (Some(v), true) => group("ema", v)?,
            (None, false) => {}
            (None, true) => {
                return Err(bad("the optimizer keeps an EMA, the state has none".into()));
            }
            (Some(_), false) => {
                return Err(bad("the state has an EMA, the optimizer keeps none".into()));
            }
        }
        if let Some(copy) = &self.model_copy {
            if copy.len() != sizes.len() {
                return Err(bad(format!(
                    "{} `model_copy` tensors for {} parameters",
                    copy.len(),
                    sizes.len()
                )));
            }
            for (i, (c, &n)) in copy.iter().zip(sizes).enumerate() {
                if c.len() != n {
                    return Err(bad(format!(
                        "`model_copy.{i}` has {} values, parameter {i} has {n}",
                        c.len()
                    )));
                }
            }
        }
        if self.steps + self.skipped != self.calls {
            return Err(bad(format!(
                "{} steps and {} skipped calls do not add up to {} calls",
                self.steps, self.skipped, self.calls
            )));
        }
        if self.history.len() as u64 > self.calls {
            return Err(bad(format!(
                "{} history records for {} calls",
                self.history.len(),
                self.calls
            )));
        }
        Ok(())
    }

    /// The safetensors bytes of this state. `shapes[i]` is parameter `i`'s shape; `f64` stores
    /// the float tensors as f64 (the CPU's precision), else f32 (a GPU's: exact for its values).
    pub fn to_safetensors(
        &self,
        shapes: &[Vec<usize>],
        method: &Method,
        copy_format: Option<CopyFormat>,
        backend: &str,
        f64_values: bool,
    ) -> Result<Vec<u8>> {
        if shapes.len() != self.params.len() {
            return Err(bad(format!(
                "{} shapes for {} tensors",
                shapes.len(),
                self.params.len()
            )));
        }
        let floats = |v: &[f64]| -> Vec<u8> {
            if f64_values {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            } else {
                v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect()
            }
        };
        let float_dtype = if f64_values { Dtype::F64 } else { Dtype::F32 };
        let mut entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut group = |name: &str, values: &[Vec<f64>]| {
            for (i, v) in values.iter().enumerate() {
                entries.push((
                    format!("{name}.{i}"),
                    float_dtype,
                    shapes[i].clone(),
                    floats(v),
                ));
            }
        };
        group("param", &self.params);
        group("exp_avg", &self.exp_avg);
        if let Some(v) = &self.exp_avg_sq {
            group("exp_avg_sq", v);
        }
        if let Some(v) = &self.ema {
            group("ema", v);
        }
        if let (Some(copy), Some(format)) = (&self.model_copy, copy_format) {
            let dtype = match format {
                CopyFormat::Bf16 => Dtype::BF16,
                CopyFormat::F16 => Dtype::F16,
            };
            for (i, bits) in copy.iter().enumerate() {
                entries.push((
                    format!("model_copy.{i}"),
                    dtype,
                    shapes[i].clone(),
                    bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
                ));
            }
        }
        let counters = [
            self.calls,
            self.steps,
            self.skipped,
            u64::from(self.last_skipped),
        ];
        entries.push((
            "counters".into(),
            Dtype::U64,
            vec![4],
            counters.iter().flat_map(|c| c.to_le_bytes()).collect(),
        ));
        let history: Vec<u8> = self
            .history
            .iter()
            .flat_map(|r| {
                [
                    r.lr,
                    r.grad_norm.unwrap_or(0.0),
                    f64::from(history_flags(r)),
                ]
            })
            .flat_map(|x| x.to_le_bytes())
            .collect();
        entries.push((
            "history".into(),
            Dtype::F64,
            vec![self.history.len(), 3],
            history,
        ));
        let views = entries
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                TensorView::new(*dtype, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| Error::Safetensors(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("method".to_string(), method_name(method).to_string()),
            ("tensors".to_string(), self.params.len().to_string()),
            ("backend".to_string(), backend.to_string()),
        ]);
        safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Safetensors(e.to_string()))
    }

    /// Reads a state [`OptimizerState::to_safetensors`] wrote, checking every tensor's shape
    /// against `shapes` and the method and EMA against `config` (f32 or f64 values either way).
    pub fn from_safetensors(
        bytes: &[u8],
        shapes: &[Vec<usize>],
        config: &OptimizerConfig,
    ) -> Result<Self> {
        let st = |e: safetensors::SafeTensorError| Error::Safetensors(e.to_string());
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(st)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |key: &str| meta.get(key).map(String::as_str).unwrap_or("");
        if get("format") != FORMAT {
            return Err(bad(format!(
                "not a linattn optimizer state (format `{}`, expected `{FORMAT}`)",
                get("format")
            )));
        }
        if get("method") != method_name(&config.method) {
            return Err(bad(format!(
                "saved by {}, this optimizer is {}",
                get("method"),
                method_name(&config.method)
            )));
        }
        if get("tensors") != shapes.len().to_string() {
            return Err(bad(format!(
                "saved for {} parameter tensors, this optimizer has {}",
                get("tensors"),
                shapes.len()
            )));
        }
        let file = SafeTensors::deserialize(bytes).map_err(st)?;
        let tensor = |name: &str| file.tensor(name).ok();
        let floats = |name: &str, shape: &[usize]| -> Result<Vec<f64>> {
            let t = tensor(name).ok_or_else(|| bad(format!("no `{name}`")))?;
            if t.shape() != shape {
                return Err(bad(format!(
                    "`{name}` has shape {:?}, the parameter {shape:?}",
                    t.shape()
                )));
            }
            match t.dtype() {
                Dtype::F32 => Ok(t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect()),
                Dtype::F64 => Ok(t
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect()),
                other => Err(bad(format!("`{name}` is {other:?}, expected f32 or f64"))),
            }
        };
        let group = |name: &str| -> Result<Vec<Vec<f64>>> {
            shapes
                .iter()
                .enumerate()
                .map(|(i, shape)| floats(&format!("{name}.{i}"), shape))
                .collect()
        };
        // Present when its first tensor is (an empty group has what the configuration has).
        let optional = |name: &str, configured: bool| -> Result<Option<Vec<Vec<f64>>>> {
            let present = if shapes.is_empty() {
                configured
            } else {
                tensor(&format!("{name}.0")).is_some()
            };
            present.then(|| group(name)).transpose()
        };
        let model_copy = match config.model_copy {
            Some((format, _)) if tensor("model_copy.0").is_some() => {
                let want = match format {
                    CopyFormat::Bf16 => Dtype::BF16,
                    CopyFormat::F16 => Dtype::F16,
                };
                let copies = shapes
                    .iter()
                    .enumerate()
                    .map(|(i, shape)| {
                        let name = format!("model_copy.{i}");
                        let t = tensor(&name).ok_or_else(|| bad(format!("no `{name}`")))?;
                        if t.dtype() != want || t.shape() != shape.as_slice() {
                            return Err(bad(format!(
                                "`{name}` is {:?} {:?}, expected {want:?} {shape:?}",
                                t.dtype(),
                                t.shape()
                            )));
                        }
                        Ok(t.data()
                            .chunks_exact(2)
                            .map(|c| u16::from_le_bytes([c[0], c[1]]))
                            .collect())
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(copies)
            }
            _ => None,
        };
        let counters = tensor("counters").ok_or_else(|| bad("no `counters`".into()))?;
        if counters.dtype() != Dtype::U64 || counters.shape() != [4] {
            return Err(bad("`counters` must be u64 [4]".into()));
        }
        let c: Vec<u64> = counters
            .data()
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let history = tensor("history").ok_or_else(|| bad("no `history`".into()))?;
        if history.dtype() != Dtype::F64 || history.shape().len() != 2 || history.shape()[1] != 3 {
            return Err(bad("`history` must be f64 [calls, 3]".into()));
        }
        let h: Vec<f64> = history
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let state = OptimizerState {
            params: group("param")?,
            exp_avg: group("exp_avg")?,
            exp_avg_sq: optional("exp_avg_sq", config.method.has_second_moment())?,
            ema: optional("ema", config.ema_beta.is_some())?,
            model_copy,
            calls: c[0],
            steps: c[1],
            skipped: c[2],
            last_skipped: c[3] != 0,
            history: h
                .chunks_exact(3)
                .map(|r| StepRecord {
                    lr: r[0],
                    grad_norm: (r[2] as u32 & HISTORY_NORM != 0).then_some(r[1]),
                    skipped: r[2] as u32 & HISTORY_SKIPPED != 0,
                })
                .collect(),
        };
        let sizes: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        state.check_fits(config, &sizes)?;
        Ok(state)
    }
}

#[cfg(any(feature = "cube", feature = "cuda"))]
/// A device optimizer's state as read back: f32 tensors cut from the arenas, the counters and
/// the history.
pub(crate) struct F32State {
    pub params: Vec<Vec<f32>>,
    pub exp_avg: Vec<Vec<f32>>,
    pub exp_avg_sq: Option<Vec<Vec<f32>>>,
    pub ema: Option<Vec<Vec<f32>>>,
    pub model_copy: Option<Vec<Vec<u16>>>,
    /// calls, steps, skipped.
    pub counts: [u64; 3],
    pub last_skipped: bool,
    pub history: Vec<StepRecord>,
}

#[cfg(any(feature = "cube", feature = "cuda"))]
impl From<F32State> for OptimizerState {
    fn from(s: F32State) -> Self {
        let wide = |v: Vec<Vec<f32>>| -> Vec<Vec<f64>> {
            v.into_iter()
                .map(|t| t.into_iter().map(f64::from).collect())
                .collect()
        };
        OptimizerState {
            params: wide(s.params),
            exp_avg: wide(s.exp_avg),
            exp_avg_sq: s.exp_avg_sq.map(wide),
            ema: s.ema.map(wide),
            model_copy: s.model_copy,
            calls: s.counts[0],
            steps: s.counts[1],
            skipped: s.counts[2],
            last_skipped: s.last_skipped,
            history: s.history,
        }
    }
}

#[cfg(any(feature = "cube", feature = "cuda"))]
/// A state packed for a device optimizer: f32 arenas in its layout (zero padding) and the 16-bit
/// copy's halves (given, or the weights' nearest image when the state has none).
pub(crate) struct Arenas {
    pub params: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Option<Vec<f32>>,
    pub ema: Option<Vec<f32>>,
    pub copy: Option<Vec<u16>>,
}

#[cfg(any(feature = "cube", feature = "cuda"))]
impl OptimizerState {
    /// This state (checked to fit `config` and `layout`) rounded to f32 and packed.
    pub(crate) fn to_arenas(
        &self,
        config: &OptimizerConfig,
        layout: &ArenaLayout,
    ) -> Result<Arenas> {
        self.check_fits(config, &layout.sizes)?;
        let narrow = |v: &[Vec<f64>]| -> Vec<f32> {
            let narrowed: Vec<Vec<f32>> = v
                .iter()
                .map(|t| t.iter().map(|&x| x as f32).collect())
                .collect();
            let refs: Vec<&[f32]> = narrowed.iter().map(Vec::as_slice).collect();
            layout.pack(&refs)
        };
        let params = narrow(&self.params);
        if let Some(i) = params.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                tensor: "optimizer state params".into(),
                index: i,
                value: params[i] as f64,
            });
        }
        let copy = config.model_copy.map(|(format, _)| match &self.model_copy {
            Some(bits) => {
                let mut halves = vec![0u16; layout.total as usize];
                for ((b, &offset), &n) in bits.iter().zip(&layout.offsets).zip(&layout.sizes) {
                    halves[offset as usize..offset as usize + n].copy_from_slice(&b[..n]);
                }
                halves
            }
            None => nearest_halves(&params, format),
        });
        Ok(Arenas {
            exp_avg: narrow(&self.exp_avg),
            exp_avg_sq: self.exp_avg_sq.as_deref().map(narrow),
            ema: self.ema.as_deref().map(narrow),
            copy,
            params,
        })
    }
}

#[cfg(any(feature = "cube", feature = "cuda"))]
/// The round-to-nearest-even 16-bit image of an f32 arena (the copy before any applied step).
pub(crate) fn nearest_halves(arena: &[f32], format: CopyFormat) -> Vec<u16> {
    use linattn_reference::optim::rounding::{bf16_nearest, f16_nearest};
    arena
        .iter()
        .map(|&x| match format {
            CopyFormat::Bf16 => bf16_nearest(x),
            CopyFormat::F16 => f16_nearest(x),
        })
        .collect()
}

const HISTORY_SKIPPED: u32 = 1;
const HISTORY_NORM: u32 = 2;

/// A record's flags as the device histories keep them: 1 = skipped, 2 = the norm was computed
/// (a skipped call's norm is NaN or infinite, so it cannot mark absence itself).
fn history_flags(r: &StepRecord) -> u32 {
    (if r.skipped { HISTORY_SKIPPED } else { 0 })
        | (if r.grad_norm.is_some() {
            HISTORY_NORM
        } else {
            0
        })
}

fn method_name(method: &Method) -> &'static str {
    match method {
        Method::AdamW { .. } => "adamw",
        Method::Lion { .. } => "lion",
    }
}

/// Writes `bytes` to `path` atomically (a temporary file in the same folder, synced, renamed).
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::cli::io::write_atomic(path, |f| std::io::Write::write_all(f, bytes))
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}
