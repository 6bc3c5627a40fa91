"""`tinydiff info`: what this install is and what it can run here.

- the kernels built: tinydiff._C's instruction set, OpenMP or serial, its compiler (csrc/bind_cpu.cpp
  build_info), and whether tinydiff._C_cuda was built;
- the CPU: its model name and whether it has AVX2 and AVX-512 (a build for AVX-512 cannot run on a CPU
  without it);
- NumPy's BLAS (threadpoolctl), which the NumPy reference kernels and the models' matrix products use;
- whether the CUDA kernels can run here (backend.cuda_available(reason=True)).
"""
import os
import platform

import numpy as np

from tinydiff import backend


def cpu():
    """{'model', 'cores', 'avx2', 'avx512'}; the flags are None where /proc/cpuinfo is missing (macOS)."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                if key.strip() in ("flags", "Features") and flags is None:   # x86, ARM
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "avx2": None if flags is None else "avx2" in flags,
            "avx512": None if flags is None else "avx512f" in flags}


def blas():
    """NumPy's BLAS libraries as threadpoolctl sees them: [{'library', 'version', 'threads'}]."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError as err:
        return f"threadpoolctl is not installed ({err})"
    return [{"library": lib.get("internal_api"), "version": lib.get("version"), "threads": lib.get("num_threads")}
            for lib in threadpool_info() if lib.get("user_api") == "blas"]


def report():
    """Everything `tinydiff info` prints, as a dict."""
    native = backend.native.build_info() if backend.native is not None else backend.native_error
    cuda_module = backend.cuda_kernels() is not None
    cuda_ok, cuda_why = backend.cuda_available(reason=True)
    return {"kernels": native, "cuda_module": cuda_module if cuda_module else backend._cuda_ext_error,
            "cpu": cpu(), "numpy": np.__version__, "blas": blas(),
            "cuda": {"available": cuda_ok, "reason": cuda_why}}


def yes_no(flag):
    return "unknown" if flag is None else ("yes" if flag else "no")


def format_report(d):
    k = d["kernels"]
    if isinstance(k, dict):
        kernels = (f"tinydiff._C built for {k['isa']} ({k['vector_bytes']}-byte vectors), "
                   f"{'OpenMP' if k['openmp'] else 'serial (no OpenMP)'}, {k['compiler']}")
    else:
        kernels = k                                              # why tinydiff._C is missing
    cuda_module = "tinydiff._C_cuda built" if d["cuda_module"] is True else d["cuda_module"]
    c = d["cpu"]
    blas_text = d["blas"]                                        # why threadpoolctl is missing, or the libraries
    if isinstance(blas_text, list):
        blas_text = ", ".join(f"{b['library']} {b['version']} ({b['threads']} threads)" for b in blas_text) or "none found"
    cuda = "yes" if d["cuda"]["available"] else f"no: {d['cuda']['reason']}"
    return "\n".join([
        f"kernels:      {kernels}",
        f"CUDA module:  {cuda_module}",
        f"CPU:          {c['model']}, {c['cores']} logical cores, AVX2 {yes_no(c['avx2'])}, "
        f"AVX-512 {yes_no(c['avx512'])}",
        f"NumPy:        {d['numpy']}, BLAS {blas_text}",
        f"CUDA here:    {cuda}",
    ])
