"""The ODE samplers (Euler, Heun, DPM-Solver++ 2M; tinydiff/samplers.py), DPM-Solver++ 2M's SDE twin,
and the ODE view of DDIM:
noise levels and continuous time, DDIM eta 0 == Euler in sigma, convergence to the exact
probability-flow ODE solution of Gaussian data (with the fitted orders), every objective, classifier-
free guidance, NFE counts, bad arguments, agreement with diffusers' schedulers, CPU against GPU."""
import math

import numpy as np
import pytest

from tinydiff import backend
from tinydiff.diffusion import NoiseSchedule
from tinydiff.samplers import (SAMPLERS, alpha_bar_at, ddim_sample, ddim_timesteps, ddpm_sample,
                               dpm_solver_sample, dpm_solver_sde_sample, euler_sample, heun_sample, karras_sigmas,
                               nfe, sigma_to_t,
                               timestep_sigmas, vp_sigmas)
from tinydiff.tensor import Tensor

from gaussian_oracle import (GaussianOracle, convergence_order, eps_given_xt, ode_endpoint_error, sample_moments,
                             x0_given_xt)

ODE = {"euler": euler_sample, "heun": heun_sample, "dpm++2m": dpm_solver_sample}
SOLVERS = dict(ODE, **{"dpm++2m-sde": dpm_solver_sde_sample})     # and the SDE solver: the same leading arguments


def run(name, model, schedule, shape, steps, **kw):
    if name == "ddpm":
        return ddpm_sample(model, schedule, shape, **kw)
    if name == "ddim":
        return ddim_sample(model, schedule, shape, steps=steps, **kw)
    return SOLVERS[name](model, schedule, shape, steps=steps, **kw)


def ab_of(schedule, t):
    return schedule.f64["alpha_bar"][t] if t.dtype.kind in "iu" else alpha_bar_at(schedule, t)


class ContextOracle:
    """The exact model for data N(mu + c . u, sd^2) given a context c (the null context: zeros, data
    N(mu, sd^2)), any objective, fractional timesteps allowed. Records each call's batch size."""

    def __init__(self, schedule, objective="eps", mu=0.3, sd=0.5):
        self.s, self.objective, self.mu, self.sd, self.batches = schedule, objective, mu, sd, []
        self.u = np.array([0.4, -0.3, 0.2])

    @staticmethod
    def time_input(t, T):
        return Tensor(t)

    def null_context(self, batch):
        return np.zeros((batch, 3))

    def __call__(self, x, t, c=None):
        self.batches.append(x.shape[0])
        ab = ab_of(self.s, t.data).reshape(-1, 1, 1, 1)
        mu = self.mu + (0.0 if c is None else (c.data @ self.u).reshape(-1, 1, 1, 1))
        eps, x0 = eps_given_xt(x.data, ab, mu, self.sd), x0_given_xt(x.data, ab, mu, self.sd)
        return Tensor({"eps": eps, "x0": x0, "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0}[self.objective])


class GuidedByHand(ContextOracle):
    """eps_uncond + s (eps_cond - eps_uncond) (CFG eq. 6) computed inside one model: the same sampler
    without guidance must then give what the sampler with guidance gives on ContextOracle."""

    def __init__(self, schedule, scale):
        super().__init__(schedule)
        self.scale = scale

    def __call__(self, x, t, c=None):
        cond = super().__call__(x, t, c).data
        uncond = super().__call__(x, t, Tensor(self.null_context(x.shape[0]))).data
        return Tensor(uncond + self.scale * (cond - uncond))


# --- noise levels and continuous time -----------------------------------------------------------

def test_noise_levels_and_continuous_time():
    s = NoiseSchedule("linear", timesteps=50)
    ab, sigma = s.f64["alpha_bar"], vp_sigmas(s)
    assert np.allclose(sigma, np.sqrt((1 - ab) / ab), rtol=1e-14) and np.all(np.diff(sigma) > 0)
    t = np.arange(50, dtype=np.float64)
    assert np.allclose(alpha_bar_at(s, t), ab, rtol=1e-12)                 # exact at the trained timesteps
    assert np.allclose(sigma_to_t(s, sigma), t, atol=1e-9)                 # and back
    # between them: linear in log-SNR (= linear in log sigma), and sigma_to_t inverts it
    mid = t[:-1] + 0.25
    lam = lambda a: np.log(a / (1 - a))
    assert np.allclose(lam(alpha_bar_at(s, mid)), 0.75 * lam(ab[:-1]) + 0.25 * lam(ab[1:]), rtol=1e-12)
    assert np.allclose(sigma_to_t(s, np.sqrt((1 - alpha_bar_at(s, mid)) / alpha_bar_at(s, mid))), mid, atol=1e-9)


def test_karras_sigmas_eq_5():
    s = NoiseSchedule("cosine", timesteps=100)
    sigma = vp_sigmas(s)
    k = karras_sigmas(s, 7)
    assert len(k) == 8 and k[-1] == 0 and k[0] == pytest.approx(sigma[-1], rel=1e-12)
    assert k[-2] == pytest.approx(sigma[0], rel=1e-12) and np.all(np.diff(k) < 0)
    assert np.allclose(np.diff(k[:-1] ** (1 / 7)), (sigma[0] ** (1 / 7) - sigma[-1] ** (1 / 7)) / 6, rtol=1e-10)
    assert np.allclose(karras_sigmas(s, 1), [sigma[-1], 0.0], rtol=1e-12)     # one step: sigma_max, then 0


def test_ode_samplers_call_the_model_at_fractional_timesteps():
    """On Karras levels (Euler's and Heun's default) the model is called between the trained timesteps;
    DPM-Solver++'s default levels are DDIM's trailing timesteps, which it calls exactly."""
    s = NoiseSchedule("linear", timesteps=100)
    for name in ODE:
        model = GaussianOracle(s)
        run(name, model, s, (2, 1, 2, 2), 6, seed=0, sigmas=karras_sigmas(s, 6))
        called = np.array([c[0] for c in model.calls])
        k = karras_sigmas(s, 6)[:-1]
        want = sigma_to_t(s, k) if name != "heun" else np.concatenate([[sigma_to_t(s, k[0])]] +
                                                                      [sigma_to_t(s, [a, a]) for a in k[1:]])
        assert np.allclose(called, want, atol=1e-9), (name, called, want)
        assert called.dtype == np.float64 and np.any(np.abs(called - np.round(called)) > 0.01), name
    model = GaussianOracle(s)
    run("dpm++2m", model, s, (2, 1, 2, 2), 6, seed=0)
    called = np.array([c[0] for c in model.calls])
    assert np.allclose(called, ddim_timesteps(s.T, 6, "trailing")[0], atol=1e-6), called


@pytest.mark.parametrize("kind", ["ContextUnet", "UNet"])
def test_real_models_take_continuous_time(kind):
    """The ContextUnet's (t + 1) / T and the UNet's sinusoidal embedding accept fractional t: every ODE
    sampler runs on them, and t = 3.5 gives a finite output that differs from t = 3 and t = 4."""
    from tinydiff.context_unet import ContextUnet
    from tinydiff.unet import UNet
    backend.manual_seed(0)
    model = (ContextUnet(1, n_feat=8, n_cfeat=10, height=8) if kind == "ContextUnet"
             else UNet(1, channels=(8, 16), num_classes=10, height=8, head_dim=4, groups=4))
    model.eval()
    s = NoiseSchedule("linear", timesteps=20)
    labels = np.array([1, 4])
    for name in SOLVERS:
        x = run(name, model, s, (2, 1, 8, 8), 3, context=model.context(labels), seed=0, guidance_scale=2.0)
        assert x.shape == (2, 1, 8, 8) and x.dtype == np.float32 and np.all(np.isfinite(x)), name
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    c = Tensor(np.asarray(model.context(labels)))
    out = [model(Tensor(x), model.time_input(np.full(2, t), s.T), c).data for t in (3.0, 3.5, 4.0)]
    assert np.all(np.isfinite(out[1])) and np.abs(out[1] - out[0]).max() > 0 and np.abs(out[1] - out[2]).max() > 0


# --- DDIM (eta 0) is Euler's method in sigma -----------------------------------------------------

@pytest.mark.parametrize("spacing", ["trailing", "linspace", "leading"])
def test_ddim_eta_0_is_euler_in_sigma(spacing):
    """DDIM eq. 12 with sigma = 0, divided by sqrt(alpha_bar_prev): x_hat_prev = x_hat + (s_prev - s) eps.
    So ddim_sample and euler_sample on DDIM's own noise levels (then 0) take the same steps."""
    s = NoiseSchedule("linear", timesteps=200)
    t, _ = ddim_timesteps(s.T, 9, spacing)
    sigmas = np.append(vp_sigmas(s)[t], 0.0)
    x_T = np.random.default_rng(3).standard_normal((3, 1, 2, 2))
    kw = dict(x_T=x_T, dtype=np.float64, return_trajectory_every=1)
    _, ddim = ddim_sample(GaussianOracle(s), s, x_T.shape, steps=9, eta=0.0, spacing=spacing, **kw)
    _, euler = euler_sample(GaussianOracle(s), s, x_T.shape, sigmas=sigmas, **kw)
    assert len(ddim) == len(euler) == 10
    diff = max(np.abs(a - b).max() for a, b in zip(ddim, euler))
    print(f"DDIM vs Euler in sigma ({spacing}): largest difference over the trajectory {diff:.2e}")
    assert diff < 1e-9
    # and it is not a coincidence of the oracle: a different rule (Heun) on the same sigmas differs
    _, heun = heun_sample(GaussianOracle(s), s, x_T.shape, sigmas=sigmas, **kw)
    assert np.abs(heun[-2] - ddim[-2]).max() > 1e-4


# --- DPM-Solver++(2M) SDE --------------------------------------------------------------------------

def test_dpm_solver_sde_first_step_is_ddim_eta_1():
    """Its first step is first order: (sigma'/sigma) e^{-h} x + alpha' (1 - e^{-2h}) x0 + sigma' sqrt(1 - e^{-2h}) z
    is DDIM eq. 12 with eta = 1 (eq. 16) written in log-SNR; with the same z the two agree to rounding,
    and the second-order steps after it do not."""
    s = NoiseSchedule("linear", timesteps=100)
    x_T = np.random.default_rng(0).standard_normal((3, 1, 2, 2))
    kw = dict(x_T=x_T, dtype=np.float64, seed=3, return_trajectory_every=1)
    _, ddim = ddim_sample(GaussianOracle(s, 0.3, 0.5), s, x_T.shape, steps=5, eta=1.0, **kw)
    _, sde = dpm_solver_sde_sample(GaussianOracle(s, 0.3, 0.5), s, x_T.shape, steps=5, **kw)
    assert np.abs(sde[1] - ddim[1]).max() < 1e-12
    assert np.abs(sde[2] - ddim[2]).max() > 1e-3


def test_dpm_solver_sde_draws_the_data_distribution_and_its_noise_from_the_seed():
    """With the exact model and 100 steps the samples match N(mu, sd^2): mean and variance within 4
    standard errors, its step bias included; the same seed gives the same samples, another seed others."""
    s = NoiseSchedule("cosine", timesteps=1000)
    mu, sd, shape = 0.5, 0.8, (16, 1, 32, 32)                          # 16384 draws
    x = dpm_solver_sde_sample(GaussianOracle(s, mu, sd), s, shape, steps=100, seed=7, dtype=np.float64)
    m, v, se_m, se_v = sample_moments(x)
    assert abs(m - mu) < 4 * se_m and abs(v - sd ** 2) < 4 * se_v, (m, v, se_m, se_v)
    small = (2, 1, 2, 2)
    again = [dpm_solver_sde_sample(GaussianOracle(s), s, small, steps=6, seed=k) for k in (1, 1, 2)]
    assert np.array_equal(again[0], again[1]) and np.abs(again[0] - again[2]).max() > 0.1
    ode = dpm_solver_sample(GaussianOracle(s), s, small, steps=6, seed=1)    # the same x_T, no noise on the way
    assert np.abs(again[0] - ode).max() > 0.1


# --- the exact answer key: convergence and order -------------------------------------------------

ORDER_STEPS = [16, 32, 64, 128, 256]
THEORY = {"ddim": 1, "euler": 1, "heun": 2, "dpm++2m": 2}


@pytest.mark.parametrize("sampler", list(THEORY))
def test_every_sampler_converges_to_the_exact_ode_solution_at_its_order(sampler):
    s = NoiseSchedule("linear", timesteps=1000)
    errors = [ode_endpoint_error(sampler, s, n) for n in ORDER_STEPS]
    order = convergence_order(errors, ORDER_STEPS)
    print(f"{sampler}: errors {['%.2e' % e for e in errors]}, fitted order {order:.3f} (theory {THEORY[sampler]})")
    assert all(b < a for a, b in zip(errors, errors[1:])), errors             # it converges
    assert errors[-1] < (2e-2 if THEORY[sampler] == 1 else 1e-3), errors
    assert abs(order - THEORY[sampler]) <= 0.25, order


# --- objectives, guidance, NFE -------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_each_sampler_each_objective_with_and_without_guidance(name, objective, guidance):
    """The same exact model, asked for eps, x0 or v, gives the same samples; with classifier-free
    guidance, the samples of the guided eps computed by hand inside the model (GuidedByHand)."""
    s, shape = NoiseSchedule("linear", timesteps=100), (3, 1, 2, 2)
    c = np.eye(3)[[0, 2, 1]]
    x_T = np.random.default_rng(5).standard_normal(shape)
    model = ContextOracle(s, objective)
    got = run(name, model, s, shape, 7, context=c, x_T=x_T, dtype=np.float64, guidance_scale=guidance,
              objective=objective, seed=4)
    want = run(name, GuidedByHand(s, guidance) if guidance != 1 else ContextOracle(s), s, shape, 7,
               context=c, x_T=x_T, dtype=np.float64, seed=4)                 # the same noise (dpm++2m-sde)
    assert np.abs(got - want).max() < 1e-9, np.abs(got - want).max()
    evaluations = sum(model.batches) / shape[0]                            # per-sample network evaluations
    assert evaluations == nfe(name, 7, guidance != 1), (evaluations, nfe(name, 7, guidance != 1))
    assert np.abs(got - x_T).max() > 0.1                                   # it moved


class TwoPointClassifier:
    """The exact noise-aware classifier for data on two points p_0, p_1 (class k = point k), in tinydiff
    ops, at any (fractional) timestep: log p(k | x_t) = log_softmax_k(-|x_t - sqrt(ab) p_k|^2 / (2 (1 - ab)))."""
    points = np.array([[0.5, -0.5, 0.2, 0.0], [-0.4, 0.3, 0.0, 0.6]]).reshape(2, 1, 2, 2)

    def __init__(self, schedule):
        self.s = schedule

    @staticmethod
    def time_input(t, T):
        return Tensor(t)

    def __call__(self, x, t):
        ab = ab_of(self.s, t.data).reshape(-1, 1)                                   # (B, 1)
        centers = Tensor(np.sqrt(ab)[..., None] * self.points.reshape(1, 2, -1))     # (B, 2, D)
        diff = x.reshape(x.shape[0], 1, -1) - centers
        return (diff * diff).sum(axis=2) * Tensor(-0.5 / (1 - ab))                   # (B, 2)


class ClassifierGuidedByHand(ContextOracle):
    """eps - sqrt(1 - ab) s g (D&N eq. 14), g = grad log p(y | x_t) in closed form, inside the model."""

    def __init__(self, schedule, classifier, scale, y):
        super().__init__(schedule)
        self.classifier, self.scale, self.y = classifier, scale, y

    def __call__(self, x, t, c=None):
        eps = super().__call__(x, t, c).data
        ab = ab_of(self.s, t.data).reshape(-1, 1, 1, 1)
        # g = d logit_y/dx - sum_k p_k d logit_k/dx, d logit_k/dx = -(x - sqrt(ab) p_k) / (1 - ab)
        d = -(x.data[:, None] - np.sqrt(ab)[:, None] * self.classifier.points[None]) / (1 - ab)[:, None]   # (B, 2, 1, 2, 2)
        logits = self.classifier(x, t).data                                               # (B, 2)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = d[np.arange(len(self.y)), self.y] - (p[:, :, None, None, None] * d).sum(axis=1)
        return Tensor(eps - np.sqrt(1 - ab) * self.scale * g)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_classifier_guidance_in_the_ode_samplers(name):
    """The loop's classifier hook at fractional timesteps: eps - sqrt(1 - alpha_bar) s g, the same as
    the shift computed by hand inside the model; and it moves the samples toward the class."""
    s, shape, y = NoiseSchedule("linear", timesteps=100), (4, 1, 2, 2), np.array([0, 1, 0, 1])
    clf = TwoPointClassifier(s)
    x_T = np.random.default_rng(2).standard_normal(shape)
    kw = dict(x_T=x_T, dtype=np.float64, seed=1)
    got = run(name, ContextOracle(s), s, shape, 6, classifier=clf, classifier_scale=4.0, classifier_labels=y, **kw)
    want = run(name, ClassifierGuidedByHand(s, clf, 4.0, y), s, shape, 6, **kw)
    plain = run(name, ContextOracle(s), s, shape, 6, **kw)
    assert np.abs(got - want).max() < 1e-9, np.abs(got - want).max()
    to_class = lambda x: np.abs(x - clf.points[y]).sum()
    assert to_class(got) < to_class(plain) - 0.1


@pytest.mark.parametrize("name", SAMPLERS)
def test_nfe_counts_the_network_evaluations(name):
    s = NoiseSchedule("linear", timesteps=12)
    for steps, guidance in [(1, 1.0), (5, 1.0), (5, 2.0), (12, 2.0)]:
        if name == "ddpm" and steps != s.T:
            continue
        model = ContextOracle(s)
        run(name, model, s, (2, 1, 2, 2), steps, context=np.eye(3)[[0, 1]], seed=0, guidance_scale=guidance)
        assert sum(model.batches) / 2 == nfe(name, steps, guidance != 1), (name, steps, guidance)
    assert nfe("heun", 10) == 19 and nfe("heun", 10, guidance=True) == 38 and nfe("dpm++2m", 10) == 10
    assert nfe("dpm++2m-sde", 8) == 8 and nfe("dpm++2m-sde", 8, guidance=True) == 16


def test_trajectory_every_k_steps():
    s = NoiseSchedule("linear", timesteps=50)
    for name in SOLVERS:
        x, trajectory = run(name, GaussianOracle(s), s, (2, 1, 2, 2), 10, seed=0, return_trajectory_every=3)
        assert len(trajectory) == 1 + 3 + 1 and trajectory[-1] is x, name      # x_T, steps 3, 6, 9, then 10
        x_again = run(name, GaussianOracle(s), s, (2, 1, 2, 2), 10, seed=0)
        assert np.array_equal(x, x_again), name                                # deterministic given the seed


# --- bad arguments ----------------------------------------------------------------------------

def test_bad_arguments_are_refused_with_a_message():
    s = NoiseSchedule("linear", timesteps=20)
    m = GaussianOracle(s)
    for name, sample in SOLVERS.items():
        for steps in (0, 21, 2.5):
            with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 20\]"):
                sample(m, s, (1, 1, 2, 2), steps=steps)
        with pytest.raises(ValueError, match="sigmas must decrease"):
            sample(m, s, (1, 1, 2, 2), sigmas=[5.0, 1.0])                    # no final 0
        with pytest.raises(ValueError, match="sigmas must decrease"):
            sample(m, s, (1, 1, 2, 2), sigmas=[1e6, 1.0, 0.0])               # above sigma_max
        with pytest.raises(ValueError, match="make 2 steps"):
            sample(m, s, (1, 1, 2, 2), steps=5, sigmas=[0.4, 0.1, 0.0])
        with pytest.raises(ValueError, match="objective must be one of"):
            sample(m, s, (1, 1, 2, 2), objective="score")
    with pytest.raises(ValueError, match="sampler must be one of"):
        nfe("dpm++3m", 10)


# --- agreement with diffusers --------------------------------------------------------------------

def _diffusers():
    torch = pytest.importorskip("torch", reason="torch is not installed (the diffusers comparison needs it)")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    return torch, diffusers


@pytest.mark.parametrize("name, grid", [("dpm++2m", "timesteps"), ("dpm++2m", "karras"), ("euler", "karras"),
                                          ("heun", "karras")])
def test_agrees_with_diffusers_step_by_step(name, grid):
    """tinydiff against diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, final sigma 0
    taken at first order; on the trailing timesteps, our default, and on Karras sigmas),
    EulerDiscreteScheduler and HeunDiscreteScheduler (Karras sigmas), on the exact Gaussian model
    evaluated at each scheduler's own noise level.

    Conventions that differ, and why ours stand:
    - diffusers computes alphas_cumprod in float32, ours in float64: from the same float32 betas the
      sigmas differ by up to 1e-4 relative (8e-5 at T = 1000). The comparison builds our schedule
      from diffusers' own alphas_cumprod, and checks that the plain betas differ by no more.
    - diffusers' Euler and Heun (timestep_spacing linspace) start from x_hat_T = sigma_max x_T, the
      VE prior of Karras Alg. 1, line 2; ours from x_T ~ N(0, I) in the VP variable, that is
      x_hat_T = sqrt(1 + sigma_max^2) x_T, the variance that q(x_T) has and DDPM/DDIM start from.
      The comparison starts diffusers from our x_hat_T.
    - diffusers' DPM-Solver rounds the model's timestep to an integer; ours passes the fractional
      one (continuous time). The model here is evaluated at the noise level, so that does not enter.
    """
    torch, diffusers = _diffusers()
    T, N, mu, sd = 1000, 10, 0.3, 0.5
    betas = np.linspace(1e-4, 0.02, T).astype(np.float32)
    if name == "dpm++2m":
        spacing = dict(timestep_spacing="trailing") if grid == "timesteps" else dict(use_karras_sigmas=True)
        sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=betas, algorithm_type="dpmsolver++",
                                                      solver_order=2, final_sigmas_type="zero", lower_order_final=True,
                                                      prediction_type="epsilon", **spacing)
    else:
        cls = diffusers.EulerDiscreteScheduler if name == "euler" else diffusers.HeunDiscreteScheduler
        sched = cls(num_train_timesteps=T, trained_betas=betas, use_karras_sigmas=True, timestep_spacing="linspace",
                    prediction_type="epsilon")
    sched.set_timesteps(N)
    theirs = sched.sigmas.double().numpy()
    assert len(sched.timesteps) == nfe(name, N)
    plain = NoiseSchedule(betas=betas.astype(np.float64))
    ours_of = karras_sigmas if grid == "karras" else timestep_sigmas
    levels = theirs if name != "heun" else np.concatenate([theirs[:1], theirs[1:-1:2], theirs[-1:]])  # Heun repeats each
    off = (np.abs(ours_of(plain, N) - levels)[:-1] / levels[:-1]).max()        # relative, per level
    assert off < 2e-4                                                          # float32 alphas_cumprod only
    ac = sched.alphas_cumprod.double().numpy()
    s = NoiseSchedule(betas=1 - ac / np.append(1.0, ac[:-1]))                  # diffusers' own alpha_bar
    ours_levels = ours_of(s, N)
    assert np.abs(ours_levels - levels).max() / levels[0] < 1e-6               # float32 sigmas

    x_T = np.random.default_rng(0).standard_normal((2, 1, 3, 3))
    _, ours = ODE[name](GaussianOracle(s, mu, sd), s, x_T.shape, sigmas=ours_levels, x_T=x_T, dtype=np.float64,
                        return_trajectory_every=1)
    sample = torch.tensor(x_T) * (1.0 if name == "dpm++2m" else float(math.sqrt(1 + theirs[0] ** 2)))
    steps = []
    for t in sched.timesteps:
        model_input = sched.scale_model_input(sample, t)                      # VP x_t
        sigma = float(sched.sigmas[sched.step_index or 0])
        eps = eps_given_xt(model_input.double().numpy(), 1 / (1 + sigma ** 2), mu, sd)
        sample = sched.step(torch.tensor(eps), t, sample).prev_sample
        steps.append(sample.double().numpy())
    if name == "heun":
        steps = steps[1::2] + steps[-1:]                                       # after each whole step
    if name != "dpm++2m":                                                      # VE x_hat -> VP x_t
        steps = [x / math.sqrt(1 + sg ** 2) for x, sg in zip(steps, levels[1:])]
    rel = [np.abs(a - b).max() / np.abs(b).max() for a, b in zip(ours[1:], steps)]
    print(f"{name} vs diffusers, relative difference per step: {' '.join('%.1e' % r for r in rel)} "
          f"(sigmas from the same float32 betas: {off:.1e})")
    assert len(rel) == N and max(rel) < 1e-5, rel


def test_dpm_solver_sde_agrees_with_diffusers_step_by_step():
    """tinydiff's dpm++2m-sde against diffusers' DPMSolverMultistepScheduler with algorithm_type
    "sde-dpmsolver++" (order 2, midpoint, trailing timesteps, final sigma 0), on the exact Gaussian
    model, each step given our noise z through diffusers' `variance_noise`: our sampler draws z from
    Philox(5), and the same stream is drawn again here. Our last step returns x0 and draws nothing;
    diffusers' multiplies its z by sigma = 0 there. Schedule from diffusers' float32 alphas_cumprod
    (see test_agrees_with_diffusers_step_by_step)."""
    torch, diffusers = _diffusers()
    from tinydiff.philox import Philox
    T, N, mu, sd = 1000, 10, 0.3, 0.5
    betas = np.linspace(1e-4, 0.02, T).astype(np.float32)
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=betas, algorithm_type="sde-dpmsolver++",
                                                  solver_order=2, final_sigmas_type="zero", lower_order_final=True,
                                                  prediction_type="epsilon", timestep_spacing="trailing")
    sched.set_timesteps(N)
    ac = sched.alphas_cumprod.double().numpy()
    s = NoiseSchedule(betas=1 - ac / np.append(1.0, ac[:-1]))
    x_T = np.random.default_rng(0).standard_normal((2, 1, 3, 3))
    _, ours = dpm_solver_sde_sample(GaussianOracle(s, mu, sd), s, x_T.shape, steps=N, x_T=x_T, dtype=np.float64,
                                    generator=Philox(5), return_trajectory_every=1)
    draws, sample, steps = Philox(5), torch.tensor(x_T), []
    for i, t in enumerate(sched.timesteps):
        sigma = float(sched.sigmas[sched.step_index or 0])
        eps = eps_given_xt(sample.double().numpy(), 1 / (1 + sigma ** 2), mu, sd)
        z = draws.normal(x_T.shape, np.float64) if i < N - 1 else np.zeros(x_T.shape)
        sample = sched.step(torch.tensor(eps), t, sample, variance_noise=torch.tensor(z)).prev_sample
        steps.append(sample.double().numpy())
    rel = [np.abs(a - b).max() / np.abs(b).max() for a, b in zip(ours[1:], steps)]
    print(f"dpm++2m-sde vs diffusers, relative difference per step: {' '.join('%.1e' % r for r in rel)}")
    assert len(rel) == N and max(rel) < 1e-5, rel


def test_continuous_time_matches_diffusers_sigma_to_t():
    """Our t(sigma) (log-SNR linear between timesteps) is diffusers' _sigma_to_t (log sigma linear) before it rounds."""
    torch, diffusers = _diffusers()
    T = 1000
    betas = np.linspace(1e-4, 0.02, T).astype(np.float32)
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=betas)
    ac = sched.alphas_cumprod.double().numpy()
    s = NoiseSchedule(betas=1 - ac / np.append(1.0, ac[:-1]))
    sigma = karras_sigmas(s, 13)[:-1]
    log_sigmas = np.log(np.sqrt((1 - ac) / ac))
    theirs = np.array([sched._sigma_to_t(np.array(x), log_sigmas) for x in sigma]).ravel()
    assert np.abs(sigma_to_t(s, sigma) - theirs).max() < 1e-6


# --- CPU against GPU -----------------------------------------------------------------------------

@pytest.mark.skipif(not backend.cuda_available(), reason="no CUDA GPU (CuPy) here")
@pytest.mark.parametrize("name", list(SOLVERS))
def test_ode_samplers_cpu_against_gpu(name):
    from tinydiff.context_unet import ContextUnet
    backend.manual_seed(0)
    model = ContextUnet(1, n_feat=8, n_cfeat=10, height=8)
    model.eval()
    s = NoiseSchedule("linear", timesteps=50)
    labels = np.array([2, 7, 9])
    x_T = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    cpu = run(name, model, s, x_T.shape, 5, context=model.context(labels), x_T=x_T, guidance_scale=2.0, seed=3)
    model.to("cuda")
    gpu = run(name, model, s, x_T.shape, 5, context=model.context(backend.to_device(labels, "cuda")),
              x_T=backend.to_device(x_T, "cuda"), guidance_scale=2.0, seed=3)     # Philox: the same z
    gpu = backend.to_device(gpu, "cpu")
    diff = np.abs(gpu - cpu).max()
    print(f"{name}: CPU vs GPU largest difference {diff:.2e}")
    assert diff <= 1e-4 + 1e-4 * np.abs(cpu).max()
