"""llama.cpp backend and GGUF export: the beam search returns transformers' beams on a tiny model, with and without
a LoRA adapter (merged, or as a GGUF adapter).

The tiny model is tests/tiny_model.py's, with its weights scaled up: random weights at the default init give
near-uniform next-token distributions, where beams tie to within float noise; scaled ones give margins far above
the ~1e-5 that separates the two runtimes' logits, and some beams end at EOS, which exercises the finished list.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gloss_cli.backends.llama_cpp import BeamSearch, log_softmax
from gloss_cli.errors import GlossError
from gloss_cli.prompt import build_prompt
from tests.conftest import transformers_beams
from tests.tiny_model import build_tiny_llama

PROMPTS = [
    build_prompt(["w1_2 w2_1", "w3_4 w4_3"]),
    build_prompt(["w10_3 w3_10"]),
    build_prompt(["w5_5 w5_5", "w7_1 w1_7", "w2_2 w2_2"]),
]
SCALE = 8.0  # see the module docstring


@pytest.fixture(scope="session")
def converters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The llama.cpp converters, fetched once through converter_dir() (GLOSS_LLAMA_CPP_SRC, if set, instead)."""
    pytest.importorskip("llama_cpp")
    from gloss_cli.export import converter_dir

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLOSS_HOME", str(tmp_path_factory.mktemp("home")))
        folder = converter_dir()
    assert (folder / "convert_lora_to_gguf.py").is_file()
    yield folder


@pytest.fixture
def use_converters(converters: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GLOSS_LLAMA_CPP_SRC", str(converters))
    return converters


def _export(converters: Path, base: Path, adapter: Path | None, out: Path, mode: str, outtype: str) -> Path:
    from gloss_cli.export import export_gguf

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLOSS_LLAMA_CPP_SRC", str(converters))
        return export_gguf(base, adapter, out, mode=mode, outtype=outtype)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(SCALE)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gguf(tiny: Path, converters: Path) -> Path:
    return _export(converters, tiny, None, tiny.parent / "tiny-f32.gguf", "merged", "f32")


@pytest.fixture(scope="session")
def adapter(tiny: Path) -> Path:
    """A PEFT LoRA with random non-zero A and B (a trained adapter's shape, not its values)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), config)
    folder = tiny.parent / "adapter"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_tokenizer(tiny: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


@pytest.fixture(scope="session")
def hf_base(tiny: Path, hf_tokenizer: Any) -> list[list[tuple[str, float]]]:
    from transformers import AutoModelForCausalLM

    return transformers_beams(AutoModelForCausalLM.from_pretrained(tiny), hf_tokenizer, PROMPTS)


@pytest.fixture(scope="session")
def hf_lora(tiny: Path, adapter: Path, hf_tokenizer: Any) -> list[list[tuple[str, float]]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), adapter)
    return transformers_beams(model, hf_tokenizer, PROMPTS)


def generator(model: Path, lora: Path | None = None, **kwargs: Any) -> Any:
    from gloss_cli.backends.llama_cpp import LlamaCppGenerator

    # One thread: llama.cpp's workers spin while they wait, which crawls on a shared, busy CPU.
    return LlamaCppGenerator(model, lora_path=lora, n_threads=1, **kwargs)


def assert_same_beams(got: list[list[tuple[str, float]]], want: list[list[tuple[str, float]]]) -> None:
    for ours, theirs in zip(got, want, strict=True):
        assert [text for text, _ in ours] == [text for text, _ in theirs]
        np.testing.assert_allclose([s for _, s in ours], [s for _, s in theirs], rtol=1e-3)


def assert_close_top_beams(got: list[list[tuple[str, float]]], want: list[list[tuple[str, float]]]) -> None:
    """For q8_0 weights: the best beam starts as HF's and scores within 3 %."""
    for ours, theirs in zip(got, want, strict=True):
        assert ours[0][0][:12] == theirs[0][0][:12]
        assert ours[0][1] == pytest.approx(theirs[0][1], rel=0.03)


# -- beam search ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tokens_match_the_hf_tokenizer(tiny_gguf: Path, hf_tokenizer: Any) -> None:
    gen = generator(tiny_gguf)
    for prompt in PROMPTS:
        assert gen.tokenize(prompt) == hf_tokenizer(prompt).input_ids
    assert gen.add_bos is False  # the export carried HF's "no BOS" into the GGUF (llama.cpp's default adds one)


@pytest.mark.slow
def test_beams_match_transformers(tiny_gguf: Path, hf_base: list[list[tuple[str, float]]]) -> None:
    got = generator(tiny_gguf).generate(PROMPTS, beams=5, num_return=5, max_new_tokens=50)
    assert_same_beams(got, hf_base)
    lengths = {len(text) for hyps in got for text, _ in hyps}
    assert len(lengths) > 1  # some beams ended at EOS, so the finished-hypothesis bookkeeping was exercised


@pytest.mark.slow
def test_returns_are_distinct_sorted_and_independent_of_batching(tiny_gguf: Path) -> None:
    prompts = [*PROMPTS, build_prompt(["w9_9 w9_9"]), build_prompt(["w4_4 w1_1", "w6_6 w6_6"])]
    one_at_a_time = generator(tiny_gguf, parallel=1).generate(prompts, beams=5, num_return=5)
    for hyps in one_at_a_time:
        texts, scores = zip(*hyps, strict=True)
        assert len(set(texts)) == 5
        assert list(scores) == sorted(scores, reverse=True)
    # 5 prompts through 2 slots: prompts join and leave the shared batch and KV cache at different steps.
    assert_same_beams(generator(tiny_gguf, parallel=2).generate(prompts), one_at_a_time)
    three = generator(tiny_gguf).generate(prompts[:1], beams=5, num_return=3)
    assert_same_beams(three, [one_at_a_time[0][:3]])


@pytest.mark.slow
def test_prompt_longer_than_the_context(tiny_gguf: Path) -> None:
    with pytest.raises(GlossError, match="does not fit"):
        generator(tiny_gguf, n_ctx=300).generate(PROMPTS[:1])


def test_beam_search_bookkeeping_on_a_fixed_table() -> None:
    """Scores are HF's sum / length; hypotheses are sorted, distinct, capped at max_new_tokens; EOS ends a beam."""
    rng = np.random.default_rng(0)
    table = log_softmax(rng.normal(scale=3.0, size=(7, 12)))  # next-token log-probs depend on the last token

    def run(max_new: int) -> list[tuple[float, list[int]]]:
        search = BeamSearch(beams=4, max_new_tokens=max_new, eos=frozenset({0}))
        while not search.done:
            search.step(np.stack([table[b.tokens[-1] % 7 if b.tokens else 0] for b in search.running]))
        return search.results(4)

    hyps = run(6)
    assert [s for s, _ in hyps] == sorted((s for s, _ in hyps), reverse=True)
    assert len({tuple(t) for _, t in hyps}) == 4
    for score, tokens in hyps:
        assert 1 <= len(tokens) <= 6
        assert 0 not in tokens[:-1]  # EOS only ever last
        prev = [0, *tokens[:-1]]
        total = sum(table[p % 7, t] for p, t in zip(prev, tokens, strict=True))
        assert score == pytest.approx(total / len(tokens))
    assert all(len(t) == 1 for _, t in run(1))


# -- LoRA and export ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_merged_and_as_gguf_adapter_match_transformers(
    tiny: Path, tiny_gguf: Path, adapter: Path, converters: Path, hf_lora: Any, hf_base: Any, tmp_path: Path
) -> None:
    assert [h[0][0] for h in hf_lora] != [h[0][0] for h in hf_base]  # the adapter changes what the model says
    merged = _export(converters, tiny, adapter, tmp_path / "merged.gguf", "merged", "f32")
    assert_same_beams(generator(merged).generate(PROMPTS), hf_lora)
    lora = _export(converters, tiny, adapter, tmp_path / "adapter.gguf", "lora", "f32")
    assert_same_beams(generator(tiny_gguf, lora).generate(PROMPTS), hf_lora)
    # q8_0 rounds the weights (that is its point): on this random model, whose every step is a near-tie, the best
    # beam keeps HF's start and score (a trained model's peaked distributions keep more).
    q8 = _export(converters, tiny, adapter, tmp_path / "merged-q8.gguf", "merged", "q8_0")
    assert q8.stat().st_size < merged.stat().st_size
    assert_close_top_beams(generator(q8).generate(PROMPTS), hf_lora)
    assert not list(tmp_path.glob(".*"))  # no staging folders or partial files left behind


@pytest.mark.slow
def test_converter_failure_is_one_line(tiny: Path, use_converters: Path, tmp_path: Path) -> None:
    from gloss_cli.export import export_gguf

    bad = tmp_path / "bad"
    bad.mkdir()
    for path in tiny.iterdir():
        if path.name.startswith("tokenizer"):
            (bad / path.name).write_bytes(path.read_bytes())
    (bad / "config.json").write_text('{"architectures": ["NoSuchModelForCausalLM"], "model_type": "llama"}')
    with pytest.raises(GlossError, match=r"convert_hf_to_gguf\.py failed: .*NoSuchModelForCausalLM") as err:
        export_gguf(bad, None, tmp_path / "out.gguf", outtype="f32")
    assert "\n" not in err.value.message
    assert not (tmp_path / "out.gguf").exists()


def test_export_checks_its_inputs(tmp_path: Path) -> None:
    from gloss_cli.export import export_gguf

    with pytest.raises(GlossError, match="not a Hugging Face model folder"):
        export_gguf(tmp_path, None, tmp_path / "x.gguf")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GlossError, match="needs the adapter"):
        export_gguf(tmp_path, None, tmp_path / "x.gguf", mode="lora")
    with pytest.raises(GlossError, match="not a PEFT adapter"):
        export_gguf(tmp_path, tmp_path, tmp_path / "x.gguf")


@pytest.mark.slow
def test_an_amx_runtime_gets_plain_weight_buffers(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ggml's AMX kernels, as a native GCC 12 build compiles them, crash llama_decode on quantized weights
    (runtime_uses_amx): an AMX runtime loads the weights without extra buffer types, any other keeps them."""
    import llama_cpp
    from llama_cpp import _internals

    real, seen = _internals.LlamaModel, []

    def spy(**kwargs: Any) -> Any:
        seen.append(kwargs["params"].use_extra_bufts)
        return real(**kwargs)

    monkeypatch.setattr(_internals, "LlamaModel", spy)
    for info in (b"CPU : AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 | ", b"CPU : AVX2 = 1 | REPACK = 1 | "):
        monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda info=info: info)
        generator(tiny_gguf).close()
    assert seen == [False, True]


def test_missing_llama_cpp_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gloss_cli.backends.llama_cpp import LlamaCppGenerator

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    with pytest.raises(GlossError) as err:
        LlamaCppGenerator(tmp_path / "model.gguf")
    assert "pip install llama-cpp-python" in (err.value.hint or "")


@pytest.mark.slow
def test_load_generator_exports_a_train_folder_once(
    tiny: Path, adapter: Path, use_converters: Path, hf_lora: Any, isolated: Path
) -> None:
    """gloss generate's entry point: train/ (adapter, tokenizer, meta.json) -> merged q8_0 GGUF, cached."""
    generate = pytest.importorskip("gloss_cli.generate")
    from gloss_cli.backends.llama_cpp import load_generator
    from gloss_cli.console import Reporter

    train = isolated / "train"
    shutil.copytree(adapter, train / "adapter")
    (train / "tokenizer").mkdir()
    for path in tiny.glob("tokenizer*"):
        shutil.copy(path, train / "tokenizer" / path.name)
    meta = {
        "format": "lora",
        "base_model": {"name": "tiny", "kind": "folder", "location": str(tiny)},
        "max_seq_len": 512,
    }
    (train / "meta.json").write_text(json.dumps(meta))
    options = generate.GenerateOptions(backend="llama-cpp", batch_size=2)
    gen = load_generator(train, meta, options=options, reporter=Reporter())
    assert (gen.parallel, gen.describe()["backend"]) == (2, "llama-cpp")
    assert_close_top_beams(gen.generate(PROMPTS, beams=5, num_return=5, max_new_tokens=50), hf_lora)
    assert gen.new_tokens >= 15 and gen.count_tokens(PROMPTS[:1])[0] > 100
    [gguf] = (isolated / "home" / "gguf").rglob("*.gguf")
    made = gguf.stat().st_mtime_ns
    assert load_generator(train, meta, options=options, reporter=Reporter()).model_path == gguf
    assert gguf.stat().st_mtime_ns == made  # the second load reused the export


def test_train_export_gguf_is_what_llama_cpp_generates_with(
    tiny: Path, synthetic: Path, use_converters: Path, isolated: Path
) -> None:
    """gloss train --export gguf writes train/model-q8_0.gguf (a recorded output of the stage); generate with
    llama.cpp then loads that file and exports nothing more. A bad --export value is one line, nothing written."""
    from typer.testing import CliRunner

    from gloss_cli.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    bad = runner.invoke(app, ["train", "--model", str(tiny), "--export", "onnx", "-p", "p", "-q"])
    assert bad.exit_code == 1 and "Unknown export 'onnx'" in bad.stderr and not Path("p/train").exists()
    args = ["train", "--model", str(tiny), "--max-steps", "2", "--epochs", "1", "--export", "gguf", "-p", "p", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    gguf = Path("p/train/model-q8_0.gguf")
    outputs = json.loads(Path("p/manifest.json").read_text())["stages"]["train"]["outputs"]
    assert gguf.is_file() and "train/model-q8_0.gguf" in [o["path"] for o in outputs]
    gen = ["generate", "--split", "test", "--limit", "2", "--backend", "llama-cpp", "--max-new-tokens", "4"]
    result = runner.invoke(app, [*gen, "-p", "p"])
    assert result.exit_code == 0, result.output
    assert "loading model-q8_0.gguf" in result.stderr and "Exporting" not in result.stderr
    assert len(Path("p/generate/test/queries.jsonl").read_text().splitlines()) == 2
