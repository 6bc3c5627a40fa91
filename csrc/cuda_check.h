// cuda_check.h: CUDA_CHECK(call) turns a CUDA error into a C++ exception that names the error,
// the file and the line; pybind11 raises it in Python as RuntimeError. Never `assert`: a failed
// launch must reach the user, also in a -DNDEBUG build.
//
//   CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream));
//   my_kernel<<<grid, block, 0, stream>>>(...);
//   CUDA_CHECK(cudaGetLastError());        // a bad launch configuration shows up here
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

inline void cuda_check(cudaError_t err, const char* file, int line) {
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(err) + " (" +
                                 cudaGetErrorString(err) + ") at " + file + ":" + std::to_string(line));
    }
}

#define CUDA_CHECK(call) cuda_check((call), __FILE__, __LINE__)

inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }
