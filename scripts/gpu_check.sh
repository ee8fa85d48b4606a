#!/usr/bin/env bash
# The one script a borrowed GPU machine runs: build the extension, run the gpu-marked tests, run
# the benchmarks, sweep the Triton kernels' launch configs (tune.json), and leave results and logs
# in $OUT. It installs nothing: it uses the machine's python3 and its torch/triton, with the
# checkout on PYTHONPATH. Every stage has its own time limit so the whole run fits in 7 minutes
# with the machine's start-up: build 100 + tests 110 + bench 100 + pytest_benchmarks 20 + tune 70
# = 400 s at most. A failing stage does not stop the ones after it; the exit status is the first
# failure's.
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

stage build 100 $PY setup.py build_ext --inplace
$PY -c "import perfml._backend as b; print('perfml._C:', b.extension_error() or 'loaded')" | tee -a "$OUT/summary.txt"
# Only the gpu-marked tests: the rest of the suite runs in CI through the interpreter, and on a
# GPU every kernel variant it touches would cost a JIT compile (minutes in all).
stage tests 110 $PY -m pytest tests -q -m gpu --durations=15 -p no:cacheprovider \
  --ignore=tests/test_gpu_compile.py
# --quick on CUDA: the headline shape of every case (the size sweeps take longer than a borrowed
# machine allows); `perfml bench --device cuda` alone runs them.
stage bench 100 $PY -m perfml bench --device cuda --quick --out "$OUT/bench.jsonl"
stage pytest_benchmarks 20 $PY -m pytest benchmarks -q -p no:cacheprovider --perfml-quick \
  --benchmark-json="$OUT/pytest_benchmarks.json"
# Launch-config sweep: each kernel at its headline shape, the heuristic's config against a small
# grid around it, every candidate checked against the heuristic's output (BENCHMARKS.md, "Tuning
# from tune.json"). Its budget sits under the stage limit so it writes tune.json before the kill.
stage tune 70 $PY -m perfml.bench.autotune --device cuda --budget-s 55 --out "$OUT/tune.json"

echo "total $(( $(date +%s) - start )) s, status $status" | tee -a "$OUT/summary.txt"
tail -n 5 "$OUT/tests.log"
tail -n 40 "$OUT/bench.log"
tail -n 30 "$OUT/tune.log"
exit $status
