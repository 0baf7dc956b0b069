"""gradaudit never changes what it observes, and leaves nothing installed."""

import copy

import torch
import torch.optim.optimizer as optimizer_module
from torch import nn
from torch.nn.modules import module as module_module

import gradaudit


def _train(model: nn.Module, steps: int = 4) -> None:
    torch.manual_seed(1)
    critic = nn.Linear(3, 1)
    optimizer = torch.optim.Adam([*model.parameters(), *critic.parameters()], lr=1e-2)
    for _ in range(steps):
        features = model(torch.randn(16, 4))
        loss = critic(features).pow(2).mean() + 0.1 * features.abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_audited_training_is_bit_identical():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    audited = copy.deepcopy(plain)
    _train(plain)
    with gradaudit.audit():
        _train(audited)
    for a, b in zip(plain.parameters(), audited.parameters(), strict=True):
        assert torch.equal(a, b)


def test_nothing_remains_installed():
    originals = (torch.autograd.backward, torch.autograd.grad, torch.Tensor.backward, torch.optim.Optimizer.zero_grad)
    init = torch.optim.Optimizer.__init__
    with gradaudit.audit():
        _train(nn.Linear(4, 3))
        assert torch.autograd.backward is not originals[0]
    assert (
        torch.autograd.backward,
        torch.autograd.grad,
        torch.Tensor.backward,
        torch.optim.Optimizer.zero_grad,
    ) == originals
    assert torch.optim.Optimizer.__init__ is init
    assert not module_module._global_forward_pre_hooks and not module_module._global_forward_hooks
    assert not optimizer_module._global_optimizer_pre_hooks and not optimizer_module._global_optimizer_post_hooks
    assert not torch.overrides._get_current_function_mode_stack()


def test_nothing_remains_after_the_program_raises():
    try:
        with gradaudit.audit():
            raise KeyError("boom")
    except KeyError:
        pass
    assert not module_module._global_forward_pre_hooks
    assert not torch.overrides._get_current_function_mode_stack()


def test_importing_gradaudit_patches_nothing():
    import subprocess
    import sys

    code = "import torch; b = torch.autograd.backward; import gradaudit, gradaudit.cli; assert torch.autograd.backward is b"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
