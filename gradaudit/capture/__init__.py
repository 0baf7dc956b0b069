"""Capture: the only part of gradaudit that touches live torch objects."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from types import TracebackType

import torch

from gradaudit.capture.graph import MAX_TERMS
from gradaudit.capture.recorder import Recorder, StopAudit
from gradaudit.findings import Finding
from gradaudit.rules import options_by_rule, run_rules
from gradaudit.trace import Trace

__all__ = ["Audit", "StopAudit"]


class Audit:
    """`with Audit() as a: train_step()` records every backward, optimizer step and gradient wipe inside.

    `iterations` (CLI mode) ends the window from inside the program by raising `StopAudit` once that many
    iterations have completed and every optimizer seen has stepped (or `window_cap` more iterations passed).
    `max_terms` caps the loss terms reported per backward root; the addends beyond it are merged into one term.
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
        max_terms: int = MAX_TERMS,
    ) -> None:
        self.program = program
        self.select, self.ignore, self.options = select, ignore, options or {}
        options_by_rule(self.options)  # a misspelt threshold fails here, before the program runs
        self.recorder = Recorder(
            iterations=iterations, term_grads=term_grads, window_cap=window_cap, max_terms=max_terms
        )
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
        self.findings = run_rules(self.trace, self.select, self.ignore, self.options)

    def term(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Names a loss term so that findings speak of it by this name; returns the tensor unchanged."""
        self.recorder.name_term(name, tensor)
        return tensor
