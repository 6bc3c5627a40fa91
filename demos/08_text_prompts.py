"""Lesson 8 (text prompts): the same noise under prompts that say more and more; then guidance.

    tinydiff train --data digits --text --out runs/text --time-budget 20    # the model first (20 minutes)
    python demos/08_text_prompts.py --checkpoint runs/text                  # a few minutes on a 2-core CPU
    python demos/08_text_prompts.py --checkpoint runs/text --device cuda
    python demos/08_text_prompts.py --tiny                                  # seconds: a throwaway text model

A text run's model (tinydiff/text_unet.py) reads a prompt, not a class: the tokenizer turns it into
word ids, a small Transformer encodes them, and the U-Net attends to the encoded words at 8x8 and
4x4 (cross-attention). Nothing was pretrained: the encoder learned what the words mean from the
captions alone, which were derived from the digits themselves (tinydiff/captions.py: "7",
"seven", "a thick seven", "the digit 7, bold and leaning right", ...).

1. Prompt engineering. The same noise (seed SEED, the same in every column) under PROMPTS:
     "7" and "seven"             one meaning in two spellings: the encoder maps both to the digit
     "a thick seven"             one more attribute: the stroke weight
     "a thin seven slanted right"   two attributes at once
     "a sparkly seven"           an unknown word: encoded as UNK (the tokenizer's warning names it).
                                 No caption has UNK, so its embedding is still the random one it
                                 started with: compare the row with "seven" to see what that does
     ""                          the empty prompt is the null context: the unconditional model
2. Guidance. Classifier-free guidance (demo 06) works on prompts as on labels, because the model
   was trained with 10% of its captions replaced by "":  eps = eps("") + s (eps(prompt) - eps("")).
   For each s in SCALES the FIDELITY_PROMPTS are scored (tinydiff.evaluate.prompt_fidelity): is it
   the digit asked for (the shipped classifier), and is it on the prompted side of the class's
   median ink (weight) or slant? The held-out prompts ("a thick 3", ...) name combinations that no
   training caption ever named: drawing them is the test of whether "thick" means thick.

Sampling: samplers.TEXT_SAMPLING (what `tinydiff sample` does for a text run), DDIM eta = 0 here
so that a column's image depends on its noise and its prompt alone.

Writes (in --out): prompts.png (one row per prompt, the same seeds in each column), guidance.png
(one row per scale, the prompt GUIDED_PROMPT), fidelity.md (the tables, also printed).
"""
import argparse
import os
import warnings

import numpy as np

from _common import load_model            # the run to sample from (demos/_common.py)

from tinydiff import backend, evaluate, pictures
from tinydiff.captions import parse_prompt
from tinydiff.samplers import TEXT_SAMPLING, ddim_sample
from tinydiff.tensor import no_grad

PROMPTS = ["7", "seven", "a thick seven", "a thin seven slanted right", "a sparkly seven", ""]
SCALES = [1.0, 2.0, 3.0, 5.0]
GUIDED_PROMPT = "a thick seven"
FIDELITY_PROMPTS = ["3", "seven", "a thick 7", "a thin 1", "a 4 slanted left", "a 6 leaning right",
                    "a thick 3", "a thin 8", "a 5 slanted left", "a 2 slanted right"]    # the last 4: held out
PER_PROMPT = 8                    # columns of the pictures: seeds
SCORED_PER_PROMPT = 20            # samples per prompt and scale in the fidelity sweep
SEED = 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prompt engineering and guidance on a text run.")
    parser.add_argument("--checkpoint", default=None, help="a text run folder (default runs/text)")
    parser.add_argument("--per-prompt", type=int, default=SCORED_PER_PROMPT, help="scored samples per prompt and scale")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="out/08_text_prompts", help="folder for the tables and pictures")
    parser.add_argument("--tiny", action="store_true", help="2 samples a prompt; without --checkpoint, "
                        "train a throwaway tiny text model first")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    model, schedule, cfg = load_model(args, text=True, default="runs/text")
    if not cfg.get("text"):
        raise SystemExit(f"--checkpoint: {args.checkpoint} is conditioned on class labels, not text; "
                         f"train a text run: tinydiff train --data digits --text --out runs/text")
    columns, scored = (2, 2) if args.tiny else (PER_PROMPT, args.per_prompt)
    steps = min(TEXT_SAMPLING["steps"], schedule.T)

    def draw(prompt, n, guidance):
        """n images in [0, 1] of one prompt from the noise of seed SEED: the same noise for every prompt."""
        shape = (n, cfg["in_channels"], cfg["height"], cfg["height"])
        with no_grad():
            x = ddim_sample(model, schedule, shape, model.context([prompt] * n), steps=steps, eta=0.0,
                            seed=SEED, device=args.device, objective=cfg["objective"], guidance_scale=guidance)
        return pictures.to_unit(backend.to_device(x, "cpu"))            # (n, C, H, W)

    # --- 1. the same seeds under prompts that say more and more ----------------------------------
    rows = []
    for prompt in PROMPTS:
        with warnings.catch_warnings(record=True) as caught:             # the tokenizer's, on unknown words
            warnings.simplefilter("always")
            ids = backend.to_device(model.context([prompt])[0], "cpu").tolist()   # BOS, word ids, PAD
            rows.append(draw(prompt, columns, TEXT_SAMPLING["guidance"]))
        said = f"  ({caught[0].message})" if caught else ""
        print(f"{prompt!r:30} -> token ids {ids}{said}")
    pictures.write_png(os.path.join(args.out, "prompts.png"), pictures.image_grid(np.concatenate(rows), ncol=columns))

    # --- 2. guidance: the picture, and the fidelity per scale --------------------------------------
    guided = [draw(GUIDED_PROMPT, columns, s) for s in SCALES]
    pictures.write_png(os.path.join(args.out, "guidance.png"), pictures.image_grid(np.concatenate(guided), ncol=columns))
    prompts = np.repeat(np.array(FIDELITY_PROMPTS), scored)               # (N,) grouped by prompt
    labels = np.array([parse_prompt(p)[0] for p in prompts], dtype=np.int64)
    scorer = evaluate.load_classifier(device=args.device)
    results = []
    for s in SCALES:
        images = np.concatenate([draw(p, scored, s) for p in FIDELITY_PROMPTS])
        results.append(evaluate.prompt_fidelity(images, labels, prompts, classifier=scorer))
        print(f"guidance {s:g}: class {results[-1]['overall']['accuracy']:.1%}, held out "
              f"{results[-1]['held_out']['accuracy']:.1%}")

    pct = lambda v: "-" if v is None else f"{v:.1%}"
    lines = [f"Model: {cfg['model']} n_feat {cfg['n_feat']}, T = {schedule.T}; DDIM-{steps} (eta 0), "
             f"{scored} samples per prompt, seed {SEED}, device {args.device}.", "",
             "| guidance s | class | weight | slant | held out: class | held out: weight | held out: slant |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for s, r in zip(SCALES, results):
        o, h = r["overall"], r["held_out"]
        lines.append(f"| {s:g} | {pct(o['accuracy'])} | {pct(o['weight'])} | {pct(o['slant'])} | "
                     f"{pct(h['accuracy'])} | {pct(h['weight'])} | {pct(h['slant'])} |")
    default = SCALES.index(TEXT_SAMPLING["guidance"])
    text = "\n".join(lines) + "\n\n```\n" + evaluate.format_fidelity(
        results[default], name=f"guidance {SCALES[default]:g}") + "\n```\n"
    with open(os.path.join(args.out, "fidelity.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print("\n" + text)
    print(f"wrote {args.out}/prompts.png (rows: {PROMPTS}), guidance.png (rows: s = {SCALES}), fidelity.md")
    return rows, guided, results


if __name__ == "__main__":
    main()
