"""The cached merge of a trained LoRA (gloss_cli.merged): the same beams as base + adapter, a new merge for a changed
adapter, a damaged cache rebuilt, and inference that never imports peft."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from tests.conftest import CACHE_DAMAGES, Recording, damage_cache, gloss_in_fresh_process

runner = CliRunner()


def perturb_adapter(adapter: Path, seed: int) -> None:
    """Random LoRA B matrices (training 2 steps leaves them near their zero start): the adapter then changes the
    beams, so that a merge which dropped it would fail the comparison."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name, value in weights.items():
        if "lora_B" in name:
            weights[name] = torch.randn(value.shape, generator=generator) * 0.5
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def trained(trained: Path) -> Path:
    """The train folder of conftest's trained project."""
    return trained / "train"


@pytest.fixture
def perturbed(trained: Path) -> Path:
    """The trained folder with a random adapter (its manifest then disagrees: for load_trained, not the CLI)."""
    perturb_adapter(trained / "adapter", seed=1)
    return trained


def prompts(n: int = 4) -> list[str]:
    from gloss_cli.prompt import build_prompt

    titles = dict(pl.read_parquet("p/data/items.parquet").iter_rows())
    rows = pl.read_parquet("p/data/sequences.parquet", columns=["user_id", "item_ids"]).head(n).iter_rows()
    return [build_prompt([titles[i] for i in items[-5:]]) for _, items in rows]


def beams(train: Path, **how: Any) -> list[list[tuple[str, float]]]:
    from gloss_cli.generate import HFGenerator
    from gloss_cli.models import load_trained

    trained = load_trained(train, device="cpu", dtype="fp32", **how)
    generator = HFGenerator(trained, "cpu", "float32")
    return generator.generate(prompts(), beams=3, num_return=3, max_new_tokens=12)


def assert_same(got: list[list[tuple[str, float]]], want: list[list[tuple[str, float]]]) -> None:
    assert [[text for text, _ in user] for user in got] == [[text for text, _ in user] for user in want]
    for user, expected in zip(got, want, strict=True):
        assert [score for _, score in user] == pytest.approx([score for _, score in expected], abs=1e-4)


def merged_folders() -> list[Path]:
    from gloss_cli.models import gloss_home

    return sorted(p for p in (gloss_home() / "models" / "merged").iterdir() if not p.name.startswith("."))  # locks


def test_merged_model_gives_the_adapters_beams_and_a_new_adapter_a_new_merge(perturbed: Path, tiny: Path) -> None:
    trained = perturbed
    import torch

    from gloss_cli.generate import HFGenerator
    from gloss_cli.models import Trained, load_causal_lm, load_tokenizer, read_meta

    want = beams(trained, cached=False)
    assert_same(beams(trained), want)
    (folder,) = merged_folders()
    record = json.loads((folder / "gloss-merged.json").read_text())
    assert record["files"]["model.safetensors"] == (folder / "model.safetensors").stat().st_size
    # the adapter matters: the base alone searches other beams
    base = load_causal_lm(str(tiny), dtype=torch.float32, device="cpu").eval()
    plain = HFGenerator(Trained(base, load_tokenizer(str(tiny)), {}), "cpu", "float32")
    assert plain.generate(prompts(), beams=3, num_return=3, max_new_tokens=12) != want
    assert read_meta(trained)["format"] == "peft-lora"

    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert_same(beams(trained), want)  # found again, not merged again
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime and merged_folders() == [folder]

    perturb_adapter(trained / "adapter", seed=2)  # retrained: another adapter, another merge
    changed = beams(trained, cached=False)
    assert changed != want
    assert_same(beams(trained), changed)
    assert len(merged_folders()) == 2


def test_a_damaged_cache_is_rebuilt_with_one_warning(perturbed: Path) -> None:
    from gloss_cli.models import load_trained

    want = beams(perturbed)
    (folder,) = merged_folders()
    for damage in CACHE_DAMAGES:
        damage_cache(folder, "model.safetensors", "gloss-merged.json", damage)
        reporter = Recording()
        load_trained(perturbed, device="cpu", dtype="fp32", reporter=reporter)
        warnings = reporter.warnings
        assert len(warnings) == 1 and "rebuilding it" in warnings[0] and "\n" not in warnings[0], damage
        assert merged_folders() == [folder]
    assert_same(beams(perturbed), want)


def test_an_unwritable_cache_is_one_line(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = Path("home-file")
    home.write_text("not a folder")
    monkeypatch.setenv("GLOSS_HOME", str(home))
    user = pl.read_parquet("p/data/sequences.parquet").row(0, named=True)["user_id"]
    result = runner.invoke(app, ["recommend", "--user", user, "-p", "p", "--backend", "hf", "-q"])
    assert result.exit_code == 1
    assert "Cannot write the merged model cache" in result.output and "Traceback" not in result.output


def test_recommend_on_transformers_never_imports_peft(trained: Path) -> None:
    """Where the qlora extra is installed, peft imports bitsandbytes and torch's compiler: 4-5 s of a 2-core
    recommend. The first call merges (peft then, once); the second loads the merge with transformers alone."""
    user = pl.read_parquet("p/data/sequences.parquet").row(0, named=True)["user_id"]
    args = ["recommend", "--user", user, "-p", "p", "--backend", "hf", "--json", "-q"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    out, imported = gloss_in_fresh_process(args, ("peft", "bitsandbytes"))
    assert imported == []
    assert json.loads(out)["queries"] == json.loads(first.stdout)["queries"]
