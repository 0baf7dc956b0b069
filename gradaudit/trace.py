"""The Trace: plain, JSON-able data about what one audited window of training did to every gradient.

Capture writes it, rules read it. Nothing here imports torch, so a saved trace can be re-linted anywhere.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

TRACE_VERSION = 2


class TraceError(ValueError):
    """A trace file that cannot be read back."""


@dataclass(frozen=True)
class Location:
    file: str
    line: int
    function: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Parameter:
    """One trainable tensor. `group` is the module call it belongs to (the unit findings speak of)."""

    name: str
    group: str
    shape: list[int]
    requires_grad: bool
    owners: list[int] = field(default_factory=list)
    """Indices of the optimizers whose param_groups hold it."""


@dataclass
class Optimizer:
    index: int
    name: str
    kind: str
    created_at: Location | None
    steps: int = 0


@dataclass
class Break:
    """Where a constant entered the loss: the op that cut (or never had) an autograd history."""

    kind: str
    """detach | no_grad | from_data | item | literal | unknown"""
    op: str
    location: Location | None
    expression: str = ""


@dataclass
class Term:
    """An addend of a backward root's top-level sum."""

    name: str
    location: Location | None
    """The line that added it to the loss."""
    constant: bool
    """No autograd path at all (a tensor without grad_fn)."""
    groups_reached: list[str]
    grad_norms: dict[str, float] = field(default_factory=dict)
    """Gradient norm of this term alone, per parameter group; empty when not measured."""
    coefficient: float | None = None
    """The constant factor the term was multiplied by, where it was one."""
    break_point: Break | None = None
    named_by_user: bool = False
    addends: int = 1
    """How many addends it stands for: repeated ones (same name, same line, e.g. a loss summed in a loop) are one
    term, and so are all the addends beyond the cap on terms (`more terms`)."""
    grads_skipped: str = ""
    """Why its own gradient was not measured (a backward through it runs program code that must run only once)."""
    reach_unknown: bool = False
    """Its graph holds a node whose backward may reach parameters its edges do not show (reentrant checkpointing, a
    custom autograd.Function), or the walk stopped in it: `groups_reached` may be incomplete."""


@dataclass
class Backward:
    index: int
    location: Location | None
    accumulates: bool
    """False for torch.autograd.grad, which returns gradients instead of accumulating them."""
    loss_finite: bool
    terms: list[Term]
    groups_reached: list[str]
    upstream: dict[str, list[str]] = field(default_factory=dict)
    """For each module group called in this graph: the groups whose outputs feed its inputs."""
    walk_truncated: bool = False
    """The graph was deeper or larger than the walk's limits: reach below the limit is unknown."""
    reach_unknown: bool = False
    """Some of what it reaches is unknown to the walk; the accumulated gradients were watched on every known
    parameter instead."""
    terms_beyond_cap: int = 0
    """Addends beyond the cap on terms, merged into its last term."""

    def term_matrix(self) -> tuple[list[str], dict[str, dict[str, float]]]:
        """Term x parameter-group gradient norms: (the groups, as columns; term name -> group -> norm)."""
        groups = sorted({g for term in self.terms for g in term.grad_norms})
        return groups, {term.name: dict(term.grad_norms) for term in self.terms if term.grad_norms}


@dataclass
class GradEvent:
    """One thing that happened to a parameter's .grad, in program order (`seq`)."""

    seq: int
    kind: str
    """accumulate | wipe | apply"""
    param: str
    backward: int | None = None
    optimizer: int | None = None
    norm: float | None = None
    finite: bool = True
    by: str = ""
    """What did it, in words: 'critic_opt.zero_grad()', 'set to None', 'manual update'."""
    location: Location | None = None


@dataclass
class RegressionTarget:
    """A regression loss whose target argument was seen, and what the target carried."""

    op: str
    location: Location | None
    target_expression: str
    groups_reached: list[str]


@dataclass
class ChainCall:
    """One call of a repeatedly applied module, in forward order."""

    carried: bool
    """Its output was part of this backward's graph (False: computed under no_grad or detached away)."""
    linked: bool
    """Gradient flows from this call's output into the next call's input (always False for the last call)."""
    output_norm: float | None = None
    """Norm of the gradient at the call's output during the backward, read before any clipping."""
    param_norm: float | None = None
    """Norm of this call's own contribution to the module's parameter gradient."""


@dataclass
class Chain:
    """A module whose output feeds its own next call (unrolled sampler, RNN cell, fixed-point loop), per backward."""

    module: str
    backward: int
    location: Location | None
    """The call site of the last call."""
    calls: list[ChainCall]

    def carried_run(self) -> list[int]:
        """Indices of the longest run of gradient-linked calls: the steps the gradient really travels through."""
        best: list[int] = []
        run: list[int] = []
        for index, call in enumerate(self.calls):
            if call.carried:
                run.append(index)
                if len(run) > len(best):
                    best = list(run)
            if not (call.carried and call.linked):
                run = []
        return best

    def step_amplifications(self) -> list[float]:
        """Gradient norm at call k over that at call k+1 along the run (backward travels from the last call)."""
        norms = [self.calls[i].output_norm for i in self.carried_run()]
        return [a / b for a, b in zip(norms[:-1], norms[1:], strict=True) if a is not None and b]

    def amplification(self) -> float | None:
        """End-to-end: gradient norm at the first gradient-carrying call's output over that at the last one's."""
        run = self.carried_run()
        if len(run) < 2:
            return None
        first, last = self.calls[run[0]].output_norm, self.calls[run[-1]].output_norm
        return first / last if first is not None and last else None

    def per_step(self) -> float | None:
        """Geometric mean of the per-step amplification."""
        total, steps = self.amplification(), len(self.carried_run()) - 1
        return total ** (1 / steps) if total is not None and total > 0 and steps > 0 else None

    def param_shares(self) -> list[float | None]:
        """Each call's share of the gradient reaching the module's parameters (contribution norms, summing to 1)."""
        norms = [c.param_norm or 0.0 for c in self.calls]
        total = sum(norms)
        return [n / total if total and c.carried else None for n, c in zip(norms, self.calls, strict=True)]


@dataclass
class Clamp:
    """A clamp-like op on a backward's graph: elements outside its bounds get zero gradient."""

    op: str
    location: Location | None
    expression: str
    backward: int
    lower: float | None
    upper: float | None
    """Bounds; a tensor bound is recorded as its smallest (lower) or largest (upper) element."""
    elements: int
    below: float
    """Fraction of elements under the lower bound."""
    above: float
    """Fraction of elements over the upper bound."""
    gate: bool = False
    """A ReLU-style gate (relu, relu6): listed for reference; an inactive hinge is often a satisfied constraint."""

    @property
    def saturated(self) -> float:
        return self.below + self.above


@dataclass
class Exp:
    """An exp on a backward's graph: its gradient is its output, so large outputs mean huge gradients."""

    op: str
    location: Location | None
    expression: str
    backward: int
    dtype: str
    max_input: float
    """Largest finite input element."""
    max_output: float | None
    """Largest finite output element (None when all outputs overflowed)."""
    overflow: int
    """Elements whose finite input gave an infinite output."""
    elements: int


@dataclass
class NonFiniteOrigin:
    """The first op, in program order, that turned finite inputs into a NaN or Inf (forward pass)."""

    op: str
    location: Location | None
    expression: str
    backward: int
    kind: str
    """nan | inf"""


@dataclass
class Window:
    iterations: int
    stopped_by: str
    """iterations | program-end | cap | exception | context-exit"""
    note: str = ""


@dataclass
class Trace:
    program: str
    window: Window
    parameters: list[Parameter] = field(default_factory=list)
    optimizers: list[Optimizer] = field(default_factory=list)
    backwards: list[Backward] = field(default_factory=list)
    events: list[GradEvent] = field(default_factory=list)
    regression_targets: list[RegressionTarget] = field(default_factory=list)
    chains: list[Chain] = field(default_factory=list)
    clamps: list[Clamp] = field(default_factory=list)
    exps: list[Exp] = field(default_factory=list)
    nonfinite_origins: list[NonFiniteOrigin] = field(default_factory=list)
    version: int = TRACE_VERSION

    def parameter(self, name: str) -> Parameter:
        return self._parameters_by_name()[name]

    def _parameters_by_name(self) -> dict[str, Parameter]:
        return {p.name: p for p in self.parameters}

    def groups(self) -> dict[str, list[Parameter]]:
        grouped: dict[str, list[Parameter]] = {}
        for p in self.parameters:
            grouped.setdefault(p.group, []).append(p)
        return grouped

    def optimizer_label(self, index: int) -> str:
        return self.optimizers[index].name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise TraceError(f"no trace file at {path}") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TraceError(f"{path} is not a readable trace JSON file ({exc})") from exc
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "trace") -> Trace:
        if not isinstance(raw, dict) or raw.get("version") != TRACE_VERSION:
            found = raw.get("version") if isinstance(raw, dict) else type(raw).__name__
            raise TraceError(f"{source} is not a gradaudit trace of version {TRACE_VERSION} (found {found!r})")
        try:
            return _build(cls, raw)
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise TraceError(f"{source} is a damaged gradaudit trace ({exc})") from exc


T = TypeVar("T")


def by_site(items: Iterable[T], site: Callable[[T], Hashable]) -> list[list[T]]:
    """The items grouped by call site (across backward passes), in order of first appearance."""
    grouped: dict[Hashable, list[T]] = {}
    for item in items:
        grouped.setdefault(site(item), []).append(item)
    return list(grouped.values())


def _build(kind: Any, raw: Any) -> Any:
    """Rebuilds dataclasses from `asdict` output, following the type hints."""
    origin = get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(raw, dict):
            raise TypeError(f"{kind.__name__} expects an object, got {type(raw).__name__}")
        hints = get_type_hints(kind)
        return kind(**{f.name: _build(hints[f.name], raw[f.name]) for f in dataclasses.fields(kind) if f.name in raw})
    if origin is list:
        (item,) = get_args(kind)
        return [_build(item, x) for x in raw]
    if origin is dict:
        _, value = get_args(kind)
        return {k: _build(value, v) for k, v in raw.items()}
    args = get_args(kind)
    if args and type(None) in args:  # Optional[X]
        if raw is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _build(inner, raw)
    if kind in (int, float, str, bool) and not isinstance(raw, kind) and not (kind is float and isinstance(raw, int)):
        raise TypeError(f"expected {kind.__name__}, got {raw!r}")
    return raw
