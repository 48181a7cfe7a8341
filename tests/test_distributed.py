"""`gloss train` under torchrun: 2 gloo processes on a CPU train as one process with the same global batch, rank 0
alone writes the stage, and a failure publishes nothing.

Tolerances. The two runs compute the same sums in another order: each rank's micro-batches have other shapes than
the one process's (other padding, other BLAS blocking), and the ranks' gradients are added by an all-reduce. Measured
on the first test (fp32, 12 steps at lr 1e-3): per-step losses and gradient norms agree to 1e-7 relative; of 106,816
weights all but one agree to 1e-8 and that one differs by 1.3e-6, because Adam divides a gradient by its own
magnitude: where that is near Adam's eps (1e-8), rounding noise becomes a visible part of the step. Hence rtol 1e-5 on
losses and gradient norms, and on the weights a root-mean-square difference per tensor of at most 1e-6 (measured:
1.4e-8) with no weight off by more than 1e-4 (a tenth of one Adam step). What that catches, measured by breaking the
code: gradients not summed over the ranks move the losses by 1e-2 relative, the gradient norms by 0.5-1.9x and the
weights by an RMS of 2.6e-3; gradients averaged instead of summed (the normalisation off by 2x) leave the losses and
the weights as they were (AdamW's step does not see a gradient's scale) and halve every gradient norm, which is why
the norms are compared.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from gloss_cli.distributed import World
from gloss_cli.examples import Encoded, collate, label_tokens
from tests.conftest import REPO
from tests.tiny_model import build_tiny_llama

runner = CliRunner()
FP32 = ("--dtype", "fp32", "--lr", "1e-3", "--json")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun sets it for its processes; the same for this one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def projects(synthetic: Path) -> tuple[Path, Path]:
    """Two copies of one project after 'gloss data' (47 train examples, 2 validation)."""
    result = runner.invoke(app, ["data", "--source", str(synthetic), "-p", "one", "-q"])
    assert result.exit_code == 0, result.output
    shutil.copytree("one", "two")
    return Path("one"), Path("two")


def torchrun(*args: str, nproc: int = 2) -> subprocess.Popen[str]:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"]
    return subprocess.Popen(
        [*launcher, "-m", "gloss_cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def train_one(project: Path, model: Path, *args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["train", "-p", str(project), "-q", "--model", str(model), *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def train_two(project: Path, model: Path, *args: str) -> dict[str, Any]:
    code, out, err = finish(torchrun("train", "-p", str(project), "-q", "--model", str(model), *args))
    assert code == 0, err
    return json.loads(out)  # type: ignore[no-any-return]  # one JSON document: rank 0's alone


def meta(project: Path) -> dict[str, Any]:
    return json.loads((project / "train" / "meta.json").read_text())  # type: ignore[no-any-return]


def weights(project: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    folder = project / "train"
    return load_file(next(folder.glob("*/*.safetensors")))


def assert_same_training(one: Path, two: Path) -> None:
    a, b = meta(one)["epochs"], meta(two)["epochs"]
    assert [e["steps"] for e in a] == [e["steps"] for e in b] and sum(e["steps"] for e in a) > 2
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x["step_losses"], y["step_losses"], rtol=1e-5)
        np.testing.assert_allclose(x["step_grad_norms"], y["step_grad_norms"], rtol=1e-5)
        assert x["tokens"] == y["tokens"] and x["val_loss"] == pytest.approx(y["val_loss"], abs=2e-5)
    assert a[0]["step_losses"][0] != a[-1]["step_losses"][-1]  # the weights moved: the comparison is not of a no-op
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys()
    for key in wa:
        diff = (wa[key] - wb[key]).astype(np.float64)
        assert np.sqrt(np.mean(diff**2)) <= 1e-6 and np.abs(diff).max() <= 1e-4, key


def leftovers(project: Path) -> list[str]:
    return sorted(p.name for p in project.iterdir() if p.name.startswith((".tmp-", ".old-", ".gloss.lock")))


# -- 2 processes = 1 process with the global batch ---------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_train_as_one_with_the_global_batch(projects: tuple[Path, Path], tiny_model: Path) -> None:
    """Full fine-tuning, completion loss (the decoder + LM head path): 2 x 4 examples a step against 8; 47 examples
    make 6 steps an epoch, the last of 7 (4 + 3)."""
    one, two = projects
    args = ("--method", "full", "--loss", "completion", "--epochs", "2", *FP32)
    single = train_one(one, tiny_model, "--batch-size", "8", *args)
    double = train_two(two, tiny_model, "--batch-size", "4", *args)
    assert_same_training(one, two)
    assert single["metrics"]["steps"] == double["metrics"]["steps"] == 12

    # one stage, written once, by rank 0, with the world size
    stages = json.loads((two / "manifest.json").read_text())["stages"]
    assert sorted(stages) == ["data", "train"]
    assert stages["train"]["params"]["world_size"] == 2 and stages["train"]["params"]["batch_size"] == 4
    assert meta(two)["world_size"] == 2 and meta(two)["global_batch_size"] == 8 and meta(one)["world_size"] == 1
    assert leftovers(two) == [] and sorted(p.name for p in (two / "train").iterdir()) == [
        "meta.json",
        "model",
        "tokenizer",
    ]


@pytest.mark.slow
def test_a_rank_with_no_example_in_a_step_adds_nothing(projects: tuple[Path, Path], tiny_model: Path) -> None:
    """LoRA (dropout off: each rank draws its own masks), full-text loss: 2 x 23 against 46, so every epoch has a
    step of 1 example, which leaves rank 1 nothing to compute (its gradient is zeros in the all-reduce)."""
    one, two = projects
    Path("nodropout.toml").write_text("lora_dropout = 0.0\n")
    args = ("--epochs", "3", "--config", "nodropout.toml", *FP32)
    train_one(one, tiny_model, "--batch-size", "46", *args)
    train_two(two, tiny_model, "--batch-size", "23", *args)
    assert [e["steps"] for e in meta(two)["epochs"]] == [2, 2, 2]
    assert_same_training(one, two)


# -- failures publish nothing ------------------------------------------------------------------------------------
def _rank_pid(launcher: int, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            if f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError, IndexError):  # it ended meanwhile
            continue
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the ranks' processes through /proc")
def test_a_rank_killed_mid_training_leaves_the_project_as_it_was(projects: tuple[Path, Path], tiny_model: Path) -> None:
    """kill -9 of rank 1 (what the out-of-memory killer does): torchrun stops rank 0, which removes the stage's
    temporary folder and releases the lock; the train stage of an earlier run and the manifest stay as they were."""
    _, two = projects
    train_one(two, tiny_model, "--max-steps", "1", "--json")
    manifest, before = (two / "manifest.json").read_bytes(), meta(two)
    long_run = ("--batch-size", "1", "--epochs", "50", "--patience", "50")  # far longer than the wait below
    proc = torchrun("train", "-p", str(two), "-q", "--model", str(tiny_model), *long_run)
    deadline, victim = time.monotonic() + 120, None
    while time.monotonic() < deadline and proc.poll() is None:
        if list(two.glob(".tmp-train-*")):  # rank 0 is inside the stage, past the rendezvous: training
            victim = _rank_pid(proc.pid, 1)
            if victim is not None:
                time.sleep(1)  # a few steps in
                break
        time.sleep(0.05)
    assert victim is not None, finish(proc)
    os.kill(victim, signal.SIGKILL)
    code, _, err = finish(proc)
    assert code != 0, err
    assert (two / "manifest.json").read_bytes() == manifest and meta(two) == before
    assert leftovers(two) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--limit-users", "1"), "1 train example(s) cannot be shared by 2 processes"),
        (("--batch-size", "0"), "Invalid value for '--batch-size'"),
        (("--dataset", "toys"), "holds dataset 'beauty', not 'toys'"),
    ],
)
def test_bad_input_under_torchrun_is_one_line(
    projects: tuple[Path, Path], tiny_model: Path, args: tuple[str, ...], message: str
) -> None:
    one, _ = projects
    manifest = (one / "manifest.json").read_bytes()
    code, out, err = finish(torchrun("train", "-p", str(one), "--model", str(tiny_model), *args))
    assert code == 1 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert "hint: " in err and "gloss_cli/" not in err  # no traceback of gloss's (torchrun prints its own)
    assert (one / "manifest.json").read_bytes() == manifest and leftovers(one) == []


# -- the pieces ----------------------------------------------------------------------------------------------------
def test_label_tokens_counts_what_collate_labels() -> None:
    data = Encoded(ids=[[5, 6, 7, 8], [5, 9], [1, 2, 3, 4, 5, 6]], prompt_lens=[2, 1, 5])
    for completion in (False, True):
        for batch in ([0], [1, 2], [0, 1, 2]):
            labels = collate(data, batch, pad_id=0, completion_only=completion, multiple=8)["labels"]
            assert label_tokens(data, batch, completion_only=completion) == int((labels[:, 1:] != -100).sum())


def test_each_rank_takes_its_own_share_of_a_global_batch() -> None:
    from gloss_cli.ddp import share

    batch = list(range(11))
    shares = [share(batch, World(rank, 3, rank)) for rank in range(3)]
    assert sorted(i for s in shares for i in s) == batch and [len(s) for s in shares] == [4, 4, 3]
    assert share([7], World(1, 2, 1)) == [] and share(batch, World()) == batch


def test_gradient_buckets_keep_one_dtype_and_a_size_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from gloss_cli import ddp

    monkeypatch.setattr(ddp, "BUCKET_BYTES", 40)
    params = [torch.zeros(n, dtype=d) for n, d in ((4, torch.float32), (6, torch.float32), (20, torch.float32))]
    params.insert(1, torch.zeros(2, dtype=torch.bfloat16))
    buckets = ddp._buckets(params)
    assert [[p.numel() for p in b] for b in buckets] == [[4], [2], [6], [20]]
    assert all(len({p.dtype for p in b}) == 1 for b in buckets)
