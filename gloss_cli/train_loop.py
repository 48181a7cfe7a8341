"""`gloss train`'s optimisation loop: length-bucketed batches, the learning-rate schedule and time budget, skipped
non-finite steps, validation loss per epoch, early stopping and the best checkpoint (:class:`_Loop`, :func:`_fit`).

Under torchrun (``gloss_cli.ddp``) every rank runs this loop over its share of each global batch; rank 0 alone
writes the checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gloss_cli import ddp
from gloss_cli.console import Reporter
from gloss_cli.distributed import World
from gloss_cli.errors import GlossError
from gloss_cli.examples import Encoded, auto_micro_batch_tokens, collate, label_tokens, length_batches, micro_batches
from gloss_cli.train_config import TrainConfig

LOG_EVERY = 10  # steps between host syncs for the progress line (a .item() per step stalls the GPU)
MAX_SKIPPED_IN_A_ROW = 20  # optimizer steps with a non-finite gradient, one after another, that end a run
ONE = World()  # a single process


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
