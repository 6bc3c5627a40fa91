// max_pool_cpu.cpp: 2-D max pooling (NCHW), forward and backward, for the ContextUnet's MaxPool2d.
//
//   forward   out[n,c,i,j] = max over (u,v) < (kh,kw) of x_pad[n,c, sh*i+u, sw*j+v]   (padding: -inf)
//             idx[n,c,i,j] = u*kw + v of the first maximum (NumPy's argmax; a NaN is the maximum)
//   backward  dx[n,c, sh*i+u-p, sw*j+v-p] += dout[n,c,i,j] for (u,v) = idx[n,c,i,j]
//             (d max/dx is 1 at the maximum and 0 elsewhere; overlapping windows add up)
//
// One image plane (n, c) at a time on the OpenMP threads: a plane's windows never reach another
// plane, so no two threads write the same dx. Specification: max_pool2d_forward_ref and
// max_pool2d_backward_ref in tinydiff/kernels.py. One version.
//
// Test:      python -m pytest tests/test_kernels_cpu.py -q -k max_pool
// Benchmark: python benchmarks/bench_steps.py     (rows "max_pool2d forward / backward")
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels_cpu.h"

namespace td {

constexpr int64_t PARALLEL_MIN_ELEMENTS = int64_t(1) << 14;   // fewer: one thread (no team start-up)

// The first maximum of the window so far (best, arg) against the next value (index k): strict, so
// that the first maximum stays; a NaN beats everything, and the first NaN stays.
template <typename T>
inline void take_if_larger(T& best, int32_t& arg, T value, int32_t k) {
    const bool larger = (value > best) | ((value != value) & (best == best));
    best = larger ? value : best;
    arg = larger ? k : arg;
}

// The 2x2 window at stride 2 without padding (the ContextUnet's MaxPool2d(2)), written out: four
// values, three comparisons, no loop over the window.
template <typename T>
static void max_pool2d_forward_2x2(T* out, int64_t* idx, const T* x, const PoolShape& s) {
    const int64_t planes = s.N * s.C, HW = s.H * s.W, OHW = s.OH * s.OW;
#pragma omp parallel for schedule(static) if (planes * HW >= PARALLEL_MIN_ELEMENTS)
    for (int64_t m = 0; m < planes; ++m)
        for (int64_t i = 0; i < s.OH; ++i) {
            const T* __restrict top = x + m * HW + 2 * i * s.W;
            const T* __restrict bottom = top + s.W;
            T* __restrict o = out + m * OHW + i * s.OW;
            int64_t* __restrict k = idx + m * OHW + i * s.OW;
            for (int64_t j = 0; j < s.OW; ++j) {
                T best = top[2 * j];
                int32_t arg = 0;
                take_if_larger(best, arg, top[2 * j + 1], 1);
                take_if_larger(best, arg, bottom[2 * j], 2);
                take_if_larger(best, arg, bottom[2 * j + 1], 3);
                o[j] = best;
                k[j] = arg;
            }
        }
}

template <typename T>
void max_pool2d_forward_cpu(T* out, int64_t* idx, const T* x, const PoolShape& s) {
    if (s.kh == 2 && s.kw == 2 && s.sh == 2 && s.sw == 2 && s.pad == 0)
        return max_pool2d_forward_2x2(out, idx, x, s);
    const int64_t planes = s.N * s.C, HW = s.H * s.W, OHW = s.OH * s.OW;
#pragma omp parallel for schedule(static) if (planes * HW >= PARALLEL_MIN_ELEMENTS)
    for (int64_t m = 0; m < planes; ++m) {
        const T* xm = x + m * HW;
        for (int64_t i = 0; i < s.OH; ++i)
            for (int64_t j = 0; j < s.OW; ++j) {
                T best = -std::numeric_limits<T>::infinity();
                int64_t arg = 0;
                const int64_t h0 = i * s.sh - s.pad, w0 = j * s.sw - s.pad;
                if (h0 >= 0 && h0 + s.kh <= s.H && w0 >= 0 && w0 + s.kw <= s.W) {   // inside x: no padding to test
                    for (int64_t u = 0; u < s.kh; ++u)
                        for (int64_t v = 0; v < s.kw; ++v) {
                            const T value = xm[(h0 + u) * s.W + w0 + v];
                            // strict: the first maximum; a NaN beats everything, and the first NaN stays
                            if (value > best || (std::isnan(value) && !std::isnan(best))) best = value, arg = u * s.kw + v;
                        }
                    out[m * OHW + i * s.OW + j] = best;
                    idx[m * OHW + i * s.OW + j] = arg;
                    continue;
                }
                bool nan = false;
                for (int64_t u = 0; u < s.kh && !nan; ++u) {
                    const int64_t h = i * s.sh + u - s.pad;
                    for (int64_t v = 0; v < s.kw; ++v) {
                        const int64_t w = j * s.sw + v - s.pad;
                        const T value = (h >= 0 && h < s.H && w >= 0 && w < s.W) ? xm[h * s.W + w]
                                                                                  : -std::numeric_limits<T>::infinity();
                        if (std::isnan(value)) { best = value, arg = u * s.kw + v, nan = true; break; }
                        if (value > best) best = value, arg = u * s.kw + v;      // strict: the first maximum
                    }
                }
                out[m * OHW + i * s.OW + j] = best;
                idx[m * OHW + i * s.OW + j] = arg;
            }
    }
}

template <typename T>
void max_pool2d_backward_cpu(T* dx, const T* dout, const int64_t* idx, const PoolShape& s) {
    const int64_t planes = s.N * s.C, HW = s.H * s.W, OHW = s.OH * s.OW;
#pragma omp parallel for schedule(static) if (planes * HW >= PARALLEL_MIN_ELEMENTS)
    for (int64_t m = 0; m < planes; ++m) {
        T* dxm = dx + m * HW;
        std::fill(dxm, dxm + HW, T(0));
        for (int64_t q = 0; q < OHW; ++q) {
            const int64_t i = q / s.OW, j = q % s.OW, k = idx[m * OHW + q];
            const int64_t h = i * s.sh + k / s.kw - s.pad, w = j * s.sw + k % s.kw - s.pad;
            if (h >= 0 && h < s.H && w >= 0 && w < s.W) dxm[h * s.W + w] += dout[m * OHW + q];   // not in the padding
        }
    }
}

#define TD_INSTANTIATE(T)                                                                     \
    template void max_pool2d_forward_cpu<T>(T*, int64_t*, const T*, const PoolShape&);       \
    template void max_pool2d_backward_cpu<T>(T*, const T*, const int64_t*, const PoolShape&);
TD_INSTANTIATE(float)
TD_INSTANTIATE(double)

}  // namespace td
