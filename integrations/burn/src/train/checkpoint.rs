//! Checkpoints as safetensors with flash-linear-attention's tensor names and layouts
//! (`model.layers.0.attn.q_proj.weight` as `[out, in]`, RMSNorm scales as `.weight`), plus the
//! optimizer's state under `optimizer.*` and the run's metadata, so a run resumes bit for bit.
//! Files are written to a temporary file in the same folder and renamed: an interrupted write
//! leaves the previous checkpoint intact.

use std::collections::HashMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Tensor, TensorData};
use linattn::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};

use crate::optim::SavedState;

/// A module's tensors under fla's names: `(name, shape, f32 values)` in visit order.
pub fn named_tensors<M: Module>(model: &M) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut v = Names {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}

/// burn's module path (field names) to fla's tensor name.
fn fla_name(path: &[String]) -> String {
    let mut parts: Vec<String> = path
        .iter()
        .map(|p| match p.as_str() {
            "gamma" => "weight".to_string(),
            "g_norm" => "g_norm_swish_gate".to_string(),
            "gk_proj_0" => "gk_proj.0".to_string(),
            "gk_proj_1" => "gk_proj.1".to_string(),
            other => other.to_string(),
        })
        .collect();
    if parts.first().map(String::as_str) != Some("classifier") {
        parts.insert(0, "model".into());
    }
    parts.join(".")
}

/// Whether a 2-D tensor is a linear layer's weight (burn `[in, out]`, torch `[out, in]`).
fn is_linear_weight(name: &str, dims: &[usize]) -> bool {
    dims.len() == 2 && name.ends_with(".weight") && !name.contains("embeddings")
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

struct Names {
    path: Vec<String>,
    out: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl ModuleVisitor for Names {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        let dims = t.dims().to_vec();
        let values: Vec<f32> = t.into_data().iter::<f32>().collect();
        let name = fla_name(&self.path);
        let (dims, values) = if is_linear_weight(&name, &dims) {
            (vec![dims[1], dims[0]], transpose(&values, dims[0], dims[1]))
        } else {
            (dims, values)
        };
        self.out.push((name, dims, values));
    }
}

/// Replaces every parameter by the checkpoint's tensor of its fla name.
struct Load<'a> {
    path: Vec<String>,
    tensors: &'a HashMap<String, (Vec<usize>, Vec<f32>)>,
    missing: Vec<String>,
}

impl ModuleMapper for Load<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = fla_name(&self.path);
        let Some((shape, values)) = self.tensors.get(&name) else {
            self.missing.push(name);
            return param;
        };
        let (shape, values) = (shape.clone(), values.clone());
        param.map(|t| {
            let dims: [usize; D] = t.dims();
            let values = if is_linear_weight(&name, &dims) {
                // The file holds torch's `[out, in]` = `[dims[1], dims[0]]`.
                transpose(&values, dims[1], dims[0])
            } else {
                values
            };
            if shape.iter().product::<usize>() != values.len() {
                return t;
            }
            let loaded: Tensor<D> =
                Tensor::from_data(TensorData::new(values, dims), &t.device().inner());
            crate::optim::like_param(&t, loaded)
        })
    }
}

/// Writes `model`, the optimizer state and `metadata` to `path` atomically.
pub fn save<M: Module>(
    path: &Path,
    model: &M,
    optimizer: Option<&SavedState>,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let io = |e: std::io::Error| Error::InvalidArgument(format!("{}: {e}", path.display()));
    let model_tensors = named_tensors(model);
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = model_tensors
        .into_iter()
        .map(|(name, shape, values)| {
            (
                name,
                Dtype::F32,
                shape,
                bytemuck::cast_slice(&values).to_vec(),
            )
        })
        .collect();
    match optimizer {
        Some(SavedState::Device(state)) => {
            for (name, words) in state {
                let n = words.len();
                owned.push((
                    format!("optimizer.device.{name}"),
                    Dtype::U32,
                    vec![n],
                    bytemuck::cast_slice(words).to_vec(),
                ));
            }
        }
        Some(SavedState::Host(state)) => {
            for (name, values) in state {
                let n = values.len();
                owned.push((
                    format!("optimizer.host.{name}"),
                    Dtype::F64,
                    vec![n],
                    bytemuck::cast_slice(values).to_vec(),
                ));
            }
        }
        None => {}
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let view = TensorView::new(*dtype, shape.clone(), bytes)
                .map_err(|e| Error::Safetensors(e.to_string()))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, Some(metadata.clone()))
        .map_err(|e| Error::Safetensors(e.to_string()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    std::io::Write::write_all(&mut tmp, &bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// What [`load`] read: the model with the checkpoint's weights, the optimizer state, the
/// metadata.
pub struct Loaded<M> {
    pub model: M,
    pub optimizer: Option<SavedState>,
    pub metadata: HashMap<String, String>,
}

/// Reads a checkpoint [`save`] wrote into `model` (a model of the same configuration).
pub fn load<M: Module>(path: &Path, model: M) -> Result<Loaded<M>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::Safetensors(e.to_string()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Safetensors(e.to_string()))?;
    let mut tensors = HashMap::new();
    let mut device_state = Vec::new();
    let mut host_state = Vec::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        if let Some(rest) = name.strip_prefix("optimizer.device.") {
            device_state.push((
                rest.to_string(),
                bytemuck::pod_collect_to_vec::<u8, u32>(data),
            ));
        } else if let Some(rest) = name.strip_prefix("optimizer.host.") {
            host_state.push((
                rest.to_string(),
                bytemuck::pod_collect_to_vec::<u8, f64>(data),
            ));
        } else if view.dtype() == Dtype::F32 {
            tensors.insert(
                name.clone(),
                (
                    view.shape().to_vec(),
                    bytemuck::pod_collect_to_vec::<u8, f32>(data),
                ),
            );
        }
    }
    let mut loader = Load {
        path: Vec::new(),
        tensors: &tensors,
        missing: Vec::new(),
    };
    let model = model.map(&mut loader);
    if !loader.missing.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no tensor {} (a checkpoint of another model?)",
            path.display(),
            loader.missing.join(", ")
        )));
    }
    // Keep the optimizer state in the order it was written (the device state's names are
    // unique, the order does not matter for restoring).
    device_state.sort_by(|a, b| a.0.cmp(&b.0));
    host_state.sort_by(|a, b| a.0.cmp(&b.0));
    let optimizer = if !device_state.is_empty() {
        Some(SavedState::Device(device_state))
    } else if !host_state.is_empty() {
        Some(SavedState::Host(host_state))
    } else {
        None
    };
    Ok(Loaded {
        model,
        optimizer,
        metadata,
    })
}

/// The ids of a module's parameters (for tests).
pub fn param_ids<M: Module>(model: &M) -> Vec<ParamId> {
    struct Ids(Vec<ParamId>);
    impl ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.id);
        }
    }
    let mut ids = Ids(Vec::new());
    model.visit(&mut ids);
    ids.0
}
