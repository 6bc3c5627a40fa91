#!/usr/bin/env bash
# gpu_check.sh: everything to do on a GPU machine, in one call, so that its time is used fully:
#   1. the machine: nvidia-smi, nvcc, Python
#   2. install:     TINYDIFF_CUDA=1 pip install -e ".[test,gpu]"  (".[test,cuda12]" under a CUDA 12 driver);
#                   offline, or if that fails: TINYDIFF_CUDA=1 python setup.py build_ext --inplace
#   3. the GPU tests: tests/test_cuda.py on the GPU (the emulated ones run in CI already), then
#                   every other test that asks for a GPU (-k "cuda or gpu")
#   4. the GPU benchmarks: benchmarks/bench_gpu.py (tables on stdout, numbers in bench.json)
#   5. a summary: build time, test counts, where the tables are; exit 1 if a step failed.
#
#   bash benchmarks/gpu_check.sh                      # all of it
#   GPU_CHECK_INSTALL=0 bash benchmarks/gpu_check.sh  # already installed: skip step 2
#   GPU_CHECK_BENCH="--quick" bash benchmarks/gpu_check.sh   # arguments for bench_gpu.py
#   GPU_CHECK_INSTALL=inplace bash benchmarks/gpu_check.sh   # offline machine with the dependencies
#                   already there: build in place (TINYDIFF_CUDA_ARCHS picks the GPUs) and use PYTHONPATH
#   GPU_CHECK_TRAIN_STEPS=300 (default): the end-to-end step trains this many steps on the GPU
#   GPU_CHECK_STEP_LIMIT=600 (default): seconds each test, benchmark or end-to-end step may take
# Logs go to $OUT (the folder the caller collects, if set) or ./gpu_check_out.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
status=0
summary=()
note() { summary+=("$1"); }
limit() { timeout "${GPU_CHECK_STEP_LIMIT:-600}" "$@"; }   # a hung step ends, the others still run

echo "== 1. machine"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -15
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
"$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -2
"$PY" --version
driver_cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -1)
note "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1) (driver CUDA ${driver_cuda:-?})"

echo "== 2. install"
build_inplace() {   # the compiled modules next to the sources, found through PYTHONPATH; $1: what came before
    local start=$(date +%s)
    if TINYDIFF_CUDA=1 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
        note "install: ${1}setup.py build_ext --inplace (archs ${TINYDIFF_CUDA_ARCHS:-all}): ok in $(( $(date +%s) - start )) s"
    else
        note "install: ${1}setup.py build_ext --inplace FAILED, see $OUT/build.log"
        tail -30 "$OUT/build.log"
        status=1
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}
if [ "${GPU_CHECK_INSTALL:-1}" = "inplace" ]; then
    build_inplace ""
elif [ "${GPU_CHECK_INSTALL:-1}" != "0" ]; then
    extra="gpu"
    [ "${driver_cuda:-13}" = "12" ] && extra="cuda12"
    start=$(date +%s)
    if TINYDIFF_CUDA=1 "$PY" -m pip install -e ".[test,$extra]" > "$OUT/install.log" 2>&1; then
        note "install: pip install -e .[test,$extra] with TINYDIFF_CUDA=1: ok in $(( $(date +%s) - start )) s"
    else
        echo "pip install failed (offline?), see $OUT/install.log; building in place instead"
        build_inplace "pip failed (see install.log); "
    fi
else
    note "install: skipped (GPU_CHECK_INSTALL=0)"
fi
"$PY" - <<'EOF' 2>&1 | tee "$OUT/available.txt"
import tinydiff
from tinydiff import backend
print("cuda_available:", tinydiff.cuda_available(reason=True))
mod = backend.cuda_kernels()
print("tinydiff._C_cuda:", "built, versions " + str(mod.conv2d_versions()) + ", devices " + str(mod.device_count(reason=True))
      if mod is not None else backend._cuda_ext_error)
EOF
note "$(head -1 "$OUT/available.txt")"

echo "== 3. tests"
pytest_extra=()   # parallel workers and a per-test limit, where the plugins are installed
"$PY" -c "import xdist" 2>/dev/null && pytest_extra+=(-n "${GPU_CHECK_WORKERS:-8}")
"$PY" -c "import pytest_timeout" 2>/dev/null && pytest_extra+=(--timeout 300)
run_tests() {   # name, then pytest arguments; the last line of pytest's output goes to the summary
    local name="$1"; shift
    limit "$PY" -m pytest -q -ra "${pytest_extra[@]}" "$@" 2>&1 | tee "$OUT/$name.txt" | tail -40
    local rc=${PIPESTATUS[0]}
    note "$name: $(grep -E '(passed|failed|skipped|error|no tests ran)' "$OUT/$name.txt" | tail -1) (exit $rc)"
    [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && status=1
}
run_tests tests_cuda tests/test_cuda.py -k "not emulated" --durations=10
run_tests tests_other_gpu tests --ignore=tests/test_cuda.py -k "cuda or gpu"

echo "== 4. benchmarks"
# shellcheck disable=SC2086
limit "$PY" benchmarks/bench_gpu.py --json "$OUT/bench.json" ${GPU_CHECK_BENCH:-} 2>&1 | tee "$OUT/bench.md"
if [ "${PIPESTATUS[0]}" -eq 0 ]; then
    note "benchmarks: ok, tables in $OUT/bench.md, numbers in $OUT/bench.json"
else
    note "benchmarks: FAILED, see $OUT/bench.md"
    status=1
fi

echo "== 5. end to end on the GPU: train, sample with DDIM-50, score; the kernels demo"
run=$(mktemp -d)
start=$(date +%s)
if limit "$PY" -m tinydiff.cli train --device cuda --steps "${GPU_CHECK_TRAIN_STEPS:-300}" --out "$run" --quiet \
        > "$OUT/e2e.txt" 2>&1 &&
   limit "$PY" -m tinydiff.cli sample --device cuda --checkpoint "$run" --n 50 --steps 50 >> "$OUT/e2e.txt" 2>&1 &&
   limit "$PY" -m tinydiff.cli eval --device cuda --samples "$run/samples/samples.npz" >> "$OUT/e2e.txt" 2>&1; then
    note "end to end: ok in $(( $(date +%s) - start )) s: $(grep -iE 'accuracy' "$OUT/e2e.txt" | tail -1)"
else
    note "end to end: FAILED, see $OUT/e2e.txt"
    status=1
fi
tail -15 "$OUT/e2e.txt"
if limit "$PY" demos/07_kernels.py --device cuda --out "$run/demo07" > "$OUT/demo07.txt" 2>&1; then
    note "demo 07 on the GPU: ok"
else
    note "demo 07 on the GPU: FAILED, see $OUT/demo07.txt"
    status=1
fi
tail -15 "$OUT/demo07.txt"

echo
echo "== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
exit $status
