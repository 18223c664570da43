// Shared device code of every linattn CUDA kernel family: element types, conversions, the tensor-core
// primitives (mma.sync m16n8k16, ldmatrix), fragment builders and cooperative tile staging.
//
// Compiled at run time by NVRTC without any CUDA toolkit header: bf16/f16 are plain 16-bit storage
// types converted through inline PTX. EVERY piece of inline PTX of the project lives in the section
// "hardware primitives" below, behind small device functions; a host emulation build (LA_EMULATION,
// kernels/emu/) swaps exactly that section for C++ implementations, so the rest of the kernel code
// is shared verbatim between the GPU and the CPU emulation.
//
// Fragment layouts are those of `mma.sync.aligned.m16n8k16.row.col` (PTX ISA, "Matrix fragments for
// mma.m16n8k16"): with lane = 4 * gid + tig,
//   A (16 x 16, row major): a0 = (gid, 2tig..2tig+1), a1 = (gid+8, 2tig..), a2 = (gid, 2tig+8..),
//                           a3 = (gid+8, 2tig+8..)
//   B (16 x 8, "col"):      b0 = (k = 2tig..2tig+1, n = gid), b1 = (k = 2tig+8.., n = gid)
//   C (16 x 8, f32):        c0, c1 = (gid, 2tig..2tig+1), c2, c3 = (gid+8, 2tig..2tig+1)
// Each 32-bit register holds two consecutive-k elements, the lower k in the low half.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#ifndef LA_EMULATION
#define LA_DEVICE __device__ __forceinline__
#define LA_KERNEL(threads) extern "C" __global__ void __launch_bounds__(threads, 1)
#endif

// The dynamic shared memory of every kernel (carved per kernel).
#ifndef LA_EMULATION
extern __shared__ __align__(16) unsigned char la_smem[];
#endif

// Kernels take one parameter struct: by value on the GPU, by reference in the host emulation
// (same ABI as a pointer, so its launcher can call every kernel the same way).
#ifdef LA_EMULATION
#define LA_PARAM_REF(type) const type&
#else
#define LA_PARAM_REF(type) const type
#endif

// Every module that carves dynamic shared memory publishes the bytes each kernel needs in an int
// table and defines `la_smem_query` with this macro; the host runs it once per loaded module
// (NVRTC gives module globals internal linkage, so the symbol itself is not looked up).
struct LaSmemQuery {
    u64 out;  // int[len] on the device
};
#define LA_DEFINE_SMEM_QUERY(table, len)                                       \
    LA_KERNEL(32) la_smem_query(LA_PARAM_REF(LaSmemQuery) q) {                 \
        int* out = reinterpret_cast<int*>(q.out);                              \
        for (int i = (int)threadIdx.x; i < (len); i += 32) out[i] = (table)[i]; \
    }

// Storage types of the 16-bit inputs. Distinct structs so that overloads pick the right conversion.
struct bf16_t {
    u16 bits;
};
struct f16_t {
    u16 bits;
};

#define LA_LOG2E 1.4426950408889634f

// ------------------------------------------------------------------------------------------------
// Hardware primitives (the only inline PTX of the project; replaced wholesale under LA_EMULATION).
// ------------------------------------------------------------------------------------------------
#ifndef LA_EMULATION

LA_DEVICE float to_float(float x) { return x; }
LA_DEVICE float to_float(bf16_t x) { return __uint_as_float(((u32)x.bits) << 16); }
LA_DEVICE float to_float(f16_t x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}

// Round to nearest even.
LA_DEVICE bf16_t bf16_from_float(float x) {
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}
LA_DEVICE f16_t f16_from_float(float x) {
    f16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
    return r;
}

// Two floats to one register: `lo` in bits 0..15, `hi` in bits 16..31 (round to nearest even).
LA_DEVICE u32 pack2_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
LA_DEVICE u32 pack2_f16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 2^x. ex2.approx has a relative error of about 2^-22; ftz flushes subnormal results to zero.
// Every exponent in this project is <= 0, so results lie in [0, 1].
LA_DEVICE float fast_exp2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

LA_DEVICE float shfl(float x, int src_lane) { return __shfl_sync(0xffffffffu, x, src_lane); }
LA_DEVICE float shfl_xor(float x, int mask) { return __shfl_xor_sync(0xffffffffu, x, mask); }

LA_DEVICE u32 smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// ldmatrix: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; register i of every lane
// receives (row lane/4, cols 2(lane%4)..+1) of matrix i (transposed with .trans).
LA_DEVICE void ldmatrix_x4(u32 r[4], const void* row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row_ptr)));
}
LA_DEVICE void ldmatrix_x4_trans(u32 r[4], const void* row_ptr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row_ptr)));
}

LA_DEVICE void mma_bf16_16816(float c[4], const u32 a[4], const u32 b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
LA_DEVICE void mma_f16_16816(float c[4], const u32 a[4], const u32 b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Asynchronous 16-byte global -> shared copy (sm_80+): the first `src_bytes` (0..16) bytes come
// from `gmem_src`, the rest of the 16 are zero-filled. Both addresses 16-byte aligned.
LA_DEVICE void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :
                 : "r"(smem_addr(smem_dst)), "l"(gmem_src), "r"(src_bytes)
                 : "memory");
}
LA_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Asynchronous global -> shared copies (sm_80 cp.async). `valid == false` reads nothing and
// zero-fills the destination (src-size 0); the source address is then unused but must be a valid
// pointer value. Completion: cp_async_commit() closes a group, cp_async_wait<N>() waits until at
// most N of the committed groups are pending (then a block barrier publishes the data).
LA_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(smem_dst)),
                 "l"(gmem_src), "r"(valid ? 16 : 0)
                 : "memory");
}
LA_DEVICE void cp_async_4(void* smem_dst, const void* gmem_src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(smem_dst)),
                 "l"(gmem_src), "r"(valid ? 4 : 0)
                 : "memory");
}
// Waits until at most N committed groups of this thread are still in flight.
template <int N>
LA_DEVICE void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

LA_DEVICE void block_sync() { __syncthreads(); }
LA_DEVICE int lane_id() { return threadIdx.x & 31; }
LA_DEVICE int warp_id() { return threadIdx.x >> 5; }
LA_DEVICE void atomic_add(float* p, float x) { atomicAdd(p, x); }
LA_DEVICE void atomic_or(unsigned* p, unsigned x) { atomicOr(p, x); }

#else
#include "emu/primitives.h"
#endif

// Sum over the 32 lanes of a warp (every lane gets the total).
LA_DEVICE float warp_sum(float x) {
    #pragma unroll
    for (int m = 16; m >= 1; m >>= 1) x += shfl_xor(x, m);
    return x;
}

// ------------------------------------------------------------------------------------------------
// Element types.
// ------------------------------------------------------------------------------------------------

template <class T>
LA_DEVICE T from_float(float x);
template <>
LA_DEVICE float from_float<float>(float x) {
    return x;
}
template <>
LA_DEVICE bf16_t from_float<bf16_t>(float x) {
    return bf16_from_float(x);
}
template <>
LA_DEVICE f16_t from_float<f16_t>(float x) {
    return f16_from_float(x);
}

template <class T>
struct ElemTraits;
template <>
struct ElemTraits<bf16_t> {
    static constexpr bool is_16bit = true;
    LA_DEVICE static u32 pack2(float lo, float hi) { return pack2_bf16(lo, hi); }
    LA_DEVICE static float lo_of(u32 r) { return to_float(bf16_t{(u16)(r & 0xffffu)}); }
    LA_DEVICE static float hi_of(u32 r) { return to_float(bf16_t{(u16)(r >> 16)}); }
    LA_DEVICE static void mma(float c[4], const u32 a[4], const u32 b[2]) { mma_bf16_16816(c, a, b); }
};
template <>
struct ElemTraits<f16_t> {
    static constexpr bool is_16bit = true;
    LA_DEVICE static u32 pack2(float lo, float hi) { return pack2_f16(lo, hi); }
    LA_DEVICE static float lo_of(u32 r) { return to_float(f16_t{(u16)(r & 0xffffu)}); }
    LA_DEVICE static float hi_of(u32 r) { return to_float(f16_t{(u16)(r >> 16)}); }
    LA_DEVICE static void mma(float c[4], const u32 a[4], const u32 b[2]) { mma_f16_16816(c, a, b); }
};
template <>
struct ElemTraits<float> {
    static constexpr bool is_16bit = false;
};

// Selected by the host through -DLA_DTYPE=0|1|2.
#ifndef LA_DTYPE
#define LA_DTYPE 0
#endif
#if LA_DTYPE == 0
typedef bf16_t T;
#elif LA_DTYPE == 1
typedef f16_t T;
#else
typedef float T;
#endif

// Elements of padding added to every shared-memory row: 16 bytes. For 16-bit tiles this makes the
// 8 row addresses of an ldmatrix hit 8 distinct 16-byte bank groups; for f32 tiles read as float2 in
// fragment order it spreads rows over distinct banks within each half warp.
template <class E>
struct SmemPad {
    static constexpr int value = 16 / (int)sizeof(E);
};

// ------------------------------------------------------------------------------------------------
// Fragments. For 16-bit types a fragment is the mma register set; for f32 it holds the same matrix
// elements as plain floats (x[2i], x[2i+1] correspond to register i) and the "mma" is an exact f32
// emulation through warp shuffles. All kernel code is written once against these.
// ------------------------------------------------------------------------------------------------

template <class E, bool SIXTEEN = ElemTraits<E>::is_16bit>
struct FragA {
    u32 x[4];
};
template <class E>
struct FragA<E, false> {
    float x[8];
};
template <class E, bool SIXTEEN = ElemTraits<E>::is_16bit>
struct FragB {
    u32 x[2];
};
template <class E>
struct FragB<E, false> {
    float x[4];
};

// Whether a 16-bit operand computed in f32 is also carried as a residual `lo = x - round(x)`:
// products then take three mma (hi*hi + lo*hi + hi*lo), which keeps about 16 significant bits of
// the transformed operands (decayed q/k, f32 states, A and dA) instead of bf16's 8.
template <class E>
struct Split {
    static constexpr bool value = ElemTraits<E>::is_16bit;
};

LA_DEVICE int frag_gid() { return lane_id() >> 2; }
LA_DEVICE int frag_tig() { return lane_id() & 3; }

// c += a * b on one 16x8x16 tile.
template <class E>
LA_DEVICE void mma(float c[4], const FragA<E, true>& a, const FragB<E, true>& b) {
    ElemTraits<E>::mma(c, a.x, b.x);
}

// Exact f32 16x8x16 product via shuffles: row gid's A elements are spread over the 4 lanes of the
// quad 4*gid..4*gid+3; column n's B elements over lanes 4*n..4*n+3.
template <class E>
LA_DEVICE void mma(float c[4], const FragA<E, false>& a, const FragB<E, false>& b) {
    const int gid = frag_gid(), tig = frag_tig();
    #pragma unroll
    for (int src = 0; src < 4; ++src) {
        // k indices held by lane tig == src: 2src, 2src+1, 2src+8, 2src+9.
        const int la = gid * 4 + src;
        float a0[4], a8[4];
        a0[0] = shfl(a.x[0], la);
        a0[1] = shfl(a.x[1], la);
        a8[0] = shfl(a.x[2], la);
        a8[1] = shfl(a.x[3], la);
        a0[2] = shfl(a.x[4], la);
        a0[3] = shfl(a.x[5], la);
        a8[2] = shfl(a.x[6], la);
        a8[3] = shfl(a.x[7], la);
        const int lb0 = (2 * tig) * 4 + src, lb1 = (2 * tig + 1) * 4 + src;
        float b0[4], b1[4];
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            b0[i] = shfl(b.x[i], lb0);
            b1[i] = shfl(b.x[i], lb1);
        }
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            c[0] = fmaf(a0[i], b0[i], c[0]);
            c[1] = fmaf(a0[i], b1[i], c[1]);
            c[2] = fmaf(a8[i], b0[i], c[2]);
            c[3] = fmaf(a8[i], b1[i], c[3]);
        }
    }
}

// Packs 8 fragment-ordered values into an A fragment (and its residual when `lo` is given).
template <class E>
LA_DEVICE void pack_a(FragA<E, true>& hi, FragA<E, true>* lo, const float v[8]) {
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        hi.x[i] = ElemTraits<E>::pack2(v[2 * i], v[2 * i + 1]);
        if (lo) {
            const float r0 = v[2 * i] - ElemTraits<E>::lo_of(hi.x[i]);
            const float r1 = v[2 * i + 1] - ElemTraits<E>::hi_of(hi.x[i]);
            lo->x[i] = ElemTraits<E>::pack2(r0, r1);
        }
    }
}
template <class E>
LA_DEVICE void pack_a(FragA<E, false>& hi, FragA<E, false>*, const float v[8]) {
    #pragma unroll
    for (int i = 0; i < 8; ++i) hi.x[i] = v[i];
}
template <class E>
LA_DEVICE void pack_b(FragB<E, true>& hi, FragB<E, true>* lo, const float v[4]) {
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        hi.x[i] = ElemTraits<E>::pack2(v[2 * i], v[2 * i + 1]);
        if (lo) {
            const float r0 = v[2 * i] - ElemTraits<E>::lo_of(hi.x[i]);
            const float r1 = v[2 * i + 1] - ElemTraits<E>::hi_of(hi.x[i]);
            lo->x[i] = ElemTraits<E>::pack2(r0, r1);
        }
    }
}
template <class E>
LA_DEVICE void pack_b(FragB<E, false>& hi, FragB<E, false>*, const float v[4]) {
    #pragma unroll
    for (int i = 0; i < 4; ++i) hi.x[i] = v[i];
}

// A fragment of the 16x16 matrix element(m, k) = f(m, k), computed in f32 by the lane that owns it.
template <class E, class F>
LA_DEVICE void make_a(FragA<E>& hi, FragA<E>* lo, F f) {
    const int g = frag_gid(), t2 = 2 * frag_tig();
    float v[8];
    v[0] = f(g, t2);
    v[1] = f(g, t2 + 1);
    v[2] = f(g + 8, t2);
    v[3] = f(g + 8, t2 + 1);
    v[4] = f(g, t2 + 8);
    v[5] = f(g, t2 + 9);
    v[6] = f(g + 8, t2 + 8);
    v[7] = f(g + 8, t2 + 9);
    pack_a<E>(hi, lo, v);
}

// B fragment of the 16x8 matrix element(k, n) = f(k, n).
template <class E, class F>
LA_DEVICE void make_b(FragB<E>& hi, FragB<E>* lo, F f) {
    const int g = frag_gid(), t2 = 2 * frag_tig();
    float v[4];
    v[0] = f(t2, g);
    v[1] = f(t2 + 1, g);
    v[2] = f(t2 + 8, g);
    v[3] = f(t2 + 9, g);
    pack_b<E>(hi, lo, v);
}

// c += (a + alo) * (b + blo), dropping lo*lo; the residual terms only when they exist.
template <class E, bool ALO, bool BLO>
LA_DEVICE void mma_split(float c[4], const FragA<E>& a, const FragA<E>& alo, const FragB<E>& b,
                         const FragB<E>& blo) {
    mma<E>(c, a, b);
    if (ALO) mma<E>(c, alo, b);
    if (BLO) mma<E>(c, a, blo);
}

// ------------------------------------------------------------------------------------------------
// Fragments from raw shared-memory tiles (no transform). 16-bit tiles use ldmatrix; f32 tiles are
// read directly in fragment order.
// ------------------------------------------------------------------------------------------------

// A (16x16) with element (m, k) = S[m * ld + k] (TRANS = false) or S[k * ld + m] (TRANS = true).
template <class E, bool TRANS>
LA_DEVICE void load_a(FragA<E, true>& a, const E* S, int ld) {
    const int lane = lane_id();
    if (!TRANS) {
        const int row = lane & 15, col = (lane >> 4) * 8;
        ldmatrix_x4(a.x, S + row * ld + col);
    } else {
        const int row = (lane & 7) + (lane >> 4) * 8, col = ((lane >> 3) & 1) * 8;
        ldmatrix_x4_trans(a.x, S + row * ld + col);
    }
}
template <class E, bool TRANS>
LA_DEVICE void load_a(FragA<E, false>& a, const E* S, int ld) {
    make_a<E>(a, (FragA<E>*)nullptr,
              [&](int m, int k) { return to_float(TRANS ? S[k * ld + m] : S[m * ld + k]); });
}

// Two adjacent B tiles (16x16 = n 0..7 and 8..15) with element (k, n) = S[k * ld + n] (KMAJOR) or
// S[n * ld + k].
template <class E, bool KMAJOR>
LA_DEVICE void load_b2(FragB<E, true>& b0, FragB<E, true>& b1, const E* S, int ld) {
    const int lane = lane_id();
    u32 r[4];
    if (KMAJOR) {
        const int row = (lane & 7) + ((lane >> 3) & 1) * 8, col = (lane >> 4) * 8;
        ldmatrix_x4_trans(r, S + row * ld + col);
    } else {
        const int row = (lane & 7) + (lane >> 4) * 8, col = ((lane >> 3) & 1) * 8;
        ldmatrix_x4(r, S + row * ld + col);
    }
    b0.x[0] = r[0];
    b0.x[1] = r[1];
    b1.x[0] = r[2];
    b1.x[1] = r[3];
}
template <class E, bool KMAJOR>
LA_DEVICE void load_b2(FragB<E, false>& b0, FragB<E, false>& b1, const E* S, int ld) {
    make_b<E>(b0, (FragB<E>*)nullptr,
              [&](int k, int n) { return to_float(KMAJOR ? S[k * ld + n] : S[n * ld + k]); });
    make_b<E>(b1, (FragB<E>*)nullptr, [&](int k, int n) {
        return to_float(KMAJOR ? S[k * ld + n + 8] : S[(n + 8) * ld + k]);
    });
}

// ------------------------------------------------------------------------------------------------
// Cooperative tile staging: global (any element type) -> shared (any element type).
// ------------------------------------------------------------------------------------------------

template <class Src>
LA_DEVICE bool aligned16(const Src* p) {
    return (((u64)p) & 15u) == 0;
}

// Loads elements [col, col + 8) of a row as f32; columns >= ncols read as 0. `vec` allows one
// 16-byte (or two, for f32) vector load when the 8 elements are all in range.
LA_DEVICE void load8(float out[8], const float* row, int col, int ncols, bool vec) {
    if (vec && col + 8 <= ncols) {
        const float4 a = *reinterpret_cast<const float4*>(row + col);
        const float4 b = *reinterpret_cast<const float4*>(row + col + 4);
        out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
        out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    } else {
        #pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = (col + i < ncols) ? row[col + i] : 0.0f;
    }
}
template <class S16>
LA_DEVICE void load8(float out[8], const S16* row, int col, int ncols, bool vec) {
    if (vec && col + 8 <= ncols) {
        const uint4 a = *reinterpret_cast<const uint4*>(row + col);
        const u32 w[4] = {a.x, a.y, a.z, a.w};
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            out[2 * i] = to_float(S16{(u16)(w[i] & 0xffffu)});
            out[2 * i + 1] = to_float(S16{(u16)(w[i] >> 16)});
        }
    } else {
        #pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = (col + i < ncols) ? to_float(row[col + i]) : 0.0f;
    }
}

// Stores 8 f32 values at dst[0..8) (16-byte aligned) as element type Dst.
LA_DEVICE void store8(float* dst, const float v[8]) {
    *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(dst + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
template <class D16>
LA_DEVICE void store8(D16* dst, const float v[8]) {
    u32 w[4];
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        w[i] = (u32)from_float<D16>(v[2 * i]).bits | ((u32)from_float<D16>(v[2 * i + 1]).bits << 16);
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
}

// Stages a ROWS x COLS tile (COLS a multiple of 8) into shared memory `dst` (row stride `ld`).
// `row_ptr(r)` returns the address of global column 0 of tile row r, or nullptr for a row outside
// the data (stored as zeros); columns col0 + c >= ncols are stored as zeros. `xf(r, c, x)`
// transforms each loaded f32 value before the store (identity for plain copies). `vec` says that
// every row pointer plus col0 is 16-byte aligned and the row length is a multiple of 8.
template <int ROWS, int COLS, int NTHREADS, class Src, class Dst, class RowPtr, class Xf>
LA_DEVICE void stage_tile(Dst* dst, int ld, RowPtr row_ptr, int col0, int ncols, bool vec, Xf xf) {
    constexpr int GROUPS = ROWS * (COLS / 8);
    for (int i = threadIdx.x; i < GROUPS; i += NTHREADS) {
        const int r = i / (COLS / 8);
        const int c = (i % (COLS / 8)) * 8;
        const Src* row = row_ptr(r);
        float v[8];
        if (row) {
            load8(v, row, col0 + c, ncols, vec);
        } else {
            #pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = 0.0f;
        }
        #pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = xf(r, c + j, v[j]);
        store8(dst + r * ld + c, v);
    }
}

struct Identity {
    LA_DEVICE float operator()(int, int, float x) const { return x; }
};

// Issues the asynchronous copy of a ROWS x COLS tile of E (raw bytes, no conversion) into shared
// memory `dst` (row stride `ld`): row r from `row_ptr(r)` (column 0 of the tile) or zeros for
// nullptr; columns col0 + c >= ncols zero-filled. Preconditions (the callers' `vec` test): every
// row pointer + col0 is 16-byte aligned and the row length is a multiple of 16 bytes. `any` is a
// valid global address used as the (unread) source of fully zero-filled chunks.
template <int ROWS, int COLS, int NTHREADS, class E, class RowPtr>
LA_DEVICE void stage_tile_async(E* dst, int ld, RowPtr row_ptr, int col0, int ncols, const E* any) {
    constexpr int PER = 16 / (int)sizeof(E);
    constexpr int CHUNKS = ROWS * (COLS / PER);
    for (int i = threadIdx.x; i < CHUNKS; i += NTHREADS) {
        const int r = i / (COLS / PER);
        const int c = (i % (COLS / PER)) * PER;
        const E* row = row_ptr(r);
        int valid = row ? ncols - (col0 + c) : 0;
        valid = valid < 0 ? 0 : (valid > PER ? PER : valid);
        cp_async16(dst + r * ld + c, valid > 0 ? (const void*)(row + col0 + c) : (const void*)any,
                   valid * (int)sizeof(E));
    }
}

// Bytes of a shared tile of ROWS x COLS elements of E with the standard row padding, rounded up
// to 16 bytes.
template <class E, int ROWS, int COLS>
struct TileBytes {
    static constexpr int ld = COLS + SmemPad<E>::value;
    static constexpr int value = ((ROWS * ld * (int)sizeof(E)) + 15) / 16 * 16;
};

// Accumulator tile of one warp: MT x NT tiles of 16x8.
template <int MT, int NT>
struct Acc {
    float c[MT][NT][4];
    LA_DEVICE void zero() {
        #pragma unroll
        for (int i = 0; i < MT; ++i)
            #pragma unroll
            for (int j = 0; j < NT; ++j)
                #pragma unroll
                for (int e = 0; e < 4; ++e) c[i][j][e] = 0.0f;
    }
};

// Visits the accumulator elements a lane owns: f(mt, nt, e, row, col) with row in [0, 16 MT) and
// col in [0, 8 NT) relative to the warp tile origin.
template <int MT, int NT, class F>
LA_DEVICE void for_each_acc(F f) {
    const int g = frag_gid(), t2 = 2 * frag_tig();
    #pragma unroll
    for (int i = 0; i < MT; ++i)
        #pragma unroll
        for (int j = 0; j < NT; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) f(i, j, e, 16 * i + g + (e >> 1) * 8, 8 * j + t2 + (e & 1));
}
