"""The report as one self-contained HTML file: findings with their source, the gradient-flow graph, the tables.

Fed by the Trace and the findings alone (so `gradaudit report TRACE --html` works offline). No network: the
SVG, CSS and the few lines of JavaScript are inline, and a Content-Security-Policy allows nothing else (the one
script by its hash, so no injected handler could run). Every name, message, expression and source line is
escaped; the report's JSON is embedded in a `<script type="application/json">` block for tools (and tests).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from gradaudit.findings import Finding
from gradaudit.report import build_report
from gradaudit.report.dot import (
    DOT_TIMEOUT,
    EDGE_STYLES,
    MARKS,
    SEVERITY_COLOURS,
    Svg,
    flow_dot,
    merged,
    raw_dot,
    render_svgs,
    svg_id,
)
from gradaudit.trace import FlowNode, Trace

DATA_ID = "gradaudit-report"
NO_FINDINGS = '<span class="badge none">no findings</span>'
HERE = ' class="here"'
_SEVERITIES = ("error", "warning", "info")
_STOPPED = {
    "iterations": "the requested iterations completed",
    "program-end": "the program ended",
    "cap": "the window cap was reached before every optimizer stepped",
    "exception": "the program raised an exception",
    "context-exit": "the audited block ended",
}


def escape(value: object) -> str:
    """Text for HTML (body or attribute): markup escaped, control characters made visible."""
    text = "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in str(value))
    return html.escape(text, quote=True)


def _number(value: float | str | None, suffix: str = "") -> str:
    if value is None:
        return "–"
    return escape(value) if isinstance(value, str) else f"{value:.3g}{suffix}"


def _where(location: Mapping[str, Any] | None) -> str:
    return escape(f"{location['file']}:{location['line']}") if location else "–"


# ---------------------------------------------------------------- the page around the sections

_CSS = """
:root { --error: #c62828; --warning: #e65100; --info: #1565c0; --muted: #607d8b; --line: #cfd8dc; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #212121; }
header { background: #263238; color: #eceff1; padding: 16px 24px; }
header h1 { font-size: 20px; margin: 0 0 4px; word-break: break-all; }
header .meta { color: #b0bec5; }
nav { position: sticky; top: 0; background: #eceff1; padding: 6px 24px; border-bottom: 1px solid var(--line); z-index: 2; }
nav a { margin-right: 14px; color: #37474f; }
main { padding: 8px 24px 48px; }
section { margin-top: 28px; }
h2 { font-size: 17px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; color: white; font-weight: 600; font-size: 12px; }
.badge.error { background: var(--error); } .badge.warning { background: var(--warning); }
.badge.info { background: var(--info); } .badge.none { background: #2e7d32; }
.finding { border: 1px solid var(--line); border-left: 6px solid var(--muted); border-radius: 4px; padding: 8px 12px;
  margin: 10px 0; }
.finding.error { border-left-color: var(--error); } .finding.warning { border-left-color: var(--warning); }
.finding.info { border-left-color: var(--info); }
.finding .subject { font-family: ui-monospace, Menlo, Consolas, monospace; word-break: break-all; }
.finding .hint { color: #455a64; }
.finding .where { color: var(--muted); font-size: 12px; }
pre.source { background: #fafafa; border: 1px solid #eceff1; padding: 6px 0; overflow-x: auto; margin: 6px 0; }
pre.source span { display: block; padding: 0 10px; white-space: pre; }
pre.source span.here { background: #fff8e1; font-weight: 600; }
pre.source i { color: #90a4ae; font-style: normal; display: inline-block; min-width: 3.5em; user-select: none; }
.note { color: #455a64; background: #f5f5f5; border: 1px dashed #b0bec5; padding: 8px 12px; border-radius: 4px; }
.graph { overflow: auto; max-height: 85vh; border: 1px solid var(--line); border-radius: 4px; background: white; }
.graph svg { display: block; }
.graph g.flash > polygon, .graph g.flash > path, .graph g.flash > ellipse,
.graph g.flash > g > a > polygon, .graph g.flash > g > a > path { stroke-width: 6px; stroke: #ff1744; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eceff1; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-order="ascending"]::after { content: " ▲"; }
table.sortable th[data-order="descending"]::after { content: " ▼"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.mono, span.mono { font-family: ui-monospace, Menlo, Consolas, monospace; word-break: break-all; }
td.absent { color: #b0bec5; text-align: center; }
tr.flagged td { background: #fff3e0; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 22px; margin: 8px 0; font-size: 12px; }
.legend span { display: inline-flex; align-items: center; gap: 6px; }
details { margin: 8px 0; } summary { cursor: pointer; }
input[type=search] { padding: 4px 8px; width: 320px; margin: 6px 0; }
"""

_SCRIPT = """
"use strict";
function cellValue(row, column) {
  const cell = row.cells[column];
  const key = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
  const number = Number(key);
  return key !== "" && Number.isFinite(number) ? number : key.toLowerCase();
}
for (const table of document.querySelectorAll("table.sortable")) {
  table.querySelectorAll("th").forEach((header, column) => {
    header.addEventListener("click", () => {
      const ascending = header.dataset.order !== "ascending";
      table.querySelectorAll("th").forEach((other) => delete other.dataset.order);
      header.dataset.order = ascending ? "ascending" : "descending";
      const rows = Array.from(table.tBodies[0].rows);
      rows.sort((a, b) => {
        const x = cellValue(a, column), y = cellValue(b, column);
        return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1);
      });
      rows.forEach((row) => table.tBodies[0].appendChild(row));
    });
  });
}
for (const input of document.querySelectorAll("input[data-filter]")) {
  const table = document.getElementById(input.dataset.filter);
  input.addEventListener("input", () => {
    const wanted = input.value.trim().toLowerCase();
    for (const row of table.tBodies[0].rows) {
      row.hidden = wanted !== "" && !row.cells[0].textContent.toLowerCase().includes(wanted);
    }
  });
}
for (const link of document.querySelectorAll("a.to-graph")) {
  link.addEventListener("click", (event) => {
    const target = document.getElementById(link.getAttribute("href").slice(1));
    if (!target) return;
    event.preventDefault();
    history.replaceState(null, "", link.getAttribute("href"));
    target.scrollIntoView({ block: "center", inline: "center" });
    target.classList.add("flash");
    setTimeout(() => target.classList.remove("flash"), 2500);
  });
}
"""


def _page(title: str, header: str, body: str, data: str = "") -> str:
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    policy = f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'sha256-{script_hash}'"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header>{header}</header>\n{body}\n{data}<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


def _json_block(report: Mapping[str, Any]) -> str:
    """The report for tools; `<`, `>` and `&` as JSON escapes so the block cannot end early."""
    text = json.dumps(report, indent=None, separators=(",", ":"), allow_nan=False)
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return f'<script type="application/json" id="{DATA_ID}">{text}</script>\n'


def read_embedded_report(page: str) -> dict[str, Any]:
    """The report JSON a page embeds (the inverse of `_json_block`)."""
    start = page.index(f'<script type="application/json" id="{DATA_ID}">')
    body = page[page.index(">", start) + 1 : page.index("</script>", start)]
    return json.loads(body)


def _version() -> str:
    try:
        return metadata.version("gradaudit")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- header and findings


def _command(trace: Trace) -> str:
    """The program and its arguments as a shell would take them."""
    return " ".join([trace.program, shlex.join(trace.arguments)]) if trace.arguments else trace.program


def _header(trace: Trace, report: Mapping[str, Any]) -> str:
    window = report["window"]
    why = _STOPPED.get(window["stopped_by"], window["stopped_by"])
    note = f" — {escape(window['note'])}" if window["note"] else ""
    counts = {s: sum(f["severity"] == s for f in report["findings"]) for s in _SEVERITIES}
    badges = " ".join(f'<span class="badge {s}">{counts[s]} {s}</span>' for s in _SEVERITIES if counts[s])
    torch_version = escape(trace.torch_version) if trace.torch_version else "not recorded"
    return (
        f"<h1>gradaudit: {escape(_command(trace))}</h1>\n"
        f'<div class="meta">{window["iterations"]} iteration(s) audited; the window stopped because {escape(why)}'
        f"{note}.<br>torch {torch_version} · trace version {trace.version} · gradaudit {escape(_version())}</div>\n"
        f"<p>{badges or NO_FINDINGS}</p>"
    )


def _source_lines(file: str) -> tuple[str, ...] | None:
    try:
        return tuple(Path(file).read_text(encoding="utf-8", errors="replace").splitlines())
    except (OSError, ValueError):
        return None


def source_excerpt(location: Mapping[str, Any] | None, context: int = 2) -> str:
    """The finding's line with `context` lines either side, read now; a note when the file is gone."""
    if not location:
        return ""
    lines = _source_lines(location["file"])
    line = location["line"]
    if lines is None:
        return (
            f'<p class="note">The source file {escape(location["file"])} was not found when this report was made.</p>'
        )
    if not 1 <= line <= len(lines):
        return f'<p class="note">{escape(location["file"])} has no line {line} now: it changed since the audit.</p>'
    shown = range(max(1, line - context), min(len(lines), line + context) + 1)
    rows = "".join(f"<span{HERE if n == line else ''}><i>{n}</i>{escape(lines[n - 1])}</span>" for n in shown)
    return f'<pre class="source">{rows}</pre>'


def _findings_section(findings: list[dict], targets: list[str | None]) -> str:
    if not findings:
        return '<section id="findings"><h2>Findings</h2><p>No findings.</p></section>'
    parts = ['<section id="findings"><h2>Findings</h2>']
    for i, (finding, target) in enumerate(zip(findings, targets, strict=True)):
        severity = finding["severity"]
        place = "graph" if target and target.startswith("node_") else "table"
        link = f' · <a class="to-graph" href="#{target}">show in the {place}</a>' if target else ""
        parts.append(
            f'<article class="finding {escape(severity)}" id="finding_{i}">'
            f'<div><span class="badge {escape(severity)}">{escape(finding["rule"])} {escape(severity)}</span> '
            f'{escape(finding["name"])} · <span class="subject">{escape(finding["subject"])}</span></div>'
            f"<p>{escape(finding['message'])}</p>"
            f'<p class="hint">hint: {escape(finding["hint"])}</p>'
            f'<div class="where">{_where(finding["location"])}{link}</div>'
            f"{source_excerpt(finding['location'])}</article>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def _same_place(location: Mapping[str, Any] | None, node: FlowNode) -> bool:
    return (
        bool(location)
        and node.location is not None
        and ((node.location.file, node.location.line) == (location["file"], location["line"]))
    )


def finding_node(finding: Mapping[str, Any], nodes: list[FlowNode]) -> FlowNode | None:
    """The graph node a finding speaks of: its term, its group (or the group a chain module sits in), its optimizer."""
    subject, location = finding["subject"], finding["location"]
    terms = [n for n in nodes if n.kind == "term" and n.label == subject]
    if terms:
        return next((n for n in terms if _same_place(location, n)), terms[0])
    groups = {n.label: n for n in nodes if n.kind == "group"}
    if subject in groups:
        return groups[subject]
    prefixes = [g for g in groups if subject.startswith(g + ".")]
    if prefixes:
        return groups[max(prefixes, key=len)]
    optimizer = next((n for n in nodes if n.kind == "optimizer" and n.label == subject), None)
    return optimizer or next((n for n in nodes if n.kind == "term" and _same_place(location, n)), None)


def _row_id(kind: str, row: Mapping[str, Any]) -> str:
    location = row["location"]
    return svg_id(kind, f"{row['op']}@{location['file']}:{location['line']}" if location else row["op"])


def _targets(report: Mapping[str, Any], found: list[FlowNode | None]) -> list[str | None]:
    """For each finding: the SVG id of its node, else the id of its clamp / exp row, else None."""
    rows = {
        (r["location"]["file"], r["location"]["line"]): _row_id(kind, r)
        for kind in ("clamps", "exps")
        for r in report[kind]
        if r["location"]
    }
    targets: list[str | None] = []
    for finding, node in zip(report["findings"], found, strict=True):
        location = finding["location"]
        if node is not None:
            targets.append(svg_id("node", node.id))
        else:
            targets.append(rows.get((location["file"], location["line"])) if location else None)
    return targets


# ---------------------------------------------------------------- the graphs


def _swatch(style: str, colour: str, width: float = 2.0) -> str:
    dash = {"dashed": ' stroke-dasharray="6,3"', "dotted": ' stroke-dasharray="1.5,3"'}.get(style, "")
    return (
        f'<svg width="44" height="12" aria-hidden="true"><line x1="2" y1="6" x2="42" y2="6" stroke="{colour}" '
        f'stroke-width="{4 if style == "bold" else width}"{dash}/></svg>'
    )


def _legend(codes: set[str]) -> str:
    """Edge styles, severity colours, and the line style of each rule found here."""
    edges = "".join(
        f"<span>{_swatch(style, colour)}{escape(text)}</span>" for style, colour, text in EDGE_STYLES.values()
    )
    severities = "".join(
        f"<span>{_swatch('solid', colour, 3)}{severity}</span>" for severity, colour in SEVERITY_COLOURS.items()
    )
    marks = "".join(
        f"<span>{_swatch(mark.style, '#455a64')}{code} {escape(mark.word)}</span>"
        for code, mark in MARKS.items()
        if code in codes
    )
    rules = f'<div class="legend"><b>node border, by rule</b>{marks}</div>' if marks else ""
    return (
        f'<div class="legend"><b>edges</b>{edges}</div>'
        f'<div class="legend"><b>flagged node colour, by severity</b>{severities}</div>{rules}'
    )


def _graph_section(trace: Trace, flow: Svg | None, codes: set[str]) -> str:
    parts = ['<section id="graph"><h2>Gradient flow</h2>']
    if trace.version < 3:
        parts.append(
            f'<p class="note">This trace was written by an older gradaudit (trace version {trace.version}) and holds '
            "no gradient-flow graph; run the program again with <code>gradaudit run … --html</code> to see it.</p>"
        )
    elif flow is None:
        parts.append('<p class="note">No gradient flowed in the audited window: there is no graph to draw.</p>')
    else:
        parts.append(
            "<p>Loss terms on the left (grouped by the backward call they belong to), parameter groups in the "
            "middle (grouped by module path), optimizers on the right. Hover a node or an edge for details.</p>"
        )
        parts.append(_legend(codes))
        parts.append(
            f'<div class="graph" id="flow-graph">{flow.svg}</div>'
            if flow.svg
            else f'<p class="note">{escape(flow.note)}</p>'
        )
    parts.append("</section>")
    return "\n".join(parts)


def _raw_section(trace: Trace, raw_svgs: list[Svg | None]) -> str:
    parts = ['<section id="raw"><h2>Raw autograd graphs</h2>']
    if not trace.raw_graphs:
        parts.append(
            '<p class="note">Not recorded in this trace (recorded by <code>gradaudit run … --html</code>, or '
            "<code>gradaudit.audit(raw_graph=True)</code>).</p>"
        )
    for graph, svg in zip(trace.raw_graphs, raw_svgs, strict=True):
        where = escape(graph.backward) if graph.backward else "an unknown location"
        parts.append(f"<details><summary>the first backward at {where}: {graph.node_count} autograd nodes</summary>")
        if svg is None:
            parts.append(
                f'<p class="note">{graph.node_count} nodes: over the cap this trace was recorded with, so only the '
                "count was kept (raise it with <code>--raw-graph-cap</code>).</p>"
            )
        elif svg.svg:
            parts.append(
                "<p>Ops grey, parameters blue (named), the loss green; arrows point the way the forward pass ran.</p>"
                f'<div class="graph">{svg.svg}</div>'
            )
        else:
            parts.append(f'<p class="note">{escape(svg.note)}</p>')
        parts.append("</details>")
    parts.append("</section>")
    return "\n".join(parts)


# ---------------------------------------------------------------- the tables


def _membership(trace: Trace) -> str:
    if not trace.optimizers:
        return '<section id="optimizers"><h2>Optimizer membership</h2><p>No optimizer was seen.</p></section>'
    head = "".join(
        f'<th class="mono">{escape(o.name)}<br><small>{escape(o.kind)}</small></th>' for o in trace.optimizers
    )
    rows = []
    for group, params in trace.groups().items():
        held = [sum(o.index in p.owners for p in params) for o in trace.optimizers]
        trainable = any(p.requires_grad for p in params)
        if not trainable and not any(held):
            continue
        flagged = ' class="flagged"' if sum(1 for n in held if n) != 1 else ""
        cells = "".join(f'<td class="num">{n}/{len(params)}</td>' if n else '<td class="absent">·</td>' for n in held)
        rows.append(f'<tr{flagged}><td class="mono">{escape(group)}</td>{cells}</tr>')
    return (
        '<section id="optimizers"><h2>Optimizer membership</h2>'
        "<p>Tensors of each parameter group held by each optimizer (highlighted: none, or more than one; frozen "
        f"groups in no optimizer are left out).</p><table><thead><tr><th>group</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _heat(norm: float, low: float, high: float) -> str:
    share = (math.log10(norm) - low) / (high - low) if high > low else 1.0
    lightness = 96 - 52 * share
    text = "white" if lightness < 62 else "#212121"
    return f"background: hsl(215, 70%, {lightness:.0f}%); color: {text}"


def _matrix(report: Mapping[str, Any]) -> str:
    parts = ['<section id="matrix"><h2>Term × group gradient norms</h2>']
    entries = [e for e in report["matrix"] if e["rows"]]
    if not entries:
        parts.append("<p>No per-term gradient norms were measured.</p>")
    for entry in entries:
        values = [v for row in entry["rows"] for v in row["norms"].values() if isinstance(v, float | int) and v > 0]
        low, high = (math.log10(min(values)), math.log10(max(values))) if values else (0.0, 0.0)
        head = "".join(f'<th class="mono">{escape(group)}</th>' for group in entry["groups"])
        rows = []
        for row in entry["rows"]:
            cells = []
            for group in entry["groups"]:
                value = row["norms"].get(group)
                if value is None:
                    cells.append('<td class="absent">·</td>')
                elif isinstance(value, float | int) and value > 0:
                    cells.append(f'<td class="num" style="{_heat(value, low, high)}">{_number(value)}</td>')
                else:
                    cells.append(f'<td class="num">{_number(value)}</td>')
            rows.append(f'<tr><td class="mono">{escape(row["term"])}</td>{"".join(cells)}</tr>')
        parts.append(
            f"<h3>backward at {_where(entry['backward'])}</h3><table><thead><tr><th>term</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
    parts.append(
        "<p>Each cell: the gradient norm of the term alone on the group (last pass); · the term does not reach it.</p>"
    )
    parts.append("</section>")
    return "\n".join(parts)


def sparkline(values: list[float | str | None], width: int = 180, height: int = 44) -> str:
    """Gradient norm per call on a log scale ("inf" / "nan" and calls without gradient left out)."""
    points = [
        (i, math.log10(v)) for i, v in enumerate(values) if isinstance(v, float | int) and v > 0 and math.isfinite(v)
    ]
    count = len(values)
    if not points:
        return "–"
    low, high = min(y for _, y in points), max(y for _, y in points)
    span, steps = (high - low) or 1.0, max(count - 1, 1)

    def xy(i: int, y: float) -> str:
        return f"{4 + (width - 8) * i / steps:.1f},{height - 4 - (height - 8) * (y - low) / span:.1f}"

    line = " ".join(xy(i, y) for i, y in points)
    dots = "".join('<circle cx="{}" cy="{}" r="2"/>'.format(*xy(i, y).split(",")) for i, y in points)
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="gradient norm per call">'
        f"<title>gradient norm per call, log scale: 10^{low:.2g} to 10^{high:.2g}</title>"
        f'<polyline points="{line}" fill="none" stroke="#3949ab" stroke-width="1.5"/><g fill="#3949ab">{dots}</g></svg>'
    )


def _chains(report: Mapping[str, Any]) -> str:
    if not report["chains"]:
        return ""
    rows = "".join(
        f'<tr><td class="mono">{escape(c["module"])}</td><td class="num">{c["calls"]}</td>'
        f'<td class="num">{c["carried"]}</td><td class="num">{_number(c["amplification"], "x")}</td>'
        f'<td class="num">{_number(c["min_amplification"], "x")}</td><td class="num">{_number(c["per_step"], "x")}</td>'
        f"<td>{sparkline(c['output_norms'])}</td><td>{_where(c['location'])}</td></tr>"
        for c in report["chains"]
    )
    return (
        '<section id="chains"><h2>Chains</h2><p>Repeatedly applied modules: the gradient\'s growth from the last '
        "call back to the first (largest and smallest over the passes), and the gradient norm at each call's output."
        "</p><table><thead><tr><th>module</th><th>calls</th><th>carrying</th><th>growth</th><th>min growth</th>"
        f"<th>per step</th><th>norm per call</th><th>location</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )


def _numerics(report: Mapping[str, Any]) -> str:
    if not report["clamps"] and not report["exps"]:
        return ""
    parts = ['<section id="numerics"><h2>Clamps and exps</h2>']
    if report["clamps"]:
        rows = "".join(
            f'<tr id="{_row_id("clamps", c)}"><td>{escape(c["op"])}{" (gate)" if c["gate"] else ""}</td>'
            f'<td class="mono">{escape(c["expression"])}</td><td class="num">{_number(c["lower"])}</td>'
            f'<td class="num">{_number(c["upper"])}</td><td class="num">{c["elements"]}</td>'
            f'<td class="num">{_percent(c["saturated"])}</td><td class="num">{_percent(c["below"])}</td>'
            f'<td class="num">{_percent(c["above"])}</td><td>{_where(c["location"])}</td></tr>'
            for c in report["clamps"]
        )
        parts.append(
            "<h3>Clamps (the pass with the most elements at a bound)</h3><table><thead><tr><th>op</th><th>expression</th>"
            "<th>lower</th><th>upper</th><th>elements</th><th>at a bound</th><th>below</th><th>above</th>"
            f"<th>location</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    if report["exps"]:
        rows = "".join(
            f'<tr id="{_row_id("exps", x)}"><td>{escape(x["op"])}</td><td class="mono">{escape(x["expression"])}</td>'
            f'<td>{escape(x["dtype"])}</td><td class="num">{_number(x["max_input"])}</td>'
            f'<td class="num">{_number(x["max_output"])}</td><td class="num">{x["overflow"]}</td>'
            f"<td>{_where(x['location'])}</td></tr>"
            for x in report["exps"]
        )
        parts.append(
            "<h3>Exps (maxima over the passes)</h3><table><thead><tr><th>op</th><th>expression</th><th>dtype</th>"
            "<th>max input</th><th>max output</th><th>overflowed</th><th>location</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def _percent(value: float | str | None) -> str:
    return _number(value if isinstance(value, str) or value is None else 100 * value, "%")


@dataclass
class _ParameterRow:
    accumulated: int = 0
    wiped: int = 0
    applied: int = 0
    last_norm: float | None = None


def _parameters(trace: Trace) -> str:
    seen: dict[str, _ParameterRow] = {}
    for event in trace.events:
        row = seen.setdefault(event.param, _ParameterRow())
        if event.kind == "accumulate":
            row.accumulated += 1
            row.last_norm = event.norm if event.norm is not None else row.last_norm
        elif event.kind == "wipe":
            row.wiped += 1
        elif event.kind == "apply":
            row.applied += 1
    rows = []
    for p in trace.parameters:
        row = seen.get(p.name, _ParameterRow())
        owners = ", ".join(trace.optimizers[i].name for i in p.owners if 0 <= i < len(trace.optimizers))
        size = math.prod(p.shape)
        norm = row.last_norm
        rows.append(
            f'<tr><td class="mono">{escape(p.name)}</td><td class="mono">{escape(p.group)}</td>'
            f'<td data-sort="{size}">{escape("×".join(map(str, p.shape)) or "scalar")}</td>'
            f'<td>{"yes" if p.requires_grad else "frozen"}</td><td class="mono">{escape(owners) or "–"}</td>'
            f'<td class="num" data-sort="{norm if norm is not None and math.isfinite(norm) else -1}">{_number(norm)}</td>'
            f'<td class="num">{row.accumulated}</td><td class="num">{row.wiped}</td><td class="num">{row.applied}</td></tr>'
        )
    return (
        '<section id="parameters"><h2>Parameters</h2>'
        '<input type="search" placeholder="filter by name" data-filter="parameter-table" aria-label="filter by name">'
        '<table class="sortable" id="parameter-table"><thead><tr><th>name</th><th>group</th><th>shape</th>'
        "<th>trainable</th><th>optimizer(s)</th><th>last grad norm</th><th>accumulated</th><th>wiped</th>"
        f"<th>applied</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        "<p>Click a column to sort. Counts are events in the audited window.</p></section>"
    )


# ---------------------------------------------------------------- the whole page


def render(trace: Trace, findings: list[Finding], stream: TextIO, dot_timeout: float = DOT_TIMEOUT) -> None:
    report = build_report(trace, findings)
    nodes, _ = merged(trace.flow_graphs)
    found = [finding_node(finding, nodes) for finding in report["findings"]]
    marks: dict[str, list[tuple[str, str]]] = {}
    for finding, node in zip(report["findings"], found, strict=True):
        if node is not None:
            marks.setdefault(node.id, []).append((finding["rule"], finding["severity"]))
    sources = [flow_dot(trace.flow_graphs, marks)] if nodes else []
    drawable = [g for g in trace.raw_graphs if g.nodes]
    sources += [raw_dot(graph, f"raw{index}") for index, graph in enumerate(drawable)]
    svgs = render_svgs(sources, dot_timeout)
    flow = svgs[0] if nodes else None
    laid_out = iter(svgs[1:] if nodes else svgs)
    raw_svgs = [next(laid_out) if graph.nodes else None for graph in trace.raw_graphs]
    sections = (
        ("findings", "findings", _findings_section(report["findings"], _targets(report, found))),
        (
            "graph",
            "gradient flow",
            _graph_section(trace, flow, {code for marked in marks.values() for code, _ in marked}),
        ),
        ("raw", "autograd graphs", _raw_section(trace, raw_svgs)),
        ("optimizers", "optimizers", _membership(trace)),
        ("matrix", "term × group", _matrix(report)),
        ("chains", "chains", _chains(report)),
        ("numerics", "clamps and exps", _numerics(report)),
        ("parameters", "parameters", _parameters(trace)),
    )
    nav = "".join(f'<a href="#{anchor}">{label}</a>' for anchor, label, section in sections if section)
    body = f"<nav>{nav}</nav>\n<main>\n" + "\n".join(section for *_, section in sections if section) + "\n</main>"
    stream.write(_page(f"gradaudit: {_command(trace)}", _header(trace, report), body, _json_block(report)))


def write_html(trace: Trace, findings: list[Finding], path: str | Path, dot_timeout: float = DOT_TIMEOUT) -> None:
    with open(path, "w", encoding="utf-8") as stream:
        render(trace, findings, stream, dot_timeout)


# ---------------------------------------------------------------- the gallery's index


@dataclass
class GalleryEntry:
    agent: str
    variant: str
    expected: tuple[str, ...]
    findings: list[dict]
    report: str
    """The page's file name, relative to the index."""
    ok: bool
    error: str = ""


def render_index(entries: list[GalleryEntry], stream: TextIO) -> None:
    rows = []
    for entry in entries:
        by_code: dict[str, list[str]] = {}
        for finding in entry.findings:
            by_code.setdefault(finding["rule"], []).append(finding["severity"])
        found = ", ".join(
            f'<span class="badge {escape(severities[0])}">{escape(code)}</span>'
            f"{f' ×{len(severities)}' if len(severities) > 1 else ''}"
            for code, severities in sorted(by_code.items())
        )
        if entry.error:
            found = f'<span class="note">could not audit: {escape(entry.error)}</span>'
        link = f'<a href="{escape(entry.report)}">report</a>' if not entry.error else "–"
        rows.append(
            f'<tr><td class="mono">{escape(entry.agent)}</td><td class="mono">{escape(entry.variant)}</td>'
            f"<td>{found or 'clean'}</td><td>{escape(', '.join(entry.expected) or 'clean')}</td>"
            f"<td>{'✓' if entry.ok else '✗'}</td><td>{link}</td></tr>"
        )
    body = (
        "<main><p>Every variant of the reference agents, audited with <code>gradaudit run -m reference_agents.AGENT "
        "-- --variant VARIANT</code>: the findings by rule (colour: severity) and the rules expected at warning or "
        "above.</p><table><thead><tr><th>agent</th><th>variant</th><th>findings</th><th>expected</th><th>ok</th>"
        f"<th>report</th></tr></thead><tbody>{''.join(rows)}</tbody></table></main>"
    )
    header = "<h1>gradaudit: the reference agents</h1>"
    stream.write(_page("gradaudit: the reference agents", header, body))
