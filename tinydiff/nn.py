"""Layers, named and initialised as in torch.nn (Module and Parameter come from module.py).

Initialisation follows PyTorch's defaults so that training behaves the same:
    Linear, Conv2d, ConvTranspose2d  weight ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), +1/sqrt(fan_in))
                                     bias   ~ U(-1/sqrt(fan_in), +1/sqrt(fan_in))
    fan_in = weight.shape[1] * kh * kw  (for ConvTranspose2d, weight (in, out, kh, kw), this is out*kh*kw,
                                         exactly as PyTorch computes it)
    BatchNorm2d, GroupNorm, LayerNorm weight = 1, bias = 0;   Embedding weight ~ N(0, 1)
Random numbers come from `backend.generator("cpu")`, so `tinydiff.manual_seed(s)` makes them repeat.
Parameters are float32; `module.double()` (or `.to(np.float64)`) for gradient checks.
"""
import math

import numpy as np

from tinydiff import backend
from tinydiff import functional as F
from tinydiff.module import Module, Parameter  # noqa: F401  (nn.Module, nn.Parameter as in torch)
from tinydiff.tensor import Tensor


def _uniform(shape, bound):
    return Parameter(backend.generator("cpu").uniform(-bound, bound, shape).astype(np.float32))



# ---------------------------------------------------------------------------------------------
# Layers with weights


class Linear(Module):
    """y = x @ W^T + b; W (out_features, in_features)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
        self.weight = _uniform((out_features, in_features), bound)
        self.bias = _uniform((out_features,), bound) if bias else None

    def forward(self, x):                                        # (..., in) -> (..., out)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """2-D convolution, weight (out, in, kh, kw); output size (H + 2p - k) // s + 1."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        kh, kw = F._pair(kernel_size)
        self.stride, self.padding = stride, padding
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        bound = 1 / math.sqrt(in_channels * kh * kw)
        self.weight = _uniform((out_channels, in_channels, kh, kw), bound)
        self.bias = _uniform((out_channels,), bound) if bias else None

    def forward(self, x, shift=None, residual=None):             # (B, in, H, W) -> (B, out, H', W')
        """With shift (B, out) and/or residual (B, out, H', W'): conv(x) + shift + residual, fused
        (F.conv2d_add)."""
        if shift is None and residual is None:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        return F.conv2d_add(x, self.weight, self.bias, self.stride, self.padding, shift, residual)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class ConvTranspose2d(Module):
    """Transposed convolution, weight (in, out, kh, kw); output size (H - 1) * s - 2p + k."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
        super().__init__()
        kh, kw = F._pair(kernel_size)
        self.stride, self.padding = stride, padding
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        bound = 1 / math.sqrt(out_channels * kh * kw)            # PyTorch's fan_in: weight.shape[1] * kh * kw
        self.weight = _uniform((in_channels, out_channels, kh, kw), bound)
        self.bias = _uniform((out_channels,), bound) if bias else None

    def forward(self, x):                                        # (B, in, H, W) -> (B, out, H', W')
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class BatchNorm2d(Module):
    """Normalise each channel by the batch's statistics (training) or the running ones (eval).
    Buffers as in PyTorch: running_mean, running_var (unbiased), num_batches_tracked."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, np.float32)) if affine else None
        self.bias = Parameter(np.zeros(num_features, np.float32)) if affine else None
        self.register_buffer("running_mean", Tensor(np.zeros(num_features, np.float32)))
        self.register_buffer("running_var", Tensor(np.ones(num_features, np.float32)))
        self.register_buffer("num_batches_tracked", Tensor(np.zeros((), np.int64)))

    def forward(self, x, then_gelu=False):                       # (B, C, H, W) -> (B, C, H, W)
        """then_gelu=True: gelu(batch norm of x) as one fused op (F.batch_norm_gelu)."""
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d({self.num_features}): expected input (B, {self.num_features}, H, W), "
                             f"got shape {x.shape}")
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.data += 1
            if momentum is None:                                 # cumulative average, as PyTorch
                momentum = 1.0 / int(self.num_batches_tracked.item())
        norm = F.batch_norm_gelu if then_gelu else F.batch_norm
        return norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, momentum, self.eps)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class GroupNorm(Module):
    """Normalise over groups of channels (and H, W) of each sample; no batch statistics."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels {num_channels} is not divisible by num_groups {num_groups}")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = Parameter(np.ones(num_channels, np.float32)) if affine else None
        self.bias = Parameter(np.zeros(num_channels, np.float32)) if affine else None

    def forward(self, x, then_silu=False):                       # (B, C, ...) -> (B, C, ...)
        """then_silu=True: silu(group norm of x) as one fused op (F.group_norm_silu)."""
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm({self.num_groups}, {self.num_channels}): got input shape {x.shape}")
        norm = F.group_norm_silu if then_silu else F.group_norm
        return norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


class LayerNorm(Module):
    """Normalise over the last dimensions, of shape normalized_shape."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.weight = Parameter(np.ones(shape, np.float32)) if elementwise_affine else None
        self.bias = Parameter(np.zeros(shape, np.float32)) if elementwise_affine else None

    def forward(self, x):                                        # (..., *normalized_shape)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Embedding(Module):
    """A lookup table: integer indices (...) -> rows of weight (num_embeddings, embedding_dim)."""

    def __init__(self, num_embeddings, embedding_dim):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(backend.generator("cpu").standard_normal(
            (num_embeddings, embedding_dim)).astype(np.float32))

    def forward(self, idx):                                      # (...) ints -> (..., dim)
        return F.embedding(idx, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


def multi_head_attention(q, k, v, heads, key_padding_mask=None):
    """Multi-head attention of projected q (B, Lq, C), k, v (B, Lk, C): C splits into `heads` heads of
    d = C / heads, each attends on its own (F.scaled_dot_product_attention), the heads join again
    (Vaswani et al. 2017, arXiv:1706.03762, Sec. 3.2.2). key_padding_mask (B, Lk) bool, True = padding."""
    b, lq, c = q.shape
    d = c // heads

    def split(y):                                                # (B, L, C) -> (B, heads, L, d)
        return y.view(b, y.shape[1], heads, d).permute(0, 2, 1, 3)

    y = F.scaled_dot_product_attention(split(q), split(k), split(v), key_padding_mask)   # (B, heads, Lq, d)
    return y.permute(0, 2, 1, 3).reshape(b, lq, c)              # (B, Lq, C)


class MultiheadAttention(Module):
    """Attention of `query` tokens (B, Lq, embed_dim) to `context` tokens (B, Lk, kdim): self-attention
    when context is query, cross-attention otherwise. Separate q, k, v, proj Linears (PyTorch's
    nn.MultiheadAttention packs q, k, v into one in_proj_weight; the math is the same)."""

    def __init__(self, embed_dim, num_heads, kdim=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim {embed_dim} does not split into {num_heads} heads")
        kdim = embed_dim if kdim is None else kdim
        self.num_heads = num_heads
        self.q, self.k, self.v = Linear(embed_dim, embed_dim), Linear(kdim, embed_dim), Linear(kdim, embed_dim)
        self.proj = Linear(embed_dim, embed_dim)

    def forward(self, query, context, key_padding_mask=None):   # (B, Lq, E), (B, Lk, kdim) -> (B, Lq, E)
        q, k, v = self.q(query), self.k(context), self.v(context)
        return self.proj(multi_head_attention(q, k, v, self.num_heads, key_padding_mask))


# ---------------------------------------------------------------------------------------------
# Layers without weights


class GELU(Module):
    def forward(self, x):
        return F.gelu(x)


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class SiLU(Module):
    def forward(self, x):
        return F.silu(x)


class Identity(Module):
    def forward(self, x):
        return x


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):                                        # (B, C, H, W) -> (B, C, H/k, W/k)
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class AvgPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):                                        # (B, C, H, W) -> (B, C, H/k, W/k)
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class Upsample(Module):
    """Nearest-neighbour upsampling by an integer factor (the only mode here)."""

    def __init__(self, scale_factor=2, mode="nearest"):
        super().__init__()
        if mode != "nearest":
            raise ValueError(f"Upsample: only mode='nearest' is implemented, got {mode!r}")
        self.scale_factor = scale_factor

    def forward(self, x):                                        # (B, C, H, W) -> (B, C, sH, sW)
        return F.upsample_nearest2d(x, self.scale_factor)


class Flatten(Module):
    def __init__(self, start_dim=1):
        super().__init__()
        self.start_dim = start_dim

    def forward(self, x):                                        # (B, C, H, W) -> (B, C*H*W)
        return x.flatten(self.start_dim)


class Dropout(Module):
    """Zeroes elements with probability p while training; the identity in eval mode."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


# ---------------------------------------------------------------------------------------------
# Containers: children named "0", "1", ... as in PyTorch


class Sequential(Module):
    """Apply the given modules in order."""

    def __init__(self, *modules):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


class ModuleList(Module):
    """A list of modules whose parameters are registered (it has no forward)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        setattr(self, str(len(self._modules)), module)
        return self

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())
