//! Row-sum normalisation through a ones column (kernels.md): the engine runs on `v' = [v | 1]`
//! (`V + 1` columns), so column `V` of its output is the denominator `sum_j A_ij` for free.
//!
//! **The diagonal is kept apart.** With normalisation every pass runs strict, so the engine
//! returns the off-diagonal sums `num_off = sum_{j != i} A_ij v_j`, `den_off = sum_{j != i} A_ij`,
//! and these kernels add the diagonal `A_ii = scale q_i . k_i` themselves:
//! `o_i = (num_off + A_ii v_i) / (den_off + A_ii + eps)`. The reason is the backward pass: with
//! strong decays `o_i ~ v_i` and the true gradient through `A_ii`,
//! `dL/dA_ii = do_i . (v_i - o_i) / den`, is tiny; formed from `o_i` it would be the difference of
//! two O(1) numbers, with an error of an ulp of `v_i` (we measured `7e-4` relative on `dq` for
//! `g ~ -8` per step). Written as `do_i . (v_i (den_off + eps) - num_off) / den^2` no such
//! cancellation happens. The off-diagonal pairs go through the engine's backward with the
//! cotangent of `o' = [num_off | den_off]`: `d num = do / den`, `d den = -(do . o) / den`.

use cubecl::prelude::*;

use crate::cube::launch::thread_index;

/// `o[r, v] = (o'[r, v] + A_rr v[r, v]) / (o'[r, V] + A_rr + eps)`, one thread per `(row, head)`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn normalize_output(
    wide: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    rows_heads: usize,
    dk: usize,
    dv: usize,
    scale: f32,
    eps: f32,
) {
    let r = thread_index();
    if r < rows_heads {
        let mut diag = 0.0f32;
        for kk in 0..dk {
            diag += q[r * dk + kk] * k[r * dk + kk];
        }
        diag *= scale;
        let den = wide[r * (dv + 1) + dv] + diag + eps;
        for vv in 0..dv {
            o[r * dv + vv] = (wide[r * (dv + 1) + vv] + diag * v[r * dv + vv]) / den;
        }
    }
}

/// The cotangent of the engine's off-diagonal output, `do' = [do / den | -(do . o) / den]`, one
/// thread per `(row, head)`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn normalize_grad(
    wide: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
    d_wide: &mut [f32],
    rows_heads: usize,
    dk: usize,
    dv: usize,
    scale: f32,
    eps: f32,
) {
    let r = thread_index();
    if r < rows_heads {
        let mut diag = 0.0f32;
        for kk in 0..dk {
            diag += q[r * dk + kk] * k[r * dk + kk];
        }
        diag *= scale;
        let inv = 1.0f32 / (wide[r * (dv + 1) + dv] + diag + eps);
        let mut do_o = 0.0f32;
        for vv in 0..dv {
            let gv = d_o[r * dv + vv];
            do_o += gv * (wide[r * (dv + 1) + vv] + diag * v[r * dv + vv]) * inv;
            d_wide[r * (dv + 1) + vv] = gv * inv;
        }
        d_wide[r * (dv + 1) + dv] = -do_o * inv;
    }
}

/// Adds the diagonal's gradients, one thread per `(row, head)`:
/// `dA = do . (v (den_off + eps) - num_off) / den^2`, `dq += scale dA k`, `dk += scale dA q`,
/// `dv += A_ii do / den` (into the first `V` columns of the wide `dv`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn normalize_diag_grad(
    wide: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
    dq: &mut [f32],
    dkey: &mut [f32],
    dv_wide: &mut [f32],
    rows_heads: usize,
    dk: usize,
    dv: usize,
    scale: f32,
    eps: f32,
) {
    let r = thread_index();
    if r < rows_heads {
        let mut diag = 0.0f32;
        for kk in 0..dk {
            diag += q[r * dk + kk] * k[r * dk + kk];
        }
        diag *= scale;
        let den_off = wide[r * (dv + 1) + dv] + eps;
        let inv = 1.0f32 / (den_off + diag);
        let mut da = 0.0f32;
        for vv in 0..dv {
            let gv = d_o[r * dv + vv];
            da += gv * (v[r * dv + vv] * den_off - wide[r * (dv + 1) + vv]);
            dv_wide[r * (dv + 1) + vv] += diag * gv * inv;
        }
        da *= inv * inv * scale;
        for kk in 0..dk {
            let qv = q[r * dk + kk];
            let kv = k[r * dk + kk];
            dq[r * dk + kk] += da * kv;
            dkey[r * dk + kk] += da * qv;
        }
    }
}
