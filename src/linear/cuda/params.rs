//! `LaParams`: the by-value parameter struct of every decayed-linear-attention kernel, mirrored
//! field by field from kernels/linear_params.cuh (which documents each field and static_asserts
//! the same size).

/// Device addresses are `u64` (0 = absent); sizes and flags `i32`; `#[repr(C)]` with the fields in
/// the kernel's order gives the identical layout on x86-64 and nvptx64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct LaParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub g: u64,
    pub h0: u64,
    pub ht: u64,
    pub d_o: u64,
    pub dht: u64,
    pub dh0: u64,
    pub o: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub gcum: u64,
    pub hs: u64,
    pub dhs: u64,
    pub a: u64,
    pub d_a: u64,
    pub dq_intra: u64,
    pub dk_intra: u64,
    pub dgl: u64,
    pub cu_seqlens: u64,
    pub chunks: u64,
    pub seq_state: u64,
    pub aux: u64,
    pub total_tokens: i64,
    pub n: i32,
    pub h: i32,
    pub k_dim: i32,
    pub v_dim: i32,
    pub num_chunks: i32,
    pub gate_kind: i32,
    pub reverse: i32,
    pub strict: i32,
    pub accumulate: i32,
    pub do_f32: i32,
    pub scale: f32,
    pub eps: f32,
    pub dgl_width: i32,
    pub reserved: i32,
}

/// `sizeof(LaParams)` in kernels/linear_params.cuh.
pub(crate) const LA_PARAMS_BYTES: usize = 264;
const _: () = assert!(std::mem::size_of::<LaParams>() == LA_PARAMS_BYTES);

impl LaParams {
    /// The bytes the kernel receives.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: LaParams is repr(C), Copy, made of integers and floats only, with no padding
        // (264 bytes = 25 * 8 + 8 + 14 * 4, every field naturally aligned in this order).
        unsafe { std::slice::from_raw_parts(self as *const LaParams as *const u8, LA_PARAMS_BYTES) }
    }
}

/// `gate_kind` values (LA_GATE_* in the kernels).
pub(crate) mod gate_kind {
    pub const NONE: i32 = 0;
    pub const PER_HEAD: i32 = 1;
    pub const SCALAR: i32 = 2;
    pub const VECTOR: i32 = 3;
}
