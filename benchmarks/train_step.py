"""Training step speed and peak memory of `gloss train`'s two completion-loss paths, side by side on real prompts.

* ``model-loss``: the model computes its own loss: logits over the whole vocabulary at every position, then the
  prompt positions are masked out (what `gloss train --loss completion` did before 2026-11-30).
* ``label-logits``: gloss's path now: the decoder's hidden states, then the LM head only where a label is (the
  target title and EOS, ~20 of ~250 tokens).

Same model, method, batches (64 users, length-bucketed as `gloss train` makes them) and micro-batch budget; the
steps alternate between the two paths so that clocks and the other jobs on the machine weigh on both alike.

    python benchmarks/train_step.py --steps 4 --batch-size 8          # CPU, quick
    python benchmarks/train_step.py --project /root/gloss-runs/beauty --steps 20   # GPU, full FT

Prints median step seconds, tokens/s, the ratio, and on CUDA the peak memory of each path (measured apart).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation import load_split  # also puts the repo on sys.path


def train_rows(project: Path | None, n: int) -> tuple[list[list[str]], list[str]]:
    """``n`` train users drawn with seed 42: history titles (oldest first) and target titles."""
    split, titles = load_split(project, "train")
    rows = split.sample(n=min(n, split.height), seed=42)
    histories = [[titles[i] for i in h] for h in rows["history"].to_list()]
    return histories, [titles[t] for t in rows["target"].to_list()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, help="a gloss project whose `gloss data` is done (else Beauty)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="full", choices=["full", "lora"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--micro-batch-tokens", type=int, default=0, help="0: gloss's default for the device")
    args = parser.parse_args()

    import torch

    from gloss_cli.examples import encode_examples, length_batches
    from gloss_cli.models import load_tokenizer, pick_device, resolve_model, weights_location
    from gloss_cli.train import TrainConfig, _Loop, _prepare_model, _split_head

    device = pick_device()
    location = weights_location(resolve_model(args.model))
    tokenizer = load_tokenizer(location)
    config = TrainConfig(
        model=args.model, method=args.method, loss="completion", batch_size=args.batch_size,
        micro_batch_tokens=args.micro_batch_tokens,
    )  # fmt: skip
    data = encode_examples(tokenizer, *train_rows(args.project, args.batch_size * (args.steps + 2)), 1024)
    batches = length_batches(data.lengths, args.batch_size, random.Random(0))
    loop = _Loop(_prepare_model(config, location, device), tokenizer, config, device, Path("/nonexistent"))
    split = _split_head(loop.model)
    paths = {"model-loss": None, "label-logits": split}

    def step(batch: list[int]) -> tuple[float, int]:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, _, tokens = loop._step(data, batch)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, tokens

    for name, head in paths.items():  # warm-up, and peak memory of each path alone
        loop.head = head
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step(batches[0])
        step(batches[1])
        if device == "cuda":
            print(f"{name}: peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    times: dict[str, list[float]] = {name: [] for name in paths}
    tokens: dict[str, int] = dict.fromkeys(paths, 0)
    for batch in batches[2 : 2 + args.steps]:  # the same batches, each path in turn
        for name, head in paths.items():
            loop.head = head
            seconds, seen = step(batch)
            times[name].append(seconds)
            tokens[name] += seen
    print(f"{args.model} {args.method} on {device}, batch {args.batch_size}, micro-batch {loop.budget} tokens, "
          f"{args.steps} steps per path, {tokens['model-loss'] / args.steps:,.0f} tokens per step")  # fmt: skip
    base = statistics.median(times["model-loss"])
    for name in paths:
        median = statistics.median(times[name])
        rate = tokens[name] / sum(times[name])
        print(f"{name:>13}: median step {median:.3f} s, {rate:,.0f} tokens/s, {base / median:.2f}x model-loss")


if __name__ == "__main__":
    main()
