//! safetensors in, safetensors out: the interop contract with PyTorch users. Float inputs may be f32,
//! f64, f16 or bf16; integer inputs (`cu_seqlens`, `block_mask`) u8, i32 or i64. Float outputs are
//! written as f32.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorData};

/// An integer tensor read from a file (masks, offsets).
#[derive(Clone, Debug, PartialEq)]
pub struct IntTensor {
    pub shape: Vec<usize>,
    pub data: Vec<i64>,
}

/// The tensors of one input file, by name.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    floats: BTreeMap<String, Tensor>,
    ints: BTreeMap<String, IntTensor>,
}

impl Inputs {
    /// Reads `path`; `None` gives an empty set (ops without inputs).
    pub fn read(path: Option<&Path>) -> Result<Inputs> {
        let Some(path) = path else {
            return Ok(Inputs::default());
        };
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|e| Error::Safetensors(format!("{}: {e}", path.display())))
    }

    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Inputs, String> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        let mut inputs = Inputs::default();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let raw = view.data();
            // safetensors data is little-endian and may be unaligned inside the buffer: decode
            // element by element rather than casting the slice.
            let float =
                |data| Tensor::new(shape.clone(), data).map_err(|e| format!("`{name}`: {e}"));
            match view.dtype() {
                Dtype::F32 => {
                    let d = raw
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    inputs
                        .floats
                        .insert(name.clone(), float(TensorData::F32(d))?);
                }
                Dtype::F64 => {
                    let d = raw
                        .chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    inputs
                        .floats
                        .insert(name.clone(), float(TensorData::F64(d))?);
                }
                Dtype::F16 => {
                    let d = raw
                        .chunks_exact(2)
                        .map(|c| f16::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    inputs
                        .floats
                        .insert(name.clone(), float(TensorData::F16(d))?);
                }
                Dtype::BF16 => {
                    let d = raw
                        .chunks_exact(2)
                        .map(|c| bf16::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    inputs
                        .floats
                        .insert(name.clone(), float(TensorData::BF16(d))?);
                }
                Dtype::U8 | Dtype::BOOL => {
                    let data = raw.iter().map(|&x| x as i64).collect();
                    inputs.ints.insert(name, IntTensor { shape, data });
                }
                Dtype::I32 => {
                    let data = raw
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                        .collect();
                    inputs.ints.insert(name, IntTensor { shape, data });
                }
                Dtype::I64 => {
                    let data = raw
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    inputs.ints.insert(name, IntTensor { shape, data });
                }
                other => {
                    return Err(format!(
                        "`{name}` has dtype {other:?}; floats must be f32, f64, f16 or bf16, integers u8, i32 or i64"
                    ));
                }
            }
        }
        Ok(inputs)
    }

    pub fn insert_float(&mut self, name: &str, t: Tensor) {
        self.floats.insert(name.to_string(), t);
    }

    pub fn insert_int(&mut self, name: &str, t: IntTensor) {
        self.ints.insert(name.to_string(), t);
    }

    /// A required float tensor.
    pub fn float(&self, name: &str) -> Result<&Tensor> {
        self.opt_float(name)?
            .ok_or_else(|| Error::MissingTensor(name.to_string()))
    }

    /// An optional float tensor (an integer tensor under that name is an error).
    pub fn opt_float(&self, name: &str) -> Result<Option<&Tensor>> {
        if self.ints.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "`{name}` must be a float tensor (f32, f64, f16 or bf16), found an integer tensor"
            )));
        }
        Ok(self.floats.get(name))
    }

    /// An optional integer tensor (a float tensor under that name is an error).
    pub fn opt_int(&self, name: &str) -> Result<Option<&IntTensor>> {
        if self.floats.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "`{name}` must be an integer tensor (u8, i32 or i64), found a float tensor"
            )));
        }
        Ok(self.ints.get(name))
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .floats
            .keys()
            .chain(self.ints.keys())
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }
}

/// One output tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum OutTensor {
    /// Written as f32.
    Float(Tensor),
    /// Written as u8 (masks).
    U8 { shape: Vec<usize>, data: Vec<u8> },
}

/// The tensors of one output file, in insertion order (safetensors sorts them on disk).
#[derive(Clone, Debug, Default)]
pub struct Outputs {
    tensors: Vec<(String, OutTensor)>,
}

impl Outputs {
    pub fn float(&mut self, name: &str, t: Tensor) {
        self.tensors.push((name.to_string(), OutTensor::Float(t)));
    }

    pub fn u8(&mut self, name: &str, shape: Vec<usize>, data: Vec<u8>) {
        self.tensors
            .push((name.to_string(), OutTensor::U8 { shape, data }));
    }

    pub fn get(&self, name: &str) -> Option<&OutTensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn names(&self) -> Vec<&str> {
        self.tensors.iter().map(|(n, _)| n.as_str()).collect()
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, t)| match t {
                OutTensor::Float(t) => (
                    name.clone(),
                    Dtype::F32,
                    t.shape().to_vec(),
                    t.to_f32_vec()
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect(),
                ),
                OutTensor::U8 { shape, data } => {
                    (name.clone(), Dtype::U8, shape.clone(), data.clone())
                }
            })
            .collect();
        let views = encoded
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                TensorView::new(*dtype, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| Error::Safetensors(format!("`{name}`: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize(views, None).map_err(|e| Error::Safetensors(e.to_string()))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_dtypes() {
        let mut out = Outputs::default();
        out.float(
            "o",
            Tensor::from_f64(vec![2, 2], vec![1.0, -2.0, 0.5, 3.0]).unwrap(),
        );
        out.u8("block_mask", vec![1, 3], vec![1, 0, 1]);
        let bytes = out.to_bytes().unwrap();
        let back = Inputs::from_bytes(&bytes).unwrap();
        let o = back.float("o").unwrap();
        assert_eq!(o.shape(), &[2, 2]);
        assert_eq!(o.to_f64_vec(), vec![1.0, -2.0, 0.5, 3.0]);
        assert_eq!(
            back.opt_int("block_mask").unwrap().unwrap().data,
            vec![1, 0, 1]
        );
        assert!(matches!(
            back.float("missing"),
            Err(Error::MissingTensor(_))
        ));
        assert!(back.opt_float("block_mask").is_err());
    }
}
