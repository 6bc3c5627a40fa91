// pack.cuh: Pack<T>, the 16 bytes one thread loads or stores with a single instruction, for the
// memory-bound elementwise kernels (diffusion_steps.cu, gelu.cu).
//
// Why: a memory-bound kernel runs as fast as the bytes it keeps in flight. One float per thread
// and array keeps 4 bytes waiting per load; a Pack keeps 16 (4 floats or 2 doubles), so the same
// threads ask for four times as much at once, with a quarter of the load/store instructions.
// nvcc turns a Pack copy into one ld.global.v4.f32 / st.global.v4.f32 (v2.f64 for doubles),
// as float4 / double2 would, but one template serves both types and reads as an array.
//
// The hardware needs the address 16-byte aligned (else: "misaligned address"), so a launcher uses
// Pack loads only when aligned16(...) holds for every array and each row starts on a Pack boundary.
// CuPy allocates 256-byte aligned blocks; a view such as x[1:] of a 1-D array is not aligned.
#pragma once

#include <cstdint>
#include <initializer_list>

template <typename T>
struct alignas(16) Pack {
    static constexpr int N = 16 / sizeof(T);    // 4 floats or 2 doubles
    T v[N];
};

// p must be 16-byte aligned
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) { return *reinterpret_cast<const Pack<T>*>(p); }

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& x) { *reinterpret_cast<Pack<T>*>(p) = x; }

// True if every pointer is a multiple of 16 bytes; nullptr (an input not given) counts as aligned.
inline bool aligned16(std::initializer_list<const void*> pointers) {
    for (const void* p : pointers)
        if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
    return true;
}
