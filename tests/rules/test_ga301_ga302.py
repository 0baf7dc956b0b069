"""GA301 exploding-chain and GA302 vanishing-chain: unit tests on hand-made traces, then the real CLI on fixtures."""

import pytest

from gradaudit.findings import Severity
from gradaudit.rules import ga301_exploding_chain, ga302_vanishing_chain
from gradaudit.trace import Backward, Chain, ChainCall, Location, Trace, Window
from tests.conftest import fixture_line

SITE = Location("train.py", 30, "update")
BACKWARD = Location("train.py", 35, "update")
EXPLODING = ga301_exploding_chain.RULE
VANISHING = ga302_vanishing_chain.RULE


def chain(output_norms, backward=0, module="velocity_net", carried=None, param_norms=None):
    """A chain whose calls have these gradient norms at their outputs; carried calls are linked to the next one."""
    count = len(output_norms)
    carried = carried if carried is not None else [True] * count
    param_norms = param_norms if param_norms is not None else [None] * count
    calls = [
        ChainCall(carried=carried[i], linked=carried[i] and i < count - 1, output_norm=norm, param_norm=param_norms[i])
        for i, norm in enumerate(output_norms)
    ]
    return Chain(module=module, backward=backward, location=SITE, calls=calls)


def trace_with(*chains):
    passes = 1 + max((c.backward for c in chains), default=0)
    backwards = [Backward(i, BACKWARD, True, True, [], ["velocity_net"]) for i in range(passes)]
    return Trace("train.py", Window(passes, "iterations"), backwards=backwards, chains=list(chains))


def geometric(factor, calls, last=1.0):
    """Output-gradient norms, first call to last, when each step back toward the first multiplies by `factor`."""
    return [last * factor ** (calls - 1 - i) for i in range(calls)]


# GA301 exploding-chain ---------------------------------------------------------------------------------------------


def test_expanding_chain_is_reported_at_its_call_site():
    shares = [0.6, 0.2, 0.1, 0.05, 0.02, 0.01, 0.01, 0.005, 0.003, 0.002]
    trace = trace_with(chain(geometric(2.0, 10), param_norms=shares))
    (finding,) = EXPLODING.run(trace)
    assert (finding.rule, finding.subject, finding.location) == ("GA301", "velocity_net", SITE)
    assert finding.severity == Severity.warning
    assert "velocity_net is applied 10 times in a chain, 10 calls carry gradient" in finding.message
    assert "grows 512x from the last gradient-carrying call back to the first (2x per step)" in finding.message
    assert "the backward at train.py:35" in finding.message
    assert "takes 60% of velocity_net's parameter gradient" in finding.message
    assert "torch.no_grad()" in finding.hint and "|Q|.detach().mean()" in finding.hint


def test_end_to_end_threshold_override():
    trace = trace_with(chain(geometric(2.0, 10)))  # 512x end to end, 2x per step (not above 2)
    assert EXPLODING.run(trace, {"max_amplification": 1000.0}) == []
    assert len(EXPLODING.run(trace, {"max_amplification": 1000.0, "max_step_amplification": 1.5})) == 1


def test_per_step_criterion_catches_a_short_exponential_chain():
    trace = trace_with(chain(geometric(3.0, 3)))  # 9x end to end, 3x per step
    (finding,) = EXPLODING.run(trace)
    assert "grows 9x" in finding.message and "(3x per step)" in finding.message
    assert EXPLODING.run(trace, {"min_calls": 4.0}) == []
    assert EXPLODING.run(trace, {"max_step_amplification": 3.5}) == []


def test_two_calls_use_the_end_to_end_criterion_only():
    assert EXPLODING.run(trace_with(chain([3.0, 1.0]))) == []  # one step of 3x is not a rate
    assert len(EXPLODING.run(trace_with(chain([150.0, 1.0])))) == 1


def test_slowly_growing_or_shrinking_chain_is_clean():
    assert EXPLODING.run(trace_with(chain(geometric(1.2, 10)))) == []  # 5.2x, 1.2x per step
    assert EXPLODING.run(trace_with(chain(geometric(0.5, 10)))) == []


def test_gradient_through_the_last_call_only_is_clean():
    carried = [False] * 9 + [True]
    trace = trace_with(chain([None] * 9 + [1.0], carried=carried))
    assert EXPLODING.run(trace) == []
    assert VANISHING.run(trace) == []


def test_only_the_gradient_carrying_run_counts():
    # Steps 0-6 under no_grad, the last 3 keep the graph: 3 calls, 4x per step.
    carried = [False] * 7 + [True] * 3
    (finding,) = EXPLODING.run(trace_with(chain([None] * 7 + [16.0, 4.0, 1.0], carried=carried)))
    assert "applied 10 times in a chain, 3 calls carry gradient" in finding.message
    assert "grows 16x" in finding.message and "(4x per step)" in finding.message


def test_passes_are_merged_and_the_worst_reported():
    trace = trace_with(
        chain(geometric(2.0, 10), backward=0),  # 512x
        chain(geometric(1.1, 10), backward=1),  # 2.4x: clean
        chain(geometric(2.5, 10), backward=2),  # 3815x
    )
    (finding,) = EXPLODING.run(trace)
    assert "grows 3.81e+03x" in finding.message
    assert "worst of 3 backward passes; 2 of them cross the threshold" in finding.message


def test_each_call_site_is_its_own_finding():
    other = chain(geometric(2.0, 10), module="denoiser")
    findings = EXPLODING.run(trace_with(chain(geometric(2.0, 10)), other))
    assert sorted(f.subject for f in findings) == ["denoiser", "velocity_net"]


# GA302 vanishing-chain ---------------------------------------------------------------------------------------------


def test_contracting_chain_is_info():
    trace = trace_with(chain(geometric(0.3, 30), module="rnn_cell"))
    (finding,) = VANISHING.run(trace)
    assert (finding.rule, finding.subject, finding.location) == ("GA302", "rnn_cell", SITE)
    assert finding.severity == Severity.info
    assert "rnn_cell is applied 30 times in a chain, 30 calls carry gradient" in finding.message
    assert "shrinks to 6.86e-16x" in finding.message and "(0.3x per step)" in finding.message
    assert VANISHING.run(trace, {"min_amplification": 1e-20, "min_step_amplification": 0.2}) == []


def test_short_contracting_chain_needs_min_calls():
    trace = trace_with(chain(geometric(0.4, 3)))  # 0.16x end to end, 0.4x per step
    assert len(VANISHING.run(trace)) == 1
    assert VANISHING.run(trace, {"min_calls": 4.0}) == []


def test_gated_chain_that_shrinks_slowly_is_clean():
    assert VANISHING.run(trace_with(chain(geometric(0.9, 30)))) == []  # 0.047x, 0.9x per step
    assert VANISHING.run(trace_with(chain(geometric(2.0, 10)))) == []


def test_vanishing_reports_the_smallest_pass():
    trace = trace_with(chain(geometric(0.3, 10), backward=0), chain(geometric(0.1, 10), backward=1))
    (finding,) = VANISHING.run(trace)
    assert "shrinks to 1e-09x" in finding.message and "all 2 cross the threshold" in finding.message


def test_gradient_vanishing_to_exactly_zero_is_reported():
    (finding,) = VANISHING.run(trace_with(chain([0.0, 0.5, 1.0])))
    assert "shrinks to 0x" in finding.message and "per step" not in finding.message


# Through the CLI ---------------------------------------------------------------------------------------------------


def test_flow_sampler_with_gradient_through_every_step_explodes(gradaudit_cli):
    result = gradaudit_cli("run", "flow_sampler.py")
    (finding,) = result.findings("GA301")
    assert finding["severity"] == "warning"
    assert finding["subject"] == "velocity_net"
    assert "velocity_net is applied 10 times in a chain, 10 calls carry gradient" in finding["message"]
    assert finding["location"]["line"] == fixture_line("flow_sampler.py", "GA301-here")


def test_flow_sampler_with_gradient_through_the_last_step_is_clean(gradaudit_cli):
    result = gradaudit_cli("run", "flow_sampler.py", "--", "--single-step")
    assert result.at_least_warning() == []
    assert result.findings("GA301") == []


def test_contracting_rnn_cell_vanishes_at_info(gradaudit_cli):
    result = gradaudit_cli("run", "rnn_loop.py")
    (finding,) = result.findings("GA302")
    assert finding["severity"] == "info"
    assert finding["subject"] == "rnn_cell"
    assert finding["location"]["line"] == fixture_line("rnn_loop.py", "GA302-here")
    assert result.at_least_warning() == []
    assert result.exit_code == 0


@pytest.mark.parametrize("script", ["healthy_lstm.py"])
def test_clipped_lstm_has_nothing_at_warning_or_above(gradaudit_cli, script):
    result = gradaudit_cli("run", script)
    assert result.report is not None
    assert result.at_least_warning() == []
    assert result.findings("GA301") == []
