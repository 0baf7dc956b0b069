"""GA401 missing-route: a contract says a loss must send gradient to a group, and it does not."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.contracts import find_loss, groups_named, listed
from gradaudit.findings import Declarations, Finding, Rule, Severity
from gradaudit.trace import Trace


def check(trace: Trace, options: Mapping[str, float], declarations: Declarations) -> list[Finding]:
    findings = []
    for contract in declarations.contracts:
        if not contract.loss:
            continue
        route = find_loss(trace, contract.loss, declarations.backward_lines)
        if route is None:
            message = (
                f"the contract at {contract.where} names the loss `{contract.loss}`, but no loss term, loss variable "
                "or backward location of that name was seen, so it cannot be checked"
            )
            findings.append(RULE.finding(contract.loss, message, contract.where))
            continue
        for name in contract.reaches:
            covered = groups_named(trace, name)
            if route.reached.intersection(covered):
                continue
            seen = f"it reaches {listed(route.reached) or 'no group'}"
            if not covered:
                seen += f"; no trainable group named {name} was seen"
            message = f"{route.description} sends no gradient to {name} ({seen}); the contract at {contract.where} says it must"
            findings.append(
                RULE.finding(f"{contract.loss} -> {name}", message, route.location, related=[contract.where])
            )
    return findings


RULE = Rule(
    code="GA401",
    name="missing-route",
    severity=Severity.error,
    summary="a loss does not reach a group its contract says it must",
    why=(
        "Only with contracts (`[tool.gradaudit] contracts`, or an audit's). A contract states which parameter "
        'groups a loss must train: `{ loss = "critic_loss", reaches = ["obs_encoder"] }`. The loss is a term\'s '
        "name as gradaudit prints it, the variable whose backward is called, or the backward's file:line; a group "
        "name covers the groups under it (`critic` covers `critic.q1_net`). A contract whose loss is never seen "
        "is reported too: a renamed loss would otherwise pass unchecked."
    ),
    bad="features = obs_encoder(obs).detach()\ncritic_loss = F.mse_loss(critic(features), target)",
    good="features = obs_encoder(obs)\ncritic_loss = F.mse_loss(critic(features), target)",
    fix="restore the route from the loss to the group (a .detach(), no_grad or data copy cuts it), or fix the contract",
    check=check,
    declared=True,
)
