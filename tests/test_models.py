"""The course's ContextUnet and the modern UNet: state-dict keys, gradients, PyTorch parity
through safetensors files, overfitting one batch, and clear refusals of bad input.

The PyTorch twin of the ContextUnet is the file users copy, docs/interop/context_unet_torch.py,
written from the course's code; the only change to the course is the learned 1x1 `shortcut` (the
course makes a new random one per call). The UNet's twin is written below.
`benchmarks/bench_train_step.py` imports them to time PyTorch on the identical architecture.
"""
import importlib.util
import math
import os
import time

import numpy as np
import pytest

import tinydiff
from tinydiff import Tensor
from tinydiff import functional as F
from tinydiff.models import ContextUnet, ResidualConvBlock, UNet
from tinydiff.unet import Attention

SHORTCUT_KEYS = ["init_conv.shortcut.weight", "init_conv.shortcut.bias"]


# ---------------------------------------------------------------------------------------------
# PyTorch twins (built only when torch is installed)


TORCH_CONTEXT_UNET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "docs", "interop", "context_unet_torch.py")


def torch_context_unet(torch, in_channels, n_feat=64, n_cfeat=5, height=16, learned_shortcut=True):
    """The course's ContextUnet in PyTorch, the file users copy (docs/interop/context_unet_torch.py),
    imported by path; learned_shortcut=False is the course's random shortcut."""
    spec = importlib.util.spec_from_file_location("context_unet_torch", TORCH_CONTEXT_UNET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ContextUnet(in_channels, n_feat, n_cfeat, height, learned_shortcut=learned_shortcut)


def torch_unet(torch, in_channels=1, channels=(32, 64, 128), num_classes=None, layers_per_block=1,
               attention_levels=None, head_dim=None, groups=8, eps=1e-5):
    """tinydiff.unet.UNet in PyTorch, module for module (same state-dict keys)."""
    tnn = torch.nn
    levels = len(channels)
    attention_levels = [i == levels - 1 for i in range(levels)] if attention_levels is None else attention_levels

    class ResBlock(tnn.Module):
        def __init__(self, i, o, emb):
            super().__init__()
            self.norm1, self.conv1 = tnn.GroupNorm(groups, i, eps), tnn.Conv2d(i, o, 3, 1, 1)
            self.emb_proj = tnn.Linear(emb, o)
            self.norm2, self.conv2 = tnn.GroupNorm(groups, o, eps), tnn.Conv2d(o, o, 3, 1, 1)
            self.skip = tnn.Conv2d(i, o, 1) if i != o else tnn.Identity()

        def forward(self, x, emb):
            h = self.conv1(tnn.functional.silu(self.norm1(x)))
            h = h + self.emb_proj(tnn.functional.silu(emb))[:, :, None, None]
            return self.skip(x) + self.conv2(tnn.functional.silu(self.norm2(h)))

    class Attention(tnn.Module):
        def __init__(self, ch):
            super().__init__()
            self.heads = ch // (head_dim or ch)
            self.norm = tnn.GroupNorm(groups, ch, eps)
            self.q, self.k, self.v, self.proj = (tnn.Linear(ch, ch) for _ in range(4))

        def forward(self, x):
            b, c, h, w = x.shape
            tok = self.norm(x).view(b, c, h * w).transpose(1, 2)
            q, k, v = (f(tok).view(b, h * w, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
            y = tnn.functional.scaled_dot_product_attention(q, k, v)
            y = self.proj(y.transpose(1, 2).reshape(b, h * w, c))
            return x + y.transpose(1, 2).reshape(b, c, h, w)

    class Down(tnn.Module):
        def __init__(self, ch):
            super().__init__()
            self.conv = tnn.Conv2d(ch, ch, 3, 2, 1)

        def forward(self, x):
            return self.conv(x)

    class Up(tnn.Module):
        def __init__(self, ch):
            super().__init__()
            self.conv = tnn.Conv2d(ch, ch, 3, 1, 1)

        def forward(self, x):
            return self.conv(tnn.functional.interpolate(x, scale_factor=2, mode="nearest"))

    class Level(tnn.Module):      # a DownLevel (skip_chs None) or an UpLevel
        def __init__(self, i, o, emb, layers, attention, sample, skip_chs=None):
            super().__init__()
            ins = [(i if j == 0 else o) + (skip_chs[j] if skip_chs else 0) for j in range(layers)]
            self.resnets = tnn.ModuleList([ResBlock(n, o, emb) for n in ins])
            self.attentions = tnn.ModuleList([Attention(o) for _ in range(layers)] if attention else [])
            if sample and skip_chs is None:
                self.downsample = Down(o)
            elif sample:
                self.upsample = Up(o)
            self.up = skip_chs is not None

        def forward(self, h, emb, skips):
            for j, resnet in enumerate(self.resnets):
                h = resnet(torch.cat((h, skips.pop()), 1) if self.up else h, emb)
                if len(self.attentions):
                    h = self.attentions[j](h)
                if not self.up:
                    skips.append(h)
            if hasattr(self, "downsample"):
                h = self.downsample(h)
                skips.append(h)
            if hasattr(self, "upsample"):
                h = self.upsample(h)
            return h

    class TorchUNet(tnn.Module):
        def __init__(self):
            super().__init__()
            c0, emb = channels[0], 4 * channels[0]
            self.time_mlp = tnn.Sequential(tnn.Linear(c0, emb), tnn.SiLU(), tnn.Linear(emb, emb))
            if num_classes is not None:
                self.class_emb = tnn.Embedding(num_classes + 1, emb)
            self.init_conv = tnn.Conv2d(in_channels, c0, 3, 1, 1)
            self.downs, skip_chs, prev = tnn.ModuleList(), [c0], c0
            for i, ch in enumerate(channels):
                last = i == levels - 1
                self.downs.append(Level(prev, ch, emb, layers_per_block, attention_levels[i], not last))
                skip_chs += [ch] * (layers_per_block + (not last))
                prev = ch
            self.mid1, self.mid_attn, self.mid2 = ResBlock(prev, prev, emb), Attention(prev), ResBlock(prev, prev, emb)
            self.ups = tnn.ModuleList()
            for i in reversed(range(levels)):
                takes = [skip_chs.pop() for _ in range(layers_per_block + 1)]
                self.ups.append(Level(prev, channels[i], emb, layers_per_block + 1, attention_levels[i], i > 0, takes))
                prev = channels[i]
            self.out = tnn.Sequential(tnn.GroupNorm(groups, c0, eps), tnn.SiLU(), tnn.Conv2d(c0, in_channels, 3, 1, 1))

        def forward(self, x, t, c=None):
            half = channels[0] // 2            # flip_sin_to_cos=True, freq_shift=0: [cos, sin]
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
            args = t.reshape(-1).double()[:, None] * freqs[None]
            emb = self.time_mlp(torch.cat([args.cos(), args.sin()], 1).to(x.dtype))
            if num_classes is not None:
                emb = emb + self.class_emb(c)
            h = self.init_conv(x)
            skips = [h]
            for level in self.downs:
                h = level(h, emb, skips)
            h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
            for level in self.ups:
                h = level(h, emb, skips)
            return self.out(h)

    return TorchUNet()


# ---------------------------------------------------------------------------------------------
# Helpers


def spot_gradcheck(fn, tensors, per_tensor=2, eps=1e-6, rtol=1e-4, atol=1e-6, seed=0):
    """Like tinydiff.gradcheck, but perturbs only `per_tensor` random elements of each tensor:
    a whole U-Net has too many parameters for 2 forward passes per element."""
    rng = np.random.default_rng(seed)
    out = fn()
    weights = rng.standard_normal(out.shape)
    for t in tensors:
        t.grad = None
    (out * Tensor(weights)).sum().backward()
    checked = 0
    for k, t in enumerate(tensors):
        flat = t.data.reshape(-1)
        for j in rng.choice(flat.size, size=min(per_tensor, flat.size), replace=False):
            old = flat[j]
            flat[j] = old + eps
            plus = float((fn().data * weights).sum())
            flat[j] = old - eps
            minus = float((fn().data * weights).sum())
            flat[j] = old
            numeric = (plus - minus) / (2 * eps)
            analytic = 0.0 if t.grad is None else float(t.grad.reshape(-1)[j])
            assert abs(analytic - numeric) <= atol + rtol * abs(numeric), \
                f"tensor {k} {t.shape} element {j}: analytic {analytic:.10g}, numeric {numeric:.10g}"
            checked += 1
    return checked


def noisy_batch(b, c, h, seed=0, dtype=np.float32):
    """Images, noise eps and the noised x_t = sqrt(ab) x0 + sqrt(1-ab) eps at random t (DDPM eq. 4)."""
    rng = np.random.default_rng(seed)
    x0 = np.sign(rng.standard_normal((b, c, h, h))).astype(dtype)   # crisp +-1 "images"
    eps = rng.standard_normal((b, c, h, h)).astype(dtype)
    frac = rng.uniform(0.05, 0.95, b).astype(dtype)
    alpha_bar = np.cos(frac * np.pi / 2)[:, None, None, None] ** 2
    xt = (np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * eps).astype(dtype)
    return xt, eps, frac


def close(a, b, rtol):
    """|a - b| <= rtol * max|b| (+ a tiny floor): a relative error over the whole tensor."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b).max()
    assert err <= rtol * np.abs(b).max() + 1e-7, f"max |diff| {err:.3g} against max |ref| {np.abs(b).max():.3g}"


def compare_grads(ours, theirs, batch_stats, rtol=1e-4):
    """Parameter gradients against PyTorch's. With batch statistics, a conv bias followed by
    BatchNorm has gradient exactly 0 (the mean subtracts it): both must be ~0, not equal noise."""
    grads_t = dict(theirs.named_parameters())
    scale = max(np.abs(p.grad).max() for p in ours.parameters())
    for k, p in ours.named_parameters():
        ref = grads_t[k].grad.numpy()
        if batch_stats and (k.endswith("conv1.0.bias") or k.endswith("conv2.0.bias")):
            assert np.abs(p.grad).max() < 1e-6 * scale and np.abs(ref).max() < 1e-6 * scale, k
        else:
            close(p.grad, ref, rtol)


# ---------------------------------------------------------------------------------------------
# ContextUnet


def test_context_unet_keys_are_the_course_keys_plus_the_shortcut():
    m = ContextUnet(3, n_feat=16, n_cfeat=5, height=16)
    keys = list(m.state_dict())
    for k in ["init_conv.conv1.0.weight", "down1.model.0.conv1.1.running_mean",
              "down2.model.1.conv2.1.num_batches_tracked", "up0.0.weight", "up1.model.0.weight",
              "up2.model.2.conv2.0.bias", "timeembed1.model.2.weight", "contextembed2.model.0.bias",
              "out.3.bias"] + SHORTCUT_KEYS:
        assert k in keys, k
    assert m.state_dict()["init_conv.shortcut.weight"].shape == (16, 3, 1, 1)
    assert sum("shortcut" in k for k in keys) == 2              # only where channels differ
    torch = pytest.importorskip("torch")
    course = torch_context_unet(torch, 3, 16, 5, 16, learned_shortcut=False)
    assert [k for k in keys if k not in SHORTCUT_KEYS] == list(course.state_dict())
    assert keys == list(torch_context_unet(torch, 3, 16, 5, 16).state_dict())


def test_residual_block_shortcut_is_learned_and_deterministic():
    assert "shortcut.weight" not in ResidualConvBlock(4, 4, is_res=True).state_dict()
    assert "shortcut.weight" not in ResidualConvBlock(3, 4, is_res=False).state_dict()
    block = ResidualConvBlock(3, 8, is_res=True).eval()
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32))
    y1, y2 = block(x), block(x)
    assert np.array_equal(y1.numpy(), y2.numpy())                # the course's block differs call to call
    y1.sum().backward()
    assert np.abs(block.shortcut.weight.grad).sum() > 0          # and ours is trained


def test_context_unet_conventions():
    m = ContextUnet(1, n_feat=8, n_cfeat=3, height=8)
    assert m.config["height"] == 8
    assert np.allclose(m.time_input(np.array([0, 4]), 5).numpy(), [0.2, 1.0])   # (t + 1) / T
    x = Tensor(np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32))
    null = m.null_context(2)
    assert null.shape == (2, 3) and null.dtype == np.float32 and np.all(null == 0)
    m.eval()
    a = m(x, np.array([[0.3], [0.7]]), None).numpy()             # (B, 1) times, c None = zeros
    b = m(x, [0.3, 0.7], null).numpy()                           # (B,) times as a list
    assert np.array_equal(a, b)
    same_t = m(x, 0.5).numpy()                                   # one t for the batch
    assert np.allclose(same_t, m(x, np.full(2, 0.5, np.float32)).numpy(), atol=1e-6)


def test_context_unet_bad_input_raises_clearly():
    m = ContextUnet(1, n_feat=8, n_cfeat=3, height=8)
    x = Tensor(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        m(Tensor(np.zeros((2, 3, 8, 8), np.float32)), [0.1, 0.2])
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\), got \(2, 1, 16, 16\)"):
        m(Tensor(np.zeros((2, 1, 16, 16), np.float32)), [0.1, 0.2])
    with pytest.raises(ValueError, match=r"c must have shape \(2, 3\).*\(2, 5\)"):
        m(x, [0.1, 0.2], np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"one value per sample \(2\).*\(3,\)"):
        m(x, [0.1, 0.2, 0.3])
    with pytest.raises(TypeError, match="x must be a Tensor"):
        m(np.zeros((2, 1, 8, 8)), [0.1, 0.2])
    with pytest.raises(ValueError, match="divisible by 4"):
        ContextUnet(1, height=10)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_context_unet_gradcheck_float64(mode):
    """Whole tiny model, end to end: input, time, context and two elements of every parameter."""
    tinydiff.manual_seed(0)
    m = ContextUnet(1, n_feat=8, n_cfeat=3, height=8).double()
    rng = np.random.default_rng(1)
    for p in m.parameters():                                     # move norms off their trivial init
        p.data = p.data + 0.05 * rng.standard_normal(p.shape)
    if mode == "eval":
        m.train()(Tensor(rng.standard_normal((4, 1, 8, 8))), rng.uniform(size=4))   # running stats
        m.eval()
    x = Tensor(rng.standard_normal((2, 1, 8, 8)), requires_grad=True)
    t = Tensor(rng.uniform(size=(2, 1)), requires_grad=True)
    c = Tensor(rng.uniform(size=(2, 3)), requires_grad=True)
    per_tensor = 2 if mode == "train" else 1                     # eval shares all code but BatchNorm's
    n = spot_gradcheck(lambda: m(x, t, c), [x, t, c] + m.parameters(), per_tensor)
    assert n > per_tensor * len(m.parameters())


def test_context_unet_matches_torch_through_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    st_numpy = pytest.importorskip("safetensors.numpy")
    st_torch = pytest.importorskip("safetensors.torch")
    torch.set_num_threads(1)
    tinydiff.manual_seed(0)
    ours = ContextUnet(3, n_feat=16, n_cfeat=5, height=16)
    theirs = torch_context_unet(torch, 3, 16, 5, 16)
    path = str(tmp_path / "context_unet.safetensors")
    st_numpy.save_file({k: np.ascontiguousarray(v.numpy()) for k, v in ours.state_dict().items()}, path)
    theirs.load_state_dict(st_torch.load_file(path), strict=True)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    t = rng.uniform(size=(4, 1)).astype(np.float32)
    c = np.eye(5, dtype=np.float32)[[0, 2, 4, 1]]
    g = rng.standard_normal(x.shape).astype(np.float32)

    out = ours(Tensor(x), t, c)                                  # train mode: batch statistics
    (out * Tensor(g)).sum().backward()
    out_t = theirs(torch.tensor(x), torch.tensor(t), torch.tensor(c))
    (out_t * torch.tensor(g)).sum().backward()
    close(out.numpy(), out_t.detach().numpy(), 1e-4)
    compare_grads(ours, theirs, batch_stats=True)
    sd_t = theirs.state_dict()
    for k, v in ours.state_dict().items():                       # running statistics after one step
        close(v.numpy(), sd_t[k].numpy(), 1e-4)

    ours.eval(), theirs.eval()
    ours.zero_grad(), theirs.zero_grad()
    out = ours(Tensor(x), t, c)                                  # eval mode: running statistics
    (out * Tensor(g)).sum().backward()
    out_t = theirs(torch.tensor(x), torch.tensor(t), torch.tensor(c))
    (out_t * torch.tensor(g)).sum().backward()
    close(out.numpy(), out_t.detach().numpy(), 1e-4)
    compare_grads(ours, theirs, batch_stats=False)
    with torch.no_grad():
        close(ours(Tensor(x), t).numpy(), theirs(torch.tensor(x), torch.tensor(t)).numpy(), 1e-4)   # c = None

    # and back: PyTorch's own initialisation, saved by PyTorch, loaded by tinydiff
    torch.manual_seed(1)
    fresh = torch_context_unet(torch, 3, 16, 5, 16)
    fresh(torch.tensor(x), torch.tensor(t), torch.tensor(c))     # one training step: non-trivial running stats
    fresh.eval()
    st_torch.save_file(fresh.state_dict(), path)
    back = ContextUnet(3, n_feat=16, n_cfeat=5, height=16)
    back.load_state_dict(st_numpy.load_file(path))
    assert back.state_dict()["down1.model.0.conv1.1.num_batches_tracked"].item() == 1
    with torch.no_grad():
        close(back.eval()(Tensor(x), t, c).numpy(), fresh(torch.tensor(x), torch.tensor(t), torch.tensor(c)).numpy(), 1e-4)


# ---------------------------------------------------------------------------------------------
# UNet


def test_unet_conventions_and_bad_input():
    m = UNet(1, channels=(8, 16), num_classes=3, height=8, head_dim=4, groups=4).eval()
    assert list(m.time_input(np.array([0, 7]), 10).numpy()) == [0, 7]           # the index itself
    assert list(m.null_context(2)) == [3, 3]
    x = Tensor(np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32))
    assert np.array_equal(m(x, [5, 5]).numpy(), m(x, [5, 5], m.null_context(2)).numpy())   # None = null class
    assert np.allclose(m(x, 5).numpy(), m(x, [5, 5]).numpy(), atol=1e-6)                   # one t for all
    assert not np.allclose(m(x, [5, 5], [0, 1]).numpy(), m(x, [5, 5]).numpy())
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*\(2, 2, 8, 8\)"):
        m(Tensor(np.zeros((2, 2, 8, 8), np.float32)), [1, 2])
    with pytest.raises(ValueError, match="divisible by 2"):
        m(Tensor(np.zeros((2, 1, 7, 7), np.float32)), [1, 2])
    with pytest.raises(ValueError, match=r"\(2,\) integer class labels"):
        m(x, [1, 2], np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"in \[0, 3\].*max 4"):
        m(x, [1, 2], [0, 4])
    with pytest.raises(ValueError, match=r"one timestep per sample \(2\)"):
        m(x, [1, 2, 3])
    with pytest.raises(ValueError, match="no classes"):
        UNet(1, channels=(8, 16), height=8, groups=4)(x, [1, 2], [0, 1])
    assert UNet(1, channels=(8, 16), height=8, groups=4).null_context(2) is None


# ---------------------------------------------------------------------------------------------
# The conditioning seam: every noise predictor turns labels into its own context


def small_models():
    return [ContextUnet(1, n_feat=8, n_cfeat=3, height=8).eval(),
            UNet(1, channels=(8, 16), num_classes=3, height=8, head_dim=4, groups=4).eval()]


def test_models_own_their_conditioning():
    course, modern = small_models()
    c = course.context([2, 0])                                   # one-hot vectors, the course's context
    assert c.dtype == np.float32 and np.array_equal(c, np.eye(3, dtype=np.float32)[[2, 0]])
    c = modern.context(np.array([2, 0], np.int32))               # class indices, int64
    assert c.dtype == np.int64 and list(c) == [2, 0]
    x = Tensor(np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32))
    for m in (course, modern):
        t = m.time_input(np.array([3, 9]), 10)
        assert m.context(None) is None                           # None: unconditional
        null = m(x, t, m.null_context(2)).numpy()
        assert np.array_equal(m(x, t, m.context(None)).numpy(), null)
        labelled = m(x, t, m.context([1, 2])).numpy()
        assert labelled.shape == (2, 1, 8, 8) and np.abs(labelled - null).max() > 1e-6   # the labels reach it
        name = type(m).__name__
        with pytest.raises(ValueError, match=rf"{name}.context: labels must lie in \[0, 3\), got min 0 max 3"):
            m.context([0, 3])                                    # 3 would be the UNet's null class
        with pytest.raises(ValueError, match=rf"{name}.context: labels must be \(B,\) integers"):
            m.context(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="no classes"):
        UNet(1, channels=(8, 16), height=8, groups=4).context([0])


def test_a_host_array_is_not_copied_to_the_gpu_behind_your_back():
    from tinydiff.arrays import as_array
    host = np.arange(3)
    assert as_array(host, "cpu") is host                         # already there: the same array
    assert as_array(Tensor(host), "cpu") is host and list(as_array([1, 2], "cpu")) == [1, 2]
    # the refusal is decided before CuPy is touched, so it is checked without a GPU too
    with pytest.raises(ValueError, match=r"NumPy array \(cpu, shape \(3,\)\).*cuda.*backend.to_device\(x, 'cuda'\)"):
        as_array(host, "cuda")


def test_gpu_models_refuse_host_labels_and_inputs_naming_the_fix():
    ok, why = tinydiff.backend.cuda_available(reason=True)
    if not ok:
        pytest.skip(f"needs a CUDA GPU and CuPy: {why}")
    from tinydiff.arrays import as_array
    cp = tinydiff.backend.cupy_module()
    for m in small_models():
        m.to("cuda")
        with pytest.raises(ValueError, match=r"backend.to_device\(x, 'cuda'\)"):
            m.context(np.array([0, 1]))                          # host labels for a GPU model
        c = m.context(cp.asarray([0, 1]))                        # on the device: fine
        assert tinydiff.backend.device_of(c) == "cuda"
        assert tinydiff.backend.device_of(m.null_context(2)) == "cuda"
        x = Tensor(cp.zeros((2, 1, 8, 8), np.float32))
        with pytest.raises(ValueError, match=r"backend.to_device\(x, 'cuda'\)"):
            m(x, m.time_input(cp.asarray([1, 2]), 10), np.asarray(c.get()))   # a host context
        assert as_array(np.ones(2), "cuda", copy=True).device.id == 0   # asked for: copied


def test_attention_gradcheck_and_matches_softmax_formula():
    tinydiff.manual_seed(0)
    att = Attention(4, head_dim=2, groups=2).double()
    x = Tensor(np.random.default_rng(0).standard_normal((2, 4, 2, 3)), requires_grad=True)
    assert tinydiff.gradcheck(lambda x, *ps: att(x), [x] + att.parameters())
    # by hand, one head at a time, for sample 0
    tok = att.norm(x).numpy()[0].reshape(4, 6).T                 # (HW, C)
    q, k, v = (tok @ l.weight.numpy().T + l.bias.numpy() for l in (att.q, att.k, att.v))
    heads = []
    for hd in range(2):
        s = q[:, 2 * hd:2 * hd + 2] @ k[:, 2 * hd:2 * hd + 2].T / np.sqrt(2)
        p = np.exp(s - s.max(1, keepdims=True))
        heads.append(p / p.sum(1, keepdims=True) @ v[:, 2 * hd:2 * hd + 2])
    y = np.concatenate(heads, 1) @ att.proj.weight.numpy().T + att.proj.bias.numpy()
    np.testing.assert_allclose(att(x).numpy()[0], x.numpy()[0] + y.T.reshape(4, 2, 3), atol=1e-12)


def test_unet_gradcheck_float64():
    tinydiff.manual_seed(0)
    m = UNet(1, channels=(8, 16), num_classes=3, height=8, head_dim=4, groups=4).double()
    rng = np.random.default_rng(1)
    for p in m.parameters():
        p.data = p.data + 0.05 * rng.standard_normal(p.shape)
    x = Tensor(rng.standard_normal((2, 1, 8, 8)), requires_grad=True)
    n = spot_gradcheck(lambda: m(x, [3, 17], [1, 3]), [x] + m.parameters())
    assert n > 2 * len(m.parameters())


def test_unet_matches_torch_through_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    st_numpy = pytest.importorskip("safetensors.numpy")
    st_torch = pytest.importorskip("safetensors.torch")
    torch.set_num_threads(1)
    tinydiff.manual_seed(0)
    kw = dict(channels=(8, 16, 32), num_classes=4, layers_per_block=2, attention_levels=[False, True, True],
              head_dim=4, groups=4)
    ours = UNet(2, height=8, **kw)
    theirs = torch_unet(torch, 2, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    path = str(tmp_path / "unet.safetensors")
    st_numpy.save_file({k: np.ascontiguousarray(v.numpy()) for k, v in ours.state_dict().items()}, path)
    theirs.load_state_dict(st_torch.load_file(path), strict=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 8, 8)).astype(np.float32)
    t, c = np.array([0, 250, 999]), np.array([0, 4, 2])
    g = rng.standard_normal(x.shape).astype(np.float32)
    out = ours(Tensor(x), t, c)
    (out * Tensor(g)).sum().backward()
    out_t = theirs(torch.tensor(x), torch.tensor(t), torch.tensor(c))
    (out_t * torch.tensor(g)).sum().backward()
    close(out.numpy(), out_t.detach().numpy(), 1e-4)
    grads_t = dict(theirs.named_parameters())
    for k, p in ours.named_parameters():
        close(p.grad, grads_t[k].grad.numpy(), 2e-4)


# ---------------------------------------------------------------------------------------------
# Both U-Nets can learn: overfit one batch of noisy images


def overfit(model, t, c, steps, lr):
    """Train to predict the noise of one fixed batch with Adam; return (first loss, best of the
    last 10, seconds). A tiny model memorises 8 images of 8x8 in a few dozen steps."""
    from tinydiff.optim import Adam
    xt, eps, _ = noisy_batch(8, 1, 8)
    opt = Adam(model.parameters(), lr=lr)
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        loss = F.mse_loss(model(Tensor(xt), t, c), Tensor(eps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], min(losses[-10:]), time.perf_counter() - start


def test_context_unet_overfits_one_batch():
    tinydiff.manual_seed(0)
    _, _, frac = noisy_batch(8, 1, 8)
    c = np.eye(3, dtype=np.float32)[np.arange(8) % 3]
    first, last, secs = overfit(ContextUnet(1, n_feat=8, n_cfeat=3, height=8), frac, c, 60, 3e-3)
    assert last < first / 10, f"loss {first:.4f} -> {last:.4f} in {secs:.1f} s"


def test_unet_overfits_one_batch():
    tinydiff.manual_seed(0)
    _, _, frac = noisy_batch(8, 1, 8)
    first, last, secs = overfit(UNet(1, channels=(8, 16), num_classes=3, height=8, head_dim=4, groups=4),
                                (frac * 1000).astype(np.int64), np.arange(8) % 4, 60, 3e-3)
    assert last < first / 10, f"loss {first:.4f} -> {last:.4f} in {secs:.1f} s"
