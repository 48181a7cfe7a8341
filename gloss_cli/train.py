"""`gloss train`: supervised fine-tuning of a causal LM on GLoSS prompts (LoRA, QLoRA or full).

One example per train row: the prompt of the user's history titles, then ``Title: <target title>`` and EOS. The
validation split gives a loss after every epoch; the checkpoint with the lowest one is kept, and training stops
after ``patience`` epochs without improvement. The test split is never read.

Speed: examples are batched by length (shuffled, then sorted inside large chunks) so that little compute goes to
padding; CUDA runs in bf16; the step loop touches tensors only, never single tokens in Python.

Output ``train/``: ``adapter/`` (PEFT ``save_pretrained``) or ``model/`` (full safetensors), ``tokenizer/``, and a
readable ``meta.json`` (base model, data fingerprint, best epoch, losses per epoch). Other tools get the trained
model back with :func:`gloss_cli.models.load_trained` (``merge=True`` for a plain transformers model, e.g. to export
it to GGUF after training).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import polars as pl

from gloss_cli import __version__, ddp
from gloss_cli.console import Reporter
from gloss_cli.distributed import World
from gloss_cli.errors import GlossError
from gloss_cli.examples import Encoded, encode_examples
from gloss_cli.models import ModelRef, canonical_name, resolve_model
from gloss_cli.pick import PickRows
from gloss_cli.project import Project, file_entry
from gloss_cli.train_config import LOSSES, METHODS, TRAIN_DTYPES, TrainConfig, load_config
from gloss_cli.train_loop import EpochLog, _fit, _Loop, _no_cudnn_attention

__all__ = ["LOSSES", "METHODS", "TRAIN_DTYPES", "TrainConfig", "TrainResult", "load_config", "run"]

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "gguf", "safetensors")
# (histories as titles, targets) of train and validation, or their pick rows (--task pick)
Rows = tuple[tuple[list[list[str]], list[str]], ...] | tuple[PickRows, ...]


def _frames(project: Project, config: TrainConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The train and validation splits' rows (user_id, history, target) to learn from; never the test split."""
    from gloss_cli.data import load_split

    folder = project.path("data")
    train = load_split(folder, "train")
    validation = load_split(folder, "validation")
    if config.limit_users:
        train = train.head(config.limit_users)
        validation = validation.filter(validation["user_id"].is_in(train["user_id"].implode()))
    return train, validation


def _rows(project: Project, config: TrainConfig, reporter: Reporter) -> tuple[Rows, dict[str, Any], tuple[str, ...]]:
    """The rows of the train and validation splits, for the generate task (histories as titles, target titles) or
    the pick task (``gloss_cli.pick``: and what to record of their pools); the stages they read."""
    from gloss_cli.data import load_items

    frames = _frames(project, config)
    if config.task == "pick":
        from gloss_cli.pick import pool_recipe, train_rows

        rows, info, stages = train_rows(project, pool_recipe(config.pool), frames, seed=config.seed, reporter=reporter)
        return tuple(rows), info, stages
    titles = dict(load_items(project.path("data")).iter_rows())
    out = []
    for frame in frames:
        histories = [[titles[i] for i in h] for h in frame.get_column("history").to_list()]
        out.append((histories, [titles[t] for t in frame.get_column("target").to_list()]))
    return tuple(out), {}, ()


def _encode(tokenizer: Any, rows: Any, config: TrainConfig) -> Encoded:
    if isinstance(rows, PickRows):
        from gloss_cli.pick import encode, pool_recipe

        return encode(tokenizer, rows, config.max_seq_len, pool_recipe(config.pool).candidates)
    histories, targets = rows
    return encode_examples(tokenizer, histories, targets, config.max_seq_len)


# -- the model ------------------------------------------------------------------------------------------------
def _prepare_model(config: TrainConfig, location: str, device: str) -> Any:
    import torch

    from gloss_cli.models import load_causal_lm, quantization_4bit, torch_dtype

    trust = config.trust_remote_code
    if config.method == "full":
        # fp32 master weights (AdamW on bf16 weights loses small updates); bf16 compute comes from autocast
        full = load_causal_lm(location, dtype=torch.float32, device=device, trust_remote_code=trust)
        if config.gradient_checkpointing:
            _checkpoint_activations(full)
        return full
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.method == "qlora":
        # device_map needs the index: each torchrun rank has its own GPU (torch.cuda.set_device in ddp.join)
        place = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device
        model = load_causal_lm(
            location, dtype=torch.bfloat16, device=place, trust_remote_code=trust, quantization=quantization_4bit()
        )
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        model = load_causal_lm(
            location, dtype=torch_dtype(config.dtype, device), device=device, trust_remote_code=trust
        )
        if config.gradient_checkpointing:
            _checkpoint_activations(model)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear",  # every attention and MLP projection (the LM head is excluded)
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)  # adapters stay fp32 (autocast_adapter_dtype) over a bf16 base


def _checkpoint_activations(model: Any) -> None:
    """Activation (gradient) checkpointing, non-reentrant (frozen embeddings need no input gradients then).
    transformers 5.x renamed the method; peft's QLoRA preparation still calls the old one."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - transformers 4.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


_META_ONLY = ("skipped_examples", "step_losses", "step_grad_norms")


@dataclass
class TrainResult:
    epochs: list[EpochLog]
    best_epoch: int
    best_val_loss: float | None
    stopped: str  # "early-stopping" | "max-steps" | "epochs" | "diverged" | "time-budget" | "stop-at-step"
    steps: int
    device: str
    examples: int
    validation_examples: int
    truncated: int
    folder: Path
    format: str
    schedule_steps: int = 0  # where the learning rate reached 0 (a time budget plans it from the speed)
    # the most CUDA memory torch held at once in the training loop and its validation passes (MiB; None: no GPU)
    gpu_peak_mib: float | None = None
    world_size: int = 1  # processes under torchrun; each step took world_size x --batch-size examples

    def replay(self) -> str | None:
        """The flags that repeat a run its time budget cut, step for step, on any machine."""
        if self.stopped != "time-budget":
            return None
        return f"--stop-at-step {self.steps} --schedule-steps {self.schedule_steps}"

    def metrics(self) -> dict[str, Any]:
        tokens = sum(e.tokens for e in self.epochs)
        seconds = sum(e.seconds for e in self.epochs)
        return {
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "final_train_loss": self.epochs[-1].train_loss if self.epochs else None,
            "epochs_run": len(self.epochs),
            "steps": self.steps,
            "stopped": self.stopped,
            # the replay of a run its time budget cut: --stop-at-step N gives the same steps on any machine
            "stopped_at_step": self.steps if self.stopped == "time-budget" else None,
            "schedule_steps": self.schedule_steps,
            "replay": self.replay(),
            "train_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "examples": self.examples,
            "validation_examples": self.validation_examples,
            "truncated_histories": self.truncated,
            "device": self.device,
            # the skipped steps' examples and the per-step numbers stay in train/meta.json: thousands of them
            "losses": [{k: v for k, v in asdict(e).items() if k not in _META_ONLY} for e in self.epochs],
        } | ({"gpu_peak_mib": self.gpu_peak_mib} if self.gpu_peak_mib is not None else {})


def _write_meta(
    out: Path,
    config: TrainConfig,
    ref: ModelRef,
    data_record: dict[str, Any],
    result: TrainResult,
    pick: dict[str, Any] | None = None,
) -> dict[str, Any]:
    meta = {
        "format": result.format,
        "task": config.task,
        # --task pick: the pool recipe, its candidates and retriever, how often the target was put in
        "pick": pick or None,
        "base_model": ref.as_dict(),
        "method": config.method,
        "loss": config.loss,
        "max_seq_len": config.max_seq_len,
        "trust_remote_code": config.trust_remote_code,
        "data": {"dataset": data_record["params"].get("dataset"), "fingerprint": data_record["fingerprint"]},
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "stopped": result.stopped,
        "stopped_at_step": result.steps if result.stopped == "time-budget" else None,
        "schedule_steps": result.schedule_steps,
        "replay": result.replay(),
        "epochs": [asdict(e) for e in result.epochs],
        "world_size": result.world_size,  # processes under torchrun; each took config.batch_size examples a step
        "global_batch_size": result.world_size * config.batch_size,
        "config": asdict(config),
        "gloss_version": __version__,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _train_into(
    config: TrainConfig, location: str, rows: Rows, device: str, out: Path | None, reporter: Reporter, here: World
) -> TrainResult:
    import torch

    from gloss_cli.models import load_tokenizer

    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(location, trust_remote_code=config.trust_remote_code)
    (train_rows, val_rows) = rows
    train, val = _encode(tokenizer, train_rows, config), _encode(tokenizer, val_rows, config)
    if not val.ids:
        reporter.warn("no validation rows: the last epoch is kept, without early stopping")
    on = f"{here.size} processes on {device} ({config.batch_size} examples each a step)" if here.several else device
    reporter.info(
        f"{len(train.ids):,} train / {len(val.ids):,} validation examples, {sum(train.lengths):,} train tokens "
        f"({train.truncated:,} histories cut to --max-seq-len {config.max_seq_len}); {config.method} on {on}"
    )
    loop = _Loop(_prepare_model(config, location, device), tokenizer, config, device, out, here)
    ddp.start(loop.params, config.seed)
    if device == "cuda":  # the peak from here: the weights, optimizer state and activations; loading's transients not
        torch.cuda.reset_peak_memory_stats()
    with _no_cudnn_attention():
        logs, best_epoch, best, stopped = _fit(loop, train, val, reporter)
    ddp.leave()
    from gloss_cli.generate import gpu_peak_mib

    peak = gpu_peak_mib()
    if out is not None:
        tokenizer.save_pretrained(out / "tokenizer")
    examples, truncated = (len(train.ids), len(val.ids)), train.truncated + val.truncated
    form = "full" if config.method == "full" else "peft-lora"
    if stopped == "time-budget":
        reporter.info(
            f"time budget: stopped at step {loop.step}, the learning rate planned to reach 0 at step "
            f"{loop.schedule.end if loop.schedule else loop.step} (repeat it on any machine: gloss train ... "
            f"--stop-at-step {loop.step} --schedule-steps {loop.schedule.end if loop.schedule else loop.step})"
        )
    return TrainResult(
        logs,
        best_epoch,
        best,
        stopped,
        loop.step,
        device,
        *examples,
        truncated,
        Path(),  # the stage's folder, set by run()
        form,
        loop.schedule.end if loop.schedule else loop.step,
        peak,
        here.size,
    )


def run(
    project: Project,
    config: TrainConfig,
    *,
    dataset: str | None = None,
    command: str = "gloss train",
    export: str | None = None,
    reporter: Reporter | None = None,
) -> TrainResult:
    """The ``train`` stage: fine-tune on the train split, keep the best checkpoint by validation loss. ``export``
    (``gguf`` or ``gguf-lora``) also writes the best checkpoint as a GGUF for llama.cpp into the stage's folder."""
    from gloss_cli.export import EXPORTS

    reporter = reporter or Reporter()
    if export is not None and export not in EXPORTS:
        raise GlossError(f"Unknown export '{export}'.", f"Use one of: {', '.join(EXPORTS)}.")
    if export == "gguf-lora" and config.method == "full":
        raise GlossError("--export gguf-lora needs a LoRA run, not --method full.", "Use --export gguf.")
    data_record = project.require("data")
    have = data_record["params"].get("dataset")
    if dataset is not None and dataset != have:
        raise GlossError(
            f"Project {project.root} holds dataset '{have}', not '{dataset}'.",
            f"Run 'gloss data --dataset {dataset}' first, or use another --project.",
        )
    if canonical_name(config.model) != config.model:
        reporter.info(f"model '{config.model}' is the old name of '{canonical_name(config.model)}'")
        config = replace(config, model=canonical_name(config.model))
    ref = resolve_model(config.model)  # unknown names and missing packages fail before any work
    if config.method == "qlora":
        from gloss_cli.models import quantization_4bit

        quantization_4bit()
    from gloss_cli.distributed import world
    from gloss_cli.models import pick_device, weights_location
    from gloss_cli.pick import pool_recipe

    here, device = world(), pick_device()
    location = weights_location(ref, reporter)  # a GGUF's safetensors copy: made once, by rank 0 before the others
    if config.task == "pick" and here.several and "lis" in pool_recipe(config.pool).lists:
        raise GlossError(  # ranks > 0 would read the LIS index before rank 0 has built it
            "--task pick with a lis pool does not run under torchrun yet.", "Train it in one process."
        )
    rows, pick_info, pool_stages = _rows(project, config, reporter)
    n_train = len(rows[0].histories if isinstance(rows[0], PickRows) else rows[0][0])
    if not n_train:
        raise GlossError("The train split is empty.", "Check 'gloss data' (and --limit-users).")
    ddp.check_examples(n_train, here)
    ddp.join(device)  # under torchrun: rank 0 joins the others here, past every check above and holding the lock
    if not here.main:  # ranks > 0 train their share and write nothing: no stage, no manifest, no lock
        return replace(_train_into(config, location, rows, device, None, reporter, here), folder=project.path("train"))
    params = {"dataset": have, **asdict(config), "base_model": ref.as_dict(), "world_size": here.size}
    upstream = ("data", *pool_stages)
    with project.run_stage("train", params, command=command, libraries=LIBRARIES, upstream=upstream) as stage:
        if pick_info:
            reporter.info(
                f"pick pools of {pick_info['candidates']}: the target was put in "
                f"{pick_info['target_absent']['train']:,} of {n_train:,} train pools"
            )
        result = _train_into(config, location, rows, device, stage.dir, reporter, here)
        result = replace(result, folder=project.path("train"))
        meta = _write_meta(stage.dir, config, ref, data_record, result, pick_info)
        if export is not None:
            from gloss_cli.export import export_trained

            mode: Literal["merged", "lora"] = "lora" if export == "gguf-lora" else "merged"
            outtype = "f16" if mode == "lora" else "q8_0"
            export_trained(
                stage.dir, meta, outtype=outtype, out=stage.dir / EXPORTS[export], mode=mode, reporter=reporter
            )
        if ref.kind in ("registry", "gguf"):
            stage.inputs.append(file_entry(Path(ref.location)) | {"role": "base_model"})
        stage.metrics = result.metrics() | ({"pick": pick_info} if pick_info else {})
    return result
