"""The shape, index and join ops of the autograd core: they move values, they compute none.

Each op is written in tensor.py's four steps (output array, Tensor with parents, `_backward`,
return), as a plain function of a Tensor `x`; the Tensor methods (`x.reshape(...)`,
`x[i]`, ...) call these in one line. They reach a Tensor only through its methods
(`_result`, `_accumulate`, `_lift`), so this file imports nothing of tensor.py and sits below it.

The backward of a shape op puts each gradient back where its value came from: reshape back,
permute by the inverse permutation, sum over what broadcasting or expand copied, scatter to
the indexed places, split what cat joined.
"""
import numpy as np

from tinydiff import backend


def unbroadcast(grad, shape):
    """Sum `grad` down to `shape`: the backward of NumPy broadcasting (e.g. (3,1,5)*(4,5))."""
    while grad.ndim > len(shape):          # leading axes that broadcasting added
        grad = grad.sum(axis=0)
    stretched = [axis for axis, size in enumerate(shape) if size == 1 and grad.shape[axis] != 1]
    k = len(stretched)
    if k and grad.size and stretched == list(range(grad.ndim - k, grad.ndim)):
        # trailing axes, as for (B, C, 1, 1) + (B, C, H, W): a matrix-vector product with ones
        # (NumPy's own sum over a few trailing values took 3-9x as long at the UNet's shapes)
        xp = backend.get_array_module(grad)
        rows = xp.ascontiguousarray(grad).reshape(-1, int(np.prod(grad.shape[-k:])))
        return (rows @ xp.ones(rows.shape[1], dtype=grad.dtype)).reshape(grad.shape[:-k] + (1,) * k)
    for axis in stretched:                 # axes of size 1 that broadcasting stretched
        grad = grad.sum(axis=axis, keepdims=True)
    return grad


def check_broadcast(a, b, op):
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast together") from None


def axes(axis):
    """The axes a reduction over `axis` (an int or a tuple of ints) combines."""
    return (axis,) if isinstance(axis, int) else tuple(axis)


def restore_axes(grad, axis, ndim):
    """Put back the axes that a reduction without keepdims removed, as size 1."""
    if axis is None:
        return grad.reshape((1,) * ndim)
    shape = list(grad.shape)
    for a in sorted(a % ndim for a in axes(axis)):
        shape.insert(a, 1)
    return grad.reshape(shape)


def _shape_arg(shape):
    """reshape(2, 3) and reshape((2, 3)) mean the same, as in PyTorch."""
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape


def reshape(x, *shape):
    out = x._result(x.data.reshape(_shape_arg(shape)), (x,), "reshape")

    def _backward():
        x._accumulate(out.grad.reshape(x.shape))                  # the same values, back in x's shape
    out._backward = _backward
    return out


def flatten(x, start_dim=0):
    return reshape(x, x.shape[:start_dim] + (-1,))


def squeeze(x, axis):
    axis = axis % x.ndim
    return reshape(x, x.shape[:axis] + x.shape[axis + 1:])


def unsqueeze(x, axis):
    axis = axis % (x.ndim + 1)
    return reshape(x, x.shape[:axis] + (1,) + x.shape[axis:])


def permute(x, *dims):
    dims = tuple(d % x.ndim for d in _shape_arg(dims))              # -1 -> ndim-1, for argsort below
    out = x._result(x.data.transpose(dims), (x,), "permute")

    def _backward():
        x._accumulate(out.grad.transpose(np.argsort(dims)))          # undo the permutation
    out._backward = _backward
    return out


def transpose(x, dim0, dim1):
    dims = list(range(x.ndim))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return permute(x, dims)


def expand(x, *shape):
    shape = _shape_arg(shape)
    shape = tuple(s if s != -1 else x.shape[i - len(shape) + x.ndim] for i, s in enumerate(shape))
    out = x._result(x.xp.broadcast_to(x.data, shape), (x,), "expand")

    def _backward():
        x._accumulate(unbroadcast(out.grad, x.shape))                # each copy adds its gradient
    out._backward = _backward
    return out


def _is_basic(index):
    """True for an index of ints and slices only (no arrays), which cannot pick an element twice."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in parts)


def getitem(x, index):
    """x[index] for an index of ints, slices, None, ... and integer or boolean arrays."""
    out = x._result(x.data[index], (x,), "getitem")

    def _backward():                                     # d x[i]/dx_j = [i == j]
        grad = x.xp.zeros_like(x.data)
        if _is_basic(index):
            grad[index] = out.grad                       # slices pick each element at most once
        else:
            backend.scatter_add(grad, index, out.grad)   # repeated integer indices add up
        x._accumulate(grad)
    out._backward = _backward
    return out


def max(x, axis=None, keepdims=False):
    """Maximum over an axis; the gradient goes to the first maximal element, as torch.max(dim)."""
    xp = x.xp
    flat = reshape(x, -1) if axis is None else x
    ax = 0 if axis is None else axis % x.ndim
    idx = xp.expand_dims(xp.argmax(flat.data, axis=ax), ax)
    onehot = xp.arange(flat.shape[ax]).reshape([-1 if i == ax else 1 for i in range(flat.ndim)]) == idx
    picked = flat._result(xp.take_along_axis(flat.data, idx, axis=ax), (flat,), "max")

    def _backward():
        flat._accumulate(picked.grad * onehot)     # d max/dx_i = 1 for the argmax, 0 elsewhere
    picked._backward = _backward
    if not keepdims:
        return reshape(picked, ()) if axis is None else squeeze(picked, ax)
    return reshape(picked, (1,) * x.ndim) if axis is None else picked


def cat(tensors, dim=0):
    """Join tensors along an existing axis."""
    tensors = list(tensors)
    first = tensors[0]
    tensors = [first._lift(t) for t in tensors]
    dim = dim % first.ndim
    for t in tensors:
        if t.ndim != first.ndim or t.shape[:dim] + t.shape[dim + 1:] != first.shape[:dim] + first.shape[dim + 1:]:
            raise ValueError(f"cat along dim {dim}: shapes {first.shape} and {t.shape} do not fit")
    out = first._result(first.xp.concatenate([t.data for t in tensors], axis=dim), tuple(tensors), "cat")
    ends = np.cumsum([t.shape[dim] for t in tensors])

    def _backward():
        pieces = first.xp.split(out.grad, ends[:-1], axis=dim)   # each input gets its own slice
        for t, piece in zip(tensors, pieces):
            t._accumulate(piece)
    out._backward = _backward
    return out


def stack(tensors, dim=0):
    """Join tensors along a new axis."""
    tensors = list(tensors)
    for t in tensors:
        if t.shape != tensors[0].shape:
            raise ValueError(f"stack: shapes {tensors[0].shape} and {t.shape} differ")
    dim = dim % (tensors[0].ndim + 1)
    return cat([unsqueeze(t, dim) for t in tensors], dim)
