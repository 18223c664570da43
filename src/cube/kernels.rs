//! Small utility kernels shared by every op: fill (zeros, poison), dtype casts to f32, and a column
//! copy that appends or drops trailing columns (the ones column of row-sum normalisation).

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::CubeContext;
use super::launch::{per_item, thread_index};

/// `out[i] = value` for every `i < n`.
#[cube(launch_unchecked)]
fn fill_f32(out: &mut [f32], value: f32, n: usize) {
    let i = thread_index();
    if i < n {
        out[i] = value;
    }
}

/// `out[i] = f32(input[i])` for every `i < n`: widening f16/bf16 inputs once, on the device, so
/// that every engine kernel reads f32 (accumulation is always f32).
#[cube(launch_unchecked)]
fn cast_to_f32<I: Float>(input: &[I], out: &mut [f32], n: usize) {
    let i = thread_index();
    if i < n {
        out[i] = f32::cast_from(input[i]);
    }
}

/// `out[i] = O(input[i])` for every `i < n`: narrowing f32 results to the inputs' f16/bf16 on
/// the device (round to nearest even), for adapters that return tensors in their inputs' dtype.
#[cube(launch_unchecked)]
fn cast_from_f32<O: Float>(input: &[f32], out: &mut [O], n: usize) {
    let i = thread_index();
    if i < n {
        out[i] = O::cast_from(input[i]);
    }
}

/// `dst[dst_offset + i] = src[src_offset + i]` for every `i < n`.
#[cube(launch_unchecked)]
fn copy_between(src: &[f32], dst: &mut [f32], src_offset: usize, dst_offset: usize, n: usize) {
    let i = thread_index();
    if i < n {
        dst[dst_offset + i] = src[src_offset + i];
    }
}

/// Row-wise column copy between `[rows, src_width]` and `[rows, dst_width]`: column `c` of the
/// destination is column `c` of the source when `c < src_width`, else `fill`. With
/// `dst_width = src_width + 1, fill = 1` it appends a ones column; with `dst_width < src_width` it
/// drops the trailing columns.
#[cube(launch_unchecked)]
fn copy_columns(
    src: &[f32],
    dst: &mut [f32],
    rows: usize,
    src_width: usize,
    dst_width: usize,
    fill: f32,
) {
    let i = thread_index();
    if i < rows * dst_width {
        let r = i / dst_width;
        let c = i % dst_width;
        let mut x = fill;
        if c < src_width {
            x = src[r * src_width + c];
        }
        dst[i] = x;
    }
}

/// A new f32 buffer of `n` elements (at least one, so that an empty tensor still has a binding).
pub fn alloc_f32(ctx: &CubeContext, n: usize) -> Handle {
    ctx.client().empty(n.max(1) * size_of::<f32>())
}

/// Fills the first `n` elements of `buf` with `value`.
pub fn fill(ctx: &CubeContext, buf: &Handle, n: usize, value: f32) {
    if n == 0 {
        return;
    }
    let (count, dim) = per_item(n);
    // SAFETY: `buf` holds at least `n` f32 (every caller allocates it with `alloc_f32(n)` or larger)
    // and the kernel writes only indices `< n`.
    unsafe {
        fill_f32::launch_unchecked(
            ctx.client(),
            count,
            dim,
            BufferArg::from_raw_parts(buf.clone(), n),
            value,
            n,
        )
    };
}

/// A zero-filled f32 buffer of `n` elements (for kernels that accumulate into it).
pub fn zeros(ctx: &CubeContext, n: usize) -> Handle {
    let buf = alloc_f32(ctx, n);
    fill(ctx, &buf, n, 0.0);
    buf
}

/// An f32 buffer of `n` elements that the next kernels must write completely: filled with NaN when
/// the context poisons outputs, so that an element left unwritten reads back as NaN.
pub fn output(ctx: &CubeContext, n: usize) -> Handle {
    let buf = alloc_f32(ctx, n);
    if ctx.poison_outputs() {
        fill(ctx, &buf, n, f32::NAN);
    }
    buf
}

/// Uploads f32 values.
pub fn upload_f32(ctx: &CubeContext, data: &[f32]) -> Handle {
    if data.is_empty() {
        return alloc_f32(ctx, 1);
    }
    crate::cube::upload_bytes(ctx.client(), f32::as_bytes(data))
}

/// Uploads u32 values (index tables).
pub fn upload_u32(ctx: &CubeContext, data: &[u32]) -> Handle {
    if data.is_empty() {
        return crate::cube::upload_bytes(ctx.client(), u32::as_bytes(&[0]));
    }
    crate::cube::upload_bytes(ctx.client(), u32::as_bytes(data))
}

/// `n` elements of type `I` (f16 or bf16) widened to a new f32 buffer.
pub fn cast_f32<I: Float + CubeElement>(ctx: &CubeContext, input: &Handle, n: usize) -> Handle {
    let out = output(ctx, n);
    if n == 0 {
        return out;
    }
    let (count, dim) = per_item(n);
    // SAFETY: `input` holds `n` elements of `I`, `out` `n` f32; indices `< n` only.
    unsafe {
        cast_to_f32::launch_unchecked::<I>(
            ctx.client(),
            count,
            dim,
            BufferArg::from_raw_parts(input.clone(), n),
            BufferArg::from_raw_parts(out.clone(), n),
            n,
        )
    };
    out
}

/// `[rows, src_width] -> [rows, dst_width]`, see the kernel `copy_columns`.
pub fn columns(
    ctx: &CubeContext,
    src: &Handle,
    rows: usize,
    src_width: usize,
    dst_width: usize,
    fill: f32,
) -> Handle {
    let n = rows * dst_width;
    let dst = output(ctx, n);
    if n == 0 {
        return dst;
    }
    let (count, dim) = per_item(n);
    // SAFETY: `src` holds `rows * src_width` f32 and `dst` `rows * dst_width`; the kernel reads
    // `src[r * src_width + c]` only for `c < src_width` and writes indices `< n`.
    unsafe {
        copy_columns::launch_unchecked(
            ctx.client(),
            count,
            dim,
            BufferArg::from_raw_parts(src.clone(), (rows * src_width).max(1)),
            BufferArg::from_raw_parts(dst.clone(), n),
            rows,
            src_width,
            dst_width,
            fill,
        )
    };
    dst
}

/// `n` f32 narrowed to a new buffer of `O` (f16 or bf16).
pub fn cast_from_f32_to<O: Float + CubeElement>(
    ctx: &CubeContext,
    input: &Handle,
    n: usize,
) -> Handle {
    let out = ctx.client().empty(n.max(1) * size_of::<O>());
    if n == 0 {
        return out;
    }
    let (count, dim) = per_item(n);
    // SAFETY: `input` holds `n` f32, `out` `n` elements of `O`; indices `< n` only.
    unsafe {
        cast_from_f32::launch_unchecked::<O>(
            ctx.client(),
            count,
            dim,
            BufferArg::from_raw_parts(input.clone(), n),
            BufferArg::from_raw_parts(out.clone(), n),
            n,
        )
    };
    out
}

/// The f32 buffers `parts` (each `(buffer, elements)`) one after the other in a new buffer.
pub fn concat_f32(ctx: &CubeContext, parts: &[(&Handle, usize)]) -> Handle {
    let total: usize = parts.iter().map(|p| p.1).sum();
    let dst = output(ctx, total);
    let mut offset = 0;
    for &(src, n) in parts {
        // SAFETY: `src` holds `n` f32 and `dst` `total >= offset + n`.
        unsafe { copy_range(ctx, src, 0, &dst, offset, n) };
        offset += n;
    }
    dst
}

/// Copies `n` f32 from `src[src_offset..]` to `dst[dst_offset..]` on the device.
///
/// # Safety
/// `src` must hold `src_offset + n` and `dst` `dst_offset + n` f32.
pub unsafe fn copy_range(
    ctx: &CubeContext,
    src: &Handle,
    src_offset: usize,
    dst: &Handle,
    dst_offset: usize,
    n: usize,
) {
    if n == 0 {
        return;
    }
    let (count, dim) = per_item(n);
    // SAFETY: the caller guarantees both ranges are inside their buffers.
    unsafe {
        copy_between::launch_unchecked(
            ctx.client(),
            count,
            dim,
            BufferArg::from_raw_parts(src.clone(), src_offset + n),
            BufferArg::from_raw_parts(dst.clone(), dst_offset + n),
            src_offset,
            dst_offset,
            n,
        )
    };
}
