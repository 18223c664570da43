// Host emulation of CUDA kernels (no GPU): the CUDA C++ keywords and built-in variables the kernels
// use, for a plain C++20 compiler. Force-included (`g++ -include emu/shim.h`) before a kernel
// translation unit built with LA_EMULATION; kernels/emu/runtime.cpp runs every CUDA thread of a
// block as a cooperative fiber on one OS thread, blocks one after another.
#pragma once
#define LA_EMU_SHIM 1

#include <cmath>
#include <cstdint>
#include <cstring>

#define LA_DEVICE inline
#define LA_KERNEL(threads) extern "C" void
#define __shared__ static
#define __constant__
#define __device__
#define __forceinline__ inline
#define __restrict__

struct dim3 {
    unsigned x, y, z;
};

extern "C" {
dim3 la_emu_thread_idx();
dim3 la_emu_block_idx();
dim3 la_emu_block_dim();
dim3 la_emu_grid_dim();
unsigned char* la_emu_dynamic_smem();
// Warp-collective exchange: deposits `bytes` bytes of this lane, waits for the 32 lanes of the
// warp, and returns the 32 deposits (lane-major, `bytes` apart), valid until the lane's next
// collective.
const unsigned char* la_emu_warp_exchange(const void* data, int bytes);
void la_emu_block_barrier();
// cp.async emulation: queue a `size`-byte copy (4 or 16; first src_bytes from src, rest zero),
// close the thread's current group, perform every queued copy except those of the newest `n`
// groups.
void la_emu_cp_async(void* dst, const void* src, int src_bytes, int size);
void la_emu_cp_commit();
void la_emu_cp_wait(int n);
}

#define threadIdx (la_emu_thread_idx())
#define blockIdx (la_emu_block_idx())
#define blockDim (la_emu_block_dim())
#define gridDim (la_emu_grid_dim())
#define la_smem (la_emu_dynamic_smem())

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
