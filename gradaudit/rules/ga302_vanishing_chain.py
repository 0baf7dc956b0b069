"""GA302 vanishing-chain: a repeatedly applied module shrinks the gradient along its chain of calls."""

from __future__ import annotations

import math
from collections.abc import Mapping

from gradaudit.findings import Finding, Rule, Severity
from gradaudit.rules.chains import describe, long_enough, worst_chains
from gradaudit.trace import Chain, Trace


def check(trace: Trace, options: Mapping[str, float]) -> list[Finding]:
    def vanishes(chain: Chain) -> bool:
        amplification, per_step = chain.amplification(), chain.per_step()
        if amplification is None:
            return False
        if amplification < options["min_amplification"]:
            return True
        return (
            per_step is not None
            and long_enough(chain, options["min_calls"])
            and per_step < options["min_step_amplification"]
        )

    def smallness(chain: Chain) -> float:
        amplification = chain.amplification()
        return -amplification if amplification is not None else -math.inf

    findings = []
    for verdict in worst_chains(trace, vanishes, badness=smallness):
        message = describe(trace, verdict, lambda amplification: f"shrinks to {amplification:.3g}x")
        findings.append(RULE.finding(verdict.worst.module, message, verdict.worst.location))
    return findings


RULE = Rule(
    code="GA302",
    name="vanishing-chain",
    severity=Severity.info,
    summary="a repeatedly applied module shrinks gradient along its chain of calls",
    why=(
        "The mirror of GA301: each step's Jacobian contracts, so the gradient reaching the early calls of an "
        "unrolled chain (an RNN cell over time, an unrolled solver) shrinks exponentially, and the early steps "
        "learn nothing from a loss on the late ones. Shrinking gradients along time are normal for recurrent nets "
        "(a contracting recurrence is a stable one, and gates forget on purpose), so this informs rather than "
        "warns; it matters when the loss depends on long-range inputs. The norms are read during the backward, "
        "before any clip_grad_norm_. Options: min_amplification = 0.01 (end-to-end: gradient norm at the first "
        "gradient-carrying call's output over the last one's) - the inverse of GA301's 100: the first step gets "
        "under 1% of the signal of the last, less than minibatch noise. min_step_amplification = 0.5 (geometric "
        "mean per step) - halving per step is exponential decay (2^-10 = 1e-3 over ten steps). min_calls = 3 - "
        "one step is one Jacobian, not a rate, so the per-step criterion needs a run of three linked "
        "gradient-carrying calls; the end-to-end criterion applies to any run of two or more. Chains of one call "
        "site are merged across the window's backward passes: the worst (smallest) is reported."
    ),
    bad=(
        "h = torch.zeros(batch, hidden)\n"
        "for x_t in sequence:                 # 30 steps of a contracting tanh cell\n"
        "    h = rnn_cell(x_t, h)\n"
        "loss = F.mse_loss(head(h), y)          # only the last state is scored"
    ),
    good=(
        "for x_t in sequence:\n"
        "    h, c = lstm_cell(x_t, (h, c))     # a gated cell keeps a gradient path through c\n"
        "    outputs.append(head(h))\n"
        "loss = F.mse_loss(torch.stack(outputs), ys)   # or a loss at every step"
    ),
    fix=(
        "if the early steps should learn from this loss: use a gated cell (LSTM/GRU) or residual connections, "
        "score every step rather than the last, or truncate the chain to the steps that matter"
    ),
    check=check,
    options={"min_amplification": 0.01, "min_step_amplification": 0.5, "min_calls": 3.0},
)
