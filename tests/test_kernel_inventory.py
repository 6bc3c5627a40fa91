"""Every compiled kernel comes as a quartet (docs/kernels.md): a NumPy reference in
tinydiff/kernels.py, a C++ version in tinydiff._C, a binding that checks its arguments, and a
benchmark entry in benchmarks/. This test starts from what the modules export (dir(tinydiff._C),
and the m.def names of csrc/bind_cuda.cpp or dir(tinydiff._C_cuda)), so a kernel is registered by
being exported: a new binding without its row in KERNELS below, or without one of the four, fails.

Run:  python -m pytest tests/test_kernel_inventory.py -q
"""
import os
import re

import numpy as np
import pytest

from tinydiff import _C  # noqa: F401  (the tests need the built extension: a failed build fails here)
from tinydiff import backend, kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
GPU_BENCHMARK = "bench_gpu.py"          # every CUDA kernel appears there

# What the modules export that is not a kernel
NOT_KERNELS = {"build_info", "conv2d_versions", "device_count"}

RNG = np.random.default_rng(0)
X, W, B = RNG.standard_normal((2, 3, 6, 5)), RNG.standard_normal((4, 3, 3, 3)), RNG.standard_normal(4)
DOUT = RNG.standard_normal((2, 4, 6, 5))                           # conv of X, W, stride 1, padding 1
LIN_X, LIN_W, LIN_B, LIN_DOUT = (RNG.standard_normal(shape) for shape in [(5, 3), (4, 3), (4,), (5, 4)])
XT, EPS, Z = (RNG.standard_normal((3, 2, 4)) for _ in range(3))     # a batch of 3 samples
COEF = [RNG.uniform(0.1, 0.9, 3) for _ in range(5)]                 # one value per sample
BN_X, BN_W, BN_B = RNG.standard_normal((3, 4, 5)), RNG.standard_normal(4), RNG.standard_normal(4)
BN_XHAT, BN_INV_STD = RNG.standard_normal((3, 4, 5)), RNG.uniform(0.5, 2.0, 4)
GN_X, GN_DOUT, GN_W, GN_B = RNG.standard_normal((2, 6, 5)), RNG.standard_normal((2, 6, 5)), RNG.standard_normal(6), \
    RNG.standard_normal(6)
GN_MEAN, GN_INV_STD = RNG.standard_normal((2, 3)), RNG.uniform(0.5, 2.0, (2, 3))   # 3 groups of 2 channels
POOL_DOUT, POOL_IDX = RNG.standard_normal((2, 3, 3, 2)), RNG.integers(0, 4, (2, 3, 3, 2))   # 2x2 pool of X
ADAM = [[RNG.standard_normal(shape) for shape in [(3, 2), (5,)]] for _ in range(3)] + \
       [[RNG.uniform(0.1, 1.0, shape) for shape in [(3, 2), (5,)]]]     # params, grads, exp_avgs, exp_avg_sqs

SHIFT = RNG.standard_normal((2, 4))                                 # conv2d_add: per sample and output channel

PHILOX_KEY = np.array([0x243F6A88, 0x85A308D3], np.uint32)
PHILOX_COUNTER = np.array([0xFFFFFFFD, 7, 0, 0], np.uint32)   # 2 words before the low word wraps

# binding -> (its NumPy reference in tinydiff/kernels.py, its benchmark in benchmarks/,
#             valid float64 arguments: the reference gets the same ones)
KERNELS = {
    "conv2d_forward": ("conv2d_forward_ref", "bench_conv.py", (X, W, B, 1, 1)),
    "conv2d_add_forward": ("conv2d_add_forward_ref", "bench_conv.py", (X, W, B, SHIFT, DOUT, 1, 1)),
    "conv2d_backward_input": ("conv2d_backward_input_ref", "bench_conv.py", (DOUT, W, (6, 5), 1, 1)),
    "conv2d_backward_weight": ("conv2d_backward_weight_ref", "bench_conv.py", (DOUT, X, (3, 3), 1, 1)),
    "linear_forward": ("linear_forward_ref", "bench_steps.py", (LIN_X, LIN_W, LIN_B)),
    "linear_backward_input": ("linear_backward_input_ref", "bench_steps.py", (LIN_DOUT, LIN_W)),
    "linear_backward_weight": ("linear_backward_weight_ref", "bench_steps.py", (LIN_DOUT, LIN_X)),
    "q_sample": ("q_sample_ref", "bench_steps.py", (XT, EPS, COEF[0], COEF[1])),
    "ddpm_step": ("ddpm_step_ref", "bench_steps.py", (XT, EPS, Z, COEF[0], COEF[1], COEF[2])),
    "ddim_step": ("ddim_step_ref", "bench_steps.py", (XT, EPS, Z, *COEF)),
    "gelu_forward": ("gelu_forward_ref", "bench_steps.py", (XT,)),
    "gelu_backward": ("gelu_backward_ref", "bench_steps.py", (EPS, XT)),
    "batch_norm_forward_train": ("batch_norm_forward_train_ref", "bench_steps.py", (BN_X, BN_W, BN_B, 1e-5)),
    "batch_norm_backward_train": ("batch_norm_backward_train_ref", "bench_steps.py",
                                  (BN_X, BN_XHAT, BN_INV_STD, BN_W)),
    "batch_norm_gelu_forward_train": ("batch_norm_gelu_forward_train_ref", "bench_steps.py",
                                      (BN_X, BN_W, BN_B, 1e-5)),
    "batch_norm_gelu_backward_train": ("batch_norm_gelu_backward_train_ref", "bench_steps.py",
                                       (BN_X, BN_XHAT, BN_INV_STD, BN_W, BN_B)),
    "batch_norm_gelu_forward_eval": ("batch_norm_gelu_forward_eval_ref", "bench_steps.py", (BN_X, BN_W, BN_B)),
    "group_norm_silu_forward": ("group_norm_silu_forward_ref", "bench_steps.py", (GN_X, 3, GN_W, GN_B, 1e-5, True)),
    "group_norm_silu_backward": ("group_norm_silu_backward_ref", "bench_steps.py",
                                 (GN_DOUT, GN_X, GN_MEAN, GN_INV_STD, 3, GN_W, GN_B, True)),
    "max_pool2d_forward": ("max_pool2d_forward_ref", "bench_steps.py", (X, (2, 2), (2, 2), 0)),
    "max_pool2d_backward": ("max_pool2d_backward_ref", "bench_steps.py",
                            (POOL_DOUT, POOL_IDX, (6, 5), (2, 2), (2, 2), 0)),
    "adam_step": ("adam_step_ref", "bench_steps.py", (*ADAM, 1e-3, 0.9, 0.999, 1e-8, 0.01, False, 3)),
    "philox_uint32": ("philox_uint32_ref", "bench_steps.py", (PHILOX_KEY, PHILOX_COUNTER, 7)),
    "philox_normal": ("philox_normal_ref", "bench_steps.py", (PHILOX_KEY, PHILOX_COUNTER, 7, np.float64)),
}
# Kernels that update lists of arrays in place (and return None); the reference returns new lists
IN_PLACE = {"adam_step": (0, 2, 3)}          # the positions of the lists they write


def exported(module):
    return sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))


CPU_KERNELS = [n for n in exported(_C) if n not in NOT_KERNELS]


def cuda_kernel_names():
    """The kernels of tinydiff._C_cuda: from the module where it is built, else from its source."""
    mod = backend.cuda_kernels()
    if mod is not None:
        names = exported(mod)
    else:
        with open(os.path.join(ROOT, "csrc", "bind_cuda.cpp")) as f:
            names = re.findall(r'\bm\.def\(\s*"(\w+)"', f.read())
    return sorted(set(names) - NOT_KERNELS)


def arg_names(fn):
    """Argument names from a pybind11 signature line, 'f(x: object, w: object, ...) -> object'."""
    signature = fn.__doc__.splitlines()[0]
    inside = signature[signature.index("(") + 1: signature.rindex(")")]
    return re.findall(r"(\w+):", re.sub(r"\[[^\]]*\]", "", inside))


def row(name):
    if name not in KERNELS:
        pytest.fail(f"tinydiff._C exports {name!r} but tests/test_kernel_inventory.py has no row for it: "
                    "add its NumPy reference, benchmark and valid arguments to KERNELS (see docs/kernels.md)")
    return KERNELS[name]


def test_the_inventory_finds_the_kernels():
    """The enumeration itself: it sees the kernels, and KERNELS has no row for a kernel that is gone."""
    assert "conv2d_forward" in CPU_KERNELS and len(CPU_KERNELS) >= 10, CPU_KERNELS
    stale = sorted(set(KERNELS) - set(CPU_KERNELS))
    assert not stale, f"KERNELS has rows for {stale}, which tinydiff._C does not export"
    assert "conv2d_forward" in cuda_kernel_names()


@pytest.mark.parametrize("name", CPU_KERNELS)
def test_kernel_has_a_numpy_reference_that_it_matches(name):
    ref_name, _, args = row(name)
    ref = getattr(kernels, ref_name, None)
    assert callable(ref), f"{name}: no NumPy reference tinydiff.kernels.{ref_name}"
    if name in IN_PLACE:
        args = [[a.copy() for a in arg] if isinstance(arg, list) else arg for arg in args]
        want = tuple(a for new in ref(*args) for a in new)
        assert getattr(_C, name)(*args) is None
        got = tuple(a for i in IN_PLACE[name] for a in args[i])
    else:
        got, want = getattr(_C, name)(*args), ref(*args)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    assert len(got) == len(want), f"{name} returns {len(got)} arrays, {ref_name} {len(want)}"
    for i, (g, r) in enumerate(zip(got, want)):
        err = np.abs(g - r).max()
        assert g.shape == r.shape and err <= 1e-9 * (1 + np.abs(r).max()), \
            f"{name} output {i} differs from {ref_name}: largest |difference| {err:.3g}"


@pytest.mark.parametrize("name", CPU_KERNELS)
def test_kernel_binding_checks_the_dtype_of_every_array(name):
    """Each array argument in turn as int32, the others valid: TypeError naming that argument."""
    _, _, args = row(name)
    fn = getattr(_C, name)
    names = arg_names(fn)
    arrays = [i for i, a in enumerate(args) if isinstance(a, (np.ndarray, list))]
    assert arrays, f"{name}: its row in KERNELS passes no array"
    for i in arrays:
        bad = list(args)                  # a list of arrays: its first array as int32
        bad[i] = [args[i][0].astype(np.int32)] + args[i][1:] if isinstance(args[i], list) else args[i].astype(np.int32)
        with pytest.raises(TypeError, match=rf"{name}: {names[i]}\b"):
            fn(*bad)


@pytest.mark.parametrize("name", CPU_KERNELS)
def test_kernel_has_a_benchmark_entry(name):
    _, bench, _ = row(name)
    path = os.path.join(BENCHMARKS, bench)
    assert os.path.exists(path), f"{name}: benchmark {bench} does not exist"
    with open(path) as f:
        assert re.search(rf"\b{name}\b", f.read()), f"{name} does not appear in benchmarks/{bench}"


@pytest.mark.parametrize("name", cuda_kernel_names())
def test_cuda_kernel_has_a_cpu_version_and_a_gpu_benchmark(name):
    """A CUDA kernel needs the C++ version of the same name (and so its reference and checks)."""
    assert name in CPU_KERNELS, f"tinydiff._C_cuda has {name!r} but tinydiff._C has no C++ version of it"
    with open(os.path.join(BENCHMARKS, GPU_BENCHMARK)) as f:
        assert re.search(rf"\b{name}\b", f.read()), f"{name} does not appear in benchmarks/{GPU_BENCHMARK}"
