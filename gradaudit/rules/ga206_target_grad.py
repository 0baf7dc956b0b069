"""GA206 target-grad: the target of a regression loss carries gradient into trainable parameters."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.trace import Trace


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    findings = {}
    for target in trace.regression_targets:
        subject = target.target_expression or "target"
        message = (
            f"the target `{subject}` of {target.op} carries gradient into {', '.join(target.groups_reached)}: the loss "
            "also moves the target toward the prediction"
        )
        findings.setdefault((subject, target.location), RULE.finding(subject, message, target.location))
    return list(findings.values())


RULE = Rule(
    code="GA206",
    name="target-grad",
    severity=Severity.warning,
    summary="the target of a regression loss carries gradient (e.g. an undetached TD target)",
    why=(
        "A regression target is meant to be a fixed label. When it is computed from trainable parameters without "
        "torch.no_grad() or .detach(), the loss pulls the target toward the prediction as well (a residual-gradient "
        "TD update), which slows or destabilises value learning."
    ),
    bad="target = reward + gamma * q_net(next_obs).max(1).values\nloss = F.mse_loss(q_net(obs).gather(1, act), target)",
    good="with torch.no_grad():\n    target = reward + gamma * target_net(next_obs).max(1).values",
    fix="compute the target under torch.no_grad() (or .detach() it)",
    check=check,
)
