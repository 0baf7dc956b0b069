"""GA306 term-dominance: a loss term whose gradient is dwarfed, everywhere it acts, by another term's."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.rules.flow import contributions
from gradaudit.trace import Backward, Location, Term, Trace


@dataclass(frozen=True)
class Dominance:
    """How far a term is outweighed on the group where it counts most, in one backward pass."""

    ratio: float
    group: str
    strong: str


def applied_groups(trace: Trace) -> dict[int, set[str]]:
    """Per backward: the parameter groups whose gradient from it some optimizer step (or update) applied."""
    group_of = {p.name: p.group for p in trace.parameters}
    applied: dict[int, set[str]] = {}
    for contribution in contributions(trace):
        if contribution.applied_by:
            applied.setdefault(contribution.backward, set()).add(group_of[contribution.param])
    return applied


def dominance(backward: Backward, term: Term, stepped: set[str]) -> Dominance | None:
    """The smallest, over the stepped groups the term moves, of (strongest other term's norm) / (its norm).

    A term that leads on some group, or alone trains one (a value head next to a shared encoder), is not drowned.
    """
    best: Dominance | None = None
    for group, norm in term.grad_norms.items():
        if not 0 < norm < math.inf or group not in stepped:
            continue
        rivals = [(other.grad_norms.get(group, 0.0), other.name) for other in backward.terms if other is not term]
        if not all(math.isfinite(rival) for rival, _ in rivals):
            continue  # a ratio to a NaN or infinite gradient says nothing: non-finite gradients are GA305's
        strong_norm, strong = max(rivals, default=(0.0, ""))
        ratio = strong_norm / norm
        if best is None or ratio < best.ratio:
            best = Dominance(ratio, group, strong)
    return best


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    stepped = applied_groups(trace)
    seen: dict[tuple[Location | None, str], list[Dominance]] = {}
    term_locations: dict[tuple[Location | None, str], Location | None] = {}
    for backward in trace.backwards:
        for term in backward.terms:
            found = dominance(backward, term, stepped.get(backward.index, set()))
            if found is not None:
                seen.setdefault((backward.location, term.name), []).append(found)
                term_locations.setdefault((backward.location, term.name), term.location)
    findings = []
    for (site, name), passes in seen.items():
        ratio = statistics.median(d.ratio for d in passes)
        if ratio <= options["max_ratio"]:
            continue
        typical = min(passes, key=lambda d: abs(d.ratio - ratio))
        count = f"{len(passes)} backward pass{'es' if len(passes) != 1 else ''}"
        where = f" at {site}" if site else ""
        message = (
            f"on {typical.group}, the gradient of `{typical.strong}` is {ratio:.3g}x that of `{name}` (median over "
            f"{count}{where}), and `{name}` leads on no other group it trains: it barely acts"
        )
        findings.append(RULE.finding(name, message, term_locations[(site, name)]))
    return findings


RULE = Rule(
    code="GA306",
    name="term-dominance",
    severity=Severity.info,
    summary="one term's gradient dwarfs another's on every group the weaker term trains",
    why=(
        "The optimizer follows the gradient of the sum. When another term's gradient on a parameter group is a "
        "hundred times a term's own, the term moves the update direction there by under 1%, less than the noise "
        "between minibatches: its coefficient is, in effect, zero, whatever value the author chose (a BC weight "
        "that swamps the Q-loss, a Q-loss of scale 1e3 next to a BC loss of scale 1). A term is reported only when "
        "it is outweighed on every group it trains: one that alone trains a head (a value loss next to a shared "
        "encoder) acts fully there. Only groups whose gradient from that backward an optimizer step applied count, "
        "so a critic the actor loss merely evaluates through does not. Option: max_ratio = 100 (strongest other "
        "term's gradient norm over the term's own) - two orders of magnitude, where the term's share of the update "
        "falls to 1%. The ratio is the median over the window's backward passes at one call site, because one "
        "minibatch can swing it. It is measured per parameter group (module), never per tensor: tensors of one "
        "module have different natural scales. Informational by default: a regulariser at its optimum (the entropy "
        "bonus of a near-uniform policy at the start of training) is legitimately tiny; a BC / RL balance that "
        "stays this lopsided is the case to act on. A term with an exactly zero gradient is GA102's business."
    ),
    bad="actor_loss = bc_loss + 1e-4 * pg_loss      # pg's gradient is 1000x smaller on the shared actor",
    good=(
        "q_loss = -q.mean() / q.abs().mean().detach()   # a Q-loss of unit scale\nactor_loss = bc_loss + alpha * q_loss"
    ),
    fix=(
        "rebalance the coefficient (or normalise the term, e.g. a Q-loss by |Q|.detach().mean()), or adapt the "
        "coefficient to a target gradient ratio"
    ),
    check=check,
    options={"max_ratio": 100.0},
)
