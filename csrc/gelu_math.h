// gelu_math.h: the normal distribution's cdf Phi(x) and density phi(x), a float32 vector at a time,
// for GELU (gelu_cpu.cpp) and the fused batch norm + GELU (batch_norm_cpu.cpp):
//
//   gelu(x) = x Phi(x),   gelu'(x) = Phi(x) + x phi(x),   Phi(x) = (1 + erf(x/sqrt 2)) / 2,
//   phi(x) = exp(-x^2/2) / sqrt(2 pi)
//
// With z = |x| / sqrt 2 (A&S 7.1.2, 26.2.29):
//   erfc(z) = exp(-z^2) R(t), t = 1 / (1 + z/2),   Phi(x) = 1 - erfc(z)/2 for x >= 0, erfc(z)/2 for x < 0
//   phi(x) = exp(-z^2) / sqrt(2 pi): one exponential serves both.
//   exp(-z^2) = 2^n E(r), n = round(-z^2 / ln 2), r = -z^2 - n ln 2 (Cody & Waite's two-part ln 2),
//   with z^2 = x^2/2 split exactly by an FMA (zz + err), so that its rounding does not grow with z.
// R and E are least-squares polynomials printed by scripts/fit_gelu_float32.py (within 6e-9
// relative of the double-precision functions); one formula for every z, so the loops are straight
// vector code on AVX-512, AVX2, SSE or NEON alike (GCC vector types), with no branch to pick.
#pragma once

#include <cmath>

#include "gemm_cpu.h"

namespace td {

using VecF = Vec<float>;
using VecI = LaneIndexOf<float>::type;       // int32 lanes: comparison masks and exponent bits
constexpr int LANES_F = VEC_BYTES / int(sizeof(float));

// From scripts/fit_gelu_float32.py
constexpr float GELU_Z_TOP = 9.3f;            // exp(-9.3^2) is about float's smallest normal: 0 beyond
constexpr float ERFC_R[11] = {9.820497138e-06f, 2.818143039e-01f, 2.855981604e-01f, 2.216375461e-01f,
                              2.917767144e-01f, -2.677676453e-01f, 7.102771289e-01f, -9.952728823e-01f,
                              6.606787886e-01f, -2.179019627e-01f, 2.915002290e-02f};
constexpr float EXP_E[7] = {1.000000001e+00f, 1.000000036e+00f, 4.999999149e-01f, 1.666642083e-01f,
                            4.166835803e-02f, 8.374771520e-03f, 1.382942060e-03f};

inline VecF splat(float v) { return VecF{} + v; }

template <int N>
inline VecF horner(const float (&c)[N], VecF u) {              // sum_k c[k] u^k, one FMA a degree
    VecF p = splat(c[N - 1]);
#pragma GCC unroll 16
    for (int k = N - 2; k >= 0; --k) p = p * u + c[k];
    return p;
}

template <typename V, typename W> inline V bit_cast_vec(W w) { V v; __builtin_memcpy(&v, &w, sizeof(v)); return v; }

// exp(-(zz + err)) for zz >= 0 (0 once 2^n would leave float's normal range)
inline VecF exp_neg(VecF zz, VecF err) {
    constexpr float LOG2E = 1.44269504088896341f, LN2_HI = 0.693145751953125f, LN2_LO = 1.428606765330187e-06f;
    const VecF shifter = splat(12582912.0f);                   // 1.5 * 2^23: adding it rounds to an integer
    const VecF x = -zz;
    const VecF shifted = x * LOG2E + shifter;                  // n = round(x / ln 2) in the low mantissa bits
    const VecF n = shifted - shifter;
    const VecF r = ((x - n * LN2_HI) - n * LN2_LO) - err;      // |r| <= ln(2)/2 (+ |err|, tiny)
    const VecI n_int = bit_cast_vec<VecI>(shifted) - bit_cast_vec<VecI>(shifter);
    const VecF two_n = bit_cast_vec<VecF>((n_int + 127) << 23);   // 2^n, built from its exponent bits
    const VecF e = horner(EXP_E, r) * two_n;
    return zz < splat(GELU_Z_TOP * GELU_Z_TOP) ? e : VecF{};
}

// Phi(x) and phi(x), lane by lane
inline void normal_cdf_pdf(VecF x, VecF& cdf, VecF& pdf) {
    constexpr float INV_SQRT2 = 0.70710678118654752f, INV_SQRT_2PI = 0.39894228040143268f;
    const VecF z = (x < VecF{} ? -x : x) * INV_SQRT2;          // |x| / sqrt 2
    const VecF xx = x * x, zz = xx * 0.5f, err = (x * x - xx) * 0.5f;   // z^2 = x^2/2 = zz + err exactly
    const VecF gauss = exp_neg(zz, err);                       // exp(-z^2) = exp(-x^2/2)
    const VecF t = splat(1.0f) / (z * 0.5f + 1.0f);
    const VecF half_erfc = gauss * horner(ERFC_R, t) * 0.5f;   // erfc(z) / 2 = Phi(-|x|)
    cdf = x < VecF{} ? half_erfc : splat(1.0f) - half_erfc;
    pdf = gauss * INV_SQRT_2PI;
}

// body(i, count) for the vectors of [begin, end): count = LANES_F, except a shorter last one
template <typename Body>
inline void for_each_vector(int64_t begin, int64_t end, Body body) {
    int64_t i = begin;
    for (; i + LANES_F <= end; i += LANES_F) body(i, LANES_F);
    if (i < end) body(i, int(end - i));
}

inline VecF load_vec(const float* p, int count) {              // count <= LANES_F values, zeros after
    VecF v = {};
    __builtin_memcpy(&v, p, sizeof(float) * count);
    return v;
}

inline void store_vec(float* p, VecF v, int count) { __builtin_memcpy(p, &v, sizeof(float) * count); }

// out[s] = gelu(h[s] w + b) and dy[s] = dout[s] gelu'(h[s] w + b), s < S: GELU after an affine
// map, as batch norm + GELU needs it (w = 1, b = 0: plain GELU). float: vectors; double: libm.
inline void gelu_affine_forward(float* out, const float* h, float w, float b, int64_t S) {
    for_each_vector(0, S, [&](int64_t i, int count) {
        const VecF y = load_vec(h + i, count) * w + b;
        VecF cdf, pdf;
        normal_cdf_pdf(y, cdf, pdf);
        store_vec(out + i, y * cdf, count);                                     // y Phi(y)
    });
}

inline void gelu_affine_backward(float* dy, const float* dout, const float* h, float w, float b, int64_t S) {
    for_each_vector(0, S, [&](int64_t i, int count) {
        const VecF y = load_vec(h + i, count) * w + b;
        VecF cdf, pdf;
        normal_cdf_pdf(y, cdf, pdf);
        store_vec(dy + i, load_vec(dout + i, count) * (cdf + y * pdf), count);  // Phi(y) + y phi(y)
    });
}

inline void gelu_affine_forward(double* out, const double* h, double w, double b, int64_t S) {
    constexpr double INV_SQRT2 = 0.70710678118654752440;
    for (int64_t i = 0; i < S; ++i) {
        const double y = h[i] * w + b;
        out[i] = 0.5 * y * (1 + std::erf(y * INV_SQRT2));
    }
}

inline void gelu_affine_backward(double* dy, const double* dout, const double* h, double w, double b, int64_t S) {
    constexpr double INV_SQRT2 = 0.70710678118654752440, INV_SQRT_2PI = 0.39894228040143267794;
    for (int64_t i = 0; i < S; ++i) {
        const double y = h[i] * w + b;
        const double cdf = 0.5 * (1 + std::erf(y * INV_SQRT2)), pdf = std::exp(-0.5 * y * y) * INV_SQRT_2PI;
        dy[i] = dout[i] * (cdf + y * pdf);
    }
}

}  // namespace td
