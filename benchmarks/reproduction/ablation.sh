#!/bin/bash
# Issue 12's ablation: one factor at a time from the `cpu` preset (1,000 steps, gpt2 style,
# LR 3e-3), each arm a one-value sweep so that it resumes where it stopped when re-run.
# Usage: benchmarks/reproduction/ablation.sh [OUT] [ARM ...]   (default OUT: runs/ablation)
# Results and times: docs/reproduction.md.
set -euo pipefail
OUT=${1:-runs/ablation}
shift || true
S=${SPARSETRACE:-.venv/bin/sparsetrace}
declare -A ARMS=(
  [baseline]="train.lr=3e-3"
  [pos-sinusoidal]="model.pos=sinusoidal"
  [norm-rmsnorm]="model.norm=rmsnorm"
  [bias-off]="model.bias=false"
  [pos-relative]="model.pos=relative"
  [t5-sinusoidal]="model.pos=sinusoidal --model.style t5"
  [emb-std-1]="model.emb_init_std=1.0 --model.tied_logit_scale true"
  [mlp-init-truncated]="model.mlp_init=truncated_lecun_normal"
  [mlp-lr-x3]="train.mlp_lr_mult=3"
  [warmup-300]="train.warmup_steps=300"
  [dff-4096]="model.d_ff=4096"
  [seq-512]="data.seq_len=512 --train.batch_size 4"
  [batch-32]="train.batch_size=32"
  [beta2-0.999]="train.beta2=0.999"
  [wd-0]="train.weight_decay=0"
  [untied]="model.tie_embeddings=false"
  [lr-constant]="train.min_lr_ratio=1.0"
  [t5sin-constant]="train.min_lr_ratio=1.0 --model.style t5 --model.pos sinusoidal"
  [t5sin-mlp-lr-x3]="train.mlp_lr_mult=3 --model.style t5 --model.pos sinusoidal"
  [t5sin-beta2-0.999]="train.beta2=0.999 --model.style t5 --model.pos sinusoidal"
  [t5sin-constant-lr1e-2]="train.lr=1e-2 --model.style t5 --model.pos sinusoidal --train.min_lr_ratio 1.0"
  [t5sin-constant-2000]="train.steps=2000 --model.style t5 --model.pos sinusoidal --train.min_lr_ratio 1.0"
  [t5sin-constant-emb-0.088]="model.emb_init_std=0.0884 --model.style t5 --model.pos sinusoidal --train.min_lr_ratio 1.0"
)
ORDER=(baseline pos-sinusoidal norm-rmsnorm bias-off beta2-0.999 emb-std-1 mlp-lr-x3 warmup-300
       t5-sinusoidal t5sin-constant lr-constant dff-4096 wd-0 mlp-init-truncated seq-512 batch-32
       untied pos-relative t5sin-mlp-lr-x3 t5sin-beta2-0.999 t5sin-constant-lr1e-2
       t5sin-constant-2000 t5sin-constant-emb-0.088)
for arm in "${@:-${ORDER[@]}}"; do
  spec=${ARMS[$arm]}
  sweep=${spec%% *}; rest=${spec#"$sweep"}
  echo "== $arm: $spec ($(date -u +%H:%M:%S))"
  # shellcheck disable=SC2086
  $S sweep --preset cpu --sweep "$sweep" --out "$OUT/$arm" $rest
done
