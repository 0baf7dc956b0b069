"""GA305 nonfinite-grad: NaN or Inf in a loss or a gradient."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.rules.flow import backward_text, describe_group
from gradaudit.trace import Backward, NonFiniteOrigin, Trace


def _loss_finding(trace: Trace, backward: Backward, origin: NonFiniteOrigin | None) -> Finding:
    message = f"the loss of {backward_text(trace, backward.index)} is NaN or infinite"
    if origin is None:
        if trace.light:
            message += " (light mode did not trace the op that produced it: audit without --light to find it)"
        return RULE.finding("loss", message, backward.location)
    kind = {"nan": "NaN", "inf": "Inf"}.get(origin.kind, origin.kind)
    expression = f" in `{origin.expression}`" if origin.expression else ""
    where = f" at {origin.location}" if origin.location else ""
    message += f": the first {kind} was produced by {origin.op}{expression}{where}, from finite inputs"
    return RULE.finding("loss", message, origin.location or backward.location)


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    origins: dict[int, NonFiniteOrigin] = {}
    for origin in trace.nonfinite_origins:
        origins.setdefault(origin.backward, origin)
    findings: dict[tuple, Finding] = {}
    explained: dict[tuple, bool] = {}
    for backward in trace.backwards:
        if backward.loss_finite:
            continue
        key, origin = ("loss", backward.location), origins.get(backward.index)
        # One finding per call site: the first pass whose origin is known, else the first pass.
        if key not in findings or (origin is not None and not explained[key]):
            findings[key] = _loss_finding(trace, backward, origin)
            explained[key] = origin is not None
    params = {p.name: p for p in trace.parameters}
    bad_grads: dict[str, list] = {}
    for event in trace.events:
        if event.kind == "accumulate" and not event.finite:
            bad_grads.setdefault(params[event.param].group, []).append(event)
    for group, events in bad_grads.items():
        first = min(events, key=lambda e: e.seq)
        subject = describe_group(trace, group, sorted({e.param for e in events}))
        message = f"{subject} received a NaN or infinite gradient from {backward_text(trace, first.backward or 0)}"
        findings.setdefault((group, None), RULE.finding(group, message, first.location))
    return list(findings.values())


RULE = Rule(
    code="GA305",
    name="nonfinite-grad",
    severity=Severity.error,
    summary="NaN/Inf in a loss or gradient",
    why=(
        "One non-finite gradient poisons every parameter an optimizer steps with it (Adam's moments keep the NaN "
        "forever). Typical sources: log of zero or a negative, exp overflow, division by a zero std, "
        "torch.where after an op that already produced inf (its gradient is still NaN). When the forward op that "
        "first turned finite inputs into a NaN or Inf was traced, a non-finite loss is reported at that op's line, "
        "with its expression, rather than at the backward call."
    ),
    bad="log_prob = torch.log(probs)             # probs can be exactly 0",
    good="log_prob = torch.log(probs.clamp_min(1e-8))   # or use log_softmax",
    fix="find the first op that produced the non-finite value and guard its input (clamp, log_softmax, mask before exp)",
    check=check,
)
