"""Run folders: build a run's model from its config, find its weights, load it to sample with.

    model, schedule, cfg = load_run("runs/digits")            # EMA weights, eval mode, on the CPU
    model, schedule, cfg = load_run("runs/digits/model.safetensors", device="cuda")

A run folder (written by tinydiff/train.py) holds config.json, checkpoint.json with the newest
step-XXXXXXXX/ checkpoint, and model.safetensors (the weights to sample with, the config in its
metadata). Either is enough to rebuild the model. Problems raise ordinary exceptions naming the
path (FileNotFoundError, checkpoint.CheckpointError, a ValueError); the CLI turns them into
messages and exit codes.
"""
import contextlib
import json
import os

from tinydiff.checkpoint import MANIFEST, CheckpointError, load_checkpoint, load_weights, read_safetensors, reading
from tinydiff.diffusion import NoiseSchedule
from tinydiff.models import ContextUnet, TextUNet, UNet
from tinydiff.unet import LAYOUT


def build_model(cfg, in_channels, num_classes, height):
    """The noise predictor named by cfg["model"], conditioned on num_classes classes (untrained);
    "text_unet" is conditioned on prompts in the words of cfg["vocabulary"] instead."""
    if cfg["model"] == "contextunet":
        return ContextUnet(in_channels, n_feat=cfg["n_feat"], n_cfeat=num_classes, height=height)
    n = cfg["n_feat"]
    if cfg["model"] == "text_unet":
        return TextUNet(cfg["vocabulary"], in_channels=in_channels, channels=(n, 2 * n, 4 * n), height=height,
                        head_dim=n)
    return UNet(in_channels, channels=(n, 2 * n, 4 * n), num_classes=num_classes, height=height, head_dim=n)


def check_unet_layout(cfg, where):
    """Refuse a --model unet run whose saved UNet has another module layout than unet.LAYOUT."""
    layout = cfg.get("unet_layout", "unet-v1")        # runs before the key: one ResBlock per level
    if cfg["model"] == "unet" and layout != LAYOUT:
        raise CheckpointError(f"{where}: this run's UNet has the old layout {layout!r} (one ResBlock per "
                              f"level, up-sampling that changes width); tinydiff now builds the {LAYOUT!r} "
                              f"layout (diffusers' UNet2DModel), which its weights do not fit: train it again")


def model_from_config(cfg):
    """Rebuild a run's model (untrained) from its config.json."""
    check_unet_layout(cfg, f"run {cfg.get('out', '')}".strip())
    return build_model(cfg, cfg["in_channels"], cfg["num_classes"], cfg["height"])


def find_weights(path):
    """(config, weights file) for a run folder (its EMA weights when present) or a .safetensors file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such run folder or weights file; train one with "
                                f"`tinydiff train --out {path}` (or python demos/02_train_digits.py)")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, MANIFEST)):
            raise CheckpointError(f"{path}: not a run folder (no {MANIFEST}); train one with "
                                  f"`tinydiff train --out {path}`")
        info = load_checkpoint(path)
        ema_file = os.path.join(info["dir"], "ema.safetensors")
        return info["config"], ema_file if os.path.exists(ema_file) else os.path.join(info["dir"], "model.safetensors")
    _, metadata = read_safetensors(path)
    if "tinydiff.config" not in metadata:
        raise CheckpointError(f"{path}: no tinydiff config in its metadata (use the model.safetensors "
                              f"that `tinydiff train` writes, or the run folder)")
    return json.loads(metadata["tinydiff.config"]), path


def load_run(path, device="cpu"):
    """A run's model (EMA weights, eval mode: BatchNorm uses its running statistics), its noise
    schedule and its config: what `tinydiff sample` and the demos sample from. A trainer may
    replace the checkpoint meanwhile: reading() keeps the one being read until it is loaded."""
    with reading(path) if os.path.isdir(path) else contextlib.nullcontext():
        cfg, weights = find_weights(path)
        model = load_weights(model_from_config(cfg).to(device), weights).eval()
    return model, NoiseSchedule(cfg["schedule"], cfg["timesteps"]), cfg
