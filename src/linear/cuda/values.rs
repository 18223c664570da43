//! The device-side value check of the device-resident CUDA API: `la_value_flags`
//! (kernels/linear_util.cu) over each input, one u32 of flags per tensor, one read back. Only when
//! a flag is set does the caller look for the first bad element (the error path).

use super::kernels::{plain_kernel, util_variant};
use super::params::LaParams;
use crate::cuda::exec::Executor;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use crate::validation::flagged_values_error;

/// A NaN or an infinity.
pub const NON_FINITE: u32 = 1;
/// A value > 0 (gates only).
pub const POSITIVE: u32 = 2;

/// One buffer to check: `len` elements of `dtype` (bf16, f16 or f32) at device address
/// `address`; a gate is also checked for values > 0.
#[derive(Clone, Copy, Debug)]
pub struct CheckedBuffer<'a> {
    pub name: &'a str,
    pub address: u64,
    pub len: usize,
    pub dtype: DType,
    pub gate: bool,
}

/// The flags ([`NON_FINITE`] | [`POSITIVE`]) of every buffer, in order: one launch each (a
/// grid-stride pass of at most 1024 blocks of 256 threads), then one download, which waits for
/// the executor's pending work.
pub fn value_flags_on<E: Executor>(exec: &E, buffers: &[CheckedBuffer]) -> Result<Vec<u32>> {
    if buffers.is_empty() {
        return Ok(Vec::new());
    }
    let flags = exec.alloc_zeroed(4 * buffers.len())?;
    let base = exec.address(&flags);
    let util = util_variant(DType::F32);
    for (i, b) in buffers.iter().enumerate() {
        if b.len == 0 {
            continue;
        }
        let format = match b.dtype {
            DType::F32 => 0,
            DType::BF16 => 1,
            DType::F16 => 2,
            DType::F64 => {
                return Err(Error::UnsupportedDtype {
                    tensor: b.name.to_string(),
                    dtype: b.dtype,
                    backend: "cuda".into(),
                    supported: "bf16, f16, f32".into(),
                });
            }
        };
        let p = LaParams {
            aux: b.address,
            dgl: base + 4 * i as u64,
            total_tokens: b.len as i64,
            gate_kind: format,
            reverse: b.gate as i32,
            ..LaParams::default()
        };
        let blocks = b.len.div_ceil(256 * 8).clamp(1, 1024) as u32;
        exec.launch(
            plain_kernel(&util, "la_value_flags"),
            [blocks, 1, 1],
            256,
            p.as_bytes(),
        )?;
    }
    let mut bytes = vec![0u8; 4 * buffers.len()];
    exec.download(&flags, &mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

/// The error of the first flagged buffer, given a way to read its values to the host (f64) to
/// name the first bad element; `Ok` when nothing is flagged.
pub fn first_error(
    buffers: &[CheckedBuffer],
    flags: &[u32],
    read: impl Fn(usize) -> Result<Vec<f64>>,
) -> Result<()> {
    let Some(i) = flags.iter().position(|&f| f & (NON_FINITE | POSITIVE) != 0) else {
        return Ok(());
    };
    let b = &buffers[i];
    let values = read(i)?;
    let values = Tensor::f64_unchecked(vec![values.len()], values);
    Err(flagged_values_error(b.name, b.gate, &values))
}
