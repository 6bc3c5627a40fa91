// gelu.cu: the exact GELU activation on the GPU, forward and backward.
//
// What it computes, as gelu_forward_ref / gelu_backward_ref in tinydiff/kernels.py (the erf form,
// PyTorch's default nn.GELU(); Hendrycks & Gimpel, arXiv:1606.08415):
//   forward:  gelu(x) = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
//   backward: dx = dout (Phi(x) + x phi(x)),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
// erf and exp are CUDA's (erff/expf in float32, erf/exp in float64).
//
// Versions (the launchers pick one per call; both run gelu_forward_one / gelu_backward_one per
// element):
//   kernel1  a grid-stride loop, one element per thread per step. The readable version, and the
//            fallback for any array.
//   kernel2  the same loop over Packs (csrc/pack.cuh): each thread loads and stores 16 bytes per
//            array (4 floats or 2 doubles) with one instruction, four times the bytes in flight;
//            the last n % N elements (fewer than one Pack) go one each to the first threads.
//            Used when every array is 16-byte aligned; else kernel1.
//
// Compile alone:  nvcc -c -O3 -std=c++17 -Icsrc -arch=sm_80 csrc/gelu.cu -o /tmp/gelu.o
// Test:           pytest tests/test_cuda.py -k gelu
// Benchmark:      python benchmarks/bench_gpu.py --only gelu
#include <algorithm>

#include "cuda_check.h"
#include "kernels_cuda.h"
#include "pack.cuh"

namespace {

const int THREADS = 256;

__device__ inline float erf_(float x) { return erff(x); }
__device__ inline double erf_(double x) { return erf(x); }
__device__ inline float exp_(float x) { return expf(x); }
__device__ inline double exp_(double x) { return exp(x); }

// gelu(x) = 0.5 x (1 + erf(x / sqrt 2))
template <typename T>
__device__ __forceinline__ T gelu_forward_one(T x) {
    const T rsqrt2 = T(0.70710678118654752440);
    return T(0.5) * x * (T(1) + erf_(x * rsqrt2));
}

// d gelu / dx = Phi(x) + x phi(x)
template <typename T>
__device__ __forceinline__ T gelu_backward_one(T dout, T x) {
    const T rsqrt2 = T(0.70710678118654752440), rsqrt_2pi = T(0.39894228040143267794);
    T cdf = T(0.5) * (T(1) + erf_(x * rsqrt2));                  // Phi(x)
    T pdf = exp_(T(-0.5) * x * x) * rsqrt_2pi;                    // phi(x)
    return dout * (cdf + x * pdf);
}

// --- kernel1: one element per thread per step --------------------------------------------------

template <typename T>
__global__ void gelu_forward_kernel1(T* out, const T* x, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = gelu_forward_one(x[i]);
}

template <typename T>
__global__ void gelu_backward_kernel1(T* dx, const T* dout, const T* x, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dx[i] = gelu_backward_one(dout[i], x[i]);
}

// --- kernel2: one Pack (4 floats or 2 doubles) per thread per step -----------------------------
// Pack p holds elements p * N ... p * N + N - 1; the n % N elements after the last whole Pack
// are the tail, element n - n % N + tid for the threads tid < n % N.

template <typename T>
__global__ void gelu_forward_kernel2(T* out, const T* x, long long n) {
    const int N = Pack<T>::N;
    long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x, packs = n / N;
    for (long long p = tid; p < packs; p += (long long)gridDim.x * blockDim.x) {
        Pack<T> x_p = load_pack(x + p * N), out_p;
#pragma unroll
        for (int k = 0; k < N; ++k) out_p.v[k] = gelu_forward_one(x_p.v[k]);
        store_pack(out + p * N, out_p);
    }
    if (tid < n - packs * N) out[packs * N + tid] = gelu_forward_one(x[packs * N + tid]);
}

template <typename T>
__global__ void gelu_backward_kernel2(T* dx, const T* dout, const T* x, long long n) {
    const int N = Pack<T>::N;
    long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x, packs = n / N;
    for (long long p = tid; p < packs; p += (long long)gridDim.x * blockDim.x) {
        Pack<T> dout_p = load_pack(dout + p * N), x_p = load_pack(x + p * N), dx_p;
#pragma unroll
        for (int k = 0; k < N; ++k) dx_p.v[k] = gelu_backward_one(dout_p.v[k], x_p.v[k]);
        store_pack(dx + p * N, dx_p);
    }
    if (tid < n - packs * N) dx[packs * N + tid] = gelu_backward_one(dout[packs * N + tid], x[packs * N + tid]);
}

// Blocks for `items` work items (elements or Packs), one per thread; past 2^20 blocks (2^28
// threads) the grid-stride loops take the rest. At least one block, so the tail has its threads.
int gelu_blocks(long long items) { return (int)std::max<long long>(1, std::min<long long>((items + THREADS - 1) / THREADS, 1 << 20)); }

}  // namespace

template <typename T>
void gelu_forward_cuda(T* out, const T* x, long long n, cudaStream_t stream) {
    if (n == 0) return;
    if (aligned16({out, x})) {
        gelu_forward_kernel2<T><<<gelu_blocks(n / Pack<T>::N), THREADS, 0, stream>>>(out, x, n);
    } else {
        gelu_forward_kernel1<T><<<gelu_blocks(n), THREADS, 0, stream>>>(out, x, n);
    }
    CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void gelu_backward_cuda(T* dx, const T* dout, const T* x, long long n, cudaStream_t stream) {
    if (n == 0) return;
    if (aligned16({dx, dout, x})) {
        gelu_backward_kernel2<T><<<gelu_blocks(n / Pack<T>::N), THREADS, 0, stream>>>(dx, dout, x, n);
    } else {
        gelu_backward_kernel1<T><<<gelu_blocks(n), THREADS, 0, stream>>>(dx, dout, x, n);
    }
    CUDA_CHECK(cudaGetLastError());
}

template void gelu_forward_cuda<float>(float*, const float*, long long, cudaStream_t);
template void gelu_forward_cuda<double>(double*, const double*, long long, cudaStream_t);
template void gelu_backward_cuda<float>(float*, const float*, const float*, long long, cudaStream_t);
template void gelu_backward_cuda<double>(double*, const double*, const double*, long long, cudaStream_t);
