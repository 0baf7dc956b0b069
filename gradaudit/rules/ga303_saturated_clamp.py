"""GA303 saturated-clamp: most elements of a clamp on the loss graph sit outside its bounds, with zero gradient."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.rules.sites import worst_per_site
from gradaudit.trace import Clamp, Trace


def bounds_text(lower: float | None, upper: float | None) -> str:
    """`[-20, 20]`, `min 1e-08`, `max 2`."""
    if lower is not None and upper is not None:
        return f"[{lower:g}, {upper:g}]"
    if lower is not None:
        return f"min {lower:g}"
    if upper is not None:
        return f"max {upper:g}"
    return "no bounds"


_TWIN_FIX = (
    "the clip range is small for how far one update moves its input: widen it, normalise the values or advantages, "
    "or take smaller or fewer steps per batch"
)


def dead_share(clamp: Clamp) -> float:
    """The share of elements that get no gradient through the clamp: where a max/min picks between its branch and
    an unclamped twin, only the saturated elements that the max/min selects."""
    return clamp.selection.zero_share if clamp.selection is not None else clamp.saturated


def _message(worst: Clamp, subject: str, times: str) -> str:
    bounds = bounds_text(worst.lower, worst.upper)
    selection = worst.selection
    if selection is None:
        return (
            f"`{subject}` has {100 * worst.saturated:.3g}% of its {worst.elements} elements outside {bounds} "
            f"({100 * worst.below:.3g}% below, {100 * worst.above:.3g}% above) {times}: their gradient is zero"
        )
    learners = ", ".join(worst.groups_reached) or "the parameters behind it"
    verb = "stops" if len(worst.groups_reached) == 1 else "stop"
    return (
        f"{times}, for {100 * selection.zero_share:.3g}% of the elements the {selection.op} `{selection.expression}` "
        f"at {selection.location} selects the branch through `{subject}` where the clamp is saturated "
        f"({100 * worst.saturated:.3g}% of its {worst.elements} elements are outside {bounds}): their gradient is "
        f"zero, so {learners} {verb} learning from those samples"
    )


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    findings = []
    for site in worst_per_site(
        (clamp for clamp in trace.clamps if not clamp.gate),
        lambda clamp: (clamp.op, clamp.location),
        lambda clamp: dead_share(clamp) > options["max_saturated"],
        badness=dead_share,
    ):
        subject = site.worst.expression or site.worst.op
        hint = _TWIN_FIX if site.worst.selection is not None else None
        message = _message(site.worst, subject, site.over_threshold())
        findings.append(RULE.finding(subject, message, site.worst.location, hint=hint))
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
        "max_saturated = 0.5 (fraction of elements outside the bounds, or selected there; see below) - past one half, the clamp silences more of "
        "the batch than it passes, so the loss is learning from a minority of its samples; a guard that binds that "
        "often is no longer a guard but the thing that decides the gradient. ReLU-style gates (relu, relu6) are "
        "listed in the report but not flagged: half-inactive hidden units are normal, and a fully inactive hinge "
        "(max(0, g) with g <= 0) is usually a satisfied constraint; GA102 covers a term whose gradient is zero. "
        "Where a max/min picks, element by element, between the clamped branch and an unclamped twin (PPO's ratio "
        "clip `min(r * A, clamp(r, 1 - eps, 1 + eps) * A)`, its value clip `max((v - R)^2, (v_old + clamp(v - v_old, "
        "-eps, eps) - R)^2)`), saturation alone says nothing: the threshold applies to the share of elements for "
        "which the max/min selects a saturated element of the clamped branch, the ones that really get no gradient "
        "(a value clip too small for the value scale stops the critic learning after its first minibatch). "
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
