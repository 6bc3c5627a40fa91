"""The `tinydiff` command end to end, at a tiny size: train, checkpoint, resume (bit for bit),
Ctrl-C, NaN, sample, eval, and clear errors for bad data and bad arguments."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tinydiff import cli, checkpoint, runs
from tinydiff.philox import Philox
from tinydiff.samplers import DEFAULT_SAMPLING
from tinydiff import train as training

TINY = ["--n-feat", "8", "--batch-size", "8", "--timesteps", "10", "--sample-steps", "2",
        "--sample-per-class", "1", "--quiet"]


def run(*argv):
    return cli.main([str(a) for a in argv])


def final_state(run_dir):
    """Every array and the generator state of a run's newest checkpoint."""
    info = checkpoint.load_checkpoint(str(run_dir))
    arrays = {}
    for f in ("model", "ema", "train_state"):
        for k, v in checkpoint.read_safetensors(os.path.join(info["dir"], f + ".safetensors"))[0].items():
            arrays[f"{f}/{k}"] = v
    with open(os.path.join(info["dir"], "train_state.json")) as f:
        rng = json.load(f)["rng"]
    return info["step"], arrays, rng


def assert_same_run(a, b):
    step_a, arrays_a, rng_a = final_state(a)
    step_b, arrays_b, rng_b = final_state(b)
    assert step_a == step_b
    assert sorted(arrays_a) == sorted(arrays_b)
    for k in arrays_a:
        np.testing.assert_array_equal(arrays_a[k], arrays_b[k], err_msg=k)   # bitwise
    assert rng_a == rng_b


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 8-step run with the default (linear-decay) schedule, checkpoint every 4."""
    out = tmp_path_factory.mktemp("runs") / "full"
    assert run("train", "--out", out, "--steps", 8, "--checkpoint-every", 4, *TINY) == 0
    return out


def test_train_writes_run_folder(reference):
    for name in ("config.json", "checkpoint.json", "model.safetensors", "loss.png", "samples.png"):
        assert os.path.getsize(reference / name) > 0, name
    step, arrays, _ = final_state(reference)
    assert step == 8 and "ema/out.3.weight" in arrays and "train_state/extra.losses" in arrays
    assert len(arrays["train_state/extra.losses"]) == 8
    cfg = json.loads((reference / "config.json").read_text())
    assert (cfg["n_feat"], cfg["num_classes"], cfg["in_channels"], cfg["height"]) == (8, 10, 1, 16)
    from PIL import Image
    with Image.open(reference / "samples.png") as im:         # 10 rows (classes) x 1 column, 4x scale
        assert im.size == ((16 + 2) * 4, (10 * 17 + 1) * 4)


def test_resume_extends_a_run_exactly(tmp_path, reference):
    # with a constant learning rate, 4 steps then 4 more equal 8 steps in one go
    full, part = tmp_path / "full", tmp_path / "part"
    assert run("train", "--out", full, "--steps", 8, "--lr-schedule", "constant", *TINY) == 0
    assert run("train", "--out", part, "--steps", 4, "--lr-schedule", "constant", *TINY) == 0
    assert final_state(part)[0] == 4
    assert run("train", "--out", part, "--steps", 8, "--resume", "--quiet") == 0
    assert_same_run(full, part)


def test_ctrl_c_then_resume_equals_uninterrupted(tmp_path, reference, monkeypatch, capsys):
    calls = []
    real_loss = training.training_loss

    def loss_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)        # as if the user pressed Ctrl-C in step 3
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "training_loss", loss_then_ctrl_c)
    out = tmp_path / "run"
    assert run("train", "--out", out, "--steps", 8, "--checkpoint-every", 4, *TINY) == 0
    assert "stopped at step 3/8" in capsys.readouterr().out
    assert final_state(out)[0] == 3 and os.path.exists(out / "samples.png")
    monkeypatch.setattr(training, "training_loss", real_loss)
    assert run("train", "--out", out, "--resume", "--quiet") == 0
    assert_same_run(reference, out)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    real_loss = training.training_loss
    calls = []

    def loss_nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(training, "training_loss", loss_nan_at_step_3)
    out = tmp_path / "run"
    assert run("train", "--out", out, "--steps", 6, "--checkpoint-every", 2, *TINY) == 1
    err = capsys.readouterr().err
    assert "step 3: the loss is nan" in err
    info = checkpoint.load_checkpoint(str(out))              # the step-2 checkpoint, complete
    assert info["step"] == 2
    model = runs.model_from_config(info["config"])
    checkpoint.load_checkpoint(str(out), model)
    assert all(np.isfinite(p.data).all() for p in model.parameters())


def test_time_budget_stops_with_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "--out", out, "--steps", 50, "--time-budget", 1e-6, *TINY) == 0
    assert "stopped at step 1/50 (time budget)" in capsys.readouterr().out
    assert final_state(out)[0] == 1


def test_sample_outputs(tmp_path, reference):
    out = tmp_path / "s"
    assert run("sample", "--checkpoint", reference, "--steps", 3, "--labels", "3,1", "--n", 2,
               "--guidance", 2.0, "--out", out, "--gif") == 0
    with np.load(out / "samples.npz") as z:
        images, labels = z["images"], z["labels"]
    assert images.shape == (4, 1, 16, 16) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    assert labels.dtype == np.int64 and labels.tolist() == [3, 3, 1, 1]
    assert os.path.getsize(out / "samples.png") > 0 and os.path.getsize(out / "denoising.gif") > 0
    # the same seed gives the same images; the weights file gives the run folder's (EMA) result
    again = tmp_path / "again"
    assert run("sample", "--checkpoint", reference / "model.safetensors", "--steps", 3, "--labels", "3,1",
               "--n", 2, "--guidance", 2.0, "--out", again) == 0
    with np.load(again / "samples.npz") as z:
        np.testing.assert_array_equal(z["images"], images)
    # DDPM over all T steps, default labels (all 10 classes)
    assert run("sample", "--checkpoint", reference, "--sampler", "ddpm", "--n", 1, "--out", out) == 0
    with np.load(out / "samples.npz") as z:
        assert z["images"].shape == (10, 1, 16, 16) and z["labels"].tolist() == list(range(10))


@pytest.mark.parametrize("sampler, nfe", [("heun", 2 * (2 * 3 - 1)), ("dpm++2m", 2 * 3), ("dpm++2m-sde", 2 * 3),
                                          ("euler", 2 * 3)])
def test_sample_with_an_ode_solver(tmp_path, reference, capsys, sampler, nfe):
    """--sampler heun|dpm++2m|dpm++2m-sde|euler: the library's sampler, its network evaluations printed
    (guidance doubles them)."""
    from tinydiff import samplers
    from tinydiff.tensor import no_grad
    assert run("sample", "--checkpoint", reference, "--sampler", sampler, "--steps", 3, "--labels", "2,5",
               "--n", 1, "--guidance", 2, "--out", tmp_path) == 0
    assert f"{sampler.upper()}-3, guidance 2.0, {nfe} network evaluations (NFE) per image" in capsys.readouterr().out
    with np.load(tmp_path / "samples.npz") as z:
        images = z["images"]
    model, schedule, cfg = runs.load_run(str(reference), "cpu")
    sample = {"heun": samplers.heun_sample, "dpm++2m": samplers.dpm_solver_sample,
              "dpm++2m-sde": samplers.dpm_solver_sde_sample, "euler": samplers.euler_sample}[sampler]
    with no_grad():
        x = sample(model, schedule, images.shape, model.context(np.array([2, 5])), steps=3, guidance_scale=2.0,
                   generator=Philox(0), objective=cfg["objective"])
    np.testing.assert_allclose(images, np.clip((x + 1) / 2, 0, 1), atol=1e-6)


def test_unet_trains_and_samples(tmp_path):
    from tinydiff.diffusion import NoiseSchedule
    from tinydiff.samplers import sample
    from tinydiff.tensor import no_grad
    out = tmp_path / "unet"
    assert run("train", "--out", out, "--model", "unet", "--steps", 2, *TINY) == 0
    assert run("sample", "--checkpoint", out, "--steps", 2, "--n", 2, "--labels", "0,7", "--guidance", 3) == 0
    with np.load(out / "samples" / "samples.npz") as z:
        images, labels = z["images"], z["labels"]
    assert images.shape == (4, 1, 16, 16) and labels.tolist() == [0, 0, 7, 7]
    # the images are the default sampler's, 2 steps (seed 0), of the run's EMA weights, class indices as
    # the UNet's context, guidance 3; the same samples without guidance differ, so the check sees guidance
    cfg, weights = runs.find_weights(str(out))
    assert cfg["model"] == "unet" and weights.endswith("ema.safetensors")
    model = checkpoint.load_weights(runs.model_from_config(cfg), weights).eval()
    schedule = NoiseSchedule(cfg["schedule"], cfg["timesteps"])
    with no_grad():
        x = {s: sample(DEFAULT_SAMPLING["sampler"], model, schedule, images.shape, labels, steps=2,
                       generator=Philox(0), objective=cfg["objective"], guidance_scale=s) for s in (3.0, 1.0)}
    np.testing.assert_allclose(images, np.clip((x[3.0] + 1) / 2, 0, 1), atol=1e-6)
    assert np.abs(np.clip((x[1.0] + 1) / 2, 0, 1) - images).max() > 1e-3


def test_bad_data_is_refused(tmp_path, capsys):
    assert run("train", "--out", tmp_path / "a", "--data", tmp_path / "missing", *TINY) == 1
    assert "missing: no such file or folder" in capsys.readouterr().err
    np.save(tmp_path / "sprites_1788_16x16.npy", np.zeros((4, 16, 16), np.uint8))
    np.save(tmp_path / "sprite_labels_nc_1788_16x16.npy", np.eye(5)[:4])
    assert run("train", "--out", tmp_path / "b", "--data", tmp_path, *TINY) == 1
    assert "sprites_1788_16x16.npy: sprites must be (N, H, W, 3) images, got shape (4, 16, 16)" \
        in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["sample", "--checkpoint", "RUN", "--labels", "1,x"], "expected class numbers separated by commas"),
    (["sample", "--checkpoint", "RUN", "--n", "0"], "expected a positive integer, got 0"),
    (["sample", "--checkpoint", "RUN", "--sampler", "dpm"], "invalid choice: 'dpm'"),
    (["sample", "--checkpoint", "RUN", "--sampler", "ddpm", "--steps", "5"], "ddpm takes all T = 10 steps"),
    (["sample", "--checkpoint", "RUN", "--sampler", "euler", "--steps", "11"], "trained with 10 timesteps"),
    (["sample", "--checkpoint", "RUN", "--sampler", "heun", "--steps", "0"], "expected a positive integer, got 0"),
    (["sample", "--checkpoint", "RUN", "--sampler", "heun", "--eta", "0.5"], "--eta: only ddim takes it"),
    (["sample", "--checkpoint", "RUN", "--sampler", "ddpm", "--eta", "1"], "--eta: only ddim takes it"),
    (["sample", "--checkpoint", "RUN", "--sampler", "dpm++2m", "--spacing", "leading"], "--spacing: only ddim takes it"),
    (["sample", "--checkpoint", "RUN", "--labels", "12"], "the model knows classes 0..9, got 12"),
    (["sample", "--checkpoint", "RUN", "--steps", "11"], "trained with 10 timesteps"),
    (["sample", "--checkpoint", "RUN", "--eta", "-1"], "expected a number >= 0"),
    (["train", "--out", "RUN", "--steps", "9"], "already holds a training run: pass --resume"),
    (["train", "--out", "RUN", "--resume", "--n-feat", "16"], "--n-feat 16 differs from the run's 8"),
    (["train", "--out", "NEW", "--resume"], "no checkpoint to resume"),
    (["train", "--out", "NEW", "--n-feat", "12"], "n_feat must be divisible by 8"),
    (["train", "--out", "NEW", "--context-drop", "1.5"], "--context-drop must be in [0, 1)"),
    (["train", "--out", "NEW", "--batch-size", "5000"], "larger than the data set (1497 images)"),
    (["train", "--out", "NEW", "--schedule", "quadratic"], "invalid choice: 'quadratic'"),
    (["bake"], "invalid choice: 'bake'"),
])
def test_bad_arguments(reference, tmp_path, capsys, argv, message):
    argv = [str(reference) if a == "RUN" else str(tmp_path / "new") if a == "NEW" else a for a in argv]
    with pytest.raises(SystemExit) as exit:
        cli.main(argv + (["--quiet", "--steps", "1"] if argv[0] == "train" and "--steps" not in argv else []))
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_sample_defaults_per_sampler(tmp_path, reference, capsys):
    """No --sampler: DEFAULT_SAMPLING's sampler and steps; --sampler ddim alone: DDIM_SAMPLING's steps
    and eta (the reference run has T = 10, so both step counts are capped at 10)."""
    from tinydiff.samplers import DDIM_SAMPLING
    assert run("sample", "--checkpoint", reference, "--n", 1, "--out", tmp_path / "a") == 0
    d = DEFAULT_SAMPLING
    assert f"with {d['sampler'].upper()}-{min(d['steps'], 10)}, guidance 1.0" in capsys.readouterr().out
    assert run("sample", "--checkpoint", reference, "--sampler", "ddim", "--n", 1, "--out", tmp_path / "b") == 0
    assert f"with DDIM-10 eta {DDIM_SAMPLING['eta']}, guidance 1.0" in capsys.readouterr().out


def test_sample_refuses_a_folder_without_a_run(tmp_path, capsys):
    assert run("sample", "--checkpoint", tmp_path) == 1
    assert "not a run folder (no checkpoint.json)" in capsys.readouterr().err


def test_sample_refuses_a_missing_run_naming_it(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert run("sample", "--checkpoint", missing) == 1              # a message, not a traceback
    err = capsys.readouterr().err
    assert f"tinydiff sample: error: {missing}: no such run folder or weights file" in err
    with pytest.raises(FileNotFoundError, match="nowhere"):         # the library raises, never exits
        runs.load_run(str(missing))


def test_load_run_gives_the_run_that_train_wrote(reference):
    """runs.load_run is what `tinydiff sample` and the demos use: EMA weights, eval mode, the config."""
    model, schedule, cfg = runs.load_run(str(reference))
    assert not model.training and schedule.T == cfg["timesteps"] and cfg["n_feat"] == 8
    ema = checkpoint.read_safetensors(str(reference / "model.safetensors"))[0]
    for name, t in model.state_dict().items():
        np.testing.assert_array_equal(t.numpy(), ema[name], err_msg=name)


def test_python_dash_m_help():
    for argv in ([], ["train"], ["sample"]):
        result = subprocess.run([sys.executable, "-m", "tinydiff", *argv, "--help"], capture_output=True,
                                text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=60)
        assert result.returncode == 0, result.stderr
        assert "usage: tinydiff" in result.stdout
    assert "--context-drop" in result.stdout or "--guidance" in result.stdout
