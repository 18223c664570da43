//! safetensors in, safetensors out: the interop contract with PyTorch users. Float inputs may be f32,
//! f64, f16 or bf16; integer inputs (`cu_seqlens`, `block_mask`) u8, i32 or i64. Float outputs are
//! written as f32.
//!
//! Input files are checked here before the safetensors parser sees them ([`check_header`]): the
//! parser keeps the last of two entries with one name and reports layout errors without saying
//! which tensor, in hash-map order. Outputs are checked for non-finite values
//! ([`Outputs::check_finite`]) and written atomically ([`write_atomic`]).

use std::collections::BTreeMap;
use std::io::Write;
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
        check_header(bytes)?;
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

    /// Refuses any tensor that `op` does not read (a misspelt `cu_seqlen` would otherwise run as if
    /// absent), naming it, the nearest accepted name, and every accepted name.
    pub fn expect_only(&self, op: &str, accepted: &[&str]) -> Result<()> {
        for name in self.names() {
            if accepted.contains(&name) {
                continue;
            }
            let nearest = accepted
                .iter()
                .map(|a| (strsim::damerau_levenshtein(name, a), *a))
                .min();
            let hint = match nearest {
                // A suggestion only when it is plausibly a typo of that name.
                Some((d, a)) if d <= 2.max(a.len() / 3) => format!(" (did you mean `{a}`?)"),
                _ => String::new(),
            };
            return Err(Error::InvalidArgument(format!(
                "`{op}` does not read the input tensor `{name}`{hint}; it reads {}",
                accepted
                    .iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
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

/// Header entries in file order, duplicates kept (a JSON object read through `serde_json::Map`
/// would keep only the last of two equal keys).
struct HeaderEntries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for HeaderEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<HeaderEntries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    entries.push(entry);
                }
                Ok(HeaderEntries(entries))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Bytes per element of a safetensors dtype name; `None` for dtypes no op reads.
fn dtype_size(name: &str) -> Option<u128> {
    Some(match name {
        "BOOL" | "U8" | "I8" => 1,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

/// Checks a safetensors file's header against its data section, in header order, so that every
/// error names the tensor and what is wrong with it: unique names, known dtypes, the bytes a
/// tensor's shape needs against the bytes its `data_offsets` give, offsets inside the data
/// section, and tensors that tile the data section without overlaps or gaps.
pub fn check_header(bytes: &[u8]) -> std::result::Result<(), String> {
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(format!(
            "file too short: {} bytes, a safetensors file starts with an 8-byte header length",
            bytes.len()
        ));
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    let available = bytes.len() as u64 - 8;
    if header_len > available {
        return Err(format!(
            "the header length field says {header_len} bytes, but only {available} follow it"
        ));
    }
    let header = &bytes[8..8 + header_len as usize];
    let data_len = (available - header_len) as u128;
    let entries: HeaderEntries = serde_json::from_slice(header)
        .map_err(|e| format!("the header is not a JSON object of tensor entries: {e}"))?;
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    // (begin, end, name) of every tensor, for the tiling check.
    let mut spans: Vec<(u128, u128, &str)> = Vec::new();
    for (position, (name, entry)) in entries.0.iter().enumerate() {
        if let Some(first) = seen.insert(name, position) {
            return Err(format!(
                "tensor `{name}` appears twice in the header (entries {} and {}); tensor names must be unique",
                first + 1,
                position + 1
            ));
        }
        if name == "__metadata__" {
            continue;
        }
        let field = |key: &str| {
            entry
                .get(key)
                .ok_or_else(|| format!("tensor `{name}`: the header entry has no `{key}`"))
        };
        let uints = |key: &str| -> std::result::Result<Vec<u128>, String> {
            field(key)?
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_u64().map(u128::from))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| {
                    format!("tensor `{name}`: `{key}` must be a list of non-negative integers")
                })
        };
        let dtype = field("dtype")?
            .as_str()
            .ok_or_else(|| format!("tensor `{name}`: `dtype` must be a string"))?;
        let shape = uints("shape")?;
        let offsets = uints("data_offsets")?;
        let &[begin, end] = offsets.as_slice() else {
            return Err(format!(
                "tensor `{name}`: `data_offsets` must be [begin, end], got {offsets:?}"
            ));
        };
        let size = dtype_size(dtype).ok_or_else(|| {
            format!(
                "tensor `{name}` has dtype {dtype}; floats must be F32, F64, F16 or BF16, integers U8, BOOL, I32 or I64"
            )
        })?;
        let needed = shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d))
            .map(|b| b.to_string())
            .unwrap_or_else(|| "more than 2^128".into());
        let described = format!("tensor `{name}` ({dtype}, shape {shape:?})");
        if end < begin {
            return Err(format!(
                "{described}: data_offsets [{begin}, {end}] end before they begin"
            ));
        }
        if needed != (end - begin).to_string() {
            return Err(format!(
                "{described} needs {needed} bytes, but its data_offsets [{begin}, {end}] give {}",
                end - begin
            ));
        }
        if end > data_len {
            return Err(format!(
                "{described}: data_offsets [{begin}, {end}] run past the data section ({data_len} bytes)"
            ));
        }
        spans.push((begin, end, name));
    }
    spans.sort_unstable();
    let mut covered = 0u128;
    let mut previous: Option<&str> = None;
    for &(begin, end, name) in &spans {
        if begin != covered {
            let what = if begin < covered {
                "overlaps"
            } else {
                "leaves a gap after"
            };
            return Err(match previous {
                Some(p) => format!(
                    "tensor `{name}` (data_offsets [{begin}, {end}]) {what} tensor `{p}` (which ends at {covered})"
                ),
                None => format!(
                    "tensor `{name}` (data_offsets [{begin}, {end}]) must start at 0, the first byte of the data section"
                ),
            });
        }
        covered = end;
        previous = Some(name);
    }
    if covered != data_len {
        return Err(format!(
            "the data section holds {data_len} bytes, but the tensors cover {covered}"
        ));
    }
    Ok(())
}

/// Writes a file so that a reader finds either the old contents or all of the new ones: the bytes
/// go to a temporary file in the same folder (same file system), which is synced and then renamed
/// over `path`. `fill` writes the contents; if it fails, `path` is untouched and the temporary file
/// removed.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".linattn-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io)?;
    fill(tmp.as_file_mut()).map_err(io)?;
    tmp.as_file_mut().flush().map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    // The rename itself is durable once the folder is synced (not every platform can open one).
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
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
    /// Log-domain outputs where `-inf` is a value, not an overflow (`lse` of a row with no allowed
    /// key, LightNet's `z` after an empty prefix).
    log_domain: Vec<String>,
}

impl Outputs {
    pub fn float(&mut self, name: &str, t: Tensor) {
        self.tensors.push((name.to_string(), OutTensor::Float(t)));
    }

    /// A float output in the log domain: `-inf` (log 0) is allowed, NaN and `+inf` are not.
    pub fn log_float(&mut self, name: &str, t: Tensor) {
        self.log_domain.push(name.to_string());
        self.float(name, t);
    }

    /// Refuses outputs that hold NaN or an infinity once written as f32 (an input of magnitude
    /// 1e38 overflows f32 arithmetic on the device backends, and an f64 result can overflow on
    /// the conversion): the error names the tensor and counts the values, so nothing that looks
    /// like a result is written. `-inf` in a log-domain output is a value.
    pub fn check_finite(&self) -> Result<()> {
        for (name, t) in &self.tensors {
            let OutTensor::Float(t) = t else { continue };
            let log = self.log_domain.contains(name);
            let (mut nan, mut pos, mut neg) = (0usize, 0usize, 0usize);
            for x in t.to_f32_vec() {
                if x.is_nan() {
                    nan += 1;
                } else if x == f32::INFINITY {
                    pos += 1;
                } else if x == f32::NEG_INFINITY && !log {
                    neg += 1;
                }
            }
            if nan + pos + neg > 0 {
                return Err(Error::NonFiniteOutput {
                    tensor: name.clone(),
                    count: nan + pos + neg,
                    total: t.numel(),
                    detail: format!("{nan} NaN, {pos} +inf, {neg} -inf"),
                });
            }
        }
        Ok(())
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

    /// Writes the tensors atomically ([`write_atomic`]). `linattn run` calls
    /// [`Outputs::check_finite`] first; this writer itself stores any value (test inputs with a
    /// NaN gradient, say).
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        write_atomic(path, |f| f.write_all(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails half-way leaves the previous file whole and no temporary file behind
    /// (a plain truncate-then-write would leave the half).
    #[test]
    fn failed_writes_leave_the_old_file_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        std::fs::write(&path, b"the previous result").unwrap();
        let err = write_atomic(&path, |f| {
            f.write_all(b"half of a new")?;
            Err(std::io::Error::other("killed while writing"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("killed while writing"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"the previous result");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        write_atomic(&path, |f| f.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

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
