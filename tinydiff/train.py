"""Training a conditional diffusion model: one flat loop, from data to checkpoint to pictures.

    tinydiff train                                   # the embedded digits, the defaults below
    tinydiff train --data path/to/sprites_1788_16x16.npy --out runs/sprites
    tinydiff train --out runs/digits --resume        # continue a stopped run, exactly
    python -m tinydiff train --steps 200 --n-feat 16 # a quick look

Each step (DDPM Alg. 1, with the course's context masking for classifier-free guidance):
    draw a batch x0 with its labels c                        (data.Batches: seeded, resumable)
    t ~ U{0..T-1}, eps ~ N(0, I), x_t = q_sample(x0, t, eps)  (DDPM eq. 4, in training_loss)
    replace c by the null context for `context_drop` of the batch  (Ho & Salimans Alg. 1)
    loss = |target - model(x_t, t, c)|^2,  target = eps, x0 or v  (DDPM eq. 14)
    backward, clip the gradient norm, Adam step, EMA update
A NaN or infinite loss stops training at once, naming the step; the last checkpoint, written
before anything went wrong, stays as it was.

The run folder (--out):
    config.json          every setting of the run (what `tinydiff sample` rebuilds the model from)
    checkpoint.json      the checkpoint manifest, and step-XXXXXXXX/ the newest checkpoint:
                         model, optimizer, EMA, random-generator state, data position, losses
    model.safetensors    the weights to sample with (the EMA's when --ema > 0), config in metadata
    loss.png             the loss curve;  samples.png  one row per class, DDIM-50 from the EMA
Ctrl-C (or --time-budget) stops after the current step and writes all of the above; run the
same command with --resume to go on. On the CPU a resumed run equals an uninterrupted one, bit
for bit (tests/test_cli.py checks it).
"""
import contextlib
import io
import json
import math
import os
import signal
import time

import numpy as np

from tinydiff import backend, checkpoint, data, optim
from tinydiff.diffusion import NoiseSchedule, training_loss
from tinydiff.samplers import ddim_sample
from tinydiff.tensor import no_grad

# The defaults: what `tinydiff train` does with no flags (digits, about 7.5 minutes on 2 vCPUs).
DEFAULTS = dict(
    data="digits",          # "digits" or a path (see data.py)
    image_size=None,        # resize to this (None: the data set's own size; digits: 16)
    out="runs/digits",      # the run folder
    model="contextunet",    # "contextunet" (the course's) or "unet" (modern: GroupNorm, attention)
    n_feat=32,              # model width: channels of the first level (the course's is 64)
    steps=None,             # optimizer steps in all; None: from epochs
    epochs=None,            # passes over the data; None with steps None: DEFAULT_EPOCHS
    batch_size=64,
    optimizer="adam",       # "adam" or "adamw"
    lr=1e-3,
    lr_schedule="linear",   # "linear" (the course's decay to 0), "cosine" (with warm-up), "constant"
    warmup=0,               # warm-up steps of the cosine schedule
    weight_decay=0.0,       # AdamW's decoupled weight decay (adamw only)
    grad_clip=1.0,          # clip the global gradient norm to this (0: no clipping)
    timesteps=500,          # T, the course's
    schedule="linear",      # noise schedule: "linear" (beta 1e-4 -> 0.02), "cosine", "sigmoid"
    objective="eps",        # what the model predicts: "eps" (the course's), "x0" or "v"
    context_drop=0.1,       # fraction of contexts replaced by the null context (for guidance)
    ema=0.999,              # EMA decay of the weights (0: no EMA)
    seed=0,
    device="cpu",
    kernels="native",       # "native" (compiled C++/CUDA where built) or "numpy" (the reference)
    checkpoint_every=500,   # steps between checkpoints (one is always written at the end)
    time_budget=None,       # minutes: stop (and checkpoint) once this much time has passed
    sample_steps=50,        # DDIM steps for samples.png
    sample_per_class=10,    # samples.png: samples per class (one row per class)
)
DEFAULT_EPOCHS = 200       # 200 x 23 batches of 64 = 4600 steps
# Settings that define the model and the data: a resumed run must keep them.
FIXED_ON_RESUME = ("data", "image_size", "model", "n_feat", "batch_size", "timesteps", "schedule",
                   "objective", "seed", "optimizer")
CHOICES = dict(model=("contextunet", "unet"), optimizer=("adam", "adamw"),
               lr_schedule=("linear", "cosine", "constant"), schedule=("linear", "cosine", "sigmoid"),
               objective=("eps", "x0", "v"), device=("cpu", "cuda"), kernels=("native", "numpy"))


class TrainingDiverged(RuntimeError):
    """The loss (or a weight) became NaN or infinite."""


class ConfigError(ValueError):
    """Settings that cannot work together, or a run folder that does not fit --resume."""


# ---------------------------------------------------------------------------------------------
# Building the pieces from a config


def build_model(cfg, in_channels, num_classes, height):
    """The denoiser named by cfg["model"], conditioned on num_classes classes."""
    from tinydiff.models import ContextUnet, UNet
    if cfg["model"] == "contextunet":
        return ContextUnet(in_channels, n_feat=cfg["n_feat"], n_cfeat=num_classes, height=height)
    n = cfg["n_feat"]
    return UNet(in_channels, channels=(n, 2 * n, 4 * n), num_classes=num_classes, height=height)


def model_from_config(cfg):
    """Rebuild a run's model (untrained) from its config.json."""
    return build_model(cfg, cfg["in_channels"], cfg["num_classes"], cfg["height"])


def make_context(cfg, labels, num_classes):
    """What the model is conditioned on: one-hot vectors (ContextUnet), class indices (UNet)."""
    return data.one_hot(labels, num_classes) if cfg["model"] == "contextunet" else labels.astype(np.int64)


def learning_rate(cfg, step, total):
    if cfg["lr_schedule"] == "linear":
        return optim.linear_decay(step, total, cfg["lr"])
    if cfg["lr_schedule"] == "cosine":
        return optim.cosine_with_warmup(step, total, cfg["lr"], warmup=cfg["warmup"])
    return cfg["lr"]


def check_config(cfg):
    """Refuse settings that cannot work, with the flag's name in the message."""
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"--{key.replace('_', '-')} must be one of {', '.join(allowed)}, got {cfg[key]!r}")
    positive = ["n_feat", "batch_size", "timesteps", "checkpoint_every", "sample_steps", "sample_per_class"]
    for key in positive + [k for k in ("steps", "epochs") if cfg[k] is not None]:
        if not (isinstance(cfg[key], int) and cfg[key] > 0):
            raise ConfigError(f"--{key.replace('_', '-')} must be a positive integer, got {cfg[key]!r}")
    if not cfg["lr"] > 0:
        raise ConfigError(f"--lr must be positive, got {cfg['lr']}")
    if not 0 <= cfg["context_drop"] < 1:
        raise ConfigError(f"--context-drop must be in [0, 1), got {cfg['context_drop']}")
    if not 0 <= cfg["ema"] < 1:
        raise ConfigError(f"--ema must be a decay in [0, 1) (0 disables it), got {cfg['ema']}")
    if cfg["sample_steps"] > cfg["timesteps"]:
        raise ConfigError(f"--sample-steps {cfg['sample_steps']} exceeds --timesteps {cfg['timesteps']}")
    if cfg["time_budget"] is not None and not cfg["time_budget"] > 0:
        raise ConfigError(f"--time-budget must be a positive number of minutes, got {cfg['time_budget']}")


def resolve_config(overrides, resume):
    """The run's config: defaults <- (on resume) the saved config <- the flags given."""
    overrides = {"out": DEFAULTS["out"], **overrides}
    cfg = dict(DEFAULTS, out=overrides["out"])
    saved_path = os.path.join(cfg["out"], "config.json")
    has_checkpoint = os.path.exists(os.path.join(cfg["out"], checkpoint.MANIFEST))
    if resume:
        if not has_checkpoint:
            raise ConfigError(f"{cfg['out']}: no checkpoint to resume (run without --resume to start)")
        with open(saved_path, encoding="utf-8") as f:
            saved = json.load(f)
        for key in FIXED_ON_RESUME:
            if key in overrides and overrides[key] != saved[key]:
                raise ConfigError(f"--{key.replace('_', '-')} {overrides[key]} differs from the run's "
                                 f"{saved[key]} ({saved_path}): a resumed run keeps its model and data")
        cfg.update(saved)
        cfg["out"] = overrides["out"]            # the folder may have moved since
        if "epochs" in overrides and "steps" not in overrides:
            cfg["steps"] = None                  # the new --epochs sets the length, not the old --steps
    elif has_checkpoint:
        raise ConfigError(f"{cfg['out']} already holds a training run: pass --resume to continue "
                              f"it, or choose another --out")
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(unknown)}")
    cfg.update(overrides)
    check_config(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# The training loop


def train(overrides=None, resume=False, progress=True):
    """Train (or resume) the run described by `overrides` (flag name -> value). Returns the run folder."""
    cfg = resolve_config(overrides or {}, resume)
    with checkpoint.RunLock(cfg["out"]):       # one writer per run folder: a second is refused
        return _train(cfg, resume, progress)


def _train(cfg, resume, progress):
    backend.set_kernels(cfg["kernels"])
    backend.manual_seed(cfg["seed"])
    out, device = cfg["out"], cfg["device"]

    # data: all of it on the device once; batches are drawn by index
    images, labels, num_classes = data.load_dataset(cfg["data"], "train", cfg["image_size"])
    if cfg["batch_size"] > len(images):
        raise ConfigError(f"--batch-size {cfg['batch_size']} is larger than the data set ({len(images)} images)")
    batches = data.Batches(len(images), cfg["batch_size"], seed=cfg["seed"])
    total = cfg["steps"] or (cfg["epochs"] or DEFAULT_EPOCHS) * batches.batches_per_epoch
    cfg.update(in_channels=images.shape[1], height=images.shape[2], num_classes=num_classes, total_steps=total)
    images_dev = backend.to_device(images, device)                            # (N, C, H, W)
    contexts_dev = backend.to_device(make_context(cfg, labels, num_classes), device)   # (N, K) or (N,)

    # model, noise schedule, optimizer, EMA
    try:
        model = build_model(cfg, images.shape[1], num_classes, images.shape[2]).to(device)
    except ValueError as err:        # e.g. a width or an image size the architecture cannot take
        raise ConfigError(f"--model {cfg['model']} --n-feat {cfg['n_feat']}: {err}") from None
    schedule = NoiseSchedule(cfg["schedule"], cfg["timesteps"])
    if cfg["optimizer"] == "adamw":
        opt = optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    else:
        opt = optim.Adam(model.parameters(), lr=cfg["lr"])
    ema = optim.EMA(model, decay=cfg["ema"]) if cfg["ema"] > 0 else None

    step, losses = 0, []
    if resume:    # weights, moments, EMA, generator state, data position, loss history
        info = checkpoint.load_checkpoint(out, model, opt, ema)
        step, losses = info["step"], list(np.asarray(info["extra"]["losses"]).tolist())
        batches.load_state_dict(info["extra"]["batches"])
        if step > total:
            raise ConfigError(f"{out} is at step {step}, past the {total} steps asked for: give more --steps")
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "config.json"), json.dumps(cfg, indent=1).encode())
    print(f"training {cfg['model']} (n_feat {cfg['n_feat']}, {model.num_parameters():,} parameters) on "
          f"{cfg['data']}: {len(images)} images {images.shape[1:]}, {num_classes} classes; "
          f"steps {step} -> {total} of batch {cfg['batch_size']}; device {device}, kernels {cfg['kernels']}")

    def save():
        for name, p in model.named_parameters():      # never save weights that went bad
            if not bool(p.xp.isfinite(p.data).all()):
                raise TrainingDiverged(f"step {step}: weight {name} is NaN or infinite; "
                                       f"the last checkpoint in {out} is left as it was")
        extra = {"batches": batches.state_dict(), "losses": np.asarray(losses, dtype=np.float64)}
        checkpoint.save_checkpoint(out, model, opt, step, ema=ema, extra=extra, config=cfg)
        checkpoint.save_weights(ema.state_dict() if ema else model, os.path.join(out, "model.safetensors"),
                                metadata={"tinydiff.config": json.dumps(cfg), "step": str(step)})

    stop = StopFlag()
    start = time.time()
    seen = 0
    bar = _progress_bar(total, step, progress)
    try:
        with stop, backend.one_blas_thread(device):          # see backend.one_blas_thread
            while step < total:
                idx = batches.next()                                  # (B,) indices into the data
                x0 = images_dev[idx]                                  # (B, C, H, W) in [-1, 1]
                context = contexts_dev[idx]                           # (B, K) one-hot or (B,) labels
                opt.lr = learning_rate(cfg, step, total)
                loss = training_loss(model, schedule, x0, context, cfg["objective"],
                                     context_drop=cfg["context_drop"])
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(
                        f"step {step + 1}: the loss is {loss_value}; training stopped. The last "
                        f"checkpoint in {out} is intact: try a lower --lr, or --grad-clip")
                opt.zero_grad()
                loss.backward()
                if cfg["grad_clip"] > 0:
                    optim.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                opt.step()
                if ema is not None:
                    # EMA warm-up (as TensorFlow's ExponentialMovingAverage with num_updates): the
                    # decay grows as (1 + step) / (10 + step) up to --ema, so that in a short run
                    # the average is not dominated by the random initial weights (0.999^1000 = 0.37)
                    ema.decay = min(cfg["ema"], (1 + step) / (10 + step))
                    ema.update()
                step += 1
                seen += len(idx)
                losses.append(loss_value)
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", img_s=f"{seen / (time.time() - start):.0f}")

                out_of_time = cfg["time_budget"] is not None and time.time() - start > 60 * cfg["time_budget"]
                if step % cfg["checkpoint_every"] == 0 or step == total or stop.requested or out_of_time:
                    save()
                if stop.requested or out_of_time:
                    bar.write(f"stopped at step {step}/{total} ({'Ctrl-C' if stop.requested else 'time budget'}); "
                              f"continue with: tinydiff train --out {out} --resume")
                    break
    finally:
        bar.close()

    write_loss_plot(os.path.join(out, "loss.png"), losses)
    with (ema.average_parameters() if ema else contextlib.nullcontext()):
        grid = preview_samples(model, schedule, cfg)
    write_png(os.path.join(out, "samples.png"), image_grid(grid, ncol=cfg["sample_per_class"]))
    print(f"{out}: step {step}/{total}, loss {np.mean(losses[-50:]) if losses else float('nan'):.4f}, "
          f"{time.time() - start:.0f} s; wrote checkpoint, model.safetensors, loss.png, samples.png")
    return out


def preview_samples(model, schedule, cfg):
    """DDIM samples, cfg["sample_per_class"] for each class (up to 20 classes), in [0, 1]."""
    classes = np.arange(min(cfg["num_classes"], 20))
    labels = np.repeat(classes, cfg["sample_per_class"])                      # (N,)
    context = backend.to_device(make_context(cfg, labels, cfg["num_classes"]), cfg["device"])
    shape = (len(labels), cfg["in_channels"], cfg["height"], cfg["height"])
    model.eval()
    with no_grad():
        x = ddim_sample(model, schedule, shape, context, steps=cfg["sample_steps"], seed=cfg["seed"],
                        objective=cfg["objective"])
    model.train()
    return to_unit(backend.to_device(x, "cpu"))


class StopFlag:
    """Within `with`, the first Ctrl-C asks the loop to stop after this step; a second one aborts."""
    requested = False

    def __enter__(self):
        self._old = None
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:          # not the main thread: leave Ctrl-C alone
            pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _progress_bar(total, initial, enabled):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# Pictures, written atomically (a temporary file, then os.replace)


def write_atomic(path, payload):
    checkpoint.write_atomic(path, payload)     # a full disk: WriteError, the old file unchanged


def to_unit(x):
    """Model space [-1, 1] -> image space [0, 1], clipped."""
    return np.clip((np.asarray(x, dtype=np.float32) + 1) / 2, 0, 1)


def image_grid(images, ncol, pad=1, scale=4):
    """(N, C, H, W) in [0, 1] -> (rows, cols, 3) uint8: ncol images a row, white gaps, each pixel
    drawn scale x scale so that 16x16 images are big enough to see."""
    n, c, h, w = images.shape
    nrow = -(-n // ncol)
    canvas = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.float32)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top:top + h, left:left + w] = img.transpose(1, 2, 0) if c == 3 else img[0][..., None]
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return (canvas * 255 + 0.5).astype(np.uint8)


def write_png(path, rgb):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def write_gif(path, frames, duration_ms=80):
    """frames: a list of (rows, cols, 3) uint8 pictures; the last one is held for a second."""
    from PIL import Image
    pictures = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    pictures[0].save(buf, format="GIF", save_all=True, append_images=pictures[1:] + [pictures[-1]] * 12,
                     duration=duration_ms, loop=0)
    write_atomic(path, buf.getvalue())


def write_loss_plot(path, losses):
    """The loss per step (light) and its trailing mean over k steps, on a log scale."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    if len(losses):
        steps = np.arange(1, len(losses) + 1)
        k = max(1, min(50, len(losses) // 10))
        total = np.cumsum(np.append(0.0, losses))
        smooth = (total[k:] - total[:-k]) / k                          # mean of steps i-k+1 .. i
        smooth = np.concatenate([total[1:k] / np.arange(1, k), smooth])   # shorter means at the start
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
        ax.plot(steps, smooth, color="tab:blue", label=f"mean of {k} steps")
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue())
