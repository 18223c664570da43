//! Causal front-ends over the engine: GLA (vector gate), RetNet (a fixed decay per head) and
//! Mamba-2-style selective decay (a scalar gate per token). Each is a way to build the gate; the
//! computation is always the one engine.

use super::{Gate, LinearAttention};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use crate::validation::{expect_finite, expect_rank, expect_shape};

/// GLA: causal, vector gate `g` `[B, T, H, K]` (flash-linear-attention's `chunk_gla` semantics).
pub fn gla<'a>(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor, g: &'a Tensor) -> LinearAttention<'a> {
    LinearAttention::causal(q, k, v).with_gate(Gate::Vector(g))
}

/// RetNet's per-head decays `gamma_h = 1 - 2^(-5 - h)` as log decays `[H]`, in `dtype` (that of
/// the q, k, v they go with; computed in f64).
pub fn retnet_gates(num_heads: usize, dtype: DType) -> Tensor {
    let g = (0..num_heads)
        .map(|h| (-(2f64.powi(-5 - h as i32))).ln_1p())
        .collect();
    Tensor::f64_unchecked(vec![num_heads], g).to_dtype(dtype)
}

/// Mamba-2's selective decay as a scalar gate: `g[b,t,h] = -exp(a_log[h]) * softplus(dt[b,t,h])`
/// (`dt` already includes its bias). Always `<= 0` (rounding a negative value to a narrower
/// dtype keeps it `<= 0`). Returns `[B, T, H]` in `dt`'s dtype, computed in f64.
pub fn mamba2_gate(a_log: &Tensor, dt: &Tensor) -> Result<Tensor> {
    let shape = expect_rank("dt", dt, &["B", "T", "H"])?.to_vec();
    let h = shape[2];
    expect_shape("a_log", a_log, &["H"], &[h])?;
    expect_finite("a_log", a_log)?;
    expect_finite("dt", dt)?;
    let a: Vec<f64> = a_log.to_f64_vec().iter().map(|x| -x.exp()).collect();
    if let Some(i) = a.iter().position(|x| !x.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "a_log[{i}] is too large: -exp(a_log) overflows"
        )));
    }
    let softplus = |x: f64| if x > 20.0 { x } else { x.exp().ln_1p() };
    let g = dt
        .to_f64_vec()
        .iter()
        .enumerate()
        .map(|(i, &x)| a[i % h] * softplus(x))
        .collect();
    Ok(Tensor::f64_unchecked(shape, g).to_dtype(dt.dtype()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retnet_decays() {
        let g = retnet_gates(3, DType::F64).to_f64_vec();
        assert_eq!(retnet_gates(3, DType::F32).dtype(), DType::F32);
        for (h, g) in g.iter().enumerate() {
            let gamma = 1.0 - 2f64.powi(-5 - h as i32);
            assert!((g.exp() - gamma).abs() < 1e-15);
        }
    }

    #[test]
    fn mamba2_gate_values() {
        let a_log = Tensor::from_f64(vec![2], vec![0.0, 2f64.ln()]).unwrap();
        let dt = Tensor::from_f64(vec![1, 1, 2], vec![0.0, 30.0]).unwrap();
        let g = mamba2_gate(&a_log, &dt).unwrap().to_f64_vec();
        let dt32 = dt.to_dtype(DType::F32);
        assert_eq!(mamba2_gate(&a_log, &dt32).unwrap().dtype(), DType::F32);
        assert!((g[0] + 2f64.ln()).abs() < 1e-15); // -1 * softplus(0)
        assert!((g[1] + 60.0).abs() < 1e-12); // -2 * 30
        let bad = Tensor::from_f64(vec![1, 1, 3], vec![0.0; 3]).unwrap();
        assert!(matches!(
            mamba2_gate(&a_log, &bad),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
