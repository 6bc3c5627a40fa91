// linear_cpu.cpp: the fully connected layer (nn.Linear) and its two gradients, on our GEMM
// (gemm_cpu.h), with the bias added in the store:
//
//   forward          y (N, O)  = x (N, I) @ W^T (I, O) + b
//   backward input   dx (N, I) = dout (N, O) @ W (O, I)
//   backward weight  dW (O, I) = dout^T (O, N) @ x (N, I)
//
// All three are one C (M x P) = A (M x K) @ B (K x P), with A and B given as a pointer and two
// strides each, so that no transpose is ever copied. A, the large operand (the activations, or
// dout^T), is read in place by the micro-kernel (StridedA); B, a weight or the activations x, is
// packed once into panels of NR columns. Each thread takes a range of A's row panels, so every
// element of C is summed by one thread in one order: the result does not depend on the threads.
// NumPy's matmul (BLAS) is the reference; next to it, this one runs on the OpenMP threads that
// the convolutions use (NumPy's BLAS runs on one: backend.one_blas_thread) and adds the bias as
// it stores C, so the forward makes one pass over y instead of two.
// Test: tests/test_kernels_cpu.py -k linear. Benchmark: benchmarks/bench_steps.py.
#include <algorithm>

#include "gemm_cpu.h"
#include "kernels_cpu.h"

namespace td {

// B (K x P), B[k][j] = b[k * k_stride + j * col_stride], packed like pack_a's A, transposed: the
// block of k0.. (kc steps) and the panel of columns jp*NR.. at  k0 * p_pad + jp * kc * NR,
// k-major, zero past P.
template <typename T>
static void pack_b_panels(T* packed, const T* b, int64_t k_stride, int64_t col_stride, int64_t K, int64_t P) {
    constexpr int NR = gemm_nr<T>();
    const int64_t p_panels = ceil_div(P, NR), p_pad = p_panels * NR, kc_max = gemm_kc<T>(K);
#pragma omp parallel for collapse(2) schedule(static) if (K * P >= PARALLEL_MIN_WORK)
    for (int64_t kb = 0; kb < ceil_div(K, kc_max); ++kb)
        for (int64_t jp = 0; jp < p_panels; ++jp) {
            const int64_t k0 = kb * kc_max, kc = std::min(kc_max, K - k0), j0 = jp * NR;
            const int64_t cols = std::min<int64_t>(NR, P - j0);
            T* dst = packed + k0 * p_pad + jp * kc * NR;
            for (int64_t kk = 0; kk < kc; ++kk, dst += NR) {
                const T* src = b + (k0 + kk) * k_stride + j0 * col_stride;
                if (col_stride == 1) std::copy(src, src + cols, dst);
                else
                    for (int64_t j = 0; j < cols; ++j) dst[j] = src[j * col_stride];
                std::fill(dst + cols, dst + NR, T(0));
            }
        }
}

// c (M x P, row-major) = A @ B (+ bias[j] on every row, if bias), A[i][k] = a[i * a_row + k * a_k].
template <typename T, int MR>
static void gemm_strided(T* c, const T* a, int64_t a_row, int64_t a_k, const T* b, int64_t b_k, int64_t b_col,
                         const T* bias, int64_t M, int64_t K, int64_t P) {
    constexpr int NR = gemm_nr<T>();
    const int64_t m_panels = ceil_div(M, MR), p_panels = ceil_div(P, NR), p_pad = p_panels * NR;
    const int64_t kc_max = gemm_kc<T>(K);
    AlignedBuffer<T> b_packed(K * p_pad);
    pack_b_panels(b_packed.data, b, b_k, b_col, K, P);
#pragma omp parallel if (M * K * P >= 32 * PARALLEL_MIN_WORK)
    {
        alignas(64) T tile[MR * NR];
        alignas(64) T a_last[gemm_kc_max<T>() * MR];   // the last row panel, when M % MR rows: packed, zero-padded
#pragma omp for schedule(static)
        for (int64_t ip = 0; ip < m_panels; ++ip) {
            const int64_t i0 = ip * MR, rows = std::min<int64_t>(MR, M - i0);
            for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
                const int64_t kc = std::min(kc_max, K - k0);
                const T* a_block = a + i0 * a_row + k0 * a_k;
                if (rows < MR)                                  // (reading A in place would pass its end)
                    for (int64_t kk = 0; kk < kc; ++kk)
                        for (int i = 0; i < MR; ++i) a_last[kk * MR + i] = i < rows ? a_block[i * a_row + kk * a_k] : T(0);
                for (int64_t jp = 0; jp < p_panels; ++jp) {
                    const PackedB<T> b_panel{b_packed.data + k0 * p_pad + jp * kc * NR};
                    if (rows == MR) gemm_micro_kernel<T, MR>(kc, StridedA<T>{a_block, a_row, a_k}, b_panel, tile);
                    else gemm_micro_kernel<T, MR>(kc, static_cast<const T*>(a_last), b_panel, tile);
                    // store: the first block sets C (with the bias), the later ones add to it
                    const int64_t j0 = jp * NR, cols = std::min<int64_t>(NR, P - j0);
                    for (int64_t i = 0; i < rows; ++i) {
                        T* __restrict dst = c + (i0 + i) * P + j0;
                        const T* __restrict src = tile + i * NR;
                        if (k0 > 0)
                            for (int64_t j = 0; j < cols; ++j) dst[j] += src[j];
                        else if (bias)
                            for (int64_t j = 0; j < cols; ++j) dst[j] = src[j] + bias[j0 + j];
                        else
                            for (int64_t j = 0; j < cols; ++j) dst[j] = src[j];
                    }
                }
            }
        }
    }
}

template <typename T>
static void gemm_strided_any(T* c, const T* a, int64_t a_row, int64_t a_k, const T* b, int64_t b_k, int64_t b_col,
                             const T* bias, int64_t M, int64_t K, int64_t P) {
    with_tile_rows(M, [&](auto mr) { gemm_strided<T, mr()>(c, a, a_row, a_k, b, b_k, b_col, bias, M, K, P); });
}

template <typename T>
void linear_forward_cpu(T* y, const T* x, const T* w, const T* b, int64_t N, int64_t I, int64_t O) {
    // A = x (N x I, rows of I), B = W^T: B[k][j] = w[j * I + k]
    gemm_strided_any<T>(y, x, I, 1, w, 1, I, b, N, I, O);
}

template <typename T>
void linear_backward_input_cpu(T* dx, const T* dout, const T* w, int64_t N, int64_t I, int64_t O) {
    // A = dout (N x O), B = W (O x I)
    gemm_strided_any<T>(dx, dout, O, 1, w, I, 1, nullptr, N, O, I);
}

template <typename T>
void linear_backward_weight_cpu(T* dw, const T* dout, const T* x, int64_t N, int64_t I, int64_t O) {
    // A = dout^T: A[o][n] = dout[n * O + o]; B = x (N x I)
    gemm_strided_any<T>(dw, dout, 1, O, x, I, 1, nullptr, O, N, I);
}

#define TD_INSTANTIATE(T)                                                                                  \
    template void linear_forward_cpu<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t);       \
    template void linear_backward_input_cpu<T>(T*, const T*, const T*, int64_t, int64_t, int64_t);          \
    template void linear_backward_weight_cpu<T>(T*, const T*, const T*, int64_t, int64_t, int64_t);
TD_INSTANTIATE(float)
TD_INSTANTIATE(double)

}  // namespace td
