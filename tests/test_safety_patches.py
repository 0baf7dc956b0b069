"""Patched callables take exactly what the originals take, outlive the audit harmlessly, and install all-or-nothing."""

import copy
import inspect
import sys

import pytest
import torch
import torch.optim.optimizer as optimizer_module
from torch import nn
from torch.nn.modules import module as module_module

import gradaudit
from gradaudit.capture import Audit, InstallError


def _assert_nothing_installed(originals: tuple) -> None:
    """The same globals test_observer_effect checks."""
    current = (
        torch.autograd.backward,
        torch.autograd.grad,
        torch.Tensor.backward,
        torch.optim.Optimizer.zero_grad,
        torch.optim.Optimizer.__init__,
    )
    assert current == originals
    assert not module_module._global_forward_pre_hooks and not module_module._global_forward_hooks
    assert not optimizer_module._global_optimizer_pre_hooks and not optimizer_module._global_optimizer_post_hooks
    assert not torch.overrides._get_current_function_mode_stack()


def _originals() -> tuple:
    return (
        torch.autograd.backward,
        torch.autograd.grad,
        torch.Tensor.backward,
        torch.optim.Optimizer.zero_grad,
        torch.optim.Optimizer.__init__,
    )


def _wgan_gp_steps(critic: nn.Module, steps: int = 3) -> None:
    """The WGAN-GP gradient penalty: `torch.autograd.grad` called with keywords only, with create_graph."""
    torch.manual_seed(3)
    optimizer = torch.optim.Adam(critic.parameters(), lr=1e-3)
    for _ in range(steps):
        real, fake = torch.randn(16, 4), torch.randn(16, 4)
        mix = torch.rand(16, 1)
        interpolated = (mix * real + (1 - mix) * fake).requires_grad_(True)
        (gradients,) = torch.autograd.grad(
            outputs=critic(interpolated).sum(), inputs=interpolated, create_graph=True, retain_graph=True
        )
        penalty = (gradients.norm(2, dim=1) - 1).pow(2).mean()
        loss = critic(fake).mean() - critic(real).mean() + 10 * penalty
        optimizer.zero_grad()
        torch.autograd.backward(tensors=loss, grad_tensors=torch.ones(()))
        optimizer.step()


def test_keyword_only_grad_and_backward_run_as_without_audit():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    audited = copy.deepcopy(plain)
    _wgan_gp_steps(plain)
    with gradaudit.audit() as audit:
        _wgan_gp_steps(audited)
        assert inspect.signature(torch.autograd.grad) == inspect.signature(torch.autograd.grad.__wrapped__)
    for a, b in zip(plain.parameters(), audited.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [b.accumulates for b in audit.trace.backwards] == [False, True] * 3


def test_a_wrong_call_raises_the_programs_own_type_error():
    with pytest.raises(TypeError) as plain:
        torch.autograd.grad(inputs=[torch.ones(1)])
    with gradaudit.audit(), pytest.raises(TypeError) as audited:
        torch.autograd.grad(inputs=[torch.ones(1)])
    assert str(audited.value) == str(plain.value)


def test_a_wrapper_bound_during_the_audit_calls_the_original_afterwards(tmp_path, monkeypatch):
    (tmp_path / "bound_during_audit.py").write_text("from torch.autograd import backward, grad\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = nn.Linear(3, 1)
    audit = Audit(iterations=1)
    with audit:
        import bound_during_audit
    assert bound_during_audit.grad is not torch.autograd.grad
    seen = len(audit.recorder.backwards)
    for _ in range(3):  # past the window a live wrapper would stop the program here
        x = torch.randn(5, 3, requires_grad=True)
        (gx,) = bound_during_audit.grad(outputs=model(x).sum(), inputs=x, create_graph=True)
        bound_during_audit.backward(tensors=gx.sum())
    assert model.weight.grad is not None
    assert len(audit.recorder.backwards) == seen
    del sys.modules["bound_during_audit"]


@pytest.mark.parametrize(
    "failing",
    [
        (module_module, "register_module_forward_hook"),
        ("gradaudit.capture.recorder.ProvenanceMode.__enter__"),
    ],
)
def test_a_failed_install_leaves_nothing_installed(monkeypatch, failing):
    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    if isinstance(failing, tuple):
        monkeypatch.setattr(*failing, fail)
    else:
        monkeypatch.setattr(failing, fail)
    originals = _originals()
    with pytest.raises(InstallError, match="could not start the audit.*injected"):
        with gradaudit.audit():
            pytest.fail("the block must not run")
    monkeypatch.undo()
    _assert_nothing_installed(originals)


class _HalfBuilt(torch.optim.Optimizer):
    def __init__(self) -> None:
        raise ValueError("no parameters given")


class _HalfBuiltWrapper(torch.optim.SGD):
    """A wrapper that delegates attributes, alive before its own __init__ ran (its __getattr__ recurses)."""

    def __getattr__(self, item):
        return getattr(self._optimizer, item)


def test_half_constructed_optimizers_in_memory_do_not_stop_the_audit():
    alive = [torch.optim.Optimizer.__new__(_HalfBuilt), _HalfBuiltWrapper.__new__(_HalfBuiltWrapper)]
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradaudit.audit() as audit:
        optimizer.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
    assert [(o.kind, o.steps) for o in audit.trace.optimizers if o.steps] == [("SGD", 1)]
    assert audit.trace.window.internal_errors == 0
    assert alive
