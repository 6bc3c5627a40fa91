"""Where arrays live: NumPy on the CPU, CuPy on the GPU, and the compiled kernels if built.

There are no device classes. A tensor holds a NumPy or a CuPy array, and every op asks
`get_array_module(array)` which of the two libraries to call, as CuPy's own idiom does.
CuPy is imported lazily, on the first use of a GPU, never at `import tinydiff`.

Kernels: `tinydiff._C` (C++, OpenMP) and `tinydiff._C_cuda` (CUDA) are built by setup.py.
`TINYDIFF_KERNELS=native|numpy` (or `set_kernels`) chooses between them and the NumPy
reference implementations, so the same run can be done both ways and compared.
"""
import os

import numpy as np

# ---------------------------------------------------------------------------------------------
# NumPy or CuPy

_cupy = None          # the cupy module once imported
_cupy_error = None    # why CuPy cannot be used, once we know


def _load_cupy():
    """Import CuPy and check for a GPU; return the module or None, remembering why not."""
    global _cupy, _cupy_error
    if _cupy is not None or _cupy_error is not None:
        return _cupy
    try:
        import cupy
    except ImportError as err:
        _cupy_error = f"CuPy is not installed ({err}); install it with: pip install -e '.[gpu]'"
        return None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # no driver, no device: CuPy raises its own runtime error types
        _cupy_error = f"CuPy is installed but no CUDA GPU is usable: {err}"
        return None
    if count == 0:
        _cupy_error = "CuPy is installed but no CUDA GPU was found"
        return None
    _cupy = cupy
    return cupy


def cupy_module():
    """The cupy module, or a RuntimeError that says what is missing."""
    cupy = _load_cupy()
    if cupy is None:
        raise RuntimeError(f"cannot use device 'cuda': {_cupy_error}")
    return cupy


def is_cupy_array(array):
    return type(array).__module__.startswith("cupy")


def get_array_module(array):
    """numpy for a NumPy array (or anything else), cupy for a CuPy array."""
    return _cupy if (_cupy is not None and is_cupy_array(array)) else np


def device_of(array):
    return "cuda" if is_cupy_array(array) else "cpu"


def to_device(array, device):
    """Move an array to 'cpu' or 'cuda' (returns the same array if it is already there)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        cupy = cupy_module()
        return array if is_cupy_array(array) else cupy.asarray(array)
    return array.get() if is_cupy_array(array) else array


def scatter_add(target, index, values):
    """target[index] += values, adding repeated indices in the order they come: np.add.at on the
    CPU, scatter_add_in_order on the GPU (cupy.add.at's atomic adds would sum them in any order)."""
    if is_cupy_array(target):
        scatter_add_in_order(target, index, values)
    else:
        np.add.at(target, index, values)


def scatter_add_in_order(target, index, values):
    """np.add.at(target, index, values), bit for bit, on either array module, without atomics.

    Each value's place in target (flat) is pos; a stable sort groups equal places, keeping their
    order, and gives each value its rank r among those before it at its place. Round r adds the
    values of rank r: their places are distinct, so `target[places] += values` sees no collision,
    and every place sums its values first to last, as np.add.at does. Rounds: the largest count
    of one place (for an embedding's gradient, the most frequent index).
    """
    xp = get_array_module(target)
    if not target.flags.c_contiguous:
        raise ValueError("scatter_add_in_order: target must be C-contiguous (it is written through a flat view)")
    places = xp.arange(target.size, dtype=np.int64).reshape(target.shape)[index]    # each value's place
    vals = xp.broadcast_to(xp.asarray(values, dtype=target.dtype), places.shape).reshape(-1)
    pos, flat = places.reshape(-1), target.reshape(-1)
    if pos.size == 0:
        return
    if target.size * pos.size >= 2**63:
        raise ValueError(f"scatter_add_in_order: {pos.size} values into {target.size} places is too many to sort")
    order = xp.argsort(pos * pos.size + xp.arange(pos.size, dtype=np.int64))   # unique keys: a stable order
    pos, vals = pos[order], vals[order]
    first = xp.concatenate([xp.ones(1, dtype=bool), pos[1:] != pos[:-1]])       # where each place's run starts
    run_start = xp.flatnonzero(first)[xp.cumsum(first) - 1]                     # (n,) the start of my run
    rank = xp.arange(pos.size) - run_start
    for r in range(int(rank.max()) + 1):
        pick = rank == r
        flat[pos[pick]] += vals[pick]


# ---------------------------------------------------------------------------------------------
# Random numbers: one seeded generator per device, so the same seed gives the same run. NumPy's
# draws the initial weights; the noise of training and sampling comes from tinydiff.philox.

_generators = {}
_seed = None          # the last manual_seed, for a GPU generator made after it


def manual_seed(seed):
    """Seed tinydiff's generators (CPU, and GPU when used) for reproducible runs."""
    global _seed
    _seed = seed
    _generators.clear()
    _generators["cpu"] = np.random.default_rng(seed)
    if _cupy is not None:
        _generators["cuda"] = _cupy.random.default_rng(seed)


def generator(device="cpu"):
    """The generator for a device (numpy.random.Generator or its CuPy twin)."""
    if device not in _generators:
        _generators[device] = (np.random.default_rng(_seed) if device == "cpu"
                               else cupy_module().random.default_rng(_seed))
    return _generators[device]


def seeded_generator(name, make):
    """The generator `name`, kept beside the per-device ones: make(seed) builds it on first use
    after manual_seed (seed None before any). tinydiff.philox keeps the noise generator here."""
    if name not in _generators:
        _generators[name] = make(_seed)
    return _generators[name]


def get_rng_state():
    """The CPU generator's state as plain JSON-able data (for checkpoints)."""
    return generator("cpu").bit_generator.state


def set_rng_state(state):
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    _generators["cpu"] = rng


# ---------------------------------------------------------------------------------------------
# Compiled kernels


REBUILD_COMMAND = "TINYDIFF_CUDA=0 python setup.py build_ext --inplace"   # setup.py lists the headers:
# it rebuilds tinydiff._C when a file in csrc/ is newer, and does nothing when it is up to date


def stale_sources(built):
    """The C++ sources and headers of csrc/ newer than the extension file `built`, in a source
    checkout (csrc/ next to the package); none for an installed package, which has no csrc/."""
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    names = [n for n in os.listdir(csrc) if n.endswith(("_cpu.cpp", ".h"))] if os.path.isdir(csrc) else []
    return sorted(os.path.join(csrc, n) for n in names
                  if os.path.getmtime(os.path.join(csrc, n)) > os.path.getmtime(built))


def warn_if_stale(native):
    """Warn (once, at import) that tinydiff._C is older than its sources, with the command that
    rebuilds it. Nothing is built at import; TINYDIFF_REBUILD=0 skips the check."""
    if native is None or os.environ.get("TINYDIFF_REBUILD") == "0":
        return
    stale = stale_sources(native.__file__)
    if stale:
        import warnings
        root = os.path.dirname(os.path.dirname(stale[0]))
        warnings.warn(f"tinydiff: {', '.join(os.path.relpath(f, root) for f in stale)} changed since "
                      f"{os.path.relpath(native.__file__, root)} was built, so the C++ kernels are stale. "
                      f"Rebuild them with:\n    cd {root} && {REBUILD_COMMAND}", stacklevel=2)


def import_native():
    """tinydiff._C, with OpenMP's idle threads put to sleep at once (OMP_WAIT_POLICY=passive)
    unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT. GNU OpenMP's threads spin after each
    parallel loop by default; where two threads share one core (a 2-vCPU machine, hyper-threads)
    that spinning takes the core from the NumPy code the main thread runs between our kernels, and
    under any other load it stalls every loop (a ContextUnet step: 430 -> 390 ms idle, 2.5 s -> 0.4 s
    with another busy process). The price: back-to-back kernels wait for their threads to wake
    (benchmarks/bench_conv.py is faster with OMP_WAIT_POLICY=active). OpenMP reads the variable when
    our extension loads it, so it is set only for that import."""
    user_chose = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
    if not user_chose:
        os.environ["OMP_WAIT_POLICY"] = "passive"
    try:
        from tinydiff import _C
        return _C
    finally:
        if not user_chose:
            del os.environ["OMP_WAIT_POLICY"]


def keep_freed_memory():
    """Let glibc's malloc keep freed blocks of up to 32 MiB for the next allocation, unless the user
    set MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_. By default it hands a freed block back to
    the kernel (munmap, or trimming the heap's top), so each forward and backward pass page-faults
    its activations anew: a UNet denoising forward at batch 200 took 260k page faults and 253 ms,
    with the blocks kept 42k and 224 ms. The cost: the process keeps its peak memory. Linux (glibc)
    only; elsewhere nothing happens. Returns whether it was applied."""
    import sys
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ \
            or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):                      # not glibc (musl, ...)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3            # glibc's malloc.h
    # blocks above 32 MiB (glibc's largest threshold) are still mapped and unmapped one by one
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


keep_freed_memory()

try:
    native = import_native()
    native_error = None
except ImportError as err:
    native, native_error = None, f"the C++ extension tinydiff._C is not built ({err})"
warn_if_stale(native)

_cuda_ext = None
_cuda_ext_error = None


def cuda_kernels():
    """The CUDA kernel module tinydiff._C_cuda, or None if it is not built."""
    global _cuda_ext, _cuda_ext_error
    if _cuda_ext is None and _cuda_ext_error is None:
        try:
            from tinydiff import _C_cuda
            _cuda_ext = _C_cuda
        except ImportError as err:
            _cuda_ext_error = f"the CUDA extension tinydiff._C_cuda is not built ({err})"
    return _cuda_ext


def cuda_available(reason=False):
    """True if tinydiff can run on a GPU. With reason=True, returns (ok, why_not_or_empty)."""
    ok = _load_cupy() is not None
    why = "" if ok else _cupy_error
    if not ok and cuda_kernels() is not None:    # say also what the CUDA runtime itself sees
        count, no_gpu = _cuda_ext.device_count(reason=True)
        if count == 0:
            why += f"; {no_gpu}"
    if ok and cuda_kernels() is None:
        why = f"CuPy works, but {_cuda_ext_error}: the NumPy-style CuPy reference kernels are used"
    return (ok, why) if reason else ok


KERNEL_CHOICES = ("native", "numpy")
_kernels = os.environ.get("TINYDIFF_KERNELS", "native")
if _kernels not in KERNEL_CHOICES:
    raise ValueError(f"TINYDIFF_KERNELS must be one of {KERNEL_CHOICES}, got {_kernels!r}")


def set_kernels(name):
    """'native': the compiled C++/CUDA kernels where built; 'numpy': the NumPy/CuPy reference."""
    global _kernels
    if name not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {name!r}")
    if name == "native" and native is None:
        raise RuntimeError(f"cannot use native kernels: {native_error}")
    _kernels = name


def get_kernels():
    """The kernels asked for: 'native' (compiled where built, reference elsewhere) or 'numpy'."""
    return _kernels


_blas = []   # threadpoolctl's handle on NumPy's BLAS, made on first use (empty list: not yet)


def one_blas_thread(device="cpu"):
    """A context in which NumPy's BLAS runs on one thread, when the C++ kernels run on the CPU.
    OpenBLAS's threads spin for up to 2^28 cycles (~0.1 s) after each product, and the small
    products of our models kept them spinning on the cores our OpenMP convolutions need: a
    ContextUnet training step took 360 ms instead of 270 on 2 vCPUs. The NumPy reference kernels
    keep BLAS's threads (their convolutions are matrix products), and so does OPENBLAS_NUM_THREADS
    when the user set it. The training loop and the samplers enter it once per step (~10 us)."""
    import contextlib
    if device != "cpu" or _kernels != "native" or native is None or "OPENBLAS_NUM_THREADS" in os.environ:
        return contextlib.nullcontext()
    if not _blas:
        try:
            from threadpoolctl import ThreadpoolController
            _blas.append(ThreadpoolController().select(user_api="blas"))
        except ImportError:
            _blas.append(None)
    return _blas[0].limit(limits=1) if _blas[0] is not None else contextlib.nullcontext()
