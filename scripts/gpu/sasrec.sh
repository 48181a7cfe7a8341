#!/usr/bin/env bash
# SASRec on a GPU (issue 22): every dataset in both tie orders, then the published-number check (Beauty, BCE loss).
# Started there as a job:  bash scripts/gpu/run.sh script sasrec scripts/gpu/sasrec.sh
# Each project is $GLOSS_RUNS/sasrec/DATASET-TIES: gloss data, gloss sasrec (the default grid, chosen on validation
# NDCG@10), then gloss eval of sasrec, transitions and both fused, validation and test, K = 5 and 10, every user,
# history excluded. Everything the CPU needs to compare them (meta.json, metrics, per-user rows) is packed into
# $GLOSS_RUNS/sasrec.tgz after each project (a lease can end mid-way); the `wait` call copies it into $OUT.
set -euo pipefail
runs=${GLOSS_RUNS:-/root/gloss-runs}
# shellcheck source=scripts/gpu/jobs.sh
source "$(dirname "$0")/jobs.sh"  # g, evaluate, pack
for d in ${SASREC_DATASETS:-toys sports beauty}; do
  for t in file shuffle; do
    p=$runs/sasrec/$d-$t
    if [ $t = shuffle ]; then g data --dataset $d --ties shuffle --seed 0 -p "$p"; else g data --dataset $d -p "$p"; fi
    echo "== sasrec $d $t"
    g sasrec -p "$p"
    evaluate "$p" sasrec "transitions users=all" "lists=sasrec,transitions users=all"
    pack sasrec
  done
done
p=$runs/sasrec/beauty-bce  # the published setting: one sampled negative, dropout 0.5 (Kang & McAuley 2018)
g data --dataset beauty -p "$p"
echo "== sasrec beauty bce"
g sasrec -p "$p" --loss bce --dropout 0.5 --epochs 400 --patience 20
evaluate "$p" sasrec
pack sasrec
