// gemm_cpu.h: the matrix multiply behind the fast convolution (conv2d_cpu.cpp), our own, no BLAS.
//
//   C (M x N) += A (M x K) @ B (K x N)
//
// It follows Goto & van de Geijn, "Anatomy of high-performance matrix multiplication" (2008) and
// BLIS: A is packed into panels of MR rows and B into panels of NR columns, both stored k-major
// (a[k][MR], b[k][NR]), so that the micro-kernel reads both with unit stride. The micro-kernel
// keeps an MR x NR tile of C in vector registers for a whole block of KC steps of k (register
// blocking); KC is chosen so that one B panel (KC x NR) stays in the L1 cache while all the A
// panels stream past it from L2. Each multiply-add of the tile is a vector FMA.
//
// The convolutions never build the matrices A and B: they pass a `pack_b` function that writes
// one B panel straight from the image (im2col, one panel at a time), and a `store` function that
// adds a finished tile of C wherever it belongs (an NCHW output, or a col2im scatter).
//
// Vectors are GCC/Clang vector extensions, not intrinsics: the same code compiles to AVX-512
// (16 floats, 32 registers), AVX2 (8 floats, 16 registers) or SSE2, with a tile size to match.
#pragma once

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <cstddef>
#include <cstdlib>
#include <new>
#include <type_traits>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#else                                    // a build without OpenMP (setup.py): one thread, the pragmas ignored
inline int omp_get_max_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
inline int omp_get_num_threads() { return 1; }
#endif

namespace td {

#if defined(__AVX512F__)
constexpr int VEC_BYTES = 64;   // zmm: 16 floats or 8 doubles; 32 registers
constexpr int GEMM_MR = 8;      // tile 8 x 2 vectors: 16 accumulators + 2 B vectors + 1 broadcast
constexpr int GEMM_MR_ALT = 8;
#elif defined(__AVX__)
constexpr int VEC_BYTES = 32;   // ymm; 16 registers
constexpr int GEMM_MR = 6;      // tile 6 x 2 vectors: 12 accumulators + 2 B vectors + 1 broadcast
constexpr int GEMM_MR_ALT = 4;  // or 4 x 2 (8 accumulators), where M is a multiple of 4 but not of 6
#else
constexpr int VEC_BYTES = 16;   // xmm; 16 registers
constexpr int GEMM_MR = 6;
constexpr int GEMM_MR_ALT = 4;
#endif
// Below this much work (elements moved, or multiply-adds / 32) a loop runs on one thread: starting
// the OpenMP team would cost more than it saves.
constexpr int64_t PARALLEL_MIN_WORK = int64_t(1) << 16;
constexpr int GEMM_NV = 2;          // vectors per tile row
constexpr int64_t GEMM_B_PANEL_BYTES = 32768;   // a B panel (kc x NR) fills at most this much of L1

template <typename T> struct VecOf;
template <> struct VecOf<float> { typedef float type __attribute__((vector_size(VEC_BYTES))); };
template <> struct VecOf<double> { typedef double type __attribute__((vector_size(VEC_BYTES))); };
template <typename T> using Vec = typename VecOf<T>::type;
template <typename T> struct HalfVecOf;
template <> struct HalfVecOf<float> { typedef float type __attribute__((vector_size(VEC_BYTES / 2))); };
template <> struct HalfVecOf<double> { typedef double type __attribute__((vector_size(VEC_BYTES / 2))); };
template <typename T> struct LaneIndexOf;     // integer lanes of the same width, for __builtin_shuffle
template <> struct LaneIndexOf<float> { typedef int32_t type __attribute__((vector_size(VEC_BYTES))); };
template <> struct LaneIndexOf<double> { typedef int64_t type __attribute__((vector_size(VEC_BYTES))); };

// Shuffles with constant lanes: __builtin_shufflevector (clang, GCC >= 12), else GCC's __builtin_shuffle,
// which cannot join two half vectors (so, there, nothing reads B as halves).
#ifndef TD_SHUFFLEVECTOR                       // (-DTD_SHUFFLEVECTOR=0 tests the fallback)
#if defined(__clang__) || __GNUC__ >= 12
#define TD_SHUFFLEVECTOR 1
#else
#define TD_SHUFFLEVECTOR 0
#endif
#endif
constexpr bool HAVE_SHUFFLEVECTOR = TD_SHUFFLEVECTOR;

// Lanes J... of the 2L lanes of (a, b)
template <typename T, int... J>
inline Vec<T> shuffle2(Vec<T> a, Vec<T> b) {
#if TD_SHUFFLEVECTOR
    return __builtin_shufflevector(a, b, J...);
#else
    return __builtin_shuffle(a, b, typename LaneIndexOf<T>::type{J...});
#endif
}

// (lo, hi) -> one vector
template <typename T, size_t... I>
inline Vec<T> concat_halves(typename HalfVecOf<T>::type lo, typename HalfVecOf<T>::type hi, std::index_sequence<I...>) {
#if TD_SHUFFLEVECTOR
    return __builtin_shufflevector(lo, hi, I...);
#else
    Vec<T> x;                                                     // (not used: HAVE_SHUFFLEVECTOR is false)
    __builtin_memcpy(&x, &lo, sizeof(lo));
    __builtin_memcpy(reinterpret_cast<char*>(&x) + sizeof(lo), &hi, sizeof(hi));
    return x;
#endif
}

template <typename T> constexpr int gemm_nr() { return GEMM_NV * VEC_BYTES / int(sizeof(T)); }
// at most this many k steps per packed block: 256 for AVX-512 floats, 512 for AVX2's
template <typename T> constexpr int64_t gemm_kc_max() { return GEMM_B_PANEL_BYTES / (gemm_nr<T>() * int64_t(sizeof(T))); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// K is cut into equal blocks of at most gemm_kc_max (AVX-512, 576 -> 3 x 192, not 256 + 256 + 64)
template <typename T>
inline int64_t gemm_kc(int64_t K) {
    constexpr int64_t KC = gemm_kc_max<T>();
    return K <= KC ? std::max<int64_t>(K, 1) : ceil_div(K, ceil_div(K, KC));
}

// The tile height MR for M rows: GEMM_MR, or GEMM_MR_ALT where that computes at least 1/16 fewer
// rows, padding included (AVX2, M = 32: 8 tiles of 4 rows, not 6 of 6 = 36). A 4-row tile costs
// more a row than a 6-row one (8 accumulators barely hide the FMA latency), so M = 64 stays with
// 6 x 11 = 66 rows. body(std::integral_constant<int, MR>{}).
template <typename Body>
inline void with_tile_rows(int64_t M, Body body) {
    const int64_t rows = ceil_div(M, GEMM_MR) * GEMM_MR, rows_alt = ceil_div(M, GEMM_MR_ALT) * GEMM_MR_ALT;
    if (GEMM_MR_ALT != GEMM_MR && 16 * rows_alt < 15 * rows) body(std::integral_constant<int, GEMM_MR_ALT>{});
    else body(std::integral_constant<int, GEMM_MR>{});
}

// Copy n <= NR values (at most one row of a B panel) a whole vector at a time: up to one vector
// minus one value past n is read and written. Only for buffers of our own with that much spare
// room (GEMM_SLACK values at the end), where a later write covers the overrun: this turns the short
// row copies of im2col into one or two vector moves. (No loop: GCC would make it a memcpy call.)
constexpr int64_t GEMM_SLACK = VEC_BYTES;   // values: 4 vectors of float, 8 of double
template <typename T>
inline void copy_vectors(T* __restrict dst, const T* __restrict src, int64_t n) {
    using V = Vec<T>;
    constexpr int L = VEC_BYTES / int(sizeof(T));
    static_assert(GEMM_NV == 2, "copy_vectors copies at most two vectors");
    V v0, v1;
    __builtin_memcpy(&v0, src, sizeof(V));                        // unaligned vector loads
    __builtin_memcpy(dst, &v0, sizeof(V));
    if (n > L) {
        __builtin_memcpy(&v1, src + L, sizeof(V));
        __builtin_memcpy(dst + L, &v1, sizeof(V));
    }
}

// Transpose an L x L block held in L vectors (L = lanes): log2(L) rounds of two-vector shuffles,
// each swapping the off-diagonal sub-blocks of size d within every 2d x 2d block.
template <int D, typename T, size_t... I>
inline void transpose_round(Vec<T>* r, std::index_sequence<I...>) {
    constexpr int L = sizeof...(I);
    for (int i = 0; i < L; ++i) {
        if (i & D) continue;
        const Vec<T> a = r[i], b = r[i + D];
        r[i] = shuffle2<T, int((I & D) ? L + I - D : I)...>(a, b);
        r[i + D] = shuffle2<T, int((I & D) ? L + I : I + D)...>(a, b);
    }
}

template <typename T>
inline void transpose_vectors(Vec<T>* r) {
    constexpr int L = VEC_BYTES / int(sizeof(T));
    const auto lanes = std::make_index_sequence<L>();
    transpose_round<1, T>(r, lanes);
    transpose_round<2, T>(r, lanes);
    if constexpr (L > 4) transpose_round<4, T>(r, lanes);
    if constexpr (L > 8) transpose_round<8, T>(r, lanes);
    static_assert(L <= 16, "transpose_vectors: at most 16 lanes");
}

// The same for every second value: dst[t] = src[2 t], t < n <= NR; reads up to 2 NR values.
template <typename T, size_t... I>
inline void copy_vectors_stride2(T* __restrict dst, const T* __restrict src, int64_t n, std::index_sequence<I...>) {
    constexpr int L = sizeof...(I);
    for (int64_t t = 0; t < n; t += L) {                          // n <= NR: at most GEMM_NV rounds
        Vec<T> a, b;
        __builtin_memcpy(&a, src + 2 * t, sizeof(a));
        __builtin_memcpy(&b, src + 2 * t + L, sizeof(b));
        const Vec<T> even = shuffle2<T, int(2 * I)...>(a, b);
        __builtin_memcpy(dst + t, &even, sizeof(even));
    }
}

// A block of memory aligned for vector loads (freed when it goes out of scope).
template <typename T>
struct AlignedBuffer {
    T* data;
    explicit AlignedBuffer(int64_t count) {
        size_t bytes = (size_t(std::max<int64_t>(count, 1) + GEMM_SLACK) * sizeof(T) + 63) / 64 * 64;
        data = static_cast<T*>(std::aligned_alloc(64, bytes));
        if (!data) throw std::bad_alloc();
        std::fill(data + count, data + count + GEMM_SLACK, T(0));  // the slack: read, never used
    }
    ~AlignedBuffer() { std::free(data); }
    AlignedBuffer(const AlignedBuffer&) = delete;
    AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

// A's value (row i, step k) for the micro-kernel: a panel packed by pack_a (a pointer: a[k * MR + i]),
// or a StridedA that reads A where it lies.
template <int MR, typename LoadA>
inline auto a_value(const LoadA& a, int64_t k, int i) {
    if constexpr (std::is_pointer_v<LoadA>) return a[k * MR + i];
    else return a(k, i);
}

// A read in place: A[i][k] = a[i * row_stride + k * k_stride] (linear_cpu.cpp)
template <typename T>
struct StridedA {
    const T* a;
    int64_t row_stride, k_stride;
    T operator()(int64_t k, int i) const { return a[i * row_stride + k * k_stride]; }
};

// tile (MR x NR, row-major) = A (MR x kc) @ B (kc x NR), where a_value(a, k, i) gives A[i][k] and
// load_b(k, v) the v-th vector of row k of B. The compiler keeps acc in registers: MR * GEMM_NV
// vector FMAs per k.
template <typename T, int MR, typename LoadA, typename LoadB>
inline void gemm_micro_kernel(int64_t kc, LoadA a, LoadB load_b, T* __restrict tile) {
    using V = Vec<T>;
    constexpr int NV = GEMM_NV, L = VEC_BYTES / int(sizeof(T));
    V acc[MR][NV] = {};
    for (int64_t k = 0; k < kc; ++k) {
        V bk[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) bk[v] = load_b(k, v);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
            V ai = a_value<MR>(a, k, i) - V{};   // broadcast (x - 0 == x, so no add is emitted)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[i][v] += ai * bk[v];   // FMA
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(tile + (i * NV + v) * L) = acc[i][v];
}

// B as a packed panel: b[k * NR + v * L ..] (aligned)
template <typename T>
struct PackedB {
    const T* b;
    Vec<T> operator()(int64_t k, int v) const {
        constexpr int L = VEC_BYTES / int(sizeof(T));
        return *reinterpret_cast<const Vec<T>*>(b + k * GEMM_NV * L + v * L);
    }
};

// B read in place: vector v of row k starts at rows[v] + offset[k] (unaligned). An implicit im2col:
// rows[v] is where the receptive fields of L neighbouring output pixels start, offset[k] the tap.
// With HALVES, the two halves of vector v come from rows[v] and rows[GEMM_NV + v] (two image rows).
template <typename T, bool HALVES = false>
struct RowsB {
    const T* rows[2 * GEMM_NV];
    const int64_t* offset;
    Vec<T> operator()(int64_t k, int v) const {
        Vec<T> x;
        if constexpr (!HALVES) {
            __builtin_memcpy(&x, rows[v] + offset[k], sizeof(x));
        } else {
            typename HalfVecOf<T>::type lo, hi;
            __builtin_memcpy(&lo, rows[v] + offset[k], sizeof(lo));
            __builtin_memcpy(&hi, rows[GEMM_NV + v] + offset[k], sizeof(hi));
            x = concat_halves<T>(lo, hi, std::make_index_sequence<VEC_BYTES / sizeof(T)>());
        }
        return x;
    }
};

// Pack all of A (M x K), A[i][k] = src[row_offset[i] + col_offset[k]] (any layout or flip of a
// weight tensor), for gemm_packed_a: K is cut into blocks of gemm_kc(K), and each block into
// panels of MR rows, k-major; rows past M are zero. The panel of rows ip*MR.. of the block that
// starts at k0 is at  k0 * M_pad + ip * kc * MR.
template <typename T, int MR>
void pack_a(int64_t M, int64_t K, const T* src, const int64_t* row_offset, const int64_t* col_offset,
            T* a_packed) {
    const int64_t m_panels = ceil_div(M, MR), m_pad = m_panels * MR, kc_max = gemm_kc<T>(K);
#pragma omp parallel for collapse(2) schedule(static) if (M * K >= PARALLEL_MIN_WORK)
    for (int64_t kb = 0; kb < ceil_div(K, kc_max); ++kb)
        for (int64_t ip = 0; ip < m_panels; ++ip) {
            const int64_t k0 = kb * kc_max, kc = std::min(kc_max, K - k0);
            T* dst = a_packed + k0 * m_pad + ip * kc * MR;
            for (int i = 0; i < MR; ++i) {
                const int64_t row = ip * MR + i;
                for (int64_t kk = 0; kk < kc; ++kk)
                    dst[kk * MR + i] = row < M ? src[row_offset[row] + col_offset[k0 + kk]] : T(0);
            }
        }
}

// C += A @ B over the columns [j_begin, j_end) of C, with A packed by pack_a.
//   pack_b(j0, j1, k0, kc, dst, rows): the block B[k0..k0+kc][j0..j1]. Either packs it into
//       dst[kk * NR + j] (zero for the columns past j1) and returns 0, or, where B can be read in
//       place, fills rows (a RowsB for k0..) and returns 1 (whole vectors) or 2 (halves).
//   store(i0, j0, j1, tile, rows): add the MR x NR tile into C at rows i0..i0+rows (rows <= MR, below M),
//       columns j0..j1
// One B panel at a time, in parallel over the panels when `parallel` (the panels of C are
// disjoint, so the threads never write to the same place unless `store` makes them).
template <typename T, int MR, typename PackB, typename Store>
void gemm_packed_a(int64_t M, int64_t K, const T* a_packed, int64_t j_begin, int64_t j_end,
                   PackB pack_b, Store store, bool parallel) {
    constexpr int NR = gemm_nr<T>();
    const int64_t m_panels = ceil_div(M, MR), m_pad = m_panels * MR;
    const int64_t n_panels = ceil_div(j_end - j_begin, NR), kc_max = gemm_kc<T>(K);
#pragma omp parallel if (parallel)
    {
        alignas(64) T b_panel[gemm_kc_max<T>() * NR + GEMM_SLACK];   // 32 KiB on each thread's stack
        alignas(64) T tile[MR * NR];
#pragma omp for schedule(dynamic, 1)
        for (int64_t jp = 0; jp < n_panels; ++jp) {
            const int64_t j0 = j_begin + jp * NR, j1 = std::min<int64_t>(j0 + NR, j_end);
            for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
                const int64_t kc = std::min(kc_max, K - k0);
                RowsB<T> rows;
                const int in_place = pack_b(j0, j1, k0, kc, b_panel, rows);
                const RowsB<T, true> halves{{rows.rows[0], rows.rows[1], rows.rows[2], rows.rows[3]}, rows.offset};
                static_assert(GEMM_NV == 2, "RowsB halves: four row pointers");
                for (int64_t ip = 0; ip < m_panels; ++ip) {
                    const T* a = a_packed + k0 * m_pad + ip * kc * MR;
                    if (in_place == 1) gemm_micro_kernel<T, MR>(kc, a, rows, tile);
                    else if (in_place == 2) gemm_micro_kernel<T, MR>(kc, a, halves, tile);
                    else gemm_micro_kernel<T, MR>(kc, a, PackedB<T>{b_panel}, tile);
                    store(ip * MR, j0, j1, tile, std::min<int64_t>(MR, M - ip * MR));
                }
            }
        }
    }
}

}  // namespace td
