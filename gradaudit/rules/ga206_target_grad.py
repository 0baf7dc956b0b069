"""GA206 target-grad: both sides of a regression loss carry gradient into the same trainable parameters."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.trace import Trace


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    findings = {}
    for target in trace.regression_targets:
        if not target.shared_groups:
            continue
        subject = target.target_expression or "target"
        prediction = target.prediction_expression or "input"
        message = (
            f"both sides of {target.op} reach {', '.join(target.shared_groups)}: `{prediction}` and `{subject}` each "
            "carry gradient into it, so the loss also moves the target toward the prediction (a residual-gradient "
            "update)"
        )
        findings.setdefault((subject, target.location), RULE.finding(subject, message, target.location))
    return list(findings.values())


RULE = Rule(
    code="GA206",
    name="target-grad",
    severity=Severity.warning,
    summary="both sides of a regression loss reach the same parameters (e.g. an undetached TD target)",
    why=(
        "A regression target is meant to be a fixed label. When it is computed from the same trainable parameters "
        "as the prediction without torch.no_grad() or .detach(), the loss pulls the target toward the prediction as "
        "well (a residual-gradient TD update), which slows or destabilises value learning. mse, l1, smooth_l1 and "
        "huber losses are symmetric, so the argument order says nothing (`F.mse_loss(returns, values)` is as "
        "common as `F.mse_loss(values, returns)`): the rule fires only when both operands reach a common "
        "parameter, and names both."
    ),
    bad="target = reward + gamma * q_net(next_obs).max(1).values\nloss = F.mse_loss(q_net(obs).gather(1, act), target)",
    good="with torch.no_grad():\n    target = reward + gamma * target_net(next_obs).max(1).values",
    fix="compute the target under torch.no_grad() (or .detach() it)",
    check=check,
)
