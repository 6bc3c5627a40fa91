// gelu.cu: the exact GELU activation on the GPU, forward and backward.
//
// What it computes, as gelu_forward_ref / gelu_backward_ref in tinydiff/kernels.py (the erf form,
// PyTorch's default nn.GELU(); Hendrycks & Gimpel, arXiv:1606.08415):
//   forward:  gelu(x) = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
//   backward: dx = dout (Phi(x) + x phi(x)),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
// erf and exp are CUDA's (erff/expf in float32, erf/exp in float64).
//
// Versions: one, kernel1: a grid-stride loop, one element per thread per step.
//
// Compile alone:  nvcc -c -O3 -std=c++17 -Icsrc -arch=sm_80 csrc/gelu.cu -o /tmp/gelu.o
// Test:           pytest tests/test_cuda.py -k gelu
// Benchmark:      python benchmarks/bench_gpu.py --only gelu
#include <algorithm>

#include "cuda_check.h"
#include "kernels_cuda.h"

namespace {

const int THREADS = 256;

__device__ inline float erf_(float x) { return erff(x); }
__device__ inline double erf_(double x) { return erf(x); }
__device__ inline float exp_(float x) { return expf(x); }
__device__ inline double exp_(double x) { return exp(x); }

template <typename T>
__global__ void gelu_forward_kernel1(T* out, const T* x, long long n) {
    const T rsqrt2 = T(0.70710678118654752440);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = T(0.5) * x[i] * (T(1) + erf_(x[i] * rsqrt2));
}

template <typename T>
__global__ void gelu_backward_kernel1(T* dx, const T* dout, const T* x, long long n) {
    const T rsqrt2 = T(0.70710678118654752440), rsqrt_2pi = T(0.39894228040143267794);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        T cdf = T(0.5) * (T(1) + erf_(x[i] * rsqrt2));           // Phi(x)
        T pdf = exp_(T(-0.5) * x[i] * x[i]) * rsqrt_2pi;          // phi(x)
        dx[i] = dout[i] * (cdf + x[i] * pdf);
    }
}

int gelu_blocks(long long n) { return (int)std::min<long long>((n + THREADS - 1) / THREADS, 65536); }

}  // namespace

template <typename T>
void gelu_forward_cuda(T* out, const T* x, long long n, cudaStream_t stream) {
    if (n == 0) return;
    gelu_forward_kernel1<T><<<gelu_blocks(n), THREADS, 0, stream>>>(out, x, n);
    CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void gelu_backward_cuda(T* dx, const T* dout, const T* x, long long n, cudaStream_t stream) {
    if (n == 0) return;
    gelu_backward_kernel1<T><<<gelu_blocks(n), THREADS, 0, stream>>>(dx, dout, x, n);
    CUDA_CHECK(cudaGetLastError());
}

template void gelu_forward_cuda<float>(float*, const float*, long long, cudaStream_t);
template void gelu_forward_cuda<double>(double*, const double*, long long, cudaStream_t);
template void gelu_backward_cuda<float>(float*, const float*, const float*, long long, cudaStream_t);
template void gelu_backward_cuda<double>(double*, const double*, const double*, long long, cudaStream_t);
