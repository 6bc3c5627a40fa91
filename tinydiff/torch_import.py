"""Read a `.pth` file written by `torch.save` without PyTorch, and without running its pickle.

The course ships its trained ContextUnet as `model_trained.pth`, a `torch.save(state_dict)`.
That is a zip archive:

    <name>/data.pkl          the pickled object graph (an OrderedDict of tensors)
    <name>/data/0, data/1    raw bytes of each storage (a flat, typed buffer)
    <name>/byteorder         "little" or "big" (absent in old files: little)
    <name>/version, ...      bookkeeping we do not need

In data.pkl each tensor is a call `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)`, and each storage a persistent id `("storage", torch.FloatStorage, key,
location, numel)`. Plain pickle would import whatever globals the file names and call them,
which is how a pickle runs code (`os.system`, `builtins.eval`). Our unpickler answers
`find_class` from a short allow-list of our own stand-ins, and refuses every other global.

    state = tinydiff.load_torch_checkpoint("model_trained.pth")   # {"init_conv.conv1.0.weight": array, ...}
    model.load_state_dict(state)
"""
import collections
import functools
import pickle
import zipfile

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global we do not allow: loading it could run arbitrary code."""


def _bfloat16_to_float32(raw):
    """bfloat16 is the top half of a float32: shift the 16 bits up and reinterpret."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


# torch storage class name -> (NumPy dtype it is stored as, conversion after reading or None)
STORAGE_DTYPES = {
    "FloatStorage": (np.float32, None), "DoubleStorage": (np.float64, None),
    "HalfStorage": (np.float16, None), "BFloat16Storage": (np.uint16, _bfloat16_to_float32),
    "LongStorage": (np.int64, None), "IntStorage": (np.int32, None),
    "ShortStorage": (np.int16, None), "CharStorage": (np.int8, None),
    "ByteStorage": (np.uint8, None), "BoolStorage": (np.bool_, None),
}


class _StorageType:
    """Stands in for torch.FloatStorage & co.: only remembers its name."""

    def __init__(self, name):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    """Our torch._utils._rebuild_tensor_v2: the view (offset, size, stride) of a flat storage,
    copied into a contiguous array. Every index it touches is checked to lie in the storage."""
    size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
    if not isinstance(storage, np.ndarray) or len(size) != len(stride):
        raise pickle.UnpicklingError("malformed tensor record in the pickle")
    offset = int(offset)
    if any(n < 0 for n in size) or any(s < 0 for s in stride) or offset < 0:
        raise pickle.UnpicklingError(f"negative size/stride/offset {size}/{stride}/{offset}")
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))   # the furthest element read
    if last >= storage.size:
        raise pickle.UnpicklingError(f"tensor of size {size}, stride {stride}, offset {offset} "
                                     f"reads past its storage of {storage.size} elements")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * item for s in stride])
    return view.copy()


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Our torch._utils._rebuild_parameter(_with_state): a Parameter is just its values here."""
    return data


REBUILD_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, zf, prefix, path):
        super().__init__(file)
        self.zf, self.prefix, self.path = zf, prefix, path
        self.byteorder = "little"
        if prefix + "byteorder" in zf.namelist():
            self.byteorder = zf.read(prefix + "byteorder").decode().strip()
        self.storages = {}            # key -> flat array, shared by every view of one storage

    def find_class(self, module, name):
        """The allow-list. Each lookup gets a fresh object, so that a BUILD opcode aimed at one
        cannot alter our own functions for later files."""
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in REBUILD_FUNCTIONS:
            return functools.partial(REBUILD_FUNCTIONS[(module, name)])
        raise UnsafePickleError(f"{self.path}: refusing to load global '{module}.{name}': only "
                                f"tensors and plain containers are allowed (the file may run code)")

    def persistent_load(self, pid):
        """("storage", storage_type, key, location, numel) -> flat NumPy array of that storage."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"{self.path}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            dtype, convert = STORAGE_DTYPES[storage_type.name]
            dtype = np.dtype(dtype).newbyteorder("<" if self.byteorder == "little" else ">")
            try:
                info = self.zf.getinfo(f"{self.prefix}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"{self.path}: storage data/{key} is missing") from None
            if info.file_size != numel * dtype.itemsize:   # checked before reading a byte of it
                raise pickle.UnpicklingError(f"{self.path}: storage data/{key} has {info.file_size} "
                                             f"bytes, expected {numel} x {dtype.itemsize}")
            raw = self.zf.read(info)
            flat = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))  # native order
            self.storages[key] = convert(flat) if convert else flat
        return self.storages[key]


def load_torch_pickle(path):
    """The object saved by torch.save (zip format), with tensors as NumPy arrays."""
    path = str(path)
    if not zipfile.is_zipfile(path):
        raise pickle.UnpicklingError(f"{path}: not a zip-format torch.save file (the legacy format "
                                     f"of _use_new_zipfile_serialization=False is not supported)")
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise pickle.UnpicklingError(f"{path}: expected one <name>/data.pkl in the archive")
        prefix = pickles[0][: -len("data.pkl")]
        with zf.open(pickles[0]) as f:
            return _RestrictedUnpickler(f, zf, prefix, path).load()


def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def load_torch_checkpoint(path, key=None):
    """A `torch.save`d state dict as {name: np.ndarray}, read without torch.

    The file may hold the state dict itself, or a plain dict with it under `key` (by default
    the first of "state_dict", "model_state_dict", "model", "ema" that is a state dict).
    bfloat16 tensors become float32; the others keep their dtype.
    """
    obj = load_torch_pickle(path)
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            raise KeyError(f"{path}: no key {key!r} at the top level")
        obj = obj[key]
    elif not _is_state_dict(obj) and isinstance(obj, dict):
        for name in ("state_dict", "model_state_dict", "model", "ema"):
            if _is_state_dict(obj.get(name)):
                obj = obj[name]
                break
    if not _is_state_dict(obj):
        found = ({k: type(v).__name__ for k, v in obj.items()} if isinstance(obj, dict)
                 else type(obj).__name__)
        raise ValueError(f"{path}: does not hold a state dict of tensors (found {found})")
    return {k: v for k, v in obj.items()}
