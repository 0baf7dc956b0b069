"""Pure helper shared by the per-op rules (GA301-GA304): one verdict per call site across the window's passes."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from gradaudit.trace import by_site


class PerBackward(Protocol):
    backward: int


Record = TypeVar("Record", bound=PerBackward)


@dataclass
class Site(Generic[Record]):
    """The worst record of one call site over the window, and how often the site crossed a threshold."""

    worst: Record
    crossed: int
    """Backward passes in which this site crossed."""
    seen: int
    """Backward passes in which this site was recorded."""

    def over_threshold(self) -> str:
        """`in the worst of 3 backward passes (2 over the threshold)`."""
        if self.seen == 1:
            return "in the one backward pass seen"
        return f"in the worst of {self.seen} backward passes ({self.crossed} over the threshold)"


def worst_per_site(
    records: Iterable[Record],
    site: Callable[[Record], Hashable],
    crosses: Callable[[Record], bool],
    badness: Callable[[Record], float | tuple],
) -> list[Site[Record]]:
    """Groups the records by call site across backward passes; keeps the sites where any crossed."""
    verdicts = []
    for records_here in by_site(records, site):
        crossing = [r for r in records_here if crosses(r)]
        if crossing:
            passes = len({r.backward for r in crossing}), len({r.backward for r in records_here})
            verdicts.append(Site(max(crossing, key=badness), *passes))
    return verdicts
