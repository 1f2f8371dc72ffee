#!/bin/bash
# Issue 12: the paper's experiments at the `cpu` preset's scale, with seeds enough for the verdict
# rules (docs/verdicts.md) to decide. Resumable: re-running trains only what is missing.
# Usage: benchmarks/reproduction/experiments.sh [OUT] [mask|capacity|lr ...]  (default OUT: runs)
# Results, commands and times: docs/reproduction.md.
set -euo pipefail
OUT=${1:-runs}
shift || true
S=${SPARSETRACE:-.venv/bin/sparsetrace}
ALL=(mask capacity lr)
for exp in "${@:-${ALL[@]}}"; do
  echo "== $exp ($(date -u +%H:%M:%S))"
  case $exp in
    mask) $S experiment mask --preset cpu --seeds 5 --out "$OUT/mask-cpu" ;;
    capacity) $S experiment capacity --preset cpu --seeds 2 --out "$OUT/capacity-cpu" ;;
    lr) $S sweep --preset cpu --name lr --out "$OUT/sweep-lr-cpu" ;;
    *) echo "unknown experiment $exp" >&2; exit 2 ;;
  esac
done
echo "== done ($(date -u +%H:%M:%S))"
