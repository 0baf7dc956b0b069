"""The CI gate: baselines (--baseline, --update-baseline), their fingerprints and gradient regressions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradaudit.cli import app
from tests.conftest import FIXTURES, fixture_line

SCRIPT = "gate_actor_critic.py"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A copy of the gate fixture in an empty folder (the working directory), with a baseline written from it."""
    shutil.copy(FIXTURES / SCRIPT, tmp_path / SCRIPT)
    monkeypatch.chdir(tmp_path)
    assert gradaudit("run", SCRIPT, "-q", "--baseline", "baseline.json", "--update-baseline").exit_code == 0
    return tmp_path


def gradaudit(*args: str):
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def edit(folder: Path, old: str, new: str) -> None:
    path = folder / SCRIPT
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def gate(*args: str, report: Path | None = None):
    extra = ["--json", str(report)] if report else []
    return gradaudit("run", SCRIPT, "--baseline", "baseline.json", *extra, "--", *args)


def test_baseline_is_small_sorted_versioned_json(project):
    written = json.loads((project / "baseline.json").read_text())
    assert written["schema"] == "gradaudit-baseline" and written["version"] == 1
    (locked,) = written["findings"]
    assert (locked["rule"], locked["subject"], locked["file"]) == ("GA201", "head", SCRIPT)
    assert locked["text"] == "critic_loss.backward() # critic backward"
    assert written["groups"]["encoder"]["optimizers"] == ["critic_optimizer"]
    assert list(written["groups"]) == sorted(written["groups"])
    assert (project / "baseline.json").read_text() == json.dumps(written, indent=2, sort_keys=True) + "\n"


def test_unchanged_program_passes_with_its_finding_known(project):
    result = gate(report=project / "report.json")
    assert result.exit_code == 0, result.output
    assert "0 new, 1 known, 0 fixed" in result.output
    assert json.loads((project / "report.json").read_text())["baseline"]["new"] == []


def test_moved_code_and_renamed_unrelated_variable_still_match(project):
    edit(project, "import sys\n", "import sys\n\n# a comment\n# and another\n\n")
    edit(project, "obs = torch.randn(16, 4)", "observation = torch.randn(16, 4)")
    edit(project, "encoder(obs)", "encoder(observation)")
    result = gate()
    assert result.exit_code == 0, result.output
    assert "0 new, 1 known, 0 fixed" in result.output


def test_introduced_bug_fails_with_a_readable_diff(project):
    edit(project, "features = encoder(obs)  # features", "features = encoder(obs).detach()  # features")
    result = gate(report=project / "report.json")
    assert result.exit_code == 1
    new = json.loads((project / "report.json").read_text())["baseline"]["new"]
    lost = next(f for f in new if f["rule"] == "GA207")
    assert lost["subject"] == "encoder"
    assert "+ GA207 group-lost-gradient encoder" in result.output


def test_fixed_finding_is_listed_and_passes(project):
    edit(
        project,
        "[*critic.parameters(), *encoder.parameters()]",
        "[*critic.parameters(), *encoder.parameters(), *head.parameters()]",
    )
    result = gate()
    assert result.exit_code == 0, result.output
    assert "- fixed: GA201 head" in " ".join(result.output.split())


@pytest.mark.parametrize(("scale", "reported"), [("10", True), ("0.1", True), ("2", False)])
def test_grad_norm_shift_needs_a_tenfold_change(project, scale, reported):
    result = gate(scale, report=project / "report.json")
    shifted = [f for f in json.loads((project / "report.json").read_text())["findings"] if f["rule"] == "GA307"]
    assert bool(shifted) == reported
    assert result.exit_code == (1 if reported else 0)
    if reported:
        assert {f["subject"] for f in shifted} == {"critic", "encoder", "head"}
        assert shifted[0]["location"] == {"file": SCRIPT, "line": fixture_line(SCRIPT, "critic backward")}


def test_grad_norm_shift_factor_is_an_option(project):
    assert gate("2", "-o", "GA307.factor=2").exit_code == 0  # options go to the program after --
    result = gradaudit("run", SCRIPT, "--baseline", "baseline.json", "-o", "GA307.factor=2", "--", "2")
    assert result.exit_code == 1 and "GA307" in result.output


def test_optimizer_change_is_reported(project):
    edit(project, "[*critic.parameters(), *encoder.parameters()]", "critic.parameters()")
    edit(project, "SGD(actor.parameters()", "SGD([*actor.parameters(), *encoder.parameters()]")
    edit(project, "actor(features.detach())", "actor(encoder(obs))")
    result = gate(report=project / "report.json")
    changed = [f for f in json.loads((project / "report.json").read_text())["findings"] if f["rule"] == "GA208"]
    assert [f["subject"] for f in changed] == ["encoder"]
    assert "critic_optimizer" in changed[0]["message"] and "actor_optimizer" in changed[0]["message"]
    assert result.exit_code == 1


def test_term_that_loses_its_gradient_is_reported(project):
    edit(project, "head(features).pow(2).mean()", "head(features).pow(2).mean().detach()")
    result = gate(report=project / "report.json")
    lost = [f for f in json.loads((project / "report.json").read_text())["findings"] if f["rule"] == "GA103"]
    assert [f["subject"] for f in lost] == ["head(features).pow(2).mean()"]
    assert result.exit_code == 1


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("{not json", "is not a readable baseline JSON file"),
        ('{"schema": "gradaudit-baseline", "version": 99}', "of version 99"),
        ('{"schema": "other", "version": 1}', "is not a gradaudit baseline"),
        ('{"schema": "gradaudit-baseline", "version": 1, "findings": [{}], "groups": {}, "terms": {}}', "damaged"),
    ],
)
def test_damaged_baseline_is_one_line_and_exit_2(project, content, said):
    (project / "baseline.json").write_text(content)
    result = gate()
    assert result.exit_code == 2
    assert said in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 2  # one line, soft-wrapped at most once


def test_missing_baseline_is_exit_2_before_the_program_runs(project):
    result = gradaudit("run", "no_such_script.py", "--baseline", "absent.json")
    assert result.exit_code == 2 and "no baseline at absent.json" in result.output
    assert gradaudit("run", SCRIPT, "--update-baseline").exit_code == 2


def test_baseline_matches_when_the_gate_runs_from_another_folder(project, monkeypatch):
    """Fingerprints hold the file's path from the project root, not from wherever the gate was started."""
    (project / "pyproject.toml").write_text("[project]\nname = 'trainer'\n")
    assert gradaudit("run", SCRIPT, "-q", "--baseline", "baseline.json", "--update-baseline").exit_code == 0
    (project / "jobs").mkdir()
    monkeypatch.chdir(project / "jobs")
    result = gradaudit("run", f"../{SCRIPT}", "--baseline", "../baseline.json")
    assert result.exit_code == 0, result.output
    assert "0 new, 1 known, 0 fixed" in result.output
