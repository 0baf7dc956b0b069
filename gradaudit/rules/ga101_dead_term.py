"""GA101 dead-term: a loss addend with no autograd path to any trainable parameter."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.trace import Break, Trace

_BREAKS = {
    "from_data": "it is built from data that has no autograd history",
    "detach": "its gradient is cut by .detach()",
    "no_grad": "it was computed under torch.no_grad()",
    "item": "it went through a Python number (.item()) and back into a tensor",
    "unknown": "it comes from a tensor without autograd history made outside the audited code",
}
HARMLESS = ("literal", "factory")


def explain_break(point: Break | None) -> str:
    if point is None:
        return "it has no autograd history"
    reason = _BREAKS.get(point.kind, "it has no autograd history")
    if point.location is None:
        return reason
    code = f" `{point.expression}`" if point.expression else ""
    return f"{reason} ({point.op}{code} at {point.location})"


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    findings: dict[tuple, Finding] = {}
    for backward in trace.backwards:
        for term in backward.terms:
            if term.constant:
                if term.break_point is not None and term.break_point.kind in HARMLESS:
                    continue
                message = (
                    f"the loss term `{term.name}` is a constant: {explain_break(term.break_point)}, "
                    "so every parameter gradient is the same as without it"
                )
            elif not term.groups_reached and not term.reach_unknown:
                message = f"the loss term `{term.name}` has an autograd history, but it reaches no trainable parameter"
            else:
                continue
            key = (term.name, term.location)
            findings.setdefault(key, RULE.finding(term.name, message, term.location))
    return list(findings.values())


RULE = Rule(
    code="GA101",
    name="dead-term",
    severity=Severity.error,
    summary="a loss addend with no autograd path to any trainable parameter",
    why=(
        "A term added to the loss that carries no gradient changes the loss value you log but not a single "
        "parameter update: a constraint, penalty or auxiliary loss that silently does nothing. Typical causes are "
        "a violation computed from observed data (torch.as_tensor of rewards), a .detach() or torch.no_grad() "
        "too early, or a .item() round trip. Literal constants (`loss + 1e-8`, or a number that is the same in every "
        "iteration) are not reported; a number computed at run time from data (a numpy scalar such as "
        "`np.sort(returns)[:k].mean()`, `float()` of a numpy value) is data. Terms whose graph holds code that may "
        "reach parameters its edges do not show (reentrant checkpointing, a custom autograd.Function), or goes "
        "deeper than gradaudit walks, are not reported."
    ),
    bad=(
        "rewards = torch.as_tensor(batch_rewards)            # no autograd history\n"
        "violation = torch.clamp(kappa - cvar(rewards), min=0)\n"
        "loss = policy_loss + lam * violation                # constant: no gradient"
    ),
    good=(
        "cvar_pred = cvar(critic_probs(obs), atoms, alpha)   # predicted, differentiable\n"
        "violation = torch.clamp(kappa - cvar_pred, min=0)\n"
        "loss = policy_loss + lam * violation"
    ),
    fix="compute the term from the model's outputs (not from data, .item() or under no_grad), or drop it from the loss",
    check=check,
)
