"""GA207 group-lost-gradient: a parameter group that received gradient in the baseline receives none now."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Declarations, Finding, Rule, Severity
from gradaudit.rules.regressions import group_location, group_pairs
from gradaudit.trace import Trace


def check(trace: Trace, options: Mapping[str, float], declarations: Declarations) -> list[Finding]:
    findings = []
    for group, old, new in group_pairs(trace, declarations):
        if not old.grad_norm or (new is not None and new.grad_norm):
            continue
        what = "receives no gradient now" if new is not None else "is no longer a trainable group of the program"
        message = f"{group} received gradient in the baseline (median norm {old.grad_norm:.3g}) and {what}"
        findings.append(RULE.finding(group, message, group_location(trace, group)))
    return findings


RULE = Rule(
    code="GA207",
    name="group-lost-gradient",
    severity=Severity.error,
    summary="a group that received gradient in the baseline receives none",
    why=(
        "Only with --baseline. A parameter group that learned when the baseline was written no longer gets any "
        "gradient: a new .detach(), a torch.no_grad() moved up, a module swapped for a copy. Training goes on, "
        "the group keeps its values, and nothing else complains. A group that disappeared (renamed) is reported "
        "too, so that the baseline is rewritten knowingly."
    ),
    bad="features = encoder(obs).detach()   # the critic loss used to train the encoder",
    good="features = encoder(obs)",
    fix="restore the route, or accept the change with --update-baseline",
    check=check,
    declared=True,
)
