#!/usr/bin/env bash
# Issue 24 on a machine with several GPUs: data-parallel training and sharded generation and scoring on 1, 2 (4, 8)
# GPUs, as one job:  bash scripts/gpu/run.sh script scaling scripts/gpu/scaling.sh
# Per model, projects under $GLOSS_RUNS/scaling/:
#   MODEL-tN     gloss train on N GPUs (torchrun, one process per GPU) with per-rank --batch-size GLOBAL/N: the same
#                global batch, data and recipe as one GPU's. Its manifest has train tokens/s, wall time and the
#                validation loss per epoch; train/meta.json the losses per step.
#   MODEL-gN     a copy of MODEL-t1's data and model: gloss generate --split test and gloss rerank --split test on N GPUs,
#                from the one-GPU model, so that their merged outputs must equal one process's.
# scripts/gpu/scaling.py check compares each MODEL-gN with MODEL-g1 (check.json); scaling.py table prints the tables.
# What the CPU needs (manifests, train/meta.json, check.json) is packed into $GLOSS_RUNS/scaling-results.tgz after
# each step (a lease can end mid-way); the `wait` call copies it into $OUT.
# Settings (environment):
#   SCALING_GPUS          GPU counts, 1 first (default "1 2"; "1 2 4 8" on eight)
#   SCALING_MODELS        NAME=MODEL entries, MODEL a registry name or a local folder (default SmolLM2-135M and
#                         Qwen2.5-Coder-0.5B)
#   SCALING_GLOBAL_BATCH  64; SCALING_LIMIT_USERS 6000 train users; SCALING_EPOCHS 2
#   SCALING_USERS         test users to generate for and score (6000; 0 = all)
#   SCALING_DATA_ARGS     replaces `--dataset beauty` (e.g. `--source DIR` for a dry run on a CPU, where torchrun
#                         starts gloo processes)
#   SCALING_TRAIN_FLAGS, SCALING_GEN_FLAGS   more `gloss train` / `gloss generate` flags (on a CPU: SCALING_GEN_FLAGS
#                         ="--backend hf", the one backend torchrun shards)
# Dry run on a CPU (session 17: every step ran, outputs equal): GLOSS_RUNS=/tmp/scaldry/runs
#   SCALING_MODELS="tiny=DIR" SCALING_DATA_ARGS="--source SRC" SCALING_GLOBAL_BATCH=8 SCALING_LIMIT_USERS=0
#   SCALING_EPOCHS=1 SCALING_USERS=0 SCALING_GEN_FLAGS="--backend hf" bash scripts/gpu/scaling.sh
set -euo pipefail
runs=${GLOSS_RUNS:-/root/gloss-runs}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/gpu/jobs.sh
source "$here/jobs.sh"  # g, pack
gpus=${SCALING_GPUS:-1 2}
global=${SCALING_GLOBAL_BATCH:-64}
users=${SCALING_USERS:-6000}
limit=()
[ "$users" = 0 ] || limit=(--limit "$users")
pool="transitions order=lm candidates=20 users=generated"  # the users generate covered: the same for every N
[ "${gpus%% *}" = 1 ] || { echo "SCALING_GPUS must start with 1 (the baseline), got '$gpus'" >&2; exit 1; }
on() {  # on N ARGS: gloss ARGS in N processes (torchrun) or, for N = 1, in one plain process
  local n=$1; shift
  if [ "$n" = 1 ]; then
    g "$@"
  else
    /usr/bin/time -f '%e s %M KB' python3 -m torch.distributed.run --standalone --nproc-per-node "$n" -m gloss_cli "$@"
  fi
}
mkdir -p "$runs/scaling"
for entry in ${SCALING_MODELS:-smollm2=smollm2-135m-instruct-q4_1 qwen=qwen2.5-coder-0.5b-instruct-q4_k_m}; do
  m=${entry%%=*} model=${entry#*=}
  for n in $gpus; do
    p=$runs/scaling/$m-t$n
    if [ $((global % n)) != 0 ]; then echo "global batch $global does not split over $n GPUs" >&2; exit 1; fi
    # shellcheck disable=SC2086  # SCALING_DATA_ARGS and SCALING_TRAIN_FLAGS are word lists
    g data ${SCALING_DATA_ARGS:---dataset beauty} -p "$p" -q
    echo "== train $m on $n"
    # shellcheck disable=SC2086
    on "$n" train -p "$p" --model "$model" --method full --loss completion --lr 1e-4 --batch-size $((global / n)) \
      --epochs "${SCALING_EPOCHS:-2}" --patience 1 --max-seq-len 1024 --limit-users "${SCALING_LIMIT_USERS:-6000}" \
      ${SCALING_TRAIN_FLAGS:-}
    pack scaling
  done
  for n in $gpus; do
    p=$runs/scaling/$m-g$n
    rm -rf "$p" && mkdir -p "$p" && cp -r "$runs/scaling/$m-t1"/{data,train,manifest.json} "$p/"
    echo "== generate and rerank, $m on $n"
    # shellcheck disable=SC2086  # SCALING_GEN_FLAGS is a word list
    on "$n" generate -p "$p" -q --split test "${limit[@]}" ${SCALING_GEN_FLAGS:-}
    on "$n" rerank -p "$p" -q --split test --recipe "$pool"
    [ "$n" = 1 ] || python3 "$here/scaling.py" check "$runs/scaling/$m-g1" "$p" || echo "$m on $n: outputs differ"
    pack scaling
  done
done
python3 "$here/scaling.py" table "$runs/scaling"
