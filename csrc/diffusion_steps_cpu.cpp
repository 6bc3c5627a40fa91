// diffusion_steps_cpu.cpp: the elementwise steps of diffusion, each fused into one pass over memory.
//
//   q_sample   xt     = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps                  (DDPM eq. 4)
//   ddpm_step  x_prev = coef_x (xt - coef_eps eps) + sigma z                (DDPM eq. 11, Alg. 2 l. 4)
//   ddim_step  x0     = (xt - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar), optionally clipped to [-1, 1]
//              x_prev = sqrt(alpha_bar_prev) x0 + dir_coef eps + sigma z                (DDIM eq. 12)
//   guidance   eps    = eps_uncond + s (eps_cond - eps_uncond)     (classifier-free guidance, fused)
//
// Every coefficient is an array with one value per sample (each sample may have its own t). The
// per-element arithmetic is shared with the CUDA kernels: diffusion_math.h. The NumPy expression
// makes one pass over memory per operator (about 5 for ddpm_step, more with guidance); these
// make one, reading each input and writing each output once, with OpenMP threads and SIMD.
// Specification: q_sample_ref, ddpm_step_ref, ddim_step_ref in tinydiff/kernels.py.
// One version each (they are bound by memory bandwidth; there is little else to try).
//
// Test:      python -m pytest tests/test_kernels_cpu.py -q -k step
// Benchmark: python benchmarks/bench_steps.py [--quick]    (GB/s next to the machine's copy GB/s)
#include <algorithm>

#include "diffusion_math.h"
#include "kernels_cpu.h"

namespace td {

constexpr int64_t PARALLEL_MIN_ELEMENTS = int64_t(1) << 16;   // fewer: one thread (no team start-up)

// Call body(b, lo, hi) on the elements [lo, hi) of sample b, over all batch * per_sample elements,
// in chunks spread over the threads (a chunk may span samples; a sample may span chunks).
template <typename Body>
void for_each_sample_run(int64_t batch, int64_t per_sample, Body body) {
    const int64_t total = batch * per_sample, chunk = 1 << 14;
#pragma omp parallel for schedule(static) if (total >= PARALLEL_MIN_ELEMENTS)
    for (int64_t start = 0; start < total; start += chunk) {
        const int64_t end = std::min(start + chunk, total);
        for (int64_t lo = start; lo < end;) {
            const int64_t b = lo / per_sample, hi = std::min(end, (b + 1) * per_sample);
            body(b, lo, hi);
            lo = hi;
        }
    }
}

template <typename T>
void q_sample_cpu(T* xt, const T* x0, const T* eps, const T* sqrt_alpha_bar,
                  const T* sqrt_one_minus_alpha_bar, int64_t batch, int64_t per_sample) {
    for_each_sample_run(batch, per_sample, [&](int64_t b, int64_t lo, int64_t hi) {
        const T sa = sqrt_alpha_bar[b], sb = sqrt_one_minus_alpha_bar[b];
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) xt[i] = q_sample(x0[i], eps[i], sa, sb);
    });
}

// GUIDED: eps is the conditional prediction and eps_uncond the unconditional one.
template <bool GUIDED, typename T>
void ddpm_step_loop(T* x_prev, const T* xt, const T* eps, const T* z, const T* coef_x,
                    const T* coef_eps, const T* sigma, const T* eps_uncond, T scale,
                    int64_t batch, int64_t per_sample) {
    for_each_sample_run(batch, per_sample, [&](int64_t b, int64_t lo, int64_t hi) {
        const T cx = coef_x[b], ce = coef_eps[b], sg = sigma[b];
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) {
            T e = eps[i];
            if constexpr (GUIDED) e = guided_eps(e, eps_uncond[i], scale);
            x_prev[i] = ddpm_update(xt[i], e, z[i], cx, ce, sg);
        }
    });
}

template <typename T>
void ddpm_step_cpu(T* x_prev, const T* xt, const T* eps, const T* z, const T* coef_x,
                   const T* coef_eps, const T* sigma, const T* eps_uncond, T guidance_scale,
                   int64_t batch, int64_t per_sample) {
    if (eps_uncond)
        ddpm_step_loop<true>(x_prev, xt, eps, z, coef_x, coef_eps, sigma, eps_uncond, guidance_scale, batch, per_sample);
    else
        ddpm_step_loop<false>(x_prev, xt, eps, z, coef_x, coef_eps, sigma, eps_uncond, guidance_scale, batch, per_sample);
}

template <bool GUIDED, typename T>
void ddim_step_loop(T* x_prev, T* x0, const T* xt, const T* eps, const T* z, const T* sqrt_alpha_bar,
                    const T* sqrt_one_minus_alpha_bar, const T* sqrt_alpha_bar_prev, const T* dir_coef,
                    const T* sigma, bool clip_x0, const T* eps_uncond, T scale, int64_t batch,
                    int64_t per_sample) {
    for_each_sample_run(batch, per_sample, [&](int64_t b, int64_t lo, int64_t hi) {
        const T sa = sqrt_alpha_bar[b], sb = sqrt_one_minus_alpha_bar[b];
        const T sa_prev = sqrt_alpha_bar_prev[b], dc = dir_coef[b], sg = sigma[b];
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) {
            T e = eps[i];
            if constexpr (GUIDED) e = guided_eps(e, eps_uncond[i], scale);
            const T x0_i = ddim_x0(xt[i], e, sa, sb, clip_x0);
            x0[i] = x0_i;
            x_prev[i] = ddim_update(x0_i, e, z[i], sa_prev, dc, sg);
        }
    });
}

template <typename T>
void ddim_step_cpu(T* x_prev, T* x0, const T* xt, const T* eps, const T* z, const T* sqrt_alpha_bar,
                   const T* sqrt_one_minus_alpha_bar, const T* sqrt_alpha_bar_prev,
                   const T* dir_coef, const T* sigma, bool clip_x0, const T* eps_uncond,
                   T guidance_scale, int64_t batch, int64_t per_sample) {
    if (eps_uncond)
        ddim_step_loop<true>(x_prev, x0, xt, eps, z, sqrt_alpha_bar, sqrt_one_minus_alpha_bar,
                             sqrt_alpha_bar_prev, dir_coef, sigma, clip_x0, eps_uncond, guidance_scale,
                             batch, per_sample);
    else
        ddim_step_loop<false>(x_prev, x0, xt, eps, z, sqrt_alpha_bar, sqrt_one_minus_alpha_bar,
                              sqrt_alpha_bar_prev, dir_coef, sigma, clip_x0, eps_uncond, guidance_scale,
                              batch, per_sample);
}

#define TD_INSTANTIATE(T)                                                                              \
    template void q_sample_cpu<T>(T*, const T*, const T*, const T*, const T*, int64_t, int64_t);      \
    template void ddpm_step_cpu<T>(T*, const T*, const T*, const T*, const T*, const T*, const T*,    \
                                   const T*, T, int64_t, int64_t);                                   \
    template void ddim_step_cpu<T>(T*, T*, const T*, const T*, const T*, const T*, const T*,          \
                                   const T*, const T*, const T*, bool, const T*, T, int64_t, int64_t);
TD_INSTANTIATE(float)
TD_INSTANTIATE(double)

}  // namespace td
