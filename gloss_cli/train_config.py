"""`gloss train`'s settings: :class:`TrainConfig`, read from flags and a ``--config`` TOML file, every value checked
before any model loads (one line each, :class:`GlossError`)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from gloss_cli.errors import GlossError
from gloss_cli.models import DEFAULT_MODEL

METHODS = ("lora", "qlora", "full")
LOSSES = ("full-text", "completion")
TRAIN_DTYPES = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting. Precedence: command-line flag > ``--config`` TOML file > the defaults below."""

    model: str = DEFAULT_MODEL  # registry name, Hugging Face id, model folder or .gguf file
    method: str = "lora"  # lora | qlora (4-bit NF4 base, bf16 compute) | full
    loss: str = "full-text"  # full-text: every token (the paper) | completion: target tokens only
    max_seq_len: int = 1024  # prompt + target + EOS; the oldest history items are dropped to fit
    epochs: int = 10  # upper bound: early stopping usually ends training sooner
    batch_size: int = 8
    lr: float = 1e-4  # the paper's
    warmup_ratio: float = 0.03  # share of all steps spent warming up linearly, then linear decay to 0
    weight_decay: float = 0.01
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    patience: int = 3  # epochs without a lower validation loss before stopping
    max_steps: int = 0  # 0: no limit; optimizer steps over all epochs (a quick run; the schedule decays over them)
    # A time budget (0: none). After its first SCHEDULE_PROBE_STEPS steps the speed they ran at says how many steps
    # fit, and the learning rate decays to 0 at that step (``schedule_steps``) instead of at the end of the epochs;
    # training stops there or at the first step that ends past the budget. CPU speed varies several-fold between
    # machines, so both are recorded (``stopped_at_step``, ``schedule_steps``), and ``stop_at_step`` with
    # ``schedule_steps`` replays exactly that run on any machine.
    max_minutes: float = 0.0
    stop_at_step: int = 0  # 0: none; stop after this many steps, the schedule unchanged (what max_minutes recorded)
    schedule_steps: int = 0  # 0: the decay ends with the last step; else at this step (what max_minutes planned)
    micro_batch_tokens: int = 0  # 0: auto (CPU 512, CUDA 32768, less for big vocabularies); memory, not results
    limit_users: int = 0  # 0: all; else the first N users of the train split and their validation rows
    seed: int = 42
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    trust_remote_code: bool = False  # let a hub model run its own Python code
    # Recompute each layer's activations in the backward pass instead of keeping them (the paper's Unsloth runs):
    # less memory for more compute; the loss and the gradients are the same
    gradient_checkpointing: bool = False
    # What the model learns (gloss_cli.pick): generate (the next item's title, the paper) | pick (the next item's
    # letter among a lettered candidate pool; --loss completion unless given)
    task: str = "generate"
    pool: str = ""  # pick: the pool's recipe, model-free, as gloss rerank will take it ("" for generate)


_POSITIVE = ("max_seq_len", "epochs", "batch_size", "lora_r", "lora_alpha", "patience")
TASKS = ("generate", "pick")
ADDED_LATER = {"task": "generate", "pool": ""}  # settings a train record made before them lacks: their value then
_CHOICES = {"method": METHODS, "loss": LOSSES, "dtype": TRAIN_DTYPES, "task": TASKS}


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GlossError(f"Config file {path} does not exist.", "Pass the path of a TOML file.") from None
    except tomllib.TOMLDecodeError as exc:
        raise GlossError(f"{path} is not valid TOML ({exc}).", "Fix the file; see 'gloss train --help'.") from None
    section = doc.get("train", doc)  # a [train] table, or top-level keys
    return {str(k).replace("-", "_"): v for k, v in section.items()}


def _check_types(values: dict[str, Any], origin: str) -> None:
    known = {f.name: f for f in fields(TrainConfig)}
    for key, value in values.items():
        if key not in known:
            raise GlossError(f"{origin}: unknown setting '{key}'.", f"Known settings: {', '.join(known)}.")
        want = type(getattr(TrainConfig(), key))
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise GlossError(f"{origin}: '{key}' must be {want.__name__}, not {value!r}.", "Fix the value.")


def _check_task(config: TrainConfig) -> TrainConfig:
    """A pick task's pool checked and written in its explicit form (what meta.json records); none for generate."""
    if config.task == "generate":
        if config.pool:
            raise GlossError("--pool gives the candidates of --task pick.", "Add --task pick, or drop --pool.")
        return config
    if not config.pool:
        raise GlossError(
            "--task pick needs --pool: the recipe whose lists give each example's candidates.",
            'E.g. --task pick --pool "transitions order=lm candidates=20".',
        )
    from gloss_cli.pick import pool_recipe

    return replace(config, pool=pool_recipe(config.pool).explicit())


def load_config(path: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The defaults, updated by the TOML file, updated by the flags that were given (not None)."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_toml(path)
        _check_types(values, str(path))
    values |= {k: v for k, v in overrides.items() if v is not None}
    for key in ("lr", "max_minutes"):  # a TOML integer is a fine float
        if key in values:
            values[key] = float(values[key])
    if values.get("task") == "pick" and "loss" not in values:
        values["loss"] = "completion"  # the answer is one letter: a loss over the prompt would drown it
    config = TrainConfig(**values)
    for key, choices in _CHOICES.items():
        if getattr(config, key) not in choices:
            raise GlossError(f"Unknown {key} '{getattr(config, key)}'.", f"Use one of: {', '.join(choices)}.")
    config = _check_task(config)
    for key in _POSITIVE:
        if getattr(config, key) < 1:
            raise GlossError(f"{key.replace('_', '-')} must be at least 1.", "Fix the flag or the config file.")
    if (
        not math.isfinite(config.max_minutes)
        or config.max_minutes < 0
        or min(config.stop_at_step, config.schedule_steps) < 0
    ):
        raise GlossError(
            "max-minutes must be a finite number >= 0; stop-at-step, schedule-steps >= 0.", "Fix the settings."
        )
    if config.max_minutes and config.schedule_steps:
        raise GlossError(
            "--schedule-steps replays a --max-minutes run; the two together would plan the schedule twice.",
            "Drop one: --max-minutes plans it from this machine's speed, --schedule-steps sets it.",
        )
    if (
        not math.isfinite(config.lr)
        or config.lr <= 0
        or min(config.max_steps, config.limit_users, config.micro_batch_tokens) < 0
    ):
        raise GlossError(
            "lr must be a finite number > 0; max-steps, limit-users, micro-batch-tokens >= 0.", "Fix the settings."
        )
    return config
