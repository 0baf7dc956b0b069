"""The raw autograd graph of the first backward at each location, for the HTML report (torchviz's view, named).

Only op names, edges and parameter identities are kept (no reference to a node outlives the backward); a graph
over the cap is stored as its node count alone, since laying out thousands of nodes takes dot minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gradaudit.capture.graph import GraphView
from gradaudit.trace import Location, RawGraph, RawNode


@dataclass
class _Captured:
    location: Location | None
    node_count: int
    ops: list[str]
    params: dict[int, int]
    """node index -> id(parameter) for parameter leaves; resolved to names when the trace is built."""
    edges: list[list[int]]


@dataclass
class RawGraphRecorder:
    cap: int = 0
    """Largest graph stored node by node; 0 records nothing."""
    captured: list[_Captured] = field(default_factory=list)
    _locations: set[Location | None] = field(default_factory=set)

    def capture(self, location: Location | None, view: GraphView) -> None:
        """Keeps the graph `walk` just visited (its explicit-stack order), once per backward location."""
        if not self.cap or location in self._locations:
            return
        self._locations.add(location)
        count = len(view.nodes)
        if count > self.cap:
            self.captured.append(_Captured(location, count, [], {}, []))
            return
        index = {key: i for i, key in enumerate(view.nodes)}
        param_of_node = {id(node): pid for pid, (node, _) in view.leaves.items()}
        ops, params, edges = [], {}, []
        for key, node in view.nodes.items():
            ops.append(type(node).__name__)
            if key in param_of_node:
                params[index[key]] = param_of_node[key]
            edges += [[index[key], index[id(child)]] for child, _ in node.next_functions if id(child) in index]
        self.captured.append(_Captured(location, count, ops, params, edges))

    def graphs(self, names: dict[int, str]) -> list[RawGraph]:
        return [
            RawGraph(
                c.location,
                c.node_count,
                [RawNode(op, names.get(c.params[i]) if i in c.params else None) for i, op in enumerate(c.ops)],
                c.edges,
            )
            for c in self.captured
        ]
