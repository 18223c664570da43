//! The compiled variants of kernels/attention.cu and the kernels each one holds.

use crate::cuda::compile::Variant;
use crate::cuda::exec::KernelRef;
use crate::tensor::DType;

/// Head dims with a compiled variant.
pub const HEAD_DIMS: [usize; 2] = [64, 128];
/// Block sizes (the plan's `block_q` and `block_k`) with a compiled variant.
pub const BLOCK_SIZES: [usize; 2] = [64, 128];
/// Input dtypes of the kernels (mma.sync m16n8k16 operands).
pub const SUPPORTED_DTYPES: [DType; 2] = [DType::BF16, DType::F16];
/// The file every variant compiles.
pub const FILE: &str = "attention.cu";

/// `LA_DTYPE` of an input element type.
pub fn dtype_code(dtype: DType) -> Option<u32> {
    match dtype {
        DType::BF16 => Some(0),
        DType::F16 => Some(1),
        DType::F32 | DType::F64 => None,
    }
}

/// attention.cu for one input dtype, head dim and block shape. Causal masking is a run-time flag
/// (it only touches the partial blocks).
pub fn variant(dtype: DType, head_dim: usize, block_q: usize, block_k: usize) -> Variant {
    Variant::new(
        FILE,
        &[
            (
                "LA_DTYPE",
                dtype_code(dtype).expect("supported dtype").to_string(),
            ),
            ("ATT_D", head_dim.to_string()),
            ("ATT_BQ", block_q.to_string()),
            ("ATT_BK", block_k.to_string()),
        ],
    )
}

/// Every variant the library can launch (2 dtypes x 2 head dims x 2 x 2 block shapes).
pub fn all_variants() -> Vec<Variant> {
    let mut out = Vec::new();
    for dtype in SUPPORTED_DTYPES {
        for d in HEAD_DIMS {
            for bq in BLOCK_SIZES {
                for bk in BLOCK_SIZES {
                    out.push(variant(dtype, d, bq, bk));
                }
            }
        }
    }
    out
}

/// The kernels of attention.cu with their slot in `la_smem_table`.
pub const KERNELS: [(&str, Option<usize>); 4] = [
    ("attn_fwd", Some(0)),
    ("attn_bwd_dq", Some(1)),
    ("attn_bwd_dkdv", Some(2)),
    ("attn_bwd_delta", None),
];

/// A kernel of attention.cu by name.
pub fn kernel<'a>(variant: &'a Variant, name: &'static str) -> KernelRef<'a> {
    let slot = KERNELS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .expect("known attention kernel");
    KernelRef {
        variant,
        name,
        smem_slot: slot,
    }
}

/// Threads of a CTA of the query-block kernels (attn_fwd, attn_bwd_dq): 4 warps of `block_q / 4`
/// rows (Q_THREADS in attention.cu).
pub const QUERY_THREADS: u32 = 128;

/// Threads of a CTA of attn_bwd_dkdv: one warp per 16 keys.
pub fn key_threads(block_k: usize) -> u32 {
    (block_k / 16 * 32) as u32
}

/// Threads of attn_bwd_delta (8 lanes per row, 32 rows per CTA).
pub const DELTA_THREADS: u32 = 256;
/// Rows of attn_bwd_delta per CTA.
pub const DELTA_ROWS: usize = 32;
