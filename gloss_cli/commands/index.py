"""`gloss index`."""

from __future__ import annotations

from typing import Annotated

import typer

from gloss_cli.console import RichReporter, out, print_json
from gloss_cli.options import DEFAULT_PROJECT_PATH, EncoderOpt, JsonOpt, ProjectOpt, QuietOpt, RetrieverOpt
from gloss_cli.project import Project


def index(
    retriever: RetrieverOpt = "bm25",
    encoder: EncoderOpt = None,
    ann: Annotated[bool, typer.Option("--ann", help="Approximate (HNSW) dense search, for large catalogs.")] = False,
    project: ProjectOpt = DEFAULT_PROJECT_PATH,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Build a retrieval index over the catalog ("Title: <title>" per item).

    BM25 is bm25s (Lucene, k1=1.5, b=0.75, English stop words), as GLoSS. Dense indexes encode the catalog with a
    sentence encoder (L2-normalised) and search it exactly with usearch (--ann: HNSW).

    [dim]Examples:[/]

      gloss index --retriever bm25

      gloss index --retriever e5

      gloss index --retriever dense --encoder sentence-transformers/all-mpnet-base-v2

      gloss index --retriever bm25+e5          # both indexes, for the hybrid retriever
    """
    from gloss_cli.index import run

    reporter = RichReporter(quiet)
    proj = Project(project)
    command = (
        f"gloss index --retriever {retriever}"
        + (f" --encoder {encoder}" if encoder else "")
        + (" --ann" if ann else "")
    )
    with proj.lock(command, reporter):
        meta = run(proj, retriever, encoder=encoder, ann=ann, command=command, reporter=reporter)
    if json_:
        print_json({"project": str(proj.root), **meta})
    else:
        for part in meta.get("parts", [meta]):  # a hybrid's two indexes
            out.print(f"index/{part['key']}: {part.get('resolved', 'BM25 (bm25s)')}, {part['count']:,} items")
