// kernels_cuda.h: the launchers of the CUDA kernels, as bind_cuda.cpp calls them.
// Each launcher checks its launch with CUDA_CHECK and runs on the given stream (CuPy's current
// one); pointers are device pointers to C-contiguous arrays, already checked by the binding.
// Templates are instantiated for float and double in the .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <vector>
#include <string>

// ---------------------------------------------------------------------------------------------
// conv2d.cu: NCHW convolution, weight (O, C, kh, kw), zero padding, the same stride on H and W.

struct Conv2dShape {
    int N, C, H, W;      // input x (N, C, H, W)
    int O, kh, kw;       // weight w (O, C, kh, kw)
    int OH, OW;          // output (N, O, OH, OW)
    int stride, padding;
};

// The names of the versions (the table CONV2D_VERSIONS_CUDA in conv2d.cu); the first is the
// default. Every launcher below takes one of them as `version` (std::invalid_argument if unknown).
std::vector<std::string> conv2d_versions_cuda();

// How many elements of scratch memory conv2d_forward_cuda needs (0 if none): where the output has
// too few tiles to fill the GPU, implicit_gemm splits the reduction over C*kh*kw into chunks.
long long conv2d_forward_workspace(const Conv2dShape& s, const std::string& version, int num_sms);

// out (N, O, OH, OW) = conv(x (N, C, H, W), w (O, C, kh, kw)) + bias (O,) or nullptr;
// workspace as sized above
template <typename T>
void conv2d_forward_cuda(T* out, const T* x, const T* w, const T* bias, const Conv2dShape& s,
                         const std::string& version, T* workspace, int num_sms, cudaStream_t stream);

// dx (N, C, H, W) from dout (N, O, OH, OW) and w (O, C, kh, kw)
template <typename T>
void conv2d_backward_input_cuda(T* dx, const T* dout, const T* w, const Conv2dShape& s, const std::string& version,
                                cudaStream_t stream);

// How many elements of scratch memory conv2d_backward_weight_cuda needs (0 if none): the tiled
// version splits the long reduction over N*OH*OW into chunks that run side by side.
long long conv2d_backward_weight_workspace(const Conv2dShape& s, const std::string& version, int num_sms);

// dw (O, C, kh, kw) from dout (N, O, OH, OW) and x (N, C, H, W); workspace as sized above
template <typename T>
void conv2d_backward_weight_cuda(T* dw, const T* dout, const T* x, const Conv2dShape& s, const std::string& version,
                                 T* workspace, int num_sms, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// diffusion_steps.cu: B samples of `per_sample` elements each; coefficients are (B,) arrays.
// eps_uncond may be nullptr (no guidance: eps is used as it is).

template <typename T>
void q_sample_cuda(T* xt, const T* x0, const T* eps, const T* sqrt_alpha_bar,
                   const T* sqrt_one_minus_alpha_bar, int B, int per_sample, cudaStream_t stream);

template <typename T>
void ddpm_step_cuda(T* x_prev, const T* xt, const T* eps, const T* eps_uncond, const T* z,
                    const T* coef_x, const T* coef_eps, const T* sigma, T guidance_scale,
                    int B, int per_sample, cudaStream_t stream);

template <typename T>
void ddim_step_cuda(T* x_prev, T* x0, const T* xt, const T* eps, const T* eps_uncond, const T* z,
                    const T* sqrt_alpha_bar, const T* sqrt_one_minus_alpha_bar,
                    const T* sqrt_alpha_bar_prev, const T* dir_coef, const T* sigma, bool clip_x0,
                    T guidance_scale, int B, int per_sample, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// gelu.cu: exact (erf) GELU on n elements.

template <typename T>
void gelu_forward_cuda(T* out, const T* x, long long n, cudaStream_t stream);

template <typename T>
void gelu_backward_cuda(T* dx, const T* dout, const T* x, long long n, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// philox.cu: n consecutive words of the Philox-4x32-10 stream of key (2,), from the 128-bit word
// position counter (4,), low word first (philox_math.h); key and counter are host memory.

// out (n,) <- the words themselves
void philox_uint32_cuda(uint32_t* out, const uint32_t key[2], const uint32_t counter[4], long long n, cudaStream_t stream);

// out (n,) <- standard normals, Box-Muller on the word pairs (2i, 2i + 1), computed in double
template <typename T>
void philox_normal_cuda(T* out, const uint32_t key[2], const uint32_t counter[4], long long n, cudaStream_t stream);
