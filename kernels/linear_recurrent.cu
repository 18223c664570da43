// Recurrent form of decayed linear attention (ops.md section 1): the scan itself, O(T K V), in f32,
// forward, backward and (through la_rec_fwd with one token per sequence) the decoding step.
//
// Block layout: 8 warps = 8 key slices x 32 lanes = 32 value columns. Thread (slice w, lane l) holds
// the state rows kk = w, w + 8, ..., (K <= 256 -> at most 32 rows) of value column v0 + l in
// registers. Per step the token's q, k, gate factors and v are staged in shared memory; row-sums
// over the key axis go through a shared reduction, sums over the value axis through warp shuffles.
//
// Compile-time variant: LA_DTYPE only (head dims are run-time, K <= 256).

#include "common.cuh"
#include "linear_params.cuh"

#define REC_SLICES 8
#define REC_THREADS 256
#define REC_KMAX 256
#define REC_ROWS (REC_KMAX / REC_SLICES)

struct RecSmem {
    float q[REC_KMAX];
    float k[REC_KMAX];
    float decay[REC_KMAX];  // exp(gate) of this step, per key channel
    float v[32];
    float d_o[32];
    float red[REC_SLICES][32];
};

// Stages step t (logical) of sequence `seq`: q, k, exp(gate), and the block's value columns of v
// (and of do when `with_do`).
LA_DEVICE void rec_stage(RecSmem& sm, const LaParams& p, const SeqRange& seq, int t, int h, int v0,
                         bool with_do) {
    const i64 tok = mem_tok(p, seq, t);
    const T* q = reinterpret_cast<const T*>(p.q);
    const T* k = reinterpret_cast<const T*>(p.k);
    const T* v = reinterpret_cast<const T*>(p.v);
    for (int kk = threadIdx.x; kk < p.K; kk += REC_THREADS) {
        const i64 idx = (tok * p.H + h) * (i64)p.K + kk;
        sm.q[kk] = to_float(q[idx]);
        sm.k[kk] = to_float(k[idx]);
        sm.decay[kk] = fast_exp2(pass_gate(p, seq, t, h, kk) * LA_LOG2E);
    }
    if (threadIdx.x < 32) {
        const int vv = v0 + threadIdx.x;
        const i64 idx = (tok * p.H + h) * (i64)p.V + vv;
        sm.v[threadIdx.x] = vv < p.V ? to_float(v[idx]) : 0.0f;
        if (with_do) {
            float x = 0.0f;
            if (vv < p.V) {
                x = p.do_f32 ? reinterpret_cast<const float*>(p.d_o)[idx]
                             : to_float(reinterpret_cast<const T*>(p.d_o)[idx]);
            }
            sm.d_o[threadIdx.x] = x;
        }
    }
}

// Loads (or zeroes) the thread's state rows from a [N, H, K, V] f32 tensor.
LA_DEVICE void rec_load_state(float S[REC_ROWS], u64 src, const LaParams& p, int n, int h, int vv) {
    const float* s = reinterpret_cast<const float*>(src);
    const int w = warp_id();
    #pragma unroll
    for (int m = 0; m < REC_ROWS; ++m) {
        const int kk = w + REC_SLICES * m;
        S[m] = (s && kk < p.K && vv < p.V) ? s[(((i64)n * p.H + h) * p.K + kk) * p.V + vv] : 0.0f;
    }
}
LA_DEVICE void rec_store_state(const float S[REC_ROWS], u64 dst, const LaParams& p, int n, int h, int vv) {
    float* s = reinterpret_cast<float*>(dst);
    const int w = warp_id();
    #pragma unroll
    for (int m = 0; m < REC_ROWS; ++m) {
        const int kk = w + REC_SLICES * m;
        if (kk < p.K && vv < p.V) s[(((i64)n * p.H + h) * p.K + kk) * p.V + vv] = S[m];
    }
}

// grid (N*H, ceil(V/32)). o (f32, memory order), ht when given. `strict` leaves out the diagonal:
// o_t = scale q_t exp(g_t) S_{t-1}.
LA_KERNEL(REC_THREADS) la_rec_fwd(LA_PARAMS p) {
    __shared__ RecSmem sm;
    const int v0 = blockIdx.y * 32;
    const int n = blockIdx.x / p.H, h = blockIdx.x % p.H;
    const int w = warp_id(), lane = lane_id();
    const int vv = v0 + lane;
    const SeqRange seq = seq_range(p, n);
    float S[REC_ROWS];
    rec_load_state(S, p.h0, p, n, h, vv);
    float* o = reinterpret_cast<float*>(p.o);

    for (int t = 0; t < seq.len; ++t) {
        rec_stage(sm, p, seq, t, h, v0, false);
        block_sync();
        float part = 0.0f;
        #pragma unroll
        for (int m = 0; m < REC_ROWS; ++m) {
            const int kk = w + REC_SLICES * m;
            if (kk < p.K) {
                S[m] *= sm.decay[kk];
                if (p.strict) part = fmaf(sm.q[kk], S[m], part);
                S[m] = fmaf(sm.k[kk], sm.v[lane], S[m]);
                if (!p.strict) part = fmaf(sm.q[kk], S[m], part);
            }
        }
        sm.red[w][lane] = part;
        block_sync();
        if (w == 0 && vv < p.V) {
            float s = 0.0f;
            #pragma unroll
            for (int i = 0; i < REC_SLICES; ++i) s += sm.red[i][lane];
            la_store(o + (mem_tok(p, seq, t) * p.H + h) * (i64)p.V + vv, p.scale * s, p.accumulate);
        }
    }
    if (p.ht) rec_store_state(S, p.ht, p, n, h, vv);
}

// grid (N*H, ceil(V/32)). The backward scan. Writes dv (complete over K, memory order, store or
// accumulate) and dh0, and atomically adds this block's value-column share of the q/k gradient
// pieces into zeroed logical-order scratch:
//   p.dq_intra  dq'_t = scale (exp(g_t) S_{t-1}) do_t          (no diagonal term)
//   p.dk_intra  dk^seq_t = dS^seq_t v_t                         (through later queries, no diagonal)
//   p.A         dk^ht_t  = dS^ht_t v_t                          (through the final state, [tokens,H,K])
//   p.dA        dov_t = do_t . v_t                              ([tokens, H])
//   p.aux       rowsum_V(h0 * dS^ht_{-1})                       ([N, H, K], when h0 and dht)
// dS^seq carries the gradient from the outputs, dS^ht the one from dht; keeping them apart (and the
// diagonal out) lets la_rec_dg form the gate gradient from decayed terms only.
LA_KERNEL(REC_THREADS) la_rec_bwd(LA_PARAMS p) {
    __shared__ RecSmem sm;
    __shared__ float qk_part[REC_SLICES];
    const int v0 = blockIdx.y * 32;
    const int n = blockIdx.x / p.H, h = blockIdx.x % p.H;
    const int w = warp_id(), lane = lane_id();
    const int vv = v0 + lane;
    const SeqRange seq = seq_range(p, n);
    float* dq_s = reinterpret_cast<float*>(p.dq_intra);
    float* dk_seq = reinterpret_cast<float*>(p.dk_intra);
    float* dk_ht = reinterpret_cast<float*>(p.A);
    float* dov = reinterpret_cast<float*>(p.dA);
    float* dv = reinterpret_cast<float*>(p.dv);
    const bool has_dht = p.dht != 0;

    // Phase 1, forward in time: dq'_t from the state before token t's own update.
    float S[REC_ROWS];
    rec_load_state(S, p.h0, p, n, h, vv);
    for (int t = 0; t < seq.len; ++t) {
        rec_stage(sm, p, seq, t, h, v0, true);
        block_sync();
        const i64 row = (seq.bos + t) * p.H + h;
        #pragma unroll
        for (int m = 0; m < REC_ROWS; ++m) {
            const int kk = w + REC_SLICES * m;
            if (kk < p.K) {  // uniform per warp
                S[m] *= sm.decay[kk];
                float x = warp_sum(S[m] * sm.d_o[lane]);
                if (lane == 0) atomic_add(dq_s + row * p.K + kk, p.scale * x);
                S[m] = fmaf(sm.k[kk], sm.v[lane], S[m]);
            }
        }
        if (w == 0) {
            const float x = warp_sum(sm.d_o[lane] * sm.v[lane]);
            if (lane == 0) atomic_add(dov + row, x);
        }
        block_sync();
    }

    // Phase 2, backward in time.
    float dSs[REC_ROWS], dSh[REC_ROWS];
    rec_load_state(dSh, p.dht, p, n, h, vv);
    #pragma unroll
    for (int m = 0; m < REC_ROWS; ++m) dSs[m] = 0.0f;
    for (int t = seq.len - 1; t >= 0; --t) {
        rec_stage(sm, p, seq, t, h, v0, true);
        block_sync();
        const i64 row = (seq.bos + t) * p.H + h;
        float dvp = 0.0f, qk = 0.0f;
        #pragma unroll
        for (int m = 0; m < REC_ROWS; ++m) {
            const int kk = w + REC_SLICES * m;
            if (kk < p.K) {
                float x = warp_sum(dSs[m] * sm.v[lane]);
                if (lane == 0) atomic_add(dk_seq + row * p.K + kk, x);
                if (has_dht) {
                    x = warp_sum(dSh[m] * sm.v[lane]);
                    if (lane == 0) atomic_add(dk_ht + row * p.K + kk, x);
                }
                dvp = fmaf(dSs[m] + dSh[m], sm.k[kk], dvp);
                qk = fmaf(sm.q[kk], sm.k[kk], qk);
                dSs[m] = fmaf(p.scale * sm.q[kk], sm.d_o[lane], dSs[m]) * sm.decay[kk];
                dSh[m] *= sm.decay[kk];
            }
        }
        sm.red[w][lane] = dvp;
        if (lane == 0) qk_part[w] = qk;
        block_sync();
        if (w == 0 && vv < p.V) {
            float s = 0.0f, qks = 0.0f;
            #pragma unroll
            for (int i = 0; i < REC_SLICES; ++i) {
                s += sm.red[i][lane];
                qks += qk_part[i];
            }
            if (!p.strict) s = fmaf(p.scale * qks, sm.d_o[lane], s);  // the diagonal's share
            la_store(dv + (mem_tok(p, seq, t) * p.H + h) * (i64)p.V + vv, s, p.accumulate);
        }
    }
    if (p.dh0) {
        float sum[REC_ROWS];
        #pragma unroll
        for (int m = 0; m < REC_ROWS; ++m) sum[m] = dSs[m] + dSh[m];
        rec_store_state(sum, p.dh0, p, n, h, vv);
    }
    // Keys before the sequence (h0) paired with queries after it (ht).
    if (p.h0 && has_dht && p.aux) {
        const float* h0 = reinterpret_cast<const float*>(p.h0);
        #pragma unroll
        for (int m = 0; m < REC_ROWS; ++m) {
            const int kk = w + REC_SLICES * m;
            if (kk < p.K) {
                const float hv = vv < p.V ? h0[(((i64)n * p.H + h) * p.K + kk) * p.V + vv] : 0.0f;
                const float x = warp_sum(hv * dSh[m]);
                if (lane == 0) atomic_add(reinterpret_cast<float*>(p.aux) + ((i64)n * p.H + h) * p.K + kk, x);
            }
        }
    }
}

// grid (N*H), 256 threads (thread per key channel). Combines the scratch of la_rec_bwd into dq, dk
// (memory order, store or accumulate; the diagonal's share scale (do.v) k, scale (do.v) q unless
// strict) and computes this pass's gate gradient per key channel (width K):
//   dG_t = aux + sum_{i >= t} (q_i dq'_i - k_i dk^seq_i) + sum_{i < t} k_i dk^ht_i
LA_KERNEL(REC_THREADS) la_rec_dg(LA_PARAMS p) {
    const int n = blockIdx.x / p.H, h = blockIdx.x % p.H;
    const SeqRange seq = seq_range(p, n);
    const T* q = reinterpret_cast<const T*>(p.q);
    const T* k = reinterpret_cast<const T*>(p.k);
    const float* dq_s = reinterpret_cast<const float*>(p.dq_intra);
    const float* dk_seq = reinterpret_cast<const float*>(p.dk_intra);
    const float* dk_ht = reinterpret_cast<const float*>(p.A);
    const float* dov = reinterpret_cast<const float*>(p.dA);
    const float* h0_term = reinterpret_cast<const float*>(p.aux);
    float* dq = reinterpret_cast<float*>(p.dq);
    float* dk = reinterpret_cast<float*>(p.dk);
    float* dgl = reinterpret_cast<float*>(p.dgl);
    const float diag = p.strict ? 0.0f : p.scale;
    for (int kk = threadIdx.x; kk < p.K; kk += REC_THREADS) {
        // Forward sweep: outputs, and the exclusive prefix of k dk^ht into dgl.
        double pre = 0.0;  // scans in f64: terms of both signs, often larger than the result
        for (int t = 0; t < seq.len; ++t) {
            const i64 lrow = (seq.bos + t) * p.H + h;
            const i64 li = lrow * (i64)p.K + kk;
            const i64 mi = (mem_tok(p, seq, t) * p.H + h) * (i64)p.K + kk;
            const float qv = to_float(q[mi]), kv = to_float(k[mi]);
            const float dd = diag * dov[lrow];
            la_store(dq + mi, dq_s[li] + dd * kv, p.accumulate);
            la_store(dk + mi, dk_seq[li] + dk_ht[li] + dd * qv, p.accumulate);
            if (dgl) dgl[li] = (float)pre;
            pre += kv * dk_ht[li];
        }
        if (!dgl) continue;
        double run = h0_term ? h0_term[((i64)n * p.H + h) * p.K + kk] : 0.0;
        for (int t = seq.len - 1; t >= 0; --t) {
            const i64 li = ((seq.bos + t) * p.H + h) * (i64)p.K + kk;
            const i64 mi = (mem_tok(p, seq, t) * p.H + h) * (i64)p.K + kk;
            run += (double)to_float(q[mi]) * dq_s[li] - (double)to_float(k[mi]) * dk_seq[li];
            dgl[li] = (float)(dgl[li] + run);
        }
    }
}
