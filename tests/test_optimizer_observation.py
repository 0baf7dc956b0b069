"""Op observation pauses inside optimizer internals (step, zero_grad), but not in a step's closure, and a step that
raises does not leave it paused."""

import torch
from torch import nn

import gradaudit


def _ops_observed_in_a_step(tensors: int) -> int:
    params = [nn.Parameter(torch.randn(3)) for _ in range(tensors)]
    optimizer = torch.optim.Adam(params, lr=0.1)
    with gradaudit.audit() as audit:
        sum(p.sum() for p in params).backward()
        before = audit.recorder.mode.clock
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return audit.recorder.mode.clock - before


def test_optimizer_internals_are_not_observed():
    """Only the profiler's record_function around a step is seen, however many tensors it updates."""
    assert _ops_observed_in_a_step(1) == _ops_observed_in_a_step(50) <= 2


def test_a_step_closure_is_observed():
    model = nn.Linear(3, 1)
    closure_ops = []
    with gradaudit.audit() as audit:

        def closure() -> torch.Tensor:
            start = audit.recorder.mode.clock
            loss = model(torch.randn(4, 3)).sum()
            closure_ops.append(audit.recorder.mode.clock - start)
            return loss

        torch.optim.LBFGS(model.parameters(), max_iter=1).step(closure)
    assert closure_ops and all(count > 0 for count in closure_ops)


class _Failing(torch.optim.SGD):
    def step(self, closure=None):
        raise FloatingPointError("diverged")


def test_a_step_that_raises_leaves_observation_on():
    model = nn.Linear(3, 1)
    failing = _Failing(model.parameters(), lr=0.1)
    with gradaudit.audit() as audit:
        model(torch.randn(4, 3)).sum().backward()
        try:
            failing.step()
        except FloatingPointError:
            pass
        before = audit.recorder.mode.clock
        model(torch.randn(4, 3)).sum()
        assert audit.recorder.mode.clock > before


class _Marker(torch.overrides.TorchFunctionMode):
    """A mode of the program's own, entered during the audit."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        return func(*args, **(kwargs or {}))


class _StackReporting(torch.optim.SGD):
    """Notes the modes on the stack while its step runs."""

    seen: list = []

    def step(self, closure=None):
        _StackReporting.seen = torch.overrides._get_current_function_mode_stack()
        return super().step(closure)


def test_a_step_runs_without_the_observing_mode_which_returns_beneath_the_programs_own():
    model = nn.Linear(3, 1)
    optimizer = _StackReporting(model.parameters(), lr=0.1)
    with gradaudit.audit() as audit:
        with _Marker() as marker:
            model(torch.randn(4, 3)).sum().backward()
            optimizer.step()
            after = torch.overrides._get_current_function_mode_stack()
    assert _StackReporting.seen == [marker]
    assert after == [audit.recorder.mode, marker]
    assert not torch.overrides._get_current_function_mode_stack()
