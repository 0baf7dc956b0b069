"""The rule catalog. Rules are pure functions of the Trace: they never import torch."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from gradaudit.findings import Finding, Rule
from gradaudit.rules import (
    ga101_dead_term,
    ga102_zero_grad_term,
    ga201_orphan_param,
    ga202_unreached_param,
    ga203_discarded_grad,
    ga204_multi_optimizer_param,
    ga205_stale_grad,
    ga206_target_grad,
    ga305_nonfinite_grad,
)
from gradaudit.trace import Trace

RULES: tuple[Rule, ...] = (
    ga101_dead_term.RULE,
    ga102_zero_grad_term.RULE,
    ga201_orphan_param.RULE,
    ga202_unreached_param.RULE,
    ga203_discarded_grad.RULE,
    ga204_multi_optimizer_param.RULE,
    ga205_stale_grad.RULE,
    ga206_target_grad.RULE,
    ga305_nonfinite_grad.RULE,
)


def rule_by_code(code: str) -> Rule | None:
    wanted = code.upper()
    return next((r for r in RULES if r.code == wanted or r.name == code.lower()), None)


def _matches(rule: Rule, patterns: Collection[str]) -> bool:
    """Codes, code prefixes (GA2) or slugs."""
    return any(rule.code.startswith(p.upper()) or rule.name == p.lower() for p in patterns)


def run_rules(
    trace: Trace,
    select: Collection[str] = (),
    ignore: Collection[str] = (),
    options: Mapping[str, float] | None = None,
) -> list[Finding]:
    findings: list[Finding] = []
    for rule in RULES:
        if (select and not _matches(rule, select)) or (ignore and _matches(rule, ignore)):
            continue
        findings.extend(rule.run(trace, options))
    return sorted(findings, key=lambda f: (-f.severity, f.rule, f.subject))
