// bind_cpu.cpp: the Python module tinydiff._C (pybind11). Bindings only check and unpack
// arguments, allocate the outputs and call a kernel with the GIL released; the math is in
// conv2d_cpu.cpp, diffusion_steps_cpu.cpp, gelu_cpu.cpp, batch_norm_cpu.cpp (batch norm, alone or with GELU),
// group_norm_cpu.cpp (group norm, alone or with SiLU),
// max_pool_cpu.cpp, adam_cpu.cpp and philox_cpu.cpp.
//
// Every array must be a NumPy float32 or float64 array, C-contiguous, aligned, in native byte
// order, with the dtype of the first array argument (max pooling's idx: int64; Philox's key and
// counter: uint32). Anything else raises TypeError or ValueError naming the argument: nothing is
// cast or copied behind the caller's back.
// tinydiff._C_cuda (bind_cuda.cpp) has the same functions with the same arguments.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "gemm_cpu.h"
#include "kernels_cpu.h"
#include "philox_args.h"

namespace py = pybind11;
using td::ConvShape;

// ---------------------------------------------------------------------------------------------
// Argument checks

static std::string repr_type(const py::handle& obj) { return py::str(py::type::of(obj).attr("__name__")); }

// The array `obj` as float32 ('f') or float64 ('d'), C-contiguous etc., with `ndim` axes
// (-1: at least one, the batch; -2: any number, even 0).
static py::array array_arg(const py::object& obj, const char* fn, const char* name, int ndim) {
    const std::string where = std::string(fn) + ": " + name;
    if (!py::isinstance<py::array>(obj))
        throw py::type_error(where + " must be a numpy.ndarray, got " + repr_type(obj));
    auto a = py::reinterpret_borrow<py::array>(obj);
    const py::dtype dt = a.dtype();
    const uint16_t one = 1;
    const char bo = dt.byteorder(), native_bo = *reinterpret_cast<const char*>(&one) == 1 ? '<' : '>';
    const bool native = bo == '=' || bo == '|' || bo == native_bo;
    if ((dt.num() != py::dtype::num_of<float>() && dt.num() != py::dtype::num_of<double>()) || !native)
        throw py::type_error(where + " must be a float32 or float64 array in native byte order, got dtype " +
                             std::string(py::str(dt)));
    if (ndim >= 0 && a.ndim() != ndim)
        throw py::value_error(where + " must have " + std::to_string(ndim) + " dimensions, got shape " +
                              std::string(py::str(obj.attr("shape"))));
    if (ndim == -1 && a.ndim() < 1)
        throw py::value_error(where + " must have at least one dimension (the batch), got a 0-d array");
    if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_))
        throw py::value_error(where + " must be C-contiguous (use numpy.ascontiguousarray)");
    if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
        throw py::value_error(where + " must be aligned to its dtype");
    if (a.size() == 0)
        throw py::value_error(where + " is empty (shape " + std::string(py::str(obj.attr("shape"))) + ")");
    return a;
}

static void same_dtype(const py::array& a, const py::array& first, const char* fn, const char* name,
                       const char* first_name) {
    if (a.dtype().num() != first.dtype().num())
        throw py::type_error(std::string(fn) + ": " + name + " has dtype " + std::string(py::str(a.dtype())) +
                             " but " + first_name + " has " + std::string(py::str(first.dtype())));
}

static void same_shape(const py::array& a, const py::array& first, const char* fn, const char* name,
                       const char* first_name) {
    bool same = a.ndim() == first.ndim();
    for (py::ssize_t i = 0; same && i < a.ndim(); ++i) same = a.shape(i) == first.shape(i);
    if (same) return;
    throw py::value_error(std::string(fn) + ": " + name + " has shape " + std::string(py::str(a.attr("shape"))) +
                          " but " + first_name + " has shape " + std::string(py::str(first.attr("shape"))));
}

// A Python int (or NumPy integer), not a bool or float, within [lo, 2^30].
static int64_t int_arg(const py::handle& obj, const char* fn, const char* name, int64_t lo) {
    if (PyBool_Check(obj.ptr()) || !PyIndex_Check(obj.ptr()))
        throw py::type_error(std::string(fn) + ": " + name + " must be an int, got " + repr_type(obj));
    const auto index = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
    if (!index) throw py::error_already_set();
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (overflow || v < lo || v > (int64_t(1) << 30))
        throw py::value_error(std::string(fn) + ": " + name + " must be in [" + std::to_string(lo) +
                              ", 2**30], got " + std::string(py::str(index)));
    return v;
}

static std::pair<int64_t, int64_t> pair_arg(const py::object& obj, const char* fn, const char* name) {
    if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj) || py::len(obj) != 2)
        throw py::type_error(std::string(fn) + ": " + name + " must be a pair of ints, got " +
                             std::string(py::repr(obj)));
    auto seq = py::reinterpret_borrow<py::sequence>(obj);
    return {int_arg(seq[0], fn, name, 1), int_arg(seq[1], fn, name, 1)};
}

// A version name from td::CONV2D_VERSIONS
static std::string version_arg(const py::object& obj, const char* fn) {
    if (!py::isinstance<py::str>(obj))
        throw py::type_error(std::string(fn) + ": version must be a str, got " + repr_type(obj));
    const std::string version = obj.cast<std::string>();
    if (td::find_conv2d_version<float>(version)) return version;
    std::string known;
    for (const auto& v : td::CONV2D_VERSIONS<float>) known += std::string(known.empty() ? "" : ", ") + v.name;
    throw py::value_error(std::string(fn) + ": unknown version '" + version + "'; the versions are " + known +
                          " (see conv2d_versions())");
}

// (H + 2p - k) / s + 1, after checking that the kernel fits the padded input
static int64_t conv_out(int64_t size, int64_t k, int64_t s, int64_t p, const char* fn, const char* what) {
    if (size + 2 * p < k)
        throw py::value_error(std::string(fn) + ": kernel size " + std::to_string(k) + " is larger than the padded " +
                              what + " " + std::to_string(size + 2 * p));
    return (size + 2 * p - k) / s + 1;
}

// The kernels' zero-padded copies hold up to N * max(C, O) * (H + 2p + kh) * (W + 2p + kw) values;
// refuse sizes whose workspace could not be indexed (or allocated) rather than overflow.
static void check_workspace(const ConvShape& s, const char* fn) {
    const long double values = (long double)s.N * std::max(s.C, s.O) * (s.H + 2 * s.pad + s.kh) *
                               (s.W + 2 * s.pad + s.kw);
    if (values > (long double)(int64_t(1) << 46))
        throw py::value_error(std::string(fn) + ": sizes, padding and kernel too large (a workspace of " +
                              std::to_string((double)values) + " values)");
}

static bool is_f32(const py::array& a) { return a.dtype().num() == py::dtype::num_of<float>(); }

template <typename T> static const T* ptr(const py::array& a) { return static_cast<const T*>(a.data()); }

// ---------------------------------------------------------------------------------------------
// Convolution

template <typename T>
static const T* optional_ptr(const py::object& a) { return a.is_none() ? nullptr : ptr<T>(py::reinterpret_borrow<py::array>(a)); }

template <typename T>
static py::array conv2d_forward_t(const py::array& x, const py::array& w, const py::object& b, const py::object& shift,
                                  const py::object& residual, const ConvShape& s, const std::string& v) {
    py::array_t<T> out({s.N, s.O, s.OH, s.OW});
    const td::ConvAddend<T> add{optional_ptr<T>(b), optional_ptr<T>(shift), optional_ptr<T>(residual)};
    T* o = out.mutable_data();
    py::gil_scoped_release release;
    td::conv2d_forward_cpu<T>(o, ptr<T>(x), ptr<T>(w), add, s, v);
    return out;
}

// conv2d_forward, and conv2d_add_forward with a shift (N, O) and a residual (N, O, OH, OW) (None: none)
static py::array conv2d_forward_any(const char* fn, const py::object& x_, const py::object& w_, const py::object& b_,
                                    const py::object& shift_, const py::object& residual_, const py::object& stride,
                                    const py::object& padding, const py::object& version) {
    py::array x = array_arg(x_, fn, "x", 4), w = array_arg(w_, fn, "w", 4);
    same_dtype(w, x, fn, "w", "x");
    ConvShape s{x.shape(0), x.shape(1), x.shape(2), x.shape(3), w.shape(0), w.shape(2), w.shape(3),
                int_arg(stride, fn, "stride", 1), int_arg(padding, fn, "padding", 0), 0, 0};
    if (w.shape(1) != s.C)
        throw py::value_error(std::string(fn) + ": w has " + std::to_string(w.shape(1)) + " input channels but x has " +
                              std::to_string(s.C));
    if (!b_.is_none()) {
        py::array b = array_arg(b_, fn, "b", 1);
        same_dtype(b, x, fn, "b", "x");
        if (b.shape(0) != s.O)
            throw py::value_error(std::string(fn) + ": b has " + std::to_string(b.shape(0)) + " values but w has " +
                                  std::to_string(s.O) + " output channels");
    }
    s.OH = conv_out(s.H, s.kh, s.stride, s.pad, fn, "input height");
    s.OW = conv_out(s.W, s.kw, s.stride, s.pad, fn, "input width");
    if (!shift_.is_none()) {
        py::array shift = array_arg(shift_, fn, "shift", 2);
        same_dtype(shift, x, fn, "shift", "x");
        if (shift.shape(0) != s.N || shift.shape(1) != s.O)
            throw py::value_error(std::string(fn) + ": shift has shape " + std::string(py::str(shift_.attr("shape"))) +
                                  " but should be (batch, output channels) = (" + std::to_string(s.N) + ", " +
                                  std::to_string(s.O) + ")");
    }
    if (!residual_.is_none()) {
        py::array residual = array_arg(residual_, fn, "residual", 4);
        same_dtype(residual, x, fn, "residual", "x");
        if (residual.shape(0) != s.N || residual.shape(1) != s.O || residual.shape(2) != s.OH || residual.shape(3) != s.OW)
            throw py::value_error(std::string(fn) + ": residual has shape " +
                                  std::string(py::str(residual_.attr("shape"))) + " but the output is (" +
                                  std::to_string(s.N) + ", " + std::to_string(s.O) + ", " + std::to_string(s.OH) +
                                  ", " + std::to_string(s.OW) + ")");
    }
    check_workspace(s, fn);
    const std::string v = version_arg(version, fn);
    return is_f32(x) ? conv2d_forward_t<float>(x, w, b_, shift_, residual_, s, v)
                     : conv2d_forward_t<double>(x, w, b_, shift_, residual_, s, v);
}

static py::array conv2d_forward(const py::object& x, const py::object& w, const py::object& b, const py::object& stride,
                                const py::object& padding, const py::object& version) {
    return conv2d_forward_any("conv2d_forward", x, w, b, py::none(), py::none(), stride, padding, version);
}

static py::array conv2d_add_forward(const py::object& x, const py::object& w, const py::object& b,
                                    const py::object& shift, const py::object& residual, const py::object& stride,
                                    const py::object& padding, const py::object& version) {
    return conv2d_forward_any("conv2d_add_forward", x, w, b, shift, residual, stride, padding, version);
}

template <typename T>
static py::array conv2d_backward_input_t(const py::array& dout, const py::array& w, const ConvShape& s, const std::string& v) {
    py::array_t<T> dx({s.N, s.C, s.H, s.W});
    T* d = dx.mutable_data();
    py::gil_scoped_release release;
    td::conv2d_backward_input_cpu<T>(d, ptr<T>(dout), ptr<T>(w), s, v);
    return dx;
}

static py::array conv2d_backward_input(const py::object& dout_, const py::object& w_, const py::object& input_hw,
                                       const py::object& stride, const py::object& padding, const py::object& version) {
    const char* fn = "conv2d_backward_input";
    py::array dout = array_arg(dout_, fn, "dout", 4), w = array_arg(w_, fn, "w", 4);
    same_dtype(w, dout, fn, "w", "dout");
    auto [H, W] = pair_arg(input_hw, fn, "input_hw");
    ConvShape s{dout.shape(0), w.shape(1), H, W, dout.shape(1), w.shape(2), w.shape(3),
                int_arg(stride, fn, "stride", 1), int_arg(padding, fn, "padding", 0), dout.shape(2), dout.shape(3)};
    if (w.shape(0) != s.O)
        throw py::value_error(std::string(fn) + ": w has " + std::to_string(w.shape(0)) + " output channels but dout has " +
                              std::to_string(s.O));
    if (conv_out(H, s.kh, s.stride, s.pad, fn, "input height") != s.OH ||
        conv_out(W, s.kw, s.stride, s.pad, fn, "input width") != s.OW)
        throw py::value_error(std::string(fn) + ": input_hw (" + std::to_string(H) + ", " + std::to_string(W) +
                              ") does not give dout's size " + std::to_string(s.OH) + "x" + std::to_string(s.OW) +
                              " with this kernel, stride and padding");
    check_workspace(s, fn);
    const std::string v = version_arg(version, fn);
    return is_f32(dout) ? conv2d_backward_input_t<float>(dout, w, s, v) : conv2d_backward_input_t<double>(dout, w, s, v);
}

template <typename T>
static py::array conv2d_backward_weight_t(const py::array& dout, const py::array& x, const ConvShape& s, const std::string& v) {
    py::array_t<T> dw({s.O, s.C, s.kh, s.kw});
    T* d = dw.mutable_data();
    py::gil_scoped_release release;
    td::conv2d_backward_weight_cpu<T>(d, ptr<T>(dout), ptr<T>(x), s, v);
    return dw;
}

static py::array conv2d_backward_weight(const py::object& dout_, const py::object& x_, const py::object& kernel_hw,
                                        const py::object& stride, const py::object& padding, const py::object& version) {
    const char* fn = "conv2d_backward_weight";
    py::array dout = array_arg(dout_, fn, "dout", 4), x = array_arg(x_, fn, "x", 4);
    same_dtype(x, dout, fn, "x", "dout");
    auto [kh, kw] = pair_arg(kernel_hw, fn, "kernel_hw");
    ConvShape s{x.shape(0), x.shape(1), x.shape(2), x.shape(3), dout.shape(1), kh, kw,
                int_arg(stride, fn, "stride", 1), int_arg(padding, fn, "padding", 0), dout.shape(2), dout.shape(3)};
    if (dout.shape(0) != s.N)
        throw py::value_error(std::string(fn) + ": dout has batch " + std::to_string(dout.shape(0)) + " but x has " +
                              std::to_string(s.N));
    if (conv_out(s.H, kh, s.stride, s.pad, fn, "input height") != s.OH ||
        conv_out(s.W, kw, s.stride, s.pad, fn, "input width") != s.OW)
        throw py::value_error(std::string(fn) + ": dout's size " + std::to_string(s.OH) + "x" + std::to_string(s.OW) +
                              " is not the output size of x with this kernel, stride and padding");
    check_workspace(s, fn);
    const std::string v = version_arg(version, fn);
    return is_f32(x) ? conv2d_backward_weight_t<float>(dout, x, s, v) : conv2d_backward_weight_t<double>(dout, x, s, v);
}

// ---------------------------------------------------------------------------------------------
// Linear: rows of features, (N, I) in and (N, O) out, w (O, I)

static void check_sizes(int64_t a, int64_t b, const char* fn, const char* what_a, const char* what_b) {
    if (a != b)
        throw py::value_error(std::string(fn) + ": " + what_a + " " + std::to_string(a) + " but " + what_b + " " +
                              std::to_string(b));
}

template <typename T>
static py::array linear_forward_t(const py::array& x, const py::array& w, const py::object& b_) {
    const int64_t N = x.shape(0), I = x.shape(1), O = w.shape(0);
    py::array_t<T> y({N, O});
    const T* bias = optional_ptr<T>(b_);
    T* o = y.mutable_data();
    py::gil_scoped_release release;
    td::linear_forward_cpu<T>(o, ptr<T>(x), ptr<T>(w), bias, N, I, O);
    return y;
}

static py::array linear_forward(const py::object& x_, const py::object& w_, const py::object& b_) {
    const char* fn = "linear_forward";
    py::array x = array_arg(x_, fn, "x", 2), w = array_arg(w_, fn, "w", 2);
    same_dtype(w, x, fn, "w", "x");
    check_sizes(w.shape(1), x.shape(1), fn, "w has in_features", "x has");
    if (!b_.is_none()) {
        py::array b = array_arg(b_, fn, "b", 1);
        same_dtype(b, x, fn, "b", "x");
        check_sizes(b.shape(0), w.shape(0), fn, "b has values", "w has out_features");
    }
    return is_f32(x) ? linear_forward_t<float>(x, w, b_) : linear_forward_t<double>(x, w, b_);
}

template <typename T>
static py::array linear_backward_input_t(const py::array& dout, const py::array& w) {
    const int64_t N = dout.shape(0), O = w.shape(0), I = w.shape(1);
    py::array_t<T> dx({N, I});
    T* d = dx.mutable_data();
    py::gil_scoped_release release;
    td::linear_backward_input_cpu<T>(d, ptr<T>(dout), ptr<T>(w), N, I, O);
    return dx;
}

static py::array linear_backward_input(const py::object& dout_, const py::object& w_) {
    const char* fn = "linear_backward_input";
    py::array dout = array_arg(dout_, fn, "dout", 2), w = array_arg(w_, fn, "w", 2);
    same_dtype(w, dout, fn, "w", "dout");
    check_sizes(w.shape(0), dout.shape(1), fn, "w has out_features", "dout has");
    return is_f32(dout) ? linear_backward_input_t<float>(dout, w) : linear_backward_input_t<double>(dout, w);
}

template <typename T>
static py::array linear_backward_weight_t(const py::array& dout, const py::array& x) {
    const int64_t N = x.shape(0), I = x.shape(1), O = dout.shape(1);
    py::array_t<T> dw({O, I});
    T* d = dw.mutable_data();
    py::gil_scoped_release release;
    td::linear_backward_weight_cpu<T>(d, ptr<T>(dout), ptr<T>(x), N, I, O);
    return dw;
}

static py::array linear_backward_weight(const py::object& dout_, const py::object& x_) {
    const char* fn = "linear_backward_weight";
    py::array dout = array_arg(dout_, fn, "dout", 2), x = array_arg(x_, fn, "x", 2);
    same_dtype(x, dout, fn, "x", "dout");
    check_sizes(x.shape(0), dout.shape(0), fn, "x has rows", "dout has");
    return is_f32(dout) ? linear_backward_weight_t<float>(dout, x) : linear_backward_weight_t<double>(dout, x);
}

// ---------------------------------------------------------------------------------------------
// Diffusion steps: x-like arrays share the shape and dtype of the first; coefficients are (batch,)

static py::array like_arg(const py::object& obj, const py::array& first, const char* fn, const char* name,
                          const char* first_name) {
    py::array a = array_arg(obj, fn, name, -1);
    same_dtype(a, first, fn, name, first_name);
    same_shape(a, first, fn, name, first_name);
    return a;
}

static py::array coef_arg(const py::object& obj, const py::array& first, const char* fn, const char* name,
                          const char* first_name) {
    py::array a = array_arg(obj, fn, name, 1);
    same_dtype(a, first, fn, name, first_name);
    if (a.shape(0) != first.shape(0))
        throw py::value_error(std::string(fn) + ": " + name + " has " + std::to_string(a.shape(0)) +
                              " values but the batch of " + first_name + " is " + std::to_string(first.shape(0)));
    return a;
}

static double float_arg(const py::object& obj, const char* fn, const char* name) {
    if (PyBool_Check(obj.ptr()) || !(PyFloat_Check(obj.ptr()) || PyIndex_Check(obj.ptr()) || py::isinstance(obj, py::module_::import("numpy").attr("floating"))))
        throw py::type_error(std::string(fn) + ": " + name + " must be a number, got " + repr_type(obj));
    return py::cast<double>(py::float_(obj));
}

static bool bool_arg(const py::object& obj, const char* fn, const char* name) {
    if (!PyBool_Check(obj.ptr()) && !py::isinstance(obj, py::module_::import("numpy").attr("bool_")))
        throw py::type_error(std::string(fn) + ": " + name + " must be a bool, got " + repr_type(obj));
    return obj.cast<bool>();
}

template <typename T>
static py::array q_sample_t(const py::array& x0, const py::array& eps, const py::array& sa, const py::array& sb) {
    py::array_t<T> xt(x0.request().shape);
    T* out = xt.mutable_data();
    const int64_t batch = x0.shape(0), per = x0.size() / batch;
    py::gil_scoped_release release;
    td::q_sample_cpu<T>(out, ptr<T>(x0), ptr<T>(eps), ptr<T>(sa), ptr<T>(sb), batch, per);
    return xt;
}

static py::array q_sample(const py::object& x0_, const py::object& eps_, const py::object& sa_, const py::object& sb_) {
    const char* fn = "q_sample";
    py::array x0 = array_arg(x0_, fn, "x0", -1);
    py::array eps = like_arg(eps_, x0, fn, "eps", "x0");
    py::array sa = coef_arg(sa_, x0, fn, "sqrt_alpha_bar", "x0");
    py::array sb = coef_arg(sb_, x0, fn, "sqrt_one_minus_alpha_bar", "x0");
    return is_f32(x0) ? q_sample_t<float>(x0, eps, sa, sb) : q_sample_t<double>(x0, eps, sa, sb);
}

template <typename T>
static py::array ddpm_step_t(const std::vector<py::array>& a, const py::array* eps_uncond, double scale) {
    const py::array& xt = a[0];
    py::array_t<T> x_prev(xt.request().shape);
    T* out = x_prev.mutable_data();
    const T* eu = eps_uncond ? ptr<T>(*eps_uncond) : nullptr;
    const int64_t batch = xt.shape(0), per = xt.size() / batch;
    py::gil_scoped_release release;
    td::ddpm_step_cpu<T>(out, ptr<T>(a[0]), ptr<T>(a[1]), ptr<T>(a[2]), ptr<T>(a[3]), ptr<T>(a[4]), ptr<T>(a[5]),
                         eu, T(scale), batch, per);
    return x_prev;
}

static py::array ddpm_step(const py::object& xt_, const py::object& eps_, const py::object& z_, const py::object& coef_x,
                           const py::object& coef_eps, const py::object& sigma, const py::object& eps_uncond_,
                           const py::object& guidance_scale) {
    const char* fn = "ddpm_step";
    py::array xt = array_arg(xt_, fn, "xt", -1);
    std::vector<py::array> a{xt, like_arg(eps_, xt, fn, "eps", "xt"), like_arg(z_, xt, fn, "z", "xt"),
                             coef_arg(coef_x, xt, fn, "coef_x", "xt"), coef_arg(coef_eps, xt, fn, "coef_eps", "xt"),
                             coef_arg(sigma, xt, fn, "sigma", "xt")};
    py::array eu;
    if (!eps_uncond_.is_none()) eu = like_arg(eps_uncond_, xt, fn, "eps_uncond", "xt");
    const double scale = float_arg(guidance_scale, fn, "guidance_scale");
    const py::array* eup = eps_uncond_.is_none() ? nullptr : &eu;
    return is_f32(xt) ? ddpm_step_t<float>(a, eup, scale) : ddpm_step_t<double>(a, eup, scale);
}

template <typename T>
static py::tuple ddim_step_t(const std::vector<py::array>& a, bool clip, const py::array* eps_uncond, double scale) {
    const py::array& xt = a[0];
    py::array_t<T> x_prev(xt.request().shape), x0(xt.request().shape);
    T* out = x_prev.mutable_data();
    T* out_x0 = x0.mutable_data();
    const T* eu = eps_uncond ? ptr<T>(*eps_uncond) : nullptr;
    const int64_t batch = xt.shape(0), per = xt.size() / batch;
    {
        py::gil_scoped_release release;
        td::ddim_step_cpu<T>(out, out_x0, ptr<T>(a[0]), ptr<T>(a[1]), ptr<T>(a[2]), ptr<T>(a[3]), ptr<T>(a[4]),
                             ptr<T>(a[5]), ptr<T>(a[6]), ptr<T>(a[7]), clip, eu, T(scale), batch, per);
    }
    return py::make_tuple(x_prev, x0);
}

static py::tuple ddim_step(const py::object& xt_, const py::object& eps_, const py::object& z_, const py::object& sa,
                           const py::object& sb, const py::object& sa_prev, const py::object& dir_coef,
                           const py::object& sigma, const py::object& clip_x0, const py::object& eps_uncond_,
                           const py::object& guidance_scale) {
    const char* fn = "ddim_step";
    py::array xt = array_arg(xt_, fn, "xt", -1);
    std::vector<py::array> a{xt, like_arg(eps_, xt, fn, "eps", "xt"), like_arg(z_, xt, fn, "z", "xt"),
                             coef_arg(sa, xt, fn, "sqrt_alpha_bar", "xt"),
                             coef_arg(sb, xt, fn, "sqrt_one_minus_alpha_bar", "xt"),
                             coef_arg(sa_prev, xt, fn, "sqrt_alpha_bar_prev", "xt"),
                             coef_arg(dir_coef, xt, fn, "dir_coef", "xt"), coef_arg(sigma, xt, fn, "sigma", "xt")};
    const bool clip = bool_arg(clip_x0, fn, "clip_x0");
    py::array eu;
    if (!eps_uncond_.is_none()) eu = like_arg(eps_uncond_, xt, fn, "eps_uncond", "xt");
    const double scale = float_arg(guidance_scale, fn, "guidance_scale");
    const py::array* eup = eps_uncond_.is_none() ? nullptr : &eu;
    return is_f32(xt) ? ddim_step_t<float>(a, clip, eup, scale) : ddim_step_t<double>(a, clip, eup, scale);
}

// ---------------------------------------------------------------------------------------------
// GELU

template <typename T>
static py::array gelu_forward_t(const py::array& x) {
    py::array_t<T> out(x.request().shape);
    T* o = out.mutable_data();
    py::gil_scoped_release release;
    td::gelu_forward_cpu<T>(o, ptr<T>(x), x.size());
    return out;
}

static py::array gelu_forward(const py::object& x_) {
    py::array x = array_arg(x_, "gelu_forward", "x", -2);
    return is_f32(x) ? gelu_forward_t<float>(x) : gelu_forward_t<double>(x);
}

template <typename T>
static py::array gelu_backward_t(const py::array& dout, const py::array& x) {
    py::array_t<T> dx(x.request().shape);
    T* d = dx.mutable_data();
    py::gil_scoped_release release;
    td::gelu_backward_cpu<T>(d, ptr<T>(dout), ptr<T>(x), x.size());
    return dx;
}

static py::array gelu_backward(const py::object& dout_, const py::object& x_) {
    const char* fn = "gelu_backward";
    py::array dout = array_arg(dout_, fn, "dout", -2);
    py::array x = array_arg(x_, fn, "x", -2);
    same_dtype(x, dout, fn, "x", "dout");
    same_shape(x, dout, fn, "x", "dout");
    return is_f32(x) ? gelu_backward_t<float>(dout, x) : gelu_backward_t<double>(dout, x);
}

// ---------------------------------------------------------------------------------------------
// Batch norm, training mode: x-like arrays are (N, C, ...), per-channel arrays (C,)

static py::array channel_arg(const py::object& obj, const py::array& first, const char* fn, const char* name,
                             const char* first_name) {
    py::array a = array_arg(obj, fn, name, 1);
    same_dtype(a, first, fn, name, first_name);
    if (a.shape(0) != first.shape(1))
        throw py::value_error(std::string(fn) + ": " + name + " has " + std::to_string(a.shape(0)) +
                              " values but " + first_name + " has " + std::to_string(first.shape(1)) + " channels");
    return a;
}

static py::array nchw_arg(const py::object& obj, const char* fn, const char* name) {
    py::array a = array_arg(obj, fn, name, -1);
    if (a.ndim() < 2)
        throw py::value_error(std::string(fn) + ": " + name + " must have a channel axis (N, C, ...), got shape " +
                              std::string(py::str(obj.attr("shape"))));
    return a;
}

static double eps_arg(const py::object& obj, const char* fn) {
    const double eps = float_arg(obj, fn, "eps");
    if (!(eps >= 0) || !std::isfinite(eps))
        throw py::value_error(std::string(fn) + ": eps must be finite and >= 0, got " + std::to_string(eps));
    return eps;
}

// gelu: the fused gelu(batch norm) kernels, whose out is always written (and whose backward takes b)
template <typename T>
static py::tuple batch_norm_forward_train_t(const py::array& x, const py::array* w, const py::array* b, double eps,
                                            bool gelu) {
    const int64_t N = x.shape(0), C = x.shape(1), S = x.size() / (N * C);
    const bool own_out = gelu || w || b;
    py::array_t<T> xhat(x.request().shape), mean(C), var(C), inv_std(C);
    py::array_t<T> out = own_out ? py::array_t<T>(x.request().shape) : xhat;
    T *o = own_out ? out.mutable_data() : nullptr, *h = xhat.mutable_data();
    T *m = mean.mutable_data(), *v = var.mutable_data(), *is = inv_std.mutable_data();
    const T* wp = w ? ptr<T>(*w) : nullptr;
    const T* bp = b ? ptr<T>(*b) : nullptr;
    {
        py::gil_scoped_release release;
        if (gelu) td::batch_norm_gelu_forward_train_cpu<T>(o, h, m, v, is, ptr<T>(x), wp, bp, eps, N, C, S);
        else td::batch_norm_forward_train_cpu<T>(o, h, m, v, is, ptr<T>(x), wp, bp, eps, N, C, S);
    }
    return py::make_tuple(out, xhat, mean, var, inv_std);
}

static py::tuple batch_norm_forward_train(const py::object& x_, const py::object& w_, const py::object& b_,
                                          const py::object& eps_, bool gelu) {
    const char* fn = gelu ? "batch_norm_gelu_forward_train" : "batch_norm_forward_train";
    py::array x = nchw_arg(x_, fn, "x"), w, b;
    if (!w_.is_none()) w = channel_arg(w_, x, fn, "w", "x");
    if (!b_.is_none()) b = channel_arg(b_, x, fn, "b", "x");
    const double eps = eps_arg(eps_, fn);
    const py::array* wp = w_.is_none() ? nullptr : &w;
    const py::array* bp = b_.is_none() ? nullptr : &b;
    return is_f32(x) ? batch_norm_forward_train_t<float>(x, wp, bp, eps, gelu)
                     : batch_norm_forward_train_t<double>(x, wp, bp, eps, gelu);
}

template <typename T>
static py::tuple batch_norm_backward_train_t(const py::array& dout, const py::array& xhat, const py::array& inv_std,
                                             const py::array* w, const py::array* b, bool gelu) {
    const int64_t N = dout.shape(0), C = dout.shape(1), S = dout.size() / (N * C);
    py::array_t<T> dx(dout.request().shape), dw(C), db(C);
    T *d = dx.mutable_data(), *dwp = dw.mutable_data(), *dbp = db.mutable_data();
    const T* wp = w ? ptr<T>(*w) : nullptr;
    const T* bp = b ? ptr<T>(*b) : nullptr;
    {
        py::gil_scoped_release release;
        if (gelu)
            td::batch_norm_gelu_backward_train_cpu<T>(d, dwp, dbp, ptr<T>(dout), ptr<T>(xhat), ptr<T>(inv_std), wp, bp,
                                                      N, C, S);
        else
            td::batch_norm_backward_train_cpu<T>(d, dwp, dbp, ptr<T>(dout), ptr<T>(xhat), ptr<T>(inv_std), wp, N, C, S);
    }
    return py::make_tuple(dx, dw, db);
}

static py::tuple batch_norm_backward_train(const py::object& dout_, const py::object& xhat_,
                                           const py::object& inv_std_, const py::object& w_, const py::object& b_,
                                           bool gelu) {
    const char* fn = gelu ? "batch_norm_gelu_backward_train" : "batch_norm_backward_train";
    py::array dout = nchw_arg(dout_, fn, "dout");
    py::array xhat = like_arg(xhat_, dout, fn, "xhat", "dout");
    py::array inv_std = channel_arg(inv_std_, dout, fn, "inv_std", "dout"), w, b;
    if (!w_.is_none()) w = channel_arg(w_, dout, fn, "w", "dout");
    if (!b_.is_none()) b = channel_arg(b_, dout, fn, "b", "dout");
    const py::array* wp = w_.is_none() ? nullptr : &w;
    const py::array* bp = b_.is_none() ? nullptr : &b;
    return is_f32(dout) ? batch_norm_backward_train_t<float>(dout, xhat, inv_std, wp, bp, gelu)
                        : batch_norm_backward_train_t<double>(dout, xhat, inv_std, wp, bp, gelu);
}

template <typename T>
static py::array batch_norm_gelu_forward_eval_t(const py::array& x, const py::array& scale, const py::array& shift) {
    const int64_t N = x.shape(0), C = x.shape(1), S = x.size() / (N * C);
    py::array_t<T> out(x.request().shape);
    T* o = out.mutable_data();
    {
        py::gil_scoped_release release;
        td::batch_norm_gelu_forward_eval_cpu<T>(o, ptr<T>(x), ptr<T>(scale), ptr<T>(shift), N, C, S);
    }
    return out;
}

static py::array batch_norm_gelu_forward_eval(const py::object& x_, const py::object& scale_, const py::object& shift_) {
    const char* fn = "batch_norm_gelu_forward_eval";
    py::array x = nchw_arg(x_, fn, "x");
    py::array scale = channel_arg(scale_, x, fn, "scale", "x"), shift = channel_arg(shift_, x, fn, "shift", "x");
    return is_f32(x) ? batch_norm_gelu_forward_eval_t<float>(x, scale, shift)
                     : batch_norm_gelu_forward_eval_t<double>(x, scale, shift);
}

// ---------------------------------------------------------------------------------------------
// Group norm, alone or followed by SiLU: x-like arrays are (N, C, ...), w and b (C,), mean and
// inv_std (N, G), with G = num_groups dividing C

static int64_t groups_arg(const py::object& obj, const py::array& first, const char* fn, const char* first_name) {
    const int64_t G = int_arg(obj, fn, "num_groups", 1);
    if (first.shape(1) % G)
        throw py::value_error(std::string(fn) + ": num_groups " + std::to_string(G) + " does not divide the " +
                              std::to_string(first.shape(1)) + " channels of " + first_name);
    return G;
}

static py::array group_stat_arg(const py::object& obj, const py::array& first, int64_t G, const char* fn,
                                const char* name, const char* first_name) {
    py::array a = array_arg(obj, fn, name, 2);
    same_dtype(a, first, fn, name, first_name);
    if (a.shape(0) != first.shape(0) || a.shape(1) != G)
        throw py::value_error(std::string(fn) + ": " + name + " has shape " + std::string(py::str(obj.attr("shape"))) +
                              " but should be (N, num_groups) = (" + std::to_string(first.shape(0)) + ", " +
                              std::to_string(G) + ")");
    return a;
}

template <typename T>
static py::tuple group_norm_silu_forward_t(const py::array& x, int64_t G, const py::array* w, const py::array* b,
                                           double eps, bool silu) {
    const int64_t N = x.shape(0), C = x.shape(1), S = x.size() / (N * C);
    py::array_t<T> out(x.request().shape), mean(std::vector<py::ssize_t>{N, G}), inv_std(std::vector<py::ssize_t>{N, G});
    T *o = out.mutable_data(), *m = mean.mutable_data(), *is = inv_std.mutable_data();
    const T* wp = w ? ptr<T>(*w) : nullptr;
    const T* bp = b ? ptr<T>(*b) : nullptr;
    {
        py::gil_scoped_release release;
        td::group_norm_silu_forward_cpu<T>(o, m, is, ptr<T>(x), wp, bp, eps, silu, N, C, S, G);
    }
    return py::make_tuple(out, mean, inv_std);
}

static py::tuple group_norm_silu_forward(const py::object& x_, const py::object& num_groups, const py::object& w_,
                                         const py::object& b_, const py::object& eps_, const py::object& silu_) {
    const char* fn = "group_norm_silu_forward";
    py::array x = nchw_arg(x_, fn, "x"), w, b;
    const int64_t G = groups_arg(num_groups, x, fn, "x");
    if (!w_.is_none()) w = channel_arg(w_, x, fn, "w", "x");
    if (!b_.is_none()) b = channel_arg(b_, x, fn, "b", "x");
    const double eps = eps_arg(eps_, fn);
    const bool silu = bool_arg(silu_, fn, "silu");
    const py::array* wp = w_.is_none() ? nullptr : &w;
    const py::array* bp = b_.is_none() ? nullptr : &b;
    return is_f32(x) ? group_norm_silu_forward_t<float>(x, G, wp, bp, eps, silu)
                     : group_norm_silu_forward_t<double>(x, G, wp, bp, eps, silu);
}

template <typename T>
static py::tuple group_norm_silu_backward_t(const py::array& dout, const py::array& x, const py::array& mean,
                                            const py::array& inv_std, const py::array* w, const py::array* b,
                                            int64_t G, bool silu) {
    const int64_t N = dout.shape(0), C = dout.shape(1), S = dout.size() / (N * C);
    py::array_t<T> dx(dout.request().shape), dw(C), db(C);
    T *d = dx.mutable_data(), *dwp = dw.mutable_data(), *dbp = db.mutable_data();
    const T* wp = w ? ptr<T>(*w) : nullptr;
    const T* bp = b ? ptr<T>(*b) : nullptr;
    {
        py::gil_scoped_release release;
        td::group_norm_silu_backward_cpu<T>(d, dwp, dbp, ptr<T>(dout), ptr<T>(x), ptr<T>(mean), ptr<T>(inv_std), wp, bp,
                                            silu, N, C, S, G);
    }
    return py::make_tuple(dx, dw, db);
}

static py::tuple group_norm_silu_backward(const py::object& dout_, const py::object& x_, const py::object& mean_,
                                          const py::object& inv_std_, const py::object& num_groups,
                                          const py::object& w_, const py::object& b_, const py::object& silu_) {
    const char* fn = "group_norm_silu_backward";
    py::array dout = nchw_arg(dout_, fn, "dout");
    py::array x = like_arg(x_, dout, fn, "x", "dout");
    const int64_t G = groups_arg(num_groups, dout, fn, "dout");
    py::array mean = group_stat_arg(mean_, dout, G, fn, "mean", "dout");
    py::array inv_std = group_stat_arg(inv_std_, dout, G, fn, "inv_std", "dout"), w, b;
    if (!w_.is_none()) w = channel_arg(w_, dout, fn, "w", "dout");
    if (!b_.is_none()) b = channel_arg(b_, dout, fn, "b", "dout");
    const bool silu = bool_arg(silu_, fn, "silu");
    const py::array* wp = w_.is_none() ? nullptr : &w;
    const py::array* bp = b_.is_none() ? nullptr : &b;
    return is_f32(dout) ? group_norm_silu_backward_t<float>(dout, x, mean, inv_std, wp, bp, G, silu)
                        : group_norm_silu_backward_t<double>(dout, x, mean, inv_std, wp, bp, G, silu);
}

// ---------------------------------------------------------------------------------------------
// Adam / AdamW over lists of arrays, updated in place: params, exp_avgs, exp_avg_sqs must be
// writable, and no two written arrays may share memory (nor one of them with a gradient).

static std::vector<py::array> array_list_arg(const py::object& obj, const char* fn, const char* name) {
    if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
        throw py::type_error(std::string(fn) + ": " + name + " must be a list of arrays, got " + repr_type(obj));
    std::vector<py::array> arrays;
    int64_t i = 0;
    for (const py::handle item : obj) {
        const std::string where = std::string(name) + "[" + std::to_string(i++) + "]";
        arrays.push_back(array_arg(py::reinterpret_borrow<py::object>(item), fn, where.c_str(), -2));
    }
    return arrays;
}

static double hyper_arg(const py::object& obj, const char* fn, const char* name, double lo, double hi,
                        bool hi_open) {
    const double x = float_arg(obj, fn, name);
    if (!(x >= lo && (hi_open ? x < hi : x <= hi)))
        throw py::value_error(std::string(fn) + ": " + name + " must be in [" + std::string(py::str(py::float_(lo))) +
                              ", " + std::string(py::str(py::float_(hi))) + (hi_open ? ")" : "]") + ", got " +
                              std::string(py::str(obj)));
    return x;
}

// Byte ranges of the arrays; refuse any overlap that touches a written array.
static void check_no_overlap(const std::vector<std::vector<py::array>>& lists, const char* const* names,
                             const bool* written, const char* fn) {
    struct Range { uintptr_t lo, hi; bool written; std::string name; };
    std::vector<Range> ranges;
    for (size_t l = 0; l < lists.size(); ++l)
        for (size_t i = 0; i < lists[l].size(); ++i) {
            const auto lo = reinterpret_cast<uintptr_t>(lists[l][i].data());
            ranges.push_back({lo, lo + lists[l][i].nbytes(), written[l], std::string(names[l]) + "[" + std::to_string(i) + "]"});
        }
    std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.lo < b.lo; });
    const Range *reach_any = nullptr, *reach_written = nullptr;   // the ranges reaching furthest so far
    for (const Range& r : ranges) {
        const Range* hit = r.written && reach_any && r.lo < reach_any->hi ? reach_any
                         : reach_written && r.lo < reach_written->hi ? reach_written : nullptr;
        if (hit)
            throw py::value_error(std::string(fn) + ": " + r.name + " shares memory with " + hit->name +
                                  " (params, exp_avgs and exp_avg_sqs are updated in place)");
        if (!reach_any || r.hi > reach_any->hi) reach_any = &r;
        if (r.written && (!reach_written || r.hi > reach_written->hi)) reach_written = &r;
    }
}

template <typename T>
static void adam_step_t(std::vector<std::vector<py::array>>& a, const td::AdamHyper& h) {
    const size_t num = a[0].size();
    std::vector<T*> p(num), m(num), v(num);
    std::vector<const T*> g(num);
    std::vector<int64_t> sizes(num);
    for (size_t k = 0; k < num; ++k) {
        p[k] = static_cast<T*>(a[0][k].mutable_data());
        g[k] = ptr<T>(a[1][k]);
        m[k] = static_cast<T*>(a[2][k].mutable_data());
        v[k] = static_cast<T*>(a[3][k].mutable_data());
        sizes[k] = a[0][k].size();
    }
    py::gil_scoped_release release;
    td::adam_step_cpu<T>(p.data(), m.data(), v.data(), g.data(), sizes.data(), int64_t(num), h);
}

static void adam_step(const py::object& params, const py::object& grads, const py::object& exp_avgs,
                      const py::object& exp_avg_sqs, const py::object& lr, const py::object& beta1,
                      const py::object& beta2, const py::object& eps, const py::object& weight_decay,
                      const py::object& decoupled, const py::object& step) {
    const char* fn = "adam_step";
    const char* names[4] = {"params", "grads", "exp_avgs", "exp_avg_sqs"};
    const bool written[4] = {true, false, true, true};
    std::vector<std::vector<py::array>> a{array_list_arg(params, fn, names[0]), array_list_arg(grads, fn, names[1]),
                                          array_list_arg(exp_avgs, fn, names[2]),
                                          array_list_arg(exp_avg_sqs, fn, names[3])};
    if (a[0].empty()) throw py::value_error(std::string(fn) + ": params is an empty list");
    for (int l = 1; l < 4; ++l)
        if (a[l].size() != a[0].size())
            throw py::value_error(std::string(fn) + ": " + names[l] + " has " + std::to_string(a[l].size()) +
                                  " arrays but params has " + std::to_string(a[0].size()));
    for (size_t k = 0; k < a[0].size(); ++k)
        for (int l = 0; l < 4; ++l) {
            const std::string name = std::string(names[l]) + "[" + std::to_string(k) + "]";
            const std::string first = "params[" + std::to_string(k) + "]";
            same_dtype(a[l][k], a[0][0], fn, name.c_str(), "params[0]");
            same_shape(a[l][k], a[0][k], fn, name.c_str(), first.c_str());
            if (written[l] && !a[l][k].writeable())
                throw py::value_error(std::string(fn) + ": " + name + " is read-only (it is updated in place)");
        }
    check_no_overlap(a, names, written, fn);
    const double inf = std::numeric_limits<double>::infinity();
    td::AdamHyper h{hyper_arg(lr, fn, "lr", 0, inf, true), hyper_arg(beta1, fn, "beta1", 0, 1, true),
                    hyper_arg(beta2, fn, "beta2", 0, 1, true), hyper_arg(eps, fn, "eps", 0, inf, true),
                    hyper_arg(weight_decay, fn, "weight_decay", 0, inf, true), bool_arg(decoupled, fn, "decoupled"),
                    int_arg(step, fn, "step", 1)};
    is_f32(a[0][0]) ? adam_step_t<float>(a, h) : adam_step_t<double>(a, h);
}

// ---------------------------------------------------------------------------------------------
// Max pooling

// The pooling shape from the input's (N, C, H, W) and the window arguments, checked
static td::PoolShape pool_shape(int64_t N, int64_t C, int64_t H, int64_t W, const py::object& kernel_hw,
                                const py::object& stride, const py::object& padding, const char* fn) {
    auto [kh, kw] = pair_arg(kernel_hw, fn, "kernel_hw");
    auto [sh, sw] = pair_arg(stride, fn, "stride");
    const int64_t pad = int_arg(padding, fn, "padding", 0);
    if (2 * pad > std::min(kh, kw))
        throw py::value_error(std::string(fn) + ": padding " + std::to_string(pad) +
                              " must be at most half the kernel size (" + std::to_string(kh) + ", " + std::to_string(kw) + ")");
    const int64_t OH = conv_out(H, kh, sh, pad, fn, "input height"), OW = conv_out(W, kw, sw, pad, fn, "input width");
    return td::PoolShape{N, C, H, W, kh, kw, sh, sw, pad, OH, OW};
}

template <typename T>
static py::tuple max_pool2d_forward_t(const py::array& x, const td::PoolShape& s) {
    py::array_t<T> out({s.N, s.C, s.OH, s.OW});
    py::array_t<int64_t> idx({s.N, s.C, s.OH, s.OW});
    T* o = out.mutable_data();
    int64_t* k = idx.mutable_data();
    {
        py::gil_scoped_release release;
        td::max_pool2d_forward_cpu<T>(o, k, ptr<T>(x), s);
    }
    return py::make_tuple(out, idx);
}

static py::tuple max_pool2d_forward(const py::object& x_, const py::object& kernel_hw, const py::object& stride,
                                    const py::object& padding) {
    const char* fn = "max_pool2d_forward";
    py::array x = array_arg(x_, fn, "x", 4);
    const td::PoolShape s = pool_shape(x.shape(0), x.shape(1), x.shape(2), x.shape(3), kernel_hw, stride, padding, fn);
    return is_f32(x) ? max_pool2d_forward_t<float>(x, s) : max_pool2d_forward_t<double>(x, s);
}

template <typename T>
static py::array max_pool2d_backward_t(const py::array& dout, const py::array& idx, const td::PoolShape& s) {
    py::array_t<T> dx({s.N, s.C, s.H, s.W});
    T* d = dx.mutable_data();
    py::gil_scoped_release release;
    td::max_pool2d_backward_cpu<T>(d, ptr<T>(dout), static_cast<const int64_t*>(idx.data()), s);
    return dx;
}

static py::array max_pool2d_backward(const py::object& dout_, const py::object& idx_, const py::object& input_hw,
                                     const py::object& kernel_hw, const py::object& stride, const py::object& padding) {
    const char* fn = "max_pool2d_backward";
    py::array dout = array_arg(dout_, fn, "dout", 4);
    if (!py::isinstance<py::array>(idx_))
        throw py::type_error(std::string(fn) + ": idx must be a numpy.ndarray, got " + repr_type(idx_));
    auto idx = py::reinterpret_borrow<py::array>(idx_);
    if (idx.dtype().num() != py::dtype::num_of<int64_t>())
        throw py::type_error(std::string(fn) + ": idx must be an int64 array (max_pool2d_forward's), got dtype " +
                             std::string(py::str(idx.dtype())));
    if (!(idx.flags() & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_) || !(idx.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
        throw py::value_error(std::string(fn) + ": idx must be C-contiguous and aligned");
    bool same = idx.ndim() == 4;
    for (int i = 0; same && i < 4; ++i) same = idx.shape(i) == dout.shape(i);
    if (!same)
        throw py::value_error(std::string(fn) + ": idx has shape " + std::string(py::str(idx_.attr("shape"))) +
                              " but dout has shape " + std::string(py::str(dout_.attr("shape"))));
    auto [H, W] = pair_arg(input_hw, fn, "input_hw");
    const td::PoolShape s = pool_shape(dout.shape(0), dout.shape(1), H, W, kernel_hw, stride, padding, fn);
    if (s.OH != dout.shape(2) || s.OW != dout.shape(3))
        throw py::value_error(std::string(fn) + ": input_hw (" + std::to_string(H) + ", " + std::to_string(W) +
                              ") does not give dout's size " + std::to_string(dout.shape(2)) + "x" +
                              std::to_string(dout.shape(3)) + " with this kernel, stride and padding");
    const int64_t* k = static_cast<const int64_t*>(idx.data());
    for (py::ssize_t q = 0; q < idx.size(); ++q)          // each index picks a tap of its window
        if (k[q] < 0 || k[q] >= s.kh * s.kw)
            throw py::value_error(std::string(fn) + ": idx holds " + std::to_string(k[q]) + ", outside the window's " +
                                  std::to_string(s.kh * s.kw) + " taps");
    return is_f32(dout) ? max_pool2d_backward_t<float>(dout, idx, s) : max_pool2d_backward_t<double>(dout, idx, s);
}

// ---------------------------------------------------------------------------------------------
// Philox random numbers: key (2,) and counter (4,) uint32 arrays, the generator's whole state

static py::array philox_uint32(const py::object& key_, const py::object& counter_, const py::object& n_) {
    const char* fn = "philox_uint32";
    const std::vector<uint32_t> key = philox_args::words(key_, fn, "key", 2);
    const std::vector<uint32_t> counter = philox_args::words(counter_, fn, "counter", 4);
    const int64_t n = int_arg(n_, fn, "n", 0);
    py::array_t<uint32_t> out(n);
    uint32_t* o = out.mutable_data();
    py::gil_scoped_release release;
    td::philox_uint32_cpu(o, key.data(), counter.data(), n);
    return out;
}

template <typename T>
static py::array philox_normal_t(const uint32_t* key, const uint32_t* counter, int64_t n) {
    py::array_t<T> out(n);
    T* o = out.mutable_data();
    py::gil_scoped_release release;
    td::philox_normal_cpu<T>(o, key, counter, n);
    return out;
}

static py::array philox_normal(const py::object& key_, const py::object& counter_, const py::object& n_,
                               const py::object& dtype) {
    const char* fn = "philox_normal";
    const std::vector<uint32_t> key = philox_args::words(key_, fn, "key", 2);
    const std::vector<uint32_t> counter = philox_args::words(counter_, fn, "counter", 4);
    const int64_t n = int_arg(n_, fn, "n", 0);
    return philox_args::is_float32(dtype, fn) ? philox_normal_t<float>(key.data(), counter.data(), n)
                                              : philox_normal_t<double>(key.data(), counter.data(), n);
}

// ---------------------------------------------------------------------------------------------

// What this build is: the instruction set it was compiled for, OpenMP or not, the compiler.
static py::dict build_info() {
    py::dict info;
#if defined(__AVX512F__)
    info["isa"] = "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
    info["isa"] = "avx2";
#elif defined(__AVX__)
    info["isa"] = "avx";
#elif defined(__ARM_NEON)
    info["isa"] = "neon";
#elif defined(__SSE2__)
    info["isa"] = "sse2";
#else
    info["isa"] = "scalar";
#endif
    info["vector_bytes"] = td::VEC_BYTES;
#if defined(_OPENMP)
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
#if defined(__clang__)
    info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
    info["compiler"] = "gcc " __VERSION__;
#else
    info["compiler"] = "unknown";
#endif
    return info;
}

PYBIND11_MODULE(_C, m) {
    m.doc() = "tinydiff C++ kernels (OpenMP): convolution, linear, fused diffusion steps, GELU, batch norm, group norm, Adam";
    m.def("build_info", &build_info, "The build: {'isa', 'vector_bytes', 'openmp', 'compiler'}.");
    m.def("conv2d_versions", [] {
        py::list names;
        for (const auto& v : td::CONV2D_VERSIONS<float>) names.append(v.name);
        return names;
    }, "The convolution versions, fastest (the default) first.");
    const char* v0 = td::CONV2D_VERSIONS<float>[0].name;
    m.def("conv2d_forward", &conv2d_forward, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("stride"),
          py::arg("padding"), py::arg("version") = v0, "x (N,C,H,W), w (O,C,kh,kw), b (O,) or None -> (N,O,OH,OW)");
    m.def("conv2d_add_forward", &conv2d_add_forward, py::arg("x"), py::arg("w"), py::arg("b"), py::arg("shift"),
          py::arg("residual"), py::arg("stride"), py::arg("padding"), py::arg("version") = v0,
          "conv2d_forward + shift[:, :, None, None] + residual, in the store: shift (N,O) or None, "
          "residual (N,O,OH,OW) or None");
    m.def("conv2d_backward_input", &conv2d_backward_input, py::arg("dout"), py::arg("w"), py::arg("input_hw"),
          py::arg("stride"), py::arg("padding"), py::arg("version") = v0, "dout (N,O,OH,OW), w (O,C,kh,kw) -> dx (N,C,H,W)");
    m.def("conv2d_backward_weight", &conv2d_backward_weight, py::arg("dout"), py::arg("x"), py::arg("kernel_hw"),
          py::arg("stride"), py::arg("padding"), py::arg("version") = v0, "dout (N,O,OH,OW), x (N,C,H,W) -> dw (O,C,kh,kw)");
    m.def("linear_forward", &linear_forward, py::arg("x"), py::arg("w"), py::arg("b"),
          "x (N,I), w (O,I), b (O,) or None -> y (N,O) = x w^T + b");
    m.def("linear_backward_input", &linear_backward_input, py::arg("dout"), py::arg("w"),
          "dout (N,O), w (O,I) -> dx (N,I) = dout w");
    m.def("linear_backward_weight", &linear_backward_weight, py::arg("dout"), py::arg("x"),
          "dout (N,O), x (N,I) -> dw (O,I) = dout^T x");
    m.def("q_sample", &q_sample, py::arg("x0"), py::arg("eps"), py::arg("sqrt_alpha_bar"),
          py::arg("sqrt_one_minus_alpha_bar"), "DDPM eq. 4");
    m.def("ddpm_step", &ddpm_step, py::arg("xt"), py::arg("eps"), py::arg("z"), py::arg("coef_x"), py::arg("coef_eps"),
          py::arg("sigma"), py::arg("eps_uncond") = py::none(), py::arg("guidance_scale") = 1.0, "DDPM eq. 11");
    m.def("ddim_step", &ddim_step, py::arg("xt"), py::arg("eps"), py::arg("z"), py::arg("sqrt_alpha_bar"),
          py::arg("sqrt_one_minus_alpha_bar"), py::arg("sqrt_alpha_bar_prev"), py::arg("dir_coef"), py::arg("sigma"),
          py::arg("clip_x0") = false, py::arg("eps_uncond") = py::none(), py::arg("guidance_scale") = 1.0,
          "DDIM eq. 12 -> (x_prev, x0)");
    m.def("gelu_forward", &gelu_forward, py::arg("x"));
    m.def("gelu_backward", &gelu_backward, py::arg("dout"), py::arg("x"));
    m.def("batch_norm_forward_train", [](const py::object& x, const py::object& w, const py::object& b,
                                         const py::object& eps) { return batch_norm_forward_train(x, w, b, eps, false); },
          py::arg("x"), py::arg("w") = py::none(), py::arg("b") = py::none(), py::arg("eps") = 1e-5,
          "x (N,C,...), w, b (C,) or None -> (out, xhat, mean, var, inv_std); out is xhat without w and b");
    m.def("batch_norm_backward_train", [](const py::object& dout, const py::object& xhat, const py::object& inv_std,
                                          const py::object& w) {
        return batch_norm_backward_train(dout, xhat, inv_std, w, py::none(), false);
    }, py::arg("dout"), py::arg("xhat"), py::arg("inv_std"), py::arg("w") = py::none(),
          "dout, xhat (N,C,...), inv_std, w (C,) -> (dx, dw, db)");
    m.def("batch_norm_gelu_forward_train", [](const py::object& x, const py::object& w, const py::object& b,
                                              const py::object& eps) { return batch_norm_forward_train(x, w, b, eps, true); },
          py::arg("x"), py::arg("w") = py::none(), py::arg("b") = py::none(), py::arg("eps") = 1e-5,
          "gelu(batch norm): x (N,C,...), w, b (C,) or None -> (out, xhat, mean, var, inv_std)");
    m.def("batch_norm_gelu_backward_train", [](const py::object& dout, const py::object& xhat,
                                               const py::object& inv_std, const py::object& w, const py::object& b) {
        return batch_norm_backward_train(dout, xhat, inv_std, w, b, true);
    }, py::arg("dout"), py::arg("xhat"), py::arg("inv_std"), py::arg("w") = py::none(), py::arg("b") = py::none(),
          "dout (of gelu's output), xhat (N,C,...), inv_std, w, b (C,) -> (dx, dw, db)");
    m.def("batch_norm_gelu_forward_eval", &batch_norm_gelu_forward_eval, py::arg("x"), py::arg("scale"), py::arg("shift"),
          "eval mode: x (N,C,...), scale, shift (C,) -> gelu(x scale_c + shift_c)");
    m.def("group_norm_silu_forward", &group_norm_silu_forward, py::arg("x"), py::arg("num_groups"), py::arg("w") = py::none(),
          py::arg("b") = py::none(), py::arg("eps") = 1e-5, py::arg("silu") = true,
          "x (N,C,...), w, b (C,) or None -> (out, mean, inv_std), mean and inv_std (N,G); "
          "out = silu(group norm) (silu=False: group norm)");
    m.def("group_norm_silu_backward", &group_norm_silu_backward, py::arg("dout"), py::arg("x"), py::arg("mean"),
          py::arg("inv_std"), py::arg("num_groups"), py::arg("w") = py::none(), py::arg("b") = py::none(),
          py::arg("silu") = true, "dout (of out), x (N,C,...), mean, inv_std (N,G), w, b (C,) -> (dx, dw, db)");
    m.def("max_pool2d_forward", &max_pool2d_forward, py::arg("x"), py::arg("kernel_hw"), py::arg("stride"),
          py::arg("padding"), "x (N,C,H,W) -> (out, idx) (N,C,OH,OW): the maxima and their window offsets u*kw+v");
    m.def("max_pool2d_backward", &max_pool2d_backward, py::arg("dout"), py::arg("idx"), py::arg("input_hw"),
          py::arg("kernel_hw"), py::arg("stride"), py::arg("padding"), "dout, idx (N,C,OH,OW) -> dx (N,C,H,W)");
    m.def("philox_uint32", &philox_uint32, py::arg("key"), py::arg("counter"), py::arg("n"),
          "key (2,), counter (4,) uint32 -> (n,) uint32: the Philox-4x32-10 stream's words counter .. counter + n - 1");
    m.def("philox_normal", &philox_normal, py::arg("key"), py::arg("counter"), py::arg("n"), py::arg("dtype"),
          "key (2,), counter (4,) uint32 -> (n,) standard normals in dtype (float32 or float64), Box-Muller");
    m.def("adam_step", &adam_step, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
          py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
          py::arg("decoupled"), py::arg("step"),
          "One Adam (decoupled=False) or AdamW step over lists of arrays; params, exp_avgs, exp_avg_sqs in place");
}
