"""`tinydiff info` reports the build (tinydiff._C's build_info, the CUDA module), the CPU, NumPy's
BLAS and whether CUDA runs here, and each line says what the library itself says."""
import ctypes
import os
import subprocess
import sys

import pytest

from tinydiff import backend, info


def test_report_is_what_the_build_and_backend_say():
    d = info.report()
    if backend.native is not None:
        assert d["kernels"] == backend.native.build_info()
        assert set(d["kernels"]) >= {"isa", "openmp", "compiler", "vector_bytes"}
    else:
        assert d["kernels"] == backend.native_error
    assert (d["cuda_module"] is True) == (backend.cuda_kernels() is not None)
    ok, why = backend.cuda_available(reason=True)
    assert d["cuda"] == {"available": ok, "reason": why}
    assert isinstance(d["cpu"]["model"], str) and d["cpu"]["model"]
    assert d["cpu"]["avx2"] in (True, False, None) and d["cpu"]["avx512"] in (True, False, None)
    assert isinstance(d["blas"], (list, str))


def test_cpu_flags_come_from_proc_cpuinfo(tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
                    "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx avx2 fma\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(fake if path == "/proc/cpuinfo" else path,
                                                                         *a, **k))
    cpu = info.cpu()
    assert (cpu["model"], cpu["avx2"], cpu["avx512"]) == ("Test CPU 9000", True, False)


def test_python_dash_m_tinydiff_info():
    run = subprocess.run([sys.executable, "-m", "tinydiff", "info"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(":", 1) for line in run.stdout.strip().splitlines())
    assert set(lines) == {"kernels", "CUDA module", "CPU", "NumPy", "CUDA here"}, run.stdout
    if backend.native is not None:
        build = backend.native.build_info()
        assert build["isa"] in lines["kernels"] and build["compiler"] in lines["kernels"]
        assert ("serial (no OpenMP)" in lines["kernels"]) == (not build["openmp"])
    assert lines["CUDA here"].strip().startswith("yes" if backend.cuda_available() else "no: ")
    assert "AVX2 " in lines["CPU"] and "AVX-512 " in lines["CPU"]


def test_keep_freed_memory_is_applied_on_glibc_and_left_to_the_user_when_set():
    """At import on Linux with glibc, mallopt keeps freed blocks (backend.keep_freed_memory); a user's
    MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ wins, and then tinydiff does not call it."""
    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc: keep_freed_memory does nothing here")
    assert backend.keep_freed_memory() is True
    code = "import tinydiff.backend as b; print(b.keep_freed_memory())"
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(os.environ, **{var: "65536"})).stdout
        assert out.strip() == "False", (var, out)
