"""GA303 saturated-clamp: most elements of a clamp on the loss graph sit outside its bounds, with zero gradient."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.rules.sites import worst_per_site
from gradaudit.trace import Trace


def bounds_text(lower: float | None, upper: float | None) -> str:
    """`[-20, 20]`, `min 1e-08`, `max 2`."""
    if lower is not None and upper is not None:
        return f"[{lower:g}, {upper:g}]"
    if lower is not None:
        return f"min {lower:g}"
    if upper is not None:
        return f"max {upper:g}"
    return "no bounds"


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    findings = []
    for site in worst_per_site(
        (clamp for clamp in trace.clamps if not clamp.gate),
        lambda clamp: (clamp.op, clamp.location),
        lambda clamp: clamp.saturated > options["max_saturated"],
        badness=lambda clamp: clamp.saturated,
    ):
        worst = site.worst
        subject = worst.expression or worst.op
        times = site.over_threshold()
        message = (
            f"`{subject}` has {100 * worst.saturated:.3g}% of its {worst.elements} elements outside "
            f"{bounds_text(worst.lower, worst.upper)} ({100 * worst.below:.3g}% below, {100 * worst.above:.3g}% "
            f"above) {times}: their gradient is zero"
        )
        findings.append(RULE.finding(subject, message, worst.location))
    return findings


RULE = Rule(
    code="GA303",
    name="saturated-clamp",
    severity=Severity.warning,
    summary="most elements of a clamp in the loss graph sit at its bounds",
    why=(
        "A clamp passes zero gradient to every element outside its bounds. A clamp meant as a guard (a NaN guard on "
        "a PPO log-ratio, a floor on a standard deviation, a range on a log-std) should almost never bind; when "
        "most elements sit at the bounds, most of the batch stops training through this op, and in PPO the "
        "log-ratio clamp removes exactly the gradient that would pull an exploded ratio back. Option: "
        "max_saturated = 0.5 (fraction of elements outside the bounds) - past one half, the clamp silences more of "
        "the batch than it passes, so the loss is learning from a minority of its samples; a guard that binds that "
        "often is no longer a guard but the thing that decides the gradient. ReLU-style gates (relu, relu6) are "
        "listed in the report but not flagged: half-inactive hidden units are normal, and a fully inactive hinge "
        "(max(0, g) with g <= 0) is usually a satisfied constraint; GA102 covers a term whose gradient is zero. "
        "Clamps of one call site are merged across the window's backward passes: the worst is reported."
    ),
    bad=(
        "log_ratio = torch.clamp(new_logp - old_logp, -20, 20)   # old_logp from a far-away policy\n"
        "ratio = torch.exp(log_ratio)"
    ),
    good=(
        "log_ratio = new_logp - old_logp          # old_logp recorded by the policy that acted\n"
        "ratio = torch.exp(log_ratio.clamp(-20, 20))   # a guard that should never bind"
    ),
    fix=(
        "find why the input leaves the bounds (a stale or wrong reference, a too-large update, unnormalised "
        "inputs) and fix that; widen the bounds if the clamp is only a guard"
    ),
    check=check,
    options={"max_saturated": 0.5},
)
