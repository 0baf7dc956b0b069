"""GA103 term-lost-gradient: a loss term that carried gradient in the baseline carries none, or is gone."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Declarations, Finding, Rule, Severity
from gradaudit.rules.regressions import against_baseline
from gradaudit.trace import Trace


def check(trace: Trace, options: Mapping[str, float], declarations: Declarations) -> list[Finding]:
    compared = against_baseline(trace, declarations)
    if compared is None:
        return []
    before, now = compared
    locations = {term.name: term.location for backward in trace.backwards for term in backward.terms}
    findings = []
    for term, old in sorted(before.terms.items()):
        new = now.terms.get(term, 0.0) if term in locations else None
        if not old or (term in locations and new != 0.0):
            continue
        what = "carries none now" if term in locations else "is no longer in any loss"
        message = f"the loss term `{term}` carried gradient in the baseline (median norm {old:.3g}) and {what}"
        findings.append(RULE.finding(term, message, locations.get(term)))
    return findings


RULE = Rule(
    code="GA103",
    name="term-lost-gradient",
    severity=Severity.error,
    summary="a term that carried gradient in the baseline carries none",
    why=(
        "Only with --baseline. A loss term (named as gradaudit prints it) that sent gradient when the baseline "
        "was written now sends none, or no longer appears: an auxiliary loss dropped in a refactor, a penalty "
        "now computed from data. The loss curve barely moves; the behaviour it shaped is gone."
    ),
    bad="loss = policy_loss + ent_coef * entropy.detach()   # the bonus used to carry gradient",
    good="loss = policy_loss + ent_coef * entropy",
    fix="restore the term's route to the parameters, or accept the change with --update-baseline",
    check=check,
    declared=True,
)
