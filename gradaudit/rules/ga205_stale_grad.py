"""GA205 stale-grad: a step applies a gradient contribution that an earlier step already applied."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.rules.flow import backward_text, contributions, describe_group
from gradaudit.trace import Trace


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    params = {p.name: p for p in trace.parameters}
    stale: dict[tuple[str, int], list] = {}
    for c in contributions(trace):
        by_optimizer: dict[int, list] = {}
        for event in c.applied_by:
            if event.optimizer is not None:
                by_optimizer.setdefault(event.optimizer, []).append(event)
        for optimizer, applies in by_optimizer.items():
            if len(applies) > 1 and c.norm > 0:
                stale.setdefault((params[c.param].group, optimizer), []).append((c, applies[1]))
    findings = []
    for (group, _optimizer), repeats in stale.items():
        contribution, again = min(repeats, key=lambda r: r[1].seq)
        message = (
            f"{describe_group(trace, group, sorted({c.param for c, _ in repeats}))}: the gradient from "
            f"{backward_text(trace, contribution.backward)} is applied again by {again.by} at {again.location}, "
            f"{len(contribution.applied_by)} steps in all; .grad was not cleared between steps"
        )
        findings.append(RULE.finding(group, message, again.location))
    return findings


RULE = Rule(
    code="GA205",
    name="stale-grad",
    severity=Severity.warning,
    summary="a step applies a contribution an earlier step already applied",
    why=(
        "Without zero_grad() between iterations, .grad keeps every earlier contribution and each step applies "
        "them again: the effective gradient is a running sum of stale gradients. Gradient accumulation over "
        "micro-batches (several backward passes, one step, then zero_grad) applies each contribution once and "
        "is not reported."
    ),
    bad="for batch in loader:\n    loss(model(batch)).backward()\n    opt.step()              # no opt.zero_grad()",
    good="for batch in loader:\n    opt.zero_grad()\n    loss(model(batch)).backward()\n    opt.step()",
    fix="call optimizer.zero_grad() once per step, before the backward pass(es) that step should use",
    check=check,
)
