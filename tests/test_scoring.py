"""gloss_cli.backends.scoring: the log-probability of each candidate continuation, its prompt computed once, equals
a plain forward over prompt + continuation (no padding, no cache), for left-padded prompts of different lengths,
continuations of different lengths (a bare EOS among them), chunked or not, LoRA, and sliding-window layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.test_torch_beam import EOS, PROMPTS, load, tiny, tiny_gemma, tokenizer  # noqa: F401  (fixtures)

torch = pytest.importorskip("torch")
from gloss_cli.backends.scoring import score_continuations  # noqa: E402
from gloss_cli.examples import target_ids  # noqa: E402

TEXTS = ["Title: w1_2 w2_1", "Title: w3_4 w4_3 w10_3 w3_10", "Title: w5_5", "Title: w7_1 w1_7 w2_2"]


def plain(model: Any, tok: Any, prompt: str, continuation: list[int]) -> float:
    ids = tok(prompt)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids + continuation[:-1]])).logits[0].float()
    logp = torch.log_softmax(logits[len(ids) - 1 :], dim=-1)
    return float(logp.gather(-1, torch.tensor(continuation)[:, None]).sum())


def candidates(tok: Any) -> list[list[list[int]]]:
    ids = target_ids(tok, TEXTS)
    return [ids[: 1 + i % 4] + ([[EOS]] if i == 2 else []) for i in range(len(PROMPTS))]


def check(model: Any, tok: Any, **kwargs: Any) -> None:
    conts = candidates(tok)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    got = score_continuations(model, enc.input_ids, enc.attention_mask, conts, pad_token_id=tok.pad_token_id, **kwargs)
    want = [[plain(model, tok, p, c) for c in cs] for p, cs in zip(PROMPTS, conts, strict=True)]
    assert [len(g) for g in got] == [len(w) for w in want] == [1, 2, 4, 4, 1]
    for ours, theirs in zip(got, want, strict=True):
        assert ours == pytest.approx(theirs, abs=2e-3)
    assert len({round(v, 3) for row in want for v in row}) > 8  # the scores differ: the comparison means something


def test_target_ids_end_with_eos(tokenizer: Any) -> None:  # noqa: F811
    ids = target_ids(tokenizer, TEXTS)
    assert all(seq[-1] == EOS and EOS not in seq[:-1] for seq in ids)
    assert ids[0][:-1] == tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("max_logits", [2**27, 256 * 3])
def test_scores_equal_a_plain_forward(tiny: Path, tokenizer: Any, max_logits: int) -> None:  # noqa: F811
    check(load(tiny), tokenizer, max_logits=max_logits)  # one chunk; about one row per chunk


def test_lora(tiny: Path, tokenizer: Any) -> None:  # noqa: F811
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    check(get_peft_model(load(tiny), config).eval(), tokenizer)


def test_sliding_window_layers(tokenizer: Any, tmp_path: Path) -> None:  # noqa: F811
    check(tiny_gemma(tokenizer, tmp_path), tokenizer)


# `gloss rerank` and `gloss eval --recipe <a reranked recipe>` on the synthetic dataset with the tiny model
# the pool of LIS + the model's first 2 queries, history excluded, its top 6 (the list 'gloss eval' ranks)
POOL = "lists=lis,model queries=2 candidates=6"


def test_rerank_scores_each_pool_and_eval_orders_it(
    synthetic: Path,
    tiny: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    import polars as pl

    from gloss_cli.models import load_trained
    from gloss_cli.prompt import item_text
    from tests.test_torch_beam import invoke

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    invoke("data", "--source", str(synthetic))
    invoke("train", "--model", str(tiny), "--max-steps", "1", "--batch-size", "8")
    invoke("generate", "--split", "test", "--max-new-tokens", "12", "--batch-size", "4", "--limit", "8")
    states = {s["name"]: s["state"] for s in json.loads(invoke("status", "--json").stdout)["stages"]}
    assert not any(name.startswith("rerank") for name in states)  # optional: never asked for
    out = json.loads(invoke("rerank", "--recipe", f"{POOL} order=fused", "--json").stdout)  # split: test
    stage = "rerank/test-lis+model2-rrf-xseen-6-bm25"
    frame = pl.read_parquet(f"proj/{stage}/candidates.parquet")
    states = {s["name"]: s["state"] for s in json.loads(invoke("status", "--json").stdout)["stages"]}
    assert states[stage] == "done"
    assert frame["user_id"].n_unique() == out["metrics"]["users"] == 8  # the users generate covered
    assert frame.group_by("user_id").len()["len"].max() == 6
    assert frame.group_by("user_id").agg(pl.col("pool_rank").min())["pool_rank"].to_list() == [1] * 8
    # the pool is `gloss eval`'s list of the same recipe in retrieval order, at that depth, in that order
    invoke("eval", "--split", "test", "--recipe", "lists=lis,model queries=2", "-k", "6")
    trec = Path("proj/eval/lis+model2-rrf-xseen-bm25-test-8u/run.trec").read_text().splitlines()
    fused: dict[str, list[str]] = {}
    for line in trec:
        user, _, item, *_ = line.split()
        fused.setdefault(user, []).append(item)
    pools = frame.sort("user_id", "pool_rank").group_by("user_id", maintain_order=True).agg("item_id")
    assert dict(zip(pools["user_id"], pools["item_id"].to_list(), strict=True)) == fused
    # one score checked by hand: the model's log-probability of that title after that user's prompt
    row = frame.row(3, named=True)
    trained = load_trained(Path("proj/train"), device="cpu")
    split = pl.read_parquet("proj/data/test.parquet").filter(pl.col("user_id") == row["user_id"])
    titles = dict(pl.read_parquet("proj/data/items.parquet").iter_rows())
    from gloss_cli.prompt import build_prompt

    prompt = build_prompt([titles[i] for i in split["history"][0]])
    ids = target_ids(trained.tokenizer, [item_text(titles[row["item_id"]])])[0]
    assert row["tokens"] == len(ids)
    assert row["logprob"] == pytest.approx(plain(trained.model, trained.tokenizer, prompt, ids), abs=1e-3)
    for how in ("lm", "fused"):  # both orders of the one scored pool
        res = json.loads(invoke("eval", "--split", "test", "--recipe", f"{POOL} order={how}", "--json").stdout)
        assert res["users"] == 8 and res["recipe"]["order"] == how and res["source"] == stage
        assert res["run"] == f"lis+model2-rrf-xseen-{how}6-bm25-test"
        assert "its top 6 reordered by" in res["protocol_description"]
        per_user = pl.read_parquet(f"proj/eval/{res['run']}/per_user.parquet")
        assert per_user["n_recommended"].to_list() == [5] * 8
    lm_run = "proj/eval/lis+model2-rrf-xseen-lm6-bm25-test"
    lm = [line.split()[2] for line in Path(f"{lm_run}/run.trec").read_text().splitlines()]
    best = (
        frame.with_columns(v=pl.col("logprob") / pl.col("tokens"))
        .sort("user_id", "v", descending=[False, True])
        .group_by("user_id", maintain_order=True)
        .head(5)
    )
    first_user = pl.read_parquet(f"{lm_run}/per_user.parquet")["user_id"][0]
    assert lm[:5] == best.filter(pl.col("user_id") == first_user)["item_id"].to_list()
    # fused: 1 / (1 + pool rank) + 1 / (1 + the model's rank), ties to the pool's order
    mine = frame.filter(pl.col("user_id") == first_user).with_columns(v=pl.col("logprob") / pl.col("tokens"))
    model_rank = {item: r + 1 for r, item in enumerate(mine.sort("v", descending=True)["item_id"])}
    value = {i: 1 / (1 + r) + 1 / (1 + model_rank[i]) for i, r in zip(mine["item_id"], mine["pool_rank"], strict=True)}
    want = sorted(value, key=lambda i: (-value[i], mine.filter(pl.col("item_id") == i)["pool_rank"][0]))[:5]
    fused_run = Path("proj/eval/lis+model2-rrf-xseen-fused6-bm25-test/run.trec").read_text().splitlines()
    assert [line.split()[2] for line in fused_run[:5]] == want
    # users generated after the pools were scored: eval refuses pools that cover other users than the recipe now
    # does (it would have reported 8 users as the 10 generate covers), one line, and leaves every run as it was
    from typer.testing import CliRunner

    from gloss_cli.cli import app

    invoke("generate", "--split", "test", "--max-new-tokens", "12", "--batch-size", "4", "--limit", "10")
    runs = {p: p.stat().st_mtime_ns for p in Path("proj/eval").rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["eval", "--split", "test", "--recipe", f"{POOL} order=lm", "-p", "proj"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.startswith("error: The pools in rerank/test-") and "scored for other users" in result.output
    assert {p: p.stat().st_mtime_ns for p in Path("proj/eval").rglob("*") if p.is_file()} == runs


def test_rerank_bad_input_says_what_to_do(synthetic: Path, tiny: Path) -> None:  # noqa: F811
    import json

    import polars as pl
    from typer.testing import CliRunner

    from gloss_cli.cli import app
    from gloss_cli.ranking import rerank_stage
    from gloss_cli.recipe import PRESETS, parse
    from tests.test_torch_beam import invoke

    runner = CliRunner()
    invoke("data", "--source", str(synthetic))
    bad = runner.invoke(app, ["eval", "--recipe", "rerank-lm", "-p", "proj"])
    assert bad.exit_code == 1 and "Stage 'rerank/test-gloss-20-bm25' has not run" in bad.output
    assert "Traceback" not in bad.output
    invoke("train", "--model", str(tiny), "--max-steps", "1", "--batch-size", "8")
    bad = runner.invoke(app, ["rerank", "--split", "test", "-p", "proj"])  # the pool needs the generated queries
    assert bad.exit_code == 1 and "gloss generate --split test" in bad.output
    bad = runner.invoke(app, ["rerank", "--recipe", "rerank candidates=0", "-p", "proj"])
    assert bad.exit_code == 1 and "Recipe: candidates=0 is below 1" in bad.output
    bad = runner.invoke(app, ["rerank", "--recipe", "lis users=all", "-p", "proj"])
    assert bad.exit_code == 1 and "there is nothing for the model to score" in bad.output
    assert not Path("proj/rerank").exists()
    lis = "lists=lis candidates=3 users=all"  # LIS's top 3 for every test user: no generation needed
    lis_pool = ["rerank", "--split", "test", "--recipe", f"{lis} order=lm", "-p", "proj", "-q"]
    ok = runner.invoke(app, lis_pool)
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["eval", "--split", "test", "--recipe", f"{lis} order=best", "-p", "proj"])
    assert bad.exit_code == 1 and "Recipe: order=best is unknown" in bad.output
    for flags in (["--encoder", "mpnet"], ["--queries", "q.json"]):
        bad = runner.invoke(app, ["eval", "--split", "test", "--recipe", f"{lis} order=lm", *flags, "-p", "proj"])
        error = bad.output.splitlines()[0]
        assert bad.exit_code == 1 and error.startswith(f"error: {flags[0]} ") and "lis-rrf-xseen-lm3-allusers" in error
    args = ["eval", "--split", "test", "--recipe", f"{lis} order=lm", "--retriever", "minilm", "-p", "proj"]
    bad = runner.invoke(app, args)
    assert bad.exit_code == 1 and "gloss rerank --split test --retriever minilm --recipe" in bad.output
    assert not Path("proj/eval").exists()
    # another retriever's pools go beside BM25's, and --retriever picks which ones eval orders
    ok = runner.invoke(app, [*lis_pool, "--retriever", "minilm"])
    assert ok.exit_code == 0, ok.output
    pools = {
        r: pl.read_parquet(f"proj/rerank/test-lis-rrf-xseen-allusers-3-{r}/candidates.parquet")
        for r in ("bm25", "minilm")
    }
    assert not pools["bm25"].equals(pools["minilm"])
    rerank = PRESETS["rerank"]
    assert rerank_stage("test", rerank, "dense") == "rerank/test-gloss-20-minilm"  # the default encoder's index key
    assert rerank_stage("validation", rerank, "org/model+bm25") == "rerank/validation-gloss-20-org_model+bm25"
    assert rerank_stage("test", PRESETS["rerank-lm"], "bm25") == rerank_stage("test", rerank, "bm25")  # one pool
    for retriever, frame in pools.items():
        args = ["eval", "--split", "test", "--recipe", f"{lis} order=lm", "--retriever", retriever, "--json"]
        res = json.loads(invoke(*args).stdout)
        assert res["retriever"] == retriever and res["run"] == f"lis-rrf-xseen-lm3-allusers-{retriever}-test"
        trec = Path(f"proj/eval/{res['run']}/run.trec").read_text().splitlines()
        assert {line.split()[2] for line in trec} <= set(frame["item_id"])
    # pools that the transitions list led go beside them too, and a recipe with transitions orders those
    led_recipe = "lists=transitions,lis candidates=3 users=all"
    bad = runner.invoke(app, ["eval", "--split", "test", "--recipe", f"{led_recipe} order=lm", "-p", "proj"])
    assert bad.exit_code == 1 and "gloss rerank --split test --retriever bm25 --recipe" in bad.output
    ok = runner.invoke(app, ["rerank", "--split", "test", "--recipe", f"{led_recipe} order=lm", "-p", "proj", "-q"])
    assert ok.exit_code == 0, ok.output
    stage = rerank_stage("test", parse(f"{led_recipe} order=lm"), "bm25")
    assert stage == "rerank/test-transitions+lis-rrf-xseen-allusers-3-bm25"
    led = pl.read_parquet(f"proj/{stage}/candidates.parquet")
    from gloss_cli.transitions import recommend, transition_counts

    test = pl.read_parquet("proj/data/test.parquet")
    firsts = recommend(
        transition_counts(pl.read_parquet("proj/data/train.parquet")),
        test["history"].to_list(),
        depth=1,
        exclude_seen=True,
    )
    pool_of = {u: set(g["item_id"]) for (u,), g in led.group_by("user_id")}
    # weight 1 at rank 1 (1/2) against the LIS query's 1/4: the transitions list's first item is in every pool of 3
    assert all(own[0] in pool_of[u] for u, own in zip(test["user_id"].to_list(), firsts, strict=True) if own)
    assert not led.equals(pools["bm25"])
    res = json.loads(invoke("eval", "--split", "test", "--recipe", f"{led_recipe} order=fused", "--json").stdout)
    assert res["run"] == "transitions+lis-rrf-xseen-fused3-allusers-bm25-test"
    assert "the transitions list" in res["protocol_description"]
    manifest = json.loads(Path("proj/manifest.json").read_text())
    assert manifest["stages"][stage]["params"]["transitions"]["window"] == 3
