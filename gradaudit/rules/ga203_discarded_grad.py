"""GA203 discarded-grad: an upstream feature provider's gradient is wiped before any step used it."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.rules.flow import Contribution, backward_text, contributions, describe_group
from gradaudit.trace import Trace


def _role(trace: Trace, backward: int, group: str, trained: set[str]) -> tuple[str, str] | None:
    """('provider', consumer) when `group` feeds a group the backward trained; None when it only evaluates."""
    upstream = trace.backwards[backward].upstream
    for consumer in sorted(trained):
        if group in upstream.get(consumer, []):
            return "provider", consumer
    if any(t in upstream.get(group, []) for t in trained):
        return None
    return "independent", ""


def _site(trace: Trace, backward: int) -> Hashable:
    """The loss a backward belongs to: its call site, the same in every iteration."""
    return trace.backwards[backward].location or backward


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    params = {p.name: p for p in trace.parameters}
    replay = contributions(trace)
    trained: dict[int, set[str]] = {}
    trained_by: dict[str, set[Hashable]] = {}  # group -> the losses (backward sites) some step applied to it
    for c in replay:
        if c.applied_by:
            trained.setdefault(c.backward, set()).add(params[c.param].group)
            trained_by.setdefault(params[c.param].group, set()).add(_site(trace, c.backward))
    discarded: dict[tuple[str, int, str], list[Contribution]] = {}
    for c in replay:
        param = params[c.param]
        if c.wiped_by is not None and not c.applied_by and c.norm > 0 and param.owners and param.requires_grad:
            discarded.setdefault((param.group, c.backward, c.wiped_by.by), []).append(c)
    findings: dict[tuple[str, str], Finding] = {}
    for (group, backward, wiped_by), lost in discarded.items():
        role = _role(trace, backward, group, trained.get(backward, set()) - {group})
        if role is None:
            continue
        kind, consumer = role
        losses_training_it = trained_by.get(group, set())
        if kind == "independent" and losses_training_it and _site(trace, backward) not in losses_training_it:
            continue  # reached in passing (a loss coefficient, a module it evaluates), trained by its own loss
        subject = describe_group(trace, group, sorted({c.param for c in lost}))
        wipe = lost[0].wiped_by
        where = f" at {wipe.location}" if wipe and wipe.location else ""
        if kind == "provider":
            message = (
                f"{subject} feeds {consumer}, which {backward_text(trace, backward)} trained, but its gradient from "
                f"that backward is wiped by {wiped_by}{where} before any step applied it: an upstream feature "
                "provider that never learns from this loss"
            )
            severity = None
        else:
            message = (
                f"{subject} received gradient from {backward_text(trace, backward)}, but it is wiped by "
                f"{wiped_by}{where} before any step applied it"
            )
            severity = Severity.info
        findings.setdefault((group, wiped_by), RULE.finding(group, message, wipe.location if wipe else None, severity))
    return list(findings.values())


RULE = Rule(
    code="GA203",
    name="discarded-grad",
    severity=Severity.warning,
    summary="gradient accumulated then wiped before any step used it (upstream feature provider)",
    why=(
        "A loss trains module B on features from module A (A upstream of B). The backward fills A's .grad, but the "
        "optimizer that steps next does not own A, and another optimizer's zero_grad() wipes A's gradient "
        "first: A never learns from that loss. The classic case is a shared observation encoder placed in the "
        "actor's optimizer while the critic loss is the signal meant to shape it. Downstream evaluators (SAC's "
        "actor loss through the critic, a GAN generator loss through the discriminator) also get gradients that "
        "are wiped; that is normal and not reported, and neither is a gradient that reaches a module trained by "
        "another loss only in passing (a learned temperature or Lagrange multiplier scaling a term of the actor "
        "or critic loss). A zero_grad() inside an optimizer's own step (an L-BFGS closure re-evaluating the loss) "
        "comes after the step has read the gradients: they count as applied. What remains at info level is a "
        "gradient from a loss that trains the module at other times (zero_grad() between accumulated "
        "micro-batches) or a module no step ever updates. The message says which role the module played."
    ),
    bad=(
        "actor_opt = Adam([*actor_vae.parameters(), *encoder.parameters()])\n"
        "critic_opt = Adam(critic.parameters())\n"
        "critic_opt.zero_grad(); critic_loss(critic(encoder(obs))).backward(); critic_opt.step()\n"
        "actor_opt.zero_grad()   # wipes the critic's gradient to the encoder"
    ),
    good="critic_opt = Adam([{'params': critic.parameters()}, {'params': encoder.parameters()}])",
    fix="put the module in the optimizer that steps after the loss that should train it (and detach its output for the others)",
    check=check,
)
