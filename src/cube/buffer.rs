//! Device-resident tensors: a cubecl buffer handle with a shape and a dtype, row-major like the
//! host [`Tensor`]. The device-resident APIs (e.g. [`crate::linear::cube::forward_device`]) take and
//! return these, so that callers who keep their data on the device never copy it to the host.

use cubecl::prelude::*;
use cubecl::server::Handle;
use half::{bf16, f16};

use super::{CubeContext, kernels, read_vec};
use crate::error::{Error, Result};
use crate::tensor::{DType, Shaped, Tensor, TensorData};

/// A row-major tensor in a device buffer.
#[derive(Clone)]
pub struct DeviceTensor {
    handle: Handle,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceTensor({:?}, {})", self.shape, self.dtype)
    }
}

impl Shaped for DeviceTensor {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}

impl DeviceTensor {
    /// Wraps a buffer the caller filled. The buffer must hold at least `shape.product()` elements
    /// of `dtype`. Only the buffer's byte size can be checked, and runtimes round allocations up,
    /// so a slightly short buffer may pass: the caller vouches for the contents.
    pub fn from_handle(handle: Handle, shape: Vec<usize>, dtype: DType) -> Result<Self> {
        let numel: usize = shape.iter().product();
        let needed = (numel * dtype.size_in_bytes()) as u64;
        if handle.size() < needed {
            return Err(Error::InvalidArgument(format!(
                "device buffer of {} bytes is too small for a {dtype} tensor of shape {shape:?} ({needed} bytes)",
                handle.size()
            )));
        }
        Ok(DeviceTensor {
            handle,
            shape,
            dtype,
        })
    }

    /// An f32 tensor over a buffer this crate allocated with the right size.
    pub(crate) fn f32_unchecked(handle: Handle, shape: Vec<usize>) -> Self {
        DeviceTensor {
            handle,
            shape,
            dtype: DType::F32,
        }
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub fn into_handle(self) -> Handle {
        self.handle
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as an f32 buffer: this tensor's own buffer when it is f32, else a new buffer
    /// widened on the device (f16/bf16, where the runtime supports them).
    pub fn to_f32(&self, ctx: &CubeContext, name: &str) -> Result<Handle> {
        ctx.check_dtype(name, self.dtype)?;
        let n = self.numel();
        Ok(match self.dtype {
            DType::F32 => self.handle.clone(),
            DType::F16 => kernels::cast_f32::<f16>(ctx, &self.handle, n),
            DType::BF16 => kernels::cast_f32::<bf16>(ctx, &self.handle, n),
            DType::F64 => unreachable!("check_dtype refuses f64"),
        })
    }
}

impl DeviceTensor {
    /// This tensor (f32) converted on the device to `dtype` (f32 itself, f16 or bf16 where the
    /// runtime stores them): the results of the kernels are f32, adapters hand them back in
    /// their inputs' dtype.
    pub fn to_dtype(&self, ctx: &CubeContext, dtype: DType) -> Result<DeviceTensor> {
        if self.dtype != DType::F32 {
            return Err(Error::InvalidArgument(format!(
                "to_dtype converts f32 results, this tensor is {}",
                self.dtype
            )));
        }
        ctx.check_dtype("output", dtype)?;
        let n = self.numel();
        let handle = match dtype {
            DType::F32 => return Ok(self.clone()),
            DType::F16 => kernels::cast_from_f32_to::<f16>(ctx, &self.handle, n),
            DType::BF16 => kernels::cast_from_f32_to::<bf16>(ctx, &self.handle, n),
            DType::F64 => unreachable!("check_dtype refuses f64"),
        };
        Ok(DeviceTensor {
            handle,
            shape: self.shape.clone(),
            dtype,
        })
    }
}

pub(super) fn upload(ctx: &CubeContext, name: &str, tensor: &Tensor) -> Result<DeviceTensor> {
    ctx.check_dtype(name, tensor.dtype())?;
    let handle = match tensor.data() {
        TensorData::F32(d) => kernels::upload_f32(ctx, d),
        TensorData::F16(d) if !d.is_empty() => {
            crate::cube::upload_bytes(ctx.client(), f16::as_bytes(d))
        }
        TensorData::BF16(d) if !d.is_empty() => {
            crate::cube::upload_bytes(ctx.client(), bf16::as_bytes(d))
        }
        TensorData::F16(_) | TensorData::BF16(_) => kernels::alloc_f32(ctx, 1),
        TensorData::F64(_) => unreachable!("check_dtype refuses f64"),
    };
    Ok(DeviceTensor {
        handle,
        shape: tensor.shape().to_vec(),
        dtype: tensor.dtype(),
    })
}

pub(super) fn download(ctx: &CubeContext, tensor: &DeviceTensor) -> Result<Tensor> {
    let n = tensor.numel();
    if tensor.dtype == DType::F32 {
        // The common case (every kernel result): the element count is ours to vouch for.
        let data = read_prefix::<f32>(ctx, &tensor.handle, n)?;
        return Ok(Tensor::f32_unchecked(tensor.shape.clone(), data));
    }
    let data = match tensor.dtype {
        DType::F32 => unreachable!("handled above"),
        DType::F16 => TensorData::F16(read_prefix::<f16>(ctx, &tensor.handle, n)?),
        DType::BF16 => TensorData::BF16(read_prefix::<bf16>(ctx, &tensor.handle, n)?),
        DType::F64 => TensorData::F64(read_prefix::<f64>(ctx, &tensor.handle, n)?),
    };
    Tensor::new(tensor.shape.clone(), data)
}

/// The first `n` elements of a buffer (buffers of empty tensors hold one padding element).
fn read_prefix<T: CubeElement>(ctx: &CubeContext, handle: &Handle, n: usize) -> Result<Vec<T>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut v = read_vec::<T>(ctx, handle)?;
    if v.len() < n {
        return Err(super::runtime_error(format!(
            "read {} elements back where {n} were expected",
            v.len()
        )));
    }
    v.truncate(n);
    Ok(v)
}
