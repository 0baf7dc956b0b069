"""Repeated module calls whose outputs feed the next call: unrolled samplers, RNN cells in a loop, fixed points.

Forward: every call of a module with trainable parameters is recorded with its predecessor, the latest call of
the same module that fed its inputs (tracked through every op, with or without gradient, by the provenance
mode's lineage). Backward: the chains whose calls are on the graph get node hooks that read the gradient at each
call's output and each call's own contribution to the module's parameters. The hooks only read; they are
removed as soon as the backward returns.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradaudit.capture.graph import GraphView
from gradaudit.capture.provenance import ProvenanceMode
from gradaudit.trace import ChainCall, Location

_MAX_CALLS = 50_000
_MAX_CHAIN_LENGTH = 10_000
_MAX_CHAINS_PER_MODULE = 4


@dataclass
class _Call:
    module: nn.Module
    index: int
    predecessor: int | None
    outputs: list[tuple[Any, int]]
    """(graph node, output_nr) of each output with history."""
    inputs: list[Any]
    """Graph nodes of the inputs with history."""
    sequence_floor: int
    """Nodes this call created have larger autograd sequence numbers."""
    clock: int
    location: Location | None = None


@dataclass
class _Observed:
    """What the hooks read during one backward for one call."""

    output_sq: float = 0.0
    output_seen: bool = False
    param_grads: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class ChainRecord:
    module: nn.Module
    backward: int
    location: Location | None
    calls: list[ChainCall]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _is_accumulator(node: Any) -> bool:
    return isinstance(getattr(node, "variable", None), torch.Tensor)


class ChainTracker:
    def __init__(self, mode: ProvenanceMode) -> None:
        self.mode = mode
        self.calls: OrderedDict[int, _Call] = OrderedDict()
        self._trainable: dict[int, tuple[nn.Module, bool]] = {}
        self._open: list[tuple[nn.Module, int] | None] = []
        self._next_index = 0
        self.chains: list[ChainRecord] = []

    # ---------------------------------------------------------------- forward

    def _has_trainable(self, module: nn.Module) -> bool:
        known = self._trainable.get(id(module))
        if known is None or known[0] is not module:
            known = self._trainable[id(module)] = (module, any(p.requires_grad for p in module.parameters()))
        return known[1]

    def enter(self, module: nn.Module) -> None:
        """Always pushes (None for modules without trainable parameters) so that `leave` stays balanced."""
        try:
            trainable = self._has_trainable(module)
        except Exception:  # noqa: BLE001 - a module whose parameters() fails is simply not tracked
            trainable = False
        self._open.append((module, self.mode.last_sequence_nr) if trainable else None)

    def leave(self, args: tuple, output: Any) -> None:
        opened = self._open.pop() if self._open else None
        if opened is not None:
            with self.mode.quiet():  # its reads of grad_fn and output_nr are not the program's ops
                self._record(*opened, args, output)

    def _record(self, module: nn.Module, sequence_floor: int, args: tuple, output: Any) -> None:
        key = id(module)
        outputs = list(_tensors(output))
        if not outputs:
            return
        previous = self.mode.lineage_of(list(_tensors(args))).get(key)
        index, self._next_index = self._next_index, self._next_index + 1
        for tensor in outputs:
            self.mode.lineage[tensor] = {
                **self.mode.lineage_of([tensor]),
                key: (previous[0] + 1 if previous else 1, index),
            }
        call = _Call(
            module,
            index,
            previous[1] if previous else None,
            [(t.grad_fn, t.output_nr) for t in outputs if t.grad_fn is not None],
            [t.grad_fn for t in _tensors(args) if t.grad_fn is not None],
            sequence_floor,
            self.mode.clock,
            self.mode.user_site()[0] if previous else None,
        )
        self.calls[index] = call
        while len(self.calls) > _MAX_CALLS:
            self.calls.popitem(last=False)

    def forget_before(self, clock: int) -> None:
        while self.calls and next(iter(self.calls.values())).clock < clock:
            self.calls.popitem(last=False)

    # ---------------------------------------------------------------- backward

    def prepare(self, view: GraphView, backward: int) -> tuple[list, Any]:
        """Finds the chains on this graph and hooks them; returns (hook handles, a callable that records them)."""
        chains = self._chains_on(view)
        if not chains:
            return [], None
        observed: dict[int, _Observed] = {}
        handles = []
        for module, calls in chains:
            params = {id(p) for p in module.parameters()}
            for call in calls:
                if self._carried(call, view):
                    observed[call.index] = _Observed()
                    handles += self._hook_call(call, params, observed[call.index])

        def record() -> None:
            with self.mode.quiet():
                for module, calls in chains:
                    self.chains.append(self._chain_record(module, calls, observed, backward))

        return handles, record

    def _carried(self, call: _Call, view: GraphView) -> bool:
        return any(view.nodes.get(id(node)) is node for node, _ in call.outputs)

    def _chains_on(self, view: GraphView) -> list[tuple[nn.Module, list[_Call]]]:
        on_graph = [c for c in self.calls.values() if self._carried(c, view)]
        fed = {c.predecessor for c in on_graph}
        by_module: dict[int, list[list[_Call]]] = {}
        for last in on_graph:
            if last.index in fed:
                continue
            path = [last]
            while path[-1].predecessor is not None and len(path) < _MAX_CHAIN_LENGTH:
                previous = self.calls.get(path[-1].predecessor)
                if previous is None:
                    break
                path.append(previous)
            if len(path) >= 2:
                by_module.setdefault(id(last.module), []).append(path[::-1])
        chains = [
            (paths[0][0].module, path)
            for paths in by_module.values()
            for path in sorted(paths, key=len, reverse=True)[:_MAX_CHAINS_PER_MODULE]
        ]
        outer = {id(m) for m, _ in chains}
        nested = {id(sub) for module, _ in chains for sub in module.modules() if sub is not module and id(sub) in outer}
        return [(module, path) for module, path in chains if id(module) not in nested]

    def _hook_call(self, call: _Call, params: set[int], observed: _Observed) -> list:
        handles = []
        by_node: dict[int, tuple[Any, list[int]]] = {}
        for node, output_nr in call.outputs:
            by_node.setdefault(id(node), (node, []))[1].append(output_nr)
        for node, numbers in by_node.values():
            handles.append(node.register_prehook(functools.partial(self._read_outputs, observed, numbers)))
        for node, edges in self._param_edges(call, params).items():
            handles.append(node.register_hook(functools.partial(self._read_param_edges, observed, edges)))
        return handles

    def _read_outputs(self, observed: _Observed, numbers: list[int], grad_outputs: tuple) -> None:
        with self.mode.quiet(), torch.no_grad():
            for number in numbers:
                grad = grad_outputs[number] if number < len(grad_outputs) else None
                if grad is not None:
                    observed.output_sq += float(grad.double().pow(2).sum())
            observed.output_seen = True

    def _read_param_edges(
        self, observed: _Observed, edges: list[tuple[int, int]], grad_inputs: tuple, grad_outputs: tuple
    ) -> None:
        with self.mode.quiet(), torch.no_grad():
            for position, param in edges:
                grad = grad_inputs[position]
                if grad is None:
                    continue
                grad = grad.detach().reshape(-1)
                total = observed.param_grads.get(param)  # kept in double: one copy, the engine's buffer is reused
                observed.param_grads[param] = grad.to(torch.float64, copy=True) if total is None else total + grad

    def _param_edges(self, call: _Call, params: set[int]) -> dict[Any, list[tuple[int, int]]]:
        """Nodes this call created that feed one of the module's parameters: node -> [(edge index, id(param))]."""
        edges: dict[Any, list[tuple[int, int]]] = {}
        seen: set[int] = set()
        stack = [node for node, _ in call.outputs]
        while stack:
            node = stack.pop()
            if id(node) in seen or _is_accumulator(node) or node._sequence_nr() <= call.sequence_floor:
                continue
            seen.add(id(node))
            for position, (child, _) in enumerate(node.next_functions):
                if child is None:
                    continue
                if _is_accumulator(child):
                    if id(child.variable) in params:
                        edges.setdefault(node, []).append((position, id(child.variable)))
                else:
                    stack.append(child)
        return edges

    def _linked(self, earlier: _Call, later: _Call) -> bool:
        """Whether gradient flows from `later`'s inputs back into `earlier`'s outputs (nodes older than the target
        cannot lead to it: a node's inputs are always created before it)."""
        targets = {id(node) for node, _ in earlier.outputs}
        if not targets:
            return False
        floor = min(node._sequence_nr() for node, _ in earlier.outputs)
        seen: set[int] = set()
        stack = list(later.inputs)
        while stack:
            node = stack.pop()
            if id(node) in targets:
                return True
            if id(node) in seen or _is_accumulator(node) or node._sequence_nr() < floor:
                continue
            seen.add(id(node))
            stack.extend(child for child, _ in node.next_functions if child is not None)
        return False

    def _chain_record(
        self, module: nn.Module, calls: list[_Call], observed: dict[int, _Observed], backward: int
    ) -> ChainRecord:
        records = []
        for position, call in enumerate(calls):
            seen = observed.get(call.index)
            carried = seen is not None
            following = calls[position + 1] if position + 1 < len(calls) else None
            linked = carried and following is not None and following.index in observed and self._linked(call, following)
            output_norm = math.sqrt(seen.output_sq) if seen is not None and seen.output_seen else None
            param_norm = (
                math.sqrt(sum(float(g.double().pow(2).sum()) for g in seen.param_grads.values()))
                if seen is not None and seen.param_grads
                else None
            )
            records.append(ChainCall(carried, linked, output_norm, param_norm))
        return ChainRecord(module, backward, calls[-1].location, records)
