"""Checkpoints: weights in safetensors, and everything else needed to resume training exactly.

No pickle anywhere: arrays go into safetensors files (a JSON header and raw bytes), the rest
into JSON. Arrays are moved to the CPU first, so a GPU-trained checkpoint loads on a CPU and back.

Weights, one file (for sharing, sampling, and PyTorch):
    save_weights(model, "model.safetensors")          keys = model.state_dict() keys, PyTorch's
    load_weights(model, "model.safetensors", strict=True)
  In PyTorch: model.load_state_dict(safetensors.torch.load_file("model.safetensors")).
  The metadata holds a sha256 of the tensors, checked on loading when present.

Training state, a run folder:
    save_checkpoint(run_dir, model, optimizer, step, ema=None, extra=None, config=None, keep=1)
    info = load_checkpoint(run_dir, model, optimizer=None, ema=None)  # {"step", "config", "extra"}
    info = load_checkpoint(run_dir)           # only read step/config/extra, e.g. to build the model

    run_dir/
      checkpoint.json              the manifest: the complete checkpoints, oldest first, each with
                                   its step, its folder, and every file's size and sha256
      step-00001000/
        model.safetensors          model weights (as save_weights)
        ema.safetensors            EMA weights under the same keys (when an EMA is given)
        train_state.safetensors    the arrays of the training state (optimizer moments)
        train_state.json           the rest: step, model config, the generators' states (NumPy's,
                                   backend.get_rng_state, and the noise generator's key and counter,
                                   philox.get_state), optimizer hyper-parameters and step
                                   counts, EMA decay, `extra` (epoch, scheduler step, data-loader
                                   position, ...); an array appears as {"__tensor__": key}

      writer.lock                  held (flock) by the one process writing the run; holds its pid
      readers.lock                 held shared by processes reading a checkpoint (sample, eval)

  Crash safety: every file is written to a temporary name, flushed, fsynced and renamed
  (os.replace, atomic). A save writes a new folder, and only then replaces checkpoint.json; so
  a crash at any moment leaves the previous checkpoint complete and named by the manifest.
  Folders the manifest does not name (a crashed save, or older than `keep`) are removed by the
  next save. Loading recomputes each file's sha256 and refuses one that changed or is missing.
  The noise of training (and dropout) comes from tinydiff.philox on every device, and its state
  is saved, so resumption is exact on the GPU as on the CPU.
  A write that fails (a full disk, an I/O error) raises WriteError naming the file and the error;
  the half-written folder is removed and the previous checkpoint stays the current one.

  One writer, many readers: `with RunLock(run_dir):` makes this process the run's only writer (a
  second one is refused with the holder's pid; the kernel frees the lock however the holder dies,
  SIGKILL too). `with reading(run_dir):` keeps the checkpoint a reader found on disk until it is
  done: a save that replaces it meanwhile leaves the old folder for a later save to remove.

Every refusal is a CheckpointError (a ValueError) that names the file, and for a model that does
not fit, the keys and shapes.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from tinydiff import backend, module, philox
from tinydiff.arrays import as_array
from tinydiff.tensor import Tensor

FORMAT, VERSION = "tinydiff-checkpoint", 1
MANIFEST = "checkpoint.json"
WRITER_LOCK, READERS_LOCK = "writer.lock", "readers.lock"
STEP_DIR = re.compile(r"^step-\d{8}(-\d+)?$")     # our folders; nothing else is ever removed


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated, inconsistent, or does not fit the model."""


class RunLocked(CheckpointError):
    """Another process is writing this run folder."""


class WriteError(OSError):
    """A file could not be written (a full disk, an I/O error); the file there before is unchanged."""


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, hashes, safetensors with the path in every error

def write_atomic(path, data):
    """Write bytes to `path` so that it holds either the old or the new content, never a part."""
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(err, OSError):
            raise WriteError(f"{path}: not written ({err.strerror or err}); "
                             f"the file there before, if any, is unchanged") from err
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(path):
    """Make a rename durable: fsync the folder that holds it (not possible on every OS)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tensors_digest(arrays):
    """sha256 over names, dtypes, shapes and bytes of the arrays, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.asarray(arrays[name], order="C")
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _to_cpu(value):          # saving: the copy to the host is asked for
    return np.asarray(as_array(value, "cpu", copy=True), order="C")   # (ascontiguousarray makes 0-d 1-d)


def _safetensors_bytes(arrays, metadata=None):
    metadata = {"format": "pt", "tinydiff.sha256": _tensors_digest(arrays), **(metadata or {})}
    return safetensors.numpy.save(arrays, metadata=metadata)


def read_safetensors(path):
    """(arrays, metadata) of a safetensors file; CheckpointError naming the file if unreadable."""
    path = str(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: not a valid safetensors file, truncated or corrupt ({err})") from err
    digest = metadata.get("tinydiff.sha256")
    if digest is not None and digest != _tensors_digest(arrays):
        raise CheckpointError(f"{path}: corrupt: the tensors do not match the sha256 in its header")
    return arrays, metadata


# ---------------------------------------------------------------------------------------------
# Weights

def save_weights(model, path, metadata=None):
    """Write model.state_dict() (or a dict name -> Tensor/array) to a safetensors file, atomically."""
    state = model.state_dict() if hasattr(model, "state_dict") else model
    write_atomic(str(path), _safetensors_bytes({k: _to_cpu(v) for k, v in state.items()}, metadata))


def check_fits(arrays, model, path, strict=True):
    """Refuse weights that do not fit the model, in module.check_fits's words, naming the file."""
    try:
        module.check_fits(model, {k: tuple(a.shape) for k, a in arrays.items()}, strict)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


def load_weights(model, path, strict=True):
    """Load a safetensors weights file into `model` (onto its device, in its dtypes)."""
    arrays, _ = read_safetensors(path)
    check_fits(arrays, model, path, strict)
    model.load_state_dict(arrays, strict=strict)
    return model


# ---------------------------------------------------------------------------------------------
# Training state: a tree of dicts/lists/numbers with arrays in it -> JSON + a safetensors file

def _split(tree, key, arrays):
    """Copy of `tree` with each array replaced by {"__tensor__": key}; arrays[key] = the array."""
    if isinstance(tree, dict):
        for k in tree:
            if not isinstance(k, str):
                raise TypeError(f"checkpoint state: key {k!r} under {key!r} is not a string")
        return {k: _split(v, f"{key}.{k}", arrays) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split(v, f"{key}.{i}", arrays) for i, v in enumerate(tree)]
    if isinstance(tree, Tensor) or isinstance(tree, np.ndarray) or backend.is_cupy_array(tree):
        arrays[key] = _to_cpu(tree)
        return {"__tensor__": key}
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def _join(tree, arrays):
    """Inverse of _split."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return arrays[tree["__tensor__"]]
        return {k: _join(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join(v, arrays) for v in tree]
    return tree


# ---------------------------------------------------------------------------------------------
# Run folders

def _read_manifest(run_dir):
    path = os.path.join(run_dir, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no checkpoint here (manifest not found)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("version") != VERSION or not manifest.get("checkpoints"):
        raise CheckpointError(f"{path}: not a {FORMAT} manifest of version {VERSION}")
    return manifest


def save_checkpoint(run_dir, model, optimizer, step, ema=None, extra=None, config=None, keep=1):
    """Save model, optimizer, EMA, generator state and `extra` as the run's newest checkpoint.

    `step`: optimizer steps done (resume with `range(info["step"], total)`); `config`: the
    JSON-able model config (to rebuild the model); `extra`: anything else to resume (epoch,
    data-loader position, ...), JSON values and arrays (tuples come back as lists).
    Keeps the newest `keep` checkpoints. Returns the new checkpoint's folder.
    """
    step = int(step)
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    arrays = {}      # everything is serialised first: a value JSON cannot hold fails before any write
    state = {"step": step, "config": config, "rng": backend.get_rng_state(), "noise": philox.get_state(),
             "optimizer": _split(optimizer.state_dict(), "optimizer", arrays) if optimizer else None,
             "ema_decay": ema.decay if ema is not None else None,
             "extra": _split(extra, "extra", arrays)}
    files = {"model.safetensors": _safetensors_bytes(
                 {k: _to_cpu(v) for k, v in model.state_dict().items()}, {"step": str(step)}),
             "train_state.safetensors": _safetensors_bytes(arrays, {"step": str(step)}),
             "train_state.json": json.dumps(state, indent=1).encode()}
    if ema is not None:
        files["ema.safetensors"] = _safetensors_bytes(
            {k: _to_cpu(v) for k, v in ema.state_dict().items()}, {"step": str(step)})

    os.makedirs(run_dir, exist_ok=True)
    has_manifest = os.path.exists(os.path.join(run_dir, MANIFEST))
    old = _read_manifest(run_dir)["checkpoints"] if has_manifest else []
    name, n = f"step-{step:08d}", 0
    while os.path.exists(os.path.join(run_dir, name)):   # never overwrite a folder in use
        n += 1
        name = f"step-{step:08d}-{n}"
    folder = os.path.join(run_dir, name)
    entry = {"step": step, "dir": name,
             "files": {f: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                       for f, d in files.items()}}
    kept = (old + [entry])[-keep:]
    manifest = {"format": FORMAT, "version": VERSION, "checkpoints": kept}
    try:
        os.makedirs(folder)
        for filename, data in files.items():
            write_atomic(os.path.join(folder, filename), data)
        _fsync_dir(run_dir)
        write_atomic(os.path.join(run_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
    except OSError as err:         # a full disk, an I/O error: the manifest still names the old one
        shutil.rmtree(folder, ignore_errors=True)
        previous = f"its checkpoint of step {old[-1]['step']} is intact" if old else "it has no checkpoint yet"
        raise WriteError(f"the checkpoint of step {step} was not saved: {err}. {run_dir}: {previous}") from err
    # The new checkpoint is now the current one. Remove the folders the manifest no longer names,
    # and a temporary manifest a killed process may have left; unless a reader holds one (then a
    # later save removes them).
    named = {c["dir"] for c in kept}
    with _no_readers(run_dir) as alone:
        for d in os.listdir(run_dir) if alone else []:
            if STEP_DIR.match(d) and d not in named:
                shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
            elif d.startswith(MANIFEST + ".tmp-"):
                os.remove(os.path.join(run_dir, d))
    return folder


# ---------------------------------------------------------------------------------------------
# One writer per run folder; readers keep the checkpoint they are reading (fcntl.flock: the
# kernel drops a process's locks when it exits, however it dies, so no lock is ever stale)

class RunLock:
    """`with RunLock(run_dir):` this process is the only writer of the run; else RunLocked."""

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, WRITER_LOCK)

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise RunLocked(f"{os.path.dirname(self.path)} is being written by process {holder} "
                            f"(it holds {self.path}): one writer per run folder") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)   # for the message of a refused writer
        return self

    def __exit__(self, *exc):
        os.ftruncate(self.fd, 0)
        os.close(self.fd)                                     # closing drops the lock


@contextlib.contextmanager
def reading(run_dir):
    """Within `with reading(run_dir):` the checkpoint a reader finds stays on disk (a shared lock
    on readers.lock, which save_checkpoint checks before it removes old folders)."""
    path = os.path.join(run_dir, READERS_LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:            # not a folder, or one we cannot write: then nobody writes it either
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)                        # waits only while a save removes folders
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _no_readers(run_dir):
    """Yields True, holding readers.lock exclusively, when no reader holds it; else False at once."""
    try:
        fd = os.open(os.path.join(run_dir, READERS_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:            # (a full disk): remove nothing now, a later save will
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:
        alone = False
    try:
        yield alone
    finally:
        os.close(fd)


def load_checkpoint(run_dir, model=None, optimizer=None, ema=None, step=None, restore_rng=True):
    """Restore the newest checkpoint (or the kept one at `step`) into the given objects.

    Returns {"step", "config", "extra", "dir"}. With a model, also restores the generators, NumPy's
    and the noise generator (unless restore_rng=False); without one, only reads (e.g. the config).
    """
    with reading(run_dir):     # the folder stays while we read it, even if a trainer saves meanwhile
        return _load_checkpoint(run_dir, model, optimizer, ema, step, restore_rng)


def _load_checkpoint(run_dir, model, optimizer, ema, step, restore_rng):
    manifest = _read_manifest(run_dir)
    entries = [c for c in manifest["checkpoints"] if step is None or c["step"] == step]
    if not entries:
        raise CheckpointError(f"{run_dir}: no checkpoint at step {step} (kept: "
                              f"{[c['step'] for c in manifest['checkpoints']]})")
    entry = entries[-1]
    folder = os.path.join(run_dir, entry["dir"])
    for filename, expect in entry["files"].items():     # the files must be the ones we wrote
        path = os.path.join(folder, filename)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: missing (named by {MANIFEST})")
        size = os.path.getsize(path)
        if size != expect["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {expect['bytes']} (truncated?)")
        if _sha256_file(path) != expect["sha256"]:
            raise CheckpointError(f"{path}: corrupt (sha256 differs from the manifest)")

    path = os.path.join(folder, "train_state.json")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt JSON ({err})") from err
    if state.get("step") != entry["step"]:
        raise CheckpointError(f"{path}: step {state.get('step')} but the manifest says {entry['step']}")
    arrays, _ = read_safetensors(os.path.join(folder, "train_state.safetensors"))
    state = _join(state, arrays)

    if model is not None:
        load_weights(model, os.path.join(folder, "model.safetensors"))
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{path}: the checkpoint has no optimizer state")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: optimizer state does not fit: {err}") from err
    if ema is not None:
        ema_path = os.path.join(folder, "ema.safetensors")
        if "ema.safetensors" not in entry["files"]:
            raise CheckpointError(f"{ema_path}: the checkpoint has no EMA weights")
        ema_arrays, _ = read_safetensors(ema_path)
        check_fits(ema_arrays, ema.model, ema_path)
        ema.load_state_dict(ema_arrays)
        ema.decay = state["ema_decay"]
    if model is not None and restore_rng:
        backend.set_rng_state(state["rng"])
        if "noise" in state:                # absent from checkpoints older than tinydiff.philox
            philox.set_state(state["noise"])
    return {"step": state["step"], "config": state["config"], "extra": state["extra"], "dir": folder}
