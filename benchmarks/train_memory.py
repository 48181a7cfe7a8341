"""Peak RSS and speed of CPU training: micro-batch size and padding, side by side.

Each round runs `gloss train` once per variant on the same project, steps and settings (the main job's: LoRA,
completion loss, 256-token examples, bf16 where the CPU has it), in a fresh process each, the variants in turn
(the order rotates every round). A variant sets gloss's two CPU constants: the padded tokens per micro-batch
(``examples.CPU_MICRO_BATCH_TOKENS``) and the multiple a micro-batch's width is padded to
(``train.CPU_PAD_MULTIPLE``). Reports per variant the median of: peak RSS (``/usr/bin/time``'s maximum resident
set), training tokens/s (gloss's own measure, loading excluded) and wall seconds.

    python benchmarks/train_memory.py --project runs/beauty --steps 12 --rounds 3

The project needs `gloss data` done; its train stage is written to a scratch copy, not to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {"1024 tokens, no padding (before)": (1024, 1), "1024, pad to 64": (1024, 64), "512, no padding": (512, 1)}
VARIANTS["512, pad to 64 (gloss)"] = (512, 64)
LAUNCH = (
    "import sys; from gloss_cli import examples, train; examples.CPU_MICRO_BATCH_TOKENS = int(sys.argv.pop(1)); "
    "train.CPU_PAD_MULTIPLE = int(sys.argv.pop(1)); from gloss_cli.cli import main; main()"
)


def train_once(project: Path, steps: int, variant: tuple[int, int], extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="gloss-trainmem-") as tmp:
        copy = Path(tmp) / "p"
        copy.mkdir()
        shutil.copytree(project / "data", copy / "data")
        shutil.copy(project / "manifest.json", copy / "manifest.json")
        stats = Path(tmp) / "time.txt"
        command = [
            sys.executable,
            "-c",
            LAUNCH,
            *map(str, variant),
            "train",
            "-p",
            str(copy),
            "--max-steps",
            str(steps),
        ]
        command += ["--method", "lora", "--loss", "completion", "--max-seq-len", "256", "--batch-size", "8"]
        command += ["--limit-users", "2000", "--json", "-q", *extra]
        out = subprocess.run(
            ["/usr/bin/time", "-f", "%e %M", "-o", str(stats), *command],
            capture_output=True,
            text=True,
            check=True,
        )
        wall, rss_kb = stats.read_text().split()[-2:]
        metrics = json.loads(out.stdout)["metrics"]
        return {"rss_gib": int(rss_kb) / 2**20, "tokens_per_s": metrics["tokens_per_s"], "wall_s": float(wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="bf16 or fp32 (default: bf16 where the CPU has it)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gloss_cli.models import fast_dtype

    extra = ["--dtype", args.dtype or fast_dtype("cpu")]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(train_once(args.project, args.steps, VARIANTS[name], extra))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    print(f"\n{args.steps} steps, {args.rounds} rounds, {extra[1]}; medians:")
    med = {v: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for v, rows in runs.items()}
    first = med[names[0]]
    print(
        "| micro-batch | peak RSS GiB | train tokens/s | wall s | RSS, tokens/s vs the first |\n|---|---|---|---|---|"
    )
    for v, m in med.items():
        ratios = f"{m['rss_gib'] / first['rss_gib']:.2f}x, {m['tokens_per_s'] / first['tokens_per_s']:.2f}x"
        print(f"| {v} | {m['rss_gib']:.2f} | {m['tokens_per_s']:.0f} | {m['wall_s']:.1f} | {ratios} |")


if __name__ == "__main__":
    main()
