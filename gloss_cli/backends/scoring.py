"""The log-probability a causal LM gives each of several continuations of one prompt, the prompt computed once.

``gloss rerank`` asks the fine-tuned model how likely it finds each candidate item's title as the next item:
``log p("Title: <title>" EOS | prompt)``, the text tokenized as training tokenized targets
(``gloss_cli.examples.target_ids``). The prompts of a batch
are prefilled once, left-padded (as generation prefills them); every candidate row then gets a copy of its prompt's
keys and values and runs its own tokens (but the last) in one forward, so a prompt's ~300 tokens are computed once
for its 20-50 candidates. The first token's log-probability comes from the prompt's last logits. Rows are chunked
so that one chunk's logits stay within ``max_logits`` floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gloss_cli.backends.torch_beam import _cache_kwarg, _layers, _prefill


@torch.inference_mode()
def score_continuations(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    continuations: Sequence[Sequence[Sequence[int]]],
    *,
    pad_token_id: int,
    max_logits: int = 2**27,
) -> list[list[float]]:
    """Per prompt (rows of the left-padded ``input_ids``), the summed log-probability of each of its continuations
    (token id lists, each ending with the EOS it must produce)."""
    from transformers import DynamicCache

    device = input_ids.device
    last_logits, cache = _prefill(model, input_ids, attention_mask)
    first = torch.log_softmax(last_logits.float(), dim=-1)  # (B, V): the first continuation token
    layers = _layers(cache)
    lengths = attention_mask.long().sum(dim=1)  # real prompt tokens: the first continuation position
    rows = [(b, seq) for b, conts in enumerate(continuations) for seq in conts]
    if not rows:
        return [[] for _ in continuations]
    total = torch.empty(len(rows), dtype=torch.float32, device=device)
    vocab = first.shape[-1]
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))  # similar lengths share a chunk: less padding
    start = 0
    while start < len(order):
        width = max(len(rows[order[start]][1]) - 1, 1)
        size = 1
        while start + size < len(order):  # grow while the chunk's logits (rows x longest x vocab) stay in budget
            longest = max(len(rows[order[start + size]][1]) - 1, 1)
            if (size + 1) * longest * vocab > max_logits:
                break
            size, width = size + 1, longest
        chunk = order[start : start + size]
        start += size
        prompt_of = torch.tensor([rows[r][0] for r in chunk], device=device)
        tokens = torch.full((len(chunk), width + 1), pad_token_id, dtype=torch.long, device=device)
        real = torch.zeros((len(chunk), width + 1), dtype=torch.bool, device=device)
        for i, r in enumerate(chunk):
            seq = rows[r][1]
            tokens[i, : len(seq)] = torch.tensor(seq, device=device)
            real[i, : len(seq)] = True
        logp = first[prompt_of, tokens[:, 0]]
        if any(len(rows[r][1]) > 1 for r in chunk):
            step = DynamicCache()
            for layer, (keys, values) in enumerate(layers):
                step.update(keys[prompt_of], values[prompt_of], layer)
            inputs, targets, mask = tokens[:, :-1], tokens[:, 1:], real[:, 1:]
            positions = lengths[prompt_of][:, None] + torch.arange(inputs.shape[1], device=device)[None, :]
            out = model(
                input_ids=inputs,
                attention_mask=torch.cat([attention_mask[prompt_of], real[:, :-1].long()], dim=1),
                position_ids=positions,
                use_cache=True,
                **{_cache_kwarg(model) or "past_key_values": step},
            )
            logits = out.logits.float()
            picked = logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
            logp = logp + (picked * mask).sum(dim=1)
        total[torch.tensor(chunk, device=device)] = logp
    scores: list[list[float]] = [[] for _ in continuations]
    for (b, _), value in zip(rows, total.tolist(), strict=True):
        scores[b].append(value)
    return scores
