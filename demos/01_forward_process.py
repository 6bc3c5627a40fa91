"""Lesson 1 (the forward process): how a noise schedule destroys a digit, step by step.

    python demos/01_forward_process.py                 # writes out/01_forward_process/*.png
    python demos/01_forward_process.py --device cuda   # the same on a GPU

Diffusion models learn to undo a fixed noising process. Given a clean image x0, the noisy
image at step t is drawn in one shot (DDPM eq. 4):

    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,     eps ~ N(0, I)

alpha_bar_t = prod_{s <= t} (1 - beta_s) falls from 1 (the data) to about 0 (pure noise); the
schedule of betas decides how fast. The signal-to-noise ratio SNR_t = alpha_bar_t / (1 - alpha_bar_t)
says how much of the digit is left; its log falls from high to very negative.

Pictures:
  noising.png  one digit at several t: the course's linear schedule (beta 1e-4 -> 0.02, T=500),
               the cosine schedule (improved DDPM), and the course notebook's own noising, which
               drops a square root (x0 scale sqrt(alpha_bar), noise scale 1 - alpha_bar): its
               digits stay visible longer than eq. 4 says they should.
  log_snr.png  log SNR against t / T for the linear, cosine and sigmoid schedules.
"""
import argparse
import os

import numpy as np

import tinydiff
from tinydiff import backend, data
from tinydiff.diffusion import NoiseSchedule

TIMESTEPS = 500                         # T, the course's value
SHOW_AT = [0, 25, 50, 100, 200, 300, 400, 499]   # timestep indices to picture
DIGIT_INDEX = 0                         # which training digit to noise
SEED = 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="The forward (noising) process, as pictures.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="out/01_forward_process", help="folder for the pictures")
    parser.add_argument("--tiny", action="store_true", help="(no effect: this demo is already fast)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, labels, _ = data.load_digits("train")                 # (N, 1, 16, 16) in [-1, 1]
    x0 = backend.to_device(images[DIGIT_INDEX:DIGIT_INDEX + 1], args.device)   # (1, 1, 16, 16)
    tinydiff.manual_seed(SEED)
    eps = backend.to_device(np.random.default_rng(SEED).standard_normal(x0.shape).astype(np.float32),
                            args.device)                          # the same noise for every row

    schedules = {"linear": NoiseSchedule("linear", TIMESTEPS), "cosine": NoiseSchedule("cosine", TIMESTEPS),
                 "sigmoid": NoiseSchedule("sigmoid", TIMESTEPS)}

    # --- one digit, noised at several t --------------------------------------------------------
    rows = {}
    for name in ("linear", "cosine"):
        rows[f"{name}, DDPM eq. 4"] = [schedules[name].q_sample(x0, t, eps) for t in SHOW_AT]
    ab = schedules["linear"].alpha_bar
    rows["linear, course code"] = [np.sqrt(ab[t]) * x0 + (1 - ab[t]) * eps for t in SHOW_AT]  # no sqrt

    fig, axes = plt.subplots(len(rows), len(SHOW_AT), figsize=(1.3 * len(SHOW_AT), 1.5 * len(rows)))
    for r, (name, xts) in enumerate(rows.items()):
        for c, (t, xt) in enumerate(zip(SHOW_AT, xts)):
            ax = axes[r, c]
            ax.imshow(backend.to_device(xt, "cpu")[0, 0], cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={t}", fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(f"a digit '{labels[DIGIT_INDEX]}' noised by q(x_t | x_0), T={TIMESTEPS}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "noising.png"), dpi=100)
    plt.close(fig)

    # --- log SNR curves ------------------------------------------------------------------------
    fig, ax = plt.subplots(figsize=(6, 4))
    frac = (np.arange(TIMESTEPS) + 1) / TIMESTEPS
    for name, schedule in schedules.items():
        ab = schedule.f64["alpha_bar"]
        ax.plot(frac, np.log(ab / (1 - ab)), label=name)         # log SNR = log(alpha_bar / (1 - alpha_bar))
        print(f"{name:8s} alpha_bar_T = {ab[-1]:.2e}, log SNR from {np.log(ab[0] / (1 - ab[0])):+.1f} "
              f"to {np.log(ab[-1] / (1 - ab[-1])):+.1f}")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("t / T")
    ax.set_ylabel("log SNR = log(alpha_bar / (1 - alpha_bar))")
    ax.set_title("how fast each schedule destroys the signal")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "log_snr.png"), dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}/noising.png and {args.out}/log_snr.png")


if __name__ == "__main__":
    main()
