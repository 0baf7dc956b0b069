"""GA304 exp-overflow: exp() of inputs large enough to overflow, or to dominate the loss and its gradient."""

from __future__ import annotations

import math
from collections.abc import Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.rules.sites import worst_per_site
from gradaudit.trace import Trace


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    findings = []
    for site in worst_per_site(
        trace.exps,
        lambda exp: (exp.op, exp.location),
        lambda exp: exp.overflow > 0 or exp.max_input > options["max_input"],
        badness=lambda exp: (exp.overflow, exp.max_input),
    ):
        worst = site.worst
        subject = worst.expression or worst.op
        output = f"largest finite output {worst.max_output:.3g}" if worst.max_output is not None else "no finite output"
        times = site.over_threshold()
        message = f"`{subject}` takes inputs up to {worst.max_input:.3g} ({output}, {worst.dtype}) {times}"
        if worst.overflow:
            message += (
                f"; {worst.overflow} of its {worst.elements} elements overflowed to inf, whose gradient is inf or NaN"
            )
        else:
            message += (
                f"; none of its {worst.elements} elements overflowed, but outputs above "
                f"{math.exp(options['max_input']):.3g} already dominate the loss and its gradient"
            )
        findings.append(RULE.finding(subject, message, worst.location, Severity.error if worst.overflow else None))
    return findings


RULE = Rule(
    code="GA304",
    name="exp-overflow",
    severity=Severity.warning,
    summary="exp() of inputs large enough to overflow or dominate",
    why=(
        "The derivative of exp is its output, so a large input means a huge value and a huge gradient from a few "
        "elements; past 88.7 float32 overflows to inf (float16 past 11.1, float64 past 709.8), and inf times a zero "
        "upstream gradient is NaN. Option: max_input = 9.21 (log 1e4): an exp above 1e4 is a probability ratio beyond 10,000, at "
        "which a PPO-style surrogate is meaningless and a handful of samples carry the whole gradient; the finding "
        "is an error when any element actually overflowed. Masking after exp with torch.where does not help: the "
        "forward looks clean but the unselected branch's gradient (0 * inf) is still NaN. Exps of one call site are "
        "merged across the window's backward passes: the worst is reported."
    ),
    bad=(
        "ratio = torch.exp(new_logp - old_logp)\n"
        "ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))   # NaN gradient still leaks"
    ),
    good="log_ratio = (new_logp - old_logp).clamp(-10, 10)   # or mask the log-ratio before exp\nratio = torch.exp(log_ratio)",
    fix=(
        "clamp or mask the input before exp (masking after exp with torch.where still leaks NaN gradients), e.g. "
        "clamp a log-ratio to +-10; for PPO, a smaller learning rate or fewer epochs keeps the ratio near 1"
    ),
    check=check,
    options={"max_input": 9.21},
)
