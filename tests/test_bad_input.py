"""Bad input fails loudly, early, and says what is wrong.

Shapes that do not fit raise errors naming both shapes; tensors on different devices raise;
wrong weight ranks and dtypes raise; a shape mistake never comes back as NaN; out-of-range
classes and indices raise.

Run:  python -m pytest tests/test_bad_input.py -q
"""
import numpy as np
import pytest

import tinydiff
from tinydiff import F, Tensor, gradcheck


def t(*shape, dtype=np.float64):
    return Tensor(np.ones(shape, dtype=dtype))


# ---------------------------------------------------------------------------------------------
# Shapes that do not fit: the error names both shapes

MISMATCHES = [
    ("add", lambda: t(2, 3) + t(4), (2, 3), (4,)),
    ("sub", lambda: t(3, 1, 5) - t(4, 4), (3, 1, 5), (4, 4)),
    ("mul", lambda: t(2, 3) * t(2, 2), (2, 3), (2, 2)),
    ("div", lambda: t(2, 3) / t(3, 2), (2, 3), (3, 2)),
    ("maximum", lambda: t(2, 3).maximum(t(5)), (2, 3), (5,)),
    ("where", lambda: tinydiff.where(np.ones((2, 3), bool), t(2, 3), t(3, 3)), (2, 3), (3, 3)),
    ("matmul", lambda: t(2, 3) @ t(4, 5), (2, 3), (4, 5)),
    ("batched matmul", lambda: t(2, 2, 3) @ t(3, 4, 5), (2, 2, 3), (3, 4, 5)),
    ("linear", lambda: F.linear(t(2, 3), t(4, 5)), (2, 3), (4, 5)),
    ("cat", lambda: tinydiff.cat([t(2, 3), t(2, 4)]), (2, 3), (2, 4)),
    ("stack", lambda: tinydiff.stack([t(2, 3), t(3, 2)]), (2, 3), (3, 2)),
    ("mse_loss", lambda: F.mse_loss(t(3), t(3, 1)), (3,), (3, 1)),        # torch would broadcast
    ("conv2d channels", lambda: F.conv2d(t(1, 3, 5, 5), t(4, 2, 3, 3)), (1, 3, 5, 5), (4, 2, 3, 3)),
    ("conv_transpose2d channels", lambda: F.conv_transpose2d(t(1, 3, 4, 4), t(2, 3, 2, 2)),
     (1, 3, 4, 4), (2, 3, 2, 2)),
    ("conv2d bias", lambda: F.conv2d(t(1, 2, 5, 5), t(4, 2, 3, 3), t(3)), (3,), (4,)),
    ("conv2d_add shift", lambda: F.conv2d_add(t(2, 2, 5, 5), t(4, 2, 3, 3), shift=t(2, 3)), (2, 3), (2, 4)),
    ("conv2d_add residual", lambda: F.conv2d_add(t(2, 2, 5, 5), t(4, 2, 3, 3), padding=1, residual=t(2, 4, 3, 3)),
     (2, 4, 3, 3), (2, 4, 5, 5)),
    ("group_norm weight", lambda: F.group_norm(t(2, 4, 3, 3), 2, t(5), t(4)), (5,), (2, 4, 3, 3)),
    ("group_norm_silu bias", lambda: F.group_norm_silu(t(2, 4, 3, 3), 2, t(4), t(3)), (3,), (2, 4, 3, 3)),
    ("batch_norm running_mean", lambda: F.batch_norm(t(2, 3, 2, 2), t(4), t(4), training=False),
     (4,), (2, 3, 2, 2)),
    ("batch_norm bias", lambda: F.batch_norm(t(2, 3), None, None, t(3), t(2), training=True), (2,), (2, 3)),
    ("layer_norm", lambda: F.layer_norm(t(2, 3, 4), (3,)), (2, 3, 4), (3,)),
    ("cross_entropy target", lambda: F.cross_entropy(t(4, 5), np.zeros(3, dtype=int)), (4, 5), (3,)),
    ("backward gradient", lambda: (Tensor(np.ones((2, 3)), requires_grad=True) * 2).backward(np.ones(3)),
     (3,), (2, 3)),
]


@pytest.mark.parametrize("name, call, shape_a, shape_b", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_mismatched_shapes_raise_naming_both_shapes(name, call, shape_a, shape_b):
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert str(shape_a) in message and str(shape_b) in message, message


# ---------------------------------------------------------------------------------------------
# A shape mistake raises; it never comes back as NaN (or as a silently wrong number)

DEGENERATE = [
    ("unbiased var of one element", lambda: t(3, 1).var(axis=1), ValueError),       # torch: NaN
    ("batch_norm training, one value per channel", lambda: F.batch_norm(t(1, 3, 1, 1), None, None,
                                                                        training=True), ValueError),
    ("batch_norm eval without running stats", lambda: F.batch_norm(t(2, 3), None, None), ValueError),
    ("conv kernel larger than the input", lambda: F.conv2d(t(1, 1, 2, 5), t(1, 1, 3, 3)), ValueError),
    ("conv2d_add kernel larger than the input", lambda: F.conv2d_add(t(1, 1, 2, 5), t(1, 1, 3, 3), shift=t(1, 1)),
     ValueError),
    ("conv_transpose2d padding eats the output", lambda: F.conv_transpose2d(t(1, 1, 1, 1), t(1, 1, 2, 2),
                                                                            padding=1), ValueError),
    ("pool kernel larger than the input", lambda: F.avg_pool2d(t(1, 1, 2, 2), 3), ValueError),
    ("pool padding over half the kernel", lambda: F.max_pool2d(t(1, 1, 4, 4), 2, 1, 2), ValueError),
    ("group_norm groups do not divide channels", lambda: F.group_norm(t(2, 6, 2, 2), 4), ValueError),
    ("group_norm_silu groups do not divide channels", lambda: F.group_norm_silu(t(2, 6, 2, 2), 4), ValueError),
    ("group_norm_silu zero groups", lambda: F.group_norm_silu(t(2, 6, 2, 2), 0), ValueError),
    ("group_norm_silu of a 1-D input", lambda: F.group_norm_silu(t(6), 2), ValueError),
    ("mean of an empty tensor", lambda: t(0, 3).mean(), ZeroDivisionError),          # torch: NaN
    ("cross_entropy of an empty batch", lambda: F.cross_entropy(t(0, 3), np.zeros(0, dtype=int)),
     ZeroDivisionError),                                                                # torch: NaN
    ("softmax over an empty axis", lambda: F.softmax(t(2, 0)), ValueError),
    ("upsample a 3-D input", lambda: F.upsample_nearest2d(t(2, 3, 4)), ValueError),
    ("linear of a 1-D input", lambda: F.linear(t(3), t(2, 3)), ValueError),
    ("stride 0", lambda: F.conv2d(t(1, 1, 3, 3), t(1, 1, 2, 2), stride=0), ValueError),
    ("negative padding", lambda: F.conv2d(t(1, 1, 3, 3), t(1, 1, 2, 2), padding=-1), ValueError),
    ("pool stride 0", lambda: F.max_pool2d(t(1, 1, 3, 3), 2, 0), ValueError),
    ("pad with negative widths", lambda: F.pad(t(2, 3), (1, -1)), ValueError),
    ("pad with an odd list", lambda: F.pad(t(2, 3), (1, 1, 1)), ValueError),
    ("pad mode reflect (not implemented)", lambda: F.pad(t(2, 3), (1, 1), "reflect"), ValueError),
    ("upsample by 1.5", lambda: F.upsample_nearest2d(t(1, 1, 2, 2), 1.5), ValueError),
    ("dropout p = 1", lambda: F.dropout(t(2, 2), 1.0), ValueError),
    ("item of many elements", lambda: t(2).item(), ValueError),
]


@pytest.mark.parametrize("name, call, error", DEGENERATE, ids=[d[0] for d in DEGENERATE])
def test_a_shape_mistake_raises_instead_of_returning(name, call, error):
    with pytest.raises(error):
        out = call()
        pytest.fail(f"{name}: returned {out!r} (NaN: {np.isnan(out.numpy()).any()})")


# ---------------------------------------------------------------------------------------------
# Ranks and dtypes


@pytest.mark.parametrize("call, words", [
    (lambda: F.conv2d(t(1, 2, 5, 5), t(2, 3, 3)), r"weight must be 4-D.*\(2, 3, 3\)"),
    (lambda: F.conv2d(t(2, 5, 5), t(3, 2, 3, 3)), r"input must be 4-D.*\(2, 5, 5\)"),
    (lambda: F.conv_transpose2d(t(1, 2, 3, 3), t(2, 2, 2, 2, 1)), r"weight must be 4-D.*\(2, 2, 2, 2, 1\)"),
    (lambda: F.linear(t(2, 3), t(3)), r"weight must be 2-D.*\(3,\)"),
    (lambda: F.max_pool2d(t(1, 4, 4), 2), r"input must be 4-D.*\(1, 4, 4\)"),
    (lambda: F.embedding(np.array([0, 1]), t(4)), r"weight must be 2-D.*\(4,\)"),
], ids=["conv2d weight 3-D", "conv2d input 3-D", "conv_transpose2d weight 5-D", "linear weight 1-D",
        "max_pool2d input 3-D", "embedding weight 1-D"])
def test_wrong_rank_raises(call, words):
    with pytest.raises(ValueError, match=words):
        call()


@pytest.mark.parametrize("call, words", [
    (lambda: F.conv2d(t(1, 2, 5, 5, dtype=np.int64), t(3, 2, 3, 3)), "input must be a float tensor"),
    (lambda: F.conv2d(t(1, 2, 5, 5, dtype=np.float32), t(3, 2, 3, 3)), "share a dtype.*float32.*float64"),
    (lambda: F.conv_transpose2d(t(1, 2, 3, 3), t(2, 2, 2, 2), t(2, dtype=np.float32)), "share a dtype"),
    (lambda: F.conv2d_add(t(1, 2, 3, 3), t(2, 2, 1, 1), shift=t(1, 2, dtype=np.float32)), "shift has dtype float32"),
    (lambda: F.conv2d_add(t(1, 2, 3, 3), t(2, 2, 1, 1), residual=t(1, 2, 3, 3, dtype=np.int64)),
     "residual must be a float tensor"),
    (lambda: F.group_norm(t(1, 2, 3, dtype=np.int32), 1), "input must be a float tensor"),
    (lambda: F.embedding(np.array([0.0, 1.0]), t(3, 2)), "indices must be integers"),
    (lambda: F.cross_entropy(t(2, 3), np.array([0.0, 1.0])), "integer classes"),
    (lambda: F.cross_entropy(t(2, 3, dtype=np.int64), np.array([0, 1])), "input must be a float tensor"),
    (lambda: t(2) ** t(2), "scalar exponent"),
    (lambda: gradcheck(lambda x: x * 2, [Tensor(np.ones(2, dtype=np.float32), requires_grad=True)]), "float64"),
], ids=["conv2d int input", "conv2d float32 x float64 w", "conv_transpose2d bias dtype", "conv2d_add shift dtype",
        "conv2d_add int residual", "group_norm int",
        "embedding float indices", "cross_entropy float target", "cross_entropy int logits",
        "pow tensor exponent", "gradcheck float32"])
def test_wrong_dtype_raises(call, words):
    with pytest.raises(TypeError, match=words):
        call()


# ---------------------------------------------------------------------------------------------
# Out of range


@pytest.mark.parametrize("target", [[0, 5], [-1, 0]], ids=["too large", "negative"])
def test_cross_entropy_target_out_of_range(target):
    with pytest.raises(IndexError, match=r"out of range \[0, 5\)"):
        F.cross_entropy(t(2, 5), np.array(target))


def test_embedding_index_out_of_range():
    with pytest.raises(IndexError, match=r"out of range \[0, 4\).*max 4"):
        F.embedding(np.array([[0, 4]]), t(4, 2))


# ---------------------------------------------------------------------------------------------
# CPU and GPU tensors do not mix. Without a GPU, a "GPU" array is simulated: backend tells
# devices apart by the array's module (cupy.*), which a NumPy subclass can claim.


class FakeCupyArray(np.ndarray):
    """A NumPy array that says it is a CuPy array: its module name starts with 'cupy'."""


FakeCupyArray.__module__ = "cupy._fake"


def on_gpu(*shape):
    if tinydiff.cuda_available():
        return t(*shape).to("cuda")
    gpu = Tensor(np.ones(shape).view(FakeCupyArray))
    assert gpu.device == "cuda", "backend no longer tells devices apart by the array's module"
    return gpu


MIXES = [
    ("add", lambda: t(2, 3) + on_gpu(2, 3)),
    ("mul, GPU on the left", lambda: on_gpu(2, 3) * t(2, 3)),
    ("matmul", lambda: t(2, 3) @ on_gpu(3, 2)),
    ("where", lambda: tinydiff.where(np.ones(3, bool), t(3), on_gpu(3))),
    ("cat", lambda: tinydiff.cat([t(2), on_gpu(2)])),
    ("linear", lambda: F.linear(t(2, 3), on_gpu(4, 3))),
    ("conv2d weight", lambda: F.conv2d(t(1, 2, 4, 4), on_gpu(3, 2, 3, 3))),
    ("conv2d bias", lambda: F.conv2d(t(1, 2, 4, 4), t(3, 2, 3, 3), on_gpu(3))),
    ("conv2d_add residual", lambda: F.conv2d_add(t(1, 2, 4, 4), t(3, 2, 3, 3), padding=1, residual=on_gpu(1, 3, 4, 4))),
    ("conv_transpose2d weight", lambda: F.conv_transpose2d(t(1, 2, 4, 4), on_gpu(2, 3, 2, 2))),
    ("group_norm weight", lambda: F.group_norm(t(2, 4, 3, 3), 2, on_gpu(4), t(4))),
    ("batch_norm running stats", lambda: F.batch_norm(t(2, 3), on_gpu(3), on_gpu(3))),
    ("mse_loss", lambda: F.mse_loss(t(3), on_gpu(3))),
]


@pytest.mark.parametrize("name, call", MIXES, ids=[m[0] for m in MIXES])
def test_mixing_cpu_and_gpu_tensors_raises(name, call):
    with pytest.raises(ValueError, match=r"different devices.*(cpu.*cuda|cuda.*cpu)"):
        call()
