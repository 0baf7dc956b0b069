"""Graphviz for the HTML report: dot sources for the flow graph and the raw autograd graph, laid out to SVG.

Every name reaches dot as a quoted string with its backslashes, quotes and ampersands escaped, so dot shows it
as text (dot escapes `<` and `>` itself when it writes SVG). Node ids in the SVG are made of names, so a finding
can link to its node with `#id`. dot runs with a timeout: a graph it cannot lay out in time becomes a note.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gradaudit.trace import FlowEdge, FlowGraph, FlowNode, RawGraph

DOT_TIMEOUT = 10.0
INSTALL_HINT = "install graphviz to see it (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz)"
_MAX_LABEL = 48

SEVERITY_COLOURS = {"error": "#c62828", "warning": "#e65100", "info": "#1565c0"}
_FILLS = {"error": "#ffebee", "warning": "#fff3e0", "info": "#e3f2fd"}
_RANK = {"info": 0, "warning": 1, "error": 2}


@dataclass(frozen=True)
class Mark:
    """How a finding of one rule marks its node: a line style (never colour alone) and a word in the label."""

    style: str
    word: str
    penwidth: float = 2.5


MARKS: Mapping[str, Mark] = {
    "GA101": Mark("dashed", "dead term"),
    "GA102": Mark("dotted", "zero gradient"),
    "GA201": Mark("dashed", "orphaned: no optimizer"),
    "GA202": Mark("dotted", "unreached: no gradient"),
    "GA203": Mark("dashed", "gradient wiped"),
    "GA204": Mark("bold", "two optimizers"),
    "GA205": Mark("bold", "stale gradient"),
    "GA206": Mark("dashed", "target carries gradient"),
    "GA301": Mark("bold", "exploding chain", 4.0),
    "GA302": Mark("dotted", "vanishing chain"),
    "GA305": Mark("bold", "non-finite"),
    "GA306": Mark("bold", "dominant term"),
}
FALLBACK_MARK = Mark("bold", "finding")

EDGE_STYLES: Mapping[str, tuple[str, str, str]] = {
    "applied": ("solid", "#3949ab", "gradient, applied by a step (width: the term's gradient norm)"),
    "wiped": ("dashed", "#757575", "gradient wiped by a zero_grad() before any step applied it"),
    "pending": ("dotted", "#3949ab", "gradient still pending when the window ended"),
    "returned": ("dotted", "#6a1b9a", "gradient returned by torch.autograd.grad (not accumulated)"),
    "input": ("dotted", "#9e9e9e", "via input: the gradient goes on into the group whose output fed this one"),
    "member": ("solid", "#2e7d32", "group held by the optimizer"),
}


def svg_id(prefix: str, key: str) -> str:
    """An HTML/SVG id from any name: readable, [A-Za-z0-9_] only, unique through a short hash of the whole name."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_")[:40]
    return f"{prefix}_{slug}_{hashlib.sha1(key.encode('utf-8', 'replace')).hexdigest()[:8]}"


def _text(value: str, limit: int = _MAX_LABEL) -> str:
    """One line of a dot label: control characters shown, long names shortened."""
    flat = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def quote(value: str) -> str:
    """A dot string that dot shows literally (no `\\N`-style escapes, no entities)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("&", "&amp;")
    return f'"{escaped}"'


def _label(*lines: str, limit: int = _MAX_LABEL) -> str:
    """Lines joined with dot's own line break (escaped one by one, so no name can add a break)."""
    return '"' + "\\n".join(quote(_text(line, limit))[1:-1] for line in lines if line) + '"'


def _attributes(**values: str | float) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items())


def _node_line(node: FlowNode, marks: list[tuple[str, str]]) -> str:
    """`marks`: (rule code, severity) of the findings on this node."""
    shape = {"term": "box", "group": "box", "optimizer": "component"}.get(node.kind, "box")
    style = ["rounded" if node.kind == "group" else "solid", "filled"]
    colour, fill, penwidth = "#37474f", {"term": "#eceff1", "optimizer": "#e8f5e9"}.get(node.kind, "#ffffff"), 1.2
    words = []
    if marks:
        worst = max((severity for _, severity in marks), key=lambda s: _RANK.get(s, 0))
        colour, fill = SEVERITY_COLOURS.get(worst, colour), _FILLS.get(worst, fill)
        for code, _ in marks:
            mark = MARKS.get(code, FALLBACK_MARK)
            style.append(mark.style)
            penwidth = max(penwidth, mark.penwidth)
            words.append(f"{code} {mark.word}")
    title = node.label if node.kind != "term" else f"term: {node.label}"
    tooltip = " — ".join(part for part in (node.label, node.detail, str(node.location or "")) if part)
    attributes = _attributes(
        id=quote(svg_id("node", node.id)),
        label=_label(title, node.detail, *dict.fromkeys(words)),
        tooltip=quote(_text(tooltip, 300)),
        shape=shape,
        style=quote(",".join(dict.fromkeys(style))),
        color=quote(colour),
        fillcolor=quote(fill),
        penwidth=penwidth,
        fontname="Helvetica",
        fontsize=11,
    )
    return f"  {quote(node.id)} [{attributes}];"


def _penwidth(norm: float | None, scale: tuple[float, float] | None) -> float:
    """1 to 6 by the log of the gradient norm over the graph's range; thin for zero, middling when not measured."""
    if norm is None:
        return 2.0
    if not math.isfinite(norm):
        return 6.0
    if norm <= 0 or scale is None:
        return 0.6
    low, high = scale
    return 1.0 + 5.0 * ((math.log10(norm) - low) / (high - low) if high > low else 0.5)


def _edge_line(edge: FlowEdge, scale: tuple[float, float] | None, flagged: set[str]) -> str:
    kind = edge.fate if edge.kind == "gradient" else edge.kind
    style, colour, _ = EDGE_STYLES.get(kind, ("solid", "#3949ab", ""))
    attributes: dict[str, str | float] = {"style": style, "color": quote(colour)}
    if edge.kind == "gradient":
        attributes["penwidth"] = round(_penwidth(edge.norm, scale), 2)
        lines = [f"{edge.norm:.3g}" if edge.norm is not None else ""]
        if edge.fate == "wiped":
            wiped_by, _, where = edge.by.partition(" at ")
            lines += [f"wiped by {wiped_by}", f"at {where}" if where else ""]
            if edge.target in flagged:
                attributes["color"] = quote(SEVERITY_COLOURS["warning"])
                attributes["penwidth"] = max(float(attributes["penwidth"]), 2.5)
        attributes["label"] = _label(*lines, limit=90)
        attributes["tooltip"] = quote(_text(" ".join(lines) or "gradient", 300))
    elif edge.kind == "input":
        attributes.update(arrowhead="onormal", constraint="false", tooltip=quote("via input"))
    else:
        attributes.update(arrowhead="none", penwidth=1.0)
    attributes.update(id=quote(svg_id("edge", f"{edge.source}>{edge.target}>{edge.kind}")), fontname="Helvetica")
    attributes["fontsize"] = 9
    return f"  {quote(edge.source)} -> {quote(edge.target)} [{_attributes(**attributes)}];"


def _norm_scale(edges: Iterable[FlowEdge]) -> tuple[float, float] | None:
    logs = [math.log10(e.norm) for e in edges if e.norm is not None and math.isfinite(e.norm) and e.norm > 0]
    return (min(logs), max(logs)) if logs else None


def merged(graphs: list[FlowGraph]) -> tuple[list[FlowNode], list[FlowEdge]]:
    """The window's graph: every location's nodes (shared groups and optimizers once) and edges."""
    nodes: dict[str, FlowNode] = {}
    edges: dict[tuple[str, str, str], FlowEdge] = {}
    for graph in graphs:
        for node in graph.nodes:
            nodes.setdefault(node.id, node)
        for edge in graph.edges:
            edges.setdefault((edge.source, edge.target, edge.kind), edge)
    return list(nodes.values()), list(edges.values())


def flow_dot(graphs: list[FlowGraph], marks: Mapping[str, list[tuple[str, str]]]) -> str:
    """Terms (clustered by backward location) on the left, groups (clustered by module path), optimizers right."""
    nodes, edges = merged(graphs)
    by_id = {node.id: node for node in nodes}
    lines = [
        "digraph gradaudit {",
        '  graph [rankdir=LR, nodesep=0.25, ranksep=0.9, fontname="Helvetica", fontsize=11, bgcolor="white"];',
    ]
    for index, graph in enumerate(graphs):
        terms = [n for n in graph.nodes if n.kind == "term"]
        if not terms:
            continue
        passes = f" ({graph.passes} passes)" if graph.passes > 1 else ""
        title = f"backward at {graph.backward}{passes}" if graph.backward else "backward"
        lines.append(f"  subgraph cluster_backward_{index} {{")
        lines.append(f'    label={_label(title, limit=90)}; style="rounded,dashed"; color="#90a4ae";')
        lines += ["  " + _node_line(n, marks.get(n.id, [])) for n in terms]
        lines.append("  }")
    parents = {node.cluster for node in nodes if node.kind == "group"}
    clusters: dict[str, list[FlowNode]] = {}
    for node in nodes:
        if node.kind == "group":  # `critic` sits in the box of `critic.q1_net` and `critic.v_net`
            clusters.setdefault(node.label if node.label in parents else node.cluster, []).append(node)
        elif node.kind == "optimizer":
            lines.append(_node_line(node, marks.get(node.id, [])))
    for index, (cluster, members) in enumerate(sorted(clusters.items())):
        if cluster:
            lines.append(f"  subgraph cluster_module_{index} {{")
            lines.append(f'    label={_label(cluster)}; style="rounded"; color="#b0bec5";')
        lines += [("  " if cluster else "") + _node_line(n, marks.get(n.id, [])) for n in members]
        if cluster:
            lines.append("  }")
    scale = _norm_scale(e for e in edges if e.kind == "gradient")
    flagged = {node_id for node_id, found in marks.items() if any(code == "GA203" for code, _ in found)}
    lines += [_edge_line(edge, scale, flagged) for edge in edges if edge.source in by_id and edge.target in by_id]
    lines.append("}")
    return "\n".join(lines) + "\n"


def raw_dot(graph: RawGraph, prefix: str) -> str:
    """torchviz's picture: ops grey, parameters (named) blue, the root green; arrows in forward direction."""
    lines = ["digraph raw {", '  graph [fontname="Helvetica"]; node [fontname="Helvetica", fontsize=10, shape=box];']
    for index, node in enumerate(graph.nodes):
        node_id = f"{prefix}_{index}"
        if node.param is not None:
            look = 'style=filled, fillcolor="lightblue"'
            label = _label(node.param)
        elif index == 0:
            look = 'style=filled, fillcolor="darkolivegreen1"'
            label = _label(node.op)
        else:
            look = 'style=filled, fillcolor="lightgrey"'
            label = _label(node.op)
        lines.append(f'  {node_id} [id="{node_id}", label={label}, tooltip={quote(node.op)}, {look}];')
    lines += [f"  {prefix}_{child} -> {prefix}_{parent};" for parent, child in graph.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass
class Svg:
    """dot's SVG ready to inline (`svg`), or why there is none (`note`)."""

    svg: str = ""
    note: str = ""


_PROLOGUE = re.compile(r"\A.*?(?=<svg\b)", re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)


def _run_dot(source: str, timeout: float, dot: str) -> Svg:
    try:
        done = subprocess.run([dot, "-Tsvg"], input=source, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Svg(
            note=f"graphviz (dot) took more than {timeout:g} s to lay out this graph; the tables hold the same facts"
        )
    except OSError as exc:
        return Svg(note=f"graphviz (dot) could not run ({exc})")
    if done.returncode != 0 or "<svg" not in done.stdout:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return Svg(note=f"graphviz (dot) could not lay out this graph: {reason}")
    return Svg(svg=_COMMENT.sub("", _PROLOGUE.sub("", done.stdout, count=1)).strip())


def render_svgs(sources: list[str], timeout: float) -> list[Svg]:
    """Lays the sources out side by side (one dot process each), each within `timeout` seconds."""
    dot = shutil.which("dot")
    if dot is None:
        return [Svg(note=f"graphviz's dot program was not found: {INSTALL_HINT}") for _ in sources]
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=min(4, len(sources))) as pool:
        return list(pool.map(lambda source: _run_dot(source, timeout, dot), sources))
