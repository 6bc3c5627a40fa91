// gelu_cpu.cpp: the exact GELU (Hendrycks & Gimpel, arXiv:1606.08415), as PyTorch's nn.GELU():
//
//   forward   gelu(x)     = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
//   backward  d gelu / dx = Phi(x) + x phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//
// Elementwise, with std::erf and OpenMP threads. Specification: gelu_forward_ref and
// gelu_backward_ref in tinydiff/kernels.py (NumPy has no erf, so the reference fits one).
// One version.
//
// Test:      python -m pytest tests/test_kernels_cpu.py -q -k gelu
#include <cmath>

#include "kernels_cpu.h"

namespace td {

constexpr int64_t PARALLEL_MIN_ELEMENTS = int64_t(1) << 14;   // fewer: one thread (no team start-up)

template <typename T>
void gelu_forward_cpu(T* out, const T* x, int64_t n) {
    const T inv_sqrt2 = T(0.70710678118654752440);
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN_ELEMENTS)
    for (int64_t i = 0; i < n; ++i) out[i] = T(0.5) * x[i] * (T(1) + std::erf(x[i] * inv_sqrt2));
}

template <typename T>
void gelu_backward_cpu(T* dx, const T* dout, const T* x, int64_t n) {
    const T inv_sqrt2 = T(0.70710678118654752440), inv_sqrt_2pi = T(0.39894228040143267794);
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN_ELEMENTS)
    for (int64_t i = 0; i < n; ++i) {
        const T cdf = T(0.5) * (T(1) + std::erf(x[i] * inv_sqrt2));     // Phi(x)
        const T pdf = std::exp(T(-0.5) * x[i] * x[i]) * inv_sqrt_2pi;   // phi(x)
        dx[i] = dout[i] * (cdf + x[i] * pdf);
    }
}

template void gelu_forward_cpu<float>(float*, const float*, int64_t);
template void gelu_forward_cpu<double>(double*, const double*, int64_t);
template void gelu_backward_cpu<float>(float*, const float*, const float*, int64_t);
template void gelu_backward_cpu<double>(double*, const double*, const double*, int64_t);

}  // namespace td
