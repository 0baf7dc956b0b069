"""Running programs as `python` would, and keeping how they ended (exit status, message, Ctrl-C, os._exit)."""

import json
import os
import subprocess
import sys

import pytest

from gradaudit.cli import how_it_ended
from gradaudit.runner import Outcome
from tests.conftest import FIXTURES

AS_PYTHON_TARGETS = {
    "folder with __main__.py": ["folder_program"],
    "-m of a package that is not installed": ["-m", "local_package.train"],
    "__file__ after os.chdir": ["chdir_then_file.py"],
}


def as_python_line(output: str) -> dict:
    """What the fixture printed about itself: __file__, sys.argv, sys.path[0], __package__."""
    (line,) = [line for line in output.splitlines() if line.startswith("as-python:")]
    return json.loads(line.removeprefix("as-python:"))


@pytest.fixture(scope="module")
def under_python() -> dict[str, dict]:
    """What each target says about itself under plain `python` (AS_PYTHON_ONLY: it stops before importing torch)."""
    seen = {}
    for name, args in AS_PYTHON_TARGETS.items():
        env = {**os.environ, "AS_PYTHON_ONLY": "1"}
        process = subprocess.run([sys.executable, *args], cwd=FIXTURES, env=env, capture_output=True, text=True)
        assert process.returncode == 0, process.stderr
        seen[name] = as_python_line(process.stdout)
    return seen


@pytest.mark.parametrize("name", AS_PYTHON_TARGETS)
def test_targets_run_as_python_runs_them(gradaudit_cli, under_python, name):
    result = gradaudit_cli("run", *AS_PYTHON_TARGETS[name])
    assert result.exit_code == 0, result.output
    assert as_python_line(result.output) == under_python[name]
    assert result.report["window"]["stopped_by"] == "iterations"
    assert result.report["groups"][0]["grad_norm"] > 0


def test_targets_that_python_cannot_run_are_exit_2(gradaudit_cli, tmp_path):
    (tmp_path / "empty_folder").mkdir()
    result = gradaudit_cli("run", str(tmp_path / "empty_folder"))
    assert result.exit_code == 2 and "can't find '__main__' module in" in result.output
    result = gradaudit_cli("run", "-m", "broken_package.train")
    assert result.exit_code == 2
    assert "error while finding module 'broken_package.train'" in result.output
    assert "No module named 'no_such_dependency'" in result.output


def ends_early(gradaudit_cli, how: str):
    """ends_early.py trains two clean steps, then ends as `how` says while the 10-iteration window is open."""
    return gradaudit_cli("run", "ends_early.py", "-n", "10", "--", "--how", how)


@pytest.mark.parametrize(
    ("how", "status", "ending"),
    [
        ("exit-status", 3, "called sys.exit(3)"),
        ("exit-message", 1, "called sys.exit('checkpoint folder is full')"),
        ("raise-error", 1, "raised RuntimeError: loss diverged"),
    ],
)
def test_a_failing_end_after_iterations_is_reported_and_keeps_its_status(gradaudit_cli, how, status, ending):
    result = ends_early(gradaudit_cli, how)
    assert result.exit_code == status and result.report["findings"] == []
    assert result.report["window"] == {
        "iterations": 2,
        "stopped_by": "exception" if how == "raise-error" else "program-end",
        "note": f"the program {ending} after 2 iteration(s); exit status {status}",
    }


def test_sys_exit_message_is_printed_as_python_prints_it(gradaudit_cli):
    result = ends_early(gradaudit_cli, "exit-message")
    assert "checkpoint folder is full\n" in result.output.split("gradaudit")[0]


def test_keyboard_interrupt_gives_a_partial_report_and_130(gradaudit_cli):
    result = ends_early(gradaudit_cli, "raise-interrupt")
    assert result.exit_code == 130
    assert result.report["window"]["stopped_by"] == "interrupted" and result.report["window"]["iterations"] == 2
    assert "was interrupted (KeyboardInterrupt) after 2 iteration(s)" in result.output


def test_a_program_that_swallows_the_stop_keeps_its_exit_status(gradaudit_cli):
    result = ends_early(gradaudit_cli, "swallow-stop")
    assert result.exit_code == 3
    assert result.report["window"]["stopped_by"] == "iterations"
    assert "called sys.exit(3)" in result.report["window"]["note"]


def test_the_note_says_the_program_ran_on_unaudited_after_catching_the_stop():
    outcome = Outcome("iterations", status=3, ending="called sys.exit(3)", stop_swallowed=True)
    assert how_it_ended(outcome, 3) == (
        "the program caught gradaudit's stop after 3 iteration(s) and ran on unaudited to its end; "
        "it then called sys.exit(3); exit status 3"
    )


@pytest.mark.parametrize(
    ("how", "status", "ending"), [("os-exit", 3, "called os._exit(3)"), ("sigint", 130, "was interrupted")]
)
def test_os_exit_and_sigint_in_a_real_process_still_report(tmp_path, how, status, ending):
    """os._exit skips every finally and atexit: the report is written before the real os._exit runs."""
    report_path = tmp_path / "report.json"
    command = [sys.executable, "-m", "gradaudit", "run", "ends_early.py", "-n", "10", "--json", str(report_path)]
    process = subprocess.run([*command, "--", "--how", how], cwd=FIXTURES, capture_output=True, text=True, timeout=120)
    assert process.returncode == status, process.stderr
    assert "ends_early.py: 2 iteration(s) audited" in process.stdout
    window = json.loads(report_path.read_text())["window"]
    assert window["iterations"] == 2 and ending in window["note"]
    assert "Traceback" not in process.stderr or how == "sigint"
