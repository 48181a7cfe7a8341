"""Which retriever's pools `gloss rerank --split test` scores (scripts/gpu/run.sh, GLOSS_RERANK_RETRIEVERS).

    python3 scripts/gpu/pick_rerank.py PROJECT RETRIEVER...

Prints the retriever whose `gloss eval --split validation $GLOSS_RERANK --retriever R --name rerank-R-val` (the
recipe's reranked order of the pools `gloss rerank` scored with R) has the highest Recall@5, the first listed on a
tie; validation only, never test.
"""

import json
import sys
from pathlib import Path

project, *retrievers = sys.argv[1:]
recall = {
    r: json.loads((Path(project) / f"eval/rerank-{r}-val/metrics.json").read_text())["metrics"]["recall@5"]
    for r in retrievers
}
print(max(retrievers, key=lambda r: (recall[r], -retrievers.index(r))))
