#!/usr/bin/env bash
# Paper-scale gloss runs on a GPU machine with no network (see docs/RESULTS.md for what they produced).
#
# Here:   bash scripts/gpu/bundle.sh                 (wheels + model package into .stash/gpu.NN, data into .gpu/data)
# There:  bash .stash/gpu.NN/put.sh                  (one call per chunk, back to back)
#         bash scripts/gpu/run.sh start NAME DATASET [gloss train flags...]   (returns at once; the job runs on)
#           env GLOSS_DATA_FLAGS: extra `gloss data` flags (e.g. --train-examples all-prefixes)
#               GLOSS_GEN_FLAGS: extra `gloss generate` flags; GLOSS_TEST_LIMIT: test users to generate for
#               (0: none, only validation; unset: all)
#               GLOSS_VALIDATION=0: no validation generation (a run whose reported configuration was declared before)
#               GLOSS_EVAL: retrievers to evaluate with there (e.g. "bm25 minilm"): test and validation splits,
#               the recipes paper and model (the model's queries under the paper's merge and gloss's), the LIS
#               baseline under both on every user (lis-paper, lis: users=all) and LIS + the model's 2 or 5 queries
#               (device time is scarce: scripts/notebook/evaluate_returned.sh evaluates the returned runs on a CPU instead)
#               GLOSS_GPU: the GPU index to run on (machines with several GPUs; generation takes turns per GPU)
#               GLOSS_CATALOG=1: the trained model also generates with --catalog-only (validation and test, whatever
#               GLOSS_TEST_LIMIT says) in a copy of the project, NAME-catalog (data and train only); =only: and
#               its unconstrained generation is of the validation split only
#               GLOSS_RERANK: the `--recipe` flag of `gloss rerank` and `gloss eval`, a reranked recipe (e.g.
#               "--recipe rerank", or "--recipe 'lists=lis,model queries=2 order=fused candidates=20'"; `gloss
#               recipes` lists the presets): after generation the model scores each user's pool of candidates
#               (the recipe's list, its top candidates), validation and test (whatever GLOSS_TEST_LIMIT says)
#               GLOSS_RERANK_RETRIEVERS: the retrievers whose pools it scores (default bm25; the transitions list
#               is the recipe's: lists=transitions,...), each on validation; on test only the one whose
#               `gloss eval $GLOSS_RERANK` validation Recall@5 is highest (the first listed on a tie)
#               GLOSS_AFTER: runs (names) whose logs must say finished or FAILED before this job begins (timings
#               taken with the GPU to itself)
#         bash scripts/gpu/run.sh evaluate NAME                 (GLOSS_EVAL's evaluations of a generated run)
#         bash scripts/gpu/run.sh after-train NAME              (generation and evaluations of a trained run, again)
#         bash scripts/gpu/run.sh test NAME [generate flags]   (generate the test split of an earlier run)
#         bash scripts/gpu/run.sh bench NAME SCRIPT [flags]   (a benchmark as a job)
#         bash scripts/gpu/run.sh script NAME FILE [args]   (a bash script as a job, e.g. scripts/gpu/sasrec.sh)
#         bash scripts/gpu/run.sh wait SECONDS        (follows the logs; copies each run's NAME.tgz and the script jobs'
#                                                     NAME-results.tgz to $OUT)
# Several runs may share the GPU (a 135M model leaves room); each is a project folder /root/gloss-runs/NAME.
# Their generation steps take turns (flock): each sizes its batches from the free GPU memory, and concurrent
# searches sized that way ran out of memory (docs/RESULTS.md, 2026-11-29); alone, each also measures its speed.
# A command may run 10 minutes and the machine stays up only while calls follow each other, so each job runs in
# its own session (setsid) and `wait` is called again until every log reports "finished".
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${GLOSS_RUNS:-/root/gloss-runs}
site=${GLOSS_SITE:-/tmp/gloss-site}
setup() {
  if [ ! -d "$site" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" /root/stash/gpu/.gpu/bundle/wheels/*.whl
  fi
  export PYTHONPATH="$site:$PWD" GLOSS_DATA_DIR="$PWD/.gpu/data" GLOSS_HOME=/root/gloss-home PYTHONUNBUFFERED=1
  export PATH="$site/bin:$PATH" PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  # bm25s selects its top-k with JAX when it can import it, and JAX takes 75 % of a GPU at start: on a GPU that
  # generation shares, that ran it out of memory (2026-11-30); BM25 needs no GPU
  export JAX_PLATFORMS=cpu
}
job() {  # NAME SCRIPT: run SCRIPT (bash) in its own session, logging to NAME/log.txt
  mkdir -p "$runs/$1"
  local gpu=${GLOSS_GPU:-}
  nvidia-smi ${gpu:+-i $gpu} --query-gpu=name,memory.total --format=csv,noheader > "$runs/$1/gpu.txt"
  setsid nohup bash -c "trap 'echo FAILED' ERR; set -eE; cd '$PWD'
    ${gpu:+export CUDA_VISIBLE_DEVICES=$gpu}
    g() { /usr/bin/time -f '%e s %M KB' python3 -m gloss_cli \"\$@\" -p '$runs/$1'; }
    lock() { if command -v flock > /dev/null; then flock '$runs/.generate${gpu:+.$gpu}.lock' \"\$@\"; else \"\$@\"; fi; }
    gen() { lock /usr/bin/time -f '%e s %M KB' python3 -m gloss_cli generate \"\$@\" -p '$runs/$1'; }
    $(for r in ${GLOSS_AFTER:-}; do
      echo "until grep -qE '^(finished|FAILED)' '$runs/$r/log.txt' 2> /dev/null; do sleep 5; done; echo 'after $r'"
    done)
    $2
    echo finished" >> "$runs/$1/log.txt" 2>&1 < /dev/null &
  echo "started $1: $runs/$1/log.txt"
}
after_train() {  # the steps after `gloss train`: generation (validation, test), then GLOSS_EVAL's evaluations
    test_step="gen --split test ${GLOSS_GEN_FLAGS:-} ${GLOSS_TEST_LIMIT:+--limit $GLOSS_TEST_LIMIT}"
    [ "${GLOSS_TEST_LIMIT:-}" = 0 ] || [ "${GLOSS_CATALOG:-}" = only ] && test_step=":"
    fork=":" catalog=":"
    if [ -n "${GLOSS_CATALOG:-}" ]; then  # the copy before any generation, so that its manifest has data and train only
      local c="$runs/$name-catalog"
      fork="rm -rf '$c' && mkdir -p '$c' && cp -r '$runs/$name/data' '$runs/$name/train' '$runs/$name/manifest.json' '$c/'"
      catalog="lock /usr/bin/time -f '%e s %M KB' python3 -m gloss_cli generate --split validation --catalog-only -p '$c'
        $([ "${GLOSS_TEST_LIMIT:-}" = 0 ] || echo "lock /usr/bin/time -f '%e s %M KB' python3 -m gloss_cli generate \
          --split test --catalog-only ${GLOSS_TEST_LIMIT:+--limit $GLOSS_TEST_LIMIT} -p '$c'")"
    fi
    rerank=":"
    if [ -n "${GLOSS_RERANK:-}" ]; then
      local r rs=${GLOSS_RERANK_RETRIEVERS:-bm25}
      rerank=$(for r in $rs; do
        echo "lock /usr/bin/time -f '%e s %M KB' python3 -m gloss_cli rerank --split validation --retriever $r \
          $GLOSS_RERANK -p '$runs/$name'
          g eval --split validation --retriever $r $GLOSS_RERANK --name rerank-$r-val"
      done)
      [ "$test_step" = ":" ] || rerank+="
        best=\$(python3 scripts/gpu/pick_rerank.py '$runs/$name' $rs); echo \"test rerank: \$best (validation)\"
        lock /usr/bin/time -f '%e s %M KB' python3 -m gloss_cli rerank --split test --retriever \$best \
          $GLOSS_RERANK -p '$runs/$name'"
    fi
    local val_step="gen --split validation ${GLOSS_GEN_FLAGS:-}"
    [ "${GLOSS_VALIDATION:-1}" = 0 ] && val_step=":"
    echo "$fork
      $val_step
      $test_step
      $rerank
      $catalog
      $(eval_steps)"
}
eval_steps() {  # GLOSS_EVAL's evaluations, retriever by retriever, the test split's first (gloss recipes: the presets)
  for r in ${GLOSS_EVAL:-}; do
    for p in "paper:lis-paper" "model:lis"; do  # the paper's merge (history kept), then gloss's (fused, excluded)
      echo "g eval --retriever $r --recipe ${p%%:*} || true
        g eval --retriever $r --recipe '${p#*:} users=all' || true"
    done
    for n in 2 5; do  # LIS + model fusion; validation picks the number of beams
      echo "g eval --retriever $r --recipe 'lists=lis,model queries=$n' --name lis$n-$r-test || true
        g eval --retriever $r --split validation --recipe 'lists=lis,model queries=$n' --name lis$n-$r-val || true"
    done
    for p in paper model; do
      echo "g eval --retriever $r --split validation --recipe $p || true"
    done
  done
}
case "${1:-}" in
  start)
    name=${2:?name} dataset=${3:?dataset}; shift 3
    setup
    job "$name" "
      g data --dataset $dataset ${GLOSS_DATA_FLAGS:-}
      g train --dataset $dataset $*
      $(after_train)"
    ;;
  evaluate)  # GLOSS_EVAL's evaluations of a run whose generation is done
    name=${2:?name}
    setup
    sed -i -E '/^(finished|FAILED)$/d' "$runs/$name/log.txt"
    job "$name" "$(eval_steps)"
    ;;
  after-train)  # a trained run's generation and evaluations again (say on another GPU: GLOSS_GPU); resumes
    name=${2:?name}
    setup
    sed -i -E '/^(finished|FAILED)$/d' "$runs/$name/log.txt"
    job "$name" "$(after_train)"
    ;;
  test)
    name=${2:?name}; shift 2
    setup
    sed -i -E '/^(finished|FAILED)$/d' "$runs/$name/log.txt"
    job "$name" "gen --split test $*"
    ;;
  bench)  # python3 SCRIPT ARGS (a benchmark) as a job NAME, once the runs named in GLOSS_AFTER have ended
    name=${2:?name}; shift 2
    setup
    job "$name" "python3 $*"
    ;;
  script)  # bash FILE ARGS as a job NAME, once the runs named in GLOSS_AFTER have ended
    name=${2:?name}; shift 2
    setup
    job "$name" "bash $*"
    ;;
  wait)
    limit=${2:-540}
    for ((t = 0; t < limit; t += 15)); do
      pending=0
      for log in "$runs"/*/log.txt; do
        grep -qE '^(finished|FAILED)' "$log" || pending=1
      done
      [ "$pending" = 0 ] && break
      sleep 15
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader || true
    for d in "$runs"/*/; do
      name=$(basename "$d")
      [[ $name == *-catalog ]] && continue  # in its run's file
      echo "== $name"
      tail -c 2500 "$d/log.txt" | tr '\r' '\n' | grep -v '^\s*$' | tail -12  || true
      [ -n "${OUT:-}" ] || continue
      # one file per run ($OUT takes at most 8): manifest, log, train/meta.json, generated queries, evaluations;
      # its catalog-only generation (GLOSS_CATALOG) under catalog/
      (cd "$runs" && shopt -s nullglob && tar -czf "$OUT/$name.tgz" --ignore-failed-read \
        --transform "s,^$name-catalog/,catalog/," --transform "s,^$name/,," \
        {"$name","$name-catalog"}/{manifest.json,log.txt,gpu.txt,train/meta.json} \
        {"$name","$name-catalog"}/generate/*/{queries.jsonl,settings.json} "$name"/rerank/*/candidates.parquet \
        {"$name","$name-catalog"}/eval/*/{metrics.json,per_user.parquet} 2>/dev/null) || true
    done
    # the script jobs' packed results (scripts/gpu/jobs.sh: pack), each as complete as its last project
    if [ -n "${OUT:-}" ]; then
      for f in "$runs"/*-results.tgz; do
        if [ -e "$f" ]; then cp "$f" "$OUT/"; fi
      done
    fi
    ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
