"""Findings: what a rule concluded, and the rule's own identity and documentation."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gradaudit.trace import Location, Trace

if TYPE_CHECKING:
    from gradaudit.contracts import Contract
    from gradaudit.gate import Stats


class ConfigError(ValueError):
    """A setting gradaudit cannot use (unknown rule or option, a value of the wrong kind): said in one line."""


class Severity(enum.IntEnum):
    info = 0
    warning = 1
    error = 2


@dataclass(frozen=True)
class Finding:
    rule: str
    name: str
    severity: Severity
    subject: str
    message: str
    location: Location | None
    hint: str
    related: tuple[Location, ...] = ()
    """Further places the finding concerns: the contract it breaks (its line in pyproject.toml)."""
    first_iteration: int | None = None
    """Watching: the iteration where it first appeared, and in how many samples it did."""
    occurrences: int = 0

    def to_dict(self) -> dict:
        watched = {"first_iteration": self.first_iteration, "occurrences": self.occurrences}
        return {
            "rule": self.rule,
            "name": self.name,
            "severity": self.severity.name,
            "subject": self.subject,
            "message": self.message,
            "location": None if self.location is None else {"file": self.location.file, "line": self.location.line},
            "hint": self.hint,
            **({"related": [{"file": loc.file, "line": loc.line} for loc in self.related]} if self.related else {}),
            **(watched if self.first_iteration is not None else {}),
        }


@dataclass(frozen=True)
class Declarations:
    """What the user declared beside the program: gradient contracts and a baseline's gradient statistics.

    Rules that need them (GA4xx, and the baseline regressions) run only when they are given."""

    contracts: Sequence[Contract] = ()
    baseline: Stats | None = None
    backward_lines: Mapping[str, str] = field(default_factory=dict)
    """The source text of each backward call (`file:line` -> `critic_loss.backward()`), to name a loss by variable."""


Check = Callable[[Trace, Mapping[str, float]], list[Finding]]
DeclaredCheck = Callable[[Trace, Mapping[str, float], Declarations], list[Finding]]


@dataclass(frozen=True)
class Rule:
    """One rule: its code, slug and severity, why it matters, a bad and a good example, the fix, and its check."""

    code: str
    name: str
    severity: Severity
    summary: str
    why: str
    bad: str
    good: str
    fix: str
    check: Check | DeclaredCheck
    options: Mapping[str, float] = field(default_factory=dict)
    """Thresholds, with their defaults; documented in `why`. Set as `CODE.name` (`-o`, `[tool.gradaudit.CODE]`)."""
    declared: bool = False
    """The check compares against Declarations (a contract, a baseline) and is called with them; skipped without."""

    def finding(
        self,
        subject: str,
        message: str,
        location: Location | None,
        severity: Severity | None = None,
        hint: str | None = None,
        related: Sequence[Location] = (),
    ) -> Finding:
        return Finding(
            self.code,
            self.name,
            self.severity if severity is None else severity,
            subject,
            message,
            location,
            self.fix if hint is None else hint,
            tuple(related),
        )

    def resolve_options(self, overrides: Mapping[str, object] | None = None) -> dict[str, float]:
        """This rule's own `overrides` (plain names) merged over its defaults; a typo fails instead of being ignored."""
        resolved = dict(self.options)
        for name, value in (overrides or {}).items():
            if name not in self.options:
                known = ", ".join(f"{self.code}.{option}" for option in self.options) or "none"
                raise ConfigError(f"{self.code} has no option {name!r} (its options: {known})")
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                raise ConfigError(f"{self.code}.{name} must be a number, got {value!r}")
            resolved[name] = float(value)
        return resolved

    def apply(
        self, trace: Trace, options: Mapping[str, float], declarations: Declarations | None = None
    ) -> list[Finding]:
        """The findings with resolved `options`; a declared rule finds nothing without declarations."""
        if not self.declared:
            return self.check(trace, options)  # type: ignore[call-arg]
        return [] if declarations is None else self.check(trace, options, declarations)  # type: ignore[call-arg]

    def run(
        self, trace: Trace, overrides: Mapping[str, float] | None = None, declarations: Declarations | None = None
    ) -> list[Finding]:
        return self.apply(trace, self.resolve_options(overrides), declarations)
