//! LION (bidirectional linear attention) front-ends over the engine: LIT (no decay), D (one fixed
//! decay per head) and S (a selective decay per token), their feature maps, and the mapping from the
//! released LION code's decay convention to ours.
//!
//! LION computes `o_i = sum_j A_ij v_j / (sum_j A_ij + eps)` with `A_ij = scale q_i . k_j M_ij`, where
//! `M` is the symmetric decay mask of ops.md section 1. Positive feature maps (applied by the caller:
//! [`elu_plus_one`] for LIT, [`silu_shifted_normalized`] for D and S) keep the denominator positive.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::linear::{self, Form, Gate, Grads, LinearAttention, Output};
use crate::tensor::Tensor;
use crate::validation::expect_rank;

/// LION's default normalisation eps.
pub const DEFAULT_EPS: f64 = 1e-6;

/// The three LION variants.
#[derive(Clone, Copy, Debug)]
pub enum Lion<'a> {
    /// No decay: plain non-causal linear attention with normalisation.
    Lit,
    /// One decay per head, `[H]`: `M_ij = exp(|i - j| g_h)`.
    D { g: &'a Tensor },
    /// A decay per token and head, `[B, T, H]`; `g_bwd` (same shape) above the diagonal, `g` if `None`.
    S {
        g: &'a Tensor,
        g_bwd: Option<&'a Tensor>,
    },
}

impl<'a> Lion<'a> {
    /// The engine problem of this variant with LION's defaults (scale `K^-0.5`, normalisation
    /// with eps 1e-6). Adjust it with the `with_*` methods of [`LinearAttention`].
    pub fn problem(&self, q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> LinearAttention<'a> {
        let p = LinearAttention::bidirectional(q, k, v).with_normalize(DEFAULT_EPS);
        match *self {
            Lion::Lit => p,
            Lion::D { g } => p.with_gate(Gate::PerHead(g)),
            Lion::S { g, g_bwd } => {
                let p = p.with_gate(Gate::Scalar(g));
                match g_bwd {
                    Some(gb) => p.with_gate_bwd(Gate::Scalar(gb)),
                    None => p,
                }
            }
        }
    }

    pub fn forward(
        &self,
        backend: &Backend,
        q: &'a Tensor,
        k: &'a Tensor,
        v: &'a Tensor,
        form: Form,
    ) -> Result<Output> {
        linear::forward(backend, &self.problem(q, k, v), form)
    }

    pub fn backward(
        &self,
        backend: &Backend,
        q: &'a Tensor,
        k: &'a Tensor,
        v: &'a Tensor,
        form: Form,
        d_o: &Tensor,
    ) -> Result<Grads> {
        linear::backward(backend, &self.problem(q, k, v), form, d_o, None)
    }
}

/// The released LION code multiplies `prod_{m=j}^{i-1} lambda_m` below the diagonal and
/// `prod_{m=i+1}^{j} lambda_m` above it. In our convention (`M_ij = exp(sum_{m=j+1..i} g_m)` below,
/// `exp(sum_{m=i+1..j} gb_m)` above) that is `g = shift_right(log lambda)` along T (first entry 0)
/// and `gb = log lambda`. Takes `log_lambda` `[B, T, H]` (all `<= 0`) and returns `(g, g_bwd)`.
pub fn gates_from_released_code(log_lambda: &Tensor) -> Result<(Tensor, Tensor)> {
    let shape = expect_rank("log_lambda", log_lambda, &["B", "T", "H"])?.to_vec();
    crate::validation::expect_log_decay("log_lambda", log_lambda)?;
    let (b, t, h) = (shape[0], shape[1], shape[2]);
    let gb = log_lambda.to_f64_vec();
    let mut g = vec![0.0; gb.len()];
    for bb in 0..b {
        for tt in 1..t {
            for hh in 0..h {
                g[(bb * t + tt) * h + hh] = gb[(bb * t + tt - 1) * h + hh];
            }
        }
    }
    // Computed in f64, returned in the input's dtype (a shift: no rounding beyond the input's).
    let dtype = log_lambda.dtype();
    Ok((
        Tensor::f64_unchecked(shape.clone(), g).to_dtype(dtype),
        Tensor::f64_unchecked(shape, gb).to_dtype(dtype),
    ))
}

/// `elu(x) + 1`, LION-LIT's feature map (positive, so the normaliser stays positive). Computed in
/// f64, returned in `x`'s dtype.
pub fn elu_plus_one(x: &Tensor) -> Tensor {
    let y = x
        .to_f64_vec()
        .into_iter()
        .map(|x| if x > 0.0 { x + 1.0 } else { x.exp() })
        .collect();
    Tensor::f64_unchecked(x.shape().to_vec(), y).to_dtype(x.dtype())
}

/// `(silu(x) + 0.5) / ||silu(x) + 0.5||_2` over the last dimension, LION-D/S's feature map.
/// Computed in f64, returned in `x`'s dtype.
pub fn silu_shifted_normalized(x: &Tensor) -> Result<Tensor> {
    let d = *x
        .shape()
        .last()
        .ok_or_else(|| Error::shape("x", "rank >= 1", x.shape()))?;
    if d == 0 {
        return Err(Error::shape("x", "last dimension >= 1", x.shape()));
    }
    let mut y: Vec<f64> = x
        .to_f64_vec()
        .into_iter()
        .map(|x| x / (1.0 + (-x).exp()) + 0.5)
        .collect();
    for row in y.chunks_mut(d) {
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        // silu(x) >= -0.2785 > -0.5, so every entry is positive and the norm is never zero.
        for v in row.iter_mut() {
            *v /= norm;
        }
    }
    Ok(Tensor::f64_unchecked(x.shape().to_vec(), y).to_dtype(x.dtype()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_code_gate_shift() {
        // B=1, T=3, H=2: g is log_lambda moved one step later, first entry 0; g_bwd is log_lambda.
        let ll = Tensor::from_f64(vec![1, 3, 2], vec![-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]).unwrap();
        let (g, gb) = gates_from_released_code(&ll).unwrap();
        assert_eq!(g.to_f64_vec(), vec![0.0, 0.0, -1.0, -2.0, -3.0, -4.0]);
        assert_eq!(gb.to_f64_vec(), ll.to_f64_vec());
        let bad = Tensor::from_f64(vec![1, 1, 1], vec![0.5]).unwrap();
        assert!(matches!(
            gates_from_released_code(&bad),
            Err(Error::InvalidGate { .. })
        ));
    }

    /// Helpers keep their input's dtype, so their outputs go to any backend as they are.
    #[test]
    fn helpers_keep_the_input_dtype() {
        use crate::tensor::DType;
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            let x = Tensor::from_f64(vec![2, 3], vec![-3.0, -1.0, 0.0, 1.0, 2.0, -0.5])
                .unwrap()
                .to_dtype(dtype);
            assert_eq!(elu_plus_one(&x).dtype(), dtype);
            assert_eq!(silu_shifted_normalized(&x).unwrap().dtype(), dtype);
            let ll = Tensor::from_f64(vec![1, 3, 2], vec![-1.0; 6])
                .unwrap()
                .to_dtype(dtype);
            let (g, gb) = gates_from_released_code(&ll).unwrap();
            assert_eq!((g.dtype(), gb.dtype()), (dtype, dtype));
        }
    }

    #[test]
    fn feature_maps_are_positive() {
        let x = Tensor::from_f64(vec![2, 3], vec![-30.0, -1.278, 0.0, 1.0, 5.0, -0.5]).unwrap();
        assert!(elu_plus_one(&x).to_f64_vec().iter().all(|&v| v > 0.0));
        let y = silu_shifted_normalized(&x).unwrap().to_f64_vec();
        assert!(y.iter().all(|&v| v > 0.0));
        for row in y.chunks(3) {
            assert!((row.iter().map(|v| v * v).sum::<f64>() - 1.0).abs() < 1e-12);
        }
    }
}
