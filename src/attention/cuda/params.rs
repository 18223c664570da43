//! `AttnParams`: the by-value parameter struct of the attention kernels, mirrored field by field
//! from kernels/attention.cuh (which documents each field and static_asserts the same size).

/// Device addresses are `u64` (0 = absent); sizes and flags `i32`. `#[repr(C)]` with the fields in
/// the kernel's order gives the identical layout on x86-64 and nvptx64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct AttnParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub lse: u64,
    pub d_o: u64,
    pub delta: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub rows_ptr: u64,
    pub rows_ent: u64,
    pub cols_ptr: u64,
    pub cols_ent: u64,
    pub row_order: u64,
    pub col_order: u64,
    pub b: i32,
    pub t: i32,
    pub s: i32,
    pub h: i32,
    pub nq: i32,
    pub nk: i32,
    pub causal: i32,
    pub o_f32: i32,
    pub grad_f32: i32,
    pub scale: f32,
    pub scale_log2: f32,
    pub reserved: i32,
}

/// `sizeof(AttnParams)` in kernels/attention.cuh.
pub(crate) const ATTN_PARAMS_BYTES: usize = 176;
const _: () = assert!(std::mem::size_of::<AttnParams>() == ATTN_PARAMS_BYTES);

impl AttnParams {
    /// The bytes the kernel receives.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: AttnParams is repr(C), Copy, made of integers and floats only, with no padding
        // (176 bytes = 16 * 8 + 12 * 4, every field naturally aligned in this order).
        unsafe {
            std::slice::from_raw_parts(self as *const AttnParams as *const u8, ATTN_PARAMS_BYTES)
        }
    }
}
