"""The Trace: plain, JSON-able data about what one audited window of training did to every gradient.

Capture writes it, rules read it. Nothing here imports torch, so a saved trace can be re-linted anywhere.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

TRACE_VERSION = 1


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
