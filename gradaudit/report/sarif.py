"""SARIF 2.1.0 (`--sarif`): the findings where code review looks (GitHub code scanning and other SARIF viewers).

One run of the tool `gradaudit`, with every rule of the catalog (help text, default level); each finding is a
result at its file:line, relative to the repository root (git's top level, else the working directory) under the
`%SRCROOT%` base, with the baseline's fingerprint so that viewers track it across line shifts.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from gradaudit.findings import Severity
from gradaudit.gate import fingerprint
from gradaudit.rules import RULES
from gradaudit.trace import Location

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_LEVELS = {Severity.info: "note", Severity.warning: "warning", Severity.error: "error"}


def repository_root() -> Path:
    """git's top level from the working directory, else the working directory."""
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10, check=True
        )
        return Path(completed.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return Path.cwd()


def _rule(index: int) -> dict[str, Any]:
    rule = RULES[index]
    help_text = f"{rule.why}\n\nBad:\n{rule.bad}\n\nGood:\n{rule.good}\n\nFix: {rule.fix}"
    return {
        "id": rule.code,
        "name": rule.name,
        "shortDescription": {"text": rule.summary},
        "fullDescription": {"text": rule.why},
        "help": {"text": help_text},
        "defaultConfiguration": {"level": _LEVELS[rule.severity]},
        "properties": {"tags": ["gradient-flow"]},
    }


def _location(place: dict[str, Any], root: Path) -> dict[str, Any]:
    path = Path(os.path.abspath(place["file"]))
    try:
        artifact = {"uri": path.relative_to(root).as_posix(), "uriBaseId": "%SRCROOT%"}
    except ValueError:
        artifact = {"uri": path.as_uri()}
    return {"physicalLocation": {"artifactLocation": artifact, "region": {"startLine": max(place["line"], 1)}}}


def _result(finding: dict[str, Any], root: Path, audit: str | None) -> dict[str, Any]:
    index = next(i for i, rule in enumerate(RULES) if rule.code == finding["rule"])
    place = finding["location"]
    where = None if place is None else Location(place["file"], place["line"])
    result: dict[str, Any] = {
        "ruleId": finding["rule"],
        "ruleIndex": index,
        "level": _LEVELS[Severity[finding["severity"]]],
        "message": {"text": f"{finding['message']}\nFix: {finding['hint']}"},
        "partialFingerprints": {"gradaudit/v1": fingerprint(finding["rule"], finding["subject"], where).fingerprint},
        "properties": {"subject": finding["subject"]},
    }
    if place is not None:
        result["locations"] = [_location(place, root)]
    related = finding.get("related", [])
    if related:
        result["relatedLocations"] = [
            {"id": number, **_location(other, root), "message": {"text": "declared here"}}
            for number, other in enumerate(related, start=1)
        ]
    if audit is not None:
        result["properties"]["audit"] = audit
    return result


def sarif_log(reports: Iterable[tuple[str | None, dict[str, Any]]]) -> dict[str, Any]:
    """One SARIF log of the findings of `(audit name or None, JSON report)` pairs, as one run."""
    root = repository_root()
    results = [_result(finding, root, audit) for audit, report in reports for finding in report["findings"]]
    return {
        "$schema": SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "gradaudit",
                        "rules": [_rule(index) for index in range(len(RULES))],
                    }
                },
                "originalUriBaseIds": {"%SRCROOT%": {"uri": root.as_uri() + "/"}},
                "results": results,
            }
        ],
    }


def write(reports: Iterable[tuple[str | None, dict[str, Any]]], stream: TextIO) -> None:
    json.dump(sarif_log(reports), stream, indent=1)
    stream.write("\n")


def render(report: dict[str, Any], stream: TextIO) -> None:
    write([(None, report)], stream)
