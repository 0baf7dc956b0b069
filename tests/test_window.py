"""The audit window: how iterations are counted, where the program is stopped, and what happens when it will not."""

import torch
from torch import nn

from gradaudit.capture import Audit
from tests.conftest import fixture_line


def _steps(report: dict) -> dict[str, int]:
    return {o["name"]: o["steps"] for o in report["optimizers"]}


def test_a_swallowed_stop_lets_the_program_finish_unaudited(gradaudit_cli):
    result = gradaudit_cli("run", "bare_except_loop.py")
    assert "completed 199 of 200 steps" in result.output  # only the step the stop interrupted is lost
    assert result.exit_code == 1
    assert result.report["window"]["iterations"] == 3 and _steps(result.report) == {"optimizer": 3}
    assert "caught gradaudit's stop after 3 iteration(s) and ran on unaudited" in result.report["window"]["note"]
    (finding,) = result.findings("GA202")
    assert finding["subject"] == "head"
    assert finding["location"]["line"] == fixture_line("bare_except_loop.py", "GA202-here")


def _train(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(8, 3)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_a_swallowed_stop_uninstalls_everything_at_once_even_under_the_programs_own_mode():
    backward = torch.autograd.backward
    model = nn.Linear(3, 1)
    audit = Audit(iterations=2)
    with audit:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        stops = 0
        with torch.device("cpu"):  # a torch function mode above gradaudit's
            for _ in range(10):
                try:
                    _train(model, optimizer)
                except BaseException:  # noqa: BLE001 - what a careless program does
                    stops += 1
            modes = [type(mode).__name__ for mode in torch.overrides._get_current_function_mode_stack()]
        assert torch.autograd.backward is backward and modes == ["DeviceContext"]
    assert not torch.overrides._get_current_function_mode_stack()
    assert stops == 1 and audit.recorder.stop_swallowed
    assert len(audit.recorder.backwards) == 2


def test_a_stop_swallowed_before_a_backward_leaves_no_mode_behind():
    """The first entry after the swallow is `loss.backward()`, run inside torch's dispatch to gradaudit's own mode."""
    weight = nn.Parameter(torch.ones(3))
    audit = Audit(iterations=2)
    with audit:
        optimizer = torch.optim.SGD([weight], lr=0.1)
        for _ in range(6):
            loss = (torch.ones(3) * weight).pow(2).sum()  # no module call: no forward to stop at
            try:
                optimizer.zero_grad()
            except BaseException:  # noqa: BLE001
                pass
            loss.backward()
            optimizer.step()
    assert audit.recorder.stop_swallowed
    assert not torch.overrides._get_current_function_mode_stack()


def test_a_stop_unwinding_through_finally_blocks_is_not_swallowed():
    model = nn.Linear(3, 1)
    audit = Audit(iterations=2)
    cleanup_forwards = 0
    with audit:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            for _ in range(10):
                _train(model, optimizer)
        finally:
            model(torch.zeros(1, 3))  # a forward while the stop unwinds: neither a second stop nor a swallow
            cleanup_forwards += 1
    assert cleanup_forwards == 1
    assert not audit.recorder.stop_swallowed and audit.recorder.stopped_by == "iterations"
    assert len(audit.recorder.backwards) == 2


def test_a_calibration_optimizer_stepping_once_does_not_hold_the_window(gradaudit_cli):
    result = gradaudit_cli("run", "calibration_optimizer.py")
    assert "trained all 300 steps" not in result.output
    assert result.report["window"]["stopped_by"] == "iterations"
    assert _steps(result.report) == {"calibration": 1, "optimizer": 3}


def test_backward_calls_without_steps_cap_the_window(gradaudit_cli):
    result = gradaudit_cli("run", "calibration_optimizer.py", "--", "--manual")
    assert "trained all 300 steps" not in result.output
    assert result.report["window"]["stopped_by"] == "cap"
    assert _steps(result.report) == {"calibration": 1, "optimizer": 0}


def test_a_program_that_evaluates_after_the_window_is_stopped_at_its_next_forward(gradaudit_cli):
    result = gradaudit_cli("run", "eval_forever.py")
    assert "evaluated" not in result.output
    assert result.report["window"] == {"iterations": 3, "stopped_by": "iterations", "note": ""}


def test_a_lightning_style_wrapper_is_the_optimizer_it_wraps(gradaudit_cli):
    for variant in ((), ("--dict-copy",)):
        result = gradaudit_cli("run", "lightning_wrapper.py", "--", *variant)
        assert result.exit_code == 0 and result.findings() == [], variant
        assert "trained all 200 steps" not in result.output
        assert result.report["window"]["stopped_by"] == "iterations"
        assert [(o["kind"], o["steps"]) for o in result.report["optimizers"]] == [("Adam", 3)]


def test_a_real_duplicate_optimizer_is_still_reported(gradaudit_cli):
    result = gradaudit_cli("run", "lightning_wrapper.py", "--", "--duplicate")
    (finding,) = result.findings("GA204")
    assert finding["subject"] == "module.net"
    assert finding["location"]["line"] == fixture_line("lightning_wrapper.py", "GA204-here")


class _DelegatingWrapper:
    """As Lightning builds LightningOptimizer: a class made on the fly over the wrapped optimizer's class."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer
        self.__class__ = type("Wrapped" + type(optimizer).__name__, (type(self), type(optimizer)), {})

    def step(self, closure=None):
        return self._optimizer.step(closure=closure)

    def __getattr__(self, item):
        return getattr(self._optimizer, item)


def test_a_wrapper_seen_first_is_the_optimizer_it_wraps():
    model = nn.Linear(3, 1)
    wrapper = _DelegatingWrapper(torch.optim.Adam(model.parameters(), lr=0.1))
    with Audit(iterations=5) as audit:  # made before the audit: the wrapper's zero_grad shows it first
        for _ in range(2):
            _train(model, wrapper)
    assert [(o.kind, o.steps) for o in audit.trace.optimizers] == [("Adam", 2)]
    assert audit.findings == []
