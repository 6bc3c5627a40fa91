"""The bridge to diffusers: a tinydiff UNet as a UNet2DModel folder, and back. No torch, no diffusers.

    export_diffusers(model_or_run, "out/", schedule, objective="eps", spacing="trailing")
    unet = load_diffusers_unet("out/")            # also tinydiff.load_diffusers_unet
    tinydiff export --checkpoint runs/unet --format diffusers --out out/

The folder holds what diffusers opens as it is:
    out/config.json                          UNet2DModel's config        UNet2DModel.from_pretrained("out/")
    out/diffusion_pytorch_model.safetensors  its weights, named as UNet2DModel names them
    out/scheduler/scheduler_config.json      DDIMScheduler's config      DDIMScheduler.from_pretrained("out/",
                                                                             subfolder="scheduler")
The format is JSON and safetensors only (no pickle, so no torch is needed to write or read it).

Our UNet (unet.py) has UNet2DModel's structure, so the weights move one to one: NAMES below is
the whole correspondence. Conventions that line up:
    time      both take the integer timestep index t in 0..T-1; sinusoidal embedding with
              flip_sin_to_cos and freq_shift as UNet2DModel's, then Linear-SiLU-Linear
    classes   our Embedding(num_classes + 1) is num_class_embeds = num_classes + 1; the last row
              is our null class (classifier-free guidance), an ordinary class id to diffusers
    objective eps -> "epsilon", x0 -> "sample", v -> "v_prediction" (same definitions)
    betas     written as trained_betas, our float64 values (diffusers keeps them in float32)
    DDIM      set_alpha_to_one (the last step lands on alpha_bar = 1, as ours); spacing as ours.
              diffusers' DDIM takes t_prev = t - T // steps: the same as ours for "leading" and
              "trailing" when steps divides T, not for "linspace" (see samplers.ddim_timesteps).
"""
import json
import os
import re

import numpy as np

from tinydiff.checkpoint import CheckpointError, write_atomic, read_safetensors
from tinydiff.unet import UNet

# Every tinydiff UNet state-dict name -> its UNet2DModel name: one block row for the start of the
# name ({i}, {j} are kept), then, inside a ResBlock or an Attention, one part row; then weight/bias.
NAMES = (
    # blocks                             UNet2DModel
    ("time_mlp.0",                       "time_embedding.linear_1"),
    ("time_mlp.2",                       "time_embedding.linear_2"),
    ("class_emb",                        "class_embedding"),
    ("init_conv",                        "conv_in"),
    ("downs.{i}.resnets.{j}",            "down_blocks.{i}.resnets.{j}"),
    ("downs.{i}.attentions.{j}",         "down_blocks.{i}.attentions.{j}"),
    ("downs.{i}.downsample.conv",        "down_blocks.{i}.downsamplers.0.conv"),
    ("mid1",                             "mid_block.resnets.0"),
    ("mid_attn",                         "mid_block.attentions.0"),
    ("mid2",                             "mid_block.resnets.1"),
    ("ups.{i}.resnets.{j}",              "up_blocks.{i}.resnets.{j}"),
    ("ups.{i}.attentions.{j}",           "up_blocks.{i}.attentions.{j}"),
    ("ups.{i}.upsample.conv",            "up_blocks.{i}.upsamplers.0.conv"),
    ("out.0",                            "conv_norm_out"),
    ("out.2",                            "conv_out"),
    # parts of a ResBlock (ResnetBlock2D)
    (".norm1",                           ".norm1"),
    (".conv1",                           ".conv1"),
    (".emb_proj",                        ".time_emb_proj"),
    (".norm2",                           ".norm2"),
    (".conv2",                           ".conv2"),
    (".skip",                            ".conv_shortcut"),
    # parts of an Attention (diffusers' Attention, the processor's group_norm/to_q/to_k/to_v/to_out)
    (".norm",                            ".group_norm"),
    (".q",                               ".to_q"),
    (".k",                               ".to_k"),
    (".v",                               ".to_v"),
    (".proj",                            ".to_out.0"),
)
_BLOCKS = [(re.compile(re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")), theirs)
           for ours, theirs in NAMES if not ours.startswith(".")]
_PARTS = dict(row for row in NAMES if row[0].startswith("."))


def diffusers_name(name):
    """tinydiff UNet state-dict name -> UNet2DModel's: 'ups.0.resnets.1.emb_proj.weight' ->
    'up_blocks.0.resnets.1.time_emb_proj.weight'."""
    path, param = name.rsplit(".", 1)
    for pattern, theirs in _BLOCKS:
        m = pattern.match(path)
        if m and (m.end() == len(path) or path[m.end()] == "."):
            part = path[m.end():]
            if part and part not in _PARTS:
                break
            return theirs.format(**m.groupdict()) + _PARTS.get(part, "") + "." + param
    raise KeyError(f"diffusers_bridge: no row of NAMES maps {name!r}")


# ---------------------------------------------------------------------------------------------
# Configs: UNet <-> UNet2DModel, NoiseSchedule -> DDIMScheduler

# UNet2DModel's constructor defaults (diffusers 0.42): a config.json may leave any of them out.
UNET2D_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    mid_block_type="UNetMidBlock2D",
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[224, 448, 672, 896], layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu",
    attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5,
    resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
    num_class_embeds=None, num_train_timesteps=None)
# What our UNet builds; any other value of these is refused, naming the option.
FIXED = dict(center_input_sample=False, time_embedding_type="positional", mid_block_type="UNetMidBlock2D",
             mid_block_scale_factor=1, downsample_padding=1, downsample_type="conv", upsample_type="conv",
             act_fn="silu", resnet_time_scale_shift="default", add_attention=True, class_embed_type=None)
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def diffusers_config(model):
    """UNet2DModel's config.json for our UNet."""
    c = model.config
    attn = c["attention_levels"]
    return dict(
        UNET2D_DEFAULTS, _class_name="UNet2DModel",
        sample_size=c["height"], in_channels=c["in_channels"], out_channels=c["in_channels"],
        freq_shift=c["freq_shift"], flip_sin_to_cos=c["flip_sin_to_cos"],
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=list(c["channels"]), layers_per_block=c["layers_per_block"], dropout=c["dropout"],
        attention_head_dim=c["head_dim"], norm_num_groups=c["groups"], norm_eps=c["eps"],
        num_class_embeds=None if c["num_classes"] is None else c["num_classes"] + 1)


def unet_kwargs(config, where="config.json"):
    """Our UNet's constructor arguments for a UNet2DModel config; ValueError naming the option
    our UNet does not support."""
    def refuse(option, why):
        raise ValueError(f"{where}: unsupported UNet2DModel option {option}={cfg.get(option)!r}: {why}")

    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{where}: _class_name is {config['_class_name']!r}; only UNet2DModel is supported")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in UNET2D_DEFAULTS)
    if unknown:
        raise ValueError(f"{where}: unsupported UNet2DModel option(s) {', '.join(unknown)}")
    cfg = dict(UNET2D_DEFAULTS, **config)
    for option, value in FIXED.items():
        if cfg[option] != value:
            refuse(option, f"tinydiff's UNet supports only {value!r}")
    channels = list(cfg["block_out_channels"])
    levels = len(channels)
    if cfg["time_embedding_dim"] not in (None, 4 * channels[0]):
        refuse("time_embedding_dim", f"tinydiff's UNet uses 4 * block_out_channels[0] = {4 * channels[0]}")
    if cfg["out_channels"] != cfg["in_channels"]:
        refuse("out_channels", f"tinydiff's UNet predicts in_channels = {cfg['in_channels']} channels")
    if cfg["norm_num_groups"] is None:
        refuse("norm_num_groups", "tinydiff's UNet needs a number of groups")
    if cfg["attn_norm_num_groups"] not in (None, cfg["norm_num_groups"]):
        refuse("attn_norm_num_groups", "tinydiff's attention uses norm_num_groups")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    for option, types, kinds in (("down_block_types", down, ("DownBlock2D", "AttnDownBlock2D")),
                                 ("up_block_types", up, ("UpBlock2D", "AttnUpBlock2D"))):
        if len(types) != levels or any(t not in kinds for t in types):
            refuse(option, f"tinydiff's UNet takes {levels} (one per block_out_channels) of {', '.join(kinds)}")
    attention = [t == "AttnDownBlock2D" for t in down]
    if [t == "AttnUpBlock2D" for t in reversed(up)] != attention:
        refuse("up_block_types", f"tinydiff's UNet has attention on the way up where it has it on the way "
                                 f"down: up_block_types must mirror down_block_types {down}")
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            refuse("sample_size", "tinydiff's UNet takes square images")
        size = size[0]
    num_class_embeds = cfg["num_class_embeds"]
    return dict(in_channels=cfg["in_channels"], channels=tuple(channels),
                num_classes=None if num_class_embeds is None else num_class_embeds - 1,
                height=size if size is not None else 2 ** (levels - 1), layers_per_block=cfg["layers_per_block"],
                attention_levels=attention, head_dim=cfg["attention_head_dim"], groups=cfg["norm_num_groups"],
                eps=cfg["norm_eps"], dropout=cfg["dropout"], flip_sin_to_cos=cfg["flip_sin_to_cos"],
                freq_shift=cfg["freq_shift"])


def scheduler_config(schedule, objective="eps", spacing="trailing", clip_x0=False):
    """DDIMScheduler's config for our noise schedule and DDIM sampler settings."""
    if objective not in PREDICTION_TYPES:
        raise ValueError(f"objective must be one of {tuple(PREDICTION_TYPES)}, got {objective!r}")
    return dict(_class_name="DDIMScheduler", num_train_timesteps=schedule.T,
                trained_betas=[float(b) for b in schedule.f64["beta"]],   # exact: the run's own betas
                clip_sample=bool(clip_x0), clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
                prediction_type=PREDICTION_TYPES[objective], thresholding=False, timestep_spacing=spacing,
                rescale_betas_zero_snr=False)


# ---------------------------------------------------------------------------------------------
# Export and import


def _run_model(run):
    """(UNet with the run's EMA weights, NoiseSchedule, objective) of a run folder or model.safetensors."""
    from tinydiff.checkpoint import load_weights
    from tinydiff.diffusion import NoiseSchedule
    from tinydiff.runs import find_weights, model_from_config
    cfg, weights = find_weights(str(run))
    if cfg.get("text") or cfg["model"] == "text_unet":     # `tinydiff train --text`
        raise ValueError(f"{run}: a text-conditioned run cannot be exported: UNet2DModel has no "
                         f"cross-attention to a text encoder (that is UNet2DConditionModel)")
    if cfg["model"] != "unet":
        raise ValueError(f"{run}: a --model {cfg['model']} run cannot be exported: the ContextUnet "
                         f"(BatchNorm, transposed-conv up-sampling, multiplied context) has no diffusers "
                         f"counterpart; train with --model unet")
    model = load_weights(model_from_config(cfg), weights).eval()
    return model, NoiseSchedule(cfg["schedule"], cfg["timesteps"]), cfg["objective"]


def export_diffusers(model_or_run, out_dir, schedule=None, objective="eps", spacing="trailing", clip_x0=False):
    """Write out_dir/config.json, diffusion_pytorch_model.safetensors (UNet2DModel) and
    scheduler/scheduler_config.json (DDIMScheduler). model_or_run: a UNet (then give its schedule
    and objective) or a run folder / model.safetensors (its own schedule and objective).
    spacing, clip_x0: the DDIM settings the scheduler is to use (ddim_sample's). Returns out_dir."""
    import safetensors.numpy
    if isinstance(model_or_run, (str, os.PathLike)):
        model, schedule, objective = _run_model(model_or_run)
    else:
        model = model_or_run
        if not isinstance(model, UNet):
            raise ValueError(f"export_diffusers: only tinydiff's UNet has a diffusers counterpart, got "
                             f"{type(model).__name__}")
        if schedule is None:
            raise ValueError("export_diffusers: give the model's NoiseSchedule (schedule=...)")
    config, sched = diffusers_config(model), scheduler_config(schedule, objective, spacing, clip_x0)
    arrays = {diffusers_name(k): np.ascontiguousarray(v.numpy(), dtype=np.float32)
              for k, v in model.state_dict().items()}
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    write_atomic(os.path.join(out_dir, "diffusion_pytorch_model.safetensors"),
                  safetensors.numpy.save(arrays, metadata={"format": "pt"}))
    write_atomic(os.path.join(out_dir, "config.json"), json.dumps(config, indent=1).encode())
    write_atomic(os.path.join(out_dir, "scheduler", "scheduler_config.json"), json.dumps(sched, indent=1).encode())
    return out_dir


def load_diffusers_unet(path):
    """A tinydiff UNet with the weights of a UNet2DModel folder (config.json and
    diffusion_pytorch_model.safetensors; a pipeline folder's unet/ is found too). Refuses, naming
    the option, a config that our UNet cannot build; and a folder without safetensors weights."""
    path = str(path)
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.exists(os.path.join(path, "unet", "config.json")):
        path = os.path.join(path, "unet")
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{config_path}: not found (a UNet2DModel folder has config.json)")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    model = UNet(**unet_kwargs(config, config_path))
    weights = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if not os.path.exists(weights):
        raise CheckpointError(f"{weights}: not found; only safetensors weights load (a .bin file is a "
                              f"pickle, which tinydiff never reads)")
    arrays, _ = read_safetensors(weights)
    names = {diffusers_name(k): k for k in model.state_dict()}
    missing, unexpected = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: does not fit the UNet of {config_path}: missing "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                              f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    own = model.state_dict()
    bad = [f"{n}: file {arrays[n].shape}, model {own[k].shape}" for n, k in names.items() if arrays[n].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{weights}: shape mismatch: {'; '.join(bad[:5])}")
    model.load_state_dict({k: arrays[n] for n, k in names.items()})
    return model.eval()
