"""Builds tinydiff's compiled kernels; everything else lives in pyproject.toml.

- tinydiff._C       the C++ kernels (csrc/*_cpu.cpp + csrc/bind_cpu.cpp), -O3 and OpenMP (if any),
                    built on every install.
- tinydiff._C_cuda  the CUDA kernels (csrc/*.cu, compiled by nvcc + csrc/bind_cuda.cpp),
                    built when CUDA is found (CUDA_HOME, else /usr/local/cuda).

TINYDIFF_CUDA=auto (default): build the CUDA module when nvcc is found, warn if that fails.
TINYDIFF_CUDA=1: the install fails on any CUDA error.  TINYDIFF_CUDA=0: skip it.
TINYDIFF_ARCH=native (default): -march=native, the instruction set of this machine.
TINYDIFF_ARCH=avx2 | avx512: x86-64-v3 (AVX2, FMA) or x86-64-v4 (AVX-512), e.g. to measure an AVX2
    build on an AVX-512 machine.  TINYDIFF_ARCH=generic: the compiler's default (a portable wheel).
    (TINYDIFF_NATIVE_ARCH=0, the older spelling, means generic.)
TINYDIFF_SANITIZE=1: build tinydiff._C with AddressSanitizer and UndefinedBehaviorSanitizer (-O1 -g),
    for scripts/sanitize.sh; Python must then run with LD_PRELOAD of the ASan runtime.
TINYDIFF_CUDA_ARCHS="90": build for these GPU architectures only (default 75 80 86 89 90, + PTX of the last).
TINYDIFF_OPENMP=auto (default): OpenMP where the compiler supports it, else a serial tinydiff._C and
    one warning (Apple's clang has no -fopenmp).  TINYDIFF_OPENMP=1: fail without it.  =0: serial.
"""
import glob
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

CUDA_ARCHS = os.environ.get("TINYDIFF_CUDA_ARCHS", "75 80 86 89 90").replace(",", " ").split()
# + PTX for the last one (compute_90), so newer GPUs JIT it


def compiler_accepts(flag, program="int main() { return 0; }\n"):
    """True if the C++ compiler compiles and links `program` with `flag` (-march=native, -fopenmp)."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as f:
            f.write(program)
        cmd = [cxx, flag, src, "-o", os.path.join(tmp, "t")]
        return subprocess.run(cmd, capture_output=True).returncode == 0


ARCH_FLAGS = {"native": ["-march=native"], "avx2": ["-march=x86-64-v3"], "avx512": ["-march=x86-64-v4"],
              "generic": []}


def openmp_flags():
    """["-fopenmp"], or [] for a serial build (the sources guard omp.h with #ifdef _OPENMP)."""
    mode = os.environ.get("TINYDIFF_OPENMP", "auto")
    if mode not in ("auto", "0", "1"):
        sys.exit(f"TINYDIFF_OPENMP must be auto, 0 or 1, got {mode!r}")
    program = "#include <omp.h>\nint main() { return omp_get_max_threads() < 1; }\n"
    if mode != "0" and compiler_accepts("-fopenmp", program):
        return ["-fopenmp"]
    if mode == "1":
        sys.exit("TINYDIFF_OPENMP=1 but the C++ compiler cannot build an OpenMP program with -fopenmp")
    return []


OPENMP = openmp_flags()
OPENMP_MISSING = not OPENMP and os.environ.get("TINYDIFF_OPENMP", "auto") == "auto"   # warned at the build


def cpu_flags():
    # -fno-math-errno: no kernel reads errno, and without it a loop that calls std::sqrt does not vectorise
    flags = ["-O3", "-std=c++17", "-fno-math-errno"] + (OPENMP or ["-Wno-unknown-pragmas"])  # serial: pragmas ignored
    arch = os.environ.get("TINYDIFF_ARCH", "generic" if os.environ.get("TINYDIFF_NATIVE_ARCH") == "0" else "native")
    if arch not in ARCH_FLAGS:
        sys.exit(f"TINYDIFF_ARCH must be one of {', '.join(ARCH_FLAGS)}, got {arch!r}")
    if arch == "native" and not compiler_accepts("-march=native"):
        arch = "generic"                       # a compiler that has no -march=native (some clangs)
    return flags + ARCH_FLAGS[arch] + SANITIZE_FLAGS


# ASan + UBSan, every UB report fatal; -O1 keeps the build and the tests fast enough for CI
SANITIZE_FLAGS = (["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                   "-fno-sanitize-recover=all"] if os.environ.get("TINYDIFF_SANITIZE") == "1" else [])


def find_cuda():
    """The CUDA install folder, or None. `which nvcc` may be a wrapper script, so look for the folder."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


class BuildExt(build_ext):
    """build_ext that first compiles the .cu files of the CUDA module with nvcc."""

    def build_extension(self, ext):
        if ext.name == "tinydiff._C" and OPENMP_MISSING:
            print("WARNING: the C++ compiler does not support OpenMP (-fopenmp); tinydiff._C is built serial "
                  "(one thread per kernel). Set TINYDIFF_OPENMP=0 to silence this.", file=sys.stderr)
        if ext.name != "tinydiff._C_cuda":
            return super().build_extension(ext)
        try:
            ext.extra_objects = self.compile_cuda(ext.cuda_sources)
            super().build_extension(ext)
        except Exception as err:
            if os.environ.get("TINYDIFF_CUDA", "auto") == "1":
                raise
            print(f"WARNING: the CUDA module was not built ({err}); tinydiff runs on the CPU only.",
                  file=sys.stderr)

    def compile_cuda(self, sources):
        nvcc = os.path.join(find_cuda(), "bin", "nvcc")
        os.makedirs(self.build_temp, exist_ok=True)
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
        gencode.append(f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}")

        def nvcc_compile(src):
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Icsrc",
                   "-Xcompiler", "-fPIC", "--threads", "0", *gencode]
            print(" ".join(cmd))
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{run.stdout}{run.stderr}")
            return obj

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            return list(pool.map(nvcc_compile, sources))


cpu_sources = sorted(glob.glob("csrc/*_cpu.cpp"))
extensions = [
    Pybind11Extension("tinydiff._C", cpu_sources, include_dirs=["csrc"],
                      extra_compile_args=cpu_flags(), extra_link_args=[*OPENMP, *SANITIZE_FLAGS],
                      depends=glob.glob("csrc/*.h")),
]

cuda_mode = os.environ.get("TINYDIFF_CUDA", "auto")
if cuda_mode not in ("auto", "0", "1"):
    sys.exit(f"TINYDIFF_CUDA must be auto, 0 or 1, got {cuda_mode!r}")
cuda_home = find_cuda()
if cuda_mode == "1" and cuda_home is None:
    sys.exit("TINYDIFF_CUDA=1 but no CUDA was found: set CUDA_HOME to the folder that holds bin/nvcc")
if cuda_mode != "0" and cuda_home is not None:
    cuda_ext = Pybind11Extension(
        "tinydiff._C_cuda", ["csrc/bind_cuda.cpp"],
        include_dirs=["csrc", os.path.join(cuda_home, "include")],
        extra_compile_args=["-O3", "-std=c++17"],
        # cudart linked statically: the module imports on a machine without a GPU or CUDA runtime
        library_dirs=[os.path.join(cuda_home, "lib64")],
        libraries=["cudart_static", "dl", "rt", "pthread"],
        depends=glob.glob("csrc/*.h") + glob.glob("csrc/*.cuh") + glob.glob("csrc/*.cu"))
    cuda_ext.cuda_sources = sorted(glob.glob("csrc/*.cu"))
    extensions.append(cuda_ext)

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
