//! Row-sum normalisation through a ones column (kernels.md): the engine runs on `v' = [v | 1]`
//! (`V + 1` columns), so column `V` of its output is the denominator `sum_j A_ij` for free.
//! These kernels turn `o' = [num | den]` into `o = num / (den + eps)` and, backward, turn `do`
//! into the cotangent of `o'`: `d num = do / (den + eps)`,
//! `d den = -(do . num) / (den + eps)^2 = -(do . o) / (den + eps)`.

use cubecl::prelude::*;

use crate::cube::launch::thread_index;

/// `o[r, v] = o'[r, v] / (o'[r, V] + eps)` over `[rows * H, V]`.
#[cube(launch_unchecked)]
pub fn normalize_output(wide: &[f32], o: &mut [f32], rows_heads: usize, dv: usize, eps: f32) {
    let id = thread_index();
    if id < rows_heads * dv {
        let r = id / dv;
        let vv = id % dv;
        let den = wide[r * (dv + 1) + dv] + eps;
        o[id] = wide[r * (dv + 1) + vv] / den;
    }
}

/// `do' = [do / (den + eps) | -(do . num) / (den + eps)^2]`, one thread per `(row, head)`.
#[cube(launch_unchecked)]
pub fn normalize_grad(
    wide: &[f32],
    d_o: &[f32],
    d_wide: &mut [f32],
    rows_heads: usize,
    dv: usize,
    eps: f32,
) {
    let r = thread_index();
    if r < rows_heads {
        let den = wide[r * (dv + 1) + dv] + eps;
        let inv = 1.0f32 / den;
        let mut dot = 0.0f32;
        for vv in 0..dv {
            let gv = d_o[r * dv + vv];
            dot += gv * wide[r * (dv + 1) + vv];
            d_wide[r * (dv + 1) + vv] = gv * inv;
        }
        d_wide[r * (dv + 1) + dv] = -dot * inv * inv;
    }
}
