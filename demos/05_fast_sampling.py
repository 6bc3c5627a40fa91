"""Lesson 4 (fast sampling): DDIM against DDPM at 10, 20, 50, 100 and T steps, timed and scored;
then quality per network evaluation (NFE) of DDIM and three ODE solvers, without and with guidance.

    python demos/05_fast_sampling.py --checkpoint runs/digits                # ~5-10 minutes, 2-core CPU
    python demos/05_fast_sampling.py --checkpoint runs/digits --per-class 20 # a steadier score, slower
    python demos/05_fast_sampling.py --checkpoint runs/digits --device cuda
    python demos/05_fast_sampling.py --checkpoint runs/digits --device cuda --per-class 100 --nfe-only --guidance 2
    python demos/05_fast_sampling.py --tiny                                   # seconds (throwaway model)

DDPM (Alg. 2) needs all T network calls: each step removes a little noise and adds some back.
DDIM (arXiv:2010.02502, eq. 12) rewrites the same trained model's update so that it can jump
between any two timesteps of a short subsequence t_1 > t_2 > ... (tinydiff.samplers.ddim_timesteps):

    x0_hat  = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)                 "predicted x0"
    x_prev  = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z
    sigma   = eta sqrt((1 - alpha_bar_prev)/(1 - alpha_bar_t)) sqrt(1 - alpha_bar_t/alpha_bar_prev)   (eq. 16)

(DDIM's alpha is DDPM's alpha_bar.) eta = 0 is deterministic DDIM; eta = 1 is DDPM's own
stochastic update on the subsequence, so the "DDPM" rows below with fewer than T steps are
DDIM with eta = 1, and the row at T steps is DDPM Alg. 2 itself (tinydiff.samplers.ddpm_sample).
Every run starts from the same noise. Quality is tinydiff.evaluate: conditional accuracy, and the
Frechet distance to held-out digits beside its real-data floor (ratio 1.0 = as close as real
digits). With few samples (PER_CLASS per digit) the distance is noisy: use --per-class 20+ to
compare close rows.

Sampling as solving an ODE. DDIM with eta = 0 is Euler's method on the probability-flow ODE in
the noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (tinydiff.samplers.ddim_sample).
Better solvers reach the same image in fewer network evaluations: Heun's second-order method and
Euler's on Karras noise levels (arXiv:2206.00364, Alg. 1, eq. 5), and DPM-Solver++ 2M
(arXiv:2211.01095, Alg. 2), with its twin for the reverse SDE, which draws fresh noise each step
(the default sampler). The second table puts every sampler at a budget of NFE_BUDGETS
network evaluations per image (each sampler takes the most steps that fit: Heun costs 2 steps - 1,
classifier-free guidance doubles every count), with guidance off and at --guidance.

Writes (in --out): fast_sampling.md (the first table, also printed), fast_sampling.png (one sample
of each digit for every row of that table), quality_per_nfe.md (the second table) and
quality_per_nfe.png (accuracy and Frechet/floor against NFE, one line per sampler and guidance).
"""
import argparse
import os
import platform
import time

import numpy as np

from _common import load_model            # the run to sample from (demos/_common.py)

from tinydiff import backend, evaluate, pictures
from tinydiff.samplers import (ddim_sample, ddpm_sample, dpm_solver_sample, dpm_solver_sde_sample, euler_sample,
                               heun_sample, nfe)
from tinydiff.tensor import no_grad

STEPS = [10, 20, 50, 100]        # and T, the schedule's full length
PER_CLASS = 5                    # samples per digit for each row of the table
SEED = 0
NFE_BUDGETS = [5, 10, 20, 50]    # network evaluations per image, for the second table
GUIDANCE = 2.0                   # the classifier-free guidance scale of the guided rows
NFE_SAMPLERS = ["ddim", "ddim eta=1", "dpm++2m", "dpm++2m-sde", "heun", "euler"]


def write_table(path, lines):
    """The markdown table (its lines), written to path and printed."""
    table = "\n".join(lines) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(table)
    print("\n" + table)


def steps_within(sampler, budget, guided, T):
    """The most steps (1..T) whose NFE fits the budget (at least 1 step)."""
    name = sampler.split()[0]
    fits = [n for n in range(1, T + 1) if nfe(name, n, guided) <= budget]
    return fits[-1] if fits else 1


def sample_with(sampler, model, schedule, shape, context, steps, guidance, args, objective):
    """One sampler of the second table, from seed SEED."""
    kw = dict(seed=SEED, device=args.device, objective=objective, guidance_scale=guidance)
    with no_grad():
        if sampler.startswith("ddim"):
            return ddim_sample(model, schedule, shape, context, steps=steps, eta=1.0 if "eta=1" in sampler else 0.0, **kw)
        sample = {"dpm++2m": dpm_solver_sample, "dpm++2m-sde": dpm_solver_sde_sample, "heun": heun_sample,
                  "euler": euler_sample}[sampler]
        return sample(model, schedule, shape, context, steps=steps, **kw)


def quality_per_nfe(model, schedule, cfg, labels, context, shape, classifier, args):
    """Every sampler at every NFE budget, guidance off and at args.guidance: the table and the plot."""
    budgets = [2, 4] if args.tiny else args.nfe
    rows = []
    for guidance in (1.0, args.guidance):
        for sampler in NFE_SAMPLERS:
            for budget in budgets:
                steps = steps_within(sampler, budget, guidance != 1, schedule.T)
                start = time.time()
                x = sample_with(sampler, model, schedule, shape, context, steps, guidance, args, cfg["objective"])
                seconds = time.time() - start
                score = evaluate.evaluate(pictures.to_unit(backend.to_device(x, "cpu")), labels, classifier=classifier)
                cost = nfe(sampler.split()[0], steps, guidance != 1)
                rows.append((sampler, guidance, steps, cost, seconds, score))
                print(f"{sampler:11s} guidance {guidance:g}  {steps:3d} steps  {cost:3d} NFE  {seconds:7.1f} s  "
                      f"accuracy {score['accuracy']:.1%}  Frechet {score['frechet']:.2f} ({score['ratio']:.2f}x floor)")
    lines = [f"{len(labels)} samples ({len(labels) // cfg['num_classes']} per digit), seed {SEED}, NFE budgets "
             f"{budgets} per image (guidance doubles the count); guidance scale {args.guidance:g}.",
             "",
             "| sampler | guidance | steps | NFE | time (s) | accuracy | Frechet | floor | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for sampler, guidance, steps, cost, seconds, sc in rows:
        lines.append(f"| {sampler} | {guidance:g} | {steps} | {cost} | {seconds:.1f} | {sc['accuracy']:.1%} | "
                     f"{sc['frechet']:.2f} | {sc['floor']:.2f} | {sc['ratio']:.2f}x |")
    write_table(os.path.join(args.out, "quality_per_nfe.md"), lines)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for k, sampler in enumerate(NFE_SAMPLERS):
        for guidance, style in ((1.0, "-"), (args.guidance, "--")):
            mine = [r for r in rows if r[0] == sampler and r[1] == guidance]
            label = f"{sampler}, guidance {guidance:g}"
            left.plot([r[3] for r in mine], [100 * r[5]["accuracy"] for r in mine], style, marker="o", color=f"C{k}", label=label)
            right.plot([r[3] for r in mine], [r[5]["ratio"] for r in mine], style, marker="o", color=f"C{k}", label=label)
    for ax, name in ((left, "conditional accuracy (%)"), (right, "Frechet / real-data floor")):
        ax.set_xscale("log"), ax.set_xlabel("network evaluations per image (NFE)"), ax.set_ylabel(name)
        ax.set_xticks(budgets, [str(b) for b in budgets]), ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "quality_per_nfe.png"), dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}/quality_per_nfe.md and {args.out}/quality_per_nfe.png")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="DDPM vs DDIM: time and quality against steps.")
    parser.add_argument("--checkpoint", default=None, help="run folder, or its model.safetensors (default runs/digits)")
    parser.add_argument("--per-class", type=int, default=PER_CLASS, help="samples per digit and row")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="out/05_fast_sampling", help="folder for the table and picture")
    parser.add_argument("--tiny", action="store_true", help="2 samples per digit, steps 2, 5 and T, NFE 2 and 4; "
                        "without --checkpoint, train a throwaway tiny model first")
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help="guidance scale of the second table's guided rows")
    parser.add_argument("--nfe", type=int, nargs="+", default=NFE_BUDGETS, help="the second table's NFE budgets")
    parser.add_argument("--nfe-only", action="store_true", help="only the second table (quality per NFE)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    model, schedule, cfg = load_model(args)
    per_class = 2 if args.tiny else args.per_class
    step_list = sorted({s for s in ([2, 5] if args.tiny else STEPS) if s < schedule.T} | {schedule.T})

    labels = np.repeat(np.arange(cfg["num_classes"]), per_class)            # (N,)
    context = model.context(backend.to_device(labels, args.device))        # the model's conditioning
    shape = (len(labels), cfg["in_channels"], cfg["height"], cfg["height"])
    classifier = evaluate.load_classifier(device=args.device)
    if args.nfe_only:
        return quality_per_nfe(model, schedule, cfg, labels, context, shape, classifier, args)
    rows, row_images = [], []
    for steps in step_list:
        for sampler in ("DDIM", "DDPM"):
            start = time.time()
            with no_grad():
                if sampler == "DDIM":                                         # eta = 0: deterministic
                    x = ddim_sample(model, schedule, shape, context, steps=steps, eta=0.0, seed=SEED,
                                    device=args.device, objective=cfg["objective"])
                elif steps == schedule.T:                                     # DDPM Alg. 2 itself
                    x = ddpm_sample(model, schedule, shape, context, seed=SEED, device=args.device,
                                    objective=cfg["objective"])
                else:                                                         # DDPM's update, strided
                    x = ddim_sample(model, schedule, shape, context, steps=steps, eta=1.0, seed=SEED,
                                    device=args.device, objective=cfg["objective"])
            seconds = time.time() - start
            images = pictures.to_unit(backend.to_device(x, "cpu"))             # (N, 1, 16, 16) in [0, 1]
            score = evaluate.evaluate(images, labels, classifier=classifier)
            name = f"{sampler}{'' if sampler == 'DDIM' else ' (Alg. 2)' if steps == schedule.T else ' (eta=1)'}"
            rows.append((name, steps, seconds, score))
            row_images.append(images[::per_class])                            # one of each digit
            print(f"{name:16s} {steps:4d} steps  {seconds:7.1f} s  accuracy {score['accuracy']:.1%}  "
                  f"Frechet {score['frechet']:.2f} (floor {score['floor']:.2f}, {score['ratio']:.2f}x)")

    # --- the table ------------------------------------------------------------------------------
    device = args.device if args.device == "cpu" else f"cuda ({backend.cupy_module().cuda.runtime.getDeviceProperties(0)['name'].decode()})"
    lines = [f"Model: {cfg['model']} n_feat {cfg['n_feat']}, T = {schedule.T} ({cfg['schedule']} schedule); "
             f"{len(labels)} samples ({per_class} per digit), no guidance; machine: {platform.machine()}, "
             f"{os.cpu_count()} CPU cores, device {device}.",
             "",
             "| sampler | steps | time (s) | ms / image | accuracy | Frechet | floor | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, steps, seconds, s in rows:
        lines.append(f"| {name} | {steps} | {seconds:.1f} | {1000 * seconds / len(labels):.0f} | "
                     f"{s['accuracy']:.1%} | {s['frechet']:.2f} | {s['floor']:.2f} | {s['ratio']:.2f}x |")
    write_table(os.path.join(args.out, "fast_sampling.md"), lines)

    # --- the picture: one sample of each digit per row of the table ----------------------------------
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 0.9 * len(rows) + 0.4), squeeze=False)
    for ax, (name, steps, seconds, s), images in zip(axes[:, 0], rows, row_images):
        ax.imshow(pictures.image_grid(images, ncol=len(images), scale=1))
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(f"{name}\n{steps} steps", rotation=0, ha="right", va="center", fontsize=8)
        ax.set_title(f"{seconds:.1f} s, accuracy {s['accuracy']:.0%}, {s['ratio']:.2f}x floor", fontsize=7, loc="right")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fast_sampling.png"), dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}/fast_sampling.md and {args.out}/fast_sampling.png")
    return rows, quality_per_nfe(model, schedule, cfg, labels, context, shape, classifier, args)


if __name__ == "__main__":
    main()
