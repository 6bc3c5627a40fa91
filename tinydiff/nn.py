"""Modules: layers that own their parameters, named and initialised as in torch.nn.

A `Module` keeps three ordered dicts, filled by plain attribute assignment (`__setattr__`,
no metaclass): `_parameters` (Parameters: trained), `_buffers` (Tensors saved in the state
dict but not trained, e.g. BatchNorm's running statistics) and `_modules` (children).
Names join with dots, so `state_dict()` keys are PyTorch's: `down1.model.0.conv1.1.running_mean`.

Initialisation follows PyTorch's defaults so that training behaves the same:
    Linear, Conv2d, ConvTranspose2d  weight ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), +1/sqrt(fan_in))
                                     bias   ~ U(-1/sqrt(fan_in), +1/sqrt(fan_in))
    fan_in = weight.shape[1] * kh * kw  (for ConvTranspose2d, weight (in, out, kh, kw), this is out*kh*kw,
                                         exactly as PyTorch computes it)
    BatchNorm2d, GroupNorm, LayerNorm weight = 1, bias = 0;   Embedding weight ~ N(0, 1)
Random numbers come from `backend.generator("cpu")`, so `tinydiff.manual_seed(s)` makes them repeat.
"""
import math
from collections import OrderedDict

import numpy as np

from tinydiff import backend
from tinydiff import functional as F
from tinydiff.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module trains: requires_grad=True, found by parameters()."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter(" + super().__repr__() + ")"


def _uniform(shape, bound):
    return Parameter(backend.generator("cpu").uniform(-bound, bound, shape).astype(np.float32))


class Module:
    """Base class of every layer and model. Subclasses call super().__init__() first."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # --- registration by attribute assignment -----------------------------------------------
    def __setattr__(self, name, value):
        if "_modules" not in self.__dict__:
            raise AttributeError(f"cannot assign {name!r} before Module.__init__() is called: "
                                 f"call super().__init__() first in {type(self).__name__}.__init__")
        for table in (self._parameters, self._buffers, self._modules):
            if name in table and not (table is self._buffers and isinstance(value, (Tensor, type(None)))):
                del table[name]                      # a name lives in one table only
        if isinstance(value, (Parameter, Module)):
            self.__dict__.pop(name, None)            # a plain attribute would hide the registered one
            (self._parameters if isinstance(value, Parameter) else self._modules)[name] = value
        elif name in self._buffers:                  # re-assigning a registered buffer
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):                     # only called when normal lookup fails
        for table in ("_parameters", "_buffers", "_modules"):
            if name in self.__dict__.get(table, ()):
                return self.__dict__[table][name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def register_buffer(self, name, tensor):
        """A saved, untrained tensor (e.g. running statistics); it moves with .to(device)."""
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"register_buffer({name!r}): expected a Tensor or None, got {type(tensor).__name__}")
        self.__dict__.pop(name, None)
        self._buffers[name] = tensor

    # --- walking the tree -------------------------------------------------------------------
    def named_children(self):
        return list(self._modules.items())

    def children(self):
        return [m for _, m in self.named_children()]

    def named_modules(self, prefix=""):
        """(name, module) for self and every descendant, parents before children."""
        out = [(prefix, self)]
        for name, child in self._modules.items():
            out += child.named_modules(prefix + "." + name if prefix else name)
        return out

    def modules(self):
        return [m for _, m in self.named_modules()]

    def _named(self, table):
        return [(prefix + ("." if prefix else "") + name, t)
                for prefix, m in self.named_modules() for name, t in getattr(m, table).items() if t is not None]

    def named_parameters(self):
        return self._named("_parameters")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        return self._named("_buffers")

    def buffers(self):
        return [b for _, b in self.named_buffers()]

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    # --- state ------------------------------------------------------------------------------
    def state_dict(self):
        """OrderedDict name -> Tensor: each module's parameters, then its buffers, then its children's.
        The Tensors are detached but share memory with the module, as in PyTorch."""
        state = OrderedDict()
        for prefix, m in self.named_modules():
            for name, t in list(m._parameters.items()) + list(m._buffers.items()):
                if t is not None:
                    state[prefix + ("." if prefix else "") + name] = t.detach()
        return state

    def load_state_dict(self, state, strict=True):
        """Copy values (Tensors or NumPy/CuPy arrays) into the existing arrays, keeping their dtype
        and device. Shape mismatches always raise; missing or unexpected keys raise when strict.
        Nothing is copied unless everything fits. Returns (missing_keys, unexpected_keys)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        mismatched = [f"{k}: checkpoint shape {tuple(np.shape(_raw(state[k])))}, model shape {own[k].shape}"
                      for k in own if k in state and tuple(np.shape(_raw(state[k]))) != own[k].shape]
        problems = []
        if mismatched:
            problems.append("shape mismatch for " + "; ".join(mismatched))
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if problems:
            raise ValueError(f"load_state_dict into {type(self).__name__}: " + " | ".join(problems))
        for k, target in own.items():
            if k in state:
                value = backend.to_device(_raw(state[k]), target.device)
                target.data[...] = value.astype(target.dtype, copy=False)
        return missing, unexpected

    # --- modes, devices, dtypes, gradients ---------------------------------------------------
    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def to(self, device=None, dtype=None):
        """Move parameters and buffers to 'cpu'/'cuda' and/or cast floating ones to `dtype`, in place
        (the Parameter objects stay the same, so an optimizer holding them keeps working)."""
        if device is not None and not isinstance(device, str):
            device, dtype = None, device             # model.to(np.float64)
        for t in self.parameters() + self.buffers():
            if device is not None:
                t.data = backend.to_device(t.data, device)
                t.grad = None if t.grad is None else backend.to_device(t.grad, device)
            if dtype is not None and t.dtype.kind == "f":
                t.data = t.data.astype(dtype)
                t.grad = None if t.grad is None else t.grad.astype(dtype)
        return self

    def double(self):
        return self.to(dtype=np.float64)

    def float(self):
        return self.to(dtype=np.float32)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def requires_grad_(self, flag=True):
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"({name}): " + repr(m).replace("\n", "\n  ") for name, m in self._modules.items()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ")" if not lines else head + "\n  " + "\n  ".join(lines) + "\n)"


def _raw(value):
    return value.data if isinstance(value, Tensor) else value


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

    def forward(self, x):                                        # (B, in, H, W) -> (B, out, H', W')
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

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

    def forward(self, x):                                        # (B, C, H, W) -> (B, C, H, W)
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d({self.num_features}): expected input (B, {self.num_features}, H, W), "
                             f"got shape {x.shape}")
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.data += 1
            if momentum is None:                                 # cumulative average, as PyTorch
                momentum = 1.0 / int(self.num_batches_tracked.item())
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, momentum, self.eps)

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

    def forward(self, x):                                        # (B, C, ...) -> (B, C, ...)
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm({self.num_groups}, {self.num_channels}): got input shape {x.shape}")
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

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
