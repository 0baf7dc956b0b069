"""One walk of an autograd graph: which parameters each node reaches, and the root's top-level terms."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from gradaudit.capture.provenance import OpRecord
from gradaudit.capture.source import operand_texts

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


@dataclass
class GraphView:
    """`reach[id(node)]` is a bitmask over `param_ids` (ids of leaf tensors that are known parameters)."""

    nodes: dict[int, Any] = field(default_factory=dict)
    reach: dict[int, int] = field(default_factory=dict)
    leaves: dict[int, tuple[Any, torch.Tensor]] = field(default_factory=dict)
    """id(parameter) -> (its AccumulateGrad node, the parameter)."""
    param_ids: list[int] = field(default_factory=list)

    def holds(self, node: Any) -> bool:
        return self.nodes.get(id(node)) is node

    def params_reached(self, node: Any) -> list[int]:
        mask = self.reach.get(id(node), 0)
        return [pid for bit, pid in enumerate(self.param_ids) if mask >> bit & 1]


def walk(roots: Iterable[Any], is_parameter: Callable[[torch.Tensor], bool]) -> GraphView:
    """Post-order walk with an explicit stack (deep unrolled graphs overflow recursion)."""
    view = GraphView()
    bit_of: dict[int, int] = {}
    stack = [(node, False) for node in roots if node is not None]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            mask = 0
            for child, _ in node.next_functions:
                if child is not None:
                    mask |= view.reach.get(id(child), 0)
            variable = getattr(node, "variable", None)
            if isinstance(variable, torch.Tensor) and is_parameter(variable):
                pid = id(variable)
                if pid not in bit_of:
                    bit_of[pid] = len(view.param_ids)
                    view.param_ids.append(pid)
                    view.leaves[pid] = (node, variable)
                mask |= 1 << bit_of[pid]
            view.reach[key] = mask
            continue
        if key in view.nodes:
            continue
        view.nodes[key] = node
        stack.append((node, True))
        stack.extend(
            (child, False) for child, _ in node.next_functions if child is not None and id(child) not in view.nodes
        )
    return view


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


def decompose(
    root: Any,
    record_for: Callable[[Any], OpRecord | None],
    root_name: str,
    user_name_for: Callable[[Any], str | None],
) -> list[RawTerm]:
    """Splits the root through +, -, negation and constant scaling into its addends (user-named tensors stay whole)."""
    terms: list[RawTerm] = []
    stack: list[tuple[Any, int, float, str, OpRecord | None, int]] = [(root, 0, 1.0, root_name, None, 0)]
    while stack:
        node, nr, scale, name, added_by, operand = stack.pop()
        kind = type(node).__name__
        record = record_for(node)
        user_name = user_name_for(node)
        if user_name is not None:
            terms.append(RawTerm(user_name, scale, node, nr, added_by, operand, record))
            continue
        if kind in _SUMS and record is not None:
            operands = operand_texts(record.expression) or ("", "")
            signs = (1.0, -1.0 if kind == "SubBackward0" else 1.0)
            inputs = list(node.next_functions)
            addends = [i for i, (child, _) in enumerate(inputs) if child is not None or record.constant_args.get(i)]
            for index in reversed(range(len(inputs))):
                child, child_nr = inputs[index]
                indexed = name if len(addends) == 1 else f"{name}[{index}]"  # `0 + x` (sum()'s start) splits nothing
                label = record.constant_names.get(index) or (
                    operands[index] if index < len(operands) and operands[index] else indexed
                )
                if child is None:
                    if record.constant_args.get(index) is not None:  # a tensor constant; Python scalars are harmless
                        terms.append(RawTerm(label, scale * signs[index], None, 0, record, index))
                    continue
                stack.append((child, child_nr, scale * signs[index], label, record, index))
            continue
        if kind in _SCALINGS and record is not None:
            live = [(child, child_nr) for child, child_nr in node.next_functions if child is not None]
            factor = -1.0 if kind == "NegBackward0" else (record.factor if record.factor is not None else None)
            if len(live) == 1 and factor is not None and factor != 0:
                child, child_nr = live[0]
                child_record = record_for(child)
                if child_record is not None and type(child).__name__ in _SUMS:
                    stack.append((child, child_nr, scale * factor, name, added_by, operand))
                    continue
        terms.append(RawTerm(name, scale, node, nr, added_by, operand, record))
    return terms
