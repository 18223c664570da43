//! WSM, warmup-stable-merge (arXiv 2507.17634): instead of decaying the learning rate, average the
//! last `k + 1` checkpoints `theta_{n+0} .. theta_{n+k}` (oldest first) with coefficients derived
//! from a decay shape `f` on `[0, 1]`:
//! ```text
//! w_i = f(i / (k + 1))          i = 0 ..= k
//! c_k = w_k
//! c_j = w_j - w_{j+1}           1 <= j < k
//! c_0 = 1 - w_1
//! ```
//! The coefficients telescope to 1 and are all `>= 0` for a non-increasing `f` with `f(0) = 1`;
//! linear decay gives the plain mean.

use super::schedule::Shape;

/// The merge coefficients `c_0 ..= c_k` for `k + 1` checkpoints (oldest first) from the decay
/// shape `f`. One checkpoint (`k = 0`) gets coefficient 1.
pub fn merge_coefficients(f: impl Fn(f64) -> f64, k: usize) -> Vec<f64> {
    if k == 0 {
        return vec![1.0];
    }
    let w: Vec<f64> = (0..=k).map(|i| f(i as f64 / (k + 1) as f64)).collect();
    let mut c = vec![0.0; k + 1];
    c[0] = 1.0 - w[1];
    for j in 1..k {
        c[j] = w[j] - w[j + 1];
    }
    c[k] = w[k];
    c
}

/// [`merge_coefficients`] for one of the named decay shapes.
pub fn shape_coefficients(shape: Shape, k: usize) -> Vec<f64> {
    merge_coefficients(|x| shape.decay(x), k)
}

/// `sum_j c_j theta_j` elementwise.
pub fn merge(checkpoints: &[&[f64]], coefficients: &[f64]) -> Vec<f64> {
    assert_eq!(
        checkpoints.len(),
        coefficients.len(),
        "one coefficient per checkpoint"
    );
    assert!(!checkpoints.is_empty(), "merge needs a checkpoint");
    let n = checkpoints[0].len();
    assert!(
        checkpoints.iter().all(|c| c.len() == n),
        "checkpoint sizes differ"
    );
    let mut out = vec![0.0; n];
    for (theta, &c) in checkpoints.iter().zip(coefficients) {
        for (o, &x) in out.iter_mut().zip(theta.iter()) {
            *o += c * x;
        }
    }
    out
}
