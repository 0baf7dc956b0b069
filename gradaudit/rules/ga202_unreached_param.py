"""GA202 unreached-param: owned by an optimizer that stepped, never reached by any backward."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.rules.flow import by_group, describe_group, optimizer_text
from gradaudit.trace import Trace


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    if not any(b.accumulates for b in trace.backwards):
        return []
    reached = {e.param for e in trace.events if e.kind == "accumulate"}
    unreached = [
        p
        for p in trace.parameters
        if p.requires_grad and p.name not in reached and any(trace.optimizers[i].steps > 0 for i in p.owners)
    ]
    findings = []
    for group, params in by_group(trace, unreached).items():
        stepped = sorted({i for p in params for i in p.owners if trace.optimizers[i].steps > 0})
        owner = trace.optimizers[stepped[0]]
        message = (
            f"{describe_group(trace, group, [p.name for p in params], listed=True)} is held by {optimizer_text(trace, owner.index)}, "
            f"which stepped {owner.steps} time{'s' if owner.steps != 1 else ''}, but no backward pass in the window "
            "reached it: it is never trained"
        )
        findings.append(RULE.finding(group, message, owner.created_at))
    return findings


RULE = Rule(
    code="GA202",
    name="unreached-param",
    severity=Severity.warning,
    summary="owned by an optimizer that stepped, never reached by any backward",
    why=(
        "The optimizer steps, but no loss has an autograd path to these parameters: a head whose output is "
        "detached or unused, a module replaced after the optimizer was built, a network only ever run under "
        "no_grad. Only optimizers that stepped in the audited window are considered; frozen parameters "
        "(requires_grad=False) are not reported, and a parameter with a path but a zero gradient on some step "
        "(torch.min picking the other critic) counts as reached."
    ),
    bad=(
        "opt = Adam([*actor.parameters(), *value_head.parameters()])\n"
        "loss = actor_loss(actor(obs))          # value_head is never used in the loss"
    ),
    good="loss = actor_loss(actor(obs)) + value_coef * value_loss(value_head(obs), returns)",
    fix="use the parameters in a loss, or remove them from the optimizer (freeze them if they are meant to stay fixed)",
    check=check,
)
