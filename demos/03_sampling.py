"""Lesson 1 again, backwards (sampling): turn pure noise into digits with a trained model, DDPM.

    python demos/03_sampling.py --checkpoint runs/digits      # a few minutes on a 2-core CPU
    python demos/03_sampling.py --checkpoint runs/digits --device cuda
    python demos/03_sampling.py --tiny                         # seconds: trains a throwaway model first

The run folder comes from demos/02_train_digits.py (or `tinydiff train`). DDPM ancestral sampling
(DDPM Alg. 2, tinydiff.samplers.ddpm_sample) starts from x_T ~ N(0, I) and takes all T steps:

    eps = model(x_t, t/T, context)                                    the predicted noise
    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) + sigma_t z    (DDPM eq. 11)

with fresh noise z ~ N(0, I) at every step but the last. The course's ablation leaves that noise
out (sigma_t = 0 everywhere): the model's prediction of x_{t-1} is only a mean, and a chain of
means drifts to blurry, washed-out blobs. Both start from the same x_T here.

Pictures (in --out):
  ddpm_grid.png   PER_CLASS samples of each digit, one row per digit
  denoising.gif   the same samples, from noise to digits, every T/40 steps
  ablation.png    top: DDPM as it should be; bottom: the same x_T without the added noise
"""
import argparse
import os
import time

import numpy as np

from _common import load_model            # the run to sample from (demos/_common.py)

from tinydiff import backend, pictures
from tinydiff.samplers import ddpm_sample
from tinydiff.tensor import no_grad

PER_CLASS = 4               # samples of each digit in the grid and the GIF
GIF_FRAMES = 40             # about this many frames from x_T to x_0
SEED = 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="DDPM sampling, a GIF, and the no-noise ablation.")
    parser.add_argument("--checkpoint", default=None, help="run folder, or its model.safetensors (default runs/digits)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="out/03_sampling", help="folder for the pictures")
    parser.add_argument("--tiny", action="store_true", help="one sample per digit; without --checkpoint, "
                        "train a throwaway tiny model first")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    model, schedule, cfg = load_model(args)
    per_class = 1 if args.tiny else PER_CLASS
    classes = np.arange(cfg["num_classes"])

    labels = np.repeat(classes, per_class)                                  # (N,): 0,0,0,0,1,1,...
    context = model.context(backend.to_device(labels, args.device))        # the model's conditioning
    shape = (len(labels), cfg["in_channels"], cfg["height"], cfg["height"])   # (N, 1, 16, 16)
    x_T = np.random.default_rng(SEED).standard_normal(shape).astype(np.float32)   # shared by both runs
    every = max(1, schedule.T // GIF_FRAMES)

    # --- DDPM, all T steps, recording the trajectory ---------------------------------------------
    start = time.time()
    with no_grad():
        x0, trajectory = ddpm_sample(model, schedule, shape, context, seed=SEED, device=args.device,
                                     x_T=backend.to_device(x_T, args.device), objective=cfg["objective"],
                                     return_trajectory_every=every)
    print(f"DDPM: {len(labels)} samples, {schedule.T} steps, {time.time() - start:.1f} s")
    grid = pictures.to_unit(backend.to_device(x0, "cpu"))                    # (N, 1, 16, 16) in [0, 1]
    pictures.write_png(os.path.join(args.out, "ddpm_grid.png"), pictures.image_grid(grid, ncol=per_class))
    frames = [pictures.image_grid(pictures.to_unit(backend.to_device(xt, "cpu")), ncol=per_class) for xt in trajectory]
    pictures.write_gif(os.path.join(args.out, "denoising.gif"), frames)

    # --- the ablation: the same x_T, no noise added at any step ------------------------------------
    first = np.arange(0, len(labels), per_class)                         # one sample of each digit
    start = time.time()
    with no_grad():
        x0_no_noise = ddpm_sample(model, schedule, (len(first),) + shape[1:], context[first], seed=SEED,
                                  device=args.device, x_T=backend.to_device(x_T[first], args.device),
                                  objective=cfg["objective"], noise_free=True)
    print(f"DDPM without the added noise: {len(first)} samples, {time.time() - start:.1f} s")
    both = np.concatenate([grid[first], pictures.to_unit(backend.to_device(x0_no_noise, "cpu"))])
    pictures.write_png(os.path.join(args.out, "ablation.png"), pictures.image_grid(both, ncol=len(first)))
    print(f"wrote {args.out}/ddpm_grid.png, {args.out}/denoising.gif ({len(frames)} frames), "
          f"{args.out}/ablation.png (top: with noise, bottom: without)")


if __name__ == "__main__":
    main()
