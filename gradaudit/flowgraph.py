"""The module-level gradient-flow graph, derived from the Trace alone: terms -> parameter groups -> optimizers.

One graph per backward location (from its passes in the window), plus one for the groups no backward reached.
Node ids are made of names and locations, never of object identities, so the same program gives the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradaudit.rules.flow import contributions
from gradaudit.trace import Backward, FlowEdge, FlowGraph, FlowNode, Location, Optimizer, Term, Trace, by_site


def term_node_id(backward: Location | None, term: str) -> str:
    return f"term:{backward or '?'}:{term}"


def group_node_id(group: str) -> str:
    return f"group:{group}"


def optimizer_node_id(optimizer: Optimizer) -> str:
    return f"optimizer:{optimizer.index}:{optimizer.name}"


@dataclass
class _Fate:
    """What became of the gradient the passes at one location put into one group."""

    fate: str
    by: str = ""


def _fates(trace: Trace) -> dict[tuple[Location | None, str], _Fate]:
    """(backward location, group) -> wiped (before any step applied it, in some pass), applied, or pending."""
    group_of = {p.name: p.group for p in trace.parameters}
    fates: dict[tuple[Location | None, str], _Fate] = {}
    for contribution in contributions(trace):
        key = (trace.backwards[contribution.backward].location, group_of[contribution.param])
        known = fates.get(key)
        if known is not None and known.fate == "wiped":
            continue
        wipe = contribution.wiped_by
        if wipe is not None and not contribution.applied_by and contribution.norm > 0:
            where = f" at {wipe.location}" if wipe.location else ""
            fates[key] = _Fate("wiped", f"{wipe.by}{where}")
        elif contribution.applied_by and (known is None or known.fate == "pending"):
            fates[key] = _Fate("applied", contribution.applied_by[0].by)
        elif known is None:
            fates[key] = _Fate("pending")
    return fates


def _term_detail(term: Term) -> str:
    if term.constant:
        point = term.break_point
        if point is None:
            return "constant: no autograd history"
        code = f" `{point.expression}`" if point.expression else ""
        where = f" at {point.location}" if point.location else ""
        return f"constant ({point.kind}: {point.op}{code}{where})"
    if not term.groups_reached:
        return "reaches no trainable parameter"
    return f"x {term.coefficient:g}" if term.coefficient not in (None, 1.0) else ""


def _group_node(trace: Trace, group: str) -> FlowNode:
    params = trace.groups().get(group, [])
    detail = f"{len(params)} tensor{'s' if len(params) != 1 else ''}"
    if params and not any(p.requires_grad for p in params):
        detail += ", frozen"
    cluster = group.rsplit(".", 1)[0] if "." in group else ""
    return FlowNode(group_node_id(group), "group", group, cluster, detail)


def _optimizer_node(optimizer: Optimizer) -> FlowNode:
    detail = f"{optimizer.kind}, {optimizer.steps} step{'s' if optimizer.steps != 1 else ''}"
    return FlowNode(optimizer_node_id(optimizer), "optimizer", optimizer.name, "", detail, optimizer.created_at)


class _GraphBuilder:
    """Nodes by id (first definition wins) and edges without duplicates, in insertion order."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.nodes: dict[str, FlowNode] = {}
        self.edges: dict[tuple[str, str, str], FlowEdge] = {}

    def group(self, group: str) -> str:
        node_id = group_node_id(group)
        if node_id in self.nodes:
            return node_id
        node = self.nodes[node_id] = _group_node(self.trace, group)
        for index in sorted({i for p in self.trace.groups().get(group, []) for i in p.owners}):
            optimizer = self.trace.optimizers[index]
            target = self.nodes.setdefault(optimizer_node_id(optimizer), _optimizer_node(optimizer)).id
            self.edge(FlowEdge(node.id, target, "member"))
        return node.id

    def edge(self, edge: FlowEdge) -> None:
        self.edges.setdefault((edge.source, edge.target, edge.kind), edge)

    def graph(self, backward: Location | None, passes: int) -> FlowGraph:
        return FlowGraph(backward, passes, list(self.nodes.values()), list(self.edges.values()))


def _location_graph(trace: Trace, passes: list[Backward], fates: dict) -> FlowGraph:
    location = passes[-1].location
    builder = _GraphBuilder(trace)
    terms: dict[tuple[str, Location | None], Term] = {}
    for backward in passes:
        for term in backward.terms:
            terms[(term.name, term.location)] = term
    accumulates = any(backward.accumulates for backward in passes)
    for term in terms.values():
        term_id = term_node_id(location, term.name)
        builder.nodes.setdefault(term_id, FlowNode(term_id, "term", term.name, "", _term_detail(term), term.location))
        for group in term.groups_reached:
            fate = fates.get((location, group), _Fate("pending" if accumulates else "returned"))
            norm = term.grad_norms.get(group)
            builder.edge(FlowEdge(term_id, builder.group(group), "gradient", norm, fate.fate, fate.by))
    for consumer, providers in passes[-1].upstream.items():
        for provider in providers:
            if provider != consumer:
                builder.edge(FlowEdge(builder.group(consumer), builder.group(provider), "input"))
    return builder.graph(location, len(passes))


def build_flow_graphs(trace: Trace) -> list[FlowGraph]:
    fates = _fates(trace)
    graphs = [_location_graph(trace, passes, fates) for passes in by_site(trace.backwards, lambda b: b.location)]
    shown = {node.id for graph in graphs for node in graph.nodes}
    rest = _GraphBuilder(trace)
    for group, params in trace.groups().items():
        if group_node_id(group) not in shown and any(p.requires_grad or p.owners for p in params):
            rest.group(group)
    for optimizer in trace.optimizers:
        if optimizer_node_id(optimizer) not in shown:
            rest.nodes.setdefault(optimizer_node_id(optimizer), _optimizer_node(optimizer))
    if rest.nodes:
        graphs.append(rest.graph(None, 0))
    return graphs
