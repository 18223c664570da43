// Host emulation of the hardware-primitive section of kernels/common.cuh (same function names and
// semantics, in portable C++). Warp collectives (shuffles, ldmatrix, mma.sync) exchange the lanes'
// operands through la_emu_warp_exchange and compute each lane's share exactly as the PTX ISA
// defines it; conversions round to nearest even like cvt.rn; ex2.approx.ftz is exp2 with
// subnormal results flushed to zero.
#pragma once

static inline float la_bits_to_float(u32 x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
static inline u32 la_float_to_bits(float f) {
    u32 x;
    std::memcpy(&x, &f, 4);
    return x;
}

LA_DEVICE float to_float(float x) { return x; }
LA_DEVICE float to_float(bf16_t x) { return la_bits_to_float(((u32)x.bits) << 16); }
LA_DEVICE float to_float(f16_t x) {
    _Float16 h;
    std::memcpy(&h, &x.bits, 2);
    return (float)h;
}

LA_DEVICE bf16_t bf16_from_float(float x) {
    u32 b = la_float_to_bits(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return bf16_t{(u16)((b >> 16) | 0x40)};  // quiet NaN
    b += 0x7fffu + ((b >> 16) & 1u);
    return bf16_t{(u16)(b >> 16)};
}
LA_DEVICE f16_t f16_from_float(float x) {
    const _Float16 h = (_Float16)x;  // IEEE round to nearest even
    f16_t r;
    std::memcpy(&r.bits, &h, 2);
    return r;
}
LA_DEVICE u32 pack2_bf16(float lo, float hi) {
    return (u32)bf16_from_float(lo).bits | ((u32)bf16_from_float(hi).bits << 16);
}
LA_DEVICE u32 pack2_f16(float lo, float hi) {
    return (u32)f16_from_float(lo).bits | ((u32)f16_from_float(hi).bits << 16);
}

LA_DEVICE float fast_exp2(float x) {
    const float r = std::exp2(x);
    return (r < 1.17549435e-38f) ? 0.0f : r;
}

// cp.async: the runtime queues each thread's copies and performs them only when a
// cp.async.wait_group releases their group, so a kernel that reads a destination before waiting,
// or reuses a buffer with copies still pending, computes wrong results in the emulation too.
LA_DEVICE void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
    la_emu_cp_async(smem_dst, gmem_src, src_bytes, 16);
}
// `valid == false`: nothing is read, the destination is zero-filled (src-size 0).
LA_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
    la_emu_cp_async(smem_dst, gmem_src, valid ? 16 : 0, 16);
}
LA_DEVICE void cp_async_4(void* smem_dst, const void* gmem_src, bool valid) {
    la_emu_cp_async(smem_dst, gmem_src, valid ? 4 : 0, 4);
}
LA_DEVICE void cp_async_commit() { la_emu_cp_commit(); }
template <int N>
LA_DEVICE void cp_async_wait() {
    la_emu_cp_wait(N);
}

LA_DEVICE void block_sync() { la_emu_block_barrier(); }
LA_DEVICE int lane_id() { return (int)(threadIdx.x & 31u); }
LA_DEVICE int warp_id() { return (int)(threadIdx.x >> 5); }
LA_DEVICE void atomic_add(float* p, float x) { *p += x; }  // one OS thread: no race
LA_DEVICE void atomic_or(unsigned* p, unsigned x) { *p |= x; }

LA_DEVICE float shfl(float x, int src_lane) {
    const unsigned char* all = la_emu_warp_exchange(&x, 4);
    float r;
    std::memcpy(&r, all + 4 * (src_lane & 31), 4);
    return r;
}
LA_DEVICE float shfl_xor(float x, int mask) { return shfl(x, lane_id() ^ mask); }

static inline u16 la_load_u16(const void* p) {
    u16 v;
    std::memcpy(&v, p, 2);
    return v;
}

// ldmatrix .x4: lanes 8i..8i+7 address the rows of matrix i.
LA_DEVICE void ldmatrix_x4(u32 r[4], const void* row_ptr) {
    const unsigned char* all = la_emu_warp_exchange(&row_ptr, (int)sizeof(void*));
    const int lane = lane_id();
    for (int i = 0; i < 4; ++i) {
        const unsigned char* row;
        std::memcpy(&row, all + sizeof(void*) * (8 * i + lane / 4), sizeof(void*));
        const int col = 2 * (lane % 4);
        r[i] = (u32)la_load_u16(row + 2 * col) | ((u32)la_load_u16(row + 2 * (col + 1)) << 16);
    }
}
// .trans: lane receives (row 2(lane%4) and 2(lane%4)+1, column lane/4) of each matrix.
LA_DEVICE void ldmatrix_x4_trans(u32 r[4], const void* row_ptr) {
    const unsigned char* all = la_emu_warp_exchange(&row_ptr, (int)sizeof(void*));
    const int lane = lane_id();
    for (int i = 0; i < 4; ++i) {
        const unsigned char *r0, *r1;
        std::memcpy(&r0, all + sizeof(void*) * (8 * i + 2 * (lane % 4)), sizeof(void*));
        std::memcpy(&r1, all + sizeof(void*) * (8 * i + 2 * (lane % 4) + 1), sizeof(void*));
        const int col = lane / 4;
        r[i] = (u32)la_load_u16(r0 + 2 * col) | ((u32)la_load_u16(r1 + 2 * col) << 16);
    }
}

// mma.sync m16n8k16 row.col with f32 accumulation; products of 16-bit values are exact in f32.
template <class S16>
static inline void la_emu_mma(float c[4], const u32 a[4], const u32 b[2]) {
    u32 mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    const unsigned char* all = la_emu_warp_exchange(mine, 24);
    auto reg = [&](int lane, int i) {
        u32 v;
        std::memcpy(&v, all + 24 * lane + 4 * i, 4);
        return v;
    };
    auto half = [](u32 r, int hi) { return to_float(S16{(u16)(hi ? (r >> 16) : (r & 0xffffu))}); };
    // A(m, k): lane 4*(m%8) + (k%8)/2, register (m/8) + 2*(k/8), half k%2.
    auto A = [&](int m, int k) { return half(reg(4 * (m % 8) + (k % 8) / 2, (m / 8) + 2 * (k / 8)), k % 2); };
    // B(k, n): lane 4*n + (k%8)/2, register 4 + k/8, half k%2.
    auto B = [&](int k, int n) { return half(reg(4 * n + (k % 8) / 2, 4 + k / 8), k % 2); };
    const int g = lane_id() / 4, t2 = 2 * (lane_id() % 4);
    for (int e = 0; e < 4; ++e) {
        const int m = g + 8 * (e / 2), n = t2 + (e % 2);
        float s = 0.0f;
        for (int k = 0; k < 16; ++k) s = std::fma(A(m, k), B(k, n), s);
        c[e] += s;
    }
}
LA_DEVICE void mma_bf16_16816(float c[4], const u32 a[4], const u32 b[2]) { la_emu_mma<bf16_t>(c, a, b); }
LA_DEVICE void mma_f16_16816(float c[4], const u32 a[4], const u32 b[2]) { la_emu_mma<f16_t>(c, a, b); }

using std::fmaf;
