"""Smoke test of an installed tinydiff (a wheel in a fresh venv), run from outside the source tree:
import, the compiled kernels and the shipped classifier, one training step, sampling, eval, info.

    python -m venv /tmp/venv && /tmp/venv/bin/pip install dist/tinydiff-*.whl
    cd /tmp && /tmp/venv/bin/python /path/to/tinydiff/scripts/smoke_installed.py

.ci/run does this after the README's two commands. Exits non-zero (an AssertionError or the failing
command's output) on any failure.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

import tinydiff

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_TREE = os.path.dirname(HERE)

# --- the installed package, not the checkout
package = os.path.dirname(os.path.abspath(tinydiff.__file__))
assert not package.startswith(SOURCE_TREE + os.sep), f"tinydiff was imported from the source tree: {package}"
assert "site-packages" in package, f"tinydiff is not an installed package: {package}"
print("tinydiff from", package)

# --- import tinydiff reaches the models, the diffusion and the samplers, and the built kernels
assert tinydiff.models.ContextUnet and tinydiff.models.UNet
assert tinydiff.diffusion.NoiseSchedule and tinydiff.samplers.ddim_sample
assert tinydiff.backend.native is not None, tinydiff.backend.native_error
assert os.path.getsize(os.path.join(package, "digits_classifier.safetensors")) > 0   # package data
print("kernels:", tinydiff.backend.native.build_info())


def tinydiff_command(*argv):
    """`tinydiff ARGV...` through the installed console script (next to this Python)."""
    script = os.path.join(os.path.dirname(sys.executable), "tinydiff")
    run = subprocess.run([script, *map(str, argv)], capture_output=True, text=True)
    assert run.returncode == 0, f"tinydiff {' '.join(map(str, argv))} failed:\n{run.stdout}{run.stderr}"
    return run.stdout


with tempfile.TemporaryDirectory() as tmp:
    run_dir = os.path.join(tmp, "run")
    # --- one training step of a tiny ContextUnet on the embedded digits
    tinydiff_command("train", "--out", run_dir, "--steps", 1, "--n-feat", 8, "--batch-size", 8,
                     "--timesteps", 10, "--sample-steps", 2, "--sample-per-class", 1, "--quiet")
    assert os.path.getsize(os.path.join(run_dir, "model.safetensors")) > 0
    # --- sampling (DDIM, guided) and eval with the shipped classifier
    samples = os.path.join(tmp, "samples")
    tinydiff_command("sample", "--checkpoint", run_dir, "--steps", 2, "--labels", "0,7", "--n", 2,
                     "--guidance", 2.0, "--out", samples)
    with np.load(os.path.join(samples, "samples.npz")) as z:
        assert z["images"].shape == (4, 1, 16, 16) and np.isfinite(z["images"]).all()
    report = tinydiff_command("eval", "--samples", os.path.join(samples, "samples.npz"))
    assert "accuracy" in report.lower(), report
    print(report.strip())
    print(tinydiff_command("info").strip())
print("smoke test of the installed package: OK")
