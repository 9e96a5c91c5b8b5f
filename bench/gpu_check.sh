#!/usr/bin/env bash
# The GPU check: one call on a GPU machine (written for an H200 with torch 2.11, Triton 3.6, nvcc 13 and no
# network) that brings back every number in 8 minutes, the most important first. It prints its plan (each
# step, its budget in seconds and what is cut first when time runs out), then keeps to it: bench/gpu_check.py
# has the plan, the runner and the list of files it leaves in $OUT (at most 8, each complete whenever the
# run is killed). This script finds CUDA and the interpreter.
#
# Usage, from the repository root:
#   bash bench/gpu_check.sh             on the GPU machine (BUDGET_S=480 by default)
#   bash bench/gpu_check.sh --dry-run   the same plan on a machine without a GPU: CPU backends and the
#                                       Triton interpreter, tiny shapes, the same files (CI)
#   bash bench/gpu_check.sh --plan      print the plan and exit
# OUT (default: a new temporary folder) receives the files; PYTHON picks the interpreter (default:
# .venv/bin/python when present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
for arg in "$@"; do
  case $arg in
    --dry-run|--plan) ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run] [--plan]" >&2; exit 2 ;;
  esac
done

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
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
export PYTHON="$PY"
exec "$PY" -m bench.gpu_check "$@"
