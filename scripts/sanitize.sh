#!/usr/bin/env bash
# The C++ kernels under AddressSanitizer + UndefinedBehaviorSanitizer (CI step, after the README's
# commands; about 5 minutes on 2 cores).
#
#   scripts/sanitize.sh                 # the kernel tests, the bad-input tests, the hypothesis
#                                       # binding tests, the CUDA emulator and the Philox kernels,
#                                       # all sanitized
#   scripts/sanitize.sh -k gelu         # extra arguments go to pytest
#
# How: the tree (tracked and untracked, not ignored files) is copied to a temporary folder, and
# tinydiff._C is built there in place with TINYDIFF_SANITIZE=1 (setup.py: -fsanitize=address,undefined
# -fno-sanitize-recover=all -O1 -g). The in-place build of this checkout is not touched. pytest
# then runs inside the copy, so `import tinydiff` finds the copy's package and its sanitized _C
# (checked below). Python itself is not built with ASan, so the ASan runtime must be loaded
# first: LD_PRELOAD=$(gcc -print-file-name=libasan.so), and with it libstdc++ (else ASan's
# __cxa_throw interceptor finds no real __cxa_throw, as Python is not C++, and the first C++
# exception, e.g. a binding refusing a bad argument, stops with "CHECK failed ... real___cxa_throw").
#   ASAN_OPTIONS detect_leaks=0: CPython keeps its interned objects and module state until exit,
#     which LeakSanitizer would report on every run; leaks are not what this step looks for.
#   The CUDA emulator (tests/cuda_emulator, the threads of a block as ucontext fibers) is built
#     with the same sanitizers (TINYDIFF_EMULATOR_FLAGS); its fiber switches are annotated for
#     ASan (__sanitizer_start_switch_fiber / __sanitizer_finish_switch_fiber in emulator.h).
# Any report stops the process (halt_on_error, -fno-sanitize-recover), so pytest fails.
set -euo pipefail
cd "$(dirname "$0")/.."

CXX=${CXX:-g++}
ASAN_LIB=$("$CXX" -print-file-name=libasan.so)
STDCXX_LIB=$("$CXX" -print-file-name=libstdc++.so)
[ -e "$ASAN_LIB" ] || { echo "sanitize.sh: no ASan runtime ($CXX -print-file-name=libasan.so)" >&2; exit 1; }

# SANITIZE_WORK=folder: build there and keep it (to rerun single tests); default a temporary one
if [ -n "${SANITIZE_WORK:-}" ]; then
    WORK=$SANITIZE_WORK; rm -rf "$WORK/tree"; mkdir -p "$WORK"
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/tinydiff-sanitize.XXXXXX"); trap 'rm -rf "$WORK"' EXIT
fi
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"
done | tar --null -T - -cf - | (mkdir "$WORK/tree" && tar -xf - -C "$WORK/tree")
cd "$WORK/tree"

echo "sanitize.sh: building tinydiff._C with ASan + UBSan in $WORK/tree"
TINYDIFF_SANITIZE=1 TINYDIFF_CUDA=0 python setup.py -q build_ext --inplace --build-temp "$WORK/build" >"$WORK/build.log" 2>&1 \
    || { cat "$WORK/build.log"; exit 1; }

# reports go to files (pytest captures stderr, and a process that aborts loses what it captured)
export LD_PRELOAD="$ASAN_LIB $STDCXX_LIB"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$WORK/report"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$WORK/report"
rm -f "$WORK"/report.*
export TINYDIFF_EMULATOR_FLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all"
export TINYDIFF_REBUILD=0 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD"

python - <<'PY'
import os, tinydiff._C as C
here = os.path.realpath(os.getcwd())
assert os.path.realpath(C.__file__).startswith(here), f"imported {C.__file__}, not the sanitized build in {here}"
code = open(C.__file__, "rb").read()
assert b"__asan_report_load" in code and b"__ubsan_handle_" in code, f"{C.__file__} is not instrumented"
print("sanitize.sh: tinydiff._C =", C.__file__, "(instrumented by ASan and UBSan)")
PY

status=0
if [ $# -gt 0 ]; then
    python -m pytest -q -p no:cacheprovider "$@" || status=$?
else
    # the C++ kernels: every test of their file (NumPy references, hypothesis binding tests, bad
    # arguments), and the bad-input tests
    python -m pytest -q -p no:cacheprovider tests/test_kernels_cpu.py tests/test_bad_input.py || status=$?
    # the CUDA kernels on the emulator (the GPU tests skip here, and _C_cuda is not built); the
    # 70000-sample grids (65535 blocks, 10 s each without sanitizers) are left to the plain suite
    python -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "(emulated or split_k) and not 70000" || status=$?
    # the Philox kernels, C++ and emulated CUDA (not the million-draw statistics, nor _C_cuda's bindings)
    python -m pytest -q -p no:cacheprovider tests/test_philox.py -k "not statistics and not million and not cuda_bindings" \
        || status=$?
fi
# a report is a line "ERROR: AddressSanitizer: ..." or "...: runtime error: ..." (UBSan);
# ASan's warning that it does not fully support swapcontext is not one (see emulator.h)
if grep -lE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$WORK"/report.* >/dev/null 2>&1; then
    echo "sanitize.sh: the sanitizers reported:" >&2
    cat "$WORK"/report.* >&2
    exit 1
fi
exit $status
