// Element-wise helpers of the decayed linear attention engine: gate-gradient scatter/reduction back
// to the user's gate layout, and the row-sum normalisation (ones column appended to v).
//
// Compile-time variant: LA_DTYPE (the element type of v and do).

#include "common.cuh"
#include "linear_params.cuh"

// grid (N, ceil(Lmax / 128), H), 128 threads. Scatters this pass's gate gradient dgl (logical order,
// width p.dgl_width per token) to the gate it came from, p.aux: vector [tokens, H, K] or scalar
// [tokens, H] (gate_kind). Forward pass: logical t -> token bos + t. Reverse pass: logical t >= 1
// used the backward gate of token bos + L - t; token bos gets nothing from it (written as 0 unless
// accumulating).
LA_KERNEL(128) la_gate_grad(LA_PARAMS p) {
    const int n = blockIdx.x, h = blockIdx.z;
    const SeqRange seq = seq_range(p, n);
    const int t = blockIdx.y * 128 + threadIdx.x;
    if (t >= seq.len) return;
    const float* dgl = reinterpret_cast<const float*>(p.dgl);
    float* target = reinterpret_cast<float*>(p.aux);
    const int width = p.dgl_width;
    const bool vector = p.gate_kind == LA_GATE_VECTOR;
    const int KT = vector ? p.K : 1;
    i64 tok;
    bool zero = false;
    if (p.reverse) {
        if (t == 0) {
            if (p.accumulate) return;
            tok = seq.bos;
            zero = true;
        } else {
            tok = seq.bos + (i64)(seq.len - t);
        }
    } else {
        tok = seq.bos + (i64)t;
    }
    const i64 src = ((seq.bos + t) * p.H + h) * (i64)width;
    const i64 dst = (tok * p.H + h) * (i64)KT;
    if (vector) {
        for (int kk = 0; kk < p.K; ++kk) la_store(target + dst + kk, zero ? 0.0f : dgl[src + kk], p.accumulate);
    } else {
        double s = 0.0;  // channel sums in f64 (terms of both signs)
        for (int x = 0; x < width; ++x) s += dgl[src + x];
        la_store(target + dst, zero ? 0.0f : (float)s, p.accumulate);
    }
}

// grid (H), 256 threads. Per-head gate [H]: the sum of this pass's gate gradient over every token
// of every sequence (and every channel of the width), skipping the reverse pass's t = 0 (whose gate
// is the constant 0, not g[h]). Fixed-order reduction: deterministic.
LA_KERNEL(256) la_gate_grad_head(LA_PARAMS p) {
    __shared__ double red[256];  // f64: the total is often much smaller than its terms
    const int h = blockIdx.x;
    const float* dgl = reinterpret_cast<const float*>(p.dgl);
    const int width = p.dgl_width;
    double s = 0.0;
    for (int n = 0; n < p.N; ++n) {
        const SeqRange seq = seq_range(p, n);
        for (int t = threadIdx.x; t < seq.len; t += 256) {
            if (p.reverse && t == 0) continue;
            const i64 src = ((seq.bos + t) * p.H + h) * (i64)width;
            for (int x = 0; x < width; ++x) s += dgl[src + x];
        }
    }
    red[threadIdx.x] = s;
    block_sync();
    for (int stride = 128; stride >= 1; stride >>= 1) {
        if ((int)threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
        block_sync();
    }
    if (threadIdx.x == 0) la_store(reinterpret_cast<float*>(p.aux) + h, (float)red[0], p.accumulate);
}

// grid (ceil(tokens * H / 256)). v' = [v, 1] of width V + 1 (element type T) into p.aux.
LA_KERNEL(256) la_pack_ones(LA_PARAMS p) {
    const i64 row = (i64)blockIdx.x * 256 + threadIdx.x;
    if (row >= p.total_tokens * p.H) return;
    const T* v = reinterpret_cast<const T*>(p.v);
    T* out = reinterpret_cast<T*>(p.aux);
    for (int c = 0; c < p.V; ++c) out[row * (p.V + 1) + c] = v[row * p.V + c];
    out[row * (p.V + 1) + p.V] = from_float<T>(1.0f);
}

// grid (ceil(tokens * H / 256)). o = num / (den + eps) from the width-(V+1) forward result p.aux.
LA_KERNEL(256) la_normalize(LA_PARAMS p) {
    const i64 row = (i64)blockIdx.x * 256 + threadIdx.x;
    if (row >= p.total_tokens * p.H) return;
    const float* num = reinterpret_cast<const float*>(p.aux) + row * (p.V + 1);
    float* o = reinterpret_cast<float*>(p.o) + row * p.V;
    const float den = num[p.V] + p.eps;
    for (int c = 0; c < p.V; ++c) o[c] = num[c] / den;
}

// grid (ceil(tokens * H / 256)). Cotangent of the width-(V+1) unnormalised result p.o (f32) from
// the user's do (T or f32), into p.aux (f32, width V + 1):
//   d num_c = do_c / (den + eps),   d den = -sum_c do_c o_c / (den + eps)   with o_c = num_c / (den + eps).
LA_KERNEL(256) la_norm_grad(LA_PARAMS p) {
    const i64 row = (i64)blockIdx.x * 256 + threadIdx.x;
    if (row >= p.total_tokens * p.H) return;
    const float* num = reinterpret_cast<const float*>(p.o) + row * (p.V + 1);
    float* out = reinterpret_cast<float*>(p.aux) + row * (p.V + 1);
    const float den = num[p.V] + p.eps;
    float s = 0.0f;
    for (int c = 0; c < p.V; ++c) {
        const float d = p.do_f32 ? reinterpret_cast<const float*>(p.d_o)[row * p.V + c]
                                 : to_float(reinterpret_cast<const T*>(p.d_o)[row * p.V + c]);
        out[c] = d / den;
        s += d * (num[c] / den);
    }
    out[p.V] = -s / den;
}

// grid (ceil(tokens * H / 256)). dv = the first V columns of the width-(V+1) gradient p.aux.
LA_KERNEL(256) la_drop_ones(LA_PARAMS p) {
    const i64 row = (i64)blockIdx.x * 256 + threadIdx.x;
    if (row >= p.total_tokens * p.H) return;
    const float* src = reinterpret_cast<const float*>(p.aux) + row * (p.V + 1);
    float* dv = reinterpret_cast<float*>(p.dv) + row * p.V;
    for (int c = 0; c < p.V; ++c) dv[c] = src[c];
}

// grid (blocks), 256 threads, grid-stride. The device-side value check of the device-resident API
// (src/linear/cuda/values.rs): ORs into the u32 at p.dgl the flag 1 for a NaN or an infinity
// (exponent bits all set) and, with p.reverse set (a gate), the flag 2 for a value > 0 (sign bit
// clear, magnitude nonzero), over the p.total_tokens elements at p.aux of format p.gate_kind
// (0 f32, 1 bf16, 2 f16). The values are read as bits: no float compare, so no fast-math
// assumption about NaN can hide one.
LA_KERNEL(256) la_value_flags(LA_PARAMS p) {
    const i64 n = p.total_tokens;
    const int format = p.gate_kind;
    const bool gate = p.reverse != 0;
    const unsigned exponent = format == 0 ? 0x7f800000u : (format == 1 ? 0x7f80u : 0x7c00u);
    const unsigned sign = format == 0 ? 0x80000000u : 0x8000u;
    const unsigned magnitude = sign - 1u;
    unsigned flags = 0u;
    for (i64 i = (i64)blockIdx.x * 256 + threadIdx.x; i < n; i += (i64)gridDim.x * 256) {
        const unsigned b = format == 0 ? reinterpret_cast<const unsigned*>(p.aux)[i]
                                       : (unsigned)reinterpret_cast<const unsigned short*>(p.aux)[i];
        if ((b & exponent) == exponent) flags |= 1u;
        if (gate && (b & sign) == 0u && (b & magnitude) != 0u) flags |= 2u;
    }
    if (flags != 0u) atomic_or(reinterpret_cast<unsigned*>(p.dgl), flags);
}
