"""The Gaussian oracle: the exact noise predictor for data x0 ~ N(mu, sd^2 I), and the exact
output distribution of DDPM and DDIM when they sample with it. Shared by the sampler tests.

With x_t = sqrt(ab) x0 + sqrt(1 - ab) eps (DDPM eq. 4; ab = alpha_bar_t), x_t is Gaussian too:
    x_t ~ N(sqrt(ab) mu, v_t),   v_t = ab sd^2 + 1 - ab
and the minimum-MSE predictors are linear in x_t (the regression of a Gaussian on a Gaussian):
    E[eps | x_t] = sqrt(1 - ab) / v_t * (x_t - sqrt(ab) mu)
    E[x0  | x_t] = mu + sqrt(ab) sd^2 / v_t * (x_t - sqrt(ab) mu)
In the noise level sigma = sqrt((1 - ab) / ab) and x_hat = x_t / sqrt(ab) = x0 + sigma eps, the
probability-flow ODE dx_hat/dsigma = E[eps | x_t] = sigma (x_hat - mu) / (sd^2 + sigma^2) is solved
by x_hat - mu proportional to sqrt(sd^2 + sigma^2): `ode_solution` is that exact answer key.
A sampler that calls this model takes affine steps plus Gaussian noise, x' = A x + B + sigma z,
so its output is Gaussian with a mean and variance that `ddpm_moments` / `ddim_moments` follow
exactly, step by step (in float64). They differ from (mu, sd^2) by the sampler's own bias: the
prior x_T ~ N(0, 1) where q(x_T) is not quite that, DDPM's choice of sigma^2 (beta_tilde is exact
as sd -> 0, beta at sd = 1; DDPM Sec. 3.2), and DDIM's step size.

Usage
    model = GaussianOracle(schedule, mu=0.3, sd=0.5)           # model(x_t, t_index, context)
    x = ddpm_sample(model, schedule, (B, 1, H, W), seed=0)
    mean, var = ddpm_moments(schedule, 0.3, 0.5, "small")     # what x's entries are distributed as
    x_exact = ode_solution(x_T, sigma_T, sigma, 0.3, 0.5)    # the probability-flow ODE's x_t at sigma
    m, v, se_m, se_v = sample_moments(x)                      # with their standard errors
"""
import math

import numpy as np

from tinydiff.samplers import alpha_bar_at, ddim_sigma, ddim_timesteps
from tinydiff.tensor import Tensor


class GaussianOracle:
    """The exact model for data ~ N(mu, sd^2 I): returns E[eps | x_t] (or E[x0 | x_t], or v).
    Its time input is the timestep index (as the UNet's), an integer or, for the ODE solvers, a fraction
    (then alpha_bar is the samplers' alpha_bar_at); it records the timesteps it is called at."""

    @staticmethod
    def time_input(t, T):                    # the model owns its time convention (models' seam)
        return Tensor(t)

    def __init__(self, schedule, mu=0.0, sd=1.0, objective="eps"):
        self.schedule, self.mu, self.sd, self.objective = schedule, mu, sd, objective
        self.calls = []

    def __call__(self, x, t, context=None):
        self.calls.append(t.data.copy())
        ab = (self.schedule.f64["alpha_bar"][t.data] if t.data.dtype.kind in "iu"
              else alpha_bar_at(self.schedule, t.data)).reshape((-1,) + (1,) * (x.ndim - 1))   # (B, 1, 1, 1)
        eps, x0 = eps_given_xt(x.data, ab, self.mu, self.sd), x0_given_xt(x.data, ab, self.mu, self.sd)
        out = {"eps": eps, "x0": x0, "v": np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0}[self.objective]
        return Tensor(out.astype(x.dtype))


def eps_given_xt(xt, ab, mu, sd):
    """E[eps | x_t] for x0 ~ N(mu, sd^2)."""
    return np.sqrt(1 - ab) / (ab * sd ** 2 + 1 - ab) * (xt - np.sqrt(ab) * mu)


def x0_given_xt(xt, ab, mu, sd):
    """E[x0 | x_t] for x0 ~ N(mu, sd^2)."""
    return mu + np.sqrt(ab) * sd ** 2 / (ab * sd ** 2 + 1 - ab) * (xt - np.sqrt(ab) * mu)


def ode_solution(x_T, sigma_T, sigma, mu, sd):
    """The probability-flow ODE's exact x_t at noise level sigma from x_T at noise level sigma_T, for
    data N(mu, sd^2 I) (float64): x_hat = mu + (x_hat_T - mu) sqrt((sd^2 + sigma^2) / (sd^2 + sigma_T^2)),
    x_t = x_hat / sqrt(1 + sigma^2) (alpha_bar = 1 / (1 + sigma^2))."""
    x_hat_T = np.asarray(x_T, dtype=np.float64) * math.sqrt(1 + sigma_T ** 2)
    x_hat = mu + (x_hat_T - mu) * math.sqrt((sd ** 2 + sigma ** 2) / (sd ** 2 + sigma_T ** 2))
    return x_hat / math.sqrt(1 + sigma ** 2)


def _eps_affine(ab, mu, sd):
    """E[eps | x_t] = k x_t + c: (k, c)."""
    k = math.sqrt(1 - ab) / (ab * sd ** 2 + 1 - ab)
    return k, -k * math.sqrt(ab) * mu


def ddpm_moments(schedule, mu, sd, variance="small", mean_T=0.0, var_T=1.0):
    """Exact (mean, variance) of ddpm_sample's output with GaussianOracle(schedule, mu, sd), for
    x_T ~ N(mean_T, var_T) (var_T = 0: a given x_T, and the variance is the sampler's noise alone):
    x' = coef_x (x - coef_eps (k x + c)) + sigma z    (DDPM eq. 11 and Alg. 2, no noise at t = 0)."""
    f = schedule.f64
    var_t = f["posterior_variance"] if variance == "small" else f["beta"]
    mean, var = mean_T, var_T
    for t in reversed(range(schedule.T)):
        k, c = _eps_affine(f["alpha_bar"][t], mu, sd)
        coef_x, coef_eps = f["sqrt_recip_alpha"][t], f["eps_coef"][t]
        a, b = coef_x * (1 - coef_eps * k), -coef_x * coef_eps * c
        mean, var = a * mean + b, a * a * var + (var_t[t] if t > 0 else 0.0)
    return mean, var


def ddim_moments(schedule, mu, sd, steps, eta, spacing="trailing", mean_T=0.0, var_T=1.0):
    """Exact (mean, variance) of ddim_sample's output with GaussianOracle(schedule, mu, sd), for
    x_T ~ N(mean_T, var_T) (as ddpm_moments):
    x' = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps + sigma z   (DDIM eq. 12),
    x0_hat = (x - sqrt(1 - ab) eps) / sqrt(ab), sigma from DDIM eq. 16."""
    alpha_bar = schedule.f64["alpha_bar"]
    mean, var = mean_T, var_T
    for t, t_prev in zip(*ddim_timesteps(schedule.T, steps, spacing)):
        ab, ab_prev = alpha_bar[t], (alpha_bar[t_prev] if t_prev >= 0 else 1.0)
        sigma = ddim_sigma(ab, ab_prev, eta)
        k, c = _eps_affine(ab, mu, sd)
        x0_a, x0_b = (1 - math.sqrt(1 - ab) * k) / math.sqrt(ab), -math.sqrt(1 - ab) * c / math.sqrt(ab)
        dir_coef = math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0))
        a = math.sqrt(ab_prev) * x0_a + dir_coef * k
        b = math.sqrt(ab_prev) * x0_b + dir_coef * c
        mean, var = a * mean + b, a * a * var + sigma ** 2
    return mean, var


def sample_moments(x):
    """(mean, variance, standard error of the mean, standard error of the variance) of the entries
    of x, taken as independent draws of one Gaussian: se_mean = sqrt(var / n), se_var = var sqrt(2 / (n - 1))."""
    x = np.asarray(x, dtype=np.float64).ravel()
    n, mean, var = x.size, x.mean(), x.var(ddof=1)
    return mean, var, math.sqrt(var / n), var * math.sqrt(2 / (n - 1))


def ode_endpoint_error(sampler, schedule, steps, mu=0.3, sd=0.5, x_T=None):
    """max |x - exact| at the sampler's own last noise level before its final jump to sigma = 0 (or to
    DDIM's t = -1), with the exact denoiser, in float64: the global error of the ODE solver alone.
    sampler: "ddim" (eta 0, linspace spacing: it ends at t = 0 for every step count), "euler", "heun", "dpm++2m"
    (on Karras levels, which also end at sigma_min for every step count)."""
    from tinydiff.samplers import (ddim_sample, dpm_solver_sample, euler_sample, heun_sample, karras_sigmas,
                                   vp_sigmas)
    sigma = vp_sigmas(schedule)
    x_T = np.random.default_rng(0).standard_normal((4, 1, 2, 2)) if x_T is None else x_T
    model = GaussianOracle(schedule, mu, sd)
    kw = dict(x_T=x_T, dtype=np.float64, return_trajectory_every=1)
    if sampler == "ddim":
        _, trajectory = ddim_sample(model, schedule, x_T.shape, steps=steps, spacing="linspace", **kw)
        last = sigma[ddim_timesteps(schedule.T, steps, "linspace")[0][-1]]
    else:
        run = {"euler": euler_sample, "heun": heun_sample, "dpm++2m": dpm_solver_sample}[sampler]
        _, trajectory = run(model, schedule, x_T.shape, sigmas=karras_sigmas(schedule, steps), **kw)
        last = karras_sigmas(schedule, steps)[-2]
    return float(np.abs(trajectory[-2] - ode_solution(x_T, sigma[-1], last, mu, sd)).max())


def convergence_order(errors, steps):
    """The slope p of log error = -p log steps + c, least squares."""
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])
