#!/usr/bin/env bash
# One GPU check of flbench (<= 8 minutes on one H100/H200); everything lands in one folder, with summary.md/json.
#
#   benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine (or: OUT=... benchmarks/gpu_check.sh)
#   benchmarks/gpu_check.sh OUT_DIR --dry-run  # on a CPU: checks everything a CPU can, in seconds
#   benchmarks/gpu_check.sh OUT_DIR --steps kernel_check,attention
#
# Needs only python with torch and triton (no pip install, no network): the project runs from this checkout via
# PYTHONPATH. PYTHON picks the interpreter (default: the checkout's .venv if present, else python3). The steps,
# their time limits and the folder layout are in benchmarks/gpu_check.py. FLBENCH_CACHE (default
# <checkout>/.cache/flbench) should hold the tiny CLIP; without it the experiment step first builds it.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
export FLBENCH_CACHE="${FLBENCH_CACHE:-$ROOT/.cache/flbench}"
unset TRITON_INTERPRET  # the GPU steps must compile; the dry-run steps set it where they need the interpreter
cd "$ROOT"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
