// philox.cu: the counter-based random numbers of tinydiff.philox.Philox, on the GPU.
//
// What it computes, as philox_uint32_ref / philox_normal_ref in tinydiff/kernels.py and
// philox_cpu.cpp (the equations are in csrc/philox_math.h, shared by both): n consecutive words
// of the Philox-4x32-10 stream of `key` from its word `counter` on, as uint32 or as standard
// normals by Box-Muller, computed in double (CUDA's log, sqrt, cos, sin) and rounded to T.
// The output depends only on (key, counter, n), not on the launch shape: the same numbers as the
// C++ kernel, so a run draws the same noise on either device.
//
// Versions (one):
//   kernel1  one thread per block of the stream (four words), in a grid-stride loop: it computes
//            the block and writes the lanes that fall inside the draw.
//
// Compile alone:  nvcc -c -O3 -std=c++17 -Icsrc -arch=sm_80 csrc/philox.cu -o /tmp/philox.o
// Test:           pytest tests/test_philox.py
// Benchmark:      python benchmarks/bench_gpu.py --only philox
#include <algorithm>

#include "cuda_check.h"
#include "kernels_cuda.h"
#include "philox_math.h"

namespace {

const int THREADS = 256;

// The stream's start as the block that holds it and the lanes of that block before it
struct PhiloxStart {
    philox::U128 first;      // counter / 4
    int skip;                // counter % 4
    uint32_t k0, k1;
};

PhiloxStart philox_start(const uint32_t key[2], const uint32_t counter[4]) {
    const philox::U128 start = philox::from_words(counter);
    return PhiloxStart{{(start.lo >> 2) | (start.hi << 62), start.hi >> 2}, int(start.lo & 3), key[0], key[1]};
}

__global__ void philox_uint32_kernel1(uint32_t* out, PhiloxStart s, long long n, long long blocks) {
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < blocks; j += (long long)gridDim.x * blockDim.x) {
        uint32_t w[4];
        philox::stream_block(w, philox::add(s.first, (uint64_t)j), s.k0, s.k1);
        const long long first = 4 * j - s.skip;      // the output index of lane 0
        for (int l = 0; l < 4; ++l)
            if (first + l >= 0 && first + l < n) out[first + l] = w[l];
    }
}

template <typename T>
__global__ void philox_normal_kernel1(T* out, PhiloxStart s, long long n, long long blocks) {
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < blocks; j += (long long)gridDim.x * blockDim.x) {
        uint32_t w[4];
        philox::stream_block(w, philox::add(s.first, (uint64_t)j), s.k0, s.k1);
        double z[4];
        philox::box_muller(z[0], z[1], w[0], w[1]);
        philox::box_muller(z[2], z[3], w[2], w[3]);
        const long long first = 4 * j - s.skip;
        for (int l = 0; l < 4; ++l)
            if (first + l >= 0 && first + l < n) out[first + l] = T(z[l]);
    }
}

long long philox_stream_blocks(const PhiloxStart& s, long long n) { return (s.skip + n + 3) / 4; }

// One thread per block of the stream, up to 2^20 thread blocks; the grid-stride loop takes the rest
int philox_grid(long long blocks) { return (int)std::max<long long>(1, std::min<long long>((blocks + THREADS - 1) / THREADS, 1 << 20)); }

}  // namespace

void philox_uint32_cuda(uint32_t* out, const uint32_t key[2], const uint32_t counter[4], long long n, cudaStream_t stream) {
    if (n == 0) return;
    const PhiloxStart s = philox_start(key, counter);
    const long long blocks = philox_stream_blocks(s, n);
    philox_uint32_kernel1<<<philox_grid(blocks), THREADS, 0, stream>>>(out, s, n, blocks);
    CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void philox_normal_cuda(T* out, const uint32_t key[2], const uint32_t counter[4], long long n, cudaStream_t stream) {
    if (n == 0) return;
    const PhiloxStart s = philox_start(key, counter);
    const long long blocks = philox_stream_blocks(s, n);
    philox_normal_kernel1<T><<<philox_grid(blocks), THREADS, 0, stream>>>(out, s, n, blocks);
    CUDA_CHECK(cudaGetLastError());
}

template void philox_normal_cuda<float>(float*, const uint32_t*, const uint32_t*, long long, cudaStream_t);
template void philox_normal_cuda<double>(double*, const uint32_t*, const uint32_t*, long long, cudaStream_t);
