#!/usr/bin/env bash
# Evaluate, here on the CPU, the runs a GPU machine returned (scripts/gpu/run.sh wait: $OUT/NAME.tgz), as
# docs/RESULTS.md reports them:
#
#   bash scripts/notebook/evaluate_returned.sh RESULTS_DIR PROJECTS_DIR [RETRIEVER...]     (default retrievers: bm25)
#
# Per NAME.tgz: `gloss data` for its dataset into PROJECTS_DIR/NAME, the returned manifest, train/meta.json and
# generated queries unpacked over it (and its catalog-only generation, if any, into PROJECTS_DIR/NAME-catalog), then
# per retriever and project, the test split's first (where it was generated), each a recipe (`gloss recipes`) under
# the run name docs/RESULTS.md cites:
#   the model's queries and LIS under the paper protocol and gloss's (recipes paper, model; the LIS baseline on
#   every user of the split: lis-paper, lis with users=all);
#   LIS + model (lists=lis,model) with 2 and 5 queries on validation, and on test with the number validation picked;
#   the transitions list first, then LIS + 2 queries (recipe gloss), on both splits (tr-lis2-RETRIEVER-{val,test}),
#   and the transitions list alone on every user (transitions-xseen-{validation,test});
#   for BM25 also the ablation rows (history excluded alone, fusion alone, LIS + model with history kept);
#   where the run scored candidate pools (`gloss rerank`, gpu_run.sh GLOSS_RERANK): each pool ordered by order=lm
#   and order=fused under the recipe its stage records (rerank-{lm,fused}-POOL-RETRIEVER-{val,test}, POOL the pool
#   recipe's name; pools scored before recipes, issue 20, are skipped with a line);
# then `gloss segments` over the BM25 rows. An evaluation that already has its metrics is skipped, so a stopped
# run resumes. Dense retrievers encode every query on the CPU: minutes per evaluation of a whole test split.
set -euo pipefail
results=${1:?RESULTS_DIR} projects=${2:?PROJECTS_DIR}; shift 2
retrievers=("${@:-bm25}")
gloss() { python3 -m gloss_cli "$@"; }
evaluate() {  # PROJECT: its evaluations; the test split's only where it has test queries
p=$1 name=$(basename "$1")
test=; [ -f "$p/generate/test/queries.jsonl" ] && test=1
e() {  # NAME ARGS...: one evaluation, unless it is done
  local run=$1; shift
  [ -f "$p/eval/$run/metrics.json" ] || gloss eval -p "$p" -q --name "$run" "$@"
}
t() { [ -z "$test" ] || e "$@"; }  # a test split's evaluation
picked() {  # RETRIEVER: the number of beams for LIS + model that validation picks (2 on a tie)
  python3 - "$p" "$1" <<'PY'
import json, sys
p, r = sys.argv[1:]
val = {n: json.load(open(f"{p}/eval/lis{n}-{r}-val/metrics.json"))["metrics"]["recall@5"] for n in (2, 5)}
print(2 if val[2] >= val[5] else 5)
PY
}
for r in "${retrievers[@]}"; do
  echo "== $name, $r"
  t "model-$r-paper-test" --retriever "$r" --recipe paper
  t "lis-$r-paper-test" --retriever "$r" --recipe "lis-paper users=all"
  t "model-$r-fused-xseen-test" --retriever "$r" --recipe model
  t "lis-$r-fused-xseen-test" --retriever "$r" --recipe "lis users=all"
  for n in 2 5; do
    e "lis$n-$r-val" --retriever "$r" --split validation --recipe "lists=lis,model queries=$n"
  done
  n=$(picked "$r")
  t "lis$n-$r-test" --retriever "$r" --recipe "lists=lis,model queries=$n"
  for s in validation test; do  # transitions, then LIS + 2 beams (session 10's (5) and (6))
    [ $s = validation ] && x=e || x=t
    $x "tr-lis2-$r-${s/validation/val}" --retriever "$r" --split $s --recipe gloss
  done
  e "model-$r-paper-validation" --retriever "$r" --split validation --recipe paper
  e "model-$r-fused-xseen-validation" --retriever "$r" --split validation --recipe model
  if [ "$r" = bm25 ]; then
    t model-bm25-paper-xseen-test --retriever bm25 --recipe "paper seen=excluded"
    t model-bm25-fused-test --retriever bm25 --recipe "model seen=kept"
    t lis2-bm25-noxseen-test --retriever bm25 --recipe "lists=lis,model queries=2 seen=kept"
    [ -z "$test" ] || gloss segments -p "$p" -q --run model-bm25-paper-test --run lis-bm25-paper-test \
      --run model-bm25-fused-xseen-test --run lis-bm25-fused-xseen-test --run "lis$n-bm25-test"
  fi
done
e transitions-xseen-validation --split validation --recipe "transitions users=all"
t transitions-xseen-test --recipe "transitions users=all"
local run split r recipe
while IFS=$'\t' read -r run split r recipe; do  # each scored pool, ordered both ways (rerank_pools)
  e "$run" --split "$split" --retriever "$r" --recipe "$recipe"
done < <(rerank_pools "$p")
}
rerank_pools() {  # PROJECT: per pool that `gloss rerank` scored and per order (lm, fused), one line of
  # run name, split, retriever and recipe (explicit form), tab-separated: the recipe the stage records, reordered
  python3 - "$1" <<'PY'
import dataclasses, json, sys
from gloss_cli.recipe import from_dict
from gloss_cli.retrieval import index_key

stages = json.load(open(f"{sys.argv[1]}/manifest.json"))["stages"]
for stage, record in stages.items():
    params = record.get("params") or {}
    if not stage.startswith("rerank/"):
        continue
    if "recipe" not in params:
        print(f"skipped {stage}: scored before recipes (issue 20), in a folder gloss no longer reads", file=sys.stderr)
        continue
    pool, split = from_dict(params["recipe"]), params["split"]
    head = f"rerank/{split}-{pool.name()}-{params['candidates']}-"
    r = params["retriever"] if params["retriever"] != "none" else stage.removeprefix(head)
    for how in ("lm", "fused"):
        recipe = dataclasses.replace(pool, order=how, candidates=params["candidates"])
        short = {"validation": "val"}.get(split, split)
        run = f"rerank-{how}-{pool.name()}-{index_key(r)}-{short}".replace("/", "_")
        print(run, split, r, recipe.explicit(), sep="\t")
PY
}
unpack() {  # TGZ PROJECT [PREFIX]: `gloss data` for the run's dataset, then its records (under PREFIX/ in TGZ) over it
  local tgz=$1 p=$2 prefix=${3:-} dataset
  [ -d "$p/generate" ] && return
  dataset=$(tar -xzOf "$tgz" "${prefix}manifest.json" | python3 -c 'import json, sys; print(json.load(sys.stdin)["stages"]["data"]["params"]["dataset"])')
  gloss data --dataset "$dataset" -p "$p" -q
  tar -xzf "$tgz" -C "$p" --strip-components="$(tr -cd / <<< "$prefix" | wc -c)" --wildcards \
    "${prefix}manifest.json" "${prefix}train/meta.json" "${prefix}generate/*" \
    $(tar -tzf "$tgz" | grep -x "${prefix}rerank/.*" || true)  # the GPU run's, over the same data
}
for tgz in "$results"/*.tgz; do
  name=$(basename "$tgz" .tgz)
  members=$(tar -tzf "$tgz")
  grep -qx manifest.json <<< "$members" || continue  # a benchmark's log, not a run
  unpack "$tgz" "$projects/$name"
  runs=("$name")
  if grep -qx catalog/manifest.json <<< "$members"; then  # its catalog-only generation (gpu_run.sh GLOSS_CATALOG)
    unpack "$tgz" "$projects/$name-catalog" catalog/
    runs+=("$name-catalog")
  fi
  for run in "${runs[@]}"; do
    evaluate "$projects/$run"
  done
done
