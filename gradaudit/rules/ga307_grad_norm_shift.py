"""GA307 grad-norm-shift: a parameter group's gradient norm moved by more than a factor since the baseline."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Declarations, Finding, Rule, Severity
from gradaudit.rules.regressions import group_location, group_pairs
from gradaudit.trace import Trace

_ROUNDING = 1.005
"""Baselines keep 3 significant digits: ratios are compared within that precision."""


def check(trace: Trace, options: Mapping[str, float], declarations: Declarations) -> list[Finding]:
    factor = options["factor"]
    findings = []
    for group, old, new in group_pairs(trace, declarations):
        if new is None or not old.grad_norm or not new.grad_norm:
            continue
        ratio = new.grad_norm / old.grad_norm
        if max(ratio, 1 / ratio) * _ROUNDING >= factor:
            message = (
                f"the median gradient norm of {group} went from {old.grad_norm:.3g} in the baseline to "
                f"{new.grad_norm:.3g} ({ratio:.3g}x), at least the {factor:g}x of GA307.factor"
            )
            findings.append(RULE.finding(group, message, group_location(trace, group)))
    return findings


RULE = Rule(
    code="GA307",
    name="grad-norm-shift",
    severity=Severity.warning,
    summary="a group's gradient norm moved by more than a factor since the baseline",
    why=(
        "Only with --baseline. The median over the window's backward passes of each parameter group's gradient "
        "norm is kept in the baseline; a change of loss scale, a lost normalisation, a reduction switched from "
        "mean to sum or a learning signal cut off upstream moves it by orders of magnitude while every route "
        "stays the same. GA307.factor (default 10) is the ratio, either way, from which on it is reported."
    ),
    bad="loss = F.mse_loss(q, target, reduction='sum')   # was 'mean': 256x the gradient",
    good="loss = F.mse_loss(q, target)",
    fix="find the change that rescaled the gradient; if it is intended, accept it with --update-baseline",
    check=check,
    options={"factor": 10.0},
    declared=True,
)
