"""PyTorch as the oracle: forward values and gradients of every op, on the same inputs.

Each case runs one function through tinydiff and through torch, on float64 copies of the same
arrays, then backpropagates the same random upstream gradient through both and compares the
gradient of every float input. tinydiff itself never imports torch; these tests skip without it.

Run:  python -m pytest tests/test_torch_oracle.py -q      (needs: pip install torch==2.13.0)
"""
import zlib

import numpy as np
import pytest

import tinydiff
from tinydiff import F, Tensor
from tinydiff import tensor as tensor_module

torch = pytest.importorskip("torch", reason="PyTorch is the oracle of these tests: pip install torch==2.13.0")
TF = torch.nn.functional

from test_gradcheck_ops import differentiable_ops  # noqa: E402  (the same enumeration of ops)


# ---------------------------------------------------------------------------------------------
# Inputs: make(rng) -> list of arrays; float arrays become tensors that require grad, integer
# and boolean arrays are passed as they are (indices, targets, masks).


def normal(*shapes):
    return lambda rng: [rng.standard_normal(s) for s in shapes]


def positive(*shapes):
    return lambda rng: [rng.uniform(0.5, 2.0, s) for s in shapes]


def th(a):
    """A NumPy array as a torch tensor (an array of indices or a mask stays as it is in kind)."""
    return torch.as_tensor(a)


T64 = torch.float64
PADDING = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 0, 0]], bool)   # True: a padded key (attention masks it)

# op -> [(label, make, tinydiff_fn, torch_fn)]; torch_fn None means the same function serves both
ORACLE = {
    "Tensor.__add__": [("(3,1,5)+(4,5)", normal((3, 1, 5), (4, 5)), lambda a, b: a + b, None)],
    "Tensor.__radd__": [("2+x", normal((2, 3)), lambda x: 2.0 + x, None),
                        ("ndarray+x", normal((2, 3)), lambda x: np.arange(3.0) + x,
                         lambda x: torch.arange(3.0, dtype=T64) + x)],
    "Tensor.__sub__": [("(4,1)-(1,3)", normal((4, 1), (1, 3)), lambda a, b: a - b, None)],
    "Tensor.__rsub__": [("1.5-x", normal((3,)), lambda x: 1.5 - x, None)],
    "Tensor.__mul__": [("(3,1,5)*(4,5)", normal((3, 1, 5), (4, 5)), lambda a, b: a * b, None)],
    "Tensor.__rmul__": [("3*x", normal((3,)), lambda x: 3.0 * x, None)],
    "Tensor.__truediv__": [("(2,3)/(3,)", lambda rng: normal((2, 3))(rng) + positive((3,))(rng),
                            lambda a, b: a / b, None)],
    "Tensor.__rtruediv__": [("2/x", positive((2, 3)), lambda x: 2.0 / x, None)],
    "Tensor.__neg__": [("-x", normal((2, 3)), lambda x: -x, None)],
    "Tensor.__pow__": [("x**2.5", positive((2, 3)), lambda x: x ** 2.5, None),
                       ("x**3", normal((2, 3)), lambda x: x ** 3, None),
                       ("x**-0.5", positive((4,)), lambda x: x ** -0.5, None)],
    "Tensor.__matmul__": [("broadcast (3,1,2,4)@(5,4,3)", normal((3, 1, 2, 4), (5, 4, 3)), lambda a, b: a @ b, None)],
    "Tensor.__rmatmul__": [("ndarray@x", normal((3, 4)), lambda x: np.ones((2, 3)) @ x,
                            lambda x: torch.ones(2, 3, dtype=T64) @ x)],
    "Tensor.__getitem__": [("slices", normal((3, 5)), lambda x: x[1:, ::2], None),
                           ("int array with repeats", lambda rng: normal((4, 3))(rng) + [np.array([3, 0, 3, 3])],
                            lambda x, i: x[i], lambda x, i: x[i]),
                           ("rows and columns", lambda rng: normal((3, 4))(rng) + [np.array([0, 2, 2]), np.array([1, 1, 3])],
                            lambda x, i, j: x[i, j], lambda x, i, j: x[i, j]),
                           ("slice and int array", lambda rng: normal((2, 5))(rng) + [np.array([4, 0, 4])],
                            lambda x, i: x[:, i], lambda x, i: x[:, i]),
                           ("boolean mask", lambda rng: normal((3, 2))(rng) + [np.array([True, False, True])],
                            lambda x, m: x[m], lambda x, m: x[m])],
    "Tensor.exp": [("", normal((2, 3)), lambda x: x.exp(), None)],
    "Tensor.log": [("", positive((2, 3)), lambda x: x.log(), None)],
    "Tensor.sqrt": [("", positive((2, 3)), lambda x: x.sqrt(), None)],
    "Tensor.abs": [("", normal((2, 3)), lambda x: x.abs(), None)],
    "Tensor.clip": [("", normal((4, 5)), lambda x: x.clip(-0.5, 0.7), None)],
    "Tensor.clamp": [("min only", normal((4, 5)), lambda x: x.clamp(min=0.1), None)],
    "Tensor.relu": [("", normal((3, 4)), lambda x: x.relu(), None)],
    "Tensor.sigmoid": [("", normal((3, 4)), lambda x: (x * 10).sigmoid(), None)],
    "Tensor.tanh": [("", normal((3, 4)), lambda x: (x * 3).tanh(), None)],
    "Tensor.maximum": [("broadcast", normal((3, 1, 5), (4, 5)), lambda a, b: a.maximum(b), None),
                       ("scalar", normal((3, 4)), lambda x: x.maximum(0.1),
                        lambda x: x.maximum(torch.tensor(0.1, dtype=T64)))],
    "Tensor.minimum": [("", normal((2, 3), (3,)), lambda a, b: a.minimum(b), None)],
    "Tensor.sum": [("all", normal((2, 3, 4)), lambda x: x.sum(), None),
                   ("axes (0,2) keepdims", normal((2, 3, 4)), lambda x: x.sum(axis=(0, 2), keepdims=True),
                    lambda x: x.sum(dim=(0, 2), keepdim=True))],
    "Tensor.mean": [("all", normal((2, 3, 4)), lambda x: x.mean(), None),
                    ("axis -1", normal((2, 3, 4)), lambda x: x.mean(axis=-1), lambda x: x.mean(dim=-1))],
    "Tensor.var": [("all, unbiased", normal((2, 3, 4)), lambda x: x.var(), None),
                   ("axis 1 keepdims, unbiased", normal((2, 3, 4)), lambda x: x.var(axis=1, keepdims=True),
                    lambda x: x.var(dim=1, keepdim=True)),
                   ("axes (0,2), correction 0", normal((2, 3, 4)), lambda x: x.var(axis=(0, 2), correction=0),
                    lambda x: x.var(dim=(0, 2), correction=0))],
    "Tensor.max": [("all", normal((3, 4)), lambda x: x.max(), None),
                   ("axis 1", normal((2, 3, 4)), lambda x: x.max(axis=1), lambda x: x.max(dim=1).values),
                   ("axis -1 keepdims", normal((2, 3, 4)), lambda x: x.max(axis=-1, keepdims=True),
                    lambda x: x.max(dim=-1, keepdim=True).values),
                   ("all keepdims", normal((2, 3)), lambda x: x.max(keepdims=True),
                    lambda x: x.amax(dim=(0, 1), keepdim=True))],
    "Tensor.reshape": [("", normal((2, 3, 4)), lambda x: x.reshape(4, -1), None)],
    "Tensor.view": [("", normal((6,)), lambda x: x.view(2, 3), None)],
    "Tensor.flatten": [("start 1", normal((2, 3, 4)), lambda x: x.flatten(1), None)],
    "Tensor.squeeze": [("", normal((2, 1, 3)), lambda x: x.squeeze(1), None)],
    "Tensor.unsqueeze": [("", normal((2, 3)), lambda x: x.unsqueeze(-1), None)],
    "Tensor.permute": [("", normal((2, 3, 4)), lambda x: x.permute(2, 0, -2), None)],
    "Tensor.transpose": [("", normal((2, 3, 4)), lambda x: x.transpose(-1, 0), None)],
    "Tensor.T": [("", normal((3, 4)), lambda x: x.T, None)],
    "Tensor.expand": [("", normal((3, 1)), lambda x: x.expand(2, 3, 4), None)],
    "Tensor.astype": [("", normal((2, 3)), lambda x: x.astype(np.float32), lambda x: x.to(torch.float32))],
    "Tensor.float": [("", normal((2, 3)), lambda x: x.float(), None)],
    "Tensor.double": [("", normal((2, 3)), lambda x: x.float().double(), None)],
    "Tensor.to": [("cpu", normal((2, 3)), lambda x: x.to("cpu") * 2, None)],
    "tensor.where": [("broadcast", lambda rng: normal((3, 1, 5), (4, 5))(rng) + [rng.random((4, 5)) > 0.5],
                      lambda a, b, m: tinydiff.where(m, a, b), lambda a, b, m: torch.where(m, a, b)),
                     ("scalar a", lambda rng: normal((3, 4))(rng) + [rng.random((3, 4)) > 0.5],
                      lambda x, m: F.where(m, 0.0, x), lambda x, m: torch.where(m, 0.0, x))],
    "tensor.maximum": [("", normal((2, 3), (2, 3)), tensor_module.maximum, torch.maximum)],
    "tensor.matmul": [("batched", normal((2, 2, 3), (2, 3, 4)), tinydiff.matmul, torch.matmul)],
    "tensor.cat": [("dim -1", normal((2, 2, 1), (2, 2, 3)), lambda a, b: F.cat([a, b], dim=-1),
                    lambda a, b: torch.cat([a, b], dim=-1))],
    "tensor.stack": [("dim 1", normal((2, 3), (2, 3)), lambda a, b: tinydiff.stack([a, b], dim=1),
                      lambda a, b: torch.stack([a, b], dim=1))],
    "tensor.exp": [("", normal((3,)), tensor_module.exp, torch.exp)],
    "tensor.log": [("", positive((3,)), tensor_module.log, torch.log)],
    "tensor.sqrt": [("", positive((3,)), tensor_module.sqrt, torch.sqrt)],
    "F.relu": [("", normal((3, 4)), F.relu, TF.relu)],
    "F.sigmoid": [("", normal((3, 4)), lambda x: F.sigmoid(x * 30), lambda x: torch.sigmoid(x * 30))],
    "F.tanh": [("", normal((3, 4)), F.tanh, torch.tanh)],
    "F.silu": [("", normal((3, 4)), lambda x: F.silu(x * 10), lambda x: TF.silu(x * 10))],
    "F.gelu": [("exact erf form, |x| up to 12", normal((4, 6)), lambda x: F.gelu(x * 4), lambda x: TF.gelu(x * 4))],
    "F.softmax": [("dim 1", normal((2, 3, 4)), lambda x: F.softmax(x * 5, dim=1), lambda x: TF.softmax(x * 5, dim=1))],
    "F.log_softmax": [("dim -1", normal((3, 5)), lambda x: F.log_softmax(x * 5, dim=-1),
                       lambda x: TF.log_softmax(x * 5, dim=-1))],
    "F.linear": [("with bias", normal((2, 5, 3), (4, 3), (4,)), F.linear, TF.linear),
                 ("no bias", normal((2, 3), (4, 3)), F.linear, TF.linear)],
    "F.conv2d": [(f"x{x} w{w} s{s} p{p}", normal(x, w, (w[0],)),
                  lambda a, b, c, s=s, p=p: F.conv2d(a, b, c, stride=s, padding=p),
                  lambda a, b, c, s=s, p=p: TF.conv2d(a, b, c, stride=s, padding=p))
                 for x, w, s, p in [((2, 3, 6, 6), (4, 3, 3, 3), 1, 1), ((1, 2, 7, 5), (3, 2, 3, 3), 2, 0),
                                    ((1, 2, 5, 8), (2, 2, 2, 3), 2, 1), ((2, 1, 9, 7), (2, 1, 3, 3), 3, 2),
                                    ((1, 3, 4, 4), (2, 3, 1, 1), 1, 0)]],
    "F.conv2d_add": [(f"x{x} w{w} s{s} p{p}", normal(x, w, (w[0],), (x[0], w[0]), out),
                      lambda a, b, c, d, e, s=s, p=p: F.conv2d_add(a, b, c, s, p, shift=d, residual=e),
                      lambda a, b, c, d, e, s=s, p=p: TF.conv2d(a, b, c, stride=s, padding=p) + d[:, :, None, None] + e)
                     for x, w, s, p, out in [((2, 3, 6, 6), (4, 3, 3, 3), 1, 1, (2, 4, 6, 6)),
                                             ((1, 2, 7, 5), (3, 2, 3, 3), 2, 0, (1, 3, 3, 2)),
                                             ((2, 3, 4, 4), (2, 3, 1, 1), 1, 0, (2, 2, 4, 4))]],
    "F.conv_transpose2d": [(f"x{x} w{w} s{s} p{p}", normal(x, w, (w[1],)),
                            lambda a, b, c, s=s, p=p: F.conv_transpose2d(a, b, c, stride=s, padding=p),
                            lambda a, b, c, s=s, p=p: TF.conv_transpose2d(a, b, c, stride=s, padding=p))
                           for x, w, s, p in [((1, 3, 3, 2), (3, 2, 2, 2), 2, 0), ((2, 2, 2, 3), (2, 1, 4, 4), 4, 0),
                                              ((1, 2, 3, 3), (2, 3, 3, 3), 2, 1), ((1, 2, 3, 4), (2, 2, 2, 3), 1, 0),
                                              ((2, 2, 4, 3), (2, 2, 4, 4), 2, 1)]],
    "F.max_pool2d": [(f"x{x} k{k} s{s} p{p}", normal(x), lambda a, k=k, s=s, p=p: F.max_pool2d(a, k, s, p),
                      lambda a, k=k, s=s, p=p: TF.max_pool2d(a, k, s, p))
                     for x, k, s, p in [((2, 2, 4, 6), 2, None, 0), ((1, 2, 5, 7), 3, 2, 1),
                                        ((1, 1, 4, 7), (2, 3), None, 0), ((1, 1, 5, 6), (3, 2), (1, 2), 1)]],
    "F.avg_pool2d": [(f"x{x} k{k} s{s} p{p}", normal(x), lambda a, k=k, s=s, p=p: F.avg_pool2d(a, k, s, p),
                      lambda a, k=k, s=s, p=p: TF.avg_pool2d(a, k, s, p))
                     for x, k, s, p in [((2, 2, 4, 6), 2, None, 0), ((1, 2, 5, 7), 3, 2, 1),
                                        ((1, 1, 4, 7), (2, 3), None, 0), ((1, 1, 5, 6), (3, 2), (1, 2), 1)]],
    "F.upsample_nearest2d": [(f"x{s}", normal((2, 3, 2, 3)), lambda x, s=s: F.upsample_nearest2d(x, s),
                              lambda x, s=s: TF.interpolate(x, scale_factor=s, mode="nearest")) for s in (2, 3)],
    "F.pad": [("last two axes, value 0.5", normal((2, 3, 4)), lambda x: F.pad(x, (1, 2, 0, 3), value=0.5),
               lambda x: TF.pad(x, (1, 2, 0, 3), value=0.5)),
              ("torch's positional order", normal((2, 3)), lambda x: F.pad(x, (2, 1), "constant", -1.0),
               lambda x: TF.pad(x, (2, 1), "constant", -1.0))],
    "F.group_norm": [("affine", normal((2, 6, 3, 5), (6,), (6,)), lambda x, w, b: F.group_norm(x, 3, w, b),
                      lambda x, w, b: TF.group_norm(x, 3, w, b)),
                     ("no affine, batch 1", normal((1, 4, 3, 3)), lambda x: F.group_norm(x, 2),
                      lambda x: TF.group_norm(x, 2)),
                     ("weight only, 3-D", normal((2, 4, 5), (4,)), lambda x, w: F.group_norm(x, 4, w),
                      lambda x, w: TF.group_norm(x, 4, w)),
                     ("bias only", normal((2, 4, 2, 2), (4,)), lambda x, b: F.group_norm(x, 1, None, b),
                      lambda x, b: TF.group_norm(x, 1) + b.view(1, -1, 1, 1))],   # torch's CPU kernel refuses bias only
    "F.group_norm_silu": [("affine", normal((2, 6, 3, 5), (6,), (6,)), lambda x, w, b: F.group_norm_silu(x, 3, w, b),
                           lambda x, w, b: TF.silu(TF.group_norm(x, 3, w, b))),
                          ("batch 1, groups = C, odd", normal((1, 5, 3, 7), (5,), (5,)),
                           lambda x, w, b: F.group_norm_silu(x, 5, w, b),
                           lambda x, w, b: TF.silu(TF.group_norm(x, 5, w, b))),
                          ("no affine, one group, 3-D", normal((3, 4, 5)), lambda x: F.group_norm_silu(x, 1),
                           lambda x: TF.silu(TF.group_norm(x, 1)))],
    # batch_norm, with its running statistics, has its own test below
    "F.batch_norm": [("train, no running stats", normal((3, 2, 3, 2), (2,), (2,)),
                      lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
                      lambda x, w, b: TF.batch_norm(x, None, None, w, b, training=True))],
    "F.batch_norm_gelu": [("train, affine", normal((3, 2, 3, 2), (2,), (2,)),
                           lambda x, w, b: F.batch_norm_gelu(x, None, None, w, b, training=True),
                           lambda x, w, b: TF.gelu(TF.batch_norm(x, None, None, w, b, training=True))),
                          ("train batch 1, odd, no affine", normal((1, 3, 5, 3)),
                           lambda x: F.batch_norm_gelu(x, None, None, training=True),
                           lambda x: TF.gelu(TF.batch_norm(x, None, None, training=True)))],
    "F.layer_norm": [("last axis, affine", normal((3, 5), (5,), (5,)), lambda x, w, b: F.layer_norm(x, 5, w, b),
                      lambda x, w, b: TF.layer_norm(x, (5,), w, b)),
                     ("last two axes", normal((2, 3, 4)), lambda x: F.layer_norm(x, (3, 4)),
                      lambda x: TF.layer_norm(x, (3, 4)))],
    "F.scaled_dot_product_attention": [
        ("heads, padding mask", lambda rng: normal((2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 2))(rng) + [PADDING],
         lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, key_padding_mask=m),
         lambda q, k, v, m: TF.scaled_dot_product_attention(q, k, v, attn_mask=~m[:, None, None, :])),
        ("(B, L, d), no mask", normal((3, 2, 4), (3, 5, 4), (3, 5, 4)),
         F.scaled_dot_product_attention, TF.scaled_dot_product_attention)],
    "F.dropout": [("eval", normal((3, 4)), lambda x: F.dropout(x, 0.5, training=False),
                   lambda x: TF.dropout(x, 0.5, training=False)),
                  ("p 0", normal((3, 4)), lambda x: F.dropout(x, 0.0), lambda x: TF.dropout(x, 0.0))],
    "F.embedding": [("repeated indices", lambda rng: [np.array([[1, 4, 1], [0, 1, 2]]), rng.standard_normal((5, 3))],
                     F.embedding, TF.embedding)],
    "F.mse_loss": [(r, normal((2, 3), (2, 3)), lambda a, b, r=r: F.mse_loss(a, b, reduction=r),
                    lambda a, b, r=r: TF.mse_loss(a, b, reduction=r)) for r in ("mean", "sum", "none")],
    "F.cross_entropy": [(r, lambda rng: [rng.standard_normal((4, 5)) * 3, np.array([0, 4, 4, 2])],
                         lambda x, t, r=r: F.cross_entropy(x, t, reduction=r),
                         lambda x, t, r=r: TF.cross_entropy(x, t, reduction=r)) for r in ("mean", "sum", "none")],
}


def compare(make, td_fn, th_fn, seed, dtype=np.float64, atol=1e-10, rtol=1e-8):
    """Run both, compare values, backpropagate the same upstream gradient, compare gradients."""
    rng = np.random.default_rng(seed)
    arrays = [a.astype(dtype) if a.dtype.kind == "f" else a for a in make(rng)]
    td_in = [Tensor(a.copy(), requires_grad=True) if a.dtype.kind == "f" else a for a in arrays]
    th_in = [torch.tensor(a, requires_grad=True) if a.dtype.kind == "f" else th(a) for a in arrays]
    out, ref = td_fn(*td_in), (th_fn or td_fn)(*th_in)
    assert out.shape == tuple(ref.shape), f"shape {out.shape} != torch's {tuple(ref.shape)}"
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), atol=atol, rtol=rtol, err_msg="forward")
    upstream = rng.standard_normal(out.shape).astype(out.dtype)
    out.backward(upstream)
    ref.backward(torch.from_numpy(upstream))
    for i, (t, r) in enumerate(zip(td_in, th_in)):
        if isinstance(t, Tensor):
            ours = np.zeros(t.shape) if t.grad is None else t.grad
            theirs = np.zeros(t.shape) if r.grad is None else r.grad.numpy()
            np.testing.assert_allclose(ours, theirs, atol=atol, rtol=rtol, err_msg=f"gradient of input {i}")


CASES = [pytest.param(op, make, td_fn, th_fn, id=f"{op}[{label}]")
         for op, cases in ORACLE.items() for label, make, td_fn, th_fn in cases]


@pytest.mark.parametrize("op, make, td_fn, th_fn", CASES)
def test_matches_torch_float64(op, make, td_fn, th_fn):
    compare(make, td_fn, th_fn, seed=zlib.crc32(op.encode()))


# float32, the dtype of training: the same code must stay accurate at single precision
FLOAT32 = ["F.conv2d", "F.conv2d_add", "F.conv_transpose2d", "F.gelu", "F.batch_norm_gelu", "F.group_norm",
           "F.group_norm_silu", "F.layer_norm", "F.softmax", "F.scaled_dot_product_attention",
           "F.log_softmax", "F.cross_entropy", "F.silu", "Tensor.sigmoid", "Tensor.var", "F.avg_pool2d"]


@pytest.mark.parametrize("op, make, td_fn, th_fn", [c for c in CASES if c.values[0] in FLOAT32])
def test_matches_torch_float32(op, make, td_fn, th_fn):
    compare(make, td_fn, th_fn, seed=zlib.crc32(op.encode()), dtype=np.float32, atol=2e-5, rtol=2e-4)


# Ops that have no meaningful torch twin here, with why
NO_ORACLE = {}


def test_every_op_has_a_torch_comparison():
    missing = sorted(op for op in differentiable_ops() - set(NO_ORACLE) if not ORACLE.get(op))
    assert not missing, f"ops not compared with torch (add a case to ORACLE): {missing}"


# ---------------------------------------------------------------------------------------------
# Ops with state or randomness


@pytest.mark.parametrize("shape", [(4, 3, 2, 5), (1, 2, 3, 3), (6, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_train_then_eval_matches_torch(shape, affine):
    """Training: batch statistics, running mean/var updated (unbiased var); eval: running stats."""
    rng = np.random.default_rng(7)
    c = shape[1]
    x = rng.standard_normal(shape) * 2 + 1
    w, b = rng.standard_normal(c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    ours = dict(rm=Tensor(rm.copy()), rv=Tensor(rv.copy()))
    theirs = dict(rm=torch.tensor(rm), rv=torch.tensor(rv))
    for training in (True, True, False):                     # two updates, then use them
        upstream = rng.standard_normal(shape)
        tx, tw, tb = (Tensor(a.copy(), requires_grad=True) for a in (x, w, b))
        px, pw, pb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
        out = F.batch_norm(tx, ours["rm"], ours["rv"], tw if affine else None, tb if affine else None,
                           training=training, momentum=0.2, eps=1e-4)
        ref = TF.batch_norm(px, theirs["rm"], theirs["rv"], pw if affine else None, pb if affine else None,
                            training=training, momentum=0.2, eps=1e-4)
        np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), atol=1e-10, rtol=1e-8)
        np.testing.assert_allclose(ours["rm"].numpy(), theirs["rm"].numpy(), atol=1e-12, rtol=1e-10)
        np.testing.assert_allclose(ours["rv"].numpy(), theirs["rv"].numpy(), atol=1e-12, rtol=1e-10)
        out.backward(upstream)
        ref.backward(torch.from_numpy(upstream))
        pairs = [(tx, px)] + ([(tw, pw), (tb, pb)] if affine else [])
        for t, r in pairs:
            np.testing.assert_allclose(t.grad, r.grad.numpy(), atol=1e-10, rtol=1e-8)
        x = x + 0.5                                           # a different batch next time


def test_dropout_matches_torch_given_the_same_mask():
    """The masks are random on both sides; given tinydiff's mask, torch's formula x * m / (1-p)
    must give the same values and gradients."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 9))
    tinydiff.manual_seed(1)
    tx = Tensor(x.copy(), requires_grad=True)
    out = F.dropout(tx, p=0.3)
    mask = torch.tensor(out.numpy() != 0)
    px = torch.tensor(x, requires_grad=True)
    ref = px * mask / (1 - 0.3)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-12)
    upstream = rng.standard_normal(x.shape)
    out.backward(upstream)
    ref.backward(torch.from_numpy(upstream))
    np.testing.assert_allclose(tx.grad, px.grad.numpy(), rtol=1e-12)


def test_gelu_is_the_exact_erf_form_not_the_tanh_approximation():
    x = np.linspace(-8, 8, 2001)
    ours = F.gelu(Tensor(x)).numpy()
    np.testing.assert_allclose(ours, TF.gelu(torch.tensor(x)).numpy(), atol=1e-14, rtol=1e-13)
    tanh_form = TF.gelu(torch.tensor(x), approximate="tanh").numpy()
    assert np.abs(ours - tanh_form).max() > 1e-4               # the two differ where it matters
