"""`gradaudit check`: the audits of `[tool.gradaudit.audits]`, one after another, and one summary table.

Each audit is its own `gradaudit run` process (so that programs cannot disturb each other), started in the
folder of the pyproject.toml that declares it, with its baseline and its contracts (`--audit NAME`). The exit
code is the worst of theirs.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from gradaudit.config import AuditSpec, Config, ConfigError
from gradaudit.report import sarif

console = Console(highlight=False)


@dataclass(frozen=True)
class AuditResult:
    spec: AuditSpec
    exit_code: int
    report: dict[str, Any] | None
    error: str = ""
    """The last line gradaudit printed on stderr, when it wrote no report."""


def command(spec: AuditSpec, json_path: Path, update_baseline: bool) -> list[str]:
    """The `gradaudit run` command line of one audit."""
    line = [sys.executable, "-m", "gradaudit", "run", "--quiet", "--json", str(json_path), "--audit", spec.name]
    line += ["-m", spec.program] if spec.as_module else [spec.program]
    if spec.iterations is not None:
        line += ["--iterations", str(spec.iterations)]
    if spec.baseline is not None:
        line += ["--baseline", str(spec.baseline)] + (["--update-baseline"] if update_baseline else [])
    return [*line, "--", *spec.args]


def run_audit(spec: AuditSpec, json_path: Path, update_baseline: bool) -> AuditResult:
    completed = subprocess.run(
        command(spec, json_path, update_baseline), cwd=spec.folder, capture_output=True, text=True
    )
    if not json_path.exists():
        lines = completed.stderr.strip().splitlines()
        return AuditResult(spec, completed.returncode, None, lines[-1] if lines else f"exit {completed.returncode}")
    return AuditResult(spec, completed.returncode, json.loads(json_path.read_text()))


def selected(config: Config, names: Sequence[str]) -> list[AuditSpec]:
    if not config.audits:
        raise ConfigError(f"no audits declared ([tool.gradaudit.audits.NAME] in {config.source or 'pyproject.toml'})")
    unknown = [name for name in names if name not in config.audits]
    if unknown:
        raise ConfigError(f"no audit {unknown[0]!r} (declared: {', '.join(config.audits)})")
    return [config.audits[name] for name in names] if names else list(config.audits.values())


def _findings_text(result: AuditResult) -> str:
    if result.report is None:
        return f"[red]could not audit: {escape(result.error)}"
    findings = result.report["findings"]
    baseline = result.report.get("baseline")
    if baseline is None:
        shown = [f"{f['rule']} {f['subject']}" for f in findings if f["severity"] != "info"]
        return escape("\n".join(shown)) or "[green]clean"
    known = Counter(f["rule"] for f in findings) - Counter(f["rule"] for f in baseline["new"])
    lines = [f"{known.total()} known" + (f": {', '.join(sorted(known.elements()))}" if known else "")]
    lines += [f"+ {f['rule']} {f['subject']} @ {f['file'] or '-'}:{f['line']}" for f in baseline["new"]]
    lines += [f"- fixed: {f['rule']} {f['subject']} ({f['file'] or '-'})" for f in baseline["fixed"]]
    return escape("\n".join(lines))


def run_check(config: Config, names: Sequence[str], update_baseline: bool, sarif_path: Path | None) -> int:
    """Runs the audits, prints the summary table, writes the SARIF of all of them; the worst exit code."""
    specs = selected(config, names)
    results: list[AuditResult] = []
    with tempfile.TemporaryDirectory() as tmp, Progress(console=console, transient=True) as progress:
        task = progress.add_task("gradaudit check", total=len(specs))
        for index, spec in enumerate(specs):
            progress.update(task, description=f"auditing {spec.name}")
            results.append(run_audit(spec, Path(tmp) / f"{index}.json", update_baseline))
            progress.advance(task)
    table = Table(title="gradaudit check")
    table.add_column("audit", no_wrap=True)
    table.add_column("findings (with a baseline: + new, - fixed)", overflow="fold")
    table.add_column("exit")
    for result in results:
        mark = "[green]0" if result.exit_code == 0 else f"[red]{result.exit_code}"
        table.add_row(escape(result.spec.name), _findings_text(result), mark)
    console.print(table)
    if sarif_path is not None:
        with contextlib.chdir(specs[0].folder), open(sarif_path, "w", encoding="utf-8") as stream:
            sarif.write([(r.spec.name, r.report) for r in results if r.report is not None], stream)
    return max(result.exit_code for result in results)
