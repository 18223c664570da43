// Launch parameters of every decayed-linear-attention kernel (one struct, passed by value), and the
// indexing shared by those kernels. Mirrored field by field by `LaParams` in
// src/linear/cuda/params.rs (the host checks the size; keep both in the same order).
//
// Index conventions
// - User tensors (q, k, v, g, do, o, dq, dk, dv) are in memory order: token `tok` of the packed
//   sequence, element (tok, h, d) at (tok * H + h) * D + d (64-bit arithmetic).
// - A pass runs over the *logical* positions t = 0..L-1 of each sequence [bos, bos + L). With
//   `reverse` the logical position t is memory token bos + L - 1 - t (the flipped sequence of the
//   bidirectional identity, kernels.md), otherwise bos + t.
// - Internal buffers (gcum, A, dA, dq_intra, dk_intra, dgl) are indexed by bos + t (logical order).
// - Chunk c of a sequence covers logical rows [c * BT, min((c + 1) * BT, L)). States are kept at
//   every chunk boundary: state index s0 + c is the state *before* chunk c, s0 + NT the final one.
#pragma once

struct LaParams {
    u64 q, k, v;             // [tokens, H, K | V], element type T
    u64 g;                   // user gate, f32: [H] | [tokens, H] | [tokens, H, K]
    u64 h0;                  // [N, H, K, V] f32
    u64 ht;                  // [N, H, K, V] f32 (output)
    u64 d_o;                 // [tokens, H, V], element type T, or f32 when do_f32
    u64 dht;                 // [N, H, K, V] f32
    u64 dh0;                 // [N, H, K, V] f32 (output)
    u64 o;                   // [tokens, H, V] f32 (output)
    u64 dq, dk, dv;          // [tokens, H, K | V] f32 (outputs)
    u64 gcum;                // [tokens, H, KG] f32: within-chunk cumulative gate / ln 2 (logical)
    u64 hs, dhs;             // [num_states, H, K, V] f32: chunk-boundary states and their gradients
    u64 A, dA;               // [tokens, H, BT] f32: intra-chunk scores / their gradients (logical)
    u64 dq_intra, dk_intra;  // [tokens, H, K] f32: intra-chunk parts of dq, dk (logical)
    u64 dgl;                 // [tokens, H, KG] f32: this pass's gate gradient (logical)
    u64 cu_seqlens;          // [N + 1] i64: sequence starts (B equal-length sequences: b * T)
    u64 chunks;              // [num_chunks] int4: (sequence, chunk in sequence, state index, 0)
    u64 seq_state;           // [N] i32: state index before chunk 0 of each sequence
    u64 aux;                 // kernel-specific (gate-gradient target, scratch)
    i64 total_tokens;
    int N, H, K, V;
    int num_chunks;
    int gate_kind;           // 0 none, 1 per head [H], 2 scalar [tokens, H], 3 vector [tokens, H, K]
    int reverse;             // run over the flipped sequences, with the shifted backward gate
    int strict;              // exclude the diagonal (j < i instead of j <= i)
    int accumulate;          // outputs o, dq, dk, dv, target gradients: += instead of =
    int do_f32;              // d_o holds f32 instead of T
    float scale;
    float eps;
    int dgl_width;           // channels per token of dgl: K (vector gate kernels, recurrent) or 1
    int reserved;
};
static_assert(sizeof(LaParams) == 264, "LaParams layout changed: update src/linear/cuda/params.rs");

// Kernels take the parameters by value on the GPU; the host emulation passes a reference (same
// ABI as a pointer, so its launcher can call every kernel the same way).
#ifdef LA_EMULATION
#define LA_PARAMS const LaParams&
#else
#define LA_PARAMS const LaParams
#endif

#define LA_GATE_NONE 0
#define LA_GATE_PER_HEAD 1
#define LA_GATE_SCALAR 2
#define LA_GATE_VECTOR 3

// Chunk size (rows of an intra-chunk block), a multiple of 16, and the 16-row sub-chunks in it.
#ifndef LA_BT
#define LA_BT 64
#endif
#define LA_NC (LA_BT / 16)

// 1: the kernels use a per-key-channel cumulative gate [tokens, H, K]; 0: one value per token.
#ifndef LA_GATE_VEC
#define LA_GATE_VEC 1
#endif

struct SeqRange {
    i64 bos;
    int len;
};

LA_DEVICE SeqRange seq_range(const LaParams& p, int n) {
    const i64* cu = reinterpret_cast<const i64*>(p.cu_seqlens);
    SeqRange s;
    s.bos = cu[n];
    s.len = (int)(cu[n + 1] - cu[n]);
    return s;
}

// Memory token of logical position t.
LA_DEVICE i64 mem_tok(const LaParams& p, const SeqRange& s, int t) {
    return p.reverse ? s.bos + (i64)(s.len - 1 - t) : s.bos + (i64)t;
}

struct ChunkInfo {
    int n;        // sequence
    int c;        // chunk within the sequence
    int state;    // state index before this chunk
    SeqRange seq;
    int t0;       // first logical row
    int rows;     // valid rows, 1..BT
};

LA_DEVICE ChunkInfo chunk_info(const LaParams& p, int chunk_id) {
    const int4 e = reinterpret_cast<const int4*>(p.chunks)[chunk_id];
    ChunkInfo ci;
    ci.n = e.x;
    ci.c = e.y;
    ci.state = e.z;
    ci.seq = seq_range(p, ci.n);
    ci.t0 = ci.c * LA_BT;
    const int left = ci.seq.len - ci.t0;
    ci.rows = left < LA_BT ? left : LA_BT;
    return ci;
}

// The gate value (natural log) that logical position t of this pass uses, per key channel kk.
// Forward: g at the token itself. Reverse: the backward-direction gate shifted one step later in
// the flipped sequence, i.e. g at memory token bos + L - t (t >= 1), and 0 at t = 0.
LA_DEVICE float pass_gate(const LaParams& p, const SeqRange& s, int t, int h, int kk) {
    if (p.gate_kind == LA_GATE_NONE) return 0.0f;
    i64 tok;
    if (p.reverse) {
        if (t == 0) return 0.0f;
        tok = s.bos + (i64)(s.len - t);
    } else {
        tok = s.bos + (i64)t;
    }
    const float* g = reinterpret_cast<const float*>(p.g);
    switch (p.gate_kind) {
        case LA_GATE_PER_HEAD:
            return g[h];
        case LA_GATE_SCALAR:
            return g[tok * p.H + h];
        default:
            return g[(tok * p.H + h) * (i64)p.K + kk];
    }
}

// Output store of the engine kernels: `=` for the first pass writing a buffer, `+=` for the next.
LA_DEVICE void la_store(float* dst, float x, bool accumulate) {
    if (accumulate) {
        *dst += x;
    } else {
        *dst = x;
    }
}
