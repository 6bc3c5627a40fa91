// conv2d_gemm_cpu.cpp: version "gemm" of the convolutions of conv2d_cpu.cpp: im2col + our
// cache-blocked, register-blocked GEMM (gemm_cpu.h).
//
//   forward          out (N, O, OH*OW) = w (O, C*kh*kw) @ im2col(x) (C*kh*kw, OH*OW), per sample
//   backward input   stride 1: the forward of dout padded by k-1-p, with the kernel flipped and its
//                    channels swapped; stride > 1: dcols = w^T @ dout, then col2im (a scatter)
//   backward weight  dw (O, kh*kw*C) = dout (O, pixels) @ im2col(x)^T, on channels-last copies
//
// The im2col matrix is never built. The image is copied once, zero-padded; then each panel of NR
// output pixels of im2col is either read in place (where L neighbouring pixels are contiguous in the
// padded image: rows of 16 or 8 at stride 1, the ContextUnet's case) or packed from runs of row
// copies. Backward weight runs along pixels in both of its operands, so it first copies dout and x
// to channels-last (a transpose in registers); then both are read as contiguous vectors.
// Test and benchmark: see conv2d_cpu.cpp.
#include <algorithm>
#include <cstring>
#include <vector>

#include "gemm_cpu.h"
#include "kernels_cpu.h"

namespace td {

// ---------------------------------------------------------------------------------------------
// Layout helpers

// dst[0..n) = src[0..n) for n <= 2 * B / sizeof(T): two moves of B bytes that overlap, B the
// largest power of 2 (down to one value) that n values fill.
template <typename T, int B>
inline void copy_two_overlapping(T* __restrict dst, const T* __restrict src, int64_t n) {
    constexpr int64_t E = B / int64_t(sizeof(T));
    if (n >= E) {
        __builtin_memcpy(dst, src, B);
        __builtin_memcpy(dst + n - E, src + n - E, B);
    } else if constexpr (E > 1) {
        copy_two_overlapping<T, B / 2>(dst, src, n);
    }
}

// A row copy without a library call for the short rows of small images (16 floats: one vector move).
template <typename T>
inline void copy_row(T* __restrict dst, const T* __restrict src, int64_t n) {
    if (n * int64_t(sizeof(T)) > 2 * VEC_BYTES) std::memcpy(dst, src, n * sizeof(T));
    else copy_two_overlapping<T, VEC_BYTES>(dst, src, n);
}

// xp[m, i, j] = x[m, i - ph, j - pw] inside x, else 0, for m < count images (N*C) of H x W.
// ph, pw may be negative (then the copy crops); Hp x Wp need not cover all of x.
template <typename T>
void pad_images(T* xp, const T* x, int64_t count, int64_t H, int64_t W, int64_t Hp, int64_t Wp,
                int64_t ph, int64_t pw) {
    const int64_t j_lo = std::max<int64_t>(0, pw), j_hi = std::min(Wp, W + pw);   // columns that hold x
#pragma omp parallel for collapse(2) schedule(static) if (count * Hp * Wp >= PARALLEL_MIN_WORK)
    for (int64_t m = 0; m < count; ++m)
        for (int64_t i = 0; i < Hp; ++i) {
            T* dst = xp + (m * Hp + i) * Wp;
            const int64_t h = i - ph;
            if (h < 0 || h >= H || j_lo >= j_hi) { std::fill(dst, dst + Wp, T(0)); continue; }
            for (int64_t j = 0; j < j_lo; ++j) dst[j] = T(0);
            copy_row(dst + j_lo, x + (m * H + h) * W + (j_lo - pw), j_hi - j_lo);
            for (int64_t j = j_hi; j < Wp; ++j) dst[j] = T(0);
        }
}

// Channels-last copy of N images (C, H, W) into (Hp, Wp, C), shifted by (ph, pw), zeros around:
// xt[n, i, j, c] = x[n, c, i - ph, j - pw]. A transpose, in blocks of L channels x L pixels:
// L vector loads along the rows of x, a transpose in registers, L vector stores along rows of xt.
template <typename T>
void to_channels_last(T* xt, const T* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t Hp,
                      int64_t Wp, int64_t ph, int64_t pw) {
    constexpr int64_t L = VEC_BYTES / int64_t(sizeof(T));
    const int64_t HW = H * W;
    if (Hp != H || Wp != W || ph != 0 || pw != 0) std::fill(xt, xt + N * Hp * Wp * C, T(0));
#pragma omp parallel for collapse(2) schedule(static) if (N * HW * C >= PARALLEL_MIN_WORK)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t q0 = 0; q0 < HW; q0 += L) {
            T* rows[L];                                     // where pixels q0.. go in xt (nullptr: cropped)
            const int64_t nq = std::min(L, HW - q0);
            bool whole = nq == L;
            for (int64_t q = 0; q < nq; ++q) {
                const int64_t i = (q0 + q) / W + ph, j = (q0 + q) % W + pw;
                rows[q] = (i >= 0 && i < Hp && j >= 0 && j < Wp) ? xt + ((n * Hp + i) * Wp + j) * C : nullptr;
                whole = whole && rows[q];
            }
            int64_t c0 = 0;
            for (; whole && c0 + L <= C; c0 += L) {         // whole blocks in registers
                Vec<T> r[L];
                for (int64_t c = 0; c < L; ++c) __builtin_memcpy(&r[c], x + (n * C + c0 + c) * HW + q0, sizeof(r[c]));
                transpose_vectors<T>(r);
                for (int64_t q = 0; q < L; ++q) __builtin_memcpy(rows[q] + c0, &r[q], sizeof(r[q]));
            }
            for (; c0 < C; ++c0)                            // the rest one channel at a time
                for (int64_t q = 0; q < nq; ++q)
                    if (rows[q]) rows[q][c0] = x[(n * C + c0) * HW + q0 + q];
        }
}

// One B panel of NR pixels that are NR / PW whole output rows of PW pixels each: for every k, piece p
// is PW contiguous values at src[p] + offset[k]. Fixed-size copies (one 16-byte move for PW = 4
// floats), unrolled, the row pointers in registers.
template <typename T, int PW>
inline void pack_row_pieces(T* __restrict dst, const T* const* src, const int64_t* offset, int64_t kc) {
    constexpr int NR = gemm_nr<T>(), PIECES = NR / PW;
    static_assert(NR % PW == 0, "pack_row_pieces: whole pieces in a panel");
    const T* rows[PIECES];
    for (int p = 0; p < PIECES; ++p) rows[p] = src[p];
    for (int64_t kk = 0; kk < kc; ++kk, dst += NR) {
        const int64_t off = offset[kk];
#pragma GCC unroll 32
        for (int p = 0; p < PIECES; ++p) __builtin_memcpy(dst + p * PW, rows[p] + off, PW * sizeof(T));
    }
}

// out (N, M, OH, OW) += A (M x C*kh*kw, packed) @ im2col(xp), for xp (N, C, Hp, Wp) already padded:
// the forward convolution without its padding. Columns of the GEMM are output pixels (n, i, j).
template <typename T, int MR>
void conv_gemm_padded(T* out, const T* a_packed, int64_t M, const T* xp, int64_t N, int64_t C,
                      int64_t Hp, int64_t Wp, int64_t kh, int64_t kw, int64_t stride, int64_t OH, int64_t OW) {
    constexpr int NR = gemm_nr<T>();
    const int64_t P = OH * OW, npix = N * P;

    // B[(c,u,v)][(n,i,j)] = xp[n, c, s*i+u, s*j+v] = (where pixel (n,i,j) reads)[tap_offset[k]]
    std::vector<int64_t> tap_offset(C * kh * kw);
    for (int64_t c = 0, k = 0; c < C; ++c)
        for (int64_t u = 0; u < kh; ++u)
            for (int64_t v = 0; v < kw; ++v) tap_offset[k++] = (c * Hp + u) * Wp + v;
    auto corner = [&](int64_t j) { return xp + (j / P * C * Hp + j % P / OW * stride) * Wp + j % OW * stride; };
    constexpr int L = NR / GEMM_NV;
    auto pack_b = [&](int64_t j0, int64_t j_end, int64_t k0, int64_t kc, T* __restrict dst, RowsB<T>& rows) {
        const int64_t* offset = tap_offset.data() + k0;
        if (stride == 1 && (OW % L == 0 || (HAVE_SHUFFLEVECTOR && OW % (L / 2) == 0)) && j_end - j0 == NR) {
            // no packing: at stride 1, L (or twice L/2) pixels of one output row read L neighbouring
            // values of xp, so B's vectors can be read in place
            const int64_t piece = OW % L == 0 ? L : L / 2;
            for (int64_t v = 0; v < GEMM_NV; ++v)
                for (int64_t h = 0; h < L / piece; ++h) rows.rows[h * GEMM_NV + v] = corner(j0 + v * L + h * piece);
            rows.offset = offset;
            return piece == L ? 1 : 2;
        }
        if (stride == 1 && j_end - j0 == NR && NR % OW == 0 && OW <= 8) {
            // narrow images (4x4: 8 rows of 4 in an AVX-512 panel): whole output rows, fixed-size
            // copies (NR is a power of 2, so OW is 1, 2, 4 or 8)
            const T* src[NR];
            for (int64_t p = 0; p < NR / OW; ++p) src[p] = corner(j0 + p * OW);
            if (OW == 1) pack_row_pieces<T, 1>(dst, src, offset, kc);
            else if (OW == 2) pack_row_pieces<T, 2>(dst, src, offset, kc);
            else if (OW == 4) pack_row_pieces<T, 4>(dst, src, offset, kc);
            else if constexpr (NR % 8 == 0) pack_row_pieces<T, 8>(dst, src, offset, kc);   // (OW == 8)
            return 0;
        }
        // packing: the panel's pixels lie in runs along output rows; for each k, each run is a
        // (strided) copy of a piece of one row of xp
        int64_t run_col[NR], run_len[NR];
        const T* run_src[NR];
        int nruns = 0;
        for (int64_t j = j0; j < j_end; ++nruns) {
            run_col[nruns] = j - j0;
            run_len[nruns] = std::min(OW - j % OW, j_end - j);
            run_src[nruns] = corner(j);
            j += run_len[nruns];
        }
        for (int64_t kk = 0; kk < kc; ++kk) {
            T* __restrict d = dst + kk * NR;
            for (int r = 0; r < nruns; ++r) {             // left to right: copy_vectors' overrun is rewritten
                const T* __restrict src = run_src[r] + offset[kk];
                if (stride == 1)
                    copy_vectors(d + run_col[r], src, run_len[r]);
                else if (stride == 2)
                    copy_vectors_stride2(d + run_col[r], src, run_len[r], std::make_index_sequence<L>());
                else
                    for (int64_t t = 0; t < run_len[r]; ++t) d[run_col[r] + t] = src[t * stride];
            }
            for (int64_t j = j_end - j0; j < NR; ++j) d[j] = T(0);
        }
        return 0;
    };
    // out[n, i0.., p..] += tile, one run of pixels of the same sample at a time
    auto store = [&](int64_t i0, int64_t j0, int64_t j_end, const T* tile, int64_t rows) {
        for (int64_t j = j0; j < j_end;) {
            const int64_t n = j / P, p = j % P, len = std::min(P - p, j_end - j);
            for (int64_t i = 0; i < rows; ++i) {
                T* __restrict dst = out + (n * M + i0 + i) * P + p;
                const T* __restrict src = tile + i * NR + (j - j0);
                for (int64_t t = 0; t < len; ++t) dst[t] += src[t];
            }
            j += len;
        }
    };
    gemm_packed_a<T, MR>(M, C * kh * kw, a_packed, 0, npix, pack_b, store, M * C * kh * kw * npix >= 32 * PARALLEL_MIN_WORK);
}

// ---------------------------------------------------------------------------------------------
// The three passes

// Each pass runs with the tile height MR that pads the fewest rows (with_tile_rows, gemm_cpu.h).

template <typename T, int MR>
void conv2d_forward_gemm_mr(T* out, const T* x, const T* w, const ConvAddend<T>& add, const ConvShape& s) {
    const int64_t K = s.C * s.kh * s.kw, P = s.OH * s.OW;
    const int64_t Hp = (s.OH - 1) * s.stride + s.kh, Wp = (s.OW - 1) * s.stride + s.kw;
    AlignedBuffer<T> xp(s.N * s.C * Hp * Wp), a(ceil_div(s.O, MR) * MR * K);
    pad_images(xp.data, x, s.N * s.C, s.H, s.W, Hp, Wp, s.pad, s.pad);
    std::vector<int64_t> rows(s.O), cols(K);                                         // A = w (O x C*kh*kw)
    for (int64_t o = 0; o < s.O; ++o) rows[o] = o * K;
    for (int64_t k = 0; k < K; ++k) cols[k] = k;
    pack_a<T, MR>(s.O, K, w, rows.data(), cols.data(), a.data);
#pragma omp parallel for collapse(2) schedule(static) if (s.N * s.O * P >= PARALLEL_MIN_WORK)
    for (int64_t n = 0; n < s.N; ++n)                          // out = b + shift (+ residual): the GEMM adds into it
        for (int64_t o = 0; o < s.O; ++o) {
            T* dst = out + (n * s.O + o) * P;
            const T c = add.per_channel(n, o, s.O);
            if (add.residual)
                for (int64_t p = 0; p < P; ++p) dst[p] = add.residual[(n * s.O + o) * P + p] + c;
            else
                std::fill_n(dst, P, c);
        }
    conv_gemm_padded<T, MR>(out, a.data, s.O, xp.data, s.N, s.C, Hp, Wp, s.kh, s.kw, s.stride, s.OH, s.OW);
}

template <typename T>
void conv2d_forward_gemm(T* out, const T* x, const T* w, const ConvAddend<T>& add, const ConvShape& s) {
    with_tile_rows(s.O, [&](auto mr) { conv2d_forward_gemm_mr<T, mr()>(out, x, w, add, s); });
}

template <typename T, int MR>
void conv2d_backward_input_gemm_mr(T* dx, const T* dout, const T* w, const ConvShape& s) {
    const int64_t C = s.C, O = s.O, kh = s.kh, kw = s.kw, taps = kh * kw;
    std::fill_n(dx, s.N * C * s.H * s.W, T(0));
    if (s.stride == 1) {
        // dx[n,c,h,w] = sum_{o,u,v} w[o,c,u,v] dout[n,o,h+p-u,w+p-v]: a stride-1 convolution of dout,
        // padded by k-1-p, with the kernel flipped and its channels swapped:
        //   A[c][(o,u,v)] = w[o, c, kh-1-u, kw-1-v]
        const int64_t Hp = s.H + kh - 1, Wp = s.W + kw - 1;
        AlignedBuffer<T> dp(s.N * O * Hp * Wp), a(ceil_div(C, MR) * MR * O * taps);
        pad_images(dp.data, dout, s.N * O, s.OH, s.OW, Hp, Wp, kh - 1 - s.pad, kw - 1 - s.pad);
        std::vector<int64_t> rows(C), cols(O * taps);     // w[o, c, t'] with t' = taps-1-t: the flip
        for (int64_t c = 0; c < C; ++c) rows[c] = c * taps;
        for (int64_t o = 0; o < O; ++o)
            for (int64_t t = 0; t < taps; ++t) cols[o * taps + t] = o * C * taps + taps - 1 - t;
        pack_a<T, MR>(C, O * taps, w, rows.data(), cols.data(), a.data);
        conv_gemm_padded<T, MR>(dx, a.data, C, dp.data, s.N, O, Hp, Wp, kh, kw, 1, s.H, s.W);
        return;
    }
    // Stride > 1: dcols[(c,u,v)][(n,i,j)] = sum_o w[o,c,u,v] dout[n,o,i,j]   (A = w^T, B = dout)
    // then col2im: dx[n, c, s*i+u-p, s*j+v-p] += dcols, done tile by tile in `store`.
    constexpr int NR = gemm_nr<T>();
    const int64_t M = C * taps, P = s.OH * s.OW, npix = s.N * P, st = s.stride, H = s.H, W = s.W;
    AlignedBuffer<T> a(ceil_div(M, MR) * MR * O), d_copy(s.N * O * P);
    std::vector<int64_t> rows(M), cols(O);                              // A[(c,u,v)][o] = w[o, (c,u,v)]
    for (int64_t r = 0; r < M; ++r) rows[r] = r;
    for (int64_t o = 0; o < O; ++o) cols[o] = o * M;
    pack_a<T, MR>(M, O, w, rows.data(), cols.data(), a.data);
    std::memcpy(d_copy.data, dout, s.N * O * P * sizeof(T));            // with room for copy_vectors
    // each row (c,u,v) of dcols, and each pixel (n,i,j) of dout: where they land in dx
    std::vector<int64_t> row_off(M), row_u(M), row_v(M), pix_j(npix), pix_h(npix), pix_off(npix);
    for (int64_t r = 0; r < M; ++r) {
        row_u[r] = r / kw % kh;
        row_v[r] = r % kw;
        row_off[r] = (r / taps) * H * W + row_u[r] * W + row_v[r];
    }
    for (int64_t q = 0; q < npix; ++q) {
        const int64_t n = q / P, i = q % P / s.OW;
        pix_j[q] = q % s.OW;
        pix_h[q] = i * st - s.pad;
        pix_off[q] = n * C * H * W + pix_h[q] * W + pix_j[q] * st - s.pad;
    }
    auto pack_b = [&](int64_t j0, int64_t j_end, int64_t k0, int64_t kc, T* __restrict dst, RowsB<T>&) {
        int64_t run_col[NR], run_len[NR];
        const T* run_src[NR];
        int nruns = 0;
        for (int64_t j = j0; j < j_end; ++nruns) {                      // runs within one sample
            const int64_t n = j / P, p = j % P, len = std::min(P - p, j_end - j);
            run_col[nruns] = j - j0;
            run_len[nruns] = len;
            run_src[nruns] = d_copy.data + (n * O + k0) * P + p;
            j += len;
        }
        for (int64_t kk = 0; kk < kc; ++kk) {
            T* __restrict d = dst + kk * NR;
            for (int r = 0; r < nruns; ++r) copy_vectors(d + run_col[r], run_src[r] + kk * P, run_len[r]);
            for (int64_t j = j_end - j0; j < NR; ++j) d[j] = T(0);
        }
        return 0;                                                 // B[o][(n,i,j)]: packed
    };
    auto store = [&](int64_t i0, int64_t j0, int64_t j_end, const T* tile, int64_t tile_rows) {   // col2im of one tile
        int64_t run_col[NR], run_len[NR];                               // the pixels as runs along dout rows
        int nruns = 0;
        for (int64_t j = j0; j < j_end; ++nruns) {
            run_col[nruns] = j - j0;
            run_len[nruns] = std::min(s.OW - pix_j[j], j_end - j);
            j += run_len[nruns];
        }
        for (int64_t r = i0; r < i0 + tile_rows; ++r)
            for (int k = 0; k < nruns; ++k) {
                const int64_t q = j0 + run_col[k], h = pix_h[q] + row_u[r];
                if (h < 0 || h >= H) continue;
                // the run's columns t that land inside dx: 0 <= w0 + t*st < W, w0 = s*j + v - p
                const int64_t w0 = pix_j[q] * st + row_v[r] - s.pad;
                const int64_t t_lo = w0 >= 0 ? 0 : (-w0 + st - 1) / st;
                const int64_t t_hi = w0 >= W ? 0 : std::min(run_len[k], (W - 1 - w0) / st + 1);
                T* __restrict dst = dx + pix_off[q] + row_off[r];
                const T* __restrict src = tile + (r - i0) * NR + run_col[k];
                for (int64_t t = t_lo; t < t_hi; ++t) dst[t * st] += src[t];
            }
    };
    if (kh <= s.stride && kw <= s.stride) {
        // the taps do not overlap: every dx element comes from one (pixel, tap), so panels of
        // pixels can go to any thread
        gemm_packed_a<T, MR>(M, O, a.data, 0, npix, pack_b, store, M * O * npix >= 32 * PARALLEL_MIN_WORK);
    } else {
        // overlapping taps: one thread per sample, so that no two threads add into one dx element
#pragma omp parallel for schedule(dynamic, 1) if (M * O * npix >= 32 * PARALLEL_MIN_WORK)
        for (int64_t n = 0; n < s.N; ++n)
            gemm_packed_a<T, MR>(M, O, a.data, n * P, (n + 1) * P, pack_b, store, false);
    }
}

template <typename T>
void conv2d_backward_input_gemm(T* dx, const T* dout, const T* w, const ConvShape& s) {
    // the GEMM's rows: input channels at stride 1, (channel, tap) pairs above
    with_tile_rows(s.stride == 1 ? s.C : s.C * s.kh * s.kw,
                   [&](auto mr) { conv2d_backward_input_gemm_mr<T, mr()>(dx, dout, w, s); });
}

// dw[o][(u,v,c)] = sum over pixels q = (n,i,j) of dout[n,o,i,j] * xp[n, c, s*i+u, s*j+v]: a GEMM with
// M = O, N = taps*C, K = pixels. Both operands run along pixels in NCHW, so they are first copied
// to channels-last, dt[q][o] and xt[n][h][w][c]; then A[q][o-panel] and B[q][(u,v,c)-panel] are
// contiguous copies. Each thread takes a range of pixels and sums into its own dw; they are added
// (and put back in (c,u,v) order) at the end.
template <typename T, int MR>
void conv2d_backward_weight_gemm_mr(T* dw, const T* dout, const T* x, const ConvShape& s) {
    constexpr int NR = gemm_nr<T>(), L = NR / GEMM_NV;
    constexpr int64_t KC = gemm_kc_max<T>();
    const int64_t C = s.C, O = s.O, kh = s.kh, kw = s.kw, ntaps = kh * kw * C;
    const int64_t Hp = (s.OH - 1) * s.stride + kh, Wp = (s.OW - 1) * s.stride + kw;
    const int64_t npix = s.N * s.OH * s.OW, m_pad = ceil_div(O, MR) * MR, n_pad = ceil_div(ntaps, NR) * NR;
    const int nthreads = O * ntaps * npix >= 32 * PARALLEL_MIN_WORK ? omp_get_max_threads() : 1;
    AlignedBuffer<T> dt(npix * O), xt(s.N * Hp * Wp * C);
    AlignedBuffer<T> a(int64_t(nthreads) * m_pad * KC), partial(int64_t(nthreads) * m_pad * n_pad);
    to_channels_last(dt.data, dout, s.N, O, s.OH, s.OW, s.OH, s.OW, 0, 0);
    to_channels_last(xt.data, x, s.N, C, s.H, s.W, Hp, Wp, s.pad, s.pad);
    std::fill_n(partial.data, int64_t(nthreads) * m_pad * n_pad, T(0));
    std::vector<int64_t> corner(npix);                 // where pixel q = (n,i,j)'s receptive field starts in xt
#pragma omp parallel for collapse(3) schedule(static) if (npix >= PARALLEL_MIN_WORK)
    for (int64_t n = 0; n < s.N; ++n)
        for (int64_t i = 0; i < s.OH; ++i)
            for (int64_t j = 0; j < s.OW; ++j)
                corner[(n * s.OH + i) * s.OW + j] = ((n * Hp + i * s.stride) * Wp + j * s.stride) * C;

    const int64_t n_panels = n_pad / NR;
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), team = omp_get_num_threads();
        T* a_block = a.data + int64_t(t) * m_pad * KC;
        T* c_mine = partial.data + int64_t(t) * m_pad * n_pad;
        alignas(64) T b_panel[KC * NR + GEMM_SLACK];
        alignas(64) T tile[MR * NR];
        const int64_t q_begin = npix * t / team, q_end = npix * (t + 1) / team;
        const int64_t kc_max = gemm_kc<T>(q_end - q_begin);
        for (int64_t k0 = q_begin; k0 < q_end; k0 += kc_max) {
            const int64_t kc = std::min(kc_max, q_end - k0);
            for (int64_t ip = 0; ip < m_pad / MR; ++ip)                  // A block: dt[q][o], panels of MR o's
                for (int64_t kk = 0; kk < kc; ++kk)
                    for (int64_t i = 0, o = ip * MR; i < MR; ++i, ++o)
                        a_block[(ip * kc + kk) * MR + i] = o < O ? dt.data[(k0 + kk) * O + o] : T(0);
            for (int64_t jp = 0; jp < n_panels; ++jp) {
                // B[q][tap j = (u*kw + v)*C + c] = xt[corner[q] + tap_offset(j)]: with whole vectors
                // of channels (C % L == 0) read in place, else packed from runs of channels
                const int64_t j0 = jp * NR, j_end = std::min(j0 + NR, ntaps);
                auto tap_offset = [&](int64_t j) { return ((j / C / kw) * Wp + j / C % kw) * C + j % C; };
                const bool in_place = C % L == 0 && j_end - j0 == NR;
                RowsB<T> rows{{}, corner.data() + k0};
                for (int64_t v = 0; v < GEMM_NV && in_place; ++v) rows.rows[v] = xt.data + tap_offset(j0 + v * L);
                int64_t run_col[NR], run_len[NR], run_off[NR];
                int nruns = 0;
                for (int64_t j = j0; j < j_end && !in_place; ++nruns) {
                    run_col[nruns] = j - j0;
                    run_len[nruns] = std::min(C - j % C, j_end - j);
                    run_off[nruns] = tap_offset(j);
                    j += run_len[nruns];
                }
                for (int64_t kk = 0; kk < kc && !in_place; ++kk) {
                    const T* field = xt.data + corner[k0 + kk];
                    T* __restrict d = b_panel + kk * NR;
                    for (int r = 0; r < nruns; ++r) copy_vectors(d + run_col[r], field + run_off[r], run_len[r]);
                    for (int64_t jj = j_end - j0; jj < NR; ++jj) d[jj] = T(0);
                }
                for (int64_t ip = 0; ip < m_pad / MR; ++ip) {
                    if (in_place) gemm_micro_kernel<T, MR>(kc, a_block + ip * kc * MR, rows, tile);
                    else gemm_micro_kernel<T, MR>(kc, a_block + ip * kc * MR, PackedB<T>{b_panel}, tile);
                    for (int r = 0; r < MR; ++r) {
                        T* __restrict dst = c_mine + (ip * MR + r) * n_pad + j0;
                        for (int jj = 0; jj < NR; ++jj) dst[jj] += tile[r * NR + jj];
                    }
                }
            }
        }
    }
    // dw[o, c, u, v] = sum over threads of partial[o][(u*kw + v)*C + c]
#pragma omp parallel for collapse(2) schedule(static) if (O * ntaps * nthreads >= PARALLEL_MIN_WORK)
    for (int64_t o = 0; o < O; ++o)
        for (int64_t c = 0; c < C; ++c)
            for (int64_t uv = 0; uv < kh * kw; ++uv) {
                T sum = 0;
                for (int t = 0; t < nthreads; ++t) sum += partial.data[(int64_t(t) * m_pad + o) * n_pad + uv * C + c];
                dw[(o * C + c) * kh * kw + uv] = sum;
            }
}

template <typename T>
void conv2d_backward_weight_gemm(T* dw, const T* dout, const T* x, const ConvShape& s) {
    with_tile_rows(s.O, [&](auto mr) { conv2d_backward_weight_gemm_mr<T, mr()>(dw, dout, x, s); });
}

#define TD_INSTANTIATE(T)                                                                              \
    template void conv2d_forward_gemm<T>(T*, const T*, const T*, const ConvAddend<T>&, const ConvShape&); \
    template void conv2d_backward_input_gemm<T>(T*, const T*, const T*, const ConvShape&);            \
    template void conv2d_backward_weight_gemm<T>(T*, const T*, const T*, const ConvShape&);          \
    template void pad_images<T>(T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t); \
    template void to_channels_last<T>(T*, const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
TD_INSTANTIATE(float)
TD_INSTANTIATE(double)

}  // namespace td
