"""Retrievers over the catalog: BM25 (bm25s) and dense (sentence encoders + usearch), behind one small interface.

A hybrid (``bm25+e5``: any two of them joined by ``+``) fuses its parts' lists per query by reciprocal rank
(:class:`HybridRetriever`). Keys returned by a retriever are row numbers of ``data/items.parquet`` (catalog order).
Equal scores are common (the Amazon catalogs repeat titles), so gloss decides their order itself, never a library's
selection algorithm: a retriever's list is ordered by score descending, then key ascending (:func:`top_k`).
Each index folder keeps the library's own format (bm25s folder; ``index.usearch`` + ``vectors.npy``) plus a
``meta.json`` that names the retriever and the catalog fingerprint it was built on, so that an index from other
items is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from gloss_cli.console import Reporter, Tick
from gloss_cli.errors import GlossError
from gloss_cli.fusion import HYBRID_RRF_C, fuse

# GLoSS's BM25: bm25s defaults (Lucene variant, k1 = 1.5, b = 0.75), English stop words, no stemmer.
BM25_PARAMS = {"method": "lucene", "k1": 1.5, "b": 0.75, "stopwords": "en"}
DENSE_ALIASES = {"dense": None}  # "dense" = the default encoder (or --encoder)
# BM25 scores this many (query, item) pairs at a time: 16 MB of float32 scores, ~50 MB at peak with argpartition.
BM25_BLOCK = 1 << 22

Hits = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]  # (keys, scores), both (n_queries, k)


class Retriever(Protocol):
    name: str
    description: str

    def search(self, texts: Sequence[str], k: int, *, tick: Tick | None = None) -> Hits:
        """(keys, scores), both (len(texts), k), best first; higher score = better; equal scores by key."""
        ...


def top_k(scores: npt.NDArray[np.float32], k: int) -> Hits:
    """Each row's ``k`` best columns (item keys) and their scores, ordered by score descending, then key ascending.

    scores: (queries, items), finite, compared exactly as given. Among items tied at the k-th score, those with the
    lowest keys make the list, so which of a catalog's duplicate titles is recommended is gloss's rule, not the
    outcome of numpy's, bm25s's or jax's selection algorithm. ``k`` larger than the catalog is cut to its size.
    """
    rows, n = scores.shape
    k = min(k, n)
    if k < n:
        top = np.argpartition(scores, n - k, axis=1)[:, n - k :]  # a best k; which tied items: numpy's choice
        kth = np.take_along_axis(scores, top, axis=1).min(axis=1)
        # Where more items reach the k-th score than fit, take the tied ones with the lowest keys instead.
        for r in np.flatnonzero(np.count_nonzero(scores >= kth[:, None], axis=1) > k).tolist():
            above = np.flatnonzero(scores[r] > kth[r])
            top[r] = np.concatenate([above, np.flatnonzero(scores[r] == kth[r])[: k - len(above)]])
    else:
        top = np.broadcast_to(np.arange(n), (rows, n))
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -top_scores), axis=1)  # the last key sorts first: score descending, then key
    return (
        np.take_along_axis(top, order, axis=1).astype(np.int64, copy=False),
        np.take_along_axis(top_scores, order, axis=1).astype(np.float32, copy=False),
    )


def hybrid_parts(retriever: str) -> list[str]:
    """The parts of a hybrid retriever name (``bm25+e5`` -> ``["bm25", "e5"]``); one part for a plain name."""
    parts = [part.strip() for part in retriever.split("+")]
    if len(parts) > 1 and (len(parts) != 2 or not all(parts) or parts[0] == parts[1]):
        raise GlossError(
            f"Cannot read the hybrid retriever '{retriever}'.",
            "Join two different retrievers with '+', e.g. --retriever bm25+e5.",
        )
    return parts


def catalog_fingerprint(item_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(item_ids).encode()).hexdigest()[:16]


def index_key(retriever: str, encoder: str | None = None) -> str:
    """Stage/folder name of an index: ``bm25``, or the encoder's name made path-safe (``minilm``, ``e5``...); a
    hybrid's is its parts' keys joined by ``+`` (``bm25+e5``)."""
    parts = hybrid_parts(retriever)
    if len(parts) > 1:
        return "+".join(index_key(part, encoder) for part in parts)
    if retriever == "bm25":
        return "bm25"
    name = encoder if retriever in DENSE_ALIASES else retriever
    if name is None:
        from gloss_cli.backends.encoders import DEFAULT_ENCODER

        name = DEFAULT_ENCODER
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/")).strip("_")


# -- BM25 ---------------------------------------------------------------------------------------------------
@dataclass
class BM25Retriever:
    model: Any
    name: str = "bm25"
    description: str = "BM25 (bm25s, Lucene, k1=1.5, b=0.75, English stop words)"

    @classmethod
    def build(cls, texts: Sequence[str], folder: Path) -> BM25Retriever:
        import bm25s

        params = {k: v for k, v in BM25_PARAMS.items() if k != "stopwords"}
        model = bm25s.BM25(**params)
        model.index(
            bm25s.tokenize(list(texts), stopwords=BM25_PARAMS["stopwords"], show_progress=False), show_progress=False
        )
        model.save(str(folder), show_progress=False)
        return cls(model)

    @classmethod
    def load(cls, folder: Path) -> BM25Retriever:
        import bm25s

        return cls(bm25s.BM25.load(str(folder), show_progress=False))

    def search(self, texts: Sequence[str], k: int, *, tick: Tick | None = None) -> Hits:
        """Each text's top ``k`` items by BM25 score, then key (:func:`top_k`), scores exactly as bm25s computes them
        (``BM25.get_scores_from_ids``, float32), but selected by gloss rather than by ``BM25.retrieve``, whose choice
        among tied items depends on bm25s's version and backend. Items that share no token with the query score 0:
        they still fill the list, lowest keys first, so every list holds ``k`` items (merge=rrf fills to K).
        """
        import bm25s

        tokenized = bm25s.tokenize(list(texts), stopwords=BM25_PARAMS["stopwords"], show_progress=False)
        vocab = self.model.vocab_dict  # tokens the catalog never uses are dropped, as BM25.get_tokens_ids does
        to_index = {own: vocab[token] for token, own in tokenized.vocab.items() if token in vocab}
        count = int(self.model.scores["num_docs"])
        k = min(k, count)
        keys = np.empty((len(texts), k), dtype=np.int64)
        scores = np.empty((len(texts), k), dtype=np.float32)
        rows = max(1, BM25_BLOCK // count)
        for start in range(0, len(texts), rows):
            ids = tokenized.ids[start : start + rows]
            block = np.empty((len(ids), count), dtype=np.float32)
            for row, query in enumerate(ids):
                block[row] = self.model.get_scores_from_ids([to_index[t] for t in query if t in to_index])
            keys[start : start + len(ids)], scores[start : start + len(ids)] = top_k(block, k)
            if tick is not None:
                tick.advance(len(ids))
        return keys, scores


# -- dense --------------------------------------------------------------------------------------------------
class QueryVectorCache:
    """Query vectors kept between evaluations (one ``.npz``: 16-byte BLAKE2 keys of the texts, float32 rows, and the
    encoder they came from). A query's vector depends on the encoder alone, so evaluating the same queries again
    under another recipe or K encodes only the texts not seen before. A file from another encoder,
    or one that cannot be read, counts as empty and is replaced."""

    def __init__(self, path: Path, resolved: str) -> None:
        self.path, self.resolved = path, resolved
        self.keys = np.empty(0, dtype="S16")
        self.vectors: npt.NDArray[np.float32] | None = None
        try:
            with np.load(path) as z:
                if str(z["resolved"]) == resolved and len(z["keys"]) == len(z["vectors"]):
                    self.keys, self.vectors = z["keys"], z["vectors"].astype(np.float32, copy=False)
        except (OSError, KeyError, ValueError, EOFError):
            pass
        self.row_of = {key: row for row, key in enumerate(self.keys.tolist())}

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()

    def add(self, keys: list[bytes], vectors: npt.NDArray[np.float32]) -> None:
        """Store new rows (keys not in the cache yet), rewriting the file atomically."""
        from gloss_cli.project import atomic_file

        start = len(self.keys)
        self.keys = np.concatenate([self.keys, np.array(keys, dtype="S16")])
        self.vectors = vectors if self.vectors is None else np.concatenate([self.vectors, vectors])
        self.row_of |= {key: start + i for i, key in enumerate(keys)}
        with atomic_file(self.path) as f:
            np.savez(f, keys=self.keys, vectors=self.vectors, resolved=np.array(self.resolved))


@dataclass
class DenseRetriever:
    encoder: Any
    index: Any
    name: str
    description: str
    cache: QueryVectorCache | None = None

    def _encode(self, distinct: list[str], tick: Tick | None) -> npt.NDArray[np.float32]:
        """Vectors of distinct texts: from the cache where it has them, encoded (then cached) where not."""
        if self.cache is None:
            vectors: npt.NDArray[np.float32] = self.encoder.encode(distinct, kind="query", tick=tick)
            return vectors
        keys = [self.cache.key(text) for text in distinct]
        missing = [i for i, key in enumerate(keys) if key not in self.cache.row_of]
        fresh = self.encoder.encode([distinct[i] for i in missing], kind="query", tick=tick)
        if missing:
            self.cache.add([keys[i] for i in missing], fresh)
        if tick is not None:
            tick.advance(len(distinct) - len(missing))
        if self.cache.vectors is None:  # nothing asked, nothing cached
            return fresh
        return self.cache.vectors[[self.cache.row_of[key] for key in keys]]

    def search(self, texts: Sequence[str], k: int, *, tick: Tick | None = None) -> Hits:
        """Each text's top ``k`` items by cosine, then key (:meth:`DenseIndex.search`)."""
        row_of = {text: row for row, text in enumerate(dict.fromkeys(texts))}  # each distinct query encoded once:
        vectors = self._encode(list(row_of), tick)  # beams and popular titles repeat
        if tick is not None:
            tick.advance(len(texts) - len(row_of))
        keys, scores = self.index.search(vectors, k)
        rows = np.fromiter((row_of[text] for text in texts), dtype=np.int64, count=len(texts))
        return np.asarray(keys, dtype=np.int64)[rows], np.asarray(scores, dtype=np.float32)[rows]


@dataclass
class HybridRetriever:
    """Two retrievers' lists fused per query: each part retrieves its top ``k``; an item scores ``sum 1 / (c +
    rank)`` over the lists it is in (rank from 1); the top ``k`` by that score. Equal scores go to the item found
    first: the first part's before the second's, then the better rank. No two items are found at the same place, so
    that order is total; each part's own ties were already decided by key."""

    parts: tuple[Retriever, Retriever]
    name: str
    description: str
    c: float = HYBRID_RRF_C

    def search(self, texts: Sequence[str], k: int, *, tick: Tick | None = None) -> Hits:
        lists = [part.search(texts, k)[0] for part in self.parts]
        keys = np.full((len(texts), k), -1, dtype=np.int64)
        scores = np.zeros((len(texts), k), dtype=np.float32)
        for row in range(len(texts)):
            best = fuse([found[row].tolist() for found in lists], c=self.c)[:k]
            keys[row, : len(best)] = [key for key, _, _ in best]
            scores[row, : len(best)] = [value for _, value, _ in best]
        if tick is not None:
            tick.advance(len(texts))
        return keys, scores


_ENCODERS: dict[str, Any] = {}


def _encoder(name: str | None, reporter: Reporter | None) -> Any:
    """One encoder per name and process: building an index on the fly and then searching it loads (and warns
    about a fallback) once."""
    from gloss_cli.backends.encoders import DEFAULT_ENCODER, load_encoder

    name = name or DEFAULT_ENCODER
    if name not in _ENCODERS:
        _ENCODERS[name] = load_encoder(name, reporter)
    return _ENCODERS[name]


def build_index(
    retriever: str,
    texts: Sequence[str],
    folder: Path,
    *,
    encoder: str | None = None,
    ann: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Build the index in ``folder`` and return its meta (also written to ``folder/meta.json``)."""
    reporter = reporter or Reporter()
    meta: dict[str, Any] = {"retriever": retriever, "count": len(texts)}
    if retriever == "bm25":
        with reporter.progress("bm25 index", None):
            BM25Retriever.build(texts, folder)
        meta |= {"kind": "bm25", "params": BM25_PARAMS}
    else:
        from gloss_cli.backends.dense import build_dense_index

        enc = _encoder(encoder if retriever in DENSE_ALIASES else retriever, reporter)
        with reporter.progress(f"encode catalog ({enc.name})", len(texts)) as tick:
            vectors = enc.encode(list(texts), kind="passage", tick=tick)
        info = build_dense_index(vectors, folder, ann=ann)
        meta |= {
            "kind": "dense",
            "encoder": enc.name,
            "resolved": enc.resolved,
            "fallback": enc.fallback,
            "dim": enc.dim,
            "ann": ann,
            "index": info,
        }
    return meta


def load_retriever(
    folder: Path, meta: dict[str, Any], reporter: Reporter | None = None, *, query_cache: Path | None = None
) -> Retriever:
    """The index in ``folder``; a dense one keeps its query vectors in ``query_cache`` when given."""
    if meta["kind"] == "bm25":
        return BM25Retriever.load(folder)
    from gloss_cli.backends.dense import DenseIndex

    encoder = _encoder(meta["encoder"], reporter)
    if encoder.resolved != meta["resolved"]:
        raise GlossError(
            f"The index in {folder} was encoded with {meta['resolved']}, but '{meta['encoder']}' now loads "
            f"{encoder.resolved}.",
            f"Rebuild it: gloss index --retriever {meta['encoder']}",
        )
    cache = QueryVectorCache(query_cache, encoder.resolved) if query_cache is not None else None
    return DenseRetriever(encoder, DenseIndex.load(folder), meta["encoder"], encoder.resolved, cache)


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
