"""Text runs through the `tinydiff` command at a tiny size: train --text, sample --prompt, eval;
the refusals; the checkpoint round trip with the vocabulary; exact resume (the captions' generator
included)."""
import json
import os

import numpy as np
import pytest

from test_cli import TINY, assert_same_run, run
from tinydiff import checkpoint, runs
from tinydiff.captions import caption_vocabulary
from tinydiff.samplers import TEXT_SAMPLING, nfe
from tinydiff.tensor import no_grad


def train_state(run_dir):
    """The step and JSON state (generator, data position, the captions' generator) of a run's newest checkpoint."""
    info = checkpoint.load_checkpoint(str(run_dir))
    with open(os.path.join(info["dir"], "train_state.json")) as f:
        return info["step"], json.load(f)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "run"
    assert run("train", "--data", "digits", "--text", "--out", out, "--steps", 6, "--lr-schedule", "constant",
               *TINY) == 0
    return out


@pytest.fixture(scope="module")
def label_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("labels") / "run"
    assert run("train", "--out", out, "--steps", 2, *TINY) == 0
    return out


def test_a_text_run_holds_its_vocabulary_in_config_and_weights(text_run):
    cfg = json.loads((text_run / "config.json").read_text())
    assert cfg["text"] is True and cfg["model"] == "text_unet" and cfg["vocabulary"] == caption_vocabulary()
    _, metadata = checkpoint.read_safetensors(str(text_run / "model.safetensors"))
    assert json.loads(metadata["tinydiff.config"])["vocabulary"] == caption_vocabulary()
    step, state = train_state(text_run)
    assert step == 6 and state["extra"]["caption_rng"]["bit_generator"] == "PCG64"
    for name in ("loss.png", "samples.png"):
        assert os.path.getsize(text_run / name) > 0


def test_the_weights_file_alone_rebuilds_the_same_model(text_run):
    """The checkpoint round trip: model.safetensors alone (its metadata) gives the run folder's model."""
    a, schedule, _ = runs.load_run(str(text_run))
    b, _, _ = runs.load_run(str(text_run / "model.safetensors"))
    assert b.tokenizer.words == caption_vocabulary() and type(b).__name__ == "TextUNet"
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)
    t = np.array([3, 7])
    from tinydiff.diffusion import call_model
    with no_grad():
        c = a.context(["a thick 7", ""])
        np.testing.assert_array_equal(call_model(a, schedule, x, t, c), call_model(b, schedule, x, t, c))


def test_resume_of_a_text_run_is_exact(tmp_path, text_run):
    part = tmp_path / "part"
    assert run("train", "--data", "digits", "--text", "--out", part, "--steps", 3, "--lr-schedule", "constant",
               *TINY) == 0
    first = train_state(part)[1]["extra"]["caption_rng"]
    assert run("train", "--out", part, "--steps", 6, "--resume", "--quiet") == 0      # --text from the run
    assert_same_run(text_run, part)                                                  # bit for bit, at step 6
    assert train_state(text_run)[1]["extra"] == train_state(part)[1]["extra"]
    assert first != train_state(part)[1]["extra"]["caption_rng"]                    # it moved on, and was kept


def test_sample_writes_prompts_grouped_with_their_labels(tmp_path, text_run, capsys):
    out = tmp_path / "s"
    prompts = ["a thick 7", "", "the digit 3, leaning left"]
    assert run("sample", "--checkpoint", text_run, *[a for p in prompts for a in ("--prompt", p)], "--n", 2,
               "--steps", 3, "--guidance", 2.0, "--out", out) == 0
    with np.load(out / "samples.npz") as z:                                         # no pickle needed
        images, labels, saved = z["images"], z["labels"], z["prompts"]
    assert images.shape == (6, 1, 16, 16) and images.dtype == np.float32 and 0 <= images.min() <= images.max() <= 1
    assert saved.dtype.kind == "U" and saved.tolist() == [p for p in prompts for _ in range(2)]
    assert labels.dtype == np.int64 and labels.tolist() == [7, 7, -1, -1, 3, 3]
    assert os.path.getsize(out / "samples.png") > 0
    # the same seed, from the weights file alone: the same images
    again = tmp_path / "again"
    assert run("sample", "--checkpoint", text_run / "model.safetensors", *[a for p in prompts for a in ("--prompt", p)],
               "--n", 2, "--steps", 3, "--guidance", 2.0, "--out", again) == 0
    with np.load(again / "samples.npz") as z:
        np.testing.assert_array_equal(z["images"], images)
    # eval: prompt fidelity beside accuracy and distance, the unnamed prompt left out of the accuracy
    capsys.readouterr()
    assert run("eval", "--samples", out / "samples.npz") == 0
    printed = capsys.readouterr().out
    assert "(the prompts naming a digit): 4 samples" in printed and "conditional accuracy" in printed
    assert "prompt fidelity" in printed and "'the digit 3, leaning left'" in printed and "''" in printed


def test_a_text_run_samples_with_the_text_default(tmp_path, text_run, capsys):
    assert run("sample", "--checkpoint", text_run, "--n", 1, "--out", tmp_path / "d") == 0
    printed = capsys.readouterr().out
    steps = min(TEXT_SAMPLING["steps"], 10)                                          # T = 10 here
    assert (f"{TEXT_SAMPLING['sampler'].upper()}-{steps}" in printed and f"guidance {TEXT_SAMPLING['guidance']}" in printed
            and f"{nfe(TEXT_SAMPLING['sampler'], steps, TEXT_SAMPLING['guidance'] != 1)} network evaluations" in printed), printed
    assert nfe(TEXT_SAMPLING["sampler"], TEXT_SAMPLING["steps"], TEXT_SAMPLING["guidance"] != 1) <= 50
    with np.load(tmp_path / "d" / "samples.npz") as z:                              # default: each numeral
        assert z["prompts"].tolist() == [str(k) for k in range(10)] and z["labels"].tolist() == list(range(10))


def test_an_unknown_word_is_warned_and_a_long_prompt_refused(tmp_path, text_run, capsys):
    with pytest.warns(UserWarning, match="unknown word 'sparkly'"):
        assert run("sample", "--checkpoint", text_run, "--prompt", "a sparkly seven", "--n", 1, "--steps", 2,
                   "--out", tmp_path / "u") == 0
    with pytest.raises(SystemExit) as err:
        run("sample", "--checkpoint", text_run, "--prompt", " ".join(["seven"] * 17), "--n", 1, "--out", tmp_path / "l")
    assert err.value.code == 2 and "has 17 tokens, more than the 16" in capsys.readouterr().err


@pytest.mark.parametrize("which, argv, message", [
    ("text", ["--labels", "1,2"], "is a text run, conditioned on prompts: ask with --prompt"),
    ("label", ["--prompt", "a thick 7"], "is conditioned on class labels, not text"),
])
def test_sample_refuses_the_other_kind_of_context(which, argv, message, text_run, label_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        run("sample", "--checkpoint", text_run if which == "text" else label_run, *argv, "--out", tmp_path)
    assert err.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--data", "DATA", "--text"], "--text: captions are derived for the digits only"),
    (["--text", "--model", "unet"], "--text trains --model text_unet"),
    (["--model", "text_unet"], "got --model text_unet without --text"),
])
def test_train_refuses_text_where_it_cannot_work(argv, message, tmp_path, capsys):
    argv = [str(tmp_path) if a == "DATA" else a for a in argv]
    with pytest.raises(SystemExit) as err:
        run("train", "--out", tmp_path / "r", *argv, "--steps", 1, *TINY)
    assert err.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_text_is_fixed_on_resume(label_run, capsys):
    with pytest.raises(SystemExit):
        run("train", "--out", label_run, "--resume", "--text", "--quiet")
    assert "--text True differs from the run's False" in capsys.readouterr().err


def test_a_run_saved_before_text_existed_resumes_as_a_label_run(label_run, tmp_path, capsys):
    import shutil
    old = tmp_path / "old"
    shutil.copytree(label_run, old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["text"]                                           # as runs before the setting was written
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit):
        run("train", "--out", old, "--resume", "--text", "--quiet")
    assert "--text True differs from the run's False" in capsys.readouterr().err
    assert run("train", "--out", old, "--resume", "--steps", 3, "--quiet") == 0
    assert json.loads((old / "config.json").read_text())["text"] is False


def test_export_refuses_a_text_run(text_run, tmp_path, capsys):
    assert run("export", "--checkpoint", text_run, "--format", "diffusers", "--out", tmp_path / "d") == 1
    assert "text-conditioned run cannot be exported" in capsys.readouterr().err


def test_text_picks_its_own_defaults_and_a_flag_still_wins(tmp_path):
    from tinydiff.config import DEFAULTS, TEXT_DEFAULTS, resolve_config
    cfg = resolve_config({"out": str(tmp_path / "a"), "text": True}, resume=False)
    assert {k: cfg[k] for k in TEXT_DEFAULTS} == TEXT_DEFAULTS == {"model": "text_unet", "n_feat": 16}
    assert resolve_config({"out": str(tmp_path / "b"), "text": True, "n_feat": 24}, resume=False)["n_feat"] == 24
    assert resolve_config({"out": str(tmp_path / "c")}, resume=False)["n_feat"] == DEFAULTS["n_feat"]
