// gelu_cpu.cpp: the exact GELU (Hendrycks & Gimpel, arXiv:1606.08415), as PyTorch's nn.GELU():
//
//   forward   gelu(x)     = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
//   backward  d gelu / dx = Phi(x) + x phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//
// float64: std::erf and std::exp, element by element, on OpenMP threads.
// float32: std::erf and std::exp are not vectorised, and at ~7 ns an element the ContextUnet's
// GELUs would cost as much as its convolutions. So erf(t) and exp(-t^2) are evaluated, in double,
// by polynomials on [0, 4] that interpolate std::erf and std::exp at 19 Chebyshev nodes (computed
// once, below): error < 5e-9, far below float32 rounding, and the loop vectorises.
// The NumPy reference fits its erf the same way (kernels.py, a longer series for float64).
// Specification: gelu_forward_ref and gelu_backward_ref in tinydiff/kernels.py. One version.
//
// Test:      python -m pytest tests/test_kernels_cpu.py -q -k gelu
// Benchmark: python benchmarks/bench_steps.py
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernels_cpu.h"

namespace td {

constexpr int64_t PARALLEL_MIN_ELEMENTS = int64_t(1) << 14;   // fewer: one thread (no team start-up)
constexpr double INV_SQRT2 = 0.70710678118654752440, INV_SQRT_2PI = 0.39894228040143267794;
constexpr double PI = 3.14159265358979323846;

// f(t) ~ sum_k c[k] T_k(u), u = 2 t / TOP - 1, for t in [0, TOP]: the polynomial of degree DEG that
// interpolates f at the DEG + 1 Chebyshev nodes (Trefethen, Approximation Theory and Approximation
// Practice, ch. 3-4). It is then rewritten in powers of u, p(u) = sum_k a[k] u^k, for Horner's rule:
// one FMA per degree, in double, whose rounding (~1e-16 times the largest a[k], ~1e4) is harmless.
constexpr int CHEB_DEG = 18;
constexpr double CHEB_TOP = 4.0;       // erf(4) = 1 - 1.5e-8 and exp(-16) = 1.1e-7: constant beyond

struct Chebyshev {
    double a[CHEB_DEG + 1] = {};       // p(u) = sum_k a[k] u^k
    template <typename F>
    explicit Chebyshev(F f) {
        const int n = CHEB_DEG + 1;
        double c[CHEB_DEG + 1] = {};                        // Chebyshev coefficients
        for (int j = 0; j < n; ++j) {
            const double theta = PI * (j + 0.5) / n, fj = f((std::cos(theta) + 1) / 2 * CHEB_TOP);
            for (int k = 0; k < n; ++k) c[k] += (k == 0 ? 1.0 : 2.0) / n * fj * std::cos(k * theta);
        }
        double t_prev[CHEB_DEG + 1] = {1}, t_cur[CHEB_DEG + 1] = {0, 1};   // T_0, T_1 in powers of u
        a[0] = c[0];
        for (int k = 1; k < n; ++k) {
            for (int i = 0; i < n; ++i) a[i] += c[k] * t_cur[i];
            double t_next[CHEB_DEG + 1] = {};               // T_{k+1} = 2 u T_k - T_{k-1}
            for (int i = 0; i < n; ++i) t_next[i] = (i > 0 ? 2 * t_cur[i - 1] : 0) - t_prev[i];
            std::copy(t_cur, t_cur + n, t_prev);
            std::copy(t_next, t_next + n, t_cur);
        }
    }
};

inline double horner(const double* a, double t) {             // p(u) at u = 2 t / TOP - 1
    const double u = t * (2 / CHEB_TOP) - 1;
    double p = a[CHEB_DEG];
#pragma GCC unroll 32
    for (int k = CHEB_DEG - 1; k >= 0; --k) p = p * u + a[k];
    return p;
}

static const Chebyshev& erf_series() {
    static const Chebyshev series([](double t) { return std::erf(t); });
    return series;
}

static const Chebyshev& gauss_series() {                       // exp(-t^2)
    static const Chebyshev series([](double t) { return std::exp(-t * t); });
    return series;
}

template <typename T>
void gelu_forward_cpu(T* out, const T* x, int64_t n) {
    if constexpr (std::is_same_v<T, float>) {
        double c[CHEB_DEG + 1];
        std::copy(erf_series().a, erf_series().a + CHEB_DEG + 1, c);
#pragma omp parallel for simd schedule(static) if (n >= PARALLEL_MIN_ELEMENTS)
        for (int64_t i = 0; i < n; ++i) {
            const double xi = x[i], t = std::min(std::fabs(xi) * INV_SQRT2, CHEB_TOP);
            const double erf = std::copysign(horner(c, t), xi);       // erf(x / sqrt 2)
            out[i] = float(0.5 * xi * (1 + erf));
        }
    } else {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN_ELEMENTS)
        for (int64_t i = 0; i < n; ++i) out[i] = T(0.5) * x[i] * (T(1) + std::erf(x[i] * T(INV_SQRT2)));
    }
}

template <typename T>
void gelu_backward_cpu(T* dx, const T* dout, const T* x, int64_t n) {
    if constexpr (std::is_same_v<T, float>) {
        double ce[CHEB_DEG + 1], cg[CHEB_DEG + 1];
        std::copy(erf_series().a, erf_series().a + CHEB_DEG + 1, ce);
        std::copy(gauss_series().a, gauss_series().a + CHEB_DEG + 1, cg);
#pragma omp parallel for simd schedule(static) if (n >= PARALLEL_MIN_ELEMENTS)
        for (int64_t i = 0; i < n; ++i) {
            const double xi = x[i], t = std::min(std::fabs(xi) * INV_SQRT2, CHEB_TOP);
            const double cdf = 0.5 * (1 + std::copysign(horner(ce, t), xi));                  // Phi(x)
            const double pdf = (t < CHEB_TOP) * horner(cg, t) * INV_SQRT_2PI;                 // phi(x)
            dx[i] = float(dout[i] * (cdf + xi * pdf));
        }
    } else {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN_ELEMENTS)
        for (int64_t i = 0; i < n; ++i) {
            const T cdf = T(0.5) * (T(1) + std::erf(x[i] * T(INV_SQRT2)));     // Phi(x)
            const T pdf = std::exp(T(-0.5) * x[i] * x[i]) * T(INV_SQRT_2PI);   // phi(x)
            dx[i] = dout[i] * (cdf + x[i] * pdf);
        }
    }
}

template void gelu_forward_cpu<float>(float*, const float*, int64_t);
template void gelu_forward_cpu<double>(double*, const double*, int64_t);
template void gelu_backward_cpu<float>(float*, const float*, const float*, int64_t);
template void gelu_backward_cpu<double>(double*, const double*, const double*, int64_t);

}  // namespace td
