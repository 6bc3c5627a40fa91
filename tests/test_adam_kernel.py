"""The fused Adam / AdamW step (csrc/adam_cpu.cpp, tinydiff._C.adam_step) against its NumPy
reference (kernels.adam_step_ref), through the optimizer class, and against torch.optim.

1. The kernel against the reference on random, awkward parameter sets (one 1-element parameter,
   odd sizes, many parameters, parameters larger than a work chunk), float32 and float64, Adam and
   AdamW, with and without weight decay, several steps.
2. optim.Adam / AdamW with native kernels against the same class with NumPy kernels over 20 steps,
   with gradient clipping, an EMA and a parameter that sometimes has no gradient.
3. The same against torch.optim.Adam / AdamW in float64 (skipped without torch).
4. Bad arguments: a TypeError or ValueError naming the argument and its list index.

Run:  python -m pytest tests/test_adam_kernel.py -q       (-s prints the largest differences)
"""
import numpy as np
import pytest

import tinydiff
from tinydiff import Tensor, kernels, nn
from tinydiff import _C  # the tests need the built extension: a failed build is a failure here
from tinydiff.optim import EMA, Adam, AdamW, clip_grad_norm_

DTYPES = (np.float32, np.float64)
RTOL = {np.float32: 2e-6, np.float64: 1e-15}
CHUNK = 1 << 14                                                   # ADAM_CHUNK in adam_cpu.cpp

SHAPE_SETS = {
    "one element": [(1,)],
    "odd sizes": [(1,), (7, 3), (5,), (3, 5, 7), (2, 1, 1, 3)],
    "chunk edges": [(CHUNK - 1,), (1,), (CHUNK + 1,), (3 * CHUNK + 17,), (2,)],
    "many": None,                                                 # 150 random shapes, drawn below
}
HYPER = [  # (lr, beta1, beta2, eps, weight_decay, decoupled)
    (1e-3, 0.9, 0.999, 1e-8, 0.0, False),                         # Adam
    (3e-2, 0.8, 0.99, 1e-6, 0.05, False),                         # Adam + L2
    (1e-3, 0.9, 0.999, 1e-8, 0.0, True),                          # AdamW without decay: Adam
    (2e-2, 0.5, 0.9, 1e-8, 0.1, True),                            # AdamW
    (1e-2, 0.0, 0.0, 1e-3, 0.01, False),                          # betas 0: the bias corrections are 1
]


def assert_close(got, want, dtype, what):
    """|got - want| <= rtol (|want| + max |want|) everywhere; prints the largest difference.
    The max |want| term is the scale of the sums: m = beta1 m + (1 - beta1) g can cancel to a
    value far smaller than its terms, and a rounding of the terms is no error of the kernel.
    (This build agrees with the reference bit for bit: no FMA contraction in adam_cpu.cpp.)"""
    rtol = RTOL[dtype]
    assert got.shape == want.shape and got.dtype == want.dtype == dtype, f"{what}: {got.dtype} {want.dtype}"
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    scale = np.abs(want.astype(np.float64))
    print(f"{what}: largest |difference| {err.max():.3g}")
    bad = ~(err <= rtol * (scale + scale.max()))
    assert not bad.any(), (f"{what}: {bad.sum()} values off, largest |difference| {err.max():.3g} "
                           f"(rtol {rtol}, largest |value| {scale.max():.3g})")


def shapes_of(name, rng):
    if SHAPE_SETS[name] is not None:
        return SHAPE_SETS[name]
    return [tuple(rng.integers(1, 9, size=rng.integers(1, 4))) for _ in range(150)]


def random_state(shapes, dtype, rng):
    """params, exp_avgs, exp_avg_sqs as after some steps (v >= 0)."""
    p = [rng.standard_normal(s).astype(dtype) for s in shapes]
    m = [0.1 * rng.standard_normal(s).astype(dtype) for s in shapes]
    v = [0.01 * rng.random(s).astype(dtype) for s in shapes]
    return p, m, v


# ---------------------------------------------------------------------------------------------
# 1. The kernel against the reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hyper", HYPER)
@pytest.mark.parametrize("shape_set", list(SHAPE_SETS))
def test_kernel_matches_reference(shape_set, hyper, dtype):
    rng = np.random.default_rng([list(SHAPE_SETS).index(shape_set), HYPER.index(hyper)])
    shapes = shapes_of(shape_set, rng)
    p_ref, m_ref, v_ref = random_state(shapes, dtype, rng)
    p, m, v = ([a.copy() for a in arrays] for arrays in (p_ref, m_ref, v_ref))
    for step in (1, 2, 3, 10, 11):                                # several steps, fresh gradients each
        g = [rng.standard_normal(s).astype(dtype) * rng.uniform(1e-3, 10) for s in shapes]
        g_before = [a.copy() for a in g]
        p_ref, m_ref, v_ref = kernels.adam_step_ref(p_ref, g, m_ref, v_ref, *hyper, step)
        ids = [id(a) for a in p + m + v]
        assert _C.adam_step(p, g, m, v, *hyper, step) is None
        assert [id(a) for a in p + m + v] == ids                  # in place, the same arrays
        for k in range(len(shapes)):
            assert np.array_equal(g[k], g_before[k])              # gradients are only read
    for name, got, want in (("p", p, p_ref), ("m", m, m_ref), ("v", v, v_ref)):
        assert_close(np.concatenate([a.ravel() for a in got]), np.concatenate([a.ravel() for a in want]),
                     dtype, f"{shape_set} {hyper} {np.dtype(dtype).name} {name}")


def test_reference_leaves_its_inputs_alone():
    rng = np.random.default_rng(0)
    p, m, v = random_state([(3, 4), (5,)], np.float64, rng)
    g = [rng.standard_normal(a.shape) for a in p]
    before = [a.copy() for a in p + m + v]
    new_p, new_m, new_v = kernels.adam_step_ref(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, True, 1)
    for a, b in zip(p + m + v, before):
        assert np.array_equal(a, b)
    assert not any(np.array_equal(a, b) for a, b in zip(new_p, p))


def test_dispatch_copies_arrays_it_may_not_write():
    """kernels.adam_step gives a read-only or strided parameter a private copy, never an error."""
    rng = np.random.default_rng(1)
    p, m, v = random_state([(4, 6), (9,)], np.float32, rng)
    g = [rng.standard_normal(a.shape).astype(np.float32) for a in p]
    want = kernels.adam_step_ref(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.0, False, 1)
    frozen = p[0].copy()
    frozen.flags.writeable = False
    strided = np.repeat(p[1], 2)[::2]                             # the same values, not contiguous
    got = kernels.adam_step([frozen, strided], [g[0].T.copy().T, g[1]], [a.copy() for a in m],
                            [a.copy() for a in v], 1e-2, 0.9, 0.999, 1e-8, 0.0, False, 1)
    assert np.array_equal(frozen, p[0])                           # not written
    for got_list, want_list in zip(got, want):
        for a, b in zip(got_list, want_list):
            assert_close(a, b, np.float32, "copied arrays")


# ---------------------------------------------------------------------------------------------
# 2. The optimizer class, native against numpy kernels

@pytest.fixture
def kernels_named():
    before = tinydiff.get_kernels()
    yield tinydiff.set_kernels
    tinydiff.set_kernels(before)


def train(make_opt, dtype, kernel_name, steps=20):
    """20 steps of a small network's optimizer on fixed random gradients, with clipping and an
    EMA; the bias of the last layer has no gradient on every third step."""
    tinydiff.set_kernels(kernel_name)
    tinydiff.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 33), nn.GELU(), nn.Linear(33, 1), nn.Linear(1, 5)).to(dtype)
    params = net.parameters()
    opt, ema = make_opt(params), EMA(net, decay=0.9)
    rng = np.random.default_rng(2)
    in_place = []
    for step in range(steps):
        for p in params:
            p.grad = rng.standard_normal(p.shape).astype(dtype) * 3.0
        if step % 3 == 0:
            params[-1].grad = None
        clip_grad_norm_(params, 1.0)
        before = [p.data for p in params]
        opt.step()
        in_place.append(all(p.data is b for p, b in zip(params, before)))
        ema.update()
    return net, opt, ema, in_place


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make_opt", [lambda ps: Adam(ps, lr=1e-2),
                                      lambda ps: Adam(ps, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.05),
                                      lambda ps: AdamW(ps, lr=2e-2, weight_decay=0.1)],
                         ids=["Adam", "Adam+L2", "AdamW"])
def test_optimizer_native_equals_numpy(make_opt, dtype, kernels_named):
    net_n, opt_n, ema_n, in_place_n = train(make_opt, dtype, "native")
    net_r, opt_r, ema_r, in_place_r = train(make_opt, dtype, "numpy")
    assert all(in_place_n) and not any(in_place_r)                # the C++ kernel ran, and only there
    for (name, a), (_, b) in zip(net_n.state_dict().items(), net_r.state_dict().items()):
        assert_close(a.data, b.data, dtype, f"weights {name}")
    for name in ema_n.state_dict():
        assert_close(ema_n.state_dict()[name], ema_r.state_dict()[name], dtype, f"EMA {name}")
    for k, (s_n, s_r) in enumerate(zip(opt_n.state_dict()["state"], opt_r.state_dict()["state"])):
        assert s_n["step"] == s_r["step"] == (13 if k == len(opt_n.params) - 1 else 20)
        assert_close(s_n["exp_avg"], s_r["exp_avg"], dtype, f"exp_avg {k}")
        assert_close(s_n["exp_avg_sq"], s_r["exp_avg_sq"], dtype, f"exp_avg_sq {k}")


def test_state_dict_is_a_snapshot(kernels_named):
    """The native step writes the moments in place, so state_dict() must hand out copies."""
    net, opt, _, _ = train(lambda ps: Adam(ps, lr=1e-2), np.float64, "native", steps=2)
    saved = opt.state_dict()
    m = saved["state"][0]["exp_avg"].copy()
    for p in opt.params:
        p.grad = np.ones(p.shape)
    opt.step()
    assert np.array_equal(saved["state"][0]["exp_avg"], m)
    assert not np.array_equal(opt.state[0]["exp_avg"], m)


# ---------------------------------------------------------------------------------------------
# 3. Against torch.optim in float64

@pytest.mark.parametrize("name, kwargs", [("Adam", dict(lr=1e-2)),
                                          ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
                                          ("AdamW", dict(lr=2e-2)),
                                          ("AdamW", dict(lr=2e-2, betas=(0.5, 0.9), weight_decay=0.1))])
def test_native_optimizer_matches_torch(name, kwargs, kernels_named):
    torch = pytest.importorskip("torch")
    kernels_named("native")
    rng = np.random.default_rng(3)
    shapes = [(1,), (7, 3), (CHUNK + 5,), (2, 3, 3, 3)]
    params = [Tensor(rng.standard_normal(s), requires_grad=True) for s in shapes]
    tparams = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    opt = {"Adam": Adam, "AdamW": AdamW}[name](params, **kwargs)
    topt = getattr(torch.optim, name)(tparams, foreach=False, **kwargs)
    for _ in range(20):
        grads = [rng.standard_normal(s) for s in shapes]
        for p, t, g in zip(params, tparams, grads):
            p.grad, t.grad = g, torch.tensor(g)
        before = params[0].data
        opt.step()
        assert params[0].data is before                            # the native kernel ran
        topt.step()
    for k, (p, t) in enumerate(zip(params, tparams)):
        err = np.abs(p.data - t.detach().numpy()).max()
        print(f"{name} {kwargs} param {k}: largest |difference| from torch {err:.3g}")
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# 4. Bad arguments

P2 = [np.ones((3, 2), np.float32), np.ones(5, np.float32)]


def ok(**change):
    """Valid arguments, with `change` applied; fresh arrays each call."""
    args = dict(params=[a.copy() for a in P2], grads=[a.copy() for a in P2], exp_avgs=[a.copy() for a in P2],
                exp_avg_sqs=[a.copy() for a in P2], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0, decoupled=False, step=1)
    args.update(change)
    return args


def frozen(a):
    a = a.copy()
    a.flags.writeable = False
    return a


BUFFER = np.zeros(20, np.float32)
SHARED = np.ones(6, np.float32)

BAD = [
    (ok(params=P2[0]), TypeError, "params must be a list of arrays, got ndarray"),
    (ok(grads=None), TypeError, "grads must be a list of arrays"),
    (ok(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[]), ValueError, "params is an empty list"),
    (ok(exp_avgs=[P2[0].copy()]), ValueError, "exp_avgs has 1 arrays but params has 2"),
    (ok(grads=[P2[0], P2[1].tolist()]), TypeError, "grads[1] must be a numpy.ndarray"),
    (ok(grads=[P2[0], P2[1].astype(np.float64)]), TypeError, "grads[1] has dtype float64 but params[0] has float32"),
    (ok(params=[P2[0].astype(np.float16), P2[1].copy()]), TypeError, "params[0] must be a float32 or float64"),
    (ok(exp_avg_sqs=[P2[0].copy(), np.ones(4, np.float32)]), ValueError, "exp_avg_sqs[1] has shape (4,) but params[1]"),
    (ok(exp_avgs=[P2[0].reshape(2, 3).copy(), P2[1].copy()]), ValueError, "exp_avgs[0] has shape (2, 3)"),
    (ok(params=[np.ones((2, 3), np.float32).T, P2[1].copy()]), ValueError, "params[0] must be C-contiguous"),
    (ok(grads=[P2[0], np.ones(10, np.float32)[::2]]), ValueError, "grads[1] must be C-contiguous"),
    (ok(params=[frozen(P2[0]), P2[1].copy()]), ValueError, "params[0] is read-only"),
    (ok(exp_avg_sqs=[P2[0].copy(), frozen(P2[1])]), ValueError, "exp_avg_sqs[1] is read-only"),
    (ok(params=[P2[0].copy(), np.ones(0, np.float32)], grads=[P2[0], np.ones(0, np.float32)],
        exp_avgs=[P2[0].copy(), np.ones(0, np.float32)], exp_avg_sqs=[P2[0].copy(), np.ones(0, np.float32)]),
     ValueError, "params[1] is empty"),
    (ok(exp_avgs=[SHARED.reshape(3, 2), P2[1].copy()], exp_avg_sqs=[SHARED.reshape(3, 2), P2[1].copy()]),
     ValueError, "shares memory with"),
    (ok(params=[BUFFER[:6].reshape(3, 2), BUFFER[4:9]]), ValueError, "params[1] shares memory with params[0]"),
    (ok(grads=[SHARED.reshape(3, 2), P2[1]], params=[SHARED.reshape(3, 2), P2[1].copy()]),
     ValueError, "shares memory with"),
    (ok(lr=-1e-3), ValueError, "lr must be in [0.0, inf), got -0.001"),
    (ok(lr=float("nan")), ValueError, "lr must be in"),
    (ok(lr=float("inf")), ValueError, "lr must be in"),
    (ok(lr="0.1"), TypeError, "lr must be a number"),
    (ok(beta1=1.0), ValueError, "beta1 must be in [0.0, 1.0), got 1.0"),
    (ok(beta2=-0.1), ValueError, "beta2 must be in"),
    (ok(eps=-1e-8), ValueError, "eps must be in"),
    (ok(eps=float("inf")), ValueError, "eps must be in"),
    (ok(weight_decay=-0.01), ValueError, "weight_decay must be in"),
    (ok(weight_decay=None), TypeError, "weight_decay must be a number"),
    (ok(decoupled=1), TypeError, "decoupled must be a bool"),
    (ok(step=0), ValueError, "step must be in [1"),
    (ok(step=1.0), TypeError, "step must be an int"),
    (ok(step=True), TypeError, "step must be an int"),
]


@pytest.mark.parametrize("args, error, words", BAD, ids=[w for _, _, w in BAD])
def test_binding_refuses_bad_arguments(args, error, words):
    before = [a.copy() for a in args["params"]] if isinstance(args["params"], list) else []
    with pytest.raises(error) as info:
        _C.adam_step(**args)
    assert words in str(info.value), str(info.value)
    assert str(info.value).startswith("adam_step: ")
    for a, b in zip(args["params"] if before else [], before):
        assert np.array_equal(a, b)                                # refused before writing anything


def test_gradients_may_share_memory():
    """Two parameters may get the same gradient array (autograd hands one dout to both)."""
    g = np.full(6, 0.5, np.float32)
    args = ok(params=[np.ones(6, np.float32), np.zeros(6, np.float32)], grads=[g, g],
              exp_avgs=[np.zeros(6, np.float32) for _ in range(2)],
              exp_avg_sqs=[np.zeros(6, np.float32) for _ in range(2)])
    want = kernels.adam_step_ref(*(args[k] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs")),
                                 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 1)
    _C.adam_step(**args)
    for a, b in zip(args["params"], want[0]):
        assert_close(a, b, np.float32, "shared gradient")
