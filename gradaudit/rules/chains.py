"""Pure helpers shared by the chain rules (GA301, GA302): one verdict per call site over the window, and its words."""

from __future__ import annotations

from collections.abc import Callable

from gradaudit.rules.flow import backward_text
from gradaudit.rules.sites import Site, worst_per_site
from gradaudit.trace import Chain, Trace


def worst_chains(trace: Trace, crosses: Callable[[Chain], bool], badness: Callable[[Chain], float]) -> list[Site]:
    """One verdict per (module, call site): the worst chain among the passes that crossed."""
    return worst_per_site(trace.chains, lambda chain: (chain.module, chain.location), crosses, badness)


def long_enough(chain: Chain, min_calls: float) -> bool:
    """The per-step criterion needs a run of at least `min_calls` gradient-carrying linked calls."""
    return len(chain.carried_run()) >= min_calls


def describe(trace: Trace, verdict: Site, change: Callable[[float], str]) -> str:
    """`velocity_net is applied 10 times in a chain, 10 calls carry gradient: the gradient norm grows 512x ...`."""
    chain = verdict.worst
    run = chain.carried_run()
    carrying = sum(call.carried for call in chain.calls)
    amplification = chain.amplification()
    per_step = chain.per_step()
    parts = [
        f"{chain.module} is applied {len(chain.calls)} time{'s' if len(chain.calls) != 1 else ''} in a chain, "
        f"{carrying} call{'s' if carrying != 1 else ''} carry gradient"
    ]
    if len(run) != carrying:
        parts.append(f" ({len(run)} of them linked in one run)")
    if amplification is not None:
        step = f" ({per_step:.3g}x per step)" if per_step is not None else ""
        parts.append(
            f": the gradient norm at its output {change(amplification)} from the last gradient-carrying call back "
            f"to the first{step}"
        )
    parts.append(f" in {_backward(trace, chain.backward)} ({_times(verdict)})")
    share = chain.param_shares()[run[0]] if run else None
    if share is not None:
        parts.append(
            f"; the first gradient-carrying call takes {100 * share:.3g}% of {chain.module}'s parameter gradient"
        )
    return "".join(parts)


def _backward(trace: Trace, index: int) -> str:
    known = 0 <= index < len(trace.backwards) and trace.backwards[index].index == index
    return backward_text(trace, index) if known else f"backward #{index}"


def _times(verdict: Site) -> str:
    if verdict.seen == 1:
        return "the one backward pass seen"
    if verdict.crossed == verdict.seen:
        return f"the worst of {verdict.seen} backward passes; all {verdict.seen} cross the threshold"
    return f"the worst of {verdict.seen} backward passes; {verdict.crossed} of them cross the threshold"
