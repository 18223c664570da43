// Host emulation runtime: runs a CUDA grid on one OS thread. Blocks run one after another; the
// threads of a block are cooperative fibers (own stacks, a hand-written x86-64 context switch, no
// system calls), resumed round-robin. A fiber runs until it reaches a barrier (__syncthreads, or
// the exchange of a warp collective) and yields; a barrier completes when every live participant
// has arrived. Everything is deterministic. Built together with one kernel translation unit into
// a shared library that src/cuda/emu.rs loads.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if !defined(__x86_64__)
#error "the linattn kernel emulation runtime supports x86-64 only"
#endif

#ifndef LA_EMU_SHIM  // (the shim, when force-included, already declares it)
struct dim3 {
    unsigned x, y, z;
};
#endif

extern "C" void la_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl la_emu_switch
    .type la_emu_switch, @function
la_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size la_emu_switch, .-la_emu_switch
)");

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kExchangeBytes = 64;  // largest warp-collective deposit per lane

enum class Wait { None, Block, Warp };

struct PendingCopy {
    void* dst;
    const void* src;
    int bytes;  // read from src; the rest of `size` is zero-filled
    int size;   // 16 (cp.async.cg) or 4 (cp.async.ca)
    unsigned long long group;
};

struct Fiber {
    std::vector<PendingCopy> copies;     // queued cp.async of this thread
    unsigned long long committed = 0;    // cp.async groups committed so far
    void* sp = nullptr;
    char* stack = nullptr;
    unsigned tid = 0;
    bool done = false;
    Wait wait = Wait::None;
    unsigned long long wait_gen = 0;
    unsigned long long collectives = 0;  // warp collectives this lane has entered
};

struct WarpState {
    int arrived = 0;
    unsigned long long gen = 0;
    // Double buffer: collective number c uses buffer c % 2. A lane can only start collective c + 2
    // after collective c + 1 completed, i.e. after every lane finished reading buffer c % 2.
    unsigned char data[2][32][kExchangeBytes];
};

struct Runtime {
    std::vector<Fiber> fibers;
    std::vector<WarpState> warps;
    void* sched_sp = nullptr;
    int current = -1;
    int live = 0;
    int block_arrived = 0;
    unsigned long long block_gen = 0;
    dim3 grid{1, 1, 1}, block{1, 1, 1}, block_idx{0, 0, 0};
    std::vector<unsigned char> smem;
    void (*kernel)(const void*) = nullptr;
    const void* params = nullptr;
    const char* error = nullptr;
};

Runtime rt;

void yield_to_scheduler() {
    Fiber& f = rt.fibers[rt.current];
    la_emu_switch(&f.sp, rt.sched_sp);
}

void fiber_main() {
    rt.kernel(rt.params);
    Fiber& f = rt.fibers[rt.current];
    f.done = true;
    rt.live -= 1;
    // A block barrier may now be complete without this thread.
    if (rt.block_arrived > 0 && rt.block_arrived == rt.live) {
        rt.block_arrived = 0;
        rt.block_gen += 1;
    }
    la_emu_switch(&f.sp, rt.sched_sp);
    std::abort();  // a finished fiber is never resumed
}

void start_fiber(Fiber& f) {
    // Fresh stack: six zero callee-saved registers, then the entry point for `ret`, then a fake
    // return address so that fiber_main starts with the ABI alignment of a called function.
    uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(&fiber_main);
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    f.sp = sp;
}

bool runnable(const Fiber& f) {
    if (f.done) return false;
    switch (f.wait) {
        case Wait::None:
            return true;
        case Wait::Block:
            return rt.block_gen != f.wait_gen;
        case Wait::Warp:
            return rt.warps[f.tid / 32].gen != f.wait_gen;
    }
    return false;
}

// Runs one block to completion. Returns false on deadlock.
bool run_block(unsigned nthreads) {
    rt.live = (int)nthreads;
    rt.block_arrived = 0;
    for (auto& w : rt.warps) {
        w.arrived = 0;
    }
    for (unsigned t = 0; t < nthreads; ++t) {
        Fiber& f = rt.fibers[t];
        f.tid = t;
        f.done = false;
        f.wait = Wait::None;
        f.collectives = 0;
        f.copies.clear();
        f.committed = 0;
        start_fiber(f);
    }
    while (rt.live > 0) {
        bool progressed = false;
        for (unsigned t = 0; t < nthreads; ++t) {
            Fiber& f = rt.fibers[t];
            if (!runnable(f)) continue;
            f.wait = Wait::None;
            rt.current = (int)t;
            la_emu_switch(&rt.sched_sp, f.sp);
            rt.current = -1;
            progressed = true;
        }
        if (!progressed) return false;
    }
    return true;
}

}  // namespace

extern "C" {

dim3 la_emu_thread_idx() { return dim3{rt.fibers[rt.current].tid, 0, 0}; }
dim3 la_emu_block_idx() { return rt.block_idx; }
dim3 la_emu_block_dim() { return rt.block; }
dim3 la_emu_grid_dim() { return rt.grid; }
unsigned char* la_emu_dynamic_smem() { return rt.smem.data(); }

void la_emu_block_barrier() {
    Fiber& f = rt.fibers[rt.current];
    f.wait = Wait::Block;
    f.wait_gen = rt.block_gen;
    rt.block_arrived += 1;
    if (rt.block_arrived == rt.live) {
        rt.block_arrived = 0;
        rt.block_gen += 1;
    }
    yield_to_scheduler();
}

const unsigned char* la_emu_warp_exchange(const void* data, int bytes) {
    Fiber& f = rt.fibers[rt.current];
    if (bytes > kExchangeBytes) {
        rt.error = "warp collective deposit too large";
        bytes = kExchangeBytes;
    }
    WarpState& w = rt.warps[f.tid / 32];
    const int buf = (int)(f.collectives % 2);
    f.collectives += 1;
    std::memcpy(w.data[buf][f.tid % 32], data, (size_t)bytes);
    f.wait = Wait::Warp;
    f.wait_gen = w.gen;
    w.arrived += 1;
    if (w.arrived == 32) {
        w.arrived = 0;
        w.gen += 1;
    }
    yield_to_scheduler();
    // Repack lane-major with `bytes` stride.
    static thread_local unsigned char out[32 * kExchangeBytes];
    for (int l = 0; l < 32; ++l) std::memcpy(out + l * bytes, w.data[buf][l], (size_t)bytes);
    return out;
}

void la_emu_cp_async(void* dst, const void* src, int src_bytes, int size) {
    Fiber& f = rt.fibers[rt.current];
    if (size != 16 && size != 4) rt.error = "cp.async of a size other than 4 or 16 bytes";
    if (src_bytes < 0 || src_bytes > size) rt.error = "cp.async with a source size outside 0..size";
    f.copies.push_back(PendingCopy{dst, src, src_bytes, size, f.committed});
}

void la_emu_cp_commit() { rt.fibers[rt.current].committed += 1; }

void la_emu_cp_wait(int n) {
    Fiber& f = rt.fibers[rt.current];
    // Groups older than the newest n committed ones complete; uncommitted copies stay queued.
    const unsigned long long limit = f.committed >= (unsigned long long)n ? f.committed - (unsigned long long)n : 0;
    std::vector<PendingCopy> keep;
    for (const PendingCopy& c : f.copies) {
        if (c.group < limit) {
            unsigned char* d = static_cast<unsigned char*>(c.dst);
            std::memcpy(d, c.src, (size_t)c.bytes);
            std::memset(d + c.bytes, 0, (size_t)(c.size - c.bytes));
        } else {
            keep.push_back(c);
        }
    }
    f.copies.swap(keep);
}

// Runs `kernel` (a kernel taking its parameter struct by reference) on a grid. `smem_bytes` of
// dynamic shared memory per block are filled with 0xff bytes (NaN as f32) before every block, so
// reads of unwritten shared memory show up. Returns 0, or 1 with a message in `err`.
int la_emu_launch(void (*kernel)(const void*), unsigned gx, unsigned gy, unsigned gz, unsigned block,
                  unsigned smem_bytes, const void* params, char* err, int err_len) {
    auto fail = [&](const char* msg) {
        std::snprintf(err, (size_t)err_len, "%s", msg);
        return 1;
    };
    if (block == 0 || block > 1024 || block % 32 != 0) return fail("block size must be a multiple of 32 in 32..1024");
    if (rt.fibers.size() < block) {
        size_t old = rt.fibers.size();
        rt.fibers.resize(block);
        for (size_t i = old; i < block; ++i) rt.fibers[i].stack = static_cast<char*>(std::malloc(kStackBytes));
    }
    rt.warps.assign(block / 32, WarpState{});
    rt.grid = dim3{gx, gy, gz};
    rt.block = dim3{block, 1, 1};
    rt.kernel = kernel;
    rt.params = params;
    rt.error = nullptr;
    rt.smem.assign((size_t)smem_bytes + 16, 0xff);
    for (unsigned z = 0; z < gz; ++z) {
        for (unsigned y = 0; y < gy; ++y) {
            for (unsigned x = 0; x < gx; ++x) {
                rt.block_idx = dim3{x, y, z};
                std::memset(rt.smem.data(), 0xff, rt.smem.size());
                if (!run_block(block)) {
                    // The stuck fibers are abandoned (their stacks are reused by the next launch).
                    char msg[160];
                    std::snprintf(msg, sizeof msg, "deadlock in block (%u, %u, %u): threads wait on barriers that cannot complete", x, y, z);
                    return fail(msg);
                }
                if (rt.error) return fail(rt.error);
            }
        }
    }
    return 0;
}

}  // extern "C"
