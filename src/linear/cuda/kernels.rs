//! The compiled variants of the engine's kernel files and the kernels each one holds.

use crate::cuda::compile::Variant;
use crate::cuda::exec::KernelRef;
use crate::tensor::DType;

/// Chunk sizes with a compiled variant.
pub const CHUNK_SIZES: [usize; 2] = [16, 64];
/// Largest key head dim (the recurrent kernels keep K / 8 state rows per thread in registers).
pub const MAX_K: usize = 256;
/// Largest value head dim (tiles of 64 / 32 columns; the bound keeps scratch sizes sane).
pub const MAX_V: usize = 512;

/// `LA_DTYPE` of an input element type.
pub fn dtype_code(dtype: DType) -> Option<u32> {
    match dtype {
        DType::BF16 => Some(0),
        DType::F16 => Some(1),
        DType::F32 => Some(2),
        DType::F64 => None,
    }
}

pub const SUPPORTED_DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

/// linear_chunk.cu for one input dtype, gate shape and chunk size.
pub fn chunk_variant(dtype: DType, vector_gate: bool, chunk: usize) -> Variant {
    Variant::new(
        "linear_chunk.cu",
        &[
            (
                "LA_DTYPE",
                dtype_code(dtype).expect("supported dtype").to_string(),
            ),
            ("LA_GATE_VEC", (vector_gate as u32).to_string()),
            ("LA_BT", chunk.to_string()),
        ],
    )
}

/// linear_recurrent.cu for one input dtype.
pub fn recurrent_variant(dtype: DType) -> Variant {
    Variant::new(
        "linear_recurrent.cu",
        &[(
            "LA_DTYPE",
            dtype_code(dtype).expect("supported dtype").to_string(),
        )],
    )
}

/// linear_util.cu for one input dtype.
pub fn util_variant(dtype: DType) -> Variant {
    Variant::new(
        "linear_util.cu",
        &[(
            "LA_DTYPE",
            dtype_code(dtype).expect("supported dtype").to_string(),
        )],
    )
}

/// Every variant the engine can launch.
pub fn all_variants() -> Vec<Variant> {
    let mut out = Vec::new();
    for dtype in SUPPORTED_DTYPES {
        for vector_gate in [false, true] {
            for chunk in CHUNK_SIZES {
                out.push(chunk_variant(dtype, vector_gate, chunk));
            }
        }
        out.push(recurrent_variant(dtype));
        out.push(util_variant(dtype));
    }
    out
}

/// The kernels of linear_chunk.cu, with their slot in `la_smem_table` (read through
/// `la_smem_query`, listed last).
pub const CHUNK_KERNELS: [(&str, Option<usize>); 10] = [
    ("la_cumsum", None),
    ("la_states", Some(1)),
    ("la_dstates", Some(2)),
    ("la_intra_A", Some(3)),
    ("la_fwd_o", Some(4)),
    ("la_bwd_dv", Some(5)),
    ("la_bwd_dA", Some(6)),
    ("la_bwd_dqk_intra", Some(7)),
    ("la_bwd_dqkg", Some(8)),
    ("la_smem_query", None),
];

/// The kernels of linear_recurrent.cu (static shared memory only).
pub const RECURRENT_KERNELS: [&str; 3] = ["la_rec_fwd", "la_rec_bwd", "la_rec_dg"];

/// The kernels of linear_util.cu.
pub const UTIL_KERNELS: [&str; 7] = [
    "la_gate_grad",
    "la_gate_grad_head",
    "la_pack_ones",
    "la_normalize",
    "la_norm_grad",
    "la_drop_ones",
    "la_value_flags",
];

/// A kernel of linear_chunk.cu by name.
pub fn chunk_kernel<'a>(variant: &'a Variant, name: &'static str) -> KernelRef<'a> {
    let slot = CHUNK_KERNELS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .expect("known chunk kernel");
    KernelRef {
        variant,
        name,
        smem_slot: slot,
    }
}

/// A kernel without dynamic shared memory.
pub fn plain_kernel<'a>(variant: &'a Variant, name: &'static str) -> KernelRef<'a> {
    KernelRef {
        variant,
        name,
        smem_slot: None,
    }
}
