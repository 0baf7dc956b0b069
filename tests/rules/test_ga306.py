"""GA306 term-dominance: unit tests on hand-made traces, then the real CLI on a BC + policy-gradient actor."""

from gradaudit.findings import Severity
from gradaudit.rules import ga306_term_dominance
from gradaudit.trace import Backward, GradEvent, Location, Parameter, Term, Trace, Window
from tests.conftest import fixture_line

BACKWARD = Location("train.py", 50, "update")
BC_LINE = Location("train.py", 47, "update")
Q_LINE = Location("train.py", 48, "update")
DOMINANCE = ga306_term_dominance.RULE


def backward(index, bc, q, location=BACKWARD, extra=()):
    """One backward of `bc_loss + alpha * q_loss`; `bc` and `q` are their gradient norms per group."""
    terms = [
        Term("bc_loss", BC_LINE, False, sorted(bc), dict(bc)),
        Term("alpha * q_loss", Q_LINE, False, sorted(q), dict(q)),
        *extra,
    ]
    return Backward(index, location, True, True, terms, sorted({*bc, *q}))


def trace_with(*backwards, stepped=None):
    """Each backward's groups are accumulated and then applied by a step, except groups outside `stepped`."""
    groups = sorted({g for b in backwards for t in b.terms for g in t.grad_norms})
    events = []
    for b in backwards:
        for group in groups:
            events.append(GradEvent(len(events), "accumulate", group, backward=b.index, norm=1.0))
        for group in groups:
            if stepped is None or group in stepped:
                events.append(GradEvent(len(events), "apply", group, optimizer=0))
            else:
                events.append(GradEvent(len(events), "wipe", group, optimizer=1))
    parameters = [Parameter(g, g, [4], True, [0]) for g in groups]
    return Trace("train.py", Window(len(backwards), "iterations"), parameters, backwards=list(backwards), events=events)


def test_dominated_term_is_reported_on_the_weaker_term():
    trace = trace_with(*(backward(i, {"velocity_net": 8.5}, {"velocity_net": 0.01}) for i in range(3)))
    (finding,) = DOMINANCE.run(trace)
    assert (finding.rule, finding.subject, finding.location) == ("GA306", "alpha * q_loss", Q_LINE)
    assert finding.severity == Severity.info
    assert finding.message.startswith(
        "on velocity_net, the gradient of `bc_loss` is 850x that of `alpha * q_loss` (median over 3 backward passes"
    )
    assert "|Q|.detach().mean()" in finding.hint


def test_balanced_terms_are_clean():
    trace = trace_with(*(backward(i, {"velocity_net": 1.0}, {"velocity_net": 0.5}) for i in range(3)))
    assert DOMINANCE.run(trace) == []


def test_max_ratio_override():
    trace = trace_with(*(backward(i, {"velocity_net": 8.5}, {"velocity_net": 0.01}) for i in range(3)))
    assert DOMINANCE.run(trace, {"max_ratio": 1000.0}) == []
    balanced = trace_with(backward(0, {"velocity_net": 1.0}, {"velocity_net": 0.05}))
    assert len(DOMINANCE.run(balanced, {"max_ratio": 10.0})) == 1


def test_the_median_ignores_one_swinging_pass():
    trace = trace_with(
        backward(0, {"velocity_net": 1.0}, {"velocity_net": 0.5}),
        backward(1, {"velocity_net": 1.0}, {"velocity_net": 1e-5}),  # one pass where the Q term nearly vanished
        backward(2, {"velocity_net": 1.0}, {"velocity_net": 0.4}),
    )
    assert DOMINANCE.run(trace) == []
    dominated = trace_with(
        backward(0, {"velocity_net": 1.0}, {"velocity_net": 1e-3}),
        backward(1, {"velocity_net": 1.0}, {"velocity_net": 0.5}),
        backward(2, {"velocity_net": 1.0}, {"velocity_net": 2e-3}),
    )
    (finding,) = DOMINANCE.run(dominated)
    assert "500x" in finding.message


def test_terms_on_different_groups_do_not_compete():
    trace = trace_with(backward(0, {"velocity_net": 100.0}, {"critic": 1e-3}))
    assert DOMINANCE.run(trace) == []


def test_a_term_that_alone_trains_a_head_is_not_drowned():
    # The value loss is tiny on the shared encoder but is the only term training its head.
    trace = trace_with(backward(0, {"encoder": 1.0}, {"encoder": 1e-4, "value_head": 0.3}))
    assert DOMINANCE.run(trace) == []


def test_groups_no_step_applies_do_not_count():
    # The Q-loss also reaches the critic, but the critic's gradient from this backward is wiped, never stepped.
    trace = trace_with(backward(0, {"actor": 1.0}, {"actor": 1e-4, "critic": 0.3}), stepped={"actor"})
    (finding,) = DOMINANCE.run(trace)
    assert finding.subject == "alpha * q_loss" and finding.message.startswith("on actor,")


def test_zero_gradient_terms_are_left_to_ga102():
    trace = trace_with(backward(0, {"velocity_net": 1.0}, {"velocity_net": 0.0}))
    assert DOMINANCE.run(trace) == []


def test_the_strongest_rival_is_named():
    entropy = Term("ent_coef * entropy", Location("train.py", 49, "update"), False, ["actor"], {"actor": 1e-4})
    trace = trace_with(backward(0, {"actor": 1.0}, {"actor": 0.5}, extra=[entropy]))
    (finding,) = DOMINANCE.run(trace)
    assert finding.subject == "ent_coef * entropy"
    assert "the gradient of `bc_loss` is 1e+04x" in finding.message


def test_backward_call_sites_are_separate():
    trace = trace_with(
        backward(0, {"actor": 1.0}, {"actor": 1e-3}),
        backward(1, {"actor": 1.0}, {"actor": 1.0}, location=Location("train.py", 80, "update")),
        backward(2, {"actor": 1.0}, {"actor": 1.0}, location=Location("train.py", 80, "update")),
    )
    (finding,) = DOMINANCE.run(trace)
    assert "median over 1 backward pass at train.py:50" in finding.message


# Through the CLI ---------------------------------------------------------------------------------------------------


def test_tiny_policy_gradient_coefficient_is_dominated(gradaudit_cli):
    result = gradaudit_cli("run", "term_dominance.py")
    (finding,) = result.findings("GA306")
    assert finding["severity"] == "info"
    assert finding["subject"] == "pg_coef * pg_loss"
    assert "on actor, the gradient of `bc_loss` is" in finding["message"]
    assert finding["location"]["line"] == fixture_line("term_dominance.py", "GA306-here")


def test_balanced_coefficient_is_clean(gradaudit_cli):
    result = gradaudit_cli("run", "term_dominance.py", "--", "--balanced")
    assert result.findings() == []
    assert result.exit_code == 0


def test_term_whose_gradient_was_not_measured_is_never_reported():
    """A term whose backward runs program code (a hook, a custom Function) is not measured alone: no claim on it."""
    skipped = Term("alpha * q_loss", Q_LINE, False, ["velocity_net"], {}, grads_skipped="a backward through it runs x")
    passes = [
        Backward(
            i,
            BACKWARD,
            True,
            True,
            [Term("bc_loss", BC_LINE, False, ["velocity_net"], {"velocity_net": 8.5}), skipped],
            ["velocity_net"],
        )
        for i in range(3)
    ]
    assert DOMINANCE.run(trace_with(*passes)) == []


def test_non_finite_gradients_are_left_to_ga305():
    for bc, q in ((float("nan"), 1e-4), (float("inf"), 1e-4), (1.0, float("nan"))):
        trace = trace_with(backward(0, {"actor": bc}, {"actor": q}))
        assert DOMINANCE.run(trace) == [], (bc, q)
    (finding,) = DOMINANCE.run(trace_with(backward(0, {"actor": 1.0}, {"actor": 1e-4})))  # the finite twin
    assert finding.subject == "alpha * q_loss"
