"""Check analytic gradients against float64 central differences.

For a function f of tensors, backward() gives d<f, R>/dx for a fixed random R; the central
difference (f(x + eps e_i) - f(x - eps e_i)) / (2 eps) estimates the same number for each
element i. A weighted sum with random R (rather than a plain sum) catches gradients that are
right only on average.
"""
import numpy as np

from tinydiff.tensor import Tensor, no_grad


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, seed=0):
    """True if every input's gradient matches; raises AssertionError naming the worst element.

    fn: takes the tensors in `inputs` and returns a Tensor. Inputs must be float64 (on the CPU
    or GPU); only those with requires_grad=True are checked.
    """
    for i, x in enumerate(inputs):
        if x.requires_grad and x.dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} is {x.dtype}; central differences need float64")
    out = fn(*inputs)
    weights = Tensor(out.xp.asarray(np.random.default_rng(seed).standard_normal(out.shape)))

    def objective():
        with no_grad():                           # values only: no graph to build
            return float((fn(*inputs).data * weights.data).sum())

    for x in inputs:
        x.grad = None
    (out * weights).sum().backward()

    for i, x in enumerate(inputs):
        if not x.requires_grad:
            continue
        analytic = x.numpy() * 0 if x.grad is None else np.asarray(Tensor(x.grad).numpy(), dtype=np.float64)
        numeric = np.zeros(x.shape)
        for j in np.ndindex(x.shape):             # perturb x in place, one element at a time
            old = x.data[j].item()
            x.data[j] = old + eps
            plus = objective()
            x.data[j] = old - eps
            minus = objective()
            x.data[j] = old
            numeric[j] = (plus - minus) / (2 * eps)
        err = np.abs(analytic - numeric) - (atol + rtol * np.abs(numeric))
        if err.max() > 0:
            worst = np.unravel_index(err.argmax(), x.shape)
            raise AssertionError(
                f"gradcheck: input {i} (shape {x.shape}) element {worst}: analytic {analytic[worst]:.10g}, "
                f"numeric {numeric[worst]:.10g}, |diff| {abs(analytic[worst] - numeric[worst]):.3g}")
    return True
