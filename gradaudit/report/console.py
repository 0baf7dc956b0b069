"""The report on a terminal: findings by severity, parameter groups, then chains, term x group norms and numerics."""

from __future__ import annotations

from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

_STYLES = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _where(location: dict | None) -> Text:
    return Text(f"{location['file']}:{location['line']}" if location else "-")


def _number(value: float | str | None, suffix: str = "") -> str:
    """3 significant digits; '-' for nothing; "inf" / "nan" as the report wrote them."""
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.3g}{suffix}"


def _percent(fraction: float | str | None) -> str:
    return _number(fraction if isinstance(fraction, str) or fraction is None else 100 * fraction, "%")


def _titled(title: str) -> Table:
    """A table at least as wide as its title, so that the title stays on one line."""
    return Table(title=escape(title), min_width=len(title))


def _chains(report: dict[str, Any]) -> Table:
    table = _titled("chains: gradient growth from a repeated module's last call back to its first")
    table.add_column("module", overflow="fold")
    for column in ("calls", "carrying", "growth", "per step", "1st share"):
        table.add_column(column, justify="right", no_wrap=column == "growth")
    table.add_column("location", no_wrap=True)
    for chain in report["chains"]:
        amplification = _number(chain["amplification"], "x")
        if chain["backwards"] > 1 and chain["min_amplification"] != chain["amplification"]:
            amplification += f" (min {_number(chain['min_amplification'], 'x')})"
        table.add_row(
            Text(chain["module"]),
            str(chain["calls"]),
            str(chain["carried"]),
            amplification,
            _number(chain["per_step"], "x"),
            _percent(chain["first_share"]),
            _where(chain["location"]),
        )
    return table


def _matrix(entry: dict[str, Any]) -> Table:
    table = _titled(f"term × group gradient norms, backward at {_where(entry['backward'])}")
    table.add_column("term")
    for group in entry["groups"]:
        table.add_column(Text(group), justify="right")
    for row in entry["rows"]:
        table.add_row(Text(row["term"]), *(_number(row["norms"].get(group)) for group in entry["groups"]))
    return table


def _numerics(report: dict[str, Any]) -> Table:
    table = Table(title="clamps and exp (worst over the backward passes)", expand=True)
    table.add_column("op", no_wrap=True)
    table.add_column("expression", ratio=2)
    table.add_column("what", ratio=3)
    table.add_column("location", no_wrap=True)
    for clamp in report["clamps"]:
        outside = [
            f"{_percent(clamp[side])} {side} {_number(clamp[bound])}"
            for side, bound in (("below", "lower"), ("above", "upper"))
            if clamp[bound] is not None
        ]
        what = f"{_percent(clamp['saturated'])} of {clamp['elements']} elements at a bound ({', '.join(outside)})"
        gate = " (gate)" if clamp["gate"] else ""
        table.add_row(clamp["op"] + gate, Text(clamp["expression"]), what, _where(clamp["location"]))
    for exp in report["exps"]:
        what = (
            f"max input {_number(exp['max_input'])}, max output {_number(exp['max_output'])} "
            f"({exp['dtype']}), {exp['overflow']} overflowed"
        )
        table.add_row(exp["op"], Text(exp["expression"]), what, _where(exp["location"]))
    return table


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
                    Text(f["subject"]),
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
        frozen = "" if g["trainable"] else " (frozen)"
        groups.add_row(
            Text(g["group"] + frozen),
            str(g["tensors"]),
            _number(g["grad_norm"]),
            Text(", ".join(g["optimizers"]) or "none"),
            Text(", ".join(g["reached_by"]) or "-"),
        )
    console.print(groups)
    if report["chains"]:
        console.print(_chains(report))
    for entry in report["matrix"]:
        if entry["rows"]:
            console.print(_matrix(entry))
    if report["clamps"] or report["exps"]:
        console.print(_numerics(report))
