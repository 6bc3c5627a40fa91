// batch_norm_cpu.cpp: training-mode batch norm (Ioffe & Szegedy 2015, arXiv:1502.03167, Alg. 1),
// fused: the statistics, the normalisation and the affine in one call, and the whole backward in one.
// x is (N, C, S...) viewed as (N, C, S), S the product of the trailing axes; M = N * S per channel.
//
//   forward   mean_c = sum_{n,s} x / M,   var_c = sum_{n,s} (x - mean_c)^2 / M   (biased)
//             inv_std_c = 1 / sqrt(var_c + eps),   xhat = (x - mean_c) inv_std_c
//             out = xhat w_c + b_c                 (w, b optional)
//   backward  db_c = sum_{n,s} dout,   dw_c = sum_{n,s} dout xhat
//             dx = inv_std_c w_c (dout - db_c / M - xhat dw_c / M)
//             (the backward of Alg. 1 with dxhat = dout w_c: mean(dxhat) = w_c db_c / M, ...)
//
// Fused with GELU (gelu_math.h), for the ContextUnet's conv -> BatchNorm2d -> GELU:
//   forward   out = gelu(y), y = xhat w_c + b_c   (y is never stored)
//   backward  dy = dout gelu'(y), y recomputed from xhat; then the backward above with dy for dout
// This saves GELU's own passes: its read and write of y forward, and of dout and y backward.
// Eval mode (the samplers): the running statistics fold into one affine map per channel, so
//   out = gelu(x scale_c + shift_c),  scale_c = w_c / sqrt(running_var_c + eps),  shift_c = b_c - running_mean_c scale_c
// is one pass (forward only: with a gradient to compute, tinydiff runs batch norm, then GELU).
//
// One thread per channel (OpenMP, static schedule): each channel is summed serially, in a fixed
// order, so the result does not depend on the thread count. Sums are in double, also for float32;
// the variance is the two-pass sum of (x - mean)^2, never E[x^2] - E[x]^2. The per-element work
// (xhat, out, dx) is in T with the per-channel constants rounded to T, as the reference does.
// Specification: batch_norm_forward_train_ref and batch_norm_backward_train_ref in
// tinydiff/kernels.py, and batch_norm_gelu_*_train_ref (the two references in a row). One version.
//
// Test:      python -m pytest tests/test_kernels_cpu.py -q -k batch_norm
// Benchmark: python benchmarks/bench_train_step.py --steps 5     (the ContextUnet's BatchNorm2d)
#include <cmath>
#include <vector>

#include "gelu_math.h"
#include "kernels_cpu.h"

namespace td {

constexpr int64_t PARALLEL_MIN_ELEMENTS = int64_t(1) << 14;   // fewer: one thread (no team start-up)

template <bool GELU, typename T>
void batch_norm_forward(T* out, T* xhat, T* mean, T* var, T* inv_std, const T* x, const T* w, const T* b,
                        double eps, int64_t N, int64_t C, int64_t S) {
    const double M = double(N) * double(S);
#pragma omp parallel for schedule(static) if (N * C * S >= PARALLEL_MIN_ELEMENTS)
    for (int64_t c = 0; c < C; ++c) {
        double sum = 0;                                           // pass 1: the mean
        for (int64_t n = 0; n < N; ++n) {
            const T* xc = x + (n * C + c) * S;
#pragma omp simd reduction(+ : sum)
            for (int64_t s = 0; s < S; ++s) sum += double(xc[s]);
        }
        const double m = sum / M;
        double squares = 0;                                       // pass 2: the variance about it
        for (int64_t n = 0; n < N; ++n) {
            const T* xc = x + (n * C + c) * S;
#pragma omp simd reduction(+ : squares)
            for (int64_t s = 0; s < S; ++s) {
                const double d = double(xc[s]) - m;
                squares += d * d;
            }
        }
        const double v = squares / M;
        const T m_t = T(m), inv_t = T(1 / std::sqrt(v + eps));
        mean[c] = m_t, var[c] = T(v), inv_std[c] = inv_t;
        const T wc = w ? w[c] : T(1), bc = b ? b[c] : T(0);
        for (int64_t n = 0; n < N; ++n) {                         // pass 3: xhat and out
            const T* xc = x + (n * C + c) * S;
            T* hc = xhat + (n * C + c) * S;
            if (GELU) {
#pragma omp simd
                for (int64_t s = 0; s < S; ++s) hc[s] = (xc[s] - m_t) * inv_t;
                gelu_affine_forward(out + (n * C + c) * S, hc, wc, bc, S);     // gelu(xhat w + b)
            } else if (out) {
                T* oc = out + (n * C + c) * S;
#pragma omp simd
                for (int64_t s = 0; s < S; ++s) {
                    const T h = (xc[s] - m_t) * inv_t;
                    hc[s] = h;
                    oc[s] = h * wc + bc;
                }
            } else {
#pragma omp simd
                for (int64_t s = 0; s < S; ++s) hc[s] = (xc[s] - m_t) * inv_t;
            }
        }
    }
}

// GELU: b (or nullptr) is the bias of y = xhat w + b, and dout is the gradient of gelu(y)
template <bool GELU, typename T>
void batch_norm_backward(T* dx, T* dw, T* db, const T* dout, const T* xhat, const T* inv_std, const T* w,
                         const T* b, int64_t N, int64_t C, int64_t S) {
    const double M = double(N) * double(S);
#pragma omp parallel if (N * C * S >= PARALLEL_MIN_ELEMENTS)
    {
        std::vector<T> dy(GELU ? N * S : 0);                          // GELU: this channel's dout gelu'(y)
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; ++c) {
            const T wc = w ? w[c] : T(1), bc = b ? b[c] : T(0);
            double sum_d = 0, sum_dh = 0;                             // pass 1: db_c and dw_c
            for (int64_t n = 0; n < N; ++n) {
                const T* hc = xhat + (n * C + c) * S;
                const T* dc = dout + (n * C + c) * S;
                if (GELU) {                                           // (stays in this core's cache for pass 2)
                    gelu_affine_backward(dy.data() + n * S, dc, hc, wc, bc, S);
                    dc = dy.data() + n * S;
                }
#pragma omp simd reduction(+ : sum_d, sum_dh)
                for (int64_t s = 0; s < S; ++s) {
                    sum_d += double(dc[s]);
                    sum_dh += double(dc[s] * hc[s]);
                }
            }
            db[c] = T(sum_d), dw[c] = T(sum_dh);
            const T k = inv_std[c] * wc, mean_d = T(sum_d / M), mean_dh = T(sum_dh / M);
            for (int64_t n = 0; n < N; ++n) {                         // pass 2: dx
                const T* dc = GELU ? dy.data() + n * S : dout + (n * C + c) * S;
                const T* hc = xhat + (n * C + c) * S;
                T* gc = dx + (n * C + c) * S;
#pragma omp simd
                for (int64_t s = 0; s < S; ++s) gc[s] = k * (dc[s] - mean_d - hc[s] * mean_dh);
            }
        }
    }
}

template <typename T>
void batch_norm_forward_train_cpu(T* out, T* xhat, T* mean, T* var, T* inv_std, const T* x, const T* w,
                                  const T* b, double eps, int64_t N, int64_t C, int64_t S) {
    batch_norm_forward<false>(out, xhat, mean, var, inv_std, x, w, b, eps, N, C, S);
}

template <typename T>
void batch_norm_backward_train_cpu(T* dx, T* dw, T* db, const T* dout, const T* xhat, const T* inv_std,
                                   const T* w, int64_t N, int64_t C, int64_t S) {
    batch_norm_backward<false>(dx, dw, db, dout, xhat, inv_std, w, static_cast<const T*>(nullptr), N, C, S);
}

template <typename T>
void batch_norm_gelu_forward_train_cpu(T* out, T* xhat, T* mean, T* var, T* inv_std, const T* x, const T* w,
                                       const T* b, double eps, int64_t N, int64_t C, int64_t S) {
    batch_norm_forward<true>(out, xhat, mean, var, inv_std, x, w, b, eps, N, C, S);
}

template <typename T>
void batch_norm_gelu_backward_train_cpu(T* dx, T* dw, T* db, const T* dout, const T* xhat, const T* inv_std,
                                        const T* w, const T* b, int64_t N, int64_t C, int64_t S) {
    batch_norm_backward<true>(dx, dw, db, dout, xhat, inv_std, w, b, N, C, S);
}

template <typename T>
void batch_norm_gelu_forward_eval_cpu(T* out, const T* x, const T* scale, const T* shift, int64_t N, int64_t C,
                                      int64_t S) {
#pragma omp parallel for collapse(2) schedule(static) if (N * C * S >= PARALLEL_MIN_ELEMENTS)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c)
            gelu_affine_forward(out + (n * C + c) * S, x + (n * C + c) * S, scale[c], shift[c], S);
}

#define TD_INSTANTIATE(T)                                                                                  \
    template void batch_norm_forward_train_cpu<T>(T*, T*, T*, T*, T*, const T*, const T*, const T*, double, \
                                                  int64_t, int64_t, int64_t);                              \
    template void batch_norm_backward_train_cpu<T>(T*, T*, T*, const T*, const T*, const T*, const T*,     \
                                                   int64_t, int64_t, int64_t);                             \
    template void batch_norm_gelu_forward_train_cpu<T>(T*, T*, T*, T*, T*, const T*, const T*, const T*,   \
                                                       double, int64_t, int64_t, int64_t);                 \
    template void batch_norm_gelu_backward_train_cpu<T>(T*, T*, T*, const T*, const T*, const T*, const T*, \
                                                        const T*, int64_t, int64_t, int64_t);     \
    template void batch_norm_gelu_forward_eval_cpu<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t);
TD_INSTANTIATE(float)
TD_INSTANTIATE(double)

}  // namespace td
