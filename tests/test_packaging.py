"""The package as pip sees it: every third-party module tinydiff/ imports is a declared dependency
(or, for CuPy, an optional one), every declared dependency is imported, the sdist's manifest takes
every source setup.py compiles, and `import tinydiff` reaches its submodules as attributes.
The installed wheel itself is tested by scripts/smoke_installed.py, which .ci/run runs in a fresh venv."""
import ast
import fnmatch
import glob
import os
import re
import subprocess
import sys

import pytest

from tinydiff import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the import name of each distribution that tinydiff declares
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "cupy": "cupy-cuda13x", "cupyx": "cupy-cuda13x"}


def pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python >= 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def third_party_imports():
    """{top-level module: first file that imports it} over tinydiff/*.py, standard library excluded."""
    found = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "tinydiff", "*.py"))):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                if top != "tinydiff" and top not in sys.stdlib_module_names:
                    found.setdefault(top, os.path.relpath(path, ROOT))
    return found


def requirement_name(spec):
    return re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower()


def test_declared_dependencies_are_the_imports():
    project = pyproject()["project"]
    required = {requirement_name(s) for s in project["dependencies"]}
    optional = {requirement_name(s) for specs in project["optional-dependencies"].values() for s in specs}
    imports = third_party_imports()
    assert {"numpy", "PIL", "safetensors"} <= set(imports), imports          # the scan finds imports
    undeclared = {m: f for m, f in imports.items()
                  if DISTRIBUTION.get(m, m).lower() not in required | optional}
    assert not undeclared, f"imported by tinydiff/ but not in pyproject.toml's dependencies: {undeclared}"
    unused = required - {DISTRIBUTION.get(m, m).lower() for m in imports}
    assert not unused, f"declared in pyproject.toml but imported nowhere in tinydiff/: {sorted(unused)}"


def test_license_is_an_spdx_string_with_its_file():
    config = pyproject()
    assert config["project"]["license"] == "MIT"
    assert all(os.path.exists(os.path.join(ROOT, f)) for f in config["project"]["license-files"])
    setuptools_req = [r for r in config["build-system"]["requires"] if requirement_name(r) == "setuptools"]
    assert setuptools_req == ["setuptools>=77"], setuptools_req          # 77.0: PEP 639 license strings


def test_the_sdist_manifest_takes_every_source_the_build_needs():
    """MANIFEST.in's patterns cover every file in csrc/ (setup.py globs csrc/*.cpp, *.h, *.cuh, *.cu)."""
    with open(os.path.join(ROOT, "MANIFEST.in")) as f:
        rules = [line.split() for line in f if line.strip() and not line.startswith("#")]
    patterns = [p for rule in rules if rule[:2] == ["recursive-include", "csrc"] for p in rule[2:]]
    sources = [os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "csrc", "*"))]
    assert sources
    missed = [s for s in sources if not any(fnmatch.fnmatch(s, p) for p in patterns)]
    assert not missed, f"csrc/ files the sdist would leave out: {missed}"
    assert ["include", "tinydiff/*.safetensors"] in rules                    # the shipped classifier


def test_import_tinydiff_reaches_the_submodules():
    code = ("import tinydiff; m = tinydiff.models, tinydiff.diffusion, tinydiff.samplers; "
            "print(m[0].ContextUnet.__name__, m[1].NoiseSchedule.__name__, m[2].ddim_sample.__name__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["ContextUnet", "NoiseSchedule", "ddim_sample"]


# setup.py run as pip runs it, then its BuildExt asked to build tinydiff._C, the compiler call itself
# replaced by a no-op: what the build would compile with, and what it says.
SETUP_THEN_BUILD = """import runpy, sys
import pybind11.setup_helpers
from setuptools.dist import Distribution
sys.argv = ["setup.py", "--version"]
g = runpy.run_path("setup.py")
pybind11.setup_helpers.build_ext.build_extension = lambda self, ext: None
g["BuildExt"](Distribution()).build_extension(g["extensions"][0])
print("flags", g["extensions"][0].extra_compile_args + g["extensions"][0].extra_link_args)
"""


@pytest.mark.parametrize("mode,returncode,says", [
    ("auto", 0, "WARNING: the C++ compiler does not support OpenMP"),   # one warning, a serial build
    ("0", 0, None),                                                      # asked for: no warning
    ("1", 1, "TINYDIFF_OPENMP=1 but the C++ compiler cannot build an OpenMP program"),
    ("maybe", 1, "TINYDIFF_OPENMP must be auto, 0 or 1, got 'maybe'"),
])
def test_setup_without_openmp(tmp_path, mode, returncode, says):
    """setup.py with a compiler that refuses -fopenmp (as Apple's clang does), for each TINYDIFF_OPENMP."""
    cxx = tmp_path / "c++-without-openmp"
    cxx.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "unsupported option -fopenmp" >&2; '
                   'exit 1; }; done\nexec c++ "$@"\n')
    cxx.chmod(0o755)
    env = {**os.environ, "CXX": str(cxx), "TINYDIFF_OPENMP": mode, "TINYDIFF_CUDA": "0"}
    run = subprocess.run([sys.executable, "-c", SETUP_THEN_BUILD], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == returncode, run.stderr
    openmp_lines = [line for line in run.stderr.splitlines() if "openmp" in line.lower()]
    assert len(openmp_lines) == (0 if says is None else 1) and all(says in line for line in openmp_lines), run.stderr
    if returncode == 0:                                  # serial: no -fopenmp, the pragmas not warned about
        flags = run.stdout.strip().splitlines()[-1]
        assert flags.startswith("flags") and "-fopenmp" not in flags and "-Wno-unknown-pragmas" in flags, flags


def test_setup_with_openmp():
    env = {**os.environ, "TINYDIFF_OPENMP": "auto", "TINYDIFF_CUDA": "0"}
    run = subprocess.run([sys.executable, "-c", SETUP_THEN_BUILD], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    if backend.native is None or not backend.native.build_info()["openmp"]:
        pytest.skip("this machine's compiler has no OpenMP (tinydiff._C is serial)")
    assert "openmp" not in run.stderr.lower(), run.stderr
    assert run.stdout.strip().splitlines()[-1].count("-fopenmp") == 2          # compile and link


def test_the_pytorch_context_unet_users_copy_needs_only_torch():
    """docs/interop/context_unet_torch.py stands alone: it imports torch and nothing of tinydiff
    (tests/test_models.py checks its outputs and gradients against tinydiff's ContextUnet)."""
    path = os.path.join(ROOT, "docs", "interop", "context_unet_torch.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"torch"}, imported
