// philox_cpu.cpp: the counter-based random numbers of tinydiff.philox.Philox, on the CPU.
//
// What it computes (the header csrc/philox_math.h has the equations): n consecutive words of the
// Philox-4x32-10 stream of `key`, from its word `counter` on (a 128-bit position), as uint32
// (philox_uint32_cpu) or as standard normals by Box-Muller (philox_normal_cpu, float or double).
// Word j of the stream is lane j % 4 of block j / 4, so a draw of n words starting anywhere needs
// the blocks counter / 4 .. (counter + n - 1) / 4, and each block is computed once. The normal of
// word j uses the pair of words 2 (j / 2), 2 (j / 2) + 1, which lie in the same block.
// Specification: philox_uint32_ref and philox_normal_ref in tinydiff/kernels.py. One version:
// the blocks are shared out among the OpenMP threads; the output does not depend on their number.
//
// Test:      python -m pytest tests/test_philox.py -q
// Benchmark: python benchmarks/bench_steps.py
#include "kernels_cpu.h"
#include "philox_math.h"

namespace td {

constexpr int64_t PHILOX_PARALLEL_MIN_BLOCKS = int64_t(1) << 12;   // fewer: one thread

// Calls emit(block_words, first_output_index) for every block the draw touches; the block's word
// l is output first + l (which may fall outside [0, n) for the first and the last block).
template <typename Emit>
static void for_each_block(const uint32_t key[2], const uint32_t counter[4], int64_t n, Emit emit) {
    const philox::U128 start = philox::from_words(counter);
    const int64_t skip = int64_t(start.lo & 3);                        // lanes of the first block before `start`
    const philox::U128 first = {(start.lo >> 2) | (start.hi << 62), start.hi >> 2};   // start / 4
    const int64_t blocks = (skip + n + 3) / 4;
#pragma omp parallel for schedule(static) if (blocks >= PHILOX_PARALLEL_MIN_BLOCKS)
    for (int64_t j = 0; j < blocks; ++j) {
        uint32_t w[4];
        philox::stream_block(w, philox::add(first, uint64_t(j)), key[0], key[1]);
        emit(w, 4 * j - skip);
    }
}

void philox_uint32_cpu(uint32_t* out, const uint32_t key[2], const uint32_t counter[4], int64_t n) {
    for_each_block(key, counter, n, [&](const uint32_t w[4], int64_t first) {
        for (int l = 0; l < 4; ++l)
            if (first + l >= 0 && first + l < n) out[first + l] = w[l];
    });
}

template <typename T>
void philox_normal_cpu(T* out, const uint32_t key[2], const uint32_t counter[4], int64_t n) {
    for_each_block(key, counter, n, [&](const uint32_t w[4], int64_t first) {
        double z[4];
        philox::box_muller(z[0], z[1], w[0], w[1]);
        philox::box_muller(z[2], z[3], w[2], w[3]);
        for (int l = 0; l < 4; ++l)
            if (first + l >= 0 && first + l < n) out[first + l] = T(z[l]);
    });
}

template void philox_normal_cpu<float>(float*, const uint32_t*, const uint32_t*, int64_t);
template void philox_normal_cpu<double>(double*, const uint32_t*, const uint32_t*, int64_t);

}  // namespace td
