"""Tests of the GPU path: the CUDA kernels (tinydiff._C_cuda), their bindings, the CuPy backend.

Three groups, so that a machine without a GPU still tests all it can:
  1. Build and import (wherever the CUDA module can be built): it imports without a GPU, has the
     API of tinydiff._C, and its bindings refuse bad arguments before making any CUDA call.
  2. Kernels, on two runners: "emulated" compiles csrc/*.cu for the CPU (tests/cuda_emulator:
     the threads of a block as fibers, __syncthreads as a switch to the next one) and runs wherever g++
     and the CUDA headers are; "gpu" runs the real module on CuPy arrays. Every version of every
     kernel against the NumPy reference of tinydiff/kernels.py, on awkward shapes, float32 and
     float64 (the elementwise ones on 16-byte aligned and misaligned arrays: each picks its version
     by alignment); outputs are checked for writes outside them and for elements never written.
  3. On the GPU only (skipped, saying why, without CuPy and a GPU): bad arguments, streams,
     float64 gradient checks through the CuPy backend, and the same computation on CPU and GPU:
     ops, a small conv net, a ContextUnet training step and DDIM sampling.
     `same_on_cpu_and_gpu(fn, arrays)` is the helper for more such checks.

Run:  python -m pytest tests/test_cuda.py -q          (on a GPU machine: bash benchmarks/gpu_check.sh)
"""
import copy
import ctypes
import os
import re
import shutil
import subprocess
import zlib

import numpy as np
import pytest

import tinydiff
from tinydiff import F, Tensor, backend, gradcheck, kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMULATOR_DIR = os.path.join(ROOT, "tests", "cuda_emulator")

# The kernel functions of tinydiff._C, which tinydiff._C_cuda must have too (kernels.py calls them by name)
KERNEL_API = ("conv2d_versions", "conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight",
              "q_sample", "ddpm_step", "ddim_step", "gelu_forward", "gelu_backward", "philox_uint32",
              "philox_normal")

DTYPES = (np.float32, np.float64)
TOL = {np.float32: (1e-4, 1e-4), np.float64: (1e-11, 1e-11)}   # (rtol, atol) against float64 math


def cuda_home():
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"


def cuda_module():
    """tinydiff._C_cuda; skip where it cannot have been built, fail where it should have been."""
    mod = backend.cuda_kernels()
    if mod is not None:
        return mod
    why = backend._cuda_ext_error
    if os.environ.get("TINYDIFF_CUDA") == "0":
        pytest.skip(f"TINYDIFF_CUDA=0: {why}")
    if not os.path.exists(os.path.join(cuda_home(), "bin", "nvcc")):
        pytest.skip(f"no CUDA toolkit at {cuda_home()} (set CUDA_HOME), so no CUDA module: {why}")
    pytest.fail(f"CUDA is installed at {cuda_home()} but {why}: build it with TINYDIFF_CUDA=1 pip install -e .")


def assert_close(got, want, dtype, what, tol=None):
    """|got - want| <= atol + rtol |want| everywhere (and got finite), else name the worst element."""
    rtol, atol = tol or TOL[dtype]
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    if got.size == 0:
        return
    err = np.abs(got - want)
    bad = ~(err <= atol + rtol * np.abs(want))            # NaN (never written) counts as bad
    if bad.any():
        worst = np.unravel_index(np.where(bad, np.nan_to_num(err, nan=np.inf), -1).argmax(), got.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} of {got.size} elements off; worst at {worst}: "
                             f"got {got[worst]!r}, expected {want[worst]!r} (rtol {rtol}, atol {atol}); "
                             f"largest |diff| {np.nanmax(err):.3g}")


# ---------------------------------------------------------------------------------------------
# 1. Build and import: these run on machines without a GPU


def test_cuda_module_imports_without_a_gpu():
    mod = cuda_module()
    assert mod.__name__ == "tinydiff._C_cuda"
    count, why = mod.device_count(reason=True)
    assert isinstance(count, int) and count >= 0
    assert count > 0 or why, "device_count(reason=True) must say why there is no GPU"


def test_cuda_module_has_the_api_of_the_cpp_module():
    mod = cuda_module()
    missing = [name for name in KERNEL_API if not callable(getattr(mod, name, None))]
    assert not missing, f"tinydiff._C_cuda lacks {missing}"
    if backend.native is not None:     # and whatever kernel _C has, _C_cuda has by the same name
        cpu_names = {n for n in dir(backend.native) if n in KERNEL_API}
        assert cpu_names <= set(dir(mod)), sorted(cpu_names - set(dir(mod)))
        for name in cpu_names - {"conv2d_versions"}:     # the same argument names, in order
            assert _arg_names(getattr(mod, name)) == _arg_names(getattr(backend.native, name)), name


def _arg_names(fn):
    """Argument names from a pybind11 signature line, 'f(x: object, w: object, ...) -> object'."""
    signature = fn.__doc__.splitlines()[0]
    inside = signature[signature.index("(") + 1: signature.rindex(")")]
    return re.findall(r"(\w+):", re.sub(r"\[[^\]]*\]", "", inside))


def test_conv2d_versions_are_listed():
    versions = cuda_module().conv2d_versions()
    assert len(versions) >= 2 and len(set(versions)) == len(versions), versions
    assert "naive" in versions and "tiled" in versions, versions
    assert all(isinstance(v, str) for v in versions)


def test_cuda_available_gives_a_reason():
    ok, why = tinydiff.cuda_available(reason=True)
    assert isinstance(ok, bool) and isinstance(why, str)
    assert ok or why, "cuda_available(reason=True) must say why not"
    assert tinydiff.cuda_available() == ok


def _host(*shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


def test_host_arrays_raise_type_error_naming_the_argument():
    """A NumPy array where a GPU array is due: TypeError naming the first such argument."""
    mod = cuda_module()
    x, w, c = _host(2, 3, 5, 5), _host(4, 3, 3, 3), _host(2)
    calls = {
        "x": lambda: mod.conv2d_forward(x, w, None, 1, 1),
        "dout": lambda: mod.conv2d_backward_input(_host(2, 4, 5, 5), w, (5, 5), 1, 1),
        "dout ": lambda: mod.conv2d_backward_weight(_host(2, 4, 5, 5), x, (3, 3), 1, 1),
        "x0": lambda: mod.q_sample(x, x, c, c),
        "xt": lambda: mod.ddpm_step(x, x, x, c, c, c),
        "xt ": lambda: mod.ddim_step(x, x, x, c, c, c, c, c),
        "x ": lambda: mod.gelu_forward(x),
        "dout  ": lambda: mod.gelu_backward(x, x),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf": {name.strip()} must be a GPU array .*numpy.ndarray"):
            call()


class FakeDeviceArray:
    """Just a __cuda_array_interface__, for the checks made before any CUDA call."""

    def __init__(self, shape, typestr="<f4", strides=None, ptr=0x7F0000000000):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, False),
                                         "strides": strides, "version": 3}


def test_bindings_check_dtype_shape_and_layout_before_any_cuda_call():
    mod = cuda_module()
    fake = FakeDeviceArray
    x, w = fake((2, 3, 5, 5)), fake((4, 3, 3, 3))
    cases = [
        (TypeError, "w is float64 but x is float32", lambda: mod.conv2d_forward(x, fake((4, 3, 3, 3), "<f8"), None, 1, 1)),
        (TypeError, "x must be float32 or float64.*<f2", lambda: mod.conv2d_forward(fake((2, 3, 5, 5), "<f2"), w, None, 1, 1)),
        (ValueError, "x must be C-contiguous", lambda: mod.conv2d_forward(fake((2, 3, 5, 5), strides=(300, 100, 20, 8)), w, None, 1, 1)),
        (ValueError, "w must be 4-D", lambda: mod.conv2d_forward(x, fake((4, 27)), None, 1, 1)),
        (ValueError, "3 channels", lambda: mod.conv2d_forward(x, fake((4, 2, 3, 3)), None, 1, 1)),
        (ValueError, "b has shape \\(5,\\)", lambda: mod.conv2d_forward(x, w, fake((5,)), 1, 1)),
        (ValueError, "stride must be in", lambda: mod.conv2d_forward(x, w, None, 0, 1)),
        (TypeError, "stride must be an int", lambda: mod.conv2d_forward(x, w, None, 1.0, 1)),
        (TypeError, "padding must be an int", lambda: mod.conv2d_forward(x, w, None, 1, True)),
        (ValueError, "unknown version 'nope'", lambda: mod.conv2d_forward(x, w, None, 1, 1, version="nope")),
        (ValueError, "larger than the padded input", lambda: mod.conv2d_forward(fake((1, 3, 2, 2)), w, None, 1, 0)),
        (ValueError, "output channels", lambda: mod.conv2d_backward_input(fake((2, 5, 5, 5)), w, (5, 5), 1, 1)),
        (TypeError, "input_hw must be a pair", lambda: mod.conv2d_backward_input(fake((2, 4, 5, 5)), w, 5, 1, 1)),
        (ValueError, "batch sizes differ", lambda: mod.conv2d_backward_weight(fake((3, 4, 5, 5)), x, (3, 3), 1, 1)),
        (ValueError, "more than the output", lambda: mod.conv2d_backward_weight(fake((2, 4, 6, 5)), x, (3, 3), 1, 1)),
        (ValueError, "eps has shape", lambda: mod.q_sample(x, fake((2, 3, 5, 4)), fake((2,)), fake((2,)))),
        (ValueError, "sqrt_one_minus_alpha_bar has shape \\(3,\\)", lambda: mod.q_sample(x, x, fake((2,)), fake((3,)))),
        (ValueError, "eps_uncond has shape", lambda: mod.ddpm_step(x, x, x, fake((2,)), fake((2,)), fake((2,)), fake((2, 3)), 2.0)),
        (TypeError, "sigma is float64", lambda: mod.ddim_step(x, x, x, *[fake((2,))] * 4, fake((2,), "<f8"))),
        (ValueError, "dout has shape", lambda: mod.gelu_backward(fake((3,)), fake((4,)))),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_cuda_errors_raise_runtime_error_with_file_and_line():
    """Without a GPU, the first CUDA call (the pointer check) fails: RuntimeError, file and line."""
    mod = cuda_module()
    if mod.device_count() > 0:
        pytest.skip("a GPU is present: this test needs a CUDA call that fails")
    x = FakeDeviceArray((1, 1, 3, 3))
    with pytest.raises(RuntimeError, match=r"CUDA error cuda\w+ .* at .*bind_cuda\.cpp:\d+"):
        mod.conv2d_forward(x, x, None, 1, 0)


# ---------------------------------------------------------------------------------------------
# 2. Kernels against the NumPy reference, on the CPU emulator and on the GPU

# (N, C, H, W, O, kh, kw, stride, padding)
CONV_CASES = [
    (1, 1, 5, 5, 1, 3, 3, 1, 1),       # batch 1, one channel
    (2, 3, 7, 5, 4, 3, 3, 1, 1),       # odd, non-square
    (3, 5, 9, 8, 7, 3, 3, 2, 1),       # stride 2
    (2, 4, 6, 6, 3, 3, 3, 1, 0),       # no padding
    (2, 3, 5, 6, 2, 3, 3, 1, 2),       # padding 2
    (2, 6, 5, 7, 5, 1, 1, 1, 0),       # 1x1
    (2, 2, 9, 9, 3, 1, 1, 2, 0),       # 1x1 stride 2: some input pixels get no gradient
    (2, 3, 8, 6, 4, 2, 2, 2, 0),       # 2x2 stride 2
    (2, 3, 8, 8, 3, 4, 4, 4, 0),       # 4x4 stride 4
    (1, 2, 7, 9, 3, 3, 2, 3, 1),       # non-square kernel, stride 3
    (1, 3, 3, 3, 2, 5, 5, 2, 2),       # kernel larger than the image
    (4, 3, 12, 12, 5, 3, 3, 1, 1),     # N*OH*OW = 576: backward weight splits K
    (2, 70, 6, 5, 66, 3, 3, 1, 1),     # more than one 64-row tile, K = 630 over many BK tiles
    (3, 17, 10, 10, 18, 3, 3, 1, 1),   # M > 16 on every pass (implicit_gemm's large tile), 300 columns: 3 tiles of 128
    (2, 20, 9, 9, 24, 4, 4, 2, 1),     # the same with stride 2: 4 phases of taps 2x2
    (3, 40, 4, 4, 20, 4, 4, 4, 0),     # 1x1 output, K = 640: implicit_gemm's forward splits K
]
# transposed convs: (N, C_in, H_in, W_in, C_out, k, stride, padding), as F.conv_transpose2d calls them
TRANSPOSED_CASES = [
    (2, 4, 4, 4, 3, 2, 2, 0),          # ContextUnet's up-sampling: 2x2 stride 2
    (2, 5, 1, 1, 3, 4, 4, 0),          # ContextUnet's up0: 1x1 -> 4x4
    (1, 3, 3, 4, 2, 3, 2, 1),          # overlapping taps
]


def case_id(case):
    return "x".join(map(str, case))


def conv_out(size, k, stride, padding):
    return (size + 2 * padding - k) // stride + 1


def conv_inputs(case, dtype, seed):
    n, c, h, w, o, kh, kw, s, p = case
    rng = np.random.default_rng(seed)
    oh, ow = conv_out(h, kh, s, p), conv_out(w, kw, s, p)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    weight = rng.standard_normal((o, c, kh, kw)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    dout = rng.standard_normal((n, o, oh, ow)).astype(dtype)
    return x, weight, b, dout


def f64(*arrays):
    return [None if a is None else a.astype(np.float64) for a in arrays]


# --- the emulator -----------------------------------------------------------------------------

GUARD = 41          # elements on both sides of every buffer: NaN around inputs, a sentinel around outputs
SENTINEL = 12345.0


def emulated_source(text):
    """Rewrite each launch `k<<<grid, block, 0, stream>>>(args)` as `emu::launch(k, grid, block, args)`."""
    out, pos = [], 0
    while (start := text.find("<<<", pos)) != -1:
        end = text.index(">>>", start)
        config, depth, part = [], 0, ""
        for ch in text[start + 3:end]:                       # split at top-level commas
            depth += ch in "([{" and 1 or (ch in ")]}" and -1 or 0)
            if ch == "," and depth == 0:
                config.append(part.strip())
                part = ""
            else:
                part += ch
        config.append(part.strip())
        assert len(config) == 4 and config[2] == "0", f"emulator: unexpected launch <<<{config}>>>"
        kernel = re.search(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)\s*$", text[pos:start])
        paren = text.index("(", end)
        assert text[end + 3:paren].strip() == "", "emulator: launch without arguments"
        out += [text[pos:pos + kernel.start(1)], f"emu::launch({kernel.group(1)}, {config[0]}, {config[1]}, "]
        pos = paren + 1
    return "".join(out) + text[pos:]


class EmulatedKernels:
    """The API of tinydiff._C_cuda on NumPy arrays, running csrc/*.cu on the CPU emulator."""

    def __init__(self, lib):
        self.lib = lib
        lib.emu_conv2d_version.restype = ctypes.c_char_p
        lib.emu_backward_weight_workspace.restype = ctypes.c_longlong
        lib.emu_forward_workspace.restype = ctypes.c_longlong
        self.sms = 132                    # the SM count the split-K heuristic plans for (an H100's)
        self.misalign = 0                 # elements past a 16-byte boundary where each array starts

    def conv2d_versions(self):
        return [self.lib.emu_conv2d_version(i).decode() for i in range(self.lib.emu_conv2d_num_versions())]

    # buffers with guards: inputs surrounded by NaN (an out-of-bounds read poisons the result),
    # outputs by a sentinel (an out-of-bounds write is seen) and filled with NaN (so is a gap)
    def _buffer(self, size, dtype):
        """NaN, size + 2 GUARD elements, the array's first (element GUARD) `self.misalign` elements
        past a 16-byte boundary: 0 as CuPy allocates, 1 as a view like x[1:] of a 1-D array."""
        item = np.dtype(dtype).itemsize
        raw = np.full(size + 2 * GUARD + 16 // item, np.nan, dtype=dtype)
        skip = next(k for k in range(16 // item)
                    if (raw.ctypes.data + (k + GUARD - self.misalign) * item) % 16 == 0)
        return raw[skip:skip + size + 2 * GUARD]

    def _in(self, a):
        if a is None:
            return None
        buf = self._buffer(a.size, a.dtype)
        buf[GUARD:GUARD + a.size] = a.ravel()
        return buf

    def _out(self, shape, dtype):
        buf = self._buffer(int(np.prod(shape)), dtype)
        buf[:GUARD] = buf[-GUARD:] = SENTINEL
        return buf

    @staticmethod
    def _ptr(buf):
        return None if buf is None else ctypes.c_void_p(buf.ctypes.data + GUARD * buf.itemsize)

    @staticmethod
    def _result(buf, shape):
        assert (buf[:GUARD] == SENTINEL).all() and (buf[-GUARD:] == SENTINEL).all(), \
            "the kernel wrote outside its output"
        return buf[GUARD:len(buf) - GUARD].reshape(shape).copy()

    @staticmethod
    def _f(a):
        return ctypes.c_int(0 if a.dtype == np.float32 else 1)

    def _version(self, version):
        """The name, as the launchers look it up in the version table (None: the first row)."""
        versions = self.conv2d_versions()
        if version is not None and version not in versions:
            raise ValueError(f"unknown version {version!r}; the versions are {versions}")
        return ctypes.c_char_p((version or versions[0]).encode())

    @staticmethod
    def _shape(*values):
        return (ctypes.c_int * 11)(*values)

    def conv2d_forward(self, x, w, b, stride, padding, version=None):
        n, c, h, wd = x.shape
        o, _, kh, kw = w.shape
        oh, ow = conv_out(h, kh, stride, padding), conv_out(wd, kw, stride, padding)
        ins, out = [self._in(x), self._in(w), self._in(b)], self._out((n, o, oh, ow), x.dtype)
        self.lib.emu_conv2d_forward(self._f(x), self._ptr(out), *map(self._ptr, ins),
                                    self._shape(n, c, h, wd, o, kh, kw, oh, ow, stride, padding), self._version(version),
                                    ctypes.c_int(self.sms))
        return self._result(out, (n, o, oh, ow))

    def forward_workspace(self, case, version):
        """The elements of scratch memory the forward asks for: > 0 where it splits K."""
        n, c, h, wd, o, kh, kw, s, p = case
        shape = self._shape(n, c, h, wd, o, kh, kw, conv_out(h, kh, s, p), conv_out(wd, kw, s, p), s, p)
        return self.lib.emu_forward_workspace(shape, self._version(version), ctypes.c_int(self.sms))

    def conv2d_backward_input(self, dout, w, input_hw, stride, padding, version=None):
        n, o, oh, ow = dout.shape
        _, c, kh, kw = w.shape
        h, wd = input_hw
        ins, dx = [self._in(dout), self._in(w)], self._out((n, c, h, wd), dout.dtype)
        self.lib.emu_conv2d_backward_input(self._f(dout), self._ptr(dx), *map(self._ptr, ins),
                                           self._shape(n, c, h, wd, o, kh, kw, oh, ow, stride, padding), self._version(version))
        return self._result(dx, (n, c, h, wd))

    def conv2d_backward_weight(self, dout, x, kernel_hw, stride, padding, version=None):
        n, o, oh, ow = dout.shape
        _, c, h, wd = x.shape
        kh, kw = kernel_hw
        ins, dw = [self._in(dout), self._in(x)], self._out((o, c, kh, kw), x.dtype)
        self.lib.emu_conv2d_backward_weight(self._f(x), self._ptr(dw), *map(self._ptr, ins),
                                            self._shape(n, c, h, wd, o, kh, kw, oh, ow, stride, padding),
                                            self._version(version), ctypes.c_int(self.sms))
        return self._result(dw, (o, c, kh, kw))

    def _coefs(self, coefs):
        bufs = [self._in(a) for a in coefs]
        return bufs, (ctypes.c_void_p * len(bufs))(*[self._ptr(b).value for b in bufs])

    def q_sample(self, x0, eps, sqrt_alpha_bar, sqrt_one_minus_alpha_bar):
        ins, (keep, coefs) = [self._in(x0), self._in(eps)], self._coefs([sqrt_alpha_bar, sqrt_one_minus_alpha_bar])
        out = self._out(x0.shape, x0.dtype)
        b = x0.shape[0]
        self.lib.emu_q_sample(self._f(x0), self._ptr(out), *map(self._ptr, ins), coefs, b, x0.size // max(b, 1))
        return self._result(out, x0.shape)

    def ddpm_step(self, xt, eps, z, coef_x, coef_eps, sigma, eps_uncond=None, guidance_scale=1.0):
        ins = [self._in(xt), self._in(eps), self._in(eps_uncond), self._in(z)]
        keep, coefs = self._coefs([coef_x, coef_eps, sigma])
        out, b = self._out(xt.shape, xt.dtype), xt.shape[0]
        self.lib.emu_ddpm_step(self._f(xt), self._ptr(out), *map(self._ptr, ins), coefs,
                               ctypes.c_double(guidance_scale), b, xt.size // max(b, 1))
        return self._result(out, xt.shape)

    def ddim_step(self, xt, eps, z, sqrt_alpha_bar, sqrt_one_minus_alpha_bar, sqrt_alpha_bar_prev, dir_coef,
                  sigma, clip_x0=False, eps_uncond=None, guidance_scale=1.0):
        ins = [self._in(xt), self._in(eps), self._in(eps_uncond), self._in(z)]
        keep, coefs = self._coefs([sqrt_alpha_bar, sqrt_one_minus_alpha_bar, sqrt_alpha_bar_prev, dir_coef, sigma])
        x_prev, x0, b = self._out(xt.shape, xt.dtype), self._out(xt.shape, xt.dtype), xt.shape[0]
        self.lib.emu_ddim_step(self._f(xt), self._ptr(x_prev), self._ptr(x0), *map(self._ptr, ins), coefs,
                               int(clip_x0), ctypes.c_double(guidance_scale), b, xt.size // max(b, 1))
        return self._result(x_prev, xt.shape), self._result(x0, xt.shape)

    def gelu_forward(self, x):
        keep, out = self._in(x), self._out(x.shape, x.dtype)
        self.lib.emu_gelu_forward(self._f(x), self._ptr(out), self._ptr(keep), ctypes.c_longlong(x.size))
        return self._result(out, x.shape)

    def gelu_backward(self, dout, x):
        ins, dx = [self._in(dout), self._in(x)], self._out(x.shape, x.dtype)
        self.lib.emu_gelu_backward(self._f(x), self._ptr(dx), *map(self._ptr, ins), ctypes.c_longlong(x.size))
        return self._result(dx, x.shape)

    @staticmethod
    def _words(a, size):
        a = np.ascontiguousarray(a, dtype=np.uint32)
        assert a.shape == (size,), a.shape
        return a, a.ctypes.data_as(ctypes.c_void_p)

    def philox_uint32(self, key, counter, n):
        (key, kp), (counter, cp_) = self._words(key, 2), self._words(counter, 4)
        out = self._out((n,), np.float32)            # a float32 buffer (NaN fill, sentinels) seen as uint32
        self.lib.emu_philox_uint32(self._ptr(out), kp, cp_, ctypes.c_longlong(n))
        return self._result(out, (n,)).view(np.uint32)

    def philox_normal(self, key, counter, n, dtype):
        (key, kp), (counter, cp_) = self._words(key, 2), self._words(counter, 4)
        out = self._out((n,), dtype)
        self.lib.emu_philox_normal(self._f(out), self._ptr(out), kp, cp_, ctypes.c_longlong(n))
        return self._result(out, (n,))


def build_emulator(folder):
    """Compile csrc/*.cu for the CPU emulator into `folder`; return the EmulatedKernels, or skip."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("no C++ compiler (g++) for the CUDA emulator")
    include = os.path.join(cuda_home(), "include")
    if not os.path.exists(os.path.join(include, "cuda_runtime.h")):
        pytest.skip(f"no CUDA headers at {include} for the CUDA emulator (set CUDA_HOME)")
    probe = os.path.join(folder, "probe.cpp")
    with open(probe, "w") as f:
        f.write("#include <ucontext.h>\nint main() { ucontext_t c; return getcontext(&c); }\n")
    if subprocess.run([cxx, probe, "-o", probe + ".out"], capture_output=True).returncode:
        pytest.skip(f"no <ucontext.h> with {cxx}: the CUDA emulator runs a block's threads as ucontext fibers")
    sources = [os.path.join(EMULATOR_DIR, "harness.cpp")]
    for name in sorted(os.listdir(CSRC)):
        if name.endswith(".cu"):
            with open(os.path.join(CSRC, name)) as f:
                text = emulated_source(f.read())
            sources.append(os.path.join(folder, name + ".cpp"))
            with open(sources[-1], "w") as f:
                f.write(f'#include "emulator.h"\n#line 1 "csrc/{name}"\n{text}')
    lib = os.path.join(folder, "cuda_emulated.so")
    # TINYDIFF_EMULATOR_FLAGS: extra compiler flags, e.g. the sanitizers of scripts/sanitize.sh
    cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-I", EMULATOR_DIR, "-I", CSRC,
           "-I", include, *sources, "-o", lib, *os.environ.get("TINYDIFF_EMULATOR_FLAGS", "").split()]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, f"the CUDA sources do not compile for the emulator:\n{' '.join(cmd)}\n{run.stderr[-4000:]}"
    return EmulatedKernels(ctypes.CDLL(lib))


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    return build_emulator(str(tmp_path_factory.mktemp("cuda_emulator")))


class GpuRunner:
    """Runs tinydiff._C_cuda on CuPy copies of NumPy arrays and brings the results back."""

    def __init__(self, cp, mod):
        self.cp, self.mod = cp, mod
        self.misalign = 0       # 1: each input a view one element into its allocation (x[1:]), not 16-byte aligned

    def _put(self, a):
        if not isinstance(a, np.ndarray):
            return a
        if not self.misalign:
            return self.cp.asarray(a)
        buf = self.cp.empty(a.size + self.misalign, dtype=a.dtype)        # 256-byte aligned
        view = buf[self.misalign:].reshape(a.shape)                       # C-contiguous, misaligned
        view[...] = self.cp.asarray(a)
        return view

    def __getattr__(self, name):
        fn = getattr(self.mod, name)

        def call(*args, **kwargs):
            put = self._put
            out = fn(*map(put, args), **{k: put(v) for k, v in kwargs.items()})
            if isinstance(out, tuple):
                return tuple(o.get() for o in out)
            return out.get() if hasattr(out, "get") else out
        return call


@pytest.fixture(scope="session")
def cp():
    """The cupy module, when CuPy and a GPU are usable; else skip, saying why."""
    ok, why = tinydiff.cuda_available(reason=True)
    if not ok:
        pytest.skip(f"no usable GPU: {why}")
    return backend.cupy_module()


@pytest.fixture(scope="session")
def cuda(cp):
    return cuda_module()


@pytest.fixture(params=["emulated", "gpu"])
def runner(request):
    """The kernels' API on NumPy arrays: the .cu code on the CPU emulator, or on the GPU."""
    if request.param == "emulated":
        return request.getfixturevalue("emulated")
    return GpuRunner(request.getfixturevalue("cp"), request.getfixturevalue("cuda"))


# The convolution tests loop over runner.conv2d_versions(): every row of the version table of
# csrc/conv2d.cu, on the emulator as on the GPU.


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv2d_forward(runner, case, dtype):
    for version in runner.conv2d_versions():
        x, w, b, _ = conv_inputs(case, dtype, seed=1)
        s, p = case[7], case[8]
        for bias in (b, None):
            got = runner.conv2d_forward(x, w, bias, s, p, version=version)
            want = kernels.conv2d_forward_ref(*f64(x, w, bias), s, p)
            assert_close(got, want, dtype, f"conv2d_forward {version} {case} bias={bias is not None}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv2d_backward_input(runner, case, dtype):
    for version in runner.conv2d_versions():
        x, w, _, dout = conv_inputs(case, dtype, seed=2)
        s, p = case[7], case[8]
        got = runner.conv2d_backward_input(dout, w, x.shape[2:], s, p, version=version)
        want = kernels.conv2d_backward_input_ref(*f64(dout, w), x.shape[2:], s, p)
        assert_close(got, want, dtype, f"conv2d_backward_input {version} {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv2d_backward_weight(runner, case, dtype):
    for version in runner.conv2d_versions():
        x, w, _, dout = conv_inputs(case, dtype, seed=3)
        s, p = case[7], case[8]
        got = runner.conv2d_backward_weight(dout, x, w.shape[2:], s, p, version=version)
        want = kernels.conv2d_backward_weight_ref(*f64(dout, x), w.shape[2:], s, p)
        assert_close(got, want, dtype, f"conv2d_backward_weight {version} {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", TRANSPOSED_CASES, ids=case_id)
def test_conv_transpose2d_uses(runner, case, dtype):
    """The transposed conv's forward (backward input with its own output size) and its weight
    gradient (backward weight with the roles of x and dout swapped), as functional.py calls them."""
    for version in runner.conv2d_versions():
        n, cin, hin, win, cout, k, s, p = case
        rng = np.random.default_rng(4)
        hout, wout = (hin - 1) * s - 2 * p + k, (win - 1) * s - 2 * p + k
        x = rng.standard_normal((n, cin, hin, win)).astype(dtype)
        w = rng.standard_normal((cin, cout, k, k)).astype(dtype)              # (in, out, kh, kw)
        dout = rng.standard_normal((n, cout, hout, wout)).astype(dtype)
        got = runner.conv2d_backward_input(x, w, (hout, wout), s, p, version=version)
        assert_close(got, kernels.conv2d_backward_input_ref(*f64(x, w), (hout, wout), s, p), dtype,
                     f"{version} {case} forward")
        got = runner.conv2d_backward_weight(x, dout, (k, k), s, p, version=version)
        assert_close(got, kernels.conv2d_backward_weight_ref(*f64(x, dout), (k, k), s, p), dtype, f"{version} {case} dw")


@pytest.mark.parametrize("c", [3, 32])          # K = C*kh*kw = 27, and 288 (where a forward may split K)
def test_conv2d_empty_batch(runner, c):
    """N = 0: empty outputs, and a zero weight gradient (the sum has no terms)."""
    for version in runner.conv2d_versions():
        x, w, b, dout = conv_inputs((0, c, 5, 5, 4, 3, 3, 1, 1), np.float32, seed=5)
        assert runner.conv2d_forward(x, w, b, 1, 1, version=version).shape == (0, 4, 5, 5)
        assert runner.conv2d_backward_input(dout, w, (5, 5), 1, 1, version=version).shape == (0, c, 5, 5)
        dw = runner.conv2d_backward_weight(dout, x, (3, 3), 1, 1, version=version)
        assert dw.shape == (4, c, 3, 3) and (dw == 0).all()


def test_conv2d_backward_weight_split_k_does_not_depend_on_the_sm_count(emulated):
    """The split-K plan depends on the GPU's SM count; the result must not (beyond rounding)."""
    case = (4, 3, 12, 12, 5, 3, 3, 1, 1)
    x, w, _, dout = conv_inputs(case, np.float64, seed=6)
    want = kernels.conv2d_backward_weight_ref(dout, x, (3, 3), 1, 1)
    for version in [v for v in emulated.conv2d_versions() if v != "naive"]:
        for sms in (1, 7, 132):
            emulated.sms = sms
            assert_close(emulated.conv2d_backward_weight(dout, x, (3, 3), 1, 1, version=version), want,
                         np.float64, f"{version}, {sms} SMs")
    emulated.sms = 132


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_conv2d_forward_split_k_does_not_depend_on_the_sm_count(emulated, dtype):
    """implicit_gemm's forward splits K = C*kh*kw where the output has too few tiles for the SMs;
    the result must not depend on the SM count (beyond rounding), nor change from run to run."""
    cases = [(2, 160, 4, 4, 5, 4, 4, 4, 0),     # 1x1 output, K = 2560, small tile (O <= 16)
             (3, 40, 5, 5, 20, 4, 4, 4, 0)]     # 1x1 output, K = 640, large tile, 4x4 input pixels unread
    for case in cases:
        x, w, b, _ = conv_inputs(case, dtype, seed=7)
        s, p = case[7], case[8]
        for bias in (b, None):
            want = kernels.conv2d_forward_ref(*f64(x, w, bias), s, p)
            for version in emulated.conv2d_versions():
                for sms in (1, 7, 132):
                    emulated.sms = sms
                    splits = version == "implicit_gemm" and sms > 1
                    assert (emulated.forward_workspace(case, version) > 0) == splits, f"{version}, {sms} SMs"
                    got = emulated.conv2d_forward(x, w, bias, s, p, version=version)
                    what = f"{case} {version}, {sms} SMs, bias={bias is not None}"
                    assert_close(got, want, dtype, what)
                    if splits:
                        assert np.array_equal(got, emulated.conv2d_forward(x, w, bias, s, p, version=version)), what
    emulated.sms = 132


# --- diffusion steps and GELU ------------------------------------------------------------------

# B samples of per_sample elements, and the version the launchers pick for aligned arrays
# (kernel2 needs per_sample a multiple of Pack<T>::N: 4 floats, 2 doubles; misaligned: kernel1)
STEP_SHAPES = [
    (1, 3, 4, 4),       # batch 1, per_sample 48: kernel2 (12 Packs of floats)
    (2, 3, 20, 20),     # per_sample 1200: kernel2, 300 Packs over two blocks (600 over three for doubles)
    (3, 5, 7),          # per_sample 35: kernel1
    (3, 6),             # per_sample 6: kernel1 for floats, kernel2 for doubles (3 Packs)
    (2, 1),             # per_sample 1, less than a Pack: kernel1
    (70000, 4),         # more samples than a grid's y: kernel2 aligned, kernel1 misaligned
]


@pytest.fixture(params=["aligned", "misaligned"])
def placed(runner, request):
    """`runner` with its arrays 16-byte aligned, as CuPy allocates them (the Pack kernels where the
    shape allows), or each one element off, as a view like x[1:] (the one-element kernels)."""
    runner.misalign = 0 if request.param == "aligned" else 1
    yield runner
    runner.misalign = 0


def skip_slow_emulation(runner, shape, *variant):
    """70000 samples make 65535 blocks: ~10 s emulated, so there only float32 and the first variant."""
    if isinstance(runner, EmulatedKernels) and shape[0] > 65535 and any(variant):
        pytest.skip("emulated 65535-block grid: run for float32, unguided, unclipped only (about 10 s each)")


def step_inputs(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    b = shape[0]
    arrays = [rng.standard_normal(shape).astype(dtype) for _ in range(4)]       # xt (or x0), eps, z, eps_uncond
    coefs = [rng.uniform(0.1, 1.5, b).astype(dtype) for _ in range(5)]
    return arrays, coefs


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=case_id)
def test_q_sample(placed, shape, dtype):
    skip_slow_emulation(placed, shape, dtype == np.float64)
    (x0, eps, _, _), coefs = step_inputs(shape, dtype, seed=7)
    got = placed.q_sample(x0, eps, coefs[0], coefs[1])
    assert_close(got, kernels.q_sample_ref(*f64(x0, eps, coefs[0], coefs[1])), dtype, "q_sample")


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=case_id)
def test_ddpm_step(placed, shape, dtype, guided):
    skip_slow_emulation(placed, shape, dtype == np.float64, guided)
    (xt, eps, z, eps_uncond), coefs = step_inputs(shape, dtype, seed=8)
    uncond, scale = (eps_uncond, 3.5) if guided else (None, 1.0)
    got = placed.ddpm_step(xt, eps, z, coefs[0], coefs[1], coefs[2], uncond, scale)
    want = kernels.ddpm_step_ref(*f64(xt, eps, z, *coefs[:3], uncond), scale)
    assert_close(got, want, dtype, "ddpm_step")


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", STEP_SHAPES, ids=case_id)
def test_ddim_step(placed, shape, dtype, guided, clip):
    skip_slow_emulation(placed, shape, dtype == np.float64, guided, clip)
    (xt, eps, z, eps_uncond), coefs = step_inputs(shape, dtype, seed=9)
    uncond, scale = (eps_uncond, 0.5) if guided else (None, 1.0)
    x_prev, x0 = placed.ddim_step(xt, eps, z, *coefs, clip, uncond, scale)
    want_prev, want_x0 = kernels.ddim_step_ref(*f64(xt, eps, z, *coefs), clip, *f64(uncond), scale)
    assert_close(x0, want_x0, dtype, "ddim_step x0")
    assert_close(x_prev, want_prev, dtype, "ddim_step x_prev")
    if clip:
        assert np.abs(x0).max() <= 1


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
# aligned: kernel2 on whole Packs (4 floats, 2 doubles) and one element per thread for the rest
@pytest.mark.parametrize("shape", [(0,), (1,), (5,), (2, 64), (3, 7, 5), (4096 + 3,)], ids=case_id)
def test_gelu(placed, shape, dtype):
    rng = np.random.default_rng(10)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    if x.size > 4:
        x.ravel()[:4] = [-40.0, 40.0, 0.0, -1e-3]          # both tails, zero, a tiny value
    dout = rng.standard_normal(shape).astype(dtype)
    # the NumPy reference's erf is a fit accurate to 4e-15: compare float64 at that level
    tol = (1e-5, 1e-6) if dtype == np.float32 else (1e-12, 1e-13)
    assert_close(placed.gelu_forward(x), kernels.gelu_forward_ref(x.astype(np.float64)), dtype, "gelu_forward", tol)
    assert_close(placed.gelu_backward(dout, x), kernels.gelu_backward_ref(*f64(dout, x)), dtype, "gelu_backward", tol)


# ---------------------------------------------------------------------------------------------
# 3. On the GPU only: the bindings on real CuPy arrays, streams, and the autograd on CuPy


def test_gpu_bindings_refuse_bad_arguments(cp, cuda):
    x, w = cp.zeros((2, 3, 5, 5), dtype=cp.float32), cp.zeros((4, 3, 3, 3), dtype=cp.float32)
    c = cp.ones(2, dtype=cp.float32)
    cases = [
        (TypeError, "x must be a GPU array", lambda: cuda.conv2d_forward(x.get(), w, None, 1, 1)),
        (TypeError, "w must be a GPU array", lambda: cuda.conv2d_forward(x, w.get(), None, 1, 1)),
        (TypeError, "w is float64 but x is float32", lambda: cuda.conv2d_forward(x, w.astype(cp.float64), None, 1, 1)),
        (TypeError, "x must be float32 or float64", lambda: cuda.conv2d_forward(x.astype(cp.float16), w, None, 1, 1)),
        (ValueError, "x must be C-contiguous", lambda: cuda.conv2d_forward(x[:, :, ::2], w, None, 1, 1)),
        (ValueError, "x must be C-contiguous", lambda: cuda.gelu_forward(x.transpose(0, 1, 3, 2))),
        (ValueError, "b has shape", lambda: cuda.conv2d_forward(x, w, cp.zeros(3, dtype=cp.float32), 1, 1)),
        (TypeError, "sqrt_alpha_bar must be a GPU array", lambda: cuda.q_sample(x, x, c.get(), c)),
        (ValueError, "eps has shape", lambda: cuda.ddpm_step(x, x[:1], x, c, c, c)),
        (ValueError, "sigma has shape", lambda: cuda.ddim_step(x, x, x, c, c, c, c, cp.ones(3, dtype=cp.float32))),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_gpu_bindings_refuse_host_memory_behind_the_interface(cp, cuda):
    host = np.zeros((1, 1, 3, 3), dtype=np.float32)
    fake = FakeDeviceArray(host.shape, ptr=host.ctypes.data)
    with pytest.raises(TypeError, match="not in GPU memory"):
        cuda.conv2d_forward(fake, fake, None, 1, 0)


def test_gpu_kernels_return_new_arrays_and_leave_inputs_alone(cp, cuda):
    x, w, b, _ = (cp.asarray(a) for a in conv_inputs((2, 3, 5, 5, 4, 3, 3, 1, 1), np.float32, seed=11))
    before = [a.copy() for a in (x, w, b)]
    out = cuda.conv2d_forward(x, w, b, 1, 1)
    assert isinstance(out, cp.ndarray) and out.dtype == cp.float32 and out.flags.c_contiguous
    assert out.data.ptr not in {a.data.ptr for a in (x, w, b)}
    assert all(bool((a == a0).all()) for a, a0 in zip((x, w, b), before))
    coef = cp.full(2, 0.5, dtype=cp.float32)
    x_prev, x0 = cuda.ddim_step(x, x, x, coef, coef, coef, coef, coef)
    assert isinstance(x_prev, cp.ndarray) and isinstance(x0, cp.ndarray) and x_prev.data.ptr != x0.data.ptr


def test_gpu_kernels_launch_on_cupys_current_stream(cp, cuda):
    """On a non-default stream, and captured into a CUDA graph on it: a launch on any other
    stream would run at once instead of being captured, and the replay would leave `out` zero."""
    x, w, _, _ = (cp.asarray(a) for a in conv_inputs((2, 3, 6, 5, 4, 3, 3, 1, 1), np.float32, seed=12))
    want = cuda.conv2d_forward(x, w, None, 1, 1).get()
    stream = cp.cuda.Stream(non_blocking=True)
    if not hasattr(stream, "begin_capture"):
        pytest.skip("this CuPy has no stream capture")
    with stream:
        assert_close(cuda.conv2d_forward(x, w, None, 1, 1).get(), want, np.float32, "on a non-default stream")
        warm = cuda.conv2d_forward(x, w, None, 1, 1)    # the pool now holds a block of this size for this stream
        del warm
        stream.synchronize()
        stream.begin_capture()                          # CuPy's default: relaxed mode
        try:
            out = cuda.conv2d_forward(x, w, None, 1, 1)
        finally:
            graph = stream.end_capture()
        out.fill(0)
        graph.launch(stream)
        stream.synchronize()
    assert_close(out.get(), want, np.float32, "replayed from a CUDA graph")


@pytest.fixture(params=["native", "numpy"])
def gpu_kernels(request, cp):
    """Run under the CUDA kernels ('native') and under the CuPy reference code ('numpy')."""
    before = tinydiff.get_kernels()
    tinydiff.set_kernels(request.param)
    yield request.param
    tinydiff.set_kernels(before)


# name -> (fn of Tensors, shapes of its float64 inputs); small, for float64 gradient checks
GPU_OPS = {
    "conv2d s2 p1": (lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), [(2, 3, 5, 4), (4, 3, 3, 3), (4,)]),
    "conv2d 1x1": (lambda x, w: F.conv2d(x, w), [(1, 3, 3, 3), (2, 3, 1, 1)]),
    "conv_transpose2d 2x2 s2": (lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2), [(2, 3, 3, 2), (3, 2, 2, 2), (2,)]),
    "conv_transpose2d 3x3 s2 p1": (lambda x, w: F.conv_transpose2d(x, w, stride=2, padding=1), [(1, 2, 3, 3), (2, 3, 3, 3)]),
    "gelu": (F.gelu, [(3, 7)]),
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b), [(2, 4, 3, 3), (4,), (4,)]),
    "group_norm_silu": (lambda x, w, b: F.group_norm_silu(x, 2, w, b), [(2, 4, 3, 3), (4,), (4,)]),   # GPU: 2 ops
    "max_pool2d": (lambda x: F.max_pool2d(x, 2), [(2, 2, 4, 5)]),
    "avg_pool2d": (lambda x: F.avg_pool2d(x, 2), [(2, 2, 4, 4)]),
    "upsample_nearest2d": (F.upsample_nearest2d, [(1, 2, 2, 3)]),
    "softmax": (lambda x: F.softmax(x, dim=1), [(3, 5)]),
    "silu of matmul": (lambda a, b: F.silu(a @ b), [(3, 4), (4, 2)]),
    "cat, permute": (lambda a, b: tinydiff.cat([a, b], 1).permute(1, 0), [(2, 3), (2, 2)]),
    "getitem, repeated indices": (lambda x: x[Tensor(x.xp.asarray([0, 2, 0]))], [(3, 4)]),
    "var, max, mean": (lambda x: x.var(axis=1) * x.max(axis=1) + x.mean(), [(3, 5)]),
    "mse_loss": (F.mse_loss, [(3, 4), (3, 4)]),
}


def gpu_op_inputs(shapes, seed):
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, s) for s in shapes]


@pytest.mark.parametrize("name", list(GPU_OPS))
def test_gpu_gradcheck(cp, gpu_kernels, name):
    fn, shapes = GPU_OPS[name]
    inputs = [Tensor(cp.asarray(a), requires_grad=True) for a in gpu_op_inputs(shapes, zlib.crc32(name.encode()))]
    assert gradcheck(fn, inputs)


def same_on_cpu_and_gpu(fn, arrays, rtol=1e-10, atol=1e-10, seed=0):
    """Run fn on Tensors made from NumPy `arrays`, on the CPU and on the GPU, backpropagate the same
    random upstream gradient, and assert that outputs and input gradients agree.

    fn(*tensors) -> Tensor. Float arrays become tensors that require grad; integer arrays (indices,
    labels) become plain tensors. Returns (cpu_output, gpu_output) as NumPy arrays.
    """
    results = []
    for device in ("cpu", "cuda"):
        tensors = [Tensor(backend.to_device(a, device), requires_grad=a.dtype.kind == "f") for a in arrays]
        out = fn(*tensors)
        if out.requires_grad:
            upstream = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
            out.backward(backend.to_device(upstream, device))
        grads = [None if t.grad is None else backend.to_device(t.grad, "cpu") for t in tensors]
        results.append((out.numpy(), grads))
    (out_cpu, grads_cpu), (out_gpu, grads_gpu) = results
    tol = (rtol, atol)
    assert_close(out_gpu, out_cpu, out_cpu.dtype.type, "output, GPU against CPU", tol)
    for i, (g_cpu, g_gpu) in enumerate(zip(grads_cpu, grads_gpu)):
        assert (g_cpu is None) == (g_gpu is None), f"input {i}: a gradient on one device only"
        if g_cpu is not None:
            assert_close(g_gpu, g_cpu, g_cpu.dtype.type, f"gradient of input {i}, GPU against CPU", tol)
    return out_cpu, out_gpu


@pytest.mark.parametrize("name", list(GPU_OPS))
def test_gpu_op_equals_cpu(cp, gpu_kernels, name):
    fn, shapes = GPU_OPS[name]
    same_on_cpu_and_gpu(fn, gpu_op_inputs(shapes, zlib.crc32(name.encode())))


def small_conv_net():
    from tinydiff import nn
    tinydiff.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.GroupNorm(2, 8), nn.GELU(), nn.MaxPool2d(2),
                         nn.ConvTranspose2d(8, 4, 2, 2), nn.SiLU(), nn.Conv2d(4, 3, 3, 2, 1))


def parameters_close(model_cpu, model_gpu, dtype, what, tol=None, grads=False):
    for i, (p_cpu, p_gpu) in enumerate(zip(model_cpu.parameters(), model_gpu.parameters())):
        a_cpu, a_gpu = (p_cpu.grad, p_gpu.grad) if grads else (p_cpu.data, p_gpu.data)
        assert_close(backend.to_device(a_gpu, "cpu"), a_cpu, dtype, f"{what}, parameter {i} {p_cpu.shape}", tol)


def test_gpu_conv_net_training_step_equals_cpu(cp):
    """float32: forward, loss, every parameter gradient and one SGD step agree across devices."""
    from tinydiff import optim
    model_cpu = small_conv_net()
    model_gpu = copy.deepcopy(model_cpu).to("cuda")
    rng = np.random.default_rng(13)
    x = rng.standard_normal((4, 3, 8, 6)).astype(np.float32)
    target = rng.standard_normal((4, 3, 4, 3)).astype(np.float32)
    tol, losses = (1e-4, 1e-5), []
    for model, device in ((model_cpu, "cpu"), (model_gpu, "cuda")):
        loss = F.mse_loss(model(Tensor(backend.to_device(x, device))), Tensor(backend.to_device(target, device)))
        loss.backward()
        optim.SGD(model.parameters(), lr=0.1).step()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) <= 1e-5 * (1 + abs(losses[0])), losses
    parameters_close(model_cpu, model_gpu, np.float32, "gradient", tol, grads=True)
    parameters_close(model_cpu, model_gpu, np.float32, "after one SGD step", tol)


def context_unet_pair():
    """A small ContextUnet in float64, on the CPU and (a copy) on the GPU, and its schedule."""
    from tinydiff.context_unet import ContextUnet
    from tinydiff.diffusion import NoiseSchedule
    tinydiff.manual_seed(0)
    model_cpu = ContextUnet(3, n_feat=8, n_cfeat=5, height=8).to(np.float64)
    return model_cpu, copy.deepcopy(model_cpu).to("cuda"), NoiseSchedule(timesteps=50, dtype=np.float64)


def test_gpu_context_unet_training_step_equals_cpu(cp):
    """DDPM Alg. 1 with given t and eps: the loss, every gradient and one Adam step, float64."""
    from tinydiff import optim
    from tinydiff.diffusion import training_loss
    model_cpu, model_gpu, schedule = context_unet_pair()
    rng = np.random.default_rng(14)
    x0 = rng.uniform(-1, 1, (4, 3, 8, 8))
    eps = rng.standard_normal(x0.shape)
    t = np.array([0, 7, 25, 49])
    context = np.eye(5)[[0, 3, 1, 4]]
    tol = (1e-9, 1e-11)
    losses = []
    for model, device in ((model_cpu, "cpu"), (model_gpu, "cuda")):
        put = lambda a: backend.to_device(a, device)
        loss = training_loss(model, schedule, put(x0), put(context), t=put(t), eps=put(eps))
        loss.backward()
        optim.Adam(model.parameters(), lr=1e-3).step()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) <= 1e-9 * abs(losses[0]), losses
    parameters_close(model_cpu, model_gpu, np.float64, "gradient", tol, grads=True)
    parameters_close(model_cpu, model_gpu, np.float64, "after one Adam step", tol)


def test_gpu_ddim_sampling_equals_cpu(cp):
    """DDIM with eta = 0 is deterministic given x_T: the same images on both devices (with guidance)."""
    from tinydiff.samplers import ddim_sample
    model_cpu, model_gpu, schedule = context_unet_pair()
    rng = np.random.default_rng(15)
    x_T = rng.standard_normal((4, 3, 8, 8))
    context = np.eye(5)[[2, 0, 4, 1]]
    images = []
    for model, device in ((model_cpu, "cpu"), (model_gpu, "cuda")):
        x = ddim_sample(model.eval(), schedule, x_T.shape, backend.to_device(context, device), steps=5, eta=0.0,
                        device=device, dtype=np.float64, x_T=x_T, guidance_scale=2.0)
        images.append(backend.to_device(x, "cpu"))
    assert_close(images[1], images[0], np.float64, "DDIM images, GPU against CPU", (1e-9, 1e-10))
