"""Capture: the only part of gradaudit that touches live torch objects."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from types import TracebackType

import torch

from gradaudit.capture.graph import MAX_TERMS, MAX_WALK_NODES
from gradaudit.capture.recorder import InstallError, Recorder, StopAudit
from gradaudit.findings import Finding
from gradaudit.flowgraph import build_flow_graphs
from gradaudit.rules import options_by_rule, run_rules
from gradaudit.trace import RAW_GRAPH_CAP, Trace

__all__ = ["Audit", "InstallError", "StopAudit"]


class Audit:
    """`with Audit() as a: train_step()` records every backward, optimizer step and gradient wipe inside.

    `iterations` (CLI mode) ends the window from inside the program by raising `StopAudit` at its next forward,
    backward, zero_grad or optimizer step once that many iterations have completed and every optimizer seen has
    stepped (or the window was capped: `Recorder` says how iterations are counted). Entering installs every patch
    and hook or, raising `InstallError`, none.
    `raw_graph` keeps the autograd graph of the first backward at each location for the HTML report (graphs of
    more than `raw_graph_cap` nodes as their node count only).
    `max_terms` caps the loss terms reported per backward root; the addends beyond it are merged into one term.
    `light` keeps lifecycle, membership and reachability and skips op provenance, per-term gradients, chains and
    numerics (`Recorder.light`).
    `max_nodes` caps the autograd nodes walked per backward (beyond it the graph is unknown, and the report says so).
    """

    def __init__(
        self,
        iterations: int | None = None,
        term_grads: bool = True,
        select: Collection[str] = (),
        ignore: Collection[str] = (),
        options: Mapping[str, float] | None = None,
        program: str = "<python>",
        window_cap: int = 20,
        arguments: Sequence[str] = (),
        raw_graph: bool = False,
        raw_graph_cap: int = RAW_GRAPH_CAP,
        max_terms: int = MAX_TERMS,
        light: bool = False,
        max_nodes: int = MAX_WALK_NODES,
    ) -> None:
        self.program, self.arguments = program, list(arguments)
        self.select, self.ignore, self.options = select, ignore, options or {}
        options_by_rule(self.options)  # a misspelt threshold fails here, before the program runs
        self.recorder = Recorder(
            iterations=iterations,
            term_grads=term_grads,
            window_cap=window_cap,
            max_terms=max_terms,
            light=light,
            max_nodes=max_nodes,
        )
        self.recorder.raw_graphs.cap = raw_graph_cap if raw_graph else 0
        self.trace: Trace | None = None
        self.findings: list[Finding] = []

    def __enter__(self) -> Audit:
        self.recorder.install()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self.recorder.uninstall()
        self.finish()
        return exc_type is StopAudit

    def finish(self, stopped_by: str | None = None, note: str = "") -> None:
        self.trace = self.recorder.build_trace(self.program, stopped_by, note)
        self.trace.arguments, self.trace.torch_version = self.arguments, str(torch.__version__)
        self.trace.flow_graphs = build_flow_graphs(self.trace)
        self.findings = run_rules(self.trace, self.select, self.ignore, self.options)

    def term(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Names a loss term so that findings speak of it by this name; returns the tensor unchanged."""
        self.recorder.name_term(name, tensor)
        return tensor
