"""Shared helpers: drive the real `gradaudit` command in-process and read its JSON report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradaudit.cli import app

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass
class CliResult:
    exit_code: int
    output: str
    report: dict | None

    def codes(self, severity: str | None = None) -> list[str]:
        return [f["rule"] for f in self.findings(severity=severity)]

    def findings(self, rule: str | None = None, severity: str | None = None) -> list[dict]:
        found = self.report["findings"] if self.report else []
        return [
            f for f in found if (rule is None or f["rule"] == rule) and (severity is None or f["severity"] == severity)
        ]

    def at_least_warning(self) -> list[dict]:
        return [f for f in self.findings() if f["severity"] in ("warning", "error")]


def fixture_line(name: str, marker: str) -> int:
    """The line of `# marker` in a fixture script (tests never hard-code line numbers)."""
    for number, line in enumerate((FIXTURES / name).read_text().splitlines(), start=1):
        if line.rstrip().endswith(f"# {marker}"):
            return number
    raise AssertionError(f"{marker} not in {name}")


@pytest.fixture
def gradaudit_cli(tmp_path, monkeypatch):
    """Runs `gradaudit ARGS` (the real typer app) from the fixtures folder; returns exit code and JSON report."""
    monkeypatch.chdir(FIXTURES)

    def invoke(*args: str) -> CliResult:
        report_path = tmp_path / "report.json"
        report_path.unlink(missing_ok=True)
        command = list(args)
        if command and command[0] in ("run", "report") and "--json" not in command:
            split = command.index("--") if "--" in command else len(command)
            command[split:split] = ["--json", str(report_path)]
        result = CliRunner().invoke(app, command)
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        report = json.loads(report_path.read_text()) if report_path.exists() else None
        return CliResult(result.exit_code, result.output, report)

    return invoke
