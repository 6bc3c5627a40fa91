// diffusion_steps.cu: the fused per-pixel steps of diffusion training and sampling on the GPU.
//
// What it computes (coefficients per sample: arrays of shape (B,), one value per image), as
// q_sample_ref / ddpm_step_ref / ddim_step_ref in tinydiff/kernels.py, with the per-element math
// of csrc/diffusion_math.h, which the C++ kernels share (so the CPU tests run the same arithmetic):
//   q_sample:   xt = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps                     (DDPM eq. 4)
//   ddpm_step:  x_prev = coef_x (xt - coef_eps eps) + sigma z,                 (DDPM eq. 11, Alg. 2)
//               coef_x = 1/sqrt(alpha_t), coef_eps = beta_t / sqrt(1 - alpha_bar_t)
//   ddim_step:  x0 = (xt - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar), optionally clipped to [-1, 1]
//               x_prev = sqrt(alpha_bar_prev) x0 + dir_coef eps + sigma z                (DDIM eq. 12)
//   guidance:   eps = eps_uncond + s (eps_cond - eps_uncond) when eps_uncond is given
//               (classifier-free guidance, arXiv:2207.12598), fused into both updates
// One pass over memory instead of the five or six that the same NumPy expression makes: these
// steps are memory-bound, so the target is the GPU's copy bandwidth.
//
// Versions (the launchers pick one per call; both run the same td:: functions per element):
//   kernel1  one element per thread: blockIdx.y walks the samples (reading the sample's
//            coefficients once), blockIdx.x and threadIdx.x the pixels of one sample, so no thread
//            divides to find its sample. The readable version, and the fallback for any shape.
//   kernel2  the same grid over Packs (csrc/pack.cuh): each thread loads and stores 16 bytes per
//            array (4 floats or 2 doubles) with one instruction, so four times the bytes in flight
//            per thread; the per-sample coefficients are still read once per sample.
//            Used when per_sample is a multiple of Pack<T>::N and every array is 16-byte aligned
//            (so is every sample's first element); else kernel1.
// Compile alone:  nvcc -c -O3 -std=c++17 -Icsrc -arch=sm_80 csrc/diffusion_steps.cu -o /tmp/steps.o
// Test:           pytest tests/test_cuda.py -k "q_sample or ddpm or ddim"
// Benchmark:      python benchmarks/bench_gpu.py --only steps   (GB/s next to CuPy and a copy)
#include <algorithm>

#include "cuda_check.h"
#include "diffusion_math.h"
#include "kernels_cuda.h"
#include "pack.cuh"

namespace {

const int THREADS = 256;

// grid: x covers the `items` (pixels or Packs) of one sample, y the samples (at most 65535
// blocks; the kernels loop over more)
dim3 steps_grid(int B, int items) {
    return dim3(ceil_div(items, THREADS), std::min(B, 65535));
}

// kernel2 applies: whole Packs per sample, and every big array 16-byte aligned
template <typename T>
bool use_packs(int per_sample, std::initializer_list<const void*> arrays) {
    return per_sample % Pack<T>::N == 0 && aligned16(arrays);
}

// --- kernel1: one element per thread ---------------------------------------------------------

template <typename T>
__global__ void q_sample_kernel1(T* xt, const T* x0, const T* eps, const T* sqrt_alpha_bar,
                                 const T* sqrt_one_minus_alpha_bar, int B, int per_sample) {
    int e = blockIdx.x * blockDim.x + threadIdx.x;         // pixel within the sample
    if (e >= per_sample) return;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        long long i = (long long)b * per_sample + e;
        xt[i] = td::q_sample(x0[i], eps[i], sqrt_alpha_bar[b], sqrt_one_minus_alpha_bar[b]);
    }
}

template <typename T>
__global__ void ddpm_step_kernel1(T* x_prev, const T* xt, const T* eps, const T* eps_uncond, const T* z,
                                  const T* coef_x, const T* coef_eps, const T* sigma, T guidance_scale,
                                  int B, int per_sample) {
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= per_sample) return;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        long long i = (long long)b * per_sample + e;
        T eps_i = eps_uncond ? td::guided_eps(eps[i], eps_uncond[i], guidance_scale) : eps[i];
        x_prev[i] = td::ddpm_update(xt[i], eps_i, z[i], coef_x[b], coef_eps[b], sigma[b]);
    }
}

template <typename T>
__global__ void ddim_step_kernel1(T* x_prev, T* x0, const T* xt, const T* eps, const T* eps_uncond,
                                  const T* z, const T* sqrt_alpha_bar, const T* sqrt_one_minus_alpha_bar,
                                  const T* sqrt_alpha_bar_prev, const T* dir_coef, const T* sigma,
                                  bool clip_x0, T guidance_scale, int B, int per_sample) {
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= per_sample) return;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        long long i = (long long)b * per_sample + e;
        T eps_i = eps_uncond ? td::guided_eps(eps[i], eps_uncond[i], guidance_scale) : eps[i];
        T x0_i = td::ddim_x0(xt[i], eps_i, sqrt_alpha_bar[b], sqrt_one_minus_alpha_bar[b], clip_x0);
        x0[i] = x0_i;
        x_prev[i] = td::ddim_update(x0_i, eps_i, z[i], sqrt_alpha_bar_prev[b], dir_coef[b], sigma[b]);
    }
}

// --- kernel2: one Pack (16 bytes: 4 floats or 2 doubles) per thread and array -----------------
// p numbers the Packs of one sample; pixel k of Pack p is element p * N + k.

template <typename T>
__global__ void q_sample_kernel2(T* xt, const T* x0, const T* eps, const T* sqrt_alpha_bar,
                                 const T* sqrt_one_minus_alpha_bar, int B, int per_sample) {
    const int N = Pack<T>::N;
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= per_sample / N) return;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        long long i = (long long)b * per_sample + (long long)p * N;     // first element of the Pack
        Pack<T> x0_p = load_pack(x0 + i), eps_p = load_pack(eps + i), xt_p;
        T sab = sqrt_alpha_bar[b], somab = sqrt_one_minus_alpha_bar[b];
#pragma unroll
        for (int k = 0; k < N; ++k) xt_p.v[k] = td::q_sample(x0_p.v[k], eps_p.v[k], sab, somab);
        store_pack(xt + i, xt_p);
    }
}

template <typename T>
__global__ void ddpm_step_kernel2(T* x_prev, const T* xt, const T* eps, const T* eps_uncond, const T* z,
                                  const T* coef_x, const T* coef_eps, const T* sigma, T guidance_scale,
                                  int B, int per_sample) {
    const int N = Pack<T>::N;
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= per_sample / N) return;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        long long i = (long long)b * per_sample + (long long)p * N;
        Pack<T> xt_p = load_pack(xt + i), eps_p = load_pack(eps + i), z_p = load_pack(z + i), out;
        if (eps_uncond) {
            Pack<T> uncond_p = load_pack(eps_uncond + i);
#pragma unroll
            for (int k = 0; k < N; ++k) eps_p.v[k] = td::guided_eps(eps_p.v[k], uncond_p.v[k], guidance_scale);
        }
        T cx = coef_x[b], ce = coef_eps[b], s = sigma[b];
#pragma unroll
        for (int k = 0; k < N; ++k) out.v[k] = td::ddpm_update(xt_p.v[k], eps_p.v[k], z_p.v[k], cx, ce, s);
        store_pack(x_prev + i, out);
    }
}

template <typename T>
__global__ void ddim_step_kernel2(T* x_prev, T* x0, const T* xt, const T* eps, const T* eps_uncond,
                                  const T* z, const T* sqrt_alpha_bar, const T* sqrt_one_minus_alpha_bar,
                                  const T* sqrt_alpha_bar_prev, const T* dir_coef, const T* sigma,
                                  bool clip_x0, T guidance_scale, int B, int per_sample) {
    const int N = Pack<T>::N;
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= per_sample / N) return;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        long long i = (long long)b * per_sample + (long long)p * N;
        Pack<T> xt_p = load_pack(xt + i), eps_p = load_pack(eps + i), z_p = load_pack(z + i), x0_p, prev_p;
        if (eps_uncond) {
            Pack<T> uncond_p = load_pack(eps_uncond + i);
#pragma unroll
            for (int k = 0; k < N; ++k) eps_p.v[k] = td::guided_eps(eps_p.v[k], uncond_p.v[k], guidance_scale);
        }
        T sab = sqrt_alpha_bar[b], somab = sqrt_one_minus_alpha_bar[b];
        T sab_prev = sqrt_alpha_bar_prev[b], dc = dir_coef[b], s = sigma[b];
#pragma unroll
        for (int k = 0; k < N; ++k) {
            // the division of DDIM eq. 12 stays a division (as in the C++ kernels): the step is
            // memory-bound, and a multiply by 1/sqrt_alpha_bar would round differently
            x0_p.v[k] = td::ddim_x0(xt_p.v[k], eps_p.v[k], sab, somab, clip_x0);
            prev_p.v[k] = td::ddim_update(x0_p.v[k], eps_p.v[k], z_p.v[k], sab_prev, dc, s);
        }
        store_pack(x0 + i, x0_p);
        store_pack(x_prev + i, prev_p);
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers

template <typename T>
void q_sample_cuda(T* xt, const T* x0, const T* eps, const T* sqrt_alpha_bar,
                   const T* sqrt_one_minus_alpha_bar, int B, int per_sample, cudaStream_t stream) {
    if (B == 0 || per_sample == 0) return;
    if (use_packs<T>(per_sample, {xt, x0, eps})) {
        dim3 grid = steps_grid(B, per_sample / Pack<T>::N);
        q_sample_kernel2<T><<<grid, THREADS, 0, stream>>>(
            xt, x0, eps, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, B, per_sample);
    } else {
        q_sample_kernel1<T><<<steps_grid(B, per_sample), THREADS, 0, stream>>>(
            xt, x0, eps, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, B, per_sample);
    }
    CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void ddpm_step_cuda(T* x_prev, const T* xt, const T* eps, const T* eps_uncond, const T* z,
                    const T* coef_x, const T* coef_eps, const T* sigma, T guidance_scale,
                    int B, int per_sample, cudaStream_t stream) {
    if (B == 0 || per_sample == 0) return;
    if (use_packs<T>(per_sample, {x_prev, xt, eps, eps_uncond, z})) {
        dim3 grid = steps_grid(B, per_sample / Pack<T>::N);
        ddpm_step_kernel2<T><<<grid, THREADS, 0, stream>>>(
            x_prev, xt, eps, eps_uncond, z, coef_x, coef_eps, sigma, guidance_scale, B, per_sample);
    } else {
        ddpm_step_kernel1<T><<<steps_grid(B, per_sample), THREADS, 0, stream>>>(
            x_prev, xt, eps, eps_uncond, z, coef_x, coef_eps, sigma, guidance_scale, B, per_sample);
    }
    CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void ddim_step_cuda(T* x_prev, T* x0, const T* xt, const T* eps, const T* eps_uncond, const T* z,
                    const T* sqrt_alpha_bar, const T* sqrt_one_minus_alpha_bar,
                    const T* sqrt_alpha_bar_prev, const T* dir_coef, const T* sigma, bool clip_x0,
                    T guidance_scale, int B, int per_sample, cudaStream_t stream) {
    if (B == 0 || per_sample == 0) return;
    if (use_packs<T>(per_sample, {x_prev, x0, xt, eps, eps_uncond, z})) {
        dim3 grid = steps_grid(B, per_sample / Pack<T>::N);
        ddim_step_kernel2<T><<<grid, THREADS, 0, stream>>>(
            x_prev, x0, xt, eps, eps_uncond, z, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, sqrt_alpha_bar_prev,
            dir_coef, sigma, clip_x0, guidance_scale, B, per_sample);
    } else {
        ddim_step_kernel1<T><<<steps_grid(B, per_sample), THREADS, 0, stream>>>(
            x_prev, x0, xt, eps, eps_uncond, z, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, sqrt_alpha_bar_prev,
            dir_coef, sigma, clip_x0, guidance_scale, B, per_sample);
    }
    CUDA_CHECK(cudaGetLastError());
}

#define INSTANTIATE(T)                                                                              \
    template void q_sample_cuda<T>(T*, const T*, const T*, const T*, const T*, int, int, cudaStream_t); \
    template void ddpm_step_cuda<T>(T*, const T*, const T*, const T*, const T*, const T*, const T*,   \
                                    const T*, T, int, int, cudaStream_t);                          \
    template void ddim_step_cuda<T>(T*, T*, const T*, const T*, const T*, const T*, const T*,         \
                                    const T*, const T*, const T*, const T*, bool, T, int, int,       \
                                    cudaStream_t);
INSTANTIATE(float)
INSTANTIATE(double)
