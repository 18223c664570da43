//! Between candle and linattn: dtypes, shapes, errors, the values check, and the packing of an
//! op's tensors into one flat tensor per dtype.
//!
//! **Why packing.** candle's custom ops take at most three tensors and give one
//! (`CustomOp1/2/3`). An engine problem has up to six differentiable inputs (q, k, v, the two
//! gates, h0) and two outputs (o, ht). Each op therefore takes its inputs as (at most three) flat
//! tensors, one per dtype family, built with `flatten_all` + `cat`, and returns one flat f32
//! tensor that the caller cuts apart with `narrow` + `reshape`. `cat` and `narrow` are candle
//! ops with their own backward, so autograd routes every piece of a packed gradient back to the
//! tensor it came from; the op's `bwd` only has to return the packed gradients. The cost is one
//! device copy of the inputs (`cat`) per call, on the device, never through the host.

use std::ops::Range;

use candle_core::{CpuStorage, DType as CDType, Layout, Tensor as CTensor};
use half::{bf16, f16};
use linattn::{DType, Error, Result, Tensor, TensorData, TensorMeta};

/// linattn's dtype of a candle dtype the kernels take (f32, f16, bf16).
pub(crate) fn dtype_of(name: &str, dtype: CDType) -> Result<DType> {
    match dtype {
        CDType::F32 => Ok(DType::F32),
        CDType::F16 => Ok(DType::F16),
        CDType::BF16 => Ok(DType::BF16),
        CDType::F64 => Err(Error::UnsupportedDtype {
            tensor: name.to_string(),
            dtype: DType::F64,
            backend: "candle".into(),
            supported: "f32, f16, bf16".into(),
        }),
        other => Err(Error::InvalidArgument(format!(
            "`{name}` is {other:?}; linattn's candle ops take float tensors (f32, f16, bf16)"
        ))),
    }
}

/// Shape and dtype of a candle tensor, for linattn's shape-only validation.
pub(crate) fn meta(name: &str, t: &CTensor) -> Result<TensorMeta> {
    Ok(TensorMeta::new(
        t.dims().to_vec(),
        dtype_of(name, t.dtype())?,
    ))
}

/// A candle error as linattn's (errors inside an op carry candle's message).
pub(crate) fn from_candle(e: candle_core::Error) -> Error {
    Error::Runtime {
        backend: "candle".into(),
        message: e.to_string(),
    }
}

/// A linattn error inside a candle op.
pub(crate) fn to_candle(e: Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// Every input on one device.
pub(crate) fn same_device(tensors: &[(&str, Option<&CTensor>)]) -> Result<()> {
    let mut first: Option<(&str, &CTensor)> = None;
    for &(name, t) in tensors {
        let Some(t) = t else { continue };
        match first {
            None => first = Some((name, t)),
            Some((first_name, f)) if !f.device().same_device(t.device()) => {
                return Err(Error::InvalidArgument(format!(
                    "`{name}` is on {:?} but `{first_name}` is on {:?}; every input of one op must be on one device",
                    t.device().location(),
                    f.device().location()
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Checks the values of `t` with candle ops on its device (one small read back): finite, and
/// for a gate `<= 0`. On a flag the tensor is read to name the first bad element with linattn's
/// own typed error ([`linattn::flagged_values_error`]).
pub(crate) fn check_values(name: &str, t: &CTensor, gate: bool) -> Result<()> {
    let run = || -> candle_core::Result<Option<Vec<f32>>> {
        let x = t.flatten_all()?.to_dtype(CDType::F32)?;
        // NaN compares false everywhere: "not <= 0" (gates) and "not |x| < inf" (others) both
        // flag it.
        let ok = if gate {
            x.le(0f32)?
        } else {
            x.abs()?.lt(f32::INFINITY)?
        };
        let bad = ok
            .eq(0u8)?
            .to_dtype(CDType::U32)?
            .sum_all()?
            .to_scalar::<u32>()?;
        Ok(if bad == 0 { None } else { Some(x.to_vec1()?) })
    };
    match run().map_err(from_candle)? {
        None => Ok(()),
        Some(values) => {
            let host = Tensor::from_f32(t.dims().to_vec(), values)?;
            Err(linattn::flagged_values_error(name, gate, &host))
        }
    }
}

/// `parts` flattened and concatenated (one dtype: the first part's).
pub(crate) fn pack(parts: &[&CTensor]) -> candle_core::Result<CTensor> {
    let flat = parts
        .iter()
        .map(|t| t.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    if flat.len() == 1 {
        return Ok(flat.into_iter().next().expect("one part"));
    }
    CTensor::cat(&flat, 0)
}

/// `parts` as f32, flattened and concatenated; a one-element zero tensor on `device` when there
/// is none (a custom op's argument must exist; the op knows it is absent).
pub(crate) fn pack_f32(
    parts: &[&CTensor],
    device: &candle_core::Device,
) -> candle_core::Result<CTensor> {
    if parts.is_empty() {
        return CTensor::zeros(1, CDType::F32, device);
    }
    let f32s = parts
        .iter()
        .map(|t| t.to_dtype(CDType::F32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    pack(&f32s.iter().collect::<Vec<_>>())
}

/// Consecutive ranges of the given lengths.
pub(crate) fn ranges(lens: &[usize]) -> Vec<Range<usize>> {
    let mut at = 0;
    lens.iter()
        .map(|&n| {
            let r = at..at + n;
            at += n;
            r
        })
        .collect()
}

/// A contiguous run of a CPU storage, typed.
pub(crate) enum HostRun<'a> {
    BF16(&'a [bf16]),
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl<'a> HostRun<'a> {
    /// The elements of a contiguous tensor (`layout`) in `storage`.
    pub(crate) fn of(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<Self> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("linattn: a packed argument must be contiguous");
        };
        Ok(match storage {
            CpuStorage::BF16(v) => HostRun::BF16(&v[start..end]),
            CpuStorage::F16(v) => HostRun::F16(&v[start..end]),
            CpuStorage::F32(v) => HostRun::F32(&v[start..end]),
            other => candle_core::bail!(
                "linattn: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        })
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            HostRun::BF16(v) => v.len(),
            HostRun::F16(v) => v.len(),
            HostRun::F32(v) => v.len(),
        }
    }

    /// Elements `range` as a linattn host tensor of `shape`, in their own dtype.
    pub(crate) fn tensor(&self, range: Range<usize>, shape: Vec<usize>) -> Result<Tensor> {
        let data = match self {
            HostRun::BF16(v) => TensorData::BF16(v[range].to_vec()),
            HostRun::F16(v) => TensorData::F16(v[range].to_vec()),
            HostRun::F32(v) => TensorData::F32(v[range].to_vec()),
        };
        Tensor::new(shape, data)
    }
}

/// linattn host tensors (any dtype) as one flat f32 CPU storage.
pub(crate) fn host_packed(parts: &[&Tensor]) -> (CpuStorage, candle_core::Shape) {
    host_storage(parts.iter().flat_map(|t| t.to_f32_vec()).collect())
}

/// One flat f32 CPU storage with its shape.
pub(crate) fn host_storage(data: Vec<f32>) -> (CpuStorage, candle_core::Shape) {
    let n = data.len();
    (CpuStorage::F32(data), candle_core::Shape::from(n))
}
