#!/bin/bash
# Issue 12's ablation: one factor at a time from the former default, now the `cpu-gpt2` preset
# (1,000 steps, GPT-2 conventions, LR 3e-3, cosine), then combinations, then variations of the
# new `cpu` preset they led to ("cpu-*" arms). Each arm is a one-value sweep, so that it resumes
# where it stopped when re-run.
# Usage: benchmarks/reproduction/ablation.sh [OUT] [ARM ...]   (default OUT: runs/ablation)
# Results and times: docs/reproduction.md.
set -euo pipefail
OUT=${1:-runs/ablation}
shift || true
S=${SPARSETRACE:-.venv/bin/sparsetrace}
# The corpus arms' text: benchmarks/reproduction/python_docs_corpus.py writes it.
PYDOCS=${PYDOCS:-runs/corpus/python-docs.jsonl}
declare -A ARMS=(
  [baseline]="cpu-gpt2 train.lr=3e-3"
  [pos-sinusoidal]="cpu-gpt2 model.pos=sinusoidal"
  [norm-rmsnorm]="cpu-gpt2 model.norm=rmsnorm"
  [bias-off]="cpu-gpt2 model.bias=false"
  [pos-relative]="cpu-gpt2 model.pos=relative"
  [t5-sinusoidal]="cpu-gpt2 model.pos=sinusoidal --model.style t5"
  [emb-std-1]="cpu-gpt2 model.emb_init_std=1.0 --model.tied_logit_scale true"
  [mlp-init-truncated]="cpu-gpt2 model.mlp_init=truncated_lecun_normal"
  [mlp-lr-x3]="cpu-gpt2 train.mlp_lr_mult=3"
  [warmup-300]="cpu-gpt2 train.warmup_steps=300"
  [dff-4096]="cpu-gpt2 model.d_ff=4096"
  [seq-512]="cpu-gpt2 data.seq_len=512 --train.batch_size 4"
  [batch-32]="cpu-gpt2 train.batch_size=32"
  [beta2-0.999]="cpu-gpt2 train.beta2=0.999"
  [wd-0]="cpu-gpt2 train.weight_decay=0"
  [untied]="cpu-gpt2 model.tie_embeddings=false"
  [lr-constant]="cpu-gpt2 train.min_lr_ratio=1.0"
  [t5sin-constant]="cpu-gpt2 train.min_lr_ratio=1.0 --model.style t5 --model.pos sinusoidal"
  [t5sin-mlp-lr-x3]="cpu-gpt2 train.mlp_lr_mult=3 --model.style t5 --model.pos sinusoidal"
  [t5sin-beta2-0.999]="cpu-gpt2 train.beta2=0.999 --model.style t5 --model.pos sinusoidal"
  [t5sin-constant-lr1e-2]="cpu-gpt2 train.lr=1e-2 --model.style t5 --model.pos sinusoidal --train.min_lr_ratio 1.0"
  [t5sin-constant-2000]="cpu-gpt2 train.steps=2000 --model.style t5 --model.pos sinusoidal --train.min_lr_ratio 1.0"
  [t5sin-constant-emb-0.088]="cpu-gpt2 model.emb_init_std=0.0884 --model.style t5 --model.pos sinusoidal --train.min_lr_ratio 1.0"
  [cpu-emb-0.044]="cpu model.emb_init_std=0.0442 --model.emb_init normal"
  [cpu-emb-0.177]="cpu model.emb_init_std=0.177 --model.emb_init normal"
  [cpu-cosine]="cpu train.min_lr_ratio=0.1"
  [cpu-long]="cpu-long train.steps=3000"
  [corpus-pydocs]="cpu-gpt2 data.source=$PYDOCS"
  [cpu-corpus-pydocs]="cpu data.source=$PYDOCS"
)
ORDER=(baseline pos-sinusoidal norm-rmsnorm bias-off beta2-0.999 emb-std-1 mlp-lr-x3 warmup-300
       t5-sinusoidal t5sin-constant lr-constant dff-4096 wd-0 mlp-init-truncated seq-512 batch-32
       untied pos-relative t5sin-mlp-lr-x3 t5sin-beta2-0.999 t5sin-constant-lr1e-2
       t5sin-constant-2000 t5sin-constant-emb-0.088 cpu-long cpu-cosine cpu-emb-0.044 cpu-emb-0.177
       corpus-pydocs cpu-corpus-pydocs)
for arm in "${@:-${ORDER[@]}}"; do
  spec=${ARMS[$arm]}
  preset=${spec%% *}; spec=${spec#"$preset "}
  sweep=${spec%% *}; rest=${spec#"$sweep"}
  echo "== $arm: --preset $preset $spec ($(date -u +%H:%M:%S))"
  # shellcheck disable=SC2086
  $S sweep --preset "$preset" --sweep "$sweep" --out "$OUT/$arm" $rest
done
