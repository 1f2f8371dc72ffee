#!/usr/bin/env bash
# The prepared device check: one call on a fresh GPU machine (Python 3.12 with torch, no
# network, sparsetrace not installed). Stages, limits and outputs: scripts/gpu_check.py.
#
#   OUT=/some/dir scripts/gpu_check.sh          # real run; the corpus comes from
#                                               # build/gpu/prose-cache.tar.xz (prepare_gpu_check.sh)
#   GPU_CHECK_DRY_RUN=1 scripts/gpu_check.sh    # every stage on the CPU at tiny sizes
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# cuBLAS's deterministic workspace: the CUDA resume test compares two runs bit for bit.
export CUBLAS_WORKSPACE_CONFIG=:4096:8 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
