"""`make demo`: audits every bundled agent variant with `gradaudit run` and prints the findings table.

Each audit runs in its own process, exactly as a user would run it:
`gradaudit run -m reference_agents.NAME -- --variant V`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

console = Console()


@dataclass(frozen=True)
class Case:
    agent: str
    variant: str
    expected: tuple[str, ...]
    """Rule codes expected at warning or above; () for a clean variant."""


CASES = (
    Case("distributional_ppo", "fixed", ()),
    Case("distributional_ppo", "cvar-empirical", ("GA101",)),
    Case("lapo", "fixed", ()),
    Case("lapo", "encoder-in-actor", ("GA203",)),
    Case("lapo", "encoder-orphan", ("GA201",)),
    Case("cpql", "single_step", ()),
    Case("cpql", "last_5", ()),
    Case("cpql", "whole_grad", ()),
    Case("calf", "fixed", ()),
    Case("calf", "constraint-nograd", ("GA101",)),
)


def audit(case: Case, report: Path) -> dict:
    command = [sys.executable, "-m", "gradaudit", "run", "-m", f"reference_agents.{case.agent}", "--quiet"]
    command += ["--json", str(report), "--", "--variant", case.variant, "--quiet"]
    completed = subprocess.run(command, capture_output=True, text=True)
    if not report.exists():
        return {
            "error": completed.stderr.strip().splitlines()[-1] if completed.stderr else f"exit {completed.returncode}"
        }
    return json.loads(report.read_text())


def main() -> int:
    table = Table(title="gradaudit on the reference agents")
    for column in ("agent", "variant", "findings (rule: subject @ line)", "expected", "ok"):
        table.add_column(column)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp, Progress(console=console, transient=True) as progress:
        task = progress.add_task("auditing agents", total=len(CASES))
        for index, case in enumerate(CASES):
            progress.update(task, description=f"auditing {case.agent} --variant {case.variant}")
            result = audit(case, Path(tmp) / f"{index}.json")
            progress.advance(task)
            if "error" in result:
                table.add_row(case.agent, case.variant, f"[red]could not audit: {result['error']}", "", "✗")
                failures += 1
                continue
            findings = result["findings"]
            shown = "\n".join(
                f"{f['rule']} {f['severity']}: {f['subject']} @ {f['location']['line'] if f['location'] else '-'}"
                for f in findings
            )
            found = tuple(sorted({f["rule"] for f in findings if f["severity"] != "info"}))
            ok = found == tuple(sorted(case.expected))
            failures += not ok
            table.add_row(
                case.agent,
                case.variant,
                shown or "[green]clean",
                ", ".join(case.expected) or "clean",
                "✓" if ok else "✗",
            )
    console.print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
