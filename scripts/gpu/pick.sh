#!/usr/bin/env bash
# The pick task on a GPU (issue 22's lever; docs/notebook/2026-12-06-pick.md): a model trained to answer the
# target's letter among a lettered, model-free pool (LlamaRec-style), scored over the same pools by `gloss rerank`.
# Started there as a job:  bash scripts/gpu/run.sh script pick scripts/gpu/pick.sh
# Each project is $GLOSS_RUNS/pick/DATASET: gloss data, gloss train --task pick --pool POOL, gloss rerank of the
# validation and test splits (every user), then gloss eval, validation and test, K = 5 and 10, history excluded:
#   POOL order=lm      the pick model's order of the pool (the row this lever is about)
#   POOL order=fused   that order fused with the pool's own
#   transitions        the pool's own order (the no-model list it is measured against: declared here, before any
#                      test row exists)
# What the CPU needs to compare them (manifest, train/meta.json, metrics, per-user rows) is packed into
# $GLOSS_RUNS/pick-results.tgz after each project (a lease can end mid-way); the `wait` call copies it into $OUT.
# --max-seq-len 2048: at 1024, Qwen's tokens for a pool of 20 Beauty titles left no room for a history (session 17).
# Settings (environment): PICK_DATASETS (default beauty), PICK_MODEL (qwen2.5-0.5b), PICK_LIMIT_USERS (6000: about
# 10 min of Qwen training on an H100; 0 = all), PICK_EPOCHS (2), PICK_TRAIN_FLAGS (more `gloss train` flags),
# PICK_DATA_ARGS (replaces `--dataset DATASET`, e.g. `--source DIR` for a dry run on a CPU).
set -euo pipefail
runs=${GLOSS_RUNS:-/root/gloss-runs}
pool="transitions order=lm candidates=20"
fused="transitions order=fused candidates=20"
# shellcheck source=scripts/gpu/jobs.sh
source "$(dirname "$0")/jobs.sh"  # g, evaluate, pack
for d in ${PICK_DATASETS:-beauty}; do
  p=$runs/pick/$d
  # shellcheck disable=SC2086  # PICK_DATA_ARGS and PICK_TRAIN_FLAGS are word lists
  g data ${PICK_DATA_ARGS:---dataset $d} -p "$p"
  echo "== pick $d"
  # shellcheck disable=SC2086
  g train -p "$p" --task pick --pool "$pool" --model "${PICK_MODEL:-qwen2.5-0.5b}" --loss completion \
    --batch-size 32 --epochs "${PICK_EPOCHS:-2}" --patience 1 --lr 5e-4 --max-seq-len 2048 \
    --limit-users "${PICK_LIMIT_USERS:-6000}" ${PICK_TRAIN_FLAGS:-}
  for s in validation test; do
    g rerank -p "$p" -q --split $s --recipe "$pool users=all"
  done
  evaluate "$p" "$pool users=all" "$fused users=all" "transitions users=all"
  pack pick
done
