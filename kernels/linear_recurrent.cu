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

// grid (ceil(V/32), N*H). o (f32, memory order), ht when given. `strict` leaves out the diagonal:
// o_t = scale q_t exp(g_t) S_{t-1}.
LA_KERNEL(REC_THREADS) la_rec_fwd(LA_PARAMS p) {
    __shared__ RecSmem sm;
    const int v0 = blockIdx.x * 32;
    const int n = blockIdx.y / p.H, h = blockIdx.y % p.H;
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

// grid (ceil(V/32), N*H). Writes dv (complete over K, memory order, store or accumulate), and
// atomically adds this block's value-column share of dq, dk into the zeroed logical-order scratch
// p.dq_intra, p.dk_intra, and of rowsum_V(ht * dht) into p.aux [N, H, K]. dh0 when requested.
LA_KERNEL(REC_THREADS) la_rec_bwd(LA_PARAMS p) {
    __shared__ RecSmem sm;
    const int v0 = blockIdx.x * 32;
    const int n = blockIdx.y / p.H, h = blockIdx.y % p.H;
    const int w = warp_id(), lane = lane_id();
    const int vv = v0 + lane;
    const SeqRange seq = seq_range(p, n);
    float* dq_s = reinterpret_cast<float*>(p.dq_intra);
    float* dk_s = reinterpret_cast<float*>(p.dk_intra);
    float* dv = reinterpret_cast<float*>(p.dv);

    // Phase 1, forward in time: dq_t = scale S_t do_t (strict: the pre-update state).
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
                float x = 0.0f;
                if (p.strict) x = S[m] * sm.d_o[lane];
                S[m] = fmaf(sm.k[kk], sm.v[lane], S[m]);
                if (!p.strict) x = S[m] * sm.d_o[lane];
                x = warp_sum(x);
                if (lane == 0) atomic_add(dq_s + row * p.K + kk, p.scale * x);
            }
        }
        block_sync();
    }
    // The final state's share of the gate gradient: rowsum_V(ht * dht).
    const float* dht = reinterpret_cast<const float*>(p.dht);
    if (dht && p.aux) {
        #pragma unroll
        for (int m = 0; m < REC_ROWS; ++m) {
            const int kk = w + REC_SLICES * m;
            if (kk < p.K) {
                float x = vv < p.V ? S[m] * dht[(((i64)n * p.H + h) * p.K + kk) * p.V + vv] : 0.0f;
                x = warp_sum(x);
                if (lane == 0) atomic_add(reinterpret_cast<float*>(p.aux) + ((i64)n * p.H + h) * p.K + kk, x);
            }
        }
    }

    // Phase 2, backward in time: dS carries dL/dS_t.
    float dS[REC_ROWS];
    rec_load_state(dS, p.dht, p, n, h, vv);
    for (int t = seq.len - 1; t >= 0; --t) {
        rec_stage(sm, p, seq, t, h, v0, true);
        block_sync();
        const i64 row = (seq.bos + t) * p.H + h;
        float dvp = 0.0f;
        #pragma unroll
        for (int m = 0; m < REC_ROWS; ++m) {
            const int kk = w + REC_SLICES * m;
            if (kk < p.K) {
                const float qdo = p.scale * sm.q[kk] * sm.d_o[lane];
                if (!p.strict) dS[m] += qdo;
                float x = dS[m] * sm.v[lane];
                x = warp_sum(x);
                if (lane == 0) atomic_add(dk_s + row * p.K + kk, x);
                dvp = fmaf(dS[m], sm.k[kk], dvp);
                if (p.strict) dS[m] += qdo;
                dS[m] *= sm.decay[kk];
            }
        }
        sm.red[w][lane] = dvp;
        block_sync();
        if (w == 0 && vv < p.V) {
            float s = 0.0f;
            #pragma unroll
            for (int i = 0; i < REC_SLICES; ++i) s += sm.red[i][lane];
            la_store(dv + (mem_tok(p, seq, t) * p.H + h) * (i64)p.V + vv, s, p.accumulate);
        }
    }
    if (p.dh0) rec_store_state(dS, p.dh0, p, n, h, vv);
}

// grid (N*H), 256 threads (thread per key channel). Moves the scratch dq, dk into the outputs
// (memory order, store or accumulate) and computes this pass's gate gradient per key channel:
//   dgl_t = sum_{i >= t} (q_i dq_i - k_i dk_i) + rowsum_V(ht * dht)
LA_KERNEL(REC_THREADS) la_rec_dg(LA_PARAMS p) {
    const int n = blockIdx.x / p.H, h = blockIdx.x % p.H;
    const SeqRange seq = seq_range(p, n);
    const T* q = reinterpret_cast<const T*>(p.q);
    const T* k = reinterpret_cast<const T*>(p.k);
    const float* dq_s = reinterpret_cast<const float*>(p.dq_intra);
    const float* dk_s = reinterpret_cast<const float*>(p.dk_intra);
    const float* final_term = reinterpret_cast<const float*>(p.aux);
    float* dq = reinterpret_cast<float*>(p.dq);
    float* dk = reinterpret_cast<float*>(p.dk);
    float* dgl = reinterpret_cast<float*>(p.dgl);
    for (int kk = threadIdx.x; kk < p.K; kk += REC_THREADS) {
        float run = final_term ? final_term[((i64)n * p.H + h) * p.K + kk] : 0.0f;
        for (int t = seq.len - 1; t >= 0; --t) {
            const i64 li = ((seq.bos + t) * p.H + h) * (i64)p.K + kk;
            const i64 mi = (mem_tok(p, seq, t) * p.H + h) * (i64)p.K + kk;
            const float a = dq_s[li], b = dk_s[li];
            la_store(dq + mi, a, p.accumulate);
            la_store(dk + mi, b, p.accumulate);
            run += to_float(q[mi]) * a - to_float(k[mi]) * b;
            if (dgl) dgl[li] = run;
        }
    }
}
