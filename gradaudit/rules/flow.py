"""Pure helpers shared by the rules: replaying the gradient-event timeline, and speaking of parameter groups."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gradaudit.trace import GradEvent, Location, Parameter, Trace


@dataclass
class Contribution:
    """What backward `backward` added to one parameter's .grad, and what became of it."""

    param: str
    backward: int
    norm: float
    accumulated: GradEvent
    applied_by: list[GradEvent] = field(default_factory=list)
    wiped_by: GradEvent | None = None


def contributions(trace: Trace) -> list[Contribution]:
    """Replays the timeline: every later step applies what is pending; a wipe ends it. Replayed once per Trace."""
    return trace.derived(_replay)


def _replay(trace: Trace) -> list[Contribution]:
    pending: dict[str, list[Contribution]] = {}
    found: list[Contribution] = []
    for event in sorted(trace.events, key=lambda e: e.seq):
        if event.kind == "accumulate" and event.backward is not None:
            contribution = Contribution(event.param, event.backward, event.norm or 0.0, event)
            pending.setdefault(event.param, []).append(contribution)
            found.append(contribution)
        elif event.kind == "apply":
            for contribution in pending.get(event.param, []):
                contribution.applied_by.append(event)
        elif event.kind == "wipe":
            for contribution in pending.pop(event.param, []):
                contribution.wiped_by = event
    return found


_LISTED_TENSORS = 5


def describe_group(trace: Trace, group: str, members: Iterable[str] | None = None, listed: bool = False) -> str:
    """`obs_encoder (12 tensors)`, or the one parameter's name; `listed`: which tensors, the first few by name
    (`classifier (2 tensors: classifier.weight, classifier.bias)`, `... and 12 more`)."""
    names = list(members) if members is not None else [p.name for p in trace.groups().get(group, [])]
    if len(names) == 1 and names[0] == group:
        return group
    count = f"{len(names)} tensor{'s' if len(names) != 1 else ''}"
    if not listed:
        return f"{group} ({count})"
    shown = names if len(names) <= _LISTED_TENSORS + 1 else names[:_LISTED_TENSORS]
    more = f" and {len(names) - len(shown)} more" if len(shown) < len(names) else ""
    return f"{group} ({count}: {', '.join(shown)}{more})"


def by_group(trace: Trace, params: Iterable[Parameter]) -> dict[str, list[Parameter]]:
    grouped: dict[str, list[Parameter]] = {}
    for p in params:
        grouped.setdefault(p.group, []).append(p)
    return grouped


def optimizer_text(trace: Trace, index: int) -> str:
    optimizer = trace.optimizers[index]
    where = f" created at {optimizer.created_at}" if optimizer.created_at else ""
    return f"{optimizer.kind} '{optimizer.name}'{where}"


def backward_text(trace: Trace, index: int) -> str:
    backward = trace.backwards[index]
    return f"the backward at {backward.location}" if backward.location else f"backward #{index}"


def first_location(locations: Iterable[Location | None]) -> Location | None:
    return next((loc for loc in locations if loc is not None), None)
