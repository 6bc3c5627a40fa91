// gelu_cpu.cpp: the exact GELU (Hendrycks & Gimpel, arXiv:1606.08415), as PyTorch's nn.GELU():
//
//   forward   gelu(x)     = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
//   backward  d gelu / dx = Phi(x) + x phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//
// float64: std::erf and std::exp, element by element, on OpenMP threads.
// float32: a vector of floats at a time, with the polynomials of gelu_math.h (erf and exp are not
// vectorised in libm: at ~7 ns an element the ContextUnet's GELUs would cost as much as its
// convolutions); within 4e-7 relative of the float64 function.
// Specification: gelu_forward_ref and gelu_backward_ref in tinydiff/kernels.py. One version.
//
// Test:      python -m pytest tests/test_kernels_cpu.py -q -k gelu
// Benchmark: python benchmarks/bench_steps.py
#include <algorithm>

#include "gelu_math.h"
#include "kernels_cpu.h"

namespace td {

constexpr int64_t PARALLEL_MIN_ELEMENTS = int64_t(1) << 14;   // fewer: one thread (no team start-up)
constexpr int64_t BLOCK = 4096;                                 // elements per OpenMP work item

// Blocks of BLOCK elements on the OpenMP threads; each is gelu_affine_* of gelu_math.h with w = 1, b = 0.
template <typename T>
void gelu_forward_cpu(T* out, const T* x, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN_ELEMENTS)
    for (int64_t b = 0; b < n; b += BLOCK) gelu_affine_forward(out + b, x + b, T(1), T(0), std::min(BLOCK, n - b));
}

template <typename T>
void gelu_backward_cpu(T* dx, const T* dout, const T* x, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN_ELEMENTS)
    for (int64_t b = 0; b < n; b += BLOCK)
        gelu_affine_backward(dx + b, dout + b, x + b, T(1), T(0), std::min(BLOCK, n - b));
}

template void gelu_forward_cpu<float>(float*, const float*, int64_t);
template void gelu_forward_cpu<double>(double*, const double*, int64_t);
template void gelu_backward_cpu<float>(float*, const float*, const float*, int64_t);
template void gelu_backward_cpu<double>(double*, const double*, const double*, int64_t);

}  // namespace td
