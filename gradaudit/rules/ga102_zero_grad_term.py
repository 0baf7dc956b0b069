"""GA102 zero-grad-term: a term with a path to parameters but an exactly zero gradient."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.trace import Term, Trace


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    seen: dict[tuple, list[Term]] = {}
    unmeasured: set[tuple] = set()
    for backward in trace.backwards:
        for term in backward.terms:
            if term.grads_skipped:
                unmeasured.add((term.name, term.location))
            elif not term.constant and term.groups_reached and term.grad_norms:
                seen.setdefault((term.name, term.location), []).append(term)
    findings = []
    for (name, location), terms in seen.items():
        # `!= 0`: a NaN gradient is not a zero one (non-finite gradients are GA305's)
        if (name, location) in unmeasured or any(norm != 0 for term in terms for norm in term.grad_norms.values()):
            continue
        times = f"in all {len(terms)} backward passes" if len(terms) > 1 else "in the one backward pass"
        if any(term.coefficient == 0 for term in terms):
            message = f"the loss term `{name}` is multiplied by a zero coefficient: its gradient is zero {times} seen"
        else:
            message = (
                f"the loss term `{name}` reaches {', '.join(terms[0].groups_reached)} but its gradient was exactly zero "
                f"{times} seen (clamped, masked or saturated)"
            )
        findings.append(RULE.finding(name, message, location))
    return findings


RULE = Rule(
    code="GA102",
    name="zero-grad-term",
    severity=Severity.info,
    summary="a term with a path to parameters but zero gradient in the audited window",
    why=(
        "The term is wired correctly but contributed nothing: a zero coefficient (an entropy bonus with "
        "ent_coef = 0), a hinge that is inactive (max(0, g) with g <= 0), or a fully masked term. Often "
        "intended, hence informational; worth a look when the term was meant to act."
    ),
    bad="loss = pg_loss - 0.0 * entropy.mean()      # the entropy bonus never acts",
    good="loss = pg_loss - 0.01 * entropy.mean()",
    fix="check the coefficient and whether the term's clamp or mask is ever active",
    check=check,
)
