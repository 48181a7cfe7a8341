from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.project import sha256_file
from gloss_cli.ranking import as_array, merge_user

runner = CliRunner()
# The Last-Item-Search baseline under the paper's protocol on every user of the split (no generate stage needed)
LIS_ALL = ["--recipe", "lis-paper users=all"]


def _project(synthetic: Path, name: str = "p") -> Path:
    result = runner.invoke(app, ["data", "--source", str(synthetic), "-p", name, "-q"])
    assert result.exit_code == 0, result.output
    return Path(name)


def _gloss_file(project: Path, path: Path, split: str = "test", n: int = 5) -> list[dict]:
    items = pl.read_parquet(project / "data/items.parquet")
    titles = dict(items.iter_rows())
    rows = []
    for r in pl.read_parquet(project / f"data/{split}.parquet").iter_rows(named=True):
        # queries: the target's own title first (a perfect model), then the history's titles
        queries = [titles[r["target"]], *(titles[h] for h in reversed(r["history"]))][:n]
        queries += ["no such thing"] * (n - len(queries))
        rows.append(
            {
                "reviewer_id": r["user_id"],
                "asin": r["target"],
                "seen_asins": r["history"],
                "generated_sequences": [f"Title: {q}" for q in queries],
            }
        )
    path.write_text(json.dumps(rows))
    return rows


def test_paper_merge_keeps_top1_per_query_merges_and_sorts_by_score() -> None:
    keys = np.array([[3, 9], [3, 8], [5, 1]])
    scores = np.array([[2.0, 1.9], [4.0, 3.0], [3.0, 0.1]], dtype=np.float32)
    ranked = as_array([merge_user(keys, scores, set(), merge="top1", depth=1)[:5]], 5)
    assert ranked.tolist() == [[3, 5, -1, -1, -1]]  # 3 twice (best score 4.0), fewer than K items


def test_rrf_merge_fills_to_k_and_excludes_seen() -> None:
    keys = np.array([[3, 9, 7], [3, 8, 6]])
    scores = np.ones((2, 3), dtype=np.float32)
    ranked = as_array([merge_user(keys, scores, {9}, merge="rrf", depth=3)[:4]], 4)
    assert ranked[0, 0] == 3 and 9 not in ranked[0] and (ranked[0] >= 0).all()


def test_lis_eval_end_to_end(synthetic: Path) -> None:
    project = _project(synthetic)
    result = runner.invoke(app, ["eval", *LIS_ALL, "-p", "p", "--json", "-k", "5", "-k", "10"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["run"] == "lis-top1-kept-allusers-bm25-test"
    assert doc["users"] == pl.read_parquet(project / "data/test.parquet").height
    assert "history items kept" in doc["protocol_description"] and "users" in doc["protocol_description"]
    assert doc["metrics"]["recall@10"] >= doc["metrics"]["recall@5"]
    folder = project / "eval" / doc["run"]
    per_user = pl.read_parquet(folder / "per_user.parquet")
    assert per_user.height == doc["users"]
    assert per_user["recall@5"].mean() == pytest.approx(doc["metrics"]["recall@5"])
    run_lines = (folder / "run.trec").read_text().splitlines()
    assert run_lines and len(run_lines[0].split()) == 6 and run_lines[0].split()[1] == "Q0"
    assert len((folder / "qrels.trec").read_text().splitlines()) == doc["users"]
    manifest = json.loads((project / "manifest.json").read_text())
    assert doc["recipe"]["name"] == "lis-top1-kept-allusers" and doc["recipe"]["users"] == "all"
    assert set(manifest["stages"]["eval/lis-top1-kept-allusers-bm25-test"]["upstream"]) == {"data", "index/bm25"}


@pytest.mark.slow  # ranx compiles its metrics with numba on first use (~30 s)
def test_trec_files_read_by_ranx_give_the_same_recall(synthetic: Path) -> None:
    project = _project(synthetic)
    doc = json.loads(runner.invoke(app, ["eval", *LIS_ALL, "-p", "p", "--json", "-q"]).stdout)
    folder = project / "eval" / doc["run"]
    ranx = pytest.importorskip("ranx")
    theirs = ranx.evaluate(
        ranx.Qrels.from_file(str(folder / "qrels.trec"), kind="trec"),
        ranx.Run.from_file(str(folder / "run.trec"), kind="trec"),
        "recall@5",
    )
    assert theirs == pytest.approx(doc["metrics"]["recall@5"])


def test_exclude_seen_never_recommends_history(synthetic: Path) -> None:
    project = _project(synthetic)
    result = runner.invoke(app, ["eval", "--recipe", "lis users=all", "-p", "p", "-q"])
    assert result.exit_code == 0, result.output
    history = {
        r["user_id"]: set(r["history"]) for r in pl.read_parquet(project / "data/test.parquet").iter_rows(named=True)
    }
    for line in (project / "eval/lis-rrf-xseen-allusers-bm25-test/run.trec").read_text().splitlines():
        user, _, item, *_ = line.split()
        assert item not in history[user]


def test_gloss_json_queries_file(synthetic: Path, tmp_path: Path) -> None:
    project = _project(synthetic)
    _gloss_file(project, tmp_path / "q.json")
    args = ["eval", "--recipe", "paper", "--queries", str(tmp_path / "q.json"), "-p", "p", "--json", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    # the first query is the target's exact title: BM25 finds it (or a same-titled item) at the top
    digest = sha256_file(tmp_path / "q.json")[:8]  # a run read from a file names it by content: no collisions
    assert doc["metrics"]["recall@5"] > 0.8 and doc["run"] == f"paper-bm25-test-{digest}"


def test_gloss_jsonl_queries_file_and_lis_on_its_users(synthetic: Path, tmp_path: Path) -> None:
    """A 'gloss generate' queries.jsonl from elsewhere (e.g. a run cut off half way) evaluates on its own users,
    and a baseline (users=generated, the default) scores the same users."""
    project = _project(synthetic)
    rows = _gloss_file(project, tmp_path / "q.json")[:7]  # a partial run: 7 users
    with (tmp_path / "queries.jsonl").open("w") as fh:
        for r in rows:
            queries = [q.removeprefix("Title: ") for q in r["generated_sequences"]]
            entry = {"user_id": r["reviewer_id"], "target": r["asin"], "history": r["seen_asins"]}
            fh.write(json.dumps(entry | {"queries": queries, "scores": [-1.0] * len(queries)}) + "\n")
    args = ["eval", "--queries", str(tmp_path / "queries.jsonl"), "-p", "p", "--json", "-q"]
    model = json.loads(runner.invoke(app, [*args, "--recipe", "paper"]).stdout)
    lis = json.loads(runner.invoke(app, [*args, "--recipe", "lis-paper"]).stdout)
    assert model["users"] == lis["users"] == 7 and model["metrics"]["recall@5"] > 0.8
    digest = sha256_file(tmp_path / "queries.jsonl")[:8]
    assert model["run"] == f"paper-bm25-test-7u-{digest}" and lis["run"] == f"lis-paper-bm25-test-7u-{digest}"
    _assert_refused(["eval", "--queries", str(tmp_path / "none.jsonl"), "-p", "p"], "does not exist", project)
    fused = json.loads(runner.invoke(app, [*args, "--recipe", "lists=lis,model queries=2 seen=kept"]).stdout)
    assert fused["run"] == f"lis+model2-rrf-kept-bm25-test-7u-{digest}"
    assert fused["source"] == "file:queries.jsonl" and fused["recipe"]["lists"] == ["lis", "model"]
    params = json.loads(Path(fused["folder"], "metrics.json").read_text())
    assert params["queries_per_user"] == 3 and params["recipe"]["queries"] == 2
    assert "the last item's title, then the first 2 " in fused["protocol_description"]
    _assert_refused([*args[:-2], "--recipe", "lis queries=2"], "queries=2 but lists has no model", project)
    (tmp_path / "broken.jsonl").write_text('{"no_user_id": 1}\n')
    broken = ["eval", "--queries", str(tmp_path / "broken.jsonl"), "--recipe", "lis-paper", "-p", "p"]
    _assert_refused(broken, "Cannot read the users of", project)


def test_dense_eval_keeps_query_vectors_for_the_next_eval(synthetic: Path, tmp_path: Path) -> None:
    project = _project(synthetic)
    rows = _gloss_file(project, tmp_path / "q.json")
    args = ["eval", "--retriever", "minilm", "--queries", str(tmp_path / "q.json"), "-p", "p", "--json", "-q"]
    first = json.loads(runner.invoke(app, [*args, "--recipe", "paper"]).stdout)
    cache = project / "cache/query-vectors/minilm.npz"
    with np.load(cache) as z:
        distinct = {q.removeprefix("Title: ") for r in rows for q in r["generated_sequences"]}
        assert len(z["keys"]) == len(distinct) and z["vectors"].shape == (len(distinct), 384)
    fused = json.loads(runner.invoke(app, [*args, "--recipe", "model seen=kept"]).stdout)  # the same queries, cached
    assert fused["metrics"]["recall@5"] >= first["metrics"]["recall@5"] > 0.8
    cache.unlink()  # the cache is not a stage: deleting it only costs the encoding
    again = json.loads(runner.invoke(app, [*args, "--recipe", "paper", "--name", "again"]).stdout)
    assert again["metrics"] == first["metrics"] and cache.is_file()


def test_hybrid_fuses_its_parts_lists_by_reciprocal_rank() -> None:
    from gloss_cli.retrieval import HybridRetriever

    class Fixed:
        description = "fixed"

        def __init__(self, rows: list[list[int]]) -> None:
            self.rows = rows

        def search(self, texts: list[str], k: int, *, tick: object = None) -> tuple[np.ndarray, np.ndarray]:
            keys = np.array([row[:k] for row in self.rows], dtype=np.int64)
            return keys, np.zeros(keys.shape, dtype=np.float32)

    hybrid = HybridRetriever((Fixed([[1, 2, 3], [7, -1, -1]]), Fixed([[3, 4, 1], [8, 7, -1]])), "a+b", "a+b", c=60)
    keys, scores = hybrid.search(["q1", "q2"], 3)
    # q1: 1 = 1/61 + 1/63, 3 = 1/63 + 1/61 (a tie: the first part's order), then 2 (1/62) before 4 (1/62, later)
    assert keys.tolist() == [[1, 3, 2], [7, 8, -1]]
    assert scores[0].tolist() == pytest.approx([1 / 61 + 1 / 63, 1 / 63 + 1 / 61, 1 / 62])
    assert scores[1].tolist() == pytest.approx([1 / 61 + 1 / 62, 1 / 61, 0.0])


def test_hybrid_retriever_eval(synthetic: Path, tmp_path: Path) -> None:
    project = _project(synthetic)
    _gloss_file(project, tmp_path / "q.json")
    args = ["eval", "--queries", str(tmp_path / "q.json"), "-p", "p", "--json", "-q", "--recipe", "model seen=kept"]
    hybrid = json.loads(runner.invoke(app, [*args, "--retriever", "bm25+minilm"]).stdout)
    digest = sha256_file(tmp_path / "q.json")[:8]
    assert hybrid["run"] == f"model5-rrf-kept-bm25+minilm-test-{digest}" and hybrid["metrics"]["recall@5"] > 0.8
    record = json.loads((project / "manifest.json").read_text())["stages"]["eval/" + hybrid["run"]]
    assert set(record["upstream"]) == {"data", "index/bm25", "index/minilm"}  # both parts built on the fly
    summary = json.loads(Path(hybrid["folder"], "metrics.json").read_text())
    assert summary["retriever_description"].startswith("reciprocal-rank fusion (c=60) of BM25")
    shutil.rmtree(project / "index")
    built = runner.invoke(app, ["index", "--retriever", "bm25+minilm", "-p", "p"])
    assert built.exit_code == 0 and "index/bm25:" in built.output and "index/minilm:" in built.output
    stages = json.loads((project / "manifest.json").read_text())["stages"]
    assert [stages[f"index/{r}"]["command"] for r in ("bm25", "minilm")] == [
        "gloss index --retriever bm25",
        "gloss index --retriever minilm",
    ]
    for bad in ("bm25+", "bm25+bm25", "bm25+minilm+e5"):
        _assert_refused(["eval", "--retriever", bad, "-p", "p"], f"Cannot read the hybrid retriever '{bad}'", project)


def test_segments_table_and_plot(synthetic: Path) -> None:
    _project(synthetic)
    assert runner.invoke(app, ["eval", *LIS_ALL, "-p", "p", "-q"]).exit_code == 0
    result = runner.invoke(app, ["segments", "-p", "p", "--json", "--cold", "3", "--power", "6"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    seq = pl.read_parquet("p/data/sequences.parquet")
    users = {r["segment"]: r["users"] for r in doc["segments"]}
    assert users == {
        "cold-start": int((seq["n_dedup"] <= 3).sum()),
        "regular": int(((seq["n_dedup"] > 3) & (seq["n_dedup"] <= 6)).sum()),
        "power": int((seq["n_dedup"] > 6).sum()),
    }
    assert Path(doc["plot"]).read_bytes()[:4] == b"\x89PNG"


# -- bad input: one line, exit 1, nothing written ---------------------------------------------------------------
def _assert_refused(args: list[str], message: str, project: Path | None = None) -> None:
    before = json.loads((project / "manifest.json").read_text()) if project else None
    evals = sorted(p.name for p in (project / "eval").iterdir()) if project and (project / "eval").exists() else []
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert message in result.stderr.splitlines()[-2], result.stderr
    assert result.stderr.splitlines()[-1].startswith("hint: ")
    if project:
        assert json.loads((project / "manifest.json").read_text()) == before
        now = sorted(p.name for p in (project / "eval").iterdir()) if (project / "eval").exists() else []
        assert now == evals and not list(project.glob(".tmp-*"))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rows: "{broken", "is not JSON"),
        (lambda rows: [{k: v for k, v in rows[0].items() if k != "seen_asins"}], "no field seen_asins"),
        (lambda rows: [rows[0] | {"reviewer_id": "NOBODY"}], "unknown user"),
        (lambda rows: [rows[0] | {"seen_asins": ["B0NOTREAL"]}], "unknown item B0NOTREAL"),
        (
            lambda rows: [rows[0] | {"generated_sequences": rows[0]["generated_sequences"][:3]}],
            "3 generated sequences, expected 5",
        ),
    ],
    ids=["not-json", "missing-field", "unknown-user", "unknown-item", "few-sequences"],
)
def test_bad_queries_file(synthetic: Path, tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    project = _project(synthetic)
    rows = _gloss_file(project, tmp_path / "q.json")
    bad = mutate(rows)
    (tmp_path / "bad.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
    _assert_refused(["eval", "--recipe", "paper", "--queries", str(tmp_path / "bad.json"), "-p", "p"], message, project)


def test_eval_before_data_is_refused() -> None:
    _assert_refused(["eval", *LIS_ALL, "-p", "empty"], "Stage 'data' has not run")
    assert not Path("empty/manifest.json").exists()


def test_eval_of_a_model_before_generate_is_refused(synthetic: Path) -> None:
    project = _project(synthetic)
    _assert_refused(["eval", "-p", "p"], "Stage 'generate/test' has not run", project)
    # a baseline scores the users gloss generate covered, unless users=all
    _assert_refused(["eval", "--recipe", "lis", "-p", "p"], "Stage 'generate/test' has not run", project)


def test_index_from_another_catalog_is_refused(synthetic: Path, tmp_path: Path) -> None:
    project = _project(synthetic)
    assert runner.invoke(app, ["index", "-p", "p", "-q"]).exit_code == 0
    # the data stage is re-run on a catalog with one more item: the old index no longer fits
    items = pl.read_csv(synthetic / "items.csv.gz")
    pl.concat([items, pl.DataFrame({"item_id": ["I999"], "title": ["brand new thing"]})]).write_csv(
        tmp_path / "items.csv"
    )
    import gzip

    (synthetic / "items.csv.gz").write_bytes(gzip.compress((tmp_path / "items.csv").read_bytes()))
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    _assert_refused(["eval", *LIS_ALL, "-p", "p"], "index/bm25 was built on other items", project)
    status = json.loads(runner.invoke(app, ["status", "-p", "p", "--json"]).stdout)
    assert {s["name"]: s["state"] for s in status["stages"]}["index/bm25"] == "stale"


def test_unknown_recipe(synthetic: Path) -> None:
    project = _project(synthetic)
    _assert_refused(["eval", "--recipe", "magic", "-p", "p"], "Unknown recipe 'magic'", project)
    _assert_refused(["eval", "--recipe", "lis merge=magic", "-p", "p"], "Recipe: merge=magic is unknown", project)
