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

import contextlib
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from gloss_cli import __version__, ddp
from gloss_cli.console import Reporter
from gloss_cli.distributed import World
from gloss_cli.errors import GlossError
from gloss_cli.examples import (
    Encoded,
    auto_micro_batch_tokens,
    collate,
    encode_examples,
    label_tokens,
    length_batches,
    micro_batches,
)
from gloss_cli.models import DEFAULT_MODEL, ModelRef, canonical_name, resolve_model
from gloss_cli.project import Project, file_entry

METHODS = ("lora", "qlora", "full")
LOSSES = ("full-text", "completion")
TRAIN_DTYPES = ("auto", "bf16", "fp32")
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "gguf", "safetensors")
LOG_EVERY = 10  # steps between host syncs for the progress line (a .item() per step stalls the GPU)
MAX_SKIPPED_IN_A_ROW = 20  # optimizer steps with a non-finite gradient, one after another, that end a run
ONE = World()  # a single process


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


_POSITIVE = ("max_seq_len", "epochs", "batch_size", "lora_r", "lora_alpha", "patience")
_CHOICES = {"method": METHODS, "loss": LOSSES, "dtype": TRAIN_DTYPES}


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
    config = TrainConfig(**values)
    for key, choices in _CHOICES.items():
        if getattr(config, key) not in choices:
            raise GlossError(f"Unknown {key} '{getattr(config, key)}'.", f"Use one of: {', '.join(choices)}.")
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


Rows = tuple[tuple[list[list[str]], list[str]], ...]  # (histories as titles, targets) of train and validation


def _rows(project: Project, config: TrainConfig) -> Rows:
    """(histories as titles, target titles) for the train and validation splits; never the test split."""
    from gloss_cli.data import load_items, load_split

    folder = project.path("data")
    titles = dict(load_items(folder).iter_rows())
    train = load_split(folder, "train")
    validation = load_split(folder, "validation")
    if config.limit_users:
        train = train.head(config.limit_users)
        validation = validation.filter(validation["user_id"].is_in(train["user_id"].implode()))
    out = []
    for frame in (train, validation):
        histories = [[titles[i] for i in h] for h in frame.get_column("history").to_list()]
        out.append((histories, [titles[t] for t in frame.get_column("target").to_list()]))
    return tuple(out)


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


def _split_head(model: Any) -> tuple[Any, Any, float | None] | None:
    """(decoder, LM head, logit soft-cap) of a causal LM (under PEFT too: its adapters sit inside the decoder), or
    None for an architecture laid out otherwise, which then computes its loss itself."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = getattr(causal, "model", None), getattr(causal, "lm_head", None)
    if decoder is None or head is None or not callable(decoder) or not callable(head):
        return None
    config = causal.config.get_text_config() if hasattr(causal.config, "get_text_config") else causal.config
    return decoder, head, getattr(config, "final_logit_softcapping", None)


class _Schedule:
    """Linear warm-up over ``warmup_ratio`` of ``total`` steps, then linear decay to 0 at ``end`` (``total``
    unless a time budget plans a sooner end once it has measured the speed; the warm-up stays as planned)."""

    def __init__(self, total: int, warmup_ratio: float, end: int = 0) -> None:
        self.warmup = max(1, math.ceil(total * warmup_ratio))
        self.total, self.end = total, end or total

    @property
    def moved(self) -> bool:
        """The decay ends before the planned last step."""
        return self.end < self.total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, (self.end - step) / max(1, self.end - self.warmup))


CPU_PAD_MULTIPLE = 64  # a CPU micro-batch's width is padded to a multiple of this
_clock = time.monotonic  # the time budget's clock (a test replaces it)
SCHEDULE_PROBE_STEPS = 4  # a time budget plans its schedule from the speed of steps 2..4 (step 1 warms caches up)


@dataclass
class EpochLog:
    epoch: int
    steps: int
    train_loss: float
    val_loss: float | None
    tokens: int
    seconds: float  # training only; tokens / seconds is the training throughput
    val_seconds: float
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite gradient (their loss is not in train_loss)
    skipped_examples: list[int] = field(default_factory=list)  # their examples: rows of data/train.parquet
    # each step's loss and gradient norm before clipping (None: skipped), in meta.json only
    step_losses: list[float | None] = field(default_factory=list)
    step_grad_norms: list[float | None] = field(default_factory=list)


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


@contextlib.contextmanager
def _no_cudnn_attention() -> Iterator[None]:
    """SDPA's cuDNN kernel switched off while training (SDPA then takes the memory-efficient one). On an H200 its
    backward made the gradient non-finite in 15 of the 18 micro-batches of Qwen2.5-0.5B's skipped steps and in
    none of 15 others; the memory-efficient, math and eager attentions in none (scripts/notebook/nan_probe.py;
    docs/notebook/2026-11-30-session-07.md)."""
    import torch

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


class _Diverged(Exception):
    """MAX_SKIPPED_IN_A_ROW steps in a row had a non-finite gradient: the run ends, keeping its best epoch if any."""


class _Loop:
    """The optimisation loop: epochs of length-bucketed batches, validation loss, early stopping, best checkpoint."""

    def __init__(
        self, model: Any, tokenizer: Any, config: TrainConfig, device: str, out: Path | None, world: World = ONE
    ) -> None:
        import torch

        from gloss_cli.models import torch_dtype

        self.model, self.tokenizer, self.config, self.device, self.out = model, tokenizer, config, device, out
        self.world = world  # under torchrun: this rank's place (ranks > 0 write nothing: out is None)
        # bf16 compute: over a bf16 base (LoRA), fp32 master weights (full), or the NF4 base (QLoRA)
        self.autocast = torch_dtype(config.dtype, device) == torch.bfloat16 or config.method == "qlora"
        # CUDA: tensor-core friendly shapes. CPU: few distinct shapes, so that glibc's allocator reuses the blocks
        # freed by earlier steps instead of fragmenting (peak RSS; examples.CPU_MICRO_BATCH_TOKENS says how much)
        self.multiple = 8 if device == "cuda" else CPU_PAD_MULTIPLE
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.deadline: float | None = None  # time.monotonic() past which no new step starts (max_minutes)
        self.schedule: _Schedule | None = None  # its end moves once, when a time budget has measured the speed
        self.probe_start: float | None = None  # when step 2 began (the budget's speed probe)
        self.cut: str | None = None  # "time-budget" | "stop-at-step" once either ended training
        decay = [p for p in self.params if p.ndim >= 2]  # no weight decay on biases and norms
        rest = [p for p in self.params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, fused=device == "cuda")
        self.budget = config.micro_batch_tokens or auto_micro_batch_tokens(device, len(tokenizer))
        self.head = _split_head(model) if config.loss == "completion" else None
        self.step = 0
        # a skipped first step (non-finite gradient) makes torch warn that the schedule stepped first: harmless
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        self.skipped = 0  # steps skipped for a non-finite gradient, this epoch
        self.skipped_examples: list[int] = []  # the examples of those steps (train-split rows)
        self.in_a_row = 0  # ... and consecutively: MAX_SKIPPED_IN_A_ROW of them end the run
        self.logged: list[tuple[Any, int, Any]] = []  # this epoch's (loss sum, label tokens, gradient norm) a step

    def _parts(self, data: Encoded, batch: list[int]) -> list[tuple[dict[str, Any], int]]:
        """The batch as micro-batches with their label-token counts (counted on the host: no device sync)."""
        parts = [self._collate(data, mb) for mb in micro_batches(data.lengths, batch, self.budget)]
        return [(p, int((p["labels"][:, 1:] != -100).sum())) for p in parts]

    def _loss(self, inputs: dict[str, Any]) -> Any:
        import torch

        if self.head is not None:
            return self._completion_loss(inputs, *self.head)
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(**inputs).loss  # the mean over the micro-batch's label tokens

    def _completion_loss(self, inputs: dict[str, Any], decoder: Any, lm_head: Any, softcap: float | None) -> Any:
        """The same mean as the model's own loss, with logits computed only where a label is: a completion is
        ~20 of ~250 tokens, and the vocabulary-wide fp32 logits of every position dominate a small model's step."""
        import torch
        import torch.nn.functional as F

        labels = inputs["labels"][:, 1:].reshape(-1)  # position t predicts token t + 1
        where = (labels != -100).nonzero().squeeze(1)  # on the host: no device sync
        where, targets = where.to(self.device, non_blocking=True), labels[where].to(self.device, non_blocking=True)
        ids = inputs["input_ids"].to(self.device, non_blocking=True)
        mask = inputs["attention_mask"].to(self.device, non_blocking=True)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]
            logits = lm_head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, where)).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, targets)

    def evaluate(self, data: Encoded) -> float | None:
        import torch

        if not data.ids:
            return None
        self.model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = label_tokens(data, list(range(len(data.ids))), completion_only=self.config.loss == "completion")
        batches = length_batches(data.lengths, self.config.batch_size * 2, None)
        with torch.no_grad():
            for batch in batches[self.world.rank :: self.world.size]:  # each rank a share; the sums add up
                for inputs, counted in self._parts(data, batch):
                    total += self._loss(inputs).double() * counted
        self.model.train()
        # the same number on every rank (the early-stopping decision is shared): rank 0's
        return ddp.from_main(round(float(ddp.sum_over_ranks(total)) / max(count, 1), 5))

    def _collate(self, data: Encoded, batch: list[int]) -> dict[str, Any]:
        completion = self.config.loss == "completion"
        return collate(
            data, batch, pad_id=self.tokenizer.pad_token_id, completion_only=completion, multiple=self.multiple
        )

    def _step(self, data: Encoded, batch: list[int]) -> tuple[Any, int, int]:
        """One optimizer step over the global ``batch``; gradients of its micro-batches (this rank's share, under
        torchrun) add up to the whole batch's. A step whose gradient is not finite (a NaN or inf loss in any
        micro-batch) is skipped, as a loss scaler skips it, rather than written into the weights, where it would
        make every later loss NaN; many in a row end the run."""
        import torch

        parts = self._parts(data, ddp.share(batch, self.world))
        count = max(1, label_tokens(data, batch, completion_only=self.config.loss == "completion"))
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for inputs, counted in parts:
            loss = self._loss(inputs)
            (loss * (counted / count)).backward()
            total += loss.detach().double() * counted
        ddp.sum_step(self.params, total)  # under torchrun: the ranks' shares add up to the global batch's
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        seen = sum(len(data.ids[i]) for i in batch)
        if not bool(torch.isfinite(norm)):  # one device sync per step: small against a step of 64 examples
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
            self.skipped_examples.extend(batch)
            self.logged.append((torch.zeros_like(total), 0, norm))
            if self.in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise _Diverged(
                    f"Training diverged: {self.in_a_row} steps in a row (up to step {self.step + 1}) had a "
                    f"non-finite loss or gradient (loss {float(total) / count:.4g})"
                )
            return torch.zeros_like(total), 0, seen
        self.in_a_row = 0
        self.logged.append((total, count, norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, count, seen

    def train_epoch(
        self, data: Encoded, batches: list[list[int]], scheduler: Any, tick: Any, label: str
    ) -> tuple[float, int]:
        import torch

        self.model.train()
        self.skipped, self.skipped_examples = 0, []
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count, tokens, t0 = 0, 0, time.perf_counter()
        self.logged = []
        for n, batch in enumerate(batches, 1):
            loss_sum, counted, seen = self._step(data, batch)
            scheduler.step()
            total += loss_sum
            count, tokens, self.step = count + counted, tokens + seen, self.step + 1
            if self._plan_budget() and self.schedule:  # the progress shows the steps the budget fits
                tick.update(total=n + max(0, self.schedule.end - self.step))
            tick.advance()
            if n % LOG_EVERY == 0 or n == len(batches):
                rate = tokens / max(time.perf_counter() - t0, 1e-9)
                tick.update(description=f"{label} · loss {float(total) / max(count, 1):.4f} · {rate:,.0f} tok/s")
            if self.config.max_steps and self.step >= self.config.max_steps:
                break
            if self.config.stop_at_step and self.step >= self.config.stop_at_step:
                self.cut = "stop-at-step"
                break
            if self.deadline is not None and ddp.from_main(  # rank 0's clock decides for every rank
                _clock() >= self.deadline
                or (self.schedule is not None and self.schedule.moved and self.step >= self.schedule.end)
            ):
                self.cut = "time-budget"
                break
        return (round(float(total) / count, 5) if count else math.nan), tokens

    def step_log(self) -> tuple[list[float | None], list[float | None]]:
        """This epoch's loss and gradient norm a step (None: skipped), read from the device at once."""
        import torch

        if not self.logged:
            return [], []
        values = torch.stack([t.double() for s, _, n in self.logged for t in (s, n)]).tolist()  # one device sync
        losses = [s / c if c else None for s, (_, c, _) in zip(values[::2], self.logged, strict=True)]
        return losses, [n if math.isfinite(n) else None for n in values[1::2]]

    def _plan_budget(self) -> bool:
        """Under a time budget: the steps that fit, from the speed of steps 2..SCHEDULE_PROBE_STEPS, become the
        schedule's end (so the learning rate has decayed when the budget ends; a fixed number of steps would be
        minutes on one machine and an hour on another)."""
        if self.deadline is None or self.schedule is None or self.step > SCHEDULE_PROBE_STEPS:
            return False
        now = _clock()
        if self.step == 1:
            self.probe_start = now
        elif self.step == SCHEDULE_PROBE_STEPS and self.probe_start is not None:
            per_step = (now - self.probe_start) / (SCHEDULE_PROBE_STEPS - 1)
            fits = self.step + int(max(0.0, self.deadline - now) / max(per_step, 1e-9))
            self.schedule.end = int(ddp.from_main(max(self.step + 1, min(self.schedule.end, fits))))  # rank 0's plan
            return self.schedule.moved
        return False

    def save(self) -> None:
        if self.out is None:  # a rank other than 0: rank 0 writes the one copy of the (identical) weights
            return
        target = self.out / ("model" if self.config.method == "full" else "adapter")
        self.model.save_pretrained(target)


def _fit(
    loop: _Loop, train: Encoded, val: Encoded, reporter: Reporter
) -> tuple[list[EpochLog], int, float | None, str]:
    import torch

    config = loop.config
    loop.deadline = _clock() + 60 * config.max_minutes if config.max_minutes else None
    rng = random.Random(config.seed)  # every rank draws the same global batches and takes its share of each
    global_batch = config.batch_size * loop.world.size
    per_epoch = math.ceil(len(train.ids) / global_batch)
    total = per_epoch * config.epochs
    total = min(total, config.max_steps) if config.max_steps else total
    loop.schedule = _Schedule(total, config.warmup_ratio, min(config.schedule_steps, total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(loop.optimizer, loop.schedule)
    logs: list[EpochLog] = []
    best_epoch, best, bad, stopped = 0, math.inf, 0, "epochs"
    for epoch in range(1, config.epochs + 1):
        batches = length_batches(train.lengths, global_batch, rng)
        steps_before, t0 = loop.step, time.perf_counter()
        label = f"epoch {epoch}/{config.epochs}"
        try:
            with reporter.progress(label, total=min(len(batches), total - loop.step)) as tick:
                train_loss, tokens = loop.train_epoch(train, batches, scheduler, tick, label)
        except _Diverged as exc:
            if best_epoch == 0:
                raise GlossError(f"{exc}.", "Lower --lr, or train in fp32 (--dtype fp32).") from None
            reporter.warn(f"{exc} in epoch {epoch}; keeping epoch {best_epoch}, the best before it")
            stopped = "diverged"
            break
        t1 = time.perf_counter()
        val_loss = loop.evaluate(val)
        steps = loop.step - steps_before
        logs.append(
            EpochLog(
                epoch,
                steps,
                train_loss,
                val_loss,
                tokens,
                t1 - t0,
                time.perf_counter() - t1,
                loop.skipped,
                sorted(loop.skipped_examples),
                *loop.step_log(),
            )
        )
        skipped = f" ({loop.skipped} of {steps} steps skipped: non-finite gradient)" if loop.skipped else ""
        reporter.info(f"epoch {epoch}: train loss {train_loss:.4f}, validation loss {val_loss}{skipped}")
        if val_loss is not None and not math.isfinite(val_loss):
            reporter.warn(f"epoch {epoch}: the validation loss is not finite; this epoch is not kept")
            bad += 1
        elif val_loss is None or val_loss < best:  # without validation rows the latest epoch is kept
            best_epoch, best, bad = epoch, (math.inf if val_loss is None else val_loss), 0
            loop.save()
        else:
            bad += 1
        if loop.cut is not None:  # the time budget or --stop-at-step: this epoch, validated, is the last
            stopped = loop.cut
            break
        if bad >= config.patience:
            stopped = "early-stopping"
            break
        if loop.step >= total:
            stopped = "max-steps" if config.max_steps and total == config.max_steps else "epochs"
            break
    if best_epoch == 0:
        raise GlossError(
            f"No epoch reached a finite validation loss ({', '.join(str(e.val_loss) for e in logs)}): nothing to keep.",
            "Lower --lr, or train in fp32 (--dtype fp32).",
        )
    return logs, best_epoch, (None if best == math.inf else best), stopped


def _write_meta(
    out: Path, config: TrainConfig, ref: ModelRef, data_record: dict[str, Any], result: TrainResult
) -> dict[str, Any]:
    meta = {
        "format": result.format,
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
    train = encode_examples(tokenizer, *train_rows, config.max_seq_len)
    val = encode_examples(tokenizer, *val_rows, config.max_seq_len)
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

    here, device = world(), pick_device()
    location = weights_location(ref, reporter)  # a GGUF's safetensors copy: made once, by rank 0 before the others
    rows = _rows(project, config)
    if not rows[0][0]:
        raise GlossError("The train split is empty.", "Check 'gloss data' (and --limit-users).")
    ddp.check_examples(len(rows[0][0]), here)
    ddp.join(device)  # under torchrun: rank 0 joins the others here, past every check above and holding the lock
    if not here.main:  # ranks > 0 train their share and write nothing: no stage, no manifest, no lock
        return replace(_train_into(config, location, rows, device, None, reporter, here), folder=project.path("train"))
    params = {"dataset": have, **asdict(config), "base_model": ref.as_dict(), "world_size": here.size}
    with project.run_stage("train", params, command=command, libraries=LIBRARIES, upstream=("data",)) as stage:
        result = _train_into(config, location, rows, device, stage.dir, reporter, here)
        result = replace(result, folder=project.path("train"))
        meta = _write_meta(stage.dir, config, ref, data_record, result)
        if export is not None:
            from gloss_cli.export import export_trained

            mode: Literal["merged", "lora"] = "lora" if export == "gguf-lora" else "merged"
            outtype = "f16" if mode == "lora" else "q8_0"
            export_trained(
                stage.dir, meta, outtype=outtype, out=stage.dir / EXPORTS[export], mode=mode, reporter=reporter
            )
        if ref.kind in ("registry", "gguf"):
            stage.inputs.append(file_entry(Path(ref.location)) | {"role": "base_model"})
        stage.metrics = result.metrics()
    return result
