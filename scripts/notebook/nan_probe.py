"""Which attention kernel makes a training step's gradient non-finite? (docs/notebook/2026-11-30-session-06.md)

`gloss train` skips an optimizer step whose gradient is not finite and lists that step's examples in
train/meta.json (``epochs[i].skipped_examples``). Qwen2.5-0.5B on an H200 skipped 3-10 % of its steps, the same
ones at two learning rates, and none on a CPU. This script replays the epoch's steps in training order (the same
seeded shuffles), takes the skipped ones and as many others (at least --n examples' worth), cuts them into the
micro-batches `gloss train` made, and runs one forward and backward pass of the *base* model per micro-batch
under each attention implementation and SDPA kernel, counting non-finite losses and gradients, and the residual
stream's largest magnitude (any layer) at real and at padding positions:

    python3 scripts/notebook/nan_probe.py PROJECT [--epoch 1] [--n 256] [--budget 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
from pathlib import Path
from typing import Any


def main() -> None:
    import torch

    from gloss_cli.examples import auto_micro_batch_tokens, collate, encode_examples, length_batches, micro_batches
    from gloss_cli.models import load_causal_lm, load_tokenizer, read_meta, resolve_model, weights_location
    from gloss_cli.project import Project
    from gloss_cli.train import TrainConfig, _rows
    from gloss_cli.train_loop import _split_head

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", type=Path)
    parser.add_argument("--epoch", type=int, default=1, help="whose skipped examples to probe")
    parser.add_argument("--n", type=int, default=256, help="examples of steps that were not skipped, at least")
    parser.add_argument("--budget", type=int, default=0, help="micro-batch tokens (0: gloss train's default)")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()

    project = Project(args.project)
    meta = read_meta(project.path("train"))
    config = TrainConfig(**{k: v for k, v in meta["config"].items() if k in TrainConfig.__dataclass_fields__})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    location = weights_location(resolve_model(meta["base_model"]["name"]))
    tokenizer = load_tokenizer(location)
    histories, targets = _rows(project, config)[0]
    data = encode_examples(tokenizer, histories, targets, config.max_seq_len)
    budget = args.budget or auto_micro_batch_tokens(device, len(tokenizer))
    # the epoch's steps in gloss train's order (the same seeded shuffles), then the skipped ones and as many others
    rng = random.Random(config.seed)
    for _ in range(args.epoch):
        batches = length_batches(data.lengths, config.batch_size, rng)
    listed = set(meta["epochs"][args.epoch - 1].get("skipped_examples") or [])
    skipped = [b for b in batches if listed.issuperset(b)]
    others = [b for b in batches if not listed.intersection(b)][: max(len(skipped), args.n // config.batch_size)]
    groups = {"skipped": skipped, "others": others}
    print(
        f"epoch {args.epoch}: {len(batches)} steps, {len(skipped)} skipped in training; probing them and "
        f"{len(others)} others, micro-batches of <= {budget} tokens, on {device}"
    )

    from torch.nn.attention import SDPBackend, sdpa_kernel

    variants: list[tuple[str, str, Any]] = [("sdpa", "default", None)]
    if device == "cuda":
        for name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "MATH"):
            variants.append(("sdpa", name, getattr(SDPBackend, name)))
    variants.append(("eager", "-", None))
    rows = []
    for attn, kernel_name, kernel in variants:
        model = load_causal_lm(location, dtype=torch.float32, device=device)
        model.config._attn_implementation = attn
        model.train()
        decoder, head, _ = _split_head(model)  # (Qwen has no soft-cap)
        for group, steps in groups.items():
            parts = [mb for batch in steps for mb in micro_batches(data.lengths, batch, budget)]
            row: dict[str, Any] = {
                "steps": group,
                "attention": attn,
                "kernel": kernel_name,
                "micro_batches": len(parts),
            }
            row |= dict.fromkeys(("non_finite_loss", "non_finite_grad", "errors"), 0)
            row |= {"max_hidden_real": 0.0, "max_hidden_pad": 0.0}
            for part in parts:
                inputs = collate(data, part, pad_id=tokenizer.pad_token_id, completion_only=True, multiple=8)
                labels = inputs["labels"][:, 1:].reshape(-1)
                where = (labels != -100).nonzero().squeeze(1).to(device)
                ids, mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
                try:
                    with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
                        with torch.autocast(device, dtype=torch.bfloat16):
                            out = decoder(
                                input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True
                            )
                            hidden = out.last_hidden_state[:, :-1].reshape(-1, out.last_hidden_state.shape[-1])
                            logits = head(hidden.index_select(0, where)).float()
                        loss = torch.nn.functional.cross_entropy(logits, labels[labels != -100].to(device))
                        loss.backward()
                except RuntimeError as exc:  # a kernel that does not take these shapes
                    row["errors"] += 1
                    print(f"  {attn}/{kernel_name}: {str(exc).splitlines()[0][:120]}")
                    model.zero_grad(set_to_none=True)
                    continue
                grads = [p for p in model.parameters() if p.grad is not None]
                norm = torch.nn.utils.clip_grad_norm_(grads, math.inf)
                row["non_finite_loss"] += int(not bool(torch.isfinite(loss)))
                row["non_finite_grad"] += int(not bool(torch.isfinite(norm)))
                # the residual stream's largest magnitude over every layer, per position
                size = torch.stack([h.detach().float().abs().amax(-1) for h in out.hidden_states]).amax(0)
                size, real = size.nan_to_num(math.inf), mask.bool()
                row["max_hidden_real"] = max(row["max_hidden_real"], float(size[real].max()))
                if (~real).any():
                    row["max_hidden_pad"] = max(row["max_hidden_pad"], float(size[~real].max()))
                model.zero_grad(set_to_none=True)
            rows.append(row)
            print(json.dumps(row))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
