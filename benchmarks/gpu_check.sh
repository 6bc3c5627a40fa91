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
# Logs go to $OUT (the folder the caller collects, if set) or ./gpu_check_out.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
status=0
summary=()
note() { summary+=("$1"); }

echo "== 1. machine"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -15
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
"$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -2
"$PY" --version
driver_cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -1)
note "GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1) (driver CUDA ${driver_cuda:-?})"

echo "== 2. install"
if [ "${GPU_CHECK_INSTALL:-1}" != "0" ]; then
    extra="gpu"
    [ "${driver_cuda:-13}" = "12" ] && extra="cuda12"
    start=$(date +%s)
    if TINYDIFF_CUDA=1 "$PY" -m pip install -e ".[test,$extra]" > "$OUT/install.log" 2>&1; then
        note "install: pip install -e .[test,$extra] with TINYDIFF_CUDA=1: ok in $(( $(date +%s) - start )) s"
    else
        echo "pip install failed (offline?), see $OUT/install.log; building in place instead"
        start=$(date +%s)
        if TINYDIFF_CUDA=1 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
            note "install: pip failed (see install.log); setup.py build_ext --inplace: ok in $(( $(date +%s) - start )) s"
        else
            note "install: FAILED, see $OUT/install.log and $OUT/build.log"
            tail -30 "$OUT/build.log"
            status=1
        fi
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
run_tests() {   # name, then pytest arguments; the last line of pytest's output goes to the summary
    local name="$1"; shift
    "$PY" -m pytest -q -ra "$@" 2>&1 | tee "$OUT/$name.txt" | tail -40
    local rc=${PIPESTATUS[0]}
    note "$name: $(grep -E '(passed|failed|skipped|error|no tests ran)' "$OUT/$name.txt" | tail -1) (exit $rc)"
    [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && status=1
}
run_tests tests_cuda tests/test_cuda.py -k "not emulated" --durations=10
run_tests tests_other_gpu tests --ignore=tests/test_cuda.py -k "cuda or gpu"

echo "== 4. benchmarks"
# shellcheck disable=SC2086
"$PY" benchmarks/bench_gpu.py --json "$OUT/bench.json" ${GPU_CHECK_BENCH:-} 2>&1 | tee "$OUT/bench.md"
if [ "${PIPESTATUS[0]}" -eq 0 ]; then
    note "benchmarks: ok, tables in $OUT/bench.md, numbers in $OUT/bench.json"
else
    note "benchmarks: FAILED, see $OUT/bench.md"
    status=1
fi

echo
echo "== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
exit $status
