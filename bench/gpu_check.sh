#!/usr/bin/env bash
# The GPU check: one call on a lent GPU machine (H200: torch 2.11, triton 3.6, nvcc 13, no network), in
# under 8 minutes all told:
#   build the extension with its CUDA kernels -> the full verify on cuda -> the layer benchmarks (and the
#   projection ones) until the time budget is spent -> a summary.
# Every step has a time limit taken from what is left of the budget; the benchmarks are ordered most
# important first and skip what is left at their deadline, and write their records after every case.
# $OUT (a temporary folder when unset) receives at most 7 files, no subfolders:
#   summary.txt  build.log  verify.log  verify.json  bench.log  <date>_<gpu>.json  <date>_<gpu>.png
# Commit the .json (and .png) under bench/results/ and update bench/RESULTS.md from summary.txt.
# Usage, from the repository root:  bash bench/gpu_check.sh        (BUDGET_S=480 by default)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
END=$((SECONDS + BUDGET_S - 20))  # 20 s kept for the summary
status=0

left() { echo $((END - SECONDS)); }

step() {  # step NAME SECONDS COMMAND...: run with min(SECONDS, what is left), log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  if [ "$limit" -lt 10 ]; then echo "== $name: skipped, the time budget is spent"; status=1; return 1; fi
  echo "== $name (limit ${limit} s): $*"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || { status=1; tail -n 30 "$OUT/$name.log"; }
  return "$rc"
}

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  nvcc --version | tail -n 1
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')
RESULTS="$OUT/$(date -u +%Y-%m-%d)_${gpu:-gpu}.json"

if step build 240 env VERA_KERNELS_CUDA=1 "$PY" setup.py build_ext --inplace; then
  step verify 150 "$PY" -m vera_kernels.verify --device cuda --json "$OUT/verify.json"
  # The suite stops starting cases 15 s before its hard limit: one case (a torch.compile) may take that long.
  bench_limit=$(left)
  VERA_BENCH_JSON="$RESULTS" VERA_BENCH_DEADLINE=$(($(date +%s) + bench_limit - 15)) \
    step bench "$bench_limit" "$PY" -m pytest bench/test_bench_layers.py bench/test_bench_projections.py \
    --benchmark-only -q -p no:cacheprovider --benchmark-columns=median,rounds --benchmark-sort=name
fi

{
  echo
  echo "==================== summary ===================="
  [ -f "$OUT/verify.log" ] && sed -n '/^backend/,$p' "$OUT/verify.log"
  [ -f "$OUT/bench.log" ] && grep -E '^(=+ .* (passed|failed|skipped).*|[0-9]+ (passed|failed).*)$' "$OUT/bench.log" | tail -n 1
  [ -f "$RESULTS" ] && "$PY" -m bench.report "$RESULTS" --plot "${RESULTS%.json}.png"
  echo "files: $OUT"
} >>"$OUT/summary.txt" 2>&1
sed -n '/^==================== summary/,$p' "$OUT/summary.txt"
exit "$status"
