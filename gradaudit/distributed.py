"""Runs started by torchrun: each rank is audited on its own; rank 0 reports every rank's findings, with the ranks
each occurred on. Ranks meet through files in a folder named after the run, never through a collective (the
audit must not add or reorder one). A rank that fails reports on its own: the others may never get to report.
A backward that leaves DistributedDataParallel's reduction unfinished is said on that rank's stderr at once,
before the error DDP raises at its next forward."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from torch.nn.parallel import DistributedDataParallel

from gradaudit.findings import Finding, Severity
from gradaudit.report.console import printable
from gradaudit.trace import Location

if TYPE_CHECKING:
    from gradaudit.capture.recorder import Recorder

WAIT_FOR_RANKS_S = 30.0
"""How long rank 0 waits for the other ranks' findings before it reports those it has."""
NAMES_SHOWN = 3
"""Parameters named in the notice of an unfinished reduction; the rest are counted."""


@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    folder: Path


def current_ranks() -> Ranks | None:
    """This process's rank under torchrun (RANK, WORLD_SIZE and the run's id in the environment), else None."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    if world < 2:
        return None
    run = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT", "run")
    return Ranks(rank, world, Path(tempfile.gettempdir()) / f"gradaudit-{os.getuid()}-{run}")


def share(ranks: Ranks, findings: list[Finding]) -> None:
    """A rank other than 0 leaves its findings for rank 0 (written whole, then renamed: never read half-written)."""
    ranks.folder.mkdir(parents=True, exist_ok=True)
    target = ranks.folder / f"rank{ranks.rank}.json"
    partial = target.with_suffix(".partial")
    partial.write_text(json.dumps([finding.to_dict() for finding in findings]))
    partial.replace(target)


def merged(ranks: Ranks, own: list[Finding]) -> tuple[list[Finding], list[int]]:
    """Rank 0: its findings and every other rank's, one per (rule, subject, location), each message saying the
    ranks it occurred on; and the ranks whose findings did not arrive in time."""
    by_rank = {0: own}
    deadline = time.monotonic() + WAIT_FOR_RANKS_S
    pending = set(range(1, ranks.world))
    while pending and time.monotonic() < deadline:
        for rank in sorted(pending):
            path = ranks.folder / f"rank{rank}.json"
            if path.exists():
                by_rank[rank] = [_finding(raw) for raw in json.loads(path.read_text())]
                path.unlink()
                pending.discard(rank)
        if pending:
            time.sleep(0.05)
    with contextlib.suppress(OSError):  # left when a late rank still writes into it
        ranks.folder.rmdir()
    seen: dict[tuple, tuple[Finding, list[int]]] = {}
    for rank, findings in sorted(by_rank.items()):
        for finding in findings:
            where = finding.location
            key = (finding.rule, finding.subject, where and (where.file, where.line))  # JSON keeps no function name
            seen.setdefault(key, (finding, []))[1].append(rank)
    return [_on_ranks(finding, on) for finding, on in seen.values()], sorted(pending)


def alone(ranks: Ranks, own: list[Finding]) -> list[Finding]:
    """A rank that failed and reports by itself: its findings, each message saying the rank."""
    return [_on_ranks(finding, [ranks.rank]) for finding in own]


def _on_ranks(finding: Finding, ranks: list[int]) -> Finding:
    listed = ", ".join(map(str, ranks))
    return dataclasses.replace(finding, message=f"{finding.message} (rank{'s' if len(ranks) > 1 else ''} {listed})")


def _finding(raw: dict) -> Finding:
    location = raw["location"]
    return Finding(
        raw["rule"],
        raw["name"],
        Severity[raw["severity"]],
        raw["subject"],
        raw["message"],
        Location(location["file"], location["line"]) if location else None,
        raw["hint"],
        raw.get("first_iteration"),
        raw.get("occurrences", 0),
    )


class UnfinishedReduction:
    """Tells, on this rank's stderr and as soon as the backward has run, that DistributedDataParallel will raise
    "Expected to have finished reduction in the prior iteration" at its next forward, and names the parameters
    that error only numbers (`Recorder.on_backward`; it says it once per DDP module).

    After a forward that prepares it for backward (grad enabled, outside `no_sync`), DDP's reducer waits for a
    gradient hook of every parameter it holds (those requiring grad when it was built, less
    `_ddp_params_and_buffers_to_ignore`); a hook fires when a backward reaches the parameter, through the DDP
    output or not. Once all have fired it reduces and starts over; if some fired and others not, the next forward
    raises. Only without find_unused_parameters (which marks the parameters the outputs cannot reach itself) and
    without static_graph (which learns the unused ones in its first iteration). What the backwards reached adds up
    until every parameter is in; a later backward may still complete it, which the notice allows for. A backward
    whose reach is unknown forgets what earlier ones reached: nothing is said that is not known. Forwards are not
    seen here, so a backward that DDP ignores (one after it reduced and before its next forward) is counted."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.held: dict[int, tuple[DistributedDataParallel, dict[int, str]]] = {}
        """id(DDP module) -> (the module, its reducer's parameters: id -> name within the wrapped module)."""
        self.reached: dict[int, set[int]] = {}
        self.told: set[int] = set()

    def __call__(self, reached: list[int] | None, location: Location | None) -> None:
        if reached is None:
            self.reached.clear()
            return
        waiting = self._waiting_for_every_gradient()
        now = set(reached) if waiting else set()
        for ddp, group in waiting:
            held = self._reducer_parameters(ddp)
            before = self.reached.pop(id(ddp), None)
            if before is None and now.issuperset(held):
                continue  # the usual backward: DDP reduced them all
            so_far = (before or set()) | (now & held.keys())
            if not so_far or len(so_far) == len(held):
                continue
            self.reached[id(ddp)] = so_far
            if id(ddp) not in self.told:
                self.told.add(id(ddp))
                missing = [self._name(pid, name, group) for pid, name in held.items() if pid not in so_far]
                self._say(missing, len(held), group, location)

    def _waiting_for_every_gradient(self) -> list[tuple[DistributedDataParallel, str | None]]:
        return [
            (module, group)
            for module, group in list(self.recorder.module_groups.values())
            if isinstance(module, DistributedDataParallel)
            and module.require_forward_param_sync  # its last forward prepared the reducer for backward
            and not module.find_unused_parameters
            and not module.static_graph
            and not getattr(module, "_delay_all_reduce_all_params", False)
            and not getattr(module, "_use_python_reducer", False)
        ]

    def _reducer_parameters(self, ddp: DistributedDataParallel) -> dict[int, str]:
        known = self.held.get(id(ddp))
        if known is None or known[0] is not ddp:
            ignored = ddp.parameters_to_ignore
            params = {
                id(p): name for name, p in ddp.module.named_parameters() if p.requires_grad and name not in ignored
            }
            known = self.held[id(ddp)] = (ddp, params)
        return known[1]

    def _name(self, pid: int, name: str, group: str | None) -> str:
        record = self.recorder.params.get(pid)
        if record is not None and record.name:
            return record.name
        return f"{group}.module.{name}" if group else f"module.{name}"

    @staticmethod
    def _say(missing: list[str], held: int, group: str | None, location: Location | None) -> None:
        rank = os.environ.get("RANK")
        more = len(missing) - NAMES_SHOWN
        shown = ", ".join(missing[:NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")
        message = (
            f"gradaudit: {f'rank {rank}: ' if rank else ''}the backward{f' at {location}' if location else ''} did "
            f"not reach {len(missing)} of the {held} parameters of DistributedDataParallel '{group or 'module'}' "
            f'({shown}): without find_unused_parameters=True, DDP will raise "Expected to have finished reduction '
            'in the prior iteration" at its next forward unless a backward reaches them first'
        )
        sys.stderr.write(printable(message) + "\n")
        sys.stderr.flush()
