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
//   forward          3x3, stride 1: Winograd on x; otherwise version "gemm"
//   backward input   3x3, stride 1, padding <= 2: Winograd on dout padded by 2-p, with the kernel
//                    flipped and its channels swapped (as in "gemm"); otherwise "gemm"
//   backward weight  version "gemm"
// Reference: winograd_conv3x3_ref in tinydiff/kernels.py (the same algorithm in NumPy); test and
// benchmark: see conv2d_cpu.cpp.
#include <algorithm>
#include <vector>

#include "gemm_cpu.h"
#include "kernels_cpu.h"

namespace td {

template <typename T>
void pad_images(T* xp, const T* x, int64_t count, int64_t H, int64_t W, int64_t Hp, int64_t Wp,
                int64_t ph, int64_t pw);   // conv2d_gemm_cpu.cpp

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

// out (N, O, OH, OW) = b + the stride-1 3x3 convolution of x (N, C, H, W) zero-padded by `pad`,
// with the packed transformed weights of winograd_weights. Needs C <= gemm_kc_max<T>() (one k block).
template <typename T, int MR>
static void winograd_conv(T* out, const T* x, const T* u_packed, const T* b, int64_t N, int64_t C,
                          int64_t H, int64_t W, int64_t O, int64_t pad, int64_t OH, int64_t OW) {
    constexpr int NR = gemm_nr<T>();
    const int64_t TH = ceil_div(OH, 2), TW = ceil_div(OW, 2), tiles = N * TH * TW;
    const int64_t Hp = 2 * TH + 2, Wp = 2 * TW + 2, m_pad = ceil_div(O, MR) * MR;
    AlignedBuffer<T> xp(N * C * Hp * Wp);
    pad_images(xp.data, x, N * C, H, W, Hp, Wp, pad, pad);
    const int64_t blocks = ceil_div(tiles, NR);
#pragma omp parallel if (tiles * O * C * 16 >= 32 * PARALLEL_MIN_WORK)
    {
        AlignedBuffer<T> v(16 * C * NR), m(16 * m_pad * NR);              // V[xi][c][tile], M[xi][o][tile]
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
                    T* dst = v.data + (r * 4 * C + c) * NR;                // V[r*4 + s][c][l]
                    for (int l = 0; l < NR; ++l) {
                        dst[0 * C * NR + l] = e[r][0][l] - e[r][2][l];
                        dst[1 * C * NR + l] = e[r][1][l] + e[r][2][l];
                        dst[2 * C * NR + l] = e[r][2][l] - e[r][1][l];
                        dst[3 * C * NR + l] = e[r][1][l] - e[r][3][l];
                    }
                }
            }
            // M[xi] = U[xi] V[xi]: 16 products of (O x C) by (C x NR), MR rows of O at a time
            for (int xi = 0; xi < 16; ++xi)
                for (int64_t ip = 0; ip < m_pad / MR; ++ip)
                    gemm_micro_kernel<T, MR>(C, u_packed + xi * m_pad * C + ip * C * MR, PackedB<T>{v.data + xi * C * NR},
                                             m.data + (xi * m_pad + ip * MR) * NR);
            // Y = A^T M A + b; each tile's 2x2 block into out, a run of tiles at a time (two output rows,
            // columns interleaved; cut at the bottom and right edges)
            for (int64_t o = 0; o < O; ++o) {
                T f[2][4][NR], y[2][2][NR];
                const T* mo = m.data + o * NR;
                for (int s = 0; s < 4; ++s)
                    for (int l = 0; l < NR; ++l) {
                        const T m0 = mo[(0 + s) * m_pad * NR + l], m1 = mo[(4 + s) * m_pad * NR + l];
                        const T m2 = mo[(8 + s) * m_pad * NR + l], m3 = mo[(12 + s) * m_pad * NR + l];
                        f[0][s][l] = m0 + m1 + m2;
                        f[1][s][l] = m1 - m2 - m3;
                    }
                const T bias = b ? b[o] : T(0);
                for (int a = 0; a < 2; ++a)
                    for (int l = 0; l < NR; ++l) {
                        y[a][0][l] = bias + f[a][0][l] + f[a][1][l] + f[a][2][l];
                        y[a][1][l] = bias + f[a][1][l] - f[a][2][l] - f[a][3][l];
                    }
                for (int l = 0; l < nt; ++l) {
                    T* dst = out + ((n_of[l] * O + o) * OH + i_of[l]) * OW + j_of[l];
                    const bool right = j_of[l] + 1 < OW, below = i_of[l] + 1 < OH;
                    dst[0] = y[0][0][l];
                    if (right) dst[1] = y[0][1][l];
                    if (below) dst[OW] = y[1][0][l];
                    if (right && below) dst[OW + 1] = y[1][1][l];
                }
            }
        }
    }
}

// Where Winograd applies: 3x3, stride 1, and C within one k block of the GEMM
template <typename T>
static bool winograd_fits(const ConvShape& s, int64_t in_channels) {
    return s.kh == 3 && s.kw == 3 && s.stride == 1 && in_channels <= gemm_kc_max<T>() && in_channels > 0;
}

template <typename T>
void conv2d_forward_winograd(T* out, const T* x, const T* w, const T* b, const ConvShape& s) {
    if (!winograd_fits<T>(s, s.C) || s.N * s.OH * s.OW == 0) return conv2d_forward_gemm<T>(out, x, w, b, s);
    with_tile_rows(s.O, [&](auto mr) {
        constexpr int MR = mr();
        AlignedBuffer<T> u(16 * ceil_div(s.O, MR) * MR * s.C);
        winograd_weights<T, MR>(u.data, w, s.O, s.C, s.C * 9, 9, 3, 1);
        winograd_conv<T, MR>(out, x, u.data, b, s.N, s.C, s.H, s.W, s.O, s.pad, s.OH, s.OW);
    });
}

// dx[n,c] = the stride-1 convolution of dout padded by 2-p with w'(c, o, u, v) = w(o, c, 2-u, 2-v)
template <typename T>
void conv2d_backward_input_winograd(T* dx, const T* dout, const T* w, const ConvShape& s) {
    if (!winograd_fits<T>(s, s.O) || s.pad > 2 || s.N * s.H * s.W == 0) return conv2d_backward_input_gemm<T>(dx, dout, w, s);
    with_tile_rows(s.C, [&](auto mr) {
        constexpr int MR = mr();
        AlignedBuffer<T> u(16 * ceil_div(s.C, MR) * MR * s.O);
        // w'(c, o, u, v) = w[o * C*9 + c * 9 + (2-u) * 3 + (2-v)]: start at w + 8, step back along u, v
        winograd_weights<T, MR>(u.data, w + 8, s.C, s.O, 9, s.C * 9, -3, -1);
        winograd_conv<T, MR>(dx, dout, u.data, nullptr, s.N, s.O, s.OH, s.OW, s.C, 2 - s.pad, s.H, s.W);
    });
}

template <typename T>
void conv2d_backward_weight_winograd(T* dw, const T* dout, const T* x, const ConvShape& s) {
    conv2d_backward_weight_gemm<T>(dw, dout, x, s);
}

#define TD_INSTANTIATE(T)                                                                              \
    template void conv2d_forward_winograd<T>(T*, const T*, const T*, const T*, const ConvShape&);     \
    template void conv2d_backward_input_winograd<T>(T*, const T*, const T*, const ConvShape&);        \
    template void conv2d_backward_weight_winograd<T>(T*, const T*, const T*, const ConvShape&);
TD_INSTANTIATE(float)
TD_INSTANTIATE(double)

}  // namespace td
