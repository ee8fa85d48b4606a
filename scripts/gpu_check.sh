#!/usr/bin/env bash
# The one script a borrowed GPU machine runs: build the extension, run the test suite on the GPU
# (gpu-marked tests included), run the benchmarks, and leave results and logs in $OUT.
# It installs nothing: it uses the machine's python3 and its torch/triton, with the checkout on
# PYTHONPATH. Every stage has its own time limit so the whole run stays under 10 minutes
# (150 + 150 + 210 + 60 s at most), and a failing stage does not stop the ones after it; the
# exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
start=$(date +%s)

stage() {  # stage NAME SECONDS CMD... : run, log to $OUT/NAME.log, record the first failure
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$name] exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || [ $status -ne 0 ] || status=$rc
  return 0
}

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage build 150 $PY setup.py build_ext --inplace
$PY -c "import perfml._backend as b; print('perfml._C:', b.extension_error() or 'loaded')" | tee -a "$OUT/summary.txt"
# Only the gpu-marked tests: the rest of the suite runs in CI through the interpreter, and on a
# GPU every kernel variant it touches would cost a JIT compile (minutes in all).
stage tests 150 $PY -m pytest tests -q -m gpu --durations=15 -p no:cacheprovider \
  --ignore=tests/test_gpu_compile.py
# --quick on CUDA: the headline shape of every case (the size sweeps take longer than a borrowed
# machine allows); `perfml bench --device cuda` alone runs them.
stage bench 210 $PY -m perfml bench --device cuda --quick --out "$OUT/bench.jsonl"
stage pytest_benchmarks 60 $PY -m pytest benchmarks -q -p no:cacheprovider --perfml-quick \
  --benchmark-json="$OUT/pytest_benchmarks.json"

echo "total $(( $(date +%s) - start )) s, status $status" | tee -a "$OUT/summary.txt"
tail -n 5 "$OUT/tests.log"
tail -n 40 "$OUT/bench.log"
exit $status
