// Launch parameters and block-list indexing of the block-sparse FlashAttention-2 kernels
// (kernels/attention.cu). `AttnParams` is mirrored field by field by `AttnParams` in
// src/attention/cuda/params.rs (the host checks the size; keep both in the same order).
//
// Index conventions
// - q, o, do, dq: [B, T, H, D]; k, v, dk, dv: [B, S, H, D]; element (b, t, h, d) at
//   ((b * L + t) * H + h) * D + d in 64-bit arithmetic (L = T or S).
// - lse, delta: [B, H, T] f32; lse is the natural log-sum-exp of the scaled scores of a row, -inf
//   for a row with no allowed key.
// - The block lists are the host plan (src/attention/plan.rs) in CSR form: `rows_ptr[qb] ..
//   rows_ptr[qb + 1]` index `rows_ent`, whose entries are `key block | full << 31` (ascending
//   key blocks; `full` = no token pair of the block is masked), and the transpose `cols_*` (per
//   key block, its query blocks). With `rows_ptr == 0` the lists are computed (dense mode: every
//   block, pruned by the causal rule exactly as the plan prunes it) and nothing is read.
// - `row_order` / `col_order` map blockIdx.y to the block a CTA processes (longest lists first).
#pragma once

struct AttnParams {
    u64 q, k, v;           // inputs, element type T
    u64 o;                 // [B, T, H, D]: written by attn_fwd, read by attn_bwd_delta (f32 or T)
    u64 lse;               // [B, H, T] f32: written by attn_fwd, read by the backward kernels
    u64 d_o;               // [B, T, H, D] T
    u64 delta;             // [B, H, T] f32: rowsum(do * o)
    u64 dq, dk, dv;        // gradients (f32 or T)
    u64 rows_ptr;          // [nq + 1] u32, or 0 for the dense mode
    u64 rows_ent;          // [nnz] u32
    u64 cols_ptr;          // [nk + 1] u32 (0 in dense mode)
    u64 cols_ent;          // [nnz] u32
    u64 row_order;         // [nq] u32 (0: identity, or reversed for causal in dense mode)
    u64 col_order;         // [nk] u32 (0: identity)
    int B, T, S, H;
    int nq, nk;            // ceil(T / BQ), ceil(S / BK)
    int causal;            // key j allowed for query i only if j <= i (top-left aligned)
    int o_f32;             // o is f32 (else T)
    int grad_f32;          // dq, dk, dv are f32 (else T)
    float scale;           // softmax scale
    float scale_log2;      // scale * log2(e): scores go to the exp2 domain in one multiply
    int reserved;
};
static_assert(sizeof(AttnParams) == 176, "AttnParams layout changed: update src/attention/cuda/params.rs");

#ifdef LA_EMULATION
#define ATT_PARAMS const AttnParams&
#define ATT_INF (__builtin_inff())
#else
#define ATT_PARAMS const AttnParams
#define ATT_INF (__int_as_float(0x7f800000u))
#endif

#define ATT_FULL_BIT 0x80000000u

LA_DEVICE int imin(int a, int b) { return a < b ? a : b; }
LA_DEVICE float fmax_(float a, float b) { return a > b ? a : b; }

// One CTA's block list: `count` entries (each `block | full << 31`).
struct BlockList {
    const u32* ent;  // plan entries of this row/column, or nullptr (computed)
    int count;
    int first;       // computed mode: block index of entry 0
    int self;        // the CTA's own block (query block for rows, key block for columns)
};

// Token ranges of the plan (same rules as AttentionPlan::new): a block is full iff no causal cut
// runs through it and it has no padded key tail; a block whose first key comes after its last
// query is dropped under the causal rule.
LA_DEVICE bool block_is_full(const AttnParams& p, int bq, int bk, int qb, int kb) {
    const int q_first = qb * bq;
    const int k_end = imin((kb + 1) * bk, p.S);
    const bool padded_tail = (kb + 1) * bk > p.S;
    const bool cut = p.causal && (k_end - 1 > q_first);
    return !(padded_tail || cut);
}

// Key blocks of query block `qb` (forward, dQ).
LA_DEVICE BlockList row_list(const AttnParams& p, int bq, int bk, int qb) {
    BlockList l;
    l.self = qb;
    if (p.rows_ptr) {
        const u32* ptr = reinterpret_cast<const u32*>(p.rows_ptr);
        const u32 a = ptr[qb], e = ptr[qb + 1];
        l.ent = reinterpret_cast<const u32*>(p.rows_ent) + a;
        l.count = (int)(e - a);
        l.first = 0;
    } else {
        l.ent = nullptr;
        l.first = 0;
        if (p.causal) {
            const int q_last = imin((qb + 1) * bq, p.T) - 1;
            l.count = imin(p.nk, q_last / bk + 1);
        } else {
            l.count = p.nk;
        }
    }
    return l;
}

// Query blocks of key block `kb` (dK, dV).
LA_DEVICE BlockList col_list(const AttnParams& p, int bq, int bk, int kb) {
    BlockList l;
    l.self = kb;
    if (p.cols_ptr) {
        const u32* ptr = reinterpret_cast<const u32*>(p.cols_ptr);
        const u32 a = ptr[kb], e = ptr[kb + 1];
        l.ent = reinterpret_cast<const u32*>(p.cols_ent) + a;
        l.count = (int)(e - a);
        l.first = 0;
    } else {
        l.ent = nullptr;
        if (p.causal) {
            // First query block whose last query reaches this block's first key; none when the
            // first key lies past every query.
            const int k_first = kb * bk;
            l.first = k_first / bq;
            l.count = k_first <= p.T - 1 ? p.nq - l.first : 0;
        } else {
            l.first = 0;
            l.count = p.nq;
        }
    }
    return l;
}

// Entry e of a row list: key block | full << 31.
LA_DEVICE u32 row_entry(const AttnParams& p, const BlockList& l, int bq, int bk, int e) {
    if (l.ent) return l.ent[e];
    const int kb = l.first + e;
    return (u32)kb | (block_is_full(p, bq, bk, l.self, kb) ? ATT_FULL_BIT : 0u);
}

// Entry e of a column list: query block | full << 31.
LA_DEVICE u32 col_entry(const AttnParams& p, const BlockList& l, int bq, int bk, int e) {
    if (l.ent) return l.ent[e];
    const int qb = l.first + e;
    return (u32)qb | (block_is_full(p, bq, bk, qb, l.self) ? ATT_FULL_BIT : 0u);
}

// The query block a forward / dQ CTA processes. Dense causal rows grow with the block index, so
// they run in reverse (longest first); the plan carries its own longest-first order.
LA_DEVICE int row_at(const AttnParams& p, int y) {
    if (p.row_order) return (int)reinterpret_cast<const u32*>(p.row_order)[y];
    if (!p.rows_ptr && p.causal) return p.nq - 1 - y;
    return y;
}

// The key block a dK/dV CTA processes (dense causal columns shrink with the index: identity).
LA_DEVICE int col_at(const AttnParams& p, int y) {
    if (p.col_order) return (int)reinterpret_cast<const u32*>(p.col_order)[y];
    return y;
}
