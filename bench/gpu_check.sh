#!/usr/bin/env bash
# The GPU check: one call on a GPU machine (written for an H200 with torch 2.11, Triton 3.6, nvcc 13 and no
# network) that brings back every number in under 8 minutes all told, the most important first:
#   CUDA_HOME -> build the extension with its CUDA kernels -> the full verify on cuda (bf16 first, its JSON
#   rewritten after every group) -> the benchmarks, most important rows first, until the budget is spent
#   -> the summary and the report.
# Every step has a time limit taken from what is left of the budget, and every benchmark file skips the
# cases left at the deadline (bench/conftest.py). A failed build costs only the `cuda` backend: verify and
# the benchmarks still run Triton, torch and PEFT. The Triton and Inductor caches live in the run's own
# temporary folder (nothing stale is reused; nothing is left behind).
# $OUT (a temporary folder when unset) receives at most 8 files, no subfolder, names of letters, digits,
# '.', '_' and '-' only:
#   summary.txt build.log verify.log verify.json bench.log benchmarks.json <date>_<device>.json [.png]
# Commit the <date>_<device>.json (and .png) under bench/results/ and update bench/RESULTS.md from summary.txt.
#
# Usage, from the repository root:
#   bash bench/gpu_check.sh             on the GPU machine (BUDGET_S=480 by default)
#   bash bench/gpu_check.sh --dry-run   the same script on a machine without a GPU: CPU backends and the
#                                       Triton interpreter, tiny shapes, BUDGET_S=240, the same files (CI)
# PYTHON picks the interpreter (default: .venv/bin/python when present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
RUN_TMP=$(mktemp -d)
trap 'rm -rf "$RUN_TMP"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="$RUN_TMP/triton-cache" TORCHINDUCTOR_CACHE_DIR="$RUN_TMP/inductor-cache"
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
if [ "$DRY_RUN" = 1 ]; then BUDGET_S=${BUDGET_S:-240}; else BUDGET_S=${BUDGET_S:-480}; fi
END=$((SECONDS + BUDGET_S - 20))  # 20 s kept for the summary and the report
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

cuda_home() {  # torch finds CUDA_HOME from `which nvcc`: wrong when nvcc is a wrapper script (/usr/local/bin)
  if [ -n "${CUDA_HOME:-}" ]; then echo "$CUDA_HOME"; return; fi
  local nvcc home
  if nvcc=$(command -v nvcc); then
    home=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
    if [ -f "$home/include/cuda_runtime.h" ]; then echo "$home"; return; fi
  fi
  if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda; fi
}
CUDA_HOME=$(cuda_home)
[ -n "$CUDA_HOME" ] && export CUDA_HOME && export PATH="$CUDA_HOME/bin:$PATH"

if [ "$DRY_RUN" = 1 ]; then
  device=cpu; device_label="cpu-dry-run"
  build_env=(VERA_KERNELS_CUDA=0); verify_args=(--device cpu --quick)
  bench_env=(VERA_BENCH_DRY_RUN=1)
else
  device=cuda
  device_label=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  build_env=(VERA_KERNELS_CUDA=1); verify_args=(--device cuda --full)
  bench_env=()
fi
device_label=$(echo "${device_label:-gpu}" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/^-//; s/-$//')
RESULTS="$OUT/$(date -u +%Y-%m-%d)_${device_label}.json"

{
  date -u
  if [ "$DRY_RUN" = 1 ]; then echo "DRY RUN (no GPU): CPU backends and the Triton interpreter, tiny shapes; the figures mean nothing"
  else nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  echo "CUDA_HOME=${CUDA_HOME:-(not found)}"
  command -v nvcc >/dev/null && nvcc --version | tail -n 1
  echo "budget ${BUDGET_S} s"
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"

# The extension (its CUDA kernels on the GPU): its failure costs the `cuda` backend alone.
step build 240 env "${build_env[@]}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace
step verify 150 "$PY" -m vera_kernels.verify "${verify_args[@]}" --json "$OUT/verify.json"
# The suites stop starting cases 15 s before their hard limit: one case (a torch.compile) may take that long.
bench_limit=$(left)
step bench "$bench_limit" env ${bench_env[@]+"${bench_env[@]}"} VERA_BENCH_JSON="$RESULTS" \
  VERA_BENCH_DEADLINE=$(($(date +%s) + bench_limit - 15)) \
  "$PY" -m pytest bench/test_bench_layers.py bench/test_bench_projections.py bench/test_bench_multi_adapter.py \
  --benchmark-only -q -p no:cacheprovider --benchmark-columns=median,rounds --benchmark-sort=name \
  --benchmark-json="$OUT/benchmarks.json"

{
  echo
  echo "==================== summary ($device, $((SECONDS)) s) ===================="
  if [ -f "$OUT/verify.log" ]; then
    grep -E '^\[(skip|[ 0-9.]+ s)\]' "$OUT/verify.log"
    sed -n '/^Failed:/,$p' "$OUT/verify.log"
    grep -E '^[0-9]+ passed, [0-9]+ failed' "$OUT/verify.log" || echo "verify did not finish: the rows it finished are in verify.json"
  fi
  [ -f "$OUT/bench.log" ] && grep -E '^(=+ .* (passed|failed|skipped).*|[0-9]+ (passed|failed|skipped).*)$' "$OUT/bench.log" | tail -n 1
  [ -f "$RESULTS" ] && "$PY" -m bench.report "$RESULTS" --plot "${RESULTS%.json}.png"
} >>"$OUT/summary.txt" 2>&1

# What comes back: at most 8 plain files, flat, with safe names.
files=0; bad=""
for path in "$OUT"/* "$OUT"/.[!.]*; do
  [ -e "$path" ] || continue
  files=$((files + 1))
  name=$(basename "$path")
  if [ ! -f "$path" ] || [[ ! "$name" =~ ^[A-Za-z0-9._-]+$ ]]; then bad="$bad $name"; fi
done
{
  echo "files in $OUT: $files (at most 8)"
  ls -1A "$OUT"
  [ -z "$bad" ] || echo "not allowed back (not a plain file, or a name outside [A-Za-z0-9._-]):$bad"
} >>"$OUT/summary.txt"
if [ "$files" -gt 8 ] || [ -n "$bad" ]; then status=1; fi
sed -n '/^==================== summary/,$p' "$OUT/summary.txt"
exit "$status"
