"""tinydiff.nn: Module bookkeeping, PyTorch initialisation, float64 gradient checks of every
layer, and (where PyTorch is installed) outputs and state-dict keys against torch.nn."""
import numpy as np
import pytest

import tinydiff
from tinydiff import Tensor, backend, gradcheck
from tinydiff import nn


def rand(*shape, seed=0, dtype=np.float64, grad=True):
    return Tensor(np.random.default_rng(seed).standard_normal(shape).astype(dtype), requires_grad=grad)


class Block(nn.Module):
    """A small nested module: parameters, a buffer-holding child, a container, a plain attribute."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, 1, 1)
        self.layers = nn.Sequential(nn.BatchNorm2d(4), nn.GELU(), nn.Dropout(0.5))
        self.heads = nn.ModuleList([nn.Linear(4, 3), nn.Linear(3, 2, bias=False)])
        self.scale = 2.0

    def forward(self, x):                                        # (B, 2, H, W) -> (B, 2)
        h = self.layers(self.conv(x)).mean(axis=(2, 3))          # (B, 4)
        for head in self.heads:
            h = head(h)
        return h * self.scale


# ---------------------------------------------------------------------------------------------
# Module bookkeeping


def test_names_follow_pytorch():
    m = Block()
    assert [k for k, _ in m.named_parameters()] == [
        "conv.weight", "conv.bias", "layers.0.weight", "layers.0.bias",
        "heads.0.weight", "heads.0.bias", "heads.1.weight"]
    assert list(m.state_dict()) == [
        "conv.weight", "conv.bias", "layers.0.weight", "layers.0.bias", "layers.0.running_mean",
        "layers.0.running_var", "layers.0.num_batches_tracked", "heads.0.weight", "heads.0.bias",
        "heads.1.weight"]
    assert [k for k, _ in m.named_buffers()] == ["layers.0.running_mean", "layers.0.running_var",
                                                 "layers.0.num_batches_tracked"]
    assert [k for k, _ in m.named_modules()][:4] == ["", "conv", "layers", "layers.0"]
    assert m.children()[0] is m.conv and len(m.layers) == 3 and m.heads[1] is list(m.heads)[1]
    assert m.num_parameters() == 4 * 2 * 9 + 4 + 4 + 4 + 12 + 3 + 6
    assert m.layers[0].num_batches_tracked.dtype == np.int64 and m.scale == 2.0


def test_setattr_before_init_and_reassignment():
    class Forgetful(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(2))                  # no super().__init__()
    with pytest.raises(AttributeError, match="super\\(\\).__init__"):
        Forgetful()
    m = nn.Linear(2, 2)
    m.bias = None                                                # a parameter can be removed
    assert [k for k, _ in m.named_parameters()] == ["weight"]
    m.bias = nn.Parameter(np.ones(2, np.float32))                # and put back
    assert [k for k, _ in m.named_parameters()] == ["weight", "bias"] and m.bias.data[0] == 1
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        m.nope


def test_state_dict_shares_memory_and_load_copies_in_place():
    m = Block()
    w = m.conv.weight
    sd = m.state_dict()
    assert sd["conv.weight"].data is w.data and not sd["conv.weight"].requires_grad
    new = {k: np.full(v.shape, 0.5, dtype=np.float64 if v.dtype.kind == "f" else v.dtype) for k, v in sd.items()}
    missing, unexpected = m.load_state_dict(new)
    assert missing == [] and unexpected == []
    assert m.conv.weight is w and w.dtype == np.float32 and np.all(w.data == 0.5)   # same Parameter, dtype kept
    m.load_state_dict({k: Tensor(v) for k, v in new.items()})                        # Tensors work too


def test_load_state_dict_refuses_bad_checkpoints_naming_keys_and_shapes():
    m = Block()
    before = m.conv.weight.numpy().copy()
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    bad = dict(sd, **{"conv.weight": np.zeros((4, 2, 5, 5)), "extra.bias": np.zeros(3)})
    del bad["heads.0.bias"]
    with pytest.raises(ValueError) as err:
        m.load_state_dict(dict(bad, **{"conv.weight": np.ones((4, 2, 5, 5))}))
    msg = str(err.value)
    assert "conv.weight" in msg and "(4, 2, 5, 5)" in msg and "(4, 2, 3, 3)" in msg
    assert "missing keys (in the model, not the weights): heads.0.bias" in msg
    assert "unexpected keys (in the weights, not the model): extra.bias" in msg
    assert np.array_equal(m.conv.weight.numpy(), before)        # nothing was copied
    del bad["conv.weight"]
    missing, unexpected = m.load_state_dict(bad, strict=False)   # non-strict: report, do not raise
    assert missing == ["conv.weight", "heads.0.bias"] and unexpected == ["extra.bias"]
    with pytest.raises(ValueError, match="shape mismatch"):     # shapes are checked even when not strict
        m.load_state_dict({"heads.0.weight": np.zeros((2, 2))}, strict=False)


def test_train_eval_to_dtype_zero_grad():
    m = Block()
    assert m.training and m.layers[2].training
    assert m.eval() is m and not m.layers[0].training and not m.heads[0].training
    x = rand(3, 2, 5, 5, dtype=np.float32, grad=False)
    y1, y2 = m(x), m(x)
    assert np.array_equal(y1.numpy(), y2.numpy())                # dropout off, running stats used
    m.train()
    w = m.conv.weight
    assert m.double() is m and m.conv.weight is w and w.dtype == np.float64
    assert m.layers[0].running_var.dtype == np.float64 and m.layers[0].num_batches_tracked.dtype == np.int64
    m.to(np.float32)
    assert w.dtype == np.float32
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    assert m.layers[0].num_batches_tracked.item() == 1


def test_init_is_seeded_and_follows_pytorch_bounds():
    tinydiff.manual_seed(3)
    a = nn.Conv2d(8, 16, 3).weight.numpy()
    tinydiff.manual_seed(3)
    assert np.array_equal(a, nn.Conv2d(8, 16, 3).weight.numpy())
    cases = [(nn.Linear(50, 400), 50), (nn.Conv2d(8, 64, 3), 8 * 9),
             (nn.ConvTranspose2d(64, 8, 3), 8 * 9)]                  # transposed: fan_in from weight dim 1
    for m, fan_in in cases:
        bound = 1 / np.sqrt(fan_in)
        for p in (m.weight.numpy(), m.bias.numpy()):
            assert p.dtype == np.float32 and np.abs(p).max() <= bound
        assert np.abs(m.weight.numpy()).max() > 0.95 * bound        # uniform over the whole range
        assert abs(m.weight.numpy().std() - bound / np.sqrt(3)) < 0.05 * bound
    e = nn.Embedding(100, 50).weight.numpy()
    assert abs(e.mean()) < 0.05 and abs(e.std() - 1) < 0.05
    g = nn.GroupNorm(2, 4)
    assert np.all(g.weight.numpy() == 1) and np.all(g.bias.numpy() == 0)


@pytest.mark.skipif(not backend.cuda_available(), reason="needs a CUDA GPU and CuPy")
def test_to_cuda_moves_parameters_and_buffers():
    m = Block().to("cuda")
    assert all(t.device == "cuda" for t in m.parameters() + m.buffers())
    y = m(rand(2, 2, 4, 4, dtype=np.float32).to("cuda"))
    assert y.device == "cuda"
    m.load_state_dict({k: v.numpy() for k, v in m.state_dict().items()})   # host arrays go to the device
    assert m.to("cpu").conv.weight.device == "cpu"


# ---------------------------------------------------------------------------------------------
# float64 gradient check of every layer (input and parameters)


LAYERS = {
    "Linear": (lambda: nn.Linear(5, 3), (2, 4, 5)),
    "Conv2d": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 5, 5)),
    "Conv2d_1x1": (lambda: nn.Conv2d(3, 2, 1), (1, 3, 3, 3)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(3, 2, 2, 2), (2, 3, 2, 3)),
    "ConvTranspose2d_pad": (lambda: nn.ConvTranspose2d(2, 3, 3, 2, 1), (1, 2, 3, 3)),
    "BatchNorm2d_train": (lambda: nn.BatchNorm2d(3), (4, 3, 2, 2)),
    "BatchNorm2d_eval": (lambda: nn.BatchNorm2d(3).eval(), (2, 3, 2, 2)),
    "GroupNorm": (lambda: nn.GroupNorm(2, 4), (2, 4, 3, 3)),
    "LayerNorm": (lambda: nn.LayerNorm(6), (3, 6)),
    "GELU": (lambda: nn.GELU(), (2, 3, 4)),
    "ReLU": (lambda: nn.ReLU(), (2, 3, 4)),
    "SiLU": (lambda: nn.SiLU(), (2, 3, 4)),
    "MaxPool2d": (lambda: nn.MaxPool2d(2), (2, 2, 4, 4)),
    "AvgPool2d": (lambda: nn.AvgPool2d(2), (2, 2, 4, 6)),
    "Upsample": (lambda: nn.Upsample(scale_factor=2), (1, 2, 3, 3)),
    "Flatten": (lambda: nn.Flatten(), (2, 2, 3)),
    "Identity": (lambda: nn.Identity(), (2, 3)),
    "Sequential": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.GroupNorm(1, 2), nn.SiLU(),
                                         nn.Flatten(), nn.Linear(18, 2)), (2, 1, 3, 3)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_gradcheck_float64(name):
    make, shape = LAYERS[name]
    tinydiff.manual_seed(0)
    m = make().double()
    x = rand(*shape)
    if name == "BatchNorm2d_eval":                               # non-trivial running stats
        m.running_mean.data[...] = [0.1, -0.2, 0.3]
        m.running_var.data[...] = [0.5, 2.0, 1.5]
    if m.parameters():                                           # non-trivial affine parameters
        for p in m.parameters():
            p.data = p.data + 0.1 * np.random.default_rng(1).standard_normal(p.shape)
    assert gradcheck(lambda x, *params: m(x), [x] + m.parameters())


def test_embedding_and_dropout():
    m = nn.Embedding(5, 3).double()
    idx = np.array([[0, 4], [4, 2]])
    assert gradcheck(lambda w: m(idx), [m.weight])              # repeated index 4 adds up
    with pytest.raises(IndexError, match="out of range"):
        m(np.array([5]))
    d = nn.Dropout(0.25)
    tinydiff.manual_seed(0)
    y = d(Tensor(np.ones((100, 100))))
    assert set(np.unique(y.numpy())) == {0.0, 1 / 0.75} and abs((y.numpy() == 0).mean() - 0.25) < 0.02
    assert d.eval()(y) is y


def test_bad_input_raises_clearly():
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\).*\(2, 3, 5, 5\)"):
        nn.BatchNorm2d(4)(rand(2, 3, 5, 5))
    with pytest.raises(ValueError, match="channels"):
        nn.Conv2d(3, 4, 3)(rand(1, 2, 5, 5))
    with pytest.raises(ValueError, match="not divisible"):
        nn.GroupNorm(3, 8)
    with pytest.raises(ValueError, match="GroupNorm"):
        nn.GroupNorm(2, 8)(rand(1, 4, 2, 2))
    with pytest.raises(ValueError, match="nearest"):
        nn.Upsample(2, mode="bilinear")


# ---------------------------------------------------------------------------------------------
# Against PyTorch: same weights in, same outputs and running statistics out


def _torch_twins(torch):
    tnn = torch.nn
    return [
        (nn.Linear(5, 3), tnn.Linear(5, 3), (4, 5)),
        (nn.Conv2d(3, 4, 3, 2, 1), tnn.Conv2d(3, 4, 3, 2, 1), (2, 3, 7, 7)),
        (nn.ConvTranspose2d(4, 3, 4, 4), tnn.ConvTranspose2d(4, 3, 4, 4), (2, 4, 1, 1)),
        (nn.ConvTranspose2d(4, 3, 3, 2, 1), tnn.ConvTranspose2d(4, 3, 3, 2, 1), (2, 4, 3, 3)),
        (nn.GroupNorm(2, 4), tnn.GroupNorm(2, 4), (2, 4, 3, 3)),
        (nn.LayerNorm(6), tnn.LayerNorm(6), (3, 6)),
        (nn.GELU(), tnn.GELU(), (2, 9)),
        (nn.SiLU(), tnn.SiLU(), (2, 9)),
        (nn.MaxPool2d(2), tnn.MaxPool2d(2), (2, 3, 4, 4)),
        (nn.AvgPool2d(3), tnn.AvgPool2d(3), (2, 3, 6, 6)),
        (nn.Upsample(scale_factor=2), tnn.Upsample(scale_factor=2), (1, 2, 3, 3)),
        (nn.Flatten(), tnn.Flatten(), (2, 3, 2)),
    ]


def test_layers_match_torch_and_torch_init_ranges():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    for ours, theirs, shape in _torch_twins(torch):
        assert list(ours.state_dict()) == list(theirs.state_dict()), type(ours).__name__
        for k, v in theirs.state_dict().items():                # our init bounds are torch's
            assert tuple(v.shape) == ours.state_dict()[k].shape
            if k.endswith("weight") and v.dim() >= 2:
                assert abs(np.abs(ours.state_dict()[k].numpy()).max() - float(v.abs().max())) < 0.1 * float(v.abs().max())
        ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        xt = torch.tensor(x, requires_grad=True)
        out_t = theirs(xt)
        g = np.random.default_rng(2).standard_normal(tuple(out_t.shape)).astype(np.float32)
        (out_t * torch.tensor(g)).sum().backward()
        xo = Tensor(x, requires_grad=True)
        out = ours(xo)
        (out * Tensor(g)).sum().backward()
        name = type(ours).__name__
        np.testing.assert_allclose(out.numpy(), out_t.detach().numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(xo.grad, xt.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
        for (k, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
            np.testing.assert_allclose(p.grad, q.grad.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"{name} {k}")


def test_batchnorm_matches_torch_over_steps():
    torch = pytest.importorskip("torch")
    ours, theirs = nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    rng = np.random.default_rng(0)
    for _ in range(3):                                           # running statistics after 3 batches
        x = (rng.standard_normal((4, 3, 5, 5)) * 2 + 1).astype(np.float32)
        np.testing.assert_allclose(ours(Tensor(x)).numpy(), theirs(torch.tensor(x)).detach().numpy(), atol=1e-5)
    for k, v in theirs.state_dict().items():
        np.testing.assert_allclose(ours.state_dict()[k].numpy(), v.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    twin = nn.BatchNorm2d(3)
    twin.load_state_dict(theirs.state_dict())                   # torch tensors load directly (CPU)
    assert twin.num_batches_tracked.item() == 3 and twin.running_var.dtype == np.float32
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    ours.eval(), theirs.eval()
    np.testing.assert_allclose(ours(Tensor(x)).numpy(), theirs(torch.tensor(x)).detach().numpy(), atol=1e-5)
