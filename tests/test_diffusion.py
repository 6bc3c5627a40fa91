"""Schedules against their formulas, the forward process against DDPM eq. 4, the posterior
(eqs. 6-7) against eq. 11, and the training loss: zero for a perfect model, for each objective.
Models here are tiny fakes (plain classes of tinydiff ops), so nothing waits for a U-Net."""
import math

import numpy as np
import pytest

from tinydiff import nn
from tinydiff.models import ContextUnet, UNet
from tinydiff.diffusion import NoiseSchedule, cosine_alpha_bar, model_eps, model_time, sigmoid_alpha_bar, \
    training_loss
from tinydiff.philox import Philox
from tinydiff.tensor import Tensor


# --- schedules --------------------------------------------------------------------------------

def test_linear_schedule_endpoints_and_products():
    s = NoiseSchedule("linear", timesteps=500)
    assert len(s) == 500 and s.beta.dtype == np.float32
    assert s.f64["beta"][0] == 1e-4 and s.f64["beta"][-1] == 0.02
    assert np.allclose(np.diff(s.f64["beta"]), (0.02 - 1e-4) / 499, rtol=0, atol=1e-15)
    assert np.allclose(s.f64["alpha_bar"], np.cumprod(1 - s.f64["beta"]), rtol=1e-14)
    assert s.f64["alpha_bar_prev"][0] == 1.0 and np.array_equal(s.f64["alpha_bar_prev"][1:], s.f64["alpha_bar"][:-1])
    for name, arr in s.f64.items():              # computed in float64, then cast
        assert np.array_equal(getattr(s, name), arr.astype(np.float32)), name


def test_cosine_schedule_follows_improved_ddpm_eq_17_and_is_capped():
    T, off = 1000, 0.008
    s = NoiseSchedule("cosine", timesteps=T)
    f = lambda u: math.cos((u + off) / (1 + off) * math.pi / 2) ** 2
    want = np.array([f((t + 1) / T) / f(0) for t in range(T)])
    capped = s.f64["beta"] >= 0.999
    assert s.f64["beta"].max() == 0.999 and capped[-1] and capped.sum() <= 2   # only at the very end
    assert np.allclose(s.f64["alpha_bar"][~capped], want[~capped], rtol=1e-10, atol=1e-14)
    assert np.allclose(cosine_alpha_bar(np.array([0.0, 0.5])), [1.0, f(0.5) / f(0)])


def test_sigmoid_schedule_is_monotone_and_follows_chen_alg_1():
    T = 300
    s = NoiseSchedule("sigmoid", timesteps=T)
    ab = s.f64["alpha_bar"]
    assert np.all(np.diff(ab) < 0) and 0.99 < ab[0] < 1 and ab[-1] < 1e-3
    assert np.all(s.f64["beta"] > 0) and s.f64["beta"].max() <= 0.999
    sig = lambda z: 1 / (1 + math.exp(-z))
    gamma = lambda u: (sig(3) - sig(6 * u - 3)) / (sig(3) - sig(-3))
    assert abs(sigmoid_alpha_bar(np.array(0.0)) - 1) < 1e-15
    ok = s.f64["beta"] < 0.999
    want = np.array([gamma((t + 1) / T) for t in range(T)])
    assert np.allclose(ab[ok], want[ok], rtol=1e-9)


def test_given_betas_and_bad_input():
    s = NoiseSchedule(betas=[0.1, 0.2, 0.3], dtype=np.float64)
    assert s.kind == "custom" and s.T == 3 and np.allclose(s.alpha_bar, [0.9, 0.72, 0.504])
    for bad in ([0.1, 1.0], [0.0, 0.1], [[0.1]], []):
        with pytest.raises(ValueError, match="betas"):
            NoiseSchedule(betas=bad)
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule("quadratic")


def test_posterior_variance_is_eq_7():
    s = NoiseSchedule("linear", timesteps=50)
    b, ab = s.f64["beta"], s.f64["alpha_bar"]
    ab_prev = np.append(1.0, ab[:-1])
    assert s.f64["posterior_variance"][0] == 0
    assert np.allclose(s.f64["posterior_variance"], (1 - ab_prev) / (1 - ab) * b, rtol=1e-13)


# --- the forward process ----------------------------------------------------------------------

def test_q_sample_mean_and_variance_match_eq_4():
    """Over many draws, x_t has mean sqrt(alpha_bar) x0 and variance 1 - alpha_bar (the course's
    formula, without the square root on the noise's scale, would give (1 - alpha_bar)^2)."""
    s = NoiseSchedule("linear", timesteps=500)
    rng = np.random.default_rng(0)
    n = 20000
    x0 = np.full((n, 1, 1, 2), 0.7, np.float32)
    x0[..., 1] = -0.4
    for t in (0, 60, 250, 499):
        xt = s.q_sample(x0, np.full(n, t), rng.standard_normal(x0.shape, dtype=np.float32))
        ab = s.f64["alpha_bar"][t]
        se = math.sqrt((1 - ab) / n)
        assert np.allclose(xt.mean(axis=0), math.sqrt(ab) * x0[0], atol=5 * se + 1e-6), t
        assert np.allclose(xt.var(axis=0), 1 - ab, rtol=0.05, atol=1e-6), t


def test_q_sample_per_sample_timesteps_and_checks():
    s = NoiseSchedule("cosine", timesteps=100)
    x0 = np.ones((3, 1, 2, 2), np.float32)
    eps = np.zeros_like(x0)
    xt = s.q_sample(x0, np.array([0, 50, 99]), eps)
    assert np.allclose(xt[:, 0, 0, 0], s.sqrt_alpha_bar[[0, 50, 99]])
    with pytest.raises(IndexError):
        s.q_sample(x0, np.array([0, 1, 100]), eps)
    with pytest.raises(ValueError, match="one per sample"):
        s.q_sample(x0, np.array([0, 1]), eps)
    with pytest.raises(TypeError):
        s.q_sample(x0, np.array([0.0, 1.0, 2.0]), eps)


def test_posterior_mean_at_eq_15_x0_equals_eq_11():
    s = NoiseSchedule("linear", timesteps=200, dtype=np.float64)
    rng = np.random.default_rng(1)
    t = np.arange(200)
    xt, eps = rng.standard_normal((2, 200, 1, 3, 3))
    x0 = s.predict_x0_from_eps(xt, t, eps)                                   # eq. 15
    mean, var, logvar = s.q_posterior_mean_variance(x0, xt, t)               # eq. 7
    c = lambda name: s.f64[name][t].reshape(-1, 1, 1, 1)
    mean_11 = (xt - c("beta") / np.sqrt(1 - c("alpha_bar")) * eps) / np.sqrt(c("alpha"))   # eq. 11
    assert np.allclose(mean, mean_11, rtol=1e-10, atol=1e-10)
    assert var.shape == (200, 1, 1, 1) and np.allclose(var[1:], np.exp(logvar[1:]))


def test_x0_eps_v_conversions_invert_each_other():
    s = NoiseSchedule("cosine", timesteps=100, dtype=np.float64)
    rng = np.random.default_rng(2)
    x0, eps = rng.standard_normal((2, 5, 2, 4, 4))
    t = np.array([0, 10, 50, 90, 99])
    xt = s.q_sample(x0, t, eps)
    v = s.v_from_x0_eps(x0, t, eps)
    assert np.allclose(s.predict_x0_from_eps(xt, t, eps), x0)
    assert np.allclose(s.predict_eps_from_x0(xt, t, x0), eps)
    assert np.allclose(s.predict_x0_from_v(xt, t, v), x0)
    assert np.allclose(s.predict_eps_from_v(xt, t, v), eps)
    for objective, out in (("eps", eps), ("x0", x0), ("v", v)):
        assert np.allclose(model_eps(out, s, xt, t, objective), eps)


# --- the training loss ------------------------------------------------------------------------

class OneImageOracle:
    """The exact answer for a data set of one image x*: eps = (x_t - sqrt(ab) x*) / sqrt(1 - ab)."""

    def __init__(self, schedule, xstar, objective, time_input="index"):
        self.s, self.xstar, self.objective, self.time_kind = schedule, xstar, objective, time_input

    def time_input(self, t, T):              # the model owns its time convention: either kind here
        return index_time(t, T) if self.time_kind == "index" else Tensor((t + 1) / T)

    def __call__(self, x, t, c=None):
        t = t.data if self.time_kind == "index" else np.rint(t.data * self.s.T - 1).astype(np.int64)
        ab = self.s.f64["alpha_bar"][t].reshape(-1, 1, 1, 1)
        eps = (x.data - np.sqrt(ab) * self.xstar) / np.sqrt(1 - ab)
        out = {"eps": eps, "x0": np.broadcast_to(self.xstar, x.shape),
               "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * self.xstar}[self.objective]
        return Tensor(out.astype(x.dtype))


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("time_input", ["index", "fraction"])
def test_training_loss_is_zero_for_a_perfect_model(objective, time_input):
    s = NoiseSchedule("linear", timesteps=500)
    xstar = np.random.default_rng(3).uniform(-1, 1, (1, 1, 4, 4))
    x0 = np.repeat(xstar, 64, axis=0)
    rng = Philox(4)
    perfect = training_loss(OneImageOracle(s, xstar, objective, time_input), s, x0, objective=objective,
                            generator=rng)
    assert perfect.shape == () and perfect.item() < 1e-20
    wrong = OneImageOracle(s, xstar, {"eps": "x0", "x0": "v", "v": "eps"}[objective], time_input)
    assert training_loss(wrong, s, x0, objective=objective, generator=rng).item() > 1e-2


def test_model_time_inputs():
    """Each model owns its time convention: the course's fraction (t + 1) / T, the UNet's index t."""
    s = NoiseSchedule(timesteps=500)
    x = np.zeros((3, 1, 8, 8), np.float32)
    frac = model_time(ContextUnet(1, n_feat=8, n_cfeat=3, height=8), s, np.array([0, 249, 499]), x)
    assert np.allclose(frac.data, [1 / 500, 0.5, 1.0])              # the course's t / T, t in 1..T
    idx = model_time(UNet(1, channels=(8, 16), num_classes=3, height=8, groups=4), s, np.array([0, 249, 499]), x)
    assert idx.data.dtype == np.int64 and list(idx.data) == [0, 249, 499]
    with pytest.raises(IndexError, match=r"\[0, 500\)"):              # checked before the model sees it
        model_time(ContextUnet(1, n_feat=8, n_cfeat=3, height=8), s, np.array([0, 1, 500]), x)


def index_time(t, T):
    """A test model's time_input(t, T) when it takes the timestep index itself (as the UNet does)."""
    return Tensor(t)


class TinyEpsModel(nn.Module):
    """eps_theta = w * x_t + b * (time): enough to check that gradients reach the parameters."""

    def time_input(self, t, T):                                  # the course's fraction (t + 1) / T
        return Tensor(((t + 1) / T).astype(np.float32))

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(np.array([0.5], np.float32))
        self.b = nn.Parameter(np.array([0.1], np.float32))
        self.seen = []

    def null_context(self, batch):
        return np.zeros((batch, 3), np.float32)

    def forward(self, x, t, c=None):
        self.seen.append(None if c is None else c.numpy())
        return x * self.w + t.reshape(-1, 1, 1, 1) * self.b


def test_training_loss_value_and_gradient_by_hand():
    s = NoiseSchedule(timesteps=10)
    model = TinyEpsModel()
    rng = np.random.default_rng(5)
    x0 = rng.uniform(-1, 1, (4, 1, 2, 2)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 3, 6, 9])
    loss = training_loss(model, s, x0, t=t, eps=eps)
    ab = s.f64["alpha_bar"][t].reshape(-1, 1, 1, 1)
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    frac = ((t + 1) / 10).reshape(-1, 1, 1, 1)
    err = 0.5 * xt + 0.1 * frac - eps
    assert np.isclose(loss.item(), (err ** 2).mean(), rtol=1e-5)
    loss.backward()
    assert np.isclose(model.w.grad[0], (2 * err * xt).mean(), rtol=1e-4)
    assert np.isclose(model.b.grad[0], (2 * err * frac).mean(), rtol=1e-4)


def test_context_drop_uses_the_null_context():
    s = NoiseSchedule(timesteps=10)
    model = TinyEpsModel()
    x0 = np.zeros((200, 1, 2, 2), np.float32)
    c = np.ones((200, 3), np.float32)
    rng = Philox(6)
    training_loss(model, s, x0, c, generator=rng)
    training_loss(model, s, x0, c, generator=rng, context_drop=1.0)
    training_loss(model, s, x0, c, generator=rng, context_drop=0.25)
    kept, dropped, some = model.seen
    assert np.all(kept == 1) and np.all(dropped == 0)
    frac = (some.sum(axis=1) == 0).mean()
    assert 0.1 < frac < 0.4 and np.all((some == 0) | (some == 1))
    with pytest.raises(ValueError, match="objective"):
        training_loss(model, s, x0, objective="score")
