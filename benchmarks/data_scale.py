"""`gloss data` on a large generated interaction log: wall time and peak RSS (issue 23: a category of tens of millions
of reviews must fit this machine's 24 GB).

Generates a seeded synthetic log (default 10M interactions of 1M users over 200k items, Amazon 2023-like: 28-character
user ids, 10-character item ids, millisecond times, a rating and a review-text column gloss must not read) as Parquet
(or JSON lines / CSV) plus an items file of titles in a temporary folder, then runs

    gloss data --source log.parquet --items items.parquet --columns user=user_id,item=parent_asin,time=timestamp

in a fresh process under ``/usr/bin/time -v`` (its maximum resident set size; without it, getrusage of the child),
and prints one JSON document: the machine, versions, sizes, wall seconds, peak RSS and the stage's counts.

    nice -n 10 python benchmarks/data_scale.py                       # 10M interactions, Parquet
    python benchmarks/data_scale.py --interactions 1000000 --format jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parent.parent


def generate(folder: Path, interactions: int, users: int, items: int, seed: int, fmt: str) -> dict[str, float]:
    """Write log.<fmt> and items.parquet; returns their sizes in MB. Users are drawn uniformly (about Poisson many
    interactions each), items with a skewed popularity (the most popular about 2 % of the log), times in ms over
    2015-2023."""
    rng = np.random.default_rng(seed)
    user = np.sort(rng.integers(0, users, interactions))  # every user's rows together, as review dumps hold them
    item = (items * rng.random(interactions) ** 3).astype(np.int64)
    item = rng.permutation(items)[item]  # popularity not tied to the id order
    ts = rng.integers(1_420_000_000_000, 1_700_000_000_000, interactions)
    log = pl.DataFrame({"u": user, "i": item, "timestamp": ts, "rating": rng.integers(1, 6, interactions)}).select(
        user_id=pl.format("AG{}", pl.col("u").cast(pl.String).str.zfill(26)),
        parent_asin=pl.format("B{}", pl.col("i").cast(pl.String).str.zfill(9)),
        timestamp="timestamp",
        rating=pl.col("rating").cast(pl.Float64),
        text=pl.lit("Works as described; would buy again. " * 4),
    )
    path = folder / f"log.{fmt}"
    if fmt == "parquet":
        log.write_parquet(path)
    elif fmt == "jsonl":
        log.write_ndjson(path)
    else:
        log.write_csv(path)
    del log
    words = np.array(["red", "soft", "kit", "pro", "mini", "set", "oil", "brush", "gel", "max", "care", "glow"])
    titles = [" ".join(words[rng.integers(0, len(words), 8)]) + f" {i}" for i in range(items)]
    catalog = pl.DataFrame({"parent_asin": [f"B{i:09d}" for i in range(items)], "title": titles})
    catalog.write_parquet(folder / "items.parquet")
    mb = {name: round((folder / name).stat().st_size / 2**20, 1) for name in (path.name, "items.parquet")}
    return {"log_mb": mb[path.name], "items_mb": mb["items.parquet"]}


def run_gloss(folder: Path, fmt: str) -> dict[str, object]:
    command = [
        sys.executable, "-m", "gloss_cli", "data",
        "--source", str(folder / f"log.{fmt}"), "--items", str(folder / "items.parquet"),
        "--columns", "user=user_id,item=parent_asin,time=timestamp",
        "-p", str(folder / "proj"), "--json", "-q",
    ]  # fmt: skip
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    prefix = [timer, "-v"] if timer else []
    env = os.environ | {"PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run(prefix + command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"gloss data failed ({done.returncode}):\n{done.stderr[-3000:]}")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    kib = int(found.group(1)) if found else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    stats = json.loads(done.stdout)["stats"]
    keep = ("users", "items", "interactions", "train_examples", "validation_users", "test_users", "time_unit")
    return {
        "wall_seconds": round(wall, 1),
        "peak_rss_gib": round(kib / 2**20, 2),
        "rss_from": "/usr/bin/time -v" if found else "getrusage(RUSAGE_CHILDREN)",
        "stats": {k: stats[k] for k in keep},
        "same_time_test_targets": stats["ties"]["test_targets"]["same_day"],
    }


def machine() -> dict[str, object]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory, 1), "load_1min": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("parquet", "jsonl", "csv"), default="parquet")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gloss-datascale-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        sizes = generate(folder, args.interactions, args.users, args.items, args.seed, args.format)
        generated = time.perf_counter() - start
        result = run_gloss(folder, args.format)
    print(
        json.dumps(
            {
                "date": date.today().isoformat(),
                "machine": machine(),
                "versions": {"python": platform.python_version(), "polars": pl.__version__},
                "log": vars(args) | sizes | {"generate_seconds": round(generated, 1)},
            }
            | result,
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
