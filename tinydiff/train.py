"""Training a conditional diffusion model: one flat loop, from data to checkpoint to pictures.

    tinydiff train                                   # the embedded digits, the defaults below
    tinydiff train --data path/to/sprites_1788_16x16.npy --out runs/sprites
    tinydiff train --out runs/digits --resume        # continue a stopped run, exactly
    python -m tinydiff train --steps 200 --n-feat 16 # a quick look

Each step (DDPM Alg. 1, with the course's context masking for classifier-free guidance):
    draw a batch x0 with its labels y, c = model.context(y)  (data.Batches: seeded, resumable)
        (--text: c = model.context(captions), a fresh caption of each image: captions.py)
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
--time-budget M with no --steps or --epochs times the first steps and plans the run's length to
fit M minutes (PLAN_FROM below); the learning rate then anneals to that planned count.
Ctrl-C (or a spent --time-budget) stops after the current step and writes all of the above; run the
same command with --resume to go on. A resumed run equals an uninterrupted one, bit for bit, on the
CPU (tests/test_cli.py) and on a GPU (tests/test_philox.py): the noise comes from tinydiff.philox,
whose state the checkpoint keeps (checkpoint.save_checkpoint).

The settings and their checks are tinydiff/config.py, the model and its weights tinydiff/runs.py,
Ctrl-C tinydiff/interrupt.py, the pictures tinydiff/pictures.py.
"""
import contextlib
import json
import math
import os
import time

import numpy as np

from tinydiff import backend, captions, checkpoint, data, optim, pictures, runs, unet
from tinydiff.config import DEFAULT_EPOCHS, ConfigError, resolve_config
from tinydiff.diffusion import NoiseSchedule, training_loss
from tinydiff.interrupt import StopFlag
from tinydiff.samplers import ddim_sample
from tinydiff.tensor import no_grad


class TrainingDiverged(RuntimeError):
    """The loss (or a weight) became NaN or infinite."""


# A time budget with no --steps or --epochs plans the run's length once, from its own speed: the
# steps PLAN_FROM .. PLAN_FROM + PLAN_STEPS after the start are timed (the first ones pay for
# allocations; a run resumed before its plan counts from where it resumed), and
# the steps that fit in what is left of the budget become the run's total, saved in config.json
# as "planned_steps". The learning rate then anneals to that count, and --resume continues it bit
# for bit; a faster machine plans more steps. Until the plan, the rate is the schedule's peak (or
# its warm-up), which does not depend on the total. The window ends with the default warm-up
# (100 steps): timed from steps 5 to 25, runs on a 2-vCPU cloud machine then stepped 3-9% slower
# than planned (the first seconds run faster) and the budget stopped them before their plan.
PLAN_FROM, PLAN_STEPS = 40, 60
PLAN_RESERVE = 0.05               # of the budget, for checkpoints, the final pictures and drift
CAPTION_STREAM = 1                # --text: the captions' generator is seeded with (seed, CAPTION_STREAM)


def plan_steps(step, seconds_per_step, seconds_left):
    """The total step count that fits: the steps done plus those the time left allows (at least 1)."""
    return step + max(1, int(seconds_left / seconds_per_step))


def learning_rate(cfg, step, total):
    if total is None:             # not planned yet: the peak rate, or the cosine schedule's warm-up
        warming = cfg["lr_schedule"] == "cosine" and step < cfg["warmup"]
        return cfg["lr"] * step / cfg["warmup"] if warming else cfg["lr"]
    if cfg["lr_schedule"] == "linear":
        return optim.linear_decay(step, total, cfg["lr"])
    if cfg["lr_schedule"] == "cosine":
        return optim.cosine_with_warmup(step, total, cfg["lr"], warmup=cfg["warmup"])
    return cfg["lr"]


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
    planned = cfg["time_budget"] is not None and cfg["steps"] is None and cfg["epochs"] is None
    if planned:                   # the budget sets the length (see PLAN_FROM); a resumed run keeps its plan
        total = cfg.get("planned_steps")
    else:
        total = cfg["steps"] or (cfg["epochs"] or DEFAULT_EPOCHS) * batches.batches_per_epoch
    cfg.update(in_channels=images.shape[1], height=images.shape[2], num_classes=num_classes, total_steps=total)
    if cfg["model"] == "unet":
        if resume:
            runs.check_unet_layout(cfg, out)
        cfg["unet_layout"] = unet.LAYOUT                                      # the module structure saved
    if cfg["text"]:               # the words the model reads, saved with it (config.json, model.safetensors)
        cfg["vocabulary"] = captions.caption_vocabulary()
        texts = captions.DigitCaptions(np.clip((images + 1) / 2, 0, 1), labels)   # thirds of these digits
        caption_rng = np.random.default_rng([cfg["seed"], CAPTION_STREAM])          # its state: in the checkpoint
    images_dev = backend.to_device(images, device)                            # (N, C, H, W)
    labels_dev = backend.to_device(labels, device)                            # (N,) int64

    # model, noise schedule, optimizer, EMA
    try:
        model = runs.build_model(cfg, images.shape[1], num_classes, images.shape[2]).to(device)
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
        if cfg["text"]:
            caption_rng.bit_generator.state = info["extra"]["caption_rng"]
        if total is not None and step > total:
            raise ConfigError(f"{out} is at step {step}, past the {total} steps asked for: give more --steps")
    os.makedirs(out, exist_ok=True)
    checkpoint.write_atomic(os.path.join(out, "config.json"), json.dumps(cfg, indent=1).encode())
    print(f"training {cfg['model']} (n_feat {cfg['n_feat']}, {model.num_parameters():,} parameters) on "
          f"{cfg['data']}: {len(images)} images {images.shape[1:]}, {num_classes} classes; "
          f"steps {step} -> {total or 'planned from the time budget'} of batch {cfg['batch_size']}; "
          f"device {device}, kernels {cfg['kernels']}")

    stop = StopFlag()
    start = time.time()
    plan_from = step + PLAN_FROM              # a run stopped before its plan plans on resuming
    seen = 0
    deadline = None if cfg["time_budget"] is None else start + 60 * cfg["time_budget"]   # where out_of_time stops it
    bar = _progress_bar(total, step, progress, deadline)
    try:
        with stop, backend.one_blas_thread(device):          # see backend.one_blas_thread
            while total is None or step < total:
                idx = batches.next()                                  # (B,) indices into the data
                x0 = images_dev[idx]                                  # (B, C, H, W) in [-1, 1]
                asked = texts.captions(idx, caption_rng) if cfg["text"] else labels_dev[idx]   # B captions, or labels
                context = model.context(asked)                        # the model's: (B, K) one-hot, (B, L) ids, ...
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
                if total is None and step == plan_from:
                    plan_start = time.time()
                if total is None and step == plan_from + PLAN_STEPS:   # the plan: steps that fit the budget
                    per_step = (time.time() - plan_start) / PLAN_STEPS
                    left = 60 * cfg["time_budget"] * (1 - PLAN_RESERVE) - (time.time() - start)
                    total = cfg["planned_steps"] = cfg["total_steps"] = plan_steps(step, per_step, left)
                    checkpoint.write_atomic(os.path.join(out, "config.json"), json.dumps(cfg, indent=1).encode())
                    bar.total = total
                    bar.write(f"time budget {cfg['time_budget']:g} min: {per_step * 1000:.0f} ms a step, "
                              f"so {total} steps in all (saved in {out}/config.json)")
                seen += len(idx)
                losses.append(loss_value)
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", img_s=f"{seen / (time.time() - start):.0f}")

                out_of_time = cfg["time_budget"] is not None and time.time() - start > 60 * cfg["time_budget"]
                if step % cfg["checkpoint_every"] == 0 or step == total or stop.requested or out_of_time:
                    save_run(cfg, model, opt, ema, step, batches, losses, caption_rng if cfg["text"] else None)
                if stop.requested or out_of_time:
                    bar.write(f"stopped at step {step}/{total} ({'Ctrl-C' if stop.requested else 'time budget'}); "
                              f"continue with: tinydiff train --out {out} --resume")
                    break
    finally:
        bar.close()

    pictures.write_loss_plot(os.path.join(out, "loss.png"), losses)
    with (ema.average_parameters() if ema else contextlib.nullcontext()):
        grid = preview_samples(model, schedule, cfg)
    pictures.write_png(os.path.join(out, "samples.png"), pictures.image_grid(grid, ncol=cfg["sample_per_class"]))
    print(f"{out}: step {step}/{total}, loss {np.mean(losses[-50:]) if losses else float('nan'):.4f}, "
          f"{time.time() - start:.0f} s; wrote checkpoint, model.safetensors, loss.png, samples.png")
    return out


def preview_samples(model, schedule, cfg):
    """DDIM samples, cfg["sample_per_class"] for each class (up to 20 classes), in [0, 1]."""
    classes = np.arange(min(cfg["num_classes"], 20))
    labels = np.repeat(classes, cfg["sample_per_class"])                      # (N,)
    asked = [str(y) for y in labels] if cfg.get("text") else backend.to_device(labels, cfg["device"])
    context = model.context(asked)                                            # the model's context
    shape = (len(labels), cfg["in_channels"], cfg["height"], cfg["height"])
    model.eval()
    with no_grad():
        x = ddim_sample(model, schedule, shape, context, steps=cfg["sample_steps"], seed=cfg["seed"],
                        objective=cfg["objective"])
    model.train()
    return pictures.to_unit(backend.to_device(x, "cpu"))


def save_run(cfg, model, opt, ema, step, batches, losses, caption_rng=None):
    """The checkpoint (everything --resume needs: with --text the captions' generator too) and
    model.safetensors (the weights to sample with), unless a weight went bad: then nothing is
    written and the last checkpoint stays as it was."""
    out = cfg["out"]
    for name, p in model.named_parameters():
        if not bool(p.xp.isfinite(p.data).all()):
            raise TrainingDiverged(f"step {step}: weight {name} is NaN or infinite; "
                                   f"the last checkpoint in {out} is left as it was")
    extra = {"batches": batches.state_dict(), "losses": np.asarray(losses, dtype=np.float64)}
    if caption_rng is not None:
        extra["caption_rng"] = caption_rng.bit_generator.state
    checkpoint.save_checkpoint(out, model, opt, step, ema=ema, extra=extra, config=cfg)
    checkpoint.save_weights(ema.state_dict() if ema else model, os.path.join(out, "model.safetensors"),
                            metadata={"tinydiff.config": json.dumps(cfg), "step": str(step)})


def _progress_bar(total, initial, enabled, deadline=None):
    """tqdm's bar. Under a time budget (deadline: the time.time() at which it runs out) its ETA is
    the sooner of the steps left at the current rate and the budget left: the run stops at the
    budget whatever its plan, so a machine that slows down after planning sees the true end."""
    from tqdm import tqdm

    class BudgetBar(tqdm):
        @property
        def format_dict(self):
            d = super().format_dict
            if deadline is not None and d["total"]:
                left = max(0.0, deadline - time.time())
                if d["rate"]:
                    left = min(left, (d["total"] - d["n"]) / d["rate"])
                d["remaining"] = tqdm.format_interval(left)
                d["bar_format"] = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
            return d

    return BudgetBar(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
