"""The forward (noising) process, the noise schedules, and the training loss.

References
    DDPM           Ho, Jain, Abbeel 2020, arXiv:2006.11239
    DDIM           Song, Meng, Ermon 2020, arXiv:2010.02502
    improved DDPM  Nichol, Dhariwal 2021, arXiv:2102.09672 (cosine schedule, eq. 17)
    v-prediction   Salimans, Ho 2022, arXiv:2202.00512 (Sec. 4 and App. D)
    sigmoid        Chen 2023, arXiv:2301.10972, Alg. 1 (also Jabri et al. 2022, arXiv:2212.11972)

Notation (code name: paper symbol)
    t                  timestep INDEX 0 .. T-1; index t is the paper's step t+1 (as in Ho's code)
    beta[t]            beta_{t+1}, the variance of the noise added at that step
    alpha[t]           alpha_{t+1} = 1 - beta_{t+1}
    alpha_bar[t]       alpha_bar_{t+1} = prod_{s <= t+1} alpha_s   (DDIM writes this as alpha_t)
    alpha_bar_prev[t]  alpha_bar_t, with alpha_bar_0 = 1 (no noise at all: the data)
    x0, xt, eps        the data x_0, the noisy x_t, the noise eps ~ N(0, I)
    posterior_variance beta_tilde (DDPM eq. 7), the variance of q(x_{t-1} | x_t, x_0)

The course ("How Diffusion Models Work") keeps T+1 entries, index 0 being the clean image
(alpha_bar = 1) and t = 1..T the noisy ones, with betas linspace(1e-4, 0.02, T+1)[1:]. We keep T
entries, betas linspace(1e-4, 0.02, T) as in DDPM Sec. 4, so our index t is the course's t + 1
(and the betas differ by at most (0.02 - 1e-4) / T). Each model says what it takes as time,
model.time_input(t, T): the course's ContextUnet the fraction (t + 1) / T, exactly the course's
t / T; the UNet the integer index t, as Ho's and diffusers' U-Nets do.

Everything is computed in float64, then cast: the public arrays (`schedule.beta`, ...) are in
the schedule's dtype; the per-sample coefficients used on data are cast from float64 to the
data's dtype. Functions take NumPy or CuPy arrays; the tables move to the GPU lazily, once.

API
    schedule = NoiseSchedule("linear", timesteps=500)      # or "cosine", "sigmoid", betas=[...]
    xt = schedule.q_sample(x0, t, eps)                      # t: (B,) int indices
    loss = training_loss(model, schedule, x0, context, objective="eps")   # a scalar Tensor
    model_eps(model_output, schedule, xt, t, objective)     # any objective's output -> eps
"""
import numpy as np

from tinydiff import backend, kernels, philox
from tinydiff import functional as F
from tinydiff.arrays import as_array
from tinydiff.tensor import Tensor

OBJECTIVES = ("eps", "x0", "v")
SCHEDULES = ("linear", "cosine", "sigmoid")


# ---------------------------------------------------------------------------------------------
# Schedules: betas in float64


def linear_betas(timesteps, beta_start=1e-4, beta_end=0.02):
    """DDPM Sec. 4: beta rises linearly from beta_1 = 1e-4 to beta_T = 0.02 (T = 1000 there)."""
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def betas_from_alpha_bar(alpha_bar_fn, timesteps, max_beta=0.999):
    """beta_t = 1 - alpha_bar(t/T) / alpha_bar((t-1)/T), capped at max_beta (improved DDPM Sec. 3.2)."""
    s = np.arange(timesteps + 1, dtype=np.float64) / timesteps          # 0, 1/T, ..., 1
    alpha_bar = alpha_bar_fn(s)
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def cosine_alpha_bar(s, offset=0.008):
    """improved DDPM eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""
    f = lambda u: np.cos((u + offset) / (1 + offset) * np.pi / 2) ** 2
    return f(s) / f(0.0)


def sigmoid_alpha_bar(s, start=-3.0, end=3.0, tau=1.0, clip_min=1e-9):
    """Chen 2023, Alg. 1 (sigmoid_schedule): alpha_bar(t) falls from 1 to 0 along a sigmoid."""
    sig = lambda z: 1 / (1 + np.exp(-z))
    v_start, v_end = sig(start / tau), sig(end / tau)
    return np.clip((v_end - sig((s * (end - start) + start) / tau)) / (v_end - v_start), clip_min, 1.0)


# ---------------------------------------------------------------------------------------------
# The schedule and the forward process


class NoiseSchedule:
    """The betas and everything derived from them (DDPM Sec. 2), and the forward process.

    kind: "linear" (the course's and DDPM's), "cosine" (improved DDPM eq. 17, s = 0.008, betas
    capped at 0.999), "sigmoid" (Chen 2023 Alg. 1, start -3, end 3, tau 1, capped at 0.999);
    or pass `betas` (T values in (0, 1)) to use your own.
    """

    def __init__(self, kind="linear", timesteps=500, beta_start=1e-4, beta_end=0.02, betas=None,
                 dtype=np.float32):
        if betas is not None:
            beta, kind = np.asarray(betas, dtype=np.float64), "custom"
        elif kind == "linear":
            beta = linear_betas(timesteps, beta_start, beta_end)
        elif kind == "cosine":
            beta = betas_from_alpha_bar(cosine_alpha_bar, timesteps)
        elif kind == "sigmoid":
            beta = betas_from_alpha_bar(sigmoid_alpha_bar, timesteps)
        else:
            raise ValueError(f"NoiseSchedule: kind must be one of {SCHEDULES} (or pass betas), got {kind!r}")
        if beta.ndim != 1 or len(beta) < 1 or not np.all((beta > 0) & (beta < 1)):
            raise ValueError(f"NoiseSchedule: betas must be a 1-D array of values in (0, 1), got shape "
                             f"{beta.shape}, range [{beta.min() if beta.size else None}, "
                             f"{beta.max() if beta.size else None}]")
        self.kind, self.T, self.dtype = kind, len(beta), np.dtype(dtype)

        alpha = 1 - beta
        alpha_bar = np.cumprod(alpha)                                    # DDPM Sec. 2, below eq. 4
        alpha_bar_prev = np.append(1.0, alpha_bar[:-1])                  # alpha_bar_0 = 1
        f64 = dict(
            beta=beta, alpha=alpha, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
            sqrt_alpha_bar=np.sqrt(alpha_bar),                           # DDPM eq. 4, the mean's scale
            sqrt_one_minus_alpha_bar=np.sqrt(1 - alpha_bar),             # DDPM eq. 4, the noise's scale
            sqrt_recip_alpha_bar=np.sqrt(1 / alpha_bar),                 # DDPM eq. 15
            sqrt_recipm1_alpha_bar=np.sqrt(1 / alpha_bar - 1),           # DDPM eq. 15
            sqrt_recip_alpha=1 / np.sqrt(alpha),                         # DDPM eq. 11, coef of x_t
            eps_coef=beta / np.sqrt(1 - alpha_bar),                      # DDPM eq. 11, coef of eps
            posterior_variance=beta * (1 - alpha_bar_prev) / (1 - alpha_bar),   # DDPM eq. 7, beta_tilde
            posterior_mean_coef1=beta * np.sqrt(alpha_bar_prev) / (1 - alpha_bar),        # DDPM eq. 7, x0
            posterior_mean_coef2=(1 - alpha_bar_prev) * np.sqrt(alpha) / (1 - alpha_bar),  # DDPM eq. 7, xt
        )
        # beta_tilde is 0 at the first step: clip its log to the next value, as Ho's code does
        var = f64["posterior_variance"]
        f64["posterior_log_variance_clipped"] = np.log(np.append(var[1], var[1:]) if len(var) > 1
                                                       else np.maximum(var, 1e-20))
        self.f64 = f64                                   # the float64 originals, for the samplers
        for name, arr in f64.items():
            setattr(self, name, arr.astype(self.dtype))  # schedule.beta, schedule.alpha_bar, ...
        self._tables = {}                                # (name, device) -> float64 array there

    def __repr__(self):
        return f"NoiseSchedule(kind={self.kind!r}, timesteps={self.T}, dtype={self.dtype.name})"

    def __len__(self):
        return self.T

    def coef(self, name, t, like):
        """The table `name` at timestep indices t, as a (B,) array of like's dtype on like's device."""
        xp = backend.get_array_module(like)
        key = (name, backend.device_of(like))
        if key not in self._tables:                      # moved to the GPU once, then reused
            self._tables[key] = xp.asarray(self.f64[name])
        return self._tables[key][self.timesteps_like(t, like)].astype(like.dtype)

    def timesteps_like(self, t, like):
        """t (an int or B ints) as an int64 array of shape (B,) on like's device, checked."""
        xp = backend.get_array_module(like)
        t = as_array(t, backend.device_of(like))
        if t.dtype.kind not in "iu":
            raise TypeError(f"timesteps must be integers 0..{self.T - 1}, got dtype {t.dtype}")
        if t.ndim == 0:
            t = xp.full((like.shape[0],), int(t), dtype=np.int64)
        if t.shape != (like.shape[0],):
            raise ValueError(f"timesteps must have shape ({like.shape[0]},), one per sample, got {t.shape}")
        if t.size and (int(t.min()) < 0 or int(t.max()) >= self.T):
            raise IndexError(f"timesteps must lie in [0, {self.T}), got [{int(t.min())}, {int(t.max())}]")
        return t.astype(np.int64, copy=False)

    # --- the forward process q ---------------------------------------------------------------
    def q_sample(self, x0, t, eps):
        """Sample x_t ~ q(x_t | x_0): xt = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps.  # DDPM eq. 4

        The course's code writes `ab_t.sqrt() * x + (1 - ab_t) * noise`: it drops the square root
        on the noise's scale. Its x_t then has variance alpha_bar + (1 - alpha_bar)^2 < 1 instead
        of 1, so the model sees images that are less noisy than the ones the sampler (which
        assumes eq. 4) produces. We follow eq. 4; the fused kernel does the arithmetic.
        """
        xp = backend.get_array_module(x0)                # the compiled kernel takes C-contiguous arrays
        x0, eps = xp.ascontiguousarray(x0), xp.ascontiguousarray(eps)
        return kernels.q_sample(x0, eps, self.coef("sqrt_alpha_bar", t, x0),
                                self.coef("sqrt_one_minus_alpha_bar", t, x0))

    def q_posterior_mean_variance(self, x0, xt, t):
        """q(x_{t-1} | x_t, x_0) = N(mean, variance I)   # DDPM eqs. 6-7
        Returns mean (like xt), variance and log-variance (clipped), both shaped (B, 1, ..., 1)."""
        b = (-1,) + (1,) * (xt.ndim - 1)
        mean = (self.coef("posterior_mean_coef1", t, xt).reshape(b) * x0
                + self.coef("posterior_mean_coef2", t, xt).reshape(b) * xt)   # DDPM eq. 7, mu_tilde
        return (mean, self.coef("posterior_variance", t, xt).reshape(b),
                self.coef("posterior_log_variance_clipped", t, xt).reshape(b))

    # --- converting between x0, eps and v at a given x_t ---------------------------------------
    def _pair(self, a, b, t, like):
        shape = (-1,) + (1,) * (like.ndim - 1)
        return self.coef(a, t, like).reshape(shape), self.coef(b, t, like).reshape(shape)

    def predict_x0_from_eps(self, xt, t, eps):
        """x0 = (xt - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)   # DDPM eq. 15"""
        c1, c2 = self._pair("sqrt_recip_alpha_bar", "sqrt_recipm1_alpha_bar", t, xt)
        return c1 * xt - c2 * eps

    def predict_eps_from_x0(self, xt, t, x0):
        """eps = (xt - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)   # DDPM eq. 4, solved for eps"""
        c1, c2 = self._pair("sqrt_recip_alpha_bar", "sqrt_recipm1_alpha_bar", t, xt)
        return (c1 * xt - x0) / c2

    def v_from_x0_eps(self, x0, t, eps):
        """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0   # Salimans & Ho, Sec. 4"""
        a, s = self._pair("sqrt_alpha_bar", "sqrt_one_minus_alpha_bar", t, x0)
        return a * eps - s * x0

    def predict_x0_from_v(self, xt, t, v):
        """x0 = sqrt(alpha_bar) xt - sqrt(1 - alpha_bar) v   # Salimans & Ho, App. D"""
        a, s = self._pair("sqrt_alpha_bar", "sqrt_one_minus_alpha_bar", t, xt)
        return a * xt - s * v

    def predict_eps_from_v(self, xt, t, v):
        """eps = sqrt(1 - alpha_bar) xt + sqrt(alpha_bar) v   # Salimans & Ho, App. D"""
        a, s = self._pair("sqrt_alpha_bar", "sqrt_one_minus_alpha_bar", t, xt)
        return s * xt + a * v


def model_eps(output, schedule, xt, t, objective="eps"):
    """The noise eps implied by a model's raw output array for any objective (the samplers' input)."""
    if objective == "eps":
        return output
    if objective == "x0":
        return schedule.predict_eps_from_x0(xt, t, output)
    if objective == "v":
        return schedule.predict_eps_from_v(xt, t, output)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


# ---------------------------------------------------------------------------------------------
# Calling a model, and the training loss


def model_time(model, schedule, t, like):
    """Timestep indices t, checked (ints 0..T-1, one per sample of like), as the model's time input:
    the model owns its convention, model.time_input(t, T): (t + 1) / T for the course's ContextUnet,
    the index t for the UNet."""
    return model.time_input(schedule.timesteps_like(t, like), schedule.T)


def null_context(model, batch, like):
    """The model's 'no context' for classifier-free guidance and context dropout, as an array."""
    if not hasattr(model, "null_context"):
        raise ValueError(f"{type(model).__name__} has no null_context(batch): it cannot be trained with "
                         f"context dropout or sampled with classifier-free guidance")
    null = model.null_context(batch)
    if null is None:
        raise ValueError(f"{type(model).__name__} is unconditional (null_context is None): it takes no context")
    return as_array(null, backend.device_of(like))


def call_model(model, schedule, xt, t, context=None):
    """model(x_t, time, context) on raw arrays (context from model.context); returns the output array."""
    c = None if context is None else Tensor(as_array(context, backend.device_of(xt)))
    return model(Tensor(xt), model_time(model, schedule, t, xt), c).data


def training_loss(model, schedule, x0, context=None, objective="eps", generator=None, t=None,
                  eps=None, context_drop=0.0):
    """The simple loss, || target - model(x_t, t, c) ||^2 averaged   # DDPM eq. 14 / Alg. 1

    x0 (B, C, H, W) array or Tensor of data in [-1, 1]; context: (B, ...) or None.
    objective: the model's target, "eps" (DDPM's and the course's), "x0", or "v" (Salimans & Ho).
    t, eps and the context-dropout draws come from `generator`, a tinydiff.philox.Philox (default:
    philox.default_generator(), seeded by manual_seed), on x0's device, unless given: the same
    seed gives the same noise on the CPU and the GPU.
    context_drop: the probability of replacing a sample's context by model.null_context
    (classifier-free guidance training, Ho & Salimans Alg. 1; the course masks 10%).
    Returns a scalar Tensor; the gradient flows into the model's parameters only.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    x0 = x0.data if isinstance(x0, Tensor) else x0
    xp, b = backend.get_array_module(x0), x0.shape[0]
    rng = philox.check_generator(generator)
    if t is None:
        t = rng.integers(0, schedule.T, (b,), xp)                   # DDPM Alg. 1, line 3 (0-indexed)
    t = schedule.timesteps_like(t, x0)
    if eps is None:
        eps = rng.normal(x0.shape, x0.dtype, xp)                    # DDPM Alg. 1, line 4
    xt = schedule.q_sample(x0, t, eps)                              # DDPM eq. 4
    if context is not None and context_drop > 0:
        context = as_array(context, backend.device_of(x0))
        drop = (rng.random((b,), np.float64, xp) < context_drop).reshape((b,) + (1,) * (context.ndim - 1))
        context = xp.where(drop, null_context(model, b, x0), context)
    prediction = model(Tensor(xt), model_time(model, schedule, t, x0),
                       None if context is None else Tensor(as_array(context, backend.device_of(x0))))
    if objective == "eps":
        target = eps
    elif objective == "x0":
        target = x0
    else:
        target = schedule.v_from_x0_eps(x0, t, eps)                # Salimans & Ho, Sec. 4
    return F.mse_loss(prediction, Tensor(target.astype(x0.dtype, copy=False)))   # DDPM Alg. 1, line 5
