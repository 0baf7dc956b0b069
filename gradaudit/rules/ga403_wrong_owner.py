"""GA403 wrong-owner: a contract says which optimizer must step a group, and another one does (or none)."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.contracts import groups_named
from gradaudit.findings import Declarations, Finding, Rule, Severity
from gradaudit.rules.flow import describe_group, first_location, optimizer_text
from gradaudit.trace import Trace


def _named(trace: Trace, index: int, wanted: str) -> bool:
    name = trace.optimizers[index].name
    return name == wanted or name.endswith("." + wanted)


def check(trace: Trace, options: Mapping[str, float], declarations: Declarations) -> list[Finding]:
    findings = []
    groups = trace.groups()
    for contract in declarations.contracts:
        if not contract.group:
            continue
        covered = groups_named(trace, contract.group)
        if not covered:
            message = (
                f"the contract at {contract.where} says '{contract.stepped_by}' must step {contract.group}, "
                "but no trainable group of that name was seen"
            )
            findings.append(RULE.finding(contract.group, message, contract.where))
            continue
        owners = sorted({i for g in covered for p in groups[g] if p.requires_grad for i in p.owners})
        if owners and all(_named(trace, i, contract.stepped_by) for i in owners):
            continue
        held = " and ".join(optimizer_text(trace, i) for i in owners) or "no optimizer"
        unknown = not any(_named(trace, o.index, contract.stepped_by) for o in trace.optimizers)
        message = (
            f"{describe_group(trace, contract.group, [p.name for g in covered for p in groups[g]])} is stepped by "
            f"{held}; the contract at {contract.where} says '{contract.stepped_by}' must step it"
            + (" (no optimizer of that name was seen)" if unknown else "")
        )
        wrong = [trace.optimizers[i].created_at for i in owners if not _named(trace, i, contract.stepped_by)]
        findings.append(
            RULE.finding(contract.group, message, first_location([*wrong, contract.where]), related=[contract.where])
        )
    return findings


RULE = Rule(
    code="GA403",
    name="wrong-owner",
    severity=Severity.error,
    summary="a group is stepped by another optimizer than its contract says",
    why=(
        'Only with contracts. `{ group = "obs_encoder", stepped-by = "critic_optimizer" }` states which '
        "optimizer must hold a group (or every group under a module path). Held by another one, the group moves "
        "with that optimizer's steps and learning rate, on gradients of whatever loss that optimizer follows; "
        "held by none, it never learns. The optimizer is named as gradaudit prints it."
    ),
    bad="vae_opt = Adam([*vae.parameters(), *obs_encoder.parameters()])   # the contract says critic_optimizer",
    good="critic_optimizer = Adam([*critic.parameters(), *obs_encoder.parameters()])",
    fix="move the group's parameters into the named optimizer's param_groups, or fix the contract",
    check=check,
    declared=True,
)
