"""Runs started by torchrun: each rank is audited on its own; rank 0 reports every rank's findings, with the ranks
each occurred on. Ranks meet through files in a folder named after the run, never through a collective (the
audit must not add or reorder one). A rank that fails reports on its own: the others may never get to report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from gradaudit.findings import Finding, Severity
from gradaudit.trace import Location

WAIT_FOR_RANKS_S = 30.0
"""How long rank 0 waits for the other ranks' findings before it reports those it has."""


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
    result = [
        dataclasses.replace(finding, message=f"{finding.message} (rank{'s' if len(on) > 1 else ''} {_list(on)})")
        for finding, on in seen.values()
    ]
    return result, sorted(pending)


def _list(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


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
