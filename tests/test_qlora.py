"""QLoRA on a CPU (bitsandbytes >= 0.46 quantises and multiplies NF4 there), and --gradient-checkpointing.

A tiny random Llama is trained with `gloss train --method qlora`: its base is 4-bit while training, only the LoRA
adapter trains, the loss falls, and the saved adapter reloads both on the unquantised base (what `gloss generate`
does) and on a 4-bit one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from tests.tiny_model import build_tiny_llama

pytest.importorskip("bitsandbytes")
runner = CliRunner()
pytestmark = pytest.mark.slow  # bitsandbytes' CPU path: ~10 s a step for the tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def project(synthetic: Path) -> Path:
    assert runner.invoke(app, ["data", "--source", str(synthetic), "-p", "p", "-q"]).exit_code == 0
    return Path("p")


def _train(tiny: Path, *extra: str) -> dict[str, Any]:
    args = ["train", "--model", str(tiny), "--batch-size", "16", "--lr", "0.01", "--json", "-p", "p", "-q", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["metrics"]  # type: ignore[no-any-return]


def _config(tiny: Path, **overrides: Any) -> Any:
    from gloss_cli.train import load_config

    return load_config(None, {"model": str(tiny), **overrides})


def test_qlora_trains_only_the_adapter_over_a_4bit_base(project: Path, tiny: Path) -> None:
    import bitsandbytes as bnb
    import torch

    from gloss_cli.train import _prepare_model

    model = _prepare_model(_config(tiny, method="qlora"), str(tiny), "cpu")
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 7 * 2  # every attention and MLP projection of the tiny model's 2 layers
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4" for m in four_bit)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name in trained)

    metrics = _train(tiny, "--method", "qlora", "--epochs", "3")
    losses = [e["train_loss"] for e in metrics["losses"]]
    assert losses[-1] < losses[0], losses
    meta = json.loads(Path("p/train/meta.json").read_text())
    assert meta["method"] == "qlora" and meta["format"] == "peft-lora"
    from safetensors.numpy import load_file

    saved = load_file("p/train/adapter/adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)


def test_a_qlora_adapter_reloads_on_a_full_and_on_a_4bit_base(project: Path, tiny: Path) -> None:
    import torch
    from peft import PeftModel

    from gloss_cli.models import load_causal_lm, quantization_4bit

    _train(tiny, "--method", "qlora", "--epochs", "1")
    # the unquantised base: gloss generate's path (transformers, fp32 on a CPU)
    result = runner.invoke(app, ["generate", "--split", "test", "--limit", "3", "--backend", "hf", "-p", "p", "-q"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in Path("p/generate/test/queries.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["queries"]) == 5 for r in rows)

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    full = PeftModel.from_pretrained(load_causal_lm(str(tiny), dtype=torch.float32, device="cpu"), "p/train/adapter")
    base4 = load_causal_lm(str(tiny), dtype=torch.bfloat16, device="cpu", quantization=quantization_4bit())
    plain4 = base4(ids).logits.float()
    four = PeftModel.from_pretrained(base4, "p/train/adapter")
    with torch.no_grad():
        on_full, on_four = full(ids).logits.float(), four(ids).logits.float()
    assert torch.isfinite(on_four).all()
    # the adapter moved the 4-bit model, and toward what it does on the full base (4-bit error aside)
    assert not torch.allclose(on_four, plain4)
    assert (on_four - on_full).abs().mean() < (plain4 - on_full).abs().mean()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_loss(project: Path, tiny: Path, method: str) -> None:
    """Recomputing activations changes memory, not the numbers: the same losses step for step (fp32, CPU)."""
    plain = _train(tiny, "--method", method, "--max-steps", "2", "--dtype", "fp32")
    again = _train(tiny, "--method", method, "--max-steps", "2", "--dtype", "fp32", "--gradient-checkpointing")
    assert again["losses"][0]["train_loss"] == pytest.approx(plain["losses"][0]["train_loss"], rel=1e-5)
    assert again["losses"][0]["val_loss"] == pytest.approx(plain["losses"][0]["val_loss"], rel=1e-5)
    params = json.loads(Path("p/manifest.json").read_text())["stages"]["train"]["params"]
    assert params["gradient_checkpointing"] is True
