//! Naive, obviously-correct f64 CPU implementations of every linattn op and form, with analytic
//! gradients. Everything else in linattn is tested against this crate.
//!
//! Conventions (see `shared/spec/ops.md` in the project): tensors are flat row-major `[B, T, H, D]`
//! slices (element `(b,t,h,d)` at `((b*T + t)*H + h)*D + d`), states `[B, H, K, V]` (or `[N, H, K, V]`
//! with variable length), gates are natural-log decays `<= 0`.
//!
//! The functions here assume validated input (the `linattn` crate validates once, on the host, and
//! returns typed errors). They `assert!` their preconditions, so a misuse panics loudly instead of
//! returning a wrong number: this crate is a test oracle, not a user-facing API.

pub mod attention;
pub mod block_mask;
pub mod lightnet;
pub mod linear;
pub mod optim;
pub mod radial;
pub mod testing;

/// Relative RMS error `||a - b||_2 / ||b||_2` used by every test of the project.
///
/// Returns 0 when both are all zero, `inf` when the reference is zero but `a` is not, and NaN when
/// either contains NaN (so that a NaN always fails a `<=` threshold).
pub fn rel_rms(a: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(a.len(), reference.len(), "rel_rms: length mismatch");
    let mut num = 0.0;
    let mut den = 0.0;
    for (&x, &r) in a.iter().zip(reference) {
        if x.is_nan() || r.is_nan() {
            return f64::NAN;
        }
        num += (x - r) * (x - r);
        den += r * r;
    }
    if num == 0.0 {
        0.0
    } else if den == 0.0 {
        f64::INFINITY
    } else {
        (num / den).sqrt()
    }
}

/// Largest absolute elementwise difference (NaN if either side holds a NaN).
pub fn max_abs_diff(a: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(a.len(), reference.len(), "max_abs_diff: length mismatch");
    let mut m: f64 = 0.0;
    for (&x, &r) in a.iter().zip(reference) {
        let d = (x - r).abs();
        if d.is_nan() {
            return f64::NAN;
        }
        m = m.max(d);
    }
    m
}

/// The project's pass rule (ops.md): pass if the max abs error is <= 1e-6, else if the relative
/// RMS is <= `threshold`; NaN always fails.
pub fn within_tolerance(a: &[f64], reference: &[f64], threshold: f64) -> bool {
    let abs = max_abs_diff(a, reference);
    if abs.is_nan() {
        return false;
    }
    abs <= 1e-6 || rel_rms(a, reference) <= threshold
}
