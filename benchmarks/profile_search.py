"""Where the time of gloss's batched beam search goes: one batch under torch.profiler, kernels and phases.

On an H200 the search ran at 16 users/s on 256 untuned prompts (benchmarks/README.md) with the GPU busy and CUDA
graphs gaining nothing, so the decode step's kernels, not the host, set the pace; this names them. The phases
(prefill, decode forward, beam step, KV reorder) are marked with ``record_function`` by wrapping gloss's functions
here, so gloss itself carries no profiling code.

    python3 benchmarks/profile_search.py --project /root/bench --n 256 --out $OUT      # GPU: one call
    python benchmarks/profile_search.py --n 8 --batch 8                                  # CPU: a smoke run

Prints the phases' device time, the 25 most expensive operators, and writes a Chrome trace to --out.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation import BEAMS, MAX_NEW, NUM_RETURN, hf_copy, load_hf, load_prompts, registry_gguf

PHASES = {"_prefill": "gloss.prefill", "_Decoder.step": "gloss.decode", "_Beams.step": "gloss.beam-step",
          "_Decoder.reorder": "gloss.reorder"}  # fmt: skip


def mark_phases() -> None:
    """Wrap gloss's search functions in ``record_function`` ranges named by PHASES."""
    import torch

    from gloss_cli.backends import torch_beam

    for qualified, label in PHASES.items():
        owner: Any = torch_beam
        *path, name = qualified.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapped(*args: Any, _original: Any = original, _label: str = label, **kwargs: Any) -> Any:
            with torch.profiler.record_function(_label):
                return _original(*args, **kwargs)

        setattr(owner, name, wrapped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, help="a gloss project whose `gloss data` is done (else Beauty)")
    parser.add_argument("--n", type=int, default=256, help="prompts (validation users); the longest form the batch")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", type=Path, help="folder for trace.json")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from gloss_cli.backends.torch_beam import search

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    prompts = load_prompts(args.project, args.n)
    tokenizer, model, _ = load_hf(hf_copy(registry_gguf()), device, dtype)
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    batch = sorted(prompts, key=lambda p: -lengths[prompts.index(p)])[: args.batch]
    enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
    eos = tokenizer.eos_token_id

    def run() -> float:
        t0 = time.perf_counter()
        search(model, enc["input_ids"], enc["attention_mask"], beams=BEAMS, num_return=NUM_RETURN,
               max_new_tokens=MAX_NEW, eos_token_ids=[eos], pad_token_id=tokenizer.pad_token_id or eos)  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    print(f"{len(batch)} prompts padded to {enc['input_ids'].shape[1]} tokens, {device} {dtype}")
    print(f"warm-up: {run():.2f} s")
    mark_phases()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = run()
    print(f"profiled: {seconds:.2f} s ({len(batch) / seconds:.1f} users/s)")
    key = "device_time_total" if device == "cuda" else "cpu_time_total"
    events = prof.key_averages()
    print("phases:")
    for label in PHASES.values():
        event = next((e for e in events if e.key == label), None)
        if event is not None:
            print(f"  {label:18s} {getattr(event, key) / 1e3:10.1f} ms over {event.count} calls")
    print(events.table(sort_by=f"self_{key}", row_limit=25, max_name_column_width=60))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(args.out / "trace.json"))


if __name__ == "__main__":
    main()
