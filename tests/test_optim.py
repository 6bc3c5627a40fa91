"""Optimizers, schedules, clipping and EMA: against hand-computed steps, formulas, and torch."""
import math

import numpy as np
import pytest

from tinydiff import nn
from tinydiff.optim import (EMA, SGD, Adam, AdamW, clip_grad_norm_, cosine_with_warmup,
                            linear_decay)
from tinydiff.tensor import Tensor

SHAPES = [(3, 4), (5,), (2, 1, 3)]


def make_params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [Tensor(rng.standard_normal(s).astype(dtype), requires_grad=True) for s in SHAPES]


def grad_sequence(n_steps, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(n_steps)]


def run(opt_fn, params, grads):
    opt = opt_fn(params)
    for gs in grads:
        opt.zero_grad()
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    return opt


# --- torch-free: the first steps by hand ----------------------------------------------------

def test_sgd_plain_and_momentum_by_hand():
    p0 = np.array([1.0, -2.0])
    g1, g2 = np.array([0.5, 0.25]), np.array([-1.0, 2.0])
    p = Tensor(p0.copy(), requires_grad=True)
    opt = SGD([p], lr=0.1, momentum=0.9)
    p.grad = g1
    opt.step()
    np.testing.assert_allclose(p.data, p0 - 0.1 * g1, rtol=0, atol=1e-15)          # b1 = g1
    p.grad = g2
    opt.step()
    np.testing.assert_allclose(p.data, p0 - 0.1 * g1 - 0.1 * (0.9 * g1 + g2), atol=1e-15)

    q = Tensor(p0.copy(), requires_grad=True)
    opt = SGD([q], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    q.grad = g1
    opt.step()
    g = g1 + 0.01 * p0
    np.testing.assert_allclose(q.data, p0 - 0.1 * (g + 0.9 * g), atol=1e-15)      # g + m*b, b = g


def test_adam_and_adamw_first_step_by_hand():
    p0, g = np.array([1.0, -2.0, 0.5]), np.array([0.3, -0.001, 4.0])
    lr, eps, wd = 0.01, 1e-8, 0.1
    # step 1: m_hat = g, v_hat = g^2, so p -= lr * g / (|g| + eps)
    p = Tensor(p0.copy(), requires_grad=True)
    p.grad = g
    Adam([p], lr=lr, eps=eps).step()
    np.testing.assert_allclose(p.data, p0 - lr * g / (np.abs(g) + eps), rtol=1e-14)

    p = Tensor(p0.copy(), requires_grad=True)          # Adam: L2 term in the gradient
    p.grad = g
    Adam([p], lr=lr, eps=eps, weight_decay=wd).step()
    gw = g + wd * p0
    np.testing.assert_allclose(p.data, p0 - lr * gw / (np.abs(gw) + eps), rtol=1e-14)

    p = Tensor(p0.copy(), requires_grad=True)          # AdamW: decay the weights themselves
    p.grad = g
    AdamW([p], lr=lr, eps=eps, weight_decay=wd).step()
    np.testing.assert_allclose(p.data, p0 * (1 - lr * wd) - lr * g / (np.abs(g) + eps), rtol=1e-14)


def test_adam_second_step_bias_correction_by_hand():
    b1, b2, lr, eps = 0.8, 0.9, 0.1, 1e-8
    g1, g2 = np.array([1.0, -3.0]), np.array([2.0, 0.5])
    p = Tensor(np.zeros(2), requires_grad=True)
    opt = Adam([p], lr=lr, betas=(b1, b2), eps=eps)
    for g in (g1, g2):
        p.grad = g
        opt.step()
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v = b2 * (1 - b2) * g1 ** 2 + (1 - b2) * g2 ** 2
    step1 = lr * g1 / (np.abs(g1) + eps)
    step2 = lr / (1 - b1 ** 2) * m / (np.sqrt(v) / math.sqrt(1 - b2 ** 2) + eps)
    np.testing.assert_allclose(p.data, -step1 - step2, rtol=1e-13)
    assert opt.state[0]["step"] == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", [lambda ps: SGD(ps, 0.1, momentum=0.9), lambda ps: Adam(ps, 0.01),
                                  lambda ps: AdamW(ps, 0.01)])
def test_dtype_kept_and_missing_grad_skipped(dtype, make):
    params = make_params(dtype)
    before = params[1].data.copy()
    opt = make(params)
    for p, g in zip(params, grad_sequence(1, dtype)[0]):
        p.grad = g
    params[1].grad = None                               # no gradient: left alone, as torch
    opt.step()
    assert all(p.dtype == dtype for p in params)
    assert all(a.dtype == dtype for s in opt.state for a in s.values() if hasattr(a, "dtype"))
    np.testing.assert_array_equal(params[1].data, before)
    assert opt.state[1] == {}


def test_float64_scalar_lr_does_not_upcast():
    params = make_params(np.float32)
    opt = Adam(params, lr=np.float64(1e-3))
    for p, g in zip(params, grad_sequence(1, np.float32)[0]):
        p.grad = g
    opt.lr = np.float64(5e-4)                           # as a schedule might hand it over
    opt.step()
    assert all(p.dtype == np.float32 for p in params)


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, 0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                                  lambda ps: Adam(ps, 0.01, weight_decay=1e-2),
                                  lambda ps: AdamW(ps, 0.01, betas=(0.8, 0.99))])
def test_state_dict_resume_is_bitwise(make):
    grads = grad_sequence(6, np.float32)
    straight = make_params(np.float32)
    run(make, straight, grads)

    first = make_params(np.float32)
    opt = run(make, first, grads[:3])
    saved = opt.state_dict()
    resumed = [Tensor(p.data.copy(), requires_grad=True) for p in first]
    opt2 = make(resumed)
    opt2.lr = 123.0                                     # overwritten by the loaded hyper-parameters
    opt2.load_state_dict(saved)
    for gs in grads[3:]:
        for p, g in zip(resumed, gs):
            p.grad = g
        opt2.step()
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a.data, b.data)


def test_load_state_dict_refuses_wrong_shapes():
    params = make_params(np.float32)
    opt = run(lambda ps: Adam(ps), params, grad_sequence(1, np.float32))
    other = Adam([Tensor(np.zeros(s, np.float32), requires_grad=True) for s in [(4, 3), (5,), (2, 1, 3)]])
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*shape \(4, 3\)"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="3 parameters.*has 1"):
        Adam(params[:1]).load_state_dict(opt.state_dict())


# --- against torch --------------------------------------------------------------------------

TORCH_CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.02, betas=(0.5, 0.9), weight_decay=0.1)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name,kwargs", TORCH_CASES)
def test_matches_torch(name, kwargs, dtype):
    torch = pytest.importorskip("torch")
    ours = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}[name]
    grads = grad_sequence(8, dtype)
    params = make_params(dtype)
    tparams = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    run(lambda ps: ours(ps, **kwargs), params, grads)
    topt = getattr(torch.optim, name)(tparams, **kwargs)
    for gs in grads:
        for p, g in zip(tparams, gs):
            p.grad = torch.tensor(g)
        topt.step()
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=2e-6, atol=2e-7)
    for p, t in zip(params, tparams):
        np.testing.assert_allclose(p.data, t.detach().numpy(), **tol)


# --- schedules ------------------------------------------------------------------------------

def test_linear_decay_is_the_course_formula():
    assert linear_decay(0, 32, 1e-3) == 1e-3
    assert linear_decay(8, 32, 1e-3) == pytest.approx(1e-3 * 0.75)
    assert linear_decay(32, 32, 1e-3) == 0.0


def test_cosine_with_warmup():
    lr0, lr_min, warm, total = 1.0, 0.1, 10, 110
    assert cosine_with_warmup(0, total, lr0, warm, lr_min) == 0.0
    assert cosine_with_warmup(5, total, lr0, warm, lr_min) == pytest.approx(0.5)
    assert cosine_with_warmup(10, total, lr0, warm, lr_min) == pytest.approx(lr0)
    assert cosine_with_warmup(60, total, lr0, warm, lr_min) == pytest.approx((lr0 + lr_min) / 2)
    assert cosine_with_warmup(110, total, lr0, warm, lr_min) == pytest.approx(lr_min)
    assert cosine_with_warmup(500, total, lr0, warm, lr_min) == pytest.approx(lr_min)
    lrs = [cosine_with_warmup(s, total, lr0, warm) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))        # falls monotonically after warm-up


def test_cosine_matches_torch_cosine_annealing():
    torch = pytest.importorskip("torch")
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=0.01)
    for step in range(21):
        assert cosine_with_warmup(step, 20, 0.3, 0, 0.01) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()


# --- gradient clipping ----------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm(max_norm):
    params = make_params(np.float64)
    grads = grad_sequence(1, np.float64)[0]
    for p, g in zip(params, grads):
        p.grad = g
    total = clip_grad_norm_(params, max_norm)
    expect = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    assert total == pytest.approx(expect, rel=1e-12)
    scale = min(1.0, max_norm / (expect + 1e-6))
    for p, g in zip(params, grads):
        np.testing.assert_allclose(p.grad, g * scale, rtol=1e-12)
    new_total = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params))
    assert new_total <= max_norm * (1 + 1e-9)


def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch")
    params = make_params(np.float32)
    tparams = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    for p, t, g in zip(params, tparams, grad_sequence(1, np.float32)[0]):
        p.grad, t.grad = g * 3, torch.tensor(g * 3)
    total = clip_grad_norm_(params, 1.0)
    ttotal = torch.nn.utils.clip_grad_norm_(tparams, 1.0)
    assert total == pytest.approx(ttotal.item(), rel=1e-6)
    for p, t in zip(params, tparams):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-6, atol=1e-7)
        assert p.grad.dtype == np.float32


# --- EMA ------------------------------------------------------------------------------------

def small_net():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3))


def test_ema_update_math_buffers_and_swap():
    net = small_net()
    ema = EMA(net, decay=0.9)
    start = {k: t.data.copy() for k, t in net.state_dict().items()}
    params = dict(net.named_parameters())
    for p in params.values():                            # move the weights by hand
        p.data = p.data + 1.0
    net[1].running_mean.data = net[1].running_mean.data + 5.0     # a buffer changes too
    ema.update()
    for k, v in ema.state_dict().items():
        if k in params:
            np.testing.assert_allclose(v, 0.9 * start[k] + 0.1 * (start[k] + 1.0), rtol=1e-6)
        else:
            np.testing.assert_array_equal(v, net.state_dict()[k].data)    # buffers: copied
    assert list(ema.state_dict()) == list(net.state_dict())              # the model's keys

    live = {k: t.data.copy() for k, t in net.state_dict().items()}
    with ema.average_parameters() as m:
        assert m is net
        for k, t in net.state_dict().items():
            np.testing.assert_array_equal(t.data, ema.state_dict()[k])
    for k, t in net.state_dict().items():                                  # swapped back
        np.testing.assert_array_equal(t.data, live[k])

    other = small_net()
    ema.copy_to(other)
    for k, t in other.state_dict().items():
        np.testing.assert_array_equal(t.data, ema.state_dict()[k])

    ema2 = EMA(small_net(), decay=0.9)
    ema2.load_state_dict(ema.state_dict())
    for k, v in ema2.state_dict().items():
        np.testing.assert_array_equal(v, ema.state_dict()[k])
    with pytest.raises(ValueError, match=r"missing keys \(in the model, not the weights\): 0\.weight \("):
        ema2.load_state_dict({k: v for k, v in ema.state_dict().items() if k != "0.weight"})


def test_ema_shadow_is_a_copy():
    net = small_net()
    ema = EMA(net, decay=0.5)
    before = ema.state_dict()["0.weight"].copy()
    net[0].weight.data[...] = 7.0                         # even an in-place change does not leak
    np.testing.assert_array_equal(ema.state_dict()["0.weight"], before)
