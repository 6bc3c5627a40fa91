"""Putting a value on a device: the one way, and its one rule.

    as_array(value, "cuda")             # a CuPy array, a Tensor on the GPU, a number or a list
    as_array(host_array, "cuda", copy=True)   # a NumPy array: copied to the GPU because asked to

A Tensor gives its array (the graph is dropped), numbers and lists become arrays on the device
(they live on none yet), and an array already on the device is returned as it is. An array on
the OTHER device is refused unless copy=True: a host-to-device copy (or back) costs time and
memory, so it is written where it happens (STYLE.md: no copies hidden in wrappers). The error
names the fix. backend.to_device is the explicit copy; as_array(..., copy=True) is the same.
"""
import numpy as np

from tinydiff import backend
from tinydiff.tensor import Tensor


def as_array(value, device, copy=False):
    """value (a Tensor, NumPy/CuPy array, number or list) as an array on device 'cpu' or 'cuda'."""
    if isinstance(value, Tensor):
        value = value.data
    if not (isinstance(value, np.ndarray) or backend.is_cupy_array(value)):
        value = np.asarray(value)                               # numbers and lists: on no device yet
        return backend.to_device(value, device)
    here = backend.device_of(value)
    if here != device and not copy:
        raise ValueError(f"a {'CuPy' if here == 'cuda' else 'NumPy'} array ({here}, shape {value.shape}) "
                         f"was given where a {device} array is due: move it first with "
                         f"backend.to_device(x, {device!r}); tinydiff does not copy between devices "
                         f"behind your back")
    return backend.to_device(value, device)


def as_labels(labels, num_classes, device, who):
    """Class labels (B,) as int64 on device, refused (naming `who`) unless integers in [0, num_classes)."""
    labels = as_array(labels, device)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{who}: labels must be (B,) integers, got shape {labels.shape} dtype {labels.dtype}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{who}: labels must lie in [0, {num_classes}), got min {int(labels.min())} "
                         f"max {int(labels.max())}")
    return labels.astype(np.int64, copy=False)
