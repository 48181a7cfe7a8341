"""Training examples as token ids: prompts cut to a token budget, length-bucketed batches, padded tensors.

Shared by `gloss train` (prompt + target + EOS) and `gloss generate` (prompts cut with any backend's tokenizer).
Only whole history items are dropped, oldest first, so every prompt keeps the GLoSS format.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gloss_cli.errors import GlossError
from gloss_cli.prompt import build_prompt, item_text


def fit_history(titles: Sequence[str], n_tokens: Callable[[Sequence[str]], int], budget: int) -> int:
    """How many of the newest titles fit: the largest k with ``n_tokens(titles[-k:]) <= budget``.

    Whole items are dropped from the oldest side, so the prompt stays well-formed. Token counts grow with k, so a
    binary search needs ~log2(len) tokenizations, and only for the rare overlong history.
    """
    newest = titles[len(titles) - 1 :]
    if n_tokens(newest) > budget:
        raise GlossError(
            f"--max-seq-len leaves {budget} tokens for a prompt, too few even for the newest history item alone.",
            "Raise --max-seq-len.",
        )
    lo, hi = len(newest), len(titles)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if n_tokens(titles[len(titles) - mid :]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class Encoded:
    ids: list[list[int]] = field(default_factory=list)  # prompt + target + EOS
    prompt_lens: list[int] = field(default_factory=list)
    truncated: int = 0  # examples whose oldest history items were dropped

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]


def target_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """``texts`` (``Title: <title>``) as training tokenizes a target: no special tokens, then EOS. The catalog trie
    of ``--catalog-only`` and ``gloss rerank``'s scores use the same ids, so they follow the model's training."""
    eos = tokenizer.eos_token_id
    return [[*ids, eos] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_examples(tokenizer: Any, histories: list[list[str]], targets: list[str], max_seq_len: int) -> Encoded:
    """Token ids of prompt + ``Title: <target>`` + EOS, with the prompt cut to fit ``max_seq_len``."""
    if not histories:
        return Encoded()
    prompts = tokenizer([build_prompt(h) for h in histories])["input_ids"]
    tails = target_ids(tokenizer, [item_text(t) for t in targets])
    out = Encoded()
    for history, prompt, tail in zip(histories, prompts, tails, strict=True):
        if len(prompt) + len(tail) > max_seq_len:
            keep = fit_history(history, lambda t: len(tokenizer(build_prompt(t))["input_ids"]), max_seq_len - len(tail))
            prompt = tokenizer(build_prompt(history[len(history) - keep :]))["input_ids"]
            out.truncated += 1
        out.ids.append(prompt + tail)
        out.prompt_lens.append(len(prompt))
    return out


def micro_batches(lengths: Sequence[int], batch: list[int], budget: int) -> list[list[int]]:
    """``batch`` cut so that rows x longest row <= ``budget`` tokens (at least one row each). Memory grows with the
    padded token count (logits, attention), so this bounds it without changing the step's gradient."""
    parts: list[list[int]] = []
    for i in sorted(batch, key=lengths.__getitem__):  # ascending: the row being added is the widest so far
        if parts and (len(parts[-1]) + 1) * lengths[i] <= budget:
            parts[-1].append(i)
        else:
            parts.append([i])
    return parts


# CPU: 512 padded tokens per micro-batch. With 1024, `gloss train`'s peak RSS on Beauty (SmolLM2, LoRA, bf16,
# 256-token examples) was 4.35 GiB after 12 steps; with 512 and CPU_PAD_MULTIPLE it is 2.30 GiB at 0.93x the tokens/s
# (benchmarks/train_memory.py; the numbers in benchmarks/README.md, "Peak memory of CPU training").
CPU_MICRO_BATCH_TOKENS = 512


def auto_micro_batch_tokens(device: str, vocab_size: int) -> int:
    # Logits take rows x vocab floats per token: scale down for vocabularies above SmolLM2's 49k (Gemma: 262k).
    base = 32768 if device == "cuda" else CPU_MICRO_BATCH_TOKENS
    return max(256, int(base * min(1.0, 50_000 / vocab_size)))


def length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random | None) -> list[list[int]]:
    """Batches of similar lengths. With ``rng``: shuffled, sorted within chunks of 64 batches, batches shuffled
    (random order, little padding); without: sorted by length (evaluation)."""
    order = list(range(len(lengths)))
    if rng is None:
        chunks = [sorted(order, key=lengths.__getitem__)]
    else:
        rng.shuffle(order)
        size = batch_size * 64
        chunks = [sorted(order[i : i + size], key=lengths.__getitem__) for i in range(0, len(order), size)]
    batches = [chunk[i : i + batch_size] for chunk in chunks for i in range(0, len(chunk), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def label_tokens(data: Encoded, batch: list[int], *, completion_only: bool) -> int:
    """The tokens of ``batch`` that :func:`collate`'s labels score (a causal LM predicts token t from those before
    it, so the first is never scored): the target + EOS for the completion loss, all but the first otherwise. Counted
    from the lengths, so every rank knows a global batch's count without the others' tensors."""
    return sum(len(data.ids[i]) - max(data.prompt_lens[i] if completion_only else 0, 1) for i in batch)


def collate(
    data: Encoded, batch: list[int], *, pad_id: int, completion_only: bool, multiple: int = 1
) -> dict[str, Any]:
    """Right-padded input_ids / attention_mask / labels (-100 on padding, and on the prompt for completion loss)."""
    import torch

    width = max(len(data.ids[i]) for i in batch)
    width = -(-width // multiple) * multiple
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, i in enumerate(batch):
        seq = torch.tensor(data.ids[i], dtype=torch.long)
        input_ids[row, : len(seq)] = seq
        attention[row, : len(seq)] = 1
        start = data.prompt_lens[i] if completion_only else 0
        labels[row, start : len(seq)] = seq[start:]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
