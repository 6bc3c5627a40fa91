// emulator.h: runs the CUDA kernels of csrc/*.cu on the CPU, so that their index arithmetic is
// tested on machines without a GPU (tests/test_cuda.py, "emulated" tests).
//
// How: tests/test_cuda.py copies each .cu file, rewrites every launch `k<<<grid, block, 0, stream>>>(args)`
// as `emu::launch(k, grid, block, args)` and puts `#include "emulator.h"` on top; g++ compiles it.
// emu::launch runs the blocks one after another. The threads of a block are fibers (ucontext) in
// one OS thread: each runs until it reaches __syncthreads() or returns, then the next one runs;
// a barrier is passed when every live thread has reached it. So a missing barrier shows up as a
// wrong result: thread 0 goes on before thread 1 has written its part of shared memory.
// __shared__ becomes `static`: one copy, used by one block at a time.
// What it cannot show: warp-level behaviour, memory coalescing, register or shared-memory limits,
// launch-size limits, or anything about speed.
// Under AddressSanitizer (scripts/sanitize.sh) every switch between the scheduler's stack and a
// fiber's is announced with __sanitizer_start_switch_fiber / __sanitizer_finish_switch_fiber, so
// that ASan knows which stack is live (else it reports false stack overflows and misses real ones).
#pragma once

#include <cuda_runtime.h>   // types only (dim3, uint3, cudaStream_t); no CUDA call is made

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_START_SWITCH(save, bottom, size) __sanitizer_start_switch_fiber(save, bottom, size)
#define EMU_FINISH_SWITCH(save, bottom, size) __sanitizer_finish_switch_fiber(save, bottom, size)
#else
#define EMU_START_SWITCH(save, bottom, size) ((void)0)
#define EMU_FINISH_SWITCH(save, bottom, size) ((void)0)
#endif

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define cudaGetLastError() cudaSuccess   // launches cannot fail here, and no CUDA library is linked
#define cudaGetErrorName(err) "(emulated)"
#define cudaGetErrorString(err) "(emulated)"

using std::max;
using std::min;

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {

constexpr size_t STACK_BYTES = 128 * 1024;

inline ucontext_t scheduler;                  // where a fiber returns to at a barrier or its end
inline std::vector<ucontext_t> fibers;
inline std::vector<char> finished;
inline std::vector<std::unique_ptr<char[]>> stacks;
inline unsigned current = 0;                  // the fiber running now
inline std::function<void()> body;            // the kernel call, the same for every thread
inline const void* scheduler_stack = nullptr; // ASan: the scheduler's stack (learnt on the first switch)
inline size_t scheduler_stack_bytes = 0;
inline void* scheduler_fake_stack = nullptr;  // ASan: the scheduler's fake stack while a fiber runs

inline void fiber_main() {
    EMU_FINISH_SWITCH(nullptr, &scheduler_stack, &scheduler_stack_bytes);   // arrived on a new stack
    body();
    finished[current] = 1;                    // then back to `scheduler` through uc_link
    EMU_START_SWITCH(nullptr, scheduler_stack, scheduler_stack_bytes);      // nullptr: this fiber ends
}

inline void run_fiber(unsigned t) {           // from the scheduler into fiber t, until it yields or ends
    EMU_START_SWITCH(&scheduler_fake_stack, stacks[t].get(), STACK_BYTES);
    swapcontext(&scheduler, &fibers[t]);
    EMU_FINISH_SWITCH(scheduler_fake_stack, nullptr, nullptr);
}

inline void yield_to_scheduler() {            // from fiber `current` back to the scheduler, and on later
    void* fake_stack = nullptr;
    EMU_START_SWITCH(&fake_stack, scheduler_stack, scheduler_stack_bytes);
    swapcontext(&fibers[current], &scheduler);
    EMU_FINISH_SWITCH(fake_stack, &scheduler_stack, &scheduler_stack_bytes);
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
    const unsigned threads = block.x * block.y * block.z;
    while (stacks.size() < threads) stacks.emplace_back(new char[STACK_BYTES]);
    fibers.resize(threads);
    finished.resize(threads);
    body = [&] { kernel(args...); };
    blockDim = block;
    gridDim = grid;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = uint3{bx, by, bz};
                for (unsigned t = 0; t < threads; ++t) {
                    getcontext(&fibers[t]);
                    fibers[t].uc_stack.ss_sp = stacks[t].get();
                    fibers[t].uc_stack.ss_size = STACK_BYTES;
                    fibers[t].uc_link = &scheduler;
                    makecontext(&fibers[t], fiber_main, 0);
                    finished[t] = 0;
                }
                for (bool alive = true; alive;) {     // one round: every live thread to its next barrier
                    alive = false;
                    for (unsigned t = 0; t < threads; ++t) {
                        if (finished[t]) continue;
                        current = t;
                        threadIdx = uint3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
                        run_fiber(t);
                        alive = alive || !finished[t];
                    }
                }
            }
}

}  // namespace emu

inline void __syncthreads() { emu::yield_to_scheduler(); }
