"""GA301 exploding-chain: a repeatedly applied module amplifies the gradient along its chain of calls."""

from __future__ import annotations

from collections.abc import Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.rules.chains import describe, worst_chains
from gradaudit.trace import Chain, Trace


def exploding(amplification: float | None, calls: int, options: Mapping[str, float]) -> bool:
    """Whether a run of `calls` linked gradient-carrying calls that amplifies the gradient `amplification` times end
    to end explodes (whole-run watching asks this of a cheap reading, to decide on a full audit)."""
    if amplification is None:
        return False
    if amplification > options["max_amplification"]:
        return True
    return (
        calls >= max(options["min_calls"], 2)
        and amplification > 0
        and amplification ** (1 / (calls - 1)) > options["max_step_amplification"]
    )


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    def explodes(chain: Chain) -> bool:
        return exploding(chain.amplification(), len(chain.carried_run()), options)

    findings = []
    for verdict in worst_chains(trace, explodes, badness=lambda chain: chain.amplification() or 0.0):
        message = describe(trace, verdict, lambda amplification: f"grows {amplification:.3g}x")
        findings.append(RULE.finding(verdict.worst.module, message, verdict.worst.location))
    return findings


RULE = Rule(
    code="GA301",
    name="exploding-chain",
    severity=Severity.warning,
    summary="a repeatedly applied module amplifies gradient along its chain of calls",
    why=(
        "When a module's output feeds its own next call (an unrolled flow or diffusion sampler, an RNN cell, a "
        "fixed-point loop) and the loss backpropagates through every call, the gradient is multiplied by each "
        "step's Jacobian. An expanding map multiplies it by more than one per step, so the gradient reaching the "
        "early calls grows exponentially with the number of steps: the early steps take nearly all of the "
        "parameter gradient, and the number of steps, a knob that should not change the learning rate, silently "
        "scales the loss it flows from (the seed case: a Q-loss through 10 Euler steps of a flow policy, whose "
        "Q-values then run away). The norms are those of the gradient at each call's output, read during the "
        "backward, before any clip_grad_norm_: clipping afterwards hides the scale from the step but not the skew "
        "toward the early calls. Options: max_amplification = 100 (end-to-end: gradient norm at the first "
        "gradient-carrying call's output over the last one's) - two orders of magnitude is where a loss weight the "
        "author chose (alpha) is off by more than any sane tuning range, and the chain, not the author, decides "
        "what is learned. max_step_amplification = 2 (geometric mean per step) - a healthy step of a residual or "
        "Euler update x + v(x)/n has a Jacobian near the identity; doubling per step means the growth is "
        "exponential in the chain length (2^10 = 1024 over ten steps), which the end-to-end criterion cannot yet "
        "see on a short run. min_calls = 3 - the per-step criterion applies only to runs of at least three linked "
        "gradient-carrying calls, because one step of 2x is one Jacobian, not a rate; the end-to-end criterion "
        "applies to any run of two or more. Chains of one call site are merged across the backward passes of the "
        "window: the worst is reported, with how many passes crossed."
    ),
    bad=(
        "x = noise\n"
        "for i in range(10):\n"
        "    x = x + velocity_net(x, i / 10) / 10     # all 10 steps keep the graph\n"
        "q_loss = -critic(obs, x).mean()"
    ),
    good=(
        "with torch.no_grad():\n"
        "    for i in range(9):\n"
        "        x = x + velocity_net(x, i / 10) / 10\n"
        "x = x + velocity_net(x, 0.9) / 10            # gradient through the last step only\n"
        "q_loss = -critic(obs, x).mean() / critic(obs, x).abs().mean().detach()"
    ),
    fix=(
        "keep gradient through fewer steps (run all but the last k steps under torch.no_grad()); normalise a "
        "Q-loss by |Q|.detach().mean(); clip the gradient norm (torch.nn.utils.clip_grad_norm_); use a smaller "
        "Q-loss weight (alpha)"
    ),
    check=check,
    options={"max_amplification": 100.0, "max_step_amplification": 2.0, "min_calls": 3.0},
)
