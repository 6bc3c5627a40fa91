// kernels_cpu.h: the C++ kernels of tinydiff._C, as the bindings (bind_cpu.cpp) see them.
// Arrays are C-contiguous, NCHW; outputs first, then inputs, then sizes. Each kernel writes
// every element of its output. Templates are instantiated for float and double.
#pragma once

#include <cstdint>
#include <string>

namespace td {

// ---------------------------------------------------------------------------------------------
// conv2d_cpu.cpp
//   out[n, o, i, j] = b[o] + sum_{c, u, v} w[o, c, u, v] * x_pad[n, c, s*i + u, s*j + v]

struct ConvShape {
    int64_t N, C, H, W;     // input x (N, C, H, W)
    int64_t O, kh, kw;      // weight w (O, C, kh, kw)
    int64_t stride, pad;    // the same along H and W
    int64_t OH, OW;         // output (N, O, OH, OW), OH = (H + 2 pad - kh) / stride + 1
};

// What the forward adds as it writes out[n, o, i, j]: b[o] + shift[n, o] + residual[n, o, i, j],
// each one optional (nullptr). The shift and the residual are a U-Net block's time embedding and
// skip connection, fused into the store instead of two more passes over out (F.conv2d_add).
template <typename T>
struct ConvAddend {
    const T* b = nullptr;           // (O,)
    const T* shift = nullptr;       // (N, O)
    const T* residual = nullptr;    // (N, O, OH, OW)
    T per_channel(int64_t n, int64_t o, int64_t O) const { return (b ? b[o] : T(0)) + (shift ? shift[n * O + o] : T(0)); }
};

// One version of the convolution: a name and its three passes.
template <typename T>
struct Conv2dVersion {
    const char* name;
    // out (N, O, OH, OW) <- x (N, C, H, W), w (O, C, kh, kw), plus the addend
    void (*forward)(T* out, const T* x, const T* w, const ConvAddend<T>& add, const ConvShape& s);
    // dx (N, C, H, W) <- dout (N, O, OH, OW), w (O, C, kh, kw)
    void (*backward_input)(T* dx, const T* dout, const T* w, const ConvShape& s);
    // dw (O, C, kh, kw) <- dout (N, O, OH, OW), x (N, C, H, W)
    void (*backward_weight)(T* dw, const T* dout, const T* x, const ConvShape& s);
};

// Version "gemm": conv2d_gemm_cpu.cpp
template <typename T> void conv2d_forward_gemm(T* out, const T* x, const T* w, const ConvAddend<T>& add, const ConvShape& s);
template <typename T> void conv2d_backward_input_gemm(T* dx, const T* dout, const T* w, const ConvShape& s);
template <typename T> void conv2d_backward_weight_gemm(T* dw, const T* dout, const T* x, const ConvShape& s);
// Version "winograd": conv2d_winograd_cpu.cpp (3x3 stride 1; other shapes run "gemm")
template <typename T> void conv2d_forward_winograd(T* out, const T* x, const T* w, const ConvAddend<T>& add, const ConvShape& s);
template <typename T> void conv2d_backward_input_winograd(T* dx, const T* dout, const T* w, const ConvShape& s);
template <typename T> void conv2d_backward_weight_winograd(T* dw, const T* dout, const T* x, const ConvShape& s);
// Version "direct": conv2d_cpu.cpp
template <typename T> void conv2d_forward_direct(T* out, const T* x, const T* w, const ConvAddend<T>& add, const ConvShape& s);
template <typename T> void conv2d_backward_input_direct(T* dx, const T* dout, const T* w, const ConvShape& s);
template <typename T> void conv2d_backward_weight_direct(T* dw, const T* dout, const T* x, const ConvShape& s);

// The versions, fastest (the default) first. This table is the only list: the launchers, the
// bindings (conv2d_versions()), the tests and the benchmarks all read it.
template <typename T>
inline constexpr Conv2dVersion<T> CONV2D_VERSIONS[] = {
    {"winograd", conv2d_forward_winograd<T>, conv2d_backward_input_winograd<T>, conv2d_backward_weight_winograd<T>},
    {"gemm", conv2d_forward_gemm<T>, conv2d_backward_input_gemm<T>, conv2d_backward_weight_gemm<T>},
    {"direct", conv2d_forward_direct<T>, conv2d_backward_input_direct<T>, conv2d_backward_weight_direct<T>},
};

// The version called `name`, or nullptr
template <typename T>
const Conv2dVersion<T>* find_conv2d_version(const std::string& name) {
    for (const Conv2dVersion<T>& v : CONV2D_VERSIONS<T>)
        if (name == v.name) return &v;
    return nullptr;
}

// Launchers: run version `version` (a name from the table; std::invalid_argument if none)
template <typename T>
void conv2d_forward_cpu(T* out, const T* x, const T* w, const ConvAddend<T>& add, const ConvShape& s, const std::string& version);
template <typename T>
void conv2d_backward_input_cpu(T* dx, const T* dout, const T* w, const ConvShape& s, const std::string& version);
template <typename T>
void conv2d_backward_weight_cpu(T* dw, const T* dout, const T* x, const ConvShape& s, const std::string& version);

// ---------------------------------------------------------------------------------------------
// diffusion_steps_cpu.cpp: one pass over memory; coefficient arrays have one value per sample,
// and each sample holds `per_sample` contiguous elements (numel = batch * per_sample).
// eps_uncond == nullptr: no guidance; else eps is the conditional prediction (CFG is fused in).

template <typename T>
void q_sample_cpu(T* xt, const T* x0, const T* eps, const T* sqrt_alpha_bar,
                  const T* sqrt_one_minus_alpha_bar, int64_t batch, int64_t per_sample);
template <typename T>
void ddpm_step_cpu(T* x_prev, const T* xt, const T* eps, const T* z, const T* coef_x,
                   const T* coef_eps, const T* sigma, const T* eps_uncond, T guidance_scale,
                   int64_t batch, int64_t per_sample);
template <typename T>
void ddim_step_cpu(T* x_prev, T* x0, const T* xt, const T* eps, const T* z, const T* sqrt_alpha_bar,
                   const T* sqrt_one_minus_alpha_bar, const T* sqrt_alpha_bar_prev,
                   const T* dir_coef, const T* sigma, bool clip_x0, const T* eps_uncond,
                   T guidance_scale, int64_t batch, int64_t per_sample);

// ---------------------------------------------------------------------------------------------
// linear_cpu.cpp: nn.Linear, y = x W^T + b, and its gradients (all row-major)

// y (N, O) <- x (N, I), w (O, I), b (O,) or nullptr
template <typename T> void linear_forward_cpu(T* y, const T* x, const T* w, const T* b, int64_t N, int64_t I, int64_t O);
// dx (N, I) = dout @ w <- dout (N, O), w (O, I)
template <typename T> void linear_backward_input_cpu(T* dx, const T* dout, const T* w, int64_t N, int64_t I, int64_t O);
// dw (O, I) = dout^T @ x <- dout (N, O), x (N, I)
template <typename T> void linear_backward_weight_cpu(T* dw, const T* dout, const T* x, int64_t N, int64_t I, int64_t O);

// ---------------------------------------------------------------------------------------------
// gelu_cpu.cpp: exact GELU, gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))

template <typename T> void gelu_forward_cpu(T* out, const T* x, int64_t n);
template <typename T> void gelu_backward_cpu(T* dx, const T* dout, const T* x, int64_t n);

// ---------------------------------------------------------------------------------------------
// batch_norm_cpu.cpp: training-mode batch norm of x (N, C, S), statistics per channel over (N, S)
//   xhat = (x - mean_c) inv_std_c, inv_std_c = 1 / sqrt(var_c + eps), out = xhat w_c + b_c

// out, xhat (N, C, S), mean, var (biased), inv_std (C,) <- x (N, C, S), w, b (C,) or nullptr;
// out == nullptr: only xhat is written (no affine)
template <typename T>
void batch_norm_forward_train_cpu(T* out, T* xhat, T* mean, T* var, T* inv_std, const T* x, const T* w,
                                  const T* b, double eps, int64_t N, int64_t C, int64_t S);
// dx (N, C, S), dw, db (C,) <- dout, xhat (N, C, S), inv_std (C,), w (C,) or nullptr
template <typename T>
void batch_norm_backward_train_cpu(T* dx, T* dw, T* db, const T* dout, const T* xhat, const T* inv_std,
                                   const T* w, int64_t N, int64_t C, int64_t S);

// gelu(batch norm): out = gelu(xhat w_c + b_c), the rest as batch_norm_forward_train_cpu (out != nullptr)
template <typename T>
void batch_norm_gelu_forward_train_cpu(T* out, T* xhat, T* mean, T* var, T* inv_std, const T* x, const T* w,
                                       const T* b, double eps, int64_t N, int64_t C, int64_t S);
// dx, dw, db <- dout (the gradient of gelu(y)), xhat, inv_std, w and b (C,) or nullptr
template <typename T>
void batch_norm_gelu_backward_train_cpu(T* dx, T* dw, T* db, const T* dout, const T* xhat, const T* inv_std,
                                        const T* w, const T* b, int64_t N, int64_t C, int64_t S);
// eval mode: out (N, C, S) = gelu(x scale_c + shift_c) <- x (N, C, S), scale, shift (C,)
template <typename T>
void batch_norm_gelu_forward_eval_cpu(T* out, const T* x, const T* scale, const T* shift, int64_t N, int64_t C,
                                      int64_t S);

// ---------------------------------------------------------------------------------------------
// group_norm_cpu.cpp: group norm of x (N, C, S), statistics per sample and group of K = C / G
// channels, then SiLU (silu = false: group norm alone)
//   xhat = (x - mean_ng) inv_std_ng, y = xhat w_c + b_c, out = silu(y) = y sigmoid(y)

// out (N, C, S), mean, inv_std (N, G) <- x (N, C, S), w, b (C,) or nullptr; G divides C
template <typename T>
void group_norm_silu_forward_cpu(T* out, T* mean, T* inv_std, const T* x, const T* w, const T* b, double eps,
                                 bool silu, int64_t N, int64_t C, int64_t S, int64_t G);
// dx (N, C, S), dw, db (C,) <- dout (the gradient of out), x (N, C, S), mean, inv_std (N, G), w, b (C,) or nullptr
template <typename T>
void group_norm_silu_backward_cpu(T* dx, T* dw, T* db, const T* dout, const T* x, const T* mean, const T* inv_std,
                                  const T* w, const T* b, bool silu, int64_t N, int64_t C, int64_t S, int64_t G);

// ---------------------------------------------------------------------------------------------
// adam_cpu.cpp: one Adam / AdamW step over a list of parameters, in place (Kingma & Ba Alg. 1,
// Loshchilov & Hutter Alg. 2), per element:
//   g += wd p (Adam) or p *= 1 - lr wd (AdamW);  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
//   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

struct AdamHyper {
    double lr, beta1, beta2, eps, weight_decay;
    bool decoupled;         // true: AdamW's decay of p; false: Adam's L2 term in g
    int64_t step;           // t >= 1, after this step's increment
};

// params[k], exp_avgs[k], exp_avg_sqs[k] (sizes[k]) updated in place <- grads[k] (sizes[k]),
// k < num_params; no two of the written arrays overlap, nor any of them a gradient
template <typename T>
void adam_step_cpu(T* const* params, T* const* exp_avgs, T* const* exp_avg_sqs, const T* const* grads,
                   const int64_t* sizes, int64_t num_params, const AdamHyper& h);

// ---------------------------------------------------------------------------------------------
// max_pool_cpu.cpp: max pooling over kh x kw windows at stride (sh, sw), `pad` rows and columns
// of -inf around; idx holds the window offset u*kw + v of each output's maximum

struct PoolShape {
    int64_t N, C, H, W;         // input (N, C, H, W)
    int64_t kh, kw, sh, sw, pad;
    int64_t OH, OW;             // output (N, C, OH, OW), OH = (H + 2 pad - kh) / sh + 1
};

// out, idx (N, C, OH, OW) <- x (N, C, H, W)
template <typename T>
void max_pool2d_forward_cpu(T* out, int64_t* idx, const T* x, const PoolShape& s);
// dx (N, C, H, W) <- dout, idx (N, C, OH, OW); every idx in [0, kh*kw)
template <typename T>
void max_pool2d_backward_cpu(T* dx, const T* dout, const int64_t* idx, const PoolShape& s);

// ---------------------------------------------------------------------------------------------
// philox_cpu.cpp: n consecutive words of the Philox-4x32-10 stream of key (2,), from the 128-bit
// word position counter (4,), low word first (philox_math.h)

// out (n,) <- the words themselves
void philox_uint32_cpu(uint32_t* out, const uint32_t key[2], const uint32_t counter[4], int64_t n);
// out (n,) <- standard normals, Box-Muller on the word pairs (2i, 2i + 1), computed in double
template <typename T>
void philox_normal_cpu(T* out, const uint32_t key[2], const uint32_t counter[4], int64_t n);

}  // namespace td
