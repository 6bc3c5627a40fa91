"""Sampling: turn noise into images with a trained noise predictor, by DDPM, DDIM or an ODE solver
(Euler, Heun, DPM-Solver++ 2M), with guidance. Each sampler is its update rule inside sample_loop.

References
    DDPM       Ho, Jain, Abbeel 2020, arXiv:2006.11239 (Alg. 2, eqs. 7 and 11)
    DDIM       Song, Meng, Ermon 2020, arXiv:2010.02502 (eqs. 12 and 16)
    improved   Nichol, Dhariwal 2021, arXiv:2102.09672
    classifier Dhariwal, Nichol 2021, arXiv:2105.05233 (Alg. 1, eq. 14 / Alg. 2)
    CFG        Ho, Salimans 2022, arXiv:2207.12598 (eq. 6)
    spacing    Lin et al. 2023, arXiv:2305.08891 (Table 2: leading, linspace, trailing)
    PF-ODE     Song et al. 2021, arXiv:2011.13456 (eq. 13, the probability-flow ODE)
    EDM        Karras, Aittala, Aila, Laine 2022, arXiv:2206.00364 (eqs. 4-5, Alg. 1: Euler, Heun)
    DPM++      Lu, Zhou, Bao, Chen, Li, Zhu 2022, arXiv:2211.01095 (Alg. 2: DPM-Solver++(2M))

Notation: as in diffusion.py; t is a timestep index 0..T-1 (the paper's t + 1), and "t = -1"
means the clean image, alpha_bar = 1. DDIM's alpha_t is DDPM's alpha_bar_t: we write alpha_bar.
    sigma        the standard deviation of the noise added in one step (sigma_t in DDIM eq. 12)
    s            the guidance scale (classifier-free: guidance_scale; classifier: classifier_scale)
    noise level  sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (Karras' sigma; vp_sigmas), in the
                 ODE solvers' code named sigma too: there it is the noise level, not a step's noise
    NFE          network evaluations per sample, the cost of a sampler (nfe)

API
    context = model.context(labels)                        # the model's own conditioning (models.py)
    x = ddpm_sample(model, schedule, (B, C, H, W), context, seed=0)
    x = ddim_sample(model, schedule, (B, C, H, W), context, steps=50, eta=0.0, spacing="trailing")
    x = dpm_solver_sample(model, schedule, (B, C, H, W), context, steps=10)   # or heun_sample, euler_sample
    x, trajectory = ddim_sample(..., return_trajectory_every=5)   # list of x_t arrays, x_T first
All return arrays (NumPy or CuPy, like the model's parameters) in the data's range, [-1, 1].

The ODE view. With x_hat = x_t / sqrt(alpha_bar) = x0 + sigma eps, sampling is solving the
probability-flow ODE dx_hat/dsigma = eps from sigma_max down to 0. DDIM with eta = 0 is Euler's
method on it (ddim_sample shows the algebra); euler_sample and heun_sample (Karras Alg. 1) step
through Karras noise levels (rho = 7, karras_sigmas) between the schedule's own sigma_min = sigma_0
and sigma_max = sigma_{T-1}, and dpm_solver_sample (Lu et al. Alg. 2) through the noise levels of
DDIM's trained timesteps (timestep_sigmas). Any of them takes sigmas=. Cost: nfe(sampler, steps).

Continuous time. Karras noise levels (Euler's and Heun's) fall between the trained timesteps. The model is then called at a fractional timestep t, through its own seam
model.time_input(t, T) (the ContextUnet's (t + 1) / T and the UNet's sinusoidal embedding take
floats), and the schedule is interpolated linearly in log-SNR between the trained timesteps
(alpha_bar_at, sigma_to_t; exact at the integers). DDPM and DDIM call integer timesteps only.

Classifier-free guidance (guidance_scale = s):  eps = eps_uncond + s (eps_cond - eps_uncond).
s = 1 is the conditional model alone (no guidance; nothing extra is computed), s = 0 the
unconditional one, s > 1 pushes further toward the context. Ho & Salimans write
(1 + w) eps_cond - w eps_uncond: that is s = 1 + w. One network call per step evaluates a doubled
batch, [context; model.null_context(B)], and the combination is fused into the DDPM and DDIM update
kernels (the ODE solvers combine it first, kernels.guided_eps_ref).

Classifier guidance (classifier_scale = s): the gradient g = grad_{x_t} log p(y | x_t) of a
noise-aware classifier, computed by tinydiff's autograd, shifts DDPM's mean by s Sigma g
(Dhariwal & Nichol Alg. 1) and DDIM's and the ODE solvers' eps by -sqrt(1 - alpha_bar) s g (their
eq. 14, Alg. 2). The class y
of each sample is given as classifier_labels (B,); it is never guessed from the context.

The model is called as it is: put it in eval() mode first (the ContextUnet has BatchNorm).
All model calls run under no_grad(); only the classifier's gradient builds a graph, so do not
call a sampler inside no_grad() when you use a classifier. x_T and the noise z come from a
tinydiff.philox.Philox (seed=s: Philox(s); generator=: yours; neither: the default one, seeded
by manual_seed), which draws the same numbers on the CPU and the GPU, and z is handed to the
kernel, so the NumPy, C++ and CUDA kernels can be compared on the same draws.
"""
import math

import numpy as np

from tinydiff import backend, kernels, philox
from tinydiff import functional as F
from tinydiff.arrays import as_array
from tinydiff.diffusion import OBJECTIVES, call_model, model_eps, model_time, null_context
from tinydiff.kernels import guided_eps_ref
from tinydiff.tensor import Tensor, is_grad_enabled, no_grad

SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("small", "large")


# ---------------------------------------------------------------------------------------------
# The VP schedule as noise levels, and continuous time between the trained timesteps


def vp_sigmas(schedule):
    """The noise level of each trained timestep, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
    (Karras Table 1, VP: x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps), increasing with t, float64 (T,)."""
    alpha_bar = schedule.f64["alpha_bar"]
    return np.sqrt((1 - alpha_bar) / alpha_bar)


def _log_snr(schedule):
    """lambda_t = log(alpha_bar_t / (1 - alpha_bar_t)) = -2 log sigma_t, decreasing, float64 (T,)."""
    alpha_bar = schedule.f64["alpha_bar"]
    return np.log(alpha_bar / (1 - alpha_bar))


def alpha_bar_at(schedule, t):
    """alpha_bar at fractional timesteps t in [0, T-1] (a NumPy or CuPy float array): the log-SNR
    interpolated linearly between the trained timesteps (the same as log sigma linearly, diffusers'
    _sigma_to_t), alpha_bar = sigmoid(lambda). Equal to the table at the integers (to rounding)."""
    xp = backend.get_array_module(t)
    lam = xp.interp(t, xp.arange(schedule.T, dtype=np.float64), xp.asarray(_log_snr(schedule)))
    return 1 / (1 + xp.exp(-lam))


def sigma_to_t(schedule, sigma):
    """The fractional timestep whose noise level is sigma (NumPy, float64): alpha_bar_at's inverse."""
    lam = -2 * np.log(np.asarray(sigma, dtype=np.float64))
    return np.interp(lam, _log_snr(schedule)[::-1], np.arange(schedule.T, dtype=np.float64)[::-1])


def _time(model, schedule, t, like):
    """A model's time input at timesteps t (B,): integers through diffusion.model_time (checked),
    fractions (continuous time) through the same seam, model.time_input(t, T)."""
    if t.dtype.kind in "iu":
        return model_time(model, schedule, t, like)
    if t.shape != (like.shape[0],) or float(t.min()) < 0 or float(t.max()) > schedule.T - 1:
        raise ValueError(f"fractional timesteps must be (B,) values in [0, {schedule.T - 1}], got shape {t.shape}")
    return model.time_input(t, schedule.T)


def _call(model, schedule, x, t, context):
    """One network evaluation on arrays at timesteps t (integers: diffusion.call_model)."""
    if t.dtype.kind in "iu":
        return call_model(model, schedule, x, t, context)
    c = None if context is None else Tensor(as_array(context, backend.device_of(x)))
    return model(Tensor(x), _time(model, schedule, t, x), c).data


def _to_eps(output, schedule, x, t, objective):
    """The eps a model's output implies (integers: diffusion.model_eps), at fractional t with alpha_bar_at."""
    if t.dtype.kind in "iu" or objective == "eps":
        return model_eps(output, schedule, x, t, objective)
    ab = alpha_bar_at(schedule, t).reshape((-1,) + (1,) * (x.ndim - 1))         # (B, 1, ..., 1), float64
    xp = backend.get_array_module(x)
    a, s = xp.sqrt(ab).astype(x.dtype), xp.sqrt(1 - ab).astype(x.dtype)      # sqrt(alpha_bar), sqrt(1 - alpha_bar)
    if objective == "x0":
        return (x - a * output) / s                  # DDPM eq. 4 solved for eps
    return s * x + a * output                        # Salimans & Ho, App. D (objective "v")


# ---------------------------------------------------------------------------------------------
# Shared pieces: random numbers, one step's eps with guidance, the classifier's gradient


def _setup(model, shape, context, generator, seed, device, x_T, dtype):
    """The generator, the device's array module and the starting noise x_T."""
    if generator is not None and seed is not None:
        raise ValueError("give a generator or a seed, not both")
    if device is None:
        params = model.parameters() if hasattr(model, "parameters") else []
        device = x_T.device if isinstance(x_T, Tensor) else (
            backend.device_of(x_T) if x_T is not None else params[0].device if params else "cpu")
    rng = philox.Philox(seed) if seed is not None else philox.check_generator(generator)   # the same noise on CPU and GPU
    if x_T is None:
        xp = np if device == "cpu" else backend.cupy_module()
        x = rng.normal(tuple(shape), dtype, xp)                      # x_T ~ N(0, I), DDPM Alg. 2, line 1
    else:
        x = as_array(x_T, device, copy=True)         # copied anyway: the loop must not change the caller's
        x = backend.get_array_module(x).array(x, dtype=dtype, order="C", copy=True)
        if x.shape != tuple(shape):
            raise ValueError(f"x_T has shape {x.shape}, expected {tuple(shape)}")
    if context is not None and len(context) != shape[0]:
        raise ValueError(f"context holds {len(context)} entries for a batch of {shape[0]}")
    return rng, backend.get_array_module(x), x


def _eps(model, schedule, x, t, context, guidance_scale, objective):
    """(eps_cond, eps_uncond): eps_uncond is None without classifier-free guidance (s = 1)."""
    if guidance_scale == 1.0 or context is None:
        return _to_eps(_call(model, schedule, x, t, context), schedule, x, t, objective), None
    xp, b = backend.get_array_module(x), x.shape[0]
    c = as_array(context, backend.device_of(x))
    c2 = xp.concatenate([c, null_context(model, b, x).astype(c.dtype, copy=False)])   # (2B, ...)
    x2, t2 = xp.concatenate([x, x]), xp.concatenate([t, t])                          # one call, 2B
    out = _call(model, schedule, x2, t2, c2)
    return (_to_eps(out[:b], schedule, x, t, objective),                             # conditional
            _to_eps(out[b:], schedule, x, t, objective))                             # unconditional


def _contiguous(eps, eps_uncond):
    """The compiled kernels take C-contiguous arrays only (a model may return a view)."""
    xp = backend.get_array_module(eps)
    return xp.ascontiguousarray(eps), None if eps_uncond is None else xp.ascontiguousarray(eps_uncond)


def classifier_grad(classifier, schedule, x, t, labels):
    """g = grad_{x_t} log p_phi(y | x_t, t), by tinydiff's autograd. Returns an array like x."""
    if not is_grad_enabled():
        raise RuntimeError("classifier guidance needs gradients: do not call the sampler inside no_grad()")
    params = classifier.parameters() if hasattr(classifier, "parameters") else []
    flags = [p.requires_grad for p in params]
    for p in params:                # only x_t's gradient is wanted: skip the weights' (and keep them clean)
        p.requires_grad = False
    try:
        xt = Tensor(x, requires_grad=True)
        logits = classifier(xt, _time(classifier, schedule, t, x))             # (B, classes)
        log_p = F.log_softmax(logits, dim=1)[xt.xp.arange(x.shape[0]), labels]  # (B,) log p(y | x_t)
        log_p.sum().backward()      # samples are independent: the sum's gradient is each one's own
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad = flag
    return xt.grad


def _labels(classifier_labels, like):
    """The class y (B,) of each sample, for classifier guidance: given by the caller, never read off
    the model's context (only the model knows what its context means)."""
    if classifier_labels is None:
        raise ValueError("classifier guidance needs classifier_labels: the class y of each sample, (B,) integers")
    y = as_array(classifier_labels, backend.device_of(like))
    if y.dtype.kind not in "iu" or y.shape != (like.shape[0],):
        raise ValueError(f"classifier labels must be (B,) integers, got shape {y.shape}, dtype {y.dtype}")
    return y.astype(np.int64)


def _check(schedule, objective, shape):
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if len(shape) < 2:
        raise ValueError(f"shape must be (B, C, ...), got {shape}")


def _per_sample(value, b, like):
    """A Python float as the (B,) coefficient array that the kernels take, in like's dtype."""
    return backend.get_array_module(like).full((b,), value, dtype=like.dtype)


def _record(trajectory, every, i, x):
    if trajectory is not None and (i + 1) % every == 0:
        trajectory.append(x)


def _check_steps(T, steps):
    if not (isinstance(steps, (int, np.integer)) and 1 <= steps <= T):
        raise ValueError(f"steps must be an integer in [1, {T}] (the schedule has {T} timesteps), got {steps!r}")


# ---------------------------------------------------------------------------------------------
# The loop every sampler shares: a sampler is only its update rule


def sample_loop(model, schedule, shape, context, update, steps, *, generator=None, seed=None, device=None,
                dtype=np.float32, x_T=None, objective="eps", guidance_scale=1.0, classifier=None,
                classifier_scale=0.0, classifier_labels=None, return_trajectory_every=None):
    """From x = x_T, x = update(i, x, denoise, noise) for i = 0 .. steps-1; returns x (and the trajectory).

    denoise(x, t, classifier_coef) -> (eps, eps_uncond)   one network evaluation at time t (an int:
        a trained timestep; a float: continuous time, see alpha_bar_at), on the doubled batch
        [context; null context] with classifier-free guidance (eps_uncond is None without it), and
        classifier guidance applied to both as eps -= classifier_coef * s * g (the rule says how g enters)
    noise() -> z ~ N(0, I), shaped like x, drawn from the sampler's generator
    The arguments after `steps` are those of every sampler (see ddpm_sample).
    """
    _check(schedule, objective, shape)
    rng, xp, x = _setup(model, shape, context, generator, seed, device, x_T, dtype)
    b, z_shape, z_dtype = x.shape[0], x.shape, x.dtype
    y = _labels(classifier_labels, x) if classifier is not None else None

    def denoise(x, t, classifier_coef):
        integer = isinstance(t, (int, np.integer))
        tt = xp.full((b,), t, dtype=np.int64 if integer else np.float64)
        with no_grad(), backend.one_blas_thread(backend.device_of(x)):
            eps, eps_uncond = _eps(model, schedule, x, tt, context, guidance_scale, objective)
        if classifier is not None and classifier_scale:
            g = classifier_grad(classifier, schedule, x, tt, y)
            shift = (classifier_scale * classifier_coef * g).astype(x.dtype)
            eps = eps - shift                # the same shift on eps_uncond passes through the guidance
            eps_uncond = None if eps_uncond is None else eps_uncond - shift    # combination unchanged
        return _contiguous(eps, eps_uncond)

    def noise():
        return rng.normal(z_shape, z_dtype, xp)

    trajectory = [x] if return_trajectory_every else None
    for i in range(steps):
        x = update(i, x, denoise, noise)
        _record(trajectory, return_trajectory_every or 1, i, x)
    if trajectory is not None:
        if trajectory[-1] is not x:
            trajectory.append(x)
        return x, trajectory
    return x


# ---------------------------------------------------------------------------------------------
# DDPM: ancestral sampling, one step per timestep


def ddpm_sample(model, schedule, shape, context=None, *, variance="small", noise_free=False, guidance_scale=1.0,
                **loop_args):
    """DDPM Alg. 2: for t = T..1, x_{t-1} = mu_theta(x_t, t) + sigma_t z, with no noise at t = 1.

    model       model(x_t, model.time_input(t, T), context) -> eps (or x0 or v, see objective)
    context     (B, ...) what model.context(labels) returns (the model's own conditioning), or None
    variance    "small": sigma^2 = beta_tilde (DDPM eq. 7), "large": sigma^2 = beta (DDPM Sec. 3.2
                found both to work; the course's denoise_add_noise uses "large", b_t.sqrt() * z)
    noise_free  the course's ablation: add no noise at any step (samples collapse to blurry means)
    guidance_scale  classifier-free guidance s (1: none; the module docstring)
    loop_args   every sampler's (sample_loop): generator=None (a tinydiff.philox.Philox), seed=None, device=None,
                dtype=np.float32, x_T=None (the starting noise; default drawn from the generator),
                objective="eps", classifier=None, classifier_scale=0.0, classifier_labels=None,
                return_trajectory_every=None
    The update is DDPM eq. 11: mu = 1/sqrt(alpha) (x_t - beta / sqrt(1 - alpha_bar) eps).
    Returns x_0 (B, ...), or (x_0, trajectory) with return_trajectory_every=k. NFE: T.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    f64 = schedule.f64
    var = f64["posterior_variance"] if variance == "small" else f64["beta"]

    def update(i, x, denoise, noise):
        t, b = schedule.T - 1 - i, x.shape[0]                          # DDPM Alg. 2, line 2: t = T..1
        coef_x, coef_eps = f64["sqrt_recip_alpha"][t], f64["eps_coef"][t]
        # classifier guidance: mean + s Sigma g (D&N Alg. 1, line 4) as a change of eps: since
        # mu = coef_x (x - coef_eps eps), eps -= s Sigma g / (coef_x coef_eps)
        eps, eps_uncond = denoise(x, t, var[t] / (coef_x * coef_eps))
        last = t == 0
        z = backend.get_array_module(x).zeros_like(x) if last or noise_free else noise()   # Alg. 2, line 3
        sigma = 0.0 if last or noise_free else math.sqrt(var[t])
        return kernels.ddpm_step(x, eps, z, _per_sample(coef_x, b, x), _per_sample(coef_eps, b, x),
                                 _per_sample(sigma, b, x), eps_uncond, guidance_scale)   # DDPM Alg. 2, line 4

    return sample_loop(model, schedule, shape, context, update, schedule.T, guidance_scale=guidance_scale,
                       **loop_args)


# ---------------------------------------------------------------------------------------------
# DDIM: a subsequence of the timesteps, deterministic when eta = 0


def ddim_timesteps(T, steps, spacing="trailing"):
    """The DDIM subsequence, largest first, and each step's previous timestep (-1 after the last).

    leading   t = (steps-1) r, ..., r, 0 with r = T // steps  (DDIM's and Stable Diffusion's
              default; it never starts at T-1, so the first x_t is noisier than its t assumes)
    trailing  t = round(T - k T / steps) - 1 for k = 0..steps-1: T-1 first  (Lin et al. Table 2;
              the course's DDIM uses this: range(T, 0, -step) in its 1-indexed timesteps)
    linspace  t = round of steps evenly spaced values from T-1 down to 0 (both ends included)
    t_prev is the NEXT entry of the same list, never t - T // steps: that shortcut, common in
    peers, is wrong for trailing and linspace whenever steps does not divide T.
    Returns (t, t_prev), two int64 arrays of length steps.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    _check_steps(T, steps)
    k = np.arange(steps)
    if spacing == "leading":
        t = (steps - 1 - k) * (T // steps)
    elif spacing == "trailing":
        t = np.round(T - k * T / steps) - 1
    else:
        t = np.round(np.linspace(T - 1, 0, steps))
    t = t.astype(np.int64)
    assert np.all(np.diff(t) < 0) and t[-1] >= 0 and t[0] <= T - 1, f"internal: bad timesteps {t}"
    return t, np.append(t[1:], -1)


def ddim_sigma(alpha_bar, alpha_bar_prev, eta):
    """sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) sqrt(1 - alpha_bar / alpha_bar_prev)
    # DDIM eq. 16. eta = 0: deterministic DDIM; eta = 1 over all T steps: DDPM's sqrt(beta_tilde)."""
    return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * math.sqrt(1 - alpha_bar / alpha_bar_prev)


def ddim_sample(model, schedule, shape, context=None, *, steps=50, eta=0.0, spacing="trailing",
                clip_x0=False, guidance_scale=1.0, **loop_args):
    """DDIM eq. 12 over a subsequence of `steps` timesteps (see ddim_timesteps for `spacing`):

        x0_hat = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)              "predicted x0"
        x_prev = sqrt(alpha_bar_prev) x0_hat
               + sqrt(1 - alpha_bar_prev - sigma^2) eps                          "direction to x_t"
               + sigma z                                                         "random noise"

    eta scales sigma (DDIM eq. 16): 0 is deterministic given x_T, 1 with steps = T is DDPM.
    With eta = 0 this is Euler's method on the probability-flow ODE in the noise level
    s_t = sqrt((1 - alpha_bar) / alpha_bar) (DDIM eq. 14; Karras et al. 2022, Sec. 3): divide
    eq. 12 by sqrt(alpha_bar_prev), write x_hat = x / sqrt(alpha_bar) (= x0 + s eps), and it reads
        x_hat_prev = x0_hat + s_prev eps = x_hat + (s_prev - s_t) eps,   eps = dx_hat/ds   (euler_step)
    (tests/test_ode_samplers.py checks ddim_sample against euler_sample on DDIM's own noise levels).
    clip_x0 clips x0_hat to [-1, 1] before it is used (off by default, as in the course).
    The last step goes to alpha_bar_prev = 1 ("t = -1"), so it returns x0_hat itself.
    Other arguments as ddpm_sample. Returns x_0, or (x_0, trajectory) with return_trajectory_every. NFE: steps.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    timesteps, prev_timesteps = ddim_timesteps(schedule.T, steps, spacing)
    alpha_bar = schedule.f64["alpha_bar"]

    def update(i, x, denoise, noise):
        t, t_prev, b = timesteps[i], prev_timesteps[i], x.shape[0]
        # 1. alpha_bar at t and at the previous timestep ("t = -1": the clean image, alpha_bar = 1)
        ab, ab_prev = alpha_bar[t], (alpha_bar[t_prev] if t_prev >= 0 else 1.0)
        # 2. sigma (DDIM eq. 16) and the coefficient of the "direction pointing to x_t" (eq. 12)
        sigma = ddim_sigma(ab, ab_prev, eta)
        dir_coef = math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0))
        # 3. eps, with classifier guidance as eps - sqrt(1 - alpha_bar) s g   (D&N eq. 14, Alg. 2)
        eps, eps_uncond = denoise(x, t, math.sqrt(1 - ab))
        # 4. the update, DDIM eq. 12 (with guidance fused): predicted x0, direction, noise
        z = noise() if sigma > 0 else backend.get_array_module(x).zeros_like(x)
        x, _ = kernels.ddim_step(x, eps, z, _per_sample(math.sqrt(ab), b, x),
                                 _per_sample(math.sqrt(1 - ab), b, x), _per_sample(math.sqrt(ab_prev), b, x),
                                 _per_sample(dir_coef, b, x), _per_sample(sigma, b, x), clip_x0,
                                 eps_uncond, guidance_scale)
        return x

    return sample_loop(model, schedule, shape, context, update, steps, guidance_scale=guidance_scale, **loop_args)


# ---------------------------------------------------------------------------------------------
# The ODE view: three solvers of the probability-flow ODE in the noise level sigma
#
# Karras et al. 2022 (arXiv:2206.00364, Sec. 2 and Table 1) write x_t = sqrt(alpha_bar) x_hat with
# x_hat = x0 + sigma eps, sigma the noise level (vp_sigmas). The probability-flow ODE (Song et al.
# 2021, arXiv:2011.13456, eq. 13) in x_hat and sigma (Karras eq. 4 with sigma(t) = t, s(t) = 1) is
#     dx_hat / dsigma = (x_hat - D(x_hat; sigma)) / sigma = eps(x_t, t(sigma)),     D = x0_hat,
# the network's eps at the (fractional) timestep of that noise level. Each solver steps x_hat along
# it; the loop's x stays x_t = x_hat / sqrt(1 + sigma^2), the model's input and every trajectory's.


def karras_sigmas(schedule, steps, rho=7.0):
    """The noise levels of Karras eq. 5, largest first, then 0 (N = steps, float64 (N + 1,)):
        sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  sigma_N = 0,
    between the schedule's own sigma_max = sigma_{T-1} and sigma_min = sigma_0 (N = 1: sigma_max alone)."""
    _check_steps(schedule.T, steps)
    sigma = vp_sigmas(schedule)
    lo, hi = sigma[0] ** (1 / rho), sigma[-1] ** (1 / rho)
    return np.append((hi + np.linspace(0, 1, steps) * (lo - hi)) ** rho, 0.0)


def timestep_sigmas(schedule, steps):
    """The noise levels of the trained timesteps DDIM steps through (ddim_timesteps, "trailing"),
    largest first, then 0 (float64 (steps + 1,)): no time between the trained timesteps."""
    t, _ = ddim_timesteps(schedule.T, steps, "trailing")
    return np.append(vp_sigmas(schedule)[t], 0.0)


def _check_sigmas(schedule, sigmas, steps, levels=karras_sigmas):
    """The noise levels a solver steps through, as Python floats: its own (`levels`), or the caller's, checked."""
    if sigmas is None:
        return [float(v) for v in levels(schedule, 20 if steps is None else steps)]
    sigmas = np.asarray(sigmas, dtype=np.float64)
    sigma = vp_sigmas(schedule)
    if (sigmas.ndim != 1 or len(sigmas) < 2 or sigmas[-1] != 0 or np.any(np.diff(sigmas) >= 0)
            or sigmas[-2] < sigma[0] * (1 - 1e-9) or sigmas[0] > sigma[-1] * (1 + 1e-9)):
        raise ValueError(f"sigmas must decrease from at most sigma_max = {sigma[-1]:.6g} to at least "
                         f"sigma_min = {sigma[0]:.6g}, then end with 0; got {sigmas}")
    if steps is not None and steps != len(sigmas) - 1:
        raise ValueError(f"steps = {steps} but {len(sigmas)} sigmas make {len(sigmas) - 1} steps (give one of them)")
    return [float(v) for v in sigmas]          # Python floats: they keep the data's dtype (NumPy 2, NEP 50)


def _ode_eps(denoise, schedule, x, sigma, guidance_scale):
    """dx_hat/dsigma = eps at noise level sigma: one network evaluation at t(sigma), classifier-free
    guidance combined (CFG eq. 6), classifier guidance as eps - sqrt(1 - alpha_bar) s g (D&N eq. 14)."""
    t = float(sigma_to_t(schedule, sigma))
    eps, eps_uncond = denoise(x, t, sigma / math.sqrt(1 + sigma ** 2))   # sqrt(1 - alpha_bar) at sigma
    return guided_eps_ref(eps, eps_uncond, guidance_scale)


def euler_step(x, eps, sigma, sigma_next):
    """x_t at sigma_next after one Euler step of dx_hat/dsigma = eps (Karras Alg. 1, line 5), from x_t at sigma:
    x_hat = x sqrt(1 + sigma^2) (= x / sqrt(alpha_bar)); x_hat_next = x_hat + (sigma_next - sigma) eps."""
    return (x * math.sqrt(1 + sigma ** 2) + (sigma_next - sigma) * eps) / math.sqrt(1 + sigma_next ** 2)


def euler_sample(model, schedule, shape, context=None, *, steps=None, sigmas=None, guidance_scale=1.0,
                 **loop_args):
    """Euler's method on the probability-flow ODE, over Karras sigmas (rho = 7; karras_sigmas):
        x_hat_{i+1} = x_hat_i + (sigma_{i+1} - sigma_i) eps(x_i, t(sigma_i))      (Karras Alg. 1, line 5)
    The last step, to sigma = 0, returns x0_hat. steps: the number of steps (default 20); or give
    sigmas (largest first, ending with 0) to step through your own. Other arguments as ddpm_sample.
    DDIM with eta = 0 is this method on DDIM's own sigmas (see ddim_sample). NFE: steps."""
    sigmas = _check_sigmas(schedule, sigmas, steps)

    def update(i, x, denoise, noise):
        eps = _ode_eps(denoise, schedule, x, sigmas[i], guidance_scale)
        return euler_step(x, eps, sigmas[i], sigmas[i + 1])

    return sample_loop(model, schedule, shape, context, update, len(sigmas) - 1, guidance_scale=guidance_scale,
                       **loop_args)


def heun_sample(model, schedule, shape, context=None, *, steps=None, sigmas=None, guidance_scale=1.0,
                **loop_args):
    """Heun's second-order method on the probability-flow ODE, over Karras sigmas (Karras Alg. 1,
    deterministic, sigma(t) = t, s(t) = 1):
        d      = eps(x_i, t(sigma_i))                                     (line 4)
        x_next = x_hat_i + (sigma_{i+1} - sigma_i) d                      (line 5, Euler)
        if sigma_{i+1} != 0:                                              (line 6)
            d'     = eps(x_next, t(sigma_{i+1}))                          (line 7)
            x_next = x_hat_i + (sigma_{i+1} - sigma_i) (d + d') / 2       (line 8, the trapezoid)
    The last step (to sigma = 0) is Euler's. Arguments as euler_sample. NFE: 2 steps - 1."""
    sigmas = _check_sigmas(schedule, sigmas, steps)

    def update(i, x, denoise, noise):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = _ode_eps(denoise, schedule, x, sigma, guidance_scale)
        x_next = euler_step(x, d, sigma, sigma_next)
        if sigma_next == 0:
            return x_next
        d_next = _ode_eps(denoise, schedule, x_next, sigma_next, guidance_scale)
        return euler_step(x, (d + d_next) / 2, sigma, sigma_next)

    return sample_loop(model, schedule, shape, context, update, len(sigmas) - 1, guidance_scale=guidance_scale,
                       **loop_args)


def dpm_solver_sample(model, schedule, shape, context=None, *, steps=None, sigmas=None, guidance_scale=1.0,
                      sde=False, **loop_args):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2): multistep, second order, data
    prediction, over the trained timesteps that DDIM takes (timestep_sigmas; pass
    sigmas=karras_sigmas(schedule, steps) for Karras levels). In the paper's VP symbols (not our
    noise level sigma)
        alpha_t = sqrt(alpha_bar) = 1 / sqrt(1 + sigma^2),  sigma_t = sqrt(1 - alpha_bar) = sigma alpha_t,
        lambda_t = log(alpha_t / sigma_t) = -log sigma,     h_i = lambda_{t_i} - lambda_{t_{i-1}},
    and x0_i = x0_theta(x_{t_i}, t_i) (DDPM eq. 15 from the model's eps):
        first step:  x_{t_1} = (sigma_{t_1} / sigma_{t_0}) x_{t_0} - alpha_{t_1} (e^{-h_1} - 1) x0_0
        then:        r_i = h_{i-1} / h_i,  D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2}
                     x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
    The last step, to sigma = 0 (lambda = inf, e^{-h} = 0), is first order: it returns x0 itself
    (as diffusers' lower_order_final with final_sigmas_type="zero"). The first-order step is DDIM
    (eta = 0) between the two noise levels. Arguments as euler_sample. NFE: steps.
    Why DDIM's timesteps: on the quick start's model at 10 NFE (1000 samples, three sampling seeds,
    docs/quality.md) they drew as DDIM-50 (eta 0) does, 96.0% and the same Frechet ratio seed for
    seed, while Karras levels (rho 7), which crowd the last steps below sigma 0.1, drew 95.1% and
    landed 0.02-0.08 farther from the real digits.
    sde=True: DPM-Solver++(2M) SDE (dpm_solver_sde_sample)."""
    sigmas = _check_sigmas(schedule, sigmas, steps, levels=timestep_sigmas)
    previous = []                                        # (x0_{i-1}, h_{i-1}) of the step before

    def update(i, x, denoise, noise):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eps = _ode_eps(denoise, schedule, x, sigma, guidance_scale)
        alpha_t, sigma_t = 1 / math.sqrt(1 + sigma ** 2), sigma / math.sqrt(1 + sigma ** 2)
        x0 = (x - sigma_t * eps) / alpha_t                                   # DDPM eq. 15
        if sigma_next == 0:                                                  # first order, to x0
            return x0
        alpha_next, sigma_t_next = 1 / math.sqrt(1 + sigma_next ** 2), sigma_next / math.sqrt(1 + sigma_next ** 2)
        h = math.log(sigma / sigma_next)                                     # lambda_next - lambda
        if previous:                                                         # Alg. 2: second order
            x0_prev, h_prev = previous.pop()
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        else:                                                                # Alg. 2: the first step
            D = x0
        previous.append((x0, h))
        if not sde:
            return (sigma_t_next / sigma_t) * x - alpha_next * math.expm1(-h) * D
        # the SDE solver (Lu et al. 2022, SDE-DPM-Solver++(2M)): x decays by e^{-h} more, D enters with
        # 1 - e^{-2h}, and fresh noise makes up the variance taken out
        return ((sigma_t_next / sigma_t) * math.exp(-h) * x - alpha_next * math.expm1(-2 * h) * D
                + sigma_t_next * math.sqrt(-math.expm1(-2 * h)) * noise())

    return sample_loop(model, schedule, shape, context, update, len(sigmas) - 1, guidance_scale=guidance_scale,
                       **loop_args)


def dpm_solver_sde_sample(model, schedule, shape, context=None, **kwargs):
    """DPM-Solver++(2M) SDE: the same multistep data-prediction solver for the reverse diffusion SDE
    instead of the ODE (Lu et al. 2022, arXiv:2211.01095, Appendix; diffusers' "sde-dpmsolver++",
    order 2, midpoint). In the symbols of dpm_solver_sample, each step but the last is
        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) e^{-h_i} x_{t_{i-1}} + alpha_{t_i} (1 - e^{-2 h_i}) D_i
                  + sigma_{t_i} sqrt(1 - e^{-2 h_i}) z,      z ~ N(0, I),
    the ODE step with the noise of the h_i just travelled partly taken out and drawn again, as DDPM's
    posterior step does (its first-order form is DDIM with eta = 1). Like stochastic DDIM it corrects
    the network's errors as it goes, and in few steps: on the quick start's models (docs/quality.md)
    8 steps drew the right digit 98.3% of the time at 1.12-1.23x the floor in the mean, where the
    ODE solver drew 96%. The last step returns x0, as the ODE solver's does. Arguments as dpm_solver_sample
    (steps, sigmas, guidance_scale, and the loop's; the generator draws z). NFE: steps."""
    return dpm_solver_sample(model, schedule, shape, context, sde=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# Cost: network evaluations


SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++2m-sde", "heun", "euler")


def nfe(sampler, steps, guidance=False):
    """Network evaluations per sample: ddpm takes all T (steps = T), ddim, euler, dpm++2m and
    dpm++2m-sde one a step, heun two a step but one on its last (Euler) step; classifier-free guidance doubles every
    count (the conditional and the unconditional halves of the doubled batch)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return (2 * steps - 1 if sampler == "heun" else steps) * (2 if guidance else 1)


# ---------------------------------------------------------------------------------------------
# By name, and the default: what `tinydiff sample` and the quick start draw with

# DPM-Solver++(2M) SDE with 20 steps, 20 network evaluations: the cheapest sampler whose one printed
# score met the quick start's target (at least 97%, at most 1.3x the floor) reliably on the quick
# start's models of three runs (docs/quality.md). 8 steps meets it in the mean on two of them but sat
# at 1.29x on the third, where one printed score missed (1.34x); 20 steps lands at 0.97-1.11x, as
# close as DDIM-50 with eta 0.7 (1.03-1.14x) for 2.5x fewer evaluations. The ODE solvers drew about
# 96% right digits at any step count.
DEFAULT_SAMPLING = dict(sampler="dpm++2m-sde", steps=20)
# What --sampler ddim takes without --steps, --eta, --spacing: DDIM-50 with eta 0.7, between
# deterministic DDIM (eta 0), which draws the wrong digit more often, and DDPM's posterior noise
# (eta 1), which strays further from the real digits' statistics (docs/quality.md).
DDIM_SAMPLING = dict(sampler="ddim", steps=50, eta=0.7, spacing="trailing")
# A text run's default (tinydiff sample with no --sampler and --guidance): 25 NFE. On the 20-minute
# text run of docs/text.md it met every prompt-fidelity target without guidance; s = 2 drew the
# prompted attribute almost always but far from the real digits' spread (Frechet 2.5x the floor).
TEXT_SAMPLING = dict(sampler="ddim", steps=25, eta=0.7, spacing="trailing", guidance=1.0)


def sample(sampler, model, schedule, shape, context=None, *, steps=50, eta=None, spacing=None, **kwargs):
    """The sampler named `sampler` (one of SAMPLERS); eta and spacing are ddim's (None: DDIM_SAMPLING's),
    steps is ignored by ddpm (all T). kwargs go to the sampler (generator, guidance_scale, ...)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "ddpm":
        return ddpm_sample(model, schedule, shape, context, **kwargs)
    if sampler == "ddim":
        eta = DDIM_SAMPLING["eta"] if eta is None else eta
        spacing = DDIM_SAMPLING["spacing"] if spacing is None else spacing
        return ddim_sample(model, schedule, shape, context, steps=steps, eta=eta, spacing=spacing, **kwargs)
    solver = {"dpm++2m": dpm_solver_sample, "dpm++2m-sde": dpm_solver_sde_sample, "heun": heun_sample,
              "euler": euler_sample}[sampler]
    return solver(model, schedule, shape, context, steps=steps, **kwargs)
