"""Float64 central-difference gradient checks for every differentiable op of the engine.

CASES maps each op (a public name of `Tensor`, `tinydiff.tensor` or `tinydiff.functional`; the
bodies of the shape ops live in `tinydiff.shape_ops` and are checked through these names) to
a list of small cases. `test_every_op_has_a_gradcheck` enumerates the public ops and fails if
one has no case, so an op added later must come with its check.

Run:  python -m pytest tests/test_gradcheck_ops.py -q
"""
import inspect
import zlib

import numpy as np
import pytest

import tinydiff
from tinydiff import F, Tensor, backend, gradcheck
from tinydiff import shape_ops
from tinydiff import tensor as tensor_module


# ---------------------------------------------------------------------------------------------
# Inputs


def rand(rng, *shape, low=-1.0, high=1.0, grad=True):
    """A float64 tensor of uniform values in [low, high)."""
    return Tensor(rng.uniform(low, high, shape), requires_grad=grad)


def away_from_zero(rng, *shape):
    """Values in +-[0.2, 1): kinks (abs, relu) are more than eps away."""
    return Tensor(rng.uniform(0.2, 1.0, shape) * rng.choice([-1.0, 1.0], shape), requires_grad=True)


def positive(rng, *shape):
    return rand(rng, *shape, low=0.5, high=2.0)


# ---------------------------------------------------------------------------------------------
# Cases: op -> [(label, make)], where make(rng) returns (fn, inputs) for gradcheck(fn, inputs).
# Broadcasting cases include (3,1,5) * (4,5); conv/pool/norm cases include batch 1, odd sizes,
# stride 2, no padding, non-square images and kernels.


def binary(op, a_shape, b_shape, b_maker=rand):
    return lambda rng: (op, [rand(rng, *a_shape), b_maker(rng, *b_shape)])


def unary(fn, shape, maker=rand):
    return lambda rng: (fn, [maker(rng, *shape)])


def dropout_seeded(x):
    tinydiff.manual_seed(0)              # the same mask on every call of gradcheck's objective
    return F.dropout(x, p=0.3, training=True)


def batch_norm_case(shape, training, affine=True, stats=True, gelu=False):
    def make(rng):
        c = shape[1]
        x = rand(rng, *shape)
        w, b = (rand(rng, c), rand(rng, c)) if affine else (None, None)
        rm, rv = Tensor(rng.uniform(-0.5, 0.5, c)), Tensor(rng.uniform(0.5, 1.5, c))
        if not stats:
            rm = rv = None
        fn = lambda x, *wb: op(x, rm, rv, *wb, training=training)   # noqa: E731
        return fn, [x] + ([w, b] if affine else [])
    op = F.batch_norm_gelu if gelu else F.batch_norm
    return make


def attention_case(q_shape, k_shape, v_shape, key_padding_mask):
    """Scores scaled by 3 so that the softmax is far from uniform; True in the mask: padding."""
    def make(rng):
        fn = lambda q, k, v: F.scaled_dot_product_attention(q * 3, k, v, key_padding_mask)   # noqa: E731
        return fn, [rand(rng, *q_shape), rand(rng, *k_shape), rand(rng, *v_shape)]
    return make


def conv_case(x_shape, w_shape, stride, padding, bias=True, transpose=False):
    def make(rng):
        op = F.conv_transpose2d if transpose else F.conv2d
        out_channels = w_shape[1] if transpose else w_shape[0]
        inputs = [rand(rng, *x_shape), rand(rng, *w_shape)] + ([rand(rng, out_channels)] if bias else [])
        return (lambda x, w, b=None: op(x, w, b, stride=stride, padding=padding)), inputs
    return make


def conv_add_case(x_shape, w_shape, stride, padding, shift=True, residual=True):
    """F.conv2d_add with a bias, and a shift (N, out) and/or a residual shaped like the output."""
    def make(rng):
        n, o = x_shape[0], w_shape[0]
        oh = (x_shape[2] + 2 * padding - w_shape[2]) // stride + 1
        ow = (x_shape[3] + 2 * padding - w_shape[3]) // stride + 1
        extra = ([rand(rng, n, o)] if shift else []) + ([rand(rng, n, o, oh, ow)] if residual else [])

        def fn(x, w, b, *added):
            added = list(added)
            s = added.pop(0) if shift else None
            return F.conv2d_add(x, w, b, stride, padding, shift=s, residual=added[0] if residual else None)
        return fn, [rand(rng, *x_shape), rand(rng, *w_shape), rand(rng, o)] + extra
    return make


def pool_case(op, x_shape, kernel_size, stride=None, padding=0):
    return lambda rng: ((lambda x: op(x, kernel_size, stride, padding)), [rand(rng, *x_shape)])


CASES = {
    # --- Tensor: arithmetic operators (broadcasting undone by unbroadcast) ---------------------
    "Tensor.__add__": [("(3,1,5)+(4,5)", binary(lambda a, b: a + b, (3, 1, 5), (4, 5))),
                       ("(2,3)+(3,)", binary(lambda a, b: a + b, (2, 3), (3,))),
                       ("x+x", unary(lambda x: x + x, (3, 2))),
                       ("scalar", unary(lambda x: x + 2.0, (2, 3)))],
    "Tensor.__radd__": [("2+x", unary(lambda x: 2.0 + x, (2, 3))),
                        ("ndarray+x", unary(lambda x: np.arange(3.0) + x, (2, 3)))],
    "Tensor.__sub__": [("(3,1,5)-(4,5)", binary(lambda a, b: a - b, (3, 1, 5), (4, 5))),
                       ("(4,1)-(1,3)", binary(lambda a, b: a - b, (4, 1), (1, 3)))],
    "Tensor.__rsub__": [("1.5-x", unary(lambda x: 1.5 - x, (2, 3)))],
    "Tensor.__mul__": [("(3,1,5)*(4,5)", binary(lambda a, b: a * b, (3, 1, 5), (4, 5))),
                       ("x*x", unary(lambda x: x * x, (3, 2))),
                       ("(2,3)*()", binary(lambda a, b: a * b, (2, 3), ()))],
    "Tensor.__rmul__": [("3*x", unary(lambda x: 3.0 * x, (2, 3))),
                        ("ndarray*x", unary(lambda x: np.linspace(-1, 1, 3) * x, (2, 3)))],
    "Tensor.__truediv__": [("(3,1,5)/(4,5)", binary(lambda a, b: a / b, (3, 1, 5), (4, 5), positive)),
                           ("x/4", unary(lambda x: x / 4, (2, 3)))],
    "Tensor.__rtruediv__": [("2/x", unary(lambda x: 2.0 / x, (2, 3), positive))],
    "Tensor.__neg__": [("-x", unary(lambda x: -x, (2, 3)))],
    "Tensor.__pow__": [("x**2.5", unary(lambda x: x ** 2.5, (2, 3), positive)),
                       ("x**3", unary(lambda x: x ** 3, (2, 3))),
                       ("x**-1", unary(lambda x: x ** -1.0, (2, 3), positive))],
    "Tensor.__matmul__": [("(2,3)@(3,4)", binary(lambda a, b: a @ b, (2, 3), (3, 4))),
                          ("batched (2,3,4)@(4,5)", binary(lambda a, b: a @ b, (2, 3, 4), (4, 5))),
                          ("broadcast (3,1,2,4)@(5,4,3)", binary(lambda a, b: a @ b, (3, 1, 2, 4), (5, 4, 3)))],
    "Tensor.__rmatmul__": [("ndarray@x", unary(lambda x: np.ones((2, 3)) @ x, (3, 4)))],
    "Tensor.__getitem__": [("slices", unary(lambda x: x[1:, ::2], (3, 5))),
                           ("negative step", unary(lambda x: x[::-1, 1], (3, 4))),
                           ("int array with repeats", unary(lambda x: x[np.array([0, 2, 0, 0])], (3, 4))),
                           ("two int arrays", unary(lambda x: x[np.array([0, 1, 1]), np.array([2, 2, 0])], (2, 3))),
                           ("boolean mask", unary(lambda x: x[np.array([True, False, True])], (3, 2))),
                           ("None and ellipsis", unary(lambda x: x[None, ..., 1:], (2, 3)))],
    # --- Tensor: elementwise functions ------------------------------------------------------------
    "Tensor.exp": [("(2,3)", unary(lambda x: x.exp(), (2, 3)))],
    "Tensor.log": [("(2,3)", unary(lambda x: x.log(), (2, 3), positive))],
    "Tensor.sqrt": [("(2,3)", unary(lambda x: x.sqrt(), (2, 3), positive))],
    "Tensor.abs": [("(2,3)", unary(lambda x: x.abs(), (2, 3), away_from_zero))],
    "Tensor.clip": [("both", unary(lambda x: x.clip(-0.5, 0.5), (4, 5), away_from_zero)),
                    ("min only", unary(lambda x: x.clip(min=0.1), (4, 5), away_from_zero))],
    "Tensor.clamp": [("max only", unary(lambda x: x.clamp(max=-0.1), (4, 5), away_from_zero))],
    "Tensor.relu": [("(3,4)", unary(lambda x: x.relu(), (3, 4), away_from_zero))],
    "Tensor.sigmoid": [("(3,4)", unary(lambda x: (x * 8).sigmoid(), (3, 4)))],
    "Tensor.tanh": [("(3,4)", unary(lambda x: (x * 3).tanh(), (3, 4)))],
    "Tensor.maximum": [("(3,1,5) vs (4,5)", binary(lambda a, b: a.maximum(b), (3, 1, 5), (4, 5))),
                       ("scalar", unary(lambda x: x.maximum(0.1), (3, 4), away_from_zero))],
    "Tensor.minimum": [("(2,3) vs (3,)", binary(lambda a, b: a.minimum(b), (2, 3), (3,)))],
    # --- Tensor: reductions -----------------------------------------------------------------------
    "Tensor.sum": [("all", unary(lambda x: x.sum(), (2, 3, 4))),
                   ("axis 1", unary(lambda x: x.sum(axis=1), (2, 3, 4))),
                   ("axes (0,2) keepdims", unary(lambda x: x.sum(axis=(0, 2), keepdims=True), (2, 3, 4))),
                   ("axis -1", unary(lambda x: x.sum(-1), (2, 3, 4)))],
    "Tensor.mean": [("all", unary(lambda x: x.mean(), (2, 3, 4))),
                    ("axes (1,-1)", unary(lambda x: x.mean(axis=(1, -1)), (2, 3, 4))),
                    ("axis 0 keepdims", unary(lambda x: x.mean(axis=0, keepdims=True), (2, 3, 4)))],
    "Tensor.var": [("all, unbiased", unary(lambda x: x.var(), (2, 3, 4))),
                   ("axis 1 keepdims", unary(lambda x: x.var(axis=1, keepdims=True), (2, 3, 4))),
                   ("axes (0,2), correction 0", unary(lambda x: x.var(axis=(0, 2), correction=0), (2, 3, 4)))],
    "Tensor.max": [("all", unary(lambda x: x.max(), (3, 4))),
                   ("axis 1", unary(lambda x: x.max(axis=1), (2, 3, 4))),
                   ("axis -1 keepdims", unary(lambda x: x.max(axis=-1, keepdims=True), (2, 3, 4))),
                   ("all keepdims", unary(lambda x: x.max(keepdims=True), (2, 3)))],
    # --- Tensor: shapes, casts, devices ----------------------------------------------------------
    "Tensor.reshape": [("(2,3,4)->(4,-1)", unary(lambda x: x.reshape(4, -1), (2, 3, 4))),
                       ("of a transpose", unary(lambda x: x.T.reshape((12,)), (3, 4)))],
    "Tensor.view": [("(6,)->(2,3)", unary(lambda x: x.view(2, 3), (6,)))],
    "Tensor.flatten": [("start 1", unary(lambda x: x.flatten(1), (2, 3, 4)))],
    "Tensor.squeeze": [("axis 1", unary(lambda x: x.squeeze(1), (2, 1, 3)))],
    "Tensor.unsqueeze": [("axis -1", unary(lambda x: x.unsqueeze(-1), (2, 3)))],
    "Tensor.permute": [("(2,0,1)", unary(lambda x: x.permute(2, 0, 1), (2, 3, 4))),
                       ("negative dims", unary(lambda x: x.permute(0, -1, 1), (2, 3, 4)))],
    "Tensor.transpose": [("(0,2)", unary(lambda x: x.transpose(0, 2), (2, 3, 4))),
                         ("(-1,-2)", unary(lambda x: x.transpose(-1, -2), (2, 3, 4)))],
    "Tensor.T": [("(3,4)", unary(lambda x: x.T, (3, 4)))],
    "Tensor.expand": [("(3,1)->(2,3,4)", unary(lambda x: x.expand(2, 3, 4), (3, 1))),
                      ("-1 keeps", unary(lambda x: x.expand(-1, 5), (3, 1)))],
    "Tensor.astype": [("float64->float64", unary(lambda x: x.astype(np.float64) * 2, (2, 3)))],
    "Tensor.double": [("(2,3)", unary(lambda x: x.double() * 2, (2, 3)))],
    # float() rounds to float32 in the forward pass: a larger step, a looser tolerance (see test)
    "Tensor.float": [("(2,3)", unary(lambda x: x.float() * 2, (2, 3)))],
    # on the CPU to("cpu") is the tensor itself; the GPU round trip is checked where CuPy works
    "Tensor.to": [("cpu", unary(lambda x: x.to("cpu") * 2, (2, 3))),
                  ("cuda and back", unary(lambda x: x.to("cuda").exp().to("cpu"), (2, 3)))],
    # --- tinydiff.tensor: ops of several tensors (also re-exported as F.cat, F.where, ...) ------
    "tensor.where": [("broadcast", lambda rng: ((lambda a, b: tinydiff.where(rng_mask(3, 1, 5), a, b)),
                                                [rand(rng, 3, 1, 5), rand(rng, 4, 5)])),
                     ("scalar a", unary(lambda x: F.where(x.data > 0, 0.0, x), (3, 4), away_from_zero))],
    "tensor.maximum": [("(2,3) vs (2,3)", binary(tensor_module.maximum, (2, 3), (2, 3)))],
    "tensor.matmul": [("batched (2,2,3)@(2,3,4)", binary(tinydiff.matmul, (2, 2, 3), (2, 3, 4)))],
    "tensor.cat": [("dim 0, three", lambda rng: ((lambda a, b, c: tinydiff.cat([a, b, c])),
                                                 [rand(rng, 1, 3), rand(rng, 2, 3), rand(rng, 3, 3)])),
                   ("dim -1", lambda rng: ((lambda a, b: F.cat([a, b], dim=-1)),
                                           [rand(rng, 2, 2, 1), rand(rng, 2, 2, 3)]))],
    "tensor.stack": [("dim 1", lambda rng: ((lambda a, b: tinydiff.stack([a, b], dim=1)),
                                            [rand(rng, 2, 3), rand(rng, 2, 3)]))],
    "tensor.exp": [("(2,3)", unary(tensor_module.exp, (2, 3)))],
    "tensor.log": [("(2,3)", unary(tensor_module.log, (2, 3), positive))],
    "tensor.sqrt": [("(2,3)", unary(tensor_module.sqrt, (2, 3), positive))],
    # --- F: activations ---------------------------------------------------------------------------
    "F.relu": [("(3,4)", unary(F.relu, (3, 4), away_from_zero))],
    "F.sigmoid": [("(3,4)", unary(lambda x: F.sigmoid(x * 5), (3, 4)))],
    "F.tanh": [("(3,4)", unary(lambda x: F.tanh(x * 2), (3, 4)))],
    "F.silu": [("(3,4)", unary(lambda x: F.silu(x * 5), (3, 4)))],
    "F.gelu": [("wide range", unary(lambda x: F.gelu(x * 7), (3, 5)))],
    "F.softmax": [("dim -1", unary(lambda x: F.softmax(x * 3, dim=-1), (2, 5))),
                  ("dim 1 of 3-D", unary(lambda x: F.softmax(x, dim=1), (2, 3, 2)))],
    "F.log_softmax": [("dim -1", unary(lambda x: F.log_softmax(x * 3), (2, 5))),
                      ("dim 0", unary(lambda x: F.log_softmax(x, dim=0), (3, 2)))],
    # --- F: layers --------------------------------------------------------------------------------
    "F.linear": [("with bias", lambda rng: (F.linear, [rand(rng, 2, 3), rand(rng, 4, 3), rand(rng, 4)])),
                 ("3-D input, no bias", lambda rng: (F.linear, [rand(rng, 2, 5, 3), rand(rng, 4, 3)]))],
    "F.conv2d": [("3x3 pad 1", conv_case((2, 3, 5, 5), (4, 3, 3, 3), 1, 1)),
                 ("batch 1, odd, stride 2, no pad", conv_case((1, 2, 7, 5), (3, 2, 3, 3), 2, 0)),
                 ("non-square image and kernel", conv_case((1, 2, 5, 7), (2, 2, 3, 2), 1, 0)),
                 ("stride 2 pad 1 non-square", conv_case((2, 1, 6, 5), (2, 1, 2, 3), 2, 1)),
                 ("1x1 no bias", conv_case((1, 3, 3, 4), (2, 3, 1, 1), 1, 0, bias=False)),
                 ("stride 3 leaves a remainder", conv_case((1, 1, 8, 7), (1, 1, 3, 3), 3, 1))],
    "F.conv2d_add": [("3x3 pad 1, shift and residual", conv_add_case((2, 3, 5, 5), (4, 3, 3, 3), 1, 1)),
                     ("stride 2, shift only", conv_add_case((1, 2, 7, 5), (3, 2, 3, 3), 2, 0, residual=False)),
                     ("1x1, residual only", conv_add_case((2, 3, 3, 4), (2, 3, 1, 1), 1, 0, shift=False))],
    "F.conv_transpose2d": [("k2 s2", conv_case((1, 3, 3, 2), (3, 2, 2, 2), 2, 0, transpose=True)),
                           ("k4 s4", conv_case((2, 2, 2, 3), (2, 1, 4, 4), 4, 0, transpose=True)),
                           ("k3 s2 p1, batch 1", conv_case((1, 2, 3, 3), (2, 3, 3, 3), 2, 1, transpose=True)),
                           ("non-square k, no bias", conv_case((1, 2, 3, 4), (2, 2, 2, 3), 1, 0, bias=False,
                                                               transpose=True))],
    "F.max_pool2d": [("k2", pool_case(F.max_pool2d, (2, 2, 4, 6), 2)),
                     ("k3 s2 p1 odd", pool_case(F.max_pool2d, (1, 2, 5, 7), 3, 2, 1)),
                     ("non-square k, default stride", pool_case(F.max_pool2d, (1, 1, 4, 7), (2, 3))),
                     ("overlap s1", pool_case(F.max_pool2d, (1, 1, 4, 3), 2, 1))],
    "F.avg_pool2d": [("k2", pool_case(F.avg_pool2d, (2, 2, 4, 6), 2)),
                     ("k3 s2 p1 odd", pool_case(F.avg_pool2d, (1, 2, 5, 7), 3, 2, 1)),
                     ("non-square k, stride (1,2)", pool_case(F.avg_pool2d, (1, 1, 5, 6), (3, 2), (1, 2)))],
    "F.upsample_nearest2d": [("x2", unary(lambda x: F.upsample_nearest2d(x, 2), (1, 2, 3, 2))),
                             ("x3 non-square", unary(lambda x: F.upsample_nearest2d(x, scale_factor=3), (2, 1, 2, 3)))],
    "F.pad": [("last two axes", unary(lambda x: F.pad(x, (1, 2, 0, 1), value=0.5), (2, 3, 4))),
              ("last axis", unary(lambda x: F.pad(x, (2, 0)), (2, 3)))],
    "F.group_norm": [("affine", lambda rng: ((lambda x, w, b: F.group_norm(x, 2, w, b)),
                                             [rand(rng, 2, 4, 3, 3), rand(rng, 4), rand(rng, 4)])),
                     ("batch 1, odd, no affine", unary(lambda x: F.group_norm(x, 3), (1, 6, 3, 5))),
                     ("weight only, 3-D", lambda rng: ((lambda x, w: F.group_norm(x, 1, w)),
                                                       [rand(rng, 2, 3, 5), rand(rng, 3)]))],
    "F.group_norm_silu": [("affine", lambda rng: ((lambda x, w, b: F.group_norm_silu(x, 2, w, b)),
                                                  [rand(rng, 2, 4, 3, 3), rand(rng, 4), rand(rng, 4)])),
                          ("batch 1, odd, no affine", unary(lambda x: F.group_norm_silu(x * 2, 3), (1, 6, 3, 5))),
                          ("groups = C, 3-D, weight only", lambda rng: ((lambda x, w: F.group_norm_silu(x, 3, w)),
                                                                        [rand(rng, 2, 3, 5), rand(rng, 3)])),
                          ("one group, non-square, bias only", lambda rng: (
                              (lambda x, b: F.group_norm_silu(x, 1, None, b)), [rand(rng, 1, 3, 2, 5), rand(rng, 3)]))],
    "F.batch_norm": [("train, running stats", batch_norm_case((3, 2, 3, 2), training=True)),
                     ("train batch 1, no stats, no affine", batch_norm_case((1, 3, 2, 3), True, affine=False,
                                                                            stats=False)),
                     ("train (N, C)", batch_norm_case((4, 3), True)),
                     ("eval", batch_norm_case((2, 3, 3, 2), training=False))],
    "F.batch_norm_gelu": [("train, running stats", batch_norm_case((3, 2, 3, 2), True, gelu=True)),
                          ("train batch 1, no stats, no affine", batch_norm_case((1, 3, 2, 3), True, affine=False,
                                                                                 stats=False, gelu=True)),
                          ("train (N, C, L) odd", batch_norm_case((5, 3, 7), True, gelu=True)),
                          ("eval", batch_norm_case((2, 3, 3, 2), training=False, gelu=True))],
    "F.layer_norm": [("last axis, affine", lambda rng: ((lambda x, w, b: F.layer_norm(x, 5, w, b)),
                                                        [rand(rng, 3, 5), rand(rng, 5), rand(rng, 5)])),
                     ("last two axes", unary(lambda x: F.layer_norm(x, (3, 4)), (2, 3, 4)))],
    "F.dropout": [("p 0.3 train", unary(dropout_seeded, (4, 5))),
                  ("eval is identity", unary(lambda x: F.dropout(x, 0.5, training=False) * 2, (2, 3)))],
    "F.embedding": [("repeated indices", lambda rng: ((lambda w: F.embedding(np.array([[1, 4, 1], [0, 1, 2]]), w)),
                                                      [rand(rng, 5, 3)]))],
    # --- F: attention ----------------------------------------------------------------------------
    "F.scaled_dot_product_attention": [
        ("(B, heads, L, d), padding mask", attention_case((2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 3),
                                                          np.array([[0, 0, 1, 0, 1], [0, 1, 1, 1, 1]], bool))),
        ("(B, L, d), batch 1, no mask", attention_case((1, 4, 3), (1, 2, 3), (1, 2, 5), None))],
    # --- F: losses --------------------------------------------------------------------------------
    "F.mse_loss": [("mean", binary(F.mse_loss, (2, 3), (2, 3))),
                   ("sum", binary(lambda a, b: F.mse_loss(a, b, reduction="sum"), (3,), (3,))),
                   ("none", binary(lambda a, b: F.mse_loss(a, b, reduction="none"), (2, 2), (2, 2)))],
    "F.cross_entropy": [("mean", unary(lambda x: F.cross_entropy(x * 3, np.array([0, 4, 4, 2])), (4, 5))),
                        ("sum", unary(lambda x: F.cross_entropy(x, np.array([1, 0]), reduction="sum"), (2, 3))),
                        ("none", unary(lambda x: F.cross_entropy(x, np.array([2, 2, 0]), reduction="none"), (3, 3)))],
}


def rng_mask(*shape):
    return np.random.default_rng(1).random(shape) > 0.5


# The heavy ops that go through kernels.py, where the compiled kernels can take over
KERNEL_OPS = {"F.conv2d", "F.conv2d_add", "F.conv_transpose2d", "F.linear", "F.gelu", "F.batch_norm",
              "F.batch_norm_gelu", "F.group_norm", "F.group_norm_silu", "F.max_pool2d"}


# ---------------------------------------------------------------------------------------------
# What is not differentiable, with why. Everything else public must have a case above.

NON_DIFFERENTIABLE = {
    # Tensor: data access and bookkeeping
    "Tensor.__init__": "constructor",
    "Tensor.__repr__": "printing",
    "Tensor.__len__": "an int",
    "Tensor.shape": "metadata", "Tensor.dtype": "metadata", "Tensor.ndim": "metadata",
    "Tensor.device": "metadata", "Tensor.xp": "the array module",
    "Tensor.size": "an int", "Tensor.numel": "an int",
    "Tensor.numpy": "leaves the graph (a raw array)",
    "Tensor.item": "leaves the graph (a Python number)",
    "Tensor.detach": "cuts the graph on purpose (tests/test_autograd.py)",
    "Tensor.backward": "computes gradients, is not an op",
    # comparisons give boolean arrays, for masks and where()
    "Tensor.__gt__": "comparison", "Tensor.__lt__": "comparison",
    "Tensor.__ge__": "comparison", "Tensor.__le__": "comparison",
    # tinydiff.tensor: grad-mode switches and a raw-array helper
    "tensor.no_grad": "grad-mode context manager (tests/test_autograd.py)",
    "tensor.is_grad_enabled": "grad-mode query",
    "tensor.unbroadcast": "raw-array helper used by every backward (tests/test_autograd.py)",
    "tensor.Tensor": "the class itself",
}
# F.<op>_forward / F.<op>_backward are the raw-array halves of a heavy op: checked through F.<op>.


def _key(module_key, name, obj):
    """Name an op by where it is defined, so re-exports (F.cat is tensor.cat) count once. What
    tinydiff.tensor re-exports from shape_ops (cat, stack) is named as tensor's."""
    if inspect.isfunction(obj) or inspect.isclass(obj):
        if obj.__module__ in ("tinydiff.tensor", "tinydiff.shape_ops"):
            return f"tensor.{name}"
    return f"{module_key}.{name}"


def public_ops():
    """Every public callable of F and tinydiff.tensor, and every public method/operator/property
    of Tensor, as 'F.name', 'tensor.name', 'Tensor.name'."""
    ops = set()
    for module_key, module in (("F", F), ("tensor", tensor_module)):
        for name, obj in vars(module).items():
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if not getattr(obj, "__module__", "").startswith("tinydiff"):
                continue                          # e.g. something imported from numpy
            ops.add(_key(module_key, name, obj))
    for name, obj in vars(Tensor).items():
        public = not name.startswith("_") or (name.startswith("__") and name.endswith("__"))
        if public and (callable(obj) or isinstance(obj, property)):
            ops.add(f"Tensor.{name}")
    return ops


def differentiable_ops():
    ops = public_ops() - set(NON_DIFFERENTIABLE)
    halves = {op for op in ops for suffix in ("_forward", "_backward")
              if op.startswith("F.") and op.endswith(suffix) and op[: -len(suffix)] in ops}
    return ops - halves


def test_every_op_has_a_gradcheck():
    ops = differentiable_ops()
    missing = sorted(op for op in ops if not CASES.get(op))
    assert not missing, f"ops without a gradient check (add a case to CASES): {missing}"
    stale = sorted(set(CASES) - ops)
    assert not stale, f"CASES names ops that are not public ops any more: {stale}"
    print(f"{len(ops)} differentiable ops, {sum(map(len, CASES.values()))} gradient-check cases")


# Raw-array helpers of shape_ops.py (no Tensor in, no Tensor out)
SHAPE_OPS_HELPERS = {"unbroadcast", "check_broadcast", "axes", "restore_axes"}


def test_every_shape_op_is_reached_through_a_checked_name():
    """shape_ops.py holds the bodies of Tensor's shape and index methods. Each of its public
    functions must be re-exported by tinydiff.tensor (tensor.cat) or called by a Tensor method
    (Tensor.reshape -> shape_ops.reshape), and that name must have gradient-check cases."""
    ops = differentiable_ops()
    for name, fn in vars(shape_ops).items():
        if name.startswith("_") or not inspect.isfunction(fn) or name in SHAPE_OPS_HELPERS:
            continue
        callers = {f"Tensor.{m}" for m, obj in vars(Tensor).items()
                   if name in _called_names(obj)} & ops
        if getattr(tensor_module, name, None) is fn:
            callers.add(f"tensor.{name}")
        assert callers, f"shape_ops.{name} is neither re-exported by tinydiff.tensor nor called by a Tensor method"
        unchecked = sorted(c for c in callers if not CASES.get(c))
        assert not unchecked, f"shape_ops.{name} is reached through {unchecked}, which have no case"


def _called_names(obj):
    """The global and attribute names a method (or a property's getter) refers to."""
    fn = obj.fget if isinstance(obj, property) else obj
    return set(fn.__code__.co_names) if hasattr(fn, "__code__") else set()


def test_the_enumeration_sees_the_ops_of_the_issue():
    """Guard the guard: the enumeration must find the ops issue 2 lists."""
    listed = {"Tensor.__add__", "Tensor.__sub__", "Tensor.__mul__", "Tensor.__truediv__",
              "Tensor.__neg__", "Tensor.__pow__", "Tensor.exp", "Tensor.log", "Tensor.sqrt",
              "Tensor.abs", "Tensor.clip", "Tensor.maximum", "tensor.where", "Tensor.sum",
              "Tensor.mean", "Tensor.var", "Tensor.max", "Tensor.__matmul__", "Tensor.reshape",
              "Tensor.transpose", "Tensor.permute", "Tensor.__getitem__", "tensor.cat",
              "tensor.stack", "F.pad", "F.relu", "F.silu", "F.gelu", "F.sigmoid", "F.tanh",
              "F.softmax", "F.log_softmax", "F.linear", "F.conv2d", "F.conv_transpose2d",
              "F.max_pool2d", "F.avg_pool2d", "F.upsample_nearest2d", "F.group_norm",
              "F.batch_norm", "F.layer_norm", "F.dropout", "F.embedding", "F.mse_loss",
              "F.cross_entropy"}
    assert listed <= differentiable_ops(), sorted(listed - differentiable_ops())


# ---------------------------------------------------------------------------------------------
# The checks


@pytest.fixture
def kernels(request):
    """Run under the NumPy reference kernels, or the compiled ones where tinydiff._C has them."""
    name = request.param
    if name == "native":
        if not hasattr(backend.native, "conv2d_forward"):
            pytest.skip(f"native kernels not built: {backend.native_error or 'tinydiff._C has no conv2d_forward'}")
        probe = np.zeros((1, 1, 2, 2))
        try:
            backend.native.conv2d_forward(probe, probe, None, 1, 0)
        except (TypeError, ValueError, RuntimeError) as err:
            pytest.skip(f"native kernels do not take float64 ({err}); tests/ of the kernels check them")
    before = tinydiff.get_kernels()
    tinydiff.set_kernels(name)
    yield name
    try:
        tinydiff.set_kernels(before)
    except RuntimeError:              # 'native' asked for but not built: same as the reference
        tinydiff.set_kernels("numpy")


PARAMS = [pytest.param(op, label, make, k, id=f"{op}[{label}]-{k}")
          for op, cases in CASES.items() for label, make in cases
          for k in (("numpy", "native") if op in KERNEL_OPS else ("numpy",))]


@pytest.mark.parametrize("op, label, make, kernels", PARAMS, indirect=["kernels"])
def test_gradcheck(op, label, make, kernels):
    if "cuda" in label and not tinydiff.cuda_available():
        pytest.skip(f"no usable GPU: {tinydiff.cuda_available(reason=True)[1]}")
    rng = np.random.default_rng(zlib.crc32(f"{op}{label}".encode()))
    fn, inputs = make(rng)
    if op == "Tensor.float":           # the float32 forward rounds at ~1e-7: step 1e-3 (fn is linear)
        assert gradcheck(fn, inputs, eps=1e-3, atol=1e-3, rtol=1e-3)
    else:
        assert gradcheck(fn, inputs)


def test_gradcheck_catches_a_wrong_gradient():
    """The checker itself must be able to fail, naming the worst element."""
    def wrong_square(x):
        out = x._result(x.data ** 2, (x,), "wrong_square")

        def _backward():
            x._accumulate(out.grad * x.data)          # should be 2 x
        out._backward = _backward
        return out
    x = Tensor(np.array([[0.5, -1.0], [2.0, 1.5]]), requires_grad=True)
    with pytest.raises(AssertionError, match=r"input 0 \(shape \(2, 2\)\) element"):
        gradcheck(wrong_square, [x])


def test_gradcheck_catches_a_gradient_right_only_on_average():
    """A backward that spreads the right total evenly fails: gradcheck weighs outputs randomly."""
    def smeared(x):
        out = x._result(x.data * np.arange(1.0, 5.0), (x,), "smeared")

        def _backward():
            x._accumulate(np.full(x.shape, (out.grad * np.arange(1.0, 5.0)).mean()))
        out._backward = _backward
        return out
    with pytest.raises(AssertionError):
        gradcheck(smeared, [Tensor(np.ones(4), requires_grad=True)])


def test_gradcheck_refuses_float32():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(lambda x: x * 2, [Tensor(np.ones(3, dtype=np.float32), requires_grad=True)])


def test_gradcheck_perturbs_non_contiguous_inputs():
    """An input whose array is a transposed view must still be perturbed (not a copy of it)."""
    x = Tensor(np.random.default_rng(0).standard_normal((3, 4)).T, requires_grad=True)
    assert not x.data.flags.c_contiguous
    assert gradcheck(lambda x: (x * x).sum(axis=0), [x])
