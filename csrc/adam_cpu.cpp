// adam_cpu.cpp: one Adam or AdamW step over all of a model's parameters in one call, as
// torch.optim.Adam / AdamW (foreach=False) and tinydiff.optim.Adam.
//
// Per element of every parameter, with step t >= 1 (Adam: Kingma & Ba 2015, arXiv:1412.6980,
// Alg. 1; AdamW: Loshchilov & Hutter 2019, arXiv:1711.05101, Alg. 2), in this order:
//   Adam   g = g + weight_decay p                     L2 penalty in the gradient
//   AdamW  p = p (1 - lr weight_decay)                decoupled decay (Alg. 2, line 12)
//   m = beta1 m + (1 - beta1) g                       first moment   (Alg. 1: m_t)
//   v = beta2 v + (1 - beta2) g^2                     second moment  (Alg. 1: v_t)
//   p = p - lr / (1 - beta1^t) m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//                                                     Alg. 1: theta_t with m_hat, v_hat (bias
//                                                     corrections), eps after the sqrt
// The scalars (1 - beta1, lr / (1 - beta1^t), sqrt(1 - beta2^t), ...) are computed in double and
// rounded to T once, and each element is updated in T, one operation at a time in the order above:
// the NumPy reference (adam_step_ref in tinydiff/kernels.py) does the same, so the two agree to
// the last bit. For that, this file is compiled without contracting a * b + c into an FMA (the
// pragma below); setup.py's -fno-math-errno lets the loop's std::sqrt vectorise.
//
// One pass over memory: each element of p, m, v is read and written once, g read once.
// OpenMP threads share the concatenation of all parameters, cut into chunks of ADAM_CHUNK
// elements (static schedule), so one 300k-element weight and a hundred 64-element biases are
// split evenly. Elementwise, so the result does not depend on the thread count. One version.
//
// Test:      python -m pytest tests/test_adam_kernel.py -q
// Benchmark: python benchmarks/bench_steps.py      (the row "adam step": the ContextUnet's parameters)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels_cpu.h"

namespace td {

constexpr int64_t ADAM_CHUNK = int64_t(1) << 14;   // elements per work item (4 arrays: 256 KiB of float32)

enum class Decay { none, l2, decoupled };

template <typename T>
struct AdamScalars {            // the step's constants, computed in double, rounded to T
    T beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay, step_size, sqrt_bc2;
};

// p, m, v (n) <- p, m, v, g (n): the update above on one contiguous run of one parameter
template <typename T, Decay D>
static void adam_update(T* p, T* m, T* v, const T* g, int64_t n, const AdamScalars<T>& s) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        T gi = g[i], pi = p[i];
        if constexpr (D == Decay::decoupled) pi = pi * s.decay;              // AdamW Alg. 2, line 12
        if constexpr (D == Decay::l2) gi = gi + s.weight_decay * pi;         // Adam: L2 in the gradient
        const T mi = s.beta1 * m[i] + s.one_minus_beta1 * gi;               // Alg. 1: m_t
        const T vi = s.beta2 * v[i] + s.one_minus_beta2 * (gi * gi);        // Alg. 1: v_t
        const T denom = std::sqrt(vi) / s.sqrt_bc2 + s.eps;                 // sqrt(v_hat) + eps
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - s.step_size * (mi / denom);                             // Alg. 1: theta_t
    }
}

template <typename T, Decay D>
static void adam_all(T* const* params, T* const* exp_avgs, T* const* exp_avg_sqs, const T* const* grads,
                     const std::vector<int64_t>& offsets, const AdamScalars<T>& s) {
    const int64_t num = int64_t(offsets.size()) - 1, total = offsets[num];
    const int64_t chunks = (total + ADAM_CHUNK - 1) / ADAM_CHUNK;
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t lo = c * ADAM_CHUNK;
        const int64_t hi = std::min(total, lo + ADAM_CHUNK);
        // the parameter that holds flat index lo: the last k with offsets[k] <= lo
        int64_t k = std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin() - 1;
        for (; lo < hi; ++k) {                       // the chunk may run over several small parameters
            const int64_t begin = lo - offsets[k], end = std::min(hi, offsets[k + 1]) - offsets[k];
            adam_update<T, D>(params[k] + begin, exp_avgs[k] + begin, exp_avg_sqs[k] + begin,
                              grads[k] + begin, end - begin, s);
            lo = offsets[k] + end;
        }
    }
}

template <typename T>
void adam_step_cpu(T* const* params, T* const* exp_avgs, T* const* exp_avg_sqs, const T* const* grads,
                   const int64_t* sizes, int64_t num_params, const AdamHyper& h) {
    std::vector<int64_t> offsets(num_params + 1, 0);          // parameter k holds [offsets[k], offsets[k+1])
    for (int64_t k = 0; k < num_params; ++k) offsets[k + 1] = offsets[k] + sizes[k];
    const double t = double(h.step);
    AdamScalars<T> s;
    s.beta1 = T(h.beta1);
    s.one_minus_beta1 = T(1 - h.beta1);
    s.beta2 = T(h.beta2);
    s.one_minus_beta2 = T(1 - h.beta2);
    s.eps = T(h.eps);
    s.weight_decay = T(h.weight_decay);
    s.decay = T(1 - h.lr * h.weight_decay);
    s.step_size = T(h.lr / (1 - std::pow(h.beta1, t)));      // lr / (1 - beta1^t)
    s.sqrt_bc2 = T(std::sqrt(1 - std::pow(h.beta2, t)));     // sqrt(1 - beta2^t)
    if (h.weight_decay == 0)
        adam_all<T, Decay::none>(params, exp_avgs, exp_avg_sqs, grads, offsets, s);
    else if (h.decoupled)
        adam_all<T, Decay::decoupled>(params, exp_avgs, exp_avg_sqs, grads, offsets, s);
    else
        adam_all<T, Decay::l2>(params, exp_avgs, exp_avg_sqs, grads, offsets, s);
}

template void adam_step_cpu<float>(float* const*, float* const*, float* const*, const float* const*,
                                   const int64_t*, int64_t, const AdamHyper&);
template void adam_step_cpu<double>(double* const*, double* const*, double* const*, const double* const*,
                                    const int64_t*, int64_t, const AdamHyper&);

}  // namespace td
