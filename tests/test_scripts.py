"""scripts/: the cross-run validation picks that docs/RESULTS.md reports, and the flags every script passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _project(root: Path, runs: dict[str, tuple[float, float]]) -> Path:
    root.mkdir()
    (root / "manifest.json").write_text("{}")
    for name, (recall, ndcg) in runs.items():
        folder = root / "eval" / name
        folder.mkdir(parents=True)
        doc = {"metrics": {"recall@5": recall, "ndcg@5": ndcg}, "ci95": {"recall@5": [recall - 0.01, recall + 0.01]}}
        (folder / "metrics.json").write_text(json.dumps(doc))
    return root


def _pick(*args: str) -> subprocess.CompletedProcess[str]:
    script = REPO / "scripts" / "notebook" / "pick_on_validation.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=False)


def test_the_best_validation_row_is_picked_and_the_earlier_run_wins_a_tie(tmp_path: Path) -> None:
    a = _project(tmp_path / "a", {"lis2-bm25-val": (0.05, 0.03), "lis2-bm25-test": (0.061, 0.04)})
    b = _project(tmp_path / "b", {"lis2-bm25-val": (0.05, 0.03), "lis5-e5-val": (0.04, 0.02)})
    c = _project(tmp_path / "c", {"lis5-e5-val": (0.07, 0.05), "lis5-e5-test": (0.066, 0.045)})
    tie = _pick(f"A={a}", f"B={b}", "--retrievers", "bm25", "e5")
    assert tie.returncode == 0, tie.stderr
    assert tie.stdout.strip().endswith("validation picks: A, BM25, 2 beams (validation Recall@5 0.0500)")
    assert "| **A** | BM25 | 2 | **0.0500** | 0.0610 [0.0510, 0.0710] | 0.0400 |" in tie.stdout
    assert "| B | MiniLM |" not in tie.stdout  # only the retrievers asked for
    best = _pick(f"A={a}", f"B={b}", f"C={c}")
    assert "validation picks: C, e5*, 5 beams" in best.stdout
    assert "| B | MiniLM | 2 | not evaluated |" in best.stdout


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    for args in (["no-equals-sign"], [f"A={tmp_path}"]):
        result = _pick(*args)
        assert result.returncode == 1 and result.stderr.count("\n") == 1 and "LABEL=PROJECT" in result.stderr
    empty = _project(tmp_path / "empty", {})
    result = _pick(f"E={empty}")
    assert result.returncode == 1 and "no validation candidate" in result.stderr


def test_pick_rerank_takes_the_best_validation_rerank_and_the_first_listed_on_a_tie(tmp_path: Path) -> None:
    project = _project(tmp_path / "p", {"rerank-bm25-val": (0.05, 0.03), "rerank-e5-val": (0.06, 0.04)})
    script = REPO / "scripts" / "gpu" / "pick_rerank.py"

    def pick(*retrievers: str) -> str:
        done = subprocess.run([sys.executable, str(script), str(project), *retrievers], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert pick("bm25", "e5") == "e5" and pick("bm25") == "bm25"
    (project / "eval" / "rerank-e5-val" / "metrics.json").write_text(
        json.dumps({"metrics": {"recall@5": 0.05, "ndcg@5": 0.04}})
    )
    assert pick("e5", "bm25") == "e5" and pick("bm25", "e5") == "bm25"


# gloss eval, rerank and recommend flags that recipes replaced (issue 20): an example that used one would fail
REMOVED_FLAGS = (
    "--baseline",
    "--protocol",
    "--exclude-seen",
    "--include-seen",
    "--with-lis",
    "--with-transitions",
    "--num-queries",
    "--match-generated",
    "--candidates",
    "--rerank ",
)


def test_scripts_benchmarks_and_the_readme_use_no_removed_flag() -> None:
    files = [REPO / "README.md", REPO / "benchmarks" / "README.md"]
    files += sorted((REPO / "scripts").rglob("*.sh")) + sorted((REPO / "scripts").rglob("*.py"))
    files += sorted((REPO / "benchmarks").glob("*.py"))
    found = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if any(flag in line for flag in REMOVED_FLAGS)
    ]
    assert found == []
    for script in sorted((REPO / "scripts").rglob("*.sh")):  # and every shell script parses
        assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0, script


def _scaled(root: Path, queries: list[str], logprobs: list[float], stages: dict[str, object]) -> Path:
    """A project as scripts/gpu/scaling.sh leaves one: test queries, a scored pool, a manifest with stage records."""
    import polars as pl

    (root / "generate" / "test").mkdir(parents=True)
    (root / "generate" / "test" / "queries.jsonl").write_text("".join(q + "\n" for q in queries))
    pools = root / "rerank" / "test-transitions-20-bm25"
    pools.mkdir(parents=True)
    users = [json.loads(q)["user_id"] for q in queries]
    pl.DataFrame(
        {"user_id": users, "item_id": ["I1"] * len(users), "pool_rank": [1] * len(users), "logprob": logprobs}
    ).write_parquet(pools / "candidates.parquet")
    (root / "manifest.json").write_text(json.dumps({"stages": stages}))
    return root


def _scaling(*args: str) -> subprocess.CompletedProcess[str]:
    script = REPO / "scripts" / "gpu" / "scaling.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=False)


def test_scaling_check_finds_any_difference_and_the_table_divides_by_n_times_one_gpu(tmp_path: Path) -> None:
    lines = [json.dumps({"user_id": u, "queries": [f"t{u}"]}) for u in ("a", "b", "c")]
    train = {"train": {"duration_s": 50.0, "metrics": {"tokens_per_s": 1000.0, "losses": [{"val_loss": 2.5}]}}}
    gen1 = {"generate/test": {"duration_s": 30.0, "metrics": {"users": 3, "users_per_s": 10.0, "seconds": 0.3}}}
    one = _scaled(tmp_path / "m-g1", lines, [-1.0, -2.0, -3.0], gen1)
    (tmp_path / "m-t1").mkdir()
    (tmp_path / "m-t1" / "manifest.json").write_text(json.dumps({"stages": train}))
    ranks = [{"rank": 0, "seconds": 0.2}, {"rank": 1, "seconds": 0.25}]  # the slowest process's loop counts
    gen2 = {
        "generate/test": {"duration_s": 20.0, "metrics": {"users": 3, "users_new": 3, "seconds": 9.0, "ranks": ranks}}
    }
    two = _scaled(tmp_path / "m-g2", lines, [-1.0, -2.0, -3.00001], gen2)
    done = _scaling("check", str(one), str(two))
    assert done.returncode == 0, done.stderr
    assert json.loads((two / "check.json").read_text())["equal"] is True

    other = _scaled(tmp_path / "m-g3", [*lines[:2], lines[2].replace("tc", "tx")], [-1.0, -2.0, -3.1], gen2)
    done = _scaling("check", str(one), str(other))
    verdict = json.loads((other / "check.json").read_text())
    assert done.returncode == 1 and verdict["equal"] is False and verdict["queries_identical"] == 2
    assert verdict["logprob_max_abs_diff"] > 0.09

    table = _scaling("table", str(tmp_path))
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith("| m |")]
    assert rows[0].startswith("| m | 1 | 1,000 | 1.00 | 2.500 | 50 | 10.0 (30 s) | 1.00 |")
    assert rows[1].startswith("| m | 2 |  |  |  |  | 12.0 (20 s) | 0.60 |") and rows[1].endswith("| yes |")
    assert rows[2].endswith("| **no** |")
