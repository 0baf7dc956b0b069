"""Whole-run watching: when the next light sample is due, and a cheap sign, read in every sample, that a chain a full
audit found has started to amplify its gradient."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradaudit.capture.graph import GraphView
from gradaudit.capture.magnitude import norm
from gradaudit.capture.provenance import ProvenanceMode
from gradaudit.trace import Watch

FIRST_GAP = 10
"""Automatic pace: iterations from the first window to the first light sample, before any cost is measured."""
CHAIN_GROWTH = 10.0
"""A chain whose end-to-end gradient amplification grew by more than this since the last full audit gets one next
(as does one that crossed into `ChainProbe.exploding`)."""
_MAX_PROBED_CALLS = 10_000


class Pace:
    """Times the program's own iterations and the light samples, and sets `watch.every`: fixed when the user chose
    it, else the fewest iterations per light sample that keep the samples within `watch.budget` of the plain
    iterations' time (recomputed after each light sample, from the means so far). Wall time: what the user waits.

    A sample's cost is timed from its start to the end of the first plain iteration after it, less the plain time
    of the iterations in that span: what it leaves behind (taking its hooks off, the garbage it made) counts."""

    def __init__(self, watch: Watch, clock: Callable[[], float] = time.perf_counter) -> None:
        self.watch = watch
        self.clock = clock
        self._plain = [0.0, 0]
        self._added = [0.0, 0]
        self._mark: float | None = None
        self._sample_started: float | None = None
        self._timing: tuple[float, int] | None = None
        """A light sample still being timed: (when it started, the iterations it spanned)."""

    def plain_iteration_ended(self) -> None:
        """An unaudited iteration ended (the pace optimizer stepped while idle)."""
        now = self.clock()
        if self._timing is not None:
            started, iterations = self._timing
            self._timing = None
            if self._plain[1]:
                plain = self._plain[0] / self._plain[1]
                self._added[0] += max(now - started - (iterations + 1) * plain, 0.0)
                self._added[1] += 1
                self._choose(plain)
        elif self._mark is not None:
            self._plain[0] += now - self._mark
            self._plain[1] += 1
        self._mark = now

    def sample_started(self) -> None:
        self._sample_started = self.clock()

    def sample_ended(self, light: bool, iterations: int = 1) -> None:
        """A sample closed (its trace built, its rules run) after `iterations` iterations; a light one is timed on
        until the next plain iteration ends."""
        if light and self._sample_started is not None:
            self._timing = (self._sample_started, iterations)
        self._mark, self._sample_started = None, None

    def _choose(self, plain: float) -> None:
        watch = self.watch
        watch.iteration_seconds, watch.sample_seconds = plain, self._added[0] / self._added[1]
        if watch.automatic:  # halved at most per sample: one cheap-looking sample on a busy machine is noise
            wanted = watch.sample_seconds / (watch.budget * plain) if plain > 0 else math.inf
            watch.every = max(1, watch.every // 2, math.ceil(min(wanted, 1e9) - 1e-9))
        if plain > 0:
            watch.cost = 1.0 + watch.sample_seconds / (watch.every * plain)


class ChainProbe:
    """The end-to-end amplification of each chain module a full audit found, read in every later sample from two
    hooks per backward: the gradient at the output of its first and of its last call on the graph (the calls are
    taken to form the chain the full audit linked). A chain that an unrolled loop's training drifts into explosion
    grows its amplification gradually, while the loss gradient behind it may shrink: the group's gradient norm
    need not jump at all. GA301 itself needs the full audit's per-call measurement; this only says when to take
    one."""

    def __init__(self, mode: ProvenanceMode) -> None:
        self.mode = mode
        self.errors = 0
        """Errors inside the probe's hooks (counted with gradaudit's internal errors, never raised)."""
        self.modules: dict[int, nn.Module] = {}
        self._outputs: dict[int, list[list[tuple[Any, int]]]] = {}
        """Module id -> (graph node, output number) of each output of each of its calls since the last backward."""
        self._read: dict[int, tuple[float, int]] = {}
        """Module id -> the largest amplification read in this sample, and the calls it spanned."""
        self._reference: dict[int, tuple[float, int]] = {}
        """Module id -> the reading of the last full audit (or the first reading after it)."""
        self.exploding: Callable[[float, int], bool] = lambda amplification, calls: False
        """Whether a reading (amplification, calls) is an exploding chain (GA301's criterion, set by the audit)."""

    def learn(self, modules: list[nn.Module]) -> None:
        for module in modules:
            self.modules[id(module)] = module

    def leave(self, module: nn.Module, output: Any) -> None:
        """A module call returned: kept when the module is a known chain."""
        if self.modules.get(id(module)) is not module:
            return
        values = output if isinstance(output, (list, tuple)) else [output]
        nodes = [(v.grad_fn, v.output_nr) for v in values if isinstance(v, torch.Tensor) and v.grad_fn is not None]
        calls = self._outputs.setdefault(id(module), [])
        if nodes and len(calls) < _MAX_PROBED_CALLS:
            calls.append(nodes)

    def prepare(self, view: GraphView) -> tuple[list, Callable[[], None] | None]:
        """Hooks the first and last call of each known chain on this graph; returns (handles, what records)."""
        handles, pending = [], []
        for key, calls in self._outputs.items():
            on_graph = [call for call in calls if all(view.nodes.get(id(node)) is node for node, _ in call)]
            if len(on_graph) < 2:
                continue
            ends = ([0.0], [0.0])
            for call, total in zip((on_graph[0], on_graph[-1]), ends, strict=True):
                for node, number in call:
                    handles.append(node.register_prehook(functools.partial(self._add_squared_norm, total, number)))
            pending.append((key, len(on_graph), ends))
        self._outputs.clear()

        def record() -> None:
            for key, calls, (first, last) in pending:
                if last[0] > 0 and math.isfinite(first[0] / last[0]):
                    reading = (math.sqrt(first[0] / last[0]), calls)
                    self._read[key] = max(self._read.get(key, reading), reading)

        return handles, record if pending else None

    def warns(self, full: bool) -> bool:
        """Ends a sample: whether a chain turned exploding, or grew its amplification more than `CHAIN_GROWTH` times,
        since the last full audit (or, for a chain first read after it, since that first reading). A full sample
        sets the reference."""
        warns = False
        for key, reading in self._read.items():
            reference = self._reference.get(key)
            if full or reference is None:
                self._reference[key] = reading
            elif reading[0] > CHAIN_GROWTH * reference[0] or (
                self.exploding(*reading) and not self.exploding(*reference)
            ):
                warns = True
        self._read.clear()
        self._outputs.clear()
        return warns

    def _add_squared_norm(self, total: list[float], number: int, grad_outputs: tuple) -> None:
        try:
            grad = grad_outputs[number] if number < len(grad_outputs) else None
            if grad is not None:
                with self.mode.quiet(), torch.no_grad():
                    total[0] += norm(grad) ** 2
        except Exception:  # noqa: BLE001 - a hook inside autograd never raises into the program
            self.errors += 1
