// diffusion_math.h: the per-element arithmetic of the diffusion steps, shared by the C++ kernels
// (diffusion_steps_cpu.cpp, compiled by g++) and the CUDA kernels (diffusion_steps.cu, nvcc), so
// that the CPU tests exercise exactly the arithmetic the GPU runs.
// Reference: tinydiff/kernels.py (q_sample_ref, ddpm_step_ref, ddim_step_ref, guided_eps_ref).
// Coefficients are per sample; each function handles one element of one sample.
#pragma once

#if defined(__CUDACC__)
#define TD_HD __host__ __device__ __forceinline__
#else
#define TD_HD inline
#endif

namespace td {

// Classifier-free guidance (arXiv:2207.12598): eps = eps_uncond + s * (eps_cond - eps_uncond).
template <typename T>
TD_HD T guided_eps(T eps_cond, T eps_uncond, T scale) {
    return eps_uncond + scale * (eps_cond - eps_uncond);
}

// DDPM eq. 4: xt = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps.
template <typename T>
TD_HD T q_sample(T x0, T eps, T sqrt_alpha_bar, T sqrt_one_minus_alpha_bar) {
    return sqrt_alpha_bar * x0 + sqrt_one_minus_alpha_bar * eps;
}

// DDPM eq. 11 and Alg. 2 line 4: x_{t-1} = coef_x * (xt - coef_eps * eps) + sigma * z,
// with coef_x = 1/sqrt(alpha_t), coef_eps = beta_t / sqrt(1 - alpha_bar_t).
template <typename T>
TD_HD T ddpm_update(T xt, T eps, T z, T coef_x, T coef_eps, T sigma) {
    return coef_x * (xt - coef_eps * eps) + sigma * z;
}

// DDIM eq. 12, "predicted x0": (xt - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t),
// optionally clipped to the data range [-1, 1].
template <typename T>
TD_HD T ddim_x0(T xt, T eps, T sqrt_alpha_bar, T sqrt_one_minus_alpha_bar, bool clip) {
    T x0 = (xt - sqrt_one_minus_alpha_bar * eps) / sqrt_alpha_bar;
    if (clip) x0 = x0 < T(-1) ? T(-1) : (x0 > T(1) ? T(1) : x0);
    return x0;
}

// DDIM eq. 12: x_prev = sqrt(alpha_bar_prev) * x0 + dir_coef * eps + sigma * z,
// dir_coef = sqrt(1 - alpha_bar_prev - sigma^2) ("direction pointing to xt").
template <typename T>
TD_HD T ddim_update(T x0, T eps, T z, T sqrt_alpha_bar_prev, T dir_coef, T sigma) {
    return sqrt_alpha_bar_prev * x0 + dir_coef * eps + sigma * z;
}

}  // namespace td
