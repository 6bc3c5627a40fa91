"""Module: the base class that keeps a layer's parameters, buffers and children, by name.

A `Module` keeps three ordered dicts, filled by plain attribute assignment (`__setattr__`,
no metaclass): `_parameters` (Parameters: trained), `_buffers` (Tensors saved in the state
dict but not trained, e.g. BatchNorm's running statistics) and `_modules` (children).
Names join with dots, so `state_dict()` keys are PyTorch's: `down1.model.0.conv1.1.running_mean`,
and weights move between tinydiff and PyTorch one to one (through safetensors files, say).

    class Tiny(Module):
        def __init__(self):
            super().__init__()              # first: creates the three dicts
            self.fc = nn.Linear(4, 2)       # a child: its parameters are "fc.weight", "fc.bias"
        def forward(self, x):
            return self.fc(x)

The layers themselves (Linear, Conv2d, BatchNorm2d, Sequential, ...) are in nn.py.
"""
from collections import OrderedDict

import numpy as np

from tinydiff import backend
from tinydiff.arrays import as_array
from tinydiff.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module trains: requires_grad=True, found by parameters()."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter(" + super().__repr__() + ")"


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
        check_fits(self, {k: _shape(v) for k, v in state.items()}, strict)
        for k, target in own.items():
            if k in state:                           # the copy is the point here: asked for, so allowed
                value = as_array(state[k], target.device, copy=True)
                target.data[...] = value.astype(target.dtype, copy=False)
        return [k for k in own if k not in state], [k for k in state if k not in own]

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


def _shape(value):
    return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


def check_fits(model, shapes, strict=True):
    """Refuse weights (name -> shape) that do not fit model.state_dict(), naming keys and shapes.

    The one wording of a weights mismatch: load_state_dict, checkpoint.load_weights and the EMA
    all refuse through here. Shape mismatches always raise; missing and unexpected keys when strict.
    """
    own = {name: t.shape for name, t in model.state_dict().items()}
    missing = [f"{k} {own[k]}" for k in own if k not in shapes]
    unexpected = [f"{k} {shapes[k]}" for k in shapes if k not in own]
    mismatched = [f"{k}: weights {shapes[k]}, model {own[k]}" for k in own if k in shapes and shapes[k] != own[k]]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys (in the model, not the weights): {', '.join(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys (in the weights, not the model): {', '.join(unexpected)}")
    if problems:
        raise ValueError(f"the weights do not fit {type(model).__name__}: " + " | ".join(problems))
