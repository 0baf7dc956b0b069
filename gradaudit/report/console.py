"""The report on a terminal: findings by severity, then the parameter-group table."""

from __future__ import annotations

from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

_STYLES = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _where(location: dict | None) -> str:
    return f"{location['file']}:{location['line']}" if location else "-"


def render(report: dict[str, Any], stream: TextIO) -> None:
    console = Console(file=stream, width=max(100, Console(file=stream).width), highlight=False)
    findings = report["findings"]
    window = report["window"]
    console.print(
        Text.assemble(
            ("gradaudit ", "bold"),
            f"{report['program']}: {window['iterations']} iteration(s) audited ({window['stopped_by']})",
            (f" — {window['note']}" if window["note"] else ""),
        )
    )
    if findings:
        table = Table(title=f"{len(findings)} finding(s)", show_lines=True, expand=True)
        table.add_column("code", no_wrap=True)
        table.add_column("subject", ratio=1)
        table.add_column("message", ratio=3)
        table.add_column("location", no_wrap=True)
        for severity in ("error", "warning", "info"):
            for f in (f for f in findings if f["severity"] == severity):
                table.add_row(
                    Text(f"{f['rule']}\n{f['severity']}", style=_STYLES[severity]),
                    f["subject"],
                    Text.assemble(f["message"], ("\nhint: " + f["hint"], "dim")),
                    _where(f["location"]),
                )
        console.print(table)
    else:
        console.print("[green]no findings[/green]")
    groups = Table(title="parameter groups", expand=True)
    for column in ("group", "tensors", "grad norm", "optimizer(s)", "reached by"):
        groups.add_column(column, justify="right" if column in ("tensors", "grad norm") else "left")
    for g in report["groups"]:
        norm = "-" if g["grad_norm"] is None else f"{g['grad_norm']:.3g}"
        frozen = "" if g["trainable"] else " (frozen)"
        groups.add_row(
            g["group"] + frozen,
            str(g["tensors"]),
            norm,
            ", ".join(g["optimizers"]) or "none",
            ", ".join(g["reached_by"]) or "-",
        )
    console.print(groups)
