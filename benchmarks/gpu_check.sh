#!/usr/bin/env bash
# The GPU check of issue 25 (benchmarks/gpu_check.py has what each part measures):
#   bash benchmarks/gpu_check.sh                 # one GPU (H100 80 GB, 16 cores): <= 10 minutes
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the same plumbing on CPU, tiny model
# Writes one markdown table to stdout and to $OUT/gpu_check_results.md when $OUT is set, else
# benchmarks/gpu_check_results.md (--out FILE to choose). Logs, checkpoints and raw results go
# to $GPU_CHECK_WORK (default /tmp/gpu_check). Nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export WANDB_MODE=disabled HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The script keeps its own budget (570 s, dry run 290 s) and writes the table after every
# part; this outer limit only catches a driver that hangs, leaving the table written so far.
exec timeout -k 10 595 "$PY" benchmarks/gpu_check.py "$@"
