//! f32 to 16-bit floats, bit for bit, and the hash that drives stochastic rounding. The GPU kernels
//! implement exactly these integer recipes, so their copies can be compared bit for bit.
//!
//! Round-to-nearest-even matches `half::bf16::from_f32` / `half::f16::from_f32`. Stochastic
//! rounding adds uniform random bits below the kept precision and truncates toward zero (on the
//! magnitude), so `x` rounds away from zero with probability equal to its distance from the
//! truncated value in units of the spacing: unbiased, `E[round(x)] = x`, wherever the target
//! format has a fixed spacing around `x` (everywhere except overflow, and f16 inputs below
//! `2^-32`, which flush to zero).

/// Lowbias32 (C. Wellons' integer hash): a bijection of u32 with full avalanche.
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// The per-call key of stochastic rounding: one per optimizer call `call` (0-based), so every
/// step draws fresh bits without any host-side state.
pub fn call_key(seed: u32, call: u32) -> u32 {
    mix32(seed ^ mix32(call.wrapping_add(0x9e37_79b9)))
}

/// The random bits of element `index` (its position in the flat parameter arena, modulo 2^32)
/// under the call key `key`.
pub fn element_bits(key: u32, index: u32) -> u32 {
    mix32(index ^ key)
}

const F32_ABS: u32 = 0x7fff_ffff;
const F32_INF: u32 = 0x7f80_0000;

/// f32 to bf16 bits, round to nearest even. NaN stays NaN (quiet, sign kept).
pub fn bf16_nearest(x: f32) -> u16 {
    let bits = x.to_bits();
    if bits & F32_ABS > F32_INF {
        return ((bits >> 16) | 0x0040) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// f32 to bf16 bits, stochastic rounding with the low 16 bits of `random`. Infinities stay
/// infinite; values above the largest bf16 may round to infinity.
pub fn bf16_stochastic(x: f32, random: u32) -> u16 {
    let bits = x.to_bits();
    if bits & F32_ABS > F32_INF {
        return ((bits >> 16) | 0x0040) as u16;
    }
    if bits & F32_ABS == F32_INF {
        return (bits >> 16) as u16;
    }
    (bits.wrapping_add(random & 0xffff) >> 16) as u16
}

/// f32 to f16 bits; `random = None` rounds to nearest even, `Some(r)` stochastically with the low
/// bits of `r`.
fn f16_round(x: f32, random: Option<u32>) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let abs = bits & F32_ABS;
    if abs > F32_INF {
        return (sign | 0x7e00) as u16;
    }
    let exponent = (abs >> 23) as i32 - 127;
    if exponent > 15 {
        return (sign | 0x7c00) as u16;
    }
    // Split the magnitude into the kept part `kept` (in units of the f16 spacing at this
    // exponent) and the dropped `shift` low bits `rest`.
    let (kept, rest, shift) = if exponent >= -14 {
        let mantissa = abs & 0x007f_ffff;
        let kept = (((exponent + 15) as u32) << 10) | (mantissa >> 13);
        (kept, mantissa & 0x1fff, 13u32)
    } else {
        // Subnormal f16: the value is `m * 2^-24`; with the implicit bit the f32 significand is
        // `s * 2^(e - 23)`, so `m = s >> (-1 - e)`.
        let shift = (-1 - exponent) as u32;
        if shift > 31 {
            return sign as u16;
        }
        let significand = (abs & 0x007f_ffff) | 0x0080_0000;
        let kept = significand >> shift;
        (kept, significand & ((1u32 << shift) - 1), shift)
    };
    let up = match random {
        None => {
            let half = 1u32 << (shift - 1);
            rest > half || (rest == half && kept & 1 == 1)
        }
        Some(r) => {
            let mask = (1u64 << shift) - 1;
            (r as u64 & mask) + rest as u64 > mask
        }
    };
    // A carry out of the mantissa moves into the exponent: the largest subnormal rounds to the
    // smallest normal, 65504 + spacing to infinity.
    (sign | (kept + up as u32)) as u16
}

/// f32 to f16 bits, round to nearest even.
pub fn f16_nearest(x: f32) -> u16 {
    f16_round(x, None)
}

/// f32 to f16 bits, stochastic rounding.
pub fn f16_stochastic(x: f32, random: u32) -> u16 {
    f16_round(x, Some(random))
}

/// bf16 bits to f64 (exact).
pub fn bf16_to_f64(bits: u16) -> f64 {
    f32::from_bits((bits as u32) << 16) as f64
}

/// f16 bits to f64 (exact).
pub fn f16_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = ((bits >> 10) & 0x1f) as i32;
    let mantissa = (bits & 0x3ff) as f64;
    sign * match exponent {
        0 => mantissa * 2f64.powi(-24),
        31 if mantissa == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + mantissa / 1024.0) * 2f64.powi(e - 15),
    }
}
