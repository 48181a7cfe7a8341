#!/usr/bin/env bash
# Evaluate, here on the CPU, the runs a GPU machine returned (scripts/gpu_run.sh wait: $OUT/NAME.tgz), as
# docs/RESULTS.md reports them:
#
#   bash scripts/evaluate_returned.sh RESULTS_DIR PROJECTS_DIR [RETRIEVER...]     (default retrievers: bm25)
#
# Per NAME.tgz: `gloss data` for its dataset into PROJECTS_DIR/NAME, the returned manifest, train/meta.json and
# generated queries unpacked over it, then per retriever, the test split's first:
#   the model's queries and LIS under the paper protocol and gloss's (fused, history excluded);
#   LIS + model (`--with-lis`) with 2 and 5 beams on validation, and on test with the number validation picked;
#   for BM25 also the ablation rows (history excluded alone, fusion alone, LIS + model with history kept);
# then `gloss segments` over the BM25 rows. An evaluation that already has its metrics is skipped, so a stopped
# run resumes. Dense retrievers encode every query on the CPU: minutes per evaluation of a whole test split.
set -euo pipefail
results=${1:?RESULTS_DIR} projects=${2:?PROJECTS_DIR}; shift 2
retrievers=("${@:-bm25}")
gloss() { python3 -m gloss_cli "$@"; }
for tgz in "$results"/*.tgz; do
  name=$(basename "$tgz" .tgz) p="$projects/$(basename "$tgz" .tgz)"
  dataset=$(tar -xzOf "$tgz" manifest.json | python3 -c 'import json, sys; print(json.load(sys.stdin)["stages"]["data"]["params"]["dataset"])')
  if [ ! -f "$p/generate/test/queries.jsonl" ]; then
    gloss data --dataset "$dataset" -p "$p" -q
    tar -xzf "$tgz" -C "$p" manifest.json train/meta.json generate  # the GPU run's records, over the same data
  fi
  e() {  # NAME ARGS...: one evaluation, unless it is done
    local run=$1; shift
    [ -f "$p/eval/$run/metrics.json" ] || gloss eval -p "$p" -q --name "$run" "$@"
  }
  picked() {  # RETRIEVER: the number of beams for LIS + model that validation picks (2 on a tie)
    python3 - "$p" "$1" <<'PY'
import json, sys
p, r = sys.argv[1:]
val = {n: json.load(open(f"{p}/eval/lis{n}-{r}-val/metrics.json"))["metrics"]["recall@5"] for n in (2, 5)}
print(2 if val[2] >= val[5] else 5)
PY
  }
  for r in "${retrievers[@]}"; do
    echo "== $name ($dataset), $r"
    e "model-$r-paper-test" --retriever "$r" --protocol paper
    e "lis-$r-paper-test" --retriever "$r" --baseline lis --protocol paper
    e "model-$r-fused-xseen-test" --retriever "$r" --protocol fused --exclude-seen
    e "lis-$r-fused-xseen-test" --retriever "$r" --baseline lis --protocol fused --exclude-seen
    for n in 2 5; do
      e "lis$n-$r-val" --retriever "$r" --split validation --protocol fused --exclude-seen --with-lis --num-queries "$n"
    done
    n=$(picked "$r")
    e "lis$n-$r-test" --retriever "$r" --protocol fused --exclude-seen --with-lis --num-queries "$n"
    e "model-$r-paper-validation" --retriever "$r" --split validation --protocol paper
    e "model-$r-fused-xseen-validation" --retriever "$r" --split validation --protocol fused --exclude-seen
    if [ "$r" = bm25 ]; then
      e model-bm25-paper-xseen-test --retriever bm25 --protocol paper --exclude-seen
      e model-bm25-fused-test --retriever bm25 --protocol fused
      e lis2-bm25-noxseen-test --retriever bm25 --protocol fused --with-lis --num-queries 2
      gloss segments -p "$p" -q --run model-bm25-paper-test --run lis-bm25-paper-test \
        --run model-bm25-fused-xseen-test --run lis-bm25-fused-xseen-test --run "lis$n-bm25-test"
    fi
  done
done
