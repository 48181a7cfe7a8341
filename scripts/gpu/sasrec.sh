#!/usr/bin/env bash
# SASRec on a GPU (issue 22): every dataset in both tie orders, then the published-number check (Beauty, BCE loss).
# Started there as a job:  bash scripts/gpu/run.sh script sasrec scripts/gpu/sasrec.sh
# Each project is $GLOSS_RUNS/sasrec/DATASET-TIES: gloss data, gloss sasrec (the default grid, chosen on validation
# NDCG@10), then gloss eval of sasrec, transitions and both fused, validation and test, K = 5 and 10, every user,
# history excluded. Everything the CPU needs to compare them (meta.json, metrics, per-user rows) is packed into
# $GLOSS_RUNS/sasrec.tgz after each project (a lease can end mid-way); the `wait` call copies it into $OUT.
set -euo pipefail
runs=${GLOSS_RUNS:-/root/gloss-runs}
g() { /usr/bin/time -f '%e s %M KB' python3 -m gloss_cli "$@"; }
evaluate() {  # PROJECT RECIPES...
  local p=$1 r s; shift
  for r in "$@"; do
    for s in validation test; do
      g eval -p "$p" -q --split $s -k 5 -k 10 --recipe "$r" --name "$(echo "$r" | tr -c 'a-z0-9\n' '-' | sed 's/-*$//')-$s"
    done
  done
}
pack() { (cd "$runs" && tar -czf sasrec.tgz.part --ignore-failed-read \
  sasrec/*/{manifest.json,sasrec/meta.json,eval/*/metrics.json,eval/*/per_user.parquet} 2> /dev/null \
  && mv sasrec.tgz.part sasrec.tgz) || true; }
for d in ${SASREC_DATASETS:-toys sports beauty}; do
  for t in file shuffle; do
    p=$runs/sasrec/$d-$t
    if [ $t = shuffle ]; then g data --dataset $d --ties shuffle --seed 0 -p "$p"; else g data --dataset $d -p "$p"; fi
    echo "== sasrec $d $t"
    g sasrec -p "$p"
    evaluate "$p" sasrec "transitions users=all" "lists=sasrec,transitions users=all"
    pack
  done
done
p=$runs/sasrec/beauty-bce  # the published setting: one sampled negative, dropout 0.5 (Kang & McAuley 2018)
g data --dataset beauty -p "$p"
echo "== sasrec beauty bce"
g sasrec -p "$p" --loss bce --dropout 0.5 --epochs 400 --patience 20
evaluate "$p" sasrec
pack
