// Block-sparse FlashAttention-2 (ops.md section 3; algorithm in kernels.md), forward and backward,
// on mma.sync m16n8k16 with f32 accumulation:
//
//   attn_fwd        per query block: loop over its key blocks, online softmax, write o and lse
//   attn_bwd_delta  delta = rowsum(do * o)
//   attn_bwd_dq     per query block: recompute P from lse, dS = P (dP - delta), dq = scale dS K
//   attn_bwd_dkdv   per key block, over the transposed lists: dv = P^T do, dk = scale dS^T q
//
// No atomics: dq and dk/dv come from two kernels that each own their outputs (the price is
// recomputing S and dP once more than FlashAttention-2's atomic dq).
//
// Compile-time variant: LA_DTYPE (0 bf16, 1 f16), ATT_D (head dim 64 | 128), ATT_BQ and ATT_BK (the
// plan's block sizes, 64 | 128).
// - attn_fwd / attn_bwd_dq: a CTA of 4 warps covers one query block; each warp owns MT = BQ / 64
//   m-tiles of 16 query rows (MT = 2 at BQ = 128, as FlashAttention-2's 32 rows per warp: every
//   K/V fragment read from shared memory feeds two mma, which keeps ldmatrix traffic below the
//   tensor-core rate). The CTA walks each key block of its list in shared sub-tiles of KT = 64
//   keys, computed in chunks of KC keys (64 at MT = 1; 16 or 32 at MT = 2, where the score tiles
//   share the registers with the 32-row accumulators).
// - attn_bwd_dkdv: a CTA of BK / 16 warps covers one key block, 16 keys per warp, and walks each
//   query block of its column list in sub-tiles of QT queries.
// Shared K/V (resp. Q/dO) sub-tiles are double-buffered with cp.async: the copy of sub-tile i + 1
// runs while sub-tile i is computed.
//
// Numerics. Scores are scaled once by scale * log2(e) and exponentiated with exp2 (ex2.approx).
// Running max m and sum l are f32 per row. A masked score is -inf; while a row has seen only masked
// keys its max is -inf and the exponent base is taken as 0, so exp2(-inf - 0) = 0 and the rescale
// factor exp2(m_old - base) = 0 never form -inf - -inf. At the end l == 0 exactly when the row had
// no allowed key: o = 0 and lse = -inf. The backward recomputes P = exp2(s * scale_log2 - lse *
// log2(e)); a row with lse = -inf (or a query row past T) uses +inf as its exponent base, so P = 0.
// Masking (causal j > i, padded keys j >= S, query rows i >= T in dK/dV) is applied only to
// partial blocks (full bit clear) and to the sub-tiles that reach past T.
// P and dS enter the second products rounded to the input type (as in FlashAttention-2); every
// product accumulates in f32.

#include "common.cuh"
#include "attention.cuh"

#ifndef ATT_D
#define ATT_D 128
#endif
#ifndef ATT_BQ
#define ATT_BQ 128
#endif
#ifndef ATT_BK
#define ATT_BK 128
#endif

static constexpr int D = ATT_D;
static constexpr int BQ = ATT_BQ;
static constexpr int BK = ATT_BK;
// Query kernels: 4 warps, MT m-tiles of 16 rows per warp.
static constexpr int Q_WARPS = 4;
static constexpr int Q_THREADS = Q_WARPS * 32;
static constexpr int MT = BQ / (16 * Q_WARPS);
// Keys per shared K/V sub-tile (forward and dQ), processed in chunks of KC keys: the per-warp
// score tiles are 16 MT x KC. At MT = 2 they share the registers with a 32-row f32 accumulator
// (2 x D / 2 per lane): KC = 16 at D = 128 and 32 at D = 64 are the largest chunks that ptxas
// (12.9) schedules without spills for sm_80 and sm_90 (kernels/RESOURCES.md).
static constexpr int KT = 64;
static constexpr int KC = MT == 1 ? 64 : (D == 128 ? 16 : 32);
// With one m-tile per warp the forward keeps its Q fragments in registers for the whole walk;
// with two they would take 2 * D / 4 registers next to the 2 x D/2 accumulator, so they are
// re-read from shared memory at each sub-tile.
static constexpr bool Q_IN_REGS = MT == 1;
// Queries per shared Q/dO sub-tile of dK/dV. Its warps hold two D-wide f32 accumulators (dk, dv)
// next to the 16 x QT score tiles S and dP: at D = 128 a QT of 32 keeps that well under the
// 255-register limit (64 also fits, at 253 registers).
#ifndef ATT_QT
#define ATT_QT (ATT_D == 128 ? 32 : 64)
#endif
static constexpr int QT = ATT_QT;
static constexpr int KSUB = BK / KT;       // forward key sub-tiles per key block
static constexpr int QSUB = BQ / QT;       // query sub-tiles per query block
static constexpr int LD = D + SmemPad<T>::value;  // shared row stride (elements)
static constexpr int K_WARPS = BK / 16;
static constexpr int K_THREADS = K_WARPS * 32;
static constexpr float LN2 = 0.6931471805599453f;

static_assert(MT == 1 || MT == 2, "query blocks of 64 or 128 rows");
static_assert(BK % KT == 0 && KT % KC == 0 && BQ % QT == 0, "sub-tiles must divide the blocks");
static_assert(D % 16 == 0, "head dim must be a multiple of 16");
static_assert(ElemTraits<T>::is_16bit, "attention kernels take bf16 or f16 inputs");

template <int ROWS>
struct Tile {
    static constexpr int bytes = ROWS * LD * (int)sizeof(T);
};

static constexpr int FWD_SMEM_BYTES = Tile<BQ>::bytes + 4 * Tile<KT>::bytes;
static constexpr int DQ_SMEM_BYTES = 2 * Tile<BQ>::bytes + 4 * Tile<KT>::bytes;
static constexpr int DKDV_SMEM_BYTES = 2 * Tile<BK>::bytes + 4 * Tile<QT>::bytes + 4 * QT * 4;

// Issues the cp.async copies of rows row0 .. row0 + ROWS of head h, batch b of a [B, L, H, D]
// tensor into a shared tile (row stride LD); rows >= L are zero-filled (nothing is read).
template <int ROWS, int NTHREADS>
LA_DEVICE void async_rows(T* dst, const T* base, int L, int H, int b, int h, int row0) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    #pragma unroll
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += NTHREADS) {
        const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
        const int row = row0 + r;
        const bool valid = row < L;
        const T* src = valid ? base + (((i64)b * L + row) * H + h) * (i64)D + c : base;
        cp_async_16(dst + r * LD + c, src, valid);
    }
}

// Issues the copies of N consecutive f32 of a [B, H, T] row vector from position i0 (zero past T).
template <int N, int NTHREADS>
LA_DEVICE void async_vec(float* dst, const float* row, int T_, int i0) {
    for (int i = threadIdx.x; i < N; i += NTHREADS) {
        const bool valid = i0 + i < T_;
        cp_async_4(dst + i, valid ? row + i0 + i : row, valid);
    }
}

// Converts a 16 x (8 NT) f32 accumulator (C layout) into NT / 2 A fragments of the input type:
// A(m, k) of fragment kk is C(m, 16 kk + k).
template <int NT>
LA_DEVICE void acc_to_a(FragA<T> (&a)[NT / 2], const float (&c)[NT][4]) {
    #pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
        a[kk].x[0] = ElemTraits<T>::pack2(c[2 * kk][0], c[2 * kk][1]);
        a[kk].x[1] = ElemTraits<T>::pack2(c[2 * kk][2], c[2 * kk][3]);
        a[kk].x[2] = ElemTraits<T>::pack2(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk].x[3] = ElemTraits<T>::pack2(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

template <int M, int NT>
LA_DEVICE void zero_acc(float (&c)[M][NT][4]) {
    #pragma unroll
    for (int m = 0; m < M; ++m)
        #pragma unroll
        for (int n = 0; n < NT; ++n)
            #pragma unroll
            for (int e = 0; e < 4; ++e) c[m][n][e] = 0.0f;
}

// c[m] (16 x 8 NT) += A_m B for m < M, where A_m is the 16 x D block of shared rows
// a_rows + 16 m (row-major [row][d]) and B(d, n) is shared row n, column d of a tile: the
// "rows times tile^T" product (S = Q K^T and friends). Each B fragment feeds M mma.
template <int M, int NT>
LA_DEVICE void mma_rows_bt(float (&c)[M][NT][4], const T* a_rows, const T* b_rows) {
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        FragA<T> a[M];
        #pragma unroll
        for (int m = 0; m < M; ++m) load_a<T, false>(a[m], a_rows + 16 * m * LD + kk * 16, LD);
        #pragma unroll
        for (int nn = 0; nn < NT / 2; ++nn) {
            FragB<T> b0, b1;
            load_b2<T, false>(b0, b1, b_rows + nn * 16 * LD + kk * 16, LD);
            #pragma unroll
            for (int m = 0; m < M; ++m) {
                mma<T>(c[m][2 * nn], a[m], b0);
                mma<T>(c[m][2 * nn + 1], a[m], b1);
            }
        }
    }
}

// c[m] (16 x D) += A_m B for m < M, where A_m comes from registers (KF fragments of 16 columns)
// and B(k, n) is shared row k, column n of a [16 KF][LD] tile: the "fragments times tile" product
// (O += P V and friends). Each B fragment feeds M mma.
template <int M, int KF>
LA_DEVICE void mma_frags_b(float (&c)[M][D / 8][4], const FragA<T> (&a)[M][KF], const T* b_rows) {
    #pragma unroll
    for (int kk = 0; kk < KF; ++kk) {
        #pragma unroll
        for (int nn = 0; nn < D / 16; ++nn) {
            FragB<T> b0, b1;
            load_b2<T, true>(b0, b1, b_rows + kk * 16 * LD + nn * 16, LD);
            #pragma unroll
            for (int m = 0; m < M; ++m) {
                mma<T>(c[m][2 * nn], a[m][kk], b0);
                mma<T>(c[m][2 * nn + 1], a[m][kk], b1);
            }
        }
    }
}

// Writes this lane's share of a 16 x D accumulator times `mul0` (row r0) / `mul1` (row r0 + 8) to
// rows r0, r0 + 8 of head h, batch b of a [B, L, H, D] tensor (f32 or T); rows >= L are skipped.
LA_DEVICE void store_rows(u64 out, bool out_f32, const float (&c)[D / 8][4], int L, int H, int b,
                          int h, int r0, float mul0, float mul1) {
    const int t2 = 2 * frag_tig();
    #pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = r0 + 8 * half;
        if (row >= L) continue;
        const float mul = half ? mul1 : mul0;
        const i64 base = (((i64)b * L + row) * H + h) * (i64)D;
        #pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            const float x0 = c[n][2 * half] * mul, x1 = c[n][2 * half + 1] * mul;
            const i64 at = base + 8 * n + t2;
            if (out_f32) {
                float* o = reinterpret_cast<float*>(out) + at;
                o[0] = x0;
                o[1] = x1;
            } else {
                *reinterpret_cast<u32*>(reinterpret_cast<T*>(out) + at) = ElemTraits<T>::pack2(x0, x1);
            }
        }
    }
}

// Quad (4 lanes of one accumulator row) reductions.
LA_DEVICE float quad_max(float x) {
    x = fmax_(x, shfl_xor(x, 1));
    return fmax_(x, shfl_xor(x, 2));
}
LA_DEVICE float quad_sum(float x) {
    x += shfl_xor(x, 1);
    return x + shfl_xor(x, 2);
}

// exp2 base of a row in the backward: lse in log2 units, +inf for a row without any allowed key
// (so that every P of that row is exactly 0).
LA_DEVICE float lse_base(float lse) { return lse == -ATT_INF ? ATT_INF : lse * LA_LOG2E; }

// ================================================================================================
// attn_fwd: grid (B * H, nq), Q_THREADS threads. CTA y processes query block row_at(y).
// ================================================================================================
LA_KERNEL(Q_THREADS) attn_fwd(ATT_PARAMS p) {
    T* Qs = reinterpret_cast<T*>(la_smem);
    T* Ks = Qs + BQ * LD;       // [2][KT][LD]
    T* Vs = Ks + 2 * KT * LD;   // [2][KT][LD]
    const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
    const int qb = row_at(p, blockIdx.y);
    const int q0 = qb * BQ;
    const BlockList list = row_list(p, BQ, BK, qb);
    const int n_sub = list.count * KSUB;
    const T* kg = reinterpret_cast<const T*>(p.k);
    const T* vg = reinterpret_cast<const T*>(p.v);

    auto issue_kv = [&](int it) {
        const u32 ent = row_entry(p, list, BQ, BK, it / KSUB);
        const int k0 = (int)(ent & ~ATT_FULL_BIT) * BK + (it % KSUB) * KT;
        const int st = it & 1;
        async_rows<KT, Q_THREADS>(Ks + st * KT * LD, kg, p.S, p.H, b, h, k0);
        async_rows<KT, Q_THREADS>(Vs + st * KT * LD, vg, p.S, p.H, b, h, k0);
    };
    async_rows<BQ, Q_THREADS>(Qs, reinterpret_cast<const T*>(p.q), p.T, p.H, b, h, q0);
    if (n_sub > 0) issue_kv(0);
    cp_async_commit();

    const int w = warp_id(), g = frag_gid(), t2 = 2 * frag_tig();
    const T* Qw = Qs + 16 * MT * w * LD;  // this warp's first query row in shared memory
    const int r0 = q0 + 16 * MT * w + g;  // this lane's rows: r0 + 16 m + 8 half
    float acc[MT][D / 8][4];
    zero_acc<MT, D / 8>(acc);
    // Row statistics (log2 domain), index 2 m + half.
    float m[2 * MT], l[2 * MT];
    #pragma unroll
    for (int r = 0; r < 2 * MT; ++r) {
        m[r] = -ATT_INF;
        l[r] = 0.0f;
    }
    FragA<T> qf[Q_IN_REGS ? D / 16 : 1];

    for (int it = 0; it < n_sub; ++it) {
        if (it + 1 < n_sub) {
            issue_kv(it + 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        block_sync();
        const u32 ent = row_entry(p, list, BQ, BK, it / KSUB);
        const int k0 = (int)(ent & ~ATT_FULL_BIT) * BK + (it % KSUB) * KT;
        const bool full = (ent & ATT_FULL_BIT) != 0;
        const T* Kt = Ks + (it & 1) * KT * LD;
        const T* Vt = Vs + (it & 1) * KT * LD;

        // Chunks of KC keys: S = Q K^T (16 MT rows x KC keys per warp), online softmax, O += P V.
        #pragma unroll 1
        for (int c0 = 0; c0 < KT; c0 += KC) {
            float s[MT][KC / 8][4];
            zero_acc<MT, KC / 8>(s);
            if constexpr (Q_IN_REGS) {
                if (it == 0 && c0 == 0) {
                    #pragma unroll
                    for (int kk = 0; kk < D / 16; ++kk) load_a<T, false>(qf[kk], Qw + kk * 16, LD);
                }
                #pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    #pragma unroll
                    for (int nn = 0; nn < KC / 16; ++nn) {
                        FragB<T> b0, b1;
                        load_b2<T, false>(b0, b1, Kt + (c0 + nn * 16) * LD + kk * 16, LD);
                        mma<T>(s[0][2 * nn], qf[kk], b0);
                        mma<T>(s[0][2 * nn + 1], qf[kk], b1);
                    }
                }
            } else {
                mma_rows_bt<MT, KC / 8>(s, Qw, Kt + c0 * LD);
            }

            // To the exp2 domain; mask partial blocks; online softmax per row.
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                float mx[2] = {-ATT_INF, -ATT_INF};
                #pragma unroll
                for (int n = 0; n < KC / 8; ++n) {
                    #pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float x = s[mt][n][e] * p.scale_log2;
                        if (!full) {
                            const int i = r0 + 16 * mt + 8 * (e >> 1);
                            const int j = k0 + c0 + 8 * n + t2 + (e & 1);
                            if (j >= p.S || (p.causal && j > i)) x = -ATT_INF;
                        }
                        s[mt][n][e] = x;
                        mx[e >> 1] = fmax_(mx[e >> 1], x);
                    }
                }
                float base[2], alpha[2];
                #pragma unroll
                for (int hf = 0; hf < 2; ++hf) {
                    const int r = 2 * mt + hf;
                    const float m_new = fmax_(m[r], quad_max(mx[hf]));
                    base[hf] = m_new == -ATT_INF ? 0.0f : m_new;
                    alpha[hf] = fast_exp2(m[r] - base[hf]);
                    m[r] = m_new;
                    l[r] *= alpha[hf];
                }
                #pragma unroll
                for (int n = 0; n < KC / 8; ++n) {
                    #pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float pe = fast_exp2(s[mt][n][e] - base[e >> 1]);
                        s[mt][n][e] = pe;
                        l[2 * mt + (e >> 1)] += pe;
                    }
                }
                // Rescale only when a running max moved (alpha == 1 exactly otherwise): once the
                // maxima settle, whole warps skip the D / 2 multiplies per row pair.
                if (alpha[0] != 1.0f || alpha[1] != 1.0f) {
                    #pragma unroll
                    for (int n = 0; n < D / 8; ++n) {
                        acc[mt][n][0] *= alpha[0];
                        acc[mt][n][1] *= alpha[0];
                        acc[mt][n][2] *= alpha[1];
                        acc[mt][n][3] *= alpha[1];
                    }
                }
            }

            FragA<T> pf[MT][KC / 16];
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) acc_to_a<KC / 8>(pf[mt], s[mt]);
            mma_frags_b<MT, KC / 16>(acc, pf, Vt + c0 * LD);
        }
        block_sync();
    }
    cp_async_wait<0>();  // (a CTA without blocks still has its Q copy in flight)

    float* lse = reinterpret_cast<float*>(p.lse) + ((i64)b * p.H + h) * p.T;
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float inv[2];
        #pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = 2 * mt + hf;
            l[r] = quad_sum(l[r]);
            inv[hf] = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        }
        store_rows(p.o, p.o_f32 != 0, acc[mt], p.T, p.H, b, h, r0 + 16 * mt, inv[0], inv[1]);
        if (frag_tig() == 0) {
            #pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int r = 2 * mt + hf, row = r0 + 16 * mt + 8 * hf;
                if (row < p.T) lse[row] = l[r] > 0.0f ? (m[r] + log2f(l[r])) * LN2 : -ATT_INF;
            }
        }
    }
}

// ================================================================================================
// attn_bwd_delta: grid (ceil(B * T * H / 32)), 256 threads; 8 lanes per (b, t, h) row.
// ================================================================================================
LA_KERNEL(256) attn_bwd_delta(ATT_PARAMS p) {
    const i64 rows = (i64)p.B * p.T * p.H;
    const i64 r = (i64)blockIdx.x * 32 + threadIdx.x / 8;
    const int sub = threadIdx.x % 8;
    float acc = 0.0f;
    if (r < rows) {
        const T* dor = reinterpret_cast<const T*>(p.d_o) + r * D;
        #pragma unroll
        for (int c = sub * 8; c < D; c += 64) {
            float a[8], o[8];
            load8(a, dor, c, D, true);
            if (p.o_f32) {
                load8(o, reinterpret_cast<const float*>(p.o) + r * D, c, D, true);
            } else {
                load8(o, reinterpret_cast<const T*>(p.o) + r * D, c, D, true);
            }
            #pragma unroll
            for (int j = 0; j < 8; ++j) acc = fmaf(a[j], o[j], acc);
        }
    }
    acc += shfl_xor(acc, 1);
    acc += shfl_xor(acc, 2);
    acc += shfl_xor(acc, 4);
    if (r < rows && sub == 0) {
        // r = (b * T + t) * H + h  ->  delta[(b * H + h) * T + t]
        const i64 h = r % p.H, bt = r / p.H;
        const i64 t = bt % p.T, b = bt / p.T;
        reinterpret_cast<float*>(p.delta)[(b * p.H + h) * p.T + t] = acc;
    }
}

// ================================================================================================
// attn_bwd_dq: grid (B * H, nq), Q_THREADS threads. Same walk as attn_fwd.
// ================================================================================================
LA_KERNEL(Q_THREADS) attn_bwd_dq(ATT_PARAMS p) {
    T* Qs = reinterpret_cast<T*>(la_smem);
    T* dOs = Qs + BQ * LD;
    T* Ks = dOs + BQ * LD;      // [2][KT][LD]
    T* Vs = Ks + 2 * KT * LD;   // [2][KT][LD]
    const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
    const int qb = row_at(p, blockIdx.y);
    const int q0 = qb * BQ;
    const BlockList list = row_list(p, BQ, BK, qb);
    const int n_sub = list.count * KSUB;
    const T* kg = reinterpret_cast<const T*>(p.k);
    const T* vg = reinterpret_cast<const T*>(p.v);

    auto issue_kv = [&](int it) {
        const u32 ent = row_entry(p, list, BQ, BK, it / KSUB);
        const int k0 = (int)(ent & ~ATT_FULL_BIT) * BK + (it % KSUB) * KT;
        const int st = it & 1;
        async_rows<KT, Q_THREADS>(Ks + st * KT * LD, kg, p.S, p.H, b, h, k0);
        async_rows<KT, Q_THREADS>(Vs + st * KT * LD, vg, p.S, p.H, b, h, k0);
    };
    async_rows<BQ, Q_THREADS>(Qs, reinterpret_cast<const T*>(p.q), p.T, p.H, b, h, q0);
    async_rows<BQ, Q_THREADS>(dOs, reinterpret_cast<const T*>(p.d_o), p.T, p.H, b, h, q0);
    if (n_sub > 0) issue_kv(0);
    cp_async_commit();

    const int w = warp_id(), g = frag_gid(), t2 = 2 * frag_tig();
    const int r0 = q0 + 16 * MT * w + g;  // this lane's rows: r0 + 16 m + 8 half
    float lse2[2 * MT], delta[2 * MT];
    #pragma unroll
    for (int r = 0; r < 2 * MT; ++r) {
        const int row = r0 + 16 * (r >> 1) + 8 * (r & 1);
        const i64 at = ((i64)b * p.H + h) * p.T + row;
        lse2[r] = row < p.T ? lse_base(reinterpret_cast<const float*>(p.lse)[at]) : ATT_INF;
        delta[r] = row < p.T ? reinterpret_cast<const float*>(p.delta)[at] : 0.0f;
    }
    float dq[MT][D / 8][4];
    zero_acc<MT, D / 8>(dq);

    for (int it = 0; it < n_sub; ++it) {
        if (it + 1 < n_sub) {
            issue_kv(it + 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        block_sync();
        const u32 ent = row_entry(p, list, BQ, BK, it / KSUB);
        const int k0 = (int)(ent & ~ATT_FULL_BIT) * BK + (it % KSUB) * KT;
        const bool full = (ent & ATT_FULL_BIT) != 0;
        const T* Kt = Ks + (it & 1) * KT * LD;
        const T* Vt = Vs + (it & 1) * KT * LD;

        #pragma unroll 1
        for (int c0 = 0; c0 < KT; c0 += KC) {
            // P = exp2(S scale_log2 - lse2), 0 where masked.
            float s[MT][KC / 8][4];
            zero_acc<MT, KC / 8>(s);
            mma_rows_bt<MT, KC / 8>(s, Qs + 16 * MT * w * LD, Kt + c0 * LD);
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                #pragma unroll
                for (int n = 0; n < KC / 8; ++n) {
                    #pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float pe = fast_exp2(s[mt][n][e] * p.scale_log2 - lse2[2 * mt + (e >> 1)]);
                        if (!full) {
                            const int i = r0 + 16 * mt + 8 * (e >> 1);
                            const int j = k0 + c0 + 8 * n + t2 + (e & 1);
                            if (j >= p.S || (p.causal && j > i)) pe = 0.0f;
                        }
                        s[mt][n][e] = pe;
                    }
                }
            }
            // dP = dO V^T; dS = P (dP - delta).
            float dp[MT][KC / 8][4];
            zero_acc<MT, KC / 8>(dp);
            mma_rows_bt<MT, KC / 8>(dp, dOs + 16 * MT * w * LD, Vt + c0 * LD);
            FragA<T> dsf[MT][KC / 16];
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                #pragma unroll
                for (int n = 0; n < KC / 8; ++n) {
                    #pragma unroll
                    for (int e = 0; e < 4; ++e)
                        dp[mt][n][e] = s[mt][n][e] * (dp[mt][n][e] - delta[2 * mt + (e >> 1)]);
                }
                acc_to_a<KC / 8>(dsf[mt], dp[mt]);
            }
            // dQ += dS K.
            mma_frags_b<MT, KC / 16>(dq, dsf, Kt + c0 * LD);
        }
        block_sync();
    }
    cp_async_wait<0>();
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        store_rows(p.dq, p.grad_f32 != 0, dq[mt], p.T, p.H, b, h, r0 + 16 * mt, p.scale, p.scale);
}

// ================================================================================================
// attn_bwd_dkdv: grid (B * H, nk), K_THREADS threads. CTA y processes key block col_at(y) over
// the query blocks of its column list.
// ================================================================================================
LA_KERNEL(K_THREADS) attn_bwd_dkdv(ATT_PARAMS p) {
    T* Ks = reinterpret_cast<T*>(la_smem);
    T* Vs = Ks + BK * LD;
    T* Qs = Vs + BK * LD;        // [2][QT][LD]
    T* dOs = Qs + 2 * QT * LD;   // [2][QT][LD]
    float* lses = reinterpret_cast<float*>(dOs + 2 * QT * LD);  // [2][QT]
    float* deltas = lses + 2 * QT;                              // [2][QT]
    const int b = blockIdx.x / p.H, h = blockIdx.x % p.H;
    const int kb = col_at(p, blockIdx.y);
    const int k0 = kb * BK;
    const BlockList list = col_list(p, BQ, BK, kb);
    const int n_sub = list.count * QSUB;
    const T* qg = reinterpret_cast<const T*>(p.q);
    const T* dog = reinterpret_cast<const T*>(p.d_o);
    const float* lse_row = reinterpret_cast<const float*>(p.lse) + ((i64)b * p.H + h) * p.T;
    const float* delta_row = reinterpret_cast<const float*>(p.delta) + ((i64)b * p.H + h) * p.T;

    auto issue_q = [&](int it) {
        const u32 ent = col_entry(p, list, BQ, BK, it / QSUB);
        const int q0 = (int)(ent & ~ATT_FULL_BIT) * BQ + (it % QSUB) * QT;
        const int st = it & 1;
        async_rows<QT, K_THREADS>(Qs + st * QT * LD, qg, p.T, p.H, b, h, q0);
        async_rows<QT, K_THREADS>(dOs + st * QT * LD, dog, p.T, p.H, b, h, q0);
        async_vec<QT, K_THREADS>(lses + st * QT, lse_row, p.T, q0);
        async_vec<QT, K_THREADS>(deltas + st * QT, delta_row, p.T, q0);
    };
    async_rows<BK, K_THREADS>(Ks, reinterpret_cast<const T*>(p.k), p.S, p.H, b, h, k0);
    async_rows<BK, K_THREADS>(Vs, reinterpret_cast<const T*>(p.v), p.S, p.H, b, h, k0);
    if (n_sub > 0) issue_q(0);
    cp_async_commit();

    const int w = warp_id(), g = frag_gid(), t2 = 2 * frag_tig();
    const int j0 = k0 + 16 * w + g;  // this lane's keys: j0 and j0 + 8
    float dk[1][D / 8][4], dv[1][D / 8][4];
    zero_acc<1, D / 8>(dk);
    zero_acc<1, D / 8>(dv);

    for (int it = 0; it < n_sub; ++it) {
        if (it + 1 < n_sub) {
            issue_q(it + 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        block_sync();
        const u32 ent = col_entry(p, list, BQ, BK, it / QSUB);
        const int q0 = (int)(ent & ~ATT_FULL_BIT) * BQ + (it % QSUB) * QT;
        const bool need_mask = (ent & ATT_FULL_BIT) == 0 || q0 + QT > p.T;
        const int st = it & 1;
        const T* Qt = Qs + st * QT * LD;
        const T* dOt = dOs + st * QT * LD;
        const float* lset = lses + st * QT;
        const float* deltat = deltas + st * QT;

        // P^T = exp2(K Q^T scale_log2 - lse2[i]) (16 keys x QT queries per warp), 0 where masked.
        float s[1][QT / 8][4];
        zero_acc<1, QT / 8>(s);
        mma_rows_bt<1, QT / 8>(s, Ks + 16 * w * LD, Qt);
        #pragma unroll
        for (int n = 0; n < QT / 8; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = 8 * n + t2 + (e & 1);
                float pe = fast_exp2(s[0][n][e] * p.scale_log2 - lse_base(lset[c]));
                if (need_mask) {
                    const int i = q0 + c, j = j0 + 8 * (e >> 1);
                    if (i >= p.T || j >= p.S || (p.causal && j > i)) pe = 0.0f;
                }
                s[0][n][e] = pe;
            }
        }
        // dV += P^T dO.
        {
            FragA<T> pf[1][QT / 16];
            acc_to_a<QT / 8>(pf[0], s[0]);
            mma_frags_b<1, QT / 16>(dv, pf, dOt);
        }
        // dP^T = V dO^T; dS^T = P^T (dP^T - delta[i]); dK += dS^T Q.
        float dp[1][QT / 8][4];
        zero_acc<1, QT / 8>(dp);
        mma_rows_bt<1, QT / 8>(dp, Vs + 16 * w * LD, dOt);
        #pragma unroll
        for (int n = 0; n < QT / 8; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e)
                dp[0][n][e] = s[0][n][e] * (dp[0][n][e] - deltat[8 * n + t2 + (e & 1)]);
        }
        {
            FragA<T> dsf[1][QT / 16];
            acc_to_a<QT / 8>(dsf[0], dp[0]);
            mma_frags_b<1, QT / 16>(dk, dsf, Qt);
        }
        block_sync();
    }
    cp_async_wait<0>();
    store_rows(p.dk, p.grad_f32 != 0, dk[0], p.S, p.H, b, h, j0, p.scale, p.scale);
    store_rows(p.dv, p.grad_f32 != 0, dv[0], p.S, p.H, b, h, j0, 1.0f, 1.0f);
}

// Dynamic shared memory (bytes) of each kernel above, read by the host after loading the module.
// Order: see KERNELS in src/attention/cuda/kernels.rs.
// The host reads it through la_smem_query (kernels/common.cuh).
#define LA_SMEM_TABLE_LEN 3
__constant__ int la_smem_table[LA_SMEM_TABLE_LEN] = {
    FWD_SMEM_BYTES,   // attn_fwd
    DQ_SMEM_BYTES,    // attn_bwd_dq
    DKDV_SMEM_BYTES,  // attn_bwd_dkdv
};
LA_DEFINE_SMEM_QUERY(la_smem_table, LA_SMEM_TABLE_LEN)
