"""The autograd core: a Tensor that remembers how it was made, and backward() to differentiate it.

Every op is written in the same four steps (as in micrograd):
  1. compute the output array,
  2. wrap it in a Tensor that knows its parents,
  3. define `_backward`, which reads out.grad and adds each parent's share to parent.grad,
  4. return the output.
Each backward carries a one-line derivative comment. Broadcasting is undone in one place,
`unbroadcast` (in shape_ops.py). Composite ops (sub, div, sqrt, mean, var, ...) are built from primitives and
need no backward of their own. The ops that only move values (reshape, permute, indexing,
expand, max, cat, stack) are plain functions in shape_ops.py, which the methods here call.

A Tensor holds a NumPy array (CPU) or a CuPy array (GPU); `xp` below is whichever module
that array belongs to, so one code path serves both.
"""
import numpy as np

from tinydiff import backend, shape_ops
from tinydiff.shape_ops import cat, stack, unbroadcast  # noqa: F401  (tinydiff.cat, ...)

_grad_enabled = True


class no_grad:
    """Context manager (and decorator) that builds no graph: for sampling and evaluation."""

    def __enter__(self):
        global _grad_enabled
        self._was, _grad_enabled = _grad_enabled, False

    def __exit__(self, *exc):
        global _grad_enabled
        _grad_enabled = self._was

    def __call__(self, fn):
        def wrapped(*args, **kwargs):
            with no_grad():
                return fn(*args, **kwargs)
        wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
        return wrapped


def is_grad_enabled(): return _grad_enabled


def _as_array(data, dtype=None):
    if isinstance(data, Tensor):
        data = data.data
    if isinstance(data, np.generic):        # NumPy reductions return scalars: keep their dtype
        data = np.asarray(data)
    if backend.is_cupy_array(data) or isinstance(data, np.ndarray):
        return data if dtype is None else data.astype(dtype, copy=False)
    # Python numbers and lists become float32 by default, as in PyTorch
    return np.asarray(data, dtype=dtype or np.float32)


class Tensor:
    __array_ufunc__ = None     # ndarray * Tensor: NumPy hands the op to Tensor.__rmul__ (no object arrays)

    def __init__(self, data, requires_grad=False, dtype=None):
        self.data = _as_array(data, dtype)
        self.grad = None
        self.requires_grad = requires_grad
        self._parents = ()         # the tensors this one was computed from
        self._backward = None      # adds this tensor's grad into its parents' grads
        self._op = ""              # name of the op that made it, for error messages and printing
        self._freed = False        # True once backward() has released this op's saved arrays

    # An op's backward closure refers to its output; storing it only when the output needs a
    # gradient avoids a reference cycle (and arrays kept alive until the garbage collector runs)
    # for every op run under no_grad() or on constants.
    @property
    def _backward(self):
        return self.__dict__.get("_backward_fn")

    @_backward.setter
    def _backward(self, fn):
        self.__dict__["_backward_fn"] = fn if (fn is None or self.requires_grad) else None

    # --- plain properties ------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    device = property(lambda self: backend.device_of(self.data))
    xp = property(lambda self: backend.get_array_module(self.data))

    def __len__(self): return len(self.data)
    def size(self, dim=None): return self.data.size if dim is None else self.data.shape[dim]
    def numel(self): return self.data.size

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.numpy()!r}, device='{self.device}'{grad})"

    def numpy(self):
        """The values as a NumPy array (copied from the GPU if needed)."""
        return backend.to_device(self.data, "cpu")

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    def detach(self): return Tensor(self.data)

    def to(self, device):
        """A copy on 'cpu' or 'cuda' (itself if already there); gradients flow back across."""
        moved = backend.to_device(self.data, device)
        if moved is self.data:
            return self
        out = self._result(moved, (self,), "to")

        def _backward():
            self._accumulate(backend.to_device(out.grad, self.device))   # d(copy)/dx = 1
        out._backward = _backward
        return out

    def float(self): return self.astype(np.float32)
    def double(self): return self.astype(np.float64)

    def astype(self, dtype):
        out = self._result(self.data.astype(dtype), (self,), "astype")

        def _backward():
            self._accumulate(out.grad.astype(self.dtype))
        out._backward = _backward
        return out

    # --- graph plumbing ----------------------------------------------------------------------
    def _result(self, data, parents, op):
        """Wrap an op's output; it joins the graph only if a parent needs a gradient."""
        out = Tensor(data)
        out._op = op
        if _grad_enabled and any(p.requires_grad for p in parents):
            out.requires_grad = True
            out._parents = parents
        return out

    def _accumulate(self, grad):
        """grad of self += grad, in self's dtype. Never in place: a grad array may be shared with
        another tensor, so a leaf (a parameter) takes its own copy, which an optimizer may update."""
        if not self.requires_grad:
            return
        if grad.shape != self.shape:
            raise RuntimeError(f"internal: gradient of shape {grad.shape} for a tensor of shape "
                               f"{self.shape} (op {self._op!r})")
        grad = grad.astype(self.dtype, copy=not self._parents)
        self.grad = grad if self.grad is None else self.grad + grad

    def _lift(self, other):
        """Turn a Python number or array into a Tensor on self's device, with self's dtype."""
        if isinstance(other, Tensor):
            if other.device != self.device:
                raise ValueError(f"tensors on different devices: {self.device} and {other.device}")
            return other
        if backend.is_cupy_array(other) or isinstance(other, np.ndarray):
            return Tensor(other)
        dtype = self.dtype if self.dtype.kind == "f" else None   # int tensor * 0.5 must not round 0.5
        return Tensor(self.xp.asarray(other, dtype=dtype))

    def backward(self, grad=None, retain_graph=False):
        """Fill .grad of every tensor this one depends on (leaves keep and accumulate theirs).

        As in PyTorch, the graph is freed on the way (each op's saved arrays are released as
        soon as its backward has run); retain_graph=True keeps it for a second backward."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a scalar, got shape {self.shape}")
            grad = self.xp.ones_like(self.data)
        grad = _as_array(grad).astype(self.dtype, copy=False)
        if grad.shape != self.shape:
            raise ValueError(f"backward(): gradient shape {grad.shape} != tensor shape {self.shape}")

        # Topological order by an iterative depth-first search: a U-Net's graph is deeper than
        # Python's recursion limit. A node is appended after all of its parents.
        order, visited, todo = [], set(), [(self, False)]
        while todo:
            node, parents_done = todo.pop()
            if parents_done:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            if node._freed:
                raise RuntimeError("backward() through a graph that a previous backward() freed; "
                                   "pass retain_graph=True to the first call to keep it")
            visited.add(id(node))
            todo.append((node, True))
            todo.extend((p, False) for p in node._parents if id(p) not in visited)

        for node in order:                    # intermediate grads start from zero on each call
            if node._parents:
                node.grad = None
        self._accumulate(grad)
        for node in reversed(order):
            if node._parents and node.grad is not None:
                node._backward()
                node.grad = None              # free intermediate grads as soon as they are used
                if not retain_graph:          # drop the closure and its saved arrays
                    node._backward, node._parents, node._freed = None, (), True

    # --- elementwise arithmetic ---------------------------------------------------------------
    def __add__(self, other):
        other = self._lift(other)
        shape_ops.check_broadcast(self, other, "add")
        out = self._result(self.data + other.data, (self, other), "add")

        def _backward():
            self._accumulate(unbroadcast(out.grad, self.shape))     # d(a+b)/da = 1
            other._accumulate(unbroadcast(out.grad, other.shape))   # d(a+b)/db = 1
        out._backward = _backward
        return out

    def __mul__(self, other):
        other = self._lift(other)
        shape_ops.check_broadcast(self, other, "mul")
        out = self._result(self.data * other.data, (self, other), "mul")

        def _backward():
            if self.requires_grad:
                self._accumulate(unbroadcast(out.grad * other.data, self.shape))   # d(a*b)/da = b
            if other.requires_grad:
                other._accumulate(unbroadcast(out.grad * self.data, other.shape))  # d(a*b)/db = a
        out._backward = _backward
        return out

    def __pow__(self, exponent):
        if isinstance(exponent, Tensor):
            raise TypeError("pow takes a scalar exponent; for a tensor exponent use exp(b * log(a))")
        out = self._result(self.data ** exponent, (self,), "pow")

        def _backward():
            self._accumulate(out.grad * exponent * self.data ** (exponent - 1))  # d(x^n)/dx = n x^(n-1)
        out._backward = _backward
        return out

    def __neg__(self): return self * -1.0
    def __sub__(self, other): return self + (-self._lift(other))

    def __truediv__(self, other):
        if isinstance(other, (int, float)):
            return self * (1.0 / other)
        return self * self._lift(other) ** -1.0

    __radd__ = __add__
    __rmul__ = __mul__

    def __rsub__(self, other): return self._lift(other) - self
    def __rtruediv__(self, other): return self._lift(other) / self
    def __matmul__(self, other): return matmul(self, other)
    def __rmatmul__(self, other): return matmul(self._lift(other), self)

    # --- elementwise functions ----------------------------------------------------------------
    def exp(self):
        out = self._result(self.xp.exp(self.data), (self,), "exp")

        def _backward():
            self._accumulate(out.grad * out.data)              # d(e^x)/dx = e^x
        out._backward = _backward
        return out

    def log(self):
        out = self._result(self.xp.log(self.data), (self,), "log")

        def _backward():
            self._accumulate(out.grad / self.data)             # d(ln x)/dx = 1/x
        out._backward = _backward
        return out

    def sqrt(self): return self ** 0.5

    def abs(self):
        out = self._result(self.xp.abs(self.data), (self,), "abs")

        def _backward():
            self._accumulate(out.grad * self.xp.sign(self.data))   # d|x|/dx = sign(x)
        out._backward = _backward
        return out

    def clip(self, min=None, max=None):
        out = self._result(self.xp.clip(self.data, min, max), (self,), "clip")

        def _backward():
            inside = self.xp.ones(self.shape, dtype=bool)        # d clip/dx = 1 inside, 0 outside
            if min is not None:
                inside &= self.data >= min
            if max is not None:
                inside &= self.data <= max
            self._accumulate(out.grad * inside)
        out._backward = _backward
        return out

    clamp = clip

    def relu(self):
        out = self._result(self.xp.maximum(self.data, 0), (self,), "relu")

        def _backward():
            self._accumulate(out.grad * (self.data > 0))         # d relu/dx = [x > 0]
        out._backward = _backward
        return out

    def sigmoid(self):
        s = 0.5 * (self.xp.tanh(0.5 * self.data) + 1)            # = 1/(1+e^-x), without overflow
        out = self._result(s.astype(self.dtype, copy=False), (self,), "sigmoid")

        def _backward():
            self._accumulate(out.grad * out.data * (1 - out.data))   # d s/dx = s (1 - s)
        out._backward = _backward
        return out

    def tanh(self):
        out = self._result(self.xp.tanh(self.data), (self,), "tanh")

        def _backward():
            self._accumulate(out.grad * (1 - out.data ** 2))     # d tanh/dx = 1 - tanh^2
        out._backward = _backward
        return out

    def maximum(self, other):
        other = self._lift(other)
        shape_ops.check_broadcast(self, other, "maximum")
        return where(self.data >= other.data, self, other)

    def minimum(self, other):
        other = self._lift(other)
        shape_ops.check_broadcast(self, other, "minimum")
        return where(self.data <= other.data, self, other)

    # --- comparisons give plain boolean arrays (no gradient), for masks and `where` ----------
    def __gt__(self, other): return self.data > self._lift(other).data
    def __lt__(self, other): return self.data < self._lift(other).data
    def __ge__(self, other): return self.data >= self._lift(other).data
    def __le__(self, other): return self.data <= self._lift(other).data

    # --- reductions ---------------------------------------------------------------------------
    def sum(self, axis=None, keepdims=False):
        out = self._result(self.data.sum(axis=axis, keepdims=keepdims), (self,), "sum")

        def _backward():
            grad = out.grad if keepdims else shape_ops.restore_axes(out.grad, axis, self.ndim)
            self._accumulate(self.xp.broadcast_to(grad, self.shape))    # d(sum x)/dx_i = 1
        out._backward = _backward
        return out

    def _count(self, axis):
        """How many elements a reduction over `axis` combines into one."""
        return self.data.size if axis is None else int(np.prod([self.shape[a] for a in shape_ops.axes(axis)]))

    def mean(self, axis=None, keepdims=False):
        return self.sum(axis=axis, keepdims=keepdims) * (1.0 / self._count(axis))

    def var(self, axis=None, keepdims=False, correction=1):
        """Variance with Bessel's correction by default, as torch.var."""
        count = self._count(axis)
        if count - correction <= 0:    # torch returns NaN here; a shape mistake should not
            raise ValueError(f"var: {count} element(s) per reduction of shape {self.shape} over axis "
                             f"{axis} leave nothing after correction={correction}")
        centered = self - self.mean(axis=axis, keepdims=True)
        return (centered * centered).sum(axis=axis, keepdims=keepdims) * (1.0 / (count - correction))

    # --- shape and index ops: their forward and backward are in shape_ops.py -------------------
    def max(self, axis=None, keepdims=False): return shape_ops.max(self, axis, keepdims)
    def reshape(self, *shape): return shape_ops.reshape(self, *shape)
    view = reshape
    def flatten(self, start_dim=0): return shape_ops.flatten(self, start_dim)
    def squeeze(self, axis): return shape_ops.squeeze(self, axis)
    def unsqueeze(self, axis): return shape_ops.unsqueeze(self, axis)
    def permute(self, *dims): return shape_ops.permute(self, *dims)
    def transpose(self, dim0, dim1): return shape_ops.transpose(self, dim0, dim1)
    T = property(lambda self: shape_ops.permute(self, tuple(reversed(range(self.ndim)))))
    def expand(self, *shape): return shape_ops.expand(self, *shape)
    def __getitem__(self, index): return shape_ops.getitem(self, index.data if isinstance(index, Tensor) else index)


# ---------------------------------------------------------------------------------------------
# Ops of several tensors


def where(condition, a, b):
    """a where condition is true, else b; the gradient goes to whichever was chosen."""
    if not isinstance(a, Tensor):                                # where(mask, 0.0, x): 0.0 joins x
        a = b._lift(a) if isinstance(b, Tensor) else Tensor(a)
    b = a._lift(b)
    condition = condition.data if isinstance(condition, Tensor) else condition
    shape_ops.check_broadcast(a, b, "where")
    out = a._result(a.xp.where(condition, a.data, b.data), (a, b), "where")

    def _backward():
        zero = a.xp.zeros((), dtype=out.grad.dtype)
        a._accumulate(unbroadcast(a.xp.where(condition, out.grad, zero), a.shape))
        b._accumulate(unbroadcast(a.xp.where(condition, zero, out.grad), b.shape))
    out._backward = _backward
    return out


def maximum(a, b): return a.maximum(b)


def matmul(a, b):
    """Batched matrix product with broadcasting of batch axes, as torch.matmul (both >= 2-D)."""
    b = a._lift(b)
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul needs tensors of at least 2 dimensions, got shapes {a.shape} and {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not fit "
                         f"({a.shape[-1]} columns against {b.shape[-2]} rows)")
    out = a._result(a.data @ b.data, (a, b), "matmul")

    def _backward():
        if a.requires_grad:   # d(AB)/dA: dA = dOut B^T
            a._accumulate(unbroadcast(out.grad @ b.data.swapaxes(-1, -2), a.shape))
        if b.requires_grad:   # d(AB)/dB: dB = A^T dOut
            b._accumulate(unbroadcast(a.data.swapaxes(-1, -2) @ out.grad, b.shape))
    out._backward = _backward
    return out


# Convenient module-level spellings of the methods
def exp(x): return x.exp()
def log(x): return x.log()
def sqrt(x): return x.sqrt()
