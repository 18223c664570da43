// Chunkwise decayed linear attention (ops.md section 1; algorithm in kernels.md), forward and
// backward, following flash-linear-attention's decomposition:
//
//   la_cumsum         G = within-chunk cumulative gate / ln 2 (f32)           [chunk_local_cumsum]
//   la_states         chunk-boundary states h (sequential over chunks)        [chunk_fwd_h]
//   la_intra_A        intra-chunk scores A (BT x BT per chunk, f32)           [chunk intra]
//   la_fwd_o          o = scale (q 2^G) h + A v                                [chunk_fwd_o]
//   la_dstates        dh, reverse over chunks                                  [chunk_bwd_dh]
//   la_bwd_dv         dv = A^T do + (k 2^(Glast - G)) dh                       [chunk_bwd_dv]
//   la_bwd_dA         dA = scale do v^T (masked)                               [chunk_bwd_dA]
//   la_bwd_dqk_intra  intra-chunk dq, dk from dA                               [chunk_bwd_dqk_intra]
//   la_bwd_dqkg       inter-chunk dq, dk, totals, and the gate gradient        [chunk_bwd_dqkg]
//
// Compile-time variant: LA_DTYPE (bf16, f16, f32 inputs), LA_GATE_VEC (per-key-channel gate or one
// value per token), LA_BT (chunk size). Head dims K, V are run-time: tiles of 64 channels with
// zero padding in the kernel.
//
// Numerics. Every exponent is G_late - G_early <= 0 (gates are validated <= 0 on the host), so every
// factor 2^x lies in [0, 1]. Rows past the end of a sequence read the cumulative gate of the last
// valid row, which keeps those exponents <= 0 too (their q, k, v are zero). Matmul-shaped stages run
// on mma.sync m16n8k16 with f32 accumulation; operands that are not exact inputs (decayed q/k, the
// f32 states, A, dA) are split into a 16-bit value and its 16-bit residual (Split<T>), so they keep
// about 16 significant bits. The 16x16 diagonal sub-blocks of A, dq and dk are computed elementwise
// in f32 without any factorisation (the factorised form needs unbounded exponents there).
// Off-diagonal sub-blocks of vector gates are anchored as in flash-linear-attention: rows of block
// i at the first row of i (A, dq), columns of block j at the last row of j (dk).

#include "common.cuh"
#include "linear_params.cuh"

#define LA_TK 64  // key channels per tile
#define LA_TV 64  // value channels per tile
#define LA_CHUNK_THREADS (LA_NC * 32)
#define LA_STATE_THREADS 128

static constexpr bool SPLIT = Split<T>::value;

// Shared-memory carving. Every region starts 16-byte aligned.
struct Carver {
    unsigned char* base;
    int offset;
    template <class E>
    LA_DEVICE E* take(int bytes) {
        E* p = reinterpret_cast<E*>(base + offset);
        offset += (bytes + 15) / 16 * 16;
        return p;
    }
};

// Row strides (elements) of the shared tiles. 16-bit tiles: +8 elements (ldmatrix-friendly).
// f32 tiles read in A/"n-major B" fragment order (pairs along the row): +8 floats; f32 tiles read
// in "k-major B" fragment order (pairs down a column): +4 floats.
#define LD_T (LA_TK + SmemPad<T>::value)
#define LD_F 72
#define LD_FK 68
#define LD_A (LA_BT + 8)

// Cumulative-gate tile [BT rows][LA_TK channels] of chunk `ci`, head h, channels k0.., rows past the
// sequence end clamped to the last valid row.
LA_DEVICE void stage_gcum_vec(float* Gs, const LaParams& p, const ChunkInfo& ci, int h, int k0,
                              int nthreads) {
    const float* gcum = reinterpret_cast<const float*>(p.gcum);
    for (int i = threadIdx.x; i < LA_BT * LA_TK; i += nthreads) {
        const int r = i / LA_TK, c = i % LA_TK;
        const int rr = r < ci.rows ? r : ci.rows - 1;
        const int kk = k0 + c;
        Gs[r * LD_F + c] = kk < p.K ? gcum[((ci.seq.bos + ci.t0 + rr) * p.H + h) * (i64)p.K + kk] : 0.0f;
    }
}
LA_DEVICE void stage_gcum_scalar(float* Gcol, const LaParams& p, const ChunkInfo& ci, int h,
                                 int nthreads) {
    const float* gcum = reinterpret_cast<const float*>(p.gcum);
    for (int r = threadIdx.x; r < LA_BT; r += nthreads) {
        const int rr = r < ci.rows ? r : ci.rows - 1;
        Gcol[r] = gcum[(ci.seq.bos + ci.t0 + rr) * p.H + h];
    }
}

// Stages rows of a user tensor [tokens, H, D] (element type Src) for the chunk's logical rows
// (reverse-aware), channels d0 .. d0 + 64, zero outside, into a shared tile of Dst.
template <int NTHREADS, class Src, class Dst>
LA_DEVICE void stage_rows(Dst* dst, int ld, const LaParams& p, const ChunkInfo& ci, u64 tensor, int h,
                          int D, int d0) {
    const Src* base = reinterpret_cast<const Src*>(tensor);
    const bool vec = (D % 8 == 0) && aligned16(base);
    stage_tile<LA_BT, 64, NTHREADS, Src, Dst>(
        dst, ld,
        [&](int r) -> const Src* {
            if (r >= ci.rows) return nullptr;
            return base + (mem_tok(p, ci.seq, ci.t0 + r) * p.H + h) * (i64)D;
        },
        d0, D, vec, Identity());
}

// Stages a [64 x 64] tile of a state [K, V] (f32) at rows k0.., cols v0.. with zero padding.
template <int NTHREADS>
LA_DEVICE void stage_state(float* dst, int ld, const float* state, const LaParams& p, int k0, int v0) {
    const bool vec = (p.V % 8 == 0) && aligned16(state);
    stage_tile<64, 64, NTHREADS, float, float>(
        dst, ld,
        [&](int r) -> const float* { return k0 + r < p.K ? state + (i64)(k0 + r) * p.V : nullptr; },
        v0, p.V, vec, Identity());
}

// Stages the chunk's rows of an internal [tokens, H, BT] f32 buffer (A or dA), zero past the end.
template <int NTHREADS>
LA_DEVICE void stage_scores(float* dst, const LaParams& p, const ChunkInfo& ci, u64 buffer, int h) {
    const float* base = reinterpret_cast<const float*>(buffer);
    stage_tile<LA_BT, LA_BT, NTHREADS, float, float>(
        dst, LD_A,
        [&](int r) -> const float* {
            return r < ci.rows ? base + ((ci.seq.bos + ci.t0 + r) * p.H + h) * (i64)LA_BT : nullptr;
        },
        0, LA_BT, aligned16(base), Identity());
}

// ================================================================================================
// la_cumsum: grid (num_chunks, H), 64 threads.
// ================================================================================================
LA_KERNEL(64) la_cumsum(LA_PARAMS p) {
    const ChunkInfo ci = chunk_info(p, blockIdx.x);
    const int h = blockIdx.y;
    const int KG = LA_GATE_VEC ? p.K : 1;
    float* out = reinterpret_cast<float*>(p.gcum);
    for (int kk = threadIdx.x; kk < KG; kk += 64) {
        float acc = 0.0f;
        for (int r = 0; r < ci.rows; ++r) {
            const int t = ci.t0 + r;
            acc += pass_gate(p, ci.seq, t, h, kk) * LA_LOG2E;
            out[((ci.seq.bos + t) * p.H + h) * (i64)KG + kk] = acc;
        }
    }
}

// ================================================================================================
// la_states / la_dstates: grid (N*H, ceil(K/64), ceil(V/64)), 128 threads. Warp w owns state rows
// 16w..16w+15 of the 64 x 64 tile; the tile lives in registers across the sequential chunk loop.
//   forward:  hs[c+1] = 2^Glast hs[c] + (k 2^(Glast - G))^T v      (stores hs[c] before the update)
//   backward: dhs[c]  = 2^Glast dhs[c+1] + (scale q 2^G)^T do      (stores dhs[c+1] before it)
// ================================================================================================

struct StateSmem {
    T* Xs;      // [BT][LD_T] raw k (forward) or q (backward), channels k0..
    float* Gs;  // [BT][LD_F] cumulative gate (vector gates)
    float* Gc;  // [BT] cumulative gate (scalar gates)
    T* Ys;      // [BT][LD_T] v, or do of type T
    float* Yf;  // [BT][LD_FK] do as f32 (aliases Ys)
};

#define STATE_SMEM_BYTES                                                                      \
    (((LA_BT * LD_T * (int)sizeof(T) + 15) / 16 * 16) + LA_BT * LD_F * 4 + 16 * ((LA_BT * 4 + 15) / 16) + \
     (LA_BT * LD_FK * 4 > LA_BT * LD_T * (int)sizeof(T) ? LA_BT * LD_FK * 4 : LA_BT * LD_T * (int)sizeof(T)))

template <bool BACKWARD>
LA_DEVICE void state_scan(const LaParams& p) {
    Carver cv{la_smem, 0};
    StateSmem sm;
    sm.Xs = cv.take<T>(LA_BT * LD_T * (int)sizeof(T));
    sm.Gs = cv.take<float>(LA_BT * LD_F * 4);
    sm.Gc = cv.take<float>(LA_BT * 4);
    const int ybytes = LA_BT * LD_FK * 4 > LA_BT * LD_T * (int)sizeof(T) ? LA_BT * LD_FK * 4
                                                                          : LA_BT * LD_T * (int)sizeof(T);
    sm.Ys = cv.take<T>(ybytes);
    sm.Yf = reinterpret_cast<float*>(sm.Ys);

    const int k0 = blockIdx.y * 64, v0 = blockIdx.z * 64;
    const int n = blockIdx.x / p.H, h = blockIdx.x % p.H;
    const int w = warp_id();
    const SeqRange seq = seq_range(p, n);
    const int num_chunks = (seq.len + LA_BT - 1) / LA_BT;
    const int s0 = reinterpret_cast<const int*>(p.seq_state)[n];
    const i64 KV = (i64)p.K * p.V;
    float* states = reinterpret_cast<float*>(BACKWARD ? p.dhs : p.hs);
    const float* init = reinterpret_cast<const float*>(BACKWARD ? p.dht : p.h0);
    const i64 nh = (i64)n * p.H + h;

    Acc<1, 8> acc;
    for_each_acc<1, 8>([&](int i, int j, int e, int r, int c) {
        const int kk = k0 + 16 * w + r, vv = v0 + c;
        acc.c[i][j][e] = (init && kk < p.K && vv < p.V) ? init[nh * KV + (i64)kk * p.V + vv] : 0.0f;
    });

    auto store_state = [&](float* dst) {
        for_each_acc<1, 8>([&](int i, int j, int e, int r, int c) {
            const int kk = k0 + 16 * w + r, vv = v0 + c;
            if (kk < p.K && vv < p.V) dst[(i64)kk * p.V + vv] = acc.c[i][j][e];
        });
    };

    const bool y_f32 = BACKWARD && p.do_f32;
    for (int step = 0; step < num_chunks; ++step) {
        const int c = BACKWARD ? num_chunks - 1 - step : step;
        ChunkInfo ci;
        ci.n = n;
        ci.c = c;
        ci.state = s0 + c;
        ci.seq = seq;
        ci.t0 = c * LA_BT;
        ci.rows = seq.len - ci.t0 < LA_BT ? seq.len - ci.t0 : LA_BT;

        // The state entering this step: hs[c] (forward) or dhs[c+1] (backward).
        store_state(states + ((i64)(ci.state + (BACKWARD ? 1 : 0)) * p.H + h) * KV);

        stage_rows<LA_STATE_THREADS, T, T>(sm.Xs, LD_T, p, ci, BACKWARD ? p.q : p.k, h, p.K, k0);
        if (LA_GATE_VEC) {
            stage_gcum_vec(sm.Gs, p, ci, h, k0, LA_STATE_THREADS);
        } else {
            stage_gcum_scalar(sm.Gc, p, ci, h, LA_STATE_THREADS);
        }
        if (y_f32) {
            stage_rows<LA_STATE_THREADS, float, float>(sm.Yf, LD_FK, p, ci, p.d_o, h, p.V, v0);
        } else {
            stage_rows<LA_STATE_THREADS, T, T>(sm.Ys, LD_T, p, ci, BACKWARD ? p.d_o : p.v, h, p.V, v0);
        }
        block_sync();

        const int last = ci.rows - 1;
        // Decay of the carried state over the whole chunk: 2^Glast per key row.
        for_each_acc<1, 8>([&](int i, int j, int e, int r, int) {
            const float gl = LA_GATE_VEC ? sm.Gs[last * LD_F + 16 * w + r] : sm.Gc[last];
            acc.c[i][j][e] *= fast_exp2(gl);
        });

        const float scale = BACKWARD ? p.scale : 1.0f;
        #pragma unroll
        for (int ks = 0; ks < LA_NC; ++ks) {
            // A(m = key row, k = time) = X[t][kk] * decay, computed in f32 per fragment element.
            FragA<T> a, alo;
            make_a<T>(a, SPLIT ? &alo : (FragA<T>*)nullptr, [&](int m, int kq) {
                const int t = 16 * ks + kq, kk = 16 * w + m;
                const float x = to_float(sm.Xs[t * LD_T + kk]);
                float e;
                if (LA_GATE_VEC) {
                    const float gt = sm.Gs[t * LD_F + kk];
                    e = BACKWARD ? gt : sm.Gs[last * LD_F + kk] - gt;
                } else {
                    e = BACKWARD ? sm.Gc[t] : sm.Gc[last] - sm.Gc[t];
                }
                return scale * x * fast_exp2(e);
            });
            #pragma unroll
            for (int np = 0; np < 4; ++np) {
                FragB<T> b0, b1, b0lo, b1lo;
                if (y_f32) {
                    const float* Y = sm.Yf + (16 * ks) * LD_FK + 16 * np;
                    make_b<T>(b0, SPLIT ? &b0lo : (FragB<T>*)nullptr, [&](int kq, int nn) { return Y[kq * LD_FK + nn]; });
                    make_b<T>(b1, SPLIT ? &b1lo : (FragB<T>*)nullptr, [&](int kq, int nn) { return Y[kq * LD_FK + nn + 8]; });
                    mma_split<T, SPLIT, SPLIT>(acc.c[0][2 * np], a, alo, b0, b0lo);
                    mma_split<T, SPLIT, SPLIT>(acc.c[0][2 * np + 1], a, alo, b1, b1lo);
                } else {
                    load_b2<T, true>(b0, b1, sm.Ys + (16 * ks) * LD_T + 16 * np, LD_T);
                    mma_split<T, SPLIT, false>(acc.c[0][2 * np], a, alo, b0, b0);
                    mma_split<T, SPLIT, false>(acc.c[0][2 * np + 1], a, alo, b1, b1);
                }
            }
        }
        block_sync();
    }

    // Final: hs[NT] (= ht) or dhs[0] (= dh0).
    store_state(states + ((i64)(s0 + (BACKWARD ? 0 : num_chunks)) * p.H + h) * KV);
    float* extra = reinterpret_cast<float*>(BACKWARD ? p.dh0 : p.ht);
    if (extra) store_state(extra + nh * KV);
}

LA_KERNEL(LA_STATE_THREADS) la_states(LA_PARAMS p) { state_scan<false>(p); }
LA_KERNEL(LA_STATE_THREADS) la_dstates(LA_PARAMS p) { state_scan<true>(p); }

// ================================================================================================
// la_intra_A: grid (num_chunks, H), NC warps. Warp i computes row block i of A (16 x BT).
// ================================================================================================

#define INTRA_A_SMEM_BYTES (2 * LA_BT * LD_T * (int)sizeof(T) + LA_BT * LD_F * 4 + LA_BT * 4 + 64)

LA_KERNEL(LA_CHUNK_THREADS) la_intra_A(LA_PARAMS p) {
    Carver cv{la_smem, 0};
    T* Qs = cv.take<T>(LA_BT * LD_T * (int)sizeof(T));
    T* Ks = cv.take<T>(LA_BT * LD_T * (int)sizeof(T));
    float* Gs = cv.take<float>(LA_BT * LD_F * 4);
    float* Gc = cv.take<float>(LA_BT * 4);

    const ChunkInfo ci = chunk_info(p, blockIdx.x);
    const int h = blockIdx.y;
    const int i = warp_id();
    if (!LA_GATE_VEC) stage_gcum_scalar(Gc, p, ci, h, LA_CHUNK_THREADS);

    Acc<1, 2 * LA_NC> acc;  // blocks j = 0..NC-1 of row block i, 2 n-tiles each
    acc.zero();

    for (int k0 = 0; k0 < p.K; k0 += LA_TK) {
        stage_rows<LA_CHUNK_THREADS, T, T>(Qs, LD_T, p, ci, p.q, h, p.K, k0);
        stage_rows<LA_CHUNK_THREADS, T, T>(Ks, LD_T, p, ci, p.k, h, p.K, k0);
        if (LA_GATE_VEC) stage_gcum_vec(Gs, p, ci, h, k0, LA_CHUNK_THREADS);
        block_sync();

        #pragma unroll
        for (int ks = 0; ks < LA_TK / 16; ++ks) {
            const int kc = 16 * ks;
            if (LA_GATE_VEC) {
                if (i > 0) {
                    // Rows of block i anchored at its first row: q_r 2^(G_r - G_16i) (exponent <= 0).
                    const float* gn = Gs + (16 * i) * LD_F + kc;
                    FragA<T> a, alo;
                    make_a<T>(a, SPLIT ? &alo : (FragA<T>*)nullptr, [&](int m, int kq) {
                        const int r = 16 * i + m;
                        return to_float(Qs[r * LD_T + kc + kq]) * fast_exp2(Gs[r * LD_F + kc + kq] - gn[kq]);
                    });
                    #pragma unroll
                    for (int j = 0; j < LA_NC; ++j) {
                        if (j < i) {
                            // Columns of block j: k_c 2^(G_16i - G_c) (exponent <= 0 since c < 16i).
                            FragB<T> b0, b1, b0lo, b1lo;
                            auto kf = [&](int kq, int nn) {
                                const int c = 16 * j + nn;
                                return to_float(Ks[c * LD_T + kc + kq]) * fast_exp2(gn[kq] - Gs[c * LD_F + kc + kq]);
                            };
                            make_b<T>(b0, SPLIT ? &b0lo : (FragB<T>*)nullptr, kf);
                            make_b<T>(b1, SPLIT ? &b1lo : (FragB<T>*)nullptr,
                                      [&](int kq, int nn) { return kf(kq, nn + 8); });
                            mma_split<T, SPLIT, SPLIT>(acc.c[0][2 * j], a, alo, b0, b0lo);
                            mma_split<T, SPLIT, SPLIT>(acc.c[0][2 * j + 1], a, alo, b1, b1lo);
                        }
                    }
                }
            } else {
                // Scalar gates: raw q k^T (exact products, f32 sums); the decay is applied after.
                FragA<T> a;
                load_a<T, false>(a, Qs + (16 * i) * LD_T + kc, LD_T);
                #pragma unroll
                for (int j = 0; j < LA_NC; ++j) {
                    if (j < i) {
                        FragB<T> b0, b1;
                        load_b2<T, false>(b0, b1, Ks + (16 * j) * LD_T + kc, LD_T);
                        mma<T>(acc.c[0][2 * j], a, b0);
                        mma<T>(acc.c[0][2 * j + 1], a, b1);
                    }
                }
            }
        }

        // Diagonal block, exact f32: A_rc = sum_k q_rk k_ck 2^(G_rk - G_ck) for c <= r.
        // (jn runs over every column tile so that register indices stay compile-time constants.)
        for_each_acc<1, 2 * LA_NC>([&](int, int jn, int e, int r, int c) {
            if ((jn >> 1) != i) return;
            const int R = 16 * i + r, C = c;
            if (C > R || (p.strict && C == R)) return;
            float s = 0.0f;
            for (int kk = 0; kk < LA_TK; ++kk) {
                const float d = LA_GATE_VEC ? fast_exp2(Gs[R * LD_F + kk] - Gs[C * LD_F + kk]) : 1.0f;
                s = fmaf(to_float(Qs[R * LD_T + kk]) * to_float(Ks[C * LD_T + kk]), d, s);
            }
            acc.c[0][jn][e] += s;
        });
        block_sync();
    }

    // Epilogue: scale, scalar decay, causal mask; whole rows are written (zeros above the diagonal).
    float* A = reinterpret_cast<float*>(p.A);
    for_each_acc<1, 2 * LA_NC>([&](int, int jn, int e, int r, int c) {
        const int R = 16 * i + r, C = c;
        if (R >= ci.rows) return;
        const bool keep = p.strict ? C < R : C <= R;
        float x = 0.0f;
        if (keep) {
            x = acc.c[0][jn][e] * p.scale;
            if (!LA_GATE_VEC) x *= fast_exp2(Gc[R] - Gc[C]);
        }
        A[((ci.seq.bos + ci.t0 + R) * p.H + h) * (i64)LA_BT + C] = x;
    });
}

// ================================================================================================
// la_fwd_o: grid (num_chunks, ceil(V/64), H), NC warps; warp i owns rows 16i..16i+15 x 64 values.
// ================================================================================================

#define FWD_O_PHASE1 (LA_BT * LD_T * (int)sizeof(T) + LA_BT * LD_F * 4 + 64 * LD_FK * 4)
#define FWD_O_PHASE2 (LA_BT * LD_A * 4 + LA_BT * LD_T * (int)sizeof(T))
#define FWD_O_SMEM_BYTES ((FWD_O_PHASE1 > FWD_O_PHASE2 ? FWD_O_PHASE1 : FWD_O_PHASE2) + LA_BT * 4 + 64)

LA_KERNEL(LA_CHUNK_THREADS) la_fwd_o(LA_PARAMS p) {
    Carver cv{la_smem, 0};
    float* Gc = cv.take<float>(LA_BT * 4);
    const int phase_base = cv.offset;
    T* Qs = cv.take<T>(LA_BT * LD_T * (int)sizeof(T));
    float* Gs = cv.take<float>(LA_BT * LD_F * 4);
    float* Hs = cv.take<float>(64 * LD_FK * 4);
    cv.offset = phase_base;
    float* As = cv.take<float>(LA_BT * LD_A * 4);
    T* Vs = cv.take<T>(LA_BT * LD_T * (int)sizeof(T));

    const int v0 = blockIdx.y * 64;
    const ChunkInfo ci = chunk_info(p, blockIdx.x);
    const int h = blockIdx.z;
    const int i = warp_id();
    const i64 KV = (i64)p.K * p.V;
    const float* hstate = reinterpret_cast<const float*>(p.hs) + ((i64)ci.state * p.H + h) * KV;
    if (!LA_GATE_VEC) stage_gcum_scalar(Gc, p, ci, h, LA_CHUNK_THREADS);

    Acc<1, 8> acc;
    acc.zero();
    // Inter-chunk: (q 2^G) h_c over key tiles.
    for (int k0 = 0; k0 < p.K; k0 += LA_TK) {
        stage_rows<LA_CHUNK_THREADS, T, T>(Qs, LD_T, p, ci, p.q, h, p.K, k0);
        if (LA_GATE_VEC) stage_gcum_vec(Gs, p, ci, h, k0, LA_CHUNK_THREADS);
        stage_state<LA_CHUNK_THREADS>(Hs, LD_FK, hstate, p, k0, v0);
        block_sync();
        #pragma unroll
        for (int ks = 0; ks < LA_TK / 16; ++ks) {
            const int kc = 16 * ks;
            FragA<T> a, alo;
            if (LA_GATE_VEC) {
                make_a<T>(a, SPLIT ? &alo : (FragA<T>*)nullptr, [&](int m, int kq) {
                    const int r = 16 * i + m;
                    return to_float(Qs[r * LD_T + kc + kq]) * fast_exp2(Gs[r * LD_F + kc + kq]);
                });
            } else {
                load_a<T, false>(a, Qs + (16 * i) * LD_T + kc, LD_T);
            }
            #pragma unroll
            for (int np = 0; np < 4; ++np) {
                FragB<T> b0, b1, b0lo, b1lo;
                const float* Hb = Hs + kc * LD_FK + 16 * np;
                make_b<T>(b0, SPLIT ? &b0lo : (FragB<T>*)nullptr, [&](int kq, int nn) { return Hb[kq * LD_FK + nn]; });
                make_b<T>(b1, SPLIT ? &b1lo : (FragB<T>*)nullptr, [&](int kq, int nn) { return Hb[kq * LD_FK + nn + 8]; });
                mma_split<T, SPLIT && LA_GATE_VEC, SPLIT>(acc.c[0][2 * np], a, alo, b0, b0lo);
                mma_split<T, SPLIT && LA_GATE_VEC, SPLIT>(acc.c[0][2 * np + 1], a, alo, b1, b1lo);
            }
        }
        block_sync();
    }
    for_each_acc<1, 8>([&](int i0, int j, int e, int r, int) {
        float f = p.scale;
        if (!LA_GATE_VEC) f *= fast_exp2(Gc[16 * i + r]);
        acc.c[i0][j][e] *= f;
    });

    // Intra-chunk: A v (A already masked and scaled).
    stage_scores<LA_CHUNK_THREADS>(As, p, ci, p.A, h);
    stage_rows<LA_CHUNK_THREADS, T, T>(Vs, LD_T, p, ci, p.v, h, p.V, v0);
    block_sync();
    #pragma unroll
    for (int j = 0; j < LA_NC; ++j) {
        if (j <= i) {
            FragA<T> a, alo;
            make_a<T>(a, SPLIT ? &alo : (FragA<T>*)nullptr,
                      [&](int m, int kq) { return As[(16 * i + m) * LD_A + 16 * j + kq]; });
            #pragma unroll
            for (int np = 0; np < 4; ++np) {
                FragB<T> b0, b1;
                load_b2<T, true>(b0, b1, Vs + (16 * j) * LD_T + 16 * np, LD_T);
                mma_split<T, SPLIT, false>(acc.c[0][2 * np], a, alo, b0, b0);
                mma_split<T, SPLIT, false>(acc.c[0][2 * np + 1], a, alo, b1, b1);
            }
        }
    }

    float* o = reinterpret_cast<float*>(p.o);
    for_each_acc<1, 8>([&](int i0, int j, int e, int r, int c) {
        const int R = 16 * i + r, vv = v0 + c;
        if (R >= ci.rows || vv >= p.V) return;
        la_store(o + (mem_tok(p, ci.seq, ci.t0 + R) * p.H + h) * (i64)p.V + vv, acc.c[i0][j][e], p.accumulate);
    });
}

// ================================================================================================
// la_bwd_dv: grid (num_chunks, ceil(V/64), H), NC warps; warp i owns rows 16i.. x 64 values.
//   dv_t = sum_{s >= t} A_st do_s + (k_t 2^(Glast - G_t)) dhs[c+1]
// ================================================================================================

#define DV_PHASE1 (LA_BT * LD_T * (int)sizeof(T) + LA_BT * LD_F * 4 + 64 * LD_FK * 4)
#define DV_PHASE2 (LA_BT * LD_A * 4 + LA_BT * LD_FK * 4)
#define DV_SMEM_BYTES ((DV_PHASE1 > DV_PHASE2 ? DV_PHASE1 : DV_PHASE2) + LA_BT * 4 + 64)

LA_KERNEL(LA_CHUNK_THREADS) la_bwd_dv(LA_PARAMS p) {
    Carver cv{la_smem, 0};
    float* Gc = cv.take<float>(LA_BT * 4);
    const int phase_base = cv.offset;
    T* Ks = cv.take<T>(LA_BT * LD_T * (int)sizeof(T));
    float* Gs = cv.take<float>(LA_BT * LD_F * 4);
    float* dHs = cv.take<float>(64 * LD_FK * 4);
    cv.offset = phase_base;
    float* As = cv.take<float>(LA_BT * LD_A * 4);
    T* dOs = cv.take<T>(LA_BT * LD_FK * 4);  // T tile, or f32 tile (row stride LD_FK) when do_f32
    float* dOf = reinterpret_cast<float*>(dOs);

    const int v0 = blockIdx.y * 64;
    const ChunkInfo ci = chunk_info(p, blockIdx.x);
    const int h = blockIdx.z;
    const int i = warp_id();
    const i64 KV = (i64)p.K * p.V;
    const float* dh_next = reinterpret_cast<const float*>(p.dhs) + ((i64)(ci.state + 1) * p.H + h) * KV;
    if (!LA_GATE_VEC) stage_gcum_scalar(Gc, p, ci, h, LA_CHUNK_THREADS);
    const int last = ci.rows - 1;

    Acc<1, 8> acc;
    acc.zero();
    for (int k0 = 0; k0 < p.K; k0 += LA_TK) {
        stage_rows<LA_CHUNK_THREADS, T, T>(Ks, LD_T, p, ci, p.k, h, p.K, k0);
        if (LA_GATE_VEC) stage_gcum_vec(Gs, p, ci, h, k0, LA_CHUNK_THREADS);
        stage_state<LA_CHUNK_THREADS>(dHs, LD_FK, dh_next, p, k0, v0);
        block_sync();
        #pragma unroll
        for (int ks = 0; ks < LA_TK / 16; ++ks) {
            const int kc = 16 * ks;
            FragA<T> a, alo;
            if (LA_GATE_VEC) {
                make_a<T>(a, SPLIT ? &alo : (FragA<T>*)nullptr, [&](int m, int kq) {
                    const int r = 16 * i + m;
                    return to_float(Ks[r * LD_T + kc + kq]) *
                           fast_exp2(Gs[last * LD_F + kc + kq] - Gs[r * LD_F + kc + kq]);
                });
            } else {
                load_a<T, false>(a, Ks + (16 * i) * LD_T + kc, LD_T);
            }
            #pragma unroll
            for (int np = 0; np < 4; ++np) {
                FragB<T> b0, b1, b0lo, b1lo;
                const float* Hb = dHs + kc * LD_FK + 16 * np;
                make_b<T>(b0, SPLIT ? &b0lo : (FragB<T>*)nullptr, [&](int kq, int nn) { return Hb[kq * LD_FK + nn]; });
                make_b<T>(b1, SPLIT ? &b1lo : (FragB<T>*)nullptr, [&](int kq, int nn) { return Hb[kq * LD_FK + nn + 8]; });
                mma_split<T, SPLIT && LA_GATE_VEC, SPLIT>(acc.c[0][2 * np], a, alo, b0, b0lo);
                mma_split<T, SPLIT && LA_GATE_VEC, SPLIT>(acc.c[0][2 * np + 1], a, alo, b1, b1lo);
            }
        }
        block_sync();
    }
    if (!LA_GATE_VEC) {
        for_each_acc<1, 8>([&](int i0, int j, int e, int r, int) {
            acc.c[i0][j][e] *= fast_exp2(Gc[last] - Gc[16 * i + r]);
        });
    }

    stage_scores<LA_CHUNK_THREADS>(As, p, ci, p.A, h);
    if (p.do_f32) {
        stage_rows<LA_CHUNK_THREADS, float, float>(dOf, LD_FK, p, ci, p.d_o, h, p.V, v0);
    } else {
        stage_rows<LA_CHUNK_THREADS, T, T>(dOs, LD_T, p, ci, p.d_o, h, p.V, v0);
    }
    block_sync();
    #pragma unroll
    for (int j = 0; j < LA_NC; ++j) {
        if (j >= i) {
            // A^T: element (m = t in block i, k = s in block j) = A[s][t].
            FragA<T> a, alo;
            make_a<T>(a, SPLIT ? &alo : (FragA<T>*)nullptr,
                      [&](int m, int kq) { return As[(16 * j + kq) * LD_A + 16 * i + m]; });
            #pragma unroll
            for (int np = 0; np < 4; ++np) {
                FragB<T> b0, b1, b0lo, b1lo;
                if (p.do_f32) {
                    const float* Y = dOf + (16 * j) * LD_FK + 16 * np;
                    make_b<T>(b0, SPLIT ? &b0lo : (FragB<T>*)nullptr, [&](int kq, int nn) { return Y[kq * LD_FK + nn]; });
                    make_b<T>(b1, SPLIT ? &b1lo : (FragB<T>*)nullptr, [&](int kq, int nn) { return Y[kq * LD_FK + nn + 8]; });
                    mma_split<T, SPLIT, SPLIT>(acc.c[0][2 * np], a, alo, b0, b0lo);
                    mma_split<T, SPLIT, SPLIT>(acc.c[0][2 * np + 1], a, alo, b1, b1lo);
                } else {
                    load_b2<T, true>(b0, b1, dOs + (16 * j) * LD_T + 16 * np, LD_T);
                    mma_split<T, SPLIT, false>(acc.c[0][2 * np], a, alo, b0, b0);
                    mma_split<T, SPLIT, false>(acc.c[0][2 * np + 1], a, alo, b1, b1);
                }
            }
        }
    }

    float* dv = reinterpret_cast<float*>(p.dv);
    for_each_acc<1, 8>([&](int i0, int j, int e, int r, int c) {
        const int R = 16 * i + r, vv = v0 + c;
        if (R >= ci.rows || vv >= p.V) return;
        la_store(dv + (mem_tok(p, ci.seq, ci.t0 + R) * p.H + h) * (i64)p.V + vv, acc.c[i0][j][e], p.accumulate);
    });
}

// ================================================================================================
// la_bwd_dA: grid (num_chunks, H), NC warps. dA_rc = scale do_r . v_c for c <= r (c < r strict).
// ================================================================================================

#define DA_SMEM_BYTES (LA_BT * LD_FK * 4 + LA_BT * LD_T * (int)sizeof(T) + 64)

LA_KERNEL(LA_CHUNK_THREADS) la_bwd_dA(LA_PARAMS p) {
    Carver cv{la_smem, 0};
    T* dOs = cv.take<T>(LA_BT * LD_FK * 4);
    float* dOf = reinterpret_cast<float*>(dOs);
    T* Vs = cv.take<T>(LA_BT * LD_T * (int)sizeof(T));

    const ChunkInfo ci = chunk_info(p, blockIdx.x);
    const int h = blockIdx.y;
    const int i = warp_id();
    Acc<1, 2 * LA_NC> acc;
    acc.zero();
    for (int v0 = 0; v0 < p.V; v0 += LA_TV) {
        if (p.do_f32) {
            stage_rows<LA_CHUNK_THREADS, float, float>(dOf, LD_FK, p, ci, p.d_o, h, p.V, v0);
        } else {
            stage_rows<LA_CHUNK_THREADS, T, T>(dOs, LD_T, p, ci, p.d_o, h, p.V, v0);
        }
        stage_rows<LA_CHUNK_THREADS, T, T>(Vs, LD_T, p, ci, p.v, h, p.V, v0);
        block_sync();
        #pragma unroll
        for (int ks = 0; ks < LA_TV / 16; ++ks) {
            const int kc = 16 * ks;
            FragA<T> a, alo;
            if (p.do_f32) {
                make_a<T>(a, SPLIT ? &alo : (FragA<T>*)nullptr,
                          [&](int m, int kq) { return dOf[(16 * i + m) * LD_FK + kc + kq]; });
            } else {
                load_a<T, false>(a, dOs + (16 * i) * LD_T + kc, LD_T);
            }
            #pragma unroll
            for (int j = 0; j < LA_NC; ++j) {
                if (j <= i) {
                    FragB<T> b0, b1;
                    load_b2<T, false>(b0, b1, Vs + (16 * j) * LD_T + kc, LD_T);
                    if (p.do_f32) {
                        mma_split<T, SPLIT, false>(acc.c[0][2 * j], a, alo, b0, b0);
                        mma_split<T, SPLIT, false>(acc.c[0][2 * j + 1], a, alo, b1, b1);
                    } else {
                        mma<T>(acc.c[0][2 * j], a, b0);
                        mma<T>(acc.c[0][2 * j + 1], a, b1);
                    }
                }
            }
        }
        block_sync();
    }
    float* dA = reinterpret_cast<float*>(p.dA);
    for_each_acc<1, 2 * LA_NC>([&](int, int jn, int e, int r, int c) {
        const int R = 16 * i + r, C = c;
        if (R >= ci.rows) return;
        const bool keep = p.strict ? C < R : C <= R;
        dA[((ci.seq.bos + ci.t0 + R) * p.H + h) * (i64)LA_BT + C] = keep ? acc.c[0][jn][e] * p.scale : 0.0f;
    });
}

// ================================================================================================
// la_bwd_dqk_intra: grid (num_chunks, ceil(K/64), H), NC warps. Warp i: dq of rows in block i and
// dk of rows in block i, key channels k0..k0+63, WITHOUT the diagonal term dA_rr:
//   dq_r = sum_{c < r} dA_rc k_c 2^(G_r - G_c),   dk_c = sum_{r > c} dA_rc q_r 2^(G_r - G_c)
// ================================================================================================

#define DQK_SMEM_BYTES (2 * LA_BT * LD_T * (int)sizeof(T) + LA_BT * LD_F * 4 + LA_BT * LD_A * 4 + LA_BT * 4 + 64)

LA_KERNEL(LA_CHUNK_THREADS) la_bwd_dqk_intra(LA_PARAMS p) {
    Carver cv{la_smem, 0};
    T* Qs = cv.take<T>(LA_BT * LD_T * (int)sizeof(T));
    T* Ks = cv.take<T>(LA_BT * LD_T * (int)sizeof(T));
    float* Gs = cv.take<float>(LA_BT * LD_F * 4);
    float* dAs = cv.take<float>(LA_BT * LD_A * 4);
    float* Gc = cv.take<float>(LA_BT * 4);

    const int k0 = blockIdx.y * LA_TK;
    const ChunkInfo ci = chunk_info(p, blockIdx.x);
    const int h = blockIdx.z;
    const int i = warp_id();

    stage_rows<LA_CHUNK_THREADS, T, T>(Qs, LD_T, p, ci, p.q, h, p.K, k0);
    stage_rows<LA_CHUNK_THREADS, T, T>(Ks, LD_T, p, ci, p.k, h, p.K, k0);
    if (LA_GATE_VEC) {
        stage_gcum_vec(Gs, p, ci, h, k0, LA_CHUNK_THREADS);
    } else {
        stage_gcum_scalar(Gc, p, ci, h, LA_CHUNK_THREADS);
    }
    stage_scores<LA_CHUNK_THREADS>(dAs, p, ci, p.dA, h);
    block_sync();

    // G at (row, channel) for either gate kind.
    auto G = [&](int r, int kk) { return LA_GATE_VEC ? Gs[r * LD_F + kk] : Gc[r]; };

    Acc<1, 8> dq, dk;
    dq.zero();
    dk.zero();

    // ---- off-diagonal blocks through mma ----
    #pragma unroll
    for (int j = 0; j < LA_NC; ++j) {
        if (j < i) {
            // dq_i += dA_ij (k_j decayed); vector: anchored at row 16i, scalar: decay inside dA.
            FragA<T> a, alo;
            make_a<T>(a, SPLIT ? &alo : (FragA<T>*)nullptr, [&](int m, int kq) {
                const int R = 16 * i + m, C = 16 * j + kq;
                const float x = dAs[R * LD_A + C];
                return LA_GATE_VEC ? x : x * fast_exp2(Gc[R] - Gc[C]);
            });
            #pragma unroll
            for (int np = 0; np < 4; ++np) {
                FragB<T> b0, b1, b0lo, b1lo;
                if (LA_GATE_VEC) {
                    auto kf = [&](int kq, int nn) {
                        const int C = 16 * j + kq, kk = 16 * np + nn;
                        return to_float(Ks[C * LD_T + kk]) * fast_exp2(Gs[(16 * i) * LD_F + kk] - Gs[C * LD_F + kk]);
                    };
                    make_b<T>(b0, SPLIT ? &b0lo : (FragB<T>*)nullptr, kf);
                    make_b<T>(b1, SPLIT ? &b1lo : (FragB<T>*)nullptr, [&](int kq, int nn) { return kf(kq, nn + 8); });
                    mma_split<T, SPLIT, SPLIT>(dq.c[0][2 * np], a, alo, b0, b0lo);
                    mma_split<T, SPLIT, SPLIT>(dq.c[0][2 * np + 1], a, alo, b1, b1lo);
                } else {
                    load_b2<T, true>(b0, b1, Ks + (16 * j) * LD_T + 16 * np, LD_T);
                    mma_split<T, SPLIT, false>(dq.c[0][2 * np], a, alo, b0, b0);
                    mma_split<T, SPLIT, false>(dq.c[0][2 * np + 1], a, alo, b1, b1);
                }
            }
        }
        if (j > i) {
            // dk_i += dA_ji^T (q_j decayed); vector: anchored at the last row of block i.
            const int anchor = 16 * i + 15;
            FragA<T> a, alo;
            make_a<T>(a, SPLIT ? &alo : (FragA<T>*)nullptr, [&](int m, int kq) {
                const int C = 16 * i + m, R = 16 * j + kq;
                const float x = dAs[R * LD_A + C];
                return LA_GATE_VEC ? x : x * fast_exp2(Gc[R] - Gc[C]);
            });
            #pragma unroll
            for (int np = 0; np < 4; ++np) {
                FragB<T> b0, b1, b0lo, b1lo;
                if (LA_GATE_VEC) {
                    auto qf = [&](int kq, int nn) {
                        const int R = 16 * j + kq, kk = 16 * np + nn;
                        return to_float(Qs[R * LD_T + kk]) * fast_exp2(Gs[R * LD_F + kk] - Gs[anchor * LD_F + kk]);
                    };
                    make_b<T>(b0, SPLIT ? &b0lo : (FragB<T>*)nullptr, qf);
                    make_b<T>(b1, SPLIT ? &b1lo : (FragB<T>*)nullptr, [&](int kq, int nn) { return qf(kq, nn + 8); });
                    mma_split<T, SPLIT, SPLIT>(dk.c[0][2 * np], a, alo, b0, b0lo);
                    mma_split<T, SPLIT, SPLIT>(dk.c[0][2 * np + 1], a, alo, b1, b1lo);
                } else {
                    load_b2<T, true>(b0, b1, Qs + (16 * j) * LD_T + 16 * np, LD_T);
                    mma_split<T, SPLIT, false>(dk.c[0][2 * np], a, alo, b0, b0);
                    mma_split<T, SPLIT, false>(dk.c[0][2 * np + 1], a, alo, b1, b1);
                }
            }
        }
    }
    if (LA_GATE_VEC) {
        // Undo the anchors: dq rows by 2^(G_r - G_16i), dk rows by 2^(G_anchor - G_c) (both <= 0).
        for_each_acc<1, 8>([&](int, int jn, int e, int r, int c) {
            const int R = 16 * i + r, kk = c;
            dq.c[0][jn][e] *= fast_exp2(Gs[R * LD_F + kk] - Gs[(16 * i) * LD_F + kk]);
            dk.c[0][jn][e] *= fast_exp2(Gs[(16 * i + 15) * LD_F + kk] - Gs[R * LD_F + kk]);
        });
    }

    // ---- diagonal block, exact f32, without the diagonal element itself ----
    // (The element (R, R) carries no decay; la_bwd_dqkg adds it to the outputs but keeps it out of
    // the closed-form gate gradient, where it would cancel as a difference of O(1) terms.)
    for_each_acc<1, 8>([&](int, int jn, int e, int r, int c) {
        const int R = 16 * i + r, kk = c;
        const float gr = G(R, kk);
        float sq = 0.0f, sk = 0.0f;
        for (int x = 0; x < 16; ++x) {
            const int X = 16 * i + x;
            if (x < r) {  // dq: column X < R
                sq = fmaf(dAs[R * LD_A + X] * to_float(Ks[X * LD_T + kk]), fast_exp2(gr - G(X, kk)), sq);
            }
            if (x > r) {  // dk: row X > R (R is the key row here)
                sk = fmaf(dAs[X * LD_A + R] * to_float(Qs[X * LD_T + kk]), fast_exp2(G(X, kk) - gr), sk);
            }
        }
        dq.c[0][jn][e] += sq;
        dk.c[0][jn][e] += sk;
    });

    float* dqi = reinterpret_cast<float*>(p.dq_intra);
    float* dki = reinterpret_cast<float*>(p.dk_intra);
    for_each_acc<1, 8>([&](int, int jn, int e, int r, int c) {
        const int R = 16 * i + r, kk = k0 + c;
        if (R >= ci.rows || kk >= p.K) return;
        const i64 idx = ((ci.seq.bos + ci.t0 + R) * p.H + h) * (i64)p.K + kk;
        dqi[idx] = dq.c[0][jn][e];
        dki[idx] = dk.c[0][jn][e];
    });
}

// ================================================================================================
// la_bwd_dqkg: grid (num_chunks, H), NC warps. For each key tile: inter-chunk dq, dk through the
// states, totals with the intra parts and the diagonal, and this pass's gate gradient in closed
// form. With the pairs (query i, key j) a gate g_t decays (j < t <= i) split by where i and j lie,
// for t in this chunk (kernels.md "Useful identities", arranged so that no undecayed term cancels):
//   dG_t = rowsum_V(2^Glast hs[c] * dhs[c+1])                    keys before, queries after the chunk
//        + sum_{i >= t} (q_i dq'_i - k_i dk'^intra_i)             queries in the chunk from t on
//        + sum_{i <  t} k_i dk^inter_i                             keys in the chunk before t, queries after
// where dq' = dq^intra + dq^inter and the intra parts leave out the diagonal (dA_ii), whose O(1)
// contributions to q dq and k dk are equal. Every term is then a sum of decayed contributions, so
// the result keeps its relative accuracy when it is exponentially small (strong gates).
// ================================================================================================

#define DQKG_LOOP (LA_BT * LD_FK * 4 + LA_BT * LD_T * (int)sizeof(T) + 2 * 64 * LD_F * 4)
#define DQKG_EPI (2 * LA_BT * LD_FK * 4)
#define DQKG_SMEM_BYTES                                                                                 \
    (LA_BT * LD_F * 4 + (DQKG_LOOP > DQKG_EPI ? DQKG_LOOP : DQKG_EPI) + 64 * 4 + LA_BT * 4 + 2 * LA_BT * 8 + 64 + 64)

LA_KERNEL(LA_CHUNK_THREADS) la_bwd_dqkg(LA_PARAMS p) {
    Carver cv{la_smem, 0};
    float* Gs = cv.take<float>(LA_BT * LD_F * 4);
    const int loop_base = cv.offset;
    T* dOs = cv.take<T>(LA_BT * LD_FK * 4);
    float* dOf = reinterpret_cast<float*>(dOs);
    T* Vs = cv.take<T>(LA_BT * LD_T * (int)sizeof(T));
    float* Hs = cv.take<float>(64 * LD_F * 4);
    float* dHs = cv.take<float>(64 * LD_F * 4);
    const int loop_end = cv.offset;
    cv.offset = loop_base;
    float* W = cv.take<float>(LA_BT * LD_FK * 4);  // q dq' - k dk'^intra, after the value loop
    float* U = cv.take<float>(LA_BT * LD_FK * 4);  // k dk^inter
    cv.offset = loop_end > cv.offset ? loop_end : cv.offset;
    float* dgk = cv.take<float>(64 * 4);
    float* Gc = cv.take<float>(LA_BT * 4);
    double* row_w = cv.take<double>(LA_BT * 8);
    double* row_u = cv.take<double>(LA_BT * 8);
    double* dgk_total = cv.take<double>(64);

    const ChunkInfo ci = chunk_info(p, blockIdx.x);
    const int h = blockIdx.y;
    const int i = warp_id(), lane = lane_id();
    const i64 KV = (i64)p.K * p.V;
    const float* h_cur = reinterpret_cast<const float*>(p.hs) + ((i64)ci.state * p.H + h) * KV;
    const float* dh_next = reinterpret_cast<const float*>(p.dhs) + ((i64)(ci.state + 1) * p.H + h) * KV;
    const T* q = reinterpret_cast<const T*>(p.q);
    const T* k = reinterpret_cast<const T*>(p.k);
    const float* dqi = reinterpret_cast<const float*>(p.dq_intra);
    const float* dki = reinterpret_cast<const float*>(p.dk_intra);
    const float* dA = reinterpret_cast<const float*>(p.dA);
    float* dq_out = reinterpret_cast<float*>(p.dq);
    float* dk_out = reinterpret_cast<float*>(p.dk);
    float* dgl = reinterpret_cast<float*>(p.dgl);
    const int last = ci.rows - 1;

    if (!LA_GATE_VEC) {
        stage_gcum_scalar(Gc, p, ci, h, LA_CHUNK_THREADS);
        for (int r = threadIdx.x; r < LA_BT; r += LA_CHUNK_THREADS) {
            row_w[r] = 0.0;
            row_u[r] = 0.0;
        }
        if (threadIdx.x == 0) dgk_total[0] = 0.0;
    }

    for (int k0 = 0; k0 < p.K; k0 += LA_TK) {
        if (LA_GATE_VEC) stage_gcum_vec(Gs, p, ci, h, k0, LA_CHUNK_THREADS);
        for (int c = threadIdx.x; c < 64; c += LA_CHUNK_THREADS) dgk[c] = 0.0f;
        Acc<1, 8> dq, dk;
        dq.zero();
        dk.zero();
        for (int v0 = 0; v0 < p.V; v0 += LA_TV) {
            if (p.do_f32) {
                stage_rows<LA_CHUNK_THREADS, float, float>(dOf, LD_FK, p, ci, p.d_o, h, p.V, v0);
            } else {
                stage_rows<LA_CHUNK_THREADS, T, T>(dOs, LD_T, p, ci, p.d_o, h, p.V, v0);
            }
            stage_rows<LA_CHUNK_THREADS, T, T>(Vs, LD_T, p, ci, p.v, h, p.V, v0);
            stage_state<LA_CHUNK_THREADS>(Hs, LD_F, h_cur, p, k0, v0);
            stage_state<LA_CHUNK_THREADS>(dHs, LD_F, dh_next, p, k0, v0);
            block_sync();

            // rowsum(hs[c] * dhs[c+1]) for this value tile: warp per key row, lanes over values.
            for (int kr = i; kr < 64; kr += LA_NC) {
                float s = 0.0f;
                for (int vc = lane; vc < 64; vc += 32) s += Hs[kr * LD_F + vc] * dHs[kr * LD_F + vc];
                s = warp_sum(s);
                if (lane == 0) dgk[kr] += s;
            }

            #pragma unroll
            for (int ks = 0; ks < LA_TV / 16; ++ks) {
                const int vc = 16 * ks;
                FragA<T> ado, adolo, av;
                if (p.do_f32) {
                    make_a<T>(ado, SPLIT ? &adolo : (FragA<T>*)nullptr,
                              [&](int m, int kq) { return dOf[(16 * i + m) * LD_FK + vc + kq]; });
                } else {
                    load_a<T, false>(ado, dOs + (16 * i) * LD_T + vc, LD_T);
                }
                load_a<T, false>(av, Vs + (16 * i) * LD_T + vc, LD_T);
                #pragma unroll
                for (int np = 0; np < 4; ++np) {
                    // B(k = value, n = key channel) = state[key][value]: pairs along a state row.
                    FragB<T> b0, b1, b0lo, b1lo;
                    const float* Hb = Hs + (16 * np) * LD_F + vc;
                    make_b<T>(b0, SPLIT ? &b0lo : (FragB<T>*)nullptr, [&](int kq, int nn) { return Hb[nn * LD_F + kq]; });
                    make_b<T>(b1, SPLIT ? &b1lo : (FragB<T>*)nullptr, [&](int kq, int nn) { return Hb[(nn + 8) * LD_F + kq]; });
                    if (p.do_f32) {
                        mma_split<T, SPLIT, SPLIT>(dq.c[0][2 * np], ado, adolo, b0, b0lo);
                        mma_split<T, SPLIT, SPLIT>(dq.c[0][2 * np + 1], ado, adolo, b1, b1lo);
                    } else {
                        mma_split<T, false, SPLIT>(dq.c[0][2 * np], ado, ado, b0, b0lo);
                        mma_split<T, false, SPLIT>(dq.c[0][2 * np + 1], ado, ado, b1, b1lo);
                    }
                    const float* Db = dHs + (16 * np) * LD_F + vc;
                    make_b<T>(b0, SPLIT ? &b0lo : (FragB<T>*)nullptr, [&](int kq, int nn) { return Db[nn * LD_F + kq]; });
                    make_b<T>(b1, SPLIT ? &b1lo : (FragB<T>*)nullptr, [&](int kq, int nn) { return Db[(nn + 8) * LD_F + kq]; });
                    mma_split<T, false, SPLIT>(dk.c[0][2 * np], av, av, b0, b0lo);
                    mma_split<T, false, SPLIT>(dk.c[0][2 * np + 1], av, av, b1, b1lo);
                }
            }
            block_sync();
        }

        // Totals and outputs; the closed-form pieces into W and U.
        for_each_acc<1, 8>([&](int, int jn, int e, int r, int c) {
            const int R = 16 * i + r, kc = c, kk = k0 + kc;
            float w = 0.0f, u = 0.0f;
            if (R < ci.rows && kk < p.K) {
                const float gr = LA_GATE_VEC ? Gs[R * LD_F + kc] : Gc[R];
                const float gl = LA_GATE_VEC ? Gs[last * LD_F + kc] : Gc[last];
                const i64 lrow = (ci.seq.bos + ci.t0 + R) * p.H + h;
                const i64 li = lrow * (i64)p.K + kk;
                const i64 mi = (mem_tok(p, ci.seq, ci.t0 + R) * p.H + h) * (i64)p.K + kk;
                const float qv = to_float(q[mi]), kv = to_float(k[mi]);
                const float d_diag = dA[lrow * (i64)LA_BT + R];  // 0 when strict
                const float dq_inter = p.scale * dq.c[0][jn][e] * fast_exp2(gr);
                const float dk_inter = dk.c[0][jn][e] * fast_exp2(gl - gr);
                const float dq_nd = dqi[li] + dq_inter;
                la_store(dq_out + mi, dq_nd + d_diag * kv, p.accumulate);
                la_store(dk_out + mi, dki[li] + dk_inter + d_diag * qv, p.accumulate);
                w = qv * dq_nd - kv * dki[li];
                u = kv * dk_inter;
            }
            W[R * LD_FK + kc] = w;
            U[R * LD_FK + kc] = u;
        });
        block_sync();

        // The scans and channel sums below run in f64: the gate gradient is a sum of terms of both
        // signs that can be much larger than the result (per-head gates sum it over every token
        // too), and these loops are short.
        if (LA_GATE_VEC) {
            for (int kc = threadIdx.x; kc < 64; kc += LA_CHUNK_THREADS) {
                const int kk = k0 + kc;
                if (kk >= p.K) continue;
                // Keys before t: exclusive prefix sums of U, kept in U.
                double pre = 0.0;
                for (int R = 0; R < ci.rows; ++R) {
                    const float u = U[R * LD_FK + kc];
                    U[R * LD_FK + kc] = (float)pre;
                    pre += u;
                }
                double run = (double)dgk[kc] * fast_exp2(Gs[last * LD_F + kc]);
                for (int R = ci.rows - 1; R >= 0; --R) {
                    run += W[R * LD_FK + kc];
                    dgl[((ci.seq.bos + ci.t0 + R) * p.H + h) * (i64)p.K + kk] = (float)(run + U[R * LD_FK + kc]);
                }
            }
        } else {
            // One gate per token: sum the channels first (the sums commute).
            for (int R = threadIdx.x; R < ci.rows; R += LA_CHUNK_THREADS) {
                double sw = 0.0, su = 0.0;
                for (int kc = 0; kc < 64; ++kc) {
                    sw += W[R * LD_FK + kc];
                    su += U[R * LD_FK + kc];
                }
                row_w[R] += sw;
                row_u[R] += su;
            }
            if (threadIdx.x == 0) {
                double s = 0.0;
                for (int kc = 0; kc < 64; ++kc) s += dgk[kc];
                dgk_total[0] += s * fast_exp2(Gc[last]);
            }
        }
        block_sync();
    }

    if (!LA_GATE_VEC && threadIdx.x == 0) {
        double pre = 0.0;
        for (int R = 0; R < ci.rows; ++R) {
            const double u = row_u[R];
            row_u[R] = pre;
            pre += u;
        }
        double run = dgk_total[0];
        for (int R = ci.rows - 1; R >= 0; --R) {
            run += row_w[R];
            dgl[(ci.seq.bos + ci.t0 + R) * p.H + h] = (float)(run + row_u[R]);
        }
    }
}

// Dynamic shared memory (bytes) of each kernel above, read by the host after loading the module
// (single source of truth for the launch configuration). Order: see KERNELS in
// src/linear/cuda/kernels.rs.
__constant__ int la_smem_table[9] = {
    0,                 // la_cumsum
    STATE_SMEM_BYTES,  // la_states
    STATE_SMEM_BYTES,  // la_dstates
    INTRA_A_SMEM_BYTES,
    FWD_O_SMEM_BYTES,
    DV_SMEM_BYTES,
    DA_SMEM_BYTES,
    DQK_SMEM_BYTES,
    DQKG_SMEM_BYTES,
};
