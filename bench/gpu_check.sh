#!/usr/bin/env bash
# The GPU check: one call on a lent GPU machine (H200: torch 2.11, triton 3.6, nvcc 13, no network).
#   build the extension with its CUDA kernels -> verify on cuda -> the tests on cuda -> the benchmarks
#   -> a summary table. Everything lands under $OUT (a temporary folder when unset). Under 8 minutes.
# Usage, from the repository root:  bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || { status=1; tail -n 40 "$OUT/$name.log"; }
  return "$rc"
}

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
  nvcc --version | tail -n 1
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

if step build 300 env VERA_KERNELS_CUDA=1 "$PY" setup.py build_ext --inplace; then
  step verify 120 "$PY" -m vera_kernels.verify --device cuda --json "$OUT/verify.json"
  step tests 120 "$PY" -m pytest tests -q -p no:cacheprovider
  step bench 120 "$PY" -m pytest bench/ --benchmark-only -q -p no:cacheprovider --benchmark-json "$OUT/bench.json"
fi

echo
echo "==================== summary ===================="
cat "$OUT/environment.txt"
[ -f "$OUT/verify.log" ] && sed -n '/^backend/,$p' "$OUT/verify.log"
[ -f "$OUT/tests.log" ] && tail -n 1 "$OUT/tests.log"
if [ -f "$OUT/bench.json" ]; then
  "$PY" - "$OUT/bench.json" <<'PYEOF'
import json, sys
data = json.load(open(sys.argv[1]))
print(f"{'benchmark':70s} {'median':>12s}")
for b in data["benchmarks"]:
    print(f"{b['name']:70s} {b['stats']['median'] * 1e3:9.3f} ms")
PYEOF
fi
echo "full logs: $OUT"
exit "$status"
