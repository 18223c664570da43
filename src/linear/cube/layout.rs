//! Sequences, chunks, and the logical-to-physical row mapping every engine kernel shares.
//!
//! **Rows.** Tensors are `[B, T, H, D]`; a *row* is one `(b, t)` pair, physical row index
//! `b * T + t`, so element `(row, h, d)` sits at `(row * H + h) * D + d`. A *sequence* is a run of
//! rows `[start, start + len)`: `b * T .. (b + 1) * T` per batch entry, or one `cu_seqlens`
//! segment (empty segments allowed).
//!
//! **Directions.** Every kernel runs a *causal pass* over *logical* rows. The forward pass maps
//! logical row `r` to physical row `r`. The reverse pass (the part of a bidirectional problem
//! above the diagonal) uses the flip identity of kernels.md: within a sequence, logical row
//! `start + tau` is physical row `start + len - 1 - tau`, and its gate is the *backward* gate of the
//! physical row one step later, `shift(flip(g_bwd))`: `0` at `tau = 0` (no decay enters the first
//! logical step) and `g_bwd[phys + 1]` otherwise. Then the causal mask of the reversed sequence,
//! `exp(sum_{m = j+1..i} gl_m)` for logical `j <= i`, is exactly LION's upper-triangle mask
//! `exp(sum_{m = i'+1..j'} g_bwd_m)` for physical `i' < j'`. The reverse pass is *strict* (its
//! diagonal is left out), so the diagonal is counted once, by the forward pass.
//!
//! Scratch buffers (cumulative gates, chunk factors, per-pass gate-gradient terms) are indexed by
//! logical row; inputs and outputs by physical row.

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::cube::CubeContext;
use crate::cube::kernels::upload_u32;
use crate::cube::launch::{per_item, thread_index};

/// Gate kinds as the kernels see them (a runtime scalar, so one compiled kernel serves all four).
pub const GATE_NONE: u32 = 0;
pub const GATE_PER_HEAD: u32 = 1;
pub const GATE_SCALAR: u32 = 2;
pub const GATE_VECTOR: u32 = 3;

/// The sequences of a problem, on the host and as a device table.
pub struct Sequences {
    /// `(first physical row, length)` per sequence.
    pub seqs: Vec<(usize, usize)>,
    /// u32 `[N * 2]`: `start, len` per sequence.
    pub table: Handle,
    /// u32 `[rows]`: the sequence each physical row belongs to (read by the parallel form).
    pub row_seq: Handle,
    /// `B * T`.
    pub rows: usize,
    /// `(B, T)` when every sequence is one batch entry (no `cu_seqlens`): the tables are then
    /// built on the device, so a fixed-length problem copies nothing from the host.
    pub fixed: Option<(usize, usize)>,
}

impl Sequences {
    /// `cu_seqlens` (packed, `b == 1`) or `b` sequences of `t` rows.
    pub fn new(ctx: &CubeContext, b: usize, t: usize, cu_seqlens: Option<&[usize]>) -> Sequences {
        let seqs: Vec<(usize, usize)> = match cu_seqlens {
            Some(cu) => cu.windows(2).map(|w| (w[0], w[1] - w[0])).collect(),
            None => (0..b).map(|i| (i * t, t)).collect(),
        };
        let rows = b * t;
        if cu_seqlens.is_none() {
            let table = ctx.client().empty(2 * b * size_of::<u32>());
            let row_seq = ctx.client().empty(rows.max(1) * size_of::<u32>());
            let (count, dim) = per_item(rows.max(b));
            // SAFETY: `table` holds `2 * b` and `row_seq` `b * t` u32; the kernel writes only
            // those indices.
            unsafe {
                fixed_sequence_tables::launch_unchecked(
                    ctx.client(),
                    count,
                    dim,
                    BufferArg::from_raw_parts(table.clone(), 2 * b),
                    BufferArg::from_raw_parts(row_seq.clone(), rows.max(1)),
                    b,
                    t,
                )
            };
            return Sequences {
                seqs,
                table,
                row_seq,
                rows,
                fixed: Some((b, t)),
            };
        }
        let flat: Vec<u32> = seqs
            .iter()
            .flat_map(|&(s, l)| [s as u32, l as u32])
            .collect();
        let mut row_seq = vec![0u32; rows];
        for (n, &(s, l)) in seqs.iter().enumerate() {
            for r in &mut row_seq[s..s + l] {
                *r = n as u32;
            }
        }
        Sequences {
            table: upload_u32(ctx, &flat),
            row_seq: upload_u32(ctx, &row_seq),
            seqs,
            rows,
            fixed: None,
        }
    }

    pub fn count(&self) -> usize {
        self.seqs.len()
    }
}

/// Entries per chunk in [`Chunks::table`].
pub const CHUNK_FIELDS: usize = 5;

/// The chunks of every sequence: chunk `c` of a sequence covers its logical rows
/// `[start + c * C, min(start + (c + 1) * C, start + len))`.
pub struct Chunks {
    pub chunk: usize,
    pub count: usize,
    /// u32 `[count * 5]`: first logical row, length, sequence start, sequence length, sequence index.
    pub table: Handle,
    /// u32 `[N + 1]`: chunks of sequence `n` are `first[n] .. first[n + 1]`.
    pub first: Handle,
}

impl Chunks {
    pub fn new(ctx: &CubeContext, seqs: &Sequences, chunk: usize) -> Chunks {
        if let Some((b, t)) = seqs.fixed {
            let per_seq = t.div_ceil(chunk);
            let count = b * per_seq;
            let table = ctx.client().empty(count * CHUNK_FIELDS * size_of::<u32>());
            let first = ctx.client().empty((b + 1) * size_of::<u32>());
            let (cubes, dim) = per_item(count.max(b + 1));
            // SAFETY: `table` holds `count * CHUNK_FIELDS` and `first` `b + 1` u32; the kernel
            // writes only those indices.
            unsafe {
                fixed_chunk_tables::launch_unchecked(
                    ctx.client(),
                    cubes,
                    dim,
                    BufferArg::from_raw_parts(table.clone(), count * CHUNK_FIELDS),
                    BufferArg::from_raw_parts(first.clone(), b + 1),
                    b,
                    t,
                    chunk,
                    per_seq,
                )
            };
            return Chunks {
                chunk,
                count,
                table,
                first,
            };
        }
        let mut table = Vec::new();
        let mut first = vec![0u32];
        for (n, &(start, len)) in seqs.seqs.iter().enumerate() {
            let mut c0 = 0;
            while c0 < len {
                let l = chunk.min(len - c0);
                table.extend_from_slice(&[
                    (start + c0) as u32,
                    l as u32,
                    start as u32,
                    len as u32,
                    n as u32,
                ]);
                c0 += chunk;
            }
            first.push((table.len() / CHUNK_FIELDS) as u32);
        }
        Chunks {
            chunk,
            count: table.len() / CHUNK_FIELDS,
            table: upload_u32(ctx, &table),
            first: upload_u32(ctx, &first),
        }
    }
}

/// [`Sequences`]' tables for `b` sequences of `t` rows: `table[2n..2n+2] = (n t, t)` and
/// `row_seq[r] = r / t`, the same values the host builds for `cu_seqlens`.
#[cube(launch_unchecked)]
fn fixed_sequence_tables(table: &mut [u32], row_seq: &mut [u32], b: usize, t: usize) {
    let i = thread_index();
    if i < b {
        table[2 * i] = u32::cast_from(i * t);
        table[2 * i + 1] = u32::cast_from(t);
    }
    if i < b * t {
        row_seq[i] = u32::cast_from(i / t);
    }
}

/// [`Chunks`]' tables for `b` sequences of `t` rows, `per_seq = ceil(t / chunk)` chunks each:
/// chunk `i` is chunk `i % per_seq` of sequence `i / per_seq`, laid out as [`Chunks::new`] does
/// on the host.
#[cube(launch_unchecked)]
fn fixed_chunk_tables(
    table: &mut [u32],
    first: &mut [u32],
    b: usize,
    t: usize,
    chunk: usize,
    per_seq: usize,
) {
    let i = thread_index();
    if i < b * per_seq {
        let n = i / per_seq;
        let c0 = (i % per_seq) * chunk;
        let mut len = t - c0;
        if chunk < len {
            len = chunk;
        }
        let at = i * 5;
        table[at] = u32::cast_from(n * t + c0);
        table[at + 1] = u32::cast_from(len);
        table[at + 2] = u32::cast_from(n * t);
        table[at + 3] = u32::cast_from(t);
        table[at + 4] = u32::cast_from(n);
    }
    if i <= b {
        first[i] = u32::cast_from(i * per_seq);
    }
}

/// Physical row of logical row `lrow` of the sequence `[seq_start, seq_start + seq_len)`.
#[cube]
pub fn physical_row(lrow: usize, seq_start: usize, seq_len: usize, reverse: u32) -> usize {
    let mut p = lrow;
    if reverse == 1 {
        p = 2 * seq_start + seq_len - 1 - lrow;
    }
    p
}

/// The natural-log decay this pass applies at logical row `lrow`, head `h`, key channel `kk`.
///
/// Forward pass: `g[lrow]`. Reverse pass: `0` at the sequence's first logical row and
/// `g[phys(lrow) + 1]` otherwise (see the module docs). `kind` picks the gate's shape: none (0),
/// per head `[H]`, scalar `[rows, H]`, vector `[rows, H, K]`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn gate_value(
    g: &[f32],
    kind: u32,
    lrow: usize,
    seq_start: usize,
    seq_len: usize,
    reverse: u32,
    h: usize,
    kk: usize,
    heads: usize,
    dk: usize,
) -> f32 {
    let mut value = 0.0f32;
    if kind != 0 {
        let mut present = true;
        let mut p = lrow;
        if reverse == 1 {
            if lrow == seq_start {
                present = false;
            } else {
                p = 2 * seq_start + seq_len - lrow;
            }
        }
        if present {
            let mut idx = h;
            if kind == 2 {
                idx = p * heads + h;
            } else if kind == 3 {
                idx = (p * heads + h) * dk + kk;
            }
            value = g[idx];
        }
    }
    value
}
