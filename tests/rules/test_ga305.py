from gradaudit.rules import ga305_nonfinite_grad
from gradaudit.trace import Backward, Location, NonFiniteOrigin, Trace, Window
from tests.conftest import fixture_line

BACKWARD = Location("train.py", 20, "<module>")
LOG_LINE = Location("train.py", 17, "<module>")


def test_log_of_negative_gives_a_nonfinite_loss(gradaudit_cli):
    result = gradaudit_cli("run", "nan_loss.py", "--", "--bug")
    (finding,) = result.findings("GA305")
    assert finding["subject"] == "loss"
    assert "log" in finding["message"] and "torch.log(out)" in finding["message"]
    assert finding["location"]["line"] == fixture_line("nan_loss.py", "GA305-here")


def test_nonfinite_gradient_is_reported_on_its_group():
    import torch

    import gradaudit

    scale = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([scale], lr=0.1)
    with gradaudit.audit() as audit:
        loss = torch.sqrt(scale).sum()  # d/dx sqrt(x) at 0 is inf
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert ("GA305", "scale") in {(f.rule, f.subject) for f in audit.findings}


def test_softplus_is_clean(gradaudit_cli):
    assert gradaudit_cli("run", "nan_loss.py").findings() == []


def nonfinite_trace(origins):
    backwards = [Backward(i, BACKWARD, True, False, [], []) for i in range(2)]
    return Trace("train.py", Window(2, "iterations"), backwards=backwards, nonfinite_origins=origins)


def test_nonfinite_loss_points_at_the_op_that_produced_it():
    origin = NonFiniteOrigin("log", LOG_LINE, "torch.log(out)", 1, "nan")
    (finding,) = ga305_nonfinite_grad.RULE.run(nonfinite_trace([origin]))
    assert (finding.rule, finding.subject, finding.location) == ("GA305", "loss", LOG_LINE)
    assert "the first NaN was produced by log in `torch.log(out)` at train.py:17" in finding.message


def test_origin_of_another_backward_is_not_borrowed():
    trace = nonfinite_trace([NonFiniteOrigin("exp", LOG_LINE, "ratio.exp()", 7, "inf")])
    (finding,) = ga305_nonfinite_grad.RULE.run(trace)
    assert finding.location == BACKWARD
    assert finding.message == "the loss of the backward at train.py:20 is NaN or infinite"
