"""Sampling: turn noise into images with a trained noise predictor, by DDPM or DDIM, with guidance.

References
    DDPM       Ho, Jain, Abbeel 2020, arXiv:2006.11239 (Alg. 2, eqs. 7 and 11)
    DDIM       Song, Meng, Ermon 2020, arXiv:2010.02502 (eqs. 12 and 16)
    improved   Nichol, Dhariwal 2021, arXiv:2102.09672
    classifier Dhariwal, Nichol 2021, arXiv:2105.05233 (Alg. 1, eq. 14 / Alg. 2)
    CFG        Ho, Salimans 2022, arXiv:2207.12598 (eq. 6)
    spacing    Lin et al. 2023, arXiv:2305.08891 (Table 2: leading, linspace, trailing)

Notation: as in diffusion.py; t is a timestep index 0..T-1 (the paper's t + 1), and "t = -1"
means the clean image, alpha_bar = 1. DDIM's alpha_t is DDPM's alpha_bar_t: we write alpha_bar.
    sigma        the standard deviation of the noise added in one step (sigma_t in DDIM eq. 12)
    s            the guidance scale (classifier-free: guidance_scale; classifier: classifier_scale)

API
    context = model.context(labels)                        # the model's own conditioning (models.py)
    x = ddpm_sample(model, schedule, (B, C, H, W), context, seed=0)
    x = ddim_sample(model, schedule, (B, C, H, W), context, steps=50, eta=0.0, spacing="trailing")
    x, trajectory = ddim_sample(..., return_trajectory_every=5)   # list of x_t arrays, x_T first
Both return arrays (NumPy or CuPy, like the model's parameters) in the data's range, [-1, 1].

Classifier-free guidance (guidance_scale = s):  eps = eps_uncond + s (eps_cond - eps_uncond).
s = 1 is the conditional model alone (no guidance; nothing extra is computed), s = 0 the
unconditional one, s > 1 pushes further toward the context. Ho & Salimans write
(1 + w) eps_cond - w eps_uncond: that is s = 1 + w. One network call per step evaluates a doubled
batch, [context; model.null_context(B)], and the combination is fused into the update kernel.

Classifier guidance (classifier_scale = s): the gradient g = grad_{x_t} log p(y | x_t) of a
noise-aware classifier, computed by tinydiff's autograd, shifts DDPM's mean by s Sigma g
(Dhariwal & Nichol Alg. 1) and DDIM's eps by -sqrt(1 - alpha_bar) s g (their eq. 14, Alg. 2). The class y
of each sample is given as classifier_labels (B,); it is never guessed from the context.

The model is called as it is: put it in eval() mode first (the ContextUnet has BatchNorm).
All model calls run under no_grad(); only the classifier's gradient builds a graph, so do not
call a sampler inside no_grad() when you use a classifier. Noise z is drawn from the generator
and handed to the kernel, so the NumPy, C++ and CUDA kernels can be compared on the same draws.
"""
import math

import numpy as np

from tinydiff import backend, kernels
from tinydiff import functional as F
from tinydiff.arrays import as_array
from tinydiff.diffusion import OBJECTIVES, call_model, model_eps, model_time, null_context
from tinydiff.tensor import Tensor, is_grad_enabled, no_grad

SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("small", "large")


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
    if seed is not None:
        rng = (np.random.default_rng(seed) if device == "cpu"
               else backend.cupy_module().random.default_rng(seed))
    else:
        rng = generator if generator is not None else backend.generator(device)
    if x_T is None:
        x = rng.standard_normal(tuple(shape), dtype=dtype)           # x_T ~ N(0, I), DDPM Alg. 2, line 1
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
        return model_eps(call_model(model, schedule, x, t, context), schedule, x, t, objective), None
    xp, b = backend.get_array_module(x), x.shape[0]
    c = as_array(context, backend.device_of(x))
    c2 = xp.concatenate([c, null_context(model, b, x).astype(c.dtype, copy=False)])   # (2B, ...)
    x2, t2 = xp.concatenate([x, x]), xp.concatenate([t, t])                          # one call, 2B
    out = call_model(model, schedule, x2, t2, c2)
    return (model_eps(out[:b], schedule, x, t, objective),                           # conditional
            model_eps(out[b:], schedule, x, t, objective))                           # unconditional


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
        logits = classifier(xt, model_time(classifier, schedule, t, x))        # (B, classes)
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


# ---------------------------------------------------------------------------------------------
# DDPM: ancestral sampling, one step per timestep


def ddpm_sample(model, schedule, shape, context=None, *, generator=None, seed=None, device=None,
                dtype=np.float32, x_T=None, variance="small", objective="eps", guidance_scale=1.0,
                classifier=None, classifier_scale=0.0, classifier_labels=None,
                return_trajectory_every=None, noise_free=False):
    """DDPM Alg. 2: for t = T..1, x_{t-1} = mu_theta(x_t, t) + sigma_t z, with no noise at t = 1.

    model       model(x_t, model.time_input(t, T), context) -> eps (or x0 or v, see objective)
    context     (B, ...) what model.context(labels) returns (the model's own conditioning), or None
    variance    "small": sigma^2 = beta_tilde (DDPM eq. 7), "large": sigma^2 = beta (DDPM Sec. 3.2
                found both to work; the course's denoise_add_noise uses "large", b_t.sqrt() * z)
    noise_free  the course's ablation: add no noise at any step (samples collapse to blurry means)
    x_T         the starting noise (default: drawn from the generator)
    The update is DDPM eq. 11: mu = 1/sqrt(alpha) (x_t - beta / sqrt(1 - alpha_bar) eps).
    Returns x_0 (B, ...), or (x_0, trajectory) with return_trajectory_every=k.
    """
    _check(schedule, objective, shape)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    rng, xp, x = _setup(model, shape, context, generator, seed, device, x_T, dtype)
    b, f64 = x.shape[0], schedule.f64
    var = f64["posterior_variance"] if variance == "small" else f64["beta"]
    y = _labels(classifier_labels, x) if classifier is not None else None
    trajectory = [x] if return_trajectory_every else None

    for i, t in enumerate(reversed(range(schedule.T))):               # DDPM Alg. 2, line 2
        tt = xp.full((b,), t, dtype=np.int64)
        with no_grad(), backend.one_blas_thread(backend.device_of(x)):
            eps, eps_uncond = _eps(model, schedule, x, tt, context, guidance_scale, objective)
        last = t == 0
        z = (xp.zeros_like(x) if last or noise_free
             else rng.standard_normal(x.shape, dtype=x.dtype))        # DDPM Alg. 2, line 3
        sigma = 0.0 if last or noise_free else math.sqrt(var[t])
        coef_x, coef_eps = f64["sqrt_recip_alpha"][t], f64["eps_coef"][t]
        if classifier is not None and classifier_scale:
            # mean + s Sigma g (D&N Alg. 1, line 4) as a change of eps: mu = coef_x (x - coef_eps eps),
            # so eps -= s Sigma g / (coef_x coef_eps). The same shift on eps_uncond passes through
            # the guidance combination unchanged: (1 - s') d + s' d = d.
            g = classifier_grad(classifier, schedule, x, tt, y)
            shift = (classifier_scale * var[t] / (coef_x * coef_eps)) * g
            eps = eps - shift.astype(x.dtype)
            eps_uncond = None if eps_uncond is None else eps_uncond - shift.astype(x.dtype)
        eps, eps_uncond = _contiguous(eps, eps_uncond)
        x = kernels.ddpm_step(x, eps, z, _per_sample(coef_x, b, x), _per_sample(coef_eps, b, x),
                              _per_sample(sigma, b, x), eps_uncond, guidance_scale)   # DDPM Alg. 2, line 4
        _record(trajectory, return_trajectory_every or 1, i, x)

    if trajectory is not None:
        if trajectory[-1] is not x:
            trajectory.append(x)
        return x, trajectory
    return x


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
    if not (isinstance(steps, (int, np.integer)) and 1 <= steps <= T):
        raise ValueError(f"steps must be an integer in [1, {T}] (the schedule has {T} timesteps), got {steps!r}")
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
                clip_x0=False, generator=None, seed=None, device=None, dtype=np.float32, x_T=None,
                objective="eps", guidance_scale=1.0, classifier=None, classifier_scale=0.0,
                classifier_labels=None, return_trajectory_every=None):
    """DDIM eq. 12 over a subsequence of `steps` timesteps (see ddim_timesteps for `spacing`):

        x0_hat = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)              "predicted x0"
        x_prev = sqrt(alpha_bar_prev) x0_hat
               + sqrt(1 - alpha_bar_prev - sigma^2) eps                          "direction to x_t"
               + sigma z                                                         "random noise"

    eta scales sigma (DDIM eq. 16): 0 is deterministic given x_T, 1 with steps = T is DDPM.
    clip_x0 clips x0_hat to [-1, 1] before it is used (off by default, as in the course).
    The last step goes to alpha_bar_prev = 1 ("t = -1"), so it returns x0_hat itself.
    Other arguments as ddpm_sample. Returns x_0, or (x_0, trajectory) with return_trajectory_every.
    """
    _check(schedule, objective, shape)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    timesteps, prev_timesteps = ddim_timesteps(schedule.T, steps, spacing)
    rng, xp, x = _setup(model, shape, context, generator, seed, device, x_T, dtype)
    b, alpha_bar = x.shape[0], schedule.f64["alpha_bar"]
    y = _labels(classifier_labels, x) if classifier is not None else None
    trajectory = [x] if return_trajectory_every else None
    zeros = xp.zeros_like(x)

    for i, (t, t_prev) in enumerate(zip(timesteps, prev_timesteps)):
        tt = xp.full((b,), t, dtype=np.int64)
        with no_grad(), backend.one_blas_thread(backend.device_of(x)):
            eps, eps_uncond = _eps(model, schedule, x, tt, context, guidance_scale, objective)
        # 1. alpha_bar at t and at the previous timestep ("t = -1": the clean image, alpha_bar = 1)
        ab, ab_prev = alpha_bar[t], (alpha_bar[t_prev] if t_prev >= 0 else 1.0)
        # 2. sigma (DDIM eq. 16) and the coefficient of the "direction pointing to x_t" (eq. 12)
        sigma = ddim_sigma(ab, ab_prev, eta)
        dir_coef = math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0))
        # 3. classifier guidance on eps: eps - sqrt(1 - alpha_bar) s g   (D&N eq. 14, Alg. 2)
        if classifier is not None and classifier_scale:
            g = classifier_grad(classifier, schedule, x, tt, y)
            shift = (classifier_scale * math.sqrt(1 - ab) * g).astype(x.dtype)
            eps = eps - shift
            eps_uncond = None if eps_uncond is None else eps_uncond - shift
        # 4. the update, DDIM eq. 12 (with guidance fused): predicted x0, direction, noise
        z = rng.standard_normal(x.shape, dtype=x.dtype) if sigma > 0 else zeros
        eps, eps_uncond = _contiguous(eps, eps_uncond)
        x, _ = kernels.ddim_step(x, eps, z, _per_sample(math.sqrt(ab), b, x),
                                 _per_sample(math.sqrt(1 - ab), b, x), _per_sample(math.sqrt(ab_prev), b, x),
                                 _per_sample(dir_coef, b, x), _per_sample(sigma, b, x), clip_x0,
                                 eps_uncond, guidance_scale)
        _record(trajectory, return_trajectory_every or 1, i, x)

    if trajectory is not None:
        if trajectory[-1] is not x:
            trajectory.append(x)
        return x, trajectory
    return x
