"""Gradient contracts: what the user states must hold about where gradient goes, declared in pyproject.toml.

```toml
[tool.gradaudit]
contracts = [
  # a loss: a term's name as gradaudit prints it, the loss variable's name, or a backward's file:line
  { loss = "critic_loss", reaches = ["obs_encoder", "critic"], avoids = ["actor"] },
  # a parameter group (or module path: `critic` covers `critic.q1_net`) and the optimizer that must step it
  { group = "obs_encoder", stepped-by = "critic_optimizer" },
]
```

The same list may sit in an audit (`[tool.gradaudit.audits.NAME]`), for that program only. GA401, GA402 and GA403
check them. Pure: no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradaudit.findings import ConfigError
from gradaudit.trace import Location, Trace

_KEYS = ("loss", "reaches", "avoids", "group", "stepped-by")


@dataclass(frozen=True)
class Contract:
    where: Location
    """Its line in pyproject.toml."""
    loss: str = ""
    reaches: tuple[str, ...] = ()
    avoids: tuple[str, ...] = ()
    group: str = ""
    stepped_by: str = ""


def parse_contracts(value: Any, text: str, start_line: int, file: str) -> tuple[Contract, ...]:
    """The `contracts` list of a table whose header is at `start_line` of the pyproject `text`; ConfigError if bad."""
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(
            f"contracts must be a list of tables such as {{ loss = ..., reaches = [...] }}, got {value!r}"
        )
    contracts, line = [], start_line
    for table in value:
        unknown = sorted(set(table) - set(_KEYS))
        if unknown:
            raise ConfigError(f"contract key {unknown[0]!r} is unknown (known: {', '.join(_KEYS)})")
        loss, group = _name(table, "loss"), _name(table, "group")
        reaches, avoids, stepped_by = _names(table, "reaches"), _names(table, "avoids"), _name(table, "stepped-by")
        if not loss and not group:
            raise ConfigError(f"contract {table!r} names neither a loss nor a group")
        if loss and not (reaches or avoids):
            raise ConfigError(f"contract for the loss {loss!r} says neither what it reaches nor what it avoids")
        if group and not stepped_by:
            raise ConfigError(f"contract for the group {group!r} lacks stepped-by (the optimizer that must step it)")
        line = _line_of(text, line, "loss" if loss else "group", loss or group)
        contracts.append(Contract(Location(file, line), loss, reaches, avoids, group, stepped_by))
    return tuple(contracts)


def _name(table: Mapping[str, Any], key: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(f"contract {key} must be a string, got {value!r}")
    return value


def _names(table: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ConfigError(f"contract {key} must be a list of group names, got {value!r}")
    return tuple(value)


def _line_of(text: str, after: int, key: str, value: str) -> int:
    """The first line from `after` on that declares `key = "value"`; `after` itself when none does."""
    pattern = re.compile(rf"\b{re.escape(key)}\s*=\s*[\"']{re.escape(value)}[\"']")
    lines = text.splitlines()
    return next((n for n in range(after, len(lines) + 1) if pattern.search(lines[n - 1])), after)


def header_line(text: str, path: Sequence[str]) -> int:
    """The line of the `[tool.gradaudit...]` table header for `path` (1 when not written as a header)."""
    wanted = ".".join(path)
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip().strip("[]").replace('"', "").replace(" ", "") == wanted:
            return number
    return 1


def groups_named(trace: Trace, name: str) -> list[str]:
    """The trainable groups a contract's name covers: the group itself and the groups under it as a module path."""
    return [
        group
        for group, params in trace.groups().items()
        if (group == name or group.startswith(name + ".")) and any(p.requires_grad for p in params)
    ]


@dataclass(frozen=True)
class LossRoute:
    """Where a contract's loss was found and the groups its gradient reached (over every pass)."""

    description: str
    location: Location | None
    reached: frozenset[str]


def find_loss(trace: Trace, loss: str, backward_lines: Mapping[str, str]) -> LossRoute | None:
    """A loss term by its printed name; else the backward passes at `file:line` or whose call names the variable."""
    terms = [term for backward in trace.backwards for term in backward.terms if term.name == loss]
    if terms:
        reached = frozenset(g for term in terms for g in term.groups_reached)
        return LossRoute(f"the loss term `{loss}`", terms[0].location, reached)
    variable = re.compile(rf"(?<![\w]){re.escape(loss)}(?![\w])")
    backwards = [
        b
        for b in trace.backwards
        if b.location is not None
        and (
            str(b.location) == loss
            or str(b.location).endswith("/" + loss)
            or variable.search(backward_lines.get(str(b.location), "")) is not None
        )
    ]
    if not backwards:
        return None
    reached = frozenset(g for b in backwards for g in b.groups_reached)
    return LossRoute(f"`{loss}` (the backward at {backwards[0].location})", backwards[0].location, reached)


def listed(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))
