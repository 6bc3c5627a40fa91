"""The bridge to diffusers (tinydiff/diffusers_bridge.py): the name table, export -> import round
trips, UNet2DModel and DDIMScheduler (where diffusers is installed) giving tinydiff's outputs and
DDIM images, refusals of what our UNet cannot build, of old-layout runs, of runs with no diffusers
counterpart, and `tinydiff export` end to end on a tiny trained run."""
import json
import os

import numpy as np
import pytest

import tinydiff
from tinydiff import Tensor, cli
from tinydiff import config, runs
from tinydiff.checkpoint import CheckpointError, save_weights
from tinydiff.diffusers_bridge import (diffusers_config, diffusers_name, export_diffusers,
                                       load_diffusers_unet, unet_kwargs)
from tinydiff.diffusion import NoiseSchedule
from tinydiff.models import ContextUnet, UNet
from tinydiff.philox import Philox
from tinydiff.samplers import ddim_sample

CONFIGS = {   # small UNets that cover the options: classes or not, depth, attention, heads, time embedding
    "class-conditional": dict(in_channels=1, channels=(8, 16, 32), num_classes=4, height=8, head_dim=4, groups=4),
    "unconditional": dict(in_channels=3, channels=(8, 16), num_classes=None, height=8, layers_per_block=2,
                          attention_levels=[True, False], groups=2),
    "ddpm-cifar-like": dict(in_channels=2, channels=(8, 8, 16), num_classes=2, height=4, layers_per_block=1,
                            attention_levels=[False, True, True], head_dim=8, groups=4, eps=1e-6,
                            flip_sin_to_cos=False, freq_shift=1),
}


def make_unet(name, dtype=np.float32, seed=0):
    """A UNet with every parameter moved off its initial value (norm weights included), so that a
    swapped pair of names cannot give the same output."""
    tinydiff.manual_seed(seed)
    m = UNet(**CONFIGS[name])
    rng = np.random.default_rng(seed)
    for p in m.parameters():
        p.data = (p.data + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)
    return m.to(dtype).eval()


def inputs(m, b=3, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, m.in_channels, m.height, m.height)).astype(np.float32)
    t = np.array([0, 137, 499][:b])
    c = None if m.num_classes is None else np.array([0, m.num_classes, 1][:b])   # the null class too
    return x, t, c


def rel_err(ours, theirs):
    """max |ours - theirs| / max |theirs|, printed."""
    err = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    print(f"largest difference {err:.3g} relative to the largest value")
    return err


# ---------------------------------------------------------------------------------------------
# Without diffusers: the table and the round trip


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_table_maps_every_name_one_to_one(name):
    m = make_unet(name)
    mapped = [diffusers_name(k) for k in m.state_dict()]
    assert len(set(mapped)) == len(mapped) == len(m.state_dict())
    assert diffusers_name("ups.1.resnets.2.emb_proj.weight") == "up_blocks.1.resnets.2.time_emb_proj.weight"
    assert diffusers_name("mid_attn.proj.bias") == "mid_block.attentions.0.to_out.0.bias"
    assert diffusers_name("downs.0.downsample.conv.weight") == "down_blocks.0.downsamplers.0.conv.weight"
    with pytest.raises(KeyError, match="no row"):
        diffusers_name("downs.0.resnets.0.gamma.weight")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_then_import_gives_the_same_model(tmp_path, name):
    m = make_unet(name)
    schedule = NoiseSchedule("cosine", 500)
    export_diffusers(m, tmp_path, schedule, objective="v", spacing="leading", clip_x0=True)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors", "scheduler"]
    back = load_diffusers_unet(tmp_path)
    assert back.config == m.config
    for k, v in m.state_dict().items():
        assert np.array_equal(back.state_dict()[k].numpy(), v.numpy()), k
    x, t, c = inputs(m)
    assert np.array_equal(back(Tensor(x), t, c).numpy(), m(Tensor(x), t, c).numpy())
    with open(tmp_path / "scheduler" / "scheduler_config.json") as f:
        sched = json.load(f)
    assert np.array_equal(np.array(sched["trained_betas"]), schedule.f64["beta"])     # exact float64
    assert (sched["prediction_type"], sched["timestep_spacing"], sched["clip_sample"],
            sched["num_train_timesteps"]) == ("v_prediction", "leading", True, 500)


def test_prediction_types():
    from tinydiff.diffusers_bridge import scheduler_config
    s = NoiseSchedule("linear", 10)
    assert [scheduler_config(s, o)["prediction_type"] for o in ("eps", "x0", "v")] == \
        ["epsilon", "sample", "v_prediction"]
    with pytest.raises(ValueError, match="objective"):
        scheduler_config(s, "score")


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("option, value", [
    ("resnet_time_scale_shift", "scale_shift"), ("class_embed_type", "timestep"), ("downsample_padding", 0),
    ("time_embedding_type", "fourier"), ("upsample_type", "resnet"), ("act_fn", "gelu"),
    ("mid_block_type", None), ("add_attention", False), ("center_input_sample", True),
    ("mid_block_scale_factor", 2), ("out_channels", 3), ("time_embedding_dim", 64),
    ("attn_norm_num_groups", 2), ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "UpBlock2D", "UpBlock2D"]), ("sample_size", [8, 16]),
    ("cross_attention_dim", 64)])
def test_unsupported_configs_are_refused_naming_the_option(tmp_path, option, value):
    m = make_unet("class-conditional")
    export_diffusers(m, tmp_path, NoiseSchedule("linear", 10))
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    config[option] = value
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=option):
        load_diffusers_unet(tmp_path)


def test_other_model_classes_and_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="only UNet2DModel"):
        unet_kwargs({"_class_name": "UNet2DConditionModel"})
    m = make_unet("class-conditional")
    export_diffusers(m, tmp_path, NoiseSchedule("linear", 10))
    os.replace(tmp_path / "diffusion_pytorch_model.safetensors", tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_diffusers_unet(tmp_path)
    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_diffusers_unet(tmp_path / "nothing")
    # weights of another size than the config says
    other = tmp_path / "other"
    export_diffusers(make_unet("unconditional"), other, NoiseSchedule("linear", 10))
    os.replace(other / "diffusion_pytorch_model.safetensors", tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="does not fit.*missing"):
        load_diffusers_unet(tmp_path)
    with pytest.raises(ValueError, match="only tinydiff's UNet"):
        export_diffusers(ContextUnet(1, n_feat=8, n_cfeat=3, height=8), tmp_path / "cu", NoiseSchedule("linear", 10))


def weights_file(tmp_path, name, cfg_changes):
    """A model.safetensors with a tinydiff run config in its metadata, as `tinydiff train` writes."""
    m = make_unet("class-conditional")
    cfg = dict(config.DEFAULTS, model="unet", n_feat=8, in_channels=1, num_classes=4, height=8,
               unet_layout="unet2d")
    cfg.update(cfg_changes)
    if cfg["unet_layout"] is None:
        del cfg["unet_layout"]                   # a run from before the key existed
    path = tmp_path / name
    save_weights(m, path, metadata={"tinydiff.config": json.dumps(cfg)})
    return path


def test_old_layout_runs_are_refused_naming_the_layout(tmp_path, capsys):
    old = weights_file(tmp_path, "old.safetensors", {"unet_layout": None})
    cfg = json.loads(tinydiff.checkpoint.read_safetensors(old)[1]["tinydiff.config"])
    assert "unet_layout" not in cfg
    with pytest.raises(CheckpointError, match="old layout 'unet-v1'.*'unet2d'"):
        runs.model_from_config(cfg)
    with pytest.raises(CheckpointError, match="old layout 'unet-v1'"):
        export_diffusers(str(old), tmp_path / "out")
    assert cli.main(["sample", "--checkpoint", str(old), "--n", "1", "--steps", "2", "--out", str(tmp_path / "s")]) == 1
    assert "old layout 'unet-v1'" in capsys.readouterr().err


def test_text_conditioned_and_contextunet_runs_are_refused_by_export(tmp_path):
    text = weights_file(tmp_path, "text.safetensors", {"text": True})
    with pytest.raises(ValueError, match="text-conditioned run cannot be exported.*cross-attention"):
        export_diffusers(str(text), tmp_path / "out")
    cu = ContextUnet(1, n_feat=8, n_cfeat=4, height=8)
    cfg = dict(config.DEFAULTS, model="contextunet", n_feat=8, in_channels=1, num_classes=4, height=8)
    save_weights(cu, tmp_path / "cu.safetensors", metadata={"tinydiff.config": json.dumps(cfg)})
    with pytest.raises(ValueError, match="--model contextunet run cannot be exported.*--model unet"):
        export_diffusers(str(tmp_path / "cu.safetensors"), tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Against diffusers (skipped, with the reason, where it or torch is missing)


def diffusers_or_skip():
    torch = pytest.importorskip("torch", reason="torch is not installed: the diffusers comparison needs it")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install diffusers")
    torch.set_num_threads(1)
    return torch, diffusers


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_table_names_are_unet2dmodels_names(name):
    torch, diffusers = diffusers_or_skip()
    m = make_unet(name)
    config = {k: v for k, v in diffusers_config(m).items() if not k.startswith("_")}
    theirs = {k: tuple(v.shape) for k, v in diffusers.UNet2DModel(**config).state_dict().items()}
    ours = {diffusers_name(k): tuple(v.shape) for k, v in m.state_dict().items()}
    assert ours == theirs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unet2dmodel_predicts_what_tinydiff_predicts(tmp_path, name, dtype):
    torch, diffusers = diffusers_or_skip()
    m = make_unet(name)
    export_diffusers(m, tmp_path, NoiseSchedule("linear", 500))
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path, torch_dtype=torch.float32 if dtype == np.float32
                                                   else torch.float64).eval()
    m = m.to(dtype)
    x, t, c = inputs(m)
    ours = m(Tensor(x.astype(dtype)), t, c).numpy()
    with torch.no_grad():
        out = theirs(torch.tensor(x.astype(dtype)), torch.tensor(t),
                     class_labels=None if c is None else torch.tensor(c)).sample.numpy()
    assert out.dtype == dtype and out.shape == ours.shape
    # float64: diffusers computes the sinusoidal time embedding in float32, hence 1e-6 not 1e-12
    assert rel_err(ours, out) < (1e-4 if dtype == np.float32 else 1e-6)


@pytest.mark.parametrize("objective, spacing, schedule, eta", [
    ("eps", "trailing", "linear", 0.0), ("v", "leading", "cosine", 0.0), ("x0", "trailing", "linear", 0.0),
    ("eps", "trailing", "linear", 1.0)])
def test_ddim_loop_with_diffusers_scheduler_gives_tinydiffs_images(tmp_path, objective, spacing, schedule, eta):
    """20 DDIM steps (T = 500, so 20 divides T: diffusers' t - T // steps is our previous timestep)
    from the same x_T; with eta = 1 the same noise z at each step (diffusers' variance_noise). The
    model is random, so its images reach tens; with eta = 1 the cosine schedule (alpha_bar near 0 at
    T) would blow them up to 1e4, so that case uses the linear one."""
    torch, diffusers = diffusers_or_skip()
    m = make_unet("class-conditional")
    sched = NoiseSchedule(schedule, 500)
    export_diffusers(m, tmp_path, sched, objective=objective, spacing=spacing)
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    shape, labels = (4, 1, 8, 8), np.array([0, 1, 3, 4])                # 4: the null class
    ours = ddim_sample(m, sched, shape, labels, steps=20, eta=eta, spacing=spacing, seed=7, objective=objective)

    rng = Philox(7)                               # ddim_sample's draws: x_T first, then z per noisy step
    x = torch.tensor(rng.normal(shape, np.float32))
    scheduler.set_timesteps(20)
    steps = scheduler.timesteps.tolist()
    assert steps[0] == (499 if spacing == "trailing" else 475) and len(steps) == 20
    with torch.no_grad():
        for i, t in enumerate(steps):
            out = unet(x, t, class_labels=torch.tensor(labels)).sample
            noise = None
            if eta > 0 and i < len(steps) - 1:
                noise = torch.tensor(rng.normal(shape, np.float32))
            x = scheduler.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
    theirs = x.numpy()
    err = float(np.abs(ours - theirs).max())
    print(f"largest difference {err:.3g}, images in [{theirs.min():.2f}, {theirs.max():.2f}]")
    assert err < 1e-3


# ---------------------------------------------------------------------------------------------
# The command, end to end


def test_cli_export_of_a_trained_unet_run(tmp_path, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "exported"
    assert cli.main(["train", "--out", str(run_dir), "--model", "unet", "--n-feat", "8", "--steps", "3",
                     "--batch-size", "8", "--timesteps", "40", "--sample-steps", "2",
                     "--sample-per-class", "1", "--quiet"]) == 0
    with open(run_dir / "config.json") as f:
        assert json.load(f)["unet_layout"] == "unet2d"
    with pytest.raises(SystemExit):          # --out is required
        cli.main(["export", "--checkpoint", str(run_dir), "--format", "diffusers"])
    with pytest.raises(SystemExit):          # diffusers is the only format
        cli.main(["export", "--checkpoint", str(run_dir), "--format", "onnx", "--out", str(out)])
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(run_dir), "--format", "diffusers", "--out", str(out)]) == 0
    model, schedule, cfg = runs.load_run(str(run_dir))             # the EMA weights, as `tinydiff sample`
    back = load_diffusers_unet(out)
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)
    t, c = np.array([3, 39]), np.array([2, 10])
    ours = model(Tensor(x), t, c).numpy()
    assert np.array_equal(back(Tensor(x), t, c).numpy(), ours)
    with open(out / "scheduler" / "scheduler_config.json") as f:
        sched = json.load(f)
    assert sched["num_train_timesteps"] == 40 and sched["prediction_type"] == "epsilon"
    assert np.array_equal(sched["trained_betas"], schedule.f64["beta"])
    # the same run with its config from before `unet_layout` existed: --resume is refused, naming it
    with open(run_dir / "config.json") as f:
        saved = json.load(f)
    del saved["unet_layout"]
    with open(run_dir / "config.json", "w") as f:
        json.dump(saved, f)
    capsys.readouterr()
    assert cli.main(["train", "--out", str(run_dir), "--resume", "--steps", "4", "--quiet"]) == 1
    assert "old layout 'unet-v1'" in capsys.readouterr().err
    # a ContextUnet run is refused with the reason
    cu_dir = tmp_path / "cu"
    assert cli.main(["train", "--out", str(cu_dir), "--n-feat", "8", "--steps", "1", "--batch-size", "8",
                     "--timesteps", "10", "--sample-steps", "2", "--sample-per-class", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(cu_dir), "--format", "diffusers", "--out", str(tmp_path / "x")]) == 1
    assert "--model contextunet run cannot be exported" in capsys.readouterr().err
    try:
        torch, diffusers = diffusers_or_skip()
    except pytest.skip.Exception:
        return                                   # the tinydiff half of the test has run
    with torch.no_grad():
        theirs = diffusers.UNet2DModel.from_pretrained(out).eval()(torch.tensor(x), torch.tensor(t),
                                                                  class_labels=torch.tensor(c)).sample.numpy()
    assert rel_err(ours, theirs) < 1e-4
