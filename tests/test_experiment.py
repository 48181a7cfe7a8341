"""`gloss experiment`: a spec's candidates picked on validation, the pick declared before any test row, then the
pick and the baselines on test with paired CIs; resumable; undeclared test rows refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gloss_cli.cli import app
from tests.tiny_model import build_tiny_llama

runner = CliRunner()

SPEC = """
name = "tiny"
dataset = "beauty"
k = 5
[train]
model = "{model}"
epochs = 1
max_steps = 2
batch_size = 4
max_seq_len = 1024
limit_users = 20
[generate]
beams = 2
limit = 8
[select]
metric = "recall@5"
[candidates]
lis-model = "lists=lis,model queries=2"
gloss = "gloss"
[baselines]
lis = "lis"
no-model = "no-model"
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def spec(synthetic: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GLOSS_DATA_DIR", str(synthetic.parent))
    (synthetic.parent / "beauty").symlink_to(synthetic)
    path = Path("tiny.toml")
    path.write_text(SPEC.format(model=tiny), encoding="utf-8")
    return path


def test_an_experiment_picks_on_validation_before_any_test_row(spec: Path) -> None:
    result = runner.invoke(app, ["experiment", "run", str(spec), "-p", "x", "--json", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["validation"]) == {"lis-model", "gloss"}
    pick = report["pick"]
    best = max(report["validation"][n]["recall@5"] for n in report["validation"])
    assert report["validation"][pick]["recall@5"] == best
    assert list(report["test"]) == [pick, "lis", "no-model"]
    assert {row["users"] for row in report["test"].values()} == {8}  # the generated users, every row
    assert [(c["a"], c["b"]) for c in report["comparisons"]] == [(pick, "lis"), (pick, "no-model")]
    for c in report["comparisons"]:
        assert c["recall@5"]["lo"] <= c["recall@5"]["diff"] <= c["recall@5"]["hi"]
    # the pick was recorded before the first test evaluation: manifest order is the order of recording
    manifest = json.loads(Path("x/manifest.json").read_text())["stages"]
    names = list(manifest)
    first_test = min(i for i, n in enumerate(names) if n.startswith("eval/") and n.endswith("-test"))
    assert names.index("experiment/pick") < first_test
    assert manifest["experiment/pick"]["metrics"]["pick"] == pick
    assert "## Paired differences" in Path("x/report.md").read_text()
    # resumable: everything done is skipped
    again = runner.invoke(app, ["experiment", "run", str(spec), "-p", "x", "--json", "-q"])
    assert again.exit_code == 0, again.output
    # a changed list of candidates once test rows exist would pick on test: refused, nothing written
    before = json.loads(Path("x/manifest.json").read_text())["stages"]
    spec.write_text(spec.read_text().replace('gloss = "gloss"', 'gloss = "gloss"\nmodel = "model queries=2"'))
    refused = runner.invoke(app, ["experiment", "run", str(spec), "-p", "x", "-q"])
    assert refused.exit_code == 1 and "pick on test" in refused.output and "Traceback" not in refused.output
    after = json.loads(Path("x/manifest.json").read_text())["stages"]
    assert after["experiment/pick"] == before["experiment/pick"]
    assert [n for n in after if n.endswith("-test")] == [n for n in before if n.endswith("-test")]


def test_experiment_summary_writes_the_block(spec: Path) -> None:
    assert runner.invoke(app, ["experiment", "run", str(spec), "-p", "x", "-q"]).exit_code == 0
    doc = Path("RESULTS.md")
    doc.write_text("# Results\n\n<!-- experiments -->\nold\n<!-- /experiments -->\n\nmore\n", encoding="utf-8")
    result = runner.invoke(app, ["experiment", "summary", "x", "--into", str(doc), "--pages", "pages"])
    assert result.exit_code == 0, result.output
    text = doc.read_text()
    assert "old" not in text and "| tiny | beauty |" in text and text.endswith("more\n")
    assert Path("pages/tiny.md").read_text().startswith("# Experiment tiny")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('metric = "recall@5"', 'metric = "recall@10"'), "is not measured"),
        (("[select]", '[select]\nsplit = "test"'), "never made on test"),
        (('gloss = "gloss"', 'gloss = "lists=model,lis"'), "lists are fused in the order"),
        (('lis = "lis"', 'gloss = "lis"'), "both a candidate and a baseline"),
        (("[generate]", "[generate]\nbeam = 3"), "unknown key(s) in [generate]"),
        (('dataset = "beauty"', 'dataset = "beauty"\nseed = 3'), "unknown key(s): seed"),
        (("[train]", '[train]\ntask = "pick"\npool = "transitions order=lm"'), "experiments generate queries"),
    ],
)
def test_a_bad_spec_is_one_line(spec: Path, edit: tuple[str, str], message: str) -> None:
    spec.write_text(spec.read_text().replace(*edit, 1))
    result = runner.invoke(app, ["experiment", "run", str(spec), "-p", "x", "-q"])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not Path("x/manifest.json").exists()


def test_experiment_summary_bad_input_is_one_line(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["experiment", "summary", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "report.json" in missing.output and "Traceback" not in missing.output
    folder = tmp_path / "x"
    folder.mkdir()
    (folder / "report.json").write_text(
        json.dumps(
            {
                "experiment": "x",
                "dataset": "beauty",
                "k": 5,
                "pick": "p",
                "candidates": {"p": "gloss"},
                "test": {"p": {"users": 3, "recall@5": 0.1, "ndcg@5": 0.1}},
                "comparisons": [],
            }
        ),
        encoding="utf-8",
    )
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results, no markers\n", encoding="utf-8")
    unmarked = runner.invoke(app, ["experiment", "summary", str(folder), "--into", str(doc)])
    assert unmarked.exit_code == 1 and "<!-- experiments -->" in unmarked.output
    assert doc.read_text() == "# Results, no markers\n"  # nothing written
