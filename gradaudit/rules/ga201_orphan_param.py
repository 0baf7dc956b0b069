"""GA201 orphan-param: receives gradient, owned by no optimizer."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.rules.flow import backward_text, by_group, contributions, describe_group
from gradaudit.trace import Trace


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    replay = contributions(trace)
    manually_updated = {c.param for c in replay if any(e.optimizer is None for e in c.applied_by)}
    received: dict[str, list] = {}
    for contribution in replay:
        if contribution.norm > 0:
            received.setdefault(contribution.param, []).append(contribution)
    orphans = [
        p
        for p in trace.parameters
        if p.requires_grad and not p.owners and p.name in received and p.name not in manually_updated
    ]
    findings = []
    for group, params in by_group(trace, orphans).items():
        first = min((c for p in params for c in received[p.name]), key=lambda c: c.accumulated.seq)
        message = (
            f"{describe_group(trace, group, [p.name for p in params], listed=True)} receives gradient ({backward_text(trace, first.backward)}) "
            "but no optimizer holds it, so it never learns"
        )
        findings.append(RULE.finding(group, message, first.accumulated.location))
    return findings


RULE = Rule(
    code="GA201",
    name="orphan-param",
    severity=Severity.warning,
    summary="receives gradient, owned by no optimizer",
    why=(
        "Backward computes gradients for these parameters, but no optimizer's param_groups contain them, so they "
        "keep their initial values: an encoder left out of every optimizer, a head added after the optimizer "
        "was built. Parameters frozen with requires_grad_(False), or updated by hand, are not reported."
    ),
    bad=(
        "features = obs_encoder(obs)\n"
        "critic_opt = Adam(critic.parameters())       # obs_encoder is in no optimizer\n"
        "critic_loss(critic(features), target).backward()"
    ),
    good="critic_opt = Adam([*critic.parameters(), *obs_encoder.parameters()])",
    fix="add the parameters to the optimizer that should train them, or freeze them with requires_grad_(False)",
    check=check,
)
