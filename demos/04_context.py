"""Lesson 3 (controlling): a context vector tells the model which digit to make.

    python demos/04_context.py --checkpoint runs/digits       # about a minute on a 2-core CPU
    python demos/04_context.py --checkpoint runs/digits --sampler ddpm   # the course's sampler (slower)
    python demos/04_context.py --tiny                          # seconds: trains a throwaway model first

The course's ContextUnet takes a context vector c (here one-hot over the 10 digits) and injects it
in the decoder as `cemb * features + temb` (tinydiff/context_unet.py). Training replaced 10% of
the contexts by zeros (the null context), so the same network also samples without a context.
Because c is just a vector, nothing stops us from giving it a MIX the model never saw, such as
0.5 * one_hot(a) + 0.5 * one_hot(b), as the course does with its sprites (hero + food ...).

Sampling is DDIM-50 with eta = 0 (lesson 4's fast sampler; --sampler ddpm for the course's DDPM).
With eta = 0 the sample is a deterministic function of x_T and c, so every tile of the mixing
picture starts from the SAME noise x_T (drawn with seed SEED + 1) and only the context changes.

Pictures (in --out):
  context_grid.png   one row per digit (PER_CLASS samples each), and a last row with the null
                     context: the unconditional model
  mixed_context.png  one row per pair (a, b): c = (1 - w) one_hot(a) + w one_hot(b) for the
                     weights w in MIX_WEIGHTS, left (pure a) to right (pure b)
"""
import argparse
import os
import time

import numpy as np

from _common import load_model            # the run to sample from (demos/_common.py)

from tinydiff import backend, pictures
from tinydiff.samplers import ddim_sample, ddpm_sample
from tinydiff.tensor import no_grad

PER_CLASS = 8                                   # samples per digit in the grid
DDIM_STEPS = 50
PAIRS = [(1, 7), (3, 8), (4, 9), (0, 6), (2, 5)]    # digits to mix, one row each
MIX_WEIGHTS = [0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 1.0]
SEED = 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Class-conditional samples and mixed contexts.")
    parser.add_argument("--checkpoint", default=None, help="run folder, or its model.safetensors (default runs/digits)")
    parser.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="out/04_context", help="folder for the pictures")
    parser.add_argument("--tiny", action="store_true", help="fewer samples; without --checkpoint, "
                        "train a throwaway tiny model first")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    model, schedule, cfg = load_model(args)
    k, per_class = cfg["num_classes"], (2 if args.tiny else PER_CLASS)
    steps = min(DDIM_STEPS, schedule.T)

    def sample(context, seed, x_T=None):
        """Images in [0, 1] for a batch of contexts (model.context's), from x_T (B, C, H, W) if
        given, else from noise drawn with `seed`."""
        shape = (len(context), cfg["in_channels"], cfg["height"], cfg["height"])
        x_T = None if x_T is None else backend.to_device(x_T, args.device)
        with no_grad():
            if args.sampler == "ddpm":
                x = ddpm_sample(model, schedule, shape, context, seed=seed, device=args.device, x_T=x_T,
                                objective=cfg["objective"])
            else:
                x = ddim_sample(model, schedule, shape, context, steps=steps, eta=0.0, seed=seed,
                                device=args.device, x_T=x_T, objective=cfg["objective"])
        return pictures.to_unit(backend.to_device(x, "cpu"))       # (B, C, H, W) in [0, 1]

    # --- one row per digit, and a row with the null context ------------------------------------
    start = time.time()
    labels = np.repeat(np.arange(k), per_class)                          # (N,)
    contexts = model.context(backend.to_device(labels, args.device))     # (N, K) one-hot (ContextUnet)
    nulls = model.null_context(per_class)                                # zeros, or the UNet's null class
    grid = sample(backend.get_array_module(contexts).concatenate([contexts, nulls]), SEED)
    pictures.write_png(os.path.join(args.out, "context_grid.png"), pictures.image_grid(grid, ncol=per_class))
    print(f"context grid: {len(grid)} samples ({args.sampler}), {time.time() - start:.1f} s")

    # --- mixed contexts: (1 - w) one_hot(a) + w one_hot(b), the same x_T along a row --------------
    if cfg["model"] != "contextunet":
        print(f"mixed contexts need context VECTORS (the ContextUnet); model {cfg['model']!r} takes "
              f"class indices, so mixed_context.png is not drawn")
        return
    pairs = PAIRS[:2] if args.tiny else PAIRS
    one_hot = model.context(backend.to_device(np.arange(k), args.device))   # (K, K): row a is digit a's context
    mixed = backend.get_array_module(one_hot).stack(
        [(1 - w) * one_hot[a] + w * one_hot[b] for a, b in pairs for w in MIX_WEIGHTS])      # (P*W, K)
    start = time.time()
    x_T = np.random.default_rng(SEED + 1).standard_normal((1, cfg["in_channels"], cfg["height"], cfg["height"]))
    x_T = np.repeat(x_T.astype(np.float32), len(MIX_WEIGHTS), axis=0)       # ONE noise for every tile
    rows = [sample(mixed[i * len(MIX_WEIGHTS):(i + 1) * len(MIX_WEIGHTS)], SEED + 1, x_T)
            for i in range(len(pairs))]
    pictures.write_png(os.path.join(args.out, "mixed_context.png"),
                       pictures.image_grid(np.concatenate(rows), ncol=len(MIX_WEIGHTS)))
    print(f"mixed contexts: pairs {pairs}, weights {MIX_WEIGHTS}, {time.time() - start:.1f} s")
    print(f"wrote {args.out}/context_grid.png (last row: null context), {args.out}/mixed_context.png")


if __name__ == "__main__":
    main()
