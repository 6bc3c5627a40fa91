// group_norm_cpu.cpp: group norm (Wu & He 2018, arXiv:1803.08494, eq. 1-3) followed by SiLU
// (Elfwing et al. 2018, arXiv:1702.03118), the UNet's GroupNorm -> SiLU, forward and backward each
// in one call; silu = false gives group norm alone (the UNet's attention norms).
// x is (N, C, S...) viewed as (N, G, K, S), K = C / G channels a group, S the product of the
// trailing axes: each sample n's group g is normalised over its M = K * S values.
//
//   forward   mean_ng = sum x / M,   var_ng = sum (x - mean_ng)^2 / M   (biased, two passes)
//             xhat = (x - mean_ng) inv_std_ng,   inv_std_ng = 1 / sqrt(var_ng + eps)
//             y = xhat w_c + b_c,   out = silu(y) = y s,   s = sigmoid(y)   (silu = false: out = y)
//   backward  dy = dout silu'(y),   silu'(y) = s (1 + y (1 - s))   (silu = false: dy = dout)
//             db_c = sum_{n,s} dy,   dw_c = sum_{n,s} dy xhat,   dxhat = dy w_c
//             dx = inv_std_ng (dxhat - mean_ng(dxhat) - xhat mean_ng(dxhat xhat))
//             (batch norm's backward, Ioffe & Szegedy 2015 Alg. 1, within each group)
// What is kept for the backward is x (which the graph holds anyway), mean and inv_std (N, G):
// neither xhat nor y is stored, the backward recomputes both. Forward: x is read three times (the
// mean, the variance, out; a group is K S values, a few KB at the UNet's sizes, so the second
// and third reads come from cache) and out written once. Backward: pass 1 reads dout and x and
// writes dy into a buffer of one group (this thread's, in cache), channel after channel, so that
// the long latency of the SiLU of one channel overlaps the next; then it sums dy and dy xhat per
// channel from that buffer (dw, db and the group's sums); pass 2 reads x and dy and writes dx.
// PyTorch's eager GroupNorm then SiLU adds a write and a read of y forward, and of dy backward.
//
// SiLU in float32: sigmoid from one exponential, e = exp(-|y|) (exp_neg of gelu_math.h), and
//   p = 1 / (1 + e), q = e p:   s = p, 1 - s = q for y >= 0;  s = q, 1 - s = p for y < 0,
// so neither s nor 1 - s comes from a subtraction that cancels. Within 1e-6 |ref| + 1e-7 of the
// float64 functions, silu and silu', on a dense grid of y over [-100, 100] with 0, -0 and the cut-off
// (tests/test_kernels_cpu.py -k silu_float32). float64: std::exp.
//
// One (n, g) pair per OpenMP work item (static schedule). dw and db: each pair writes its channels'
// partial sums into an (N, C) buffer, summed over n in order at the end, so the result does not
// depend on the thread count. Sums are in double, also for float32; the per-element work is in T
// with the per-group constants rounded to T, as the reference does.
// Specification: group_norm_silu_forward_ref and group_norm_silu_backward_ref in tinydiff/kernels.py.
// One version.
//
// Test:      python -m pytest tests/test_kernels_cpu.py -q -k group_norm
// Benchmark: python benchmarks/bench_steps.py     (rows "group_norm + silu")
#include <cmath>
#include <utility>
#include <vector>

#include "gelu_math.h"
#include "kernels_cpu.h"

namespace td {

constexpr int64_t PARALLEL_MIN_ELEMENTS = int64_t(1) << 14;   // fewer: one thread (no team start-up)

// s = sigmoid(y) and sc = 1 - sigmoid(y), lane by lane (exp_neg is 0 past |y| = 86.5: s = 0 or 1)
inline void sigmoid_pair(VecF y, VecF& s, VecF& sc) {
    const VecF e = exp_neg(y < VecF{} ? -y : y, VecF{});        // exp(-|y|)
    const VecF p = splat(1.0f) / (e + 1.0f), q = e * p;        // 1 / (1 + e), e / (1 + e)
    const auto positive = y >= VecF{};
    s = positive ? p : q;
    sc = positive ? q : p;
}

inline double sigmoid_pair(double y, double& sc) {
    const double e = std::exp(-std::abs(y)), p = 1 / (1 + e), q = e * p;
    sc = y >= 0 ? q : p;
    return y >= 0 ? p : q;
}

// out[s] = act(y), y = (x[s] - m) inv w + b, s < S; act = silu or the identity. float: vectors.
template <bool SILU>
inline void norm_act_forward(float* out, const float* x, float m, float inv, float w, float b, int64_t S) {
    for_each_vector(0, S, [&](int64_t i, int count) {
        const VecF y = (load_vec(x + i, count) - m) * inv * w + b;
        if (!SILU) return store_vec(out + i, y, count);
        VecF s, sc;
        sigmoid_pair(y, s, sc);
        store_vec(out + i, y * s, count);                                   // y sigmoid(y)
    });
}

// dy[s] = dout[s] silu'(y), y as above, s < S
inline void norm_silu_backward(float* dy, const float* dout, const float* x, float m, float inv, float w, float b,
                               int64_t S) {
    for_each_vector(0, S, [&](int64_t i, int count) {
        const VecF y = (load_vec(x + i, count) - m) * inv * w + b;
        VecF s, sc;
        sigmoid_pair(y, s, sc);
        store_vec(dy + i, load_vec(dout + i, count) * (s * (y * sc + 1.0f)), count);   // s (1 + y (1 - s))
    });
}

// sum_d = sum_s dy[s] and sum_dh = sum_s dy[s] xhat[s], xhat = (x - m) inv, added up in double
// vectors (each float vector's two halves converted), their lanes then added pairwise
using VecD = Vec<double>;
using HalfVecF = HalfVecOf<float>::type;
constexpr int LANES_D = VEC_BYTES / int(sizeof(double));

template <size_t... I>                                             // I = 0 .. LANES_D - 1
inline VecD halves_as_double(VecF v, std::index_sequence<I...>) {
#if TD_SHUFFLEVECTOR
    const HalfVecF lo = __builtin_shufflevector(v, v, I...), hi = __builtin_shufflevector(v, v, (I + LANES_D)...);
#else
    HalfVecF lo, hi;
    __builtin_memcpy(&lo, &v, sizeof(lo));
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
#endif
    return __builtin_convertvector(lo, VecD) + __builtin_convertvector(hi, VecD);
}

inline VecD halves_as_double(VecF v) { return halves_as_double(v, std::make_index_sequence<LANES_D>()); }

inline double sum_lanes(VecD v) {
    double t[LANES_D];
    __builtin_memcpy(t, &v, sizeof(t));
    for (int width = LANES_D / 2; width >= 1; width /= 2)            // a tree: log2(LANES_D) dependent adds
        for (int j = 0; j < width; ++j) t[j] += t[j + width];
    return t[0];
}

inline void channel_sums(double& sum_d, double& sum_dh, const float* dy, const float* x, float m, float inv,
                         int64_t S) {
    VecD acc_d = {}, acc_dh = {};
    for_each_vector(0, S, [&](int64_t i, int count) {          // lanes past count: dy 0
        const VecF h = (load_vec(x + i, count) - m) * inv, d = load_vec(dy + i, count);
        acc_d += halves_as_double(d), acc_dh += halves_as_double(d * h);
    });
    sum_d = sum_lanes(acc_d), sum_dh = sum_lanes(acc_dh);
}

template <bool SILU>
inline void norm_act_forward(double* out, const double* x, double m, double inv, double w, double b, int64_t S) {
    for (int64_t i = 0; i < S; ++i) {
        const double y = (x[i] - m) * inv * w + b;
        double sc;
        out[i] = SILU ? y * sigmoid_pair(y, sc) : y;
    }
}

inline void norm_silu_backward(double* dy, const double* dout, const double* x, double m, double inv, double w,
                               double b, int64_t S) {
    for (int64_t i = 0; i < S; ++i) {
        const double y = (x[i] - m) * inv * w + b;
        double sc;
        const double s = sigmoid_pair(y, sc);
        dy[i] = dout[i] * (s * (y * sc + 1));
    }
}

inline void channel_sums(double& sum_d, double& sum_dh, const double* dy, const double* x, double m, double inv,
                         int64_t S) {
    sum_d = 0, sum_dh = 0;
#pragma omp simd reduction(+ : sum_d, sum_dh)
    for (int64_t i = 0; i < S; ++i) sum_d += dy[i], sum_dh += dy[i] * ((x[i] - m) * inv);
}

template <bool SILU, typename T>
void group_norm_forward(T* out, T* mean, T* inv_std, const T* x, const T* w, const T* b, double eps, int64_t N,
                        int64_t C, int64_t S, int64_t G) {
    const int64_t K = C / G, M = K * S;
#pragma omp parallel for schedule(static) if (N * C * S >= PARALLEL_MIN_ELEMENTS)
    for (int64_t ng = 0; ng < N * G; ++ng) {
        const T* xg = x + ng * M;                                 // group g of sample n: K channels of S
        double sum = 0;                                           // pass 1: the mean
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < M; ++i) sum += double(xg[i]);
        const double m = sum / double(M);
        double squares = 0;                                       // pass 2: the variance about it
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < M; ++i) {
            const double d = double(xg[i]) - m;
            squares += d * d;
        }
        const T m_t = T(m), inv_t = T(1 / std::sqrt(squares / double(M) + eps));
        mean[ng] = m_t, inv_std[ng] = inv_t;
        for (int64_t k = 0; k < K; ++k) {                         // pass 3: out, channel by channel
            const int64_t c = ng % G * K + k;
            norm_act_forward<SILU>(out + ng * M + k * S, xg + k * S, m_t, inv_t, w ? w[c] : T(1), b ? b[c] : T(0), S);
        }
    }
}

template <bool SILU, typename T>
void group_norm_backward(T* dx, T* dw, T* db, const T* dout, const T* x, const T* mean, const T* inv_std, const T* w,
                         const T* b, int64_t N, int64_t C, int64_t S, int64_t G) {
    const int64_t K = C / G, M = K * S;
    std::vector<double> part_dw(N * C), part_db(N * C);           // per (n, c): sum_s dy xhat, sum_s dy
#pragma omp parallel if (N * C * S >= PARALLEL_MIN_ELEMENTS)
    {
        std::vector<T> dy_group(SILU ? M : 0);                    // SILU: this group's dout silu'(y)
#pragma omp for schedule(static)
        for (int64_t ng = 0; ng < N * G; ++ng) {
            const T m = mean[ng], inv = inv_std[ng];
            const T* xg = x + ng * M;
            const T* dy = SILU ? dy_group.data() : dout + ng * M;
            for (int64_t k = 0; SILU && k < K; ++k) {            // pass 1: dy, then the channel and group sums
                const int64_t c = ng % G * K + k;                 // (channels apart: their latencies overlap)
                norm_silu_backward(dy_group.data() + k * S, dout + ng * M + k * S, xg + k * S, m, inv,
                                   w ? w[c] : T(1), b ? b[c] : T(0), S);
            }
            double sum_dxhat = 0, sum_dxhat_xhat = 0;
            for (int64_t k = 0; k < K; ++k) {
                const int64_t c = ng % G * K + k;
                const T wc = w ? w[c] : T(1);
                double sum_d, sum_dh;
                channel_sums(sum_d, sum_dh, dy + k * S, xg + k * S, m, inv, S);
                part_db[ng / G * C + c] = sum_d, part_dw[ng / G * C + c] = sum_dh;
                sum_dxhat += double(wc) * sum_d, sum_dxhat_xhat += double(wc) * sum_dh;
            }
            const T mean_d = T(sum_dxhat / double(M)), mean_dh = T(sum_dxhat_xhat / double(M));
            for (int64_t k = 0; k < K; ++k) {                     // pass 2: dx
                const int64_t c = ng % G * K + k;
                const T wc = w ? w[c] : T(1);
                const T* xc = xg + k * S;
                const T* dc = dy + k * S;
                T* gc = dx + ng * M + k * S;
#pragma omp simd
                for (int64_t s = 0; s < S; ++s) gc[s] = inv * (dc[s] * wc - mean_d - (xc[s] - m) * inv * mean_dh);
            }
        }
    }
    for (int64_t c = 0; c < C; ++c) {                             // dw, db: the partial sums over n, in order
        double sum_dw = 0, sum_db = 0;
        for (int64_t n = 0; n < N; ++n) sum_dw += part_dw[n * C + c], sum_db += part_db[n * C + c];
        dw[c] = T(sum_dw), db[c] = T(sum_db);
    }
}

template <typename T>
void group_norm_silu_forward_cpu(T* out, T* mean, T* inv_std, const T* x, const T* w, const T* b, double eps,
                                 bool silu, int64_t N, int64_t C, int64_t S, int64_t G) {
    if (silu) group_norm_forward<true>(out, mean, inv_std, x, w, b, eps, N, C, S, G);
    else group_norm_forward<false>(out, mean, inv_std, x, w, b, eps, N, C, S, G);
}

template <typename T>
void group_norm_silu_backward_cpu(T* dx, T* dw, T* db, const T* dout, const T* x, const T* mean, const T* inv_std,
                                  const T* w, const T* b, bool silu, int64_t N, int64_t C, int64_t S, int64_t G) {
    if (silu) group_norm_backward<true>(dx, dw, db, dout, x, mean, inv_std, w, b, N, C, S, G);
    else group_norm_backward<false>(dx, dw, db, dout, x, mean, inv_std, w, b, N, C, S, G);
}

#define TD_INSTANTIATE(T)                                                                                        \
    template void group_norm_silu_forward_cpu<T>(T*, T*, T*, const T*, const T*, const T*, double, bool, int64_t, \
                                                 int64_t, int64_t, int64_t);                                     \
    template void group_norm_silu_backward_cpu<T>(T*, T*, T*, const T*, const T*, const T*, const T*, const T*,  \
                                                  const T*, bool, int64_t, int64_t, int64_t, int64_t);
TD_INSTANTIATE(float)
TD_INSTANTIATE(double)

}  // namespace td
