"""The CTranslate2 backend (gloss_cli.backends.ct2): transformers' beams under CTranslate2's stopping rule, the line
stop, the cached conversion, the CLI, and the refusals (no ctranslate2, a dtype it cannot run, a model it cannot
convert).

The tiny model is tests/tiny_model.py's with its weights scaled up (margins far above float noise, as in
test_llama_cpp.py) and the EOS and newline rows of its LM head pulled towards common tokens, so that many beams
end at EOS or at the end of a line: the finished hypotheses and both stopping rules are exercised, not only the
token limit.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError
from gloss_cli.generate import GenerateOptions, default_backend, open_generator
from gloss_cli.prompt import build_prompt
from tests.conftest import CACHE_DAMAGES, Recording, damage_cache, gloss_in_fresh_process, transformers_beams
from tests.test_torch_beam import EOS, sharpened
from tests.tiny_model import build_tiny_llama

pytest.importorskip("ctranslate2")
torch = pytest.importorskip("torch")

runner = CliRunner()
PROMPTS = [
    build_prompt(["w1_2 w2_1", "w3_4 w4_3"]),
    build_prompt(["w10_3 w3_10"]),
    build_prompt(["w5_5 w5_5", "w7_1 w1_7", "w2_2 w2_2"]),
    build_prompt(["w9_9 w9_9"]),
    build_prompt(["w4_4 w1_1", "w6_6 w6_6"]),
    build_prompt([]),
]
Beams = list[list[tuple[str, float]]]


def only_tokenizer_files(folder: str, names: list[str]) -> list[str]:
    return [name for name in names if "token" not in name]


def write_train(folder: Path, model: Any, tokenizer_dir: Path) -> dict[str, Any]:
    """A full fine-tune's train/ folder (model/, tokenizer/, meta.json) holding ``model``; returns its meta."""
    model.save_pretrained(folder / "model")
    shutil.copytree(tokenizer_dir, folder / "tokenizer", ignore=only_tokenizer_files)
    meta = {"format": "full", "base_model": {"name": "tiny", "kind": "folder", "location": str(tokenizer_dir)}}
    meta["max_seq_len"] = 512
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


@pytest.fixture(scope="module")
def sharp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The sharpened tiny model as a full fine-tune's train/ folder, and its meta."""
    from transformers import AutoModelForCausalLM

    from gloss_cli.models import load_tokenizer

    root = tmp_path_factory.mktemp("ct2")
    tiny = build_tiny_llama(root / "tiny")
    newline = load_tokenizer(str(tiny))("Title: x\n", add_special_tokens=False)["input_ids"][-1]
    model = sharpened(AutoModelForCausalLM.from_pretrained(tiny), rows=(EOS, newline))
    meta = write_train(root / "train", model, tiny)
    return root / "train", meta


def generate(train: Path, meta: dict[str, Any], backend: str, *, stop: bool = False, **kw: Any) -> Beams:
    options = GenerateOptions(backend=backend, dtype="fp32", stop_at_newline=stop)
    generator = open_generator(train, meta, options, kw.pop("reporter", Reporter()))
    return generator.generate(PROMPTS, beams=5, num_return=5, max_new_tokens=kw.pop("max_new_tokens", 30))


def early_stopping_beams(
    train: Path, stop_ids: list[int], prompts: list[str] = PROMPTS, beams: int = 5, max_new_tokens: int = 30
) -> Beams:
    """transformers' own beam search with ``early_stopping=True``: done once ``beams`` hypotheses have finished."""
    from transformers import AutoModelForCausalLM

    from gloss_cli.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(train / "model", dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(train / "tokenizer"))
    return transformers_beams(
        model,
        tokenizer,
        prompts,
        beams,
        max_new_tokens,
        early_stopping=True,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )


def text(generated: str) -> str:
    """A generated text without the line-end token that ended it ("\n", " \n", ...: transformers keeps it, ct2
    cuts it, as llama-cpp does)."""
    return generated.rstrip()


def texts(beams: Beams) -> list[list[str]]:
    return [[text(t) for t, _ in hyps] for hyps in beams]


def assert_same(got: Beams, want: Beams) -> None:
    assert texts(got) == texts(want)
    for ours, theirs in zip(got, want, strict=True):
        assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], abs=1e-4)


# -- beam search ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [False, True])
def test_beams_are_transformers_beams_stopped_at_the_fifth_finished(sharp: tuple[Path, Any], stop: bool) -> None:
    """CTranslate2 stops once `beams` hypotheses have finished (gloss_cli.backends.ct2): transformers' search with
    early_stopping=True, every beam and score, at EOS only and with the line stop (EOS and newline end a beam)."""
    train, meta = sharp
    got = generate(train, meta, "ct2", stop=stop)
    assert_same(got, early_stopping_beams(train, [EOS, 3] if stop else [EOS]))
    lengths = {len(t) for hyps in got for t, _ in hyps}
    assert 0 in lengths and len(lengths) > 3  # some beams ended at once, others later
    newlines = ["\n" in t for hyps in got for t, _ in hyps]
    assert not any(newlines) if stop else any(newlines)  # the newline row pulls: without the stop, lines go on


@pytest.mark.parametrize("stop", [False, True])
def test_top_beam_is_the_hf_backends_unless_hf_searched_on(sharp: tuple[Path, Any], stop: bool) -> None:
    """The hf backend (early_stopping=False) goes on while a live beam could still beat the worst finished one:
    where its best beam differs from ct2's, it is one ct2 never finished, and it scores higher. Lower beams differ
    more often, for the same reason."""
    train, meta = sharp
    ours, theirs = generate(train, meta, "ct2", stop=stop), generate(train, meta, "hf", stop=stop)
    same = 0
    for mine, hf in zip(ours, theirs, strict=True):
        if text(mine[0][0]) == text(hf[0][0]):
            assert mine[0][1] == pytest.approx(hf[0][1], abs=1e-4)
            same += 1
        else:
            assert text(hf[0][0]) not in [text(t) for t, _ in mine] and hf[0][1] > mine[0][1]
    assert same >= len(PROMPTS) // 2


def test_tokens_scores_and_counts(sharp: tuple[Path, Any]) -> None:
    """Prompts count as transformers tokenizes them; returns are sorted; new tokens count up to the end token."""
    from gloss_cli.backends.ct2 import load_generator
    from gloss_cli.models import load_tokenizer

    train, meta = sharp
    generator = load_generator(train, meta, options=GenerateOptions(backend="ct2", dtype="fp32"), reporter=Reporter())
    tokenizer = load_tokenizer(str(train / "tokenizer"))
    assert generator.count_tokens(PROMPTS) == [len(tokenizer(p).input_ids) for p in PROMPTS]
    found = generator.generate(PROMPTS, beams=4, num_return=3, max_new_tokens=6)
    assert [len(hyps) for hyps in found] == [3] * len(PROMPTS)
    for hyps in found:
        scores = [score for _, score in hyps]
        assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    assert 3 * len(PROMPTS) <= generator.new_tokens <= 3 * len(PROMPTS) * 6
    described = generator.describe()
    assert (described["backend"], described["compute_type"], described["weights"]) == ("ct2", "float32", "full")


# -- the cached conversion --------------------------------------------------------------------------------------


def ct2_folders() -> list[Path]:
    from gloss_cli.models import gloss_home

    return sorted(p for p in (gloss_home() / "models" / "ct2").iterdir() if not p.name.startswith("."))


def test_conversion_is_made_once_and_a_damaged_one_rebuilt(sharp: tuple[Path, Any]) -> None:
    train, meta = sharp
    reporter = Recording()
    want = generate(train, meta, "ct2", reporter=reporter, max_new_tokens=8)
    assert any("converting" in message for message in reporter.infos)
    (folder,) = ct2_folders()
    record = json.loads((folder / "gloss-ct2.json").read_text())
    assert record["compute_type"] == "float32" and record["eos_token_id"] == EOS
    assert record["files"]["model.bin"] == (folder / "model.bin").stat().st_size

    weights, made = folder / "model.bin", (folder / "model.bin").stat().st_mtime_ns
    again = Recording()
    assert generate(train, meta, "ct2", reporter=again, max_new_tokens=8) == want
    assert not any("converting" in message for message in again.infos) and not again.warnings
    assert weights.stat().st_mtime_ns == made and ct2_folders() == [folder]

    for damage in CACHE_DAMAGES:
        damage_cache(folder, weights.name, "gloss-ct2.json", damage)
        reporter = Recording()
        assert_same(generate(train, meta, "ct2", reporter=reporter, max_new_tokens=8), want)
        assert len(reporter.warnings) == 1 and "rebuilding it" in reporter.warnings[0], damage
        assert "\n" not in reporter.warnings[0] and ct2_folders() == [folder]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".") and p.is_dir()]  # no staging left


def test_an_unconvertible_model_is_refused_naming_the_other_backends(tmp_path: Path, tiny: Path) -> None:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from gloss_cli.backends.ct2 import load_generator

    config = GPTNeoConfig(
        vocab_size=256, hidden_size=32, num_layers=2, attention_types=[[["global"], 2]], num_heads=4, eos_token_id=2
    )
    meta = write_train(tmp_path / "train", GPTNeoForCausalLM(config), tiny)
    options = GenerateOptions(backend="ct2", dtype="fp32")
    with pytest.raises(GlossError, match=r"CTranslate2 .* cannot convert this model: .*GPTNeoConfig") as err:
        load_generator(tmp_path / "train", meta, options=options, reporter=Reporter())
    assert "\n" not in err.value.message and "--backend hf" in (err.value.hint or "")
    assert not [p for p in (tmp_path / "home" / "models" / "ct2").iterdir() if p.is_dir()]  # nothing half-made


def test_dtypes_map_to_compute_types_or_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctranslate2

    from gloss_cli.backends.ct2 import compute_type

    monkeypatch.setattr(ctranslate2, "get_supported_compute_types", lambda device: {"int8", "float32", "int16"})
    assert (compute_type("auto", ctranslate2), compute_type("fp32", ctranslate2)) == ("int8", "float32")
    with pytest.raises(GlossError, match="cannot compute in bfloat16 on this CPU") as err:
        compute_type("bf16", ctranslate2)
    assert "--dtype auto" in (err.value.hint or "")
    with pytest.raises(GlossError, match="Unknown dtype 'int4'"):
        compute_type("int4", ctranslate2)


# -- the CLI ----------------------------------------------------------------------------------------------------


def test_generate_and_recommend_with_ct2(trained: Path) -> None:
    args = ["generate", "--backend", "ct2", "--limit", "3", "--beams", "3", "--num-return", "2"]
    result = runner.invoke(app, [*args, "--max-new-tokens", "8", "-p", str(trained), "-q"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (trained / "generate/test/queries.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["queries"]) == 2 and len(r["scores"]) == 2 for r in rows)
    stage = json.loads((trained / "manifest.json").read_text())["stages"]["generate/test"]
    assert stage["params"]["backend"] == "ct2"
    assert (stage["params"]["generator"]["backend"], stage["params"]["generator"]["compute_type"]) == ("ct2", "int8")
    assert "ctranslate2" in json.dumps(stage)  # the library's version is recorded

    user = rows[0]["user_id"]
    result = runner.invoke(app, ["recommend", "--backend", "ct2", "--user", user, "-p", str(trained), "--json", "-q"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert len(doc["items"]) == 10 and len([q for q in doc["queries"] if q["score"] != 0.0]) == 2


def test_recommend_on_ct2_imports_neither_torch_nor_transformers(trained: Path) -> None:
    """Once converted (the first call), a call loads CTranslate2 and the tokenizers library alone."""
    user = pl.read_parquet(trained / "data/sequences.parquet").row(0, named=True)["user_id"]
    args = ["recommend", "--user", user, "-p", str(trained), "--backend", "ct2", "--json", "-q"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    out, imported = gloss_in_fresh_process(args, ("torch", "transformers", "peft"))
    assert imported == []
    assert json.loads(out)["queries"] == json.loads(first.stdout)["queries"]


def test_missing_ctranslate2_is_one_line(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # `import ctranslate2` raises ImportError
    result = runner.invoke(app, ["generate", "--backend", "ct2", "-p", str(trained)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
        "error: ctranslate2 is not installed; the ct2 backend needs it."
    ]
    assert "pip install ctranslate2" in result.stderr
    assert "generate/test" not in json.loads((trained / "manifest.json").read_text())["stages"]


@pytest.mark.parametrize(
    ("installed", "cuda", "expected"),
    [
        ({"llama_cpp", "ctranslate2"}, False, "llama-cpp"),
        ({"ctranslate2"}, False, "ct2"),
        (set(), False, "hf"),
        ({"llama_cpp", "ctranslate2"}, True, "hf"),
        ({"ctranslate2"}, True, "hf"),
    ],
)
def test_default_backend_order(monkeypatch: pytest.MonkeyPatch, installed: set[str], cuda: bool, expected: str) -> None:
    import importlib.util

    from gloss_cli import models

    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        if name in ("llama_cpp", "ctranslate2"):
            return real("json") if name in installed else None  # any spec stands for "installed"
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(models, "cuda_possible", lambda: cuda)
    assert default_backend() == expected


# -- the real default model -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gives_transformers_beams_stopped_at_the_last_finished(tmp_path: Path) -> None:
    """SmolLM2-135M from PyPI in float32, 2 beams ending at the line's end (as `gloss run` generates on a CPU):
    every beam and score of transformers' early_stopping=True search. The untrained model shows what that rule
    costs: an empty line finished at the first step is one of the 2 returned where the hf backend searched on (an
    empty query); a trained model writes its title first (benchmarks/README.md). int8, the default, runs too."""
    from gloss_cli.backends.ct2 import load_generator
    from gloss_cli.models import resolve_model, weights_location

    try:
        base = Path(weights_location(resolve_model("smollm2-135m-instruct-q4_1")))
    except GlossError as exc:
        pytest.skip(str(exc))
    train = tmp_path / "train"
    train.mkdir()
    (train / "model").symlink_to(base)  # a full fine-tune's layout: the base model stands for the trained one
    shutil.copytree(base, train / "tokenizer", ignore=only_tokenizer_files)
    meta = {"format": "full", "base_model": {"name": "smollm2-135m-instruct-q4_1"}, "max_seq_len": 256}
    (train / "meta.json").write_text(json.dumps(meta))
    prompts = [
        build_prompt(["Maybelline New York Great Lash Washable Mascara", "Revlon ColorStay Liquid Eye Pen"]),
        build_prompt(["Neutrogena Oil-Free Acne Wash, 6 Ounce", "CeraVe Moisturizing Cream, 16 Ounce"]),
        build_prompt(["OPI Nail Lacquer, Big Apple Red", "Seche Vite Dry Fast Top Coat"]),
    ]
    options = GenerateOptions(backend="ct2", dtype="fp32", stop_at_newline=True)
    generator = open_generator(train, meta, options, Reporter())
    assert len(generator.stop_ids) > 2  # EOS and several line-end tokens ("\n", "\n\n", " \n", ...)
    got = generator.generate(prompts, beams=2, num_return=2, max_new_tokens=30)
    want = early_stopping_beams(train, generator.stop_ids, prompts, beams=2)
    assert texts(got) == texts(want)
    for ours, theirs in zip(got, want, strict=True):
        assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], abs=1e-3)
    assert any(text(hyps[0][0]).startswith("Title: ") for hyps in got)

    int8 = load_generator(train, meta, options=GenerateOptions(backend="ct2"), reporter=Reporter())
    assert int8.describe()["compute_type"] == "int8"
    for hyps in int8.generate(prompts, beams=2, num_return=2, max_new_tokens=30):
        assert len(hyps) == 2 and hyps[0][1] >= hyps[1][1]
    assert len({p.name for p in ct2_folders()}) == 2  # one conversion per compute type
