"""The README's main command, timed as a newcomer runs it: a fresh clone, a fresh venv, an empty pip cache.

Reads the command between the README's ``<!-- main-command -->`` markers, clones this repository's HEAD into a
scratch folder (beside a link to ``../shared``, which the command reads the data from), and runs the command there
with ``PIP_NO_CACHE_DIR=1``: the setup part (everything before ``gloss run``) and the main job (``gloss run ...``)
each under ``/usr/bin/time``, so the file records the wall time of both and the peak RSS of the main job (its
largest process: ``gloss run`` itself). Then ``gloss run --json`` in the same project (every stage is done, so it
only reads) gives the rows and the paired comparisons. Everything goes to ``benchmarks/main_job.json`` (``--out``),
with the machine it ran on, and into the README's ``<!-- main-job-benchmark -->`` block, which
``tests/test_readme.py`` checks against the file.

    python benchmarks/main_job.py                      # ~10 min on 2 cores; leave the machine otherwise idle
    python benchmarks/main_job.py --keep /tmp/mainjob  # keep the clone, its venv and its project
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- main-command -->\s*```bash\n(.*?)\n```\s*<!-- /main-command -->", re.S)


def main_command(readme: Path) -> str:
    found = MARKER.search(readme.read_text(encoding="utf-8"))
    if found is None:
        raise SystemExit(f"{readme}: no <!-- main-command --> block")
    return found.group(1).strip()


def split_command(command: str) -> tuple[str, str]:
    """(setup, main job): the main job is the last '&&' part, the one that runs `gloss run`."""
    parts = [p.strip() for p in command.split(" && ")]
    if "gloss run" not in parts[-1]:
        raise SystemExit(f"the main command's last part is not 'gloss run ...': {parts[-1]!r}")
    return " && ".join(parts[:-1]), parts[-1]


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        kb = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        memory = round(int(kb.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "python": platform.python_version(),
        "load_before": round(os.getloadavg()[0], 2),
    }


def timed(script: str, cwd: Path, env: dict[str, str], log: Path) -> tuple[float, int]:
    """Runs ``script`` in bash under /usr/bin/time: (wall seconds, peak RSS in KB of its largest process)."""
    stats = log.with_suffix(".time")
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(
            ["/usr/bin/time", "-f", "%e %M", "-o", str(stats), "bash", "-c", script],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wall = time.perf_counter() - start
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"exit {code}: {script}\n{tail}")
    return wall, int(stats.read_text().split()[-1])


README_BLOCK = re.compile(r"(<!-- main-job-benchmark -->\n)(.*?)(<!-- /main-job-benchmark -->)", re.S)
# Rows measured before `gloss run`'s rows were recipes (issue 20) keyed the declared row "recipe" and the paper's
# model row "model-paper", and said how lists merge as "protocol" (paper: top-1 per query; fused, transitions: rank
# fusion) instead of a "recipe" record: a file measured then reads as today's keys.
OLD_KEYS = {"recipe": "gloss", "model-paper": "paper"}


def row_key(key: str) -> str:
    """A row's key as `gloss run` names it today (its recipe preset: gloss eval --recipe KEY)."""
    return OLD_KEYS.get(key, key)


def merge_of(row: dict[str, object]) -> str:
    """How the row's lists merge: top1 (GLoSS's top-1 per query) or rrf (reciprocal-rank fusion)."""
    recipe = row.get("recipe")
    if isinstance(recipe, dict):
        return str(recipe["merge"])
    return "top1" if row.get("protocol") == "paper" else "rrf"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60):02d} s"


def readme_block(result: dict[str, object]) -> str:
    """What the README shows of the file: when, where, how long, how much memory, every row, every comparison."""
    m = result["machine"]
    train = result.get("train") or {}
    assert isinstance(m, dict) and isinstance(train, dict)
    lines = [
        f"Measured by `python benchmarks/main_job.py` on {result['date']} (commit {str(result['commit'])[:7]}; "
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; a fresh clone, a fresh venv, an empty pip cache; "
        f"`benchmarks/main_job.json`): **{_minutes(float(result['total_seconds']))}** in all, setup "
        f"{_minutes(float(result['setup_seconds']))} and the main job {_minutes(float(result['main_job_seconds']))}; "
        f"peak RSS of the main job **{result['main_job_peak_rss_gib']} GiB**.",
    ]
    if train:
        lines[0] += (
            f" Training ran {train.get('steps')} steps in its time budget at {train.get('tokens_per_s')} tokens/s "
            f"(validation loss {train.get('best_val_loss')}; `gloss train {train.get('replay')}` replays it)."
        )
    lines += ["", "| row (recipe) | lists | merge | history | users | Recall@5 | NDCG@5 |", "|" + "---|" * 7]
    for i, r in enumerate(result["rows"]):  # type: ignore[attr-defined]
        bold = "**" if i == 0 else ""
        history = "excluded" if r["exclude_seen"] else "kept"
        lines.append(
            f"| {row_key(r['key'])} | {bold}{r['label']}{bold} | {merge_of(r)} | {history} | {r['users']} | "
            f"{bold}{r['recall@5']:.4f}{bold} | {bold}{r['ndcg@5']:.4f}{bold} |"
        )
    lines += ["", "| paired, the same users (bootstrap 95 % CI) | Recall@5 | NDCG@5 |", "|---|---|---|"]
    for c in result["comparisons"]:  # type: ignore[attr-defined]
        cells = [
            f"{c[k]['diff']:+.4f} [{c[k]['lo']:+.4f}, {c[k]['hi']:+.4f}] ({c[k]['relative']:+.0%})"
            for k in ("recall@5", "ndcg@5")
        ]
        lines.append(f"| {row_key(c['a'])} - {row_key(c['b'])} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def write_readme(readme: Path, result: dict[str, object]) -> None:
    text = readme.read_text(encoding="utf-8")
    if not README_BLOCK.search(text):
        raise SystemExit(f"{readme}: no <!-- main-job-benchmark --> block to fill")
    readme.write_text(README_BLOCK.sub(lambda m: m.group(1) + readme_block(result) + m.group(3), text), "utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "main_job.json")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp folder)")
    parser.add_argument(
        "--readme-only", action="store_true", help="only rewrite the README's block from the --out file"
    )
    args = parser.parse_args()
    if args.readme_only:
        write_readme(REPO / "README.md", json.loads(args.out.read_text(encoding="utf-8")))
        return

    command = main_command(REPO / "README.md")
    setup, job = split_command(command)
    shared = (REPO.parent / "shared").resolve()
    if not (shared / "data" / "amazon2014").is_dir():
        raise SystemExit(f"{shared}/data/amazon2014 is missing: the main command reads the data from ../shared")
    commit = subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True).strip()
    dirty = bool(subprocess.check_output(["git", "-C", str(REPO), "status", "--porcelain", "-uno"], text=True))

    root = args.keep or Path(tempfile.mkdtemp(prefix="gloss-mainjob-"))
    if args.keep and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "shared").symlink_to(shared)
    clone = root / "gloss"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
    venv = os.environ.get("VIRTUAL_ENV")  # this script's own venv stays out of the newcomer's PATH
    path = [p for p in os.environ.get("PATH", os.defpath).split(os.pathsep) if not (venv and p.startswith(venv))]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "GLOSS_", "PYTHON", "PIP_"))}
    env |= {"PIP_NO_CACHE_DIR": "1", "HOME": str(root / "home"), "PATH": os.pathsep.join(path)}
    # no model cache either: the GGUF's conversion (cached under ~/.cache/gloss) is part of a first run
    info = machine()
    print(f"benchmark: {clone} (commit {commit[:10]}{', uncommitted changes not included' if dirty else ''})")
    print(f"setup: {setup}", flush=True)
    setup_s, _ = timed(setup, clone, env, root / "setup.log")
    print(f"setup: {setup_s:.0f} s\nmain job: {job}", flush=True)
    activate = ". .venv/bin/activate && "
    job_s, rss_kb = timed(activate + job, clone, env, root / "job.log")
    print(f"main job: {job_s:.0f} s, peak RSS {rss_kb / 2**20:.2f} GiB", flush=True)
    rows = subprocess.run(
        ["bash", "-c", activate + job + " --json -q"], cwd=clone, env=env, capture_output=True, text=True, check=True
    )
    summary = json.loads(rows.stdout)
    result = {
        "what": "the README main command on a fresh clone, fresh venv, empty pip cache (benchmarks/main_job.py)",
        "date": dt.date.today().isoformat(),
        "commit": commit,
        "machine": info,
        "command": command,
        "setup_seconds": round(setup_s, 1),
        "main_job_seconds": round(job_s, 1),
        "total_seconds": round(setup_s + job_s, 1),
        "main_job_peak_rss_gib": round(rss_kb / 2**20, 2),
        "plan": summary["plan"],
        "train": summary.get("train"),
        "rows": summary["runs"],
        "comparisons": summary.get("comparisons", []),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    write_readme(REPO / "README.md", result)
    print(
        f"wrote {args.out}: {result['total_seconds'] / 60:.1f} min in all, "
        f"peak RSS {result['main_job_peak_rss_gib']} GiB"
    )
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
