"""`gloss experiment`: the experiment protocol behind docs/RESULTS.md, as a product feature rather than shell scripts.

A spec file (TOML) names the data, the training settings, the generation, the candidate recipes and the metric that
picks among them on validation, and the baselines the pick is compared with. ``gloss experiment run SPEC`` then

1. runs what is missing (data, train, index, generation of both splits), skipping stages that are done with the
   same parameters, so that a stopped experiment resumes;
2. evaluates every candidate on validation;
3. records the pick in the manifest (stage ``experiment/pick``: the spec's hash, the candidates, the metric, every
   candidate's value) **before any test metric of the experiment exists**;
4. evaluates the pick and the baselines on test, and only those: a test row of an undeclared recipe is refused, and
   so is a changed list of candidates once test rows exist (that would be picking on test);
5. writes ``report.json`` and ``report.md`` into the project: every candidate's validation row, the pick, the test
   rows, and the pick's paired differences against each baseline (bootstrap 95 % CIs over the same users).

Spec::

    name = "beauty-smollm2"          # default: the file's stem
    dataset = "beauty"
    retriever = "bm25"
    k = 5
    [train]                          # gloss train's config keys (gloss train --config)
    epochs = 3
    [generate]                       # beams, backend, dtype, batch_size; limit: the first N users of each split
    limit = 0
    [select]
    metric = "ndcg@5"                # recall@K, ndcg@K or mrr@K, on the validation split
    [candidates]                     # name = recipe (a preset or key=value words, as --recipe takes)
    gloss = "gloss"
    lis-model-2 = "lists=lis,model queries=2"
    [baselines]
    lis = "lis"
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gloss_cli.console import Reporter
from gloss_cli.errors import GlossError
from gloss_cli.project import Project
from gloss_cli.recipe import Recipe, parse

PICK_STAGE = "experiment/pick"
_TOP = {"name", "dataset", "retriever", "k", "train", "generate", "select", "candidates", "baselines", "data"}
_GENERATE = {"beams", "backend", "dtype", "batch_size", "limit"}
_DATA = {"ties", "train_examples", "dedup"}


@dataclass(frozen=True)
class Spec:
    name: str
    dataset: str
    retriever: str
    k: int
    train: dict[str, Any]
    generate: dict[str, Any]
    data: dict[str, Any]
    metric: str
    candidates: dict[str, Recipe]
    baselines: dict[str, Recipe]
    sha256: str = field(default="", compare=False)

    def declared(self) -> dict[str, str]:
        """What the pick stage records: the metric and every candidate's explicit form."""
        return {"metric": self.metric, **{f"candidate:{n}": r.explicit() for n, r in self.candidates.items()}}


def load_spec(path: Path) -> Spec:
    """The spec file, checked: one line for the first thing wrong with it."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        raw = path.read_bytes()
        values = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise GlossError(
            f"No experiment spec at {path}.", "Pass a TOML file (see gloss experiment run --help)."
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise GlossError(f"Cannot read the experiment spec {path}: {exc}.", "Fix the TOML file.") from None

    def table(key: str, allowed: set[str] | None = None) -> dict[str, Any]:
        value = values.get(key, {})
        if not isinstance(value, dict):
            raise GlossError(f"{path}: [{key}] must be a table.", f"Write [{key}] followed by key = value lines.")
        unknown = set(value) - allowed if allowed is not None else set()
        if unknown:
            raise GlossError(
                f"{path}: unknown key(s) in [{key}]: {', '.join(sorted(unknown))}.",
                f"Use: {', '.join(sorted(allowed or ()))}.",
            )
        return value

    unknown = set(values) - _TOP
    if unknown:
        raise GlossError(f"{path}: unknown key(s): {', '.join(sorted(unknown))}.", f"Use: {', '.join(sorted(_TOP))}.")

    def recipes(key: str) -> dict[str, Recipe]:
        out = {}
        for name, text in table(key).items():
            if not isinstance(text, str):
                raise GlossError(f"{path}: [{key}] {name} must be a recipe string.", 'E.g. gloss = "gloss".')
            try:
                out[name] = parse(text)
            except GlossError as exc:
                raise GlossError(f"{path}: [{key}] {name}: {exc.message}", exc.hint) from None
        return out

    select = table("select", {"metric", "split"})
    if select.get("split", "validation") != "validation":
        raise GlossError(f"{path}: [select] split must be validation: the pick is never made on test.", "Drop it.")
    k = values.get("k", 5)
    if not isinstance(k, int) or k < 1:
        raise GlossError(f"{path}: k must be a whole number >= 1 (got {k!r}).", "E.g. k = 5.")
    metric = select.get("metric", f"ndcg@{k}")
    if metric not in {f"recall@{k}", f"ndcg@{k}", f"mrr@{k}"}:
        raise GlossError(
            f"{path}: [select] metric {metric!r} is not measured.", f"Use recall@{k}, ndcg@{k} or mrr@{k}."
        )
    candidates = recipes("candidates")
    if not candidates:
        raise GlossError(f"{path}: no [candidates].", 'Add at least one: [candidates] then gloss = "gloss".')
    baselines = recipes("baselines")
    both = set(candidates) & set(baselines)
    if both:
        raise GlossError(f"{path}: {', '.join(sorted(both))} is both a candidate and a baseline.", "Rename one.")
    for name in (*candidates, *baselines):
        if not name.replace("-", "").replace("_", "").isalnum():
            raise GlossError(f"{path}: the name {name!r} is not path-safe.", "Use letters, digits, - and _.")
    if any(r.reranked for r in (*candidates.values(), *baselines.values())):
        raise GlossError(f"{path}: reranked recipes are not part of experiments yet.", "Use order=retrieval recipes.")
    from gloss_cli.train_config import _check_types, load_config  # the train config's own checks: one line each

    train = {str(key).replace("-", "_"): value for key, value in table("train").items()}
    _check_types(train, f"{path} [train]")
    if load_config(None, train).task != "generate":
        raise GlossError(
            f"{path}: [train] task = {train['task']!r}: experiments generate queries with the model.",
            "Drop task (and pool) from [train]; gloss train --task pick trains a pick model for gloss rerank.",
        )
    generate = table("generate", _GENERATE)
    for key, value in generate.items():
        if key in ("backend", "dtype"):
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= (1 if key == "beams" else 0)
        if not ok:
            raise GlossError(
                f"{path}: [generate] {key} = {value!r} is not a valid {key}.",
                "beams: a whole number >= 1; limit, batch_size: >= 0; backend, dtype: strings.",
            )
    dataset = values.get("dataset")
    if not isinstance(dataset, str):
        raise GlossError(f"{path}: dataset is missing.", 'E.g. dataset = "beauty".')
    return Spec(
        name=str(values.get("name", path.stem)),
        dataset=dataset,
        retriever=str(values.get("retriever", "bm25")),
        k=k,
        train=train,
        generate=generate,
        data=table("data", _DATA),
        metric=metric,
        candidates=candidates,
        baselines=baselines,
        sha256=hashlib.sha256(raw).hexdigest(),
    )


@dataclass
class Report:
    spec: Spec
    validation: dict[str, dict[str, Any]]  # candidate -> metrics
    pick: str
    test: dict[str, dict[str, Any]]  # the pick and each baseline -> metrics
    comparisons: list[dict[str, Any]]
    protocol: dict[str, str]  # row -> its protocol description
    steps: list[tuple[str, str]]
    folder: Path

    def as_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.spec.name,
            "spec_sha256": self.spec.sha256,
            "dataset": self.spec.dataset,
            "retriever": self.spec.retriever,
            "k": self.spec.k,
            "select": {"split": "validation", "metric": self.spec.metric},
            "candidates": {n: r.explicit() for n, r in self.spec.candidates.items()},
            "baselines": {n: r.explicit() for n, r in self.spec.baselines.items()},
            "validation": self.validation,
            "pick": self.pick,
            "test": self.test,
            "comparisons": self.comparisons,
            "protocol": self.protocol,
        }


def _run_name(split: str, name: str) -> str:
    return f"x-{name}-{split}"


def run(project: Project, spec: Spec, *, reporter: Reporter | None = None) -> Report:
    """Every step of the protocol, resuming what is done (the caller holds the project lock)."""
    from gloss_cli import generate, index, train
    from gloss_cli.data import run as data_run
    from gloss_cli.pipeline import _compare, _fresh
    from gloss_cli.sources import dataset_info

    reporter = reporter or Reporter()
    steps: list[tuple[str, str]] = []

    def step(name: str, fresh: bool) -> bool:
        steps.append((name, "skipped" if fresh else "ran"))
        reporter.info(f"{name}: {'up to date, skipped' if fresh else 'running'}")
        return not fresh

    info = dataset_info(spec.dataset)
    data_params = {"dataset": info.name, "dedup": False, "train_examples": "last", "ties": "file"} | spec.data
    if step("data", _fresh(project, "data", data_params)):
        data_run(
            project,
            info,
            None,
            dedup=bool(data_params["dedup"]),
            train_examples=str(data_params["train_examples"]),
            ties=str(data_params["ties"]),
            command=f"gloss experiment run ({spec.name}): data",
            reporter=reporter,
        )
    uses_model = any(r.uses_model for r in (*spec.candidates.values(), *spec.baselines.values()))
    if uses_model:
        config = train.load_config(None, dict(spec.train))
        from dataclasses import asdict

        if step("train", _fresh(project, "train", asdict(config))):
            train.run(project, config, command=f"gloss experiment run ({spec.name}): train", reporter=reporter)
    key = index.index_key(spec.retriever)
    if step(f"index/{key}", _fresh(project, f"index/{key}", {"retriever": spec.retriever})):
        index.run(project, spec.retriever, command=f"gloss index --retriever {spec.retriever}", reporter=reporter)
    gen = dict(spec.generate)
    limit = int(gen.pop("limit", 0))
    beams = int(gen.get("beams", 5))
    options = generate.GenerateOptions(**gen, num_return=beams)
    needed = max((r.queries for r in (*spec.candidates.values(), *spec.baselines.values())), default=0)
    if needed > beams:
        raise GlossError(f"A recipe reads {needed} queries but [generate] beams is {beams}.", f"Set beams = {needed}.")
    for split in ("validation", "test"):
        wanted = {"limit": limit, "backend": options.backend, "beams": beams, "num_return": beams}
        if step(f"generate/{split}", _fresh(project, f"generate/{split}", wanted)):
            generate.run(
                project,
                split,
                options,
                limit=limit,
                overwrite=("train", "ran") in steps,
                command=f"gloss experiment run ({spec.name}): generate --split {split}",
                reporter=reporter,
            )
    validation: dict[str, dict[str, Any]] = {}
    protocol: dict[str, str] = {}
    for name, recipe in spec.candidates.items():
        result = _evaluate(project, spec, recipe, "validation", name, reporter)
        validation[name] = result.metrics | {"users": result.users}
        protocol[f"{name} (validation)"] = result.describe()
    # the earliest candidate wins a tie: the spec's order is declared before any number exists
    pick = max(spec.candidates, key=lambda n: (validation[n][spec.metric], -list(spec.candidates).index(n)))
    _declare_pick(project, spec, validation, pick)
    test: dict[str, dict[str, Any]] = {}
    results = {}
    for name in (pick, *spec.baselines):
        recipe = spec.candidates[pick] if name == pick else spec.baselines[name]
        results[name] = _evaluate(project, spec, recipe, "test", name, reporter)
        test[name] = results[name].metrics | {"users": results[name].users}
        protocol[f"{name} (test)"] = results[name].describe()
    comparisons = [
        _compare(results[pick], results[b], pick, b, metrics=(f"recall@{spec.k}", f"ndcg@{spec.k}"))
        for b in spec.baselines
    ]
    report = Report(spec, validation, pick, test, comparisons, protocol, steps, project.root)
    (project.root / "report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    (project.root / "report.md").write_text(markdown(report.as_dict()), encoding="utf-8")
    return report


def _evaluate(project: Project, spec: Spec, recipe: Recipe, split: str, name: str, reporter: Reporter) -> Any:
    from gloss_cli import evaluate

    if split == "test":
        record = project.stage(PICK_STAGE)
        declared = spec.baselines.get(name) or (
            spec.candidates[name] if record and record["metrics"].get("pick") == name else None
        )
        if record is None or declared is None or declared != recipe:
            raise GlossError(
                f"No test row for {name}: only the declared pick and the spec's baselines are evaluated on test.",
                "Run gloss experiment run SPEC: it picks on validation first.",
            )
    return evaluate.run(
        project,
        recipe,
        split=split,
        retriever=spec.retriever,
        ks=[spec.k],
        name=_run_name(split, name),
        command=f"gloss experiment run ({spec.name}): eval {name} on {split}",
        reporter=reporter,
    )


def _declare_pick(project: Project, spec: Spec, validation: dict[str, dict[str, Any]], pick: str) -> None:
    """The pick into the manifest, before any test row; a different declaration once test rows exist is refused."""
    declared = spec.declared()
    record = project.stage(PICK_STAGE)
    tested = [n for n in project.manifest()["stages"] if n.startswith("eval/x-") and n.endswith("-test")]
    if record is not None and tested:
        before = {k: v for k, v in record["params"].items() if k in declared or k.startswith("candidate:")}
        if before != declared or record["metrics"].get("pick") != pick:
            raise GlossError(
                f"This experiment's pick was declared ({record['metrics'].get('pick')}) and tested; the spec's "
                "candidates or metric (or the validation numbers) changed since.",
                "Choosing again after test rows exist would pick on test: start a new experiment (another name "
                "and --project).",
            )
        return
    params = declared | {"spec_sha256": spec.sha256, "split": "validation"}
    upstream = tuple(f"eval/{_run_name('validation', n)}" for n in spec.candidates)
    with project.run_stage(
        PICK_STAGE, params, command=f"gloss experiment run ({spec.name}): pick", upstream=upstream
    ) as st:
        (st.dir / "pick.json").write_text(
            json.dumps({"pick": pick, "metric": spec.metric, "validation": validation}, indent=2) + "\n",
            encoding="utf-8",
        )
        st.metrics = {"pick": pick, spec.metric: validation[pick][spec.metric]}


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables: validation (every candidate), test (the pick and the baselines), paired."""
    k, metric = report["k"], report["select"]["metric"]
    cols = (f"recall@{k}", f"ndcg@{k}", f"mrr@{k}")
    lines = [
        f"# Experiment {report['experiment']}",
        "",
        f"Dataset {report['dataset']}, retriever {report['retriever']}, K = {k}. Picked on validation by {metric} "
        "(the pick was recorded in the manifest before any test row existed). Spec sha256 "
        f"`{report['spec_sha256'][:12]}`.",
        "",
        "## Validation: every candidate",
        "",
        f"| candidate | recipe | users | {' | '.join(cols)} |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for name, values in report["validation"].items():
        mark = "**" if name == report["pick"] else ""
        cells = " | ".join(f"{mark}{values[c]:.4f}{mark}" for c in cols)
        lines.append(f"| {mark}{name}{mark} | `{report['candidates'][name]}` | {values['users']:,} | {cells} |")
    lines += ["", "## Test: the pick and the baselines", "", f"| row | recipe | users | {' | '.join(cols)} |"]
    lines.append("|---|---|---|" + "---|" * len(cols))
    for name, values in report["test"].items():
        recipe = report["candidates"][name] if name == report["pick"] else report["baselines"][name]
        label = f"{name} (pick)" if name == report["pick"] else name
        lines.append(
            f"| {label} | `{recipe}` | {values['users']:,} | " + " | ".join(f"{values[c]:.4f}" for c in cols) + " |"
        )
    if report["comparisons"]:
        lines += ["", "## Paired differences on test (bootstrap 95 % CI over the same users)", ""]
        lines += [f"| comparison | users | recall@{k} | ndcg@{k} |", "|---|---|---|---|"]
        for c in report["comparisons"]:
            diffs = [
                f"{c[m]['diff']:+.4f} [{c[m]['lo']:+.4f}, {c[m]['hi']:+.4f}]" for m in (f"recall@{k}", f"ndcg@{k}")
            ]
            lines.append(f"| {c['a']} - {c['b']} | {c['users']:,} | {diffs[0]} | {diffs[1]} |")
    lines += ["", "## Protocols", ""]
    lines += [f"* **{row}**: {text}" for row, text in report["protocol"].items()]
    return "\n".join(lines) + "\n"
