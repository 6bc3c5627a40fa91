// bind_cuda.cpp: tinydiff._C_cuda, the Python face of the CUDA kernels in csrc/*.cu.
//
// The same functions, names and arguments as the C++ module tinydiff._C, but taking and returning
// CuPy arrays (any object with __cuda_array_interface__ is accepted as input):
//   conv2d_versions() -> list[str]                            the first is the default
//   conv2d_forward(x, w, b, stride, padding, version=conv2d_versions()[0]) -> out
//   conv2d_backward_input(dout, w, (H, W), stride, padding, version=...) -> dx
//   conv2d_backward_weight(dout, x, (kh, kw), stride, padding, version=...) -> dw
//   q_sample(x0, eps, sqrt_alpha_bar, sqrt_one_minus_alpha_bar) -> xt
//   ddpm_step(xt, eps, z, coef_x, coef_eps, sigma, eps_uncond=None, guidance_scale=1.0) -> x_prev
//   ddim_step(xt, eps, z, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, sqrt_alpha_bar_prev, dir_coef,
//             sigma, clip_x0=False, eps_uncond=None, guidance_scale=1.0) -> (x_prev, x0)
//   gelu_forward(x) -> out,  gelu_backward(dout, x) -> dx
//   philox_uint32(key, counter, n) -> (n,) uint32,  philox_normal(key, counter, n, dtype) -> (n,)
//     key (2,) and counter (4,) are host NumPy uint32 arrays (the generator's state, read by value)
//   device_count(reason=False) -> int, or (int, why_none) with reason=True; 0 without a GPU
//
// A binding only unpacks and checks, then calls a launcher (kernels_cuda.h). Before any launch it
// checks each argument's __cuda_array_interface__: present (a NumPy array raises TypeError), float32
// or float64 and all the same (TypeError), the shapes (ValueError), C-contiguous (ValueError), and
// then, with the CUDA runtime, that every array lives in GPU memory on CuPy's current device.
// Outputs are new arrays from cupy.empty (CuPy's memory pool); kernels run on CuPy's current
// stream, so they are ordered with CuPy's own work. Nothing is copied between host and device,
// and nothing is cast. CUDA errors raise RuntimeError with file and line (cuda_check.h).
// Importing the module makes no CUDA call, so it imports on a machine without a GPU.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cuda_check.h"
#include "kernels_cuda.h"
#include "philox_args.h"

namespace py = pybind11;

namespace {

// ---------------------------------------------------------------------------------------------
// Reading and checking arguments

enum class DType { float32, float64 };

const char* dtype_name(DType d) { return d == DType::float32 ? "float32" : "float64"; }

std::string shape_str(const std::vector<long long>& shape) {
    std::string s = "(";
    for (size_t d = 0; d < shape.size(); ++d) s += (d ? ", " : "") + std::to_string(shape[d]);
    return s + (shape.size() == 1 ? ",)" : ")");
}

// A GPU array as its __cuda_array_interface__ describes it.
struct DeviceArray {
    std::string name;                 // the argument's name, for error messages
    void* ptr = nullptr;
    std::vector<long long> shape;
    DType dtype = DType::float32;

    long long size() const {
        long long n = 1;
        for (long long d : shape) n *= d;
        return n;
    }
    int ndim() const { return (int)shape.size(); }
    template <typename T> T* data() const { return static_cast<T*>(ptr); }
};

// Everything that can be checked without touching the GPU: the interface, dtype, C-contiguity.
DeviceArray device_array(const char* fn, const char* name, py::handle obj) {
    std::string where = std::string(fn) + ": " + name;
    if (!py::hasattr(obj, "__cuda_array_interface__"))
        throw py::type_error(where + " must be a GPU array (a CuPy array, or any object with "
                             "__cuda_array_interface__), got " + Py_TYPE(obj.ptr())->tp_name +
                             "; move it to the GPU first, e.g. cupy.asarray(" + name + ")");
    py::dict iface = obj.attr("__cuda_array_interface__");
    DeviceArray a;
    a.name = name;

    std::string typestr = py::str(iface["typestr"]);
    if (typestr == "<f4" || typestr == "=f4" || typestr == "|f4")
        a.dtype = DType::float32;
    else if (typestr == "<f8" || typestr == "=f8" || typestr == "|f8")
        a.dtype = DType::float64;
    else
        throw py::type_error(where + " must be float32 or float64, got typestr '" + typestr +
                             "' (the kernels do not cast: convert with .astype(...))");
    long long itemsize = a.dtype == DType::float32 ? 4 : 8;

    for (py::handle d : py::tuple(iface["shape"])) a.shape.push_back(d.cast<long long>());
    a.ptr = reinterpret_cast<void*>(py::tuple(iface["data"])[0].cast<uintptr_t>());

    if (iface.contains("mask") && !iface["mask"].is_none())
        throw py::value_error(where + " has a mask; masked arrays are not supported");
    if (iface.contains("strides") && !iface["strides"].is_none()) {   // None means C-contiguous
        py::tuple strides = iface["strides"];
        long long expected = itemsize;
        for (int d = a.ndim() - 1; d >= 0; --d) {
            if (a.shape[d] > 1 && strides[d].cast<long long>() != expected) {
                std::vector<long long> given;
                for (py::handle st : strides) given.push_back(st.cast<long long>());
                throw py::value_error(where + " must be C-contiguous, got strides " + shape_str(given) +
                                      " for shape " + shape_str(a.shape) +
                                      "; make a contiguous copy with cupy.ascontiguousarray(...)");
            }
            expected *= a.shape[d];
        }
    }
    if (a.size() >= (1LL << 31))
        throw py::value_error(where + " has " + std::to_string(a.size()) + " elements; the kernels "
                              "index with 32-bit ints, so at most 2**31 - 1");
    return a;
}

std::optional<DeviceArray> optional_device_array(const char* fn, const char* name, py::handle obj) {
    if (obj.is_none()) return std::nullopt;
    return device_array(fn, name, obj);
}

void expect_ndim(const char* fn, const DeviceArray& a, int ndim, const char* layout) {
    if (a.ndim() != ndim)
        throw py::value_error(std::string(fn) + ": " + a.name + " must be " + std::to_string(ndim) +
                              "-D " + layout + ", got shape " + shape_str(a.shape));
}

void expect_shape(const char* fn, const DeviceArray& a, const std::vector<long long>& shape,
                  const std::string& why) {
    if (a.shape != shape)
        throw py::value_error(std::string(fn) + ": " + a.name + " has shape " + shape_str(a.shape) +
                              " but should have shape " + shape_str(shape) + " (" + why + ")");
}

void expect_same_dtype(const char* fn, const DeviceArray& a, const DeviceArray& b) {
    if (a.dtype != b.dtype)
        throw py::type_error(std::string(fn) + ": " + b.name + " is " + dtype_name(b.dtype) + " but " +
                             a.name + " is " + dtype_name(a.dtype) +
                             "; the kernels do not cast, so pass them in one dtype");
}

// A Python int (or NumPy integer), not a bool or a float, within [lo, 2**30].
int int_arg(const char* fn, const char* name, py::handle obj, long long lo) {
    if (PyBool_Check(obj.ptr()) || !PyIndex_Check(obj.ptr()))
        throw py::type_error(std::string(fn) + ": " + name + " must be an int, got " + Py_TYPE(obj.ptr())->tp_name);
    long long v = py::reinterpret_steal<py::int_>(PyNumber_Index(obj.ptr())).cast<long long>();
    if (v < lo || v > (1LL << 30))
        throw py::value_error(std::string(fn) + ": " + name + " must be in [" + std::to_string(lo) + ", 2**30], got " +
                              std::to_string(v));
    return (int)v;
}

// A pair of ints >= 1, such as (H, W) or (kh, kw), given as a tuple or list.
std::pair<int, int> pair_arg(const char* fn, const char* name, py::handle obj) {
    if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj) || py::len(obj) != 2)
        throw py::type_error(std::string(fn) + ": " + name + " must be a pair of ints, got " + Py_TYPE(obj.ptr())->tp_name);
    py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
    return {int_arg(fn, name, seq[0], 1), int_arg(fn, name, seq[1], 1)};
}

void expect_int_size(const char* fn, const char* what, long long size) {
    if (size >= (1LL << 31))
        throw py::value_error(std::string(fn) + ": " + what + " would have " + std::to_string(size) +
                              " elements; the kernels index with 32-bit ints, so at most 2**31 - 1");
}

// The kernels compute rows such as s*i + u - p and h + p - u in 32-bit ints: keep them in range.
void expect_int_conv(const char* fn, const Conv2dShape& s) {
    long long rows = (long long)s.H + 2LL * s.padding + s.kh + (long long)s.OH * s.stride;
    long long cols = (long long)s.W + 2LL * s.padding + s.kw + (long long)s.OW * s.stride;
    if (rows >= (1LL << 31) || cols >= (1LL << 31))
        throw py::value_error(std::string(fn) + ": sizes, stride and padding too large for 32-bit indexing");
}

// `version`, after checking that it names a row of the version table (conv2d.cu)
const std::string& conv_version(const char* fn, const std::string& version) {
    std::vector<std::string> names = conv2d_versions_cuda();
    std::string known;
    for (size_t i = 0; i < names.size(); ++i) {
        if (names[i] == version) return version;
        known += (i ? ", " : "") + names[i];
    }
    throw py::value_error(std::string(fn) + ": unknown version '" + version + "'; the versions are " + known);
}

// ---------------------------------------------------------------------------------------------
// CuPy: the current device and stream, and new arrays

py::module_ cupy_module(const char* fn) {
    try {
        return py::module_::import("cupy");
    } catch (py::error_already_set& err) {
        throw py::import_error(std::string(fn) + ": the CUDA kernels return CuPy arrays, but CuPy cannot "
                               "be imported (" + err.what() + "); install it with pip install -e '.[gpu]'");
    }
}

// Every array in GPU memory, all on CuPy's current device, which becomes ours too. Size-0 arrays
// may have a null pointer, and no kernel reads them, so they are not asked about.
void check_device(const char* fn, std::initializer_list<const DeviceArray*> arrays) {
    int device = -1;
    const DeviceArray* first = nullptr;
    for (const DeviceArray* a : arrays) {
        if (a == nullptr || a->size() == 0) continue;
        cudaPointerAttributes attr;
        CUDA_CHECK(cudaPointerGetAttributes(&attr, a->ptr));
        if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
            throw py::type_error(std::string(fn) + ": " + a->name + " is not in GPU memory (its "
                                 "__cuda_array_interface__ points to host memory)");
        if (first == nullptr) {
            first = a;
            device = attr.device;
        } else if (attr.device != device) {
            throw py::value_error(std::string(fn) + ": " + a->name + " is on GPU " + std::to_string(attr.device) +
                                  " but " + first->name + " is on GPU " + std::to_string(device));
        }
    }
    int current = cupy_module(fn).attr("cuda").attr("Device")().attr("id").cast<int>();
    if (device >= 0 && device != current)
        throw py::value_error(std::string(fn) + ": the arrays are on GPU " + std::to_string(device) +
                              " but CuPy's current device is GPU " + std::to_string(current) +
                              "; call it inside `with cupy.cuda.Device(" + std::to_string(device) + "):`");
    int ours;
    CUDA_CHECK(cudaGetDevice(&ours));
    if (ours != current) CUDA_CHECK(cudaSetDevice(current));
}

cudaStream_t current_stream(const char* fn) {
    py::object stream = cupy_module(fn).attr("cuda").attr("get_current_stream")();
    return reinterpret_cast<cudaStream_t>(stream.attr("ptr").cast<uintptr_t>());
}

int sm_count() {
    int device, sms;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
}

// A new, uninitialised CuPy array on the current device, and its device pointer.
py::object new_array(const char* fn, const std::vector<long long>& shape, DType dtype) {
    py::tuple t(shape.size());
    for (size_t d = 0; d < shape.size(); ++d) t[d] = py::int_(shape[d]);
    return cupy_module(fn).attr("empty")(t, dtype_name(dtype));
}

template <typename T>
T* data_of(const py::object& array) {
    return reinterpret_cast<T*>(array.attr("data").attr("ptr").cast<uintptr_t>());
}

// Call f(T()) with T = float or double, as the dtype says.
template <typename F>
void dispatch(DType dtype, F&& f) {
    if (dtype == DType::float32) f(float());
    else f(double());
}

// ---------------------------------------------------------------------------------------------
// Convolution

py::object conv2d_forward(py::object x_obj, py::object w_obj, py::object b_obj, py::object stride_obj,
                          py::object padding_obj, const std::string& version) {
    const char* fn = "conv2d_forward";
    DeviceArray x = device_array(fn, "x", x_obj), w = device_array(fn, "w", w_obj);
    std::optional<DeviceArray> b = optional_device_array(fn, "b", b_obj);
    expect_ndim(fn, x, 4, "(N, C, H, W)");
    expect_ndim(fn, w, 4, "(O, C, kh, kw)");
    expect_same_dtype(fn, x, w);
    if (x.shape[1] != w.shape[1])
        throw py::value_error(std::string(fn) + ": x has shape " + shape_str(x.shape) + ", " + std::to_string(x.shape[1]) +
                              " channels, but w has shape " + shape_str(w.shape) + ", for " + std::to_string(w.shape[1]));
    if (b) {
        expect_same_dtype(fn, x, *b);
        expect_shape(fn, *b, {w.shape[0]}, "one bias per output channel of w");
    }
    int stride = int_arg(fn, "stride", stride_obj, 1), padding = int_arg(fn, "padding", padding_obj, 0);
    const std::string& v = conv_version(fn, version);
    Conv2dShape s{};
    s.N = (int)x.shape[0]; s.C = (int)x.shape[1]; s.H = (int)x.shape[2]; s.W = (int)x.shape[3];
    s.O = (int)w.shape[0]; s.kh = (int)w.shape[2]; s.kw = (int)w.shape[3];
    s.stride = stride; s.padding = padding;
    if (s.H + 2LL * padding < s.kh || s.W + 2LL * padding < s.kw)
        throw py::value_error(std::string(fn) + ": kernel " + std::to_string(s.kh) + "x" + std::to_string(s.kw) +
                              " is larger than the padded input (x shape " + shape_str(x.shape) +
                              ", padding " + std::to_string(padding) + ")");
    long long oh = (s.H + 2LL * padding - s.kh) / stride + 1, ow = (s.W + 2LL * padding - s.kw) / stride + 1;
    std::vector<long long> out_shape = {s.N, s.O, oh, ow};
    expect_int_size(fn, "out", (long long)s.N * s.O * oh * ow);
    s.OH = (int)oh;
    s.OW = (int)ow;
    expect_int_conv(fn, s);

    check_device(fn, {&x, &w, b ? &*b : nullptr});
    int sms = sm_count();
    long long scratch = conv2d_forward_workspace(s, v, sms);
    expect_int_size(fn, "the split-K scratch space", scratch);
    py::object out = new_array(fn, out_shape, x.dtype);
    py::object workspace = scratch > 0 ? new_array(fn, {scratch}, x.dtype) : py::none();
    cudaStream_t stream = current_stream(fn);
    dispatch(x.dtype, [&](auto zero) {
        using T = decltype(zero);
        conv2d_forward_cuda<T>(data_of<T>(out), x.data<T>(), w.data<T>(), b ? b->data<T>() : nullptr, s, v,
                               scratch > 0 ? data_of<T>(workspace) : nullptr, sms, stream);
    });
    return out;   // `workspace` goes back to CuPy's pool when this returns; the stream orders its reuse
}

py::object conv2d_backward_input(py::object dout_obj, py::object w_obj, py::object input_hw_obj,
                                 py::object stride_obj, py::object padding_obj, const std::string& version) {
    const char* fn = "conv2d_backward_input";
    DeviceArray dout = device_array(fn, "dout", dout_obj), w = device_array(fn, "w", w_obj);
    expect_ndim(fn, dout, 4, "(N, O, OH, OW)");
    expect_ndim(fn, w, 4, "(O, C, kh, kw)");
    expect_same_dtype(fn, dout, w);
    if (dout.shape[1] != w.shape[0])
        throw py::value_error(std::string(fn) + ": dout has shape " + shape_str(dout.shape) + ", " +
                              std::to_string(dout.shape[1]) + " channels, but w has shape " + shape_str(w.shape) +
                              ", for " + std::to_string(w.shape[0]) + " output channels");
    std::pair<int, int> input_hw = pair_arg(fn, "input_hw", input_hw_obj);
    int stride = int_arg(fn, "stride", stride_obj, 1), padding = int_arg(fn, "padding", padding_obj, 0);
    const std::string& v = conv_version(fn, version);
    std::vector<long long> dx_shape = {dout.shape[0], w.shape[1], (long long)input_hw.first, (long long)input_hw.second};
    expect_int_size(fn, "dx", dx_shape[0] * dx_shape[1] * dx_shape[2] * dx_shape[3]);
    Conv2dShape s{};
    s.N = (int)dout.shape[0]; s.C = (int)w.shape[1]; s.H = input_hw.first; s.W = input_hw.second;
    s.O = (int)w.shape[0]; s.kh = (int)w.shape[2]; s.kw = (int)w.shape[3];
    s.OH = (int)dout.shape[2]; s.OW = (int)dout.shape[3];
    s.stride = stride; s.padding = padding;
    expect_int_conv(fn, s);

    check_device(fn, {&dout, &w});
    py::object dx = new_array(fn, dx_shape, dout.dtype);
    cudaStream_t stream = current_stream(fn);
    dispatch(dout.dtype, [&](auto zero) {
        using T = decltype(zero);
        conv2d_backward_input_cuda<T>(data_of<T>(dx), dout.data<T>(), w.data<T>(), s, v, stream);
    });
    return dx;
}

py::object conv2d_backward_weight(py::object dout_obj, py::object x_obj, py::object kernel_hw_obj,
                                  py::object stride_obj, py::object padding_obj, const std::string& version) {
    const char* fn = "conv2d_backward_weight";
    DeviceArray dout = device_array(fn, "dout", dout_obj), x = device_array(fn, "x", x_obj);
    expect_ndim(fn, dout, 4, "(N, O, OH, OW)");
    expect_ndim(fn, x, 4, "(N, C, H, W)");
    expect_same_dtype(fn, dout, x);
    if (dout.shape[0] != x.shape[0])
        throw py::value_error(std::string(fn) + ": dout has shape " + shape_str(dout.shape) + " but x has shape " +
                              shape_str(x.shape) + ": their batch sizes differ");
    std::pair<int, int> kernel_hw = pair_arg(fn, "kernel_hw", kernel_hw_obj);
    int stride = int_arg(fn, "stride", stride_obj, 1), padding = int_arg(fn, "padding", padding_obj, 0);
    const std::string& v = conv_version(fn, version);
    Conv2dShape s{};
    s.N = (int)x.shape[0]; s.C = (int)x.shape[1]; s.H = (int)x.shape[2]; s.W = (int)x.shape[3];
    s.O = (int)dout.shape[1]; s.kh = kernel_hw.first; s.kw = kernel_hw.second;
    s.OH = (int)dout.shape[2]; s.OW = (int)dout.shape[3];
    s.stride = stride; s.padding = padding;
    long long oh = (s.H + 2LL * padding - s.kh) / stride + 1, ow = (s.W + 2LL * padding - s.kw) / stride + 1;
    if (s.H + 2LL * padding < s.kh || s.W + 2LL * padding < s.kw || s.OH > oh || s.OW > ow)
        throw py::value_error(std::string(fn) + ": dout has shape " + shape_str(dout.shape) + ", more than the " +
                              "output of a " + std::to_string(s.kh) + "x" + std::to_string(s.kw) + " convolution of x " +
                              shape_str(x.shape) + " with stride " + std::to_string(stride) + " and padding " +
                              std::to_string(padding));
    std::vector<long long> dw_shape = {s.O, s.C, s.kh, s.kw};
    expect_int_size(fn, "dw", (long long)s.O * s.C * s.kh * s.kw);
    expect_int_conv(fn, s);

    check_device(fn, {&dout, &x});
    int sms = sm_count();
    long long scratch = conv2d_backward_weight_workspace(s, v, sms);
    expect_int_size(fn, "the split-K scratch space", scratch);
    py::object dw = new_array(fn, dw_shape, x.dtype);
    py::object workspace = scratch > 0 ? new_array(fn, {scratch}, x.dtype) : py::none();
    cudaStream_t stream = current_stream(fn);
    dispatch(x.dtype, [&](auto zero) {
        using T = decltype(zero);
        conv2d_backward_weight_cuda<T>(data_of<T>(dw), dout.data<T>(), x.data<T>(), s, v,
                                       scratch > 0 ? data_of<T>(workspace) : nullptr, sms, stream);
    });
    return dw;   // `workspace` goes back to CuPy's pool when this returns; the stream orders its reuse
}

// ---------------------------------------------------------------------------------------------
// Diffusion steps: x-like arrays (B, ...) and per-sample coefficients (B,)

struct Batch {
    int B, per_sample;
};

// `like` fixes the shape; each of `same` must have it; each of `coefs` must be (B,); one dtype.
Batch check_batch(const char* fn, const DeviceArray& like, std::initializer_list<const DeviceArray*> same,
                  std::initializer_list<const DeviceArray*> coefs) {
    if (like.ndim() < 1)
        throw py::value_error(std::string(fn) + ": " + like.name + " must have a batch axis, got shape " + shape_str(like.shape));
    for (const DeviceArray* a : same) {
        if (a == nullptr) continue;
        expect_same_dtype(fn, like, *a);
        expect_shape(fn, *a, like.shape, "the shape of " + like.name);
    }
    long long B = like.shape[0];
    for (const DeviceArray* a : coefs) {
        expect_same_dtype(fn, like, *a);
        expect_shape(fn, *a, {B}, "one coefficient per sample of " + like.name);
    }
    return Batch{(int)B, B > 0 ? (int)(like.size() / B) : 0};
}

py::object q_sample(py::object x0_obj, py::object eps_obj, py::object sab_obj, py::object somab_obj) {
    const char* fn = "q_sample";
    DeviceArray x0 = device_array(fn, "x0", x0_obj), eps = device_array(fn, "eps", eps_obj);
    DeviceArray sab = device_array(fn, "sqrt_alpha_bar", sab_obj);
    DeviceArray somab = device_array(fn, "sqrt_one_minus_alpha_bar", somab_obj);
    Batch n = check_batch(fn, x0, {&eps}, {&sab, &somab});
    check_device(fn, {&x0, &eps, &sab, &somab});
    py::object xt = new_array(fn, x0.shape, x0.dtype);
    cudaStream_t stream = current_stream(fn);
    dispatch(x0.dtype, [&](auto zero) {
        using T = decltype(zero);
        q_sample_cuda<T>(data_of<T>(xt), x0.data<T>(), eps.data<T>(), sab.data<T>(), somab.data<T>(),
                         n.B, n.per_sample, stream);
    });
    return xt;
}

py::object ddpm_step(py::object xt_obj, py::object eps_obj, py::object z_obj, py::object coef_x_obj,
                     py::object coef_eps_obj, py::object sigma_obj, py::object eps_uncond_obj, double guidance_scale) {
    const char* fn = "ddpm_step";
    DeviceArray xt = device_array(fn, "xt", xt_obj), eps = device_array(fn, "eps", eps_obj);
    DeviceArray z = device_array(fn, "z", z_obj);
    DeviceArray coef_x = device_array(fn, "coef_x", coef_x_obj), coef_eps = device_array(fn, "coef_eps", coef_eps_obj);
    DeviceArray sigma = device_array(fn, "sigma", sigma_obj);
    std::optional<DeviceArray> eps_uncond = optional_device_array(fn, "eps_uncond", eps_uncond_obj);
    const DeviceArray* uncond = eps_uncond ? &*eps_uncond : nullptr;
    Batch n = check_batch(fn, xt, {&eps, &z, uncond}, {&coef_x, &coef_eps, &sigma});
    check_device(fn, {&xt, &eps, &z, &coef_x, &coef_eps, &sigma, uncond});
    py::object x_prev = new_array(fn, xt.shape, xt.dtype);
    cudaStream_t stream = current_stream(fn);
    dispatch(xt.dtype, [&](auto zero) {
        using T = decltype(zero);
        ddpm_step_cuda<T>(data_of<T>(x_prev), xt.data<T>(), eps.data<T>(), uncond ? uncond->data<T>() : nullptr,
                          z.data<T>(), coef_x.data<T>(), coef_eps.data<T>(), sigma.data<T>(), (T)guidance_scale,
                          n.B, n.per_sample, stream);
    });
    return x_prev;
}

py::tuple ddim_step(py::object xt_obj, py::object eps_obj, py::object z_obj, py::object sab_obj,
                    py::object somab_obj, py::object sab_prev_obj, py::object dir_coef_obj, py::object sigma_obj,
                    bool clip_x0, py::object eps_uncond_obj, double guidance_scale) {
    const char* fn = "ddim_step";
    DeviceArray xt = device_array(fn, "xt", xt_obj), eps = device_array(fn, "eps", eps_obj);
    DeviceArray z = device_array(fn, "z", z_obj);
    DeviceArray sab = device_array(fn, "sqrt_alpha_bar", sab_obj);
    DeviceArray somab = device_array(fn, "sqrt_one_minus_alpha_bar", somab_obj);
    DeviceArray sab_prev = device_array(fn, "sqrt_alpha_bar_prev", sab_prev_obj);
    DeviceArray dir_coef = device_array(fn, "dir_coef", dir_coef_obj), sigma = device_array(fn, "sigma", sigma_obj);
    std::optional<DeviceArray> eps_uncond = optional_device_array(fn, "eps_uncond", eps_uncond_obj);
    const DeviceArray* uncond = eps_uncond ? &*eps_uncond : nullptr;
    Batch n = check_batch(fn, xt, {&eps, &z, uncond}, {&sab, &somab, &sab_prev, &dir_coef, &sigma});
    check_device(fn, {&xt, &eps, &z, &sab, &somab, &sab_prev, &dir_coef, &sigma, uncond});
    py::object x_prev = new_array(fn, xt.shape, xt.dtype), x0 = new_array(fn, xt.shape, xt.dtype);
    cudaStream_t stream = current_stream(fn);
    dispatch(xt.dtype, [&](auto zero) {
        using T = decltype(zero);
        ddim_step_cuda<T>(data_of<T>(x_prev), data_of<T>(x0), xt.data<T>(), eps.data<T>(),
                          uncond ? uncond->data<T>() : nullptr, z.data<T>(), sab.data<T>(), somab.data<T>(),
                          sab_prev.data<T>(), dir_coef.data<T>(), sigma.data<T>(), clip_x0, (T)guidance_scale,
                          n.B, n.per_sample, stream);
    });
    return py::make_tuple(x_prev, x0);
}

// ---------------------------------------------------------------------------------------------
// GELU

py::object gelu_forward(py::object x_obj) {
    const char* fn = "gelu_forward";
    DeviceArray x = device_array(fn, "x", x_obj);
    check_device(fn, {&x});
    py::object out = new_array(fn, x.shape, x.dtype);
    cudaStream_t stream = current_stream(fn);
    dispatch(x.dtype, [&](auto zero) {
        using T = decltype(zero);
        gelu_forward_cuda<T>(data_of<T>(out), x.data<T>(), x.size(), stream);
    });
    return out;
}

py::object gelu_backward(py::object dout_obj, py::object x_obj) {
    const char* fn = "gelu_backward";
    DeviceArray dout = device_array(fn, "dout", dout_obj), x = device_array(fn, "x", x_obj);
    expect_same_dtype(fn, x, dout);
    expect_shape(fn, dout, x.shape, "the shape of x");
    check_device(fn, {&dout, &x});
    py::object dx = new_array(fn, x.shape, x.dtype);
    cudaStream_t stream = current_stream(fn);
    dispatch(x.dtype, [&](auto zero) {
        using T = decltype(zero);
        gelu_backward_cuda<T>(data_of<T>(dx), dout.data<T>(), x.data<T>(), x.size(), stream);
    });
    return dx;
}

// ---------------------------------------------------------------------------------------------
// Philox random numbers: the state (key, counter) is read on the host and passed by value

py::object philox_uint32(py::object key_obj, py::object counter_obj, py::object n_obj) {
    const char* fn = "philox_uint32";
    std::vector<uint32_t> key = philox_args::words(key_obj, fn, "key", 2);
    std::vector<uint32_t> counter = philox_args::words(counter_obj, fn, "counter", 4);
    long long n = int_arg(fn, "n", n_obj, 0);
    check_device(fn, {});
    py::object out = cupy_module(fn).attr("empty")(py::make_tuple(n), "uint32");
    philox_uint32_cuda(data_of<uint32_t>(out), key.data(), counter.data(), n, current_stream(fn));
    return out;
}

py::object philox_normal(py::object key_obj, py::object counter_obj, py::object n_obj, py::object dtype_obj) {
    const char* fn = "philox_normal";
    std::vector<uint32_t> key = philox_args::words(key_obj, fn, "key", 2);
    std::vector<uint32_t> counter = philox_args::words(counter_obj, fn, "counter", 4);
    long long n = int_arg(fn, "n", n_obj, 0);
    DType dtype = philox_args::is_float32(dtype_obj, fn) ? DType::float32 : DType::float64;
    check_device(fn, {});
    py::object out = new_array(fn, {n}, dtype);
    cudaStream_t stream = current_stream(fn);
    dispatch(dtype, [&](auto zero) {
        using T = decltype(zero);
        philox_normal_cuda<T>(data_of<T>(out), key.data(), counter.data(), n, stream);
    });
    return out;
}

// ---------------------------------------------------------------------------------------------
// How many GPUs the CUDA runtime sees: 0 (and why) without a driver or a device; never raises.

py::object device_count(bool reason) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    std::string why;
    if (err != cudaSuccess) {
        count = 0;
        why = std::string("the CUDA runtime finds no GPU: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
        cudaGetLastError();   // clear it, so that it is not reported by a later call
    } else if (count == 0) {
        why = "the CUDA runtime finds no GPU";
    }
    if (reason) return py::make_tuple(count, why);
    return py::int_(count);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
    m.doc() = "tinydiff CUDA kernels (csrc/*.cu): the functions of tinydiff._C, on CuPy arrays";

    m.def("conv2d_versions", &conv2d_versions_cuda, "The conv2d kernel versions; the first is the default.");
    m.def("conv2d_forward", &conv2d_forward, "out (N, O, OH, OW) = conv(x (N, C, H, W), w (O, C, kh, kw)) + b (O,) or None",
          py::arg("x"), py::arg("w"), py::arg("b"), py::arg("stride"), py::arg("padding"),
          py::arg("version") = conv2d_versions_cuda()[0]);
    m.def("conv2d_backward_input", &conv2d_backward_input,
          "dx (N, C, H, W) from dout (N, O, OH, OW), w (O, C, kh, kw) and input_hw = (H, W)",
          py::arg("dout"), py::arg("w"), py::arg("input_hw"), py::arg("stride"), py::arg("padding"),
          py::arg("version") = conv2d_versions_cuda()[0]);
    m.def("conv2d_backward_weight", &conv2d_backward_weight,
          "dw (O, C, kh, kw) from dout (N, O, OH, OW), x (N, C, H, W) and kernel_hw = (kh, kw)",
          py::arg("dout"), py::arg("x"), py::arg("kernel_hw"), py::arg("stride"), py::arg("padding"),
          py::arg("version") = conv2d_versions_cuda()[0]);

    m.def("q_sample", &q_sample, "DDPM eq. 4: xt = sqrt_alpha_bar * x0 + sqrt_one_minus_alpha_bar * eps",
          py::arg("x0"), py::arg("eps"), py::arg("sqrt_alpha_bar"), py::arg("sqrt_one_minus_alpha_bar"));
    m.def("ddpm_step", &ddpm_step, "DDPM eq. 11: x_prev = coef_x (xt - coef_eps eps) + sigma z",
          py::arg("xt"), py::arg("eps"), py::arg("z"), py::arg("coef_x"), py::arg("coef_eps"), py::arg("sigma"),
          py::arg("eps_uncond") = py::none(), py::arg("guidance_scale") = 1.0);
    m.def("ddim_step", &ddim_step, "DDIM eq. 12; returns (x_prev, x0)",
          py::arg("xt"), py::arg("eps"), py::arg("z"), py::arg("sqrt_alpha_bar"), py::arg("sqrt_one_minus_alpha_bar"),
          py::arg("sqrt_alpha_bar_prev"), py::arg("dir_coef"), py::arg("sigma"), py::arg("clip_x0") = false,
          py::arg("eps_uncond") = py::none(), py::arg("guidance_scale") = 1.0);

    m.def("gelu_forward", &gelu_forward, "gelu(x) = 0.5 x (1 + erf(x / sqrt 2))", py::arg("x"));
    m.def("gelu_backward", &gelu_backward, "dx = dout (Phi(x) + x phi(x))", py::arg("dout"), py::arg("x"));

    m.def("philox_uint32", &philox_uint32, "key (2,), counter (4,) host uint32 -> (n,) uint32 on the GPU: the Philox-4x32-10 stream",
          py::arg("key"), py::arg("counter"), py::arg("n"));
    m.def("philox_normal", &philox_normal, "key (2,), counter (4,) host uint32 -> (n,) standard normals on the GPU, Box-Muller",
          py::arg("key"), py::arg("counter"), py::arg("n"), py::arg("dtype"));
    m.def("device_count", &device_count,
          "GPUs the CUDA runtime sees (0 without a driver or device); with reason=True, (count, why_none)",
          py::arg("reason") = false);
}
