"""`gradaudit demo` (`make demo`): audits every reference-agent variant and writes the HTML gallery.

Each audit runs in its own process, exactly as a user would run it:
`gradaudit run -m reference_agents.NAME --html reports/NAME-VARIANT.html -- --variant V`.
The gallery's index (one row per variant: findings by rule, a link) goes to `reports/index.html`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from gradaudit.report.html import GalleryEntry, render_index
from reference_agents.demo import CASES, Case

console = Console()


def report_name(case: Case) -> str:
    return f"{case.agent}-{case.variant}.html"


def audit(case: Case, json_path: Path, html_path: Path) -> dict:
    """The JSON report of one variant, or {"error": the last line gradaudit printed}."""
    command = [sys.executable, "-m", "gradaudit", "run", "-m", f"reference_agents.{case.agent}", "--quiet"]
    command += ["--json", str(json_path), "--html", str(html_path), "--", "--variant", case.variant, "--quiet"]
    completed = subprocess.run(command, capture_output=True, text=True)
    if not json_path.exists():
        lines = completed.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {completed.returncode}"}
    return json.loads(json_path.read_text())


def _shown(findings: list[dict]) -> str:
    return "\n".join(
        f"{f['rule']} {f['severity']}: {f['subject']} @ {f['location']['line'] if f['location'] else '-'}"
        for f in findings
    )


def run_demo(out: Path) -> int:
    """Audits the variants into `out`; 0 when every variant gives exactly the rules it is expected to."""
    out.mkdir(parents=True, exist_ok=True)
    table = Table(title="gradaudit on the reference agents")
    for column in ("agent", "variant", "findings (rule: subject @ line)", "expected", "ok"):
        table.add_column(column)
    entries: list[GalleryEntry] = []
    with tempfile.TemporaryDirectory() as tmp, Progress(console=console, transient=True) as progress:
        task = progress.add_task("auditing agents", total=len(CASES))
        for index, case in enumerate(CASES):
            progress.update(task, description=f"auditing {case.agent} --variant {case.variant}")
            result = audit(case, Path(tmp) / f"{index}.json", out / report_name(case))
            progress.advance(task)
            expected = ", ".join(case.expected) or "clean"
            if "error" in result:
                table.add_row(
                    case.agent, case.variant, f"[red]could not audit: {escape(result['error'])}", expected, "✗"
                )
                entries.append(GalleryEntry(case.agent, case.variant, case.expected, [], "", False, result["error"]))
                continue
            findings = result["findings"]
            found = tuple(sorted({f["rule"] for f in findings if f["severity"] != "info"}))
            ok = found == tuple(sorted(case.expected))
            shown = escape(_shown(findings)) or "[green]clean"
            table.add_row(case.agent, case.variant, shown, expected, "✓" if ok else "✗")
            entries.append(GalleryEntry(case.agent, case.variant, case.expected, findings, report_name(case), ok))
    index = out / "index.html"
    with open(index, "w", encoding="utf-8") as stream:
        render_index(entries, stream)
    console.print(table)
    console.print(f"HTML reports: {index}")
    return 0 if all(entry.ok for entry in entries) else 1
