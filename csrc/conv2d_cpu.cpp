// conv2d_cpu.cpp: 2-D convolution on the CPU (NCHW, groups 1), forward and both backward passes.
//
//   forward          out[n,o,i,j] = b[o] + sum_{c,u,v} w[o,c,u,v] * x_pad[n,c, s*i+u, s*j+v]
//   backward input   dx[n,c,h,w]  = sum over (o,i,j,u,v) with s*i+u = h+p, s*j+v = w+p of w[o,c,u,v] * dout[n,o,i,j]
//   backward weight  dw[o,c,u,v]  = sum_{n,i,j} dout[n,o,i,j] * x_pad[n,c, s*i+u, s*j+v]
// (x_pad: x with p zeros around; s the stride). The transposed convolution needs no kernel of its
// own: its forward is backward input, its backward input is forward (see tinydiff/functional.py).
// Specification: conv2d_*_ref in tinydiff/kernels.py (im2col + one matrix product, in NumPy).
//
// Versions (the table td::CONV2D_VERSIONS in kernels_cpu.h; the first is the default):
//   "winograd" 3x3 stride-1 convolutions by Winograd's F(2x2, 3x3), 16 multiplies per 2x2 outputs
//             instead of 36, the rest as "gemm": conv2d_winograd_cpu.cpp.
//   "gemm"    im2col + our cache-blocked, register-blocked GEMM (gemm_cpu.h), without ever building
//             the im2col matrix: conv2d_gemm_cpu.cpp.
//   "direct"  the definitions above as plain loops, OpenMP over independent outputs; slow, readable.
// Their speed: benchmarks/results/cpu_conv_*.md.
//
// Test:      python -m pytest tests/test_kernels_cpu.py -q    (every version against the reference)
// Benchmark: python benchmarks/bench_conv.py [--quick]        (the ContextUnet shapes, vs NumPy, PyTorch)
#include <algorithm>
#include <stdexcept>

#include "gemm_cpu.h"
#include "kernels_cpu.h"

namespace td {

// ---------------------------------------------------------------------------------------------
// Version "direct"

template <typename T>
void conv2d_forward_direct(T* out, const T* x, const T* w, const ConvAddend<T>& add, const ConvShape& s) {
    const int64_t C = s.C, H = s.H, W = s.W, kh = s.kh, kw = s.kw;
    [[maybe_unused]] const bool parallel = s.N * s.O * s.OH * s.OW * s.C * s.kh * s.kw >= 32 * PARALLEL_MIN_WORK;
#pragma omp parallel for collapse(2) schedule(static) if (parallel)
    for (int64_t n = 0; n < s.N; ++n)
        for (int64_t o = 0; o < s.O; ++o)
            for (int64_t i = 0; i < s.OH; ++i)
                for (int64_t j = 0; j < s.OW; ++j) {
                    T sum = 0;
                    for (int64_t c = 0; c < C; ++c)
                        for (int64_t u = 0; u < kh; ++u) {
                            const int64_t h = i * s.stride - s.pad + u;
                            if (h < 0 || h >= H) continue;            // zero padding
                            for (int64_t v = 0; v < kw; ++v) {
                                const int64_t wi = j * s.stride - s.pad + v;
                                if (wi < 0 || wi >= W) continue;
                                sum += w[((o * C + c) * kh + u) * kw + v] * x[((n * C + c) * H + h) * W + wi];
                            }
                        }
                    const int64_t at = ((n * s.O + o) * s.OH + i) * s.OW + j;
                    out[at] = sum + add.per_channel(n, o, s.O) + (add.residual ? add.residual[at] : T(0));
                }
}

template <typename T>
void conv2d_backward_input_direct(T* dx, const T* dout, const T* w, const ConvShape& s) {
    const int64_t C = s.C, O = s.O, kh = s.kh, kw = s.kw, OH = s.OH, OW = s.OW;
    [[maybe_unused]] const bool parallel = s.N * s.O * s.OH * s.OW * s.C * s.kh * s.kw >= 32 * PARALLEL_MIN_WORK;
#pragma omp parallel for collapse(2) schedule(static) if (parallel)
    for (int64_t n = 0; n < s.N; ++n)
        for (int64_t c = 0; c < C; ++c)
            for (int64_t h = 0; h < s.H; ++h)
                for (int64_t wi = 0; wi < s.W; ++wi) {
                    T sum = 0;                             // gather every (i, u) with s*i + u = h + p
                    for (int64_t o = 0; o < O; ++o)
                        for (int64_t u = 0; u < kh; ++u) {
                            const int64_t a = h + s.pad - u;
                            if (a < 0 || a % s.stride || a / s.stride >= OH) continue;
                            for (int64_t v = 0; v < kw; ++v) {
                                const int64_t bb = wi + s.pad - v;
                                if (bb < 0 || bb % s.stride || bb / s.stride >= OW) continue;
                                sum += w[((o * C + c) * kh + u) * kw + v] *
                                       dout[((n * O + o) * OH + a / s.stride) * OW + bb / s.stride];
                            }
                        }
                    dx[((n * C + c) * s.H + h) * s.W + wi] = sum;
                }
}

template <typename T>
void conv2d_backward_weight_direct(T* dw, const T* dout, const T* x, const ConvShape& s) {
    const int64_t C = s.C, H = s.H, W = s.W, O = s.O, kh = s.kh, kw = s.kw;
    [[maybe_unused]] const bool parallel = s.N * s.O * s.OH * s.OW * s.C * s.kh * s.kw >= 32 * PARALLEL_MIN_WORK;
#pragma omp parallel for collapse(2) schedule(static) if (parallel)
    for (int64_t o = 0; o < O; ++o)
        for (int64_t c = 0; c < C; ++c)
            for (int64_t u = 0; u < kh; ++u)
                for (int64_t v = 0; v < kw; ++v) {
                    T sum = 0;
                    for (int64_t n = 0; n < s.N; ++n)
                        for (int64_t i = 0; i < s.OH; ++i) {
                            const int64_t h = i * s.stride - s.pad + u;
                            if (h < 0 || h >= H) continue;
                            for (int64_t j = 0; j < s.OW; ++j) {
                                const int64_t wi = j * s.stride - s.pad + v;
                                if (wi < 0 || wi >= W) continue;
                                sum += dout[((n * O + o) * s.OH + i) * s.OW + j] * x[((n * C + c) * H + h) * W + wi];
                            }
                        }
                    dw[((o * C + c) * kh + u) * kw + v] = sum;
                }
}

// ---------------------------------------------------------------------------------------------
// Launchers: look the version up by name in CONV2D_VERSIONS

template <typename T>
static const Conv2dVersion<T>& conv2d_version(const std::string& name) {
    const Conv2dVersion<T>* v = find_conv2d_version<T>(name);
    if (!v) throw std::invalid_argument("conv2d: unknown version '" + name + "'");
    return *v;
}

template <typename T>
void conv2d_forward_cpu(T* out, const T* x, const T* w, const ConvAddend<T>& add, const ConvShape& s,
                        const std::string& version) {
    conv2d_version<T>(version).forward(out, x, w, add, s);
}

template <typename T>
void conv2d_backward_input_cpu(T* dx, const T* dout, const T* w, const ConvShape& s, const std::string& version) {
    conv2d_version<T>(version).backward_input(dx, dout, w, s);
}

template <typename T>
void conv2d_backward_weight_cpu(T* dw, const T* dout, const T* x, const ConvShape& s, const std::string& version) {
    conv2d_version<T>(version).backward_weight(dw, dout, x, s);
}

#define TD_INSTANTIATE(T)                                                                                     \
    template void conv2d_forward_direct<T>(T*, const T*, const T*, const ConvAddend<T>&, const ConvShape&);  \
    template void conv2d_backward_input_direct<T>(T*, const T*, const T*, const ConvShape&);                \
    template void conv2d_backward_weight_direct<T>(T*, const T*, const T*, const ConvShape&);               \
    template void conv2d_forward_cpu<T>(T*, const T*, const T*, const ConvAddend<T>&, const ConvShape&, const std::string&); \
    template void conv2d_backward_input_cpu<T>(T*, const T*, const T*, const ConvShape&, const std::string&);    \
    template void conv2d_backward_weight_cpu<T>(T*, const T*, const T*, const ConvShape&, const std::string&);
TD_INSTANTIATE(float)
TD_INSTANTIATE(double)

}  // namespace td
