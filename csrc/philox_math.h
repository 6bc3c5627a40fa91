// philox_math.h: the Philox-4x32-10 block function and the Box-Muller transform, one copy for the
// C++ kernel (philox_cpu.cpp) and the CUDA kernel (philox.cu), so that both compute the same words.
//
// Philox-4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC'11,
// Sec. 4.2): a 128-bit counter c = (c0, c1, c2, c3) and a 64-bit key k = (k0, k1) give 128 random bits,
//   10 rounds of   (hi0, lo0) = M0 * c0,  (hi1, lo1) = M1 * c2        (32 x 32 -> 64-bit products)
//                  c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
//   with the key bumped by the Weyl constants, k = (k0 + W0, k1 + W1) mod 2^32, before rounds 2..10.
// The stream of tinydiff.philox.Philox: its 32-bit word j (j < 2^128) is lane j % 4 of block j / 4.
// Normals (Box & Muller 1958) from the word pair (x0, x1) at word positions 2i, 2i + 1, in double:
//   u1 = (x0 + 1) 2^-32 in (0, 1],  u2 = x1 2^-32 in [0, 1)              (both exact in double)
//   r = sqrt(-2 log u1),  theta = 2 pi u2,  z_2i = r cos theta,  z_2i+1 = r sin theta
// and a float32 normal is the double one rounded. The NumPy reference is philox_block_ref and
// philox_normal_ref in tinydiff/kernels.py.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PHILOX_HD __host__ __device__
#else
#define PHILOX_HD
#endif

namespace philox {

constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;     // the round multipliers
constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;     // the Weyl key increments (golden ratio, sqrt 3 - 1)

PHILOX_HD inline void one_round(uint32_t c[4], uint32_t k0, uint32_t k1) {
    const uint64_t p0 = uint64_t(M0) * c[0], p1 = uint64_t(M1) * c[2];
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0), hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c[0] = hi1 ^ c[1] ^ k0;
    c[1] = lo1;
    c[2] = hi0 ^ c[3] ^ k1;
    c[3] = lo0;
}

// c <- Philox-4x32-10(c, k)
PHILOX_HD inline void block(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {
            k0 += W0;
            k1 += W1;
        }
        one_round(c, k0, k1);
    }
}

// A 128-bit number as two 64-bit halves, for the stream's word and block positions.
struct U128 {
    uint64_t lo, hi;
};

// The position of the stream's word `counter` (four 32-bit words, low first)
PHILOX_HD inline U128 from_words(const uint32_t w[4]) {
    return U128{uint64_t(w[0]) | (uint64_t(w[1]) << 32), uint64_t(w[2]) | (uint64_t(w[3]) << 32)};
}

PHILOX_HD inline U128 add(U128 a, uint64_t b) {
    const uint64_t lo = a.lo + b;
    return U128{lo, a.hi + (lo < a.lo ? 1 : 0)};
}

// The four words of block b of the stream (b: the 128-bit Philox counter)
PHILOX_HD inline void stream_block(uint32_t out[4], U128 b, uint32_t k0, uint32_t k1) {
    out[0] = uint32_t(b.lo);
    out[1] = uint32_t(b.lo >> 32);
    out[2] = uint32_t(b.hi);
    out[3] = uint32_t(b.hi >> 32);
    block(out, k0, k1);
}

// Box-Muller on one word pair: (z0, z1) ~ N(0, 1) independent, in double
PHILOX_HD inline void box_muller(double& z0, double& z1, uint32_t x0, uint32_t x1) {
    const double two_pi = 6.28318530717958647692528676655900577;
    const double u1 = (double(x0) + 1.0) * 2.3283064365386962890625e-10;   // 2^-32
    const double u2 = double(x1) * 2.3283064365386962890625e-10;
    const double r = sqrt(-2.0 * log(u1)), theta = two_pi * u2;
    z0 = r * cos(theta);
    z1 = r * sin(theta);
}

}  // namespace philox
