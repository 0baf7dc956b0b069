from tests.conftest import fixture_line


def test_zero_entropy_coefficient_is_info(gradaudit_cli):
    result = gradaudit_cli("run", "entropy_bonus.py", "--", "--ent-coef", "0")
    assert result.exit_code == 0
    (finding,) = result.findings("GA102")
    assert finding["severity"] == "info"
    assert finding["subject"] == "ent_coef * entropy_loss"
    assert "zero coefficient" in finding["message"]
    assert finding["location"]["line"] == fixture_line("entropy_bonus.py", "GA102-here")


def test_nonzero_entropy_coefficient_is_clean(gradaudit_cli):
    result = gradaudit_cli("run", "entropy_bonus.py")
    assert result.findings("GA102") == []
    assert result.at_least_warning() == []  # GA306 informs: a near-uniform policy's entropy gradient is tiny


def test_term_not_measured_in_some_pass_is_not_reported():
    """Zero in one pass, unmeasured in another (its backward ran a hook): GA102 cannot say it is always zero."""
    from gradaudit.rules import ga102_zero_grad_term
    from gradaudit.trace import Backward, Location, Term, Trace, Window

    where = Location("train.py", 12, "update")

    def backward(index: int, **measured) -> Backward:
        term = Term("0.0 * entropy", where, False, ["policy"], coefficient=0.0, **measured)
        return Backward(index, Location("train.py", 14), True, True, [term], ["policy"])

    measured_zero = backward(0, grad_norms={"policy": 0.0})
    assert [
        f.subject
        for f in ga102_zero_grad_term.RULE.run(Trace("t.py", Window(1, "iterations"), backwards=[measured_zero]))
    ] == ["0.0 * entropy"]
    skipped = backward(1, grads_skipped="a backward through it runs a gradient hook at train.py:9")
    trace = Trace("t.py", Window(2, "iterations"), backwards=[measured_zero, skipped])
    assert ga102_zero_grad_term.RULE.run(trace) == []


def test_term_with_a_nan_gradient_is_not_called_zero():
    from gradaudit.rules import ga102_zero_grad_term
    from gradaudit.trace import Backward, Location, Term, Trace, Window

    where = Location("train.py", 12, "update")
    term = Term("log_barrier", where, False, ["policy"], grad_norms={"policy": float("nan")})
    backward = Backward(0, Location("train.py", 14), True, False, [term], ["policy"])
    assert ga102_zero_grad_term.RULE.run(Trace("t.py", Window(1, "iterations"), backwards=[backward])) == []
