"""GA204 multi-optimizer-param: one parameter in two or more optimizers."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.rules.flow import by_group, describe_group, optimizer_text
from gradaudit.trace import Trace


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    shared = [p for p in trace.parameters if p.requires_grad and len(p.owners) > 1]
    findings = []
    for group, params in by_group(trace, shared).items():
        owners = sorted({i for p in params for i in p.owners})
        message = (
            f"{describe_group(trace, group, [p.name for p in params])} is held by "
            f"{' and '.join(optimizer_text(trace, i) for i in owners)}: each step applies its gradient again, "
            "with separate moment estimates"
        )
        findings.append(RULE.finding(group, message, trace.optimizers[owners[-1]].created_at))
    return findings


RULE = Rule(
    code="GA204",
    name="multi-optimizer-param",
    severity=Severity.warning,
    summary="owned by two or more optimizers",
    why=(
        "Two optimizers over the same tensor both step it, each with its own Adam moments and learning rate, so "
        "the effective update is doubled and the two states disagree. Shared encoders are the usual case."
    ),
    bad="critic_opt = Adam([*critic.parameters(), *encoder.parameters()])\n"
    "actor_opt = Adam([*actor.parameters(), *encoder.parameters()])",
    good="critic_opt = Adam([*critic.parameters(), *encoder.parameters()])\n"
    "actor_opt = Adam(actor.parameters())       # actor trains on encoder(obs).detach()",
    fix="give each parameter exactly one optimizer; train shared parts from one loss or one combined optimizer",
    check=check,
)
