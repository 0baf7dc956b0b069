"""GA303 saturated-clamp and GA304 exp-overflow: unit tests on hand-made traces, then the real CLI on a PPO update."""

import math

from gradaudit.findings import Severity
from gradaudit.rules import ga303_saturated_clamp, ga304_exp_overflow
from gradaudit.trace import Clamp, Exp, Location, Selection, Trace, Window
from tests.conftest import fixture_line

CLAMP_SITE = Location("ppo.py", 40, "update")
EXP_SITE = Location("ppo.py", 41, "update")
SATURATED = ga303_saturated_clamp.RULE
OVERFLOW = ga304_exp_overflow.RULE
LOG_RATIO_CLAMP = "torch.clamp(new_logp - old_logp, -20, 20)"


MAX_SITE = Location("ppo.py", 44, "update")
VALUE_CLIP = "torch.clamp(v - v_old, -0.2, 0.2)"


def clamp(below, above, backward=0, lower=-20.0, upper=20.0, op="clamp", gate=False, expression=LOG_RATIO_CLAMP):
    return Clamp(op, CLAMP_SITE, expression, backward, lower, upper, 256, below, above, gate)


def value_clip(saturated, selected_dead, backward=0):
    selection = Selection("max", MAX_SITE, "torch.max(unclipped, clipped)", selected_dead)
    return Clamp(
        "clamp", CLAMP_SITE, VALUE_CLIP, backward, -0.2, 0.2, 256, 0.0, saturated, False, selection, ["critic"]
    )


def exp(max_input, overflow=0, backward=0, max_output=None, dtype="float32"):
    output = max_output if max_output is not None else (math.exp(max_input) if max_input < 88.7 else None)
    return Exp("exp", EXP_SITE, "torch.exp(log_ratio)", backward, dtype, max_input, output, overflow, 256)


def trace_with(clamps=(), exps=()):
    return Trace("ppo.py", Window(3, "iterations"), clamps=list(clamps), exps=list(exps))


# GA303 saturated-clamp ---------------------------------------------------------------------------------------------


def test_mostly_saturated_clamp_is_reported():
    (finding,) = SATURATED.run(trace_with([clamp(0.35, 0.40)]))
    assert (finding.rule, finding.subject, finding.location) == ("GA303", LOG_RATIO_CLAMP, CLAMP_SITE)
    assert finding.severity == Severity.warning
    assert "75% of its 256 elements outside [-20, 20] (35% below, 40% above)" in finding.message
    assert "their gradient is zero" in finding.message


def test_guard_that_rarely_binds_is_clean():
    assert SATURATED.run(trace_with([clamp(0.01, 0.02)])) == []
    assert SATURATED.run(trace_with([clamp(0.25, 0.25)])) == []  # exactly half: not "most"


def test_max_saturated_override():
    trace = trace_with([clamp(0.2, 0.1)])
    assert SATURATED.run(trace) == []
    assert len(SATURATED.run(trace, {"max_saturated": 0.25})) == 1
    assert SATURATED.run(trace_with([clamp(0.35, 0.40)]), {"max_saturated": 0.8}) == []


def test_relu_gates_are_not_flagged():
    gate = clamp(0.9, 0.0, op="relu", lower=0.0, upper=None, gate=True, expression="torch.relu(gap)")
    assert SATURATED.run(trace_with([gate])) == []


def test_one_sided_bounds_are_spelled_out():
    floor = clamp(0.7, 0.0, op="clamp_min", lower=1e-8, upper=None, expression="std.clamp_min(1e-8)")
    (finding,) = SATURATED.run(trace_with([floor]))
    assert "outside min 1e-08 (70% below, 0% above)" in finding.message
    assert ga303_saturated_clamp.bounds_text(None, 2.0) == "max 2"


def test_clamp_passes_are_merged_and_the_worst_reported():
    trace = trace_with([clamp(0.1, 0.1, backward=0), clamp(0.3, 0.3, backward=1), clamp(0.45, 0.45, backward=2)])
    (finding,) = SATURATED.run(trace)
    assert "90% of its 256 elements" in finding.message
    assert "worst of 3 backward passes (2 over the threshold)" in finding.message


def test_clamp_with_a_twin_is_judged_by_the_elements_its_max_selects():
    (finding,) = SATURATED.run(trace_with([value_clip(0.9, 0.1, backward=0), value_clip(0.95, 0.73, backward=1)]))
    assert (finding.rule, finding.subject, finding.location) == ("GA303", VALUE_CLIP, CLAMP_SITE)
    assert "for 73% of the elements the max `torch.max(unclipped, clipped)` at ppo.py:44 selects" in finding.message
    assert "their gradient is zero, so critic stops learning from those samples" in finding.message
    assert "95% of its 256 elements are outside [-0.2, 0.2]" in finding.message
    assert "worst of 2 backward passes (1 over the threshold)" in finding.message
    assert "clip range" in finding.hint


def test_saturated_clamp_whose_max_selects_the_unclamped_twin_is_clean():
    assert SATURATED.run(trace_with([value_clip(1.0, 0.0), value_clip(0.8, 0.5, backward=1)])) == []


# GA304 exp-overflow ------------------------------------------------------------------------------------------------


def test_large_exp_input_is_a_warning():
    (finding,) = OVERFLOW.run(trace_with(exps=[exp(20.0)]))
    assert (finding.rule, finding.subject, finding.location) == ("GA304", "torch.exp(log_ratio)", EXP_SITE)
    assert finding.severity == Severity.warning
    assert "inputs up to 20 (largest finite output 4.85e+08, float32)" in finding.message
    assert "none of its 256 elements overflowed" in finding.message
    assert "before exp" in finding.hint


def test_overflow_is_an_error():
    (finding,) = OVERFLOW.run(trace_with(exps=[exp(85.0, backward=0), exp(95.0, overflow=12, backward=1)]))
    assert finding.severity == Severity.error
    assert "inputs up to 95" in finding.message
    assert "12 of its 256 elements overflowed to inf" in finding.message


def test_all_outputs_overflowed():
    (finding,) = OVERFLOW.run(trace_with(exps=[exp(100.0, overflow=256)]))
    assert "(no finite output, float32)" in finding.message and finding.severity == Severity.error


def test_small_exp_input_is_clean():
    assert OVERFLOW.run(trace_with(exps=[exp(0.04), exp(9.0, backward=1)])) == []


def test_max_input_override():
    assert OVERFLOW.run(trace_with(exps=[exp(20.0)]), {"max_input": 25.0}) == []
    assert len(OVERFLOW.run(trace_with(exps=[exp(5.0)]), {"max_input": 4.0})) == 1
    # An overflow is reported whatever the threshold.
    assert len(OVERFLOW.run(trace_with(exps=[exp(80.0, overflow=1)]), {"max_input": 1000.0})) == 1


# Through the CLI ---------------------------------------------------------------------------------------------------


def test_ppo_against_far_away_log_probs_saturates_the_guard_and_feeds_exp_large_inputs(gradaudit_cli):
    result = gradaudit_cli("run", "ppo_clamp.py", "--", "--big-move")
    guard = [f for f in result.findings("GA303") if f["subject"] == LOG_RATIO_CLAMP]
    (finding,) = guard
    assert finding["severity"] == "warning"
    assert "[-20, 20]" in finding["message"]
    assert finding["location"]["line"] == fixture_line("ppo_clamp.py", "GA303-here")
    # Every element the guard saturates is dead in both branches of PPO's max, whichever it selects.
    assert (
        "for 75.4% of the elements the max `torch.max(-advantages * ratio, -advantages * clipped)`"
        in finding["message"]
    )
    assert "log_std, policy stop learning from those samples" in finding["message"]
    # The ratio clip's own saturated elements are selected for fewer than half of the samples: not reported.
    assert [f["subject"] for f in result.findings("GA303")] == [LOG_RATIO_CLAMP]
    (finding,) = result.findings("GA304")
    assert finding["severity"] == "warning"
    assert finding["subject"] == "torch.exp(log_ratio)"
    assert "inputs up to 20" in finding["message"]
    assert finding["location"]["line"] == fixture_line("ppo_clamp.py", "GA304-here")


def test_healthy_ppo_update_is_clean(gradaudit_cli):
    result = gradaudit_cli("run", "ppo_clamp.py")
    assert result.at_least_warning() == []
    assert result.exit_code == 0


def test_value_clip_too_small_for_the_value_scale_stops_the_critic(gradaudit_cli):
    result = gradaudit_cli("run", "ppo_value_clip.py", "--", "--value-offset", "10")
    (finding,) = result.findings("GA303")
    assert finding["subject"] == "torch.clamp(value_change, -CLIP_VF, CLIP_VF)"
    assert finding["location"]["line"] == fixture_line("ppo_value_clip.py", "GA303-here")
    max_line = fixture_line("ppo_value_clip.py", "GA303-max")
    assert (
        f"the max `torch.max(value_loss_unclipped, value_loss_clipped)` at ppo_value_clip.py:{max_line}"
        in finding["message"]
    )
    assert "critic stops learning from those samples" in finding["message"]
    assert result.codes() == ["GA303"]


def test_ppo_clips_in_a_normal_regime_and_a_drifted_critic_are_clean(gradaudit_cli):
    """With the drifted critic the value clamp saturates on every element, but the max selects the unclipped
    branch, which carries the gradient back: the bare-clamp rule would have cried wolf."""
    for args in ([], ["--drifted-critic"]):
        result = gradaudit_cli("run", "ppo_value_clip.py", "--", *args)
        assert result.findings() == [], args
    value_clamp = next(c for c in result.report["clamps"] if "value_change" in c["expression"])
    assert value_clamp["saturated"] == 1.0
