"""The report on a terminal: findings by severity, parameter groups, then chains, term x group norms and numerics.

Every name, message, expression and path comes from the audited program: it is printed through `printable()`, so
an escape sequence or a newline in a module's name cannot colour the terminal or forge a line of the report. A
table whose text columns would be squeezed below a readable width is printed as one block per row instead
(`path:line: CODE severity subject`, then the message indented), as ruff and mypy print diagnostics.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

_STYLES = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_SEVERITY_WIDTH = len("warning")
_SUBJECT_WIDTH = 20
_MESSAGE_WIDTH = 40
"""The narrowest a findings table may make its subject (up to its longest) and message columns; narrower, the
findings are printed as blocks."""
_TEXT_WIDTH = 20
"""The same for the free-text columns of the other tables."""
_TERMS_WIDTH = 16
"""The narrowest column of the terms that reach a parameter group."""
_INDENT = 4

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ud800-\udfff]")
"""C0 and C1 controls (ESC, newline, tab, DEL), and the invisible format and separator characters that reorder or
break a line (bidirectional overrides, zero-width spaces, line and paragraph separators)."""


def printable(text: str) -> str:
    """`text` with every control character written as its Python escape (`\\x1b`, `\\n`, `\\u202e`): safe to print."""
    return _UNPRINTABLE.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def _text(value: str, style: str = "") -> Text:
    """Program-supplied text as a rich Text: escaped, never read as markup."""
    return Text(printable(value), style=style)


def _where(location: dict | None) -> str:
    return f"{location['file']}:{location['line']}" if location else "-"


def _number(value: float | str | None, suffix: str = "") -> str:
    """3 significant digits; '-' for nothing; "inf" / "nan" as the report wrote them."""
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.3g}{suffix}"


def _percent(fraction: float | str | None) -> str:
    return _number(fraction if isinstance(fraction, str) or fraction is None else 100 * fraction, "%")


def _fits(console: Console, fixed: Iterable[int], flexible: Iterable[int]) -> bool:
    """Whether a table whose columns are `fixed` wide, and whose text columns need `flexible`, fits the console."""
    widths = [*fixed, *flexible]
    return sum(widths) + 3 * len(widths) + 1 <= console.width


def _titled(console: Console, title: str) -> Table:
    """A table at least as wide as its title (up to the console's width), so that the title stays on one line."""
    return Table(title=_text(title), min_width=min(len(printable(title)), console.width))


def _heading(console: Console, title: str) -> None:
    console.print(_text(title, "bold"))


def _wrapped(console: Console, text: Text, indent: int, hanging: int) -> None:
    """`text` wrapped to the console: its first line indented by `indent`, the others by `hanging`; no trailing blanks."""
    first, *more = text.wrap(console, console.width - indent, overflow="fold")
    first.rstrip()
    console.print(Text(" " * indent) + first, soft_wrap=True)
    if more:
        rest = text[len(first.plain) :]
        rest = rest[len(rest.plain) - len(rest.plain.lstrip()) :]
        for line in rest.wrap(console, max(console.width - hanging, 1), overflow="fold"):
            line.rstrip()
            console.print(Text(" " * hanging) + line, soft_wrap=True)


def _block(console: Console, head: Text, *lines: Text) -> None:
    """One row as a block: its head line, then each line indented (wrapped lines keep the indent)."""
    _wrapped(console, head, 0, _INDENT)
    for line in lines:
        _wrapped(console, line, _INDENT, _INDENT)


def _findings(console: Console, findings: list[dict[str, Any]]) -> None:
    ordered = [f for severity in ("error", "warning", "info") for f in findings if f["severity"] == severity]
    title = f"{len(findings)} finding(s)"
    location_width = max(len(printable(_where(f["location"]))) for f in findings)
    subject_width = min(max(len(printable(f["subject"])) for f in findings), _SUBJECT_WIDTH)
    if not _fits(console, [_SEVERITY_WIDTH, location_width], [subject_width, _MESSAGE_WIDTH]):
        _heading(console, title)
        for number, f in enumerate(ordered):
            if number:
                console.print()
            head = Text.assemble(
                _text(_where(f["location"]) + ": ", "bold"),
                _text(f"{f['rule']} {f['severity']}", _STYLES[f["severity"]]),
                " ",
                _text(f["subject"]),
            )
            _block(console, head, _text(f["message"]), _text("hint: " + f["hint"], "dim"))
        return
    table = Table(title=title, show_lines=True, expand=True)
    table.add_column("code", no_wrap=True)
    table.add_column("subject", width=subject_width, overflow="fold")
    table.add_column("message", ratio=1, overflow="fold")
    table.add_column("location", no_wrap=True)
    for f in ordered:
        table.add_row(
            _code_cell(f),
            _text(f["subject"]),
            Text.assemble(_text(f["message"]), "\n", _text("hint: " + f["hint"], "dim")),
            _text(_where(f["location"])),
        )
    console.print(table)


def _code_cell(finding: dict[str, Any]) -> Text:
    style = _STYLES[finding["severity"]]
    return Text.assemble(_text(finding["rule"], style), "\n", _text(finding["severity"], style))


def _groups(console: Console, report: dict[str, Any]) -> None:
    title = "parameter groups"
    rows = [
        (
            g["group"] + ("" if g["trainable"] else " (frozen)"),
            str(g["tensors"]),
            _number(g["grad_norm"]),
            ", ".join(g["optimizers"]) or "none",
            ", ".join(g["reached_by"]) or "-",
        )
        for g in report["groups"]
    ]
    names = [min(max((len(printable(row[i])) for row in rows), default=0), _TEXT_WIDTH) for i in (0, 3)]
    if not _fits(console, [len("tensors"), len("grad norm")], [*names, _TERMS_WIDTH]):
        _heading(console, title)
        for group, tensors, norm, optimizers, reached_by in rows:
            facts = f": {tensors} tensor(s), grad norm {norm}, optimizer(s) {optimizers}, reached by {reached_by}"
            _wrapped(console, Text.assemble(_text(group, "bold"), _text(facts)), 0, _INDENT)
        return
    table = Table(title=title, expand=True)
    for column in ("group", "tensors", "grad norm", "optimizer(s)", "reached by"):
        numeric = column in ("tensors", "grad norm")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold", no_wrap=numeric)
    for group, tensors, norm, optimizers, reached_by in rows:
        table.add_row(_text(group), tensors, norm, _text(optimizers), _text(reached_by))
    console.print(table)


def _growth(chain: dict[str, Any]) -> str:
    growth = _number(chain["amplification"], "x")
    if chain["backwards"] > 1 and chain["min_amplification"] != chain["amplification"]:
        growth += f" (min {_number(chain['min_amplification'], 'x')})"
    return growth


def _chains(console: Console, report: dict[str, Any]) -> None:
    title = "chains: gradient growth from a repeated module's last call back to its first"
    columns = ("calls", "carrying", "growth", "per step", "1st share")
    rows = [
        (
            chain,
            (
                str(chain["calls"]),
                str(chain["carried"]),
                _growth(chain),
                _number(chain["per_step"], "x"),
                _percent(chain["first_share"]),
            ),
        )
        for chain in report["chains"]
    ]
    fixed = [max(len(column), *(len(cells[i]) for _, cells in rows)) for i, column in enumerate(columns)]
    location_width = max(len(printable(_where(chain["location"]))) for chain, _ in rows)
    if not _fits(console, [*fixed, location_width], [_TEXT_WIDTH]):
        _heading(console, title)
        for chain, cells in rows:
            head = Text.assemble(_text(_where(chain["location"]) + ": ", "bold"), _text(chain["module"]))
            _block(console, head, Text(", ".join(f"{c} {v}" for c, v in zip(columns, cells, strict=True))))
        return
    table = _titled(console, title)
    table.add_column("module", overflow="fold")
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("location", no_wrap=True)
    for chain, cells in rows:
        table.add_row(_text(chain["module"]), *cells, _text(_where(chain["location"])))
    console.print(table)


def _matrix(console: Console, entry: dict[str, Any]) -> None:
    title = f"term × group gradient norms, backward at {_where(entry['backward'])}"
    groups = entry["groups"]
    if not _fits(console, [max(len(printable(g)), 6) for g in groups], [_TEXT_WIDTH]):
        _heading(console, title)
        for row in entry["rows"]:
            norms = ", ".join(f"{group} {_number(row['norms'][group])}" for group in groups if group in row["norms"])
            _block(console, _text(row["term"], "bold"), _text(norms))
        return
    table = _titled(console, title)
    table.add_column("term", overflow="fold")
    for group in groups:
        table.add_column(_text(group), justify="right")
    for row in entry["rows"]:
        table.add_row(_text(row["term"]), *(_number(row["norms"].get(group)) for group in groups))
    console.print(table)


def _numerics(console: Console, report: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str, dict | None]] = []
    for clamp in report["clamps"]:
        outside = [
            f"{_percent(clamp[side])} {side} {_number(clamp[bound])}"
            for side, bound in (("below", "lower"), ("above", "upper"))
            if clamp[bound] is not None
        ]
        what = f"{_percent(clamp['saturated'])} of {clamp['elements']} elements at a bound ({', '.join(outside)})"
        if clamp["selected_dead"] is not None:
            what += (
                f"; the max/min at {_where(clamp['selected_by'])} selects {_percent(clamp['selected_dead'])} of them"
            )
        rows.append((clamp["op"] + (" (gate)" if clamp["gate"] else ""), clamp["expression"], what, clamp["location"]))
    for exp in report["exps"]:
        what = (
            f"max input {_number(exp['max_input'])}, max output {_number(exp['max_output'])} "
            f"({exp['dtype']}), {exp['overflow']} overflowed"
        )
        rows.append((exp["op"], exp["expression"], what, exp["location"]))
    title = "clamps and exp (worst over the backward passes)"
    op_width = max(len(printable(op)) for op, *_ in rows)
    location_width = max(len(printable(_where(location))) for *_, location in rows)
    if not _fits(console, [op_width, location_width], [_TEXT_WIDTH, _TEXT_WIDTH]):
        _heading(console, title)
        for op, expression, what, location in rows:
            head = Text.assemble(_text(_where(location) + ": ", "bold"), _text(op), " ", _text(expression))
            _block(console, head, _text(what))
        return
    table = Table(title=title, expand=True)
    table.add_column("op", no_wrap=True)
    table.add_column("expression", ratio=2, overflow="fold")
    table.add_column("what", ratio=3)
    table.add_column("location", no_wrap=True)
    for op, expression, what, location in rows:
        table.add_row(_text(op), _text(expression), _text(what), _text(_where(location)))
    console.print(table)


_BARS = "▁▂▃▄▅▆▇█"


def sparkline(series: list[float | str | None]) -> str:
    """One bar per sample on a log scale from the series' smallest to largest norm; a space where there was none,
    `!` where the norm was NaN or infinite (written "nan", "inf" in the report)."""
    values = [None if v is None else float(v) for v in series]
    finite = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    low, high = (math.log10(min(finite)), math.log10(max(finite))) if finite else (0.0, 0.0)
    bars = []
    for value in values:
        if value is None:
            bars.append(" ")
        elif not math.isfinite(value):
            bars.append("!")
        elif value <= 0 or high == low:
            bars.append(_BARS[0] if value <= 0 else _BARS[len(_BARS) // 2])
        else:
            bars.append(_BARS[round((math.log10(value) - low) / (high - low) * (len(_BARS) - 1))])
    return "".join(bars)


def _pace(watch: dict[str, Any]) -> str:
    """`one light sample every 17 iterations (chosen so that they add at most 10 %: ...)`."""
    every = watch["every"]
    chosen = sorted(set(watch.get("every_per_sample", [])))
    if watch.get("automatic"):
        span = f", between {chosen[0]} and {chosen[-1]} during the run" if len(chosen) > 1 else ""
        pace = (
            f"one light sample every {every} iterations{span} (chosen so that they add at most {watch['budget']:.0%})"
        )
    else:
        pace = f"one light sample every {every} iterations"
    if watch.get("cost") is not None:
        pace += (
            f"; a light sample added {watch['sample_seconds'] * 1e3:.3g} ms to a "
            f"{watch['iteration_seconds'] * 1e3:.3g} ms iteration: about {watch['cost']:.3g}x the unwatched run"
        )
    return pace


def _watch(console: Console, watch: dict[str, Any]) -> None:
    iterations = watch["iterations"]
    if not iterations:
        return
    console.print(
        Text(
            f"gradient norm per group over the run ({len(iterations)} samples, {sum(watch['full'])} full, iterations "
            f"{iterations[0]}–{iterations[-1]}; log scale):"
        )
    )
    console.print(_text(f"  {_pace(watch)}"))
    width = max(len(group) for group in watch["group_norms"]) if watch["group_norms"] else 0
    for group, series in watch["group_norms"].items():
        finite = [float(v) for v in series if v is not None and math.isfinite(float(v))]
        span = f"  {min(finite):.3g} … {max(finite):.3g}" if finite else ""
        console.print(_text(f"  {group.ljust(width)}  {sparkline(series)}{span}"))


def render(report: dict[str, Any], stream: TextIO, width: int | None = None) -> None:
    """Prints the report at `width` columns (default: the terminal's, or $COLUMNS, or 80)."""
    console = Console(file=stream, width=width, highlight=False, emoji=False)
    window = report["window"]
    console.print(
        Text.assemble(
            ("gradaudit ", "bold"),
            _text(f"{report['program']}: {window['iterations']} iteration(s) audited ({window['stopped_by']})"),
            _text(f" — {window['note']}" if window["note"] else ""),
        )
    )
    if report.get("light"):
        console.print(
            Text("light mode: lifecycle and reachability only (no op provenance, term gradients, chains, numerics)")
        )
    internal_errors = report["internal_errors"]
    if internal_errors:
        console.print(
            Text(f"gradaudit: {internal_errors} internal error(s) in its hooks: the audit is partial", "bold yellow")
        )
    for note in report["notes"]:
        console.print(Text("note: ", "yellow") + _text(note))
    if report["findings"]:
        _findings(console, report["findings"])
    else:
        console.print(Text("no findings", "green"))
    _groups(console, report)
    if report.get("watch"):
        _watch(console, report["watch"])
    if report["chains"]:
        _chains(console, report)
    for entry in report["matrix"]:
        if entry["rows"]:
            _matrix(console, entry)
    if report["clamps"] or report["exps"]:
        _numerics(console, report)


def render_findings(findings: list[dict[str, Any]], stream: TextIO, width: int | None = None) -> None:
    """Only the findings, as the report prints them (the pytest plugin's failure messages); none: nothing."""
    if findings:
        _findings(Console(file=stream, width=width, highlight=False, emoji=False), findings)
