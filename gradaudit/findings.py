"""Findings: what a rule concluded, and the rule's own identity and documentation."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gradaudit.trace import Location, Trace


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
            **(watched if self.first_iteration is not None else {}),
        }


Check = Callable[[Trace, Mapping[str, float]], list[Finding]]


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
    check: Check
    options: Mapping[str, float] = field(default_factory=dict)
    """Thresholds, with their defaults; documented in `why`. Set as `CODE.name` (`-o`, `[tool.gradaudit.CODE]`)."""

    def finding(
        self,
        subject: str,
        message: str,
        location: Location | None,
        severity: Severity | None = None,
        hint: str | None = None,
    ) -> Finding:
        return Finding(
            self.code,
            self.name,
            self.severity if severity is None else severity,
            subject,
            message,
            location,
            self.fix if hint is None else hint,
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

    def run(self, trace: Trace, overrides: Mapping[str, float] | None = None) -> list[Finding]:
        return self.check(trace, self.resolve_options(overrides))
