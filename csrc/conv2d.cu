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
// Kernels are named conv2d_<pass>_<family>_kernel; the families are naive, tiled and
// implicit_gemm. A version is a row of CONV2D_VERSIONS_CUDA below: a family with its tile shape.
// conv2d_versions_cuda() lists the rows; the first is the default. Simplest last:
//   "implicit_gemm"  the tiled product with its overheads removed. No division in the k loop: a
//            thread loads the same rows of A and columns of B at every k step, so their (n, i, j)
//            is split once; what depends on k is split by FastDiv (multiply and shift, divisors
//            prepared on the host). The next tiles come from global memory into registers while the
//            current ones are multiplied (two shared buffers, one barrier per step). Tiles: 64 x 128,
//            BK = 8, 128 threads of 8 x 8 outputs (the layers have 64 or 128 channels, so M = 64
//            wastes nothing); 16 x 128 with 4 x 4 each where M <= 16 (the image's 3 channels),
//            instead of a 64-row tile of which 61 rows are thrown away. Backward input with
//            stride > 4 (more than 16 phases) runs the "tiled" kernel. A forward with too few output
//            tiles to fill the GPU splits K = C*kh*kw too (split-K, like backward weight): partial
//            sums side by side, then summed in a fixed order, plus bias.
//   "tiled"  64x64 output tiles per block of 256 threads, each thread 4x4 outputs; A and B are read
//            tile by tile (BK = 16) into shared memory, with the im2col index arithmetic done while
//            loading. Backward input splits dx into the s*s "phases" (h+p) mod s, (w+p) mod s
//            (phase_of): in one phase only every s-th kernel tap contributes, so a stride-2 2x2
//            transposed conv does no work on zeros. Backward weight splits its long K = N*OH*OW
//            into chunks that run side by side and are summed by a second, deterministic kernel.
//   "tiled_8x8"  the tiled kernels with 64x128 tiles (BK = 8), 128 threads of 8x8 outputs each, in
//            groups of 4 neighbouring rows and columns: half the shared-memory reads per FMA.
//   "naive"  one thread per output element, a plain loop over the sum above.
// Shapes whose matrices or single images pass 2^31 elements run on "naive" (all long long).
// Their speed next to cuDNN: benchmarks/results/gpu_*.md (bench_gpu.py --only conv).
//
// One file for the three families: they share the shape checks (fits_int), the tile shapes, the
// phase arithmetic of backward input and the split-K sum, and the table below names them all.
//
// Compile alone:  nvcc -c -O3 -std=c++17 -Icsrc -arch=sm_90 --resource-usage csrc/conv2d.cu -o /tmp/conv2d.o
// Build:          TINYDIFF_CUDA=1 pip install -e .   (setup.py compiles every csrc/*.cu)
// Test:           pytest tests/test_cuda.py -k conv    (every version against the NumPy reference)
// Benchmark:      python benchmarks/bench_gpu.py --only conv   (GFLOP/s next to cuDNN)
#include <algorithm>
#include <stdexcept>

#include "cuda_check.h"
#include "kernels_cuda.h"

namespace {

// ---------------------------------------------------------------------------------------------
// Family "naive": one thread per output element

template <typename T>
__global__ void conv2d_forward_naive_kernel(T* out, const T* x, const T* w, const T* bias, Conv2dShape s) {
    long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;   // over out (N, O, OH, OW)
    if (idx >= (long long)s.N * s.O * s.OH * s.OW) return;
    int j = idx % s.OW, i = idx / s.OW % s.OH, o = idx / (s.OW * s.OH) % s.O;
    long long n = idx / ((long long)s.OW * s.OH * s.O);
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
__global__ void conv2d_backward_input_naive_kernel(T* dx, const T* dout, const T* w, Conv2dShape s) {
    long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;   // over dx (N, C, H, W)
    if (idx >= (long long)s.N * s.C * s.H * s.W) return;
    int wi = idx % s.W, h = idx / s.W % s.H, c = idx / (s.W * s.H) % s.C;
    long long n = idx / ((long long)s.W * s.H * s.C);
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
__global__ void conv2d_backward_weight_naive_kernel(T* dw, const T* dout, const T* x, Conv2dShape s) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x;       // over dw (O, C, kh, kw)
    if (idx >= s.O * s.C * s.kh * s.kw) return;
    int v = idx % s.kw, u = idx / s.kw % s.kh, c = idx / (s.kw * s.kh) % s.C, o = idx / (s.kw * s.kh * s.C);
    T acc = 0;
    for (long long n = 0; n < s.N; ++n)
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
// Shared by the tiled families: fast division, and the stride phases of backward input

// q = n / d, r = n % d for 0 <= n < 2^31, 1 <= d < 2^31, as q = (n * mul) >> shift with
// shift = 31 + ceil(log2 d), mul = ceil(2^shift / d) < 2^32 (Granlund & Montgomery 1994; CUTLASS's
// FastDivmod): the error of mul is below d <= 2^(shift-31), too little to change q for n < 2^31.
struct FastDiv {
    int d;
    unsigned mul;
    int shift;
    FastDiv() = default;
    explicit FastDiv(int d_) : d(d_) {
        int l = 0;
        while ((1LL << l) < d) ++l;
        shift = 31 + l;
        mul = (unsigned)(((1ULL << shift) + d - 1) / d);
    }
    __device__ __forceinline__ int div(int n) const { return (int)(((unsigned long long)(unsigned)n * mul) >> shift); }
    __device__ __forceinline__ void divmod(int n, int& q, int& r) const { q = div(n); r = n - q * d; }
};

// Backward input, one stride phase z = ph + s*pw, (ph, pw) = ((h+p) mod s, (w+p) mod s): the rows
// h = h0 + s*hq (hq < Hq) with h0 = (ph - p) mod s. Only the taps u = ph + s*tu (tu < Tu) reach
// them, from output row i = (h+p-u)/s = qh + hq - tu, qh = (h0 + p - ph)/s. Likewise for columns.
// The "tiled" kernels compute it per block; "implicit_gemm" on the host, with FastDiv divisors.
struct Phase {
    int ph, pw, h0, w0, Hq, Wq, Tu, Tv, qh, qw;
    FastDiv tutv, tv, hqwq, wq;                            // of Tu*Tv, Tv, Hq*Wq, Wq; set by phases_with_divisors
};

__host__ __device__ inline Phase phase_of(const Conv2dShape& s, int z) {
    Phase f{};
    f.ph = z % s.stride, f.pw = z / s.stride;
    f.h0 = ((f.ph - s.padding) % s.stride + s.stride) % s.stride;
    f.w0 = ((f.pw - s.padding) % s.stride + s.stride) % s.stride;
    f.Hq = f.h0 < s.H ? (s.H - f.h0 + s.stride - 1) / s.stride : 0;
    f.Wq = f.w0 < s.W ? (s.W - f.w0 + s.stride - 1) / s.stride : 0;
    f.Tu = f.ph < s.kh ? (s.kh - f.ph + s.stride - 1) / s.stride : 0;
    f.Tv = f.pw < s.kw ? (s.kw - f.pw + s.stride - 1) / s.stride : 0;
    f.qh = (f.h0 + s.padding - f.ph) / s.stride;
    f.qw = (f.w0 + s.padding - f.pw) / s.stride;
    return f;
}

const int MAX_PHASES = 16;                                 // implicit_gemm: stride <= 4; larger strides run "tiled"
struct Phases { Phase p[MAX_PHASES]; };                    // a kernel argument: phase blockIdx.z is p[z]

// ---------------------------------------------------------------------------------------------
// Family "tiled": tiled implicit GEMM. One block computes a BM x BN tile of C; a thread owns
// TM x TN of its elements, held in registers, in groups of G neighbouring rows and columns:
// thread (ty, tx) has rows a*(TY*G) + ty*G + i and columns b*(TX*G) + tx*G + j (i, j < G).
// G = 1 ("tiled"): neighbouring threads read neighbouring shared-memory words and write
// neighbouring output columns. G = 4 ("tiled_8x8"): each thread reads 4 neighbouring words at once
// (one 128-bit load), and more outputs per thread mean fewer shared-memory reads per FMA.

template <int BM_, int BN_, int BK_, int TM_, int TN_, int G_>
struct Tile {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_, G = G_;
    static constexpr int TY = BM / TM, TX = BN / TN, THREADS = TY * TX;
    static constexpr int PAD = G == 1 ? 1 : 4;   // A is stored k-major: padding spreads its stores over banks
};
using Tile4x4 = Tile<64, 64, 16, 4, 4, 1>;       // "tiled": 256 threads, 4 x 4 outputs each
using Tile8x8 = Tile<64, 128, 8, 8, 8, 4>;       // "tiled_8x8": 128 threads, 8 x 8 outputs each

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
        return (h >= 0 && h < s.H && wi >= 0 && wi < s.W) ? x[(((long long)n * s.C + c) * s.H + h) * s.W + wi] : T(0);
    }
    __device__ void store(int o, int col, T value) const {
        int n = col / (s.OH * s.OW), pixel = col % (s.OH * s.OW);
        out[((long long)n * s.O + o) * (s.OH * s.OW) + pixel] = bias ? value + bias[o] : value;
    }
};

// backward input, one phase (ph, pw) = ((h+p) mod s, (w+p) mod s): see phase_of.
// C = dx of this phase (C, N*Hq*Wq), A[c][(o,tu,tv)] = w[o,c,u,v], B[(o,tu,tv)][(n,hq,wq)] = dout[n,o,i,j]
template <typename T>
struct BackwardInputView {
    T* dx; const T* dout; const T* w; Conv2dShape s; Phase f;

    __device__ T A(int c, int k) const {
        int o = k / (f.Tu * f.Tv), u = f.ph + s.stride * (k / f.Tv % f.Tu), v = f.pw + s.stride * (k % f.Tv);
        return w[((o * s.C + c) * s.kh + u) * s.kw + v];
    }
    __device__ T B(int k, int col) const {
        int o = k / (f.Tu * f.Tv), tu = k / f.Tv % f.Tu, tv = k % f.Tv;
        int n = col / (f.Hq * f.Wq), hq = col / f.Wq % f.Hq, wq = col % f.Wq;
        int i = f.qh + hq - tu, j = f.qw + wq - tv;
        return (i >= 0 && i < s.OH && j >= 0 && j < s.OW) ? dout[(((long long)n * s.O + o) * s.OH + i) * s.OW + j] : T(0);
    }
    __device__ void store(int c, int col, T value) const {
        int n = col / (f.Hq * f.Wq), h = f.h0 + s.stride * (col / f.Wq % f.Hq), wi = f.w0 + s.stride * (col % f.Wq);
        dx[(((long long)n * s.C + c) * s.H + h) * s.W + wi] = value;
    }
};

// backward weight: C = dw (O, C*kh*kw), A = dout as (O, N*OH*OW), B = im2col(x)^T (N*OH*OW, C*kh*kw).
// With split-K, chunk z of the sum goes to partial[z] (then summed); without, straight into dw.
template <typename T>
struct BackwardWeightView {
    T* partial; const T* dout; const T* x; Conv2dShape s;

    __device__ T A(int o, int k) const {
        int n = k / (s.OH * s.OW), pixel = k % (s.OH * s.OW);
        return dout[((long long)n * s.O + o) * (s.OH * s.OW) + pixel];
    }
    __device__ T B(int k, int col) const {
        int n = k / (s.OH * s.OW), i = k / s.OW % s.OH, j = k % s.OW;
        int c = col / (s.kh * s.kw), u = col / s.kw % s.kh, v = col % s.kw;
        int h = i * s.stride + u - s.padding, wi = j * s.stride + v - s.padding;
        return (h >= 0 && h < s.H && wi >= 0 && wi < s.W) ? x[(((long long)n * s.C + c) * s.H + h) * s.W + wi] : T(0);
    }
    __device__ void store(int o, int col, T value) const {
        long long size = s.O * s.C * s.kh * s.kw;
        partial[blockIdx.z * size + o * (s.C * s.kh * s.kw) + col] = value;
    }
};

// "tiled" = the kernels below with Tile4x4, "tiled_8x8" = with Tile8x8
template <typename T, typename Tl>
__global__ void __launch_bounds__(Tl::THREADS)
conv2d_forward_tiled_kernel(T* out, const T* x, const T* w, const T* bias, Conv2dShape s) {
    ForwardView<T> view{out, x, w, bias, s};
    gemm_block_tile<T, Tl>(view, s.O, s.N * s.OH * s.OW, 0, s.C * s.kh * s.kw);
}

template <typename T, typename Tl>
__global__ void __launch_bounds__(Tl::THREADS)
conv2d_backward_input_tiled_kernel(T* dx, const T* dout, const T* w, Conv2dShape s) {
    BackwardInputView<T> view{dx, dout, w, s, phase_of(s, blockIdx.z)};
    gemm_block_tile<T, Tl>(view, s.C, s.N * view.f.Hq * view.f.Wq, 0, s.O * view.f.Tu * view.f.Tv);
}

template <typename T, typename Tl>
__global__ void __launch_bounds__(Tl::THREADS)
conv2d_backward_weight_tiled_kernel(T* partial, const T* dout, const T* x, Conv2dShape s, int chunk) {
    BackwardWeightView<T> view{partial, dout, x, s};
    int K = s.N * s.OH * s.OW;
    int k_begin = min(K, (int)blockIdx.z * chunk), k_end = min(K, k_begin + chunk);
    gemm_block_tile<T, Tl>(view, s.O, s.C * s.kh * s.kw, k_begin, k_end);
}

// ---------------------------------------------------------------------------------------------
// Family "implicit_gemm": the same tiled product, with the overheads of "tiled" removed.
//  1. No division in the k loop but two multiplies. A thread loads the same rows of A and columns
//     of B at every k step, so their decomposition (n, i, j) is done once, before the loop; the
//     k-dependent part (c, u, v) is split by FastDiv, divisors prepared on the host.
//  2. Loads overlap math: the next tiles come from global memory into registers while the
//     current ones, in shared memory, are multiplied; two shared buffers, one barrier per step.
//  3. Rows of A or columns of B past M or N are clamped, not tested: they are never stored.

// How a block's threads share the loading of a tile of EXT rows (of A: m; of B: n) by BK values of k.
// K_FAST: consecutive threads take consecutive k (where memory runs along k), else 32
// consecutive rows. Thread t loads rows x(t, j), j < NX, at k = k0 + kk(t, i), i < NK: the same
// rows at every step, and few k's (NK = 1 or 2) to split.
template <int EXT, int BK, int THREADS, bool K_FAST>
struct Share {
    static constexpr int F = K_FAST ? BK : 32, S = THREADS / F;   // threads along the fast, slow side
    static constexpr int NK = K_FAST ? 1 : BK / S, NX = K_FAST ? EXT / S : EXT / F;
    static_assert(THREADS % F == 0 && (K_FAST ? EXT % S == 0 : EXT % F == 0 && BK % S == 0), "tile shape");
    __device__ static int kk(int t, int i) { return K_FAST ? t % F : t / F + i * S; }
    __device__ static int x(int t, int j) { return K_FAST ? t / F + j * S : t % F + j * F; }
};

// 4 neighbouring elements of shared memory (16-byte aligned) in 128-bit loads
__device__ __forceinline__ void load4(float* to, const float* from) {
    float4 v = *reinterpret_cast<const float4*>(from);
    to[0] = v.x, to[1] = v.y, to[2] = v.z, to[3] = v.w;
}
__device__ __forceinline__ void load4(double* to, const double* from) {
    double2 v = *reinterpret_cast<const double2*>(from), u = *reinterpret_cast<const double2*>(from + 2);
    to[0] = v.x, to[1] = v.y, to[2] = u.x, to[3] = u.y;
}

// The block's tile of C = A B over k in [k_begin, k_end). The View supplies the implicit matrices
// in three parts each: view.a_row(m) (once per thread and row), view.a_step(k, valid) (once per k
// step), view.a(row, step) (the element, 0 where !valid); likewise b_col, b_step, b; and
// view.c_col(n), view.store(col, m, value) write C. View::B_K_FAST: B runs along k in memory.
template <typename T, typename Tl, typename View>
__device__ void gemm_block_tile_implicit(const View& view, int M, int N, int k_begin, int k_end) {
    constexpr int BM = Tl::BM, BN = Tl::BN, BK = Tl::BK, TM = Tl::TM, TN = Tl::TN, TX = Tl::TX, TY = Tl::TY;
    static_assert(Tl::G == 4, "implicit_gemm reads 4 neighbouring rows and columns at once");
    using LA = Share<BM, BK, Tl::THREADS, true>;
    using LB = Share<BN, BK, Tl::THREADS, View::B_K_FAST>;
    __shared__ __align__(16) T As[2][BK][BM + Tl::PAD];   // A tile, k-major; PAD = 4: stores spread over banks
    __shared__ __align__(16) T Bs[2][BK][BN + Tl::PAD];
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    if (m0 >= M || n0 >= N) return;                        // whole block: before any __syncthreads
    const int t = threadIdx.x, tx = t % TX, ty = t / TX;

    typename View::ARow arow[LA::NX];                      // this thread's rows of A, columns of B
    typename View::BCol bcol[LB::NX];
#pragma unroll
    for (int j = 0; j < LA::NX; ++j) arow[j] = view.a_row(min(m0 + LA::x(t, j), M - 1));
#pragma unroll
    for (int j = 0; j < LB::NX; ++j) bcol[j] = view.b_col(min(n0 + LB::x(t, j), N - 1));

    T a_next[LA::NK][LA::NX], b_next[LB::NK][LB::NX];      // the next tiles, on their way
    auto load = [&](int k0) {
#pragma unroll
        for (int i = 0; i < LA::NK; ++i) {
            int k = k0 + LA::kk(t, i);
            auto step = view.a_step(k, k < k_end);
#pragma unroll
            for (int j = 0; j < LA::NX; ++j) a_next[i][j] = view.a(arow[j], step);
        }
#pragma unroll
        for (int i = 0; i < LB::NK; ++i) {
            int k = k0 + LB::kk(t, i);
            auto step = view.b_step(k, k < k_end);
#pragma unroll
            for (int j = 0; j < LB::NX; ++j) b_next[i][j] = view.b(bcol[j], step);
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int i = 0; i < LA::NK; ++i)
#pragma unroll
            for (int j = 0; j < LA::NX; ++j) As[buf][LA::kk(t, i)][LA::x(t, j)] = a_next[i][j];
#pragma unroll
        for (int i = 0; i < LB::NK; ++i)
#pragma unroll
            for (int j = 0; j < LB::NX; ++j) Bs[buf][LB::kk(t, i)][LB::x(t, j)] = b_next[i][j];
    };

    T acc[TM][TN];
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int b = 0; b < TN; ++b) acc[a][b] = 0;

    load(k_begin);
    store(0);
    __syncthreads();
    int buf = 0;
    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
        const bool more = k0 + BK < k_end;                 // the same in every thread
        if (more) load(k0 + BK);
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {                  // acc += A[:, kk] outer B[kk, :]
            T a_col[TM], b_row[TN];
#pragma unroll
            for (int g = 0; g < TM / 4; ++g) load4(&a_col[4 * g], &As[buf][kk][g * (TY * 4) + ty * 4]);
#pragma unroll
            for (int g = 0; g < TN / 4; ++g) load4(&b_row[4 * g], &Bs[buf][kk][g * (TX * 4) + tx * 4]);
#pragma unroll
            for (int a = 0; a < TM; ++a)
#pragma unroll
                for (int b = 0; b < TN; ++b) acc[a][b] += a_col[a] * b_row[b];
        }
        if (more) store(buf ^ 1);                          // the other buffer: last read before the barrier of the previous step
        __syncthreads();
        buf ^= 1;
    }
#pragma unroll
    for (int b = 0; b < TN; ++b) {
        int n = n0 + b / 4 * (TX * 4) + tx * 4 + b % 4;
        if (n >= N) continue;
        auto col = view.c_col(n);
#pragma unroll
        for (int a = 0; a < TM; ++a) {
            int m = m0 + a / 4 * (TY * 4) + ty * 4 + a % 4;
            if (m < M) view.store(col, m, acc[a][b]);
        }
    }
}

// forward: C = out (O, N*OH*OW), A = w (O, C*kh*kw), B = im2col(x) (C*kh*kw, N*OH*OW)
template <typename T>
struct ForwardViewImplicitGemm {
    static constexpr bool B_K_FAST = false;                // B: consecutive columns are neighbouring pixels
    T* out; const T* x; const T* w; const T* bias; Conv2dShape s;
    FastDiv khkw, kw, ohow, ow;

    struct ARow { const T* w; };                           // row o of w
    struct AStep { int k; bool valid; };
    __device__ ARow a_row(int o) const { return {w + (long long)o * (s.C * s.kh * s.kw)}; }
    __device__ AStep a_step(int k, bool valid) const { return {k, valid}; }
    __device__ T a(const ARow& r, const AStep& q) const { return q.valid ? r.w[q.k] : T(0); }

    struct BCol { const T* x; int offset, h, w; };         // image n; (h, w) = top-left tap of pixel (i, j)
    struct BStep { int offset, u, v; bool valid; };        // offset of channel c, tap (u, v)
    __device__ BCol b_col(int col) const {
        int n, pixel, i, j;
        ohow.divmod(col, n, pixel);
        ow.divmod(pixel, i, j);
        int h = i * s.stride - s.padding, wi = j * s.stride - s.padding;
        return {x + (long long)n * s.C * s.H * s.W, h * s.W + wi, h, wi};
    }
    __device__ BStep b_step(int k, bool valid) const {
        int c, uv, u, v;
        khkw.divmod(k, c, uv);
        kw.divmod(uv, u, v);
        return {c * s.H * s.W + u * s.W + v, u, v, valid};
    }
    __device__ T b(const BCol& col, const BStep& q) const {
        int h = col.h + q.u, wi = col.w + q.v;
        return (q.valid && (unsigned)h < (unsigned)s.H && (unsigned)wi < (unsigned)s.W) ? col.x[q.offset + col.offset] : T(0);
    }

    struct CCol { T* out; };                               // out[n, :, i, j]; with split-K, of partial[z]
    __device__ CCol c_col(int col) const {
        int n, pixel;
        ohow.divmod(col, n, pixel);
        long long size = (long long)s.N * s.O * s.OH * s.OW;
        return {out + blockIdx.z * size + (long long)n * s.O * s.OH * s.OW + pixel};
    }
    __device__ void store(const CCol& col, int o, T value) const {
        col.out[o * (s.OH * s.OW)] = bias ? value + bias[o] : value;
    }
};

// C = dx of the phase (C, N*Hq*Wq), A[c][(o,tu,tv)] = w[o,c,u,v], B[(o,tu,tv)][(n,hq,wq)] = dout[n,o,i,j]
template <typename T>
struct BackwardInputViewImplicitGemm {
    static constexpr bool B_K_FAST = false;
    T* dx; const T* dout; const T* w; Conv2dShape s; Phase f;

    struct ARow { const T* w; };                           // w[0, c]
    struct AStep { int offset; bool valid; };              // of w[o, 0, u, v]
    __device__ ARow a_row(int c) const { return {w + c * (s.kh * s.kw)}; }
    __device__ AStep a_step(int k, bool valid) const {
        int o, t, tu, tv;
        f.tutv.divmod(k, o, t);
        f.tv.divmod(t, tu, tv);
        return {(o * s.C * s.kh + f.ph + s.stride * tu) * s.kw + f.pw + s.stride * tv, valid};
    }
    __device__ T a(const ARow& r, const AStep& q) const { return q.valid ? r.w[q.offset] : T(0); }

    struct BCol { const T* dout; int offset, i, j; };      // image n; output pixel (i, j) of tap (tu, tv) = (0, 0)
    struct BStep { int offset, tu, tv; bool valid; };
    __device__ BCol b_col(int col) const {
        int n, hw, hq, wq;
        f.hqwq.divmod(col, n, hw);
        f.wq.divmod(hw, hq, wq);
        int i = f.qh + hq, j = f.qw + wq;
        return {dout + (long long)n * s.O * s.OH * s.OW, i * s.OW + j, i, j};
    }
    __device__ BStep b_step(int k, bool valid) const {
        int o, t, tu, tv;
        f.tutv.divmod(k, o, t);
        f.tv.divmod(t, tu, tv);
        return {o * s.OH * s.OW - tu * s.OW - tv, tu, tv, valid};
    }
    __device__ T b(const BCol& col, const BStep& q) const {
        int i = col.i - q.tu, j = col.j - q.tv;
        return (q.valid && (unsigned)i < (unsigned)s.OH && (unsigned)j < (unsigned)s.OW) ? col.dout[q.offset + col.offset] : T(0);
    }

    struct CCol { T* dx; };                                // dx[n, 0, h, w]
    __device__ CCol c_col(int col) const {
        int n, hw, hq, wq;
        f.hqwq.divmod(col, n, hw);
        f.wq.divmod(hw, hq, wq);
        return {dx + (long long)n * s.C * s.H * s.W + (f.h0 + s.stride * hq) * s.W + f.w0 + s.stride * wq};
    }
    __device__ void store(const CCol& col, int c, T value) const { col.dx[c * (s.H * s.W)] = value; }
};

// backward weight: C = dw (O, C*kh*kw), A = dout (O, N*OH*OW), B = im2col(x)^T (N*OH*OW, C*kh*kw);
// chunk blockIdx.z of the sum goes to partial[z]
template <typename T>
struct BackwardWeightViewImplicitGemm {
    static constexpr bool B_K_FAST = true;                 // B: consecutive k are neighbouring pixels
    T* partial; const T* dout; const T* x; Conv2dShape s;
    FastDiv khkw, kw, ohow, ow;

    struct ARow { const T* dout; };                        // dout[0, o]
    struct AStep { long long offset; bool valid; };        // of dout[n, 0, i, j]
    __device__ ARow a_row(int o) const { return {dout + o * (s.OH * s.OW)}; }
    __device__ AStep a_step(int k, bool valid) const {
        int n, pixel;
        ohow.divmod(k, n, pixel);
        return {(long long)n * s.O * s.OH * s.OW + pixel, valid};
    }
    __device__ T a(const ARow& r, const AStep& q) const { return q.valid ? r.dout[q.offset] : T(0); }

    struct BCol { int offset, u, v; };                     // x[0, c, u, v]
    struct BStep { const T* x; int offset, h, w; bool valid; };   // image n; top-left tap of pixel (i, j)
    __device__ BCol b_col(int col) const {
        int c, uv, u, v;
        khkw.divmod(col, c, uv);
        kw.divmod(uv, u, v);
        return {c * s.H * s.W + u * s.W + v, u, v};
    }
    __device__ BStep b_step(int k, bool valid) const {
        int n, pixel, i, j;
        ohow.divmod(k, n, pixel);
        ow.divmod(pixel, i, j);
        int h = i * s.stride - s.padding, wi = j * s.stride - s.padding;
        return {x + (long long)n * s.C * s.H * s.W, h * s.W + wi, h, wi, valid};
    }
    __device__ T b(const BCol& col, const BStep& q) const {
        int h = q.h + col.u, wi = q.w + col.v;
        return (q.valid && (unsigned)h < (unsigned)s.H && (unsigned)wi < (unsigned)s.W) ? q.x[q.offset + col.offset] : T(0);
    }

    struct CCol { T* dw; };
    __device__ CCol c_col(int col) const {
        return {partial + blockIdx.z * ((long long)s.O * s.C * s.kh * s.kw) + col};
    }
    __device__ void store(const CCol& col, int o, T value) const { col.dw[o * (s.C * s.kh * s.kw)] = value; }
};

// implicit_gemm tiles: 64 x 128 (128 threads of 8 x 8 outputs), for the layers' M = 64 or 128 channels;
// 16 x 128 (4 x 4 each) where M <= 16, such as the 3 channels of the image: less work on rows past M.
using TileImplicitGemm = Tile<64, 128, 8, 8, 8, 4>;
using TileImplicitGemmSmall = Tile<16, 128, 8, 4, 4, 4>;

template <typename T, typename Tl>
__global__ void __launch_bounds__(Tl::THREADS)
conv2d_forward_implicit_gemm_kernel(ForwardViewImplicitGemm<T> view, int chunk) {
    const Conv2dShape& s = view.s;
    int K = s.C * s.kh * s.kw;
    int k_begin = min(K, (int)blockIdx.z * chunk), k_end = min(K, k_begin + chunk);
    gemm_block_tile_implicit<T, Tl>(view, s.O, s.N * s.OH * s.OW, k_begin, k_end);
}

template <typename T, typename Tl>
__global__ void __launch_bounds__(Tl::THREADS)
conv2d_backward_input_implicit_gemm_kernel(T* dx, const T* dout, const T* w, Conv2dShape s, Phases phases) {
    const Phase& f = phases.p[blockIdx.z];
    BackwardInputViewImplicitGemm<T> view{dx, dout, w, s, f};
    gemm_block_tile_implicit<T, Tl>(view, s.C, s.N * f.Hq * f.Wq, 0, s.O * f.Tu * f.Tv);
}

template <typename T, typename Tl>
__global__ void __launch_bounds__(Tl::THREADS)
conv2d_backward_weight_implicit_gemm_kernel(BackwardWeightViewImplicitGemm<T> view, int chunk) {
    const Conv2dShape& s = view.s;
    int K = s.N * s.OH * s.OW;
    int k_begin = min(K, (int)blockIdx.z * chunk), k_end = min(K, k_begin + chunk);
    gemm_block_tile_implicit<T, Tl>(view, s.O, s.C * s.kh * s.kw, k_begin, k_end);
}

// out[e] = sum_z partial[z][e] (+ bias[o], o = e / per_o % O), always in the same order: the
// result does not depend on timing
template <typename T>
__global__ void conv2d_sum_partials_kernel(T* out, const T* partial, const T* bias, int splits, long long size,
                                    int O, int per_o) {
    long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (e >= size) return;
    T acc = 0;
    for (int z = 0; z < splits; ++z) acc += partial[z * size + e];
    out[e] = bias ? acc + bias[e / per_o % O] : acc;
}

// How many chunks the tiled backward weight cuts K = N*OH*OW into: enough blocks for about
// `per_sm` per SM, but each chunk at least 128 long.
template <typename Tl>
int backward_weight_splits(const Conv2dShape& s, int num_sms, int per_sm) {
    long long tiles = (long long)ceil_div(s.O, Tl::BM) * ceil_div((long long)s.C * s.kh * s.kw, Tl::BN);
    long long K = (long long)s.N * s.OH * s.OW;
    long long want = ((long long)per_sm * std::max(num_sms, 1) + tiles - 1) / tiles;
    long long most = (K + 127) / 128;
    return (int)std::max(1LL, std::min({want, most, 1024LL}));
}

// How many chunks implicit_gemm's forward cuts K = C*kh*kw into: only where the output tiles are fewer
// than the SMs, then about 2 blocks per SM, each chunk at least 128 long.
template <typename Tl>
int forward_splits(const Conv2dShape& s, int num_sms) {
    long long tiles = (long long)ceil_div(s.O, Tl::BM) * ceil_div((long long)s.N * s.OH * s.OW, Tl::BN);
    long long K = (long long)s.C * s.kh * s.kw;
    if (tiles == 0 || tiles >= num_sms || K < 256) return 1;
    long long want = (2LL * num_sms + tiles - 1) / tiles;
    return (int)std::max(1LL, std::min({want, K / 128, 1024LL}));
}

// The tiled kernels index within int: every matrix side and every image-sized block must fit
// with room for a tile (batch offsets n*C*H*W are long long). Else the naive kernel, all long long.
bool fits_int(const Conv2dShape& s) {
    const long long most = (1LL << 31) - (1 << 16);
    long long sizes[] = {(long long)s.C * s.H * s.W, (long long)s.O * s.OH * s.OW, (long long)s.N * s.OH * s.OW,
                         (long long)s.N * s.H * s.W, (long long)s.O * s.C * s.kh * s.kw};
    for (long long v : sizes)
        if (v > most) return false;
    return true;
}

// implicit_gemm uses the small tile where M (output channels, or input channels for backward input) is tiny
bool small_m(int M) { return M <= TileImplicitGemmSmall::BM; }

const int THREADS = 256;   // for the one-thread-per-element kernels

// ---------------------------------------------------------------------------------------------
// Launchers of each family. A forward or backward weight launcher with splits > 1 writes chunk z
// of K, without bias, to partial + z * (size of the output); the caller sums them.

template <typename T>
void conv2d_forward_naive(T* out, const T* x, const T* w, const T* bias, const Conv2dShape& s, int splits,
                          cudaStream_t stream) {
    long long total = (long long)s.N * s.O * s.OH * s.OW;
    conv2d_forward_naive_kernel<T><<<ceil_div(total, THREADS), THREADS, 0, stream>>>(out, x, w, bias, s);
}

template <typename T>
void conv2d_backward_input_naive(T* dx, const T* dout, const T* w, const Conv2dShape& s, cudaStream_t stream) {
    long long total = (long long)s.N * s.C * s.H * s.W;
    conv2d_backward_input_naive_kernel<T><<<ceil_div(total, THREADS), THREADS, 0, stream>>>(dx, dout, w, s);
}

template <typename T>
void conv2d_backward_weight_naive(T* dw, const T* dout, const T* x, const Conv2dShape& s, int splits,
                                  cudaStream_t stream) {
    int size = s.O * s.C * s.kh * s.kw;
    conv2d_backward_weight_naive_kernel<T><<<ceil_div(size, THREADS), THREADS, 0, stream>>>(dw, dout, x, s);
}

template <typename T, typename Tl>
void conv2d_forward_tiled(T* out, const T* x, const T* w, const T* bias, const Conv2dShape& s, int splits,
                          cudaStream_t stream) {
    dim3 grid(ceil_div((long long)s.N * s.OH * s.OW, Tl::BN), ceil_div(s.O, Tl::BM));
    conv2d_forward_tiled_kernel<T, Tl><<<grid, Tl::THREADS, 0, stream>>>(out, x, w, bias, s);
}

template <typename T, typename Tl>
void conv2d_backward_input_tiled(T* dx, const T* dout, const T* w, const Conv2dShape& s, cudaStream_t stream) {
    long long most_columns = (long long)s.N * ceil_div(s.H, s.stride) * ceil_div(s.W, s.stride);
    dim3 grid(ceil_div(most_columns, Tl::BN), ceil_div(s.C, Tl::BM), s.stride * s.stride);   // z: the phases
    conv2d_backward_input_tiled_kernel<T, Tl><<<grid, Tl::THREADS, 0, stream>>>(dx, dout, w, s);
}

template <typename T, typename Tl>
void conv2d_backward_weight_tiled(T* partial, const T* dout, const T* x, const Conv2dShape& s, int splits,
                                  cudaStream_t stream) {
    int K = s.N * s.OH * s.OW;
    int chunk = ceil_div(ceil_div(K, splits), Tl::BK) * Tl::BK;
    dim3 grid(ceil_div((long long)s.C * s.kh * s.kw, Tl::BN), ceil_div(s.O, Tl::BM), splits);   // z: the chunks
    conv2d_backward_weight_tiled_kernel<T, Tl><<<grid, Tl::THREADS, 0, stream>>>(partial, dout, x, s, chunk);
}

template <typename T, typename Tl>
void conv2d_forward_implicit_gemm_tile(T* out, const T* x, const T* w, const T* bias, const Conv2dShape& s,
                                       int splits, cudaStream_t stream) {
    ForwardViewImplicitGemm<T> view{out, x, w, bias, s, FastDiv(s.kh * s.kw), FastDiv(s.kw), FastDiv(s.OH * s.OW),
                                    FastDiv(s.OW)};
    int K = s.C * s.kh * s.kw;
    int chunk = ceil_div(ceil_div(K, splits), Tl::BK) * Tl::BK;
    dim3 grid(ceil_div((long long)s.N * s.OH * s.OW, Tl::BN), ceil_div(s.O, Tl::BM), splits);   // z: the chunks
    conv2d_forward_implicit_gemm_kernel<T, Tl><<<grid, Tl::THREADS, 0, stream>>>(view, chunk);
}

template <typename T>
void conv2d_forward_implicit_gemm(T* out, const T* x, const T* w, const T* bias, const Conv2dShape& s, int splits,
                                  cudaStream_t stream) {
    if (small_m(s.O)) conv2d_forward_implicit_gemm_tile<T, TileImplicitGemmSmall>(out, x, w, bias, s, splits, stream);
    else conv2d_forward_implicit_gemm_tile<T, TileImplicitGemm>(out, x, w, bias, s, splits, stream);
}

// The phases (phase_of) with their divisors, for the implicit_gemm kernel
Phases phases_with_divisors(const Conv2dShape& s) {
    Phases phases{};
    for (int z = 0; z < s.stride * s.stride; ++z) {
        Phase& f = phases.p[z];
        f = phase_of(s, z);
        // divisors of 0 (an empty phase) never divide: that phase's blocks return at once
        f.tutv = FastDiv(std::max(1, f.Tu * f.Tv)), f.tv = FastDiv(std::max(1, f.Tv));
        f.hqwq = FastDiv(std::max(1, f.Hq * f.Wq)), f.wq = FastDiv(std::max(1, f.Wq));
    }
    return phases;
}

template <typename T, typename Tl>
void conv2d_backward_input_implicit_gemm_tile(T* dx, const T* dout, const T* w, const Conv2dShape& s,
                                              cudaStream_t stream) {
    long long most_columns = (long long)s.N * ceil_div(s.H, s.stride) * ceil_div(s.W, s.stride);
    dim3 grid(ceil_div(most_columns, Tl::BN), ceil_div(s.C, Tl::BM), s.stride * s.stride);   // z: the phases
    conv2d_backward_input_implicit_gemm_kernel<T, Tl><<<grid, Tl::THREADS, 0, stream>>>(dx, dout, w, s,
                                                                                       phases_with_divisors(s));
}

template <typename T>
void conv2d_backward_input_implicit_gemm(T* dx, const T* dout, const T* w, const Conv2dShape& s, cudaStream_t stream) {
    if (s.stride * s.stride > MAX_PHASES) conv2d_backward_input_tiled<T, Tile4x4>(dx, dout, w, s, stream);
    else if (small_m(s.C)) conv2d_backward_input_implicit_gemm_tile<T, TileImplicitGemmSmall>(dx, dout, w, s, stream);
    else conv2d_backward_input_implicit_gemm_tile<T, TileImplicitGemm>(dx, dout, w, s, stream);
}

template <typename T, typename Tl>
void conv2d_backward_weight_implicit_gemm_tile(T* partial, const T* dout, const T* x, const Conv2dShape& s,
                                               int splits, cudaStream_t stream) {
    BackwardWeightViewImplicitGemm<T> view{partial, dout, x, s, FastDiv(s.kh * s.kw), FastDiv(s.kw),
                                           FastDiv(s.OH * s.OW), FastDiv(s.OW)};
    int K = s.N * s.OH * s.OW;
    int chunk = ceil_div(ceil_div(K, splits), Tl::BK) * Tl::BK;
    dim3 grid(ceil_div((long long)s.C * s.kh * s.kw, Tl::BN), ceil_div(s.O, Tl::BM), splits);   // z: the chunks
    conv2d_backward_weight_implicit_gemm_kernel<T, Tl><<<grid, Tl::THREADS, 0, stream>>>(view, chunk);
}

template <typename T>
void conv2d_backward_weight_implicit_gemm(T* partial, const T* dout, const T* x, const Conv2dShape& s, int splits,
                                          cudaStream_t stream) {
    if (small_m(s.O)) conv2d_backward_weight_implicit_gemm_tile<T, TileImplicitGemmSmall>(partial, dout, x, s, splits, stream);
    else conv2d_backward_weight_implicit_gemm_tile<T, TileImplicitGemm>(partial, dout, x, s, splits, stream);
}

// How many chunks each version splits K into (1: none)
int no_splits(const Conv2dShape&, int) { return 1; }
int forward_splits_implicit_gemm(const Conv2dShape& s, int num_sms) {
    return small_m(s.O) ? forward_splits<TileImplicitGemmSmall>(s, num_sms) : forward_splits<TileImplicitGemm>(s, num_sms);
}
// "tiled" aims at 2 blocks per SM, implicit_gemm at 4 (its blocks are half the size)
template <typename Tl>
int backward_weight_splits_tiled(const Conv2dShape& s, int num_sms) { return backward_weight_splits<Tl>(s, num_sms, 2); }
int backward_weight_splits_implicit_gemm(const Conv2dShape& s, int num_sms) {
    return small_m(s.O) ? backward_weight_splits<TileImplicitGemmSmall>(s, num_sms, 4)
                        : backward_weight_splits<TileImplicitGemm>(s, num_sms, 4);
}

// ---------------------------------------------------------------------------------------------
// The versions: this table is the only list of them. The launchers below, the bindings
// (conv2d_versions()), the tests and the benchmarks all read it; the first row is the default.

template <typename T>
struct Conv2dVersionCuda {
    const char* name;
    int (*forward_splits)(const Conv2dShape& s, int num_sms);          // chunks of K = C*kh*kw
    void (*forward)(T* out, const T* x, const T* w, const T* bias, const Conv2dShape& s, int splits, cudaStream_t);
    void (*backward_input)(T* dx, const T* dout, const T* w, const Conv2dShape& s, cudaStream_t);
    int (*backward_weight_splits)(const Conv2dShape& s, int num_sms);  // chunks of K = N*OH*OW
    void (*backward_weight)(T* dw, const T* dout, const T* x, const Conv2dShape& s, int splits, cudaStream_t);
};

template <typename T>
const Conv2dVersionCuda<T> CONV2D_VERSIONS_CUDA[] = {
    {"implicit_gemm", forward_splits_implicit_gemm, conv2d_forward_implicit_gemm<T>,
     conv2d_backward_input_implicit_gemm<T>, backward_weight_splits_implicit_gemm, conv2d_backward_weight_implicit_gemm<T>},
    {"tiled", no_splits, conv2d_forward_tiled<T, Tile4x4>, conv2d_backward_input_tiled<T, Tile4x4>,
     backward_weight_splits_tiled<Tile4x4>, conv2d_backward_weight_tiled<T, Tile4x4>},
    {"tiled_8x8", no_splits, conv2d_forward_tiled<T, Tile8x8>, conv2d_backward_input_tiled<T, Tile8x8>,
     backward_weight_splits_tiled<Tile8x8>, conv2d_backward_weight_tiled<T, Tile8x8>},
    {"naive", no_splits, conv2d_forward_naive<T>, conv2d_backward_input_naive<T>, no_splits,
     conv2d_backward_weight_naive<T>},
};

// The row called `name`; shapes past int run on "naive" whatever was asked
template <typename T>
const Conv2dVersionCuda<T>& conv2d_version(const std::string& name, const Conv2dShape& s) {
    const std::string run = fits_int(s) ? name : "naive";
    for (const Conv2dVersionCuda<T>& v : CONV2D_VERSIONS_CUDA<T>)
        if (run == v.name) return v;
    throw std::invalid_argument("conv2d: unknown CUDA version '" + name + "'");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The public launchers (kernels_cuda.h)

std::vector<std::string> conv2d_versions_cuda() {
    std::vector<std::string> names;
    for (const auto& v : CONV2D_VERSIONS_CUDA<float>) names.push_back(v.name);
    return names;
}

long long conv2d_forward_workspace(const Conv2dShape& s, const std::string& version, int num_sms) {
    int splits = conv2d_version<float>(version, s).forward_splits(s, num_sms);
    return splits > 1 ? (long long)splits * s.N * s.O * s.OH * s.OW : 0;
}

template <typename T>
void conv2d_forward_cuda(T* out, const T* x, const T* w, const T* bias, const Conv2dShape& s,
                         const std::string& version, T* workspace, int num_sms, cudaStream_t stream) {
    long long total = (long long)s.N * s.O * s.OH * s.OW;
    if (total == 0) return;
    const Conv2dVersionCuda<T>& v = conv2d_version<T>(version, s);
    int splits = v.forward_splits(s, num_sms);
    v.forward(splits > 1 ? workspace : out, x, w, splits > 1 ? nullptr : bias, s, splits, stream);
    CUDA_CHECK(cudaGetLastError());
    if (splits > 1) {
        conv2d_sum_partials_kernel<T><<<ceil_div(total, THREADS), THREADS, 0, stream>>>(out, workspace, bias, splits,
                                                                                       total, s.O, s.OH * s.OW);
        CUDA_CHECK(cudaGetLastError());
    }
}

template <typename T>
void conv2d_backward_input_cuda(T* dx, const T* dout, const T* w, const Conv2dShape& s, const std::string& version,
                                cudaStream_t stream) {
    long long total = (long long)s.N * s.C * s.H * s.W;
    if (total == 0) return;
    bool many_phases = (long long)s.stride * s.stride > 65535;      // grid.z holds one per phase
    conv2d_version<T>(many_phases ? "naive" : version, s).backward_input(dx, dout, w, s, stream);
    CUDA_CHECK(cudaGetLastError());
}

long long conv2d_backward_weight_workspace(const Conv2dShape& s, const std::string& version, int num_sms) {
    int splits = conv2d_version<float>(version, s).backward_weight_splits(s, num_sms);
    return splits > 1 ? (long long)splits * s.O * s.C * s.kh * s.kw : 0;
}

template <typename T>
void conv2d_backward_weight_cuda(T* dw, const T* dout, const T* x, const Conv2dShape& s, const std::string& version,
                                 T* workspace, int num_sms, cudaStream_t stream) {
    int size = s.O * s.C * s.kh * s.kw;
    if (size == 0) return;
    const Conv2dVersionCuda<T>& v = conv2d_version<T>(version, s);
    int splits = v.backward_weight_splits(s, num_sms);
    v.backward_weight(splits > 1 ? workspace : dw, dout, x, s, splits, stream);
    CUDA_CHECK(cudaGetLastError());
    if (splits > 1) {
        conv2d_sum_partials_kernel<T><<<ceil_div(size, THREADS), THREADS, 0, stream>>>(dw, workspace, nullptr, splits,
                                                                                      size, 1, 1);
        CUDA_CHECK(cudaGetLastError());
    }
}

#define INSTANTIATE(T)                                                                                   \
    template void conv2d_forward_cuda<T>(T*, const T*, const T*, const T*, const Conv2dShape&,            \
                                         const std::string&, T*, int, cudaStream_t);                      \
    template void conv2d_backward_input_cuda<T>(T*, const T*, const T*, const Conv2dShape&,               \
                                                const std::string&, cudaStream_t);                        \
    template void conv2d_backward_weight_cuda<T>(T*, const T*, const T*, const Conv2dShape&,              \
                                                 const std::string&, T*, int, cudaStream_t);
INSTANTIATE(float)
INSTANTIATE(double)
