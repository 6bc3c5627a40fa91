"""Tests of the C++ kernels (tinydiff._C) against their NumPy references in tinydiff/kernels.py.

1. Convolution: every version that _C.conv2d_versions() lists, forward, backward input and
   backward weight, float32 and float64, on 120 random shapes (batch 1, odd and non-square
   images and kernels, strides 1-4, padding 0-2, 1x1, 2x2 stride 2, 4x4 stride 4, sizes that
   leave partial tiles and several K blocks), plus the transposed-convolution uses.
2. Linear, forward and both gradients, on 70 random shapes (one row, K over several blocks, sizes
   off the tile), the same bits on 1, 2 and 3 threads. The fused diffusion steps and GELU, with
   and without guidance and clipping; training-mode batch norm, forward and backward, on 120
   random shapes (batch 1, C = 1, 1x1, odd and non-square images, (N, C, L) and (N, C) inputs).
   Group norm alone and with SiLU, forward and backward, on 100 random shapes (batch 1, groups 1
   and C, odd channels per group, odd and non-square images), the same bits on 1, 2 and 3 threads,
   and the float32 SiLU over its range.
3. Float64 gradient checks of F.conv2d, F.conv_transpose2d, F.linear, F.gelu, F.batch_norm, F.group_norm and
   F.group_norm_silu through the native path; the fused F.group_norm_silu against the two ops in a row.
4. Bad arguments for every binding, and hypothesis property tests: random shapes, dtypes,
   strides and layouts give either the reference's result or a TypeError/ValueError.
5. The stale-build warning of tinydiff.backend.

Run:  python -m pytest tests/test_kernels_cpu.py -q       (-s prints the largest differences)
"""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinydiff
from tinydiff import F, Tensor, backend, gradcheck, kernels, nn
from tinydiff import _C  # the tests need the built extension: a failed build is a failure here

VERSIONS = _C.conv2d_versions()
DTYPES = (np.float32, np.float64)
TOL = {np.float32: (1e-4, 1e-4), np.float64: (1e-10, 1e-10)}   # (rtol, atol) against float64 math


def assert_close(got, want, dtype, what, tol=None):
    """|got - want| <= atol + rtol |want| everywhere; prints the largest difference."""
    rtol, atol = tol or TOL[dtype]
    assert got.shape == want.shape and got.dtype == dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape} {dtype}"
    err = np.abs(got.astype(np.float64) - want)
    print(f"{what}: largest |difference| {err.max() if err.size else 0:.3g}")
    bad = ~(err <= atol + rtol * np.abs(want))
    if bad.any():
        worst = np.unravel_index(np.argmax(np.where(bad, err, -1)), err.shape)
        raise AssertionError(f"{what}: at {worst} got {got[worst]!r}, expected {want[worst]!r} "
                             f"(|diff| {err[worst]:.3g}, rtol {rtol}, atol {atol})")


def assert_all_close(got, want, names, dtype, what):
    """assert_close on each pair of outputs, named; returns the largest |difference| of them."""
    for g, r, name in zip(got, want, names):
        assert_close(g, r, dtype, f"{what} {name}")
    return max(float(np.abs(g - r).max()) for g, r in zip(got, want))


def f64(*arrays):
    return [None if a is None else a.astype(np.float64) for a in arrays]


# ---------------------------------------------------------------------------------------------
# 1. Convolution

FIXED_CONFIGS = [  # (N, C, H, W, O, kh, kw, stride, padding)
    (1, 1, 1, 1, 1, 1, 1, 1, 0),        # one of everything
    (1, 3, 7, 5, 4, 3, 3, 1, 1),        # batch 1, odd, non-square
    (2, 3, 8, 8, 5, 2, 2, 2, 0),        # 2x2 stride 2 (UnetUp's transposed conv)
    (2, 4, 8, 8, 3, 4, 4, 4, 0),        # 4x4 stride 4 (up0)
    (2, 5, 9, 7, 6, 1, 1, 1, 0),        # 1x1
    (1, 2, 6, 9, 3, 3, 5, 2, 2),        # non-square kernel, stride 2, padding 2
    (3, 30, 6, 5, 20, 3, 3, 1, 1),      # C*kh*kw = 270: two K blocks; 20 outputs: a partial row panel
    (3, 4, 12, 12, 9, 3, 3, 1, 1),      # 432 output pixels: many column panels, two pixel blocks
    (2, 3, 16, 16, 4, 3, 3, 1, 1),      # 16-wide rows: whole-vector runs
    (2, 3, 5, 5, 4, 3, 3, 3, 2),        # stride 3, padding 2
    (1, 2, 3, 3, 2, 5, 5, 1, 2),        # kernel larger than the image
    (2, 2, 4, 4, 3, 3, 3, 2, 1),        # stride 2 with overlapping taps
    (1, 1, 2, 9, 2, 1, 4, 1, 0),
    (2, 70, 3, 3, 3, 3, 3, 1, 1),       # C*kh*kw = 630: three K blocks
    (2, 16, 6, 5, 3, 3, 3, 1, 1),       # whole vectors of channels (read in place by backward weight)
    (1, 48, 5, 5, 4, 3, 2, 1, 1),       # 48 channels: a vector's taps start mid-panel
    (2, 8, 7, 7, 5, 3, 3, 2, 1),        # 8 channels: whole float64 vectors
    (2, 3, 8, 8, 4, 3, 3, 1, 1),        # 8-wide rows: whole float64 vectors, half float32 ones
    (3, 5, 4, 4, 7, 3, 3, 1, 1),        # 4-wide rows: a float32 AVX-512 panel is 8 whole rows, copied as pieces
    (9, 3, 2, 2, 4, 1, 1, 1, 0),        # 2-wide rows, 36 pixels: whole panels of pieces and a partial one
    (40, 2, 1, 1, 3, 1, 1, 1, 0),       # 1x1 images: pieces of one pixel
    # 3x3 stride 1, Winograd's shapes: 2x2 output tiles, cut at odd edges; blocks of tiles across rows and
    # samples. The AVX-512 build runs Winograd on output rows of 7 pixels or more (WINOGRAD_MIN_WIDTH):
    # there the narrower ones check the fallback to "gemm", the wider ones the same cases in Winograd.
    (1, 3, 7, 9, 4, 3, 3, 1, 0),        # no padding, odd, non-square: tiles cut at the bottom and right
    (2, 5, 9, 7, 7, 3, 3, 1, 2),        # padding 2 (backward input: padding 0)
    (2, 33, 5, 8, 65, 3, 3, 1, 1),      # Winograd's backward weight, with partial panels
    (1, 40, 3, 9, 64, 3, 3, 1, 0),      # ... one row of 4 tiles, no padding
    (1, 3, 5, 7, 4, 3, 3, 1, 0),        # no padding, odd, non-square: tiles cut at the bottom and right
    (2, 5, 9, 6, 7, 3, 3, 1, 2),        # padding 2 (backward input: padding 0)
    (1, 2, 4, 3, 3, 3, 3, 1, 3),        # padding 3: backward input falls back to "gemm"
    (3, 17, 11, 13, 11, 3, 3, 1, 1),    # 3 x 6 x 7 tiles: a partial last block
    (2, 3, 16, 16, 33, 3, 3, 1, 1),     # 33 outputs: a partial row panel
    (1, 300, 4, 4, 2, 3, 3, 1, 1),      # 300 channels: past one float64 K block, so Winograd falls back
    (1, 1, 1, 1, 1, 3, 3, 1, 1),        # one pixel
    (2, 1, 9, 8, 5, 3, 3, 1, 1),        # one input channel (forward falls back to "gemm")
    (2, 6, 9, 8, 1, 3, 3, 1, 1),        # one output channel (backward input falls back to "gemm")
    (2, 33, 5, 6, 65, 3, 3, 1, 1),      # wide enough for Winograd's backward weight, with partial panels
    (1, 40, 3, 3, 64, 3, 3, 1, 0),      # ... one tile, no padding
]


def conv_configs(count=120, seed=0):
    rng = np.random.default_rng(seed)
    configs = list(FIXED_CONFIGS)
    while len(configs) < count:
        n, c, o = rng.integers(1, 4), rng.integers(1, 7), rng.integers(1, 11)
        h, w = rng.integers(1, 12, size=2)
        kh, kw = rng.integers(1, 6, size=2)
        stride, pad = rng.integers(1, 5), rng.integers(0, 3)
        if h + 2 * pad >= kh and w + 2 * pad >= kw:
            configs.append(tuple(int(v) for v in (n, c, h, w, o, kh, kw, stride, pad)))
    return configs


CONFIGS = conv_configs()


def conv_inputs(config, dtype, seed):
    n, c, h, w, o, kh, kw, s, p = config
    rng = np.random.default_rng(seed)
    oh, ow = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
    return (rng.standard_normal((n, c, h, w)).astype(dtype), rng.standard_normal((o, c, kh, kw)).astype(dtype),
            rng.standard_normal(o).astype(dtype), rng.standard_normal((n, o, oh, ow)).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("version", VERSIONS)
def test_conv2d_every_pass_on_random_shapes(version, dtype):
    assert len(CONFIGS) >= 100
    for i, config in enumerate(CONFIGS):
        n, c, h, w, o, kh, kw, s, p = config
        x, wt, b, dout = conv_inputs(config, dtype, seed=i)
        bias = b if i % 2 else None
        where = f"{version} {np.dtype(dtype).name} config {config}"
        assert_close(_C.conv2d_forward(x, wt, bias, s, p, version=version),
                     kernels.conv2d_forward_ref(*f64(x, wt, bias), s, p), dtype, f"{where} forward")
        assert_close(_C.conv2d_backward_input(dout, wt, (h, w), s, p, version=version),
                     kernels.conv2d_backward_input_ref(*f64(dout, wt), (h, w), s, p), dtype, f"{where} dx")
        assert_close(_C.conv2d_backward_weight(dout, x, (kh, kw), s, p, version=version),
                     kernels.conv2d_backward_weight_ref(*f64(dout, x), (kh, kw), s, p), dtype, f"{where} dw")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("version", VERSIONS)
def test_conv2d_add_forward_on_random_shapes(version, dtype):
    """conv2d_add_forward: the convolution with a per-sample shift and a residual added in the store,
    each on its own and both, with and without a bias (every version: Winograd's vector stores too)."""
    for i, config in enumerate(CONFIGS):
        n, c, h, w, o, kh, kw, s, p = config
        x, wt, b, residual = conv_inputs(config, dtype, seed=100 + i)
        shift = np.random.default_rng(i).standard_normal((n, o)).astype(dtype)
        bias, shift, residual = (b if i % 2 else None, shift if i % 3 else None, residual if i % 3 != 1 else None)
        where = f"{version} {np.dtype(dtype).name} config {config} shift {shift is not None} residual {residual is not None}"
        assert_close(_C.conv2d_add_forward(x, wt, bias, shift, residual, s, p, version=version),
                     kernels.conv2d_add_forward_ref(*f64(x, wt, bias, shift, residual), s, p), dtype, where)


@pytest.mark.parametrize("config", [(2, 3, 7, 5, 4, 1), (1, 2, 4, 4, 3, 0), (1, 1, 1, 1, 2, 1), (2, 3, 6, 5, 2, 2),
                                    (3, 4, 9, 8, 5, 1)])
def test_winograd_reference_is_the_convolution(config):
    """The NumPy transcription of Winograd's F(2x2, 3x3) is the direct convolution, in float64."""
    n, c, h, w, o, p = config
    rng = np.random.default_rng(sum(config))
    x, wt, b = rng.standard_normal((n, c, h, w)), rng.standard_normal((o, c, 3, 3)), rng.standard_normal(o)
    assert_close(kernels.winograd_conv3x3_ref(x, wt, b, p), kernels.conv2d_forward_ref(x, wt, b, 1, p),
                 np.float64, f"winograd reference {config}", tol=(1e-12, 1e-12))


# The transposed convolution (functional.py): forward = backward input with the output size given,
# backward = forward, and backward weight with the roles of dout and x swapped.
CONVT_CONFIGS = [  # (N, C_in, h, w, C_out, k, stride, padding)
    (2, 8, 1, 1, 6, 4, 4, 0),          # up0: 1x1 -> 4x4
    (2, 12, 4, 4, 5, 2, 2, 0),         # up1: 4x4 -> 8x8
    (1, 6, 3, 5, 4, 3, 2, 1),          # overlapping taps
    (3, 4, 5, 4, 3, 3, 1, 1),          # stride 1
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("config", CONVT_CONFIGS)
def test_conv_transpose2d_uses(config, version, dtype):
    n, cin, h, w, cout, k, s, p = config
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, cin, h, w)).astype(dtype)
    wt = rng.standard_normal((cin, cout, k, k)).astype(dtype)
    hout, wout = (h - 1) * s - 2 * p + k, (w - 1) * s - 2 * p + k
    dout = rng.standard_normal((n, cout, hout, wout)).astype(dtype)
    assert_close(_C.conv2d_backward_input(x, wt, (hout, wout), s, p, version=version),
                 kernels.conv2d_backward_input_ref(*f64(x, wt), (hout, wout), s, p), dtype, "convT forward")
    assert_close(_C.conv2d_forward(dout, wt, None, s, p, version=version),
                 kernels.conv2d_forward_ref(*f64(dout, wt), None, s, p), dtype, "convT dx")
    assert_close(_C.conv2d_backward_weight(x, dout, (k, k), s, p, version=version),
                 kernels.conv2d_backward_weight_ref(*f64(x, dout), (k, k), s, p), dtype, "convT dw")


@pytest.mark.parametrize("config", [(2, 64, 16, 16, 64, 3, 3, 1, 1), (3, 64, 8, 8, 128, 3, 3, 1, 1)])
def test_versions_agree_on_contextunet_shapes(config):
    """3x3 convolutions on 16x16 and 8x8 maps with 64 and 128 channels, as the ContextUnet's."""
    n, c, h, w, o, kh, kw, s, p = config
    x, wt, b, dout = conv_inputs(config, np.float32, seed=3)
    want = (kernels.conv2d_forward_ref(*f64(x, wt, b), s, p),
            kernels.conv2d_backward_input_ref(*f64(dout, wt), (h, w), s, p),
            kernels.conv2d_backward_weight_ref(*f64(dout, x), (kh, kw), s, p))
    for version in VERSIONS:
        got = (_C.conv2d_forward(x, wt, b, s, p, version=version),
               _C.conv2d_backward_input(dout, wt, (h, w), s, p, version=version),
               _C.conv2d_backward_weight(dout, x, (kh, kw), s, p, version=version))
        for g, want_, what in zip(got, want, ("forward", "dx", "dw")):
            assert_close(g, want_, np.float32, f"{version} {what}", (1e-4, 1e-3))


def test_conv2d_versions_lists_the_default_first():
    assert VERSIONS[0] == "winograd" and {"gemm", "direct"} <= set(VERSIONS) and len(set(VERSIONS)) == len(VERSIONS)
    x, w, b, _ = conv_inputs((1, 2, 5, 5, 3, 3, 3, 1, 1), np.float64, seed=0)
    assert np.array_equal(_C.conv2d_forward(x, w, b, 1, 1), _C.conv2d_forward(x, w, b, 1, 1, version=VERSIONS[0]))


# ---------------------------------------------------------------------------------------------
# 2. Diffusion steps and GELU

STEP_SHAPES = [(1, 1), (3, 1, 5, 7), (4, 3, 16, 16), (2, 70001), (5,)]


def step_inputs(shape, dtype, count, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(shape).astype(dtype) for _ in range(count)]
    coefs = [rng.uniform(0.05, 1.5, shape[0]).astype(dtype) for _ in range(5)]
    return arrays, coefs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STEP_SHAPES)
def test_q_sample(shape, dtype):
    (x0, eps), (sa, sb, *_) = step_inputs(shape, dtype, 2)
    assert_close(_C.q_sample(x0, eps, sa, sb), kernels.q_sample_ref(*f64(x0, eps, sa, sb)), dtype, "q_sample")


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STEP_SHAPES)
def test_ddpm_step(shape, dtype, guided):
    (xt, eps, z, uncond), (cx, ce, sigma, *_) = step_inputs(shape, dtype, 4)
    uncond, scale = (uncond, 3.5) if guided else (None, 1.0)
    want = kernels.ddpm_step_ref(*f64(xt, eps, z, cx, ce, sigma, uncond), scale)
    assert_close(_C.ddpm_step(xt, eps, z, cx, ce, sigma, uncond, scale), want, dtype, "ddpm_step")


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STEP_SHAPES)
def test_ddim_step(shape, dtype, guided, clip):
    (xt, eps, z, uncond), coefs = step_inputs(shape, dtype, 4)
    uncond, scale = (uncond, 2.0) if guided else (None, 1.0)
    want_prev, want_x0 = kernels.ddim_step_ref(*f64(xt, eps, z, *coefs), clip, *f64(uncond), scale)
    x_prev, x0 = _C.ddim_step(xt, eps, z, *coefs, clip, uncond, scale)
    assert_close(x_prev, want_prev, dtype, "ddim x_prev")
    assert_close(x0, want_x0, dtype, "ddim x0")
    if clip:
        assert np.abs(x0).max() <= 1


def test_steps_use_each_samples_own_coefficients():
    x0 = np.ones((3, 2, 2), np.float32)
    xt = _C.q_sample(x0, np.zeros_like(x0), np.array([1, 2, 3], np.float32), np.zeros(3, np.float32))
    assert np.array_equal(xt[:, 0, 0], [1, 2, 3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (7, 3), (2, 64, 16, 16)])
def test_gelu(shape, dtype):
    rng = np.random.default_rng(2)
    x = np.asarray(rng.standard_normal(shape) * 3, dtype=dtype)       # shape (): a 0-d array
    dout = np.asarray(rng.standard_normal(shape), dtype=dtype)
    tol = (1e-5, 1e-6) if dtype == np.float32 else (1e-12, 1e-13)
    assert_close(_C.gelu_forward(x), kernels.gelu_forward_ref(x.astype(np.float64)), dtype, "gelu_forward", tol)
    assert_close(_C.gelu_backward(dout, x), kernels.gelu_backward_ref(*f64(dout, x)), dtype, "gelu_backward", tol)


BATCH_NORM_SHAPES = [(1, 1, 1, 1), (1, 3, 7, 5), (2, 1, 4, 4), (3, 4, 1, 1), (5, 3), (1, 2, 9), (4, 6, 2, 3, 2),
                     (4, 64, 16, 16), (32, 1, 32, 32), (2, 5, 3001)]   # the last three: several threads


def batch_norm_shapes(count=120, seed=3):
    rng = np.random.default_rng(seed)
    shapes = list(BATCH_NORM_SHAPES)
    while len(shapes) < count:
        spatial = tuple(int(s) for s in rng.integers(1, 10, size=rng.integers(0, 4)))   # (), (L,), (H, W), 3-D
        shapes.append((int(rng.integers(1, 5)), int(rng.integers(1, 7))) + spatial)
    return shapes


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_train_on_random_shapes(dtype):
    rng = np.random.default_rng(4)
    worst = 0.0
    for i, shape in enumerate(batch_norm_shapes()):
        c = shape[1]
        x = (rng.uniform(-50, 50) + rng.uniform(0.1, 3) * rng.standard_normal(shape)).astype(dtype)  # off-centre
        w, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
        affine = [(w, b), (None, None), (w, None), (None, b)][i % 4]
        got = _C.batch_norm_forward_train(x, *affine, 1e-5)
        want = kernels.batch_norm_forward_train_ref(*f64(x, *affine), 1e-5)
        worst = max(worst, assert_all_close(got, want, ("out", "xhat", "mean", "var", "inv_std"), dtype,
                                            f"batch_norm_forward_train {shape}"))
        if affine[0] is None and affine[1] is None:
            assert got[0] is got[1]                                 # no affine: out is xhat
        dout = rng.standard_normal(shape).astype(dtype)
        xhat, inv_std = got[1], got[4]
        got = _C.batch_norm_backward_train(dout, xhat, inv_std, affine[0])
        want = kernels.batch_norm_backward_train_ref(*f64(dout, xhat, inv_std, affine[0]))
        worst = max(worst, assert_all_close(got, want, ("dx", "dw", "db"), dtype, f"batch_norm_backward_train {shape}"))
    print(f"batch norm, {dtype.__name__}, 120 shapes: largest |difference| {worst:.3g}")


def test_batch_norm_train_is_deterministic_and_normalises():
    x = np.random.default_rng(5).standard_normal((8, 32, 20, 20)).astype(np.float32) * 4 + 7
    first, second = _C.batch_norm_forward_train(x), _C.batch_norm_forward_train(x)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    xhat = first[1].astype(np.float64)
    assert np.abs(xhat.mean(axis=(0, 2, 3))).max() < 1e-5 and np.abs(xhat.var(axis=(0, 2, 3)) - 1).max() < 1e-3
    dout = np.ones_like(x)
    dx, dw, db = _C.batch_norm_backward_train(dout, first[1], first[4])
    assert np.abs(dx).max() < 1e-4 and np.allclose(db, 8 * 20 * 20)   # a constant dout moves nothing


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_gelu_train_on_random_shapes(dtype):
    """The fused gelu(batch norm) against its reference (the two references in a row)."""
    rng = np.random.default_rng(7)
    worst = 0.0
    for i, shape in enumerate(batch_norm_shapes(seed=8)):
        c = shape[1]
        x = (rng.uniform(-5, 5) + rng.uniform(0.1, 3) * rng.standard_normal(shape)).astype(dtype)
        w, b = (2 * rng.standard_normal(c)).astype(dtype), rng.standard_normal(c).astype(dtype)
        affine = [(w, b), (None, None), (w, None), (None, b)][i % 4]
        got = _C.batch_norm_gelu_forward_train(x, *affine, 1e-5)
        want = kernels.batch_norm_gelu_forward_train_ref(*f64(x, *affine), 1e-5)
        worst = max(worst, assert_all_close(got, want, ("out", "xhat", "mean", "var", "inv_std"), dtype,
                                            f"batch_norm_gelu_forward_train {shape}"))
        dout = rng.standard_normal(shape).astype(dtype)
        xhat, inv_std = got[1], got[4]
        got = _C.batch_norm_gelu_backward_train(dout, xhat, inv_std, *affine)
        want = kernels.batch_norm_gelu_backward_train_ref(*f64(dout, xhat, inv_std, *affine))
        worst = max(worst, assert_all_close(got, want, ("dx", "dw", "db"), dtype,
                                            f"batch_norm_gelu_backward_train {shape}"))
    print(f"batch norm + GELU, {dtype.__name__}, 120 shapes: largest |difference| {worst:.3g}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_gelu_eval_on_random_shapes(dtype):
    rng = np.random.default_rng(9)
    for shape in batch_norm_shapes(count=60, seed=10):
        c = shape[1]
        x = (3 * rng.standard_normal(shape)).astype(dtype)
        scale, shift = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
        want = kernels.batch_norm_gelu_forward_eval_ref(*f64(x, scale, shift))
        assert_close(_C.batch_norm_gelu_forward_eval(x, scale, shift), want, dtype, f"batch_norm_gelu eval {shape}")


def test_batch_norm_gelu_eval_is_batch_norm_then_gelu():
    """Sampling's fused path (no gradient) gives what the two ops in a row give."""
    rng = np.random.default_rng(11)
    norm = nn.BatchNorm2d(5).eval()
    norm.running_mean.data[:] = rng.standard_normal(5)
    norm.running_var.data[:] = rng.uniform(0.5, 2, 5)
    norm.weight.data[:], norm.bias.data[:] = rng.standard_normal(5), rng.standard_normal(5)
    x = Tensor(rng.standard_normal((3, 5, 4, 6)).astype(np.float32))
    with tinydiff.no_grad():
        fused = norm(x, then_gelu=True)
        apart = F.gelu(norm(x))
    assert fused._op == "batch_norm_gelu"
    assert_close(fused.numpy(), apart.numpy().astype(np.float64), np.float32, "eval fused vs apart")


# (shape, num_groups): batch 1, odd channels per group, groups 1 and C, odd and non-square H*W,
# 3-D and (N, C) inputs, groups of one value; the UNet's sizes (several threads) last
GROUP_NORM_CASES = [((1, 1, 1, 1), 1), ((1, 3, 7, 5), 1), ((1, 3, 7, 5), 3), ((2, 9, 3, 5), 3), ((3, 6, 5, 2), 2),
                    ((2, 5, 1, 1), 5), ((1, 4, 11), 2), ((4, 6), 3), ((2, 10, 3, 3, 2), 5),
                    ((64, 32, 16, 16), 8), ((64, 128, 4, 4), 8), ((3, 64, 9, 7), 16)]


def group_norm_cases(count=100, seed=14):
    rng = np.random.default_rng(seed)
    cases = list(GROUP_NORM_CASES)
    while len(cases) < count:
        g, k = int(rng.integers(1, 6)), int(rng.integers(1, 6))             # groups, channels per group
        spatial = tuple(int(s) for s in rng.integers(1, 10, size=rng.integers(0, 3)))
        cases.append(((int(rng.integers(1, 5)), g * k) + spatial, g))
    return cases


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_silu_on_random_shapes(dtype):
    """The group norm (+ SiLU) kernel against its reference, forward and backward, with and without
    SiLU and each of the affine parameters."""
    rng = np.random.default_rng(15)
    worst = 0.0
    for i, (shape, g) in enumerate(group_norm_cases()):
        c = shape[1]
        x = (rng.uniform(-5, 5) + rng.uniform(0.1, 3) * rng.standard_normal(shape)).astype(dtype)   # off-centre
        w, b = (2 * rng.standard_normal(c)).astype(dtype), rng.standard_normal(c).astype(dtype)
        affine = [(w, b), (None, None), (w, None), (None, b)][i % 4]
        silu = i % 3 != 2
        got = _C.group_norm_silu_forward(x, g, *affine, 1e-5, silu)
        want = kernels.group_norm_silu_forward_ref(f64(x)[0], g, *f64(*affine), 1e-5, silu)
        worst = max(worst, assert_all_close(got, want, ("out", "mean", "inv_std"), dtype,
                                            f"group_norm_silu_forward {shape} groups {g} silu {silu}"))
        dout = rng.standard_normal(shape).astype(dtype)
        mean, inv_std = got[1], got[2]
        got = _C.group_norm_silu_backward(dout, x, mean, inv_std, g, *affine, silu)
        want = kernels.group_norm_silu_backward_ref(*f64(dout, x, mean, inv_std), g, *f64(*affine), silu)
        worst = max(worst, assert_all_close(got, want, ("dx", "dw", "db"), dtype,
                                            f"group_norm_silu_backward {shape} groups {g} silu {silu}"))
    print(f"group norm (+ SiLU), {dtype.__name__}, {len(group_norm_cases())} shapes: largest |difference| {worst:.3g}")


def test_group_norm_silu_is_deterministic_and_normalises():
    x = np.random.default_rng(16).standard_normal((64, 64, 8, 8)).astype(np.float32) * 4 + 7
    first, second = (_C.group_norm_silu_forward(x, 8, None, None, 1e-5, False) for _ in range(2))
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    xhat = first[0].astype(np.float64).reshape(64, 8, -1)
    assert np.abs(xhat.mean(axis=2)).max() < 1e-5 and np.abs(xhat.var(axis=2) - 1).max() < 1e-3
    dout = np.ones_like(x)
    dx, dw, db = _C.group_norm_silu_backward(dout, x, first[1], first[2], 8, None, None, False)
    assert np.abs(dx).max() < 1e-4 and np.allclose(db, 64 * 8 * 8)     # a constant dout moves nothing
    again = _C.group_norm_silu_backward(dout, x, first[1], first[2], 8, None, None, False)
    assert all(np.array_equal(a, b) for a, b in zip((dx, dw, db), again))


GROUP_NORM_THREADS_SCRIPT = """
import sys
import numpy as np
from tinydiff import _C
rng = np.random.default_rng(19)
x, dout = (rng.standard_normal((64, 32, 8, 8)).astype(np.float32) * 3 + 1 for _ in range(2))
w, b = (rng.standard_normal(32).astype(np.float32) for _ in range(2))
out, mean, inv_std = _C.group_norm_silu_forward(x, 8, w, b, 1e-5, True)
dx, dw, db = _C.group_norm_silu_backward(dout, x, mean, inv_std, 8, w, b, True)
np.savez(sys.argv[1], out=out, mean=mean, inv_std=inv_std, dx=dx, dw=dw, db=db)
"""


def assert_same_bits_on_1_2_3_threads(script, tmp_path):
    """Run `script` (it saves its arrays to the .npz path in argv[1]) on 1, 2 and 3 OpenMP threads."""
    results = []
    for threads in (1, 2, 3):
        path = tmp_path / f"threads{threads}.npz"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TINYDIFF_REBUILD="0")
        subprocess.run([sys.executable, "-c", script, str(path)], env=env, check=True)
        results.append(np.load(path))
    for name in results[0].files:
        for other in results[1:]:
            assert np.array_equal(results[0][name], other[name]), f"{name} differs between thread counts"


def test_group_norm_silu_does_not_depend_on_the_thread_count(tmp_path):
    """The same numbers, bit for bit, on 1, 2 and 3 OpenMP threads (dw and db summed over n in order)."""
    assert_same_bits_on_1_2_3_threads(GROUP_NORM_THREADS_SCRIPT, tmp_path)


def test_silu_float32_over_its_whole_range():
    """The float32 SiLU of group_norm_cpu.cpp for every y, against float64: a group of one value
    has xhat = 0, so y = b_c, out = silu(b_c) and db_c = dout silu'(b_c). Stated accuracy:
    1e-6 |ref| + 1e-7, forward and derivative (0 and -0, |y| past 86.5, where exp(-|y|) is 0)."""
    y = np.concatenate([np.linspace(-100, 100, 400001), [0.0, -0.0, 86.5, -86.5, 88.0, -88.0, 1e-30, -1e-30]])
    y = y.astype(np.float32)
    x = np.zeros((1, y.size), np.float32)
    out, mean, inv_std = _C.group_norm_silu_forward(x, y.size, None, y, 1e-5, True)
    y64 = y.astype(np.float64)
    s = kernels.sigmoid_ref(y64)
    assert_close(out[0], y64 * s, np.float32, "silu float32 grid", (1e-6, 1e-7))
    _, _, db = _C.group_norm_silu_backward(np.ones_like(x), x, mean, inv_std, y.size, None, y, True)
    assert_close(db, s * (1 + y64 * (1 - s)), np.float32, "silu' float32 grid", (1e-6, 1e-7))


def max_pool_cases(count=60, seed=12):
    """Random awkward pooling problems: batch 1, odd and non-square sizes, kernels 1-3 (non-square),
    stride 1 (overlapping windows), 2, 3, padding 0 or 1."""
    rng = np.random.default_rng(seed)
    cases = [((64, 32, 16, 16), (2, 2), (2, 2), 0), ((1, 1, 1, 1), (1, 1), (1, 1), 0), ((1, 3, 7, 5), (3, 2), (2, 1), 1),
             ((2, 3, 7, 9), (2, 2), (2, 2), 0), ((1, 2, 2, 3), (2, 2), (2, 2), 0)]   # 2x2 stride 2, odd: a row and column left over
    while len(cases) < count:
        kh, kw = (int(k) for k in rng.integers(1, 4, 2))
        p = int(rng.integers(0, 2)) if min(kh, kw) >= 2 else 0
        h, w = (int(s) for s in rng.integers(max(kh, kw), 12, 2))
        cases.append(((int(rng.integers(1, 4)), int(rng.integers(1, 5)), h, w), (kh, kw),
                      tuple(int(s) for s in rng.integers(1, 4, 2)), p))
    return cases


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d_on_random_shapes(dtype):
    rng = np.random.default_rng(13)
    for shape, k, s, p in max_pool_cases():
        x = rng.integers(-3, 4, shape).astype(dtype)              # small integers: many ties (the first wins)
        out, idx = _C.max_pool2d_forward(x, k, s, p)
        want_out, want_idx = kernels.max_pool2d_forward_ref(x, k, s, p)
        assert np.array_equal(out, want_out) and np.array_equal(idx, want_idx), f"forward {shape} {k} {s} {p}"
        dout = rng.standard_normal(out.shape).astype(dtype)
        want = kernels.max_pool2d_backward_ref(dout.astype(np.float64), idx, shape[2:], k, s, p)
        assert_close(_C.max_pool2d_backward(dout, idx, shape[2:], k, s, p), want, dtype, f"max_pool backward {shape}")


def test_max_pool2d_nan_and_infinity_as_numpy():
    x = np.array([[[[1.0, np.nan], [np.inf, 2.0]], [[-np.inf, -np.inf], [-np.inf, -np.inf]]]], np.float32)
    out, idx = _C.max_pool2d_forward(x, (2, 2), (2, 2), 0)
    want_out, want_idx = kernels.max_pool2d_forward_ref(x, (2, 2), (2, 2), 0)
    np.testing.assert_array_equal(out, want_out)                  # nan, -inf
    assert np.isnan(out[0, 0, 0, 0]) and idx.ravel().tolist() == want_idx.ravel().tolist() == [1, 0]


def test_max_pool2d_2x2_windows_of_nan_infinity_and_ties():
    """Every 2x2 window of the values NaN, -inf, 1, 2 (256 windows): the first maximum, the first NaN."""
    values = np.array([np.nan, -np.inf, 1.0, 2.0])
    windows = values[np.stack(np.meshgrid(*[np.arange(4)] * 4, indexing="ij"), -1).reshape(-1, 4)]   # (256, 4)
    for dtype in DTYPES:
        x = np.ascontiguousarray(windows.reshape(1, 256, 2, 2).astype(dtype))
        out, idx = _C.max_pool2d_forward(x, (2, 2), (2, 2), 0)
        want_out, want_idx = kernels.max_pool2d_forward_ref(x, (2, 2), (2, 2), 0)
        np.testing.assert_array_equal(out, want_out)
        np.testing.assert_array_equal(idx, want_idx)


def test_gelu_float32_over_its_whole_range():
    """The float32 GELU of gelu_math.h over its whole range (0 and -0, the underflow past z = 9.3,
    infinities) against the float64 reference, on a dense grid and around the cut-off."""
    top = 9.3 * 2 ** 0.5                                             # z = 9.3 in x
    x = np.concatenate([np.linspace(-20, 20, 400001), [0.0, -0.0, top, -top, np.inf, -np.inf],
                        np.nextafter(np.float32([top, -top]), 0)]).astype(np.float32)
    dout = np.ones_like(x)
    finite = np.isfinite(x)
    want = kernels.gelu_forward_ref(x[finite].astype(np.float64))
    assert_close(_C.gelu_forward(x[finite]), want, np.float32, "gelu_forward grid", (1e-5, 1e-6))
    want = kernels.gelu_backward_ref(dout[finite].astype(np.float64), x[finite].astype(np.float64))
    assert_close(_C.gelu_backward(dout[finite], x[finite]), want, np.float32, "gelu_backward grid", (1e-5, 1e-6))
    inf = np.float32([np.inf, -np.inf])              # as the float64 kernel (libm): inf, and inf * 0 = nan
    np.testing.assert_array_equal(_C.gelu_forward(inf), _C.gelu_forward(inf.astype(np.float64)).astype(np.float32))
    np.testing.assert_array_equal(_C.gelu_backward(np.ones(2, np.float32), inf),
                                  _C.gelu_backward(np.ones(2), inf.astype(np.float64)).astype(np.float32))


# Linear: (N, I, O), one row up to several row panels and K blocks (K > 256 floats on AVX-512, 512
# on AVX2), N and O off the tile sizes; the large ones run on several threads.
LINEAR_SHAPES = [(1, 1, 1), (1, 7, 3), (7, 5, 3), (9, 1000, 129), (33, 300, 70), (100, 600, 17), (100, 32, 128),
                 (1600, 128, 128), (17, 128, 1), (2, 3, 33)]


def linear_shapes(count=60, seed=21):
    rng = np.random.default_rng(seed)
    return LINEAR_SHAPES + [tuple(int(v) for v in rng.integers(1, top, 3)) for top in (20, 80, 300) for _ in range(count // 3)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_every_pass_on_random_shapes(dtype):
    rng = np.random.default_rng(22)
    tol = (1e-4, 1e-4) if dtype == np.float32 else (1e-10, 1e-10)
    for n, i, o in linear_shapes():
        x, w, b, dout = (rng.standard_normal(shape).astype(dtype) for shape in [(n, i), (o, i), (o,), (n, o)])
        what = f"linear N={n} I={i} O={o}"
        assert_close(_C.linear_forward(x, w, b), kernels.linear_forward_ref(*f64(x, w, b)), dtype, what + " forward",
                     (tol[0], tol[1] * np.sqrt(i)))
        assert_close(_C.linear_forward(x, w, None), kernels.linear_forward_ref(*f64(x, w), None), dtype,
                     what + " forward, no bias", (tol[0], tol[1] * np.sqrt(i)))
        assert_close(_C.linear_backward_input(dout, w), kernels.linear_backward_input_ref(*f64(dout, w)), dtype,
                     what + " dx", (tol[0], tol[1] * np.sqrt(o)))
        assert_close(_C.linear_backward_weight(dout, x), kernels.linear_backward_weight_ref(*f64(dout, x)), dtype,
                     what + " dw", (tol[0], tol[1] * np.sqrt(n)))


LINEAR_THREADS_SCRIPT = """
import sys
import numpy as np
from tinydiff import _C
rng = np.random.default_rng(23)
x, w, b, dout = (rng.standard_normal(s).astype(np.float32) for s in [(1601, 130), (129, 130), (129,), (1601, 129)])
np.savez(sys.argv[1], y=_C.linear_forward(x, w, b), dx=_C.linear_backward_input(dout, w),
         dw=_C.linear_backward_weight(dout, x))
"""


def test_linear_does_not_depend_on_the_thread_count(tmp_path):
    """Each element of the result is summed by one thread in one order: the same bits on 1, 2, 3 threads."""
    assert_same_bits_on_1_2_3_threads(LINEAR_THREADS_SCRIPT, tmp_path)


# ---------------------------------------------------------------------------------------------
# 3. Gradient checks through the dispatched native path


@pytest.fixture
def native_kernels():
    before = backend.get_kernels()
    tinydiff.set_kernels("native")
    yield
    tinydiff.set_kernels(before)
    kernels.set_conv_version(None)


@pytest.mark.parametrize("version", VERSIONS)
def test_gradcheck_conv2d_native(native_kernels, version):
    kernels.set_conv_version(version)
    rng = np.random.default_rng(4)
    x = Tensor(rng.standard_normal((2, 2, 5, 4)), requires_grad=True)
    w = Tensor(rng.standard_normal((3, 2, 3, 2)), requires_grad=True)
    b = Tensor(rng.standard_normal(3), requires_grad=True)
    assert kernels._compiled("conv2d_forward", x.data, w.data, b.data) is not None   # really native
    assert gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), [x, w, b])
    assert gradcheck(lambda x, w, b: F.conv2d(x, w, b, stride=1, padding=2), [x, w, b])


@pytest.mark.parametrize("version", VERSIONS)
def test_gradcheck_conv_transpose2d_native(native_kernels, version):
    kernels.set_conv_version(version)
    rng = np.random.default_rng(5)
    x = Tensor(rng.standard_normal((2, 3, 3, 2)), requires_grad=True)
    b = Tensor(rng.standard_normal(2), requires_grad=True)
    for k, s, p in [(2, 2, 0), (3, 2, 1), (3, 1, 1)]:
        w = Tensor(rng.standard_normal((3, 2, k, k)), requires_grad=True)
        assert gradcheck(lambda x, w, b: F.conv_transpose2d(x, w, b, stride=s, padding=p), [x, w, b])


def test_gradcheck_linear_native(native_kernels):
    rng = np.random.default_rng(24)
    x = Tensor(rng.standard_normal((5, 3)), requires_grad=True)
    w = Tensor(rng.standard_normal((4, 3)), requires_grad=True)
    b = Tensor(rng.standard_normal(4), requires_grad=True)
    assert kernels._compiled("linear_forward", x.data, w.data, b.data) is not None   # really native
    assert gradcheck(F.linear, [x, w, b])
    x3 = Tensor(rng.standard_normal((2, 3, 3)), requires_grad=True)
    assert gradcheck(lambda x, w: F.linear(x, w), [x3, w])


def test_gradcheck_gelu_native(native_kernels):
    x = Tensor(np.random.default_rng(6).standard_normal((3, 5)) * 2, requires_grad=True)
    assert kernels._compiled("gelu_forward", x.data) is not None
    assert gradcheck(F.gelu, [x])


@pytest.mark.parametrize("shape, affine", [((3, 2, 3, 2), True), ((1, 3, 2, 3), False), ((4, 3), True),
                                           ((2, 2, 5), True)])
def test_gradcheck_batch_norm_native(native_kernels, shape, affine):
    rng = np.random.default_rng(7)
    x = Tensor(rng.standard_normal(shape), requires_grad=True)
    wb = [Tensor(rng.standard_normal(shape[1]), requires_grad=True) for _ in range(2)] if affine else []
    assert kernels._compiled("batch_norm_forward_train", x.data) is not None
    rm, rv = Tensor(np.zeros(shape[1])), Tensor(np.ones(shape[1]))
    assert gradcheck(lambda x, *wb: F.batch_norm(x, rm, rv, *wb, training=True), [x] + wb)


def test_group_norm_native_matches_the_reference(native_kernels):
    """Group norm runs on the batch-norm kernels, as batch norm of the (1, N*G, C/G * H * W) view."""
    rng = np.random.default_rng(8)
    x, dout = (rng.standard_normal((3, 8, 5, 3)).astype(np.float32) for _ in range(2))
    w, b = (rng.standard_normal(8).astype(np.float32) for _ in range(2))
    results = {}
    for name in ("native", "numpy"):
        tinydiff.set_kernels(name)
        xt, wt, bt = (Tensor(a, requires_grad=True) for a in (x, w, b))
        out = F.group_norm(xt, 4, wt, bt)
        (out * Tensor(dout)).sum().backward()
        results[name] = [out.data, xt.grad, wt.grad, bt.grad]
    for got, want, what in zip(results["native"], f64(*results["numpy"]), ("out", "dx", "dw", "db")):
        assert_close(got, want, np.float32, f"group_norm {what}")


@pytest.mark.parametrize("shape, groups", [((2, 4, 3, 3), 2), ((1, 6, 5, 3), 3), ((2, 3, 7), 1), ((3, 4), 4)])
@pytest.mark.parametrize("silu", [True, False])
def test_gradcheck_group_norm_silu_native(native_kernels, shape, groups, silu):
    rng = np.random.default_rng(17)
    x = Tensor(rng.standard_normal(shape), requires_grad=True)
    wb = [Tensor(rng.standard_normal(shape[1]), requires_grad=True) for _ in range(2)]
    assert kernels._compiled("group_norm_silu_forward", x.data) is not None
    op = F.group_norm_silu if silu else F.group_norm
    assert gradcheck(lambda x, w, b: op(x, groups, w, b), [x] + wb)


def test_group_norm_silu_native_is_the_two_ops_in_a_row(native_kernels):
    """F.group_norm_silu, one op, gives what silu(group_norm(...)) gives, values and gradients."""
    rng = np.random.default_rng(18)
    x, dout = (rng.standard_normal((3, 8, 5, 3)).astype(np.float32) for _ in range(2))
    w, b = (rng.standard_normal(8).astype(np.float32) for _ in range(2))
    results = {}
    for name, fn in (("fused", F.group_norm_silu), ("apart", lambda *a: F.silu(F.group_norm(*a)))):
        xt, wt, bt = (Tensor(a, requires_grad=True) for a in (x, w, b))
        out = fn(xt, 4, wt, bt)
        (out * Tensor(dout)).sum().backward()
        results[name] = [out, xt.grad, wt.grad, bt.grad]
    assert results["fused"][0]._op == "group_norm_silu" and results["apart"][0]._op == "silu"
    results["fused"][0], results["apart"][0] = results["fused"][0].data, results["apart"][0].data
    for got, want, what in zip(results["fused"], f64(*results["apart"]), ("out", "dx", "dw", "db")):
        assert_close(got, want, np.float32, f"group_norm_silu fused vs apart {what}")


def test_dispatch_falls_back_to_the_reference(native_kernels):
    x16 = np.ones((2, 3), np.float16)
    assert kernels._compiled("gelu_forward", x16) is None
    assert kernels.gelu_forward(x16).dtype == kernels.gelu_forward_ref(x16).dtype
    empty = np.zeros((0, 2, 4, 4), np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)
    assert kernels.conv2d_forward(empty, w, None, 1, 1).shape == (0, 3, 4, 4)
    view = np.ones((4, 2, 5, 5), np.float32).transpose(0, 1, 3, 2)   # not C-contiguous: copied first
    assert_close(kernels.conv2d_forward(view, w, None, 1, 1),
                 kernels.conv2d_forward_ref(*f64(view, w), None, 1, 1), np.float32, "view")


def test_set_conv_version_checks_the_name():
    with pytest.raises(ValueError, match="not 'fastest'"):
        kernels.set_conv_version("fastest")
    with pytest.raises(ValueError, match="device"):
        kernels.set_conv_version(VERSIONS[0], device="tpu")


# ---------------------------------------------------------------------------------------------
# 4. Bad arguments

X = np.ones((2, 3, 6, 6), np.float32)
W = np.ones((4, 3, 3, 3), np.float32)
B = np.ones(4, np.float32)
DOUT = np.ones((2, 4, 6, 6), np.float32)


@pytest.mark.parametrize("call, error, words", [
    (lambda: _C.conv2d_forward(X.astype(np.float16), W, B, 1, 1), TypeError, "x must be a float32 or float64"),
    (lambda: _C.conv2d_forward(X, W.astype(np.float64), B, 1, 1), TypeError, "w has dtype float64"),
    (lambda: _C.conv2d_forward(X, W, B.astype(np.float64), 1, 1), TypeError, "b has dtype"),
    (lambda: _C.conv2d_forward(X.tolist(), W, B, 1, 1), TypeError, "x must be a numpy.ndarray"),
    (lambda: _C.conv2d_forward(X.astype(">f4"), W, B, 1, 1), TypeError, "native byte order"),
    (lambda: _C.conv2d_forward(X.transpose(0, 1, 3, 2), W, B, 1, 1), ValueError, "x must be C-contiguous"),
    (lambda: _C.conv2d_forward(X[0], W, B, 1, 1), ValueError, "x must have 4 dimensions"),
    (lambda: _C.conv2d_forward(X, W[:, :2].copy(), B, 1, 1), ValueError, "input channels"),
    (lambda: _C.conv2d_forward(X, W, B[:3].copy(), 1, 1), ValueError, "b has 3 values"),
    (lambda: _C.conv2d_forward(X[:0], W, B, 1, 1), ValueError, "x is empty"),
    (lambda: _C.conv2d_forward(X, W, B, 0, 1), ValueError, "stride must be in"),
    (lambda: _C.conv2d_forward(X, W, B, -2, 1), ValueError, "stride"),
    (lambda: _C.conv2d_forward(X, W, B, 1, -1), ValueError, "padding must be in"),
    (lambda: _C.conv2d_forward(X, W, B, 1.0, 1), TypeError, "stride must be an int"),
    (lambda: _C.conv2d_forward(X, W, B, True, 1), TypeError, "stride must be an int"),
    (lambda: _C.conv2d_forward(X, W, B, 1, 2 ** 40), ValueError, "padding"),
    (lambda: _C.conv2d_forward(X, W, B, 2 ** 70, 0), ValueError, "stride must be in [1, 2**30], got 1180591620717411303424"),
    (lambda: _C.conv2d_forward(X, W, B, np.int64(-3), 0), ValueError, "stride must be in"),
    (lambda: _C.conv2d_forward(X, W, B, 2 ** 30, 2 ** 29), ValueError, "too large"),
    (lambda: _C.conv2d_backward_weight(np.ones((1, 4, 2, 2), np.float32), np.ones((1, 16, 1, 1), np.float32),
                                       (1, 1), 2 ** 30, 2 ** 29), ValueError, "too large"),
    (lambda: _C.conv2d_forward(X, np.ones((4, 3, 9, 9), np.float32), B, 1, 1), ValueError, "kernel size 9"),
    (lambda: _C.conv2d_forward(X, W, B, 1, 1, version="fast"), ValueError, "unknown version 'fast'"),
    (lambda: _C.conv2d_forward(X, W, B, 1, 1, version=0), TypeError, "version must be a str"),
    (lambda: _C.conv2d_backward_input(DOUT, W, (6, 6), 1, 1, version="x"), ValueError, "unknown version"),
    (lambda: _C.conv2d_backward_input(DOUT, W, (7, 6), 1, 1), ValueError, "input_hw (7, 6)"),
    (lambda: _C.conv2d_backward_input(DOUT, W, (6,), 1, 1), TypeError, "input_hw must be a pair"),
    (lambda: _C.conv2d_backward_input(DOUT, W, (6, 0), 1, 1), ValueError, "input_hw must be in"),
    (lambda: _C.conv2d_backward_input(DOUT, W, "ab", 1, 1), TypeError, "input_hw must be a pair"),
    (lambda: _C.conv2d_backward_input(DOUT[:, :3].copy(), W, (6, 6), 1, 1), ValueError, "output channels"),
    (lambda: _C.conv2d_backward_input(DOUT, W.astype(np.float64), (6, 6), 1, 1), TypeError, "w has dtype"),
    (lambda: _C.conv2d_backward_input(DOUT, W, (6, 6), 0, 1), ValueError, "stride"),
    (lambda: _C.conv2d_backward_weight(DOUT, X, (3, 3), 1, 0), ValueError, "dout's size 6x6"),
    (lambda: _C.conv2d_backward_weight(DOUT, X[:1].copy(), (3, 3), 1, 1), ValueError, "dout has batch 2"),
    (lambda: _C.conv2d_backward_weight(DOUT, X, (3, 3.0), 1, 1), TypeError, "kernel_hw must be an int"),
    (lambda: _C.conv2d_backward_weight(DOUT, X, (3, 3), 1, -1), ValueError, "padding"),
    (lambda: _C.conv2d_backward_weight(DOUT, X.astype(np.int32), (3, 3), 1, 1), TypeError, "x must be a float32"),
    (lambda: _C.conv2d_backward_weight(DOUT[..., ::2], X, (3, 3), 1, 1), ValueError, "dout must be C-contiguous"),
    (lambda: _C.conv2d_add_forward(X, W, B, np.ones((2, 3), np.float32), None, 1, 1), ValueError,
     "shift has shape (2, 3) but should be (batch, output channels) = (2, 4)"),
    (lambda: _C.conv2d_add_forward(X, W, B, np.ones(4, np.float32), None, 1, 1), ValueError, "shift must have 2"),
    (lambda: _C.conv2d_add_forward(X, W, B, np.ones((2, 4)), None, 1, 1), TypeError, "shift has dtype float64"),
    (lambda: _C.conv2d_add_forward(X, W, B, None, DOUT[:, :, :3].copy(), 1, 1), ValueError,
     "residual has shape (2, 4, 3, 6) but the output is (2, 4, 6, 6)"),
    (lambda: _C.conv2d_add_forward(X, W, B, None, DOUT.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2), 1, 1),
     ValueError, "residual must be C-contiguous"),
    (lambda: _C.conv2d_add_forward(X, W, B, None, DOUT.astype(np.float64), 1, 1), TypeError, "residual has dtype"),
    (lambda: _C.conv2d_add_forward(X, W, B, None, DOUT, 1, 1, version="x"), ValueError, "unknown version"),
])
def test_conv_bindings_refuse_bad_arguments(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


LX, LW, LB, LD = (np.ones(shape, np.float32) for shape in [(5, 3), (4, 3), (4,), (5, 4)])   # linear x, w, b, dout


@pytest.mark.parametrize("call, error, words", [
    (lambda: _C.linear_forward(LX, LW[:, :2].copy(), LB), ValueError, "w has in_features 2 but x has 3"),
    (lambda: _C.linear_forward(LX, LW, LB[:3].copy()), ValueError, "b has values 3 but w has out_features 4"),
    (lambda: _C.linear_forward(LX, LW, LB.astype(np.float64)), TypeError, "b has dtype float64"),
    (lambda: _C.linear_forward(LX.astype(np.float64), LW, LB), TypeError, "w has dtype float32"),
    (lambda: _C.linear_forward(LX[None], LW, LB), ValueError, "x must have 2 dimensions"),
    (lambda: _C.linear_forward(LX.T, LW, LB), ValueError, "x must be C-contiguous"),
    (lambda: _C.linear_forward(LX[:0], LW, LB), ValueError, "x is empty"),
    (lambda: _C.linear_forward(LX.astype(np.int32), LW, LB), TypeError, "x must be a float32"),
    (lambda: _C.linear_forward([[1.0]], LW, LB), TypeError, "x must be a numpy.ndarray"),
    (lambda: _C.linear_backward_input(LD, LW[:3].copy()), ValueError, "w has out_features 3 but dout has 4"),
    (lambda: _C.linear_backward_input(LD, LW.astype(np.float64)), TypeError, "w has dtype"),
    (lambda: _C.linear_backward_input(LD[:, ::2], LW), ValueError, "dout must be C-contiguous"),
    (lambda: _C.linear_backward_weight(LD, LX[:4].copy()), ValueError, "x has rows 4 but dout has 5"),
    (lambda: _C.linear_backward_weight(LD, LX.reshape(5, 3, 1)), ValueError, "x must have 2 dimensions"),
    (lambda: _C.linear_backward_weight(LD.astype(np.float16), LX), TypeError, "dout must be a float32"),
])
def test_linear_bindings_refuse_bad_arguments(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


XT = np.ones((3, 2, 4), np.float32)
CO = np.ones(3, np.float32)


@pytest.mark.parametrize("call, error, words", [
    (lambda: _C.q_sample(XT, XT, CO, CO[:2].copy()), ValueError, "sqrt_one_minus_alpha_bar has 2 values"),
    (lambda: _C.q_sample(XT, XT[:2].copy(), CO, CO), ValueError, "eps has shape"),
    (lambda: _C.q_sample(XT, XT.astype(np.float64), CO, CO), TypeError, "eps has dtype"),
    (lambda: _C.q_sample(XT, XT, CO.astype(np.float64), CO), TypeError, "sqrt_alpha_bar has dtype"),
    (lambda: _C.q_sample(XT, XT, CO.reshape(3, 1), CO), ValueError, "sqrt_alpha_bar must have 1 dimensions"),
    (lambda: _C.q_sample(np.float32(1), XT, CO, CO), TypeError, "x0 must be a numpy.ndarray"),
    (lambda: _C.q_sample(np.ones((), np.float32), XT, CO, CO), ValueError, "x0 must have at least one"),
    (lambda: _C.q_sample(XT[:0], XT[:0], CO[:0], CO[:0]), ValueError, "x0 is empty"),
    (lambda: _C.q_sample(XT.transpose(0, 2, 1), XT, CO, CO), ValueError, "x0 must be C-contiguous"),
    (lambda: _C.ddpm_step(XT, XT, XT, CO, CO, CO, XT[:, :1].copy(), 2.0), ValueError, "eps_uncond has shape"),
    (lambda: _C.ddpm_step(XT, XT, XT, CO, CO, CO, None, "2"), TypeError, "guidance_scale must be a number"),
    (lambda: _C.ddpm_step(XT, XT, XT.astype(np.float64), CO, CO, CO), TypeError, "z has dtype"),
    (lambda: _C.ddpm_step(XT, XT, XT, CO, np.ones(4, np.float32), CO), ValueError, "coef_eps has 4 values"),
    (lambda: _C.ddim_step(XT, XT, XT, CO, CO, CO, CO, CO, 1), TypeError, "clip_x0 must be a bool"),
    (lambda: _C.ddim_step(XT, XT, XT, CO, CO, CO, CO[:1].copy(), CO), ValueError, "dir_coef has 1 values"),
    (lambda: _C.ddim_step(XT, XT, XT, CO, CO, CO, CO, CO, False, XT.astype(np.float64)), TypeError, "eps_uncond"),
    (lambda: _C.gelu_forward(XT.astype(np.int64)), TypeError, "x must be a float32"),
    (lambda: _C.gelu_forward(XT[:, :, ::2]), ValueError, "x must be C-contiguous"),
    (lambda: _C.gelu_backward(XT, XT[:2].copy()), ValueError, "x has shape"),
    (lambda: _C.gelu_backward(XT, XT.astype(np.float64)), TypeError, "x has dtype"),
])
def test_step_and_gelu_bindings_refuse_bad_arguments(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


C2 = np.ones(2, np.float32)                                     # per channel of XT (3, 2, 4)
X4, D4 = np.ones((1, 2, 4, 4), np.float32), np.ones((1, 2, 2, 2), np.float32)   # max pool 2x2: x, dout
I4 = np.zeros((1, 2, 2, 2), np.int64)                            # its window offsets
G3 = np.ones((3, 1), np.float32)                                 # mean, inv_std of XT in one group


@pytest.mark.parametrize("call, error, words", [
    (lambda: _C.batch_norm_forward_train(XT.astype(np.float16)), TypeError, "x must be a float32"),
    (lambda: _C.batch_norm_forward_train(XT.tolist()), TypeError, "x must be a numpy.ndarray"),
    (lambda: _C.batch_norm_forward_train(XT.transpose(0, 2, 1)), ValueError, "x must be C-contiguous"),
    (lambda: _C.batch_norm_forward_train(XT[:0]), ValueError, "x is empty"),
    (lambda: _C.batch_norm_forward_train(XT[:, :0]), ValueError, "x is empty"),
    (lambda: _C.batch_norm_forward_train(CO), ValueError, "x must have a channel axis"),
    (lambda: _C.batch_norm_forward_train(XT, C2.astype(np.float64)), TypeError, "w has dtype"),
    (lambda: _C.batch_norm_forward_train(XT, C2, CO), ValueError, "b has 3 values but x has 2 channels"),
    (lambda: _C.batch_norm_forward_train(XT, C2.reshape(1, 2)), ValueError, "w must have 1 dimensions"),
    (lambda: _C.batch_norm_forward_train(XT, None, None, -1.0), ValueError, "eps must be"),
    (lambda: _C.batch_norm_forward_train(XT, None, None, "1e-5"), TypeError, "eps must be a number"),
    (lambda: _C.batch_norm_backward_train(XT, XT[:2].copy(), C2), ValueError, "xhat has shape"),
    (lambda: _C.batch_norm_backward_train(XT, XT.astype(np.float64), C2), TypeError, "xhat has dtype"),
    (lambda: _C.batch_norm_backward_train(XT, XT, CO), ValueError, "inv_std has 3 values but dout has 2 channels"),
    (lambda: _C.batch_norm_backward_train(XT, XT, C2.astype(np.float64)), TypeError, "inv_std has dtype"),
    (lambda: _C.batch_norm_backward_train(XT, XT, C2, CO), ValueError, "w has 3 values"),
    (lambda: _C.batch_norm_backward_train(XT[..., ::2], XT[..., ::2], C2), ValueError, "dout must be C-contiguous"),
    (lambda: _C.batch_norm_backward_train(XT, XT[..., ::2], C2), ValueError, "xhat must be C-contiguous"),
    (lambda: _C.batch_norm_backward_train(XT, XT, np.ones(4, np.float32)[::2]), ValueError, "inv_std must be C-contig"),
    (lambda: _C.batch_norm_backward_train(XT[:0], XT[:0], C2), ValueError, "dout is empty"),
    (lambda: _C.batch_norm_backward_train(XT.astype(np.int32), XT, C2), TypeError, "dout must be a float32"),
    (lambda: _C.batch_norm_gelu_forward_train(XT.astype(np.float16)), TypeError,
     "batch_norm_gelu_forward_train: x must be a float32"),
    (lambda: _C.batch_norm_gelu_forward_train(XT, C2, CO), ValueError, "b has 3 values but x has 2 channels"),
    (lambda: _C.batch_norm_gelu_forward_train(XT, None, None, float("nan")), ValueError, "eps must be"),
    (lambda: _C.batch_norm_gelu_backward_train(XT, XT, C2, C2, CO), ValueError,
     "batch_norm_gelu_backward_train: b has 3 values but dout has 2 channels"),
    (lambda: _C.batch_norm_gelu_backward_train(XT, XT, C2, None, C2.astype(np.float64)), TypeError, "b has dtype"),
    (lambda: _C.batch_norm_gelu_backward_train(XT, XT[..., ::2], C2), ValueError, "xhat must be C-contiguous"),
    (lambda: _C.max_pool2d_forward(XT, (2, 2), (2, 2), 0), ValueError, "max_pool2d_forward: x must have 4 dimensions"),
    (lambda: _C.max_pool2d_forward(X4, (9, 2), (2, 2), 0), ValueError, "kernel size 9 is larger than the padded"),
    (lambda: _C.max_pool2d_forward(X4, (2, 2), (0, 2), 0), ValueError, "stride must be in"),
    (lambda: _C.max_pool2d_forward(X4, (2, 2), (2, 2), 2), ValueError, "padding 2 must be at most half"),
    (lambda: _C.max_pool2d_forward(X4.astype(np.int32), (2, 2), (2, 2), 0), TypeError, "x must be a float32"),
    (lambda: _C.max_pool2d_backward(D4, I4.astype(np.int32), (4, 4), (2, 2), (2, 2), 0), TypeError, "idx must be an int64"),
    (lambda: _C.max_pool2d_backward(D4, I4[:, :, :1].copy(), (4, 4), (2, 2), (2, 2), 0), ValueError, "idx has shape"),
    (lambda: _C.max_pool2d_backward(D4, I4 + 4, (4, 4), (2, 2), (2, 2), 0), ValueError, "idx holds 4, outside"),
    (lambda: _C.max_pool2d_backward(D4, I4, (5, 6), (2, 2), (2, 2), 0), ValueError, "does not give dout's size"),
    (lambda: _C.max_pool2d_backward(D4, I4[..., ::-1], (4, 4), (2, 2), (2, 2), 0), ValueError, "idx must be C-contig"),
    (lambda: _C.batch_norm_gelu_forward_eval(XT, C2, CO), ValueError,
     "batch_norm_gelu_forward_eval: shift has 3 values but x has 2 channels"),
    (lambda: _C.batch_norm_gelu_forward_eval(XT, C2.astype(np.float64), C2), TypeError, "scale has dtype"),
    (lambda: _C.batch_norm_gelu_forward_eval(XT[..., ::2], C2, C2), ValueError, "x must be C-contiguous"),
    (lambda: _C.group_norm_silu_forward(XT, 3), ValueError, "group_norm_silu_forward: num_groups 3 does not divide "
     "the 2 channels of x"),
    (lambda: _C.group_norm_silu_forward(XT, 0), ValueError, "num_groups must be in [1, 2**30], got 0"),
    (lambda: _C.group_norm_silu_forward(XT, 2.0), TypeError, "num_groups must be an int"),
    (lambda: _C.group_norm_silu_forward(CO, 1), ValueError, "x must have a channel axis"),
    (lambda: _C.group_norm_silu_forward(XT[:0], 1), ValueError, "x is empty"),
    (lambda: _C.group_norm_silu_forward(XT[..., ::2], 1), ValueError, "x must be C-contiguous"),
    (lambda: _C.group_norm_silu_forward(XT.astype(np.float16), 1), TypeError, "x must be a float32"),
    (lambda: _C.group_norm_silu_forward(XT, 2, C2, CO), ValueError, "b has 3 values but x has 2 channels"),
    (lambda: _C.group_norm_silu_forward(XT, 2, C2.astype(np.float64)), TypeError, "w has dtype"),
    (lambda: _C.group_norm_silu_forward(XT, 2, None, None, -1.0), ValueError, "eps must be"),
    (lambda: _C.group_norm_silu_forward(XT, 2, None, None, 1e-5, 1), TypeError, "silu must be a bool"),
    (lambda: _C.group_norm_silu_backward(XT, XT[:2].copy(), G3, G3, 1), ValueError, "x has shape"),
    (lambda: _C.group_norm_silu_backward(XT, XT.astype(np.float64), G3, G3, 1), TypeError, "x has dtype"),
    (lambda: _C.group_norm_silu_backward(XT, XT, G3, G3, 2), ValueError,
     "mean has shape (3, 1) but should be (N, num_groups) = (3, 2)"),
    (lambda: _C.group_norm_silu_backward(XT, XT, G3, G3[:2].copy(), 1), ValueError, "inv_std has shape (2, 1)"),
    (lambda: _C.group_norm_silu_backward(XT, XT, G3.ravel(), G3, 1), ValueError, "mean must have 2 dimensions"),
    (lambda: _C.group_norm_silu_backward(XT, XT, G3, G3.astype(np.float64), 1), TypeError, "inv_std has dtype"),
    (lambda: _C.group_norm_silu_backward(XT, XT, G3, G3, 3), ValueError, "num_groups 3 does not divide"),
    (lambda: _C.group_norm_silu_backward(XT, XT, G3, G3, 1, None, CO), ValueError, "b has 3 values"),
    (lambda: _C.group_norm_silu_backward(XT, XT[..., ::2], G3, G3, 1), ValueError, "x must be C-contiguous"),
    (lambda: _C.group_norm_silu_backward(XT[:0], XT[:0], G3, G3, 1), ValueError, "dout is empty"),
])
def test_batch_norm_bindings_refuse_bad_arguments(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


def test_unaligned_arrays_are_refused():
    raw = np.zeros(4 * 3 * 6 * 6 + 1, np.float32).view(np.uint8)[2:2 + 4 * 2 * 3 * 6 * 6]
    x = raw.view(np.float32).reshape(2, 3, 6, 6)                  # C-contiguous, misaligned by 2 bytes
    assert not x.flags.aligned
    with pytest.raises(ValueError, match="x must be aligned"):
        _C.conv2d_forward(x, W, B, 1, 1)


# Hypothesis: either the reference's result, or a TypeError/ValueError exactly when a rule is broken.

def layout(array, kind):
    """The same values as a C-contiguous array, a transposed view or a strided slice."""
    if kind == "transposed" and array.ndim >= 2:
        return np.ascontiguousarray(np.swapaxes(array, -1, -2)).swapaxes(-1, -2)
    if kind == "sliced":
        return np.repeat(array, 2, axis=-1)[..., ::2]
    return array


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 3), c=st.integers(0, 3), h=st.integers(0, 7), w=st.integers(1, 7), o=st.integers(1, 4),
       kh=st.integers(1, 4), kw=st.integers(0, 4), stride=st.integers(-1, 3), pad=st.integers(-1, 2),
       dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int32]), w64=st.booleans(),
       kind=st.sampled_from(["contiguous", "contiguous", "transposed", "sliced"]),
       which=st.sampled_from(["forward", "input", "weight"]), version=st.sampled_from(VERSIONS))
def test_conv_bindings_property(n, c, h, w, o, kh, kw, stride, pad, dtype, w64, kind, which, version):
    rng = np.random.default_rng(0)
    x = layout(rng.standard_normal((n, c, h, w)).astype(dtype), kind)
    wt = rng.standard_normal((o, c, kh, kw)).astype(np.float64 if w64 else dtype)
    fits = stride >= 1 and pad >= 0 and h + 2 * pad >= kh and w + 2 * pad >= kw
    oh, ow = ((h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1) if fits else (1, 1)
    dout = layout(rng.standard_normal((n, o, oh, ow)).astype(dtype), kind)
    used = {"forward": (x, wt), "input": (dout, wt), "weight": (dout, x)}[which]
    valid = (fits and min(n, c, h, w, o, kh, kw) > 0 and dtype in (np.float32, np.float64)
             and wt.dtype == dtype and all(a.flags.c_contiguous for a in used))
    try:
        if which == "forward":
            got = _C.conv2d_forward(x, wt, None, stride, pad, version=version)
        elif which == "input":
            got = _C.conv2d_backward_input(dout, wt, (h, w), stride, pad, version=version)
        else:
            got = _C.conv2d_backward_weight(dout, x, (kh, kw), stride, pad, version=version)
    except (TypeError, ValueError):
        assert not valid
        return
    assert valid, "a bad argument was accepted"
    if which == "forward":
        want = kernels.conv2d_forward_ref(*f64(x, wt), None, stride, pad)
    elif which == "input":
        want = kernels.conv2d_backward_input_ref(*f64(dout, wt), (h, w), stride, pad)
    else:
        want = kernels.conv2d_backward_weight_ref(*f64(dout, x), (kh, kw), stride, pad)
    assert_close(got, want, dtype, which)


@settings(max_examples=120, deadline=None, derandomize=True)
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=4), coef_len=st.integers(0, 6),
       dtype=st.sampled_from([np.float32, np.float64, np.float16]), coef64=st.booleans(),
       kind=st.sampled_from(["contiguous", "contiguous", "transposed", "sliced"]),
       which=st.sampled_from(["q_sample", "ddpm", "ddim", "gelu"]), guided=st.booleans(), clip=st.booleans())
def test_step_bindings_property(shape, coef_len, dtype, coef64, kind, which, guided, clip):
    rng = np.random.default_rng(1)
    shape = tuple(shape)
    xs = [layout(rng.standard_normal(shape).astype(dtype), kind) for _ in range(4)]
    coef_dtype = np.float64 if coef64 else dtype
    coefs = [rng.uniform(0.1, 1, coef_len).astype(coef_dtype) for _ in range(5)]
    used = xs[:1] if which == "gelu" else xs[:2] if which == "q_sample" else xs[:4] if guided else xs[:3]
    float_ok = dtype in (np.float32, np.float64) and all(x.flags.c_contiguous for x in used)
    batch_ok = len(shape) >= 1 and coef_len == shape[0] and coef_dtype == dtype and int(np.prod(shape)) > 0
    uncond, scale = (xs[3], 1.5) if guided else (None, 1.0)
    try:
        if which == "q_sample":
            got, want = _C.q_sample(xs[0], xs[1], *coefs[:2]), kernels.q_sample_ref(*f64(*xs[:2], *coefs[:2]))
        elif which == "ddpm":
            got = _C.ddpm_step(*xs[:3], *coefs[:3], uncond, scale)
            want = kernels.ddpm_step_ref(*f64(*xs[:3], *coefs[:3], uncond), scale)
        elif which == "ddim":
            got = _C.ddim_step(*xs[:3], *coefs, clip, uncond, scale)[0]
            want = kernels.ddim_step_ref(*f64(*xs[:3], *coefs), clip, *f64(uncond), scale)[0]
        else:
            got, want = _C.gelu_forward(xs[0]), kernels.gelu_forward_ref(xs[0].astype(np.float64))
    except (TypeError, ValueError):
        assert not (float_ok and (batch_ok or (which == "gelu" and int(np.prod(shape)) > 0)))
        return
    assert float_ok and (batch_ok or which == "gelu"), "a bad argument was accepted"
    assert_close(got, want, dtype, which, (1e-4, 1e-5) if which == "gelu" else None)


# ---------------------------------------------------------------------------------------------
# 5. The stale-build warning


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"the stale check ran a subprocess: {args}")


def test_warn_if_stale_is_silent_for_an_up_to_date_build(monkeypatch):
    if backend.native is None:
        pytest.skip(backend.native_error)
    monkeypatch.delenv("TINYDIFF_REBUILD", raising=False)
    monkeypatch.setattr("subprocess.run", _no_subprocess)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # any warning fails the test
        backend.warn_if_stale(backend.native)         # the module imported above is up to date
    assert backend.stale_sources(backend.native.__file__) == []


def test_warn_if_stale_names_the_newer_sources_and_the_rebuild_command_and_builds_nothing(monkeypatch):
    if backend.native is None:
        pytest.skip(backend.native_error)
    real_getmtime = os.path.getmtime
    monkeypatch.delenv("TINYDIFF_REBUILD", raising=False)
    monkeypatch.setattr("subprocess.run", _no_subprocess)
    monkeypatch.setattr(os.path, "getmtime", lambda p: real_getmtime(p) + (1e6 if p.endswith(".h") else 0))
    with pytest.warns(UserWarning, match="stale") as record:
        backend.warn_if_stale(backend.native)
    assert len(record) == 1
    message = str(record[0].message)
    root = os.path.dirname(os.path.dirname(os.path.abspath(backend.__file__)))
    assert f"cd {root} && TINYDIFF_CUDA=0 python setup.py build_ext --inplace" in message
    assert os.path.join("csrc", "kernels_cpu.h") in message and "bind_cpu.cpp" not in message
    monkeypatch.setenv("TINYDIFF_REBUILD", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.warn_if_stale(backend.native)         # TINYDIFF_REBUILD=0: no check at all


def test_import_builds_nothing():
    """`import tinydiff` is a read, not a build: backend.py starts no process and takes no lock."""
    import ast
    tree = ast.parse(open(backend.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not imported & {"subprocess", "fcntl", "sysconfig"}, sorted(imported)


def test_one_blas_thread_limits_numpys_blas_only_for_the_native_kernels(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
    if not blas.lib_controllers:
        pytest.skip("NumPy's BLAS is not visible to threadpoolctl")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    threads = lambda: [lib.num_threads for lib in blas.lib_controllers]  # noqa: E731
    with blas.limit(limits=2):                       # a known starting point, also on a 1-core machine
        before = threads()
        with backend.one_blas_thread("cpu"):
            assert threads() == [1] * len(before)
        assert threads() == before                   # given back on exit
        with backend.one_blas_thread("cuda"):        # the GPU's matrix products are not OpenBLAS's
            assert threads() == before
        previous = backend.get_kernels()
        try:
            backend.set_kernels("numpy")             # the reference convolutions are BLAS products
            with backend.one_blas_thread("cpu"):
                assert threads() == before
        finally:
            backend.set_kernels(previous)
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")   # the user's choice wins
        with backend.one_blas_thread("cpu"):
            assert threads() == before
