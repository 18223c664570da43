//! Bit recipes of the 16-bit copies: known values, and exact unbiasedness of stochastic rounding
//! (averaging over every value of the random bits that matter gives back x exactly).

use linattn_reference::optim::rounding::{
    bf16_nearest, bf16_stochastic, bf16_to_f64, f16_nearest, f16_stochastic, f16_to_f64,
};

#[test]
fn bf16_nearest_even_known_values() {
    assert_eq!(bf16_nearest(1.0), 0x3f80);
    assert_eq!(bf16_nearest(-2.0), 0xc000);
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even 1.0.
    assert_eq!(bf16_nearest(f32::from_bits(0x3f80_8000)), 0x3f80);
    // 1 + 3 * 2^-8 is halfway between 0x3f81 and 0x3f82: ties to even 0x3f82.
    assert_eq!(bf16_nearest(f32::from_bits(0x3f81_8000)), 0x3f82);
    assert_eq!(bf16_nearest(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(bf16_nearest(f32::INFINITY), 0x7f80);
    assert_eq!(bf16_nearest(f32::NAN) & 0x7fc0, 0x7fc0);
    // The largest f32 rounds up to infinity.
    assert_eq!(bf16_nearest(f32::MAX), 0x7f80);
}

#[test]
fn f16_nearest_even_known_values() {
    assert_eq!(f16_nearest(1.0), 0x3c00);
    assert_eq!(f16_nearest(-1.5), 0xbe00);
    assert_eq!(f16_nearest(65504.0), 0x7bff);
    // 65520 is halfway between 65504 and 2^16 (infinity): ties to even = infinity.
    assert_eq!(f16_nearest(65520.0), 0x7c00);
    assert_eq!(f16_nearest(65519.0), 0x7bff);
    assert_eq!(f16_nearest(2f32.powi(-14)), 0x0400);
    assert_eq!(f16_nearest(2f32.powi(-24)), 0x0001);
    // 2^-25 is halfway between 0 and the smallest subnormal: ties to even 0.
    assert_eq!(f16_nearest(2f32.powi(-25)), 0x0000);
    assert_eq!(f16_nearest(3.0 * 2f32.powi(-25)), 0x0002);
    assert_eq!(f16_nearest(-1e-30), 0x8000);
    // The largest subnormal plus half a spacing rounds into the smallest normal.
    assert_eq!(f16_nearest(1023.5 * 2f32.powi(-24)), 0x0400);
    assert_eq!(f16_nearest(f32::NEG_INFINITY), 0xfc00);
    assert_eq!(f16_nearest(f32::NAN) & 0x7e00, 0x7e00);
    assert_eq!(f16_to_f64(0x3c00), 1.0);
    assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
}

#[test]
fn bf16_stochastic_is_exactly_unbiased() {
    for &x in &[1.0f32 + 3e-4, -0.337, 1234.567, 1e-30, -7.25e20] {
        let mut sum = 0.0;
        for r in 0..=0xffffu32 {
            sum += bf16_to_f64(bf16_stochastic(x, r));
        }
        assert_eq!(sum / 65536.0, x as f64, "x = {x}");
    }
    // Representable values never move.
    assert_eq!(bf16_stochastic(1.5, 0xffff), bf16_nearest(1.5));
}

#[test]
fn f16_stochastic_is_exactly_unbiased() {
    // Normal values: the 13 dropped bits; subnormal: up to 20 dropped bits here.
    for &x in &[1.0f32 + 3e-4, -0.337, 1234.567, 3.3e-6, -1.1e-7] {
        let exponent = ((x.to_bits() >> 23) & 0xff) as i32 - 127;
        let dropped = if exponent >= -14 {
            13
        } else {
            (-1 - exponent) as u32
        };
        let count = 1u32 << dropped;
        let mut sum = 0.0;
        for r in 0..count {
            sum += f16_to_f64(f16_stochastic(x, r));
        }
        assert_eq!(sum / count as f64, x as f64, "x = {x}");
    }
}
