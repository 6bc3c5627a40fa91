"""The settings of a training run: their defaults, their checks, and how --resume merges them.

    cfg = resolve_config({"steps": 200, "out": "runs/quick"}, resume=False)   # flag name -> value

A run's config is one flat dict (saved as RUN/config.json): DEFAULTS below, then (with --resume)
the run's saved config, then the settings given. Each refusal names the flag (--n-feat, ...), so
the CLI prints it as it is; the CLI itself only parses the flags (tinydiff/cli.py).
"""
import json
import os

from tinydiff import checkpoint

# The defaults: what `tinydiff train` does with no flags (digits, about 7.5 minutes on 2 vCPUs).
DEFAULTS = dict(
    data="digits",          # "digits" or a path (see data.py)
    image_size=None,        # resize to this (None: the data set's own size; digits: 16)
    out="runs/digits",      # the run folder
    model="contextunet",    # "contextunet" (the course's) or "unet" (modern: GroupNorm, attention);
                            # "text_unet" (the UNet with cross-attention to a prompt) comes with text
    text=False,             # prompts as context: captions derived from the digits (tinydiff/captions.py)
    n_feat=32,              # model width: channels of the first level (the course's is 64)
    steps=None,             # optimizer steps in all; None: from epochs
    epochs=None,            # passes over the data; None with steps None: DEFAULT_EPOCHS
    batch_size=64,
    optimizer="adam",       # "adam" or "adamw"
    lr=2e-3,                # peak learning rate (the course's is 1e-3 with "linear")
    lr_schedule="cosine",   # "cosine" (with warm-up), "linear" (the course's decay to 0), "constant"
    warmup=100,             # warm-up steps of the cosine schedule (a planned run's first steps: see train.py)
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
    time_budget=None,       # minutes: with no steps or epochs, the run's length is planned to fit
                            # (train.PLAN_FROM); always, training stops (and checkpoints) once spent
    sample_steps=50,        # DDIM steps for samples.png
    sample_per_class=10,    # samples.png: samples per class (one row per class)
)
DEFAULT_EPOCHS = 200       # 200 x 23 batches of 64 = 4600 steps
# What --text changes among the defaults (a flag given still wins): the model that reads prompts,
# at width 16 (channels 16, 32, 64; 0.9M parameters), whose step costs about the quick start's;
# at 32 it costs about 4x.
TEXT_DEFAULTS = dict(model="text_unet", n_feat=16)
# Settings that define the model and the data: a resumed run must keep them.
FIXED_ON_RESUME = ("data", "image_size", "model", "text", "n_feat", "batch_size", "timesteps", "schedule",
                   "objective", "seed", "optimizer")
CHOICES = dict(model=("contextunet", "unet", "text_unet"), optimizer=("adam", "adamw"),
               lr_schedule=("linear", "cosine", "constant"), schedule=("linear", "cosine", "sigmoid"),
               objective=("eps", "x0", "v"), device=("cpu", "cuda"), kernels=("native", "numpy"))


class ConfigError(ValueError):
    """Settings that cannot work together, or a run folder that does not fit --resume."""


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
    if cfg["text"] and cfg["data"] != "digits":
        raise ConfigError(f"--text: captions are derived for the digits only (from each digit's ink and "
                          f"slant against its class, tinydiff/captions.py); --data {cfg['data']} has none")
    if cfg["text"] != (cfg["model"] == "text_unet"):
        raise ConfigError("--text trains --model text_unet (the UNet with cross-attention to the prompt), "
                          f"and text_unet takes only --text; got --model {cfg['model']}"
                          f"{' with' if cfg['text'] else ' without'} --text")


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
            was = saved.get(key, DEFAULTS[key])      # a run saved before the setting existed had the default
            if key in overrides and overrides[key] != was:
                raise ConfigError(f"--{key.replace('_', '-')} {overrides[key]} differs from the run's "
                                 f"{was} ({saved_path}): a resumed run keeps its model and data")
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
    if overrides.get("text") and not resume:     # --text alone picks the model that reads prompts
        cfg.update({k: v for k, v in TEXT_DEFAULTS.items() if k not in overrides})
    check_config(cfg)
    return cfg
