//! The CubeCL kernels of the fused step and of WSM merging.
//!
//! Data layout: every tensor of a parameter group lives in one flat f32 arena, each tensor starting
//! at a multiple of 4 elements (zero padding in between), so the kernels move `Vector<f32, 4>`
//! "quads". The arena is cut into chunks of at most [`CHUNK_QUADS`] quads that never straddle two
//! tensors; the chunk table holds, per chunk, `[start_lo, start_hi, len, flags]` (u32 words; the
//! start is a 64-bit quad offset, `flags & 1` = apply weight decay). One cube handles one chunk.
//!
//! A step is three launches with no host synchronisation in between:
//! 1. `grad_stats`: per cube of a grid-stride pass, the f32 sum of squared gradients and a
//!    found-non-finite flag (decided on the bits, so no fast-math assumption can drop it);
//! 2. `finalize_scalars`: one cube reduces the partials, reads the call counter and the
//!    scheduled lr from device memory, decides the skip, advances the counters and writes every
//!    scalar the update needs (bias corrections from the integer step, in f64 where the device
//!    has it);
//! 3. `fused_update`: reads the skip flag and the scalars and, unless skipped, updates the
//!    parameters, moments, EMA and 16-bit copy in one pass.

use cubecl::prelude::*;

/// Units per cube of the chunked kernels.
pub const CUBE_UNITS: u32 = 256;
/// Quads each unit handles per chunk.
pub const QUADS_PER_UNIT: u32 = 4;
/// Quads per chunk (4096 elements).
pub const CHUNK_QUADS: u32 = CUBE_UNITS * QUADS_PER_UNIT;
/// Words per chunk-table entry.
pub const CHUNK_WORDS: usize = 4;

// Slots of the f32 scalar buffer. 0..8 are written by `finalize_scalars` every call, the rest once
// by the host when the optimizer is created.
pub const S_LR: usize = 0;
pub const S_STEP_SIZE: usize = 1;
pub const S_BC2_SQRT: usize = 2;
pub const S_DECAY: usize = 3;
pub const S_CLIP: usize = 4;
pub const S_SKIP: usize = 5;
pub const S_NORM: usize = 6;
pub const S_BETA1: usize = 8;
pub const S_ONE_MINUS_BETA1: usize = 9;
pub const S_BETA2: usize = 10;
pub const S_ONE_MINUS_BETA2: usize = 11;
pub const S_EPS: usize = 12;
pub const S_ONE_MINUS_EMA: usize = 13;
pub const S_MAX_NORM: usize = 14;
pub const S_WEIGHT_DECAY: usize = 15;
pub const S_INV_LR_MAX: usize = 16;
pub const SCALARS_LEN: usize = 24;

// Slots of the u32 counter buffer.
/// Calls so far (the 0-based schedule index of the next call).
pub const C_CALLS: usize = 0;
/// Optimizer steps taken (AdamW's `t`): not advanced by a skipped call.
pub const C_STEPS: usize = 1;
pub const C_SKIPPED: usize = 2;
pub const C_LAST_SKIPPED: usize = 3;
/// The stochastic-rounding key of the current call.
pub const C_KEY: usize = 4;
/// The stochastic-rounding seed (written once).
pub const C_SEED: usize = 5;
pub const COUNTERS_LEN: usize = 8;

/// Entries per call in the history buffer: lr, grad norm, flags (`HISTORY_SKIPPED` |
/// `HISTORY_NORM`) stored as a small f32 integer.
pub const HISTORY_WORDS: usize = 3;
pub const HISTORY_SKIPPED: u32 = 1;
pub const HISTORY_NORM: u32 = 2;

/// What the 16-bit model copy holds.
pub const COPY_NONE: u32 = 0;
pub const COPY_BF16: u32 = 1;
pub const COPY_F16: u32 = 2;

type Quad = Vector<f32, Const<4>>;
type HalfQuad = Vector<u32, Const<2>>;

/// 1 when the f32 bits are NaN or an infinity.
#[cube]
fn non_finite_bits(x: f32) -> u32 {
    let exponent = u32::reinterpret(x) & 0x7f80_0000;
    u32::cast_from(exponent == 0x7f80_0000)
}

/// Lowbias32, as `linattn_reference::optim::rounding::mix32`.
#[cube]
pub fn mix32(value: u32) -> u32 {
    let mut x = value;
    x ^= x >> 16;
    x *= 0x7feb_352d;
    x ^= x >> 15;
    x *= 0x846c_a68b;
    x ^= x >> 16;
    x
}

/// Whether to round the kept part up: round-to-nearest-even, or stochastically with the low
/// `shift` bits of `random` (`shift` in 1..=31).
#[cube]
fn round_up(kept: u32, rest: u32, shift: u32, random: u32, #[comptime] stochastic: bool) -> u32 {
    if comptime![stochastic] {
        let mask = (1u32 << shift) - 1;
        u32::cast_from((random & mask) + rest > mask)
    } else {
        let half = 1u32 << (shift - 1);
        u32::cast_from(rest > half || (rest == half && (kept & 1) == 1))
    }
}

/// f32 to bf16 bits (in the low 16 bits), as `rounding::bf16_nearest` / `bf16_stochastic`.
#[cube]
pub fn bf16_bits(x: f32, random: u32, #[comptime] stochastic: bool) -> u32 {
    let bits = u32::reinterpret(x);
    let abs = bits & 0x7fff_ffff;
    let mut out = bits >> 16;
    if abs > 0x7f80_0000 {
        out = (bits >> 16) | 0x0040;
    } else if abs < 0x7f80_0000 {
        if comptime![stochastic] {
            out = (bits + (random & 0xffff)) >> 16;
        } else {
            out = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
        }
    }
    out
}

/// f32 to f16 bits, as `rounding::f16_nearest` / `f16_stochastic`.
#[cube]
pub fn f16_bits(x: f32, random: u32, #[comptime] stochastic: bool) -> u32 {
    let bits = u32::reinterpret(x);
    let sign = (bits >> 16) & 0x8000;
    let abs = bits & 0x7fff_ffff;
    let mut out = sign;
    if abs > 0x7f80_0000 {
        out = sign | 0x7e00;
    } else if abs >= 0x4780_0000 {
        // |x| >= 2^16: past the largest f16 under any rounding.
        out = sign | 0x7c00;
    } else if abs >= 0x3880_0000 {
        // Normal f16 (|x| >= 2^-14): rebias the exponent (127 -> 15) and keep 10 mantissa bits.
        let kept = (((abs >> 23) - 112) << 10) | ((abs & 0x007f_ffff) >> 13);
        let rest = abs & 0x1fff;
        out = sign | (kept + round_up(kept, rest, 13u32, random, stochastic));
    } else {
        // Subnormal f16: value = m * 2^-24, m = significand >> (126 - exponent field).
        let shift = 126 - (abs >> 23);
        if shift <= 31 {
            let significand = (abs & 0x007f_ffff) | 0x0080_0000;
            let kept = significand >> shift;
            let rest = significand & ((1u32 << shift) - 1);
            out = sign | (kept + round_up(kept, rest, shift, random, stochastic));
        }
    }
    out
}

#[cube]
fn copy_bits(x: f32, random: u32, #[comptime] kind: u32, #[comptime] stochastic: bool) -> u32 {
    if comptime![kind == COPY_BF16] {
        bf16_bits(x, random, stochastic)
    } else {
        f16_bits(x, random, stochastic)
    }
}

/// Most cubes of the statistics pass (each reduces its share of the arena to one partial).
pub const MAX_STATS_CUBES: u32 = 1024;
/// Groups of the two-level in-cube reduction (16 groups of 16 units): two barriers instead of
/// the eight of a tree, which matters where barriers are expensive (llvmpipe runs a cube's units
/// as coroutines) and costs a few dozen adds on a GPU.
const REDUCE_GROUPS: u32 = 16;

/// Sums `values[0 .. CUBE_UNITS]` of the cube's shared memory in a fixed order and ORs `flags`;
/// the result is valid in unit 0.
#[cube]
fn reduce_cube<D: Float>(
    values: &mut [D],
    flags: &mut [u32],
    group_values: &mut [D],
    group_flags: &mut [u32],
) -> (D, u32) {
    let unit = UNIT_POS as usize;
    let per_group = comptime![(CUBE_UNITS / REDUCE_GROUPS) as usize];
    sync_cube();
    if unit < comptime![REDUCE_GROUPS as usize] {
        let mut sum = D::new(0.0);
        let mut flag = 0u32;
        #[unroll]
        for k in 0..per_group {
            sum += values[unit * per_group + k];
            flag |= flags[unit * per_group + k];
        }
        group_values[unit] = sum;
        group_flags[unit] = flag;
    }
    sync_cube();
    let mut total = D::new(0.0);
    let mut flag = 0u32;
    if unit == 0 {
        #[unroll]
        for k in 0..comptime![REDUCE_GROUPS as usize] {
            total += group_values[k];
            flag |= group_flags[k];
        }
    }
    (total, flag)
}

/// Sum of squares and non-finite flag of the whole gradient arena: a grid-stride pass of at most
/// [`MAX_STATS_CUBES`] cubes, one partial per cube (padding is zero and adds nothing).
#[cube(launch_unchecked)]
pub fn grad_stats(
    grad: &[Quad],
    partial_sq: &mut [f32],
    partial_bad: &mut [u32],
    partial_offset: u32,
) {
    let stride = CUBE_COUNT * CUBE_UNITS as usize;
    let mut sq = 0f32;
    let mut bad = 0u32;
    let mut i = ABSOLUTE_POS;
    while i < grad.len() {
        let g = grad[i];
        #[unroll]
        for lane in 0..4usize {
            let x = g.extract(lane);
            sq += x * x;
            bad |= non_finite_bits(x);
        }
        i += stride;
    }
    let mut shared_sq = Shared::<[f32]>::new_slice(comptime![CUBE_UNITS as usize]);
    let mut shared_bad = Shared::<[u32]>::new_slice(comptime![CUBE_UNITS as usize]);
    let mut group_sq = Shared::<[f32]>::new_slice(comptime![REDUCE_GROUPS as usize]);
    let mut group_bad = Shared::<[u32]>::new_slice(comptime![REDUCE_GROUPS as usize]);
    let unit = UNIT_POS as usize;
    shared_sq[unit] = sq;
    shared_bad[unit] = bad;
    let (total, flag) = reduce_cube::<f32>(
        &mut shared_sq,
        &mut shared_bad,
        &mut group_sq,
        &mut group_bad,
    );
    if unit == 0 {
        let slot = partial_offset as usize + CUBE_POS;
        partial_sq[slot] = total;
        // A finite sum can still overflow f32: that counts as non-finite too.
        partial_bad[slot] = flag | non_finite_bits(total);
    }
}

/// `b^e` by square-and-multiply (no transcendental functions: they do not exist for f64 in
/// Vulkan shaders).
#[cube]
fn pow_int<D: Float>(base: D, exponent: u32) -> D {
    let mut result = D::new(1.0);
    let mut b = base;
    let mut e = exponent;
    while e > 0 {
        if (e & 1) == 1 {
            result *= b;
        }
        b *= b;
        e >>= 1;
    }
    result
}

/// `1 - e^y` for `y <= 0` in f32 with a relative error of a few ulp: a Taylor series where `e^y`
/// is close to 1 (there `1 - exp(y)` would cancel), `1 - exp(y)` elsewhere.
#[cube]
fn one_minus_exp<D: Float>(y: D) -> D {
    if y > D::new(-0.5) {
        // e^y - 1 = y (1 + y/2 (1 + y/3 (1 + ... (1 + y/10)))); the next term is below 1e-10.
        let mut s = D::new(1.0);
        #[unroll]
        for n in 0..9u32 {
            let divisor = comptime![(10 - n) as f32];
            s = D::new(1.0) + y * s / D::new(divisor);
        }
        -(y * s)
    } else {
        D::new(1.0) - y.exp()
    }
}

/// `1 - b^t`: in `D = f64` exactly from the integer step (`wide` holds the betas); in `D = f32`
/// as `-expm1(t ln b)` (`wide` holds `ln b`, computed on the host in f64).
#[cube]
fn bias_correction<D: Float>(wide: D, t: u32, #[comptime] exact: bool) -> D {
    if comptime![exact] {
        D::new(1.0) - pow_int::<D>(wide, t)
    } else {
        one_minus_exp::<D>(D::cast_from(t) * wide)
    }
}

/// One cube: reduce the partials, decide the skip, advance the counters, write the scalars and
/// the history entry of this call. `D` is f64 where the device has it (then `exact`), else f32.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn finalize_scalars<D: Float>(
    partial_sq: &[f32],
    partial_bad: &[u32],
    lr_table: &[f32],
    wide: &[D],
    scalars: &mut [f32],
    counters: &mut [u32],
    history: &mut [f32],
    num_partials: u32,
    #[comptime] adamw: bool,
    #[comptime] exact: bool,
    #[comptime] check: bool,
    #[comptime] clip: bool,
    #[comptime] fully_decoupled: bool,
) {
    let unit = UNIT_POS as usize;
    let n = num_partials as usize;
    let mut sum = D::new(0.0);
    let mut bad = 0u32;
    let mut i = unit;
    while i < n {
        sum += D::cast_from(partial_sq[i]);
        bad |= partial_bad[i];
        i += CUBE_UNITS as usize;
    }
    let mut shared_sum = Shared::<[D]>::new_slice(comptime![CUBE_UNITS as usize]);
    let mut shared_bad = Shared::<[u32]>::new_slice(comptime![CUBE_UNITS as usize]);
    let mut group_sum = Shared::<[D]>::new_slice(comptime![REDUCE_GROUPS as usize]);
    let mut group_bad = Shared::<[u32]>::new_slice(comptime![REDUCE_GROUPS as usize]);
    shared_sum[unit] = sum;
    shared_bad[unit] = bad;
    let (sum_sq, bad_total) = reduce_cube::<D>(
        &mut shared_sum,
        &mut shared_bad,
        &mut group_sum,
        &mut group_bad,
    );
    if unit == 0 {
        let calls = counters[C_CALLS];
        let capacity = lr_table.len() as u32;
        let index = min(calls, capacity - 1) as usize;
        let lr = lr_table[index];
        let norm = sum_sq.sqrt();
        // NaN from bits: WGSL has no NaN literal.
        let mut norm_f32 = f32::reinterpret(0x7fc0_0000u32);
        let mut skip = false;
        if comptime![check || clip] {
            norm_f32 = f32::cast_from(norm);
            skip = comptime![check] && (bad_total | non_finite_bits(norm_f32)) != 0;
        }
        if calls < capacity {
            let h = calls as usize * HISTORY_WORDS;
            history[h] = lr;
            history[h + 1] = norm_f32;
            let computed = comptime![if check || clip { HISTORY_NORM } else { 0 }];
            history[h + 2] = f32::cast_from(u32::cast_from(skip) * HISTORY_SKIPPED + computed);
        }
        if skip {
            scalars[S_SKIP] = 1.0;
            counters[C_SKIPPED] += 1;
            counters[C_LAST_SKIPPED] = 1;
        } else {
            let t = counters[C_STEPS] + 1;
            let lr_wide = D::cast_from(lr);
            let mut step_size = lr_wide;
            let mut bc2_sqrt = D::new(1.0);
            if comptime![adamw] {
                let bc1 = bias_correction::<D>(wide[0], t, exact);
                let bc2 = bias_correction::<D>(wide[1], t, exact);
                step_size = lr_wide / bc1;
                bc2_sqrt = bc2.sqrt();
            }
            let weight_decay = D::cast_from(scalars[S_WEIGHT_DECAY]);
            let mut decay = lr_wide * weight_decay;
            if comptime![fully_decoupled] {
                decay = lr_wide * D::cast_from(scalars[S_INV_LR_MAX]) * weight_decay;
            }
            let mut coef = D::new(1.0);
            if comptime![clip] {
                let max_norm = D::cast_from(scalars[S_MAX_NORM]);
                coef = min(D::new(1.0), max_norm / (norm + D::new(1e-6)));
            }
            scalars[S_LR] = lr;
            scalars[S_STEP_SIZE] = f32::cast_from(step_size);
            scalars[S_BC2_SQRT] = f32::cast_from(bc2_sqrt);
            scalars[S_DECAY] = f32::cast_from(decay);
            scalars[S_CLIP] = f32::cast_from(coef);
            scalars[S_SKIP] = 0.0;
            counters[C_STEPS] = t;
            counters[C_LAST_SKIPPED] = 0;
        }
        scalars[S_NORM] = norm_f32;
        counters[C_KEY] = mix32(counters[C_SEED] ^ mix32(calls + 0x9e37_79b9));
        counters[C_CALLS] = calls + 1;
    }
}

/// The update pass: AdamW or Lion with decay (cautious or not), EMA and the 16-bit copy, reading
/// every scalar from device memory. Does nothing when the call was skipped.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
pub fn fused_update(
    param: &mut [Quad],
    grad: &[Quad],
    exp_avg: &mut [Quad],
    exp_avg_sq: &mut [Quad],
    ema: &mut [Quad],
    copy: &mut [HalfQuad],
    chunks: &[u32],
    scalars: &[f32],
    counters: &[u32],
    first_element: u32,
    #[comptime] adamw: bool,
    #[comptime] cautious: bool,
    #[comptime] with_ema: bool,
    #[comptime] copy_kind: u32,
    #[comptime] stochastic: bool,
) {
    let chunk = CUBE_POS;
    let num_chunks = chunks.len() / CHUNK_WORDS;
    if chunk < num_chunks && scalars[S_SKIP] == 0.0 {
        let start = chunks[chunk * CHUNK_WORDS] as usize;
        let len = chunks[chunk * CHUNK_WORDS + 2] as usize;
        let decays = (chunks[chunk * CHUNK_WORDS + 3] & 1) == 1;
        let mut decay = 0f32;
        if decays {
            decay = scalars[S_DECAY];
        }
        let step_size = scalars[S_STEP_SIZE];
        let clip = scalars[S_CLIP];
        let beta1 = scalars[S_BETA1];
        let one_minus_beta1 = scalars[S_ONE_MINUS_BETA1];
        let beta2 = scalars[S_BETA2];
        let one_minus_beta2 = scalars[S_ONE_MINUS_BETA2];
        let bc2_sqrt = scalars[S_BC2_SQRT];
        let eps = scalars[S_EPS];
        let one_minus_ema = scalars[S_ONE_MINUS_EMA];
        let key = counters[C_KEY];
        #[unroll]
        for q in 0..QUADS_PER_UNIT {
            let i = (q * CUBE_UNITS + UNIT_POS) as usize;
            if i < len {
                let index = start + i;
                let p_in = param[index];
                let g_in = grad[index];
                let m_in = exp_avg[index];
                let mut p_out = Quad::empty();
                let mut m_out = Quad::empty();
                let mut v_in = Quad::empty();
                let mut v_out = Quad::empty();
                if comptime![adamw] {
                    v_in = exp_avg_sq[index];
                }
                #[unroll]
                for lane in 0..4usize {
                    let theta = p_in.extract(lane);
                    let g = g_in.extract(lane) * clip;
                    let m = m_in.extract(lane);
                    // torch: exp_avg.lerp_(grad, 1 - beta1); Lion's momentum uses the old m
                    // for the direction and is updated with beta2.
                    let new_m = if comptime![adamw] {
                        m + one_minus_beta1 * (g - m)
                    } else {
                        beta2 * m + one_minus_beta2 * g
                    };
                    let direction = if comptime![adamw] {
                        // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
                        let new_v = beta2 * v_in.extract(lane) + one_minus_beta2 * g * g;
                        v_out.insert(lane, new_v);
                        new_m / (new_v.sqrt() / bc2_sqrt + eps)
                    } else {
                        let c = beta1 * m + one_minus_beta1 * g;
                        f32::cast_from(c > 0.0) - f32::cast_from(c < 0.0)
                    };
                    let mut keep = 1.0 - decay;
                    if comptime![cautious] {
                        // CWD: decay only where the update and the parameter agree in sign.
                        keep = 1.0 - decay * f32::cast_from(direction * theta >= 0.0);
                    }
                    p_out.insert(lane, theta * keep - step_size * direction);
                    m_out.insert(lane, new_m);
                }
                param[index] = p_out;
                exp_avg[index] = m_out;
                if comptime![adamw] {
                    exp_avg_sq[index] = v_out;
                }
                if comptime![with_ema] {
                    let e_in = ema[index];
                    let mut e_out = Quad::empty();
                    #[unroll]
                    for lane in 0..4usize {
                        let e = e_in.extract(lane);
                        e_out.insert(lane, e + one_minus_ema * (p_out.extract(lane) - e));
                    }
                    ema[index] = e_out;
                }
                if comptime![copy_kind != COPY_NONE] {
                    let mut words = HalfQuad::empty();
                    #[unroll]
                    for pair in 0..2usize {
                        let element = first_element + (index * 4 + pair * 2) as u32;
                        let lo = copy_bits(
                            p_out.extract(pair * 2),
                            mix32(element ^ key),
                            copy_kind,
                            stochastic,
                        );
                        let hi = copy_bits(
                            p_out.extract(pair * 2 + 1),
                            mix32((element + 1) ^ key),
                            copy_kind,
                            stochastic,
                        );
                        words.insert(pair, lo | (hi << 16));
                    }
                    copy[index] = words;
                }
            }
        }
    }
}

/// WSM: `out = sum_j c_j * checkpoint_j` over a `[J, quads]` stack, accumulated in f32, with an
/// optional 16-bit (round-to-nearest-even) copy of the result.
#[cube(launch_unchecked)]
pub fn weighted_merge(
    checkpoints: &[Quad],
    coefficients: &[f32],
    out: &mut [Quad],
    copy: &mut [HalfQuad],
    quads: u32,
    #[comptime] copy_kind: u32,
) {
    let n = quads as usize;
    let stride = CUBE_COUNT * CUBE_UNITS as usize;
    let mut i = ABSOLUTE_POS;
    while i < n {
        // Start from the first term (not from +0) so that a single checkpoint with coefficient 1
        // is the identity, signed zeros included.
        let first = checkpoints[i];
        let c0 = coefficients[0];
        let mut acc = Quad::empty();
        #[unroll]
        for lane in 0..4usize {
            acc.insert(lane, c0 * first.extract(lane));
        }
        let mut j = 1usize;
        while j < coefficients.len() {
            let c = coefficients[j];
            let x = checkpoints[j * n + i];
            #[unroll]
            for lane in 0..4usize {
                acc.insert(lane, acc.extract(lane) + c * x.extract(lane));
            }
            j += 1;
        }
        out[i] = acc;
        if comptime![copy_kind != COPY_NONE] {
            let mut words = HalfQuad::empty();
            #[unroll]
            for pair in 0..2usize {
                let lo = copy_bits(acc.extract(pair * 2), 0u32, copy_kind, false);
                let hi = copy_bits(acc.extract(pair * 2 + 1), 0u32, copy_kind, false);
                words.insert(pair, lo | (hi << 16));
            }
            copy[i] = words;
        }
        i += stride;
    }
}
