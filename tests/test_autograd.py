"""The Tensor and its backward(): what a gradient is, when it accumulates, when it is refused.

Run:  python -m pytest tests/test_autograd.py -q
"""
import gc
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

import tinydiff
from tinydiff import F, Tensor, backend, no_grad
from tinydiff.tensor import unbroadcast

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The Tensor itself


def test_attributes():
    x = Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    assert x.shape == (2, 3) and x.ndim == 2 and len(x) == 2
    assert x.size() == 6 and x.size(1) == 3 and x.numel() == 6
    assert x.device == "cpu" and x.xp is np and x.grad is None
    assert isinstance(x.data, np.ndarray)
    np.testing.assert_array_equal(x.numpy(), np.arange(6.0).reshape(2, 3))
    assert Tensor([[2.5]]).item() == 2.5
    with pytest.raises(ValueError, match="one element"):
        x.item()
    assert "requires_grad=True" in repr(x) and "cpu" in repr(x)


def test_float32_by_default():
    assert Tensor([1, 2, 3]).dtype == np.float32
    assert Tensor(2.0).dtype == np.float32
    assert Tensor(np.float64(2.0)).dtype == np.float64             # a NumPy scalar keeps its dtype
    assert Tensor(np.ones(2)).dtype == np.float64                  # an array keeps its dtype
    assert Tensor(np.ones(2), dtype=np.float32).dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept_through_every_kind_of_op(dtype):
    """Python numbers take the tensor's dtype: nothing drifts to float64 (or down to float32)."""
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 4, 5, 5)).astype(dtype), requires_grad=True)
    w = Tensor(rng.standard_normal((4, 4, 3, 3)).astype(dtype), requires_grad=True)
    wt = Tensor(rng.standard_normal((4, 2, 2, 2)).astype(dtype), requires_grad=True)
    g = Tensor(np.ones(4, dtype=dtype), requires_grad=True)
    h = F.conv2d(x, w, None, stride=1, padding=1)
    h = F.group_norm(h, 2, g, g * 0.0)
    h = F.gelu(h) + F.silu(h) * 0.5 - h.sigmoid() / 3 + h.tanh() ** 2
    h = F.max_pool2d(h, 2) + F.avg_pool2d(h, 2)
    h = F.conv_transpose2d(h, wt, None, stride=2)
    h = F.upsample_nearest2d(F.pad(h, (1, 1, 1, 1)), 2)
    h = F.batch_norm(h, None, None, training=True)
    h = F.softmax(h.reshape(2, -1), dim=-1) + F.log_softmax(h.reshape(2, -1)).exp()
    h = h.abs().sqrt().clip(0, 10).maximum(0.001).log() @ Tensor(np.ones((h.shape[1], 3), dtype=dtype))
    loss = F.cross_entropy(h, np.array([0, 2])) + F.mse_loss(h, h.detach() + 1) + h.var() + h.max()
    assert loss.dtype == dtype
    loss.backward()
    for t in (x, w, wt, g):
        assert t.grad.dtype == dtype and np.isfinite(t.grad).all()


def test_integer_tensor_times_a_fraction_is_not_rounded():
    t = Tensor(np.array([1, 2, 3]))
    np.testing.assert_allclose((t * 0.5).numpy(), [0.5, 1.0, 1.5])
    np.testing.assert_allclose((t / 10).numpy(), [0.1, 0.2, 0.3])


def test_numpy_values_on_the_left_give_tensors():
    """ndarray * Tensor must go to Tensor.__rmul__, not make an object array of Tensors."""
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    for y in (np.array([2.0, 2.0, 2.0]) * x, np.float64(2.0) * x, np.ones((3, 3)) @ x.reshape(3, 1)):
        assert isinstance(y, Tensor) and y.requires_grad
    (np.array([1.0, 2.0, 3.0]) * x).sum().backward()
    np.testing.assert_array_equal(x.grad, [1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------------------------
# backward(): seeds, accumulation, refusals


def test_backward_of_a_scalar_seeds_one():
    x = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 4.0, 6.0])      # d(sum x^2)/dx = 2x


def test_backward_of_a_non_scalar_needs_a_gradient():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    y = x * 3
    with pytest.raises(RuntimeError, match=r"scalar.*\(2, 3\)"):
        y.backward()
    y.backward(np.full((2, 3), 2.0))
    np.testing.assert_array_equal(x.grad, np.full((2, 3), 6.0))
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 3\)"):
        (x * 3).backward(np.ones(3))


def test_backward_on_a_tensor_without_grad_raises():
    with pytest.raises(RuntimeError, match="does not require grad"):
        (Tensor(np.ones(2)) * 2).sum().backward()


def test_gradients_accumulate_across_backward_calls():
    x = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    (x * 3).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad, [3 + 2, 3 - 4])
    x.grad = None                                               # how an optimizer's zero_grad forgets
    (x * 3).sum().backward()
    np.testing.assert_array_equal(x.grad, [3, 3])


def test_the_same_graph_can_be_run_backward_twice_with_retain_graph():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    loss = (x.exp() * x).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    np.testing.assert_allclose(x.grad, 2 * (np.exp([1.0, 2.0]) * (1 + np.array([1.0, 2.0]))))


def test_backward_frees_the_graph_and_a_second_backward_raises():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    hidden = x.exp()
    loss = (hidden * x).sum()
    loss.backward()
    assert hidden._backward is None and hidden._parents == ()   # saved arrays released
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_a_tensor_used_twice_gets_both_contributions():
    """Diamond graph: y feeds z twice; y's grad must be complete before y's backward runs."""
    x = Tensor(np.array([0.5, 1.5]), requires_grad=True)
    y = x * 2
    z = (y * y + y.exp() + y).sum()                             # dz/dx = 2 (2y + e^y + 1)
    z.backward()
    y_ = 2 * np.array([0.5, 1.5])
    np.testing.assert_allclose(x.grad, 2 * (2 * y_ + np.exp(y_) + 1))


def test_backward_on_a_leaf_accumulates_the_seed():
    x = Tensor(np.array(3.0), requires_grad=True)
    x.backward()
    x.backward()
    assert x.grad == 2.0


def test_intermediate_grads_are_freed_leaf_grads_kept():
    x = Tensor(np.ones(3), requires_grad=True)
    y = x * 2
    y.sum().backward()
    assert y.grad is None and x.grad is not None


def test_leaf_grads_are_their_own_writable_arrays():
    """a + b hands the same upstream array to a and b, and sum's backward is a broadcast view:
    each leaf must still own a plain array that an optimizer may change in place."""
    a = Tensor(np.ones(3), requires_grad=True)
    b = Tensor(np.ones(3), requires_grad=True)
    (a + b).sum().backward()
    assert a.grad is not b.grad and a.grad.flags.writeable and b.grad.flags.writeable
    a.grad *= 5
    np.testing.assert_array_equal(b.grad, [1.0, 1.0, 1.0])


def test_gradient_takes_the_leaf_dtype():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    (x * np.ones(3)).sum().backward()                           # a float64 array joins in
    assert x.grad.dtype == np.float32
    y = Tensor(np.ones(2, dtype=np.float32), requires_grad=True)
    y.double().sum().backward()
    assert y.grad.dtype == np.float32


def test_requires_grad_propagates_only_from_parents_that_need_it():
    a, b = Tensor(np.ones(2)), Tensor(np.ones(2), requires_grad=True)
    assert not (a * 2).requires_grad and (a * b).requires_grad
    (a * b).sum().backward()
    assert a.grad is None and b.grad is not None


# ---------------------------------------------------------------------------------------------
# Depth: the topological sort is iterative


def test_deep_graph_beyond_the_recursion_limit():
    depth = 20000
    assert depth > 10 * sys.getrecursionlimit()
    x = Tensor(np.array([0.3, -0.2]), requires_grad=True)
    y = x
    for _ in range(depth):
        y = y * 1.0001 + 0.0                                    # two ops per step: 40000 nodes
    y.sum().backward()
    np.testing.assert_allclose(x.grad, np.full(2, 1.0001 ** depth), rtol=1e-5)
    del y
    gc.collect()                                                # freeing the chain must not recurse


def test_deep_and_wide_graph_orders_every_node_after_its_parents():
    """A residual chain: each step adds the previous two, so nodes are reached along many paths."""
    x = Tensor(np.array(1.0), requires_grad=True)
    a, b = x, x * 1.0
    for _ in range(3000):
        a, b = b, (a + b) * 0.5
    b.backward()
    # b_n = (b_{n-1} + b_{n-2}) / 2 with b_0 = b_1 = x: every b is exactly x, so db/dx = 1
    np.testing.assert_allclose(x.grad, 1.0, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# no_grad and detach


def test_no_grad_builds_no_graph_and_restores_the_mode():
    x = Tensor(np.ones(2), requires_grad=True)
    with no_grad():
        assert not tinydiff.is_grad_enabled()
        y = x * 2 + 1
        assert not y.requires_grad and y._parents == ()
    assert tinydiff.is_grad_enabled() and (x * 2).requires_grad
    with pytest.raises(KeyError):
        with no_grad():
            raise KeyError("the mode must come back after an exception")
    assert tinydiff.is_grad_enabled()
    with no_grad():
        with no_grad():
            pass
        assert not tinydiff.is_grad_enabled()                   # nested: the outer one still holds
    assert tinydiff.is_grad_enabled()


def test_no_grad_as_a_decorator():
    @no_grad()
    def sample(x):
        """Draw."""
        return x * 2

    y = sample(Tensor(np.ones(2), requires_grad=True))
    assert not y.requires_grad and sample.__name__ == "sample" and sample.__doc__ == "Draw."
    assert tinydiff.is_grad_enabled()


def test_detach_shares_values_and_stops_gradients():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    d = x.detach()
    assert not d.requires_grad and d.data is x.data
    (x * d).sum().backward()                                    # d is a constant: grad = d
    np.testing.assert_array_equal(x.grad, [1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# Broadcasting and a few op semantics a learner might trip on


@pytest.mark.parametrize("grad_shape, shape", [((3, 4, 5), (3, 1, 5)), ((3, 4, 5), (4, 5)), ((2, 3), ()),
                                               ((2, 3), (2, 1)), ((2, 3), (2, 3)), ((6, 1, 2), (1, 1)),
                                               ((4, 3, 5, 2), (4, 3, 1, 1)), ((4, 3, 5, 2), (3, 1, 1)),
                                               ((2, 3, 4), (2, 3, 1)), ((2, 3, 4), (1, 3, 1))])
def test_unbroadcast_sums_back_to_the_shape(grad_shape, shape):
    grad = np.random.default_rng(0).standard_normal(grad_shape)
    out = unbroadcast(grad, shape)
    assert out.shape == shape
    # summing the gradient back is the adjoint of broadcasting: <unbroadcast(g), v> = <g, broadcast(v)>
    v = np.random.default_rng(1).standard_normal(shape)
    np.testing.assert_allclose((out * v).sum(), (grad * np.broadcast_to(v, grad_shape)).sum())


@pytest.mark.parametrize("grad_shape, shape", [((4, 3, 5, 2), (4, 3, 1, 1)), ((7, 5, 3), (7, 1, 1)),
                                               ((2, 3, 4), (2, 3, 1)), ((0, 3, 2), (0, 3, 1)), ((3, 1, 2), (3, 1, 1))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unbroadcast_over_trailing_axes_equals_numpy_sum(grad_shape, shape, dtype):
    # the trailing-axes path (a matrix-vector product) against NumPy's own sum, on strided input too
    grad = np.random.default_rng(0).standard_normal(grad_shape).astype(dtype)
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad_shape[i] != 1)
    for g in (grad, np.asfortranarray(grad)):
        out = unbroadcast(g, shape)
        assert out.shape == shape and out.dtype == dtype
        np.testing.assert_allclose(out, g.sum(axis=axes, keepdims=True), rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_getitem_adds_repeated_indices():
    x = Tensor(np.zeros(3), requires_grad=True)
    x[np.array([0, 2, 0, 0])].sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 0.0, 1.0])
    x.grad = None
    x[Tensor(np.array([1, 1]))].sum().backward()                # a Tensor of indices works too
    np.testing.assert_array_equal(x.grad, [0.0, 2.0, 0.0])


def test_max_sends_the_gradient_to_the_first_maximum_as_torch_max_dim():
    x = Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]]), requires_grad=True)
    x.max(axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad, [[0, 1, 0], [1, 0, 0]])


def test_batch_norm_updates_running_statistics_in_place():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((4, 3, 2, 2)))
    rm, rv = Tensor(np.zeros(3)), Tensor(np.ones(3))
    F.batch_norm(x, rm, rv, training=True, momentum=0.1)
    mean = x.numpy().mean(axis=(0, 2, 3))
    var = x.numpy().var(axis=(0, 2, 3), ddof=1)                 # running var is unbiased, as torch
    np.testing.assert_allclose(rm.numpy(), 0.1 * mean)
    np.testing.assert_allclose(rv.numpy(), 0.9 + 0.1 * var)
    before = rm.numpy().copy()
    F.batch_norm(x, rm, rv, training=False)
    np.testing.assert_array_equal(rm.numpy(), before)           # eval leaves them alone


def test_dropout_keeps_expectation_and_is_reproducible():
    x = Tensor(np.ones((200, 200)))
    tinydiff.manual_seed(3)
    a = F.dropout(x, 0.25).numpy()
    tinydiff.manual_seed(3)
    b = F.dropout(x, 0.25).numpy()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.unique(a), [0.0, 1 / 0.75])   # dropped, or scaled by 1/(1-p)
    assert abs(a.mean() - 1.0) < 0.02 and abs((a == 0).mean() - 0.25) < 0.02
    assert F.dropout(x, 0.5, training=False) is x


# ---------------------------------------------------------------------------------------------
# Devices and imports


def _forget_cupy(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_cupy_error", None)


def test_to_cuda_without_cupy_says_cupy_is_missing(monkeypatch):
    _forget_cupy(monkeypatch)
    monkeypatch.setitem(sys.modules, "cupy", None)              # import cupy -> ImportError
    with pytest.raises(RuntimeError, match=r"cuda.*CuPy is not installed.*pip install"):
        Tensor(np.ones(2)).to("cuda")


def test_to_cuda_without_a_gpu_says_the_gpu_is_missing(monkeypatch):
    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device))
    _forget_cupy(monkeypatch)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(RuntimeError, match=r"CuPy is installed but no CUDA GPU is usable.*no CUDA-capable"):
        Tensor(np.ones(2)).to("cuda")


def test_to_an_unknown_device_raises():
    with pytest.raises(ValueError, match="'tpu'"):
        Tensor(np.ones(2)).to("tpu")


def test_to_cpu_is_the_tensor_itself():
    x = Tensor(np.ones(2))
    assert x.to("cpu") is x


def test_to_cuda_and_back_carries_values_and_gradients():
    ok, why = tinydiff.cuda_available(reason=True)
    if not backend._load_cupy():
        pytest.skip(f"no usable GPU: {why}")
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = x.to("cuda")
    assert y.device == "cuda" and y.xp is not np
    (y * y).sum().backward()
    assert isinstance(x.grad, np.ndarray)
    np.testing.assert_array_equal(x.grad, [2.0, 4.0])


def test_import_tinydiff_imports_neither_cupy_nor_torch():
    code = ("import sys, tinydiff, tinydiff.functional, tinydiff.gradcheck; "
            "print(sorted(m for m in ('cupy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_file_of_the_engine_imports_torch():
    for path in (ROOT / "tinydiff").glob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            assert not (words[:2] == ["import", "torch"] or words[:2] == ["from", "torch"]), f"{path.name}: {line}"
