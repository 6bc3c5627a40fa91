"""Convergence order of the samplers, against the exact answer key (math, not timing).

    python benchmarks/bench_sampler_order.py                   # T = 1000 linear, steps 16 .. 256
    python benchmarks/bench_sampler_order.py --schedule cosine --steps 8 16 32 64

Data x0 ~ N(mu, sd^2 I): the ideal denoiser E[x0 | x_t] is known in closed form, and so is the
probability-flow ODE's solution from any x_T (tests/gaussian_oracle.py: GaussianOracle,
ode_solution). Each sampler integrates that ODE with the exact denoiser in float64; its error is
max |x - exact| at its own last noise level, before the final jump to sigma = 0 (so that the
fixed endpoint does not flatten the fit). The order p is the slope of log error against log
steps: Euler and DDIM (eta 0, which is Euler in sigma) 1, Heun and DPM-Solver++ 2M 2.
tests/test_ode_samplers.py asserts the same fit within +-0.25.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from gaussian_oracle import convergence_order, ode_endpoint_error  # noqa: E402

from tinydiff.diffusion import SCHEDULES, NoiseSchedule  # noqa: E402

THEORY = {"ddim": 1, "euler": 1, "heun": 2, "dpm++2m": 2}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Fit each sampler's convergence order on Gaussian data.")
    parser.add_argument("--schedule", choices=SCHEDULES, default="linear")
    parser.add_argument("--timesteps", type=int, default=1000)
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--mu", type=float, default=0.3)
    parser.add_argument("--sd", type=float, default=0.5)
    args = parser.parse_args(argv)
    schedule = NoiseSchedule(args.schedule, timesteps=args.timesteps)
    print(f"data N({args.mu}, {args.sd}^2), {args.schedule} schedule, T = {args.timesteps}; "
          f"error = max |x - exact| at the last noise level before the final jump\n")
    print("| sampler | " + " | ".join(f"{n} steps" for n in args.steps) + " | fitted order | theory |")
    print("|---|" + "---:|" * (len(args.steps) + 2))
    orders = {}
    for sampler, theory in THEORY.items():
        errors = [ode_endpoint_error(sampler, schedule, n, args.mu, args.sd) for n in args.steps]
        orders[sampler] = convergence_order(errors, args.steps)
        print(f"| {sampler} | " + " | ".join(f"{e:.2e}" for e in errors) + f" | {orders[sampler]:.3f} | {theory} |")
    return orders


if __name__ == "__main__":
    main()
