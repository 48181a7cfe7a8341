"""gloss train --task pick and gloss rerank with a pick model (gloss_cli.pick): examples show a pool that holds the
target and answer with its letter (test_transitions: the train-time transitions pools never count the example's own
target), the loss falls, rerank writes the letters' log-softmax per candidate and eval orders by it; bad input is one
line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.prompt import LETTERS
from tests.conftest import synthetic_rows, write_gz_csv
from tests.tiny_model import build_tiny_llama

torch = pytest.importorskip("torch")
runner = CliRunner()
POOL = "transitions order=lm candidates=5"
STAGE = "rerank/test-transitions-rrf-xseen-allusers-5-bm25"


@pytest.fixture(scope="module")
def tiny_letters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, its tokenizer taught the letters A-T (the shared one lacks most capitals)."""
    return build_tiny_llama(tmp_path_factory.mktemp("pick") / "model", titles=[f"{c}. w1_2 w2_1" for c in LETTERS])


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def invoke(*args: str) -> Any:
    result = runner.invoke(app, [*args, "-p", "proj", "-q"])
    assert result.exit_code == 0, result.output
    return result


def refused(args: list[str], message: str) -> None:
    result = runner.invoke(app, [*args, "-p", "proj"])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.splitlines()[0].startswith("error: ")


def test_pick_examples_hold_the_target_and_answer_with_its_letter(synthetic: Path, tiny_letters: Path) -> None:
    from gloss_cli.console import Reporter
    from gloss_cli.models import load_tokenizer
    from gloss_cli.pick import encode, fit_prompts, letter_ids, pool_recipe, train_rows
    from gloss_cli.project import Project
    from gloss_cli.train import _frames
    from gloss_cli.train_config import load_config

    invoke("data", "--source", str(synthetic))
    config = load_config(None, {"task": "pick", "pool": POOL})
    assert config.loss == "completion" and config.pool == pool_recipe(POOL).explicit()
    project = Project(Path("proj"))
    frames = _frames(project, config)
    (train, val), info, stages = train_rows(project, pool_recipe(POOL), frames, seed=1, reporter=Reporter())
    titles = dict(pl.read_parquet("proj/data/items.parquet").iter_rows())
    assert stages == () and info["candidates"] == 5 and info["retriever"] is None
    assert 0 < info["target_absent"]["train"] == train.absent < frames[0].height
    for rows, frame in ((train, frames[0]), (val, frames[1])):
        assert len(rows.pools) == frame.height > 0
        for r, pool, answer in zip(frame.iter_rows(named=True), rows.pools, rows.answers, strict=True):
            assert 1 <= len(pool) <= 5 and pool[answer] == titles[r["target"]]
    assert train.histories == [[titles[i] for i in h] for h in frames[0]["history"].to_list()]
    tokenizer = load_tokenizer(str(tiny_letters))
    encoded = encode(tokenizer, train, 1024, 5)
    letters = letter_ids(tokenizer, 5)
    for ids, start, pool, answer in zip(encoded.ids, encoded.prompt_lens, train.pools, train.answers, strict=True):
        assert ids[start:] == [letters[answer], tokenizer.eos_token_id]
        prompt = tokenizer.decode(ids[:start])
        assert f"{LETTERS[answer]}. Title: {pool[answer]}" in prompt and prompt.endswith("### Answer:\n")
    # a long pool cuts the history, never the pool
    newest, _ = fit_prompts(tokenizer, [h[-1:] for h in train.histories], train.pools, 10**6)
    tight = max(len(ids) for ids in newest) + 2
    short = encode(tokenizer, train, tight, 5)
    assert short.truncated > 0 and all(len(ids) <= tight for ids in short.ids)
    for ids, start, pool in zip(short.ids, short.prompt_lens, train.pools, strict=True):
        assert tokenizer.decode(ids[:start]).count(". Title: ") == len(pool)


def test_train_pick_then_rerank_and_eval(tmp_path: Path, tiny_letters: Path) -> None:
    from gloss_cli.models import load_trained
    from gloss_cli.pick import fit_prompts, letter_ids, pool_recipe

    inter, items = synthetic_rows()
    # a user of items no train sequence leads anywhere: an empty transitions pool, which eval must count as a miss
    inter += [["UCOLD", f"I9{i:02d}", 1_400_000_000 + i * 86_400] for i in range(3)]
    items += [[f"I9{i:02d}", f"cold w{i}_1"] for i in range(3)]
    source = tmp_path / "src"
    write_gz_csv(source / "interactions.csv.gz", ["user_id", "item_id", "timestamp"], inter)
    write_gz_csv(source / "items.csv.gz", ["item_id", "title"], items)
    invoke("data", "--source", str(source))
    args = ["--model", str(tiny_letters), "--task", "pick", "--pool", POOL, "--method", "full", "--lr", "3e-3"]
    invoke("train", *args, "--epochs", "3", "--batch-size", "8", "--json")
    meta = json.loads(Path("proj/train/meta.json").read_text())
    assert meta["task"] == "pick" and meta["config"]["pool"] == pool_recipe(POOL).explicit()
    assert meta["config"]["loss"] == "completion" and meta["pick"]["candidates"] == 5
    assert meta["pick"]["target_absent"]["train"] > 0
    losses = [x for e in meta["epochs"] for x in e["step_losses"] if x is not None]
    assert len(losses) >= 6 and losses[-1] < 0.5 * losses[0]  # the letter and EOS, learnt in a few steps
    record = json.loads(Path("proj/manifest.json").read_text())["stages"]["train"]
    assert (
        record["params"]["task"] == "pick"
        and record["metrics"]["pick"]["target_absent"] == meta["pick"]["target_absent"]
    )

    out = json.loads(invoke("rerank", "--recipe", f"{POOL} users=all", "--json").stdout)
    frame = pl.read_parquet(f"proj/{STAGE}/candidates.parquet")
    test_users = pl.read_parquet("proj/data/test.parquet")["user_id"]
    assert out["metrics"]["users"] == test_users.len() == frame["user_id"].n_unique() + 1 > 10
    assert "UCOLD" in test_users and "UCOLD" not in frame["user_id"]
    assert frame["tokens"].to_list() == [1] * frame.height
    assert all(math.isfinite(x) and x <= 0 for x in frame["logprob"].to_list())
    total = frame.group_by("user_id").agg(p=pl.col("logprob").exp().sum())["p"].to_list()
    assert total == pytest.approx([1.0] * len(total), abs=1e-4)  # a softmax over each pool's letters
    assert frame.group_by("user_id").len()["len"].max() == 5
    # one user by hand: the pool's letter logits after its prompt, in pool order
    user = frame.group_by("user_id").len().filter(pl.col("len") > 1)["user_id"][0]
    mine = frame.filter(pl.col("user_id") == user).sort("pool_rank")
    titles = dict(pl.read_parquet("proj/data/items.parquet").iter_rows())
    history = pl.read_parquet("proj/data/test.parquet").filter(pl.col("user_id") == user)["history"][0]
    trained = load_trained(Path("proj/train"), device="cpu")
    pool = [titles[i] for i in mine["item_id"]]
    (ids,), _ = fit_prompts(trained.tokenizer, [[titles[i] for i in history]], [pool], meta["max_seq_len"] - 2)
    with torch.inference_mode():
        logits = trained.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    want = torch.log_softmax(logits[letter_ids(trained.tokenizer, 5)[: len(pool)]], dim=-1).tolist()
    assert mine["logprob"].to_list() == pytest.approx(want, abs=1e-4)

    res = json.loads(invoke("eval", "--split", "test", "--recipe", f"{POOL} users=all", "-k", "5", "--json").stdout)
    assert res["source"] == STAGE and res["users"] == out["metrics"]["users"]  # the cold user too
    cold = pl.read_parquet(f"proj/eval/{res['run']}/per_user.parquet").filter(pl.col("user_id") == "UCOLD")
    assert cold["n_recommended"].to_list() == [0] and cold["recall@5"].to_list() == [0.0]
    assert 0 <= res["metrics"]["recall@5"] <= 1 and 0 <= res["metrics"]["ndcg@5"] <= res["metrics"]["recall@5"]
    trec = Path(f"proj/eval/{res['run']}/run.trec").read_text().splitlines()
    first = [line.split()[2] for line in trec if line.split()[0] == user]
    assert first == mine.sort("logprob", "pool_rank", descending=[True, False])["item_id"].to_list()[:5]

    # a rerank of other pools than the model learnt is refused, and writes nothing
    refused(["rerank", "--recipe", "transitions order=lm candidates=4 users=all"], "trained on the pools of recipe")
    refused(["rerank", "--recipe", "lists=transitions,lis order=lm candidates=5 users=all"], "--recipe 'lists=")
    # pools the sasrec list leads: no leak at test time, but never a pick model's training pools (pool_recipe)
    refused(["rerank", "--recipe", "lists=sasrec,transitions order=lm candidates=5 users=all"], "trained on the pools")
    assert sorted(p.name for p in Path("proj/rerank").iterdir()) == [STAGE.split("/")[1]]
    # it answers letters: generation (and with it recommend) is refused before anything is loaded or written
    refused(["generate", "--split", "test", "--limit", "3"], "picks among candidates")
    assert not Path("proj/generate").exists()


def test_a_lis_pool_reads_the_bm25_index_and_rerank_keeps_to_it(synthetic: Path, tiny_letters: Path) -> None:
    invoke("data", "--source", str(synthetic))
    pool = "lists=transitions,lis order=fused candidates=4"
    invoke("train", "--model", str(tiny_letters), "--task", "pick", "--pool", pool, "--max-steps", "1")
    meta = json.loads(Path("proj/train/meta.json").read_text())
    assert meta["pick"]["retriever"] == "bm25" and meta["pick"]["pool"]["lists"] == ["transitions", "lis"]
    record = json.loads(Path("proj/manifest.json").read_text())["stages"]["train"]
    assert "index/bm25" in json.dumps(record["upstream"])
    refused(["rerank", "--recipe", f"{pool} users=all", "--retriever", "minilm"], "pools that bm25 retrieved")
    assert not Path("proj/rerank").exists() and not Path("proj/index/minilm").exists()
    out = json.loads(invoke("rerank", "--recipe", f"{pool} users=all", "--json").stdout)
    frame = pl.read_parquet(out["path"])
    assert frame.group_by("user_id").len()["len"].max() == 4 and frame["tokens"].unique().to_list() == [1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--task", "pick"], "--task pick needs --pool"),
        (["--task", "guess"], "Unknown task 'guess'"),
        (["--pool", POOL], "--pool gives the candidates of --task pick"),
        (["--task", "pick", "--pool", "rerank"], "a pick pool must be model-free"),
        (["--task", "pick", "--pool", "sasrec order=lm"], "--pool cannot take the sasrec list"),
        (["--task", "pick", "--pool", "transitions"], "keeps the retrieval order"),
        (["--task", "pick", "--pool", "transitions order=lm candidates=21"], "at most 20 candidates"),
        (["--task", "pick", "--pool", "transitions order=best"], "--pool: Recipe: order=best is unknown"),
    ],
)
def test_bad_pick_flags_are_one_line_and_write_nothing(synthetic: Path, flags: list[str], message: str) -> None:
    invoke("data", "--source", str(synthetic))
    refused(["train", "--model", "no-such-model", *flags], message)
    assert not Path("proj/train").exists()


def test_a_train_record_older_than_the_task_setting_is_a_generation_run() -> None:
    from gloss_cli.pipeline import _fresh
    from gloss_cli.project import Project
    from gloss_cli.train_config import ADDED_LATER

    project = Project(Path("proj"))
    project.stage = lambda name: {"params": {"lr": 1e-4}}  # type: ignore[method-assign]  # recorded before task
    project.status = lambda: [type("S", (), {"name": "train", "state": "done"})()]  # type: ignore[method-assign]
    assert _fresh(project, "train", {"lr": 1e-4, **ADDED_LATER})
    assert not _fresh(project, "train", {"lr": 1e-4, "task": "pick", "pool": POOL})  # gloss run would retrain
