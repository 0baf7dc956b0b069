"""GA208 optimizer-changed: a parameter group is applied by other optimizers than in the baseline."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Declarations, Finding, Rule, Severity
from gradaudit.rules.regressions import group_location, group_pairs
from gradaudit.trace import Trace


def check(trace: Trace, options: Mapping[str, float], declarations: Declarations) -> list[Finding]:
    findings = []
    for group, old, new in group_pairs(trace, declarations):
        if not old.optimizers or new is None or new.optimizers == old.optimizers:
            continue
        message = (
            f"{group} was stepped by {', '.join(old.optimizers)} in the baseline and is stepped by "
            f"{', '.join(new.optimizers) or 'no optimizer'} now"
        )
        findings.append(RULE.finding(group, message, group_location(trace, group)))
    return findings


RULE = Rule(
    code="GA208",
    name="optimizer-changed",
    severity=Severity.warning,
    summary="a group is applied by other optimizers than in the baseline",
    why=(
        "Only with --baseline. Which optimizer applies a group's gradient decides its learning rate, its moment "
        "estimates and which loss's steps move it. A refactor of the param_groups that moves a shared encoder "
        "from the critic's optimizer to the actor's keeps every gradient route and changes what training does."
    ),
    bad="actor_opt = Adam([*actor.parameters(), *encoder.parameters()])   # was in critic_opt",
    good="critic_opt = Adam([*critic.parameters(), *encoder.parameters()])",
    fix="put the group back in its optimizer, or accept the change with --update-baseline",
    check=check,
    declared=True,
)
