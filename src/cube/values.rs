//! The device-side value check of the device-resident APIs: one reduction per tensor over its f32
//! buffer that flags a non-finite value and, for a gate, a positive one, so that a caller who
//! keeps data on the device gets the same typed error as the host API instead of outputs full of
//! NaN. On by default ([`ValueCheck::On`]); [`ValueCheck::Off`] skips it for speed.
//!
//! The kernels read the f32 buffer as u32 bits: an exponent field of all ones is NaN or ±inf
//! (whatever the runtime's float comparison does with NaN under fast math), and a clear sign bit
//! with a nonzero magnitude is a value > 0. Stage one ORs the flags of a contiguous run per
//! unit (at most [`CubeContext::loop_budget`] elements), stage two ORs the units' flags into one
//! word per tensor, and one read brings the words of every tensor back: the cost is one pass over
//! the inputs and one small device-to-host read. Only on a flag is the tensor downloaded, to name
//! the first bad element as the host check does.

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::launch::{per_item, thread_index};
use super::{CubeContext, read_vec};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::validation::flagged_values_error;

pub use crate::backend::ValueCheck;

const NON_FINITE: u32 = 1;
const POSITIVE: u32 = 2;

/// Stage one: `flags[u]` = OR over elements `[u * per_unit, min(n, (u + 1) * per_unit))` of
/// [`NON_FINITE`] (exponent bits all set) and, with `gate == 1`, [`POSITIVE`] (sign clear,
/// magnitude nonzero).
#[cube(launch_unchecked)]
fn value_flags(
    bits: &[u32],
    flags: &mut [u32],
    n: usize,
    per_unit: usize,
    units: usize,
    gate: u32,
) {
    let u = thread_index();
    if u < units {
        let start = u * per_unit;
        let mut end = start + per_unit;
        if end > n {
            end = n;
        }
        let mut f = 0u32;
        let mut i = start;
        while i < end {
            let b = bits[i];
            if (b & 0x7f80_0000u32) == 0x7f80_0000u32 {
                f |= 1u32;
            }
            if gate == 1u32 && (b & 0x8000_0000u32) == 0u32 && (b & 0x7fff_ffffu32) != 0u32 {
                f |= 2u32;
            }
            i += 1;
        }
        flags[u] = f;
    }
}

/// Stage two: `out[slot]` = OR of `flags[0 .. units]` (one unit; `units` is within the budget).
#[cube(launch_unchecked)]
fn or_flags(flags: &[u32], out: &mut [u32], units: usize, slot: usize) {
    if thread_index() == 0 {
        let mut f = 0u32;
        let mut u = 0;
        while u < units {
            f |= flags[u];
            u += 1;
        }
        out[slot] = f;
    }
}

/// One tensor to check: its name (for the error), an f32 buffer of `len` elements, and whether it
/// is a gate (must also be `<= 0`).
pub(crate) struct Checked<'a> {
    pub name: &'a str,
    pub buffer: &'a Handle,
    pub len: usize,
    pub gate: bool,
}

/// Runs the check over `tensors`; the first tensor with a flag gives the error, naming its first
/// bad element.
pub(crate) fn check(ctx: &CubeContext, tensors: &[Checked]) -> Result<()> {
    let tensors: Vec<&Checked> = tensors.iter().filter(|t| t.len > 0).collect();
    if tensors.is_empty() {
        return Ok(());
    }
    let budget = ctx.loop_budget();
    let out = ctx.client().empty(tensors.len() * size_of::<u32>());
    for (slot, t) in tensors.iter().enumerate() {
        // Enough units that each stays within the loop budget, and few enough that stage two's
        // single unit does too; 256 elements per unit at least, so small tensors use few units.
        let units = t.len.div_ceil(256).min(budget).max(t.len.div_ceil(budget));
        if units > budget {
            return Err(Error::Unsupported(format!(
                "the device value check covers at most {} elements per tensor; `{}` has {} \
                 (turn the check off and validate on the host)",
                budget * budget,
                t.name,
                t.len
            )));
        }
        let per_unit = t.len.div_ceil(units);
        let flags = ctx.client().empty(units * size_of::<u32>());
        let (count, dim) = per_item(units);
        // SAFETY: `buffer` holds `len` f32 (read as u32 bits), `flags` `units` u32, `out` one u32
        // per tensor; stage one reads indices < len and writes < units, stage two writes `slot`.
        unsafe {
            value_flags::launch_unchecked(
                ctx.client(),
                count,
                dim,
                BufferArg::from_raw_parts(t.buffer.clone(), t.len),
                BufferArg::from_raw_parts(flags.clone(), units),
                t.len,
                per_unit,
                units,
                u32::from(t.gate),
            );
            or_flags::launch_unchecked(
                ctx.client(),
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(1),
                BufferArg::from_raw_parts(flags, units),
                BufferArg::from_raw_parts(out.clone(), tensors.len()),
                units,
                slot,
            );
        }
    }
    let words: Vec<u32> = read_vec(ctx, &out)?;
    for (t, &word) in tensors.iter().zip(&words) {
        if word & (NON_FINITE | POSITIVE) == 0 {
            continue;
        }
        // The error path: the host check of the values read back names the first bad element.
        let mut values: Vec<f32> = read_vec(ctx, t.buffer)?;
        values.truncate(t.len);
        let values = Tensor::f32_unchecked(vec![values.len()], values);
        return Err(flagged_values_error(t.name, t.gate, &values));
    }
    Ok(())
}
