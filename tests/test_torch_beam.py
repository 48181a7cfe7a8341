"""gloss's batched beam search (gloss_cli.backends.torch_beam) returns transformers' beams: the same token ids and
scores as ``model.generate`` for every returned beam, on one batch of left-padded prompts of different lengths; and
constrained to a trie of catalog titles (``--catalog-only``), those of ``generate(prefix_allowed_tokens_fn=...)``.

The tiny model is tests/tiny_model.py's with its weights scaled up (margins far above float noise, as in
test_llama_cpp.py) and the EOS row of its LM head pulled towards three common tokens, so that many beams end at EOS:
the finished-hypothesis bookkeeping and the early-stop heuristic run, not only the max-length end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.prompt import build_prompt
from tests.tiny_model import build_tiny_llama

torch = pytest.importorskip("torch")
from gloss_cli.backends.torch_beam import search, unsupported  # noqa: E402
from gloss_cli.backends.trie import TokenTrie, catalog_trie  # noqa: E402

runner = CliRunner()
SCALE = 8.0
EOS = 2
PROMPTS = [
    build_prompt(["w1_2 w2_1", "w3_4 w4_3"]),
    build_prompt(["w10_3 w3_10"]),
    build_prompt(["w5_5 w5_5", "w7_1 w1_7", "w2_2 w2_2"]),
    "Title: w1",  # 4 tokens against ~320: mostly padding
    build_prompt([]),
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sharpened(model: Any, rows: tuple[int, ...] = (EOS,)) -> Any:
    """``model`` (in place) with its weights scaled up and the LM-head ``rows`` (EOS; test_ct2 adds the newline's)
    pulled towards common tokens, so that many beams finish early."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(SCALE)
        head = model.lm_head.weight
        common = head[98] + head[188] + head[93]
        for row in rows:
            head[row] += 0.8 * common
    return model


def sharpen(model: Any, folder: Path) -> Path:
    """``model`` sharpened (above) and saved to ``folder``."""
    sharpened(model).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    folder = build_tiny_llama(tmp_path_factory.mktemp("beam") / "model")
    return sharpen(AutoModelForCausalLM.from_pretrained(folder), folder)


def spy_attention(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(rows, prompts) of every decode-step attention call from now on: beams x prompts, and prompts whose keys
    were read."""
    from gloss_cli.backends import torch_beam

    calls: list[tuple[int, int]] = []
    real = torch_beam.shared_prompt_attention

    def spy(module: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((query.shape[0], kwargs["gloss_shared_prompt"].keys.shape[1]))
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(torch_beam, "shared_prompt_attention", spy)
    return calls


@pytest.fixture(scope="session")
def tokenizer(tiny: Path) -> Any:
    from gloss_cli.models import load_tokenizer

    tok = load_tokenizer(str(tiny))
    tok.padding_side = "left"
    return tok


def load(folder: Path, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


@pytest.fixture(scope="session")
def model(tiny: Path) -> Any:
    return load(tiny)


def hf_beams(
    model: Any, tokenizer: Any, beams: int, num_return: int, max_new: int, allowed: list[list[int]] | None = None
) -> tuple[list[Any], int]:
    """``model.generate`` on the batch as gloss's hf search calls it: per prompt (ids up to EOS, score; None for
    greedy); steps run. ``allowed``: the only token sequences a beam may spell (``prefix_allowed_tokens_fn``)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new,
        num_beams=beams,
        num_return_sequences=num_return,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=EOS,
    )
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    prompt_len = enc.input_ids.shape[1]
    kwargs = {} if allowed is None else {"prefix_allowed_tokens_fn": prefix_fn(allowed, prompt_len)}
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=config, **kwargs)
    new = out.sequences[:, prompt_len:].tolist()
    cut = [row[: row.index(EOS) + 1] if EOS in row else row for row in new]
    scores = out.sequences_scores.tolist() if beams > 1 else [None] * len(cut)
    found = [
        list(zip(cut[i : i + num_return], scores[i : i + num_return], strict=True))
        for i in range(0, len(cut), num_return)
    ]
    return found, len(new[0])


def gloss_beams(model: Any, tokenizer: Any, beams: int, num_return: int, max_new: int, **kwargs: Any) -> Any:
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return search(
        model,
        enc.input_ids,
        enc.attention_mask,
        beams=beams,
        num_return=num_return,
        max_new_tokens=max_new,
        eos_token_ids=[EOS],
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def assert_same(got: Any, want: Any) -> None:
    assert len(got) == len(want) == len(PROMPTS)
    for ours, theirs in zip(got, want, strict=True):
        assert [ids for ids, _ in ours] == [ids for ids, _ in theirs]
        assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], abs=1e-4)


@pytest.mark.parametrize("max_new", [12, 30])
def test_all_beams_match_generate(model: Any, tokenizer: Any, max_new: int) -> None:
    want, steps = hf_beams(model, tokenizer, 5, 5, max_new)
    assert_same(gloss_beams(model, tokenizer, 5, 5, max_new), want)
    lengths = [len(ids) for hyps in want for ids, _ in hyps]
    ended = [ids[-1] == EOS for hyps in want for ids, _ in hyps]
    assert sum(ended) >= 5 and min(lengths) < max_new  # many beams stopped at EOS
    if max_new == 12:
        assert max(lengths) == max_new and not all(ended)  # and some at the length limit
    else:
        assert steps < max_new  # every prompt ran out of improvement: the early-stop heuristic ended the search


def test_fewer_returns_than_beams_and_rare_checks(model: Any, tokenizer: Any) -> None:
    want, _ = hf_beams(model, tokenizer, 4, 2, 16)
    assert_same(gloss_beams(model, tokenizer, 4, 2, 16), want)
    assert_same(gloss_beams(model, tokenizer, 4, 2, 16, check_every=100), want)  # running on past the end is harmless


def test_buffers_are_freed_without_the_garbage_collector(model: Any, tokenizer: Any) -> None:
    """The KV buffers of a search must go when it returns, by reference counting alone: on a GPU, buffers left to
    the cycle collector piled up batch after batch until CUDA ran out of memory."""
    import gc

    from gloss_cli.backends.torch_beam import _Decoder

    def decoders() -> int:  # type(), not isinstance(): a dead weak proxy among the objects would raise
        return sum(type(o) is _Decoder for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        before = decoders()  # (any that something else still holds)
        gloss_beams(model, tokenizer, 5, 5, 8)
        gloss_beams(model, tokenizer, 5, 5, 8)
        assert decoders() == before
    finally:
        gc.enable()


def test_decode_steps_attend_through_the_shared_prompt(
    model: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every decode step of every layer reads the prompts' keys once per prompt (B rows, not B x beams), and the
    model's own attention is back once the search returns, even when it fails."""
    from gloss_cli.backends import torch_beam

    seen = spy_attention(monkeypatch)
    before = model.config._attn_implementation
    gloss_beams(model, tokenizer, 5, 5, 6)
    layers = model.config.num_hidden_layers
    assert len(seen) == 5 * layers  # one call per layer per decode step (the first token comes from the prefill)
    assert set(seen) == {(5 * len(PROMPTS), len(PROMPTS))}
    assert model.config._attn_implementation == before

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(torch_beam, "shared_prompt_attention", broken)
    with pytest.raises(RuntimeError, match="boom"):
        gloss_beams(model, tokenizer, 5, 5, 6)
    assert model.config._attn_implementation == before


def test_finished_prompts_leave_the_batch(model: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts whose hypotheses are final leave the batch at a check (``compact=1``: as soon as one is final), and
    the beams are still transformers'; ``compact=0`` keeps every prompt to the end."""
    calls = spy_attention(monkeypatch)
    want, _ = hf_beams(model, tokenizer, 5, 5, 30)
    for compact, check_every in ((1.0, 1), (1.0, 4), (0.0, 4)):
        calls.clear()
        assert_same(gloss_beams(model, tokenizer, 5, 5, 30, compact=compact, check_every=check_every), want)
        rows = [r for r, _ in calls]
        assert calls[0] == (5 * len(PROMPTS), len(PROMPTS))
        assert (min(rows) < rows[0]) == (compact > 0)  # prompts left the batch, or none did
        assert all(r == 5 * n for r, n in calls)  # a prompt leaves with all its beams


def test_lora_and_eager_attention(tiny: Path, tokenizer: Any) -> None:
    from peft import LoraConfig, get_peft_model

    from gloss_cli.models import quiet_transformers

    quiet_transformers()  # peft trips a transformers deprecation warning on itself
    torch.manual_seed(1)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False, task_type="CAUSAL_LM")
    lora = get_peft_model(load(tiny), config).eval()
    want, _ = hf_beams(lora, tokenizer, 5, 5, 12)
    assert_same(gloss_beams(lora, tokenizer, 5, 5, 12), want)
    eager = load(tiny, attn_implementation="eager")
    want, _ = hf_beams(eager, tokenizer, 3, 3, 12)
    assert_same(gloss_beams(eager, tokenizer, 3, 3, 12), want)


def tiny_gemma(tokenizer: Any, folder: Path) -> Any:
    """A tiny Gemma 3 whose sliding layers see 12 positions and whose middle layer sees all (sharpened, loaded)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(2)
    config = Gemma3TextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=EOS,
        attn_implementation="sdpa",
    )
    return load(sharpen(Gemma3ForCausalLM(config), folder))


def test_sliding_window_layers(tokenizer: Any, tmp_path: Path) -> None:
    """A tiny Gemma 3 whose sliding layers see 12 positions (prompts run to ~320 tokens, so the window cuts the
    prompt and then moves with the generated tokens) and whose full layer sees all: transformers' beams."""
    gemma = tiny_gemma(tokenizer, tmp_path)
    assert unsupported(gemma) is None
    want, _ = hf_beams(gemma, tokenizer, 5, 5, 16)
    assert_same(gloss_beams(gemma, tokenizer, 5, 5, 16), want)
    gemma.config.attn_logit_softcapping = 50.0
    assert unsupported(gemma) == "models with attention logit soft-capping"


def test_greedy_and_text_through_the_generator(model: Any, tokenizer: Any) -> None:
    """HFGenerator: the two searches give the same texts and scores, greedy (one beam) included."""
    from gloss_cli.generate import HFGenerator
    from gloss_cli.models import Trained

    hf = HFGenerator(Trained(model, tokenizer, {}), "cpu", "float32", search="hf")
    gloss = HFGenerator(Trained(model, tokenizer, {}), "cpu", "float32")
    assert gloss.describe()["search"] == "gloss" and gloss.default_batch_size == 8
    for beams, num_return in ((1, 1), (5, 3)):
        want = hf.generate(PROMPTS, beams=beams, num_return=num_return, max_new_tokens=20)
        got = gloss.generate(PROMPTS, beams=beams, num_return=num_return, max_new_tokens=20)
        for ours, theirs in zip(got, want, strict=True):
            assert [text for text, _ in ours] == [text for text, _ in theirs]
            assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], abs=1e-4)
        assert gloss.new_tokens == hf.new_tokens
    greedy = gloss_beams(model, tokenizer, 1, 1, 20)
    assert any(ids[-1] == EOS and len(ids) < 20 for [(ids, _)] in greedy)  # some rows stopped early


def test_cuda_batch_fits_half_the_free_memory(model: Any, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA batch of the gloss search: each prompt's KV rows once (twice while the search starts), its beams'
    generated rows and logits, within half the free memory; at least 8, at most 256."""
    from gloss_cli.generate import _gloss_cuda_batch
    from gloss_cli.models import Trained

    trained = Trained(model, tokenizer, {"max_seq_len": 1000})
    per_token = 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 KV heads x head dim 16 x float32
    per_prompt = per_token * (2 * 1000 + 5 * 64) + 6 * 5 * 256 * 4
    for free, want in ((2 * 100 * per_prompt, 100), (10**15, 256), (0, 8)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda free=free: (free, 10**15))
        assert _gloss_cuda_batch(trained) == want


def test_what_it_cannot_reproduce_is_said(tiny: Path, tokenizer: Any) -> None:
    model = load(tiny)
    assert unsupported(model) is None
    model.generation_config.repetition_penalty = 1.3
    assert unsupported(model) == "generation_config.repetition_penalty = 1.3"
    with pytest.raises(ValueError, match="repetition_penalty"):
        gloss_beams(model, tokenizer, 5, 5, 4)
    model.generation_config.repetition_penalty = 1.0
    model.config.layer_types = ["chunked_attention", "full_attention"]
    assert "chunked" in (unsupported(model) or "")


# -- gloss generate ---------------------------------------------------------------------------------------------


def invoke(*args: str) -> Any:
    result = runner.invoke(app, [*args, "-p", "proj", "-q"])
    assert result.exit_code == 0, result.output
    return result


def queries() -> list[dict[str, Any]]:
    text = Path("proj/generate/test/queries.jsonl").read_text(encoding="utf-8")
    return sorted((json.loads(line) for line in text.splitlines()), key=lambda r: r["user_id"])


def test_cli_searches_write_the_same_queries(synthetic: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    invoke("data", "--source", str(synthetic))
    invoke("train", "--model", str(tiny), "--max-steps", "1", "--batch-size", "8")
    gen = ("generate", "--split", "test", "--max-new-tokens", "12", "--batch-size", "4")
    invoke(*gen, "--limit", "10", "--search", "hf")
    hf = queries()
    invoke(*gen, "--limit", "10", "--overwrite")  # --search gloss, the default
    gloss = queries()
    assert [r["queries"] for r in gloss] == [r["queries"] for r in hf]
    for ours, theirs in zip(gloss, hf, strict=True):
        assert ours["scores"] == pytest.approx(theirs["scores"], abs=1e-4)
    record = json.loads(Path("proj/manifest.json").read_text())["stages"]["generate/test"]
    assert record["params"]["search"] == "gloss" and record["params"]["generator"]["search"] == "gloss"
    assert "search" not in json.loads(Path("proj/generate/test/settings.json").read_text())
    more = json.loads(invoke(*gen, "--limit", "12", "--search", "hf", "--json").stdout)  # resumes, not refused
    assert more["metrics"]["users_new"] == 2 and len(queries()) == 12


# Beam search constrained to the catalog (`gloss generate --catalog-only`, gloss_cli.backends.trie)

SEQUENCES = [[5, 7, 9], [5, 7, 2], [5, 8], [6], [5, 7, 9, 4]]


def test_the_trie_allows_what_follows_a_prefix_and_nothing_else() -> None:
    trie = TokenTrie(SEQUENCES)
    assert trie.sequences == 5 and trie.dead == 8  # root, 5, 5-7, 5-7-9, 5-7-2, 5-8, 6, 5-7-9-4
    root = torch.tensor([0, 0])
    node_5 = trie.advance(root, torch.tensor([5, 5]))
    node_57 = trie.advance(node_5, torch.tensor([7, 7]))
    lost = trie.advance(node_57, torch.tensor([3, 99]))  # not a child; past every token
    assert (lost == trie.dead).all()
    assert (trie.advance(lost, torch.tensor([9, 0])) == trie.dead).all()  # and it stays lost

    logprobs = torch.log_softmax(torch.randn(4, 12), dim=-1)
    nodes = torch.cat((root[:1], node_5[:1], node_57[:1], lost[:1]))
    kept = trie.restrict(logprobs, nodes)
    allowed = [set((kept[i] > -1e8).nonzero()[:, 0].tolist()) for i in range(4)]
    assert allowed == [{5, 6}, {7, 8}, {2, 9}, set()]
    assert torch.equal(kept[0, [5, 6]], logprobs[0, [5, 6]])  # the model's log-probs, not renormalised


def prefix_fn(sequences: list[list[int]], prompt_len: int) -> Any:
    """transformers' ``prefix_allowed_tokens_fn`` for the same sequences, a dict trie walked in Python."""
    root: dict[int, Any] = {}
    for seq in sequences:
        node = root
        for token in seq:
            node = node.setdefault(token, {})

    def allowed(batch_id: int, ids: Any) -> list[int]:
        node = root
        for token in ids[prompt_len:].tolist():
            node = node.get(token, {})
        return sorted(node) or [EOS]  # a beam already off every path (scored -inf) may end: it must do something

    return allowed


def catalog(tokenizer: Any) -> list[list[int]]:
    titles = ["w1_2 w2_1", "w3_4 w4_3", "w2_2 w2_2", "w1_7", "w7_1 w1_7 w5_5", "w10_3", "w5_5", "w3_10 w10_3"]
    ids = tokenizer([f"Title: {t}" for t in titles], add_special_tokens=False)["input_ids"]
    return [[*seq, EOS] for seq in ids]


@pytest.mark.parametrize(("beams", "num_return"), [(5, 5), (4, 2), (1, 1)])
def test_constrained_beams_are_generates_with_allowed_tokens(
    model: Any, tokenizer: Any, beams: int, num_return: int
) -> None:
    sequences = catalog(tokenizer)
    want, _ = hf_beams(model, tokenizer, beams, num_return, 30, allowed=sequences)
    assert all(ids in sequences for hyps in want for ids, _ in hyps)  # every beam a catalog title, EOS included
    for compact in (0.0, 1.0):
        found = gloss_beams(model, tokenizer, beams, num_return, 30, trie=TokenTrie(sequences), compact=compact)
        if beams > 1:
            assert_same(found, want)
            assert all(len({tuple(ids) for ids, _ in hyps}) == num_return for hyps in found)  # distinct titles
        else:  # greedy: generate gives no score to compare
            assert [ids for hyps in found for ids, _ in hyps] == [ids for hyps in want for ids, _ in hyps]
    free = gloss_beams(model, tokenizer, beams, num_return, 30)
    assert [ids for hyps in free for ids, _ in hyps] != [ids for hyps in want for ids, _ in hyps]  # it strays


def test_the_catalog_trie_tokenizes_as_training_does(tokenizer: Any) -> None:
    from gloss_cli.examples import encode_examples
    from gloss_cli.prompt import item_text

    titles = ["w1_2 w2_1", "w3_4 w4_3", "w1_2 w2_1"]  # a title twice is one path
    trie = catalog_trie(tokenizer, [item_text(t) for t in titles])
    assert trie.sequences == 2
    encoded = encode_examples(tokenizer, [["w5_5"]] * 2, titles[:2], 512)
    for ids, prompt_len in zip(encoded.ids, encoded.prompt_lens, strict=True):
        target = ids[prompt_len:]
        node = torch.tensor([0])
        for token in target:
            node = trie.advance(node, torch.tensor([token]))
        assert int(node) != trie.dead and int(trie.ptr[node + 1] - trie.ptr[node]) == 0  # a whole path, ending there


def test_catalog_only_generation_writes_catalog_titles(
    synthetic: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import polars as pl

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    invoke("data", "--source", str(synthetic))
    invoke("train", "--model", str(tiny), "--max-steps", "1", "--batch-size", "8")
    gen = ("generate", "--split", "test", "--max-new-tokens", "120", "--batch-size", "4", "--limit", "6")
    invoke(*gen)
    assert Path("proj/generate/test/settings.json").read_text().count("catalog_only") == 0  # as before the flag
    free = queries()
    invoke(*gen, "--catalog-only", "--overwrite")
    constrained = queries()
    titles = set(pl.read_parquet("proj/data/items.parquet")["title"])
    assert all(q in titles for r in constrained for q in r["queries"])
    assert all(len(set(r["queries"])) == 5 for r in constrained)
    assert sum(q not in titles for r in free for q in r["queries"]) > 0  # the free model strays off the catalog
    assert json.loads(Path("proj/generate/test/settings.json").read_text())["catalog_only"] is True
    record = json.loads(Path("proj/manifest.json").read_text())["stages"]["generate/test"]
    assert record["params"]["catalog_only"] is True


@pytest.mark.parametrize("flags", [("--search", "hf"), ("--backend", "llama-cpp")])
def test_catalog_only_needs_the_gloss_search(synthetic: Path, tiny: Path, flags: tuple[str, str]) -> None:
    invoke("data", "--source", str(synthetic))
    invoke("train", "--model", str(tiny), "--max-steps", "1", "--batch-size", "8")
    result = runner.invoke(app, ["generate", "--catalog-only", *flags, "-p", "proj"])
    assert result.exit_code == 1 and "--catalog-only needs the gloss search" in result.output
    assert "Traceback" not in result.output and not Path("proj/generate/test/queries.jsonl").exists()
