#!/usr/bin/env bash
# SASRec on a GPU (issue 22): every dataset in both tie orders, then the published-number check (Beauty, BCE loss).
# Started there as a job:  bash scripts/gpu/run.sh script sasrec scripts/gpu/sasrec.sh
# Each project is $GLOSS_RUNS/sasrec/DATASET-TIES: gloss data, gloss sasrec (the default grid, chosen on validation
# NDCG@10), then gloss eval of sasrec, transitions and both fused, validation and test, K = 5 and 10, every user,
# history excluded. Everything the CPU needs to compare them (meta.json, metrics, per-user rows) is packed into
# $GLOSS_RUNS/sasrec-results.tgz after each project (a lease can end mid-way); the `wait` call copies it into $OUT.
# Settings (environment): SASREC_DATASETS (default "toys sports beauty"), SASREC_TIES ("file shuffle"),
# SASREC_FLAGS (more `gloss sasrec` flags, e.g. "--dropout 0.5": a setting declared before the run, not the grid),
# SASREC_BCE (1: then the published-number check; 0: not).
set -euo pipefail
runs=${GLOSS_RUNS:-/root/gloss-runs}
# shellcheck source=scripts/gpu/jobs.sh
source "$(dirname "$0")/jobs.sh"  # g, evaluate, pack
for d in ${SASREC_DATASETS:-toys sports beauty}; do
  for t in ${SASREC_TIES:-file shuffle}; do
    p=$runs/sasrec/$d-$t
    if [ $t = shuffle ]; then g data --dataset $d --ties shuffle --seed 0 -p "$p"; else g data --dataset $d -p "$p"; fi
    echo "== sasrec $d $t"
    # shellcheck disable=SC2086  # SASREC_FLAGS is a word list
    g sasrec -p "$p" ${SASREC_FLAGS:-}
    evaluate "$p" sasrec "transitions users=all" "lists=sasrec,transitions users=all"
    pack sasrec
  done
done
[ "${SASREC_BCE:-1}" = 1 ] || exit 0
p=$runs/sasrec/beauty-bce  # the published setting: one sampled negative, dropout 0.5 (Kang & McAuley 2018)
g data --dataset beauty -p "$p"
echo "== sasrec beauty bce"
g sasrec -p "$p" --loss bce --dropout 0.5 --epochs 400 --patience 20
evaluate "$p" sasrec
pack sasrec
