# Shared by the GPU job scripts (sasrec.sh, pick.sh, scaling.sh): source it, with `runs` set to $GLOSS_RUNS.
# g ARGS: gloss, timed. evaluate PROJECT RECIPES...: each recipe on validation and test, K = 5 and 10, each run named
# after its recipe. pack NAME: NAME/* projects' manifests, train and sasrec metadata, metrics and per-user rows into
# $runs/NAME-results.tgz (written aside, then renamed: a lease that ends mid-way leaves the last complete one); run.sh's
# `wait` copies it into $OUT beside its own NAME.tgz (the job's log), which the name must not collide with.
g() { /usr/bin/time -f '%e s %M KB' python3 -m gloss_cli "$@"; }
evaluate() {
  local p=$1 r s; shift
  for r in "$@"; do
    for s in validation test; do
      g eval -p "$p" -q --split $s -k 5 -k 10 --recipe "$r" --name "$(echo "$r" | tr -c 'a-z0-9\n' '-' | sed 's/-*$//')-$s"
    done
  done
}
pack() {
  (cd "$runs" && tar -czf "$1-results.tgz.part" --ignore-failed-read \
    "$1"/*/{manifest.json,check.json,train/meta.json,sasrec/meta.json,eval/*/metrics.json,eval/*/per_user.parquet} 2> /dev/null \
    && mv "$1-results.tgz.part" "$1-results.tgz") || true
}
