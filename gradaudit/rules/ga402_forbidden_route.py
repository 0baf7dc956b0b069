"""GA402 forbidden-route: a contract says a loss must not send gradient to a group, and it does."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.contracts import find_loss, groups_named, listed
from gradaudit.findings import Declarations, Finding, Rule, Severity
from gradaudit.trace import Trace


def check(trace: Trace, options: Mapping[str, float], declarations: Declarations) -> list[Finding]:
    findings = []
    for contract in declarations.contracts:
        route = find_loss(trace, contract.loss, declarations.backward_lines) if contract.avoids else None
        if route is None:
            continue
        for name in contract.avoids:
            hit = route.reached.intersection(groups_named(trace, name))
            if hit:
                message = f"{route.description} sends gradient to {listed(hit)}; the contract at {contract.where} says it must not reach {name}"
                findings.append(
                    RULE.finding(f"{contract.loss} -> {name}", message, route.location, related=[contract.where])
                )
    return findings


RULE = Rule(
    code="GA402",
    name="forbidden-route",
    severity=Severity.error,
    summary="a loss reaches a group its contract says it must not",
    why=(
        'Only with contracts. `{ loss = "actor_loss", avoids = ["critic"] }` states that the actor\'s loss must '
        "leave the critic alone: an actor loss through an undetached Q-network, a target computed with gradient, "
        "a shared trunk that one loss must not shape. Names are matched as for GA401."
    ),
    bad="actor_loss = -critic(obs, actor(obs)).mean()   # critic's .grad filled, stepped if not wiped",
    good="actor_loss = -critic(obs, actor(obs)).mean()\nactor_loss.backward(inputs=list(actor.parameters()))",
    fix="cut the route (detach the input, backward(inputs=...)), or fix the contract",
    check=check,
    declared=True,
)
