"""The noise generator: Philox-4x32-10, the same numbers on the CPU and on the GPU.

A counter-based generator (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3")
is a keyed function of a counter, block = philox(counter, key): the n-th block costs the same
as the first, needs no earlier one, and can be computed by any thread of any device. So its
whole state is the key (chosen by the seed) and the counter (how far the stream has been read):
six 32-bit words, which a checkpoint saves as JSON and a resumed run restores exactly.

    rng = Philox(seed=0)
    eps = rng.normal((B, C, H, W), np.float32, xp)      # xp: numpy, or cupy for the GPU
    t = rng.integers(0, T, (B,), xp)
    state = rng.state_dict()                            # {"key": [k0, k1], "counter": [c0, c1, c2, c3]}

The stream is a sequence of 32-bit words; `counter` is the position of the next one (128 bits,
low word first), and every draw reads the next words in order: n values of normal, random or
integers take n words, so drawing n values and then m is drawing n + m. The words come from the
kernels of tinydiff/kernels.py (philox_uint32, philox_normal): the C++ kernel for NumPy arrays,
the CUDA kernel for CuPy arrays, the NumPy reference where they are not built. The maps from
words to numbers are written out there; the integers and uniforms are exact, so they are equal
on every backend, and the normals are equal to within one float32 ulp (float64: a few ulps).

tinydiff's default noise generator (`default_generator()`, for training_loss and the samplers
when no generator or seed is given) is seeded by tinydiff.manual_seed(seed).
"""
import secrets

import numpy as np

from tinydiff import backend, kernels

_WORD = 2**32
_POSITIONS = 2**128          # the stream's length in words


def _shape(shape):
    return tuple(shape) if isinstance(shape, (tuple, list)) else (int(shape),)


def _words(value, count):
    """A non-negative int as `count` uint32 words, low first."""
    return [(value >> (32 * i)) & (_WORD - 1) for i in range(count)]


class Philox:
    """Philox-4x32-10 with key from `seed` (an int in [0, 2^64); None: a random key) and counter 0."""

    def __init__(self, seed=None):
        if seed is None:
            seed = secrets.randbits(64)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise ValueError(f"Philox: seed must be an int in [0, 2**64), got {seed!r}")
        self.key = _words(int(seed), 2)          # (k0, k1)
        self.position = 0                        # the counter: the next word's index in the stream

    # --- the state: key and counter, six JSON-safe ints

    def state_dict(self):
        return {"key": list(self.key), "counter": _words(self.position, 4)}

    def load_state_dict(self, state):
        key, counter = state.get("key"), state.get("counter")
        ok = (isinstance(key, list) and len(key) == 2 and isinstance(counter, list) and len(counter) == 4
              and all(isinstance(w, int) and not isinstance(w, bool) and 0 <= w < _WORD for w in key + counter))
        if not ok:
            raise ValueError(f"Philox.load_state_dict: expected {{'key': 2 uint32 ints, 'counter': 4 uint32 ints}}, "
                             f"got {state!r}")
        self.key, self.position = list(key), sum(w << (32 * i) for i, w in enumerate(counter))

    # --- draws: each takes the next n words of the stream

    def _take(self, n):
        """The key and counter arrays of the next n words, and the counter moved past them."""
        key = np.array(self.key, dtype=np.uint32)
        counter = np.array(_words(self.position, 4), dtype=np.uint32)
        self.position = (self.position + n) % _POSITIONS
        return key, counter

    def uint32(self, n, xp=np):
        """The next n words, (n,) uint32 on xp's device."""
        return kernels.philox_uint32(*self._take(n), n, xp)

    def normal(self, shape, dtype=np.float32, xp=np):
        """Standard normals of `shape` in dtype (float32 or float64), Box-Muller (kernels.py)."""
        shape = _shape(shape)
        n = int(np.prod(shape))
        return kernels.philox_normal(*self._take(n), n, dtype, xp).reshape(shape)

    def random(self, shape, dtype=np.float64, xp=np):
        """Uniforms in [0, 1): float64 x 2^-32, float32 (x >> 8) 2^-24, both exact."""
        shape = _shape(shape)
        x = self.uint32(int(np.prod(shape)), xp).reshape(shape)
        if np.dtype(dtype) == np.float32:
            return (x >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
        if np.dtype(dtype) == np.float64:
            return x.astype(np.float64) * 2.0**-32
        raise TypeError(f"Philox.random: dtype must be float32 or float64, got {np.dtype(dtype)}")

    def integers(self, low, high, shape, xp=np):
        """int64 in [low, high): low + floor(x (high - low) / 2^32) (Lemire's multiply-shift, without
        rejection: each value's probability is off by at most (high - low) / 2^32 of itself)."""
        span = int(high) - int(low)
        if not 1 <= span <= _WORD:
            raise ValueError(f"Philox.integers: need 1 <= high - low <= 2**32, got [{low}, {high})")
        shape = _shape(shape)
        x = self.uint32(int(np.prod(shape)), xp).reshape(shape).astype(np.uint64)
        return ((x * np.uint64(span)) >> np.uint64(32)).astype(np.int64) + int(low)

    def __repr__(self):
        return f"Philox(key={self.key}, counter={self.position})"


def default_generator():
    """tinydiff's noise generator: one Philox, seeded by the last tinydiff.manual_seed (a random
    key before any), made again by each manual_seed."""
    return backend.seeded_generator("philox", Philox)


def check_generator(generator):
    """`generator` if it is a Philox, the default generator for None; else a TypeError: NumPy's and
    CuPy's generators give other numbers on the CPU and the GPU, and CuPy's state cannot be saved."""
    if generator is None:
        return default_generator()
    if not isinstance(generator, Philox):
        raise TypeError(f"generator must be a tinydiff.philox.Philox (the same numbers on CPU and GPU), got "
                        f"{type(generator).__module__}.{type(generator).__name__}: use Philox(seed), or seed=")
    return generator


def get_state():
    """The default generator's state, for checkpoints."""
    return default_generator().state_dict()


def set_state(state):
    default_generator().load_state_dict(state)
