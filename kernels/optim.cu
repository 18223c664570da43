// Fused multi-tensor optimizer step (AdamW / Lion) and WSM checkpoint merging (shared/spec/optim.md).
// The CUDA twin of src/optim/cube/kernels.rs, with the same semantics; host side: src/optim/cuda.rs.
//
// Data layout: every tensor of a parameter group lives in one flat f32 arena (per state: param,
// grad, exp_avg, exp_avg_sq, ema), tensor i starting at element offsets[i], a multiple of 4, with
// zero padding up to the next tensor (src/optim/mod.rs, ArenaLayout). So every state is read and
// written as float4 "quads" (the buffers are 16-byte aligned). The 16-bit model copy is a u16
// arena with the same positions (4 halves = 8 bytes per quad).
//
// The tensor table: the host cuts every tensor into chunks of at most OPT_CHUNK_QUADS quads that
// never straddle two tensors, one OptChunk each (64-bit first quad, length, flags; bit 0 = apply
// weight decay). The update kernel walks the chunk table with a grid-stride loop over chunks, the
// threads of a block striding over the quads of a chunk. Padding quads are updated too; with a
// zero gradient and zero state they stay zero (AdamW: m = v = 0, m / (sqrt(v) + eps) = 0; Lion:
// sign(0) = 0), so the padding stays zero.
//
// A step is three launches with no host synchronisation in between:
// 1. opt_grad_stats: per block of a grid-stride pass, the f64 sum of squared gradients (each
//    square is exact in f64, so only the additions round) and a found-non-finite flag decided on
//    the bits (no fast-math assumption can drop it);
// 2. opt_finalize: one block reduces the partials in a fixed order (deterministic), reads the
//    call counter and the scheduled lr (f64 table) from device memory, decides the skip, advances
//    the counters, writes the history entry and the f32 scalars the update needs, all computed in
//    f64 (bias corrections 1 - b^t from the integer step t);
// 3. opt_update: reads the skip flag and the scalars and, unless skipped, updates the parameters,
//    moments, EMA and 16-bit copy in one pass.

#include "common.cuh"

// Threads per block of every kernel of this file.
#define OPT_THREADS 256
// Quads per chunk (4096 elements): 4 quads per thread. The host cuts its chunk table with the
// same length (CHUNK_QUADS in src/optim/cuda.rs).
#define OPT_CHUNK_QUADS 1024
static_assert(OPT_CHUNK_QUADS % OPT_THREADS == 0, "opt_update unrolls whole rounds of a block");

// Model copy formats (CopyFormat in src/optim/mod.rs).
#define OPT_COPY_NONE 0
#define OPT_COPY_BF16 1
#define OPT_COPY_F16 2

// Launch parameters, mirrored field by field by `OptParams` in src/optim/cuda.rs (same order, the
// host checks the size). Addresses are device pointers (0 = absent).
struct OptParams {
    u64 param, grad, exp_avg, exp_avg_sq, ema;  // f32 arenas of `quads` quads
    u64 copy;                                   // u16 arena (4 halves per quad)
    u64 chunks;                                 // OptChunk[num_chunks]
    u64 num_chunks;
    u64 quads;                                  // arena length in quads
    u64 partial_sq;                             // double[num_partials]
    u64 partial_bad;                            // u32[num_partials]
    u64 lr_table;                               // double[capacity]: lr of call k
    u64 scalars;                                // OptScalars
    u64 counters;                               // OptCounters
    u64 history;                                // double[capacity][3]: lr, norm, flags
    u64 merge_stack;                            // f32 [merge_count][quads] (WSM)
    u64 merge_coefficients;                     // f32 [merge_count]
    double beta1, beta2, eps;
    double one_minus_beta1, one_minus_beta2;    // 1 - beta in f64, rounded once to f32
    double weight_decay;
    double lr_max;                              // the peak lr (fully decoupled decay divides by it)
    double max_norm;                            // clipping threshold (clip != 0)
    double one_minus_ema;                       // 1 - EMA beta
    u32 capacity;                               // entries of lr_table and history
    u32 num_partials;                           // partials the stats pass wrote (0: not run)
    u32 merge_count;
    int adamw;                                  // else Lion
    int cautious;                               // CWD mask on the decay term
    int fully_decoupled;                        // decay = (lr / lr_max) wd, else lr wd
    int check;                                  // skip the step on a non-finite gradient
    int clip;                                   // global grad-norm clipping
    int with_ema;
    int copy_kind;                              // OPT_COPY_*
    int stochastic;                             // stochastic rounding of the copy
    int reserved;
};
static_assert(sizeof(OptParams) == 256, "OptParams layout changed: update src/optim/cuda.rs");

struct OptChunk {
    u64 first_quad;
    u32 quads;
    u32 flags;  // bit 0: apply weight decay
};

// Written by opt_finalize every call, read by opt_update (mirrored as OPT_SCALARS_BYTES on the host).
struct OptScalars {
    float step_size;  // lr / (1 - b1^t) for AdamW, lr for Lion
    float bc2_sqrt;   // sqrt(1 - b2^t)
    float decay;      // the decay factor (before the CWD mask)
    float clip;       // clipping coefficient (1 without clipping)
    u32 skip;         // 1: this call is skipped, opt_update changes nothing
    u32 key;          // stochastic-rounding key of this call
    u32 reserved[2];
};

// Device counters (read by the host: OptCounters in src/optim/cuda.rs).
struct OptCounters {
    u64 calls;         // calls so far = 0-based schedule index of the next call
    u64 steps;         // applied steps (AdamW's t)
    u64 skipped;       // calls skipped for non-finite gradients
    u64 last_skipped;  // whether the latest call was skipped
    u64 seed;          // stochastic-rounding seed (low 32 bits), written once by the host
};

#define OPT_HISTORY_SKIPPED 1.0
#define OPT_HISTORY_NORM 2.0

// Bit casts (the intrinsics do not exist in the host emulation).
#ifdef LA_EMULATION
LA_DEVICE u32 opt_f32_bits(float x) {
    u32 r;
    std::memcpy(&r, &x, 4);
    return r;
}
LA_DEVICE u64 opt_f64_bits(double x) {
    u64 r;
    std::memcpy(&r, &x, 8);
    return r;
}
LA_DEVICE double opt_f64_from_bits(u64 x) {
    double r;
    std::memcpy(&r, &x, 8);
    return r;
}
#else
LA_DEVICE u32 opt_f32_bits(float x) { return __float_as_uint(x); }
LA_DEVICE u64 opt_f64_bits(double x) { return (u64)__double_as_longlong(x); }
LA_DEVICE double opt_f64_from_bits(u64 x) { return __longlong_as_double((long long)x); }
#endif

// 1 when the f32 bits are NaN or an infinity.
LA_DEVICE u32 opt_non_finite(float x) { return (opt_f32_bits(x) & 0x7f800000u) == 0x7f800000u; }
LA_DEVICE u32 opt_non_finite_f64(double x) {
    return (opt_f64_bits(x) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
}

// Lowbias32 (linattn_reference::optim::rounding::mix32).
LA_DEVICE u32 opt_mix32(u32 x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

// Whether to round the kept part up: to nearest even, or stochastically with the low `shift`
// bits of `random` (shift in 1..31). The stochastic test `r + rest > mask` is `rest / 2^shift >
// 1 - r / 2^shift`: up with probability rest / 2^shift.
LA_DEVICE u32 opt_round_up(u32 kept, u32 rest, u32 shift, u32 random, bool stochastic) {
    if (stochastic) {
        const u32 mask = (1u << shift) - 1u;
        return (random & mask) + rest > mask;
    }
    const u32 half = 1u << (shift - 1u);
    return rest > half || (rest == half && (kept & 1u));
}

// f32 to bf16 bits (rounding::bf16_nearest / bf16_stochastic, bit for bit). Adding 0x7fff + lsb
// (nearest even) or 16 random bits to the f32 bits and truncating carries into the exponent
// exactly when the rounding does.
LA_DEVICE u32 opt_bf16_bits(float x, u32 random, bool stochastic) {
    const u32 bits = opt_f32_bits(x);
    const u32 abs = bits & 0x7fffffffu;
    if (abs > 0x7f800000u) return (bits >> 16) | 0x0040u;  // quiet NaN, sign kept
    if (abs == 0x7f800000u) return bits >> 16;              // infinities stay
    if (stochastic) return (bits + (random & 0xffffu)) >> 16;
    return (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
}

// f32 to f16 bits (rounding::f16_nearest / f16_stochastic, bit for bit).
LA_DEVICE u32 opt_f16_bits(float x, u32 random, bool stochastic) {
    const u32 bits = opt_f32_bits(x);
    const u32 sign = (bits >> 16) & 0x8000u;
    const u32 abs = bits & 0x7fffffffu;
    if (abs > 0x7f800000u) return sign | 0x7e00u;
    // |x| >= 2^16: past the largest f16 under any rounding.
    if (abs >= 0x47800000u) return sign | 0x7c00u;
    if (abs >= 0x38800000u) {
        // Normal f16 (|x| >= 2^-14): rebias the exponent (127 -> 15), keep 10 mantissa bits; a
        // carry out of the mantissa increments the exponent (up to infinity), as it should.
        const u32 kept = (((abs >> 23) - 112u) << 10) | ((abs & 0x007fffffu) >> 13);
        const u32 rest = abs & 0x1fffu;
        return sign | (kept + opt_round_up(kept, rest, 13u, random, stochastic));
    }
    // Subnormal f16: value = m 2^-24 with m = significand >> (126 - exponent field).
    const u32 shift = 126u - (abs >> 23);
    if (shift > 31u) return sign;
    const u32 significand = (abs & 0x007fffffu) | 0x00800000u;
    const u32 kept = significand >> shift;
    const u32 rest = significand & ((1u << shift) - 1u);
    return sign | (kept + opt_round_up(kept, rest, shift, random, stochastic));
}

LA_DEVICE u32 opt_copy_bits(float x, u32 random, int kind, bool stochastic) {
    return kind == OPT_COPY_BF16 ? opt_bf16_bits(x, random, stochastic)
                                 : opt_f16_bits(x, random, stochastic);
}

// Four halves of one quad (8 bytes).
struct alignas(8) OptHalfQuad {
    u32 lo, hi;
};

// Fixed-order tree sum of red[0 .. OPT_THREADS) and OR of flags; the result is valid in thread 0.
LA_DEVICE void opt_block_reduce(double* red, u32* flags) {
    block_sync();
    for (int stride = OPT_THREADS / 2; stride >= 1; stride >>= 1) {
        if ((int)threadIdx.x < stride) {
            red[threadIdx.x] += red[threadIdx.x + stride];
            flags[threadIdx.x] |= flags[threadIdx.x + stride];
        }
        block_sync();
    }
}

// grid (num_partials <= 1024), OPT_THREADS threads. Sum of squares and non-finite flag of the
// whole gradient arena, one partial per block (the zero padding adds nothing).
LA_KERNEL(OPT_THREADS) opt_grad_stats(LA_PARAM_REF(OptParams) p) {
    __shared__ double red[OPT_THREADS];
    __shared__ u32 bad_flags[OPT_THREADS];
    const float4* grad = reinterpret_cast<const float4*>(p.grad);
    const u64 stride = (u64)gridDim.x * OPT_THREADS;
    double sq = 0.0;
    u32 bad = 0;
    for (u64 i = (u64)blockIdx.x * OPT_THREADS + threadIdx.x; i < p.quads; i += stride) {
        const float4 g = grad[i];
        // f32 * f32 is exact in f64: only the additions round.
        sq += (double)g.x * (double)g.x + (double)g.y * (double)g.y + (double)g.z * (double)g.z +
              (double)g.w * (double)g.w;
        bad |= opt_non_finite(g.x) | opt_non_finite(g.y) | opt_non_finite(g.z) | opt_non_finite(g.w);
    }
    red[threadIdx.x] = sq;
    bad_flags[threadIdx.x] = bad;
    opt_block_reduce(red, bad_flags);
    if (threadIdx.x == 0) {
        reinterpret_cast<double*>(p.partial_sq)[blockIdx.x] = red[0];
        reinterpret_cast<u32*>(p.partial_bad)[blockIdx.x] = bad_flags[0];
    }
}

// grid (1), OPT_THREADS threads. Reduce the partials, decide the skip, advance the counters, write
// the scalars and this call's history entry.
LA_KERNEL(OPT_THREADS) opt_finalize(LA_PARAM_REF(OptParams) p) {
    __shared__ double red[OPT_THREADS];
    __shared__ u32 bad_flags[OPT_THREADS];
    const double* partial_sq = reinterpret_cast<const double*>(p.partial_sq);
    const u32* partial_bad = reinterpret_cast<const u32*>(p.partial_bad);
    double sum = 0.0;
    u32 bad = 0;
    for (u32 i = threadIdx.x; i < p.num_partials; i += OPT_THREADS) {
        sum += partial_sq[i];
        bad |= partial_bad[i];
    }
    red[threadIdx.x] = sum;
    bad_flags[threadIdx.x] = bad;
    opt_block_reduce(red, bad_flags);
    if (threadIdx.x != 0) return;
    OptCounters* counters = reinterpret_cast<OptCounters*>(p.counters);
    OptScalars* s = reinterpret_cast<OptScalars*>(p.scalars);
    const u64 calls = counters->calls;
    // Calls past the table keep its last lr.
    const u64 index = calls < (u64)p.capacity ? calls : (u64)p.capacity - 1;
    const double lr = reinterpret_cast<const double*>(p.lr_table)[index];
    const bool stats = p.check || p.clip;
    // NaN when the norm is not computed (the history then has no norm).
    const double norm = stats ? sqrt(red[0]) : opt_f64_from_bits(0x7ff8000000000000ull);
    const bool skip = p.check && (bad_flags[0] | opt_non_finite_f64(norm)) != 0;
    if (calls < (u64)p.capacity) {
        double* h = reinterpret_cast<double*>(p.history) + calls * 3;
        h[0] = lr;
        h[1] = norm;
        h[2] = (skip ? OPT_HISTORY_SKIPPED : 0.0) + (stats ? OPT_HISTORY_NORM : 0.0);
    }
    if (skip) {
        s->skip = 1;
        counters->skipped += 1;
        counters->last_skipped = 1;
    } else {
        const u64 t = counters->steps + 1;
        double step_size = lr, bc2_sqrt = 1.0;
        if (p.adamw) {
            // torch: bias_correction = 1 - beta ** step, in f64 from the integer step.
            const double bc1 = 1.0 - pow(p.beta1, (double)t);
            const double bc2 = 1.0 - pow(p.beta2, (double)t);
            step_size = lr / bc1;
            bc2_sqrt = sqrt(bc2);
        }
        const double decay = p.fully_decoupled ? lr / p.lr_max * p.weight_decay : lr * p.weight_decay;
        // torch clip_grad_norm_: coef = min(1, max_norm / (norm + 1e-6)).
        double coef = 1.0;
        if (p.clip) {
            coef = p.max_norm / (norm + 1e-6);
            if (coef > 1.0) coef = 1.0;
        }
        s->step_size = (float)step_size;
        s->bc2_sqrt = (float)bc2_sqrt;
        s->decay = (float)decay;
        s->clip = (float)coef;
        s->skip = 0;
        counters->steps = t;
        counters->last_skipped = 0;
    }
    // rounding::call_key(seed, call): fresh bits for every call, no RNG state.
    s->key = opt_mix32((u32)counters->seed ^ opt_mix32((u32)calls + 0x9e3779b9u));
    counters->calls = calls + 1;
}

// grid (min(num_chunks, 65535)), OPT_THREADS threads. The update pass: AdamW or Lion with decay
// (cautious or not), EMA and the 16-bit copy, every scalar read from device memory. Nothing
// happens when the call was skipped.
LA_KERNEL(OPT_THREADS) opt_update(LA_PARAM_REF(OptParams) p) {
    const OptScalars s = *reinterpret_cast<const OptScalars*>(p.scalars);
    if (s.skip) return;
    // Distinct buffers: __restrict__ lets the compiler issue the loads of the unrolled quads of
    // a thread ahead of the stores of the previous ones.
    const OptChunk* chunks = reinterpret_cast<const OptChunk*>(p.chunks);
    float4* __restrict__ param = reinterpret_cast<float4*>(p.param);
    const float4* __restrict__ grad = reinterpret_cast<const float4*>(p.grad);
    float4* __restrict__ exp_avg = reinterpret_cast<float4*>(p.exp_avg);
    float4* __restrict__ exp_avg_sq = reinterpret_cast<float4*>(p.exp_avg_sq);
    float4* __restrict__ ema = reinterpret_cast<float4*>(p.ema);
    OptHalfQuad* __restrict__ copy = reinterpret_cast<OptHalfQuad*>(p.copy);
    const bool adamw = p.adamw != 0, cautious = p.cautious != 0;
    const bool stochastic = p.stochastic != 0;
    const float beta1 = (float)p.beta1, beta2 = (float)p.beta2, eps = (float)p.eps;
    const float one_minus_beta1 = (float)p.one_minus_beta1;
    const float one_minus_beta2 = (float)p.one_minus_beta2;
    const float one_minus_ema = (float)p.one_minus_ema;
    for (u64 c = blockIdx.x; c < p.num_chunks; c += gridDim.x) {
        const OptChunk chunk = chunks[c];
        const float decay = (chunk.flags & 1u) ? s.decay : 0.0f;
        // A chunk has at most OPT_CHUNK_QUADS = 4 * OPT_THREADS quads: thread x takes quads
        // x, x + 256, x + 512, x + 768 (coalesced 16-byte accesses per warp).
        #pragma unroll
        for (int k = 0; k < OPT_CHUNK_QUADS / OPT_THREADS; ++k) {
            const u32 q = threadIdx.x + (u32)k * OPT_THREADS;
            if (q >= chunk.quads) break;
            const u64 i = chunk.first_quad + q;
            float pv[4], gv[4], mv[4], vv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            {
                const float4 a = param[i], b = grad[i], m = exp_avg[i];
                pv[0] = a.x; pv[1] = a.y; pv[2] = a.z; pv[3] = a.w;
                gv[0] = b.x; gv[1] = b.y; gv[2] = b.z; gv[3] = b.w;
                mv[0] = m.x; mv[1] = m.y; mv[2] = m.z; mv[3] = m.w;
                if (adamw) {
                    const float4 v = exp_avg_sq[i];
                    vv[0] = v.x; vv[1] = v.y; vv[2] = v.z; vv[3] = v.w;
                }
            }
            #pragma unroll
            for (int l = 0; l < 4; ++l) {
                const float theta = pv[l];
                const float g = gv[l] * s.clip;
                const float m = mv[l];
                float direction;
                if (adamw) {
                    // torch: exp_avg.lerp_(grad, 1 - beta1);
                    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
                    // denom = sqrt(v) / sqrt(1 - b2^t) + eps (eps outside the sqrt).
                    const float new_m = m + one_minus_beta1 * (g - m);
                    const float new_v = beta2 * vv[l] + one_minus_beta2 * g * g;
                    direction = new_m / (sqrtf(new_v) / s.bc2_sqrt + eps);
                    mv[l] = new_m;
                    vv[l] = new_v;
                } else {
                    // Lion: the direction from the old m with beta1, then m moves with beta2.
                    const float cl = beta1 * m + one_minus_beta1 * g;
                    direction = (float)(cl > 0.0f) - (float)(cl < 0.0f);  // sign(0) = 0
                    mv[l] = beta2 * m + one_minus_beta2 * g;
                }
                // CWD: decay only where the update and the pre-step parameter agree in sign.
                const float keep =
                    1.0f - (cautious ? decay * (float)(direction * theta >= 0.0f) : decay);
                pv[l] = theta * keep - s.step_size * direction;
            }
            param[i] = make_float4(pv[0], pv[1], pv[2], pv[3]);
            exp_avg[i] = make_float4(mv[0], mv[1], mv[2], mv[3]);
            if (adamw) exp_avg_sq[i] = make_float4(vv[0], vv[1], vv[2], vv[3]);
            if (p.with_ema) {
                const float4 e = ema[i];
                ema[i] = make_float4(e.x + one_minus_ema * (pv[0] - e.x), e.y + one_minus_ema * (pv[1] - e.y),
                                     e.z + one_minus_ema * (pv[2] - e.z), e.w + one_minus_ema * (pv[3] - e.w));
            }
            if (p.copy_kind != OPT_COPY_NONE) {
                // The random bits of element j hash its arena position (mod 2^32) under the call
                // key: rounding::element_bits(key, j).
                const u32 j = (u32)(i * 4);
                u32 h[4];
                #pragma unroll
                for (int l = 0; l < 4; ++l) {
                    h[l] = opt_copy_bits(pv[l], opt_mix32((j + (u32)l) ^ s.key), p.copy_kind, stochastic);
                }
                copy[i] = OptHalfQuad{h[0] | (h[1] << 16), h[2] | (h[3] << 16)};
            }
        }
    }
}

// grid (min(ceil(quads / OPT_THREADS), 65535)), OPT_THREADS threads. WSM: out = sum_j c_j x_j over
// the [merge_count, quads] stack, accumulated in f32 in checkpoint order, into p.param, with an
// optional round-to-nearest 16-bit copy into p.copy.
LA_KERNEL(OPT_THREADS) opt_merge(LA_PARAM_REF(OptParams) p) {
    const float4* stack = reinterpret_cast<const float4*>(p.merge_stack);
    const float* coefficients = reinterpret_cast<const float*>(p.merge_coefficients);
    float4* out = reinterpret_cast<float4*>(p.param);
    OptHalfQuad* copy = reinterpret_cast<OptHalfQuad*>(p.copy);
    const u64 stride = (u64)gridDim.x * OPT_THREADS;
    for (u64 i = (u64)blockIdx.x * OPT_THREADS + threadIdx.x; i < p.quads; i += stride) {
        // Start from the first term (not from +0) so that one checkpoint with coefficient 1 is the
        // identity, signed zeros included.
        const float c0 = coefficients[0];
        const float4 x0 = stack[i];
        float acc[4] = {c0 * x0.x, c0 * x0.y, c0 * x0.z, c0 * x0.w};
        for (u32 j = 1; j < p.merge_count; ++j) {
            const float c = coefficients[j];
            const float4 x = stack[(u64)j * p.quads + i];
            acc[0] += c * x.x;
            acc[1] += c * x.y;
            acc[2] += c * x.z;
            acc[3] += c * x.w;
        }
        out[i] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        if (p.copy_kind != OPT_COPY_NONE) {
            u32 h[4];
            #pragma unroll
            for (int l = 0; l < 4; ++l) h[l] = opt_copy_bits(acc[l], 0u, p.copy_kind, false);
            copy[i] = OptHalfQuad{h[0] | (h[1] << 16), h[2] | (h[3] << 16)};
        }
    }
}
