"""Fit the polynomials of the float32 GELU (csrc/gelu_math.h) and print them as C++.

    python scripts/fit_gelu_float32.py

GELU needs Phi(x) = erfc(-x / sqrt 2) / 2 and, for its derivative, phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
In float32 both come from two short polynomials, with z = |x| / sqrt 2:
    erfc(z) = exp(-z^2) R(t), t = 1/(1+z/2)  for 0 <= z <= Z_TOP  (erfc e^{z^2}, 1 at 0 and ~ 1/(z sqrt pi)
                                                                   for large z, is smooth in t; the idea
                                                                   of Numerical Recipes' erfcc, sec. 6.2)
    exp(r)  = E(r)                           for |r| <= ln(2)/2   (after exp(x) = 2^n exp(r))
Each is a least-squares fit of the relative error on 4000 Chebyshev nodes against Python's math
functions (double precision); the printed error is the largest relative error on a fine grid,
to compare with float32's rounding, 6e-8.
"""
import math

import numpy as np

Z_TOP = 9.3                 # exp(-9.3^2) ~ 3e-38 is float32's smallest normal: 0 beyond


def fit(f, lo, hi, degree, var):
    """Coefficients c[0..degree] of sum_k c[k] var(z)^k ~ f(z) on [lo, hi], least relative error."""
    n = 4000
    z = (np.cos(np.pi * (np.arange(n) + 0.5) / n) + 1) / 2 * (hi - lo) + lo
    y = f(z)
    a = np.vander(var(z), degree + 1, increasing=True) / y[:, None]
    c, *_ = np.linalg.lstsq(a, np.ones_like(y), rcond=None)
    grid = np.linspace(lo, hi, 100001)
    err = np.abs(np.polyval(c[::-1], var(grid)) / f(grid) - 1).max()
    return c, err


def main():
    erfc = np.vectorize(math.erfc)
    fits = {
        "ERFC_R": fit(lambda z: erfc(z) * np.exp(z * z), 0.0, Z_TOP, 10, lambda z: 1 / (1 + z / 2)),
        "EXP_E": fit(np.exp, -math.log(2) / 2, math.log(2) / 2, 6, lambda r: r),
    }
    for name, (c, err) in fits.items():
        body = ", ".join(f"{v:.9e}f" for v in c)
        print(f"constexpr float {name}[{len(c)}] = {{{body}}};   // max relative error {err:.1e}")


if __name__ == "__main__":
    main()
