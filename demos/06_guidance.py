"""Guidance (beyond the course): trade diversity for class fidelity, two ways.

    python demos/06_guidance.py --checkpoint runs/digits     # a few minutes on a 2-core CPU
    python demos/06_guidance.py --checkpoint runs/digits --device cuda
    python demos/06_guidance.py --tiny                        # seconds (throwaway model and classifier)

1. Classifier-free guidance (Ho & Salimans, arXiv:2207.12598). The model was trained with 10% of
   its contexts replaced by the null context, so it predicts both eps(x_t, c) and eps(x_t, null).
   Sampling extrapolates from the unconditional prediction toward the conditional one:
       eps = eps_uncond + s (eps_cond - eps_uncond)
   s = 0: unconditional, s = 1: the conditional model (no guidance), s > 1: guided. (The paper
   writes (1 + w) eps_cond - w eps_uncond: s = 1 + w.) One network call on a doubled batch.

2. Classifier guidance (Dhariwal & Nichol, arXiv:2105.05233). A separate small classifier
   p(y | x_t, t), trained on NOISY digits (tinydiff.classifier.train_noisy_classifier), steers
   the UNCONDITIONAL model: its gradient g = grad_{x_t} log p(y | x_t), from tinydiff's own
   autograd, shifts the predicted noise (their eq. 14, the DDIM form):
       eps = eps_uncond - sqrt(1 - alpha_bar_t) s g

Both sweeps use DDIM-50 (eta 0) from the same noise, and are scored by tinydiff.evaluate:
conditional accuracy (does the sample show the digit asked for?) and the Frechet distance to
held-out digits over its real-data floor (are the samples as varied and clean as real digits?).
Stronger guidance usually raises accuracy and, past some scale, costs diversity: watch both.

Writes (in --out): guidance.md (both tables, also printed), guidance_sweep.png (accuracy and
distance against the scale), cfg_grid.png and classifier_grid.png (one sample of each digit per scale).
"""
import argparse
import os
import time

import numpy as np

from _common import load_model            # the run to sample from (demos/_common.py)

from tinydiff import backend, data, evaluate, pictures
from tinydiff.classifier import train_noisy_classifier
from tinydiff.samplers import ddim_sample
from tinydiff.tensor import no_grad

CFG_SCALES = [0.0, 1.0, 2.0, 3.0, 5.0]           # classifier-free guidance scale s
CLASSIFIER_SCALES = [0.0, 3.0, 10.0, 30.0]        # classifier guidance scale s
CLASSIFIER_STEPS = 1500                           # training steps of the noise-aware classifier (~30 s)
DDIM_STEPS = 50
PER_CLASS = 5                                     # samples per digit for each scale
SEED = 0


def table(title, rows):
    lines = [f"**{title}**", "", "| scale s | time (s) | accuracy | Frechet | floor | ratio |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {s:g} | {sec:.1f} | {r['accuracy']:.1%} | {r['frechet']:.2f} | {r['floor']:.2f} | "
              f"{r['ratio']:.2f}x |" for s, sec, r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Classifier-free and classifier guidance sweeps.")
    parser.add_argument("--checkpoint", default=None, help="run folder, or its model.safetensors (default runs/digits)")
    parser.add_argument("--per-class", type=int, default=PER_CLASS, help="samples per digit and scale")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="out/06_guidance", help="folder for the tables and pictures")
    parser.add_argument("--tiny", action="store_true", help="2 samples per digit, a 5-step classifier; "
                        "without --checkpoint, train a throwaway tiny model first")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    model, schedule, cfg = load_model(args)
    per_class = 2 if args.tiny else args.per_class
    steps = min(DDIM_STEPS, schedule.T)
    scorer = evaluate.load_classifier(device=args.device)

    labels = np.repeat(np.arange(cfg["num_classes"]), per_class)            # (N,)
    context = model.context(backend.to_device(labels, args.device))        # the model's conditioning
    shape = (len(labels), cfg["in_channels"], cfg["height"], cfg["height"])

    # --- 1. classifier-free guidance: one model, two predictions -----------------------------------
    cfg_rows, cfg_pictures = [], []
    for s in CFG_SCALES:
        start = time.time()
        with no_grad():
            x = ddim_sample(model, schedule, shape, context, steps=steps, seed=SEED, device=args.device,
                            objective=cfg["objective"], guidance_scale=s)
        images = pictures.to_unit(backend.to_device(x, "cpu"))
        cfg_rows.append((s, time.time() - start, evaluate.evaluate(images, labels, classifier=scorer)))
        cfg_pictures.append(images[::per_class])
        print(f"classifier-free s={s:g}: accuracy {cfg_rows[-1][2]['accuracy']:.1%}, "
              f"{cfg_rows[-1][2]['ratio']:.2f}x floor, {cfg_rows[-1][1]:.1f} s")

    # --- 2. classifier guidance: a noise-aware classifier steers the unconditional model --------------
    train_x, train_y, _ = data.load_digits("train")                         # the diffusion model's data
    start = time.time()
    noisy_classifier = train_noisy_classifier(train_x, train_y, schedule, steps=5 if args.tiny else CLASSIFIER_STEPS,
                                              seed=SEED, device=args.device)
    print(f"noise-aware classifier: {5 if args.tiny else CLASSIFIER_STEPS} steps, {time.time() - start:.0f} s")
    unconditional = model.null_context(len(labels))                         # zeros (ContextUnet) or the null class
    clf_rows, clf_pictures = [], []
    for s in CLASSIFIER_SCALES:
        start = time.time()
        x = ddim_sample(model, schedule, shape, unconditional, steps=steps, seed=SEED, device=args.device,
                        objective=cfg["objective"], classifier=noisy_classifier, classifier_scale=s,
                        classifier_labels=backend.to_device(labels, args.device))   # not in no_grad: needs g
        images = pictures.to_unit(backend.to_device(x, "cpu"))
        clf_rows.append((s, time.time() - start, evaluate.evaluate(images, labels, classifier=scorer)))
        clf_pictures.append(images[::per_class])
        print(f"classifier guidance s={s:g}: accuracy {clf_rows[-1][2]['accuracy']:.1%}, "
              f"{clf_rows[-1][2]['ratio']:.2f}x floor, {clf_rows[-1][1]:.1f} s")

    # --- tables and pictures ------------------------------------------------------------------------
    head = (f"Model: {cfg['model']} n_feat {cfg['n_feat']}, T = {schedule.T}; DDIM-{steps} (eta 0), "
            f"{len(labels)} samples ({per_class} per digit), device {args.device}.\n\n")
    text = head + table("Classifier-free guidance (s = 1: none, s = 0: unconditional)", cfg_rows) + "\n" + \
        table("Classifier guidance of the unconditional model (s = 0: unconditional)", clf_rows)
    with open(os.path.join(args.out, "guidance.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print("\n" + text)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, rows in (("classifier-free", cfg_rows), ("classifier", clf_rows)):
        scales = [s for s, _, _ in rows]
        ax1.plot(scales, [100 * r["accuracy"] for _, _, r in rows], "o-", label=name)
        ax2.plot(scales, [r["ratio"] for _, _, r in rows], "o-", label=name)
    ax1.set(xlabel="guidance scale s", ylabel="conditional accuracy (%)", title="fidelity")
    ax2.set(xlabel="guidance scale s", ylabel="Frechet distance / real floor", title="distance to real digits")
    ax2.axhline(1.0, color="gray", lw=0.5)
    for ax in (ax1, ax2):
        ax.set_xscale("symlog", linthresh=1.0)          # both 0..5 and 0..30 readable on one axis
    ax1.legend(), ax2.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "guidance_sweep.png"), dpi=100)
    plt.close(fig)
    pictures.write_png(os.path.join(args.out, "cfg_grid.png"),
                    pictures.image_grid(np.concatenate(cfg_pictures), ncol=cfg["num_classes"]))
    pictures.write_png(os.path.join(args.out, "classifier_grid.png"),
                    pictures.image_grid(np.concatenate(clf_pictures), ncol=cfg["num_classes"]))
    print(f"wrote {args.out}/guidance.md, guidance_sweep.png, cfg_grid.png (rows: s = {CFG_SCALES}), "
          f"classifier_grid.png (rows: s = {CLASSIFIER_SCALES})")
    return cfg_rows, clf_rows


if __name__ == "__main__":
    main()
