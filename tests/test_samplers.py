"""DDPM and DDIM samplers: timestep pairs per spacing, DDIM eq. 16 against DDPM's beta_tilde,
determinism, exact recovery of a one-image data set from an exact noise oracle, step-by-step
agreement with the equations written out by hand, classifier-free and classifier guidance.
The models are small fakes whose answers are known in closed form."""
import math

import numpy as np
import pytest

from tinydiff import backend
from tinydiff.classifier import NoisyClassifier, accuracy, train_noisy_classifier
from tinydiff.diffusion import NoiseSchedule
from tinydiff.philox import Philox
from tinydiff.samplers import SPACINGS, classifier_grad, ddim_sample, ddim_sigma, ddim_timesteps, ddpm_sample
from tinydiff.tensor import Tensor

from gaussian_oracle import GaussianOracle, ddim_moments, ddpm_moments, sample_moments


def index_time(t, T):
    """A test model's time_input(t, T) when it takes the timestep index itself (as the UNet does)."""
    return Tensor(t)


def alpha_bar_at(schedule, t, time_input):
    t = t.data if time_input == "index" else np.rint(t.data * schedule.T - 1).astype(np.int64)
    return schedule.f64["alpha_bar"][t].reshape(-1, 1, 1, 1)


class OneImageOracle:
    """The exact model for a data set of one image x*: eps = (x_t - sqrt(ab) x*) / sqrt(1 - ab)."""

    def __init__(self, schedule, xstar, objective="eps", time_input="index"):
        self.s, self.xstar, self.objective, self.time_kind = schedule, xstar, objective, time_input

    def time_input(self, t, T):              # the model owns its time convention: either kind here
        return index_time(t, T) if self.time_kind == "index" else Tensor((t + 1) / T)

    def __call__(self, x, t, c=None):
        ab = alpha_bar_at(self.s, t, self.time_kind)
        eps = (x.data - np.sqrt(ab) * self.xstar) / np.sqrt(1 - ab)
        out = {"eps": eps, "x0": np.broadcast_to(self.xstar, x.shape),
               "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * self.xstar}[self.objective]
        return Tensor(out.astype(x.dtype))


class MixtureOracle:
    """The exact model for data spread evenly over K points (K, C, H, W)."""
    time_input = staticmethod(index_time)

    def __init__(self, schedule, points):
        self.s, self.points = schedule, points

    def __call__(self, x, t, c=None):
        ab = alpha_bar_at(self.s, t, "index")[:, :, 0, 0]                       # (B, 1)
        xs, ps = x.data.reshape(len(x.data), 1, -1), self.points.reshape(1, len(self.points), -1)
        logw = -((xs - np.sqrt(ab)[..., None] * ps) ** 2).sum(-1) / (2 * (1 - ab))   # (B, K)
        w = np.exp(logw - logw.max(axis=1, keepdims=True))
        x0 = (w / w.sum(axis=1, keepdims=True)) @ ps[0]                         # E[x0 | x_t], (B, D)
        eps = (xs[:, 0] - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
        return Tensor(eps.reshape(x.shape).astype(x.dtype))


class BayesClassifier:
    """The exact noise-aware classifier for MixtureOracle's points, point k being class k, in tinydiff
    ops: log p(k | x_t) = log_softmax_k(-|x_t - sqrt(ab) p_k|^2 / (2 (1 - ab)))."""
    time_input = staticmethod(index_time)

    def __init__(self, schedule, points):
        self.s, self.points = schedule, points

    def __call__(self, x, t):
        ab = alpha_bar_at(self.s, t, "index")[:, :, 0, 0]                       # (B, 1)
        b, k = x.shape[0], len(self.points)
        centers = Tensor((np.sqrt(ab)[..., None] * self.points.reshape(1, k, -1)).astype(x.dtype))
        diff = x.reshape(b, 1, -1) - centers                                     # (B, K, D)
        return (diff * diff).sum(axis=2) * Tensor((-0.5 / (1 - ab)).astype(x.dtype))   # (B, K)


class ContextModel:
    """eps = sqrt(1 - ab) x_t + (context . u) (the Gaussian oracle pushed by a one-hot context);
    the null context is zeros. Records each call's batch size."""
    time_input = staticmethod(index_time)

    def __init__(self, schedule):
        self.s, self.batches = schedule, []
        self.u = np.array([0.3, -0.2, 0.1], np.float32)

    def null_context(self, batch):
        return np.zeros((batch, 3), np.float32)

    def __call__(self, x, t, c=None):
        self.batches.append(x.shape[0])
        push = (c.data @ self.u).reshape(-1, 1, 1, 1) if c is not None else 0.0
        return Tensor((np.sqrt(1 - alpha_bar_at(self.s, t, "index")) * x.data + push).astype(x.dtype))


# --- DDIM timesteps ---------------------------------------------------------------------------

def test_ddim_timesteps_small_cases_by_hand():
    t, prev = ddim_timesteps(10, 3, "leading")
    assert list(t) == [6, 3, 0] and list(prev) == [3, 0, -1]
    t, prev = ddim_timesteps(10, 3, "trailing")              # round(10 - k 10/3) - 1
    assert list(t) == [9, 6, 2] and list(prev) == [6, 2, -1]
    t, prev = ddim_timesteps(10, 3, "linspace")              # round(linspace(9, 0, 3)): 4.5 -> 4
    assert list(t) == [9, 4, 0] and list(prev) == [4, 0, -1]
    t, prev = ddim_timesteps(20, 6, "trailing")
    assert list(t) == [19, 16, 12, 9, 6, 2] and list(prev) == [16, 12, 9, 6, 2, -1]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("T,steps", [(1000, 50), (500, 7), (500, 499), (100, 100), (37, 1), (1000, 3)])
def test_ddim_timesteps_first_last_no_repeats(spacing, T, steps):
    t, prev = ddim_timesteps(T, steps, spacing)
    assert len(t) == steps and t.dtype == np.int64
    assert np.all(np.diff(t) < 0) and t[-1] >= 0                   # strictly decreasing: no repeats
    assert np.array_equal(prev[:-1], t[1:]) and prev[-1] == -1     # prev is the next one; then "t = -1"
    first = {"leading": (steps - 1) * (T // steps), "trailing": T - 1, "linspace": T - 1}[spacing]
    assert t[0] == first
    if spacing != "trailing" and steps > 1:
        assert t[-1] == 0
    if steps == T:
        assert list(t) == list(range(T - 1, -1, -1))


def test_ddim_timesteps_refuses_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(100, 101, "leading")
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(100, 0, "leading")
    with pytest.raises(ValueError, match="spacing"):
        ddim_timesteps(100, 10, "uniform")


def test_ddim_eta_1_over_all_steps_is_ddpm_posterior_std():
    s = NoiseSchedule("cosine", timesteps=200)
    t, prev = ddim_timesteps(200, 200, "trailing")
    ab = s.f64["alpha_bar"]
    sig = np.array([ddim_sigma(ab[a], ab[p] if p >= 0 else 1.0, 1.0) for a, p in zip(t, prev)])
    assert np.allclose(sig, np.sqrt(s.f64["posterior_variance"][t]), rtol=1e-10, atol=1e-14)
    assert sig[-1] == 0                                              # no noise on the last step


# --- samplers against known answers -----------------------------------------------------------

@pytest.mark.parametrize("time_input", ["index", "fraction"])
def test_one_image_oracle_returns_the_image(time_input):
    s = NoiseSchedule("linear", timesteps=100)
    xstar = np.random.default_rng(0).uniform(-1, 1, (1, 1, 4, 4)).astype(np.float32)
    model = OneImageOracle(s, xstar, time_input=time_input)
    for variance in ("small", "large"):
        x = ddpm_sample(model, s, (6, 1, 4, 4), seed=1, variance=variance)
        assert np.abs(x - xstar).max() < 1e-5, variance
    for spacing in SPACINGS:
        for eta in (0.0, 1.0):
            x = ddim_sample(model, s, (6, 1, 4, 4), steps=9, eta=eta, spacing=spacing, seed=2)
            assert np.abs(x - xstar).max() < 1e-5, (spacing, eta)


@pytest.mark.parametrize("objective", ["x0", "v"])
def test_samplers_understand_x0_and_v_models(objective):
    s = NoiseSchedule("cosine", timesteps=50)
    xstar = np.random.default_rng(3).uniform(-1, 1, (1, 2, 2, 2)).astype(np.float32)
    model = OneImageOracle(s, xstar, objective)
    assert np.abs(ddpm_sample(model, s, (3, 2, 2, 2), seed=0, objective=objective) - xstar).max() < 1e-4
    assert np.abs(ddim_sample(model, s, (3, 2, 2, 2), steps=10, seed=0, objective=objective) - xstar).max() < 1e-4


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_matches_algorithm_2_written_out(variance):
    s = NoiseSchedule("linear", timesteps=30)
    shape = (5, 1, 3, 3)
    got = ddpm_sample(GaussianOracle(s), s, shape, seed=7, variance=variance)
    rng = Philox(7)                                                  # the same draws, in the same order
    x = rng.normal(shape, np.float32).astype(np.float64)
    b, a, ab = s.f64["beta"], s.f64["alpha"], s.f64["alpha_bar"]
    for t in range(29, -1, -1):
        eps = np.sqrt(1 - ab[t]) * x
        z = rng.normal(shape, np.float32) if t > 0 else 0.0
        var = b[t] * (1 - (ab[t - 1] if t else 1.0)) / (1 - ab[t]) if variance == "small" else b[t]
        x = (x - b[t] / np.sqrt(1 - ab[t]) * eps) / np.sqrt(a[t]) + np.sqrt(var) * z
    assert np.abs(got - x).max() < 1e-4


def test_ddim_matches_eq_12_written_out_with_trailing_steps():
    s = NoiseSchedule("linear", timesteps=20)
    shape, eta = (4, 1, 2, 2), 0.5
    model = GaussianOracle(s)
    got = ddim_sample(model, s, shape, steps=6, eta=eta, spacing="trailing", seed=3)
    pairs = [(19, 16), (16, 12), (12, 9), (9, 6), (6, 2), (2, -1)]   # round(20 - 20k/6) - 1, by hand
    assert [int(c[0]) for c in model.calls] == [p[0] for p in pairs]
    rng = Philox(3)
    x = rng.normal(shape, np.float32).astype(np.float64)
    ab_all = s.f64["alpha_bar"]
    for t, p in pairs:
        ab, ab_prev = ab_all[t], (ab_all[p] if p >= 0 else 1.0)
        eps = np.sqrt(1 - ab) * x
        sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))      # DDIM eq. 16
        x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
        z = rng.normal(shape, np.float32) if sigma > 0 else 0.0
        x = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma ** 2) * eps + sigma * z   # DDIM eq. 12
    assert np.abs(got - x).max() < 1e-4


def test_ddim_eta_0_and_noise_free_ddpm_are_deterministic():
    s = NoiseSchedule("linear", timesteps=50)
    x_T = np.random.default_rng(9).standard_normal((4, 1, 3, 3)).astype(np.float32)
    model = MixtureOracle(s, np.array([[[[0.5] * 3] * 3], [[[-0.5] * 3] * 3]], np.float32))
    a = ddim_sample(model, s, x_T.shape, steps=10, eta=0.0, seed=1, x_T=x_T)
    b = ddim_sample(model, s, x_T.shape, steps=10, eta=0.0, seed=2, x_T=x_T)
    assert np.array_equal(a, b)
    e = ddpm_sample(model, s, x_T.shape, seed=1, x_T=x_T, noise_free=True)   # the course's ablation
    f = ddpm_sample(model, s, x_T.shape, seed=2, x_T=x_T, noise_free=True)
    assert np.array_equal(e, f)


def test_ddim_eta_1_adds_the_noise_of_eq_16_to_a_given_x_T():
    """From one x_T, two seeds: each output entry is A x_T + B + (the noise of all steps), so half
    the variance of their difference is the sampler's noise variance, which ddim_moments gives
    exactly (var_T = 0); and the same seed gives the same samples."""
    s = NoiseSchedule("cosine", timesteps=50)
    model, shape = GaussianOracle(s, mu=0.3, sd=0.5), (64, 1, 16, 16)
    x_T = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
    c = ddim_sample(model, s, shape, steps=10, eta=1.0, seed=1, x_T=x_T)
    d = ddim_sample(model, s, shape, steps=10, eta=1.0, seed=2, x_T=x_T)
    assert np.array_equal(c, ddim_sample(model, s, shape, steps=10, eta=1.0, seed=1, x_T=x_T))
    _, noise_var = ddim_moments(s, 0.3, 0.5, steps=10, eta=1.0, var_T=0.0)
    _, var_diff, _, se_diff = sample_moments(c - d)                  # Var(c - d) = 2 noise_var
    assert abs(var_diff / 2 - noise_var) < 4 * se_diff / 2, (var_diff / 2, noise_var, se_diff / 2)


# ---------------------------------------------------------------------------------------------
# The output distribution under the Gaussian oracle (data ~ N(mu, sd^2), see gaussian_oracle.py).
# Each entry of a sample is an independent draw, so a (B, 1, 32, 32) batch gives B * 1024 draws;
# tolerances are 4 standard errors of the sample mean and variance.

MU, SD = 0.5, 1.0


def _check_moments(x, mean, var, what):
    m, v, se_m, se_v = sample_moments(x)
    assert abs(m - mean) < 4 * se_m, f"{what}: mean {m:.5f}, expected {mean:.5f} (standard error {se_m:.5f})"
    assert abs(v - var) < 4 * se_v, f"{what}: variance {v:.5f}, expected {var:.5f} (standard error {se_v:.5f})"


SAMPLERS = {   # name: (sample(model, schedule, shape, seed), exact(schedule, mu, sd) -> (mean, var))
    "ddpm small": (lambda m, s, shape, seed: ddpm_sample(m, s, shape, seed=seed, variance="small"),
                   lambda s, mu, sd: ddpm_moments(s, mu, sd, "small")),
    "ddpm large": (lambda m, s, shape, seed: ddpm_sample(m, s, shape, seed=seed, variance="large"),
                   lambda s, mu, sd: ddpm_moments(s, mu, sd, "large")),
    "ddim eta 0": (lambda m, s, shape, seed: ddim_sample(m, s, shape, steps=s.T, eta=0.0, seed=seed),
                   lambda s, mu, sd: ddim_moments(s, mu, sd, s.T, 0.0)),
    "ddim eta 1": (lambda m, s, shape, seed: ddim_sample(m, s, shape, steps=s.T, eta=1.0, seed=seed),
                   lambda s, mu, sd: ddim_moments(s, mu, sd, s.T, 1.0)),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_draw_from_the_data_distribution_under_the_gaussian_oracle(name):
    """With the exact model, all T = 1000 steps and a cosine schedule (alpha_bar_T ~ 0, so x_T ~
    N(0, 1) is right), each sampler's own bias (its exact output moments minus (mu, sd^2)) is below
    half a standard error, so the samples must match N(mu, sd^2) within sampling error."""
    sample, exact = SAMPLERS[name]
    s = NoiseSchedule("cosine", timesteps=1000)
    shape = (16, 1, 32, 32)                                           # 16384 draws
    x = sample(GaussianOracle(s, MU, SD), s, shape, list(SAMPLERS).index(name))
    bias_mean, bias_var = (e - target for e, target in zip(exact(s, MU, SD), (MU, SD ** 2)))
    _, _, se_mean, se_var = sample_moments(x)
    assert abs(bias_mean) < se_mean / 2 and abs(bias_var) < se_var / 2, (name, bias_mean, bias_var)
    _check_moments(x, MU, SD ** 2, name)


@pytest.mark.parametrize("name, steps", [("ddpm small", None), ("ddpm large", None),
                                         ("ddim eta 0", 10), ("ddim eta 1", 10)])
def test_sampler_output_has_its_exact_linear_gaussian_moments(name, steps):
    """Few steps, data N(0.3, 0.5^2): the samplers are biased here (DDIM eta 1 over 10 steps
    shrinks the variance by a quarter), and the samples must show exactly the moments that the
    step equations give (gaussian_oracle.ddpm_moments / ddim_moments), noise variances included."""
    s = NoiseSchedule("cosine", timesteps=100)
    mu, sd, shape, seed = 0.3, 0.5, (64, 1, 32, 32), 10 + list(SAMPLERS).index(name)
    model = GaussianOracle(s, mu, sd)
    if name.startswith("ddpm"):
        variance = name.split()[1]
        x, (mean, var) = ddpm_sample(model, s, shape, seed=seed, variance=variance), ddpm_moments(s, mu, sd, variance)
    else:
        eta = float(name.split()[-1])
        x, (mean, var) = (ddim_sample(model, s, shape, steps=steps, eta=eta, seed=seed),
                          ddim_moments(s, mu, sd, steps, eta))
    _check_moments(x, mean, var, name)


def test_ddpm_small_and_large_posterior_variance_differ_measurably():
    """Data N(0.5, 1), T = 100: sigma^2 = beta is exact for unit-variance data (DDPM Sec. 3.2), so
    "large" keeps the variance at 1; beta_tilde < beta loses some at every step. The difference
    must show, by more than 5 standard errors, and be the one the step equations predict."""
    s = NoiseSchedule("cosine", timesteps=100)
    model, shape = GaussianOracle(s, MU, SD), (128, 1, 32, 32)
    small = sample_moments(ddpm_sample(model, s, shape, seed=20, variance="small"))
    large = sample_moments(ddpm_sample(model, s, shape, seed=21, variance="large"))
    predicted = ddpm_moments(s, MU, SD, "large")[1] - ddpm_moments(s, MU, SD, "small")[1]
    diff, se_diff = large[1] - small[1], math.hypot(small[3], large[3])
    assert diff > 5 * se_diff, f"variance large {large[1]:.4f} vs small {small[1]:.4f} (standard error {se_diff:.4f})"
    assert abs(diff - predicted) < 4 * se_diff, (diff, predicted, se_diff)
    assert abs(large[1] - SD ** 2) < 4 * large[3] + abs(ddpm_moments(s, MU, SD, "large")[1] - SD ** 2)


def test_trajectory_every_k_steps():
    s = NoiseSchedule("linear", timesteps=20)
    x, traj = ddpm_sample(GaussianOracle(s), s, (2, 1, 2, 2), seed=0, return_trajectory_every=6)
    assert len(traj) == 1 + 3 + 1 and traj[-1] is x             # x_T, after steps 6, 12, 18, and x_0
    x, traj = ddim_sample(GaussianOracle(s), s, (2, 1, 2, 2), steps=10, seed=0, return_trajectory_every=5)
    assert len(traj) == 3 and traj[-1] is x and traj[0].shape == x.shape
    x_T = Philox(0).normal((2, 1, 2, 2), np.float32)                # seed=0: the first draw of Philox(0)
    assert np.array_equal(traj[0], x_T)


def test_sampler_argument_checks():
    s = NoiseSchedule("linear", timesteps=20)
    m = GaussianOracle(s)
    with pytest.raises(ValueError, match="variance"):
        ddpm_sample(m, s, (1, 1, 2, 2), variance="learned")
    with pytest.raises(ValueError, match="not both"):
        ddpm_sample(m, s, (1, 1, 2, 2), seed=0, generator=np.random.default_rng(0))
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(m, s, (1, 1, 2, 2), steps=21)
    with pytest.raises(ValueError, match="context"):
        ddim_sample(ContextModel(s), s, (2, 1, 2, 2), np.eye(3, dtype=np.float32), steps=2)


# --- guidance ---------------------------------------------------------------------------------

def test_guidance_scale_1_is_the_conditional_model():
    s = NoiseSchedule("linear", timesteps=20)
    c = np.eye(3, dtype=np.float32)[[0, 1, 2, 1]]
    model = ContextModel(s)
    plain = ddim_sample(model, s, (4, 1, 2, 2), c, steps=5, eta=0.5, seed=4)
    assert model.batches == [4] * 5                                  # no unconditional half at s = 1
    guided = ddim_sample(model, s, (4, 1, 2, 2), c, steps=5, eta=0.5, seed=4, guidance_scale=1.0)
    assert np.array_equal(plain, guided)
    nearly = ddim_sample(model, s, (4, 1, 2, 2), c, steps=5, eta=0.5, seed=4, guidance_scale=1.0 + 1e-9)
    assert np.abs(nearly - plain).max() < 1e-6                       # the doubled-batch path agrees


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_classifier_free_guidance_convention_and_doubled_batch(sampler):
    """eps = eps_uncond + s (eps_cond - eps_uncond), from one call on a (2B) batch per step."""
    s_cfg, s = 3.0, NoiseSchedule("linear", timesteps=15)
    c = np.eye(3, dtype=np.float32)[[2, 0, 1]]
    model = ContextModel(s)

    class Combined:                                  # the guided eps, spelled out with two calls
        time_input = staticmethod(index_time)

        def __call__(self, x, t, ctx):
            cond, uncond = model(x, t, ctx).data, model(x, t, None).data
            return Tensor(uncond + s_cfg * (cond - uncond))
    run = (lambda m, **kw: ddpm_sample(m, s, (3, 1, 2, 2), c, seed=5, **kw)) if sampler == "ddpm" else \
          (lambda m, **kw: ddim_sample(m, s, (3, 1, 2, 2), c, steps=5, eta=0.3, seed=5, **kw))
    want = run(Combined())
    model.batches.clear()
    got = run(model, guidance_scale=s_cfg)
    assert set(model.batches) == {6} and len(model.batches) == (15 if sampler == "ddpm" else 5)
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(got - run(model)).max() > 1e-2                   # and guidance changed something


class MarkedNullModel:
    """The Gaussian oracle, recording every context it is given; its null context is a marker, 7s,
    that neither zeros nor any one-hot vector could be mistaken for."""
    time_input = staticmethod(index_time)

    def __init__(self, schedule):
        self.s, self.contexts = schedule, []

    def null_context(self, batch):
        return np.full((batch, 3), 7.0, np.float32)

    def __call__(self, x, t, c=None):
        self.contexts.append(None if c is None else c.data.copy())
        return Tensor((np.sqrt(1 - alpha_bar_at(self.s, t, "index")) * x.data).astype(x.dtype))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guidance_takes_the_models_own_null_context(sampler):
    s, c = NoiseSchedule("linear", timesteps=6), np.eye(3, dtype=np.float32)[[2, 0]]
    model = MarkedNullModel(s)
    kw = dict(seed=1, guidance_scale=2.0)
    ddpm_sample(model, s, (2, 1, 2, 2), c, **kw) if sampler == "ddpm" else \
        ddim_sample(model, s, (2, 1, 2, 2), c, steps=3, **kw)
    assert len(model.contexts) == (6 if sampler == "ddpm" else 3)
    for seen in model.contexts:                                      # [context; null] in one call
        assert np.array_equal(seen[:2], c) and np.array_equal(seen[2:], model.null_context(2))


def test_classifier_guidance_needs_the_labels_given():
    """The class y is never read off a context (only the model knows what its context means)."""
    s = NoiseSchedule("linear", timesteps=5)
    clf = BayesClassifier(s, _two_points())
    with pytest.raises(ValueError, match="classifier_labels"):
        ddim_sample(GaussianOracle(s), s, (2, 1, 2, 2), np.eye(2, dtype=np.float32), steps=2, seed=0,
                    classifier=clf, classifier_scale=1.0)


def _two_points():
    a = np.full((1, 1, 2, 2), 0.6, np.float32)
    a[..., 0, :] = -0.6
    return np.concatenate([a, -a])                                   # class 0 and class 1


def test_classifier_gradient_matches_finite_differences():
    s = NoiseSchedule("linear", timesteps=50)
    clf = BayesClassifier(s, _two_points().astype(np.float64))
    x = np.random.default_rng(0).standard_normal((3, 1, 2, 2))
    t, y = np.array([5, 20, 45]), np.array([0, 1, 0])
    g = classifier_grad(clf, s, x, t, y)

    def log_p(x):
        logits = clf(Tensor(x), Tensor(t)).data
        return (logits - np.log(np.exp(logits).sum(1, keepdims=True)))[np.arange(3), y].sum()
    h, num = 1e-6, np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = h
        num[i] = (log_p(x + d) - log_p(x - d)) / (2 * h)
    assert np.allclose(g, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_classifier_guidance_step_by_hand(sampler):
    """DDPM: mean + s Sigma g (D&N Alg. 1); DDIM: eps - sqrt(1 - ab) s g (D&N eq. 14)."""
    s, scale, shape = NoiseSchedule("linear", timesteps=4), 2.5, (2, 1, 2, 2)
    points = _two_points()
    model, clf, y = MixtureOracle(s, points), BayesClassifier(s, points), np.array([1, 0])
    kw = dict(classifier=clf, classifier_scale=scale, classifier_labels=y, seed=8)
    got = ddpm_sample(model, s, shape, **kw) if sampler == "ddpm" else ddim_sample(model, s, shape, steps=4, eta=0.5, **kw)
    rng = Philox(8)
    x = rng.normal(shape, np.float32)
    b, a, ab_all, var_all = s.f64["beta"], s.f64["alpha"], s.f64["alpha_bar"], s.f64["posterior_variance"]
    for t in range(3, -1, -1):
        tt = np.full(2, t)
        eps = model(Tensor(x), Tensor(tt)).data.astype(np.float64)
        g = classifier_grad(clf, s, x, tt, y).astype(np.float64)
        if sampler == "ddpm":
            mean = (x - b[t] / np.sqrt(1 - ab_all[t]) * eps) / np.sqrt(a[t]) + scale * var_all[t] * g
            z = rng.normal(shape, np.float32) if t > 0 else 0.0
            x = (mean + np.sqrt(var_all[t]) * z).astype(np.float32)
        else:
            ab, ab_prev = ab_all[t], (ab_all[t - 1] if t else 1.0)
            eps = eps - np.sqrt(1 - ab) * scale * g
            sigma = 0.5 * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
            x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
            z = rng.normal(shape, np.float32) if sigma > 0 else 0.0
            x = (np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma ** 2) * eps + sigma * z).astype(np.float32)
    assert np.abs(got - x).max() < 1e-4


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_classifier_guidance_moves_samples_toward_the_class(sampler):
    """Data: two points, one per class. Unguided, about half the samples land on class 0; guided by
    the exact noise-aware classifier toward class 0, (nearly) all do, and p(class 0) rises."""
    s, n = NoiseSchedule("linear", timesteps=100), 200
    points = _two_points()
    model, clf = MixtureOracle(s, points), BayesClassifier(s, points)
    y = np.zeros(n, np.int64)
    run = (lambda **kw: ddpm_sample(model, s, (n, 1, 2, 2), seed=11, **kw)) if sampler == "ddpm" else \
          (lambda **kw: ddim_sample(model, s, (n, 1, 2, 2), steps=25, seed=11, **kw))

    def p_class0(x):                                # the classifier's p(y = 0 | x) at the smallest noise
        logits = clf(Tensor(x), Tensor(np.zeros(n, np.int64))).data.astype(np.float64)
        return np.exp(logits[:, 0] - np.logaddexp(logits[:, 0], logits[:, 1])).mean()
    plain = run()
    guided = run(classifier=clf, classifier_scale=1.0, classifier_labels=y)
    near0 = lambda x: (np.abs(x - points[0]).max(axis=(1, 2, 3)) < 0.05).mean()
    assert 0.3 < near0(plain) < 0.7
    assert near0(guided) > 0.95 and p_class0(guided) > p_class0(plain) + 0.3


def test_train_noisy_classifier_learns_a_toy_task():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 256)
    x = rng.normal(0, 0.2, (256, 1, 8, 8)).astype(np.float32)
    x[y == 0, :, :4] += 0.8                                         # class 0: bright top half
    x[y == 1, :, 4:] += 0.8                                         # class 1: bright bottom half
    x = np.clip(x, -1, 1)
    s = NoiseSchedule("linear", timesteps=100)
    clf = train_noisy_classifier(x, y, s, steps=40, batch_size=32, n_feat=8, lr=5e-3, seed=0)
    assert isinstance(clf, NoisyClassifier) and not clf.training
    assert accuracy(clf, s, x[:128], y[:128], t=5) > 0.9
    g = classifier_grad(clf, s, x[:4], np.full(4, 10), y[:4])     # a trained classifier guides too
    assert g.shape == (4, 1, 8, 8) and np.abs(g).sum() > 0
    assert all(p.requires_grad and p.grad is None for p in clf.parameters())   # weights untouched


@pytest.mark.skipif(backend.native is None or not hasattr(backend.native, "ddim_step"),
                    reason="the compiled sampler kernels are not built")
def test_native_and_numpy_kernels_give_the_same_samples():
    s = NoiseSchedule("linear", timesteps=20)
    c = np.eye(3, dtype=np.float32)[[0, 1]]
    out = {}
    for kernels in ("numpy", "native"):
        backend.set_kernels(kernels)
        try:
            out[kernels] = (ddpm_sample(ContextModel(s), s, (2, 1, 3, 3), c, seed=0, guidance_scale=2.0),
                            ddim_sample(ContextModel(s), s, (2, 1, 3, 3), c, steps=7, eta=0.7, seed=0,
                                        guidance_scale=2.0, clip_x0=True))
        finally:
            backend.set_kernels("native")
    for a, b in zip(out["numpy"], out["native"]):
        assert np.abs(a - b).max() < 1e-5
