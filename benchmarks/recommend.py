"""Latency of `gloss recommend`, two ways (issue 22 targets, 2 CPU cores, the default model and recipe):

* in process (target: median <= 1.5 s per user): the same :class:`gloss_cli.recommend.Recommender` that ``gloss
  recommend`` uses, loaded once, ``--warmup`` users first (not timed), then ``--n`` users one call each (as a
  person would ask); the median and 90th percentile of the whole call and of its parts (prompt building, beam
  search, retrieval with the transitions list and fusion), plus the load time;
* whole process (target: <= 3 s): ``python -m gloss_cli recommend --user ID -q --json --profile`` from a shell,
  ``--processes`` runs (one user each, the timed users in turn), median and p90 of the wall time, split into what
  the command reports (loading: data, model, index; the call: prompt, generation, retrieval) and the rest
  (interpreter start, imports, output), with the imports measured once more with ``python -X importtime``.

The command runs this checkout's gloss (``PYTHONPATH``), not whatever a ``gloss`` console script points at.
Users are test users in user_id order; their full histories are the prompts (left-truncated to the model's
max_seq_len). ``--recipe`` takes any retrieval-order recipe (default: gloss recommend's, ``gloss``: the
transitions list, the last item's title and the model's first 2 queries; ``model``: the 5 queries alone, the
recipe of the older measurement); the beam search is recommend's (the project's generate stage's beams).

    python benchmarks/recommend.py --project runs/cpu-beauty
    python benchmarks/recommend.py --project runs/cpu-beauty --retriever minilm --backend hf
    python benchmarks/recommend.py --project runs/cpu-beauty --recipe model --processes 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def importtime(command: list[str], env: dict[str, str]) -> tuple[float, list[tuple[float, str]]]:
    """Seconds spent importing in one run of ``command`` (top-level imports of ``python -X importtime``) and the
    heaviest of them."""
    done = subprocess.run([command[0], "-X", "importtime", *command[1:]], env=env, capture_output=True, text=True)
    top = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|", 2)
            if not name.startswith("  ") and cumulative.strip().isdigit():  # depth 0: its own and its children's
                top.append((int(cumulative) / 1e6, name.strip()))
    return sum(t for t, _ in top), sorted(top, reverse=True)[:5]


def whole_process(args: argparse.Namespace, users: list[str]) -> None:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    base = [sys.executable, "-m", "gloss_cli", "recommend", "-p", str(args.project), "-k", str(args.k), "-q"]
    base += ["--recipe", args.recipe, "--retriever", args.retriever, "--json", "--profile"]
    base += ["--backend", args.backend] if args.backend else []
    load_before = os.getloadavg()[0]
    walls: list[float] = []
    parts: dict[str, list[float]] = {}
    for i in range(args.processes):
        command = [*base, "--user", users[i % len(users)]]
        t0 = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        if done.returncode != 0:
            sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
        doc = json.loads(done.stdout)
        reported = {f"load: {key}": v for key, v in doc["load_s"].items()} | doc["timings_s"]
        for key, value in reported.items():
            parts.setdefault(key, []).append(value)
        parts.setdefault("rest: start, imports, output", []).append(walls[-1] - sum(reported.values()))
    imports, heaviest = importtime([*base, "--user", users[0]], env)
    print(
        f"\nwhole process: {' '.join(base[1:])} --user ID; {len(walls)} runs, load average before "
        f"{load_before:.2f}; imports {imports:.2f} s in one more run (-X importtime), heaviest: "
        + ", ".join(f"{name} {t:.2f} s" for t, name in heaviest),
        file=sys.stderr,
    )
    table([*parts.items(), ("**wall (whole process)**", walls)])


def table(rows: list[tuple[str, list[float]]]) -> None:
    print("| part | median s | p90 s |")
    print("|---|---|---|")
    for key, values in rows:
        print(f"| {key} | {statistics.median(values):.3f} | {quantile(values, 0.9):.3f} |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True, help="a trained gloss project")
    parser.add_argument("--n", type=int, default=20, help="users timed in process (0: none)")
    parser.add_argument("--warmup", type=int, default=2, help="users recommended for first, not timed")
    parser.add_argument("--processes", type=int, default=7, help="whole-process runs (0: none)")
    parser.add_argument("--retriever", default="bm25", help="bm25 or a dense retriever (minilm, e5, ...)")
    parser.add_argument("--backend", default=None, help="ct2, llama-cpp or hf (default: gloss recommend's)")
    parser.add_argument("-k", type=int, default=10, help="items per user")
    parser.add_argument("--recipe", default="gloss", help="a recipe (gloss recipes lists the presets)")
    args = parser.parse_args(argv)

    import polars as pl

    from gloss_cli.project import Project
    from gloss_cli.recipe import parse

    project = Project(args.project)
    users = pl.read_parquet(project.path("data/test.parquet"), columns=["user_id"]).sort("user_id")
    ids = users.get_column("user_id").head(args.warmup + max(args.n, args.processes)).to_list()
    if args.processes:  # first, in a fresh process: nothing of this one's warms it
        whole_process(args, ids[args.warmup :])
    if not args.n:
        return
    from gloss_cli.recommend import Recommender

    recipe = parse(args.recipe)
    t0 = time.perf_counter()
    rec = Recommender(project, recipe=recipe, retriever=args.retriever, backend=args.backend, k=args.k)
    load = time.perf_counter() - t0
    for user in ids[: args.warmup]:
        rec.for_users([user])
    totals: list[float] = []
    parts: dict[str, list[float]] = {}
    lengths: list[int] = []
    for user in ids[args.warmup : args.warmup + args.n]:
        t1 = time.perf_counter()
        (result,) = rec.for_users([user])
        totals.append(time.perf_counter() - t1)
        lengths.append(len(result.history))
        for key, value in result.timings.items():
            parts.setdefault(key, []).append(value)
    o = rec.options
    search = f"backend {o.backend}, {o.beams} beams, stop at line end {o.stop_at_newline}, " if o else "no model, "
    print(
        f"\nin process: {len(totals)} users (test users by user_id after {args.warmup} warm-up), recipe "
        f"{recipe.name()}, {search}retriever {args.retriever}, k {args.k}, GLOSS_THREADS "
        f"{os.environ.get('GLOSS_THREADS', 'unset')}, {os.cpu_count()} cores, history length median "
        f"{statistics.median(lengths):.0f} items; load {load:.2f} s ("
        + ", ".join(f"{key} {v:.2f} s" for key, v in rec.load_timings.items())
        + ")",
        file=sys.stderr,
    )
    table([*parts.items(), ("**total (one call)**", totals)])


if __name__ == "__main__":
    main()
