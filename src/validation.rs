//! Host-side input checks shared by every op family. Each returns the typed error that names the
//! offending tensor.

use crate::error::{Error, Result};
use crate::tensor::{DType, Shaped, Tensor};

/// Checks that `t` has exactly `expected` (named dims like `["B", "T", "H", "K"]` for the message).
pub(crate) fn expect_shape<T: Shaped + ?Sized>(
    name: &str,
    t: &T,
    names: &[&str],
    expected: &[usize],
) -> Result<()> {
    if t.shape() != expected {
        return Err(Error::shape(name, describe(names, expected), t.shape()));
    }
    Ok(())
}

/// `[B, T, H, K] = [2, 64, 4, 32]`.
pub(crate) fn describe(names: &[&str], dims: &[usize]) -> String {
    format!("[{}] = {dims:?}", names.join(", "))
}

/// Checks the rank and returns the shape.
pub(crate) fn expect_rank<'t, T: Shaped + ?Sized>(
    name: &str,
    t: &'t T,
    names: &[&str],
) -> Result<&'t [usize]> {
    if t.shape().len() != names.len() {
        return Err(Error::shape(
            name,
            format!("rank {} [{}]", names.len(), names.join(", ")),
            t.shape(),
        ));
    }
    Ok(t.shape())
}

/// Rejects NaN and infinities.
pub(crate) fn expect_finite(name: &str, t: &Tensor) -> Result<()> {
    match t.first_non_finite() {
        Some((index, value)) => Err(Error::NonFinite {
            tensor: name.to_string(),
            index,
            value,
        }),
        None => Ok(()),
    }
}

/// Gates are natural-log decays: finite and `<= 0`.
pub(crate) fn expect_log_decay(name: &str, t: &Tensor) -> Result<()> {
    let bad = t
        .to_f64_vec()
        .into_iter()
        .enumerate()
        .find(|(_, g)| !(g.is_finite() && *g <= 0.0));
    match bad {
        Some((index, value)) => Err(Error::InvalidGate {
            tensor: name.to_string(),
            index,
            value,
        }),
        None => Ok(()),
    }
}

/// The error of a buffer that a device-side value check flagged, from the host check of its values
/// read back (the host's gate check for a gate, else its finiteness check): the device path names the
/// same element as the host path would. A flag the host check does not confirm is still reported
/// (element 0, NaN) rather than passed.
pub fn flagged_values_error(name: &str, gate: bool, values: &Tensor) -> Error {
    let host = if gate {
        expect_log_decay(name, values)
    } else {
        expect_finite(name, values)
    };
    host.err().unwrap_or_else(|| {
        let (tensor, index, value) = (name.to_string(), 0, f64::NAN);
        if gate {
            Error::InvalidGate {
                tensor,
                index,
                value,
            }
        } else {
            Error::NonFinite {
                tensor,
                index,
                value,
            }
        }
    })
}

/// Sizes that must be at least one.
pub(crate) fn expect_nonzero<T: Shaped + ?Sized>(name: &str, t: &T) -> Result<()> {
    if t.shape().contains(&0) {
        return Err(Error::shape(name, "every dimension >= 1", t.shape()));
    }
    Ok(())
}

/// Tensors that must share one dtype (the kernels read them with one element type).
pub(crate) fn expect_same_dtype<T: Shaped + ?Sized>(tensors: &[(&str, &T)]) -> Result<DType> {
    let (first_name, first) = tensors[0];
    for &(name, t) in &tensors[1..] {
        if t.dtype() != first.dtype() {
            return Err(Error::InvalidArgument(format!(
                "`{name}` is {} but `{first_name}` is {}; these inputs must share one dtype",
                t.dtype(),
                first.dtype()
            )));
        }
    }
    Ok(first.dtype())
}

/// FlashAttention-style packing offsets: `[N + 1]`, starting at 0, non-decreasing, ending at the
/// packed length `total`. Empty segments are allowed. Returns them as `usize`.
pub(crate) fn parse_cu_seqlens(cu: &[i64], total: usize) -> Result<Vec<usize>> {
    if cu.len() < 2 {
        return Err(Error::BadCuSeqlens(format!(
            "needs at least 2 entries ([0, T]), got {}",
            cu.len()
        )));
    }
    if cu[0] != 0 {
        return Err(Error::BadCuSeqlens(format!(
            "must start at 0, starts at {}",
            cu[0]
        )));
    }
    for (i, w) in cu.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(Error::BadCuSeqlens(format!(
                "must be non-decreasing: entry {} is {} after {}",
                i + 1,
                w[1],
                w[0]
            )));
        }
    }
    let last = *cu.last().expect("len >= 2");
    if last != total as i64 {
        return Err(Error::BadCuSeqlens(format!(
            "must end at the packed length T = {total}, ends at {last}"
        )));
    }
    Ok(cu.iter().map(|&x| x as usize).collect())
}

/// A scale must be finite and nonzero.
pub(crate) fn expect_scale(scale: f64) -> Result<f64> {
    if !scale.is_finite() || scale == 0.0 {
        return Err(Error::InvalidArgument(format!(
            "scale must be finite and nonzero, got {scale}"
        )));
    }
    Ok(scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cu_seqlens_rules() {
        assert_eq!(parse_cu_seqlens(&[0, 0, 16], 16).unwrap(), vec![0, 0, 16]);
        assert!(matches!(
            parse_cu_seqlens(&[], 0),
            Err(Error::BadCuSeqlens(_))
        ));
        assert!(matches!(
            parse_cu_seqlens(&[0], 0),
            Err(Error::BadCuSeqlens(_))
        ));
        assert!(matches!(
            parse_cu_seqlens(&[1, 16], 16),
            Err(Error::BadCuSeqlens(_))
        ));
        assert!(matches!(
            parse_cu_seqlens(&[0, 9, 8, 16], 16),
            Err(Error::BadCuSeqlens(_))
        ));
        assert!(matches!(
            parse_cu_seqlens(&[0, 15], 16),
            Err(Error::BadCuSeqlens(_))
        ));
    }

    #[test]
    fn gate_rules() {
        let ok = Tensor::from_f32(vec![2], vec![0.0, -3.0]).unwrap();
        assert!(expect_log_decay("g", &ok).is_ok());
        let pos = Tensor::from_f32(vec![2], vec![-1.0, 0.5]).unwrap();
        match expect_log_decay("g", &pos) {
            Err(Error::InvalidGate { index: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
        let nan = Tensor::from_f32(vec![1], vec![f32::NAN]).unwrap();
        assert!(matches!(
            expect_log_decay("g", &nan),
            Err(Error::InvalidGate { .. })
        ));
    }
}
