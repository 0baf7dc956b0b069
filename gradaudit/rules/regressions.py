"""Pure helpers of the baseline regression rules (GA103, GA207, GA208, GA307): a run's statistics beside the
baseline's, and where a group's gradient shows up in the code."""

from __future__ import annotations

from gradaudit.findings import Declarations
from gradaudit.gate import GroupStats, Stats, trace_stats
from gradaudit.rules.flow import first_location
from gradaudit.trace import Location, Trace


def against_baseline(trace: Trace, declarations: Declarations) -> tuple[Stats, Stats] | None:
    """(the baseline's statistics, this run's); None without a baseline."""
    if declarations.baseline is None:
        return None
    return declarations.baseline, trace_stats(trace)


def group_pairs(trace: Trace, declarations: Declarations) -> list[tuple[str, GroupStats, GroupStats | None]]:
    """Each group of the baseline, sorted: (name, its baseline statistics, this run's or None); [] without one."""
    compared = against_baseline(trace, declarations)
    if compared is None:
        return []
    before, now = compared
    return [(group, old, now.groups.get(group)) for group, old in sorted(before.groups.items())]


def group_location(trace: Trace, group: str) -> Location | None:
    """Where the group first received gradient, else where an optimizer holding it was created."""
    owners = sorted({i for p in trace.groups().get(group, []) for i in p.owners})
    received = trace.derived(_first_received).get(group)
    return first_location([received, *(trace.optimizers[i].created_at for i in owners)])


def _first_received(trace: Trace) -> dict[str, Location]:
    """Each group's first accumulation with a location: one pass over the timeline for all groups (a finding per
    group would otherwise read the whole timeline each)."""
    group_of = {p.name: p.group for p in trace.parameters}
    found: dict[str, Location] = {}
    for event in trace.events:
        if event.kind == "accumulate" and event.location is not None and event.param in group_of:
            found.setdefault(group_of[event.param], event.location)
    return found
