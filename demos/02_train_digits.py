"""Lesson 2 (training): teach a U-Net to predict the noise that was added to a digit.

    python demos/02_train_digits.py                    # 10 minutes of training, then scoring -> runs/digits
    python demos/02_train_digits.py --minutes 3        # a shorter run (its length planned to fit)
    python demos/02_train_digits.py --resume           # go on from that checkpoint
    python demos/02_train_digits.py --device cuda      # on a GPU
    python demos/02_train_digits.py --tiny             # a few seconds: a smoke test

This is the README's quick start: the same run as `tinydiff train` with its defaults (CONFIG
below is config.DEFAULTS, spelled out; a test keeps the two equal). The loop itself lives in
tinydiff/train.py; each step is DDPM Alg. 1 with the course's context masking:

    idx = batches.next()                                   # a seeded, resumable batch of digits
    x0, context = images[idx], model.context(labels[idx])  # (B, 1, 16, 16) in [-1, 1], (B, 10) one-hot
    loss = training_loss(model, schedule, x0, context, "eps", context_drop=0.1)
        #   t ~ U{0..T-1}, eps ~ N(0, I)
        #   x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps           (DDPM eq. 4)
        #   10% of the contexts -> the null context (for classifier-free guidance)
        #   loss = mean |eps - model(x_t, t/T, context)|^2                   (DDPM eq. 14)
    opt.zero_grad(); loss.backward()                       # tinydiff's own autograd
    clip_grad_norm_(model.parameters(), 1.0); opt.step()   # Adam, lr warming up, then a cosine down to 0
    ema.update()                                           # an average of the weights, to sample with

The run folder gets config.json, a checkpoint (resume with `tinydiff train --out runs/digits
--resume`), model.safetensors (the EMA weights), loss.png and samples.png (DDIM-50, a row per
digit). The run's length is planned to fit --minutes from the speed of its first steps, and the learning
rate anneals to that length (a faster machine trains more steps). This demo then samples
EVAL_PER_CLASS digits per class as `tinydiff sample` does by default and scores them with
tinydiff.evaluate (conditional accuracy, Frechet distance against held-out digits, its floor).
Demos 03-06 take the run folder: --checkpoint runs/digits.
"""
import argparse
import os
import time

import numpy as np

from tinydiff import backend, evaluate, pictures, runs, train
from tinydiff.config import ConfigError
from tinydiff.philox import Philox
from tinydiff.samplers import DEFAULT_SAMPLING, nfe, sample
from tinydiff.tensor import no_grad

CONFIG = dict(
    data="digits",          # scikit-learn's 8x8 digits, bilinearly upsampled to 16x16; 1497 train, 300 held out
    model="contextunet",    # the course's ContextUnet: time and one-hot context injected in the decoder
    n_feat=32,              # width of the first level (the course uses 64; 32 learns more per CPU minute)
    batch_size=64,
    epochs=None,            # None: config.DEFAULT_EPOCHS passes over the data
    lr=2e-3,                # Adam's peak learning rate (the course: 1e-3, decayed linearly) ...
    lr_schedule="cosine",   # ... reached after a linear warm-up, then a half cosine down to 0
    warmup=100,             # warm-up steps; they also cover the steps the time budget is planned from
    grad_clip=1.0,          # clip the global gradient norm
    timesteps=500,          # T = 500, beta from 1e-4 to 0.02: the course's schedule
    schedule="linear",
    objective="eps",        # the network predicts the noise eps (the course's choice)
    context_drop=0.1,       # 10% of contexts dropped, so the same model is also unconditional
    ema=0.999,              # sample with an exponential moving average of the weights
    seed=0,
)
MINUTES = 10                # time budget: the run's length is planned to fit it (train.PLAN_FROM)
EVAL_PER_CLASS = 50         # samples per digit for the score printed at the end, drawn as `tinydiff sample`
                            # draws by default (samplers.DEFAULT_SAMPLING: DPM-Solver++(2M) SDE, 20 steps), 100 at a time
TINY = dict(steps=6, n_feat=8, batch_size=8, timesteps=20, sample_steps=4, sample_per_class=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the default conditional model on the digits.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="runs/digits", help="the run folder")
    parser.add_argument("--minutes", type=float, default=MINUTES, help="training time budget")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--tiny", action="store_true", help="a tiny model for a few steps (seconds)")
    parser.add_argument("--seed", type=int, default=CONFIG["seed"], help="the training seed (default 0)")
    args = parser.parse_args(argv)

    config = dict(CONFIG, out=args.out, device=args.device, time_budget=args.minutes, seed=args.seed)
    if args.tiny:
        config.update(TINY, time_budget=None)
    start = time.time()
    try:
        run = train.train(config, resume=args.resume, progress=not args.tiny)   # the loop, see the docstring
    except ConfigError as err:       # e.g. --out already holds a run: resume it or pick another
        raise SystemExit(f"demos/02_train_digits.py: {err}") from None
    minutes = (time.time() - start) / 60

    # --- sample with the EMA weights and score the digits ------------------------------------
    model, schedule, cfg = runs.load_run(run, args.device)         # config.json, EMA weights, eval mode
    per_class = 2 if args.tiny else EVAL_PER_CLASS
    labels = np.repeat(np.arange(cfg["num_classes"]), per_class)   # (N,)
    how = dict(DEFAULT_SAMPLING, steps=min(DEFAULT_SAMPLING["steps"], cfg["timesteps"]))
    name = f"{how['sampler'].upper()}-{how['steps']} ({nfe(how['sampler'], how['steps'])} NFE)"
    rng = Philox(0)                                                # `tinydiff sample`'s --seed 0
    t0 = time.time()
    images = []
    for chunk in np.split(labels, range(100, len(labels), 100)):   # `tinydiff sample`'s --batch-size 100
        context = model.context(backend.to_device(chunk, args.device))   # the model's conditioning
        with no_grad():
            x = sample(how["sampler"], model, schedule, (len(chunk), 1, cfg["height"], cfg["height"]), context,
                       steps=how["steps"], generator=rng, objective=cfg["objective"])   # (B, 1, 16, 16) in [-1, 1]
        images.append(pictures.to_unit(backend.to_device(x, "cpu")))   # [0, 1], as `tinydiff sample`
    images = np.concatenate(images)
    sample_s = time.time() - t0
    result = evaluate.evaluate(images, labels, device=args.device, name=name)
    print(evaluate.format_report(result, name=f"{run}: {name}"))
    pictures.write_png(os.path.join(run, "eval_samples.png"), pictures.image_grid(images, ncol=per_class))
    print(f"train() took {minutes:.1f} min (with its checkpoint and preview samples); sampled "
          f"{len(images)} digits in {sample_s:.0f} s; pictures: "
          f"{run}/loss.png, {run}/samples.png, {run}/eval_samples.png")
    return result


if __name__ == "__main__":
    main()
