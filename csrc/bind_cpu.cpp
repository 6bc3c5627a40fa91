// Placeholder module until the C++ kernels land: it exposes no kernel, so tinydiff uses the
// NumPy reference everywhere.
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_C, m) { m.doc() = "tinydiff C++ kernels (none built yet)"; }
