"""Each demo runs end to end at a tiny size and writes valid pictures.

The demos run as the README shows them, `python demos/NN_name.py ...`, in a subprocess. Demo 02
trains one tiny run (module fixture) that demos 04-06 sample from with --checkpoint; demo 03
runs with --tiny alone, so the path that trains its own throwaway model is tested too.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMOS = os.path.join(ROOT, "demos")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_demo(name, *args, ok=True):
    env = dict(os.environ)
    # On a busy machine, OpenMP's and OpenBLAS's spinning worker threads make tiny ops 10-50x slower;
    # the demos' results do not depend on threads, so the test runs them single-minded.
    env.setdefault("OMP_WAIT_POLICY", "passive")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(DEMOS, name), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if not ok:
        return proc
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def assert_png(path):
    from PIL import Image
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] >= 16 and img.size[1] >= 16, (path, img.size)


def assert_gif(path, min_frames=2):
    from PIL import Image
    with open(path, "rb") as f:
        assert f.read(6) in (b"GIF87a", b"GIF89a"), f"{path} is not a GIF"
    with Image.open(path) as img:
        assert img.n_frames >= min_frames, (path, img.n_frames)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo02") / "run"
    out = run_demo("02_train_digits.py", "--tiny", "--out", run)
    assert "conditional accuracy" in out and "Frechet distance" in out      # it scored its samples
    return run


def test_01_forward_process(tmp_path):
    out = run_demo("01_forward_process.py", "--out", tmp_path)
    assert "log SNR" in out
    for name in ("noising.png", "log_snr.png"):
        assert_png(tmp_path / name)


def test_02_train_digits(tiny_run):
    for name in ("loss.png", "samples.png", "eval_samples.png"):
        assert_png(tiny_run / name)
    assert (tiny_run / "model.safetensors").stat().st_size > 0 and (tiny_run / "checkpoint.json").exists()
    again = run_demo("02_train_digits.py", "--tiny", "--out", tiny_run, ok=False)   # never overwrites a run
    assert again.returncode != 0 and "already holds a training run" in again.stderr
    assert "Traceback" not in again.stderr


def test_02_config_is_the_default_training_run():
    """The README's quick start (demo 02) and `tinydiff train` with no flags train the same model."""
    from tinydiff import config
    spec = importlib.util.spec_from_file_location("demo02", os.path.join(DEMOS, "02_train_digits.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    for key, value in demo.CONFIG.items():
        assert config.DEFAULTS[key] == value, f"demo 02 CONFIG[{key!r}] = {value!r}, config.DEFAULTS has {config.DEFAULTS[key]!r}"


def test_03_sampling_trains_its_own_tiny_model(tmp_path):
    out = run_demo("03_sampling.py", "--tiny", "--out", tmp_path)
    assert "without the added noise" in out
    assert_png(tmp_path / "ddpm_grid.png")
    assert_png(tmp_path / "ablation.png")
    assert_gif(tmp_path / "denoising.gif", min_frames=5)
    assert (tmp_path / "tiny_run" / "model.safetensors").exists()


def test_04_context(tmp_path, tiny_run):
    run_demo("04_context.py", "--tiny", "--checkpoint", tiny_run, "--out", tmp_path)
    assert_png(tmp_path / "context_grid.png")
    assert_png(tmp_path / "mixed_context.png")


def test_05_fast_sampling(tmp_path, tiny_run):
    run_demo("05_fast_sampling.py", "--tiny", "--checkpoint", tiny_run, "--out", tmp_path)
    assert_png(tmp_path / "fast_sampling.png")
    table = (tmp_path / "fast_sampling.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| DD")]
    assert len(rows) == 6, table                                   # DDIM and DDPM at 2, 5 and T = 20 steps
    assert any(r.startswith("| DDPM (Alg. 2) | 20 |") for r in rows), table


def test_06_guidance(tmp_path, tiny_run):
    run_demo("06_guidance.py", "--tiny", "--checkpoint", tiny_run, "--out", tmp_path)
    for name in ("guidance_sweep.png", "cfg_grid.png", "classifier_grid.png"):
        assert_png(tmp_path / name)
    text = (tmp_path / "guidance.md").read_text()
    assert "Classifier-free guidance" in text and "Classifier guidance" in text


def test_07_kernels(tmp_path):
    run_demo("07_kernels.py", "--tiny", "--out", tmp_path)
    assert_png(tmp_path / "kernels.png")
    rows = [line.split("|") for line in (tmp_path / "kernels.md").read_text().splitlines()
            if line.startswith("| NumPy") or line.startswith("| C++")]
    assert rows and rows[0][1].strip().startswith("NumPy reference")
    for row in rows:                     # every implementation computes the reference's gradients
        assert float(row[-2]) < 1e-4, row
