// philox_args.h: the argument checks of the Philox bindings, one copy for tinydiff._C (bind_cpu.cpp)
// and tinydiff._C_cuda (bind_cuda.cpp). The generator's state is two host NumPy uint32 arrays,
// key (2,) and counter (4,), read by value on either device; the normals' dtype is float32 or float64.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace philox_args {

namespace py = pybind11;

// `obj` as `size` uint32 words, after checking that it is a C-contiguous uint32 array of shape (size,)
inline std::vector<uint32_t> words(py::handle obj, const char* fn, const char* name, py::ssize_t size) {
    const std::string where = std::string(fn) + ": " + name;
    if (!py::isinstance<py::array>(obj))
        throw py::type_error(where + " must be a numpy.ndarray of uint32 (host memory), got " + Py_TYPE(obj.ptr())->tp_name);
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (a.dtype().num() != py::dtype::num_of<uint32_t>())
        throw py::type_error(where + " must be a uint32 array, got dtype " + std::string(py::str(a.dtype())));
    if (a.ndim() != 1 || a.shape(0) != size)
        throw py::value_error(where + " must have shape (" + std::to_string(size) + ",), got " +
                              std::string(py::str(obj.attr("shape"))));
    if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_) || !(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
        throw py::value_error(where + " must be C-contiguous and aligned");
    const uint32_t* p = static_cast<const uint32_t*>(a.data());
    return std::vector<uint32_t>(p, p + size);
}

// true for float32, false for float64 (given as a NumPy dtype or anything numpy.dtype() takes)
inline bool is_float32(py::handle obj, const char* fn) {
    py::dtype dt;
    try {
        dt = py::dtype::from_args(py::reinterpret_borrow<py::object>(obj));
    } catch (py::error_already_set&) {
        throw py::type_error(std::string(fn) + ": dtype must be a NumPy dtype, got " + std::string(py::repr(obj)));
    }
    if (dt.num() != py::dtype::num_of<float>() && dt.num() != py::dtype::num_of<double>())
        throw py::type_error(std::string(fn) + ": dtype must be float32 or float64, got " + std::string(py::str(dt)));
    return dt.num() == py::dtype::num_of<float>();
}

}  // namespace philox_args
