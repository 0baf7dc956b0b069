"""Capture: the only part of gradaudit that touches live torch objects."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from types import TracebackType

import torch

from gradaudit.capture.graph import MAX_TERMS, MAX_WALK_NODES
from gradaudit.capture.recorder import InstallError, Recorder, StopAudit, group_norms
from gradaudit.capture.watching import FIRST_GAP
from gradaudit.config import Config
from gradaudit.findings import Declarations, Finding
from gradaudit.flowgraph import build_flow_graphs
from gradaudit.rules import known_patterns, options_by_rule, run_rules
from gradaudit.rules.ga301_exploding_chain import exploding
from gradaudit.trace import RAW_GRAPH_CAP, Trace, Watch, collector_paused

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
    `watch` lets the program run to its end instead of stopping it after the window (`iterations`, default 3): the
    window is audited in full, then one iteration in every K light (`watch=True`: K chosen as the run goes so that
    the samples add at most 10 % to its time; `watch=K`: fixed), and the iteration after a warning sign in full
    (`Recorder.watch`). Findings then carry the iteration they first appeared in and how often they recurred.
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
        declarations: Callable[[Trace], Declarations] | None = None,
        light: bool = False,
        max_nodes: int = MAX_WALK_NODES,
        watch: bool | int = False,
    ) -> None:
        if watch is not True and watch is not False and watch < 1:
            raise ValueError(f"watch=K needs K >= 1 (iterations from one light sample to the next), got {watch}")
        if watch is not False and iterations is None:
            iterations = Config.iterations
        self.watch = None if watch is False else Watch(FIRST_GAP, automatic=True) if watch is True else Watch(watch)
        self.program, self.arguments = program, list(arguments)
        self.declarations = declarations
        """Contracts and baseline statistics for the declared rules (GA4xx, baseline regressions), made per trace."""
        self.select, self.ignore = known_patterns("select", list(select)), known_patterns("ignore", list(ignore))
        self.options = options or {}
        chain_options = options_by_rule(self.options)["GA301"]  # a misspelt rule or threshold fails here, at once
        self.recorder = Recorder(
            iterations=iterations,
            term_grads=term_grads,
            window_cap=window_cap,
            max_terms=max_terms,
            light=light,
            max_nodes=max_nodes,
            watch=self.watch,
        )
        self.recorder.raw_graphs.cap = raw_graph_cap if raw_graph else 0
        self.trace: Trace | None = None
        self.findings: list[Finding] = []
        self.first_sample: Trace | None = None
        """Watching: the Trace of the first window (a full audit), which the report details."""
        self.watched: dict[tuple, Finding] = {}
        """Watching: each finding seen in any sample, with its first iteration and its count."""
        self._cut_sample_collected = False
        """Watching: the sample the program's end cut short is collected once (the report may be finished twice)."""
        self.recorder.chain_probe.exploding = functools.partial(exploding, options=chain_options)
        if self.watch is not None:
            self.recorder.on_sample = self._collect_sample

    def __enter__(self) -> Audit:
        self.recorder.install()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self.recorder.uninstall()
        self.finish()
        self.recorder.release_graphs()
        return exc_type is StopAudit

    @property
    def saw_backward(self) -> bool:
        return bool(self.recorder.backwards) or self.first_sample is not None

    def _collect_sample(self, trace: Trace, first_iteration: int) -> None:
        """A watched sample: its findings merged into those seen so far, its group norms into the history."""
        if self.first_sample is None:
            self.first_sample = trace
        for finding in run_rules(trace, self.select, self.ignore, self.options):
            key = (finding.rule, finding.subject, finding.location)
            seen = self.watched.get(key)
            if seen is None:
                self.watched[key] = dataclasses.replace(finding, first_iteration=first_iteration, occurrences=1)
            else:
                self.watched[key] = dataclasses.replace(seen, occurrences=seen.occurrences + 1)
        norms = group_norms(trace)
        history = self.watch.group_norms
        for group in norms.keys() - history.keys():
            history[group] = [None] * len(self.watch.iterations)
        for group, series in history.items():
            series.append(norms.get(group))
        self.watch.iterations.append(first_iteration)
        self.watch.full.append(not trace.light)
        self.watch.every_per_sample.append(self.watch.every)

    def finish(self, stopped_by: str | None = None, note: str = "") -> None:
        if self.watch is not None:
            self._finish_watch(stopped_by, note)
            return
        self.trace = self.recorder.build_trace(self.program, stopped_by, note)
        self.trace.arguments, self.trace.torch_version = self.arguments, str(torch.__version__)
        with collector_paused():
            self.trace.flow_graphs = build_flow_graphs(self.trace)
            declared = None if self.declarations is None else self.declarations(self.trace)
            self.findings = run_rules(self.trace, self.select, self.ignore, self.options, declared)

    def _finish_watch(self, stopped_by: str | None, note: str) -> None:
        """The report of a watched run: the first window's trace, every sample's findings, the norm history. A
        sample cut short (the program ended, Ctrl-C) counts as gathered so far."""
        recorder = self.recorder
        if recorder.backwards and not self._cut_sample_collected:
            self._cut_sample_collected = True
            self._collect_sample(recorder.build_trace(self.program), recorder.iterations_before_sample + 1)
        trace = self.first_sample or recorder.build_trace(self.program)
        trace.program = self.program
        trace.window = dataclasses.replace(
            trace.window,
            iterations=recorder.iterations_before_sample + recorder.iterations,
            stopped_by=stopped_by or recorder.stopped_by,
            note=note,
            internal_errors=recorder.internal_errors_total(),
        )
        trace.arguments, trace.torch_version, trace.watch = self.arguments, str(torch.__version__), self.watch
        trace.flow_graphs = build_flow_graphs(trace)
        self.trace = trace
        self.findings = [self._first_nonfinite_loss(f) for f in self.watched.values()]

    def _first_nonfinite_loss(self, finding: Finding) -> Finding:
        """A non-finite loss was first seen by the check idle iterations get, earlier than the sample reporting it."""
        first = self.recorder.first_nonfinite_loss
        if finding.rule == "GA305" and finding.subject == "loss" and first is not None:
            return dataclasses.replace(finding, first_iteration=min(first, finding.first_iteration or first))
        return finding

    def term(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Names a loss term so that findings speak of it by this name; returns the tensor unchanged."""
        self.recorder.name_term(name, tensor)
        return tensor
