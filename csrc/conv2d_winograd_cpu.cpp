// conv2d_winograd_cpu.cpp: version "winograd" of the convolutions of conv2d_cpu.cpp. The 3x3,
// stride-1 convolutions (every one in the ContextUnet and the UNet) run as Winograd's minimal
// filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016,
// arXiv:1509.09308, eq. 8): each 2x2 block of outputs comes from a 4x4 patch d of the padded input,
//
//     Y = A^T [ sum_c (G g_oc G^T) * (B^T d_c B) ] A          (* elementwise over the 4x4 grid)
//
//   B^T = [1  0 -1  0]    G = [1    0    0 ]    A^T = [1 1  1  0]
//         [0  1  1  0]        [1/2  1/2  1/2]         [0 1 -1 -1]
//         [0 -1  1  0]        [1/2 -1/2  1/2]
//         [0  1  0 -1]        [0    0    1 ]
//
// 16 multiplies per channel pair and 2x2 outputs instead of 36: the sum over c, for each of the 16
// grid points xi, is a matrix product U[xi] (O x C) @ V[xi] (C x tiles), run by the GEMM micro-kernel
// of gemm_cpu.h. The transforms only add and halve, so float32 keeps the direct sum's accuracy.
// Tiles are taken NR at a time (one B panel: V[xi] is built straight in the packed layout), so one
// block's V and M = U V stay in L1/L2 between the three steps.
//
//   forward          3x3, stride 1, 2+ input channels: Winograd on x; otherwise version "gemm"
//   backward input   3x3, stride 1, padding <= 2, 2+ output channels: Winograd on dout padded by
//                    2-p, with the kernel flipped and its channels swapped (as in "gemm");
//                    otherwise "gemm"
//   backward weight  3x3, stride 1, at least 32 channels in and 64 out: the transpose of the same
//                    algorithm, a GEMM over tiles; otherwise "gemm"
// Reference: winograd_conv3x3_ref in tinydiff/kernels.py (the same algorithm in NumPy); test and
// benchmark: see conv2d_cpu.cpp.
#include <algorithm>
#include <vector>

#include "gemm_cpu.h"
#include "kernels_cpu.h"

namespace td {

// conv2d_gemm_cpu.cpp's layout helpers
template <typename T>
void pad_images(T* xp, const T* x, int64_t count, int64_t H, int64_t W, int64_t Hp, int64_t Wp,
                int64_t ph, int64_t pw);
template <typename T>
void to_channels_last(T* xt, const T* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t Hp,
                      int64_t Wp, int64_t ph, int64_t pw);

// U[xi][o][c] = (G g G^T)[xi] with g[u][v] = w(o, c, u, v), packed per xi as the A of the GEMM
// (panels of MR rows, k = c). w(o, c, u, v) = wt[o * so + c * sc + u * su + v * sv] (any flip/swap).
template <typename T, int MR>
static void winograd_weights(T* u_packed, const T* wt, int64_t O, int64_t C, int64_t so, int64_t sc,
                             int64_t su, int64_t sv) {
    const int64_t m_pad = ceil_div(O, MR) * MR;
    std::vector<T> u(16 * O * C);
    for (int64_t o = 0; o < O; ++o)
        for (int64_t c = 0; c < C; ++c) {
            T g[3][3], gg[4][3];
            for (int a = 0; a < 3; ++a)
                for (int b = 0; b < 3; ++b) g[a][b] = wt[o * so + c * sc + a * su + b * sv];
            for (int b = 0; b < 3; ++b) {                                 // G g
                gg[0][b] = g[0][b];
                gg[1][b] = T(0.5) * (g[0][b] + g[1][b] + g[2][b]);
                gg[2][b] = T(0.5) * (g[0][b] - g[1][b] + g[2][b]);
                gg[3][b] = g[2][b];
            }
            for (int a = 0; a < 4; ++a) {                                 // (G g) G^T
                T* dst = u.data() + (a * 4) * O * C + o * C + c;
                dst[0 * O * C] = gg[a][0];
                dst[1 * O * C] = T(0.5) * (gg[a][0] + gg[a][1] + gg[a][2]);
                dst[2 * O * C] = T(0.5) * (gg[a][0] - gg[a][1] + gg[a][2]);
                dst[3 * O * C] = gg[a][2];
            }
        }
    std::vector<int64_t> rows(O), cols(C);
    for (int64_t o = 0; o < O; ++o) rows[o] = o * C;
    for (int64_t c = 0; c < C; ++c) cols[c] = c;
    for (int xi = 0; xi < 16; ++xi) pack_a<T, MR>(O, C, u.data() + xi * O * C, rows.data(), cols.data(), u_packed + xi * m_pad * C);
}

// The patches of `lanes` tiles side by side in one tile row, whose first patch starts at p:
// d[r][s][l0 + t] = p[r * Wp + 2 t + s]. Row r of the patches is 2 lanes + 2 values of xp, read as
// four vectors and split into even and odd columns (s = 0, 1 from the first pair, 2, 3 from the
// pair two values on).
template <typename T, int BYTES, size_t... I>
inline void gather_run_lanes(T (*d)[4][gemm_nr<T>()], int l0, const T* p, int64_t Wp, std::index_sequence<I...>) {
#if TD_SHUFFLEVECTOR
    typedef T V __attribute__((vector_size(BYTES)));
    constexpr int L = BYTES / int(sizeof(T));
    for (int r = 0; r < 4; ++r) {
        V a, b, a2, b2;
        __builtin_memcpy(&a, p + r * Wp, BYTES);
        __builtin_memcpy(&b, p + r * Wp + L, BYTES);
        __builtin_memcpy(&a2, p + r * Wp + 2, BYTES);
        __builtin_memcpy(&b2, p + r * Wp + 2 + L, BYTES);
        const V s0 = __builtin_shufflevector(a, b, int(2 * I)...), s1 = __builtin_shufflevector(a, b, int(2 * I + 1)...);
        const V s2 = __builtin_shufflevector(a2, b2, int(2 * I)...), s3 = __builtin_shufflevector(a2, b2, int(2 * I + 1)...);
        __builtin_memcpy(&d[r][0][l0], &s0, BYTES);
        __builtin_memcpy(&d[r][1][l0], &s1, BYTES);
        __builtin_memcpy(&d[r][2][l0], &s2, BYTES);
        __builtin_memcpy(&d[r][3][l0], &s3, BYTES);
    }
#else
    (void)d, (void)l0, (void)p, (void)Wp;                        // not called: HAVE_SHUFFLEVECTOR is false
#endif
}

template <typename T, int BYTES>
inline void gather_run(T (*d)[4][gemm_nr<T>()], int l0, const T* p, int64_t Wp) {
    gather_run_lanes<T, BYTES>(d, l0, p, Wp, std::make_index_sequence<BYTES / sizeof(T)>());
}

// The mirror of gather_run for the output: the 2x2 blocks of `lanes` tiles side by side in one tile
// row, both rows inside out, go to dst[a * OW + 2 t + s] = y[a][s][l0 + t] (+ res at the same place,
// if res): each output row is the two columns of the tiles interleaved, stored as whole vectors.
template <typename T, int BYTES, size_t... I>
inline void scatter_run_lanes(T* dst, const T* res, int64_t OW, const T (*y)[2][gemm_nr<T>()], int l0,
                              std::index_sequence<I...>) {
#if TD_SHUFFLEVECTOR
    typedef T V __attribute__((vector_size(BYTES)));
    constexpr int L = BYTES / int(sizeof(T));
    for (int a = 0; a < 2; ++a) {
        V even, odd;
        __builtin_memcpy(&even, &y[a][0][l0], BYTES);
        __builtin_memcpy(&odd, &y[a][1][l0], BYTES);
        V lo = __builtin_shufflevector(even, odd, int(I % 2 ? L + I / 2 : I / 2)...);
        V hi = __builtin_shufflevector(even, odd, int(I % 2 ? L + L / 2 + I / 2 : L / 2 + I / 2)...);
        if (res) {
            V r0, r1;
            __builtin_memcpy(&r0, res + a * OW, BYTES);
            __builtin_memcpy(&r1, res + a * OW + L, BYTES);
            lo += r0, hi += r1;
        }
        __builtin_memcpy(dst + a * OW, &lo, BYTES);
        __builtin_memcpy(dst + a * OW + L, &hi, BYTES);
    }
#else
    (void)dst, (void)res, (void)OW, (void)y, (void)l0;           // not called: HAVE_SHUFFLEVECTOR is false
#endif
}

template <typename T, int BYTES>
inline void scatter_run(T* dst, const T* res, int64_t OW, const T (*y)[2][gemm_nr<T>()], int l0) {
    scatter_run_lanes<T, BYTES>(dst, res, OW, y, l0, std::make_index_sequence<BYTES / sizeof(T)>());
}

// out (N, O, OH, OW) = the stride-1 3x3 convolution of x (N, C, H, W) zero-padded by `pad`, with the
// packed transformed weights of winograd_weights, plus the addend (b, shift, residual: kernels_cpu.h).
// Needs C <= gemm_kc_max<T>() (one k block).
template <typename T, int MR>
static void winograd_conv(T* out, const T* x, const T* u_packed, const ConvAddend<T>& add, int64_t N, int64_t C,
                          int64_t H, int64_t W, int64_t O, int64_t pad, int64_t OH, int64_t OW) {
    constexpr int NR = gemm_nr<T>();
    const int64_t TH = ceil_div(OH, 2), TW = ceil_div(OW, 2), tiles = N * TH * TW;
    const int64_t Hp = 2 * TH + 2, Wp = 2 * TW + 2, m_pad = ceil_div(O, MR) * MR;
    AlignedBuffer<T> xp(N * C * Hp * Wp);
    pad_images(xp.data, x, N * C, H, W, Hp, Wp, pad, pad);
    const int64_t blocks = ceil_div(tiles, NR);
#pragma omp parallel if (tiles * O * C * 16 >= 32 * PARALLEL_MIN_WORK)
    {
        // V[xi][c][tile], M[xi][o][tile]; the xi planes one panel row apart more than their size, so
        // that the 16 planes of one (c, tile) do not fall into one set of the L1 cache (sizes of 2^k)
        const int64_t vs = C * NR + NR, ms = m_pad * NR + NR;
        AlignedBuffer<T> v(16 * vs), m(16 * ms);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < blocks; ++blk) {
            const int64_t t0 = blk * NR, nt = std::min<int64_t>(NR, tiles - t0);
            int64_t corner[NR], n_of[NR], i_of[NR], j_of[NR];             // where each tile's patch starts
            for (int l = 0; l < NR; ++l) {
                const int64_t t = t0 + std::min<int64_t>(l, nt - 1);     // lanes past the end repeat the last tile
                n_of[l] = t / (TH * TW), i_of[l] = t / TW % TH * 2, j_of[l] = t % TW * 2;
                corner[l] = (n_of[l] * C * Hp + i_of[l]) * Wp + j_of[l];
            }
            // V = B^T d B for every channel and tile (Lavin & Gray eq. 8, the data transform). First the
            // patches, d[r][s][lane] = xp[n, c, 2 ty + r, 2 tx + s]: a group of lanes whose tiles are
            // neighbours along one tile row reads each patch row as whole vectors (gather_run); other
            // lanes one value at a time.
            int run_bytes[NR];                                             // per lane: a run of this many bytes starts here,
            for (int l = 0; l < NR; ++l) run_bytes[l] = 0;                 // or 0 (read by value), -1 (inside a run)
            for (int bytes : {32, 16}) {
                const int lanes = bytes / int(sizeof(T));
                if (!HAVE_SHUFFLEVECTOR || lanes < 2 || lanes > NR) continue;
                for (int l0 = 0; l0 + lanes <= nt; l0 += lanes)
                    if (run_bytes[l0] == 0 && n_of[l0] == n_of[l0 + lanes - 1] && i_of[l0] == i_of[l0 + lanes - 1]
                        && j_of[l0 + lanes - 1] == j_of[l0] + 2 * (lanes - 1))
                        for (int l = l0; l < l0 + lanes; ++l) run_bytes[l] = l == l0 ? bytes : -1;
            }
            for (int64_t c = 0; c < C; ++c) {
                T d[4][4][NR];
                for (int l = 0; l < NR;) {
                    const T* p = xp.data + corner[l] + c * Hp * Wp;
                    const int bytes = run_bytes[l];
                    if (bytes == 32) { gather_run<T, 32>(d, l, p, Wp); l += 32 / int(sizeof(T)); continue; }
                    if (bytes == 16) { gather_run<T, 16>(d, l, p, Wp); l += 16 / int(sizeof(T)); continue; }
                    for (int r = 0; r < 4; ++r)
                        for (int s = 0; s < 4; ++s) d[r][s][l] = p[r * Wp + s];
                    ++l;
                }
                T e[4][4][NR];                                             // B^T d
                for (int s = 0; s < 4; ++s)
                    for (int l = 0; l < NR; ++l) {
                        e[0][s][l] = d[0][s][l] - d[2][s][l];
                        e[1][s][l] = d[1][s][l] + d[2][s][l];
                        e[2][s][l] = d[2][s][l] - d[1][s][l];
                        e[3][s][l] = d[1][s][l] - d[3][s][l];
                    }
                for (int r = 0; r < 4; ++r) {                              // (B^T d) B
                    T* dst = v.data + r * 4 * vs + c * NR;                 // V[r*4 + s][c][l]
                    for (int l = 0; l < NR; ++l) {
                        dst[0 * vs + l] = e[r][0][l] - e[r][2][l];
                        dst[1 * vs + l] = e[r][1][l] + e[r][2][l];
                        dst[2 * vs + l] = e[r][2][l] - e[r][1][l];
                        dst[3 * vs + l] = e[r][1][l] - e[r][3][l];
                    }
                }
            }
            // M[xi] = U[xi] V[xi]: 16 products of (O x C) by (C x NR), MR rows of O at a time
            for (int xi = 0; xi < 16; ++xi)
                for (int64_t ip = 0; ip < m_pad / MR; ++ip)
                    gemm_micro_kernel<T, MR>(C, u_packed + xi * m_pad * C + ip * C * MR, PackedB<T>{v.data + xi * vs},
                                             m.data + xi * ms + ip * MR * NR);
            // Y = A^T M A + b; each tile's 2x2 block into out, a run of tiles at a time (two output rows,
            // columns interleaved; cut at the bottom and right edges)
            for (int64_t o = 0; o < O; ++o) {
                T f[2][4][NR], y[2][2][NR];
                const T* mo = m.data + o * NR;
                for (int s = 0; s < 4; ++s)
                    for (int l = 0; l < NR; ++l) {
                        const T m0 = mo[(0 + s) * ms + l], m1 = mo[(4 + s) * ms + l];
                        const T m2 = mo[(8 + s) * ms + l], m3 = mo[(12 + s) * ms + l];
                        f[0][s][l] = m0 + m1 + m2;
                        f[1][s][l] = m1 - m2 - m3;
                    }
                T c[NR];                                                   // b[o] + shift[n, o], per tile
                for (int l = 0; l < NR; ++l) c[l] = add.per_channel(n_of[l], o, O);
                for (int a = 0; a < 2; ++a)
                    for (int l = 0; l < NR; ++l) {
                        y[a][0][l] = c[l] + f[a][0][l] + f[a][1][l] + f[a][2][l];
                        y[a][1][l] = c[l] + f[a][1][l] - f[a][2][l] - f[a][3][l];
                    }
                for (int l = 0; l < nt;) {
                    const int64_t at = ((n_of[l] * O + o) * OH + i_of[l]) * OW + j_of[l];
                    T* dst = out + at;
                    const T* res = add.residual ? add.residual + at : nullptr;
                    const int bytes = run_bytes[l], lanes = bytes / int(sizeof(T));
                    if (bytes > 0 && i_of[l] + 1 < OH && j_of[l + lanes - 1] + 1 < OW) {   // a run, inside out
                        if (bytes == 32) scatter_run<T, 32>(dst, res, OW, y, l);
                        else scatter_run<T, 16>(dst, res, OW, y, l);
                        l += lanes;
                        continue;
                    }
                    const bool right = j_of[l] + 1 < OW, below = i_of[l] + 1 < OH;
                    dst[0] = y[0][0][l] + (res ? res[0] : T(0));
                    if (right) dst[1] = y[0][1][l] + (res ? res[1] : T(0));
                    if (below) dst[OW] = y[1][0][l] + (res ? res[OW] : T(0));
                    if (right && below) dst[OW + 1] = y[1][1][l] + (res ? res[OW + 1] : T(0));
                    ++l;
                }
            }
        }
    }
}

// Where Winograd applies: 3x3, stride 1, at least 2 and at most one k block of input channels,
// and (AVX-512) output rows of at least 4 tiles (7 pixels).
// - One input channel (a model's first layer, or the backward input of its last): the 16 products
//   have K = 1, and the data transform costs what the GEMM saves. "gemm" took 0.51-0.68x
//   Winograd's time forward and 0.52-0.84x backward (batch 64-200, 32 channels, 16x16; AMD EPYC
//   Zen 3, AVX2 build, 2 threads).
// - Narrow images: no run of 4 tiles shares a tile row, so the data transform reads every value of
//   every patch on its own, and with 16-float vectors the multiplies it saves no longer pay for
//   that: at 4x4, 128 channels (Intel Xeon, 2 threads) "gemm" took 0.70x (batch 64) and 0.87x
//   (batch 100) its time in the AVX-512 build, but 0.98x and 1.07x in the AVX2 build.
constexpr int64_t WINOGRAD_MIN_WIDTH = VEC_BYTES >= 64 ? 7 : 1;
template <typename T>
static bool winograd_fits(const ConvShape& s, int64_t in_channels, int64_t out_width) {
    return s.kh == 3 && s.kw == 3 && s.stride == 1 && in_channels <= gemm_kc_max<T>() && in_channels >= 2
           && out_width >= WINOGRAD_MIN_WIDTH;
}

template <typename T>
void conv2d_forward_winograd(T* out, const T* x, const T* w, const ConvAddend<T>& add, const ConvShape& s) {
    if (!winograd_fits<T>(s, s.C, s.OW) || s.N * s.OH * s.OW == 0) return conv2d_forward_gemm<T>(out, x, w, add, s);
    with_tile_rows(s.O, [&](auto mr) {
        constexpr int MR = mr();
        AlignedBuffer<T> u(16 * ceil_div(s.O, MR) * MR * s.C);
        winograd_weights<T, MR>(u.data, w, s.O, s.C, s.C * 9, 9, 3, 1);
        winograd_conv<T, MR>(out, x, u.data, add, s.N, s.C, s.H, s.W, s.O, s.pad, s.OH, s.OW);
    });
}

// dx[n,c] = the stride-1 convolution of dout padded by 2-p with w'(c, o, u, v) = w(o, c, 2-u, 2-v)
template <typename T>
void conv2d_backward_input_winograd(T* dx, const T* dout, const T* w, const ConvShape& s) {
    if (!winograd_fits<T>(s, s.O, s.W) || s.pad > 2 || s.N * s.H * s.W == 0) return conv2d_backward_input_gemm<T>(dx, dout, w, s);
    with_tile_rows(s.C, [&](auto mr) {
        constexpr int MR = mr();
        AlignedBuffer<T> u(16 * ceil_div(s.C, MR) * MR * s.O);
        // w'(c, o, u, v) = w[o * C*9 + c * 9 + (2-u) * 3 + (2-v)]: start at w + 8, step back along u, v
        winograd_weights<T, MR>(u.data, w + 8, s.C, s.O, 9, s.C * 9, -3, -1);
        winograd_conv<T, MR>(dx, dout, u.data, ConvAddend<T>{}, s.N, s.O, s.OH, s.OW, s.C, 2 - s.pad, s.H, s.W);
    });
}

// body(start, width) for the panels [start, start + P) of 0..count, the last one cut; a whole
// panel's width is the constant P, so that its loop is unrolled and vectorised.
template <int64_t P, typename Body>
inline void for_panels(int64_t count, Body body) {
    int64_t start = 0;
    for (; start + P <= count; start += P) body(start, std::integral_constant<int64_t, P>{});
    if (start < count) body(start, count - start);
}

// dw by the transpose of the forward's algorithm (the gradient of eq. 8 with respect to g):
//   dM_t = A dY_t A^T   (4x4, from the 2x2 block dY_t of dout; zeros past the edges)
//   dU[xi] = sum over tiles t of dM_t[xi] V_t[xi]^T      (O x C: a GEMM whose K is the N TH TW tiles)
//   dg = G^T dU G       (3x3)
// Both transforms run along channels, on channels-last copies of x and dout (contiguous vectors);
// each thread takes a range of tiles, KC at a time, and sums into its own dU.
template <typename T, int MR>
static void winograd_backward_weight(T* dw, const T* dout, const T* x, const ConvShape& s) {
    constexpr int NR = gemm_nr<T>();
    const int64_t C = s.C, O = s.O, TH = ceil_div(s.OH, 2), TW = ceil_div(s.OW, 2), tiles = s.N * TH * TW;
    const int64_t Hp = 2 * TH + 2, Wp = 2 * TW + 2, m_pad = ceil_div(O, MR) * MR, c_pad = ceil_div(C, NR) * NR;
    const int64_t KC = std::max<int64_t>(8, std::min<int64_t>(gemm_kc_max<T>(), 4096 / (m_pad + c_pad)));
    const int nthreads = tiles * O * C * 16 >= 32 * PARALLEL_MIN_WORK ? omp_get_max_threads() : 1;
    AlignedBuffer<T> xt(s.N * Hp * Wp * C), dt(s.N * 2 * TH * 2 * TW * O), partial(int64_t(nthreads) * 16 * m_pad * c_pad);
    to_channels_last(xt.data, x, s.N, C, s.H, s.W, Hp, Wp, s.pad, s.pad);      // xt[n][i][j][c] = x_pad
    to_channels_last(dt.data, dout, s.N, O, s.OH, s.OW, 2 * TH, 2 * TW, 0, 0);   // dt[n][i][j][o], even sizes
    std::fill_n(partial.data, int64_t(nthreads) * 16 * m_pad * c_pad, T(0));
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
        T* du = partial.data + me * 16 * m_pad * c_pad;                           // dU[xi][o][c], this thread's
        // B: V[xi][c panel][k][NR], A: dM[xi][o panel][k][MR], the xi planes apart by one panel row
        // more than their size (as in the forward: no 2^k strides between them)
        const int64_t vs = c_pad * KC + NR, as = m_pad * KC + NR;
        AlignedBuffer<T> vb(16 * vs), ab(16 * as);
        std::fill_n(vb.data, 16 * vs, T(0));
        std::fill_n(ab.data, 16 * as, T(0));
        alignas(64) T tile[MR * NR];
        const int64_t t_begin = tiles * me / team, t_end = tiles * (me + 1) / team;
        for (int64_t k0 = t_begin; k0 < t_end; k0 += KC) {
            const int64_t kc = std::min(KC, t_end - k0);
            for (int64_t kk = 0; kk < kc; ++kk) {
                const int64_t t = k0 + kk, n = t / (TH * TW), ty = t / TW % TH, tx = t % TW;
                const T* p = xt.data + ((n * Hp + 2 * ty) * Wp + 2 * tx) * C;          // the patch, channels last
                // V = B^T d B along c, a panel of NR channels at a time (the last one cut)
                for_panels<NR>(C, [&](int64_t c0, auto width) {
                    T* dst = vb.data + c0 * KC + kk * NR;                                // V[xi][c0 panel][kk][.]
                    for (int64_t cl = 0; cl < width; ++cl) {
                        const T* pc = p + c0 + cl;
                        T e[4][4];
                        for (int q = 0; q < 4; ++q) {
                            const T d0 = pc[q * C], d1 = pc[(Wp + q) * C], d2 = pc[(2 * Wp + q) * C], d3 = pc[(3 * Wp + q) * C];
                            e[0][q] = d0 - d2, e[1][q] = d1 + d2, e[2][q] = d2 - d1, e[3][q] = d1 - d3;
                        }
                        for (int r = 0; r < 4; ++r) {
                            dst[(r * 4 + 0) * vs + cl] = e[r][0] - e[r][2];
                            dst[(r * 4 + 1) * vs + cl] = e[r][1] + e[r][2];
                            dst[(r * 4 + 2) * vs + cl] = e[r][2] - e[r][1];
                            dst[(r * 4 + 3) * vs + cl] = e[r][1] - e[r][3];
                        }
                    }
                });
                // dM = A dY A^T along o, a panel of MR outputs at a time
                const T* q = dt.data + ((n * 2 * TH + 2 * ty) * 2 * TW + 2 * tx) * O;    // dY, channels last
                for_panels<MR>(O, [&](int64_t o0, auto width) {
                    T* dst = ab.data + o0 * KC + kk * MR;                                // dM[xi][o0 panel][kk][.]
                    for (int64_t ol = 0; ol < width; ++ol) {
                        const T* qo = q + o0 + ol;
                        const T y00 = qo[0], y01 = qo[O], y10 = qo[2 * TW * O], y11 = qo[(2 * TW + 1) * O];
                        const T g[4][2] = {{y00, y01}, {y00 + y10, y01 + y11}, {y00 - y10, y01 - y11}, {-y10, -y11}};
                        for (int r = 0; r < 4; ++r) {
                            dst[(r * 4 + 0) * as + ol] = g[r][0];
                            dst[(r * 4 + 1) * as + ol] = g[r][0] + g[r][1];
                            dst[(r * 4 + 2) * as + ol] = g[r][0] - g[r][1];
                            dst[(r * 4 + 3) * as + ol] = -g[r][1];
                        }
                    }
                });
            }
            for (int xi = 0; xi < 16; ++xi)                                               // dU[xi] += dM[xi] V[xi]^T
                for (int64_t ip = 0; ip < m_pad / MR; ++ip)
                    for (int64_t jp = 0; jp < c_pad / NR; ++jp) {
                        gemm_micro_kernel<T, MR>(kc, ab.data + xi * as + ip * MR * KC,
                                                 PackedB<T>{vb.data + xi * vs + jp * NR * KC}, tile);
                        for (int i = 0; i < MR; ++i) {
                            T* __restrict acc = du + (xi * m_pad + ip * MR + i) * c_pad + jp * NR;
                            for (int j = 0; j < NR; ++j) acc[j] += tile[i * NR + j];
                        }
                    }
        }
    }
    // dw[o, c] = G^T (sum over threads of dU) G
#pragma omp parallel for collapse(2) schedule(static) if (O * C * 16 * nthreads >= PARALLEL_MIN_WORK)
    for (int64_t o = 0; o < O; ++o)
        for (int64_t c = 0; c < C; ++c) {
            T u[4][4], h[3][4];
            for (int xi = 0; xi < 16; ++xi) {
                T sum = 0;
                for (int t = 0; t < nthreads; ++t) sum += partial.data[((int64_t(t) * 16 + xi) * m_pad + o) * c_pad + c];
                u[xi / 4][xi % 4] = sum;
            }
            for (int b = 0; b < 4; ++b) {                                                // G^T dU
                h[0][b] = u[0][b] + T(0.5) * (u[1][b] + u[2][b]);
                h[1][b] = T(0.5) * (u[1][b] - u[2][b]);
                h[2][b] = T(0.5) * (u[1][b] + u[2][b]) + u[3][b];
            }
            T* dst = dw + (o * C + c) * 9;
            for (int a = 0; a < 3; ++a) {                                                // (G^T dU) G
                dst[a * 3 + 0] = h[a][0] + T(0.5) * (h[a][1] + h[a][2]);
                dst[a * 3 + 1] = T(0.5) * (h[a][1] - h[a][2]);
                dst[a * 3 + 2] = T(0.5) * (h[a][1] + h[a][2]) + h[a][3];
            }
        }
}

template <typename T>
void conv2d_backward_weight_winograd(T* dw, const T* dout, const T* x, const ConvShape& s) {
    // Its transforms cost as much as the multiplies it saves until both sides are wide: on a Zen 4
    // (AVX2 build, one thread) it took 0.84-0.96x "gemm"'s time from 32 -> 64 channels up, but 0.98x
    // at 32 -> 32 and 1.05x at 64 -> 32 (and far more with 1 channel in or out): "gemm" below that,
    // and in images narrower than WINOGRAD_MIN_WIDTH.
    if (s.kh != 3 || s.kw != 3 || s.stride != 1 || s.N * s.OH * s.OW == 0 || s.C < 32 || s.O < 64
        || s.OW < WINOGRAD_MIN_WIDTH)
        return conv2d_backward_weight_gemm<T>(dw, dout, x, s);
    with_tile_rows(s.O, [&](auto mr) { winograd_backward_weight<T, mr()>(dw, dout, x, s); });
}

#define TD_INSTANTIATE(T)                                                                              \
    template void conv2d_forward_winograd<T>(T*, const T*, const T*, const ConvAddend<T>&, const ConvShape&); \
    template void conv2d_backward_input_winograd<T>(T*, const T*, const T*, const ConvShape&);        \
    template void conv2d_backward_weight_winograd<T>(T*, const T*, const T*, const ConvShape&);
TD_INSTANTIATE(float)
TD_INSTANTIATE(double)

}  // namespace td
