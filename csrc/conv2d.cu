// conv2d.cu: 2-D convolution on the GPU, forward and both backward passes.
//
// What it computes (NCHW, weight (O, C, kh, kw), stride s, zero padding p), as
// conv2d_forward_ref / conv2d_backward_input_ref / conv2d_backward_weight_ref in tinydiff/kernels.py:
//   forward:         out[n,o,i,j] = b[o] + sum_{c,u,v} w[o,c,u,v] * x[n, c, s*i+u-p, s*j+v-p]
//   backward input:  dx[n,c,h,w]  = sum_{o,u,v} w[o,c,u,v] * dout[n, o, (h+p-u)/s, (w+p-v)/s]
//                                   (only the terms where s divides h+p-u and w+p-v)
//   backward weight: dw[o,c,u,v]  = sum_{n,i,j} dout[n,o,i,j] * x[n, c, s*i+u-p, s*j+v-p]
// x outside the image reads as 0. The transposed convolution needs no kernel of its own: its
// forward is the backward input (with its own output size H, W), see functional.py.
//
// Each pass is a matrix product C[m][n] = sum_k A[m][k] B[k][n] over implicit matrices, never
// built in memory ("implicit GEMM"):
//   pass             C (M x N)                  A (M x K)        B (K x N)                   K
//   forward          out: O x (N*OH*OW)         w                im2col(x)                   C*kh*kw
//   backward input   dx:  C x (N*H*W)           w^T              col(dout)                   O*kh*kw
//   backward weight  dw:  O x (C*kh*kw)         dout             im2col(x)^T                 N*OH*OW
//
// Versions (conv2d_versions_cuda() lists them; the first is the default):
//   "tiled" (kernel2): 64x64 output tiles per block of 256 threads, each thread 4x4 outputs; A and
//            B are read tile by tile (BK = 16) into shared memory, with the im2col index arithmetic
//            done while loading. Backward input splits dx into the s*s "phases" (h+p) mod s,
//            (w+p) mod s: in one phase only every s-th kernel tap contributes, so a stride-2 2x2
//            transposed conv does no work on zeros. Backward weight splits its long K = N*OH*OW
//            into chunks that run side by side and are summed by a second, deterministic kernel.
//   "tiled_8x8" (kernel3): the same with 64x128 tiles (BK = 8), 128 threads of 8x8 outputs each,
//            in groups of 4 neighbouring rows and columns: half the shared-memory reads per FMA.
//   "naive" (kernel1): one thread per output element, a plain loop over the sum above.
// The default was chosen before any GPU measured them: benchmarks/bench_gpu.py says which is faster.
//
// Compile alone:  nvcc -c -O3 -std=c++17 -Icsrc -arch=sm_80 csrc/conv2d.cu -o /tmp/conv2d.o
// Build:          TINYDIFF_CUDA=1 pip install -e .   (setup.py compiles every csrc/*.cu)
// Test:           pytest tests/test_cuda.py -k conv    (every version against the NumPy reference)
// Benchmark:      python benchmarks/bench_gpu.py --only conv   (GFLOP/s next to cuDNN)
#include <algorithm>

#include "cuda_check.h"
#include "kernels_cuda.h"

std::vector<std::string> conv2d_versions_cuda() { return {"tiled", "tiled_8x8", "naive"}; }

namespace {

enum { TILED = 0, TILED_8X8 = 1, NAIVE = 2 };   // indices into conv2d_versions_cuda()

// ---------------------------------------------------------------------------------------------
// kernel1: one thread per output element

template <typename T>
__global__ void conv2d_forward_kernel1(T* out, const T* x, const T* w, const T* bias, Conv2dShape s) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;       // over out (N, O, OH, OW)
    if (idx >= s.N * s.O * s.OH * s.OW) return;
    int j = idx % s.OW, i = idx / s.OW % s.OH, o = idx / (s.OW * s.OH) % s.O, n = idx / (s.OW * s.OH * s.O);
    T acc = 0;
    for (int c = 0; c < s.C; ++c)
        for (int u = 0; u < s.kh; ++u) {
            int h = i * s.stride + u - s.padding;
            if (h < 0 || h >= s.H) continue;
            for (int v = 0; v < s.kw; ++v) {
                int wi = j * s.stride + v - s.padding;
                if (wi < 0 || wi >= s.W) continue;
                acc += w[((o * s.C + c) * s.kh + u) * s.kw + v] * x[((n * s.C + c) * s.H + h) * s.W + wi];
            }
        }
    out[idx] = bias ? acc + bias[o] : acc;
}

template <typename T>
__global__ void conv2d_backward_input_kernel1(T* dx, const T* dout, const T* w, Conv2dShape s) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;       // over dx (N, C, H, W)
    if (idx >= s.N * s.C * s.H * s.W) return;
    int wi = idx % s.W, h = idx / s.W % s.H, c = idx / (s.W * s.H) % s.C, n = idx / (s.W * s.H * s.C);
    T acc = 0;
    for (int o = 0; o < s.O; ++o)
        for (int u = 0; u < s.kh; ++u) {
            int ti = h + s.padding - u;                    // = s * i for the output row i that read h
            if (ti < 0 || ti % s.stride) continue;
            int i = ti / s.stride;
            if (i >= s.OH) continue;
            for (int v = 0; v < s.kw; ++v) {
                int tj = wi + s.padding - v;
                if (tj < 0 || tj % s.stride) continue;
                int j = tj / s.stride;
                if (j >= s.OW) continue;
                acc += w[((o * s.C + c) * s.kh + u) * s.kw + v] * dout[((n * s.O + o) * s.OH + i) * s.OW + j];
            }
        }
    dx[idx] = acc;
}

template <typename T>
__global__ void conv2d_backward_weight_kernel1(T* dw, const T* dout, const T* x, Conv2dShape s) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;       // over dw (O, C, kh, kw)
    if (idx >= s.O * s.C * s.kh * s.kw) return;
    int v = idx % s.kw, u = idx / s.kw % s.kh, c = idx / (s.kw * s.kh) % s.C, o = idx / (s.kw * s.kh * s.C);
    T acc = 0;
    for (int n = 0; n < s.N; ++n)
        for (int i = 0; i < s.OH; ++i) {
            int h = i * s.stride + u - s.padding;
            if (h < 0 || h >= s.H) continue;
            for (int j = 0; j < s.OW; ++j) {
                int wi = j * s.stride + v - s.padding;
                if (wi < 0 || wi >= s.W) continue;
                acc += dout[((n * s.O + o) * s.OH + i) * s.OW + j] * x[((n * s.C + c) * s.H + h) * s.W + wi];
            }
        }
    dw[idx] = acc;
}

// ---------------------------------------------------------------------------------------------
// kernel2 and kernel3: tiled implicit GEMM. One block computes a BM x BN tile of C; a thread owns
// TM x TN of its elements, held in registers, in groups of G neighbouring rows and columns:
// thread (ty, tx) has rows a*(TY*G) + ty*G + i and columns b*(TX*G) + tx*G + j (i, j < G).
// G = 1 (kernel2): neighbouring threads read neighbouring shared-memory words and write
// neighbouring output columns. G = 4 (kernel3): each thread reads 4 neighbouring words at once
// (one 128-bit load), and more outputs per thread mean fewer shared-memory reads per FMA.

template <int BM_, int BN_, int BK_, int TM_, int TN_, int G_>
struct Tile {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_, G = G_;
    static constexpr int TY = BM / TM, TX = BN / TN, THREADS = TY * TX;
    static constexpr int PAD = G == 1 ? 1 : 4;   // A is stored k-major: padding spreads its stores over banks
};
using Tile4x4 = Tile<64, 64, 16, 4, 4, 1>;       // kernel2: 256 threads, 4 x 4 outputs each
using Tile8x8 = Tile<64, 128, 8, 8, 8, 4>;       // kernel3: 128 threads, 8 x 8 outputs each

// The block's tile of C = A B over k in [k_begin, k_end). A View supplies the implicit matrices:
//   view.A(m, k), view.B(k, n) read them (the caller's bounds are checked here), and
//   view.store(m, n, value) writes one element of C.
template <typename T, typename Tl, typename View>
__device__ void gemm_block_tile(const View& view, int M, int N, int k_begin, int k_end) {
    constexpr int BM = Tl::BM, BN = Tl::BN, BK = Tl::BK, TM = Tl::TM, TN = Tl::TN, G = Tl::G;
    __shared__ __align__(16) T As[BK][BM + Tl::PAD];   // A tile, transposed (k-major)
    __shared__ __align__(16) T Bs[BK][BN];
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    if (m0 >= M || n0 >= N) return;                        // whole block: before any __syncthreads
    const int tid = threadIdx.x, tx = tid % Tl::TX, ty = tid / Tl::TX;

    T acc[TM][TN];
    for (int a = 0; a < TM; ++a)
        for (int b = 0; b < TN; ++b) acc[a][b] = 0;

    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
        // load A[m0 : m0+BM, k0 : k0+BK]; consecutive threads take consecutive k
        for (int r = 0; r < BM * BK / Tl::THREADS; ++r) {
            int e = tid + r * Tl::THREADS, kk = e % BK, mm = e / BK;
            int m = m0 + mm, k = k0 + kk;
            As[kk][mm] = (m < M && k < k_end) ? view.A(m, k) : T(0);
        }
        // load B[k0 : k0+BK, n0 : n0+BN]; consecutive threads take consecutive n
        for (int r = 0; r < BK * BN / Tl::THREADS; ++r) {
            int e = tid + r * Tl::THREADS, nn = e % BN, kk = e / BN;
            int n = n0 + nn, k = k0 + kk;
            Bs[kk][nn] = (n < N && k < k_end) ? view.B(k, n) : T(0);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {                  // acc += A[:, kk] outer B[kk, :]
            T a_col[TM], b_row[TN];
#pragma unroll
            for (int a = 0; a < TM; ++a) a_col[a] = As[kk][a / G * (Tl::TY * G) + ty * G + a % G];
#pragma unroll
            for (int b = 0; b < TN; ++b) b_row[b] = Bs[kk][b / G * (Tl::TX * G) + tx * G + b % G];
#pragma unroll
            for (int a = 0; a < TM; ++a)
#pragma unroll
                for (int b = 0; b < TN; ++b) acc[a][b] += a_col[a] * b_row[b];
        }
        __syncthreads();
    }
    for (int a = 0; a < TM; ++a)
        for (int b = 0; b < TN; ++b) {
            int m = m0 + a / G * (Tl::TY * G) + ty * G + a % G;
            int n = n0 + b / G * (Tl::TX * G) + tx * G + b % G;
            if (m < M && n < N) view.store(m, n, acc[a][b]);
        }
}

// forward: C = out viewed as (O, N*OH*OW), A = w as (O, C*kh*kw), B = im2col(x) (C*kh*kw, N*OH*OW)
template <typename T>
struct ForwardView {
    T* out; const T* x; const T* w; const T* bias; Conv2dShape s;

    __device__ T A(int o, int k) const { return w[o * (s.C * s.kh * s.kw) + k]; }
    __device__ T B(int k, int col) const {
        int c = k / (s.kh * s.kw), u = k / s.kw % s.kh, v = k % s.kw;
        int n = col / (s.OH * s.OW), i = col / s.OW % s.OH, j = col % s.OW;
        int h = i * s.stride + u - s.padding, wi = j * s.stride + v - s.padding;
        return (h >= 0 && h < s.H && wi >= 0 && wi < s.W) ? x[((n * s.C + c) * s.H + h) * s.W + wi] : T(0);
    }
    __device__ void store(int o, int col, T value) const {
        int n = col / (s.OH * s.OW), pixel = col % (s.OH * s.OW);
        out[(n * s.O + o) * (s.OH * s.OW) + pixel] = bias ? value + bias[o] : value;
    }
};

// backward input, one phase (ph, pw) = ((h+p) mod s, (w+p) mod s): the rows h = h0 + s*hq with
// h0 = (ph - p) mod s. Only the taps u = ph + s*tu (tu < Tu) reach them, from output row
// i = (h+p-u)/s = qh + hq - tu, qh = (h0 + p - ph)/s. Likewise for columns.
// C = dx of this phase (C, N*Hq*Wq), A[c][(o,tu,tv)] = w[o,c,u,v], B[(o,tu,tv)][(n,hq,wq)] = dout[n,o,i,j]
template <typename T>
struct BackwardInputView {
    T* dx; const T* dout; const T* w; Conv2dShape s;
    int ph, pw, h0, w0, Hq, Wq, Tu, Tv, qh, qw;

    __device__ BackwardInputView(T* dx_, const T* dout_, const T* w_, const Conv2dShape& s_, int ph_, int pw_)
        : dx(dx_), dout(dout_), w(w_), s(s_), ph(ph_), pw(pw_) {
        h0 = ((ph - s.padding) % s.stride + s.stride) % s.stride;
        w0 = ((pw - s.padding) % s.stride + s.stride) % s.stride;
        Hq = h0 < s.H ? (s.H - h0 + s.stride - 1) / s.stride : 0;
        Wq = w0 < s.W ? (s.W - w0 + s.stride - 1) / s.stride : 0;
        Tu = ph < s.kh ? (s.kh - ph + s.stride - 1) / s.stride : 0;
        Tv = pw < s.kw ? (s.kw - pw + s.stride - 1) / s.stride : 0;
        qh = (h0 + s.padding - ph) / s.stride;
        qw = (w0 + s.padding - pw) / s.stride;
    }
    __device__ T A(int c, int k) const {
        int o = k / (Tu * Tv), u = ph + s.stride * (k / Tv % Tu), v = pw + s.stride * (k % Tv);
        return w[((o * s.C + c) * s.kh + u) * s.kw + v];
    }
    __device__ T B(int k, int col) const {
        int o = k / (Tu * Tv), tu = k / Tv % Tu, tv = k % Tv;
        int n = col / (Hq * Wq), hq = col / Wq % Hq, wq = col % Wq;
        int i = qh + hq - tu, j = qw + wq - tv;
        return (i >= 0 && i < s.OH && j >= 0 && j < s.OW) ? dout[((n * s.O + o) * s.OH + i) * s.OW + j] : T(0);
    }
    __device__ void store(int c, int col, T value) const {
        int n = col / (Hq * Wq), h = h0 + s.stride * (col / Wq % Hq), wi = w0 + s.stride * (col % Wq);
        dx[((n * s.C + c) * s.H + h) * s.W + wi] = value;
    }
};

// backward weight: C = dw (O, C*kh*kw), A = dout as (O, N*OH*OW), B = im2col(x)^T (N*OH*OW, C*kh*kw).
// With split-K, chunk z of the sum goes to partial[z] (then summed); without, straight into dw.
template <typename T>
struct BackwardWeightView {
    T* partial; const T* dout; const T* x; Conv2dShape s;

    __device__ T A(int o, int k) const {
        int n = k / (s.OH * s.OW), pixel = k % (s.OH * s.OW);
        return dout[(n * s.O + o) * (s.OH * s.OW) + pixel];
    }
    __device__ T B(int k, int col) const {
        int n = k / (s.OH * s.OW), i = k / s.OW % s.OH, j = k % s.OW;
        int c = col / (s.kh * s.kw), u = col / s.kw % s.kh, v = col % s.kw;
        int h = i * s.stride + u - s.padding, wi = j * s.stride + v - s.padding;
        return (h >= 0 && h < s.H && wi >= 0 && wi < s.W) ? x[((n * s.C + c) * s.H + h) * s.W + wi] : T(0);
    }
    __device__ void store(int o, int col, T value) const {
        int size = s.O * s.C * s.kh * s.kw;
        partial[blockIdx.z * size + o * (s.C * s.kh * s.kw) + col] = value;
    }
};

// kernel2 = the kernels below with Tile4x4, kernel3 = with Tile8x8
template <typename T, typename Tl>
__global__ void __launch_bounds__(Tl::THREADS)
conv2d_forward_tiled(T* out, const T* x, const T* w, const T* bias, Conv2dShape s) {
    ForwardView<T> view{out, x, w, bias, s};
    gemm_block_tile<T, Tl>(view, s.O, s.N * s.OH * s.OW, 0, s.C * s.kh * s.kw);
}

template <typename T, typename Tl>
__global__ void __launch_bounds__(Tl::THREADS)
conv2d_backward_input_tiled(T* dx, const T* dout, const T* w, Conv2dShape s) {
    BackwardInputView<T> view(dx, dout, w, s, (int)blockIdx.z % s.stride, (int)blockIdx.z / s.stride);
    gemm_block_tile<T, Tl>(view, s.C, s.N * view.Hq * view.Wq, 0, s.O * view.Tu * view.Tv);
}

template <typename T, typename Tl>
__global__ void __launch_bounds__(Tl::THREADS)
conv2d_backward_weight_tiled(T* partial, const T* dout, const T* x, Conv2dShape s, int chunk) {
    BackwardWeightView<T> view{partial, dout, x, s};
    int K = s.N * s.OH * s.OW;
    int k_begin = min(K, (int)blockIdx.z * chunk), k_end = min(K, k_begin + chunk);
    gemm_block_tile<T, Tl>(view, s.O, s.C * s.kh * s.kw, k_begin, k_end);
}

// dw[e] = sum_z partial[z][e], always in the same order: the result does not depend on timing
template <typename T>
__global__ void sum_partials_kernel(T* dw, const T* partial, int splits, int size) {
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= size) return;
    T acc = 0;
    for (int z = 0; z < splits; ++z) acc += partial[z * size + e];
    dw[e] = acc;
}

// How many chunks the tiled backward weight cuts K = N*OH*OW into: enough blocks for about two
// per SM, but each chunk at least 128 long.
template <typename Tl>
int backward_weight_splits(const Conv2dShape& s, int num_sms) {
    long long tiles = (long long)ceil_div(s.O, Tl::BM) * ceil_div((long long)s.C * s.kh * s.kw, Tl::BN);
    long long K = (long long)s.N * s.OH * s.OW;
    long long want = (2LL * std::max(num_sms, 1) + tiles - 1) / tiles;
    long long most = (K + 127) / 128;
    return (int)std::max(1LL, std::min({want, most, 1024LL}));
}

const int THREADS = 256;   // for the one-thread-per-element kernels

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers

template <typename T, typename Tl>
void conv2d_forward_tiled_launch(T* out, const T* x, const T* w, const T* bias, const Conv2dShape& s,
                                 cudaStream_t stream) {
    dim3 grid(ceil_div((long long)s.N * s.OH * s.OW, Tl::BN), ceil_div(s.O, Tl::BM));
    conv2d_forward_tiled<T, Tl><<<grid, Tl::THREADS, 0, stream>>>(out, x, w, bias, s);
}

template <typename T>
void conv2d_forward_cuda(T* out, const T* x, const T* w, const T* bias, const Conv2dShape& s,
                         int version, cudaStream_t stream) {
    int total = s.N * s.O * s.OH * s.OW;
    if (total == 0) return;
    if (version == NAIVE)
        conv2d_forward_kernel1<T><<<ceil_div(total, THREADS), THREADS, 0, stream>>>(out, x, w, bias, s);
    else if (version == TILED_8X8)
        conv2d_forward_tiled_launch<T, Tile8x8>(out, x, w, bias, s, stream);
    else
        conv2d_forward_tiled_launch<T, Tile4x4>(out, x, w, bias, s, stream);
    CUDA_CHECK(cudaGetLastError());
}

template <typename T, typename Tl>
void conv2d_backward_input_tiled_launch(T* dx, const T* dout, const T* w, const Conv2dShape& s, cudaStream_t stream) {
    long long most_columns = (long long)s.N * ceil_div(s.H, s.stride) * ceil_div(s.W, s.stride);
    dim3 grid(ceil_div(most_columns, Tl::BN), ceil_div(s.C, Tl::BM), s.stride * s.stride);   // z: the phases
    conv2d_backward_input_tiled<T, Tl><<<grid, Tl::THREADS, 0, stream>>>(dx, dout, w, s);
}

template <typename T>
void conv2d_backward_input_cuda(T* dx, const T* dout, const T* w, const Conv2dShape& s, int version,
                                cudaStream_t stream) {
    int total = s.N * s.C * s.H * s.W;
    if (total == 0) return;
    if (version == NAIVE || (long long)s.stride * s.stride > 65535)   // grid.z: one per phase, at most 65535
        conv2d_backward_input_kernel1<T><<<ceil_div(total, THREADS), THREADS, 0, stream>>>(dx, dout, w, s);
    else if (version == TILED_8X8)
        conv2d_backward_input_tiled_launch<T, Tile8x8>(dx, dout, w, s, stream);
    else
        conv2d_backward_input_tiled_launch<T, Tile4x4>(dx, dout, w, s, stream);
    CUDA_CHECK(cudaGetLastError());
}

int backward_weight_splits_for(const Conv2dShape& s, int version, int num_sms) {
    if (version == NAIVE) return 1;
    return version == TILED_8X8 ? backward_weight_splits<Tile8x8>(s, num_sms) : backward_weight_splits<Tile4x4>(s, num_sms);
}

long long conv2d_backward_weight_workspace(const Conv2dShape& s, int version, int num_sms) {
    int splits = backward_weight_splits_for(s, version, num_sms);
    return splits > 1 ? (long long)splits * s.O * s.C * s.kh * s.kw : 0;
}

template <typename T, typename Tl>
void conv2d_backward_weight_tiled_launch(T* partial, const T* dout, const T* x, const Conv2dShape& s, int splits,
                                         cudaStream_t stream) {
    int K = s.N * s.OH * s.OW;
    int chunk = ceil_div(ceil_div(K, splits), Tl::BK) * Tl::BK;
    dim3 grid(ceil_div((long long)s.C * s.kh * s.kw, Tl::BN), ceil_div(s.O, Tl::BM), splits);   // z: the chunks
    conv2d_backward_weight_tiled<T, Tl><<<grid, Tl::THREADS, 0, stream>>>(partial, dout, x, s, chunk);
}

template <typename T>
void conv2d_backward_weight_cuda(T* dw, const T* dout, const T* x, const Conv2dShape& s, int version,
                                 T* workspace, int num_sms, cudaStream_t stream) {
    int size = s.O * s.C * s.kh * s.kw;
    if (size == 0) return;
    if (version == NAIVE) {
        conv2d_backward_weight_kernel1<T><<<ceil_div(size, THREADS), THREADS, 0, stream>>>(dw, dout, x, s);
        CUDA_CHECK(cudaGetLastError());
        return;
    }
    int splits = backward_weight_splits_for(s, version, num_sms);
    T* partial = splits > 1 ? workspace : dw;
    if (version == TILED_8X8)
        conv2d_backward_weight_tiled_launch<T, Tile8x8>(partial, dout, x, s, splits, stream);
    else
        conv2d_backward_weight_tiled_launch<T, Tile4x4>(partial, dout, x, s, splits, stream);
    CUDA_CHECK(cudaGetLastError());
    if (splits > 1) {
        sum_partials_kernel<T><<<ceil_div(size, THREADS), THREADS, 0, stream>>>(dw, workspace, splits, size);
        CUDA_CHECK(cudaGetLastError());
    }
}

#define INSTANTIATE(T)                                                                              \
    template void conv2d_forward_cuda<T>(T*, const T*, const T*, const T*, const Conv2dShape&, int,  \
                                         cudaStream_t);                                             \
    template void conv2d_backward_input_cuda<T>(T*, const T*, const T*, const Conv2dShape&, int,     \
                                                cudaStream_t);                                      \
    template void conv2d_backward_weight_cuda<T>(T*, const T*, const T*, const Conv2dShape&, int, T*, \
                                                 int, cudaStream_t);
INSTANTIATE(float)
INSTANTIATE(double)
