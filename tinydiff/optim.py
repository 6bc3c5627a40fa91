"""Optimizers, learning-rate schedules, gradient clipping and an EMA of the weights.

Every update rule is PyTorch's, line for line (torch.optim.SGD, Adam, AdamW), so that the same
parameters and gradients give the same weights. Each optimizer works on the Tensors it is given:
it reads `p.grad` and rebinds `p.data` to the updated array. The exception: Adam on the CPU with
native kernels, whose C++ step (kernels.adam_step) updates `p.data` and its moments in place.
The arrays may be NumPy or CuPy; `xp` is whichever module they belong to. Optimizer state is
kept in each parameter's dtype and on its device.

    opt = Adam(model.parameters(), lr=1e-3)
    for step in range(total):
        opt.lr = cosine_with_warmup(step, total, lr0=1e-3, warmup=500)   # a schedule is a function
        opt.zero_grad()
        loss = ...; loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update()

References: SGD with momentum as in torch (Sutskever et al. 2013 for Nesterov); Adam, Kingma &
Ba, arXiv:1412.6980, Alg. 1; AdamW, Loshchilov & Hutter, arXiv:1711.05101, Alg. 2.
"""
import contextlib
import math

from tinydiff import backend, kernels
from tinydiff.arrays import as_array
from tinydiff.module import check_fits


class Optimizer:
    """What all optimizers share: the parameter list, one state dict per parameter, lr."""

    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.lr = float(lr)     # a Python float: a NumPy float64 scalar would upcast float32 weights
        self.state = [{} for _ in self.params]   # state[i] belongs to params[i]

    def zero_grad(self):
        """Forget the gradients (set to None, as torch's default set_to_none=True)."""
        for p in self.params:
            p.grad = None

    def hparams(self):
        """The hyper-parameters, as a JSON-able dict (subclasses list theirs)."""
        return {"lr": self.lr}

    def state_dict(self):
        """{"hparams": {...}, "state": [per-parameter dict of arrays and the int "step"]}."""
        return {"hparams": self.hparams(),     # copies of the arrays: Adam may update them in place
                "state": [{k: v.copy() if hasattr(v, "shape") else v for k, v in s.items()}
                          for s in self.state]}

    def load_state_dict(self, state_dict):
        """Restore hyper-parameters and moments; arrays go to each parameter's device and dtype."""
        states = state_dict["state"]
        if len(states) != len(self.params):
            raise ValueError(f"optimizer state has {len(states)} parameters, this optimizer "
                             f"has {len(self.params)}")
        for name, value in state_dict["hparams"].items():
            if name not in self.hparams():
                raise ValueError(f"optimizer state has unknown hyper-parameter {name!r}")
            setattr(self, name, tuple(value) if isinstance(value, list) else value)
        self.state = []
        for i, (p, s) in enumerate(zip(self.params, states)):
            loaded = {}
            for name, value in s.items():
                if hasattr(value, "shape"):
                    if tuple(value.shape) != p.shape:
                        raise ValueError(f"optimizer state {i}.{name} has shape {tuple(value.shape)}, "
                                         f"parameter {i} has shape {p.shape}")
                    value = backend.to_device(value, p.device)
                    value = value.astype(p.dtype, copy=True)   # a private copy in the param's dtype
                loaded[name] = value
            self.state.append(loaded)


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, as torch.optim.SGD (dampening 0).

        g = grad + weight_decay * p
        b = g                      on the first step,   b = momentum * b + g   after
        g = g + momentum * b       if nesterov,         g = b                  otherwise
        p = p - lr * g
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr)
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.momentum, self.weight_decay, self.nesterov = float(momentum), float(weight_decay), nesterov

    def hparams(self):
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "nesterov": self.nesterov}

    def step(self):
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            g = p.grad.astype(p.dtype, copy=False)
            if self.weight_decay != 0:
                g = g + self.weight_decay * p.data          # L2 penalty: d(wd/2 |p|^2)/dp = wd p
            if self.momentum != 0:
                if "momentum_buffer" not in state:
                    b = g.copy()
                else:
                    b = self.momentum * state["momentum_buffer"] + g
                state["momentum_buffer"] = b
                g = g + self.momentum * b if self.nesterov else b
            p.data = p.data - float(self.lr) * g


class Adam(Optimizer):
    """Adam (Kingma & Ba, Alg. 1) with torch's bias correction; AdamW when decoupled.

        t = t + 1
        g = grad + weight_decay * p     (Adam: L2 penalty in the gradient)
        p = p * (1 - lr * weight_decay)  (AdamW: decay the weights directly, AdamW Alg. 2 line 12)
        m = beta1 * m + (1 - beta1) * g            first moment
        v = beta2 * v + (1 - beta2) * g^2          second moment
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False):
        super().__init__(params, lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.decoupled_weight_decay = decoupled_weight_decay

    def hparams(self):
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay,
                "decoupled_weight_decay": self.decoupled_weight_decay}

    def step(self):
        """The update above for every parameter that has a gradient, by kernels.adam_step: its
        reference kernels.adam_step_ref spells it out in NumPy/CuPy; on the CPU with native kernels
        one C++ call updates all parameters (and their m, v) in place."""
        lr = float(self.lr)     # a schedule may hand over a NumPy scalar
        by_step = {}            # t -> [(p, state)]: a parameter whose grad was None skipped steps
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            if not state:
                xp = backend.get_array_module(p.data)
                state.update(step=0, exp_avg=xp.zeros_like(p.data), exp_avg_sq=xp.zeros_like(p.data))
            state["step"] += 1
            by_step.setdefault(state["step"], []).append((p, state))
        for t, group in by_step.items():
            new_p, new_m, new_v = kernels.adam_step(
                [p.data for p, _ in group], [p.grad.astype(p.dtype, copy=False) for p, _ in group],
                [s["exp_avg"] for _, s in group], [s["exp_avg_sq"] for _, s in group],
                lr, *self.betas, self.eps, self.weight_decay, self.decoupled_weight_decay, t)
            for (p, state), p_t, m_t, v_t in zip(group, new_p, new_m, new_v):
                p.data, state["exp_avg"], state["exp_avg_sq"] = p_t, m_t, v_t


def AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW."""
    return Adam(params, lr, betas, eps, weight_decay, decoupled_weight_decay=True)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules: plain functions of the step. Set `opt.lr = schedule(step, ...)`
# before each step; their only state is the step, which the checkpoint keeps.

def linear_decay(step, total, lr0):
    """The course's schedule: lr0 at step 0, falling linearly to 0 at step `total`."""
    return lr0 * (1 - step / total)


def cosine_with_warmup(step, total, lr0, warmup=0, lr_min=0.0):
    """Linear warm-up from 0 to lr0 over `warmup` steps, then a half cosine down to lr_min.

    As transformers' get_cosine_schedule_with_warmup (Loshchilov & Hutter, SGDR, arXiv:1608.03983):
        step < warmup:  lr0 * step / warmup
        after:          lr_min + (lr0 - lr_min) * (1 + cos(pi * progress)) / 2,
                        progress = (step - warmup) / (total - warmup), clamped to [0, 1]
    """
    if step < warmup:
        return lr0 * step / warmup
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return lr_min + (lr0 - lr_min) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Gradient clipping

def clip_grad_norm_(params, max_norm, eps=1e-6):
    """Scale all gradients together so that their global L2 norm is at most max_norm.

    As torch.nn.utils.clip_grad_norm_: total = sqrt(sum_i |g_i|^2) over every parameter's
    gradient; if total > max_norm, each g is multiplied by max_norm / (total + eps).
    Returns the total norm before clipping (a Python float).
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    xp = backend.get_array_module(params[0].grad)
    norms = xp.stack([xp.sqrt((p.grad * p.grad).sum()) for p in params])   # |g_i|, one per tensor
    total = float(xp.sqrt((norms * norms).sum()))
    coef = max_norm / (total + eps)
    if coef < 1:
        for p in params:
            p.grad = p.grad * xp.asarray(coef, dtype=p.grad.dtype)    # rebind, never in place
    return total


# ---------------------------------------------------------------------------------------------
# Exponential moving average of the weights, for sampling (DDPM sec. 4 uses decay 0.9999).

class EMA:
    """shadow = decay * shadow + (1 - decay) * weight, after every optimizer step.

    Holds one shadow array per entry of model.state_dict(): parameters are averaged, buffers
    (BatchNorm's running statistics) are copied as they are. Its state_dict() has exactly the
    model's keys, so it can be saved as a weights file and loaded into a model for sampling.

        ema = EMA(model, decay=0.999)
        ...; opt.step(); ema.update()
        with ema.average_parameters():     # evaluate with the averaged weights, then swap back
            samples = sample(model)
    """

    def __init__(self, model, decay=0.999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.model, self.decay = model, float(decay)
        self.param_names = {name for name, _ in model.named_parameters()}
        self.shadow = {name: t.data.copy() for name, t in _live_tensors(model).items()}

    def update(self):
        """Move the shadow weights toward the model's current weights."""
        for name, t in _live_tensors(self.model).items():
            if name in self.param_names:
                self.shadow[name] = self.decay * self.shadow[name] + (1 - self.decay) * t.data
            else:
                self.shadow[name] = t.data.copy()

    def copy_to(self, model=None):
        """Put the averaged weights (and buffers) into `model` (by default the tracked one)."""
        for name, t in _live_tensors(model or self.model).items():
            t.data = backend.to_device(self.shadow[name], t.device).astype(t.dtype, copy=True)

    @contextlib.contextmanager
    def average_parameters(self, model=None):
        """Inside the block the model holds the EMA weights; on leaving, its own come back."""
        model = model or self.model
        saved = {name: t.data for name, t in _live_tensors(model).items()}
        self.copy_to(model)        # rebinds each .data, so the saved arrays stay untouched
        try:
            yield model
        finally:
            for name, t in _live_tensors(model).items():
                t.data = saved[name]

    def state_dict(self):
        """The shadow arrays under the model's state_dict keys (same layout as model weights)."""
        return dict(self.shadow)

    def load_state_dict(self, state_dict):
        """Shadow arrays (Tensors or arrays) under the model's state_dict keys: refused in
        module.check_fits's words unless they fit, then copied onto the shadow's device and dtype."""
        check_fits(self.model, {name: tuple(v.shape) for name, v in state_dict.items()})
        for name, old in self.shadow.items():
            new = as_array(state_dict[name], backend.device_of(old), copy=True)   # loading: asked for
            self.shadow[name] = new.astype(old.dtype, copy=True)


def _live_tensors(model):
    """name -> the model's own parameter and buffer Tensors, in state_dict order.
    (state_dict() hands out detached Tensors: rebinding their .data would not reach the model.)"""
    live = dict(model.named_parameters())
    live.update(model.named_buffers())
    return {name: live[name] for name in model.state_dict()}
