"""The `tinydiff` command (also `python -m tinydiff`): train, sample, eval.

    tinydiff train [--data digits] [--out runs/digits] [--steps N | --epochs N] [...]
    tinydiff sample --checkpoint runs/digits --sampler ddim --steps 50 --labels 0,1,2 --n 10 --gif
    tinydiff sample --checkpoint runs/digits --sampler dpm++2m --steps 10     # or heun, euler (ODE solvers)
    tinydiff eval --samples runs/digits/samples/samples.npz
    tinydiff train --data digits --text --out runs/text       # prompts: captions of the digits
    tinydiff sample --checkpoint runs/text --prompt "a thick 7" --prompt "seven" --n 50
    tinydiff export --checkpoint runs/unet --format diffusers --out runs/unet/diffusers
    tinydiff <command> --help                 every flag, with its default

`train` is tinydiff/train.py (its docstring describes the run folder; its settings and their
checks are tinydiff/config.py); `sample` is below: it loads the run (tinydiff/runs.py: the model
rebuilt from the run's config, with the EMA weights when the run has them), and
writes OUT/samples.png (one row per label), OUT/samples.npz (images float32 (N, C, H, W) in
[0, 1], labels int64 (N,)) and with --gif OUT/denoising.gif (noise turning into images).
A text run (`train --text`) is asked with --prompt instead of --labels: samples.npz then also
holds `prompts` (fixed-width unicode, (N,)), and labels is the digit each prompt names (-1: none);
with no --sampler, --steps or --guidance it samples with samplers.TEXT_SAMPLING.
"""
import argparse
import io
import os
import sys

import numpy as np

from tinydiff import backend, captions, config, data, pictures, runs
from tinydiff import train as training
from tinydiff.checkpoint import CheckpointError, write_atomic
from tinydiff.philox import Philox
from tinydiff.samplers import DDIM_SAMPLING, DEFAULT_SAMPLING, SAMPLERS, TEXT_SAMPLING

# ---------------------------------------------------------------------------------------------
# Argument types: each refuses a bad value with a message that argparse prints


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def label_list(text):
    """'0,1,2' -> [0, 1, 2]."""
    try:
        labels = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected class numbers separated by commas, like 0,1,2; "
                                         f"got {text!r}") from None
    if min(labels) < 0:
        raise argparse.ArgumentTypeError(f"class numbers must be >= 0, got {text!r}")
    return labels


# ---------------------------------------------------------------------------------------------
# Parsers


def build_parser():
    parser = argparse.ArgumentParser(prog="tinydiff", description="A from-scratch diffusion engine: "
                                     "train a conditional diffusion model, sample from it, evaluate samples.")
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,eval,export,info}")
    sub.required = True

    # --- train: only the flags given reach train.train(); the rest come from config.DEFAULTS
    # (or, with --resume, from the run's config.json)
    d, choices = config.DEFAULTS, config.CHOICES
    t = sub.add_parser("train", help="train a diffusion model (see tinydiff/train.py)",
                       description="Train a conditional diffusion model. Only the flags you give are "
                       "changed; with --resume the run's saved settings are the defaults.",
                       argument_default=argparse.SUPPRESS)
    t.add_argument("--data", help=f"'digits' (embedded), a sprites .npy or its folder, a folder of MNIST "
                   f"IDX files, or a folder of class sub-folders (default {d['data']})")
    t.add_argument("--image-size", type=positive_int, help="resize images to this size (28 -> 16, or an "
                   "integer upscale; default: the data set's own size, 16 for digits)")
    t.add_argument("--out", help=f"run folder (default {d['out']})")
    t.add_argument("--model", choices=choices["model"], help=f"default {d['model']}; text_unet with --text")
    t.add_argument("--text", action="store_true", help="condition on prompts: captions derived from the "
                   "digits (tinydiff/captions.py), a TextUNet; digits only")
    t.add_argument("--n-feat", type=positive_int, help=f"model width (default {d['n_feat']})")
    t.add_argument("--steps", type=positive_int, help="optimizer steps in all (default: from --epochs)")
    t.add_argument("--epochs", type=positive_int, help=f"passes over the data (default {config.DEFAULT_EPOCHS})")
    t.add_argument("--batch-size", type=positive_int, help=f"default {d['batch_size']}")
    t.add_argument("--optimizer", choices=choices["optimizer"], help=f"default {d['optimizer']}")
    t.add_argument("--lr", type=float, help=f"peak learning rate (default {d['lr']})")
    t.add_argument("--lr-schedule", choices=choices["lr_schedule"],
                   help=f"linear: decay to 0 (the course's); cosine: with --warmup (default {d['lr_schedule']})")
    t.add_argument("--warmup", type=int, help=f"warm-up steps of the cosine schedule (default {d['warmup']})")
    t.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d['weight_decay']})")
    t.add_argument("--grad-clip", type=non_negative_float, help=f"max gradient norm, 0: off (default {d['grad_clip']})")
    t.add_argument("--timesteps", type=positive_int, help=f"diffusion steps T (default {d['timesteps']})")
    t.add_argument("--schedule", choices=choices["schedule"], help=f"noise schedule (default {d['schedule']})")
    t.add_argument("--objective", choices=choices["objective"],
                   help=f"what the model predicts (default {d['objective']})")
    t.add_argument("--context-drop", type=non_negative_float,
                   help=f"fraction of null contexts, for guidance (default {d['context_drop']})")
    t.add_argument("--ema", type=non_negative_float, help=f"EMA decay, 0: off (default {d['ema']})")
    t.add_argument("--seed", type=int, help=f"default {d['seed']}")
    t.add_argument("--device", choices=choices["device"], help=f"default {d['device']}")
    t.add_argument("--kernels", choices=choices["kernels"], help=f"default {d['kernels']}")
    t.add_argument("--checkpoint-every", type=positive_int, help=f"steps (default {d['checkpoint_every']})")
    t.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="without --steps/--epochs: plan the run's length to fit this many minutes (the "
                   "learning rate anneals to it); always: stop (with a checkpoint) once spent; --resume goes on")
    t.add_argument("--sample-steps", type=positive_int, help=f"DDIM steps for samples.png (default {d['sample_steps']})")
    t.add_argument("--sample-per-class", type=positive_int, help=f"samples.png columns (default {d['sample_per_class']})")
    t.add_argument("--resume", action="store_true", default=False, help="continue the run in --out")
    t.add_argument("--quiet", action="store_true", default=False, help="no progress bar")

    s = sub.add_parser("sample", help="generate images from a trained run",
                       description="Generate images with a trained model (its EMA weights when present).")
    s.add_argument("--checkpoint", required=True, help="a run folder written by `tinydiff train`, "
                   "or a .safetensors weights file (such as RUN/model.safetensors)")
    d = DEFAULT_SAMPLING
    s.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddpm (all T steps), ddim, dpm++2m (DPM-Solver++ 2M, on DDIM's timesteps), dpm++2m-sde "
                   "(its stochastic twin), or an ODE solver on Karras noise levels: heun, euler "
                   f"(default {d['sampler']}; a text run: {TEXT_SAMPLING['sampler']})")
    s.add_argument("--steps", type=positive_int, default=None,
                   help=f"steps, 1..T (default {d['steps']}; ddim {DDIM_SAMPLING['steps']}, a text run "
                   f"{TEXT_SAMPLING['steps']}; ddpm takes exactly T, the only value it accepts)")
    s.add_argument("--eta", type=non_negative_float, default=None,
                   help=f"ddim only: noise, 0 deterministic, 1 DDPM-like (default {DDIM_SAMPLING['eta']:g})")
    s.add_argument("--spacing", choices=("trailing", "leading", "linspace"), default=None,
                   help=f"ddim only: timestep spacing (default {DDIM_SAMPLING['spacing']})")
    s.add_argument("--guidance", type=non_negative_float, default=None,
                   help=f"classifier-free guidance scale s: 1 none, >1 stronger (default 1; a text run "
                   f"{TEXT_SAMPLING['guidance']:g})")
    s.add_argument("--labels", type=label_list, default=None, help="classes, e.g. 0,1,2 (default: all)")
    s.add_argument("--prompt", action="append", default=None, help="a text run's prompt, e.g. \"a thick 7\"; "
                   "repeat it for more (default: each digit's numeral, \"0\" .. \"9\")")
    s.add_argument("--n", type=positive_int, default=10, help="samples per label or prompt (default 10)")
    s.add_argument("--seed", type=int, default=0, help="default 0")
    s.add_argument("--out", default=None, help="output folder (default: CHECKPOINT's folder/samples)")
    s.add_argument("--gif", action="store_true", help="also write denoising.gif, the trajectory")
    s.add_argument("--batch-size", type=positive_int, default=100, help="images per chunk; guidance doubles it (default 100)")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    s.add_argument("--kernels", choices=("native", "numpy"), default="native")

    # --- eval: scored by tinydiff/evaluate.py (its own helper owns the metrics) -----------------
    e = sub.add_parser("eval", help="score generated digits (accuracy, Frechet distance)",
                       description="Score samples.npz with the shipped digits classifier.")
    e.add_argument("--samples", required=True, help="a samples.npz written by `tinydiff sample`")
    e.add_argument("--device", choices=("cpu", "cuda"), default="cpu")

    # --- export: written by tinydiff/diffusers_bridge.py
    x = sub.add_parser("export", help="write a --model unet run as a diffusers folder",
                       description="Write a --model unet run (its EMA weights) as UNet2DModel + DDIMScheduler "
                       "files that diffusers opens with from_pretrained (see tinydiff/diffusers_bridge.py).")
    x.add_argument("--checkpoint", required=True, help="a run folder written by `tinydiff train --model unet`")
    x.add_argument("--format", required=True, choices=("diffusers",), help="the only format: diffusers")
    x.add_argument("--out", required=True, help="the folder to write")
    x.add_argument("--spacing", choices=("trailing", "leading", "linspace"), default="trailing",
                   help="the scheduler's DDIM timestep spacing (default trailing, as tinydiff sample)")

    sub.add_parser("info", help="the kernels built, the CPU, NumPy's BLAS, whether CUDA runs here",
                   description="Report this install (see tinydiff/info.py).")
    return parser


def check_device(parser, device, kernels=None):
    """Refuse a device or kernels that this install cannot run, saying why."""
    if device == "cuda":
        ok, why = backend.cuda_available(reason=True)
        if not ok:
            parser.error(f"--device cuda: {why}")
    if kernels == "native" and backend.native is None:
        parser.error(f"--kernels native: {backend.native_error} (use --kernels numpy, or build it: pip install -e .)")


# ---------------------------------------------------------------------------------------------
# tinydiff sample


def check_sampler_flags(parser, args, T):
    """Each flag where it means something: --steps 1..T (ddpm: T only), --eta and --spacing for ddim."""
    if args.sampler == "ddpm" and args.steps not in (None, T):
        parser.error(f"--steps {args.steps}: ddpm takes all T = {T} steps of the model's schedule "
                     f"(use --sampler ddim or an ODE solver for fewer)")
    if args.steps is not None and args.steps > T:
        parser.error(f"--steps {args.steps}: the model was trained with {T} timesteps")
    for flag, value in (("--eta", args.eta), ("--spacing", args.spacing)):
        if value is not None and args.sampler != "ddim":
            parser.error(f"{flag}: only ddim takes it, not --sampler {args.sampler}")


def sample_command(parser, args):
    from tinydiff.samplers import nfe, sample
    from tinydiff.tensor import no_grad

    check_device(parser, args.device, args.kernels)
    backend.set_kernels(args.kernels)
    model, schedule, cfg = runs.load_run(args.checkpoint, args.device)   # EMA weights, eval mode
    text = cfg.get("text", False)
    if text and args.labels is not None:
        parser.error(f"--labels: {args.checkpoint} is a text run, conditioned on prompts: ask with "
                     f"--prompt \"a thick 7\" (repeat --prompt for more)")
    if not text and args.prompt is not None:
        parser.error(f"--prompt: {args.checkpoint} is conditioned on class labels, not text: ask with "
                     f"--labels 0,1,2, or train a text run with `tinydiff train --data digits --text`")
    if text:            # what the user asked for, one entry per group of --n images
        asked = args.prompt if args.prompt is not None else [str(k) for k in range(10)]
        labels = [captions.parse_prompt(p)[0] for p in asked]             # -1: no digit named
        try:
            model.context(asked)                                          # refuse a bad prompt before sampling
        except ValueError as err:
            parser.error(f"--prompt: {err}")
    else:
        asked = labels = args.labels if args.labels is not None else list(range(cfg["num_classes"]))
        if max(labels) >= cfg["num_classes"]:
            parser.error(f"--labels: the model knows classes 0..{cfg['num_classes'] - 1}, got {max(labels)}")
    d = TEXT_SAMPLING if text else dict(DEFAULT_SAMPLING, guidance=1.0)   # what a flag not given takes
    args.sampler = args.sampler or d["sampler"]
    if args.sampler == "ddim" and d["sampler"] != "ddim":
        d = dict(DDIM_SAMPLING, guidance=d["guidance"])                   # --sampler ddim: its own defaults
    guidance = d["guidance"] if args.guidance is None else args.guidance
    check_sampler_flags(parser, args, cfg["timesteps"])
    out = args.out or os.path.join(args.checkpoint if os.path.isdir(args.checkpoint)
                                   else os.path.dirname(os.path.abspath(args.checkpoint)), "samples")

    group = np.repeat(np.arange(len(asked)), args.n)                    # (N,) grouped by label or prompt
    all_labels = np.array(labels, dtype=np.int64)[group]                # (N,)
    all_asked = np.array(asked)[group]                                  # (N,) ints, or fixed-width unicode
    shown = np.concatenate([np.flatnonzero(group == g)[:10] for g in range(len(asked))])  # the GIF's images
    steps = schedule.T if args.sampler == "ddpm" else args.steps or min(d["steps"], schedule.T)
    eta = d.get("eta") if args.eta is None else args.eta         # ddim's (None for the others)
    spacing = args.spacing or d.get("spacing")
    every = max(1, steps // 40) if args.gif else None               # about 40 frames
    rng = Philox(args.seed)                     # one stream over the chunks; the same images on CPU and GPU
    print(f"sampling {len(group)} images ({args.n} per {'prompt' if text else 'label'} {asked}) with "
          f"{args.sampler.upper()}-{steps}{f' eta {eta}' if args.sampler == 'ddim' else ''}, guidance {guidance}, "
          f"{nfe(args.sampler, steps, guidance != 1)} network evaluations (NFE) per image, from {args.checkpoint}")

    images, frames = [], None
    for start in range(0, len(group), args.batch_size):            # chunks of --batch-size images
        chunk = all_asked[start:start + args.batch_size]
        context = model.context(chunk.tolist() if text else backend.to_device(chunk, args.device))  # the model's
        shape = (len(chunk), cfg["in_channels"], cfg["height"], cfg["height"])
        kwargs = dict(generator=rng, objective=cfg["objective"], guidance_scale=guidance,
                      return_trajectory_every=every)
        with no_grad():
            result = sample(args.sampler, model, schedule, shape, context, steps=steps, eta=eta, spacing=spacing,
                            **kwargs)
        x, trajectory = result if args.gif else (result, None)
        images.append(pictures.to_unit(backend.to_device(x, "cpu")))
        if trajectory is not None:                                  # keep only the GIF's images
            local = shown[(shown >= start) & (shown < start + len(chunk))] - start
            picked = [pictures.to_unit(backend.to_device(xt, "cpu"))[local] for xt in trajectory]
            frames = picked if frames is None else [np.concatenate([a, b]) for a, b in zip(frames, picked)]
    images = np.concatenate(images)                                 # (N, C, H, W) in [0, 1]

    os.makedirs(out, exist_ok=True)
    buf = io.BytesIO()
    prompts = {"prompts": all_asked} if text else {}               # fixed-width unicode: no pickle
    np.savez(buf, images=images.astype(np.float32), labels=all_labels, **prompts)
    write_atomic(os.path.join(out, "samples.npz"), buf.getvalue())
    ncol = min(args.n, 10) if args.n > 20 else args.n
    pictures.write_png(os.path.join(out, "samples.png"), pictures.image_grid(
        _pad_groups(images, group, ncol), ncol=ncol))
    written = ["samples.png", "samples.npz"]
    if frames is not None:
        k = min(args.n, 10)
        pictures.write_gif(os.path.join(out, "denoising.gif"),
                           [pictures.image_grid(f, ncol=k) for f in frames])
        written.append("denoising.gif")
    print(f"wrote {', '.join(os.path.join(out, w) for w in written)}")
    return 0


def _pad_groups(images, group, ncol):
    """Each group's images (one label or prompt), padded with white tiles to whole rows of ncol."""
    rows = []
    for g in np.unique(group):
        members = images[group == g]
        blank = np.ones((-len(members) % ncol,) + images.shape[1:], dtype=images.dtype)
        rows += [members, blank]
    return np.concatenate(rows)


# ---------------------------------------------------------------------------------------------
# tinydiff eval: the metrics live in tinydiff/evaluate.py (imported only when asked for)


def eval_command(parser, args):
    try:
        from tinydiff import evaluate
    except ImportError as err:
        print(f"tinydiff eval: evaluation is not available in this install ({err})", file=sys.stderr)
        return 1
    check_device(parser, args.device)
    try:
        images, labels, prompts = evaluate.load_samples(args.samples)
        named = labels >= 0                            # a text run's prompts may name no digit (-1)
        result = (evaluate.evaluate(images[named], labels[named], device=args.device, name=args.samples)
                  if named.sum() >= 2 else None)
        fidelity = (evaluate.prompt_fidelity(images, labels, prompts, device=args.device, name=args.samples)
                    if prompts is not None else None)
    except (ValueError, TypeError) as err:             # samples of the wrong shape, range, labels
        print(f"tinydiff eval: error: {err}", file=sys.stderr)
        return 1
    if result is not None:
        print(evaluate.format_report(result, name=args.samples + (" (the prompts naming a digit)"
                                                                  if prompts is not None else "")))
    if fidelity is not None:
        print(evaluate.format_fidelity(fidelity, name=args.samples))
    return 0


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    command = f"tinydiff {args.command}"
    try:
        if args.command == "train":
            flags = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "quiet")}
            check_device(parser, flags.get("device", "cpu"), flags.get("kernels", "native"))
            training.train(flags, resume=args.resume, progress=not args.quiet)
            return 0
        if args.command == "sample":
            return sample_command(parser, args)
        if args.command == "export":
            from tinydiff.diffusers_bridge import export_diffusers
            try:
                print(f"wrote {export_diffusers(args.checkpoint, args.out, spacing=args.spacing)}")
            except ValueError as err:         # a run that has no diffusers counterpart, with the reason
                print(f"{command}: error: {err}", file=sys.stderr)
                return 1
            return 0
        if args.command == "info":
            from tinydiff.info import format_report, report
            print(format_report(report()))
            return 0
        return eval_command(parser, args)
    except config.ConfigError as err:
        parser.error(str(err))                       # exit code 2, as for any bad argument
    except (data.DataError, CheckpointError, training.TrainingDiverged, OSError) as err:   # OSError: a full disk
        print(f"{command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
