"""One walk of an autograd graph: which parameters each node reaches, which nodes run the program's own code when a
backward passes through them, and the root's top-level terms.

Limits. Every node the walk touches gets a Python wrapper that lives as long as the node, and PyTorch frees a chain
of wrapped nodes recursively on the C stack (about 170 bytes a node: a chain of 50,000 overflows an 8 MB stack).
The walk therefore stops MAX_WALK_DEPTH nodes below the root, and after `max_nodes` nodes (MAX_WALK_NODES by
default: the walk holds about 220 bytes a node, 440 MB at that size, until the backward starts); what lies beyond
is "unknown" (its reach, and whether it runs user code), and the Backward says the walk was truncated.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch.autograd.function import BackwardCFunction

from gradaudit.capture.provenance import OpRecord
from gradaudit.capture.source import operand_texts
from gradaudit.trace import Location, collector_paused

MAX_WALK_DEPTH = 16_384
"""Nodes farther than this below the root are not walked (their subgraph is unknown)."""
MAX_WALK_NODES = 2_000_000
"""At most this many nodes are walked per backward, by default (`--max-nodes`, `audit(max_nodes=N)`)."""
MAX_TERMS = 64
"""Default cap on the terms reported per backward root; the addends beyond it are merged into one term."""

_TOO_DEEP = "a part of the graph too deep to walk"

_SUMS = {"AddBackward0", "SubBackward0"}
_SCALINGS = {
    "MulBackward0",
    "DivBackward0",
    "NegBackward0",
    "AddBackward1",
    "SubBackward1",
    "MulBackward1",
    "DivBackward1",
}
try:  # the Function that module full backward hooks put on the graph
    from torch.nn.modules._functions import BackwardHookFunction as _MODULE_HOOK_FUNCTION
except ImportError:
    _MODULE_HOOK_FUNCTION = None
_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad


def _python_backward(node: Any) -> tuple[str, bool] | None:
    """For a node whose backward is Python code: (what it is, whether that code may reach parameters that are not
    among the node's inputs - a nested backward, as reentrant checkpointing runs). None for a C++ node."""
    if not isinstance(node, BackwardCFunction):
        return None
    function = getattr(node, "_forward_cls", None)
    if function is not None and function is _MODULE_HOOK_FUNCTION:
        return "a module backward hook", False
    if getattr(function, "__module__", "").startswith("torch._functorch"):
        return "a torch.compile region", False  # AOT autograd makes the parameters inputs of the compiled node
    if isinstance(function, type) and issubclass(function, torch.utils.checkpoint.CheckpointFunction):
        return "reentrant activation checkpointing", True
    return f"the custom autograd.Function {getattr(function, '__name__', type(node).__name__)}", True


@dataclass
class GraphView:
    """`reach[id(node)]` is a bitmask over `param_ids` (ids of leaf tensors that are known parameters)."""

    nodes: dict[int, Any] = field(default_factory=dict)
    reach: dict[int, int] = field(default_factory=dict)
    leaves: dict[int, tuple[Any, torch.Tensor]] = field(default_factory=dict)
    """id(parameter) -> (its AccumulateGrad node, the parameter)."""
    param_ids: list[int] = field(default_factory=list)
    user_code: dict[int, str] = field(default_factory=dict)
    """id(node) -> the first user code that a backward through the node runs (absent: none)."""
    reach_unknown: set[int] = field(default_factory=set)
    """Nodes below which a node may reach parameters that its edges do not show, or the walk stopped."""
    frontier: set[int] = field(default_factory=set)
    """Nodes where the walk stopped (limits): their inputs were not looked at."""

    @property
    def truncated(self) -> bool:
        return bool(self.frontier)

    def holds(self, node: Any) -> bool:
        return self.nodes.get(id(node)) is node

    def expanded(self, node: Any) -> bool:
        """Held, and its inputs walked (touching them is within the limits)."""
        return self.holds(node) and id(node) not in self.frontier

    def params_reached(self, *nodes: Any) -> list[int]:
        mask = 0
        for node in nodes:
            mask |= self.reach.get(id(node), 0)
        bits = bin(mask)[:1:-1]  # lowest bit first; linear, where shifting a 10,000-bit mask per bit is quadratic
        return [pid for pid, bit in zip(self.param_ids, bits, strict=False) if bit == "1"]


def walk(
    roots: Iterable[Any],
    is_parameter: Callable[[torch.Tensor], bool],
    user_code: Mapping[int, tuple[Any, str]],
    max_nodes: int = MAX_WALK_NODES,
) -> GraphView:
    """Post-order walk with an explicit stack (deep unrolled graphs overflow recursion).

    `user_code` maps id(node) to (node, what program code was attached to it while it was built: hooks,
    saved-tensor hooks); Python-defined nodes and hooks on parameters are found here. The cyclic garbage collector
    is paused meanwhile (and left as it was): each node read makes objects it tracks (the node's wrapper, the tuple
    of its inputs), and the collections they set off scanned the growing graph again and again.
    """
    with collector_paused():
        return _walk(roots, is_parameter, user_code, max_nodes)


def _walk(
    roots: Iterable[Any],
    is_parameter: Callable[[torch.Tensor], bool],
    user_code: Mapping[int, tuple[Any, str]],
    max_nodes: int,
) -> GraphView:
    """Kept lean (a million nodes a second): a node's inputs are read once, and the stack holds a node to expand,
    or the pair (node, its inputs) to finish once every input is done. A node whose inputs are all done when it is
    expanded is finished at once; the pairs on the stack are the path from a root to the node on top, so their count
    is its depth. A C++ op's node needs only its reach while no node below runs user code or has unknown reach."""
    finishing = _Finishing(GraphView(), is_parameter, user_code)
    view, plain, finish = finishing.view, finishing.plain, finishing.finish
    nodes, reach = view.nodes, view.reach
    noted = False  # some node has user code or unknown reach: each node finished since looks at its inputs
    key_of = id
    stack: list[Any] = [node for node in roots if node is not None]
    pop, push = stack.pop, stack.append
    depth = 0
    while stack:
        node = pop()
        if node.__class__ is tuple:  # (node, its inputs): the inputs are done
            depth -= 1
            node, inputs = node
            key = key_of(node)
            mask = 0
            for child, _ in inputs:
                if child is not None:
                    mask |= reach[key_of(child)]
        else:
            key = key_of(node)
            if key in nodes:
                continue
            nodes[key] = node
            if depth >= MAX_WALK_DEPTH or len(nodes) > max_nodes:
                finishing.stop(key)
                noted = True
                continue
            inputs = node.next_functions  # read once: each read wraps
            mask = 0
            waiting = False
            for child, _ in inputs:
                if child is not None:
                    done = reach.get(key_of(child))
                    if done is not None:
                        mask |= done
                        continue
                    if not waiting:  # below the inputs still to walk
                        push((node, inputs))
                        depth += 1
                        waiting = True
                    push(child)
            if waiting:
                continue
        if noted or node.__class__ not in plain or key in user_code:
            noted = finish(node, key, inputs, mask)
        else:
            reach[key] = mask
    return view


@dataclass
class _Finishing:
    """Finishing a node that may be more than a C++ op: its reach, and what its backward runs or may reach."""

    view: GraphView
    is_parameter: Callable[[torch.Tensor], bool]
    user_code: Mapping[int, tuple[Any, str]]
    plain: set[type] = field(default_factory=set)
    """Classes of C++ ops other than a leaf's accumulator."""
    _python: dict[type, tuple[str, bool]] = field(default_factory=dict)
    """Classes of Python backwards -> `_python_backward`'s pair."""
    _bit_of: dict[int, int] = field(default_factory=dict)

    def stop(self, key: int) -> None:
        """A node beyond the limits: its inputs are not read."""
        view = self.view
        view.frontier.add(key)
        view.reach[key] = 0
        view.user_code[key] = _TOO_DEEP
        view.reach_unknown.add(key)

    def finish(self, node: Any, key: int, inputs: tuple, mask: int) -> bool:
        """Notes the node (`mask`: its inputs' reach); whether any node so far has user code or unknown reach."""
        view, kind = self.view, node.__class__
        recorded = self.user_code.get(key)
        code = recorded[1] if recorded is not None and recorded[0] is node else None
        unknown = False
        if kind is _ACCUMULATE_GRAD:
            mask, code = self._leaf(node, mask, code)
        elif kind not in self.plain:
            python = self._python.get(kind) or _python_backward(node)
            if python is None:
                self.plain.add(kind)
            else:
                self._python[kind] = python
                code, unknown = code or python[0], python[1]
        for child, _ in inputs:
            if child is not None:
                code = code or view.user_code.get(id(child))
                unknown = unknown or id(child) in view.reach_unknown
        view.reach[key] = mask
        if code is not None:
            view.user_code[key] = code
        if unknown:
            view.reach_unknown.add(key)
        return bool(view.user_code or view.reach_unknown)

    def _leaf(self, node: Any, mask: int, code: str | None) -> tuple[int, str | None]:
        """A leaf's accumulator: a known parameter gets its bit (in the order the walk finishes them)."""
        variable = getattr(node, "variable", None)
        if not isinstance(variable, torch.Tensor) or not self.is_parameter(variable):
            return mask, code
        pid, view = id(variable), self.view
        if pid not in self._bit_of:
            self._bit_of[pid] = len(view.param_ids)
            view.param_ids.append(pid)
            view.leaves[pid] = (node, variable)
        if variable._backward_hooks:
            code = code or "a gradient hook on a parameter"
        return mask | 1 << self._bit_of[pid], code


@dataclass
class RawTerm:
    """An addend found by decomposing a root: a graph edge (node, output_nr), or a constant (node None)."""

    name: str
    scale: float
    node: Any = None
    output_nr: int = 0
    added_by: OpRecord | None = None
    operand_index: int = 0
    producer: OpRecord | None = None


Edge = tuple[int, int]
"""(id(node), output_nr): an edge of the graph, as a key."""


def decompose(
    root: Any,
    root_nr: int,
    record_for: Callable[[Any], OpRecord | None],
    root_name: str,
    user_name_for: Callable[[Any], str | None],
    expandable: Callable[[Any], bool],
    split_unrecorded: bool = False,
) -> list[RawTerm]:
    """Splits the root through +, -, negation and constant scaling into its addends (user-named tensors stay whole),
    in the order they are written.

    The split is linear: an edge reached along several paths is one addend whose scale is the sum of the paths'
    (`x = x + x` sixteen times is one addend of scale 65,536). Nodes are expanded newest first (autograd sequence
    numbers: a sum is always newer than its operands), so each exactly once. Only nodes the walk visited
    (`expandable`) are expanded. `split_unrecorded` (light mode, no op provenance) splits sums that provenance did
    not record by the graph alone: operands are named by position, and constant operands, which the graph cannot
    tell from a literal `+ 1e-8`, are left out.
    """
    root_key = (id(root), root_nr)
    pending: dict[Edge, RawTerm] = {root_key: RawTerm(root_name, 1.0, root, root_nr)}
    queue: list[tuple[int, int, Edge]] = [(-root._sequence_nr(), 0, root_key)]
    operands_of: dict[Edge, list[Edge | RawTerm]] = {}
    """An expanded edge -> its operands in order: edges, or constant addends."""
    addend_at: dict[Edge, RawTerm] = {}

    def reach(node: Any, nr: int, term: RawTerm) -> Edge:
        key = (id(node), nr)
        found = pending.get(key)
        if found is not None:
            found.scale += term.scale
        else:
            pending[key] = term
            heapq.heappush(queue, (-node._sequence_nr(), len(queue), key))
        return key

    while queue:
        _, _, key = heapq.heappop(queue)
        term = pending.pop(key)
        operands = _expand(term, record_for, user_name_for, expandable, split_unrecorded)
        if operands is None:
            if key in addend_at:  # reached again after it was settled (sequence numbers out of order): still linear
                addend_at[key].scale += term.scale
            else:
                addend_at[key] = term
            continue
        operands_of[key] = [
            reach(operand.node, operand.output_nr, operand) if operand.node is not None else operand
            for operand in operands
        ]
    return _in_written_order(root_key, operands_of, addend_at)


def _expand(
    term: RawTerm,
    record_for: Callable[[Any], OpRecord | None],
    user_name_for: Callable[[Any], str | None],
    expandable: Callable[[Any], bool],
    split_unrecorded: bool = False,
) -> list[RawTerm] | None:
    """The operands a sum or a constant scaling of a sum splits into (scaled); None: the term is an addend."""
    node, scale = term.node, term.scale
    kind = type(node).__name__
    record = record_for(node)
    user_name = user_name_for(node)
    term.producer = record
    if user_name is None and expandable(node) and record is None and split_unrecorded and kind in _SUMS:
        return _split_by_graph(term, node, kind)
    if user_name is not None or not expandable(node) or record is None:
        term.name = user_name or term.name
        return None
    if kind in _SUMS:
        texts = operand_texts(record.expression) or ("", "")
        signs = (1.0, -1.0 if kind == "SubBackward0" else 1.0)
        inputs = [
            (index, child, child_nr)
            for index, (child, child_nr) in enumerate(node.next_functions)
            if child is not None or record.constant_args.get(index) is not None  # Python scalars are harmless
        ]
        operands = []
        for index, child, child_nr in inputs:
            indexed = (
                term.name if len(inputs) == 1 else f"{term.name}[{index}]"
            )  # `0 + x` (sum()'s start) splits nothing
            label = record.constant_names.get(index) or (
                texts[index] if index < len(texts) and texts[index] else indexed
            )
            operands.append(RawTerm(label, scale * signs[index], child, child_nr, record, index))
        return operands
    if kind in _SCALINGS:
        live = [(child, child_nr) for child, child_nr in node.next_functions if child is not None]
        factor = -1.0 if kind == "NegBackward0" else record.factor
        if len(live) == 1 and factor:
            child, child_nr = live[0]
            if record_for(child) is not None and type(child).__name__ in _SUMS and expandable(child):
                return [RawTerm(term.name, scale * factor, child, child_nr, term.added_by, term.operand_index)]
    return None


def _split_by_graph(term: RawTerm, node: Any, kind: str) -> list[RawTerm]:
    """A sum's operands that carry a graph, named by position (`loss[0]`), without provenance."""
    signs = (1.0, -1.0 if kind == "SubBackward0" else 1.0)
    inputs = [(index, child, nr) for index, (child, nr) in enumerate(node.next_functions) if child is not None]
    if len(inputs) == 1:
        index, child, nr = inputs[0]
        return [RawTerm(term.name, term.scale * signs[index], child, nr, term.added_by, term.operand_index)]
    return [RawTerm(f"{term.name}[{index}]", term.scale * signs[index], child, nr) for index, child, nr in inputs]


def _in_written_order(
    root: Edge, operands_of: dict[Edge, list[Edge | RawTerm]], addend_at: dict[Edge, RawTerm]
) -> list[RawTerm]:
    """The addends left to right as the sums were written (an addend reached twice: where it is first met)."""
    found: list[RawTerm] = []
    seen: set[Edge] = set()
    stack: list[Edge | RawTerm] = [root]
    while stack:
        entry = stack.pop()
        if isinstance(entry, RawTerm):
            found.append(entry)
        elif entry not in seen:
            seen.add(entry)
            if entry in addend_at:
                found.append(addend_at[entry])
            else:
                stack.extend(reversed(operands_of.get(entry, [])))
    return found


@dataclass
class TermGroup:
    """One reported term: the addends that share a name and a source line (a loss summed in a loop), or, past the
    cap, all the remaining addends."""

    name: str
    location: Location | None
    parts: list[RawTerm]
    beyond_cap: bool = False

    @property
    def edges(self) -> list[RawTerm]:
        return [part for part in self.parts if part.node is not None]


def group_terms(raws: list[RawTerm], location_of: Callable[[RawTerm], Location | None], cap: int) -> list[TermGroup]:
    """Merges repeated addends (same name, same line, both constant or both not); beyond `cap` groups, merges the
    rest into one."""
    groups: dict[tuple, TermGroup] = {}
    for raw in raws:
        location = location_of(raw)
        key = (raw.name, location, raw.node is None)
        group = groups.get(key)
        if group is None:
            group = groups[key] = TermGroup(raw.name, location, [])
        group.parts.append(raw)
    found = list(groups.values())
    if len(found) <= cap:
        return found
    kept, rest = found[: max(cap - 1, 0)], found[max(cap - 1, 0) :]
    parts = [part for group in rest for part in group.parts]
    return [*kept, TermGroup(f"{len(rest)} more terms", rest[0].location, parts, beyond_cap=True)]
