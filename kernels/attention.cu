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
// plan's block sizes, 64 | 128). A forward / dQ CTA covers one query block with BQ / 16 warps of 16
// query rows each and walks each key block of its list in sub-tiles of KT = 64 keys; a dK/dV CTA
// covers one key block with BK / 16 warps of 16 keys each and walks each query block in sub-tiles
// of QT queries. Shared K/V (resp. Q/dO) sub-tiles are double-buffered with cp.async: the copy of
// sub-tile i + 1 runs while sub-tile i is computed.
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
// Keys per shared K/V sub-tile (forward, dQ) and queries per shared Q/dO sub-tile (dK/dV). The
// dK/dV warps hold two D-wide f32 accumulators (dk, dv) next to the 16 x QT score tiles S and dP:
// at D = 128 a QT of 32 keeps that under the 255-register limit without spills.
static constexpr int KT = 64;
#ifndef ATT_QT
#define ATT_QT (ATT_D == 128 ? 32 : 64)
#endif
static constexpr int QT = ATT_QT;
static constexpr int KSUB = BK / KT;  // key sub-tiles per key block
static constexpr int QSUB = BQ / QT;  // query sub-tiles per query block
static constexpr int LD = D + SmemPad<T>::value;  // shared row stride (elements)
static constexpr int Q_WARPS = BQ / 16;
static constexpr int Q_THREADS = Q_WARPS * 32;
static constexpr int K_WARPS = BK / 16;
static constexpr int K_THREADS = K_WARPS * 32;
static constexpr float LN2 = 0.6931471805599453f;

static_assert(BK % KT == 0 && BQ % QT == 0, "block sizes must be multiples of the sub-tiles");
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

template <int NT>
LA_DEVICE void zero_acc(float (&c)[NT][4]) {
    #pragma unroll
    for (int n = 0; n < NT; ++n)
        #pragma unroll
        for (int e = 0; e < 4; ++e) c[n][e] = 0.0f;
}

// c(16 x 8 NT) += A(16 x D) B where A rows are 16 consecutive shared rows [m][d] and B(d, n) is the
// shared row n, column d of a [NT * 8][LD] tile: the "A times tile^T" product (S = Q K^T and
// friends).
template <int NT>
LA_DEVICE void mma_a_bt(float (&c)[NT][4], const T* a_rows, const T* b_rows) {
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        FragA<T> a;
        load_a<T, false>(a, a_rows + kk * 16, LD);
        #pragma unroll
        for (int nn = 0; nn < NT / 2; ++nn) {
            FragB<T> b0, b1;
            load_b2<T, false>(b0, b1, b_rows + nn * 16 * LD + kk * 16, LD);
            mma<T>(c[2 * nn], a, b0);
            mma<T>(c[2 * nn + 1], a, b1);
        }
    }
}

// c(16 x D) += A(16 x 16 KF) B where A comes from registers and B(k, n) is shared row k, column n
// of a [16 KF][LD] tile: the "fragments times tile" product (O += P V and friends).
template <int KF>
LA_DEVICE void mma_frag_b(float (&c)[D / 8][4], const FragA<T> (&a)[KF], const T* b_rows) {
    #pragma unroll
    for (int kk = 0; kk < KF; ++kk) {
        #pragma unroll
        for (int nn = 0; nn < D / 16; ++nn) {
            FragB<T> b0, b1;
            load_b2<T, true>(b0, b1, b_rows + kk * 16 * LD + nn * 16, LD);
            mma<T>(c[2 * nn], a[kk], b0);
            mma<T>(c[2 * nn + 1], a[kk], b1);
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
    const T* qg = reinterpret_cast<const T*>(p.q);
    const T* kg = reinterpret_cast<const T*>(p.k);
    const T* vg = reinterpret_cast<const T*>(p.v);

    auto issue_kv = [&](int it) {
        const u32 ent = row_entry(p, list, BQ, BK, it / KSUB);
        const int k0 = (int)(ent & ~ATT_FULL_BIT) * BK + (it % KSUB) * KT;
        const int st = it & 1;
        async_rows<KT, Q_THREADS>(Ks + st * KT * LD, kg, p.S, p.H, b, h, k0);
        async_rows<KT, Q_THREADS>(Vs + st * KT * LD, vg, p.S, p.H, b, h, k0);
    };
    async_rows<BQ, Q_THREADS>(Qs, qg, p.T, p.H, b, h, q0);
    if (n_sub > 0) issue_kv(0);
    cp_async_commit();

    const int w = warp_id(), g = frag_gid(), t2 = 2 * frag_tig();
    const int r0 = q0 + 16 * w + g;  // this lane's rows: r0 and r0 + 8
    float acc[D / 8][4];
    zero_acc<D / 8>(acc);
    float m[2] = {-ATT_INF, -ATT_INF}, l[2] = {0.0f, 0.0f};
    FragA<T> qf[D / 16];

    for (int it = 0; it < n_sub; ++it) {
        if (it + 1 < n_sub) {
            issue_kv(it + 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        block_sync();
        if (it == 0) {
            #pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) load_a<T, false>(qf[kk], Qs + 16 * w * LD + kk * 16, LD);
        }
        const u32 ent = row_entry(p, list, BQ, BK, it / KSUB);
        const int k0 = (int)(ent & ~ATT_FULL_BIT) * BK + (it % KSUB) * KT;
        const bool full = (ent & ATT_FULL_BIT) != 0;
        const T* Kt = Ks + (it & 1) * KT * LD;
        const T* Vt = Vs + (it & 1) * KT * LD;

        // S = Q K^T (16 rows x KT keys per warp).
        float s[KT / 8][4];
        zero_acc<KT / 8>(s);
        #pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            #pragma unroll
            for (int nn = 0; nn < KT / 16; ++nn) {
                FragB<T> b0, b1;
                load_b2<T, false>(b0, b1, Kt + nn * 16 * LD + kk * 16, LD);
                mma<T>(s[2 * nn], qf[kk], b0);
                mma<T>(s[2 * nn + 1], qf[kk], b1);
            }
        }

        // To the exp2 domain; mask partial blocks; row max.
        float mx[2] = {-ATT_INF, -ATT_INF};
        #pragma unroll
        for (int n = 0; n < KT / 8; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[n][e] * p.scale_log2;
                if (!full) {
                    const int i = r0 + 8 * (e >> 1), j = k0 + 8 * n + t2 + (e & 1);
                    if (j >= p.S || (p.causal && j > i)) x = -ATT_INF;
                }
                s[n][e] = x;
                mx[e >> 1] = fmax_(mx[e >> 1], x);
            }
        }
        float base[2], alpha[2];
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float m_new = fmax_(m[r], quad_max(mx[r]));
            base[r] = m_new == -ATT_INF ? 0.0f : m_new;
            alpha[r] = fast_exp2(m[r] - base[r]);
            m[r] = m_new;
            l[r] *= alpha[r];
        }
        #pragma unroll
        for (int n = 0; n < KT / 8; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float pe = fast_exp2(s[n][e] - base[e >> 1]);
                s[n][e] = pe;
                l[e >> 1] += pe;
            }
        }
        #pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            acc[n][0] *= alpha[0];
            acc[n][1] *= alpha[0];
            acc[n][2] *= alpha[1];
            acc[n][3] *= alpha[1];
        }

        // O += P V.
        FragA<T> pf[KT / 16];
        acc_to_a<KT / 8>(pf, s);
        mma_frag_b<KT / 16>(acc, pf, Vt);
        block_sync();
    }
    cp_async_wait<0>();  // (a CTA without blocks still has its Q copy in flight)

    float inv[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] = quad_sum(l[r]);
        inv[r] = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    }
    store_rows(p.o, p.o_f32 != 0, acc, p.T, p.H, b, h, r0, inv[0], inv[1]);
    if (frag_tig() == 0) {
        float* lse = reinterpret_cast<float*>(p.lse) + ((i64)b * p.H + h) * p.T;
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = r0 + 8 * r;
            if (row < p.T) lse[row] = l[r] > 0.0f ? (m[r] + log2f(l[r])) * LN2 : -ATT_INF;
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
    const int r0 = q0 + 16 * w + g;
    float lse2[2], delta[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = r0 + 8 * r;
        const i64 at = ((i64)b * p.H + h) * p.T + row;
        lse2[r] = row < p.T ? lse_base(reinterpret_cast<const float*>(p.lse)[at]) : ATT_INF;
        delta[r] = row < p.T ? reinterpret_cast<const float*>(p.delta)[at] : 0.0f;
    }
    float dq[D / 8][4];
    zero_acc<D / 8>(dq);

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

        // P = exp2(S scale_log2 - lse2), 0 where masked.
        float s[KT / 8][4];
        zero_acc<KT / 8>(s);
        mma_a_bt<KT / 8>(s, Qs + 16 * w * LD, Kt);
        #pragma unroll
        for (int n = 0; n < KT / 8; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                float pe = fast_exp2(s[n][e] * p.scale_log2 - lse2[e >> 1]);
                if (!full) {
                    const int i = r0 + 8 * (e >> 1), j = k0 + 8 * n + t2 + (e & 1);
                    if (j >= p.S || (p.causal && j > i)) pe = 0.0f;
                }
                s[n][e] = pe;
            }
        }
        // dP = dO V^T; dS = P (dP - delta).
        float dp[KT / 8][4];
        zero_acc<KT / 8>(dp);
        mma_a_bt<KT / 8>(dp, dOs + 16 * w * LD, Vt);
        #pragma unroll
        for (int n = 0; n < KT / 8; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) dp[n][e] = s[n][e] * (dp[n][e] - delta[e >> 1]);
        }
        // dQ += dS K.
        FragA<T> dsf[KT / 16];
        acc_to_a<KT / 8>(dsf, dp);
        mma_frag_b<KT / 16>(dq, dsf, Kt);
        block_sync();
    }
    cp_async_wait<0>();
    const float sc = p.scale;
    store_rows(p.dq, p.grad_f32 != 0, dq, p.T, p.H, b, h, r0, sc, sc);
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
    float dk[D / 8][4], dv[D / 8][4];
    zero_acc<D / 8>(dk);
    zero_acc<D / 8>(dv);

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
        float s[QT / 8][4];
        zero_acc<QT / 8>(s);
        mma_a_bt<QT / 8>(s, Ks + 16 * w * LD, Qt);
        #pragma unroll
        for (int n = 0; n < QT / 8; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = 8 * n + t2 + (e & 1);
                float pe = fast_exp2(s[n][e] * p.scale_log2 - lse_base(lset[c]));
                if (need_mask) {
                    const int i = q0 + c, j = j0 + 8 * (e >> 1);
                    if (i >= p.T || j >= p.S || (p.causal && j > i)) pe = 0.0f;
                }
                s[n][e] = pe;
            }
        }
        // dV += P^T dO.
        {
            FragA<T> pf[QT / 16];
            acc_to_a<QT / 8>(pf, s);
            mma_frag_b<QT / 16>(dv, pf, dOt);
        }
        // dP^T = V dO^T; dS^T = P^T (dP^T - delta[i]); dK += dS^T Q.
        float dp[QT / 8][4];
        zero_acc<QT / 8>(dp);
        mma_a_bt<QT / 8>(dp, Vs + 16 * w * LD, dOt);
        #pragma unroll
        for (int n = 0; n < QT / 8; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) dp[n][e] = s[n][e] * (dp[n][e] - deltat[8 * n + t2 + (e & 1)]);
        }
        {
            FragA<T> dsf[QT / 16];
            acc_to_a<QT / 8>(dsf, dp);
            mma_frag_b<QT / 16>(dk, dsf, Qt);
        }
        block_sync();
    }
    cp_async_wait<0>();
    store_rows(p.dk, p.grad_f32 != 0, dk, p.S, p.H, b, h, j0, p.scale, p.scale);
    store_rows(p.dv, p.grad_f32 != 0, dv, p.S, p.H, b, h, j0, 1.0f, 1.0f);
}

// Dynamic shared memory (bytes) of each kernel above, read by the host after loading the module.
// Order: see KERNELS in src/attention/cuda/kernels.rs.
__constant__ int la_smem_table[3] = {
    FWD_SMEM_BYTES,   // attn_fwd
    DQ_SMEM_BYTES,    // attn_bwd_dq
    DKDV_SMEM_BYTES,  // attn_bwd_dkdv
};
