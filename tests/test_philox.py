"""The noise generator, Philox-4x32-10 (tinydiff/philox.py, the kernels philox_uint32 and philox_normal).

  1. The block function against the published known-answer vectors of Random123 (kat_vectors).
  2. The NumPy reference, the C++ kernel and the CUDA kernel (on the CPU emulator, and on a GPU
     where there is one) give the same stream on awkward draws: one word, odd counts, counts that
     are no multiple of 4, starts inside a block, block counters whose low word (and low 64 bits)
     wrap. Words, uniforms and integers: bit for bit. Normals (log, cos, sin are each platform's):
     float32 within one float32 ulp, float64 within 4 float64 ulps, with the counts printed.
  3. The Philox class: draws read the stream in order (n then m == n + m), the state is six
     JSON-safe ints and round-trips, and the statistics of a million draws are those of N(0, 1).
  4. On a GPU only (skipped, saying why, elsewhere): the same noise for training and the same
     images from the samplers on CPU and GPU, and a GPU training run stopped and resumed ends bit
     for bit where the uninterrupted one does.

Run:  python -m pytest tests/test_philox.py -q
"""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinydiff
from tinydiff import backend, kernels
from tinydiff.philox import Philox

# Random123's kat_vectors (Salmon et al., the philox4x32 lines): rounds, counter, key, result
KAT_VECTORS = """
philox4x32 7 00000000 00000000 00000000 00000000 00000000 00000000   5f6fb709 0d893f64 4f121f81 4f730a48
philox4x32 7 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff   5207ddc2 45165e59 4d8ee751 8c52f662
philox4x32 7 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0   4dfccaba 190a87f0 c47362ba b6b5242a
philox4x32 10 00000000 00000000 00000000 00000000 00000000 00000000   6627e8d5 e169c58d bc57ac4c 9b00dbd8
philox4x32 10 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff   408f276d 41c83b0e a20bc7c6 6d5451fd
philox4x32 10 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0   d16cfe09 94fdcceb 5001e420 24126ea1
"""


def kat_cases():
    for line in KAT_VECTORS.strip().splitlines():
        name, rounds, *words = line.split()
        words = [int(w, 16) for w in words]
        yield int(rounds), words[:4], words[4:6], words[6:]


def words(value, count=4):
    return np.array([(value >> (32 * i)) & 0xFFFFFFFF for i in range(count)], dtype=np.uint32)


@pytest.mark.parametrize("rounds, counter, key, want", list(kat_cases()))
def test_block_function_gives_the_published_answers(rounds, counter, key, want):
    got = kernels.philox_block_ref(np.array([counter], np.uint32), np.array(key, np.uint32), rounds=rounds)
    assert [hex(w) for w in got[0]] == [hex(w) for w in want]


def stream_position_of_block(counter):
    """The word position of block `counter` in the stream: 4 * counter (blocks below 2^126)."""
    return 4 * sum(w << (32 * i) for i, w in enumerate(counter))


# --- the three implementations ----------------------------------------------------------------

@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from test_cuda import build_emulator
    return build_emulator(str(tmp_path_factory.mktemp("cuda_emulator_philox")))


class GpuPhilox:
    """tinydiff._C_cuda's Philox kernels, results brought back to the host (key, counter stay there)."""

    def __init__(self, cuda):
        self.cuda = cuda

    def philox_uint32(self, key, counter, n):
        return self.cuda.philox_uint32(key, counter, n).get()

    def philox_normal(self, key, counter, n, dtype):
        return self.cuda.philox_normal(key, counter, n, dtype).get()


@pytest.fixture(scope="module")
def cp():
    ok, why = tinydiff.cuda_available(reason=True)
    if not ok:
        pytest.skip(f"no usable GPU: {why}")
    if backend.cuda_kernels() is None:
        pytest.skip(f"the GPU has no tinydiff._C_cuda: {backend._cuda_ext_error}")
    return backend.cupy_module()


@pytest.fixture(params=["C++", "emulated CUDA", "gpu CUDA"])
def impl(request):
    """philox_uint32 / philox_normal of one implementation, to be compared with the NumPy reference."""
    if request.param == "C++":
        if backend.native is None:
            pytest.fail(f"tinydiff._C is not built: {backend.native_error}")
        return backend.native
    if request.param == "emulated CUDA":
        return request.getfixturevalue("emulated")
    request.getfixturevalue("cp")
    return GpuPhilox(backend.cuda_kernels())


KEY = np.array([0xA4093822, 0x299F31D0], np.uint32)
STARTS = {
    "0": 0,
    "inside a block": 3,
    "word low word wraps": 2**32 - 3,                      # the word position's c0 carries into c1
    "block low word wraps": 4 * (2**32 - 2) + 1,           # block 0xfffffffe -> 0x1_00000000 in the draw
    "block low 64 bits wrap": 4 * (2**64 - 1) - 2,         # the 64-bit half of the block counter carries
    "far": 2**100 + 12345,
}
COUNTS = [1, 2, 3, 5, 7, 8, 13, 1029]


def ulps(got, want):
    """|got - want| in units of the last place of want, in want's dtype."""
    return np.abs(got.astype(np.float64) - want.astype(np.float64)) / np.spacing(np.abs(want)).astype(np.float64)


@pytest.mark.parametrize("start", list(STARTS), ids=list(STARTS))
def test_kernels_give_the_reference_stream(impl, start):
    counter = words(STARTS[start])
    for n in COUNTS:
        want = kernels.philox_uint32_ref(KEY, counter, n)
        got = impl.philox_uint32(KEY, counter, n)
        assert got.dtype == np.uint32 and got.shape == (n,)
        assert np.array_equal(got, want), f"words, start {start}, n {n}: {np.flatnonzero(got != want)} differ"
        for dtype, max_ulps in ((np.float32, 1), (np.float64, 4)):
            want = kernels.philox_normal_ref(KEY, counter, n, dtype)
            got = impl.philox_normal(KEY, counter, n, dtype)
            assert got.dtype == dtype and got.shape == (n,)
            off = ulps(got, want)
            assert off.max() <= max_ulps, (f"normals {np.dtype(dtype).name}, start {start}, n {n}: "
                                           f"{int((off > 0).sum())} differ, largest {off.max():.1f} ulps")


def test_kernels_reach_the_published_blocks(impl):
    """The stream's block c is the block function at counter c: the KAT counters below 2^126 (the
    stream has 2^128 words, so blocks up to 2^126; the all-ones counter lies beyond it)."""
    for rounds, counter, key, want in kat_cases():
        if rounds != 10 or counter[3] >= 2**30:
            continue
        got = impl.philox_uint32(np.array(key, np.uint32), words(stream_position_of_block(counter)), 4)
        assert [hex(w) for w in got] == [hex(w) for w in want]


def test_cpu_normals_agree_with_the_reference_on_a_million_draws():
    """How close the C++ kernel's normals are to NumPy's on this machine: printed, and bounded."""
    counter = words(7)
    for dtype, max_ulps in ((np.float32, 1), (np.float64, 4)):
        got = backend.native.philox_normal(KEY, counter, 10**6, dtype)
        want = kernels.philox_normal_ref(KEY, counter, 10**6, dtype)
        off = ulps(got, want)
        print(f"{np.dtype(dtype).name}: {int((off > 0).sum())} of 10^6 differ from NumPy's, largest {off.max():.1f} ulps")
        assert off.max() <= max_ulps


def test_the_output_does_not_depend_on_the_thread_count():
    """The C++ kernel's OpenMP loop shares blocks out: one block per thread or many, the same words."""
    counter = words(2**32 - 6)
    n = 4 * (1 << 12) + 11                                  # past the size where the loop goes parallel
    assert np.array_equal(backend.native.philox_uint32(KEY, counter, n), kernels.philox_uint32_ref(KEY, counter, n))


@pytest.mark.parametrize("call, error, message", [
    (lambda m: m.philox_uint32(KEY.astype(np.int32), words(0), 3), TypeError, "philox_uint32: key must be a uint32"),
    (lambda m: m.philox_uint32([1, 2], words(0), 3), TypeError, "philox_uint32: key must be a numpy.ndarray"),
    (lambda m: m.philox_uint32(KEY, words(0)[:3], 3), ValueError, r"counter must have shape \(4,\)"),
    (lambda m: m.philox_uint32(KEY, words(0).reshape(2, 2), 3), ValueError, r"counter must have shape \(4,\)"),
    (lambda m: m.philox_uint32(KEY, np.zeros(8, np.uint32)[::2], 3), ValueError, "counter must be C-contiguous"),
    (lambda m: m.philox_uint32(KEY, words(0), -1), ValueError, "n must be in"),
    (lambda m: m.philox_uint32(KEY, words(0), 2.0), TypeError, "n must be an int"),
    (lambda m: m.philox_uint32(KEY, words(0), True), TypeError, "n must be an int"),
    (lambda m: m.philox_normal(KEY, words(0), 3, np.float16), TypeError, "dtype must be float32 or float64"),
    (lambda m: m.philox_normal(KEY, words(0), 3, "not a dtype"), TypeError, "dtype must be a NumPy dtype"),
])
def test_cpu_bindings_refuse_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call(backend.native)


def test_cuda_bindings_refuse_bad_arguments_before_any_cuda_call():
    from test_cuda import cuda_module
    mod = cuda_module()
    with pytest.raises(TypeError, match="philox_uint32: key must be a uint32"):
        mod.philox_uint32(KEY.astype(np.int64), words(0), 3)
    with pytest.raises(ValueError, match=r"philox_normal: counter must have shape \(4,\)"):
        mod.philox_normal(KEY, words(0)[:2], 3, np.float32)
    with pytest.raises(TypeError, match="philox_normal: dtype must be float32 or float64"):
        mod.philox_normal(KEY, words(0), 3, np.int32)


@given(key=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=2), start=st.integers(0, 2**128 - 2**16),
       n=st.integers(0, 70), dtype=st.sampled_from([np.float32, np.float64]))
@settings(max_examples=150, deadline=None)
def test_cpu_kernels_property(key, start, n, dtype):
    """Any key, any position, any count: the C++ kernel gives the reference's words and normals."""
    key, counter = np.array(key, np.uint32), words(start)
    assert np.array_equal(backend.native.philox_uint32(key, counter, n), kernels.philox_uint32_ref(key, counter, n))
    got, want = backend.native.philox_normal(key, counter, n, dtype), kernels.philox_normal_ref(key, counter, n, dtype)
    assert got.dtype == want.dtype and (n == 0 or ulps(got, want).max() <= (1 if dtype == np.float32 else 4))


def test_zero_words():
    assert backend.native.philox_uint32(KEY, words(5), 0).shape == (0,)
    assert kernels.philox_normal_ref(KEY, words(5), 0, np.float32).shape == (0,)


# --- the Philox class -------------------------------------------------------------------------

def draws(rng):
    """A mixed sequence of draws; returns their words' worth of values, flattened."""
    return [rng.normal((2, 3)), rng.uint32(5), rng.random((3,)), rng.integers(0, 10, (1, 3)),
            rng.normal((7,), np.float64), rng.random((2,), np.float32)]


def test_draws_read_the_stream_in_order():
    """n values then m values are the values of one draw of n + m, whatever the kind."""
    a = Philox(11)
    first, second = a.normal((3, 5)), a.normal(6)
    assert np.array_equal(np.concatenate([first.ravel(), second]), Philox(11).normal(21))
    b = Philox(11)
    b.uint32(3)
    assert np.array_equal(b.uint32(5), Philox(11).uint32(8)[3:])
    assert a.state_dict()["counter"] == [21, 0, 0, 0] and b.state_dict()["counter"] == [8, 0, 0, 0]


def test_state_round_trip_through_json():
    a = Philox(2**40 + 5)
    draws(a)
    saved = json.loads(json.dumps(a.state_dict()))       # six plain ints
    assert saved["key"] == [5, 256] and len(saved["counter"]) == 4
    rest = draws(a)
    b = Philox(0)
    b.load_state_dict(saved)
    for x, y in zip(rest, draws(b)):
        assert np.array_equal(x, y)
    assert a.state_dict() == b.state_dict()


def test_the_counter_carries_across_words():
    a = Philox(3)
    a.load_state_dict({"key": a.key, "counter": [2**32 - 2, 0, 0, 0]})
    x = a.uint32(5)
    assert a.state_dict()["counter"] == [3, 1, 0, 0]
    assert np.array_equal(x, kernels.philox_uint32_ref(np.array(a.key, np.uint32), words(2**32 - 2), 5))


@pytest.mark.parametrize("state", [{"key": [1], "counter": [0, 0, 0, 0]}, {"key": [1, 2], "counter": [0, 0, 0, -1]},
                                   {"key": [1, 2], "counter": [0, 0, 0, 2**32]}, {"key": [1, 2.0], "counter": [0] * 4},
                                   {"counter": [0] * 4}])
def test_a_bad_state_is_refused(state):
    with pytest.raises(ValueError, match="load_state_dict"):
        Philox(0).load_state_dict(state)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "0"])
def test_a_bad_seed_is_refused(seed):
    with pytest.raises(ValueError, match="seed must be an int"):
        Philox(seed)


def test_the_same_numbers_with_the_compiled_and_the_reference_kernels():
    """Philox on NumPy arrays: the C++ kernel where built; TINYDIFF_KERNELS=numpy the reference."""
    got = draws(Philox(9))
    try:
        tinydiff.set_kernels("numpy")
        want = draws(Philox(9))
    finally:
        tinydiff.set_kernels("native")
    for x, y in zip(got, want):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_statistics_of_a_million_draws():
    """Mean and variance within 5 standard errors of N(0, 1) (se of the mean 1/sqrt(n), of the
    variance sqrt(2/n)); the two normals of a pair uncorrelated; uniforms and integers even."""
    n = 10**6
    for dtype in (np.float32, np.float64):
        z = Philox(1234).normal(n, dtype).astype(np.float64)
        assert abs(z.mean()) < 5 / math.sqrt(n), z.mean()
        assert abs(z.var() - 1) < 5 * math.sqrt(2 / n), z.var()
        assert abs(np.mean(z ** 4) - 3) < 5 * math.sqrt(96 / n), np.mean(z ** 4)    # kurtosis of N(0, 1): 3
        pairs = z.reshape(-1, 2)
        assert abs(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]) < 5 / math.sqrt(n / 2)
    u = Philox(99).random(n)
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n) and 0 <= u.min() and u.max() < 1
    counts = np.bincount(Philox(7).integers(0, 10, (n,)), minlength=10)
    assert counts.size == 10 and np.all(np.abs(counts - n / 10) < 5 * math.sqrt(n * 0.1 * 0.9)), counts


def test_the_default_generator_follows_manual_seed():
    from tinydiff import philox
    tinydiff.manual_seed(5)
    a = philox.default_generator().normal(4)
    tinydiff.manual_seed(5)
    assert np.array_equal(philox.default_generator().normal(4), a)
    assert np.array_equal(Philox(5).normal(4), a)


# --- on the GPU: the same noise as on the CPU, and exact resume --------------------------------

def test_gpu_draws_equal_cpu_draws(cp):
    for kind in ("uint32", "random", "integers", "normal32", "normal64"):
        out = []
        for xp in (np, cp):
            rng = Philox(2**33 + 1)
            rng.load_state_dict({"key": rng.key, "counter": [2**32 - 5, 0, 0, 0]})   # across a carry
            draw = {"uint32": lambda: rng.uint32(1001, xp), "random": lambda: rng.random((3, 333), np.float32, xp),
                    "integers": lambda: rng.integers(3, 1000, (7, 11), xp),
                    "normal32": lambda: rng.normal((5, 201), np.float32, xp),
                    "normal64": lambda: rng.normal((5, 201), np.float64, xp)}[kind]
            out.append(backend.to_device(draw(), "cpu"))
        if kind.startswith("normal"):
            off = ulps(out[1], out[0])
            print(f"{kind}: {int((off > 0).sum())} of {off.size} differ from the CPU's, largest {off.max():.1f} ulps")
            assert off.max() <= (1 if kind == "normal32" else 4), kind
        else:
            assert out[0].dtype == out[1].dtype and np.array_equal(out[0], out[1]), kind


class RecordingModel(tinydiff.nn.Module):
    """Returns zeros and keeps, on the host, the x_t, time and context that training_loss gives it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def time_input(self, t, T):
        return tinydiff.Tensor(t.astype(np.float64))

    def null_context(self, batch):
        return np.zeros((batch, 3))

    def forward(self, x, t, c=None):
        self.seen.append([backend.to_device(a.data, "cpu") for a in (x, t, c)])
        return x * 0.0


def test_gpu_training_noise_equals_cpu(cp):
    """The same seed: the same t, eps (through x_t and the loss) and context dropout on both devices."""
    from tinydiff.diffusion import NoiseSchedule, training_loss
    s = NoiseSchedule(timesteps=100, dtype=np.float64)
    x0 = np.random.default_rng(0).uniform(-1, 1, (16, 2, 5, 5))
    context = np.ones((16, 3))
    runs = []
    for device in ("cpu", "cuda"):
        model, rng = RecordingModel(), Philox(21)
        put = lambda a: backend.to_device(a, device)     # noqa: E731
        losses = [training_loss(model, s, put(x0), put(context), generator=rng, context_drop=0.3).item()
                  for _ in range(3)]
        runs.append((model.seen, losses, rng.state_dict()))
    (seen_cpu, loss_cpu, state_cpu), (seen_gpu, loss_gpu, state_gpu) = runs
    assert state_cpu == state_gpu
    for (xt_c, t_c, c_c), (xt_g, t_g, c_g) in zip(seen_cpu, seen_gpu):
        assert np.array_equal(t_c, t_g) and np.array_equal(c_c, c_g)                 # t and the dropout: exact
        np.testing.assert_allclose(xt_g, xt_c, rtol=1e-12, atol=1e-12)              # eps: to a few float64 ulps
    np.testing.assert_allclose(loss_gpu, loss_cpu, rtol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(np.float64, (1e-9, 1e-10)), (np.float32, (1e-4, 1e-4))])
def test_gpu_sampler_images_equal_cpu(cp, dtype, tol):
    """The same weights and seed: DDPM (noise every step) and DDIM with eta = 1 give the same images
    on CPU and GPU, x_T and every z drawn by Philox on each device."""
    from test_cuda import assert_close, context_unet_pair
    from tinydiff.samplers import ddim_sample, ddpm_sample
    model_cpu, model_gpu, schedule = context_unet_pair()
    model_cpu, model_gpu = model_cpu.to(dtype).eval(), model_gpu.to(dtype).eval()
    context = np.eye(5)[[2, 0, 4]].astype(dtype)
    for name, sample in (("ddpm", lambda m, c, d: ddpm_sample(m, schedule, (3, 3, 8, 8), c, seed=4, device=d, dtype=dtype)),
                         ("ddim", lambda m, c, d: ddim_sample(m, schedule, (3, 3, 8, 8), c, steps=10, eta=1.0, seed=4,
                                                              device=d, dtype=dtype))):
        images = [backend.to_device(sample(m, backend.to_device(context, d), d), "cpu")
                  for m, d in ((model_cpu, "cpu"), (model_gpu, "cuda"))]
        assert_close(images[1], images[0], dtype, f"{name} images, GPU against CPU", tol)


def test_gpu_training_stopped_and_resumed_equals_uninterrupted(cp, tmp_path):
    """tinydiff train --device cuda: 4 steps, then --resume to 8, ends bit for bit where 8 steps in one go do."""
    from test_cli import TINY, assert_same_run, run
    full, part = tmp_path / "full", tmp_path / "part"
    flags = ["--device", "cuda", "--lr-schedule", "constant", *TINY]
    assert run("train", "--out", full, "--steps", 8, *flags) == 0
    assert run("train", "--out", part, "--steps", 4, *flags) == 0
    assert run("train", "--out", part, "--steps", 8, "--resume", "--quiet") == 0
    assert_same_run(full, part)


# --- the Embedding's backward without atomic adds ----------------------------------------------

SCATTER_CASES = [((7, 5), lambda rng: (rng.integers(0, 7, 300),)),                    # an embedding's rows
                 ((7, 5), lambda rng: rng.integers(0, 7, (4, 6))),                     # a 2-D index
                 ((1, 3), lambda rng: np.zeros(9, np.int64)),                          # one row, nine times
                 ((6, 4, 3), lambda rng: (rng.integers(0, 6, 10), slice(None), rng.integers(0, 3, 10))),
                 ((5,), lambda rng: rng.integers(0, 5, 0)),                            # nothing to add
                 ((8, 3), lambda rng: (np.arange(8)[::-1],))]                          # no repeats


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(SCATTER_CASES)))
def test_scatter_add_in_order_is_np_add_at(case, dtype):
    """The GPU's scatter, run here on NumPy arrays, against its reference np.add.at: bit for bit
    (values of mixed magnitudes, so that another order of the additions would round otherwise)."""
    shape, make_index = SCATTER_CASES[case]
    rng = np.random.default_rng(case)
    index = make_index(rng)
    target = rng.standard_normal(shape).astype(dtype)
    values = (rng.standard_normal(target[index].shape) * 10.0 ** rng.integers(-3, 4, target[index].shape)).astype(dtype)
    want, got = target.copy(), target.copy()
    np.add.at(want, index, values)
    backend.scatter_add_in_order(got, index, values)
    assert np.array_equal(got, want)


def test_scatter_add_in_order_refuses_a_strided_target():
    with pytest.raises(ValueError, match="C-contiguous"):
        backend.scatter_add_in_order(np.zeros((4, 4))[:, ::2], (np.array([0, 0]),), np.ones((2, 2)))


def test_gpu_embedding_backward_is_deterministic(cp):
    """The gradient of F.embedding on the GPU: twice the same bits, and the CPU's (np.add.at's) bits."""
    from tinydiff import F
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 10, 4096)                              # ~400 repeats of each row
    dout = (rng.standard_normal((4096, 32)) * 10.0 ** rng.integers(-3, 4, (4096, 32))).astype(np.float32)
    grads = []
    for device in ("cuda", "cuda", "cpu"):
        weight = tinydiff.Tensor(backend.to_device(np.zeros((10, 32), np.float32), device), requires_grad=True)
        out = F.embedding(backend.to_device(idx, device), weight)
        (out * tinydiff.Tensor(backend.to_device(dout, device))).sum().backward()
        grads.append(backend.to_device(weight.grad, "cpu"))
    assert np.array_equal(grads[0], grads[1]), "two GPU runs differ"
    assert np.array_equal(grads[0], grads[2]), "the GPU's gradient differs from the CPU's"
